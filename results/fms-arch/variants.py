"""One architecture's float32 one-sequence section with its default config changed by a JSON patch (argv[2]); prints
the verdict, first divergence, first own error and the largest |FMS - HF|. Used for the findings' smallest configs.
Run from the repository root: python results/fms-arch/variants.py ARCH '{"key": value}'"""
import sys, json, tempfile, torch
sys.path.insert(0, '.')
from pathlib import Path
from parity.fms_arch.configs import BY_NAME, hf_config
from parity.fms_arch import cases
from parity.fms_arch.run import build_sides, derive_table, model_section, LoadFailure
a = BY_NAME[sys.argv[1]]
import transformers
base = dict(a.config)
for k,(cls,sub) in a.sub_configs.items(): base[k] = dict(sub)
over = json.loads(sys.argv[2])
def merge(d, o):
    for k, v in o.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict) and k != "rope_parameters": merge(d[k], v)
        else: d[k] = v
merge(base, over)
import dataclasses
a2 = dataclasses.replace(a, config={k: v for k, v in base.items() if k not in a.sub_configs}, sub_configs={k: (a.sub_configs[k][0], base[k]) for k in a.sub_configs})
s = build_sides(a2, Path(tempfile.mkdtemp()))
inp = cases.single(a2, s.config)
probes, dv = derive_table(s, inp)
r, extra = model_section(s, inp, probes, torch.float32)
print("RESULT", sys.argv[2], "passed" if r.passed else "FAIL", r.first_divergence, "own:", r.first_own_error, max((p.propagated.metrics.max_abs for p in r.probes if p.propagated.metrics), default=None))
