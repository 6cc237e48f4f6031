//! Reverse-process samplers, built from one step that works on a batch whose samples sit
//! at different timesteps with different samplers.
//!
//! Every sampler here moves a sample from timestep t to s < t by
//! `x_s = a·x_t + b·ε̃ + c·z`, with scalars (a, b, c) that depend only on the sampler and
//! (t, s). A sample's whole trajectory is therefore a *plan*: its list of timesteps with
//! their coefficients. [`denoise_step`] runs one guided forward pass for a batch and
//! applies each sample's own coefficients, and [`Trajectory`] walks one sample through its
//! plan with its own seeded noise. [`sample`] (whole trajectories, used by the trainer's
//! sample grids and the tests) and the server's step-level batcher are both built on them.
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
//! Layout: `ddpm` (ancestral DDPM), `ddim` (DDIM with η).

mod ddim;
mod ddpm;

pub use ddim::Ddim;
pub use ddpm::Ddpm;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::{
    error::{CoreError, Result},
    guidance::{guided_epsilon, timestep_tensor},
    noise::SampleRng,
    schedule::NoiseSchedule,
    unet::Model,
};

/// `x_s = x·x_t + eps·ε̃ + noise·z` for one sample and one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepCoefficients {
    pub x: f64,
    pub eps: f64,
    pub noise: f64,
}

/// Clamp x̂₀ to [−1, 1] before stepping from t: needs √ᾱ_t and √(1−ᾱ_t).
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
}

/// A reverse-process sampler: the coefficients of one step t → s.
pub trait Sampler {
    fn coefficients(&self, schedule: &NoiseSchedule, t: i64, t_prev: i64) -> StepCoefficients;
}

/// Which timesteps a trajectory of n < T steps visits (diffusers' `timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    /// `k·⌊T/n⌋` for k = n−1…0: starts below T−1 (DDIM paper, diffusers' default).
    Leading,
    /// `round(T − k·T/n) − 1` for k = 0…n−1: always starts at T−1, from pure noise
    /// (Lin et al. 2024 show this is the better choice for few steps).
    #[default]
    Trailing,
}

impl TimestepSpacing {
    /// The descending timesteps of an n-step trajectory over T.
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
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SamplerKind {
    Ddpm,
    Ddim,
}

impl std::str::FromStr for SamplerKind {
    type Err = CoreError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "ddpm" => Ok(SamplerKind::Ddpm),
            "ddim" => Ok(SamplerKind::Ddim),
            other => Err(CoreError::config(
                "sampler",
                format!("unknown sampler {other:?}: use ddpm or ddim"),
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
    /// DDIM's η (0 = deterministic); ignored by DDPM.
    #[serde(default)]
    pub eta: f64,
    #[serde(default)]
    pub spacing: TimestepSpacing,
    /// Clamp the predicted x̂₀ to [−1, 1] at every step and step with the ε consistent
    /// with it (for DDIM not diffusers' `clip_sample`: see the module's doc).
    #[serde(default = "default_clip")]
    pub clip_denoised: bool,
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
        }
    }

    pub fn validate(&self, schedule: &NoiseSchedule) -> Result<()> {
        let t_max = schedule.timesteps();
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
        Ok(())
    }

    /// The sample's whole trajectory: timesteps and coefficients, ending at t = 0.
    pub fn plan(&self, schedule: &NoiseSchedule) -> Result<Vec<PlannedStep>> {
        self.validate(schedule)?;
        let sampler: Box<dyn Sampler> = match self.kind {
            SamplerKind::Ddpm => Box::new(Ddpm),
            SamplerKind::Ddim => Box::new(Ddim { eta: self.eta }),
        };
        let ts = self.spacing.timesteps(schedule.timesteps(), self.steps);
        Ok(ts
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                // The next timestep of the plan (diffusers uses t − ⌊T/n⌋, the same
                // whenever n divides T).
                let prev = ts.get(i + 1).copied().unwrap_or(-1);
                let ab = schedule.alpha_cumprod(t);
                PlannedStep {
                    timestep: t,
                    prev_timestep: prev,
                    coefficients: sampler.coefficients(schedule, t, prev),
                    clip: self.clip_denoised.then(|| Clip {
                        sqrt_alpha_cumprod: ab.sqrt(),
                        sqrt_one_minus_alpha_cumprod: (1.0 - ab).sqrt(),
                    }),
                }
            })
            .collect())
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
    /// `[B, C, H, W]` standard-normal z; may be `None` when every `coefficients.noise` is 0.
    pub noise: Option<&'a Tensor>,
}

