"""Renders the sample reports in this folder: python results/report-samples/make_samples.py (from the repo root).

pass-2b-345.*: the real 345-probe H100 report (schema 1, upgraded); failing-3-sections.*: the synthetic failing
report of suites/test_report.py; diff-2b.*: the real report against a copy with two probes 50x / 2x larger."""

import copy
import sys
from pathlib import Path

root = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(root), str(root / "suites")]

from parity.report import build_multi_report, read_json, render_terminal, write_html, write_json  # noqa: E402
from parity.report_diff import diff_reports, render_diff_terminal, write_diff_html  # noqa: E402
from test_report import synthetic_report  # noqa: E402

out = Path(__file__).resolve().parent
real = read_json(root / "results" / "gpu-h100-2b" / "report.json")
write_html(real, out / "pass-2b-345.html")
(out / "pass-2b-345.txt").write_text(render_terminal(real) + "\n")
failing = synthetic_report()
write_json(failing, out / "failing-3-sections.json")
write_html(failing, out / "failing-3-sections.html", title="Granite Speech parity (synthetic failure)")
(out / "failing-3-sections.txt").write_text(render_terminal(failing) + "\n")
new = copy.deepcopy(real)
for probe in new["sections"][0]["result"]["probes"]:
    factor = {"decoder.layer.20.mlp": 50.0, "decoder.layer.21.mlp": 2.0}.get(probe["name"], 1.0)
    for key in ("max_abs", "tol_ratio"):
        probe["propagated"]["metrics"][key] *= factor
new = build_multi_report([(s["title"], s["kind"], s["result"], s["extra"]) for s in new["sections"]],
                         {k: v for k, v in new["meta"].items() if k != "tolerances"})  # summaries from the new numbers
diff = diff_reports(real, new)
write_diff_html(diff, out / "diff-2b.html")
(out / "diff-2b.txt").write_text(render_diff_terminal(diff) + "\n")
print("\n".join(sorted(str(p.relative_to(root)) for p in out.iterdir())))
