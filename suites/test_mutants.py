"""The mutation catalogue (`parity.granite.mutants`) cannot rot silently, and its runner works end to end.

The full mutation run (`python -m parity.granite.mutate`, ~15 min on 2 CPU cores) is too slow for every CI run;
here: every mutant still applies to the current sources (its `old` snippet occurs exactly once), and two cheap
mutants go through the runner on one default case of compare (~30 s), caught and localised. The runner is a
command of its own: it is launched when collection ends and runs beside the other tests (see the plugin).
"""

import json
import sys
from pathlib import Path

import pytest

import granite_speech
from parity.granite.mutants import CATALOGUE, KINDS, matches
from parity.granite.launches import launch_fixture, launch_logged

pytestmark = pytest.mark.runs_at("tiny", device="cpu", dtype="float32")  # the runner on the tiny fixture

# the sources as imported (the checkout's granite_speech/ in an editable install)
PACKAGE_DIR = Path(granite_speech.__file__).resolve().parent

# one case of compare's default set: the conformer and the merged LoRA both run on it
QUICK_CASE = "clip 201 frames"
QUICK_MUTANTS = ("conformer_glu_halves_swapped", "lora_scale_alpha_not_divided")


@pytest.mark.parametrize("mutant", CATALOGUE, ids=[m.name for m in CATALOGUE])
def test_mutant_applies_to_the_current_sources(mutant):
    path = PACKAGE_DIR / mutant.file
    assert path.is_file(), f"{mutant.name}: granite_speech/{mutant.file} is gone; move or drop the mutant"
    count = path.read_text().count(mutant.old)
    assert count == 1, (
        f"{mutant.name}: its `old` snippet occurs {count} times in granite_speech/{mutant.file} (must be exactly "
        f"once); the source moved: re-pick the snippet from the current code (parity/granite/mutants.py)"
    )
    assert mutant.new != mutant.old and mutant.old.strip(), f"{mutant.name}: the edit changes nothing"
    assert mutant.kind in KINDS
    assert mutant.expect and all(isinstance(entry, str) and entry for entry in mutant.expect)


def test_catalogue_is_large_unique_and_spread():
    names = [m.name for m in CATALOGUE]
    assert len(names) == len(set(names))
    assert len(CATALOGUE) >= 30
    files = {m.file for m in CATALOGUE}
    for required in ("conformer.py", "projector.py", "model.py", "lora.py", "features.py", "lengths.py",
                     "processor.py", "audio.py", "fast_generate.py", "config.py", "checkpoint/adapter.py"):
        assert required in files, f"no mutant in granite_speech/{required}"


def test_expect_matching():
    assert matches("encoder.block.0.attn", "encoder.block.0")
    assert matches("encoder.block.0", "encoder.block.0")
    assert not matches("encoder.block.01", "encoder.block.0")
    assert matches("step.1.logits", "step.1.")
    assert not matches("step.10.logits", "step.1.")  # "step.1." is a dotted prefix: step 10 is not step 1


def _run_quick_mutants(folder: Path):
    return launch_logged([sys.executable, "-m", "parity.granite.mutate", "--only", *QUICK_MUTANTS, "--case",
                          QUICK_CASE, "--jobs", "2", "--json", str(folder / "mutants.json")], folder,
                         cwd=PACKAGE_DIR.parent)


EARLY_LAUNCHES = {"quick_mutants": _run_quick_mutants}  # started when collection ends (see the plugin)


quick_mutants = launch_fixture("quick_mutants")


def test_two_cheap_mutants_are_caught_and_localised(quick_mutants):
    proc, folder = quick_mutants
    assert (folder / "mutants.json").is_file(), proc.stderr[-3000:]
    result = json.loads((folder / "mutants.json").read_text())
    code = proc.returncode
    rows = {row["name"]: row for row in result["mutants"]}
    assert set(rows) == set(QUICK_MUTANTS)
    for name, row in rows.items():
        assert row["outcome"] == "caught", f"{name}: {row['outcome']} ({row.get('crash') or row.get('section')})"
        assert row["localised"], (f"{name}: first divergence {row['first_divergence']}, own error "
                                  f"{row['first_own_error']}; expected {row['expect']}")
    assert result["baseline"]["verdict"] == "pass", "the unmutated package fails compare on the quick case"
    assert code == 0


# ---------------------------------------------------------------------------------------------------------------
# the zygote that forks the runner's workers: a fork must behave as the fresh `python -m` it replaces


CHILD = """
import os, sys
print("out", os.getcwd() == sys.path[0], os.environ.get("ZYGOTE_TEST"), sys.argv[1:])
print("first-party preloaded:", sorted(m for m in sys.modules if m.split(".")[0] in ("granite_speech", "parity")),
      file=sys.stderr)
if "--raise" in sys.argv:
    raise ValueError("planted")
if "--hang" in sys.argv:
    import time
    time.sleep(600)
if "--signal" in sys.argv:
    os.kill(os.getpid(), 9)
sys.exit(int(sys.argv[1]))
"""


@pytest.fixture(scope="module")
def zygote():
    import os

    from parity.granite.zygote import Zygote

    with Zygote(["json"], env=dict(os.environ)) as warm:
        yield warm


def test_a_zygote_child_is_the_fresh_interpreter_it_replaces(zygote, tmp_path):
    import os

    (tmp_path / "zygote_child.py").write_text(CHILD)
    env = dict(os.environ, ZYGOTE_TEST="seen", PYTHONPATH=str(tmp_path / "after-the-cwd"))
    done = zygote.run(["-m", "zygote_child", "3", "a b"], cwd=tmp_path, env=env, timeout=60)
    assert (done.returncode, done.stdout) == (3, "out True seen ['3', 'a b']\n")
    assert "first-party preloaded: []" in done.stderr  # the mutated package is the one the worker imports
    crashed = zygote.run(["-m", "zygote_child", "0", "--raise"], cwd=tmp_path, env=env, timeout=60)
    assert crashed.returncode == 1 and "ValueError: planted" in crashed.stderr
    killed = zygote.run(["-m", "zygote_child", "0", "--signal"], cwd=tmp_path, env=env, timeout=60)
    assert killed.returncode == -9


def test_a_zygote_child_past_its_timeout_is_killed(zygote, tmp_path):
    import os
    import subprocess
    import time

    (tmp_path / "zygote_child.py").write_text(CHILD)
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        zygote.run(["-m", "zygote_child", "0", "--hang"], cwd=tmp_path, env=dict(os.environ), timeout=1)
    assert time.monotonic() - start < 30
    # the zygote still serves after the kill
    assert zygote.run(["-m", "zygote_child", "5"], cwd=tmp_path, env=dict(os.environ), timeout=60).returncode == 5


def test_the_worker_preload_is_third_party_only():
    from parity.granite.zygote import WORKER_PRELOAD

    assert not [m for m in WORKER_PRELOAD if m.split(".")[0] in ("granite_speech", "parity", "fixtures")]


def test_a_preloaded_library_that_prints_does_not_garble_the_zygotes_replies(tmp_path):
    import os

    from parity.granite.zygote import Zygote

    (tmp_path / "noisy_library.py").write_text("print('a line on stdout at import')\n")
    (tmp_path / "zygote_child.py").write_text(CHILD)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    with Zygote(["noisy_library"], env=env, start_timeout=30) as warm:
        assert warm.run(["-m", "zygote_child", "7"], cwd=tmp_path, env=env, timeout=60).returncode == 7
