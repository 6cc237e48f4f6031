#!/usr/bin/env python3
"""PyTorch (eager) baseline for the `ddpm-core` step benchmark.

Run by `cargo bench -p ddpm-core` as

    /root/.cache/ddpm/torch-2.11.0/bin/python benches/reference/torch_steps.py \
        --config tiny|seed --batch B --device cpu|cuda --threads N --iters K --warmup W

It times, per step (median over K timed iterations after W warm-up ones):

* train_step        one DDPM training step: sample x0, t, noise, label dropout (10% -> null
                    label), q(x_t | x0) with the linear schedule, forward, MSE, backward,
                    AdamW(lr 3e-4) step, zero_grad(set_to_none=True), EMA(0.995) update;
* guided_step       one classifier-free-guided DDIM step under inference_mode: a single
                    forward on the 2B batch [x; x] with labels [y; null], chunk(2),
                    eps = u + w (c - u) (per-sample w), x' = a x + b eps (per-sample a, b);
* guided_two_pass   the same with two forward passes of B (conditional, then null).

Where PyTorch offers interchangeable formulations, each is timed and the fastest kept:

* attention: "mha" (nn.MultiheadAttention called as the seed does), "mha_noweights"
  (need_weights=False) and "sdpa" (in_proj -> F.scaled_dot_product_attention ->
  out_proj with the same parameters); timed inside each full step, the fastest per
  step is reported (`attention_variant` names it, or lists it per step if they differ);
* AdamW: foreach vs fused (micro-benchmarked on the model's parameters);
* EMA: torch._foreach_lerp_ vs _foreach_mul_ + _foreach_add_ vs a per-tensor lerp_ loop.

`--attention/--optimizer/--ema` pin a variant instead of timing all (useful for the
slow seed config on CPU).  On CUDA, cudnn.benchmark is enabled (mirror it in Rust with
tch::Cuda::cudnn_set_benchmark(true)); matmul precision is left at PyTorch's default.

Progress goes to stderr; the LAST line of stdout is one JSON object:
{"config", "batch", "device", "threads", "train_step_ms", "guided_step_ms",
 "guided_two_pass_ms", "attention_variant", "optimizer_variant", "torch_version", ...}
plus extra keys ("ema_variant", "details" with every variant's median, ...).

Needs only torch (the project's venv has no numpy; the resulting torch warning is muted).
"""

import argparse
import json
import os
import statistics
import sys
import time
import warnings

warnings.filterwarnings("ignore", message=".*Failed to initialize NumPy.*")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "reference"))
from general_unet import ATTENTION_IMPLS, PRESETS, GeneralUNet  # noqa: E402

T = 1000
LR = 3e-4
EMA_DECAY = 0.995
LABEL_DROPOUT = 0.1
GUIDANCE = 3.0


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--attention", choices=["auto", *ATTENTION_IMPLS], default="auto")
    ap.add_argument("--optimizer", choices=["auto", "foreach", "fused"], default="auto")
    ap.add_argument("--ema", choices=["auto", "foreach_lerp", "foreach_mul_add", "per_tensor_lerp"],
                    default="auto")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def median_ms(self, fn, iters, warmup):
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(iters):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


# ----------------------------------------------------------------------------
# optimizer / EMA variants
# ----------------------------------------------------------------------------
def make_adamw(params, variant):
    if variant == "fused":
        return torch.optim.AdamW(params, lr=LR, fused=True)
    return torch.optim.AdamW(params, lr=LR, foreach=True)


def ema_fn(variant, ema, params):
    w = 1.0 - EMA_DECAY
    if variant == "foreach_lerp":
        def f():
            torch._foreach_lerp_(ema, params, w)
    elif variant == "foreach_mul_add":
        def f():
            torch._foreach_mul_(ema, EMA_DECAY)
            torch._foreach_add_(ema, params, alpha=w)
    elif variant == "per_tensor_lerp":
        def f():
            for e, p in zip(ema, params):
                e.lerp_(p, w)
    else:
        raise ValueError(variant)
    return f


def pick_optimizer(model, timer, args, details):
    """Micro-benchmark AdamW.step() (foreach vs fused) on the model's parameters."""
    if args.optimizer != "auto":
        return args.optimizer
    params = list(model.parameters())
    saved = [p.detach().clone() for p in params]
    res = {}
    for variant in ["foreach", "fused"]:
        try:
            opt = make_adamw(params, variant)
            for p in params:
                p.grad = torch.randn_like(p) * 1e-3
            n = max(args.iters, 5)
            res[variant] = timer.median_ms(opt.step, n, max(args.warmup, 1))
        except (RuntimeError, TypeError, ValueError) as e:  # fused unsupported here
            log(f"optimizer {variant}: unavailable ({e})")
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
            p.grad = None
    details["optimizer_step_ms"] = res
    log(f"AdamW.step ms: {res}")
    return min(res, key=res.get)


def pick_ema(model, timer, args, details):
    if args.ema != "auto":
        return args.ema
    params = [p.detach() for p in model.parameters()]
    ema = [p.clone() for p in params]
    res = {}
    with torch.no_grad():
        for variant in ["foreach_lerp", "foreach_mul_add", "per_tensor_lerp"]:
            res[variant] = timer.median_ms(ema_fn(variant, ema, params), max(args.iters, 5),
                                           max(args.warmup, 1))
    details["ema_update_ms"] = res
    log(f"EMA update ms: {res}")
    return min(res, key=res.get)


