//! Reverse-process samplers, built from one step that works on a batch whose samples sit
//! at different timesteps with different samplers.
//!
//! Every sampler here moves a sample from timestep t to s < t by
//! `x_s = a·x_t + b·ε̃ + c·z + d·x̂₀'`, with scalars (a, b, c, d) that depend only on the
//! sampler and the plan's timesteps; x̂₀' is the x̂₀ of the sample's previous step, which
//! only the multistep DPM-Solver++(2M) uses (d = 0 for DDPM and DDIM, which step from x_t
//! and ε̃ alone). A sample's whole trajectory is therefore a *plan*: its list of timesteps
//! with their coefficients. [`denoise_step`] runs one guided forward pass for a batch and
//! applies each sample's own coefficients, and [`Trajectory`] walks one sample through its
//! plan with its own seeded noise and, for a multistep plan, its own previous x̂₀.
//! [`sample`] (whole trajectories, used by the trainer's sample grids and the tests) and
//! the server's step-level batcher are both built on them.
//!
//! With `clip_denoised` (the default, as in diffusers' schedulers and the original DDPM
//! code) the predicted x̂₀ = (x_t − √(1−ᾱ_t)·ε̃)/√ᾱ_t is clamped to [−1, 1] and ε̃ replaced by
//! the ε consistent with it before the linear update. Without it a slightly wrong ε at
//! high t is amplified by 1/√ᾱ_t (≈ 160 at t = 999) into x̂₀, which ruins deterministic
//! few-step samplers on imperfect models; with it the step is still per-sample, only no
//! longer linear in ε.
//!
//! For DDIM this is **not** diffusers' `clip_sample`. Both clamp x̂₀, but diffusers keeps
//! the model's ε̃ in the direction term, while here it is replaced by
//! ε' = (x_t − √ᾱ_t·clip(x̂₀))/√(1−ᾱ_t):
//!
//! - here: x_s = √ᾱ_s·clip(x̂₀) + √(1−ᾱ_s−σ²)·ε' + σ·z;
//! - diffusers: x_s = √ᾱ_s·clip(x̂₀) + √(1−ᾱ_s−σ²)·ε̃ + σ·z.
//!
//! They agree wherever the clamp is inactive. Ours steps with a consistent pair,
//! x_t = √ᾱ_t·clip(x̂₀) + √(1−ᾱ_t)·ε', which is what the one linear update per sample
//! needs; for DDPM the two definitions give the same step (the posterior mean depends on
//! x̂₀ and x_t only). Our definition is checked against a computation by hand in
//! `tests/core/reference.rs` (`clipped_ddim_follows_our_definition_not_diffusers`).
//!
//! With [`SamplerConfig::dynamic_thresholding`] x̂₀ is thresholded as Imagen does
//! ([`DynamicThresholding`], diffusers' `thresholding`) instead of clamped, per sample,
//! and ε̃ replaced the same way; for DDPM and DPM-Solver++ that is diffusers' step with
//! `thresholding=True` (checked against it for DDPM in `tests/core/reference.rs`).
//!
//! DPM-Solver++(2M) clamps its x̂₀ the same way; as its update depends on x_t and x̂₀ only,
//! there the clamp is diffusers' thresholding hook with a plain clamp (see `dpmpp`).
//!
//! Every tensor operation on the step path ([`Trajectory::new`], [`step_trajectories`],
//! [`denoise_step`], [`to_uint8`]) is a fallible `f_*` one, so a libtorch failure returns a
//! [`CoreError`] (with its [`crate::DeviceFault`]) instead of panicking; only the network's
//! forward pass inside [`crate::guidance::guided_epsilon`] may still panic.
//!
//! Layout: `ddpm` (ancestral DDPM), `ddim` (DDIM with η), `dpmpp` (DPM-Solver++(2M)),
//! `rows` (what each step of a sample costs in batch rows, [`StepRows`]).

mod ddim;
mod ddpm;
mod dpmpp;
mod rows;

pub use ddim::Ddim;
pub use ddpm::Ddpm;
pub use dpmpp::DpmSolverPp2m;
pub use rows::StepRows;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::{
    error::{CoreError, Result},
    guidance::{guided_epsilon, timestep_tensor},
    noise::SampleRng,
    schedule::NoiseSchedule,
    unet::Model,
};

/// `x_s = x·x_t + eps·ε̃ + noise·z + prev_x0·x̂₀'` for one sample and one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepCoefficients {
    pub x: f64,
    pub eps: f64,
    pub noise: f64,
    /// On x̂₀', the x̂₀ of the sample's previous step (a multistep sampler's history); 0
    /// for samplers that step from x_t and ε̃ alone.
    pub prev_x0: f64,
}

/// √ᾱ_t and √(1−ᾱ_t) of a step's t: what x̂₀ = (x_t − √(1−ᾱ_t)·ε̃)/√ᾱ_t needs, to clamp
/// it to [−1, 1] before stepping ([`PlannedStep::clip`]) or to keep it for the next step
/// ([`PlannedStep::keep_x0`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Clip {
    pub sqrt_alpha_cumprod: f64,
    pub sqrt_one_minus_alpha_cumprod: f64,
}

/// One step of a plan: the timestep the network is evaluated at and how to step from it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlannedStep {
    pub timestep: i64,
    /// The timestep stepped to; −1 after the last step (the clean image).
    pub prev_timestep: i64,
    pub coefficients: StepCoefficients,
    /// `Some` when x̂₀ is clamped before the update.
    pub clip: Option<Clip>,
    /// `Some` when the next step uses this step's x̂₀ (its `prev_x0` is not 0): the
    /// trajectory keeps it (clamped if `clip` is).
    pub keep_x0: Option<Clip>,
    /// `Some` (only where `clip` is) when x̂₀ is thresholded dynamically instead of
    /// clamped to [−1, 1].
    pub threshold: Option<DynamicThresholding>,
    /// Whether classifier-free guidance applies at this step (outside the plan's guidance
    /// interval the conditional prediction is used alone, as with w = 1).
    pub guided: bool,
}

