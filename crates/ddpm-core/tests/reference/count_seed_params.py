#!/usr/bin/env python3
"""Write `seed_unet_state_dict.json`: the parameter count and the ordered list of
(name, shape) of the seed `UNet_conditional(num_classes=10)`.

Only `named_parameters()` are listed (the seed model has no buffers anyway).

Regenerate (from the repository root):

    /root/.cache/ddpm/torch-2.11.0/bin/python crates/ddpm-core/tests/reference/count_seed_params.py
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

from seed_unet import UNet_conditional  # noqa: E402


def state_dict_json(model):
    """{"total_parameters": N, "state_dict": [[name, [shape...]], ...]} in named_parameters order."""
    entries = [[name, list(p.shape)] for name, p in model.named_parameters()]
    total = sum(p.numel() for p in model.parameters())
    return {"total_parameters": total, "state_dict": entries}


def dump_json(obj, path):
    """One state-dict entry per line (compact but diff-friendly)."""
    lines = ["{", f' "total_parameters": {obj["total_parameters"]},', ' "state_dict": [']
    sd = obj["state_dict"]
    for i, e in enumerate(sd):
        lines.append("  " + json.dumps(e) + ("," if i + 1 < len(sd) else ""))
    lines += [" ]", "}"]
    text = "\n".join(lines) + "\n"
    assert json.loads(text) == obj
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    torch.manual_seed(0)
    model = UNet_conditional(num_classes=10)
    assert len(list(model.buffers())) == 0
    doc = state_dict_json(model)
    out = os.path.join(HERE, "seed_unet_state_dict.json")
    dump_json(doc, out)
    print(f"wrote {out}: {len(doc['state_dict'])} tensors, {doc['total_parameters']} parameters")
