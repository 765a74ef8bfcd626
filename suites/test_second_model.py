"""The engine is not Granite-Speech-specific: FMS's own `granite` decoder against HF `GraniteForCausalLM`, with a
probe table derived from FMS's checkpoint adapter name map (`parity/granite_lm.py`). Fixed small size (toy dims)."""

import pytest
import torch

from parity.capture import ModelRun, capture_pair
from parity.diff import diff_captures
from parity.granite_lm import derive_pairs, granite_lm_probes
from parity.report import build_report, render_terminal



pytestmark = pytest.mark.runs_at("toy", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def granite_pair(tmp_path_factory):
    import transformers
    from fms.models import get_model

    config = transformers.GraniteConfig(vocab_size=96, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=80, max_position_embeddings=64,
                                        logits_scaling=4.0, embedding_multiplier=3.0, attention_multiplier=0.2,
                                        residual_multiplier=0.5, rope_theta=50000.0, rms_norm_eps=1e-5,
                                        tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.GraniteForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms, so a swapped norm weight would show
        for name, param in hf.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    folder = tmp_path_factory.mktemp("granite-lm")
    hf.save_pretrained(folder)
    fms = get_model("hf_pretrained", model_path=str(folder), device_type="cpu", data_type=torch.float32,
                    fused_weights=False).eval()
    return hf, fms, folder


def _run(hf, fms, probes):
    ids = torch.tensor([[3, 17, 5, 60, 22, 9, 41]])
    pair = capture_pair(probes, ModelRun(hf, {"input_ids": ids, "use_cache": False}), ModelRun(fms, lambda m: m(ids)),
                        mode="teacher_forced")
    return diff_captures(pair)


def test_derived_table_pairs_every_layer_and_passes(granite_pair, record_property):
    hf, fms, _ = granite_pair
    probes, made = granite_lm_probes(hf, fms, head_dim=12)
    names = {p.name for p in probes}
    # every decoder layer, its attention and MLP blocks, their projections, norms, embedding and head were derived
    for layer in range(3):
        for part in ("", ".attn", ".ff_sub_layer", ".ln", ".ff_ln", ".attn.in_proj.query", ".attn.dense",
                     ".ff_sub_layer.w2"):
            assert f"base_model.layers.{layer}{part}" in names
    assert {"base_model.embedding", "base_model.dec_norm", "head"} <= names
    assert made == {"derived": len(probes), "overridden": 6}  # q and k in each of 3 layers
    result = _run(hf, fms, probes)
    worst = max(p.propagated.metrics.max_abs for p in result.probes)
    record_property("granite_lm_probes", len(probes))
    record_property("granite_lm_worst_max_abs", worst)
    assert result.passed, render_terminal(build_report(result))
    assert worst < 1e-5


def test_derived_table_locates_a_planted_fault(granite_pair):
    hf, fms, _ = granite_pair
    probes, _ = granite_lm_probes(hf, fms, head_dim=12)
    weight = fms.base_model.layers[1].ff_sub_layer.w2.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[4, 7] += 1.0
    try:
        result = _run(hf, fms, probes)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert not result.passed
    assert result.first_divergence == "base_model.layers.1.ff_sub_layer.w2"
    assert result.first_own_error == "base_model.layers.1.ff_sub_layer.w2"


def test_derivation_needs_the_name_map(granite_pair):
    hf, fms, _ = granite_pair
    # an identity rename pairs nothing but modules whose names already agree: the map is what makes the table
    assert len(derive_pairs(hf, fms, lambda sd: sd)) < len(derive_pairs(hf, fms, __import__(
        "fms.models.granite", fromlist=["_hf_to_fms_names"])._hf_to_fms_names)) // 4
