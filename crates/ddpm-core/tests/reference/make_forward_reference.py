#!/usr/bin/env python3
"""Numeric forward-pass reference for the generalised UNet at the tiny config.

Writes (next to this script):

* `tiny_config.json`                     -- the tiny config (ddpm-core JSON field names)
* `tiny_state_dict.json`                 -- {"total_parameters", "state_dict": [[name, shape], ...]}
* `tiny_forward.safetensors`             -- every parameter under its state-dict name, plus
                                            `input.x` f32 [4,3,16,16], `input.t` i64 [4],
                                            `input.y` i64 [4] (3 = null label), `output.eps` f32 [4,3,16,16]
* `tiny_forward_intermediates.safetensors` -- `intermediate.<block>` f32 outputs of every block
                                            (temb, inc, down*, sa*, bot*, up*, outc) for debugging

Parameter precision: so that the file stays below 1 MB (the tiny model has
359,683 parameters = 1.44 MB in float32) the perturbed parameters are rounded to
float16-representable values *before* the forward pass and stored as F16.  The
forward itself runs in float32 on exactly those values, so loading them and
casting to float32 (tch's `copy_` into a float32 VarStore does this) reproduces
the reference exactly.  Pass `--param-dtype f32` to store full float32 instead.

Also checked here (asserts):
* the seed preset reproduces UNet_conditional's parameter names/shapes;
* the general model with the seed preset, loaded with UNet_conditional's weights
  (label_emb gets an extra null row), gives the seed's forward output;
* the three attention implementations ("mha", "mha_noweights", "sdpa") agree.

Regenerate (from the repository root; needs torch + safetensors, which the
/tmp diffusers venv has -- see make_scheduler_vectors.py for its setup):

    /tmp/diffusers-venv/bin/python crates/ddpm-core/tests/reference/make_forward_reference.py
"""

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from count_seed_params import dump_json as dump_state_dict_json  # noqa: E402
from count_seed_params import state_dict_json  # noqa: E402
from general_unet import (  # noqa: E402
    ATTENTION_IMPLS,
    SEED_CONFIG,
    TINY_CONFIG,
    GeneralUNet,
    assert_seed_preset_matches_seed,
)
from seed_unet import UNet_conditional  # noqa: E402


def perturb_(model, gen, param_dtype):
    """Move every parameter away from its default init with seeded noise.

    Tensors that are constant at init (GroupNorm/LayerNorm weight = 1, their
    biases = 0, MHA in/out-proj biases = 0) get +0.2*N(0,1); the others get
    +0.25*std(p)*N(0,1).  Finally values are rounded to `param_dtype`.
    """
    with torch.no_grad():
        for _name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            std = float(p.std()) if p.numel() > 1 else 0.0
            if std == 0.0:
                p.add_(0.2 * noise)
            else:
                p.add_(0.25 * std * noise)
            p.copy_(p.to(param_dtype).to(torch.float32))


def check_seed_equivalence():
    """General model (seed preset) with the seed's weights == seed model."""
    g = torch.Generator().manual_seed(1)
    seed = UNet_conditional(num_classes=10).eval()
    gen = GeneralUNet(SEED_CONFIG).eval()
    sd = seed.state_dict()
    null_row = torch.randn(1, sd["label_emb.weight"].shape[1], generator=g)
    sd["label_emb.weight"] = torch.cat([sd["label_emb.weight"], null_row], 0)
    gen.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 64, 64, generator=g)
    t = torch.tensor([3, 900])
    y = torch.tensor([0, 9])
    with torch.no_grad():
        a = seed(x, t, y)
        b = gen(x, t, y)
    d = (a - b).abs().max().item()
    assert d < 1e-5, d
    return d


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--param-dtype", choices=["f16", "f32"], default="f16")
    ap.add_argument("--skip-seed-check", action="store_true",
                    help="skip the (slower, ~seconds) seed-vs-general forward comparison")
    args = ap.parse_args()
    param_dtype = torch.float16 if args.param_dtype == "f16" else torch.float32

    torch.set_num_threads(min(2, torch.get_num_threads()))
    n = assert_seed_preset_matches_seed()
    print(f"seed preset names/shapes match UNet_conditional ({n} tensors)")
    if not args.skip_seed_check:
        print(f"seed preset forward == UNet_conditional forward (max |diff| {check_seed_equivalence():.2e})")

    cfg = TINY_CONFIG
    torch.manual_seed(0)
    model = GeneralUNet(cfg, attention_impl="mha")
    gen = torch.Generator().manual_seed(0)
    perturb_(model, gen, param_dtype)
    model.eval()

    x = torch.randn(4, 3, 16, 16, generator=gen, dtype=torch.float32)
    t = torch.tensor([0, 17, 500, 999], dtype=torch.int64)
    y = torch.tensor([0, 1, 2, 3], dtype=torch.int64)  # 3 == num_classes == null label

    inter = {}
    with torch.no_grad():
        eps = model(x, t, y, intermediates=inter)
        for impl in ATTENTION_IMPLS:
            model.set_attention_impl(impl)
            d = (model(x, t, y) - eps).abs().max().item()
            print(f"attention impl {impl!r}: max |diff| vs 'mha' = {d:.2e}")
            assert d < 1e-5, (impl, d)
        model.set_attention_impl("mha")
        # float64 forward on the same weights: how far is f32 from "exact"?
        m64 = GeneralUNet(cfg).double().eval()
        m64.load_state_dict(model.state_dict())
        eps64 = m64(x.double(), t, y)
        print(f"f32 vs f64 forward: max |diff| = {(eps.double() - eps64).abs().max().item():.2e}")
    print(f"output.eps: mean {eps.mean().item():.4f} std {eps.std().item():.4f} "
          f"absmax {eps.abs().max().item():.4f}")

    tensors = {name: p.detach().to(param_dtype).contiguous() for name, p in model.named_parameters()}
    tensors["input.x"] = x.contiguous()
    tensors["input.t"] = t.contiguous()
    tensors["input.y"] = y.contiguous()
    tensors["output.eps"] = eps.contiguous()
    meta = {
        "config": json.dumps(cfg),
        "param_dtype": args.param_dtype,
        "forward_dtype": "float32",
        "attention": "nn.MultiheadAttention (seed call)",
        "torch_version": torch.__version__,
        "note": "parameters are exactly representable in param_dtype; cast to f32 before use",
    }
    out = os.path.join(HERE, "tiny_forward.safetensors")
    # a single metadata key keeps the file byte-reproducible (safetensors does not
    # order multiple metadata keys deterministically)
    save_file(tensors, out, metadata={"reference": json.dumps(meta, sort_keys=True)})
    inter_t = {f"intermediate.{k}": v.contiguous() for k, v in inter.items()}
    out_i = os.path.join(HERE, "tiny_forward_intermediates.safetensors")
    save_file(inter_t, out_i, metadata={"reference": json.dumps(
        {"config": json.dumps(cfg), "torch_version": torch.__version__}, sort_keys=True)})

    with open(os.path.join(HERE, "tiny_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    sd = state_dict_json(model)
    dump_state_dict_json(sd, os.path.join(HERE, "tiny_state_dict.json"))

    for p in [out, out_i]:
        print(f"wrote {p} ({os.path.getsize(p)} bytes)")
    print(f"tiny model: {len(sd['state_dict'])} tensors, {sd['total_parameters']} parameters")


if __name__ == "__main__":
    main()
