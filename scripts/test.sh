#!/usr/bin/env bash
# The whole test suite from a fresh machine: installs libtorch (cached) and Chromium with
# its WebDriver (for the console's browser tests), finds or starts PostgreSQL and an
# S3-compatible test server (moto, scripts/test-s3.sh), checks
# formatting and lints, runs every test of the workspace and the fault-injection suite,
# then fuzzes the live server against its generated OpenAPI document
# (scripts/schemathesis.sh) and runs the deployment checks (compose, Dockerfile lint, the
# Docker build script's release build, the staged runtime, environment-variable parity:
# scripts/check-deploy.sh). It ends with the time each stage took.
#
#   scripts/test.sh              everything (what .ci/run runs)
#   scripts/test.sh --quick      the inner loop: formatting, lints and every test but the
#                                fault suite and the browser tests; no fuzzing, no
#                                deployment checks (a few minutes once built)
#   scripts/test.sh ARGS...      `cargo test ARGS...` alone after the set-up and lints
#                                (e.g. `scripts/test.sh -p ddpm-core`)
#
# One build serves every stage: the lints, the tests, the fault suite and the fuzzed
# server all use the workspace with the test-only `failpoints` feature on (its kill points
# do nothing unless DDPM_FAILPOINTS names them), so nothing is compiled twice.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

mode=all
if [ "${1:-}" = --quick ]; then
  mode=quick
  shift
elif [ $# -gt 0 ]; then
  mode=args
fi

# ---- stage timing: each stage's wall time, printed at the end whatever happens ----------
stages=()
stage() { # NAME COMMAND...: runs COMMAND as a stage
  local name=$1 started=$SECONDS status=0
  shift
  echo "test: == $name" >&2
  "$@" || status=$?
  stages+=("$(printf '%-12s %5d s%s' "$name" $((SECONDS - started)) "$([ $status = 0 ] || echo "  FAILED ($status)")")")
  return $status
}
report() {
  local status=$?
  echo "test: stage times (wall clock):" >&2
  local line
  for line in "${stages[@]}"; do echo "test:   $line" >&2; done
  printf 'test:   %-12s %5d s\n' total "$SECONDS" >&2
  exit $status
}
trap report EXIT

# The workspace as every stage builds it (see the header).
features=(--workspace --locked --features ddpm-trainer/failpoints)

# A stage's commands are chained with `&&`: `set -e` does not apply inside a function
# called as `cmd || …`, which is how `stage` calls it.
setup() {
  # The console's browser tests drive a real headless Chromium.
  scripts/setup-libtorch.sh >/dev/null && scripts/setup-browser.sh
}
lint() {
  # check-module-cycles.py: no two modules of a crate import each other (ARCHITECTURE.md).
  # The second clippy: the one cfg(not(feature = "failpoints")) item, the registry's
  # empty kill point.
  cargo fmt --all -- --check &&
    scripts/check-module-cycles.py &&
    cargo clippy "${features[@]}" --all-targets -- -D warnings &&
    cargo clippy -p ddpm-registry --lib --locked -- -D warnings
}
fault_suite() {
  # crates/ddpm-trainer/tests/trainer/fault_suite: real SIGKILLs, some at named points
  # compiled in only with the `failpoints` feature, SIGSTOP, a full disk. One test at a
  # time: its daemons' heartbeats must not starve on two cores. It prints
  # `fault suite (<backend>): kills survived N/N, lost metric rows 0, …`.
  cargo test "${features[@]}" --test trainer -- fault_suite:: --test-threads 1 --nocapture
}
fuzz() {
  # The binaries the tests just built (debug, the same features).
  DDPM_SCHEMATHESIS_BIN=${CARGO_TARGET_DIR:-target}/debug scripts/schemathesis.sh
}

stage setup setup
DDPM_TEST_POSTGRES_URL=$(scripts/test-postgres.sh)
export DDPM_TEST_POSTGRES_URL
echo "test: PostgreSQL at $DDPM_TEST_POSTGRES_URL"
# The checkpoint store's S3 tests: moto's S3 server, installed and started by the script.
DDPM_TEST_S3_URL=$(scripts/test-s3.sh)
export DDPM_TEST_S3_URL
echo "test: S3 (moto) at $DDPM_TEST_S3_URL"
# A second one that checks credentials, for the tests of a refused key.
DDPM_TEST_S3_AUTH_URL=$(scripts/test-s3.sh --auth)
export DDPM_TEST_S3_AUTH_URL
echo "test: S3 (moto, checking credentials) at $DDPM_TEST_S3_AUTH_URL"

stage lint lint
case $mode in
  args)
    stage tests cargo test "$@"
    ;;
  quick)
    stage build cargo test "${features[@]}" --no-run
    stage tests cargo test "${features[@]}" -- --skip fault_suite:: --skip console::
    ;;
  all)
    stage build cargo test "${features[@]}" --no-run
    stage tests cargo test "${features[@]}" -- --skip fault_suite::
    stage fault-suite fault_suite
    stage fuzz fuzz
    stage deploy scripts/check-deploy.sh
    ;;
esac
