#!/usr/bin/env bash
# The demo, end to end on this machine (CPU or GPU): builds both binaries, writes a demo
# dataset of generated shapes, trains the fast preset on it (a few minutes on a laptop
# CPU), then serves the model on http://127.0.0.1:8080 (the web console at /) and prints curl
# commands to try.
#
#   DDPM_DEMO_DIR      where the dataset, registry and checkpoints go (default ./data/demo)
#   DDPM_BIND          the server's address (default 127.0.0.1:8080)
#   DDPM_DEMO_RETRAIN  set to 1 to train again although a checkpoint exists
#   DDPM_DEMO_STEPS    training steps (default: the demo config's)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

demo=${DDPM_DEMO_DIR:-./data/demo}
bind=${DDPM_BIND:-127.0.0.1:8080}
export DDPM_DATA_DIR="$demo"

scripts/setup-libtorch.sh >/dev/null
echo "demo: building ddpm-trainer and ddpm-server"
cargo build --locked -p ddpm-trainer -p ddpm-server
trainer=target/debug/ddpm-trainer
server=target/debug/ddpm-server

if [ ! -d "$demo/dataset" ]; then
  "$trainer" demo-data "$demo/dataset"
fi

if [ "${DDPM_DEMO_RETRAIN:-0}" = 1 ] || ! ls "$demo"/checkpoints/runs/*/ema-*.safetensors >/dev/null 2>&1; then
  steps=()
  [ -n "${DDPM_DEMO_STEPS:-}" ] && steps=(--steps "$DDPM_DEMO_STEPS")
  echo "demo: training the fast preset on $demo/dataset"
  "$trainer" train deploy/runs/demo.toml --dataset "$demo/dataset" "${steps[@]}"
fi

"$trainer" runs list

echo "demo: starting ddpm-server on http://$bind"
"$server" --bind "$bind" &
server_pid=$!
trap 'kill -TERM $server_pid 2>/dev/null; wait $server_pid 2>/dev/null' EXIT INT TERM
for _ in $(seq 1 120); do
  curl -fsS "http://$bind/readyz" >/dev/null 2>&1 && break
  kill -0 $server_pid 2>/dev/null || { echo "demo: the server exited" >&2; exit 1; }
  sleep 0.5
done

classes=$(curl -fsS "http://$bind/v1/model" | python3 -c 'import json,sys; print(",".join(json.dumps(c) for c in json.load(sys.stdin)["classes"]))')
first=${classes%%,*}
cat <<MSG

The demo model is served at http://$bind.

Open http://$bind/ in a browser for the console: the run's loss curves, its checkpoints'
sample grids and scores, and a playground that samples as you watch. Or try:

  # one image of class $first as a PNG (guided, 50 ancestral DDPM steps, the default;
  # "sampler": "ddim" is deterministic but noisier on a model this small)
  curl -s -X POST http://$bind/v1/samples -H 'content-type: application/json' \\
       -H 'accept: image/png' -d '{"class": $first, "sampler": "ddpm", "steps": 50, "seed": 1}' -o sample.png

  # a labelled grid: one image of each class
  curl -s -X POST http://$bind/v1/samples -H 'content-type: application/json' \\
       -H 'accept: image/png' -d '{"classes": [$classes], "sampler": "ddpm", "steps": 50, "seed": 7}' -o grid.png

  # eight images of one class as JSON (base64 PNGs with class, seed, run and step)
  curl -s -X POST http://$bind/v1/samples -H 'content-type: application/json' \\
       -d '{"class": $first, "n": 8, "guidance_scale": 4, "sampler": "ddpm", "steps": 1000}'

  # the loaded model, the run history and a run's loss curve
  curl -s http://$bind/v1/model
  curl -s http://$bind/v1/runs
  curl -s "http://$bind/v1/runs/1/metrics?max_points=20"

Ctrl-C stops the server.
MSG
wait $server_pid
