//! DDIM (Song et al. 2021, eq. 12) with any number of steps and stochasticity η.
//!
//! x_s = √ᾱ_s·x̂₀ + √(1 − ᾱ_s − σ²)·ε + σ·z, x̂₀ = (x_t − √(1−ᾱ_t)·ε)/√ᾱ_t,
//! σ = η·√((1−ᾱ_s)/(1−ᾱ_t))·√(1 − ᾱ_t/ᾱ_s); ᾱ_s = 1 after the last step. η = 0 is the
//! deterministic sampler, η = 1 matches DDPM's posterior variance.

use super::{Sampler, StepCoefficients};
use crate::schedule::NoiseSchedule;

#[derive(Debug, Clone, Copy)]
pub struct Ddim {
    pub eta: f64,
}

impl Sampler for Ddim {
    fn coefficients(&self, schedule: &NoiseSchedule, t: i64, t_prev: i64) -> StepCoefficients {
        let ab_t = schedule.alpha_cumprod(t);
        let ab_s = schedule.alpha_cumprod(t_prev);
        let variance = (1.0 - ab_s) / (1.0 - ab_t) * (1.0 - ab_t / ab_s);
        let sigma = self.eta * variance.max(0.0).sqrt();
        let dir = (1.0 - ab_s - sigma * sigma).max(0.0).sqrt();
        let ratio = (ab_s / ab_t).sqrt();
        StepCoefficients {
            x: ratio,
            eps: dir - ratio * (1.0 - ab_t).sqrt(),
            noise: sigma,
            prev_x0: 0.0,
        }
    }
}
