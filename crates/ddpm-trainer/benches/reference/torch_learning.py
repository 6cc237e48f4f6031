#!/usr/bin/env python3
"""The PyTorch side of `cargo bench -p ddpm-trainer --bench learning`.

Reads the run the bench wrote (`--data`: a folder of raw little-endian arrays,
`images.f32` [N,3,S,S] in [-1,1], `labels.i64` [N], `batches.i64` [steps,B]
indices into images and `step_seeds.i64` [steps]; `--setting`: JSON with the
model config, the shapes and the training settings), trains `GeneralUNet` with PyTorch's own initialisation
(torch.manual_seed(init_seed)) through `train_reference.Trainer`, seeding the
global generator with step_seeds[s-1] before step s's draws exactly as the Rust
side does, and writes the plain ε-MSE of every step to `--out` as JSON.

Runs with one thread (`--threads`), beside the Rust side. `--init-out PATH` also writes
the initial weights (so the Rust side can start from the very same ones).
"""

import argparse
import array
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "ddpm-core", "tests", "reference"))

import torch  # noqa: E402

from general_unet import GeneralUNet  # noqa: E402
from train_reference import Trainer, cosine_betas, draw, linear_betas, lr_at  # noqa: E402


def dump_init(model, path):
    """The initial weights as one raw little-endian f32 file (named_parameters order) and
    `path.json` naming each piece, written last (by rename) so its presence means done."""
    index = []
    with open(path, "wb") as f:
        for name, p in model.named_parameters():
            # (array, not numpy: the torch venv has no numpy; this machine is little-endian)
            f.write(array.array("f", p.detach().reshape(-1).tolist()).tobytes())
            index.append({"name": name, "shape": list(p.shape)})
    with open(path + ".json.partial", "w") as f:
        json.dump(index, f)
    os.replace(path + ".json.partial", path + ".json")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--setting", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--init-out", help="also write the initial weights here (raw f32 + .json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    s = json.loads(open(args.setting).read())

    def read(name, dtype, shape):
        with open(os.path.join(args.data, name), "rb") as f:
            return torch.frombuffer(bytearray(f.read()), dtype=dtype).reshape(shape)

    n, size, steps = s["images"], s["model"]["image_size"], s["steps"]
    images = read("images.f32", torch.float32, (n, 3, size, size))
    labels = read("labels.i64", torch.int64, (n,))
    batches = read("batches.i64", torch.int64, (steps, s["batch_size"]))
    seeds = read("step_seeds.i64", torch.int64, (steps,))
    betas = linear_betas(s["timesteps"]) if s["beta_schedule"] == "linear" else cosine_betas(s["timesteps"])

    torch.manual_seed(s["init_seed"])
    model = GeneralUNet(s["model"])
    if args.init_out:
        dump_init(model, args.init_out)
    trainer = Trainer(model, betas=betas, lr=s["lr"], weight_decay=s["weight_decay"],
                      ema_decay=s["ema_decay"], ema_warmup=s["ema_warmup"],
                      ema_warmup_steps=s["ema_warmup_steps"], min_snr_gamma=s["min_snr_gamma"],
                      max_grad_norm=s["max_grad_norm"])
    losses = []
    for step in range(1, steps + 1):
        torch.manual_seed(int(seeds[step - 1]))
        idx = batches[step - 1]
        x0, y = images[idx], labels[idx]
        t, noise, dropped = draw(x0, len(betas), s["label_dropout"])
        lr = lr_at(s["lr"], s["warmup_steps"], steps, s["lr_schedule"], step)
        _, per_sample, _ = trainer.step(x0, y, t, noise, dropped, lr)
        losses.append(per_sample.mean().item())
        if step % 500 == 0:
            print(f"torch: step {step}/{steps} loss {sum(losses[-100:]) / len(losses[-100:]):.4f}",
                  file=sys.stderr, flush=True)
    with open(args.out, "w") as f:
        json.dump({"losses": losses, "torch": torch.__version__}, f)


if __name__ == "__main__":
    main()
