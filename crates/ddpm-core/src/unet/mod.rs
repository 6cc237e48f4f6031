//! The noise-prediction network ε_θ(x_t, t, y): the seed's conditional UNet, generalised.
//!
//! Layout:
//! - `config`: [`UNetConfig`], its presets (`seed`, `tiny`) and validation;
//! - `blocks`: `DoubleConv`, `Down`, `Up` (the seed's convolutional blocks);
//! - `attention`: the self-attention block and the sinusoidal timestep encoding;
//! - `init`: every layer built with PyTorch's initialisation (the seed's).
//!
//! Variable names follow the seed's PyTorch state dict (`inc`, `down1`, `sa1`, …, `bot1`,
//! `up1`, …, `outc`, `label_emb`), so a test compares names and shapes with the PyTorch
//! model and a numeric test loads PyTorch weights and compares outputs.

mod attention;
mod blocks;
mod config;
mod init;

pub use attention::timestep_encoding;
pub use config::UNetConfig;

use tch::{nn, Device, Kind, Tensor};

use crate::error::{CoreError, Result};
use attention::SelfAttention;
use blocks::{DoubleConv, Down, Up};

/// The network's modules; its variables live in the `VarStore` of the [`Model`] that
/// built it.
#[derive(Debug)]
pub struct UNet {
    config: UNetConfig,
    inc: DoubleConv,
    downs: Vec<(Down, Option<SelfAttention>)>,
    bottleneck: [DoubleConv; 3],
    ups: Vec<(Up, Option<SelfAttention>)>,
    outc: nn::Conv2D,
    /// `[num_classes + 1, time_embedding_dim]`; the last row is the null label.
    label_emb: Option<nn::Embedding>,
}

impl UNet {
    pub fn new(vs: &nn::Path, config: &UNetConfig) -> Result<Self> {
        config.validate()?;
        let plan = config.plan();
        let c = config.level_channels();
        let emb = config.time_embedding_dim;
        let heads = config.attention_heads;
        let levels = c.len();
        let downs = plan
            .downs
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let down = Down::new(
                    vs / format!("down{}", i + 1),
                    b.in_channels,
                    b.out_channels,
                    emb,
                );
                let sa = b.attention.then(|| {
                    SelfAttention::new(vs / format!("sa{}", i + 1), b.out_channels, heads)
                });
                (down, sa)
            })
            .collect();
        let ups = plan
            .ups
            .iter()
            .enumerate()
            .map(|(j, b)| {
                let up = Up::new(
                    vs / format!("up{}", j + 1),
                    b.in_channels,
                    b.out_channels,
                    emb,
                );
                // The seed numbers its attention blocks on from the down path's: sa4, sa5, sa6.
                let sa = b.attention.then(|| {
                    SelfAttention::new(vs / format!("sa{}", levels + j), b.out_channels, heads)
                });
                (up, sa)
            })
            .collect();
        let deepest = c[levels - 1];
        let bottleneck = [
            DoubleConv::new(vs / "bot1", deepest, plan.bottleneck, None, false),
            DoubleConv::new(vs / "bot2", plan.bottleneck, plan.bottleneck, None, false),
            DoubleConv::new(vs / "bot3", plan.bottleneck, deepest, None, false),
        ];
        let label_emb = config
            .num_classes
            .map(|n| init::embedding(vs / "label_emb", n + 1, emb));
        Ok(UNet {
            config: config.clone(),
            inc: DoubleConv::new(vs / "inc", config.in_channels, c[0], None, false),
            downs,
            bottleneck,
            ups,
            outc: init::conv2d(vs / "outc", c[0], config.out_channels, 1, 0, true),
            label_emb,
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Predicts ε for `x: [B, C, H, W]` at timesteps `t: [B]` (int64) with class labels
    /// `labels: [B]` (int64; the null label `num_classes` for "no class"). A conditional
    /// model given no labels treats every sample as unconditional; an unconditional model
    /// ignores them.
    pub fn forward(&self, x: &Tensor, t: &Tensor, labels: Option<&Tensor>) -> Tensor {
        let mut emb = timestep_encoding(t, self.config.time_embedding_dim); // [B, E]
        if let Some(label_emb) = &self.label_emb {
            let null;
            let labels = match labels {
                Some(l) => l,
                None => {
                    let n = self.config.num_classes.unwrap_or(0);
                    null = Tensor::full([x.size()[0]], n, (Kind::Int64, x.device()));
                    &null
                }
            };
            emb += labels.apply(label_emb);
        }
        let mut h = self.inc.forward(x);
        let mut skips = vec![h.shallow_clone()];
        for (down, sa) in &self.downs {
            h = down.forward(&h, &emb);
            if let Some(sa) = sa {
                h = sa.forward(&h);
            }
            skips.push(h.shallow_clone());
        }
        for block in &self.bottleneck {
            h = block.forward(&h);
        }
        let levels = skips.len();
        for (j, (up, sa)) in self.ups.iter().enumerate() {
            // Up j+1 takes the skip of level (levels − 2 − j): x3, x2, x1 in the seed.
            h = up.forward(&h, &skips[levels - 2 - j], &emb);
            if let Some(sa) = sa {
                h = sa.forward(&h);
            }
        }
        h.apply(&self.outc)
    }
}

/// A UNet together with the variables it owns, on one device.
#[derive(Debug)]
pub struct Model {
    pub vs: nn::VarStore,
    pub net: UNet,
}

impl Model {
    /// A freshly initialised network on `device`.
    pub fn new(config: &UNetConfig, device: Device) -> Result<Self> {
        let vs = nn::VarStore::new(device);
        let net = UNet::new(&vs.root(), config)?;
        Ok(Model { vs, net })
    }

    pub fn config(&self) -> &UNetConfig {
        self.net.config()
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// The number of scalar parameters.
    pub fn parameter_count(&self) -> i64 {
        self.vs
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum()
    }

    /// Variables sorted by name: a stable order for flattening and serialisation.
    pub fn named_variables(&self) -> Vec<(String, Tensor)> {
        let mut vars: Vec<_> = self.vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    /// [`UNet::forward`] with the shapes checked first, for inputs that come from outside.
    pub fn forward_checked(
        &self,
        x: &Tensor,
        t: &Tensor,
        labels: Option<&Tensor>,
    ) -> Result<Tensor> {
        let cfg = self.config();
        let size = x.size();
        let expected = [cfg.in_channels, cfg.image_size, cfg.image_size];
        if size.len() != 4 || size[1..] != expected {
            return Err(CoreError::Input(format!(
                "x has shape {size:?}, the model takes [B, {}, {}, {}]",
                expected[0], expected[1], expected[2]
            )));
        }
        if t.size() != [size[0]] {
            return Err(CoreError::Input(format!(
                "t has shape {:?}, expected [{}]",
                t.size(),
                size[0]
            )));
        }
        if let (Some(l), Some(n)) = (labels, cfg.num_classes) {
            if l.size() != [size[0]] {
                return Err(CoreError::Input(format!(
                    "labels have shape {:?}, expected [{}]",
                    l.size(),
                    size[0]
                )));
            }
            let (lo, hi) = (l.min().int64_value(&[]), l.max().int64_value(&[]));
            if lo < 0 || hi > n {
                return Err(CoreError::Input(format!(
                    "labels must be in 0..={n} (null = {n})"
                )));
            }
        }
        Ok(self.net.forward(x, t, labels))
    }
}
