#!/usr/bin/env bash
# the README's three commands, as written, in a fresh clone (full suite: collection only, per the helper rules)
set -uo pipefail
cd /tmp/readme-check
export PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1
start=$(date +%s)
python3 -m venv .venv && .venv/bin/pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location"
echo "setup rc=${PIPESTATUS[0]} $(( $(date +%s) - start )) s"
.venv/bin/pip show torch torchaudio transformers ibm-fms peft | grep -E "^(Name|Version)" | paste - - 
start=$(date +%s)
.venv/bin/granite-speech-parity compare --report out/report.html --json out/report.json > compare.log 2>&1
echo "compare rc=$? $(( $(date +%s) - start )) s"
grep -m2 -A1 "^PARITY" compare.log
ls out
start=$(date +%s)
.venv/bin/python -m pytest suites/ --model tiny --collect-only -q -p no:cacheprovider > collect.log 2>&1
echo "pytest suites/ --model tiny --collect-only rc=$? $(( $(date +%s) - start )) s: $(tail -1 collect.log)"
