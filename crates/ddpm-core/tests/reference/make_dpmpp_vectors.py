#!/usr/bin/env python3
"""Generate `dpmpp_vectors.json`: reference numbers for DPM-Solver++(2M), taken from
Hugging Face diffusers' `DPMSolverMultistepScheduler` at its defaults
(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
lower_order_final=True, final_sigmas_type="zero", timestep_spacing="linspace",
thresholding=False, prediction_type="epsilon") on the linear 1e-4..0.02 schedule, T = 1000.

Produced with: diffusers 0.42.1, torch 2.11.0 (CPU), numpy 2.4.6, Python 3.11.
(The versions actually used are also recorded in the JSON under "versions".)

Regenerate (from the repository root), with the venv that `make_scheduler_vectors.py`
describes:

    /tmp/diffusers-venv/bin/python crates/ddpm-core/tests/reference/make_dpmpp_vectors.py

What is recorded
----------------
* `timesteps`: `set_timesteps(n)` for several n (linspace spacing).
* `steps`: single steps.  For step k of an n-step plan the scheduler is put in the state
  the k previous steps would leave (`_step_index = k`, the previous x̂₀ = the fixed input
  `prev_x0`, `lower_order_nums`), then `step(eps, t, x)` is called once.  Step 0 and the
  last step are first order, the others second order.
* `trajectories`: whole runs from x_T = `x`, with the fake noise prediction
  eps(x, t) = 0.8·tanh(x) + 0.3·cos(t/100)·`eps` (elementwise, `eps` the fixed input),
  every intermediate sample recorded.  The `clipped` run sets thresholding=True with
  the scheduler's `_threshold_sample` replaced by a clamp of x̂₀ to [-1, 1]: our
  `clip_denoised` (diffusers' own thresholding is dynamic, by a percentile).

Precision
---------
diffusers keeps its tables in float32, casts the per-step sigmas to float32 in
`set_timesteps` and the sample to float32 inside `step()`.  Every `prev_sample` /
`samples` below comes from diffusers' own code with all three in float64: the tables
replaced by float64 ones (betas from torch.linspace in float64, cumprod in float64), the
sigmas recomputed in float64 from them after `set_timesteps`, and the name `torch` in the
scheduler's module replaced, during `step()`, by a proxy whose `float32` is float64 (the
existing `make_scheduler_vectors.py` monkeypatches DDPM's noise the same way).  The
`*_diffusers` values are the untouched float32 scheduler, for information.
"""

import contextlib
import json
import math
import os
import platform
import re
import types

import numpy as np
import torch

import diffusers
import diffusers.schedulers.scheduling_dpmsolver_multistep as dpm_mod
from diffusers import DPMSolverMultistepScheduler

T = 1000
BETA_START = 1e-4
BETA_END = 0.02
SHAPE = (2, 3, 4, 4)
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dpmpp_vectors.json")
TIMESTEP_NS = [1, 2, 3, 4, 7, 10, 20, 25, 50, 100, 999]
STEP_NS = [1, 2, 10, 20]
TRAJECTORY_NS = [1, 2, 4, 10, 20]
CLIPPED_NS = [10]


def flist(t):
    """Tensor/array -> flat list of Python floats (float64)."""
    if isinstance(t, torch.Tensor):
        t = t.detach().to(torch.float64).cpu().numpy()
    return [float(v) for v in np.asarray(t, dtype=np.float64).reshape(-1)]


def ilist(t):
    return [int(v) for v in t.reshape(-1).tolist()]


class _Float64Torch(types.ModuleType):
    """`torch`, except that `float32` is float64 (for the cast inside `step()`)."""

    def __getattr__(self, name):
        return torch.float64 if name == "float32" else getattr(torch, name)


@contextlib.contextmanager
def float64_step():
    orig = dpm_mod.torch
    dpm_mod.torch = _Float64Torch("torch")
    try:
        yield
    finally:
        dpm_mod.torch = orig


