"""The reports behind the issue-#24 screenshots: the tiny fixture's first default case (clip 201 frames), compared
as is (pass) and with one planted fault (faults.py `perturbed_weight`: one element of encoder block 1's attention
output projection), then the diff of the two. CPU, about a minute.

    PYTHONPATH=. python results/screenshots/make_reports.py OUT_DIR

writes OUT_DIR/{pass,fail}.{json,html} and OUT_DIR/diff.{html,txt}; shoot.sh takes the screenshots.
"""

import sys
from pathlib import Path

import torch

from parity.granite.faults import CATALOGUE
from parity.granite.fixtures import build_checkpoint
from parity.granite.pipeline import Models, default_cases, run_pipeline
from parity.report import build_multi_report, run_metadata, write_html, write_json
from parity.report_diff import diff_reports, render_diff_html, render_diff_terminal
from parity.verdict import Policy


def report(checkpoint: Path, fault=None) -> dict:
    models = Models(checkpoint, torch.float32, torch.device("cpu"))
    if fault is not None:
        with torch.no_grad():
            fault.apply(models.fms_model("merged"))  # the loaded model the run then uses
    sections, extra = run_pipeline(checkpoint, cases=default_cases()[:1], models=models)
    title = "Granite Speech parity · tiny" + (f" · planted fault {fault.name}" if fault else "")
    meta = run_metadata(device="cpu", dtype=torch.float32, seed=0, checkpoint=str(checkpoint), mode="teacher_forced",
                        weights="seeded-random (tiny, seed 0)", inputs=extra["inputs"], title=title)
    return build_multi_report(sections, meta, policy=Policy())


def main(out: Path) -> None:
    checkpoint = build_checkpoint("tiny", seed=0)
    fault = next(f for f in CATALOGUE if f.name == "perturbed_weight")
    reports = {"pass": report(checkpoint), "fail": report(checkpoint, fault)}
    for name, data in reports.items():
        write_json(data, out / f"{name}.json")
        write_html(data, out / f"{name}.html")
    diff = diff_reports(reports["pass"], reports["fail"])
    (out / "diff.html").write_text(render_diff_html(diff), encoding="utf-8")
    (out / "diff.txt").write_text(render_diff_terminal(diff) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
