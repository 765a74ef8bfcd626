#!/usr/bin/env bash
# phase 2: the project into a venv that already has a torch pair; torch must stay as it was
set -uo pipefail
name=$1 target=$2
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
v=/tmp/venv-$name
echo "before: $($v/bin/pip show torch torchaudio 2>/dev/null | grep -E '^Version' | tr '\n' ' ')"
start=$(date +%s)
$v/bin/pip install -q $target 2>&1 | grep -v "^WARNING: Location"
echo "phase2 $name install rc=${PIPESTATUS[0]} $(( $(date +%s) - start )) s"
echo "after: $($v/bin/pip show torch torchaudio 2>/dev/null | grep -E '^Version' | tr '\n' ' ')"
$v/bin/pip check 2>&1 | tail -3
