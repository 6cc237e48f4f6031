#!/usr/bin/env python3
"""Generate `clipped_vectors.json`: single DDPM and DDIM steps with `clip_sample=True`
(x̂₀ clamped to [-1, 1]), taken from Hugging Face diffusers, for the default
`clip_denoised` path of our samplers.

Same set-up as make_scheduler_vectors.py (read its header to build the venv):

    /tmp/diffusers-venv/bin/python crates/ddpm-core/tests/reference/make_clipped_vectors.py

The schedulers' tables are replaced by float64 ones and the inputs are float64, so the
numbers are diffusers' own step() code in double precision. x and ε are standard normal
(seeded), so at high t nearly every pixel of x̂₀ clamps and at low t few do.
"""

import contextlib
import json
import os
import platform

import diffusers
import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler
import diffusers.schedulers.scheduling_ddpm as ddpm_mod

T, SHAPE = 1000, (2, 3, 4, 4)
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clipped_vectors.json")


def f64_tables(sched):
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    sched.betas = betas
    sched.alphas = 1.0 - betas
    sched.alphas_cumprod = torch.cumprod(sched.alphas, dim=0)
    sched.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(sched, "final_alpha_cumprod"):
        sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return sched


@contextlib.contextmanager
def fixed_noise(z):
    orig = ddpm_mod.randn_tensor
    ddpm_mod.randn_tensor = lambda shape, **kw: z.clone()
    try:
        yield
    finally:
        ddpm_mod.randn_tensor = orig


rng = np.random.default_rng(20261130)
x = torch.from_numpy(rng.standard_normal(SHAPE))
eps = torch.from_numpy(rng.standard_normal(SHAPE))
z = torch.from_numpy(rng.standard_normal(SHAPE))

cases = []
for n, t in [(None, 999), (None, 500), (None, 10), (50, 980), (50, 20)]:
    sched = f64_tables(DDPMScheduler(num_train_timesteps=T, beta_schedule="linear",
                                     clip_sample=True, variance_type="fixed_small"))
    if n is not None:
        sched.set_timesteps(n)
    prev_t = int(sched.previous_timestep(t))
    with fixed_noise(z):
        res = sched.step(eps.clone(), t, x.clone())
    cases.append({"sampler": "ddpm", "t": t, "prev_t": prev_t, "eta": None,
                  "prev_sample": res.prev_sample.flatten().tolist()})
for n, t in [(50, 980), (50, 500), (50, 20), (50, 0)]:
    for eta in [0.0, 1.0]:
        sched = f64_tables(DDIMScheduler(num_train_timesteps=T, beta_schedule="linear",
                                         clip_sample=True, set_alpha_to_one=True,
                                         steps_offset=0))
        sched.set_timesteps(n)
        res = sched.step(eps.clone(), t, x.clone(), eta=eta,
                         variance_noise=z.clone() if eta > 0 else None)
        cases.append({"sampler": "ddim", "t": t, "prev_t": t - T // n, "eta": eta,
                      "prev_sample": res.prev_sample.flatten().tolist()})

doc = {
    "description": "clip_sample=True steps from diffusers (float64 tables); see make_clipped_vectors.py",
    "versions": {"diffusers": diffusers.__version__, "torch": torch.__version__,
                 "numpy": np.__version__, "python": platform.python_version()},
    "shape": list(SHAPE),
    "x": x.flatten().tolist(), "eps": eps.flatten().tolist(), "z": z.flatten().tolist(),
    "cases": cases,
}
with open(OUT, "w") as f:
    json.dump(doc, f, indent=1)
print(f"wrote {len(cases)} cases to {OUT}")
