#!/usr/bin/env bash
# Prints the endpoint URL of an S3-compatible server the tests can use, starting one if
# none is running:
#   1. $DDPM_TEST_S3_URL, if set;
#   2. moto's server already listening on 127.0.0.1:$DDPM_TEST_S3_PORT (default 55900);
#   3. moto's server (`moto[server]` from PyPI, pinned, in a virtualenv under the cache
#      directory) started there in the background; it keeps running for the next call.
# moto keeps everything in memory: each test makes a bucket of its own. Its access key
# and secret are anything (the tests use `test`/`test`). Everything but the URL goes to
# stderr.
#
#   scripts/test-s3.sh          start (or find) the server, print its URL
#   scripts/test-s3.sh --stop   stop the server this script started
set -euo pipefail

# Pinned: the S3 behaviour the tests rely on (conditional writes) must not move under CI.
version=5.2.6
cache=${DDPM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ddpm}
venv="$cache/moto-venv"
port=${DDPM_TEST_S3_PORT:-55900}
url="http://127.0.0.1:$port"
pidfile="$cache/test-s3.pid"

say() { echo "test-s3: $*" >&2; }
# moto answers its own API at /moto-api/: a server there is moto, up.
ready() {
  python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
    "$url/moto-api/" 2>/dev/null
}

if [ "${1:-}" = --stop ]; then
  if [ -f "$pidfile" ]; then
    kill "$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile"
  fi
  exit 0
fi

if [ -n "${DDPM_TEST_S3_URL:-}" ]; then
  echo "$DDPM_TEST_S3_URL"; exit 0
fi

if ready; then
  echo "$url"; exit 0
fi

if [ "$("$venv/bin/python" -c 'import moto; print(moto.__version__)' 2>/dev/null)" != "$version" ]; then
  say "installing moto[server] $version into $venv"
  mkdir -p "$cache"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$version"
fi

say "starting moto's S3 server on $url"
# setsid: the server outlives this script (and the test run's process group), so one
# server serves every test binary; --stop or the machine's end stops it.
setsid "$venv/bin/moto_server" -H 127.0.0.1 -p "$port" >"$cache/test-s3.log" 2>&1 < /dev/null &
echo $! >"$pidfile"
for _ in $(seq 1 120); do
  if ready; then echo "$url"; exit 0; fi
  sleep 0.25
done
say "moto did not start; its log:"
tail -n 30 "$cache/test-s3.log" >&2
exit 1
