"""torch and torchaudio must be one release pair (same major.minor): a torchaudio built for another torch fails to
load with an undefined symbol deep inside `import transformers`, or loads and computes with another ABI. pip cannot
always prevent it (torchaudio 2.11.0 declares no torch requirement at all), so the pair is checked from the installed
metadata before either is imported for the model (transformers imports torchaudio)."""

from importlib.metadata import PackageNotFoundError, version


def release(dist: str) -> tuple:
    """(major, minor) of an installed distribution, local tags (+cu128, +cpu) and patch level dropped."""
    parts = version(dist).split("+")[0].split(".")
    return int(parts[0]), int(parts[1])


def check_torch_pair() -> None:
    try:
        torch_release, audio_release = release("torch"), release("torchaudio")
    except PackageNotFoundError:
        return  # not installed: the import that needs it says so itself
    if torch_release != audio_release:
        major, minor = torch_release
        raise ImportError(
            f"torch {version('torch')} and torchaudio {version('torchaudio')} are not a matched pair: torchaudio must "
            f"be the release of the installed torch; install it with: pip install 'torchaudio=={major}.{minor}.*'"
        )