def scheduler(float64, clip=False, algorithm_type="dpmsolver++"):
    s = DPMSolverMultistepScheduler(
        num_train_timesteps=T, beta_start=BETA_START, beta_end=BETA_END,
        beta_schedule="linear", thresholding=clip, algorithm_type=algorithm_type)
    if clip:
        # Our clip_denoised: a plain clamp of x̂₀ in place of dynamic thresholding.
        s._threshold_sample = lambda x0: x0.clamp(-1.0, 1.0)
    if float64:
        s.betas = torch.linspace(BETA_START, BETA_END, T, dtype=torch.float64)
        s.alphas = 1.0 - s.betas
        s.alphas_cumprod = torch.cumprod(s.alphas, dim=0)
        s.alpha_t = torch.sqrt(s.alphas_cumprod)
        s.sigma_t = torch.sqrt(1 - s.alphas_cumprod)
        s.lambda_t = torch.log(s.alpha_t) - torch.log(s.sigma_t)
    return s


def set_timesteps(s, n, float64):
    s.set_timesteps(n)
    if float64:
        ab = s.alphas_cumprod[s.timesteps]
        sigmas = ((1 - ab) / ab) ** 0.5
        s.sigmas = torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])
    return ilist(s.timesteps)


def run_step(s, eps, t, x, float64, noise=None):
    ctx = float64_step() if float64 else contextlib.nullcontext()
    with ctx:
        return s.step(eps.clone(), t, x.clone(), variance_noise=noise).prev_sample


# ----------------------------------------------------------------------------
# fixed inputs (seeded numpy RNG, float64)
# ----------------------------------------------------------------------------
rng = np.random.default_rng(20250101)
x = torch.from_numpy(rng.standard_normal(SHAPE))
eps = torch.from_numpy(rng.standard_normal(SHAPE))
prev_x0 = torch.from_numpy(rng.standard_normal(SHAPE))


def fake_eps(sample, t):
    return 0.8 * torch.tanh(sample) + 0.3 * math.cos(t / 100) * eps


# ----------------------------------------------------------------------------
# 1. timesteps
# ----------------------------------------------------------------------------
timesteps = {}
for n in TIMESTEP_NS:
    ts = set_timesteps(scheduler(False), n, False)
    assert ts == set_timesteps(scheduler(True), n, True)
    assert len(set(ts)) == n, (n, ts)
    timesteps[str(n)] = ts


