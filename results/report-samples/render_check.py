"""Render committed reports with this tree's code and with an earlier commit's, and say whether the pages are byte
for byte equal and how long each render took. Used for the switch of the probe records from jinja macros to Python
(parity/report_records.py): `python results/report-samples/render_check.py 36ba18e > results/report-samples/render-check-2026-12-07.txt`.
"""

import gzip
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REPORTS = ["results/gpu-h100-2026-12-07b/2b-float32.json.gz", "results/gpu-h100-2026-12-07b/2b-bfloat16.json.gz",
           "results/gpu-h100-2026-12-07/2b-float32.json.gz", "results/gpu-h100-2026-12-07/2b-bfloat16.json.gz",
           "results/gpu-h100-2026-12-07/5.0-470m-float32.json.gz", "results/report-samples/failing-3-sections.json",
           *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "results/verdict/family-2026-12-07c").glob("*.json*"))]
RENDER = """
import gzip, json, sys, time
from parity.report import render_html
out = {}
for f in sys.argv[2:]:
    r = json.load(gzip.open(f) if f.endswith(".gz") else open(f))
    start = time.perf_counter()
    out[f] = [render_html(r), time.perf_counter() - start]
json.dump(out, open(sys.argv[1], "w"))
"""


def render(tree: Path, into: Path) -> dict:
    files = [str(ROOT / f) for f in REPORTS]
    subprocess.run([sys.executable, "-c", RENDER, str(into), *files], cwd=tree, check=True,
                   env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"})
    return json.loads(into.read_text())


def main(rev: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        old_tree = Path(tmp) / "old"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(old_tree), rev], cwd=ROOT, check=True)
        try:
            old = render(old_tree, Path(tmp) / "old.json")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old_tree)], cwd=ROOT, check=True)
        new = render(ROOT, Path(tmp) / "new.json")
    print(f"render_html at {rev} (jinja macros) against this tree; seconds per render on this machine")
    for f in REPORTS:
        (page_old, s_old), (page_new, s_new) = old[str(ROOT / f)], new[str(ROOT / f)]
        print(f"{'equal' if page_old == page_new else 'DIFFERENT'}  {len(page_new):>9} bytes  {s_old:6.2f} s -> "
              f"{s_new:5.2f} s  {f}")


if __name__ == "__main__":
    main(sys.argv[1])