/// Imagen's dynamic thresholding of x̂₀ (Saharia et al. 2022; diffusers' `thresholding`
/// with `dynamic_thresholding_ratio` and `sample_max_value`): per sample,
/// s = clamp(quantile(|x̂₀|, ratio), 1, max_value) and x̂₀ ← clamp(x̂₀, −s, s)/s. With
/// `max_value = 1` it is the static clamp to [−1, 1].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DynamicThresholding {
    /// The quantile of |x̂₀| taken as s, in (0, 1] (diffusers' default 0.995).
    pub ratio: f64,
    /// The largest s, ≥ 1 (diffusers' `sample_max_value`, default 1).
    pub max_value: f64,
}

/// [`DynamicThresholding`] of each row of `x0` (`[B, …]`) with its own setting; rows
/// with `None` are clamped to [−1, 1]. s is torch's `quantile` with linear interpolation.
pub fn threshold_x0(x0: &Tensor, settings: &[Option<DynamicThresholding>]) -> Result<Tensor> {
    let size = x0.size();
    let b = size.first().copied().unwrap_or(0);
    if settings.len() as i64 != b {
        return Err(CoreError::Input(format!(
            "{} thresholding settings for a batch of {b}",
            settings.len()
        )));
    }
    let device = x0.device();
    let column = |f: &dyn Fn(&DynamicThresholding) -> f64, absent: f64| -> Result<Tensor> {
        let values: Vec<f64> = settings
            .iter()
            .map(|s| s.as_ref().map_or(absent, f))
            .collect();
        Ok(Tensor::f_from_slice(&values)?
            .f_to_kind(x0.kind())?
            .f_to_device(device)?
            .f_view([b, 1])?) // [B, 1]
    };
    let flat = x0.f_reshape([b, -1])?; // [B, N]
    let n = flat.size()[1];
    let (sorted, _) = flat.f_abs()?.f_sort(1, false)?; // [B, N]
                                                       // torch.quantile, "linear": position ratio·(N − 1) between its two neighbours.
    let position = column(&|s| s.ratio, 1.0)?.f_mul_scalar((n - 1) as f64)?; // [B, 1]
    let below = position.f_floor()?;
    let fraction = position.f_sub(&below)?;
    let below = below.f_to_kind(Kind::Int64)?;
    let above = below.f_add_scalar(1)?.f_clamp_max(n - 1)?;
    let low = sorted.f_gather(1, &below, false)?;
    let high = sorted.f_gather(1, &above, false)?;
    let quantile = low.f_add(&high.f_sub(&low)?.f_mul(&fraction)?)?; // [B, 1]
    let s = quantile
        .f_clamp_min(1.0)?
        .f_minimum(&column(&|s| s.max_value, 1.0)?)?;
    let thresholded = flat.f_maximum(&s.f_neg()?)?.f_minimum(&s)?.f_div(&s)?;
    Ok(thresholded.f_reshape(size.as_slice())?)
}

/// A reverse-process sampler: the coefficients of one step t → s.
pub trait Sampler {
    /// The step t → t_prev from x_t and ε̃ alone.
    fn coefficients(&self, schedule: &NoiseSchedule, t: i64, t_prev: i64) -> StepCoefficients;

    /// The step t → t_prev of a plan whose previous step was evaluated at `t_before`
    /// (`None` on the first step). A multistep sampler may use that step's x̂₀
    /// ([`StepCoefficients::prev_x0`]); the others step as [`Sampler::coefficients`].
    fn multistep_coefficients(
        &self,
        schedule: &NoiseSchedule,
        t_before: Option<i64>,
        t: i64,
        t_prev: i64,
    ) -> StepCoefficients {
        let _ = t_before;
        self.coefficients(schedule, t, t_prev)
    }
}

/// Which timesteps a trajectory of n < T steps visits (diffusers' `timestep_spacing`,
/// with `steps_offset = 0`). Diffusers' schedulers do not agree on two of the names, so
/// each sampler follows the scheduler it ports ([`TimestepSpacing::timesteps_for`]):
/// `leading` of DPM-Solver++ and `linspace` of DDPM and DDIM differ from the
/// definitions of [`TimestepSpacing::timesteps`] (the other samplers').
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    /// `k·⌊T/n⌋` for k = n−1…0: starts below T−1 (DDIM paper, diffusers' default). For
    /// DPM-Solver++ `k·⌊T/(n+1)⌋` for k = n…1 (its scheduler's).
    Leading,
    /// `round(T − k·T/n) − 1` for k = 0…n−1: always starts at T−1, from pure noise
    /// (Lin et al. 2024 show this is the better choice for few steps). Rounds halves away
    /// from zero where numpy (diffusers) rounds them to even: the two differ by one at the
    /// timesteps where k·T/n falls on a half (n = 16, 48, 64, … for T = 1000).
    #[default]
    Trailing,
    /// `round(k·(T−1)/n)` for k = n…1, ties to even (numpy's `linspace(0, T−1, n+1)`
    /// rounded, without its 0): starts at T−1 and ends near (T−1)/n. Diffusers' default
    /// for DPM-Solver++. For n ≥ T, where that repeats a timestep (and diffusers' second
    /// order step divides by a zero step in λ), every timestep T−1…0. For DDPM and DDIM
    /// `round(k·(T−1)/(n−1))` for k = n−1…0 (their schedulers' `linspace(0, T−1, n)`,
    /// which ends at t = 0).
    Linspace,
}

