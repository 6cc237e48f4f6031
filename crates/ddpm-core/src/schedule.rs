//! Noise schedules and the forward process q(x_t | x_0) (Ho et al. 2020, §2; the cosine
//! schedule is Nichol & Dhariwal 2021, eq. 17).
//!
//! All coefficients are computed once in `f64` on the host; the two the training step
//! gathers per sample (√ᾱ_t and √(1−ᾱ_t)) are also kept as `f32` tensors on the model's
//! device so the forward process never leaves it.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::error::{CoreError, Result};

/// How β_t is laid out over the T steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BetaSchedule {
    /// β_t evenly spaced from `beta_start` to `beta_end` (the seed: 1e-4..0.02).
    Linear { beta_start: f64, beta_end: f64 },
    /// ᾱ(t) = cos²(((t/T + offset)/(1 + offset))·π/2), β_t = min(1 − ᾱ(t+1)/ᾱ(t),
    /// `max_beta`); the paper calls the offset s (0.008), which configs may still write.
    Cosine {
        #[serde(alias = "s")]
        offset: f64,
        max_beta: f64,
    },
}

/// The schedule as stored in configs and checkpoint manifests.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScheduleConfig {
    /// T, the number of diffusion steps.
    pub timesteps: usize,
    #[serde(flatten)]
    pub betas: BetaSchedule,
}

impl Default for ScheduleConfig {
    /// The seed's schedule: linear 1e-4..0.02 over T = 1000.
    fn default() -> Self {
        ScheduleConfig {
            timesteps: 1000,
            betas: BetaSchedule::Linear {
                beta_start: 1e-4,
                beta_end: 0.02,
            },
        }
    }
}

