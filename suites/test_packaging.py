"""The wheel holds what the checkout runs: pyproject lists packages by hand (the fixtures' data, top-level fixtures/,
is mapped to the package parity.granite.fixtures.data, which `packages.find` cannot express), so a new subpackage or a
new kind of data file would silently be left out of the wheel. Checked against the tree."""

import fnmatch
import tomllib
from pathlib import Path

import pytest

from parity.granite.fixtures import paths

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.runs_at("no-model", device="cpu", dtype="float32")  # source tree and pyproject only
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_python_package_of_the_tree_is_shipped():
    on_disk = {".".join(init.parent.relative_to(ROOT).parts)
               for top in ("granite_speech", "parity") for init in (ROOT / top).rglob("__init__.py")}
    listed = set(SETUPTOOLS["packages"]) - {paths.DATA_PACKAGE}
    assert listed == on_disk, (f"pyproject [tool.setuptools] packages: missing {on_disk - listed}, "
                               f"stale {listed - on_disk}")


def test_the_data_package_is_the_fixtures_folder_and_every_file_is_shipped():
    assert paths.DATA_PACKAGE in SETUPTOOLS["packages"]
    assert SETUPTOOLS["package-dir"] == {paths.DATA_PACKAGE: "fixtures"}
    globs = SETUPTOOLS["package-data"][paths.DATA_PACKAGE]
    files = [p.relative_to(ROOT / "fixtures").as_posix() for p in (ROOT / "fixtures").rglob("*")
             if p.is_file() and not any(part.startswith((".", "__pycache__")) for part in p.parts)]
    assert files, "fixtures/ holds no data"
    unshipped = [f for f in files if not any(fnmatch.fnmatch(f, g) for g in globs)]
    assert not unshipped, f"in fixtures/ but matched by no package-data glob of {paths.DATA_PACKAGE}: {unshipped}"


def test_the_checkout_reads_its_own_fixtures_folder():
    # in a checkout (editable or PYTHONPATH) the data is the checkout's top-level fixtures/; a data/ folder beside the
    # builders (a wheel's layout) would shadow it silently
    builders = Path(paths.__file__).resolve().parent
    assert not (builders / "data").exists(), f"{builders / 'data'} shadows the checkout's fixtures/"
    assert paths.FIXTURES_DIR == builders.parents[2] / "fixtures"
    assert (paths.CONFIGS_DIR / "tiny.json").is_file() and paths.CORPUS_PATH.is_file()
    assert len(list(paths.SPEECH_DIR.glob("*.flac"))) == 9