impl TimestepSpacing {
    /// The descending timesteps of an n-step trajectory over T (DDPM's and DDIM's
    /// `leading` and `trailing`, DPM-Solver++'s `trailing` and `linspace`).
    pub fn timesteps(self, t_max: usize, steps: usize) -> Vec<i64> {
        let (t_max_i, n) = (t_max as i64, steps as i64);
        match self {
            TimestepSpacing::Leading => {
                let ratio = t_max_i / n;
                (0..n).rev().map(|k| k * ratio).collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = t_max as f64 / steps as f64;
                (0..n)
                    .map(|k| (t_max as f64 - k as f64 * ratio).round() as i64 - 1)
                    .collect()
            }
            TimestepSpacing::Linspace if steps >= t_max => (0..t_max_i).rev().collect(),
            TimestepSpacing::Linspace => {
                // numpy: arange(n + 1)·step + 0, with step = (T − 1)/n.
                let step = (t_max - 1) as f64 / steps as f64;
                (1..=n)
                    .rev()
                    .map(|k| (k as f64 * step).round_ties_even() as i64)
                    .collect()
            }
        }
    }

    /// The descending timesteps of an n-step trajectory of `kind` over T, as diffusers'
    /// scheduler that the sampler ports defines them (see the variants).
    pub fn timesteps_for(self, kind: SamplerKind, t_max: usize, steps: usize) -> Vec<i64> {
        let n = steps as i64;
        match (kind, self) {
            (SamplerKind::DpmPp2m, TimestepSpacing::Leading) if steps >= t_max => {
                (0..t_max as i64).rev().collect()
            }
            (SamplerKind::DpmPp2m, TimestepSpacing::Leading) => {
                let ratio = t_max as i64 / (n + 1);
                (1..=n).rev().map(|k| k * ratio).collect()
            }
            (SamplerKind::Ddpm | SamplerKind::Ddim, TimestepSpacing::Linspace) if n > 1 => {
                // numpy: linspace(0, T − 1, n) = k·step with step = (T − 1)/(n − 1).
                let step = (t_max - 1) as f64 / (n - 1) as f64;
                (0..n)
                    .rev()
                    .map(|k| (k as f64 * step).round_ties_even() as i64)
                    .collect()
            }
            (SamplerKind::Ddpm | SamplerKind::Ddim, TimestepSpacing::Linspace) => vec![0],
            _ => self.timesteps(t_max, steps),
        }
    }
}

/// Which DPM-Solver++(2M) (diffusers' `algorithm_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum DpmSolverAlgorithm {
    /// The diffusion ODE's solver, deterministic.
    #[default]
    #[serde(rename = "dpmsolver++")]
    DpmSolverPp,
    /// The stochastic one (Lu et al. 2022 §5): fresh noise at every step.
    #[serde(rename = "sde-dpmsolver++")]
    SdeDpmSolverPp,
}

/// σ² of the noise an ancestral DDPM step t → s adds (diffusers' `variance_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AncestralVariance {
    /// σ² = β̃ = (1−ᾱ_s)/(1−ᾱ_t)·β', the posterior variance (the lower bound of Ho et al.).
    #[default]
    FixedSmall,
    /// σ² = β' = 1 − ᾱ_t/ᾱ_s (β_t for consecutive steps): the upper bound, what the seed
    /// and the PyTorch reference use.
    FixedLarge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SamplerKind {
    Ddpm,
    Ddim,
    /// DPM-Solver++(2M), deterministic.
    #[serde(rename = "dpmpp_2m")]
    DpmPp2m,
}

impl SamplerKind {
    /// The spacing this sampler gets where nothing chooses one (the server's requests,
    /// the constructors below): trailing for DDPM and DDIM, linspace for DPM-Solver++ as
    /// diffusers' scheduler. A stored [`SamplerConfig`] without `spacing` stays trailing.
    pub fn default_spacing(self) -> TimestepSpacing {
        match self {
            SamplerKind::Ddpm | SamplerKind::Ddim => TimestepSpacing::Trailing,
            SamplerKind::DpmPp2m => TimestepSpacing::Linspace,
        }
    }
}

impl std::str::FromStr for SamplerKind {
    type Err = CoreError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "ddpm" => Ok(SamplerKind::Ddpm),
            "ddim" => Ok(SamplerKind::Ddim),
            "dpmpp_2m" => Ok(SamplerKind::DpmPp2m),
            other => Err(CoreError::config(
                "sampler",
                format!("unknown sampler {other:?}: use ddpm, ddim or dpmpp_2m"),
            )),
        }
    }
}

/// A sampler and its settings, as requests and configs carry them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SamplerConfig {
    pub kind: SamplerKind,
    /// Number of network evaluations; T for full ancestral DDPM.
    pub steps: usize,
    /// DDIM's η (0 = deterministic); ignored by DDPM and DPM-Solver++.
    #[serde(default)]
    pub eta: f64,
    #[serde(default)]
    pub spacing: TimestepSpacing,
    /// Clamp the predicted x̂₀ to [−1, 1] at every step and step with the ε consistent
    /// with it (for DDIM not diffusers' `clip_sample`: see the module's doc).
    #[serde(default = "default_clip")]
    pub clip_denoised: bool,
    /// Threshold x̂₀ dynamically instead of clamping it (only with `clip_denoised`).
    #[serde(default)]
    pub dynamic_thresholding: Option<DynamicThresholding>,
    /// Guidance rescale φ in [0, 1] (Lin et al. 2024, diffusers' `guidance_rescale`);
    /// 0: none.
    #[serde(default)]
    pub guidance_rescale: f64,
    /// Guidance only at the timesteps t_lo ≤ t ≤ t_hi (Kynkäänniemi et al. 2024); at the
    /// others the conditional prediction alone, which saves its unconditional evaluation.
    /// `None`: at every step.
    #[serde(default)]
    pub guidance_interval: Option<(i64, i64)>,
    /// DPM-Solver++(2M)'s ODE (default) or SDE solver; only DPM-Solver++ reads it.
    #[serde(default)]
    pub dpm_solver: DpmSolverAlgorithm,
    /// DDPM's σ²: β̃ (default) or β; only DDPM reads it.
    #[serde(default)]
    pub variance: AncestralVariance,
}

fn default_clip() -> bool {
    true
}

