"""The seed's training loop in PyTorch, generalised the way ddpm-core generalises it:
the numeric reference for a training step (loss, backward, clipping, AdamW, EMA) and
the PyTorch side of the learning-speed benchmark.

What is the seed's and what is ours:

* loss: ε-MSE at t ~ U{0..T-1} with ε ~ N(0, I) and each sample's label dropped to
  the null label with probability p independently (the seed drew ε uniformly and
  dropped the whole batch's labels: bugs we do not copy); optionally Min-SNR-γ
  weighting (Hang et al. 2023), per sample min(SNR, γ)/SNR for ε-prediction, as
  diffusers' train_text_to_image.py computes it;
* optimizer: `torch.optim.AdamW` with its defaults but the learning rate; optional
  `clip_grad_norm_`; the learning rate set per step (linear warm-up, then constant
  or cosine to 0, as `get_cosine_schedule_with_warmup` without its off-by-one);
* EMA: the seed's `EMA` class verbatim ("copy" warm-up), or diffusers'
  `EMAModel` with its default warm-up (decay min(β, (1+n)/(10+n))), imported from
  diffusers when it is installed ("ramp");
* the forward process uses √ᾱ and √(1-ᾱ) computed in float64 and stored as
  float32, as ddpm-core's `NoiseSchedule` does.

Random draws happen in one fixed order per step — t = randint, ε = randn_like(x0),
mask = rand(B) < p — from torch's global CPU generator, the same order as
`ddpm_core::training::StepDraws::sample`, so one seed gives both sides the same draws.
"""

import copy
import math

import torch


class SeedEMA:
    """The seed's EMA (modules.py), verbatim but for the class name."""

    def __init__(self, beta):
        super().__init__()
        self.beta = beta
        self.step = 0

    def update_model_average(self, ma_model, current_model):
        for current_params, ma_params in zip(current_model.parameters(), ma_model.parameters()):
            old_weight, up_weight = ma_params.data, current_params.data
            ma_params.data = self.update_average(old_weight, up_weight)

    def update_average(self, old, new):
        if old is None:
            return new
        return old * self.beta + (1 - self.beta) * new

    def step_ema(self, ema_model, model, step_start_ema=2000):
        if self.step < step_start_ema:
            self.reset_parameters(ema_model, model)
            self.step += 1
            return
        self.update_model_average(ema_model, model)
        self.step += 1

    def reset_parameters(self, ema_model, model):
        ema_model.load_state_dict(model.state_dict())


class Ema:
    """The EMA of a run: "copy" (the seed's class) or "ramp" (diffusers' EMAModel)."""

    def __init__(self, model, decay, warmup, warmup_steps):
        self.warmup = warmup
        self.warmup_steps = warmup_steps
        if warmup == "copy":
            self.model = copy.deepcopy(model).eval().requires_grad_(False)
            self.seed_ema = SeedEMA(decay)
        elif warmup == "ramp":
            from diffusers.training_utils import EMAModel

            self.ema_model = EMAModel(model.parameters(), decay=decay)
            self.model = copy.deepcopy(model).eval().requires_grad_(False)
        else:
            raise ValueError(warmup)

    def update(self, model):
        if self.warmup == "copy":
            self.seed_ema.step_ema(self.model, model, step_start_ema=self.warmup_steps)
        else:
            self.ema_model.step(model.parameters())
            self.ema_model.copy_to(self.model.parameters())


def forward_tables(betas_f64):
    """(√ᾱ, √(1-ᾱ)) as float32 [T] from float64 betas."""
    alphas_cumprod = torch.cumprod(1.0 - betas_f64, 0)
    return alphas_cumprod.sqrt().float(), (1.0 - alphas_cumprod).sqrt().float(), alphas_cumprod


def linear_betas(timesteps=1000, beta_start=1e-4, beta_end=0.02):
    i = torch.arange(timesteps, dtype=torch.float64)
    return beta_start + (beta_end - beta_start) * i / (timesteps - 1)


def cosine_betas(timesteps=1000, s=0.008, max_beta=0.999):
    def alpha_bar(t):
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    return torch.tensor(
        [min(1 - alpha_bar((i + 1) / timesteps) / alpha_bar(i / timesteps), max_beta) for i in range(timesteps)],
        dtype=torch.float64,
    )


def lr_at(lr, warmup_steps, total_steps, schedule, s):
    """Learning rate of step s (1-based), as ddpm_core::training::LrSchedule::lr_at."""
    if warmup_steps > 0 and s < warmup_steps:
        return lr * s / warmup_steps
    if schedule == "constant":
        return lr
    progress = min(max((s - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0), 1.0)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def draw(x0, timesteps, label_dropout):
    """One step's draws from the global generator: t, ε, dropout mask (in that order)."""
    b = x0.shape[0]
    t = torch.randint(timesteps, (b,))
    noise = torch.randn_like(x0)
    dropped = torch.rand(b) < label_dropout if label_dropout > 0 else None
    return t, noise, dropped


class Trainer:
    """Model + AdamW + EMA + schedule: one `step` is one training step."""

    def __init__(self, model, *, betas, lr, weight_decay=0.01, ema_decay=0.995, ema_warmup="copy",
                 ema_warmup_steps=2000, min_snr_gamma=0.0, max_grad_norm=0.0):
        self.model = model
        self.sqrt_ab, self.sqrt_1m, alphas_cumprod = forward_tables(betas)
        self.timesteps = len(betas)
        snr = alphas_cumprod / (1 - alphas_cumprod)
        self.weights = (torch.clamp(snr, max=min_snr_gamma) / snr).float() if min_snr_gamma > 0 else None
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        self.ema = Ema(model, ema_decay, ema_warmup, ema_warmup_steps)
        self.max_grad_norm = max_grad_norm

    def step(self, x0, y, t, noise, dropped, lr):
        """Returns (objective, per-sample plain ε-MSE [B], grad norm before clipping)."""
        for group in self.opt.param_groups:
            group["lr"] = lr
        xt = self.sqrt_ab[t][:, None, None, None] * x0 + self.sqrt_1m[t][:, None, None, None] * noise
        if y is not None and dropped is not None:
            y = torch.where(dropped, torch.full_like(y, self.model.num_classes), y)
        pred = self.model(xt, t, y)
        per_sample = (pred - noise).square().mean(dim=(1, 2, 3))
        loss = per_sample.mean() if self.weights is None else (per_sample * self.weights[t]).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        else:
            grad_norm = torch.norm(torch.stack([p.grad.norm() for p in self.model.parameters() if p.grad is not None]))
        self.opt.step()
        self.ema.update(self.model)
        return loss.detach(), per_sample.detach(), grad_norm.detach()
