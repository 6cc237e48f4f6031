//! DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
//! Diffusion Probabilistic Models", Algorithm 2, the multistep second-order solver of the
//! diffusion ODE in data prediction x̂₀), as Hugging Face diffusers'
//! `DPMSolverMultistepScheduler` runs it by default (`algorithm_type="dpmsolver++"`,
//! `solver_order=2`, `solver_type="midpoint"`, `lower_order_final=True`,
//! `final_sigmas_type="zero"`, `timestep_spacing="linspace"`).
//!
//! With α_t = √ᾱ_t, σ_t = √(1−ᾱ_t), λ_t = ln(α_t/σ_t) and x̂₀(t) = (x_t − σ_t·ε̃)/α_t, the
//! step t → s (h = λ_s − λ_t, A = α_s·(1 − e^{−h}) = α_s − α_t·σ_s/σ_t) is
//!
//! - first order: x_s = (σ_s/σ_t)·x_t + A·x̂₀(t), which is DDIM with η = 0;
//! - second order, u the timestep of the step before: with r = (λ_t − λ_u)/h,
//!   x_s = (σ_s/σ_t)·x_t + A·(1 + 1/(2r))·x̂₀(t) − A/(2r)·x̂₀(u).
//!
//! The first step has no x̂₀(u) and is first order; the last goes to σ = 0, α = 1 (it
//! returns x̂₀) and is first order too, as diffusers does with `final_sigmas_type="zero"`.
//! Every step between is second order. Guidance acts on ε before x̂₀ is formed.
//!
//! Why this fits the per-sample step: given the plan (u, t, s are known in advance) the
//! update is linear in x_t, ε̃ and x̂₀(u), so it is the usual coefficients on x_t and ε̃ plus
//! one on the previous step's x̂₀ ([`StepCoefficients::prev_x0`]). λ_u lives in those
//! precomputed coefficients; the only state is the tensor x̂₀(u), which each
//! [`super::Trajectory`] keeps for itself, so these samples share forward passes with
//! DDPM and DDIM ones.
//!
//! Clipping: diffusers' default (`thresholding=False`) does not clip. With our
//! `clip_denoised` (the default) x̂₀(t) is clamped to [−1, 1] before the update (ε̃ is
//! replaced by the ε consistent with it, as for the other samplers), and the clamped
//! x̂₀(t) is the one kept for the next step. Since the update depends on x_t and x̂₀ only,
//! this is exactly diffusers' scheduler with `thresholding=True` and a plain clamp in place
//! of its dynamic (percentile) thresholding; the reference tests check both paths.
//!
//! SDE variant (`sde: true`, diffusers' `algorithm_type="sde-dpmsolver++"`, Lu et al.
//! 2022 §5's stochastic DPM-Solver++(2M)): with E = e^{−h} and A' = α_s·(1 − E²), the
//! step adds fresh noise and damps x_t further:
//!
//! - first order: x_s = (σ_s/σ_t)·E·x_t + A'·x̂₀(t) + σ_s·√(1 − E²)·z;
//! - second order: x_s = (σ_s/σ_t)·E·x_t + A'·(1 + 1/(2r))·x̂₀(t) − A'/(2r)·x̂₀(u)
//!   + σ_s·√(1 − E²)·z.
//!
//! The last step (σ_s = 0, h = ∞) returns x̂₀(t) and adds no noise. Still linear in x_t, ε̃,
//! x̂₀(u) and z, so it is the same per-sample plan with a noise coefficient; z comes from the
//! sample's own stream as for DDPM.

use super::{Ddim, Sampler, StepCoefficients};
use crate::schedule::NoiseSchedule;

#[derive(Debug, Clone, Copy, Default)]
pub struct DpmSolverPp2m {
    /// The stochastic solver (diffusers' `sde-dpmsolver++`) instead of the ODE one.
    pub sde: bool,
}

/// α_t = √ᾱ_t, σ_t = √(1−ᾱ_t) and the half log-SNR λ_t = ln(α_t/σ_t) at one timestep.
#[derive(Debug, Clone, Copy)]
struct Marginal {
    alpha: f64,
    sigma: f64,
    lambda: f64,
}

impl Marginal {
    fn at(schedule: &NoiseSchedule, t: i64) -> Self {
        let ab = schedule.alpha_cumprod(t);
        let (alpha, sigma) = (ab.sqrt(), (1.0 - ab).sqrt());
        Marginal {
            alpha,
            sigma,
            lambda: alpha.ln() - sigma.ln(),
        }
    }
}

impl Sampler for DpmSolverPp2m {
    /// The first-order step: DDIM with η = 0 for the ODE solver.
    fn coefficients(&self, schedule: &NoiseSchedule, t: i64, t_prev: i64) -> StepCoefficients {
        if self.sde {
            sde_step(
                None,
                Marginal::at(schedule, t),
                Marginal::at(schedule, t_prev),
            )
        } else {
            Ddim { eta: 0.0 }.coefficients(schedule, t, t_prev)
        }
    }

