#!/bin/sh
# Screenshots of the issue-#24 reports in headless Chromium, desktop (1280x900) and phone (390x844), reduced by pngquant to a
# 64-colour palette to keep each PNG small.  Usage: shoot.sh REPORT.html NAME  (writes NAME-1280.png, NAME-390.png)
set -e
here=$(dirname "$0")
for size in 1280,900 390,844; do
  width=${size%,*}
  chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --user-data-dir=/tmp/chr --hide-scrollbars \
    --screenshot="$here/$2-$width.png" --window-size="$size" "file://$(realpath "$1")" 2>/dev/null
  pngquant --force --strip --output "$here/$2-$width.png" 64 "$here/$2-$width.png"
done
