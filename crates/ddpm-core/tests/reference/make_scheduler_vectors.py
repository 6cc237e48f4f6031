#!/usr/bin/env python3
"""Generate `scheduler_vectors.json`: reference numbers for the DDPM/DDIM noise
schedules and single sampler steps, taken from Hugging Face diffusers.

Produced with: diffusers 0.42.1, torch 2.11.0 (CPU), numpy 2.4.6, Python 3.11.
(The versions actually used are also recorded in the JSON under "versions".)

Regenerate (from the repository root):

    python3 -m venv /tmp/diffusers-venv
    /tmp/diffusers-venv/bin/pip install diffusers numpy safetensors
    # make the project's torch importable without reinstalling it:
    echo /root/.cache/ddpm/torch-2.11.0/lib/python3.11/site-packages \
        > "$(/tmp/diffusers-venv/bin/python -c 'import site; print(site.getsitepackages()[0])')/torch-venv.pth"
    /tmp/diffusers-venv/bin/python crates/ddpm-core/tests/reference/make_scheduler_vectors.py

Precision notes
---------------
diffusers builds its tables (betas, alphas, alphas_cumprod, the constant 1.0 and
DDIM's final_alpha_cumprod) as float32 tensors.  We record

* `betas`, `alphas`, `alphas_cumprod`, `posterior_variance` -- float64 tables
  (betas built in float64 with the same formula diffusers uses, cumprod in
  float64), and
* `*_diffusers` -- exactly what diffusers holds (float32 values widened to f64).

For the sampler steps every case records
* `prev_sample`            -- diffusers' own `step()` code run on float64
  inputs with the scheduler's tables replaced by the float64 tables above, and
* `prev_sample_diffusers`  -- diffusers' `step()` with its untouched float32
  tables (the per-step scalar coefficients are then computed in float32 and
  applied to the float64 sample).
Both come from diffusers' code path; only the tables differ.

The DDPM step draws its noise internally through `randn_tensor`; we
monkeypatch the name in `diffusers.schedulers.scheduling_ddpm` so that it
returns our fixed `z`.  DDIM's step accepts `variance_noise=z` directly.
"""

import contextlib
import json
import math
import os
import platform

import numpy as np
import torch

import diffusers
import diffusers.schedulers.scheduling_ddpm as ddpm_mod
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

T = 1000
BETA_START = 1e-4
BETA_END = 0.02
SHAPE = (2, 3, 4, 4)
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scheduler_vectors.json")


# ----------------------------------------------------------------------------
# float64 tables
# ----------------------------------------------------------------------------
def linear_betas_f64():
    # Same call diffusers makes, but in float64.
    return torch.linspace(BETA_START, BETA_END, T, dtype=torch.float64)


def cosine_betas_f64(s=0.008, max_beta=0.999):
    # Nichol & Dhariwal (2021): abar(t) = cos^2(((t/T + s)/(1 + s)) * pi/2),
    # beta_i = min(1 - abar((i+1)/T) / abar(i/T), max_beta).
    # (diffusers computes the same thing with Python floats, then casts to f32.)
    def abar(u):
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    return torch.tensor(
        [min(1 - abar((i + 1) / T) / abar(i / T), max_beta) for i in range(T)],
        dtype=torch.float64,
    )


def to_f64_tables(sched, betas64):
    """Replace a scheduler's float32 tables by float64 ones (in place)."""
    sched.betas = betas64.clone()
    sched.alphas = 1.0 - sched.betas
    sched.alphas_cumprod = torch.cumprod(sched.alphas, dim=0)
    if hasattr(sched, "one"):
        sched.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(sched, "final_alpha_cumprod"):
        if sched.config.set_alpha_to_one:
            sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
        else:
            sched.final_alpha_cumprod = sched.alphas_cumprod[0].clone()
    return sched


def flist(t):
    """Tensor/array -> flat list of Python floats (float64)."""
    if isinstance(t, torch.Tensor):
        t = t.detach().to(torch.float64).cpu().numpy()
    return [float(v) for v in np.asarray(t, dtype=np.float64).reshape(-1)]


def ilist(t):
    if isinstance(t, torch.Tensor):
        t = t.cpu().numpy()
    return [int(v) for v in np.asarray(t).reshape(-1)]


def as_int(v):
    return int(v.item()) if isinstance(v, torch.Tensor) else int(v)


@contextlib.contextmanager
def fixed_ddpm_noise(z):
    """Make DDPMScheduler.step draw exactly `z` as its variance noise."""
    orig = ddpm_mod.randn_tensor

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == tuple(z.shape), (shape, z.shape)
        return z.to(dtype=dtype if dtype is not None else z.dtype)

    ddpm_mod.randn_tensor = fake_randn
    try:
        yield
    finally:
        ddpm_mod.randn_tensor = orig


