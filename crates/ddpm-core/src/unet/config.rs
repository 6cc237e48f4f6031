//! The UNet's shape: every size the seed hard-codes, as a config with the seed as a preset.

use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};

/// The network's sizes. `UNetConfig::seed()` is the seed's conditional UNet exactly;
/// `UNetConfig::tiny()` is small enough to train on a CPU in a test.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UNetConfig {
    /// Height and width of the (square) images, in pixels.
    pub image_size: i64,
    /// Image channels in (3 for RGB).
    pub in_channels: i64,
    /// Channels predicted (ε has the image's channels).
    pub out_channels: i64,
    /// Width of the first level; level i has `base_channels * channel_mults[i]` channels.
    pub base_channels: i64,
    /// One entry per resolution level; the image is halved `len − 1` times.
    pub channel_mults: Vec<i64>,
    /// The bottleneck's width is `base_channels * bottleneck_mult` (the seed: 512 = 64 × 8).
    pub bottleneck_mult: i64,
    /// Feature-map sizes (in pixels) after which a self-attention block follows, on the way
    /// down and on the way up (the seed: every level, 8, 16, 32 and 64).
    pub attention_resolutions: Vec<i64>,
    /// Heads of each self-attention block.
    pub attention_heads: i64,
    /// Width of the sinusoidal timestep encoding, to which the label embedding is added.
    pub time_embedding_dim: i64,
    /// Number of classes for a conditional model (a learned null label is added at index
    /// `num_classes` for classifier-free guidance); `None` for an unconditional one.
    pub num_classes: Option<i64>,
}

impl UNetConfig {
    /// The seed's `UNet_conditional` at 64×64 with `num_classes` classes (10 for CIFAR-10).
    pub fn seed(num_classes: Option<i64>) -> Self {
        UNetConfig {
            image_size: 64,
            in_channels: 3,
            out_channels: 3,
            base_channels: 64,
            channel_mults: vec![1, 2, 4, 4],
            bottleneck_mult: 8,
            attention_resolutions: vec![8, 16, 32, 64],
            attention_heads: 4,
            time_embedding_dim: 256,
            num_classes,
        }
    }

    /// A 16×16 network of about 0.2 M parameters for CPU tests and the demo.
    pub fn tiny(num_classes: Option<i64>) -> Self {
        UNetConfig {
            image_size: 16,
            in_channels: 3,
            out_channels: 3,
            base_channels: 16,
            channel_mults: vec![1, 2, 2],
            bottleneck_mult: 4,
            attention_resolutions: vec![4, 8],
            attention_heads: 4,
            time_embedding_dim: 64,
            num_classes,
        }
    }

    /// A preset by name (`seed`, `tiny`).
    pub fn preset(name: &str, num_classes: Option<i64>) -> Result<Self> {
        match name {
            "seed" => Ok(Self::seed(num_classes)),
            "tiny" => Ok(Self::tiny(num_classes)),
            other => Err(CoreError::config(
                "model.preset",
                format!("unknown preset {other:?}: use seed or tiny"),
            )),
        }
    }

    /// Channels of each level: `[base × mult for mult in channel_mults]`.
    pub fn level_channels(&self) -> Vec<i64> {
        self.channel_mults
            .iter()
            .map(|m| m * self.base_channels)
            .collect()
    }

    /// How many times the image is halved.
    pub fn downsamplings(&self) -> usize {
        self.channel_mults.len().saturating_sub(1)
    }

    /// The label that means "no class" (the unconditional half of guidance).
    pub fn null_label(&self) -> Option<i64> {
        self.num_classes
    }

    /// Checks that the network can be built and run on `image_size` images; errors name
    /// the field.
    pub fn validate(&self) -> Result<()> {
        let positive = |field: &str, v: i64| {
            if v > 0 {
                Ok(())
            } else {
                Err(CoreError::config(
                    field,
                    format!("must be positive, got {v}"),
                ))
            }
        };
        positive("model.image_size", self.image_size)?;
        positive("model.in_channels", self.in_channels)?;
        positive("model.out_channels", self.out_channels)?;
        positive("model.base_channels", self.base_channels)?;
        positive("model.bottleneck_mult", self.bottleneck_mult)?;
        positive("model.attention_heads", self.attention_heads)?;
        if self.channel_mults.len() < 2 {
            return Err(CoreError::config(
                "model.channel_mults",
                "needs at least two levels (one downsampling)",
            ));
        }
        for m in &self.channel_mults {
            positive("model.channel_mults", *m)?;
        }
        let factor = 1i64 << self.downsamplings();
        if self.image_size % factor != 0 {
            return Err(CoreError::config(
                "model.image_size",
                format!(
                    "{} is not divisible by {factor}, the network's total downsampling ({} levels)",
                    self.image_size,
                    self.channel_mults.len()
                ),
            ));
        }
        if self.time_embedding_dim <= 0 || self.time_embedding_dim % 2 != 0 {
            return Err(CoreError::config(
                "model.time_embedding_dim",
                format!("must be positive and even, got {}", self.time_embedding_dim),
            ));
        }
        if let Some(n) = self.num_classes {
            positive("model.num_classes", n)?;
        }
        let levels = self.level_channels();
        for (res, ch) in self.attention_blocks() {
            if ch % self.attention_heads != 0 {
                return Err(CoreError::config(
                    "model.attention_heads",
                    format!(
                        "{ch} channels at resolution {res} are not divisible by {} heads",
                        self.attention_heads
                    ),
                ));
            }
        }
        let valid: Vec<i64> = (0..levels.len()).map(|i| self.image_size >> i).collect();
        for r in &self.attention_resolutions {
            if !valid.contains(r) {
                return Err(CoreError::config(
                    "model.attention_resolutions",
                    format!("{r} is not a feature-map size of this network ({valid:?})"),
                ));
            }
        }
        Ok(())
    }