    /// Second order after a first step, except on the last step (to x̂₀).
    fn multistep_coefficients(
        &self,
        schedule: &NoiseSchedule,
        t_before: Option<i64>,
        t: i64,
        t_prev: i64,
    ) -> StepCoefficients {
        match t_before {
            Some(u) if t_prev >= 0 && self.sde => sde_step(
                Some(Marginal::at(schedule, u)),
                Marginal::at(schedule, t),
                Marginal::at(schedule, t_prev),
            ),
            Some(u) if t_prev >= 0 => second_order(
                Marginal::at(schedule, u),
                Marginal::at(schedule, t),
                Marginal::at(schedule, t_prev),
            ),
            _ => self.coefficients(schedule, t, t_prev),
        }
    }
}

/// x_s = (σ_s/σ_t)·x_t + A·(1 + 1/(2r))·x̂₀(t) − A/(2r)·x̂₀(u), with x̂₀(t) written out as
/// (x_t − σ_t·ε̃)/α_t.
fn second_order(u: Marginal, t: Marginal, s: Marginal) -> StepCoefficients {
    let h = s.lambda - t.lambda;
    let r = (t.lambda - u.lambda) / h;
    let a = s.alpha - t.alpha * s.sigma / t.sigma;
    let on_x0 = a * (1.0 + 0.5 / r);
    StepCoefficients {
        x: s.sigma / t.sigma + on_x0 / t.alpha,
        eps: -on_x0 * t.sigma / t.alpha,
        noise: 0.0,
        prev_x0: -a * 0.5 / r,
    }
}

/// The SDE step t → s, second order when the step before (`u`) is given: x̂₀(t) written
/// out as (x_t − σ_t·ε̃)/α_t. At σ_s = 0 (the last step) E = 0: x_s = x̂₀(t), no noise.
fn sde_step(u: Option<Marginal>, t: Marginal, s: Marginal) -> StepCoefficients {
    let (e, decay) = if s.sigma == 0.0 {
        (0.0, 0.0)
    } else {
        let e = (t.lambda - s.lambda).exp(); // e^{−h}
        (e, s.sigma / t.sigma * e)
    };
    let a = s.alpha * (1.0 - e * e);
    let (on_x0, prev_x0) = match u {
        Some(u) => {
            let r = (t.lambda - u.lambda) / (s.lambda - t.lambda);
            (a * (1.0 + 0.5 / r), -a * 0.5 / r)
        }
        None => (a, 0.0),
    };
    StepCoefficients {
        x: decay + on_x0 / t.alpha,
        eps: -on_x0 * t.sigma / t.alpha,
        noise: s.sigma * (1.0 - e * e).sqrt(),
        prev_x0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::ScheduleConfig;
    use tch::Device;

    fn schedule() -> NoiseSchedule {
        NoiseSchedule::new(ScheduleConfig::default(), Device::Cpu).unwrap()
    }

    /// The second-order step in the paper's form, x̂₀(t) and x̂₀(u) given, against ours
    /// applied to the (x_t, ε̃) that give the same x̂₀(t).
    #[test]
    fn second_order_is_the_papers_update() {
        let s = schedule();
        let (u, t, v) = (
            Marginal::at(&s, 899),
            Marginal::at(&s, 799),
            Marginal::at(&s, 699),
        );
        let (x_t, eps, x0_u) = (0.7, -1.3, 0.2);
        let x0_t = (x_t - t.sigma * eps) / t.alpha;
        let h = v.lambda - t.lambda;
        let r0 = (t.lambda - u.lambda) / h;
        let d1 = (x0_t - x0_u) / r0;
        let paper = v.sigma / t.sigma * x_t - v.alpha * ((-h).exp() - 1.0) * (x0_t + 0.5 * d1);
        let c = second_order(u, t, v);
        let ours = c.x * x_t + c.eps * eps + c.prev_x0 * x0_u;
        assert!((ours - paper).abs() < 1e-12, "{ours} vs {paper}");
    }

    #[test]
    fn first_and_last_steps_are_first_order() {
        let s = schedule();
        let first = DpmSolverPp2m::default().multistep_coefficients(&s, None, 999, 899);
        assert_eq!(first, Ddim { eta: 0.0 }.coefficients(&s, 999, 899));
        let last = DpmSolverPp2m::default().multistep_coefficients(&s, Some(200), 100, -1);
        assert_eq!(last.prev_x0, 0.0);
        let ab = s.alpha_cumprod(100);
        assert!((last.x - 1.0 / ab.sqrt()).abs() < 1e-12, "x̂₀ = x/√ᾱ − …");
        let middle = DpmSolverPp2m::default().multistep_coefficients(&s, Some(999), 899, 799);
        assert!(middle.prev_x0 != 0.0 && middle.noise == 0.0);
        let sde = DpmSolverPp2m { sde: true };
        let last = sde.multistep_coefficients(&s, Some(200), 100, -1);
        assert_eq!((last.prev_x0, last.noise), (0.0, 0.0));
        assert!(
            (last.x - 1.0 / ab.sqrt()).abs() < 1e-12,
            "the SDE's last step is x̂₀ too"
        );
        let middle = sde.multistep_coefficients(&s, Some(999), 899, 799);
        assert!(middle.prev_x0 != 0.0 && middle.noise > 0.0);
    }
}
