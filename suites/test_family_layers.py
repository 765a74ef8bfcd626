"""Layer-by-layer parity of every Granite Speech family member against HF transformers, through the `compare`
pipeline (`parity.granite.pipeline`) with each member's probe table (`parity.granite.probes_family`).

`family_variant` follows --model: `--model tiny` (the CPU gate) runs the tiny version of every family architecture
(tiny-4.0: the 3.3 classes with the LoRA merged in; tiny-plus: granite_speech_plus; tiny-5: the 5.0 CTC model),
`--model 4.1-2b-plus --device cuda` runs that member at its real dimensions, and so on. Checkpoints are the seeded
family fixtures (`build_family_checkpoint`: HF's `save_pretrained`, tokenizer and processor files). The dtype and the
tolerance table follow --dtype (fp32: atol = rtol = 1e-3), --atol/--rtol override it.
"""

import pytest
import torch

import transformers  # noqa: E402  (a hard dependency: a broken install fails, never skips)

from parity.granite.fixtures.family import TINY_FAMILY  # noqa: E402
from parity.granite.cases import ctc_cases, default_cases  # noqa: E402
from parity.granite.models import member_of  # noqa: E402
from parity.granite.pipeline import run_pipeline  # noqa: E402
from parity.granite.probes_family import CTC5, PLUS, SPEECH, probes_for  # noqa: E402

EXPECTED_MEMBER = {"tiny-4.0": SPEECH, "4.0-1b": SPEECH, "4.1-2b": SPEECH, "tiny-plus": PLUS, "4.1-2b-plus": PLUS,
                   "tiny-5": CTC5, "5.0-470m": CTC5}
PADDED = "padded batch of 3"  # the case of both input sets with rows padded differently


@pytest.fixture(scope="module")
def hf_config(family_checkpoint):
    return transformers.AutoConfig.from_pretrained(str(family_checkpoint))


def _padded_case(member: str):
    cases = ctc_cases() if member == CTC5 else default_cases()
    return next(case for case in cases if case.name.startswith(PADDED))


def test_checkpoint_is_the_member(family_variant, family_checkpoint):
    assert member_of(family_checkpoint) == EXPECTED_MEMBER[family_variant]
    names = {path.name for path in family_checkpoint.iterdir()}
    assert "adapter_config.json" not in names  # every family member ships without adapter files
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert any(name.endswith(".safetensors") for name in names) and not any(n.endswith(".bin") for n in names)


def test_probe_table_covers_every_block(family_variant, hf_config):
    probes = probes_for(hf_config)
    names = [p.name for p in probes]
    assert len(names) == len(set(names))
    member = EXPECTED_MEMBER[family_variant]
    if member == CTC5:
        layers = hf_config.encoder_config.num_hidden_layers
        assert len(probes) == 1 + 6 * layers + 2 + 3
        # every 5.0 probe is judged on valid frames only, at its own frame rate
        assert all(p.valid.startswith("frames.x") for p in probes)
        sub = set(hf_config.encoder_config.subsample_layers)
        assert {p.valid for p in probes if p.name.endswith(".conv")} >= {f"frames.x{2 ** k}.conv" for k in
                                                                         range(len(sub))}
    else:
        layers = hf_config.encoder_config.num_layers
        assert sum(1 for n in names if n.startswith("encoder.block.") and n.count(".") == 2) == layers
        assert sum(1 for n in names if n.startswith("decoder.layer.") and n.count(".") == 2) == \
            hf_config.text_config.num_hidden_layers
        plus_rows = [n for n in names if n.startswith("encoder.out")]
        if member == PLUS:
            cat = hf_config.encoder_config.cat_hidden_layers or []
            assert len(plus_rows) == 1 + len(cat) + 1  # the concatenation and each of its parts
            assert names.index("encoder.out") > names.index(f"encoder.block.{layers - 1}")
            assert names.index("encoder.out.final") < names.index("projector.qformer.0")
        else:
            assert plus_rows == []


def test_layers_match_hf(family_variant, family_checkpoint, hf_config, device, dtype, tolerance_overrides,
                         record_property):
    """The padded batch through preprocessing, every probe of the member's table (teacher-forced as well) and
    generation (greedy tokens + logits for the LLM members, CTC ids + text for 5.0)."""
    member = EXPECTED_MEMBER[family_variant]
    case = _padded_case(member)
    sections, _ = run_pipeline(family_checkpoint, cases=(case,), dtype=dtype, device=device,
                               overrides=tolerance_overrides or None)
    kinds = [kind for _, kind, _, _ in sections]
    assert kinds[:2] == ["preprocessing", "model"] and "generation" in kinds[2:]
    worst = 0.0
    for title, kind, result, extra in sections:
        failing = [(p.name, p.status, p.propagated.detail) for p in result.probes if p.status != "pass"]
        assert result.passed, f"{title}: {failing[:5]}"
        for probe in result.probes:
            metrics = probe.propagated.metrics
            if metrics is not None and metrics.numel:
                worst = max(worst, metrics.max_abs)
    floors = {probe.name: probe.noise_floor for probe in sections[0][2].probes if probe.tolerance_class != "exact"}
    assert [name for name in floors if name.startswith("audio.")] == [f"audio.{i}.samples" for i in range(3)]
    assert all(floor is not None for floor in floors.values()), floors  # HF's own float64 recipe, every clip
    if member != CTC5:  # the features' floor: HF's extractor with its mel filterbank in float64
        assert floors["features.input_features"] > 0
    if member != CTC5:  # every decoding loop and transcribe over rows that end at different steps
        ends = {title: extra["rows_end"] for title, kind, _, extra in sections if kind == "generation"}
        assert len(ends) == 4, list(ends)  # eager, fast path with each prefill, transcribe
        for title, rows_end in ends.items():
            assert len({end for end in rows_end["hf_end_steps"] if end is not None}) >= 2, (title, rows_end)
    _, _, model, extra = sections[1]
    assert len(model.probes) == len(probes_for(hf_config, detail=True))  # the pipeline runs the detailed table
    for probe in model.probes:  # nothing vacuous: every probe compared elements, and its own (teacher-forced) run
        assert probe.propagated.metrics is not None and probe.propagated.metrics.numel > 0, probe.name
        assert probe.teacher.status in ("pass", "not_applicable"), (probe.name, probe.teacher.status)
    if member == CTC5:
        assert "lora_regime" not in extra
        masked = [p for p in model.probes if p.propagated.metrics.masked_out]
        assert len(masked) == len(model.probes), "a padded batch masks padded frames in every 5.0 probe"
    else:
        assert extra["lora_regime"] == "merged_in_checkpoint" and extra["hf_adapter"] is False
    record_property("probes", len(model.probes))
    record_property("worst_max_abs", worst)


