#!/usr/bin/env bash
# The data-parallel checks that need a GPU, in one call, on a machine with PyTorch 2.11 and
# no Rust: build here, carry the binaries there.
#
#   here:  cargo build --release -p ddpm-trainer -p ddpm-dist --examples --bin ddpm-trainer
#          mkdir -p gpu-bin && cp target/release/ddpm-trainer target/release/examples/nccl_check gpu-bin/
#          strip gpu-bin/*
#   there: scripts/gpu-check.sh gpu-bin [OUT_DIR]
#
# 1. NCCL through ddpm-dist (crates/ddpm-dist/examples/nccl_check.rs): a world of one on
#    cuda:0, all-reduce and broadcast values, the time of an all-reduce of 23 M floats.
# 2. The trainer on CUDA at the seed's 64×64 model (bf16), 200 steps, twice: a single
#    process, and rank 0 of a launched world of one (torchrun's variables set): the same
#    losses step for step, and images/s side by side. With more GPUs visible, also
#    `--nproc-per-node N` (NCCL, N ranks) against one, for the speed-up per added rank.
set -euo pipefail

bin=$(cd "${1:?usage: scripts/gpu-check.sh BIN_DIR [OUT_DIR]}" && pwd)
out=${2:-${OUT:-$(mktemp -d)}}
mkdir -p "$out"
torch_lib=$(python3 -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"

echo "== 1. NCCL"
"$bin/nccl_check" | tee "$out/nccl.txt"

echo "== 2. trainer on CUDA"
work=$(mktemp -d)
"$bin/ddpm-trainer" demo-data "$work/data" --size 64 --per-class 64 --classes 4 >/dev/null
cat >"$work/run.toml" <<TOML
preset = "seed"

[dataset]
path = "$work/data"
cache = true

[training]
steps = 200
batch_size = 48
log_every = 20
checkpoint_every = 200
sample_grid_per_class = 0
bf16 = true

[quality]
holdout = 0
TOML
train() { # LOG ARGS...: one run on its own SQLite database; prints images/s after warm-up
  local log=$1
  shift
  "$bin/ddpm-trainer" --database-url "sqlite:$work/$log.db" --checkpoint-dir "$work/ck-$log" \
    --device cuda --log-format json "$@" >"$out/$log.log" 2>&1
  python3 - "$out/$log.log" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
rows = [r for r in rows if r.get("message") == "train"]
ips = [r["images_per_sec"] for r in rows[1:]]
print(f"{sys.argv[1]}: {sum(ips) / len(ips):.1f} images/s over {len(ips)} windows")
PY
}
train single train "$work/run.toml" | tee -a "$out/summary.txt"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
  train launched train "$work/run.toml" | tee -a "$out/summary.txt"
python3 - "$out/single.log" "$out/launched.log" <<'PY' | tee -a "$out/summary.txt"
import json, sys
def losses(path):
    rows = [json.loads(l) for l in open(path) if l.startswith("{")]
    return [(r["step"], r["loss"]) for r in rows if r.get("message") == "train"]
a, b = losses(sys.argv[1]), losses(sys.argv[2])
assert [s for s, _ in a] == [s for s, _ in b], "different logged steps"
worst = max(abs(x - y) / max(abs(x), 1e-9) for (_, x), (_, y) in zip(a, b))
print(f"single vs launched world of one: {len(a)} windows, largest relative loss difference {worst:.2e}")
assert worst < 1e-2, "the launched rank trained differently"
PY
gpus=$(nvidia-smi -L | wc -l)
if [ "$gpus" -gt 1 ]; then
  train ranks train "$work/run.toml" --nproc-per-node "$gpus" | tee -a "$out/summary.txt"
fi
echo "gpu-check: all checks passed; logs in $out"