# ----------------------------------------------------------------------------
# fixed inputs (seeded numpy RNG, float64)
# ----------------------------------------------------------------------------
rng = np.random.default_rng(20240601)
x_np = rng.standard_normal(SHAPE)
eps_np = rng.standard_normal(SHAPE)
z_np = rng.standard_normal(SHAPE)
x = torch.from_numpy(x_np)  # float64
eps = torch.from_numpy(eps_np)
z = torch.from_numpy(z_np)


# ----------------------------------------------------------------------------
# 1. schedules
# ----------------------------------------------------------------------------
POSTERIOR_TS = [1, 2, 10, 100, 500, 999]
schedules = {}
schedule_notes = {}
for name, diff_name, betas64 in [
    ("linear", "linear", linear_betas_f64()),
    ("cosine", "squaredcos_cap_v2", cosine_betas_f64()),
]:
    kw = dict(num_train_timesteps=T, beta_start=BETA_START, beta_end=BETA_END,
              beta_schedule=diff_name, clip_sample=False, variance_type="fixed_small")
    s32 = DDPMScheduler(**kw)                     # diffusers' own float32 tables
    s64 = to_f64_tables(DDPMScheduler(**kw), betas64)

    entry = {
        "diffusers_beta_schedule": diff_name,
        "betas": flist(s64.betas),
        "alphas": flist(s64.alphas),
        "alphas_cumprod": flist(s64.alphas_cumprod),
        "betas_diffusers": flist(s32.betas),
        "alphas_diffusers": flist(s32.alphas),
        "alphas_cumprod_diffusers": flist(s32.alphas_cumprod),
        "posterior_variance_t": POSTERIOR_TS,
        # DDPMScheduler._get_variance (fixed_small):
        #   (1 - abar_{t-1}) / (1 - abar_t) * (1 - abar_t / abar_{t-1}), clamped >= 1e-20
        "posterior_variance": [float(s64._get_variance(t)) for t in POSTERIOR_TS],
        "posterior_variance_diffusers": [float(s32._get_variance(t)) for t in POSTERIOR_TS],
    }
    # Closed-form check of the textbook formula (1-abar_{t-1})/(1-abar_t)*beta_t in f64.
    ab = s64.alphas_cumprod
    textbook = [float((1 - ab[t - 1]) / (1 - ab[t]) * s64.betas[t]) for t in POSTERIOR_TS]
    entry["posterior_variance_textbook"] = textbook
    # f32-vs-f64 discrepancy summary.
    d_beta = (s32.betas.double() - s64.betas).abs()
    d_ab = (s32.alphas_cumprod.double() - s64.alphas_cumprod)
    rel_ab = (d_ab.abs() / s64.alphas_cumprod)
    schedule_notes[name] = {
        "max_abs_diff_betas_f32_vs_f64": float(d_beta.max()),
        "max_abs_diff_alphas_cumprod_f32_vs_f64": float(d_ab.abs().max()),
        "max_rel_diff_alphas_cumprod_f32_vs_f64": float(rel_ab.max()),
        "argmax_rel_diff_alphas_cumprod": int(rel_ab.argmax()),
        "alphas_cumprod_f64_at_999": float(s64.alphas_cumprod[-1]),
        "alphas_cumprod_diffusers_at_999": float(s32.alphas_cumprod[-1]),
        "max_rel_diff_posterior_variance_f32_vs_f64": max(
            abs(a - b) / b for a, b in zip(entry["posterior_variance_diffusers"], entry["posterior_variance"])),
    }
    schedules[name] = entry


# ----------------------------------------------------------------------------
# 2. DDPM single steps (linear schedule)
# ----------------------------------------------------------------------------
def ddpm_case(num_inference_steps, t, tag, variance_type="fixed_small", thresholding=None):
    kw = dict(num_train_timesteps=T, beta_start=BETA_START, beta_end=BETA_END,
              beta_schedule="linear", clip_sample=False, variance_type=variance_type,
              prediction_type="epsilon")
    if thresholding is not None:
        ratio, max_value = thresholding
        kw.update(thresholding=True, dynamic_thresholding_ratio=ratio, sample_max_value=max_value)
    out = {"tag": tag, "num_inference_steps": num_inference_steps, "t": int(t),
           "variance_type": variance_type, "thresholding": thresholding}
    for key, sched in [("", to_f64_tables(DDPMScheduler(**kw), linear_betas_f64())),
                       ("_diffusers", DDPMScheduler(**kw))]:
        if num_inference_steps is not None:
            sched.set_timesteps(num_inference_steps)
        prev_t = as_int(sched.previous_timestep(t))
        variance = float(sched._get_variance(t)) if t > 0 else 0.0
        with fixed_ddpm_noise(z):
            res = sched.step(eps.clone(), t, x.clone())
        out["prev_t"] = prev_t
        out["variance" + key] = variance
        out["pred_original_sample" + key] = flist(res.pred_original_sample)
        out["prev_sample" + key] = flist(res.prev_sample)
    return out