# ----------------------------------------------------------------------------
# steps
# ----------------------------------------------------------------------------
def make_train_step(model, cfg, B, device, opt, ema_update, abar, gen):
    S, C = cfg["image_size"], cfg["in_channels"]
    nc = cfg.get("num_classes")

    def step():
        x0 = torch.randn(B, C, S, S, device=device, generator=gen)
        t = torch.randint(0, T, (B,), device=device, generator=gen)
        noise = torch.randn(B, C, S, S, device=device, generator=gen)
        a = abar[t].view(B, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1.0 - a).sqrt() * noise
        y = None
        if nc is not None:
            y = torch.randint(0, nc, (B,), device=device, generator=gen)
            drop = torch.rand(B, device=device, generator=gen) < LABEL_DROPOUT
            y = torch.where(drop, torch.full_like(y, nc), y)
        pred = model(x_t, t, y)
        loss = F.mse_loss(pred, noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            ema_update()

    return step


class GuidedState:
    """Per-sample DDIM coefficients and a running x, as a sampler would hold them."""

    def __init__(self, cfg, B, device, gen):
        S, C = cfg["image_size"], cfg["in_channels"]
        nc = cfg.get("num_classes")
        self.x = torch.randn(B, C, S, S, device=device, generator=gen)
        self.t = torch.full((B,), 500, dtype=torch.long, device=device)
        self.y = torch.randint(0, nc, (B,), device=device, generator=gen) if nc is not None else None
        self.null = torch.full((B,), nc, dtype=torch.long, device=device) if nc is not None else None
        self.w = torch.linspace(1.0, GUIDANCE, B, device=device).view(B, 1, 1, 1)
        # a = sqrt(abar_prev/abar_t), b = sqrt(1-abar_prev) - a*sqrt(1-abar_t): values are
        # irrelevant for timing; any per-sample [B,1,1,1] tensors do.
        self.a = torch.linspace(1.001, 1.01, B, device=device).view(B, 1, 1, 1)
        self.b = torch.linspace(-0.02, -0.01, B, device=device).view(B, 1, 1, 1)
        self.x_in_t = torch.cat([self.t, self.t])
        self.y_in = torch.cat([self.y, self.null]) if self.y is not None else None


def make_guided_step(model, st):
    def step():
        with torch.inference_mode():
            out = model(torch.cat([st.x, st.x]), st.x_in_t, st.y_in)
            c, u = out.chunk(2)
            eps = torch.lerp(u, c, st.w)  # == u + w (c - u)
            st.x = torch.addcmul(st.a * st.x, st.b, eps)  # == a x + b eps

    return step


def make_guided_two_pass(model, st):
    def step():
        with torch.inference_mode():
            c = model(st.x, st.t, st.y)
            u = model(st.x, st.t, st.null)
            eps = torch.lerp(u, c, st.w)
            st.x = torch.addcmul(st.a * st.x, st.b, eps)

    return step


def main():
    args = parse_args()
    wall0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(args.seed)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    timer = Timer(device)
    cfg = PRESETS[args.config]
    B = args.batch

    model = GeneralUNet(cfg).to(device)
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    log(f"config {args.config}: {n_params} parameters, image {cfg['image_size']}, batch {B}, "
        f"device {device}, threads {torch.get_num_threads()}, torch {torch.__version__}")
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    abar = torch.cumprod(1.0 - betas, 0).to(torch.float32).to(device)

    details = {}
    opt_variant = pick_optimizer(model, timer, args, details)
    ema_variant = pick_ema(model, timer, args, details)
    opt = make_adamw(params, opt_variant)
    ema = [p.detach().clone() for p in params]
    ema_update = ema_fn(ema_variant, ema, [p.detach() for p in params])

    attn_variants = list(ATTENTION_IMPLS) if args.attention == "auto" else [args.attention]
    per = {"train_step": {}, "guided_step": {}, "guided_two_pass": {}}
    for v in attn_variants:
        model.set_attention_impl(v)
        model.train()
        per["train_step"][v] = timer.median_ms(
            make_train_step(model, cfg, B, device, opt, ema_update, abar, gen), args.iters, args.warmup)
        log(f"[{v}] train_step {per['train_step'][v]:.2f} ms")
        model.eval()
        st = GuidedState(cfg, B, device, gen)
        per["guided_step"][v] = timer.median_ms(make_guided_step(model, st), args.iters, args.warmup)
        log(f"[{v}] guided_step {per['guided_step'][v]:.2f} ms")
        st = GuidedState(cfg, B, device, gen)
        per["guided_two_pass"][v] = timer.median_ms(make_guided_two_pass(model, st), args.iters, args.warmup)
        log(f"[{v}] guided_two_pass {per['guided_two_pass'][v]:.2f} ms")
    details["attention_ms"] = per

    best = {k: min(d, key=d.get) for k, d in per.items()}
    if len(set(best.values())) == 1:
        attention_variant = next(iter(best.values()))
    else:
        attention_variant = ",".join(f"{k}:{v}" for k, v in best.items())

    result = {
        "config": args.config,
        "batch": B,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "train_step_ms": per["train_step"][best["train_step"]],
        "guided_step_ms": per["guided_step"][best["guided_step"]],
        "guided_two_pass_ms": per["guided_two_pass"][best["guided_two_pass"]],
        "attention_variant": attention_variant,
        "optimizer_variant": opt_variant,
        "torch_version": torch.__version__,
        "ema_variant": ema_variant,
        "iters": args.iters,
        "warmup": args.warmup,
        "image_size": cfg["image_size"],
        "parameters": n_params,
        "cudnn_benchmark": bool(device.type == "cuda"),
        "details": details,
        "wall_s": round(time.perf_counter() - wall0, 2),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
