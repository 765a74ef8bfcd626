#!/usr/bin/env bash
# phase 3: the main job from a folder outside the checkout, then a few test files
set -uo pipefail
name=$1 mode=$2   # mode: checkout (pytest from the checkout) | wheel (pytest against the installed package)
v=/tmp/venv-$name
export HF_HUB_OFFLINE=1
rm -rf /tmp/x-$name && mkdir -p /tmp/x-$name && cd /tmp/x-$name
$v/bin/python -c "import parity.granite.fixtures as f, torch, torchaudio; print('parity from', f.__file__); print('data from', f.FIXTURES_DIR); print('torch', torch.__version__, 'torchaudio', torchaudio.__version__)"
start=$(date +%s)
$v/bin/granite-speech-parity compare --report out/report.html --json out/report.json > compare.log 2>&1
rc=$?
echo "compare rc=$rc $(( $(date +%s) - start )) s (cwd /tmp/x-$name)"
grep -m3 "PARITY" compare.log
ls out/
tests="suites/test_processor.py suites/test_features.py suites/test_fixtures.py"
start=$(date +%s)
if [ "$mode" = wheel ]; then
  # from outside the checkout, importlib mode: nothing puts the checkout on sys.path, the wheel's package is tested
  $v/bin/python -m pytest -x -q -p no:cacheprovider --import-mode=importlib --rootdir /work/wt-layout \
    -c /work/wt-layout/pyproject.toml $(for t in $tests; do echo /work/wt-layout/$t; done) > pytest.log 2>&1
else
  (cd /work/wt-layout && $v/bin/python -m pytest -x -q -p no:cacheprovider $tests) > pytest.log 2>&1
fi
rc=$?
echo "pytest rc=$rc $(( $(date +%s) - start )) s: $tests"
tail -3 pytest.log
