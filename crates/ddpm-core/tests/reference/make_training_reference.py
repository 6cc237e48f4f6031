#!/usr/bin/env python3
"""Reference data for initialisation and training parity with PyTorch.

Writes (next to this script):

* `init_stats.json` -- for the seed and tiny presets, every parameter of PyTorch's
  freshly initialised `GeneralUNet` (torch.manual_seed(0)): its initialisation rule
  ("uniform" with its bound, "normal" with its std, or "const" with its value, read
  from PyTorch's own module code paths: `_calculate_fan_in_and_fan_out`, the a=sqrt(5)
  kaiming bound, xavier for in_proj) and the statistics PyTorch's draw actually has
  (numel, mean, std, absmax). `tests/core/init.rs` checks ddpm-core's initialisation
  against both.

* `training_parity.safetensors` -- two training runs of N = 6 steps of a micro
  config, each from PyTorch's initial weights with given batches and draws:
  - case "seed": plain ε-MSE, no clipping, constant lr, the seed's EMA class with
    2 copied steps then β = 0.9;
  - case "fast": Min-SNR-5 weighting, clipping at 0.05 (active every step),
    warm-up + cosine lr, diffusers' EMAModel (β = 0.995 with its (1+n)/(10+n) ramp).
  Tensors: `{case}.init.<param>`, `{case}.x0` [N,B,3,8,8], `{case}.y` [N,B],
  `{case}.t` [N,B], `{case}.noise` [N,B,3,8,8], `{case}.dropped` [N,B] (u8),
  `{case}.loss` [N] (objective), `{case}.per_sample` [N,B], `{case}.grad_norm` [N],
  `{case}.lr` [N] (f64), and after the last step `{case}.final.<param>`,
  `{case}.exp_avg.<param>`, `{case}.exp_avg_sq.<param>`, `{case}.ema.<param>`.
  Metadata `config` holds the micro UNet config and both cases' settings as JSON.
  `draws.*`: t, ε and mask drawn by `train_reference.draw` right after
  torch.manual_seed(1234) for a [4,3,8,8] batch with p = 0.5, so a test can show
  that `StepDraws::sample` after tch::manual_seed(1234) draws the same numbers.

Regenerate (from the repository root; needs torch, safetensors and diffusers, which
the /tmp diffusers venv of make_scheduler_vectors.py has):

    /tmp/diffusers-venv/bin/python crates/ddpm-core/tests/reference/make_training_reference.py

Produced with torch 2.11.0 (CPU), diffusers 0.42.1, safetensors, Python 3.11.
"""

import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from general_unet import SEED_CONFIG, TINY_CONFIG, GeneralUNet  # noqa: E402
from train_reference import Trainer, draw, linear_betas, lr_at  # noqa: E402

MICRO_CONFIG = {
    "image_size": 8,
    "in_channels": 3,
    "out_channels": 3,
    "base_channels": 8,
    "channel_mults": [1, 2],
    "bottleneck_mult": 2,
    "attention_resolutions": [4],
    "attention_heads": 2,
    "time_embedding_dim": 16,
    "num_classes": 3,
}
STEPS = 6
BATCH = 4

CASES = {
    "seed": {"lr": 1e-3, "warmup_steps": 0, "lr_schedule": "constant", "min_snr_gamma": 0.0,
             "max_grad_norm": 0.0, "ema_decay": 0.9, "ema_warmup": "copy", "ema_warmup_steps": 2,
             "label_dropout": 0.1, "weight_decay": 0.01, "seed": 1},
    "fast": {"lr": 2e-3, "warmup_steps": 2, "lr_schedule": "cosine", "min_snr_gamma": 5.0,
             "max_grad_norm": 0.05, "ema_decay": 0.995, "ema_warmup": "ramp", "ema_warmup_steps": 0,
             "label_dropout": 0.5, "weight_decay": 0.01, "seed": 2},
}