impl SamplerConfig {
    /// Full ancestral DDPM over all T steps.
    pub fn ddpm(timesteps: usize) -> Self {
        SamplerConfig {
            kind: SamplerKind::Ddpm,
            steps: timesteps,
            eta: 0.0,
            spacing: TimestepSpacing::Trailing,
            clip_denoised: true,
            dynamic_thresholding: None,
            guidance_rescale: 0.0,
            guidance_interval: None,
            dpm_solver: DpmSolverAlgorithm::DpmSolverPp,
            variance: AncestralVariance::FixedSmall,
        }
    }

    /// Deterministic DDIM with `steps` steps.
    pub fn ddim(steps: usize) -> Self {
        SamplerConfig {
            kind: SamplerKind::Ddim,
            steps,
            eta: 0.0,
            spacing: TimestepSpacing::Trailing,
            clip_denoised: true,
            dynamic_thresholding: None,
            guidance_rescale: 0.0,
            guidance_interval: None,
            dpm_solver: DpmSolverAlgorithm::DpmSolverPp,
            variance: AncestralVariance::FixedSmall,
        }
    }

    /// DPM-Solver++(2M) with `steps` steps, diffusers' defaults (linspace spacing).
    pub fn dpmpp_2m(steps: usize) -> Self {
        SamplerConfig {
            kind: SamplerKind::DpmPp2m,
            steps,
            eta: 0.0,
            spacing: SamplerKind::DpmPp2m.default_spacing(),
            clip_denoised: true,
            dynamic_thresholding: None,
            guidance_rescale: 0.0,
            guidance_interval: None,
            dpm_solver: DpmSolverAlgorithm::DpmSolverPp,
            variance: AncestralVariance::FixedSmall,
        }
    }

    pub fn validate(&self, schedule: &NoiseSchedule) -> Result<()> {
        self.validate_for(schedule.timesteps())
    }

