#!/usr/bin/env bash
# Screenshots of a logdir's TensorBoard HParams and Custom Scalars pages, with headless Chromium
# (Debian/Ubuntu: apt-get install chromium). Not run in CI.
#
#   scripts/tensorboard_shots.sh runs/demo docs        # writes docs/tensorboard_hparams.png, docs/tensorboard_custom_scalars.png
set -euo pipefail
logdir=${1:?usage: $0 LOGDIR [OUTDIR]}
outdir=${2:-.}
python=${PYTHON:-.venv/bin/python}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [ -z "$browser" ]; then
  echo "error: no Chromium found; install it (apt-get install chromium) or put it on PATH" >&2
  exit 2
fi
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$python" -m tensorboard.main --logdir "$logdir" --host 127.0.0.1 --port "$port" --load_fast=false >/dev/null 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 60); do
  curl -fs "http://127.0.0.1:$port/data/runs" >/dev/null 2>&1 && break
  sleep 1
done
sleep 5  # the event files load in the background
mkdir -p "$outdir"
for page in hparams custom_scalars; do
  "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1600,1000 \
    --virtual-time-budget=20000 --screenshot="$outdir/tensorboard_$page.png" "http://127.0.0.1:$port/#$page" \
    >/dev/null 2>&1
  echo "wrote $outdir/tensorboard_$page.png"
done
