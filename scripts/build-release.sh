#!/usr/bin/env bash
# The release build of ddpm-trainer and ddpm-server, and the staging of everything their
# runtime images hold. docker/Dockerfile's builder stage runs these steps, and CI runs the
# same script (scripts/check-deploy.sh), so the image build is exercised without an engine.
#
#   scripts/build-release.sh libtorch         install libtorch (scripts/setup-libtorch.sh)
#   scripts/build-release.sh cook RECIPE      build only the dependencies of the binaries
#                                             from a cargo-chef recipe (Docker layer cache)
#   scripts/build-release.sh build [STAGE]    build both binaries (cargo build --release
#                                             --locked) and stage them in STAGE
#                                             (default: target/stage)
#
# STAGE afterwards:
#   bin/ddpm-trainer, bin/ddpm-server
#   libtorch/<absolute path>   the shared libraries the binaries load, at the very paths
#                              they were linked against (crates/ddpm-build writes the
#                              resolved libtorch lib dir as an rpath; the wheel's libraries
#                              find the CUDA ones in ../../nvidia/*/lib through $ORIGIN):
#                              copying this tree to / in an image makes the binaries run
#   migrations/                the SQL migrations (also embedded in the binaries)
#
# Environment: DDPM_CACHE (where libtorch is installed, see setup-libtorch.sh: the Docker
# build sets /opt/ddpm-cache so that the rpath is the same in builder and runtime image),
# CARGO_TARGET_DIR and the other cargo variables as usual.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { echo "build-release: $*" >&2; }
die() { say "$*"; exit 1; }

# The packages and binaries the images ship.
PACKAGES=(-p ddpm-trainer -p ddpm-server)
BINARIES=(ddpm-trainer ddpm-server)

# Libraries of the wheel that neither libtorch nor the CUDA libraries it loads ever open:
# Python bindings, drop-in replacements of other APIs (FFTW, BLAS), multi-GPU cuSOLVER,
# profiler host libraries and the alternative NVRTC build. Everything else under
# torch/lib and nvidia/*/lib is staged (libtorch opens some with dlopen, so "everything
# NEEDED" would not be enough).
SKIP_LIBS=(
  'libtorch_python.so' 'libshm.so' 'libshm' 'libshm_windows'
  'libcufftw.so.*' 'libnvblas.so.*' 'libcusolverMg.so.*'
  'libnvperf_host.so' 'libnvperf_target.so' 'libpcsamplingutil.so'
  'libnvrtc.alt.so.*' 'libnvrtc-builtins.alt.so.*'
)

libtorch() {
  scripts/setup-libtorch.sh >/dev/null
  readlink -f .libtorch
}

cook() {
  local recipe=${1:?usage: build-release.sh cook RECIPE}
  libtorch >/dev/null
  command -v cargo-chef >/dev/null || die "cargo-chef is not installed (cargo install cargo-chef --locked)"
  cargo chef cook --release --locked --recipe-path "$recipe" "${PACKAGES[@]}"
}

skipped() {
  local name=$1 pattern
  for pattern in "${SKIP_LIBS[@]}"; do
    # shellcheck disable=SC2053 # glob match on purpose
    [[ $name == $pattern ]] && return 0
  done
  return 1
}

# Copies the shared libraries (regular files, links resolved) of directory $1 to the same
# absolute path under $2.
stage_libs() {
  local from=$1 root=$2 f name
  mkdir -p "$root$from"
  for f in "$from"/*.so*; do
    name=$(basename "$f")
    [ -f "$f" ] || continue
    skipped "$name" && continue
    cp -L --preserve=mode "$f" "$root$from/$name"
  done
}

build() {
  local stage=${1:-target/stage}
  local torch target_dir site
  torch=$(libtorch)
  cargo build --release --locked "${PACKAGES[@]}"

  target_dir=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
  say "staging into $stage"
  rm -rf "$stage"
  mkdir -p "$stage/bin" "$stage/libtorch"
  for b in "${BINARIES[@]}"; do
    cp "$target_dir/release/$b" "$stage/bin/$b"
  done
  cp -r migrations "$stage/migrations"

  # torch/lib, and the CUDA libraries of the wheel's nvidia-* packages beside it.
  stage_libs "$torch/lib" "$stage/libtorch"
  site=$(dirname "$torch")
  local d
  for d in "$site"/nvidia/*/lib; do
    [ -d "$d" ] && stage_libs "$d" "$stage/libtorch"
  done

  # Every binary's rpath must lie inside the staged tree, or the image would not find it.
  local rpath
  for b in "${BINARIES[@]}"; do
    rpath=$(readelf -d "$stage/bin/$b" | sed -n 's/.*(R\(UN\)\{0,1\}PATH).*\[\(.*\)\]/\2/p')
    [ -n "$rpath" ] || die "$b has no rpath: was it linked by crates/ddpm-build?"
    local p
    IFS=: read -ra parts <<<"$rpath"
    for p in "${parts[@]}"; do
      [ -d "$stage/libtorch$p" ] || die "$b has rpath $p, which is not in the staged libraries"
    done
  done
  say "staged $(du -sh "$stage" | cut -f1): ${BINARIES[*]}, libtorch from $torch"
}

case "${1:-}" in
  libtorch) libtorch ;;
  cook) shift; cook "$@" ;;
  build) shift; build "$@" ;;
  *) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