ddpm_cases = [ddpm_case(None, t, "full_schedule") for t in [999, 500, 10, 1, 0]]
_s = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=False)
_s.set_timesteps(50)
ddpm50_timesteps = ilist(_s.timesteps)
for t in [ddpm50_timesteps[0], ddpm50_timesteps[len(ddpm50_timesteps) // 2], ddpm50_timesteps[-1]]:
    ddpm_cases.append(ddpm_case(50, t, "set_timesteps_50"))
# sigma^2 = beta ("fixed_large", the seed's choice). Not on a subsequence's last step to
# the clean image (prev_t < 0 with t > 0), where diffusers adds sqrt(1 - abar_t) z and we
# add none (see ddpm.rs); its full-schedule t = 0 step adds none on both sides.
for t in [999, 500, 10, 1, 0]:
    ddpm_cases.append(ddpm_case(None, t, "full_schedule", "fixed_large"))
for t in [ddpm50_timesteps[0], ddpm50_timesteps[len(ddpm50_timesteps) // 2]]:
    ddpm_cases.append(ddpm_case(50, t, "set_timesteps_50", "fixed_large"))
# Imagen's dynamic thresholding of x0 (diffusers' thresholding=True): per sample,
# s = clamp(quantile(|x0|, ratio), 1, sample_max_value), x0 <- clamp(x0, -s, s) / s.
# With sample_max_value = 1 it is the static clip to [-1, 1].
for t in [999, 500, 10, 1]:
    for thr in [(0.995, 1.0), (0.9, 2.5), (0.6, 100.0)]:
        ddpm_cases.append(ddpm_case(None, t, "full_schedule", "fixed_small", list(thr)))


# ----------------------------------------------------------------------------
# 2b. timestep spacings (diffusers' `timestep_spacing`, steps_offset = 0) of the three
#     schedulers our samplers follow: DDPM, DDIM and DPM-Solver++ (linspace for n < T;
#     at n = T diffusers' DPM-Solver linspace repeats a timestep, see sampler/mod.rs).
# ----------------------------------------------------------------------------
SPACING_NS = [1, 2, 3, 4, 7, 10, 16, 20, 25, 48, 50, 64, 100, 333, 999, 1000]
spacings = {}
for sched_name, cls, extra in [
    ("ddpm", DDPMScheduler, dict(clip_sample=False)),
    ("ddim", DDIMScheduler, dict(clip_sample=False, set_alpha_to_one=True)),
    ("dpmsolver", DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", solver_order=2)),
]:
    for spacing in ["leading", "trailing", "linspace"]:
        runs = {}
        for n in SPACING_NS:
            if sched_name == "dpmsolver" and n >= T:
                continue
            sch = cls(num_train_timesteps=T, beta_schedule="linear", steps_offset=0,
                      timestep_spacing=spacing, **extra)
            sch.set_timesteps(n)
            runs[str(n)] = ilist(sch.timesteps)
        spacings[f"{sched_name}_{spacing}"] = runs


# ----------------------------------------------------------------------------
# 3. DDIM single steps (linear schedule)
# ----------------------------------------------------------------------------
ddim = {}
for spacing in ["leading", "trailing"]:
    for n in [20, 50]:
        kw = dict(num_train_timesteps=T, beta_start=BETA_START, beta_end=BETA_END,
                  beta_schedule="linear", clip_sample=False, set_alpha_to_one=True,
                  steps_offset=0, prediction_type="epsilon", timestep_spacing=spacing)
        s64 = to_f64_tables(DDIMScheduler(**kw), linear_betas_f64())
        s32 = DDIMScheduler(**kw)
        s64.set_timesteps(n)
        s32.set_timesteps(n)
        ts = ilist(s64.timesteps)
        assert ts == ilist(s32.timesteps)
        cases = []
        for t in [ts[0], ts[len(ts) // 2], ts[-1]]:
            prev_t = t - T // n  # what DDIMScheduler.step uses
            for eta in [0.0, 1.0]:
                c = {"t": t, "prev_t": prev_t, "eta": eta}
                for key, sched in [("", s64), ("_diffusers", s32)]:
                    noise = z.clone() if eta > 0 else None
                    res = sched.step(eps.clone(), t, x.clone(), eta=eta, variance_noise=noise)
                    c["variance" + key] = float(sched._get_variance(t, prev_t))
                    c["pred_original_sample" + key] = flist(res.pred_original_sample)
                    c["prev_sample" + key] = flist(res.prev_sample)
                cases.append(c)
        ddim[f"{spacing}_{n}"] = {
            "timestep_spacing": spacing,
            "num_inference_steps": n,
            "timesteps": ts,
            "cases": cases,
        }


# ----------------------------------------------------------------------------
# 4. guidance rescale (diffusers' rescale_noise_cfg, Lin et al. 2024 sec. 3.4) of the
#    guided eps = uncond + w (cond - uncond) with cond = eps, uncond = z, w = 3
# ----------------------------------------------------------------------------
from diffusers.guiders.guider_utils import rescale_noise_cfg

W_RESCALE = 3.0
guided = z + W_RESCALE * (eps - z)
guidance_rescale = {
    "guidance_scale": W_RESCALE,
    "cond": "inputs.eps",
    "uncond": "inputs.z",
    "guided": flist(guided),
    "cases": [{"guidance_rescale": phi,
               "rescaled": flist(rescale_noise_cfg(guided.clone(), eps.clone(), guidance_rescale=phi))}
              for phi in [0.0, 0.3, 0.7, 1.0]],
}


# ----------------------------------------------------------------------------
# write
# ----------------------------------------------------------------------------
doc = {
    "description": "DDPM/DDIM reference vectors from Hugging Face diffusers; see make_scheduler_vectors.py",
    "versions": {
        "diffusers": diffusers.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    },
    "notes": [
        "prev_sample / posterior_variance / variance use float64 tables run through diffusers' step()/_get_variance(); *_diffusers use diffusers' float32 tables (scalars computed in f32, applied to the f64 sample).",
        "A negative prev_t means alpha_prod_prev = 1 (DDPM: scheduler.one; DDIM: final_alpha_cumprod with set_alpha_to_one=True). DDIM's prev_t is always t - 1000 // num_inference_steps (so -50 / -20 for the last 'leading' step, -1 for the last 'trailing' step).",
        "DDPM adds no noise at t == 0; DDIM's variance is 0 when prev_t < 0, so eta = 1 equals eta = 0 on the last step.",
        "DDPM posterior variance (diffusers fixed_small) uses current_beta_t = 1 - abar_t / abar_prev, which for a full schedule is beta_t up to rounding; posterior_variance_textbook is (1 - abar_{t-1}) / (1 - abar_t) * beta_t in f64.",
        "betas (f64) come from torch.linspace(1e-4, 0.02, 1000, dtype=float64); that differs from the naive start + i * (end - start) / 999 in the last ulp for 448 of 1000 entries (max 3.5e-18)."
    ],
    "num_train_timesteps": T,
    "beta_start": BETA_START,
    "beta_end": BETA_END,
    "schedules": schedules,
    "schedule_precision_notes": schedule_notes,
    "inputs": {
        "shape": list(SHAPE),
        "rng": "numpy.random.default_rng(20240601).standard_normal, drawn in order x, eps, z",
        "x": flist(x),
        "eps": flist(eps),
        "z": flist(z),
    },
    "ddpm": {
        "config": {"beta_schedule": "linear", "clip_sample": False,
                   "variance_type": "fixed_small", "prediction_type": "epsilon",
                   "timestep_spacing": "leading", "steps_offset": 0},
        "set_timesteps_50": ddpm50_timesteps,
        "cases": ddpm_cases,
    },
    "spacings": spacings,
    "guidance_rescale": guidance_rescale,
    "ddim": {
        "config": {"beta_schedule": "linear", "clip_sample": False, "set_alpha_to_one": True,
                   "steps_offset": 0, "prediction_type": "epsilon"},
        "runs": ddim,
    },
}

def dump_json(obj, path):
    """Indented JSON, but with every list of plain numbers kept on one line."""
    import re
    text = json.dumps(obj, indent=1)
    text = re.sub(r"\[\s*([-0-9.eE+,\s]+?)\s*\]",
                  lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]", text)
    json.loads(text)  # sanity: still valid JSON
    with open(path, "w") as f:
        f.write(text + "\n")


dump_json(doc, OUT)
print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)")
print(json.dumps(schedule_notes, indent=1))
