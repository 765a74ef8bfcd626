"""torch and torchaudio must be one release pair: `granite_speech` refuses another pair at import, from the installed
metadata, with an error naming both versions and the torchaudio to install (pip alone cannot prevent it: torchaudio
2.11.0 declares no torch requirement, see results/install/README.md)."""

import pytest

from granite_speech import torch_pair

pytestmark = pytest.mark.runs_at("no-model", device="cpu", dtype="float32")  # installed metadata only


def _installed(monkeypatch, versions):
    monkeypatch.setattr(torch_pair, "version", lambda dist: versions[dist])


@pytest.mark.parametrize("torch_v, audio_v", [
    ("2.9.1", "2.9.1"),
    ("2.9.1+cu128", "2.9.1"),  # a CUDA build's local tag is no other release
    ("2.11.0+cu130", "2.11.0+cu130"),
    ("2.10.0", "2.10.1"),  # patch levels may differ
], ids=["same", "local-tag", "cu130", "patch"])
def test_a_matched_pair_is_accepted(monkeypatch, torch_v, audio_v):
    _installed(monkeypatch, {"torch": torch_v, "torchaudio": audio_v})
    torch_pair.check_torch_pair()


@pytest.mark.parametrize("torch_v, audio_v, install", [
    ("2.9.1+cu128", "2.11.0", "torchaudio==2.9.*"),  # what pip picks for torch 2.9.1 alone (resolve_pairs.log)
    ("2.11.0", "2.10.0", "torchaudio==2.11.*"),
    ("3.9.1", "2.9.1", "torchaudio==3.9.*"),  # the major counts too
], ids=["2.9-2.11", "2.11-2.10", "major"])
def test_an_unmatched_pair_is_refused_naming_the_fix(monkeypatch, torch_v, audio_v, install):
    _installed(monkeypatch, {"torch": torch_v, "torchaudio": audio_v})
    with pytest.raises(ImportError) as err:
        torch_pair.check_torch_pair()
    message = str(err.value)
    assert f"torch {torch_v} and torchaudio {audio_v} are not a matched pair" in message
    assert f"pip install '{install}'" in message


def test_the_installed_pair_is_a_matched_one():
    import torch
    import torchaudio

    assert torch_pair.release("torch") == torch_pair.release("torchaudio")
    assert torch.__version__.split(".")[:2] == torchaudio.__version__.split(".")[:2]
