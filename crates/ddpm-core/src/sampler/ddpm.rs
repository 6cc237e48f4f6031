//! DDPM ancestral sampling (Ho et al. 2020, Algorithm 2), over all T steps down to t = 0
//! (the seed stopped at t = 1) or over a subsequence of them.
//!
//! Between consecutive timesteps t → s of the plan, with α' = ᾱ_t/ᾱ_s and β' = 1 − α':
//! x_s = c₀·x̂₀ + c_t·x_t + σ·z with x̂₀ = (x_t − √(1−ᾱ_t)·ε)/√ᾱ_t,
//! c₀ = √ᾱ_s·β'/(1−ᾱ_t), c_t = √α'·(1−ᾱ_s)/(1−ᾱ_t) and σ² = (1−ᾱ_s)/(1−ᾱ_t)·β'
//! (the posterior variance β̃, diffusers' `variance_type="fixed_small"`, the default) or
//! σ² = β' ([`AncestralVariance::FixedLarge`], the seed's and the paper's other choice,
//! diffusers' `"fixed_large"`); no noise is added at t = 0. With s = t − 1
//! this is the paper's μ̃ = (x_t − β_t/√(1−ᾱ_t)·ε)/√α_t. x̂₀ is not clipped, so the step is
//! linear in x and ε, as diffusers' `DDPMScheduler(clip_sample=False)`.

use super::{AncestralVariance, Sampler, StepCoefficients};
use crate::schedule::NoiseSchedule;

#[derive(Debug, Clone, Copy, Default)]
pub struct Ddpm {
    /// σ² of the noise each step adds: β̃ (default) or β.
    pub variance: AncestralVariance,
}

impl Sampler for Ddpm {
    fn coefficients(&self, schedule: &NoiseSchedule, t: i64, t_prev: i64) -> StepCoefficients {
        let ab_t = schedule.alpha_cumprod(t);
        let ab_s = schedule.alpha_cumprod(t_prev);
        let alpha = ab_t / ab_s;
        let beta = 1.0 - alpha;
        let c0 = ab_s.sqrt() * beta / (1.0 - ab_t);
        let ct = alpha.sqrt() * (1.0 - ab_s) / (1.0 - ab_t);
        let noise = match self.variance {
            AncestralVariance::FixedSmall if t > 0 => {
                ((1.0 - ab_s) / (1.0 - ab_t) * beta).max(1e-20).sqrt()
            }
            // Not on the step to the clean image (t_prev = −1): diffusers' "fixed_large"
            // adds √(1−ᾱ_t)·z there when the plan's last t > 0, which undoes the whole
            // last step; the paper adds none at its last step (t = 1, z = 0).
            AncestralVariance::FixedLarge if t > 0 && t_prev >= 0 => beta.sqrt(),
            _ => 0.0,
        };
        StepCoefficients {
            x: c0 / ab_t.sqrt() + ct,
            eps: -c0 * (1.0 - ab_t).sqrt() / ab_t.sqrt(),
            noise,
            prev_x0: 0.0,
        }
    }
}
