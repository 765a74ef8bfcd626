"""`fms-parity`: any FMS architecture against its Hugging Face counterpart, layer by layer.

    fms-parity list                         each architecture, its HF class and what is compared
    fms-parity compare --architecture A     build both sides (tiny seeded config, or --hf-config / --checkpoint),
                                            derive the probe table, judge, print the verdict, write the reports
    fms-parity sweep --out DIR              compare every architecture; DIR/sweep.json and DIR/README.md

Exit codes are those of `granite-speech-parity` (granite_speech/cli_errors.py): 0 parity holds, 1 it fails, 2 usage
or input error (one `error:` line, before any model loads), 3 internal error, 4 a planned check did not run.
"""

import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from granite_speech.cli_errors import (ArgumentParser, UsageError, check_distinct_outputs, check_dtype,
                                       check_output_file, check_output_folder, exit_codes_epilog, one_line,
                                       run_main)

PROG = "fms-parity"
VERDICT_EXIT = {"pass": 0, "fail": 1, "incomplete": 4}
EPILOG = exit_codes_epilog(ok=": parity holds (every probe of every section)", failed="parity fails (a finding: "
                           "see the first divergence), or FMS could not load the checkpoint",
                           incomplete="every check that ran passed, but a planned one did not run (listed)")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], epilog=EPILOG,
                            formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    listing = commands.add_parser("list", help="each FMS architecture, its HF class and what is compared")
    listing.add_argument("--json", type=Path, help="also write the table as JSON")
    compare = commands.add_parser("compare", help="compare one architecture", epilog=EPILOG,
                                  formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    compare.add_argument("--architecture", required=True, help="an FMS architecture (fms-parity list)")
    source = compare.add_mutually_exclusive_group()
    source.add_argument("--hf-config", type=Path, help="JSON of HF config kwargs; both sides are built from it with "
                        "seeded weights (default: the architecture's tiny config)")
    source.add_argument("--checkpoint", type=Path, help="an HF checkpoint folder (config.json + *.safetensors)")
    compare.add_argument("--device", default="cpu", help="cpu (this harness runs the architectures on CPU)")
    compare.add_argument("--dtype", default="float32", help="float32 (default; adds one bfloat16 section) or "
                         "bfloat16 (every model section in bfloat16, no generation)")
    compare.add_argument("--seed", type=int, default=0, help="weight seed with --hf-config or the default config")
    compare.add_argument("--no-bf16", action="store_true", help="leave out the bfloat16 section of a float32 run")
    compare.add_argument("--report", type=Path, help="write the HTML report here")
    compare.add_argument("--json", type=Path, help="write the JSON report here")
    sweep = commands.add_parser("sweep", help="compare every architecture and write the results table")
    sweep.add_argument("--out", type=Path, required=True, help="a new or empty folder")
    sweep.add_argument("--architectures", nargs="+", help="a subset (default: all)")
    return parser


def check_architecture(name: str):
    from parity.fms_arch.configs import BY_NAME

    if name not in BY_NAME:
        raise UsageError(f"--architecture {name!r} is not an FMS architecture this harness knows; expected one of "
                         f"{', '.join(sorted(BY_NAME))}")
    return BY_NAME[name]


def check_hf_config(path: Path) -> dict:
    if not path.is_file():
        raise UsageError(f"--hf-config {path}: no such file; expected a JSON object of HF config kwargs")
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise UsageError(f"--hf-config {path} is not valid JSON: {one_line(err)}") from None
    if not isinstance(data, dict) or not data:
        raise UsageError(f"--hf-config {path}: expected a non-empty JSON object of HF config kwargs")
    return data


def check_checkpoint(path: Path, arch) -> Path:
    if not path.is_dir():
        raise UsageError(f"--checkpoint {path}: not a folder; expected an HF checkpoint folder")
    if not (path / "config.json").is_file():
        raise UsageError(f"--checkpoint {path}: no config.json")
    try:
        declared = (json.loads((path / "config.json").read_text()).get("architectures") or [None])[0]
    except (ValueError, AttributeError) as err:
        raise UsageError(f"--checkpoint {path}: config.json is not a JSON object: {one_line(err)}") from None
    if declared != arch.hf_class:
        raise UsageError(f"--checkpoint {path}: config.json declares {declared!r}; --architecture {arch.name} "
                         f"loads {arch.hf_class} checkpoints")
    if not list(path.glob("*.safetensors")):
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        raise UsageError(f"--checkpoint {path}: no *.safetensors weights" +
                         (f" (found {pickled[:2]}: pickle checkpoints are not loaded)" if pickled else ""))
    return path


def list_table() -> list:
    from parity.fms_arch.configs import ARCHITECTURES, compared

    return [{"architecture": a.name, "hf_class": a.hf_class, "family": a.family, "compared": compared(a),
             "refused": a.refused} for a in ARCHITECTURES]


def run_list(args) -> int:
    rows = list_table()
    if args.json is not None:
        check_output_file(args.json, "--json", "architectures.json")
    width = max(len(r["architecture"]) for r in rows)
    for row in rows:
        what = row["refused"] and f"refused: {row['refused']}" or row["compared"]
        print(f"{row['architecture']:<{width}}  {row['hf_class']:<34} {what}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def run_compare(args) -> int:
    import torch

    arch = check_architecture(args.architecture)
    if args.device != "cpu":
        raise UsageError(f"--device {args.device!r}: fms-parity runs on cpu only (tiny configs); expected cpu")
    dtype = check_dtype(args.dtype)
    if dtype == torch.float16:
        raise UsageError("--dtype float16 is not supported by fms-parity; expected float32 or bfloat16")
    overrides = check_hf_config(args.hf_config) if args.hf_config is not None else None
    checkpoint = check_checkpoint(args.checkpoint, arch) if args.checkpoint is not None else None
    for option, path, example in (("--report", args.report, "report.html"), ("--json", args.json, "report.json")):
        if path is not None:
            check_output_file(path, option, example)
    check_distinct_outputs(**{"--report": args.report, "--json": args.json})
    if arch.refused:
        print(f"{arch.name}: refused: {arch.refused}", file=sys.stderr)
        return VERDICT_EXIT["incomplete"]
    from parity.fms_arch.run import compare_report

    report = compare_report(arch, dtype=dtype, overrides=overrides, checkpoint=checkpoint, seed=args.seed,
                            bf16_case=not args.no_bf16)
    return _emit(report, args.report, args.json)


def _emit(report: dict, html: Optional[Path], json_path: Optional[Path]) -> int:
    from parity.report import render_terminal, write_html, write_json

    summary = report["summary"]
    code = VERDICT_EXIT[summary["verdict"]]
    print(render_terminal(report))
    first = summary.get("first_divergence") or {}
    line = summary["verdict"].upper() + (f" (first divergence: {first.get('name')} in {first.get('section')})"
                                         if code == 1 else "")
    print(f"{line}: {summary['probes']} probes in {len(report['sections'])} sections", flush=True)
    if html is not None:
        title = f"FMS {report['meta'].get('architecture')} vs HF"
        print(f"report: {write_html(report, html, title=title)}")
    if json_path is not None:
        print(f"json: {write_json(report, json_path)}")
    return code


def run_sweep(args) -> int:
    from parity.fms_arch.sweep import sweep

    out = check_output_folder(args.out, "--out")
    names = [check_architecture(name).name for name in args.architectures or ()] or None
    rows = sweep(out, names, progress=lambda message: print(message, file=sys.stderr, flush=True))
    worst = max((VERDICT_EXIT.get(row["verdict"], 4) for row in rows), default=0)
    return worst


# The default configs (transformers 5's schema: `rope_parameters`), the derived tables and the findings were made on
# transformers 5.x; on 4.57.6 the RoPE settings are ignored silently, and GraniteSWA / Ministral3 do not exist.
MIN_TRANSFORMERS = 5


def check_transformers() -> None:
    import transformers

    if int(transformers.__version__.split(".")[0]) < MIN_TRANSFORMERS:
        raise UsageError(f"fms-parity needs transformers >= {MIN_TRANSFORMERS} (its configs and tables are written "
                         f"in 5.x's schema); found transformers {transformers.__version__}")


def _main(argv: Optional[Sequence[str]]) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "list":
        check_transformers()
    return {"list": run_list, "compare": run_compare, "sweep": run_sweep}[args.command](args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The `fms-parity` command: returns the exit code (0 holds, 1 fails, 2 usage/input, 3 internal, 4 incomplete)."""
    return run_main(_main, argv, PROG)


if __name__ == "__main__":
    sys.exit(main())