def init_rule(module_name, param_name, module, p):
    """PyTorch's initialisation rule of one parameter, from the module that owns it."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        # reset_parameters: kaiming_uniform_(a=sqrt(5)) -> bound 1/sqrt(fan_in);
        # bias U(+-1/sqrt(fan_in)). MultiheadAttention then zeroes out_proj.bias.
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(module.weight)
        if param_name == "bias" and module_name.endswith("mha.out_proj"):
            return {"kind": "const", "value": 0.0}
        gain = nn.init.calculate_gain("leaky_relu", math.sqrt(5))
        bound = gain * math.sqrt(3.0 / fan_in)
        if param_name == "bias":
            bound = 1 / math.sqrt(fan_in)
        return {"kind": "uniform", "bound": bound}
    if isinstance(module, nn.MultiheadAttention):
        if param_name == "in_proj_weight":
            fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(p)
            return {"kind": "uniform", "bound": math.sqrt(6.0 / (fan_in + fan_out))}
        return {"kind": "const", "value": 0.0}
    if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
        return {"kind": "const", "value": 1.0 if param_name == "weight" else 0.0}
    if isinstance(module, nn.Embedding):
        return {"kind": "normal", "std": 1.0}
    raise TypeError(f"no rule for {module_name}.{param_name} ({type(module).__name__})")


def init_stats(cfg):
    torch.manual_seed(0)
    model = GeneralUNet(cfg)
    modules = dict(model.named_modules())
    out = []
    for name, p in model.named_parameters():
        module_name, param_name = name.rsplit(".", 1)
        rule = init_rule(module_name, param_name, modules[module_name], p)
        x = p.detach().double()
        out.append({"name": name, "shape": list(p.shape), **rule, "numel": p.numel(),
                    "mean": x.mean().item(), "std": x.std(unbiased=False).item(),
                    "absmax": x.abs().max().item()})
    return out


def run_case(name, s):
    torch.manual_seed(s["seed"])
    model = GeneralUNet(MICRO_CONFIG)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model, betas=linear_betas(), lr=s["lr"], weight_decay=s["weight_decay"],
                      ema_decay=s["ema_decay"], ema_warmup=s["ema_warmup"],
                      ema_warmup_steps=s["ema_warmup_steps"], min_snr_gamma=s["min_snr_gamma"],
                      max_grad_norm=s["max_grad_norm"])
    g = torch.Generator().manual_seed(100 + s["seed"])
    rec = {k: [] for k in ("x0", "y", "t", "noise", "dropped", "loss", "per_sample", "grad_norm", "lr")}
    for step in range(1, STEPS + 1):
        x0 = torch.rand(BATCH, 3, 8, 8, generator=g) * 2 - 1
        y = torch.randint(3, (BATCH,), generator=g)
        t, noise, dropped = draw(x0, 1000, s["label_dropout"])
        lr = lr_at(s["lr"], s["warmup_steps"], STEPS, s["lr_schedule"], step)
        loss, per_sample, grad_norm = trainer.step(x0, y, t, noise, dropped, lr)
        for k, v in (("x0", x0), ("y", y), ("t", t), ("noise", noise), ("dropped", dropped.to(torch.uint8)),
                     ("loss", loss), ("per_sample", per_sample), ("grad_norm", grad_norm),
                     ("lr", torch.tensor(lr, dtype=torch.float64))):
            rec[k].append(v)
        print(f"{name} step {step}: loss {loss.item():.6f} grad_norm {grad_norm.item():.4f} lr {lr:.2e}")
    tensors = {f"{name}.{k}": torch.stack(v).contiguous() for k, v in rec.items()}
    state = trainer.opt.state
    for n, p in model.named_parameters():
        tensors[f"{name}.init.{n}"] = init[n].contiguous()
        tensors[f"{name}.final.{n}"] = p.detach().contiguous()
        tensors[f"{name}.exp_avg.{n}"] = state[p]["exp_avg"].contiguous()
        tensors[f"{name}.exp_avg_sq.{n}"] = state[p]["exp_avg_sq"].contiguous()
    for n, p in trainer.ema.model.named_parameters():
        tensors[f"{name}.ema.{n}"] = p.detach().contiguous()
    return tensors


def main():
    torch.set_num_threads(1)
    stats = {"torch": torch.__version__, "configs": {"seed": init_stats(SEED_CONFIG), "tiny": init_stats(TINY_CONFIG)},
             "preset_configs": {"seed": SEED_CONFIG, "tiny": TINY_CONFIG}}
    with open(os.path.join(HERE, "init_stats.json"), "w") as f:
        json.dump(stats, f, indent=1)
        f.write("\n")

    tensors = {}
    for name, settings in CASES.items():
        tensors.update(run_case(name, settings))
    torch.manual_seed(1234)
    t, noise, dropped = draw(torch.zeros(4, 3, 8, 8), 1000, 0.5)
    tensors.update({"draws.t": t, "draws.noise": noise, "draws.dropped": dropped.to(torch.uint8)})
    import diffusers

    meta = {"micro_config": MICRO_CONFIG, "steps": STEPS, "batch": BATCH, "cases": CASES,
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__}}
    save_file(tensors, os.path.join(HERE, "training_parity.safetensors"), metadata={"config": json.dumps(meta)})
    print("wrote init_stats.json and training_parity.safetensors")


if __name__ == "__main__":
    main()
