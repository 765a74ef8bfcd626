"""gpt_oss: |FMS - HF| at the first attention of layer 0 for 1, 2 and 12 tokens (RoPE cannot matter at 1 token).
Run from the repository root."""
import sys, tempfile, torch
sys.path.insert(0, '.')
from pathlib import Path
from parity.fms_arch.configs import BY_NAME
from parity.fms_arch.run import build_sides
s = build_sides(BY_NAME["gpt_oss"], Path(tempfile.mkdtemp()))
for T in (1, 2, 12):
    ids = torch.arange(5, 5+T)[None]
    outs = {}
    import parity.hooks as H
    with torch.no_grad():
        ho = s.hf.model.layers[0].self_attn
        fo = s.fms.base_model.layers[0].attn
        cap = {}
        h1 = ho.register_forward_hook(lambda m, a, k, o: cap.__setitem__('hf', o[0]), with_kwargs=True)
        h2 = fo.register_forward_hook(lambda m, a, k, o: cap.__setitem__('fms', o[0] if isinstance(o, tuple) else o), with_kwargs=True)
        s.hf(input_ids=ids, use_cache=False); s.fms(ids)
        h1.remove(); h2.remove()
    print(T, (cap['hf'] - cap['fms']).abs().max().item())
