"""The generalised conditional UNet that `ddpm-core` implements in Rust, written in
PyTorch as the numeric reference.

It is the seed's `UNet_conditional` (see `seed_unet.py`) with its widths, depth,
attention placement, head count, time-embedding width and class count taken
from a config (JSON field names exactly as below):

    {"image_size": 16, "in_channels": 3, "out_channels": 3, "base_channels": 16,
     "channel_mults": [1, 2, 2], "bottleneck_mult": 4,
     "attention_resolutions": [4, 8], "attention_heads": 4,
     "time_embedding_dim": 64, "num_classes": 3}

Layout (L = len(channel_mults), c[i] = base_channels * channel_mults[i]):

* ``inc = DoubleConv(in_channels, c[0])``                      (level 0, res S)
* for i in 1..L-1: ``down{i} = Down(c[i-1], c[i])``           (level i, res S / 2^i)
  followed by ``sa{i} = SelfAttention(c[i])`` if S / 2^i is in attention_resolutions
* ``bot1 = DoubleConv(c[L-1], b)``, ``bot2 = DoubleConv(b, b)``, ``bot3 = DoubleConv(b, c[L-1])``
  with b = base_channels * bottleneck_mult
* for j in 1..L-1: level k = L-1-j, ``up{j} = Up(h + c[k], c[k-1] if k >= 1 else c[0])``
  where h is the width of the previous output (c[L-1] for up1) and the skip is
  the level-k feature (inc output for k = 0); followed by
  ``sa{(L-1)+j} = SelfAttention(...)`` if S / 2^k is in attention_resolutions
* ``outc = Conv2d(c[0], out_channels, 1)``
* ``label_emb = Embedding(num_classes + 1, time_embedding_dim)`` if num_classes is
  set; row ``num_classes`` is the learned null label (classifier-free guidance).
  The label embedding is always added when the model is conditional; ``y = None``
  is treated as "all null labels".

With the seed preset the parameter names and shapes are exactly the seed's,
except that ``label_emb.weight`` has one extra (null) row.

Attention has two interchangeable implementations over the *same parameters*
(``sa*.mha.in_proj_weight`` etc. of an ``nn.MultiheadAttention``):
``"mha"`` calls the module exactly as the seed does (``need_weights`` left at
its default True, which makes PyTorch also compute the head-averaged attention
matrix), ``"mha_noweights"`` calls it with ``need_weights=False`` (lets PyTorch
use its SDPA path internally) and ``"sdpa"`` does in_proj ->
``F.scaled_dot_product_attention`` -> out_proj by hand.  All three give the
same output up to float rounding.

Only torch is needed (no numpy), so this imports from the project's torch venv.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

TINY_CONFIG = {
    "image_size": 16,
    "in_channels": 3,
    "out_channels": 3,
    "base_channels": 16,
    "channel_mults": [1, 2, 2],
    "bottleneck_mult": 4,
    "attention_resolutions": [4, 8],
    "attention_heads": 4,
    "time_embedding_dim": 64,
    "num_classes": 3,
}

SEED_CONFIG = {
    "image_size": 64,
    "in_channels": 3,
    "out_channels": 3,
    "base_channels": 64,
    "channel_mults": [1, 2, 4, 4],
    "bottleneck_mult": 8,
    "attention_resolutions": [8, 16, 32, 64],
    "attention_heads": 4,
    "time_embedding_dim": 256,
    "num_classes": 10,
}

PRESETS = {"tiny": TINY_CONFIG, "seed": SEED_CONFIG}
ATTENTION_IMPLS = ("mha", "mha_noweights", "sdpa")


class SelfAttention(nn.Module):
    """Seed attention block: pre-LN MHA + residual, then LN-MLP + residual.

    `impl` is "mha" (nn.MultiheadAttention.forward called as in the seed),
    "mha_noweights" (same, need_weights=False) or "sdpa" (manual projections
    around F.scaled_dot_product_attention).  Both use the
    same parameters, so state dicts are interchangeable.
    """

    def __init__(self, channels, size, heads=4, impl="mha"):
        super().__init__()
        assert channels % heads == 0, (channels, heads)
        self.channels = channels
        self.size = size
        self.heads = heads
        self.impl = impl
        self.mha = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.ln = nn.LayerNorm([channels])
        self.ff_self = nn.Sequential(
            nn.LayerNorm([channels]),
            nn.Linear(channels, channels),
            nn.GELU(),
            nn.Linear(channels, channels),
        )

    def _attend(self, x_ln):
        if self.impl == "mha":
            a, _ = self.mha(x_ln, x_ln, x_ln)
            return a
        if self.impl == "mha_noweights":
            a, _ = self.mha(x_ln, x_ln, x_ln, need_weights=False)
            return a
        if self.impl == "sdpa":
            b, n, c = x_ln.shape
            h = self.heads
            # packed in_proj rows are [q; k; v], exactly as nn.MultiheadAttention
            qkv = F.linear(x_ln, self.mha.in_proj_weight, self.mha.in_proj_bias)
            q, k, v = qkv.view(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, d]
            o = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(d), no mask, no dropout
            o = o.transpose(1, 2).reshape(b, n, c)
            return F.linear(o, self.mha.out_proj.weight, self.mha.out_proj.bias)
        raise ValueError(f"unknown attention impl {self.impl!r}")

    def forward(self, x):
        b, c, hh, ww = x.shape
        x = x.reshape(b, c, hh * ww).swapaxes(1, 2)  # [B, N, C]
        x_ln = self.ln(x)
        a = self._attend(x_ln) + x
        a = self.ff_self(a) + a
        return a.swapaxes(2, 1).reshape(b, c, hh, ww)


class DoubleConv(nn.Module):
    def __init__(self, in_channels, out_channels, mid_channels=None, residual=False):
        super().__init__()
        self.residual = residual
        if not mid_channels:
            mid_channels = out_channels
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(1, mid_channels),
            nn.GELU(),
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(1, out_channels),
        )

    def forward(self, x):
        if self.residual:
            return F.gelu(x + self.double_conv(x))
        return self.double_conv(x)


class Down(nn.Module):
    def __init__(self, in_channels, out_channels, emb_dim):
        super().__init__()
        self.maxpool_conv = nn.Sequential(
            nn.MaxPool2d(2),
            DoubleConv(in_channels, in_channels, residual=True),
            DoubleConv(in_channels, out_channels),
        )
        self.emb_layer = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))

    def forward(self, x, t):
        x = self.maxpool_conv(x)
        # broadcasting add == the seed's .repeat(1, 1, H, W) add
        return x + self.emb_layer(t)[:, :, None, None]


class Up(nn.Module):
    def __init__(self, in_channels, out_channels, emb_dim):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv = nn.Sequential(
            DoubleConv(in_channels, in_channels, residual=True),
            DoubleConv(in_channels, out_channels, in_channels // 2),
        )
        self.emb_layer = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))

    def forward(self, x, skip_x, t):
        x = self.up(x)
        x = torch.cat([skip_x, x], dim=1)
        x = self.conv(x)
        return x + self.emb_layer(t)[:, :, None, None]


def layout(cfg):
    """The block plan for a config: a dict with the down and up blocks.

    down: list of (name, in_ch, out_ch, res, attn_name or None)
    up:   list of (name, in_ch, out_ch, res, skip_level, attn_name or None)
    """
    s = cfg["image_size"]
    mults = cfg["channel_mults"]
    L = len(mults)
    assert L >= 2, "need at least one down level"
    assert s % (2 ** (L - 1)) == 0, "image_size must be divisible by 2^(L-1)"
    c = [cfg["base_channels"] * m for m in mults]
    attn = set(cfg["attention_resolutions"])
    down = []
    for i in range(1, L):
        res = s // 2 ** i
        down.append((f"down{i}", c[i - 1], c[i], res, f"sa{i}" if res in attn else None))
    up = []
    h = c[L - 1]
    for j in range(1, L):
        k = L - 1 - j  # level (resolution index) this up block outputs at
        res = s // 2 ** k
        out = c[k - 1] if k >= 1 else c[0]
        up.append((f"up{j}", h + c[k], out, res, k, f"sa{L - 1 + j}" if res in attn else None))
        h = out
    return {"c": c, "bottleneck": cfg["base_channels"] * cfg["bottleneck_mult"], "down": down, "up": up}


class GeneralUNet(nn.Module):
    def __init__(self, cfg, attention_impl="mha"):
        super().__init__()
        self.cfg = dict(cfg)
        self.time_dim = cfg["time_embedding_dim"]
        self.num_classes = cfg.get("num_classes")
        heads = cfg["attention_heads"]
        emb = self.time_dim
        plan = layout(cfg)
        c = plan["c"]
        b = plan["bottleneck"]
        self.plan = plan

        # Registration order defines state-dict order; it mirrors the seed:
        # inc, (down_i, sa_i)*, bot1..3, (up_j, sa_j)*, outc, label_emb.
        self.inc = DoubleConv(cfg["in_channels"], c[0])
        for name, cin, cout, res, sa in plan["down"]:
            setattr(self, name, Down(cin, cout, emb))
            if sa:
                setattr(self, sa, SelfAttention(cout, res, heads, attention_impl))
        self.bot1 = DoubleConv(c[-1], b)
        self.bot2 = DoubleConv(b, b)
        self.bot3 = DoubleConv(b, c[-1])
        for name, cin, cout, res, _k, sa in plan["up"]:
            setattr(self, name, Up(cin, cout, emb))
            if sa:
                setattr(self, sa, SelfAttention(cout, res, heads, attention_impl))
        self.outc = nn.Conv2d(c[0], cfg["out_channels"], kernel_size=1)
        if self.num_classes is not None:
            self.label_emb = nn.Embedding(self.num_classes + 1, self.time_dim)

    def set_attention_impl(self, impl):
        for m in self.modules():
            if isinstance(m, SelfAttention):
                m.impl = impl

    @staticmethod
    def pos_encoding(t, channels):
        # t: [B, 1] float32 -> [B, channels] = [sin(t * f_0..f_{C/2-1}), cos(...)]
        inv_freq = 1.0 / (10000 ** (torch.arange(0, channels, 2, device=t.device).float() / channels))
        arg = t.repeat(1, channels // 2) * inv_freq
        return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)

    def time_embedding(self, t, y):
        temb = self.pos_encoding(t.unsqueeze(-1).float(), self.time_dim)
        if self.num_classes is not None:
            if y is None:
                y = torch.full(t.shape, self.num_classes, dtype=torch.long, device=t.device)
            temb = temb + self.label_emb(y)
        return temb

    def forward(self, x, t, y=None, intermediates=None):
        """x [B, C, S, S] float, t [B] int64 timesteps, y [B] int64 labels
        (num_classes = null) or None.  If `intermediates` is a dict, block
        outputs are stored in it under their module names (and "temb")."""

        def keep(name, v):
            if intermediates is not None:
                intermediates[name] = v
            return v

        temb = keep("temb", self.time_embedding(t, y))
        feats = [keep("inc", self.inc(x))]  # level 0
        h = feats[0]
        for name, _cin, _cout, _res, sa in self.plan["down"]:
            h = keep(name, getattr(self, name)(h, temb))
            if sa:
                h = keep(sa, getattr(self, sa)(h))
            feats.append(h)
        h = keep("bot1", self.bot1(h))
        h = keep("bot2", self.bot2(h))
        h = keep("bot3", self.bot3(h))
        for name, _cin, _cout, _res, k, sa in self.plan["up"]:
            h = keep(name, getattr(self, name)(h, feats[k], temb))
            if sa:
                h = keep(sa, getattr(self, sa)(h))
        return keep("outc", self.outc(h))


def state_dict_shapes(model):
    return [[n, list(p.shape)] for n, p in model.named_parameters()]


def assert_seed_preset_matches_seed():
    """The seed preset must reproduce UNet_conditional(num_classes=10) exactly
    (names, order, shapes), except label_emb.weight's extra null row."""
    from seed_unet import UNet_conditional

    seed = state_dict_shapes(UNet_conditional(num_classes=SEED_CONFIG["num_classes"]))
    gen = state_dict_shapes(GeneralUNet(SEED_CONFIG))
    assert [n for n, _ in seed] == [n for n, _ in gen], "parameter names/order differ from the seed"
    for (n, s_seed), (_, s_gen) in zip(seed, gen):
        if n == "label_emb.weight":
            assert s_gen == [s_seed[0] + 1, s_seed[1]], (n, s_seed, s_gen)
        else:
            assert s_seed == s_gen, (n, s_seed, s_gen)
    # and the unconditional variant has no label_emb at all
    unc = dict(SEED_CONFIG, num_classes=None)
    assert state_dict_shapes(GeneralUNet(unc)) == [e for e in gen if e[0] != "label_emb.weight"]
    return len(gen)


if __name__ == "__main__":
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    n = assert_seed_preset_matches_seed()
    print(f"seed preset matches UNet_conditional: {n} tensors (label_emb has +1 null row)")
    for name, cfg in PRESETS.items():
        m = GeneralUNet(cfg)
        total = sum(p.numel() for p in m.parameters())
        print(name, "params", total, "plan", layout(cfg))
