"""Every FMS architecture against its HF class through `parity.fms_arch` (tiny seeded configs, CPU, float32): the
derived probe tables, the verdict of each architecture (PASS, or FAIL at the module a finding of
docs/fms-parity.md names), and one planted fault per family (dense decoder, MoE, hybrid Mamba, encoder) that must
FAIL at the planted module. Fixed small size, so it runs in the CPU gate only."""

import dataclasses
import json

import pytest
import torch
import transformers

from parity.fms_arch import cases
from parity.fms_arch.cli import MIN_TRANSFORMERS, main
from parity.fms_arch.configs import ARCHITECTURES, BY_NAME
from parity.fms_arch.run import LoadFailure, build_sides, derive_table, model_section

pytestmark = [pytest.mark.runs_at("tiny", device="cpu", dtype="float32")]
NEEDS_5 = pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < MIN_TRANSFORMERS,
                             reason=f"fms-parity refuses transformers {transformers.__version__} (needs >= "
                                    f"{MIN_TRANSFORMERS}: its configs are in 5.x's schema); not covered on this line")

# The verdict of the float32 one-sequence section of each architecture: absent = PASS; ("own", module) = FAIL with
# that module the first own error (FMS computes it wrongly on HF's own inputs); ("divergence", probe) = FAIL first
# diverging there; "load" = FMS cannot load the checkpoint. Each FAIL is a finding about FMS read in FMS's source;
# docs/fms-parity.md gives the smallest config that shows it.
FINDINGS = {
    # Qwen3's HF param builder passes `rope_base`; FMS's Qwen3Config reads `rope_theta` (default 1e6): theta ignored
    "qwen3": ("own", "base_model.layers.0.attn"),
    # gpt_oss `_hf_to_fms_rope` matches `layers.N.attn.in_proj...` with re.match on names that start with
    # `base_model.`: q / k rows are never permuted for FMS's interleaved RoPE (exact at 1 token, wrong from 2)
    "gpt_oss": ("own", "base_model.layers.0.attn"),
    # Ministral3 with YaRN RoPE: q, k, v equal, the attention core differs
    "ministral3": ("own", "language_model.base_model.layers.0.attn"),
    # the bamba HF param builder passes no RoPE theta: FMS uses its default 10000 (5000 here); layer 9 is attention
    "bamba": ("own", "base_model.layers.9.attn"),
    # FMS's mpnet adapter keeps HF's `mpnet.` prefix: no weight is loaded (warning only), and FMS has no LM head
    "mpnet": ("divergence", "logits"),
    # FMS's Granite LM divides by logits_scaling; HF LlavaNextForConditionalGeneration's lm_head does not
    "llava_next": ("divergence", "logits"),
    # FMS's mixtral "hf" adapter expects Mistral's consolidated names: an HF checkpoint does not load
    "mixtral": "load",
}
NO_TABLE = {"mpnet"}  # nothing loads, so nothing pairs: every HF module is refused with its reason


def _section(name: str, workdir, arch=None, mutate=None, floors: bool = True):
    arch = arch or BY_NAME[name]
    sides = build_sides(arch, workdir)
    if mutate is not None:
        mutate(sides.fms)
    single = cases.single(arch, sides.config)
    probes, derivation = derive_table(sides, single)
    result, _ = model_section(sides, single, probes, torch.float32, floors=floors)
    return sides, derivation, result


@NEEDS_5
@pytest.mark.parametrize("name", [arch.name for arch in ARCHITECTURES])
def test_architecture_verdict(name, tmp_path, record_property):
    expected = FINDINGS.get(name)
    if expected == "load":
        with pytest.raises(LoadFailure):
            build_sides(BY_NAME[name], tmp_path)
        return
    _, derivation, result = _section(name, tmp_path)
    record_property("probes", len(result.probes))
    if name in NO_TABLE:
        assert derivation.probes == [] and derivation.refused
    else:
        assert len(derivation.probes) >= 8, derivation.refused  # a table was derived, not an empty pass
    if expected is None:
        assert result.passed, (result.first_divergence, result.first_own_error)
        return
    kind, where = expected
    assert not result.passed
    assert (result.first_own_error if kind == "own" else result.first_divergence) == where