/// Runs one guided forward pass (a single batch holding the conditional and unconditional
/// inputs) and returns every sample's `x_s = a·x_t + b·ε̃ + c·z`.
pub fn denoise_step(model: &Model, batch: &DenoiseBatch) -> Result<Tensor> {
    let b = batch.x.size().first().copied().unwrap_or(0);
    let n = b as usize;
    if batch.timesteps.len() != n || batch.coefficients.len() != n || batch.clips.len() != n {
        return Err(CoreError::Input(format!(
            "batch of {b} with {} timesteps and {} coefficients",
            batch.timesteps.len(),
            batch.coefficients.len()
        )));
    }
    let device = batch.x.device();
    let _guard = tch::no_grad_guard();
    let t = timestep_tensor(batch.timesteps, device);
    let mut eps = guided_epsilon(model, batch.x, &t, batch.labels, batch.guidance_scales)?;
    let per_sample = |v: Vec<f32>| Tensor::from_slice(&v).to_device(device).view([b, 1, 1, 1]);
    let column = |f: fn(&StepCoefficients) -> f64| {
        per_sample(batch.coefficients.iter().map(|c| f(c) as f32).collect())
    };
    if batch.clips.iter().any(Option::is_some) {
        // x_t = √ᾱ·x₀ + σ·ε with σ = √(1−ᾱ). Samples that do not clip get (√ᾱ, σ) = (1, 1)
        // and an infinite clamp: ε̂ = ε.
        let sqrt_ab = per_sample(
            batch
                .clips
                .iter()
                .map(|c| c.map_or(1.0, |c| c.sqrt_alpha_cumprod) as f32)
                .collect(),
        );
        let sigma = per_sample(
            batch
                .clips
                .iter()
                .map(|c| c.map_or(1.0, |c| c.sqrt_one_minus_alpha_cumprod) as f32)
                .collect(),
        );
        let x0 = (batch.x - &eps * &sigma) / &sqrt_ab; // x̂₀ [B, C, H, W]
        let clipped = x0.clamp(-1.0, 1.0);
        let eps_hat = (batch.x - clipped * &sqrt_ab) / &sigma;
        let mask = per_sample(
            batch
                .clips
                .iter()
                .map(|c| if c.is_some() { 1.0 } else { 0.0 })
                .collect(),
        )
        .gt(0.5);
        eps = eps_hat.where_self(&mask, &eps);
    }
    let mut out = batch
        .x
        .f_mul(&column(|c| c.x))?
        .f_add(&eps.f_mul(&column(|c| c.eps))?)?;
    if batch.coefficients.iter().any(|c| c.noise != 0.0) {
        let z = batch
            .noise
            .ok_or_else(|| CoreError::Input("a stochastic step needs noise".into()))?;
        out = out.f_add(&z.f_mul(&column(|c| c.noise))?)?;
    }
    Ok(out)
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

/// One sample's progress through its plan: its current x_t (on the host, `[C, H, W]`
/// values) and its own noise stream.
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
        let x = Tensor::from_slice(&rng.normal(shape.iter().product::<i64>() as usize))
            .view(shape)
            .to_device(model.device());
        Ok(Trajectory {
            spec,
            label,
            plan,
            next: 0,
            rng,
            x,
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

    /// The step this sample takes next. Panics if done (a programmer error).
    pub fn current(&self) -> &PlannedStep {
        &self.plan[self.next]
    }

    /// x_t now (x_0 once done), `[C, H, W]`.
    pub fn x(&self) -> &Tensor {
        &self.x
    }

    /// z for the coming step (drawn only when that step adds noise, so the stream depends
    /// on nothing but the sample's own plan).
    fn draw_noise(&mut self) -> Option<Vec<f32>> {
        let step = self.current();
        (step.coefficients.noise != 0.0).then(|| self.rng.normal(self.x.numel()))
    }

    fn advance(&mut self, x: Tensor) {
        self.x = x;
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
    let guidance: Vec<f64> = batch.iter().map(|t| t.spec.guidance_scale).collect();
    let coefficients: Vec<StepCoefficients> =
        batch.iter().map(|t| t.current().coefficients).collect();
    let clips: Vec<Option<Clip>> = batch.iter().map(|t| t.current().clip).collect();
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
            Tensor::from_slice(&flat)
                .view(x.size().as_slice())
                .to_device(device),
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
            noise: noise.as_ref(),
        },
    )?;
    for (i, t) in batch.iter_mut().enumerate() {
        t.advance(out.get(i as i64));
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
    Ok(Tensor::f_stack(&xs, 0)?.clamp(-1.0, 1.0))
}

/// `[N, C, H, W]` in [−1, 1] → `[N, C, H, W]` uint8 on the CPU.
pub fn to_uint8(images: &Tensor) -> Tensor {
    ((images.clamp(-1.0, 1.0) + 1.0) * 127.5)
        .round()
        .to_kind(Kind::Uint8)
        .to_device(tch::Device::Cpu)
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
    }

    #[test]
    fn deterministic_ddim_adds_no_noise() {
        let plan = SamplerConfig::ddim(20).plan(&schedule()).unwrap();
        assert_eq!(plan.len(), 20);
        assert!(plan.iter().all(|s| s.coefficients.noise == 0.0));
    }

    /// With the exact ε of a point-mass data distribution at x₀, every sampler must land on
    /// x₀ whatever noise it adds on the way.
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
            },
        ] {
            let mut x = 1.3; // x_T
            for (i, step) in cfg.plan(&s).unwrap().iter().enumerate() {
                let ab = s.alpha_cumprod(step.timestep);
                let eps = (x - ab.sqrt() * x0) / (1.0 - ab).sqrt();
                let z = if i % 2 == 0 { 0.8 } else { -1.1 };
                let c = step.coefficients;
                x = c.x * x + c.eps * eps + c.noise * z;
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
        assert!("euler".parse::<SamplerKind>().is_err());
    }
}