    /// [`validate`](Self::validate) for a schedule of `t_max` timesteps.
    pub(super) fn validate_for(&self, t_max: usize) -> Result<()> {
        if self.steps == 0 || self.steps > t_max {
            return Err(CoreError::config(
                "steps",
                format!("must be in 1..={t_max}, got {}", self.steps),
            ));
        }
        if !(0.0..=1.0).contains(&self.eta) {
            return Err(CoreError::config(
                "eta",
                format!("must be in [0, 1], got {}", self.eta),
            ));
        }
        if !(0.0..=1.0).contains(&self.guidance_rescale) {
            return Err(CoreError::config(
                "guidance_rescale",
                format!("must be in [0, 1], got {}", self.guidance_rescale),
            ));
        }
        if let Some((lo, hi)) = self.guidance_interval {
            if !(0 <= lo && lo <= hi && hi < t_max as i64) {
                return Err(CoreError::config(
                    "guidance_interval",
                    format!("must be timesteps 0 ≤ lo ≤ hi < {t_max}, got [{lo}, {hi}]"),
                ));
            }
        }
        if let Some(d) = self.dynamic_thresholding {
            let valid = d.ratio > 0.0 && d.ratio <= 1.0 && (1.0..=f64::MAX).contains(&d.max_value);
            if !valid {
                return Err(CoreError::config(
                    "dynamic_thresholding",
                    format!(
                        "ratio must be in (0, 1] and max_value a finite number ≥ 1, got {} and {}",
                        d.ratio, d.max_value
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The sample's whole trajectory: timesteps and coefficients, ending at t = 0.
    pub fn plan(&self, schedule: &NoiseSchedule) -> Result<Vec<PlannedStep>> {
        self.validate(schedule)?;
        let sampler: Box<dyn Sampler> = match self.kind {
            SamplerKind::Ddpm => Box::new(Ddpm {
                variance: self.variance,
            }),
            SamplerKind::Ddim => Box::new(Ddim { eta: self.eta }),
            SamplerKind::DpmPp2m => Box::new(DpmSolverPp2m {
                sde: self.dpm_solver == DpmSolverAlgorithm::SdeDpmSolverPp,
            }),
        };
        let ts = self
            .spacing
            .timesteps_for(self.kind, schedule.timesteps(), self.steps);
        let mut plan: Vec<PlannedStep> = ts
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                // The next timestep of the plan (diffusers uses t − ⌊T/n⌋, the same
                // whenever n divides T).
                let prev = ts.get(i + 1).copied().unwrap_or(-1);
                let before = i.checked_sub(1).map(|j| ts[j]);
                PlannedStep {
                    timestep: t,
                    prev_timestep: prev,
                    coefficients: sampler.multistep_coefficients(schedule, before, t, prev),
                    clip: self.clip_denoised.then(|| Clip::at(schedule, t)),
                    keep_x0: None,
                    threshold: self.dynamic_thresholding.filter(|_| self.clip_denoised),
                    guided: self.guides_at(t),
                }
            })
            .collect();
        for i in 1..plan.len() {
            if plan[i].coefficients.prev_x0 != 0.0 {
                plan[i - 1].keep_x0 = Some(Clip::at(schedule, plan[i - 1].timestep));
            }
        }
        Ok(plan)
    }
}

impl Clip {
    fn at(schedule: &NoiseSchedule, t: i64) -> Self {
        let ab = schedule.alpha_cumprod(t);
        Clip {
            sqrt_alpha_cumprod: ab.sqrt(),
            sqrt_one_minus_alpha_cumprod: (1.0 - ab).sqrt(),
        }
    }
}

/// One reverse step for a batch of samples, each at its own timestep with its own label,
/// guidance scale and coefficients.
pub struct DenoiseBatch<'a> {
    /// `[B, C, H, W]` on the model's device.
    pub x: &'a Tensor,
    pub timesteps: &'a [i64],
    /// Class per sample; the model's null label for "no class".
    pub labels: &'a [i64],
    pub guidance_scales: &'a [f64],
    pub coefficients: &'a [StepCoefficients],
    /// Per sample: clamp x̂₀ first, or not.
    pub clips: &'a [Option<Clip>],
    /// Per sample: return its x̂₀ too (for a multistep sampler's next step), or not.
    pub keep_x0: &'a [Option<Clip>],
    /// Per sample: threshold x̂₀ dynamically where it clips, or (`None`) clamp it. May be
    /// empty when no sample does.
    pub thresholds: &'a [Option<DynamicThresholding>],
    /// Per sample: guidance rescale φ. May be empty when every φ is 0.
    pub guidance_rescales: &'a [f64],
    /// `[B, C, H, W]` standard-normal z; may be `None` when every `coefficients.noise` is 0.
    pub noise: Option<&'a Tensor>,
    /// `[B, C, H, W]` x̂₀ of each sample's previous step (any finite value where
    /// `coefficients.prev_x0` is 0); may be `None` when every `coefficients.prev_x0` is 0.
    pub prev_x0: Option<&'a Tensor>,
}

/// What [`denoise_step`] returns.
#[derive(Debug)]
pub struct Denoised {
    /// x_s, `[B, C, H, W]`.
    pub x: Tensor,
    /// x̂₀ (clamped where clipped), `[B, C, H, W]`, when some sample's `keep_x0` asked for
    /// it; the rows of the samples that did not are unspecified.
    pub x0: Option<Tensor>,
}

/// Runs one guided forward pass (a single batch holding the conditional and unconditional
/// inputs) and returns every sample's `x_s = a·x_t + b·ε̃ + c·z + d·x̂₀'`.
pub fn denoise_step(model: &Model, batch: &DenoiseBatch) -> Result<Denoised> {
    let b = batch.x.size().first().copied().unwrap_or(0);
    let n = b as usize;
    if batch.timesteps.len() != n
        || batch.coefficients.len() != n
        || batch.clips.len() != n
        || batch.keep_x0.len() != n
    {
        return Err(CoreError::Input(format!(
            "batch of {b} with {} timesteps, {} coefficients, {} clips and {} keep_x0",
            batch.timesteps.len(),
            batch.coefficients.len(),
            batch.clips.len(),
            batch.keep_x0.len()
        )));
    }
    let device = batch.x.device();
    let _guard = tch::no_grad_guard();
    let t = timestep_tensor(batch.timesteps, device)?;
    let mut eps = guided_epsilon(
        model,
        batch.x,
        &t,
        batch.labels,
        batch.guidance_scales,
        batch.guidance_rescales,
    )?;
    let per_sample = |v: Vec<f32>| -> Result<Tensor> {
        Ok(Tensor::f_from_slice(&v)?
            .f_to_device(device)?
            .f_view([b, 1, 1, 1])?)
    };
    let column = |f: fn(&StepCoefficients) -> f64| {
        per_sample(batch.coefficients.iter().map(|c| f(c) as f32).collect())
    };
    let clips = batch.clips.iter().any(Option::is_some);
    let keeps = batch.keep_x0.iter().any(Option::is_some);
    let mut x0 = None;
    if clips || keeps {
        // x_t = √ᾱ·x₀ + σ·ε with σ = √(1−ᾱ) (a sample that clips and keeps has the same
        // (√ᾱ, σ) in both). Samples that do neither get (√ᾱ, σ) = (1, 1); those that do
        // not clip keep ε̂ = ε.
        let level = |f: fn(&Clip) -> f64| {
            per_sample(
                batch
                    .clips
                    .iter()
                    .zip(batch.keep_x0)
                    .map(|(c, k)| c.or(*k).map_or(1.0, |c| f(&c)) as f32)
                    .collect(),
            )
        };
        let sqrt_ab = level(|c| c.sqrt_alpha_cumprod)?;
        let sigma = level(|c| c.sqrt_one_minus_alpha_cumprod)?;
        // x̂₀ [B, C, H, W]
        let mut predicted = batch.x.f_sub(&eps.f_mul(&sigma)?)?.f_div(&sqrt_ab)?;
        if clips {
            let clipped = if batch.thresholds.iter().any(Option::is_some) {
                threshold_x0(&predicted, batch.thresholds)?
            } else {
                predicted.f_clamp(-1.0, 1.0)?
            };
            let eps_hat = batch.x.f_sub(&clipped.f_mul(&sqrt_ab)?)?.f_div(&sigma)?;
            let mask = per_sample(
                batch
                    .clips
                    .iter()
                    .map(|c| if c.is_some() { 1.0 } else { 0.0 })
                    .collect(),
            )?
            .f_gt(0.5)?;
            eps = eps_hat.f_where_self(&mask, &eps)?;
            predicted = clipped.f_where_self(&mask, &predicted)?;
        }
        x0 = keeps.then_some(predicted);
    }
    let mut out = batch
        .x
        .f_mul(&column(|c| c.x)?)?
        .f_add(&eps.f_mul(&column(|c| c.eps)?)?)?;
    if batch.coefficients.iter().any(|c| c.noise != 0.0) {
        let z = batch
            .noise
            .ok_or_else(|| CoreError::Input("a stochastic step needs noise".into()))?;
        out = out.f_add(&z.f_mul(&column(|c| c.noise)?)?)?;
    }
    if batch.coefficients.iter().any(|c| c.prev_x0 != 0.0) {
        let prev = batch.prev_x0.ok_or_else(|| {
            CoreError::Input("a multistep step needs the previous step's x̂₀".into())
        })?;
        out = out.f_add(&prev.f_mul(&column(|c| c.prev_x0)?)?)?;
    }
    Ok(Denoised { x: out, x0 })
}

/// What one image needs besides the model: class, guidance, seed, sampler.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleSpec {
    /// `None` for an unconditional sample.
    pub label: Option<i64>,
    /// w in ε̃ = ε_∅ + w·(ε_y − ε_∅); 1 = plain conditional, 0 = unconditional.
    pub guidance_scale: f64,
    pub seed: u64,
    pub sampler: SamplerConfig,
}

impl SampleSpec {
    /// Network evaluations (batch rows) one step of this sample costs: 2 for a guided
    /// conditional sample (its conditional and unconditional halves), else 1. Mirrors
    /// [`crate::guidance::guided_epsilon`], which adds the unconditional row exactly when
    /// a class is given and w ≠ 1. With a guidance interval it is an upper bound: the
    /// steps outside the interval cost 1 ([`SampleSpec::step_rows`] has each step's).
    pub fn rows_per_step(&self) -> usize {
        if self.label.is_some() && self.guidance_scale != 1.0 {
            2
        } else {
            1
        }
    }
}

/// One sample's progress through its plan: its current x_t, its own noise stream and, for
/// a multistep plan, the x̂₀ of its previous step.
#[derive(Debug)]
pub struct Trajectory {
    spec: SampleSpec,
    /// The label given to the network (the null label for unconditional samples).
    label: i64,
    plan: Vec<PlannedStep>,
    next: usize,
    rng: SampleRng,
    /// x_t, `[C, H, W]` on the model's device.
    x: Tensor,
    /// x̂₀ of the previous step when its plan step keeps it (`keep_x0`), `[C, H, W]` on
    /// the model's device: the history of a multistep sampler. Its timestep (λ) is
    /// already in the plan's coefficients.
    prev_x0: Option<Tensor>,
    /// Keep x̂₀ at every step that has one (clipping or multistep), for previews.
    track_x0: bool,
}

impl Trajectory {
    /// Starts at x_T ~ N(0, I) drawn from the sample's own seed.
    pub fn new(model: &Model, schedule: &NoiseSchedule, spec: SampleSpec) -> Result<Self> {
        let cfg = model.config();
        let label = match (spec.label, cfg.num_classes) {
            (Some(l), Some(n)) if (0..n).contains(&l) => l,
            (Some(l), Some(n)) => {
                return Err(CoreError::Input(format!(
                    "class {l} is out of range: the model has {n} classes"
                )));
            }
            (Some(_), None) => {
                return Err(CoreError::Input(
                    "the model is unconditional: it takes no class".into(),
                ));
            }
            (None, n) => n.unwrap_or(0),
        };
        if !spec.guidance_scale.is_finite() {
            return Err(CoreError::Input("guidance scale must be finite".into()));
        }
        let plan = spec.sampler.plan(schedule)?;
        let mut rng = SampleRng::new(spec.seed);
        let shape = [cfg.in_channels, cfg.image_size, cfg.image_size];
        let x = Tensor::f_from_slice(&rng.normal(shape.iter().product::<i64>() as usize))?
            .f_view(shape)?
            .f_to_device(model.device())?;
        Ok(Trajectory {
            spec,
            label,
            plan,
            next: 0,
            rng,
            x,
            prev_x0: None,
            track_x0: false,
        })
    }

    pub fn spec(&self) -> &SampleSpec {
        &self.spec
    }

    pub fn is_done(&self) -> bool {
        self.next >= self.plan.len()
    }

    /// Steps taken so far and in all.
    pub fn progress(&self) -> (usize, usize) {
        (self.next, self.plan.len())
    }

    /// Batch rows the coming step costs: [`SampleSpec::rows_per_step`] inside the guidance
    /// interval, 1 outside it; 0 once done.
    pub fn rows_now(&self) -> usize {
        match self.plan.get(self.next) {
            Some(step) if step.guided => self.spec.rows_per_step(),
            Some(_) => 1,
            None => 0,
        }
    }

    /// The step this sample takes next. Panics if done (a programmer error).
    pub fn current(&self) -> &PlannedStep {
        &self.plan[self.next]
    }

    /// x_t now (x_0 once done), `[C, H, W]`.
    pub fn x(&self) -> &Tensor {
        &self.x
    }

    /// Keeps x̂₀ of every step that computes one (the server's previews), not only those a
    /// multistep sampler needs. Costs one `[C, H, W]` tensor; the samples do not change.
    pub fn track_x0(&mut self, on: bool) {
        self.track_x0 = on;
    }

    /// x̂₀ of the last step, `[C, H, W]` (clamped where the step clips), when that step
    /// kept it: always for a multistep step, and at every clipping step once
    /// [`track_x0`](Self::track_x0) is on.
    pub fn x0(&self) -> Option<&Tensor> {
        self.prev_x0.as_ref()
    }

    /// Whether the coming step returns x̂₀, and at which noise level.
    fn keeps_x0(&self) -> Option<Clip> {
        let step = self.current();
        match (step.keep_x0, self.track_x0) {
            (Some(keep), _) => Some(keep),
            (None, true) => step.clip,
            (None, false) => None,
        }
    }

    /// z for the coming step (drawn only when that step adds noise, so the stream depends
    /// on nothing but the sample's own plan).
    fn draw_noise(&mut self) -> Option<Vec<f32>> {
        let step = self.current();
        (step.coefficients.noise != 0.0).then(|| self.rng.normal(self.x.numel()))
    }

    /// x̂₀' for the coming step: the kept x̂₀ where the step uses it, else zeros.
    fn prev_x0_for_step(&self) -> Result<Tensor> {
        match (&self.prev_x0, self.current().coefficients.prev_x0 != 0.0) {
            (Some(x0), true) => Ok(x0.shallow_clone()),
            (None, true) => Err(CoreError::Input(
                "a multistep step without the previous step's x̂₀".into(),
            )),
            (_, false) => Ok(self.x.f_zeros_like()?),
        }
    }

    fn advance(&mut self, x: Tensor, x0: Option<Tensor>) {
        self.x = x;
        self.prev_x0 = x0;
        self.next += 1;
    }
}

/// Advances every trajectory in `batch` by one step with one forward pass.
pub fn step_trajectories(model: &Model, batch: &mut [&mut Trajectory]) -> Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    if batch.iter().any(|t| t.is_done()) {
        return Err(CoreError::Input("a finished trajectory cannot step".into()));
    }
    let device = model.device();
    let xs: Vec<&Tensor> = batch.iter().map(|t| &t.x).collect();
    let x = Tensor::f_stack(&xs, 0)?; // [B, C, H, W]
    let timesteps: Vec<i64> = batch.iter().map(|t| t.current().timestep).collect();
    let labels: Vec<i64> = batch.iter().map(|t| t.label).collect();
    // Outside its guidance interval a sample is conditional only (w = 1: one row).
    let guidance: Vec<f64> = batch
        .iter()
        .map(|t| {
            if t.current().guided {
                t.spec.guidance_scale
            } else {
                1.0
            }
        })
        .collect();
    let rescales: Vec<f64> = batch
        .iter()
        .map(|t| t.spec.sampler.guidance_rescale)
        .collect();
    let coefficients: Vec<StepCoefficients> =
        batch.iter().map(|t| t.current().coefficients).collect();
    let clips: Vec<Option<Clip>> = batch.iter().map(|t| t.current().clip).collect();
    let thresholds: Vec<Option<DynamicThresholding>> =
        batch.iter().map(|t| t.current().threshold).collect();
    let keep_x0: Vec<Option<Clip>> = batch.iter().map(|t| t.keeps_x0()).collect();
    let prev_x0 = if coefficients.iter().any(|c| c.prev_x0 != 0.0) {
        let rows = batch
            .iter()
            .map(|t| t.prev_x0_for_step())
            .collect::<Result<Vec<_>>>()?;
        Some(Tensor::f_stack(&rows, 0)?) // [B, C, H, W]
    } else {
        None
    };
    let per_sample = x.size()[1..].iter().product::<i64>() as usize;
    let draws: Vec<Option<Vec<f32>>> = batch.iter_mut().map(|t| t.draw_noise()).collect();
    let noise = if draws.iter().any(Option::is_some) {
        let mut flat = Vec::with_capacity(per_sample * batch.len());
        for d in &draws {
            match d {
                Some(v) => flat.extend_from_slice(v),
                None => flat.extend(std::iter::repeat_n(0.0f32, per_sample)),
            }
        }
        Some(
            Tensor::f_from_slice(&flat)?
                .f_view(x.size().as_slice())?
                .f_to_device(device)?,
        )
    } else {
        None
    };
    let out = denoise_step(
        model,
        &DenoiseBatch {
            x: &x,
            timesteps: &timesteps,
            labels: &labels,
            guidance_scales: &guidance,
            coefficients: &coefficients,
            clips: &clips,
            keep_x0: &keep_x0,
            thresholds: &thresholds,
            guidance_rescales: &rescales,
            noise: noise.as_ref(),
            prev_x0: prev_x0.as_ref(),
        },
    )?;
    for (i, t) in batch.iter_mut().enumerate() {
        let i = i as i64;
        let x0 = match (keep_x0[i as usize], &out.x0) {
            (Some(_), Some(x0)) => Some(x0.f_get(i)?),
            _ => None,
        };
        t.advance(out.x.f_get(i)?, x0);
    }
    Ok(())
}

/// Samples whole trajectories, at most `max_batch` per forward pass, and returns the images
/// as `[N, C, H, W]` f32 in [−1, 1]. Samples with different samplers and step counts share
/// passes until the shorter ones finish.
pub fn sample(
    model: &Model,
    schedule: &NoiseSchedule,
    specs: &[SampleSpec],
    max_batch: usize,
) -> Result<Tensor> {
    if specs.is_empty() {
        return Err(CoreError::Input("no samples requested".into()));
    }
    let max_batch = max_batch.max(1);
    let mut trajectories = specs
        .iter()
        .map(|s| Trajectory::new(model, schedule, *s))
        .collect::<Result<Vec<_>>>()?;
    loop {
        let mut active: Vec<&mut Trajectory> = trajectories
            .iter_mut()
            .filter(|t| !t.is_done())
            .take(max_batch)
            .collect();
        if active.is_empty() {
            break;
        }
        step_trajectories(model, &mut active)?;
    }
    let xs: Vec<&Tensor> = trajectories.iter().map(|t| t.x()).collect();
    Ok(Tensor::f_stack(&xs, 0)?.f_clamp(-1.0, 1.0)?)
}

/// `[N, C, H, W]` in [−1, 1] → `[N, C, H, W]` uint8 on the CPU.
pub fn to_uint8(images: &Tensor) -> Result<Tensor> {
    Ok(images
        .f_clamp(-1.0, 1.0)?
        .f_add_scalar(1.0)?
        .f_mul_scalar(127.5)?
        .f_round()?
        .f_to_kind(Kind::Uint8)?
        .f_to_device(tch::Device::Cpu)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::ScheduleConfig;
    use tch::Device;

    fn schedule() -> NoiseSchedule {
        NoiseSchedule::new(ScheduleConfig::default(), Device::Cpu).unwrap()
    }

    #[test]
    fn full_ddpm_plan_visits_every_timestep_down_to_zero() {
        let plan = SamplerConfig::ddpm(1000).plan(&schedule()).unwrap();
        assert_eq!(plan.len(), 1000);
        assert_eq!(plan[0].timestep, 999);
        assert_eq!(plan[999].timestep, 0);
        assert_eq!(plan[999].prev_timestep, -1);
        assert_eq!(
            plan[999].coefficients.noise, 0.0,
            "no noise on the last step"
        );
        assert!(plan[998].coefficients.noise > 0.0);
    }

    #[test]
    fn spacings_match_their_definitions() {
        assert_eq!(
            TimestepSpacing::Leading.timesteps(1000, 4),
            vec![750, 500, 250, 0]
        );
        assert_eq!(
            TimestepSpacing::Trailing.timesteps(1000, 4),
            vec![999, 749, 499, 249]
        );
        // 999·k/4 = 999, 749.25, 499.5, 249.75: 499.5 rounds to even.
        assert_eq!(
            TimestepSpacing::Linspace.timesteps(1000, 4),
            vec![999, 749, 500, 250]
        );
        let full: Vec<i64> = (0..1000).rev().collect();
        assert_eq!(TimestepSpacing::Linspace.timesteps(1000, 1000), full);
        let near_full = TimestepSpacing::Linspace.timesteps(1000, 999);
        assert!(near_full.windows(2).all(|w| w[0] > w[1]), "no repeats");
    }

    /// First order (no history) on the first and the last step, second order between; a
    /// step keeps its x̂₀ exactly when the next one uses it.
    #[test]
    fn dpmpp_2m_plan_is_multistep_between_first_order_ends() {
        let plan = SamplerConfig::dpmpp_2m(10).plan(&schedule()).unwrap();
        let ts: Vec<i64> = plan.iter().map(|s| s.timestep).collect();
        assert_eq!(ts, vec![999, 899, 799, 699, 599, 500, 400, 300, 200, 100]);
        let orders: Vec<bool> = plan.iter().map(|s| s.coefficients.prev_x0 != 0.0).collect();
        assert_eq!(orders, [[false].as_slice(), &[true; 8], &[false]].concat());
        for (i, step) in plan.iter().enumerate() {
            let next_uses = plan
                .get(i + 1)
                .is_some_and(|n| n.coefficients.prev_x0 != 0.0);
            assert_eq!(step.keep_x0.is_some(), next_uses, "step {i}");
            if step.keep_x0.is_some() {
                assert_eq!(step.keep_x0, step.clip, "step {i}: the same (√ᾱ, σ)");
            }
            assert_eq!(step.coefficients.noise, 0.0);
        }
        assert!(SamplerConfig::ddim(10)
            .plan(&schedule())
            .unwrap()
            .iter()
            .all(|s| s.keep_x0.is_none() && s.coefficients.prev_x0 == 0.0));
        assert_eq!(
            "dpmpp_2m".parse::<SamplerKind>().unwrap(),
            SamplerKind::DpmPp2m
        );
        assert_eq!(
            serde_json::to_value(SamplerKind::DpmPp2m).unwrap(),
            serde_json::json!("dpmpp_2m")
        );
    }

    #[test]
    fn deterministic_ddim_adds_no_noise() {
        let plan = SamplerConfig::ddim(20).plan(&schedule()).unwrap();
        assert_eq!(plan.len(), 20);
        assert!(plan.iter().all(|s| s.coefficients.noise == 0.0));
    }

    /// With the exact ε of a point-mass data distribution at x₀, every sampler must land on
    /// x₀ whatever noise it adds on the way (x̂₀' = x₀ then too).
    #[test]
    fn exact_epsilon_recovers_the_data_point() {
        let s = schedule();
        let x0 = 0.37;
        for cfg in [
            SamplerConfig::ddpm(1000),
            SamplerConfig::ddim(20),
            SamplerConfig {
                eta: 1.0,
                ..SamplerConfig::ddim(50)
            },
            SamplerConfig {
                kind: SamplerKind::Ddpm,
                steps: 10,
                eta: 0.0,
                spacing: TimestepSpacing::Leading,
                clip_denoised: false,
                dynamic_thresholding: None,
                guidance_rescale: 0.0,
                guidance_interval: None,
                dpm_solver: DpmSolverAlgorithm::DpmSolverPp,
                variance: AncestralVariance::FixedLarge,
            },
            SamplerConfig::dpmpp_2m(1),
            SamplerConfig::dpmpp_2m(2),
            SamplerConfig::dpmpp_2m(20),
            SamplerConfig {
                spacing: TimestepSpacing::Trailing,
                ..SamplerConfig::dpmpp_2m(7)
            },
            SamplerConfig {
                dpm_solver: DpmSolverAlgorithm::SdeDpmSolverPp,
                ..SamplerConfig::dpmpp_2m(9)
            },
        ] {
            let mut x = 1.3; // x_T
            for (i, step) in cfg.plan(&s).unwrap().iter().enumerate() {
                let ab = s.alpha_cumprod(step.timestep);
                let eps = (x - ab.sqrt() * x0) / (1.0 - ab).sqrt();
                let z = if i % 2 == 0 { 0.8 } else { -1.1 };
                let c = step.coefficients;
                x = c.x * x + c.eps * eps + c.noise * z + c.prev_x0 * x0;
            }
            assert!((x - x0).abs() < 1e-9, "{cfg:?} ends at {x}");
        }
    }

    #[test]
    fn rejects_out_of_range_settings() {
        let s = schedule();
        let mut c = SamplerConfig::ddim(0);
        assert!(c.plan(&s).unwrap_err().to_string().contains("steps"));
        c.steps = 1001;
        assert!(c.plan(&s).is_err());
        c.steps = 10;
        c.eta = f64::NAN;
        assert!(c.plan(&s).unwrap_err().to_string().contains("eta"));
        c.eta = 0.0;
        for (ratio, max_value) in [(0.0, 1.0), (1.5, 1.0), (0.9, 0.5), (0.9, f64::INFINITY)] {
            c.dynamic_thresholding = Some(DynamicThresholding { ratio, max_value });
            assert!(c.plan(&s).is_err(), "{ratio} {max_value}");
        }
        c.dynamic_thresholding = None;
        c.guidance_rescale = 1.5;
        assert!(c
            .plan(&s)
            .unwrap_err()
            .to_string()
            .contains("guidance_rescale"));
        c.guidance_rescale = 0.5;
        for interval in [(-1, 10), (10, 5), (0, 1000)] {
            c.guidance_interval = Some(interval);
            assert!(c.plan(&s).is_err(), "{interval:?}");
        }
        c.guidance_interval = Some((0, 500));
        let guided: Vec<bool> = c.plan(&s).unwrap().iter().map(|p| p.guided).collect();
        assert_eq!(
            guided,
            [[false; 5], [true; 5]].concat(),
            "999…99: guided at ≤ 500"
        );
        assert!("euler".parse::<SamplerKind>().is_err());
    }
}
