"""`granite-speech-parity compare` (also `python -m parity compare`): the main job.

Compares the FMS model against the HF reference on one checkpoint and audio, writes the JSON + HTML layer-diff
report, prints the summary, and exits 1 on divergence (2 on bad usage).
"""

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from granite_speech.config import VARIANTS


def _progress(message: str, start: float) -> None:
    print(f"[{time.monotonic() - start:6.1f}s] {message}", file=sys.stderr, flush=True)


def compare(args: argparse.Namespace) -> int:
    from transformers import AutoConfig, AutoProcessor

    from granite_speech.audio import read_audio
    from granite_speech.checkpoint.files import check_checkpoint_folder
    from parity.capture import checkpoint_param_bytes
    from parity.granite.fixtures import build_checkpoint, load_speech_dataset
    from parity.granite.run import make_inputs, run_parity
    from parity.granite.hf import load_hf_model
    from granite_speech.checkpoint import load_model
    from parity.report import render_terminal, write_html, write_json

    start = time.monotonic()
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if args.checkpoint:
        try:
            checkpoint = check_checkpoint_folder(args.checkpoint)
        except (FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    else:
        _progress(f"building (or reusing) the seeded {args.model} fixture checkpoint", start)
        checkpoint = build_checkpoint(args.model, seed=args.seed)
    _progress(f"checkpoint {checkpoint}", start)

    processor = AutoProcessor.from_pretrained(str(checkpoint))
    if args.audio:
        clips = [read_audio(path, 16000) for path in args.audio]
    else:  # the bundled clip of 4.02 s: one full encoder block + 1 frame
        row = min(load_speech_dataset(), key=lambda r: abs(len(r["audio"]["array"]) - 64320))
        clips = [torch.tensor(row["audio"]["array"], dtype=torch.float32)]
        _progress(f"bundled clip {row['file']} ({len(clips[0]) / 16000:.2f} s)", start)
    inputs = make_inputs(processor, clips, device, dtype, prompt=args.prompt)

    def load_hf():
        _progress("loading the HF reference", start)
        return load_hf_model(checkpoint, dtype, str(device))

    def load_fms():
        _progress("loading the FMS model (get_model hf_pretrained)", start)
        return load_model(checkpoint, dtype, device)

    # factories: capture_pair loads both at once or one at a time, as the memory plan (--phases) decides
    hf, fms = load_hf, load_fms
    overrides = {k: v for k in ("atol", "rtol") if (v := getattr(args, k)) is not None}
    _progress(f"capturing every probe ({args.mode})", start)
    result, report = run_parity(
        hf, fms, inputs, hf_config=AutoConfig.from_pretrained(str(checkpoint)), mode=args.mode, phases=args.phases,
        dtype=dtype,
        device=device, overrides=overrides, param_bytes=checkpoint_param_bytes(checkpoint, dtype),
        seed=args.seed, checkpoint=str(checkpoint), audio=[str(a) for a in args.audio] or ["bundled"],
    )
    json_path = write_json(report, args.json)
    html_path = write_html(report, args.report)
    print(render_terminal(report))
    verdict = "PASS" if result.passed else f"FAIL (first divergence: {result.first_divergence})"
    print(f"{verdict}: {report['summary']['probes']} probes, report {html_path}, json {json_path}")
    _progress("done", start)
    return 0 if result.passed else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="granite-speech-parity", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    cmp = sub.add_parser("compare", help="FMS vs HF, layer by layer, with a report")
    cmp.add_argument("--checkpoint", type=Path, help="local HF checkpoint folder (default: the seeded --model fixture)")
    cmp.add_argument("--model", default="tiny", choices=tuple(VARIANTS), help="fixture variant when no checkpoint")
    cmp.add_argument("--audio", type=Path, nargs="*", default=[], help="audio files (default: a bundled clip)")
    cmp.add_argument("--prompt", default="<|audio|>can you transcribe the speech into a written format?")
    cmp.add_argument("--device", default=None)
    cmp.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    cmp.add_argument("--mode", default="propagated", choices=("propagated", "teacher-forced"),
                     help="what is compared: each side's own propagation, or each FMS module re-run on HF's inputs too")
    cmp.add_argument("--phases", default="auto", choices=("auto", "one", "two"),
                     help="memory schedule: both models at once, one at a time (HF captures on disk), or decide by size")
    cmp.add_argument("--atol", type=float)
    cmp.add_argument("--rtol", type=float)
    cmp.add_argument("--seed", type=int, default=0)
    cmp.add_argument("--report", type=Path, default=Path("out/report.html"))
    cmp.add_argument("--json", type=Path, default=Path("out/report.json"))
    args = parser.parse_args(argv)
    for path in args.audio:
        if not path.is_file():
            parser.error(f"no such audio file: {path}")
    return compare(args)


if __name__ == "__main__":
    sys.exit(main())