@NEEDS_5
def test_derived_table_covers_each_layer(tmp_path):
    """Per layer: the residual stream, attention and MLP blocks, their projections (q / k / v / gate / up as slices
    of FMS's fused tensors, q / k with the RoPE permutation read from the adapter); embedding, final norm, head."""
    sides = build_sides(BY_NAME["llama"], tmp_path)
    probes, derivation = derive_table(sides, cases.single(sides.arch, sides.config))
    by_name = {p.name: p for p in probes}
    for layer in range(2):
        base = f"base_model.layers.{layer}"
        for part in ("", ".attn", ".ff_sub_layer", ".ln", ".ff_ln", ".attn.dense", ".ff_sub_layer.w2"):
            assert base + part in by_name
        assert by_name[f"{base}.attn.in_proj.qkv_fused-q_proj"].fms_adapter == \
            "feature_slice(0, 64) | rope_interleaved_to_halves(16)"
        assert by_name[f"{base}.attn.in_proj.qkv_fused-v_proj"].fms_adapter == "feature_slice(96, 128)"
        assert by_name[f"{base}.ff_sub_layer.wg1_fused-up_proj"].fms_adapter == "feature_slice(96, 192)"
    assert {"base_model.embedding", "base_model.dec_norm", "head", "logits"} <= set(by_name)
    assert derivation.refused == []


@NEEDS_5
def test_unpairable_modules_are_refused_with_a_reason(tmp_path):
    sides = build_sides(BY_NAME["roberta"], tmp_path)
    _, derivation = derive_table(sides, cases.single(sides.arch, sides.config))
    reasons = {path: entry["reason"] for entry in derivation.refused for path in [entry["hf"], *entry.get("inside", ())]}
    # FMS keeps rows 2.. of RoBERTa's position table and feeds positions from 0: not comparable as a module
    assert "keeps only part" in reasons["roberta.embeddings.position_embeddings"]
    assert "split across FMS modules" in reasons["roberta.encoder.layer.0.attention"]


# ---------------------------------------------------------------------------------------------------------------
# planted faults: FMS's own loading or compute broken, the first divergence must name the planted module


def _patch_builder(monkeypatch, hf_class: str, drop: str, value=None):
    """FMS's HF config builder for `hf_class` with one setting dropped (FMS's default used) or replaced."""
    from fms.models.hf.config_utils import _FMS_MODEL_CONFIG_REGISTRY as registry

    original = registry.model_param_builders[hf_class]

    def builder(config):
        params = dict(original(config))
        if value is None:
            params.pop(drop)
        else:
            params[drop] = value
        return params

    monkeypatch.setitem(registry.model_param_builders, hf_class, builder)


@NEEDS_5
def test_planted_dense_rope_theta_ignored(tmp_path, monkeypatch):
    _patch_builder(monkeypatch, "LlamaForCausalLM", "rope_theta")  # FMS's default 10000 instead of 5000
    _, _, result = _section("llama", tmp_path)
    assert not result.passed
    assert result.first_own_error == "base_model.layers.0.attn"


@NEEDS_5
def test_planted_encoder_norm_eps_misread(tmp_path, monkeypatch):
    _patch_builder(monkeypatch, "RobertaForMaskedLM", "norm_eps", 0.5)  # an eps read from the wrong field
    _, _, result = _section("roberta", tmp_path)
    assert not result.passed
    assert result.first_divergence == result.first_own_error == "base_model.enc_norm"


@NEEDS_5
def test_planted_hybrid_gated_norm_order(tmp_path, monkeypatch):
    """Bamba's gated RMSNorm normalising before gating (Mamba-2 gates first): must fail at the mixer's norm."""
    from fms.modules import ssm

    def gate_after_norm(self, hidden_states, gate=None):
        dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if gate is not None:
            hidden_states = hidden_states * torch.nn.functional.silu(gate.to(torch.float32))
        return self.weight * hidden_states.to(dtype)

    # two Mamba layers, no attention (FMS's attention layers are 9, 18, 27 whatever the config says): clean, it passes
    arch = dataclasses.replace(BY_NAME["bamba"], config={**BY_NAME["bamba"].config, "num_hidden_layers": 2,
                                                         "attn_layer_indices": []})
    _, _, clean = _section("bamba", tmp_path / "clean", arch, floors=False)
    assert clean.passed, (clean.first_divergence, clean.first_own_error)
    monkeypatch.setattr(ssm.RMSNormGated, "forward", gate_after_norm)
    _, _, result = _section("bamba", tmp_path / "planted", arch, floors=False)
    assert not result.passed
    assert result.first_own_error == "base_model.layers.0.ssm.norm"


