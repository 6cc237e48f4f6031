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
# With --auth the same steps give a second server, on $DDPM_TEST_S3_AUTH_PORT (default
# 55901; $DDPM_TEST_S3_AUTH_URL if set), that checks credentials as S3 does
# (INITIAL_NO_AUTH_ACTION_COUNT=0): it refuses the tests' key, for the tests of refused
# credentials.
#
#   scripts/test-s3.sh          start (or find) the server, print its URL
#   scripts/test-s3.sh --auth   start (or find) the one that checks credentials
#   scripts/test-s3.sh --stop   stop the servers this script started
set -euo pipefail

# Pinned: the S3 behaviour the tests rely on (conditional writes) must not move under CI.
version=5.2.6
cache=${DDPM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ddpm}
venv="$cache/moto-venv"
name=test-s3
port=${DDPM_TEST_S3_PORT:-55900}
given=${DDPM_TEST_S3_URL:-}
auth=()
what=""
if [ "${1:-}" = --auth ]; then
  name=test-s3-auth
  port=${DDPM_TEST_S3_AUTH_PORT:-55901}
  given=${DDPM_TEST_S3_AUTH_URL:-}
  auth=(INITIAL_NO_AUTH_ACTION_COUNT=0)
  what=" (checking credentials)"
fi
url="http://127.0.0.1:$port"
pidfile="$cache/$name.pid"

say() { echo "test-s3: $*" >&2; }
# moto answers its own API at /moto-api/: a server there is moto, up.
ready() {
  python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
    "$url/moto-api/" 2>/dev/null
}

if [ "${1:-}" = --stop ]; then
  for pidfile in "$cache/test-s3.pid" "$cache/test-s3-auth.pid"; do
    if [ -f "$pidfile" ]; then
      kill "$(cat "$pidfile")" 2>/dev/null || true
      rm -f "$pidfile"
    fi
  done
  exit 0
fi

if [ -n "$given" ]; then
  echo "$given"; exit 0
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

say "starting moto's S3 server on $url$what"
# setsid: the server outlives this script (and the test run's process group), so one
# server serves every test binary; --stop or the machine's end stops it.
env "${auth[@]}" setsid "$venv/bin/moto_server" -H 127.0.0.1 -p "$port" \
  >"$cache/$name.log" 2>&1 < /dev/null &
echo $! >"$pidfile"
for _ in $(seq 1 120); do
  if ready; then echo "$url"; exit 0; fi
  sleep 0.25
done
say "moto did not start; its log:"
tail -n 30 "$cache/$name.log" >&2
exit 1
