#!/usr/bin/env bash
# Fuzzes the live server against its own OpenAPI document with schemathesis: builds both
# binaries (debug), trains a tiny checkpoint, starts ddpm-server on a free 127.0.0.1 port
# with a bearer token, and runs every schemathesis check against /openapi.json. Fails on
# any server error, undocumented status code or header, response that breaks its schema,
# schema-valid request rejected or schema-invalid request accepted. Each run draws a new
# seed and prints it, so that a failure can be replayed; `schemathesis.toml` beside this
# script is its configuration (what the schema cannot say).
#
#   scripts/schemathesis.sh [extra `schemathesis run` options]
#
#   DDPM_SCHEMATHESIS_SEED          replay the run that printed this seed
#   DDPM_SCHEMATHESIS_BIN           use the binaries of this directory instead of building
#   DDPM_SCHEMATHESIS_MAX_EXAMPLES  cases per operation and phase (default 100)
#   DDPM_SCHEMATHESIS_TIMEOUT       seconds the fuzzing may take (default 180; it takes
#                                   about 30 on 2 cores)
#   DDPM_CACHE                      where the virtualenv is kept (default ~/.cache/ddpm)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

# Pinned: a new schemathesis release may add checks, and CI should not fail on its own.
version=4.32.5
venv=${DDPM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ddpm}/schemathesis-venv
token=schemathesis-token

say() { echo "schemathesis: $*" >&2; }
die() { say "$*"; [ -f "${work:-}/server.log" ] && tail -n 30 "$work/server.log" >&2; exit 1; }

if [ "$("$venv/bin/schemathesis" --version 2>/dev/null)" != "schemathesis, version $version" ]; then
  say "installing schemathesis $version into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$version"
fi

if [ -n "${DDPM_SCHEMATHESIS_BIN:-}" ]; then
  bin=$(cd "$DDPM_SCHEMATHESIS_BIN" && pwd)
else
  scripts/setup-libtorch.sh >/dev/null
  cargo build --locked -p ddpm-trainer -p ddpm-server
  bin=${CARGO_TARGET_DIR:-$repo/target}/debug
fi

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

# A registry and checkpoints of its own, whatever the caller's environment points at.
export DDPM_DATA_DIR="$work/state"
export DDPM_DATABASE_URL="sqlite://$work/state/registry.db?mode=rwc"
export DDPM_CHECKPOINT_DIR="$work/state/checkpoints"
export DDPM_DEVICE=cpu
export DDPM_TORCH_THREADS=1
unset DDPM_PIN_RUN DDPM_PIN_CHECKPOINT
mkdir -p "$DDPM_CHECKPOINT_DIR"

# A small network and a short schedule (T = 50): the slowest request the document allows
# (n = the image limit below, steps = T) then takes well under a second on a CPU.
say "demo data and a tiny training run"
"$bin/ddpm-trainer" demo-data "$work/demo" --size 16 --per-class 8 --classes 2 >"$work/demo.log" 2>&1 ||
  { cat "$work/demo.log" >&2; die "demo-data failed"; }
cat >"$work/run.toml" <<EOF
preset = "tiny"
[dataset]
path = "$work/demo"
[model]
base_channels = 8
[schedule]
timesteps = 50
[training]
steps = 20
batch_size = 8
log_every = 5
checkpoint_every = 20
sample_grid_per_class = 0
EOF
"$bin/ddpm-trainer" train "$work/run.toml" >"$work/train.log" 2>&1 ||
  { tail -n 30 "$work/train.log" >&2; die "training failed"; }

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
url="http://127.0.0.1:$port"
say "server on $url"
DDPM_BIND="127.0.0.1:$port" DDPM_API_TOKEN=$token DDPM_LOG_FORMAT=json \
  DDPM_MAX_IMAGES_PER_REQUEST=4 DDPM_QUEUE_CAPACITY=16 DDPM_DEFAULT_STEPS=10 \
  DDPM_REQUEST_TIMEOUT=10s DDPM_POLL_INTERVAL=60s \
  "$bin/ddpm-server" >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 240); do
  curl -fsS "$url/readyz" >/dev/null 2>&1 && break
  kill -0 "$server_pid" 2>/dev/null || die "the server exited"
  sleep 0.5
done
curl -fsS "$url/readyz" >/dev/null || die "/readyz never answered 200"

# One worker: the model thread is the bottleneck on 2 cores, and parallel clients would
# only turn slow requests into 429s. A new seed every run explores more than one lucky
# one; printed, it replays a failure. `timeout` bounds the whole run. Run from the
# temporary directory, where schemathesis keeps its crash cache.
seed=${DDPM_SCHEMATHESIS_SEED:-$(((RANDOM << 15) | RANDOM))}
say "seed $seed (replay with DDPM_SCHEMATHESIS_SEED=$seed)"
status=0
(cd "$work" && timeout "${DDPM_SCHEMATHESIS_TIMEOUT:-180}" "$venv/bin/schemathesis" \
  --config-file "$repo/scripts/schemathesis.toml" run "$url/openapi.json" \
  --checks all \
  --header "Authorization: Bearer $token" \
  --workers 1 \
  --max-examples "${DDPM_SCHEMATHESIS_MAX_EXAMPLES:-100}" \
  --request-timeout 30 \
  --seed "$seed" \
  --generation-database none \
  --no-color \
  "$@") || status=$?
kill -0 "$server_pid" 2>/dev/null || die "the server died during the run"
say "what the server answered, by route and status:"
curl -fsS -H "Authorization: Bearer $token" "$url/metrics" | grep '^ddpm_http_requests_total' | grep -v 'status="405"' >&2 || true
[ "$status" != 124 ] || die "schemathesis did not finish within ${DDPM_SCHEMATHESIS_TIMEOUT:-180} s"
[ "$status" = 0 ] || die "schemathesis found failures with seed $seed (exit status $status)"
say "ok"
