#!/usr/bin/env bash
# phase 1: a fresh venv with one torch/torchaudio pair (PyPI; the CPU index is not reachable here)
set -uo pipefail
name=$1 torch=$2 audio=$3
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
start=$(date +%s)
python3 -m venv /tmp/venv-$name
/tmp/venv-$name/bin/pip install -q "torch==$torch" "torchaudio==$audio"
echo "phase1 $name rc=$? $(( $(date +%s) - start )) s"
/tmp/venv-$name/bin/pip show torch torchaudio | grep -E "^(Name|Version)"
