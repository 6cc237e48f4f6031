#!/usr/bin/env bash
# Runs the release binaries of BIN_DIR the way the images run them, on the CPU, with a
# SQLite registry: demo data, a short training run, then the server, with the image's
# health check (docker/healthcheck.sh) for liveness and readiness, one sampled PNG, and a
# graceful stop on SIGTERM. scripts/check-deploy.sh runs it on the staged binaries with the
# libtorch cache hidden, so it also proves that the staged libraries are enough.
#
#   scripts/smoke-runtime.sh BIN_DIR
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=$(cd "${1:?usage: smoke-runtime.sh BIN_DIR}" && pwd)

say() { echo "smoke-runtime: $*" >&2; }
die() { say "$*"; [ -f "${work:-}/server.log" ] && tail -n 30 "$work/server.log" >&2; exit 1; }

work=$(mktemp -d)
server_pid=
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# The environment of a container: only what the image and the compose file set.
export DDPM_DATA_DIR="$work/state"
export DDPM_CHECKPOINT_DIR="$work/state/checkpoints"
export DDPM_DATABASE_URL="sqlite://$work/state/registry.db?mode=rwc"
export DDPM_DEVICE=cpu
export DDPM_LOG_FORMAT=json
mkdir -p "$DDPM_CHECKPOINT_DIR"

say "demo data and a short training run"
"$bin/ddpm-trainer" demo-data "$work/demo" --size 16 --per-class 8 --classes 2 >"$work/demo.log" 2>&1 ||
  { cat "$work/demo.log" >&2; die "demo-data failed"; }
cat >"$work/run.toml" <<EOF
preset = "tiny"
[dataset]
path = "$work/demo"
[training]
steps = 4
batch_size = 8
log_every = 2
checkpoint_every = 4
sample_grid_per_class = 0
EOF
"$bin/ddpm-trainer" train "$work/run.toml" >"$work/train.log" 2>&1 ||
  { tail -n 30 "$work/train.log" >&2; die "training failed"; }
"$bin/ddpm-trainer" runs list >"$work/runs.txt" 2>&1 || { cat "$work/runs.txt" >&2; die "runs list failed"; }

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export DDPM_BIND="127.0.0.1:$port"
export DDPM_API_TOKEN=smoke-token
export DDPM_POLL_INTERVAL=1s
say "server on $DDPM_BIND"
"$bin/ddpm-server" >"$work/server.log" 2>&1 &
server_pid=$!

wait_for() {
  local path=$1
  for _ in $(seq 1 120); do
    "$repo/docker/healthcheck.sh" "$path" 2>/dev/null && return 0
    kill -0 "$server_pid" 2>/dev/null || die "the server exited"
    sleep 0.5
  done
  die "GET $path never answered 200"
}
wait_for /healthz
wait_for /readyz

code=$(curl -sS -o "$work/sample.png" -w '%{http_code}' -X POST "http://$DDPM_BIND/v1/samples" \
  -H "Authorization: Bearer $DDPM_API_TOKEN" -H 'Content-Type: application/json' -H 'Accept: image/png' \
  -d '{"class": 0, "n": 1, "steps": 4, "seed": 1}')
[ "$code" = 200 ] || { cat "$work/sample.png" >&2; echo >&2; die "POST /v1/samples answered $code"; }
[ "$(head -c 8 "$work/sample.png" | od -An -tx1 | tr -d ' \n')" = 89504e470d0a1a0a ] ||
  die "POST /v1/samples did not answer a PNG"
code=$(curl -sS -o /dev/null -w '%{http_code}' "http://$DDPM_BIND/v1/model")
[ "$code" = 401 ] || die "GET /v1/model without the token answered $code, not 401"

say "SIGTERM"
kill -TERM "$server_pid"
for _ in $(seq 1 60); do
  kill -0 "$server_pid" 2>/dev/null || break
  sleep 0.5
done
if kill -0 "$server_pid" 2>/dev/null; then die "the server did not stop within 30 s of SIGTERM"; fi
status=0
wait "$server_pid" || status=$?
server_pid=
[ "$status" = 0 ] || die "the server exited with status $status after SIGTERM"
say "ok: trained, served a PNG, stopped cleanly"