def _moe_own_errors(result):
    return [p.name for p in sorted(result.probes, key=lambda p: p.order if p.order is not None else 1e9)
            if "ff_sub_layer" in p.name and p.teacher.status not in ("pass", "not_applicable", "not_run")]


@NEEDS_5
def test_planted_moe_router_bias_not_loaded(tmp_path):
    """gpt_oss, the MoE FMS loads from an HF checkpoint (its findings upstream: RoPE, experts): the router bias of
    layer 0 left unloaded must be FMS's own error at that router, the first own error of any MoE module."""
    _, _, clean = _section("gpt_oss", tmp_path / "clean", floors=False)
    assert "base_model.layers.0.ff_sub_layer.gate" not in _moe_own_errors(clean)

    def unload_router_bias(fms):
        with torch.no_grad():
            fms.base_model.layers[0].ff_sub_layer.gate.bias.zero_()

    _, _, planted = _section("gpt_oss", tmp_path / "planted", mutate=unload_router_bias, floors=False)
    assert _moe_own_errors(planted)[0] == "base_model.layers.0.ff_sub_layer.gate"


# ---------------------------------------------------------------------------------------------------------------
# the command line


@NEEDS_5
def test_cli_list_names_every_architecture(capsys, tmp_path):
    out = tmp_path / "archs.json"
    assert main(["list", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    from fms.models import list_models

    assert [r["architecture"] for r in rows] == [a.name for a in ARCHITECTURES]
    fms_own = {name for name in list_models() if not name.startswith("granite_speech")}  # this project's own
    assert {r["architecture"] for r in rows} == fms_own and len(fms_own) == 20
    assert "Qwen3ForCausalLM" in capsys.readouterr().out


@NEEDS_5
@pytest.mark.parametrize("argv, message", [
    (["compare", "--architecture", "nope"], "not an FMS architecture"),
    (["compare", "--architecture", "llama", "--dtype", "float8"], "--dtype"),
    (["compare", "--architecture", "llama", "--device", "cuda"], "--device"),
    (["compare", "--architecture", "llama", "--hf-config", "missing.json"], "no such file"),
])
def test_cli_usage_errors_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and err.count("\n") == 1


@NEEDS_5
def test_cli_refuses_a_pickle_checkpoint(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    assert main(["compare", "--architecture", "llama", "--checkpoint", str(tmp_path)]) == 2
    assert "pickle" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"]}))
    assert main(["compare", "--architecture", "llama", "--checkpoint", str(tmp_path)]) == 2
    assert "declares 'BertForMaskedLM'" in capsys.readouterr().err


@NEEDS_5
def test_cli_compare_exit_code_and_reports(tmp_path, capsys):
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 48,
                                  "max_position_embeddings": 32, "tie_word_embeddings": False,
                                  "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0}}))
    html, report = tmp_path / "r.html", tmp_path / "r.json"
    code = main(["compare", "--architecture", "llama", "--hf-config", str(config), "--no-bf16", "--report",
                 str(html), "--json", str(report)])
    assert code == 0, capsys.readouterr().out[-2000:]
    data = json.loads(report.read_text())
    assert data["summary"]["verdict"] == "pass" and html.read_text().startswith("<!")
    assert [s["kind"] for s in data["sections"]] == ["model", "model", "generation"]
    qwen = {**json.loads(config.read_text()), "head_dim": 16, "intermediate_size": 256}  # FMS rounds to 256
    config.write_text(json.dumps(qwen))
    code = main(["compare", "--architecture", "qwen3", "--hf-config", str(config), "--no-bf16", "--json",
                 str(report)])
    assert code == 1  # the rope_theta finding (theta 5000 here, FMS keeps 1e6)
    assert json.loads(report.read_text())["summary"]["first_own_error"]["name"] == "base_model.layers.0.attn"


def test_cli_refuses_transformers_4_before_any_model(monkeypatch, capsys):
    """On the 4.57 line the 5.x-schema configs would lose their RoPE settings silently: refused, exit 2."""
    monkeypatch.setattr(transformers, "__version__", "4.57.6")
    assert main(["compare", "--architecture", "llama"]) == 2
    assert "fms-parity needs transformers >= 5" in capsys.readouterr().err
