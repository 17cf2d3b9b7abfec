#!/usr/bin/env bash
# Screenshots of a logdir's TensorBoard HParams and Custom Scalars pages, with headless Chromium
# (Debian/Ubuntu: apt-get install chromium). Not run in CI.
#
#   scripts/tensorboard_shots.sh runs/study docs       # writes docs/tensorboard_hparams.png, docs/tensorboard_custom_scalars.png
set -euo pipefail
logdir=${1:?usage: $0 LOGDIR [OUTDIR]}
outdir=${2:-.}
python=${PYTHON:-.venv/bin/python}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [ -z "$browser" ]; then
  echo "error: no Chromium found; install it (apt-get install chromium) or put it on PATH" >&2
  exit 2
fi
# --port 0: the OS picks a free port and the server names it on stderr (no port to pick and lose to another)
log=$(mktemp)
"$python" -m tensorboard.main --logdir "$logdir" --host 127.0.0.1 --port 0 --load_fast=false >/dev/null 2>"$log" &
server=$!
trap 'kill $server 2>/dev/null || true; rm -f "$log"' EXIT
port=
for _ in $(seq 60); do
  port=$(grep -o 'http://127\.0\.0\.1:[0-9]*' "$log" | head -1 | sed 's/.*://' || true)
  [ -n "$port" ] && curl -fs "http://127.0.0.1:$port/data/runs" >/dev/null 2>&1 && break
  sleep 1
done
if [ -z "$port" ]; then
  echo "error: TensorBoard did not start within 60 s; its log:" >&2
  cat "$log" >&2
  exit 2
fi
sleep 5  # the event files load in the background
mkdir -p "$outdir"
for page in hparams custom_scalars; do
  "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1600,1000 \
    --virtual-time-budget=20000 --screenshot="$outdir/tensorboard_$page.png" "http://127.0.0.1:$port/#$page" \
    >/dev/null 2>&1
  echo "wrote $outdir/tensorboard_$page.png"
done