# ----------------------------------------------------------------------------
# 2. single steps
# ----------------------------------------------------------------------------
steps = []
for n in STEP_NS:
    for k in sorted({0, 1, n // 2, n - 2, n - 1}):
        if not 0 <= k < n:
            continue
        case = {"num_inference_steps": n, "index": k}
        for key, float64 in [("", True), ("_diffusers", False)]:
            s = scheduler(float64)
            ts = set_timesteps(s, n, float64)
            t = ts[k]
            s._step_index = k
            s.lower_order_nums = min(k, s.config.solver_order)
            s.model_outputs = [None, prev_x0.clone() if k > 0 else None]
            case.update({
                "t": t,
                "prev_t": ts[k + 1] if k + 1 < n else -1,
                "t_before": ts[k - 1] if k > 0 else None,
                "order": 1 if k == 0 or k == n - 1 else 2,
                "prev_sample" + key: flist(run_step(s, eps, t, x, float64)),
            })
        steps.append(case)


# ----------------------------------------------------------------------------
# 3. whole trajectories
# ----------------------------------------------------------------------------
def trajectory(n, clip):
    out = {"num_inference_steps": n, "clip": clip}
    for key, float64 in [("", True), ("_diffusers", False)]:
        s = scheduler(float64, clip)
        ts = set_timesteps(s, n, float64)
        sample = x.clone()
        samples = []
        for t in ts:
            sample = run_step(s, fake_eps(sample, t), t, sample, float64)
            samples.append(flist(sample))
        out["timesteps"] = ts
        out["samples" + key] = samples
    return out


# The SDE solver (algorithm_type="sde-dpmsolver++") with its noise given: step k adds
# noises[k] (drawn here, fed to step() as variance_noise).
def sde_trajectory(n, clip):
    out = {"num_inference_steps": n, "clip": clip}
    noise_rng = np.random.default_rng(20260101 + n)
    noises = [torch.from_numpy(noise_rng.standard_normal(SHAPE)) for _ in range(n)]
    for key, float64 in [("", True), ("_diffusers", False)]:
        s = scheduler(float64, clip, algorithm_type="sde-dpmsolver++")
        ts = set_timesteps(s, n, float64)
        sample = x.clone()
        samples = []
        for t, z in zip(ts, noises):
            sample = run_step(s, fake_eps(sample, t), t, sample, float64, z.clone())
            samples.append(flist(sample))
        out["timesteps"] = ts
        out["samples" + key] = samples
    out["noises"] = [flist(z) for z in noises]
    return out


sde_trajectories = {}
for n in [1, 2, 5, 10, 25]:
    sde_trajectories[f"plain_{n}"] = sde_trajectory(n, False)
for n in [5, 10]:
    sde_trajectories[f"clipped_{n}"] = sde_trajectory(n, True)

trajectories = {}
for n in TRAJECTORY_NS:
    trajectories[f"plain_{n}"] = trajectory(n, False)
for n in CLIPPED_NS:
    trajectories[f"clipped_{n}"] = trajectory(n, True)


# ----------------------------------------------------------------------------
# write
# ----------------------------------------------------------------------------
doc = {
    "description": "DPM-Solver++(2M) reference vectors from Hugging Face diffusers' DPMSolverMultistepScheduler (defaults); see make_dpmpp_vectors.py",
    "versions": {
        "diffusers": diffusers.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    },
    "notes": [
        "prev_sample / samples: diffusers' step() in float64 (tables, sigmas and sample); *_diffusers: the untouched float32 scheduler.",
        "prev_t = -1 is the last step, to sigma = 0 (alpha = 1): the result is x0_pred.",
        "A single step at index k > 0 uses prev_x0 as the previous step's x0_pred (the data prediction at t_before).",
        "fake eps(x, t) = 0.8 * tanh(x) + 0.3 * cos(t / 100) * inputs.eps, elementwise; trajectories start at x_T = inputs.x.",
        "clipped_*: thresholding=True with _threshold_sample replaced by clamp(x0_pred, -1, 1).",
        "sde_trajectories: algorithm_type='sde-dpmsolver++' (otherwise the same config), step k fed noises[k] as variance_noise.",
    ],
    "num_train_timesteps": T,
    "beta_start": BETA_START,
    "beta_end": BETA_END,
    # (JSON has no infinities: lambda_min_clipped = -inf is written as "-inf".)
    "config": {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v
               for k, v in scheduler(False).config.items() if not k.startswith("_")},
    "inputs": {
        "shape": list(SHAPE),
        "rng": "numpy.random.default_rng(20250101).standard_normal, drawn in order x, eps, prev_x0",
        "x": flist(x),
        "eps": flist(eps),
        "prev_x0": flist(prev_x0),
    },
    "timesteps": timesteps,
    "steps": steps,
    "trajectories": trajectories,
    "sde_trajectories": sde_trajectories,
}


def dump_json(obj, path):
    """Indented JSON, but with every list of plain numbers kept on one line."""
    text = json.dumps(obj, indent=1)
    text = re.sub(r"\[\s*([-0-9.eE+,\s]+?)\s*\]",
                  lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]", text)
    json.loads(text, parse_constant=lambda c: 1 / 0)  # sanity: still valid, strict JSON
    with open(path, "w") as f:
        f.write(text + "\n")


dump_json(doc, OUT)
print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)")
for name, run in trajectories.items():
    a = np.array(run["samples"][-1])
    b = np.array(run["samples_diffusers"][-1])
    print(f"{name}: final |f64 - f32 diffusers| max {np.abs(a - b).max():.3e}")