    /// (resolution, channels) of every attention block, down path then up path.
    pub(crate) fn attention_blocks(&self) -> Vec<(i64, i64)> {
        let plan = self.plan();
        plan.downs
            .iter()
            .chain(plan.ups.iter())
            .filter(|b| b.attention)
            .map(|b| (b.resolution, b.out_channels))
            .collect()
    }

    /// The block layout shared by the network builder and the validation above.
    pub(crate) fn plan(&self) -> Plan {
        let c = self.level_channels();
        let levels = c.len();
        let attends = |res: i64| self.attention_resolutions.contains(&res);
        let downs = (1..levels)
            .map(|i| {
                let resolution = self.image_size >> i;
                BlockPlan {
                    in_channels: c[i - 1],
                    out_channels: c[i],
                    resolution,
                    attention: attends(resolution),
                }
            })
            .collect();
        // Up j (1-based) undoes down (levels − j): it takes the deeper features (h) and the
        // skip from level (levels − 1 − j), and outputs that level's predecessor's width,
        // as the seed does (up1: 256 + 256 → 128, up2: 128 + 128 → 64, up3: 64 + 64 → 64).
        let mut h = c[levels - 1];
        let ups = (1..levels)
            .map(|j| {
                let skip_level = levels - 1 - j;
                let out = if skip_level >= 1 {
                    c[skip_level - 1]
                } else {
                    c[0]
                };
                let resolution = self.image_size >> skip_level;
                let block = BlockPlan {
                    in_channels: h + c[skip_level],
                    out_channels: out,
                    resolution,
                    attention: attends(resolution),
                };
                h = out;
                block
            })
            .collect();
        Plan {
            downs,
            ups,
            bottleneck: self.base_channels * self.bottleneck_mult,
        }
    }
}

pub(crate) struct BlockPlan {
    pub in_channels: i64,
    pub out_channels: i64,
    /// Feature-map size after the block.
    pub resolution: i64,
    pub attention: bool,
}

pub(crate) struct Plan {
    pub downs: Vec<BlockPlan>,
    pub ups: Vec<BlockPlan>,
    pub bottleneck: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate() {
        UNetConfig::seed(Some(10)).validate().unwrap();
        UNetConfig::tiny(None).validate().unwrap();
        assert!(UNetConfig::preset("huge", None).is_err());
    }

    #[test]
    fn seed_plan_matches_the_seed_widths() {
        let p = UNetConfig::seed(None).plan();
        let downs: Vec<_> = p
            .downs
            .iter()
            .map(|b| (b.in_channels, b.out_channels, b.resolution))
            .collect();
        assert_eq!(downs, vec![(64, 128, 32), (128, 256, 16), (256, 256, 8)]);
        let ups: Vec<_> = p
            .ups
            .iter()
            .map(|b| (b.in_channels, b.out_channels, b.resolution))
            .collect();
        assert_eq!(ups, vec![(512, 128, 16), (256, 64, 32), (128, 64, 64)]);
        assert_eq!(p.bottleneck, 512);
    }

    #[test]
    fn invalid_configs_name_the_field() {
        let mut c = UNetConfig::tiny(Some(3));
        c.image_size = 18;
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("model.image_size") && e.contains("divisible"),
            "{e}"
        );

        let mut c = UNetConfig::tiny(Some(3));
        c.attention_heads = 5;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("model.attention_heads"));

        let mut c = UNetConfig::tiny(Some(3));
        c.attention_resolutions = vec![5];
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("model.attention_resolutions"));

        let mut c = UNetConfig::tiny(Some(3));
        c.time_embedding_dim = 63;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("model.time_embedding_dim"));
    }
}