def test_compare_report_names_the_member_and_its_lora_regime(family_variant, family_checkpoint, device, dtype):
    from parity.granite.models import member_metadata

    meta = member_metadata(family_checkpoint)
    member = EXPECTED_MEMBER[family_variant]
    assert meta["model_type"] == member
    assert meta["lora_regime"] == ("none" if member == CTC5 else "merged_in_checkpoint")
    assert meta["hf_class"] in {"GraniteSpeechForConditionalGeneration", "GraniteSpeechPlusForConditionalGeneration",
                                "GraniteSpeech5ForCTC"}


def test_merged_lora_cases_run_in_the_one_regime_there_is(family_checkpoint):
    from parity.granite.cases import cases_for

    cases = cases_for(family_checkpoint)
    assert all(case.lora_mode == "merged" for case in cases)
    if member_of(family_checkpoint) == CTC5:
        assert cases == ctc_cases() and all(case.clips and case.generate for case in cases)
    else:
        assert len(cases) == len(default_cases()) - 1  # the adapter's audio_only case has nothing to switch


# ---------------------------------------------------------------------------------------------- planted faults
def _first_divergence(checkpoint, case, patch, monkeypatch):
    with monkeypatch.context() as context:
        patch(context)
        sections, _ = run_pipeline(checkpoint, cases=(case,), floors="off")
    model = next(result for _, kind, result, _ in sections if kind == "model")
    return model.first_divergence, model.first_own_error


# the tiny fixtures carry the fault checks; real sizes only measure: deselected at real sizes, with the reason
@pytest.mark.family_members(*TINY_FAMILY)
def test_planted_faults_are_found_where_planted(family_variant, family_checkpoint, monkeypatch):
    """One fault in the FMS model per member, where only that member's table can see it; the report's first
    divergence names the probe, so the table is no formality."""
    member = EXPECTED_MEMBER[family_variant]
    case = _padded_case(member)
    if member == CTC5:
        from granite_speech import ctc5

        # padded frames not zeroed before the depthwise conv: valid frames next to padding change
        def patch(context):
            original = ctc5.Conformer5ConvModule.forward
            context.setattr(ctc5.Conformer5ConvModule, "forward", lambda self, x, mask=None: original(self, x))

        expected = "encoder.block.0.conv"
    elif member == PLUS:
        from granite_speech import plus

        # the mid block exported WITHOUT the self-conditioning term (HF adds it in place to the exported tensor)
        def hidden_states(self, x):
            h = self.input_linear(x)
            exported = [h] if 0 in self.cat_hidden_layers else []
            for index, layer in enumerate(self.layers, start=1):
                h = layer(h)
                if index in self.cat_hidden_layers:
                    exported.append(h)
                if index == self.self_conditioning_layer:
                    h = h + self.ctc_out_mid(torch.softmax(self.ctc_out(h), dim=-1))
            return h, exported

        def patch(context):
            context.setattr(plus.PlusConformerEncoder, "hidden_states", hidden_states)

        expected = "encoder.out"
    else:
        from parity.granite import models, pipeline

        # a LoRA applied on top of a checkpoint whose LoRA is already merged: decoder layer 0's q projection moves
        def patch(context):
            original = models.load_fms_family_model

            def load(*args, **kwargs):
                model = original(*args, **kwargs)
                attn = model.language_model.base_model.layers[0].attn
                q_rows = attn.nheads * attn.emb_kq_per_head
                weight = attn.in_proj.qkv_fused.weight
                generator = torch.Generator().manual_seed(0)
                with torch.no_grad():
                    weight[:q_rows] += 0.05 * torch.randn(weight[:q_rows].shape, generator=generator).to(weight)
                return model

            for module in (models, pipeline):  # each module that calls it: `Models.fms_model`, the two-phase section
                context.setattr(module, "load_fms_family_model", load)

        expected = "decoder.layer.0.attn.q"
    first, own = _first_divergence(family_checkpoint, case, patch, monkeypatch)
    assert first == expected, (first, own)
