#!/usr/bin/env bash
# The whole test suite from a fresh machine: installs libtorch (cached) and Chromium with
# its WebDriver (for the console's browser tests), finds or starts PostgreSQL, checks
# formatting and lints, runs every test of the workspace, then fuzzes the live server
# against its generated OpenAPI document (scripts/schemathesis.sh) and runs the deployment
# checks (compose, Dockerfile lint, the Docker build script's release build, the staged
# runtime, environment-variable parity: scripts/check-deploy.sh).
# Extra arguments go to `cargo test` and skip the fuzzing and the deployment checks
# (e.g. `scripts/test.sh -p ddpm-core`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/setup-libtorch.sh >/dev/null
# The console's browser tests drive a real headless Chromium.
scripts/setup-browser.sh
DDPM_TEST_POSTGRES_URL=$(scripts/test-postgres.sh)
export DDPM_TEST_POSTGRES_URL
echo "test: PostgreSQL at $DDPM_TEST_POSTGRES_URL"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy -p ddpm-trainer --all-targets --features failpoints --locked -- -D warnings
cargo test --workspace --locked "$@"
if [ $# -eq 0 ]; then
  # The fault-injection suite (crates/ddpm-trainer/tests/trainer/fault_suite): real SIGKILLs,
  # some at named points compiled in only with the `failpoints` feature, SIGSTOP, a full
  # disk. One test at a time: its daemons' heartbeats must not starve on two cores. It
  # prints `fault suite (<backend>): kills survived N/N, lost metric rows 0, …`.
  cargo test -p ddpm-trainer --locked --features failpoints --test trainer -- \
    fault_suite:: --test-threads 1 --nocapture
fi
if [ $# -eq 0 ]; then
  scripts/schemathesis.sh
  scripts/check-deploy.sh
fi
