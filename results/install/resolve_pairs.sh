#!/usr/bin/env bash
# Which torch/torchaudio pair pip resolves for the project's ranges, without installing (pip --dry-run --report).
# torchaudio 2.9.1 and 2.10.0 pin torch==; 2.11.1 wants torch>=2.11 but does not load with torch 2.11.0 (the only 2.11
# torch), so pyproject excludes it; 2.11.0 declares no torch requirement at all, so pip may pair it with an older
# torch, which granite_speech/torch_pair.py refuses at import.
set -uo pipefail
venv=${1:-/tmp/venv-dry}
[ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
RANGE_TORCH='torch>=2.9.1,<2.12'
for audio in 'torchaudio>=2.9.1,<2.12' 'torchaudio>=2.9.1,<2.12,!=2.11.1'; do
  for torch in 'torch==2.9.1' 'torch==2.10.0' 'torch==2.11.0' "$RANGE_TORCH"; do
    "$venv/bin/pip" install --dry-run --no-cache-dir -q --report /tmp/resolve.json "$RANGE_TORCH" "$torch" "$audio" \
      2>/dev/null
    rc=$?
    pair=$(python3 -c "import json; r=json.load(open('/tmp/resolve.json')); print(' + '.join(i['metadata']['name'] + ' ' + i['metadata']['version'] for i in r['install'] if i['metadata']['name'] in ('torch', 'torchaudio')))")
    echo "rc=$rc  [$torch] [$audio] -> $pair"
  done
done
