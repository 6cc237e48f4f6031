//! Layers initialised the way PyTorch's modules initialise themselves, which is part of
//! the seed: the same network learns much more slowly from tch's defaults.
//!
//! | layer | weight | bias |
//! | --- | --- | --- |
//! | `Conv2d`, `Linear` | kaiming-uniform with a = √5: U(±1/√fan_in) | U(±1/√fan_in) |
//! | attention `in_proj` | Xavier-uniform: U(±√(6 / (fan_in + fan_out))) | 0 |
//! | attention `out_proj` | as `Linear` | 0 |
//! | `Embedding` | N(0, 1) | – |
//! | `GroupNorm`, `LayerNorm` | 1 | 0 |
//!
//! fan_in is `in_features` for a linear layer and `in_channels · k · k` for a convolution.
//! tch's own default for `nn::linear` / `nn::conv2d` weights is kaiming-uniform with the
//! ReLU gain, U(±√(6/fan_in)): √6 ≈ 2.45× wider, and its convolution biases are 0.
//! Every block of the UNet builds its layers through these functions, never through
//! tch's defaults, so the rule lives in one place (and `tests/core/init.rs` compares the
//! result with PyTorch's per parameter).

use tch::nn::{self, Init};

/// PyTorch's `reset_parameters` bound for `Linear` and `Conv2d`, weights and biases alike:
/// kaiming-uniform with a = √5 gives gain √(2/(1+5)) and bound gain·√(3/fan_in) = 1/√fan_in.
fn fan_in_uniform(fan_in: i64) -> Init {
    let bound = 1.0 / (fan_in as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// Xavier (Glorot) uniform with gain 1, as `nn.MultiheadAttention` draws `in_proj_weight`.
pub fn xavier_uniform(fan_in: i64, fan_out: i64) -> Init {
    let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// `nn.Linear(in_dim, out_dim)`.
pub fn linear(vs: nn::Path, in_dim: i64, out_dim: i64) -> nn::Linear {
    nn::linear(
        vs,
        in_dim,
        out_dim,
        nn::LinearConfig {
            ws_init: fan_in_uniform(in_dim),
            bs_init: Some(fan_in_uniform(in_dim)),
            bias: true,
        },
    )
}

/// `nn.Linear` whose bias `nn.MultiheadAttention` zeroes (its `out_proj`).
pub fn linear_zero_bias(vs: nn::Path, in_dim: i64, out_dim: i64) -> nn::Linear {
    nn::linear(
        vs,
        in_dim,
        out_dim,
        nn::LinearConfig {
            ws_init: fan_in_uniform(in_dim),
            bs_init: Some(Init::Const(0.0)),
            bias: true,
        },
    )
}

/// `nn.Conv2d(in_ch, out_ch, kernel, padding=padding, bias=bias)`.
pub fn conv2d(
    vs: nn::Path,
    in_ch: i64,
    out_ch: i64,
    kernel: i64,
    padding: i64,
    bias: bool,
) -> nn::Conv2D {
    let fan_in = in_ch * kernel * kernel;
    nn::conv2d(
        vs,
        in_ch,
        out_ch,
        kernel,
        nn::ConvConfig {
            padding,
            bias,
            ws_init: fan_in_uniform(fan_in),
            bs_init: fan_in_uniform(fan_in),
            ..Default::default()
        },
    )
}

/// `nn.GroupNorm(groups, channels)`: weight 1, bias 0, ε 1e-5.
pub fn group_norm(vs: nn::Path, groups: i64, channels: i64) -> nn::GroupNorm {
    nn::group_norm(
        vs,
        groups,
        channels,
        nn::GroupNormConfig {
            eps: 1e-5,
            affine: true,
            ws_init: Init::Const(1.0),
            bs_init: Init::Const(0.0),
            ..Default::default()
        },
    )
}

/// `nn.LayerNorm([channels])`: weight 1, bias 0, ε 1e-5.
pub fn layer_norm(vs: nn::Path, channels: i64) -> nn::LayerNorm {
    nn::layer_norm(
        vs,
        vec![channels],
        nn::LayerNormConfig {
            eps: 1e-5,
            elementwise_affine: true,
            ws_init: Init::Const(1.0),
            bs_init: Init::Const(0.0),
            ..Default::default()
        },
    )
}

/// `nn.Embedding(rows, dim)`: N(0, 1).
pub fn embedding(vs: nn::Path, rows: i64, dim: i64) -> nn::Embedding {
    nn::embedding(
        vs,
        rows,
        dim,
        nn::EmbeddingConfig {
            ws_init: Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
            ..Default::default()
        },
    )
}