impl ScheduleConfig {
    /// The improved-DDPM cosine schedule with its published constants.
    pub fn cosine(timesteps: usize) -> Self {
        ScheduleConfig {
            timesteps,
            betas: BetaSchedule::Cosine {
                offset: 0.008,
                max_beta: 0.999,
            },
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.timesteps < 2 {
            return Err(CoreError::config(
                "schedule.timesteps",
                "must be at least 2",
            ));
        }
        match self.betas {
            BetaSchedule::Linear {
                beta_start,
                beta_end,
            } => {
                let ok = |b: f64| b > 0.0 && b < 1.0;
                if !ok(beta_start) || !ok(beta_end) || beta_start > beta_end {
                    return Err(CoreError::config(
                        "schedule.beta_start/beta_end",
                        "need 0 < beta_start <= beta_end < 1",
                    ));
                }
            }
            BetaSchedule::Cosine { offset, max_beta } => {
                if !(offset >= 0.0 && offset.is_finite()) {
                    return Err(CoreError::config("schedule.offset", "must be >= 0"));
                }
                if !(max_beta > 0.0 && max_beta < 1.0) {
                    return Err(CoreError::config(
                        "schedule.max_beta",
                        "need 0 < max_beta < 1",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A schedule's coefficients, indexed by t = 0..T−1.
#[derive(Debug)]
pub struct NoiseSchedule {
    config: ScheduleConfig,
    /// β_t
    pub betas: Vec<f64>,
    /// α_t = 1 − β_t
    pub alphas: Vec<f64>,
    /// ᾱ_t = ∏_{s≤t} α_s
    pub alphas_cumprod: Vec<f64>,
    /// β̃_t = (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · β_t, the variance of q(x_{t−1} | x_t, x_0);
    /// 0 at t = 0 (where ᾱ_{−1} = 1).
    pub posterior_variance: Vec<f64>,
    /// √ᾱ_t as `[T]` f32 on the model's device, for the forward process.
    sqrt_alphas_cumprod: Tensor,
    /// √(1 − ᾱ_t) as `[T]` f32 on the model's device.
    sqrt_one_minus_alphas_cumprod: Tensor,
}

impl NoiseSchedule {
    pub fn new(config: ScheduleConfig, device: Device) -> Result<Self> {
        config.validate()?;
        let t_max = config.timesteps;
        let betas: Vec<f64> = match config.betas {
            BetaSchedule::Linear {
                beta_start,
                beta_end,
            } => (0..t_max)
                .map(|i| beta_start + (beta_end - beta_start) * i as f64 / (t_max - 1) as f64)
                .collect(),
            BetaSchedule::Cosine { offset, max_beta } => {
                // Float division on purpose: i / T in integers is 0 for every i < T.
                let alpha_bar = |t: f64| {
                    ((t + offset) / (1.0 + offset) * std::f64::consts::FRAC_PI_2)
                        .cos()
                        .powi(2)
                };
                (0..t_max)
                    .map(|i| {
                        let t1 = i as f64 / t_max as f64;
                        let t2 = (i + 1) as f64 / t_max as f64;
                        (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(max_beta)
                    })
                    .collect()
            }
        };
        let alphas: Vec<f64> = betas.iter().map(|b| 1.0 - b).collect();
        let alphas_cumprod: Vec<f64> = alphas
            .iter()
            .scan(1.0, |acc, a| {
                *acc *= a;
                Some(*acc)
            })
            .collect();
        let posterior_variance = (0..t_max)
            .map(|t| {
                let prev = if t == 0 { 1.0 } else { alphas_cumprod[t - 1] };
                (1.0 - prev) / (1.0 - alphas_cumprod[t]) * betas[t]
            })
            .collect();
        let to_tensor = |v: Vec<f64>| {
            Tensor::from_slice(&v)
                .to_kind(Kind::Float)
                .to_device(device)
        };
        let sqrt_alphas_cumprod = to_tensor(alphas_cumprod.iter().map(|a| a.sqrt()).collect());
        let sqrt_one_minus_alphas_cumprod =
            to_tensor(alphas_cumprod.iter().map(|a| (1.0 - a).sqrt()).collect());
        Ok(NoiseSchedule {
            config,
            betas,
            alphas,
            alphas_cumprod,
            posterior_variance,
            sqrt_alphas_cumprod,
            sqrt_one_minus_alphas_cumprod,
        })
    }

    pub fn config(&self) -> &ScheduleConfig {
        &self.config
    }

    /// T.
    pub fn timesteps(&self) -> usize {
        self.config.timesteps
    }

    /// ᾱ_t, with ᾱ_{−1} = 1 (the clean image) for the step that ends a trajectory.
    pub fn alpha_cumprod(&self, t: i64) -> f64 {
        if t < 0 {
            1.0
        } else {
            self.alphas_cumprod[t as usize]
        }
    }

    /// The forward process: x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε, one t per sample.
    ///
    /// `x0` and `noise` are `[B, C, H, W]`, `t` is `[B]` int64 on the same device; ε must be
    /// standard normal (the seed drew it uniformly, a bug we do not copy).
    pub fn q_sample(&self, x0: &Tensor, t: &Tensor, noise: &Tensor) -> Result<Tensor> {
        let sqrt_ab = self
            .sqrt_alphas_cumprod
            .f_index_select(0, t)?
            .f_view([-1, 1, 1, 1])?; // [B,1,1,1]
        let sqrt_1m = self
            .sqrt_one_minus_alphas_cumprod
            .f_index_select(0, t)?
            .f_view([-1, 1, 1, 1])?;
        Ok(x0.f_mul(&sqrt_ab)?.f_add(&noise.f_mul(&sqrt_1m)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cosine_offset_reads_under_its_paper_name_too() {
        // Manifests and configs written before the rename say `s`.
        let old: ScheduleConfig = serde_json::from_str(
            r#"{"timesteps": 1000, "kind": "cosine", "s": 0.01, "max_beta": 0.999}"#,
        )
        .unwrap();
        let new: ScheduleConfig = serde_json::from_str(
            r#"{"timesteps": 1000, "kind": "cosine", "offset": 0.01, "max_beta": 0.999}"#,
        )
        .unwrap();
        assert_eq!(old, new);
        assert_eq!(
            new.betas,
            BetaSchedule::Cosine {
                offset: 0.01,
                max_beta: 0.999
            }
        );
    }

    #[test]
    fn linear_schedule_matches_its_definition() {
        let schedule = NoiseSchedule::new(ScheduleConfig::default(), Device::Cpu).unwrap();
        assert_eq!(schedule.betas.len(), 1000);
        assert!((schedule.betas[0] - 1e-4).abs() < 1e-15);
        assert!((schedule.betas[999] - 0.02).abs() < 1e-15);
        assert!(schedule.alphas_cumprod.windows(2).all(|w| w[1] < w[0]));
        assert_eq!(schedule.posterior_variance[0], 0.0);
    }

    #[test]
    fn cosine_schedule_is_not_degenerate() {
        // Integer i / T would make every β_t equal; check they really vary.
        let schedule = NoiseSchedule::new(ScheduleConfig::cosine(1000), Device::Cpu).unwrap();
        assert!(schedule.betas[0] < 1e-3 && schedule.betas[500] > schedule.betas[0]);
        assert!(
            (schedule.betas[999] - 0.999).abs() < 1e-12,
            "last beta is clipped"
        );
    }

    #[test]
    fn rejects_bad_configs() {
        let c = ScheduleConfig {
            timesteps: 1,
            ..Default::default()
        };
        assert!(NoiseSchedule::new(c, Device::Cpu).is_err());
        let c = ScheduleConfig {
            timesteps: 10,
            betas: BetaSchedule::Linear {
                beta_start: 0.1,
                beta_end: 0.01,
            },
        };
        let err = NoiseSchedule::new(c, Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("beta_start"), "{err}");
    }

    #[test]
    fn q_sample_mixes_signal_and_noise_per_sample() {
        let schedule = NoiseSchedule::new(ScheduleConfig::default(), Device::Cpu).unwrap();
        let x0 = Tensor::ones([2, 1, 2, 2], (Kind::Float, Device::Cpu));
        let noise = Tensor::zeros([2, 1, 2, 2], (Kind::Float, Device::Cpu));
        let t = Tensor::from_slice(&[0i64, 999]);
        let xt = schedule.q_sample(&x0, &t, &noise).unwrap();
        let v: Vec<f32> = Vec::try_from(xt.flatten(0, -1)).unwrap();
        assert!((v[0] as f64 - schedule.alphas_cumprod[0].sqrt()).abs() < 1e-6);
        assert!((v[4] as f64 - schedule.alphas_cumprod[999].sqrt()).abs() < 1e-6);
    }
}
