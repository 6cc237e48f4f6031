#!/usr/bin/env bash
# Installs libtorch (the torch==2.11.0 wheel from PyPI, the version tch 0.24 binds) once
# into a cache outside the clone and points the clone's `.libtorch` symlink at it, with
# what crates/ddpm-dist compiles its c10d shim against: gloo's headers (Debian's
# libgloo-dev; gloo itself is inside libtorch_cpu.so) and, for the NCCL path, CUDA's C
# runtime and CCCL headers (PyPI nvidia-cuda-crt / nvidia-cuda-cccl, matching the
# wheel's CUDA 13.0; NCCL's own headers come with the wheel).
# Idempotent: a second run only checks the cache, the headers and the link.
#
#   DDPM_CACHE   cache root (default: $XDG_CACHE_HOME/ddpm or ~/.cache/ddpm)
#   PYTHON       interpreter used to create the cache's venv (default: python3)
set -euo pipefail

TORCH_VERSION=2.11.0
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${DDPM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ddpm}
venv="$cache/torch-$TORCH_VERSION"
python=${PYTHON:-python3}

torch_dir() {
  "$venv/bin/python" - <<'PY' 2>/dev/null
import pathlib, torch
assert torch.__version__.split("+")[0] == "2.11.0", torch.__version__
print(pathlib.Path(torch.__file__).parent)
PY
}

if ! dir=$(torch_dir); then
  echo "setup-libtorch: installing torch==$TORCH_VERSION into $venv (one time, a few GiB)" >&2
  mkdir -p "$cache"
  rm -rf "$venv.partial"
  "$python" -m venv "$venv.partial"
  "$venv.partial/bin/pip" install --quiet --disable-pip-version-check --progress-bar off \
    "torch==$TORCH_VERSION"
  rm -rf "$venv"
  mv "$venv.partial" "$venv"
  # The venv's scripts hard-code its path; rewrite them after the move.
  sed -i "s#$venv.partial#$venv#g" "$venv"/bin/* 2>/dev/null || true
  dir=$(torch_dir) || { echo "setup-libtorch: torch import failed after install" >&2; exit 1; }
fi

# CUDA headers for the NCCL shim: added to the cache's venv (also to an older cache).
if [ ! -f "$dir/../nvidia/cu13/include/crt/host_config.h" ] ||
  [ ! -f "$dir/../nvidia/cu13/include/cccl/cuda/std/version" ]; then
  echo "setup-libtorch: installing CUDA 13.0 headers (nvidia-cuda-crt, nvidia-cuda-cccl)" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check --progress-bar off \
    "nvidia-cuda-crt==13.0.*" "nvidia-cuda-cccl==13.0.*"
fi

# gloo's headers (DDPM_GLOO_INCLUDE points the build elsewhere).
gloo_include=${DDPM_GLOO_INCLUDE:-/usr/include}
if [ ! -f "$gloo_include/gloo/algorithm.h" ]; then
  "$repo/scripts/apt-install.sh" setup-libtorch \
    "install gloo's headers (Debian: libgloo-dev) and set DDPM_GLOO_INCLUDE" libgloo-dev
fi

ln -sfn "$dir" "$repo/.libtorch"
echo "$dir"
