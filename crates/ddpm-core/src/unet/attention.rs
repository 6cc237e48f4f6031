//! The seed's self-attention block: LayerNorm → multi-head attention → residual →
//! LayerNorm/Linear/GELU/Linear → residual, over the H·W positions of a feature map.
//!
//! The attention itself runs through libtorch's fused `scaled_dot_product_attention`
//! (flash / memory-efficient kernels on CUDA, a fused kernel on the CPU). Parameters are
//! laid out as `nn.MultiheadAttention`'s (`in_proj_weight [3C, C]`, `out_proj`), so the
//! seed's weights load unchanged.

use tch::{nn, Kind, Tensor};

use super::init;

#[derive(Debug)]
pub struct SelfAttention {
    channels: i64,
    heads: i64,
    in_proj_weight: Tensor,
    in_proj_bias: Tensor,
    out_proj: nn::Linear,
    ln: nn::LayerNorm,
    ff_ln: nn::LayerNorm,
    ff_1: nn::Linear,
    ff_2: nn::Linear,
}

impl SelfAttention {
    pub fn new(vs: nn::Path, channels: i64, heads: i64) -> Self {
        let mha = &vs / "mha";
        // nn.MultiheadAttention's initialisation: Xavier-uniform in_proj (fans of the
        // packed [3C, C] matrix), zero in_proj and out_proj biases.
        let in_proj_weight = mha.var(
            "in_proj_weight",
            &[3 * channels, channels],
            init::xavier_uniform(channels, 3 * channels),
        );
        let in_proj_bias = mha.var("in_proj_bias", &[3 * channels], nn::Init::Const(0.0));
        let out_proj = init::linear_zero_bias(&mha / "out_proj", channels, channels);
        let ln = init::layer_norm(&vs / "ln", channels);
        let ff = &vs / "ff_self";
        SelfAttention {
            channels,
            heads,
            in_proj_weight,
            in_proj_bias,
            out_proj,
            ln,
            ff_ln: init::layer_norm(&ff / 0, channels),
            ff_1: init::linear(&ff / 1, channels, channels),
            ff_2: init::linear(&ff / 3, channels, channels),
        }
    }

    /// `[B, C, H, W]` → `[B, C, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let size = x.size();
        let (b, c, h, w) = (size[0], size[1], size[2], size[3]);
        debug_assert_eq!(c, self.channels);
        let (len, head_dim) = (h * w, c / self.heads);
        let tokens = x.view([b, c, len]).transpose(1, 2); // [B, L, C]
        let normed = tokens.apply(&self.ln);
        let qkv = normed.linear(&self.in_proj_weight, Some(&self.in_proj_bias)); // [B, L, 3C]
        let qkv = qkv
            .view([b, len, 3, self.heads, head_dim])
            .permute([2, 0, 3, 1, 4]); // [3, B, heads, L, d]
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let attn = Tensor::scaled_dot_product_attention::<Tensor>(
            &q, &k, &v, None, 0.0, false, None, false,
        ); // [B, heads, L, d]
        let attn = attn
            .transpose(1, 2)
            .reshape([b, len, c])
            .apply(&self.out_proj);
        let h1 = attn + &tokens;
        let h2 = h1
            .apply(&self.ff_ln)
            .apply(&self.ff_1)
            .gelu("none")
            .apply(&self.ff_2)
            + &h1;
        h2.transpose(1, 2).reshape([b, c, h, w])
    }
}

/// The seed's sinusoidal timestep encoding: `[sin(t·f), cos(t·f)]` with
/// `f_i = 10000^(−2i/dim)`, `t: [B]` → `[B, dim]` (f32).
pub fn timestep_encoding(t: &Tensor, dim: i64) -> Tensor {
    let device = t.device();
    let half = dim / 2;
    let exponents = Tensor::arange_start_step(0, dim, 2, (Kind::Float, device)) / dim as f64;
    let inv_freq = Tensor::from(10000f64)
        .to_device(device)
        .pow(&exponents)
        .reciprocal(); // [dim/2]
    let args = t.to_kind(Kind::Float).unsqueeze(-1) * inv_freq.view([1, half]); // [B, dim/2]
    Tensor::cat(&[args.sin(), args.cos()], -1)
}
