//! The seed's convolutional blocks. Variable paths mirror the seed's PyTorch state-dict
//! names (`double_conv.0.weight`, `maxpool_conv.1…`, `emb_layer.1…`) so weights compare
//! one to one with the PyTorch model.

use tch::{nn, Tensor};

use super::init;

/// conv3×3 → GroupNorm(1) → GELU → conv3×3 → GroupNorm(1), with an optional residual
/// (then `gelu(x + f(x))`).
#[derive(Debug)]
pub struct DoubleConv {
    conv1: nn::Conv2D,
    norm1: nn::GroupNorm,
    conv2: nn::Conv2D,
    norm2: nn::GroupNorm,
    residual: bool,
}

impl DoubleConv {
    pub fn new(vs: nn::Path, in_ch: i64, out_ch: i64, mid_ch: Option<i64>, residual: bool) -> Self {
        let mid = mid_ch.unwrap_or(out_ch);
        let vs = vs / "double_conv";
        DoubleConv {
            conv1: init::conv2d(&vs / 0, in_ch, mid, 3, 1, false),
            norm1: init::group_norm(&vs / 1, 1, mid),
            conv2: init::conv2d(&vs / 3, mid, out_ch, 3, 1, false),
            norm2: init::group_norm(&vs / 4, 1, out_ch),
            residual,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let h = x
            .apply(&self.conv1)
            .apply(&self.norm1)
            .gelu("none")
            .apply(&self.conv2)
            .apply(&self.norm2);
        if self.residual {
            (x + h).gelu("none")
        } else {
            h
        }
    }
}

/// SiLU → Linear: projects the time (+ label) embedding to a block's channels.
#[derive(Debug)]
struct EmbeddingProjection {
    linear: nn::Linear,
}

impl EmbeddingProjection {
    fn new(vs: nn::Path, emb_dim: i64, out_ch: i64) -> Self {
        EmbeddingProjection {
            linear: init::linear(vs / "emb_layer" / 1, emb_dim, out_ch),
        }
    }

    /// `[B, E]` → `[B, C, 1, 1]`, broadcast over the feature map (the seed materialises it
    /// with `repeat`; broadcasting is the same sum without the copy).
    fn forward(&self, emb: &Tensor) -> Tensor {
        emb.silu().apply(&self.linear).unsqueeze(-1).unsqueeze(-1)
    }
}

/// MaxPool 2 → DoubleConv(in, in, residual) → DoubleConv(in, out), plus the embedding.
#[derive(Debug)]
pub struct Down {
    conv1: DoubleConv,
    conv2: DoubleConv,
    emb: EmbeddingProjection,
}

impl Down {
    pub fn new(vs: nn::Path, in_ch: i64, out_ch: i64, emb_dim: i64) -> Self {
        let seq = &vs / "maxpool_conv";
        Down {
            conv1: DoubleConv::new(&seq / 1, in_ch, in_ch, None, true),
            conv2: DoubleConv::new(&seq / 2, in_ch, out_ch, None, false),
            emb: EmbeddingProjection::new(vs, emb_dim, out_ch),
        }
    }

    /// `x: [B, in, H, W]`, `emb: [B, E]` → `[B, out, H/2, W/2]`.
    pub fn forward(&self, x: &Tensor, emb: &Tensor) -> Tensor {
        let h = x.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false);
        let h = self.conv2.forward(&self.conv1.forward(&h));
        h + self.emb.forward(emb)
    }
}

/// Bilinear ×2 (align_corners) → concat the skip → DoubleConv(in, in, residual) →
/// DoubleConv(in, out, mid = in/2), plus the embedding.
#[derive(Debug)]
pub struct Up {
    conv1: DoubleConv,
    conv2: DoubleConv,
    emb: EmbeddingProjection,
}

impl Up {
    pub fn new(vs: nn::Path, in_ch: i64, out_ch: i64, emb_dim: i64) -> Self {
        let seq = &vs / "conv";
        Up {
            conv1: DoubleConv::new(&seq / 0, in_ch, in_ch, None, true),
            conv2: DoubleConv::new(&seq / 1, in_ch, out_ch, Some(in_ch / 2), false),
            emb: EmbeddingProjection::new(vs, emb_dim, out_ch),
        }
    }

    /// `x: [B, Ch, H, W]`, `skip: [B, Cs, 2H, 2W]` → `[B, out, 2H, 2W]`.
    pub fn forward(&self, x: &Tensor, skip: &Tensor, emb: &Tensor) -> Tensor {
        let size = x.size();
        let (h, w) = (size[2], size[3]);
        let up = x.upsample_bilinear2d([h * 2, w * 2], true, None, None);
        let h = Tensor::cat(&[skip, &up], 1); // [B, Cs + Ch, 2H, 2W]
        let h = self.conv2.forward(&self.conv1.forward(&h));
        h + self.emb.forward(emb)
    }
}
