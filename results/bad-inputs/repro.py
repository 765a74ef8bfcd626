"""Reproduce each bad input of issue #24 item 3 (before/after): exit code and last stderr line, per case."""
import json, os, shutil, subprocess, sys, time
from pathlib import Path
import numpy as np, soundfile
sys.path.insert(0, os.getcwd())
from parity.granite.fixtures import build_checkpoint, SPEECH_DIR

root = Path(sys.argv[1]); shutil.rmtree(root, ignore_errors=True); root.mkdir(parents=True)
only = set(sys.argv[2:])
good = build_checkpoint("tiny")
clip = SPEECH_DIR / "9002-102-0000.flac"
def copy(name):
    return Path(shutil.copytree(good, root / name))
def edit_json(path, fn):
    d = json.loads(path.read_text()); d = fn(d) or d; path.write_text(json.dumps(d))
fifo = root / "pipe.wav"; os.mkfifo(fifo)
bytes_clip = os.fsencode(str(root)) + b"/clip-\xff.flac"; shutil.copy(clip, bytes_clip)
bytes_ckpt = os.fsencode(str(root)) + b"/ckpt-\xfe"; shutil.copytree(os.fsencode(str(good)), bytes_ckpt)
tok_bad = copy("tok-notjson"); (tok_bad / "tokenizer.json").write_text("{ not json")
pre_str = copy("pre-str"); edit_json(pre_str / "preprocessor_config.json", lambda d: d.update(sampling_rate="16000"))
pre_zero = copy("pre-zero"); edit_json(pre_zero / "preprocessor_config.json", lambda d: d.update(sampling_rate=0))
pre_list = copy("pre-list"); (pre_list / "preprocessor_config.json").write_text("[1, 2]")
cfg_str = copy("cfg-str"); edit_json(cfg_str / "config.json", lambda d: d["text_config"].update(hidden_size="64"))
cfg_layers = copy("cfg-layers"); edit_json(cfg_layers / "config.json", lambda d: d["text_config"].update(num_hidden_layers=-1))
cfg_shape = copy("cfg-shape"); edit_json(cfg_shape / "config.json", lambda d: d["text_config"].update(intermediate_size=d["text_config"]["intermediate_size"] * 2))
from safetensors.torch import load_file, save_file
import torch
miss = copy("missing-tensor")
idx = json.loads((miss / "model.safetensors.index.json").read_text())["weight_map"]
key = "language_model.model.layers.0.self_attn.k_proj.weight"
t = load_file(str(miss / idx[key])); t.pop(key); save_file(t, str(miss / idx[key]), metadata={"format": "pt"})
nan = copy("nan-weights"); key2 = "encoder.input_linear.weight"
t = load_file(str(nan / idx[key2])); t[key2][0, 0] = float("nan"); save_file(t, str(nan / idx[key2]), metadata={"format": "pt"})
intw = copy("int-weights")
t = load_file(str(intw / idx[key2])); t[key2] = t[key2].to(torch.int32); save_file(t, str(intw / idx[key2]), metadata={"format": "pt"})
loud = root / "loud.wav"; soundfile.write(str(loud), (np.random.default_rng(0).normal(0, 1, 16000) * 1e30).astype(np.float32), 16000, subtype="FLOAT")
ro = root / "ro"; ro.mkdir(); os.chmod(ro, 0o555)
notdir = root / "afile"; notdir.write_text("x")
long_name = root / ("r" * 300 + ".html")
other = copy("other-member"); shutil.copy(Path(os.getcwd()) / "parity/granite/fixtures/configs/tiny-plus.json", other / "config.json")
bytes_audio_c = os.fsencode(str(root)) + b"/c-clip-\xff.flac"; shutil.copy(clip, bytes_audio_c)
cache = root / "cache"; cache.mkdir(); cached = Path(shutil.copytree(good, cache / good.name))
shard = cached / "model-00001-of-00002.safetensors"; shard.write_bytes(shard.read_bytes()[:-100])
API = [sys.executable, "-c"]
api_head = "import granite_speech, sys; from fms.models import get_model; "
env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
T = [sys.executable, "-m", "granite_speech", "transcribe"]
C = [sys.executable, "-m", "parity.granite", "compare"]
cases = {
  "t-fifo": T + ["--checkpoint", str(good), str(fifo)],
  "c-fifo": C + ["--audio", str(fifo), "--json", str(root / "o.json"), "--report", str(root / "o.html")],
  "t-bytes-audio": T + ["--checkpoint", str(good), bytes_clip],
  "t-bytes-ckpt": T + ["--checkpoint", bytes_ckpt, str(clip)],
  "c-bytes-ckpt": C + ["--checkpoint", bytes_ckpt, "--json", str(root / "o.json"), "--report", str(root / "o.html")],
  "t-tokenizer-not-json": T + ["--checkpoint", str(tok_bad), str(clip)],
  "t-pre-str": T + ["--checkpoint", str(pre_str), str(clip)],
  "t-pre-zero": T + ["--checkpoint", str(pre_zero), str(clip)],
  "t-pre-list": T + ["--checkpoint", str(pre_list), str(clip)],
  "c-pre-str": C + ["--checkpoint", str(pre_str), "--json", str(root / "o.json"), "--report", str(root / "o.html")],
  "t-cfg-str": T + ["--checkpoint", str(cfg_str), str(clip)],
  "t-layers-neg": T + ["--checkpoint", str(cfg_layers), str(clip)],
  "t-shape": T + ["--checkpoint", str(cfg_shape), str(clip)],
  "t-missing-tensor": T + ["--checkpoint", str(miss), str(clip)],
  "t-nan-weights": T + ["--checkpoint", str(nan), str(clip)],
  "t-int-weights": T + ["--checkpoint", str(intw), str(clip)],
  "t-loud": T + ["--checkpoint", str(good), str(loud)],
  "t-max-new-tokens": T + ["--checkpoint", str(good), "--max-new-tokens", "100000000000", str(clip)],
  "c-long-report": C + ["--report", str(long_name), "--json", str(root / "o.json")],
  "c-json-proc": C + ["--json", "/proc/granite-speech/o.json", "--report", str(root / "o.html")],
  "t-other-member": T + ["--checkpoint", str(other), str(clip)],
  "c-bytes-audio": C + ["--audio", bytes_audio_c, "--json", str(root / "o.json"), "--report", str(root / "o.html")],
  "c-cached-truncated": ["env", f"GRANITE_SPEECH_FIXTURE_CACHE={cache}"] + C + ["--json", str(root / "o.json"), "--report", str(root / "o.html")],
  "api-missing-dir": API + [api_head + "get_model('hf_pretrained', model_path='/no/such/dir')"],
  "api-config-file": API + [api_head + f"get_model('hf_pretrained', model_path='{good}/config.json')"],
  "api-int8": API + [api_head + f"get_model('hf_pretrained', model_path='{good}', data_type='int8')"],
  "api-missing-tensor": API + [api_head + f"get_model('hf_pretrained', model_path='{miss}')"],
  "c-cache-file": ["env", f"GRANITE_SPEECH_FIXTURE_CACHE={notdir}"] + C + ["--json", str(root / "o.json"), "--report", str(root / "o.html")],
}
for name, argv in cases.items():
    if only and name not in only: continue
    start = time.time()
    try:
        r = subprocess.run(argv, env=env, capture_output=True, timeout=30 if "fifo" in name else int(os.environ.get("T", 240)))
        last = r.stderr.decode(errors="replace").strip().splitlines()[-1:]
        if name.startswith("t-") and r.returncode == 0:
            last = ["stdout: " + r.stdout.decode(errors="replace").strip()[:200]]
        print(f"{name}\trc={r.returncode}\t{time.time()-start:.0f}s\t{last[0][:300] if last else ''}", flush=True)
    except subprocess.TimeoutExpired:
        print(f"{name}\tTIMEOUT\t{time.time()-start:.0f}s", flush=True)
