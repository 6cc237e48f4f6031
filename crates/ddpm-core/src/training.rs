//! The training objective (Ho et al. 2020, Algorithm 1) with classifier-free guidance's
//! label dropout: L = ‖ε − ε_θ(√ᾱ_t·x₀ + √(1−ᾱ_t)·ε, t, ỹ)‖², t ~ U{0..T−1}, ε ~ N(0, I),
//! and ỹ the null label with probability p, independently per sample (the seed dropped
//! the labels of the whole batch at once).
//!
//! Beyond the seed: Min-SNR-γ loss weighting ([`LossWeighting`]) and a cosine
//! learning-rate decay ([`LrSchedule`]), both off in the seed preset.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::{
    ema::{Ema, EmaConfig},
    error::{CoreError, Result},
    flat::FlatParams,
    optim::{AdamW, AdamWConfig},
    schedule::NoiseSchedule,
    unet::{Model, UNetConfig},
};

/// A network in training: its weights, their EMA and AdamW, all over the same flat
/// parameter layout. A step is `diffusion_loss(&learner.model, …)`, `backward()`, then
/// [`Learner::update`].
#[derive(Debug)]
pub struct Learner {
    pub model: Model,
    pub ema: Ema,
    pub optimizer: AdamW,
}

impl Learner {
    /// A freshly initialised network (from libtorch's generator: seed it first), its EMA
    /// starting as a copy, and an optimizer with zero moments.
    pub fn new(
        config: &UNetConfig,
        device: Device,
        optimizer: AdamWConfig,
        ema: EmaConfig,
    ) -> Result<Self> {
        let model = Model::new(config, device)?;
        let params = FlatParams::new(
            model
                .named_variables()
                .into_iter()
                .map(|(_, t)| t)
                .collect(),
        );
        let ema = Ema::new(config, &params, ema)?;
        Ok(Learner {
            model,
            ema,
            optimizer: AdamW::new(params, optimizer),
        })
    }

    /// After `backward()`: one AdamW update at `lr` (gradients clipped to
    /// `max_grad_norm`), then the EMA update. Returns the gradient norm before clipping as
    /// a 0-d tensor (reading it syncs with the GPU).
    pub fn update(&mut self, lr: f64, max_grad_norm: Option<f64>) -> Result<Tensor> {
        self.update_with(lr, max_grad_norm, |_| Ok::<(), CoreError>(()))
    }

    /// [`Learner::update`] with `reduce` applied to the flat gradient first, in place
    /// (data parallelism averages it over the ranks there); clipping, AdamW and the EMA
    /// then see the reduced gradient.
    pub fn update_with<E: From<CoreError>>(
        &mut self,
        lr: f64,
        max_grad_norm: Option<f64>,
        reduce: impl FnOnce(&mut Tensor) -> std::result::Result<(), E>,
    ) -> std::result::Result<Tensor, E> {
        let updates_done = self.optimizer.steps();
        let grad_norm = self.optimizer.step_with(lr, max_grad_norm, reduce)?;
        self.ema.update(self.optimizer.params(), updates_done)?;
        Ok(grad_norm)
    }
}

/// How the per-sample ε-MSE is weighted by timestep in the training objective.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LossWeighting {
    /// Every timestep alike: the plain ε-MSE of Ho et al. 2020 (the seed).
    #[default]
    Uniform,
    /// Min-SNR-γ (Hang et al. 2023): sample i is weighted by min(SNR(t_i), γ) / SNR(t_i)
    /// with SNR(t) = ᾱ_t / (1 − ᾱ_t), the ε-prediction form of their eq. 12. Low-noise
    /// timesteps, whose easy gradients otherwise dominate, count less; the paper's γ is 5.
    MinSnr { gamma: f64 },
}

impl LossWeighting {
    pub fn validate(&self) -> Result<()> {
        match *self {
            LossWeighting::Uniform => Ok(()),
            LossWeighting::MinSnr { gamma } if gamma.is_finite() && gamma > 0.0 => Ok(()),
            LossWeighting::MinSnr { gamma } => Err(CoreError::config(
                "training.loss_weighting.gamma",
                format!("must be a positive number, got {gamma}"),
            )),
        }
    }

    /// The weight of each timestep, `[T]` f32 on `device`, or `None` for uniform.
    fn table(&self, schedule: &NoiseSchedule, device: Device) -> Option<Tensor> {
        match *self {
            LossWeighting::Uniform => None,
            LossWeighting::MinSnr { gamma } => {
                let w: Vec<f64> = schedule
                    .alphas_cumprod
                    .iter()
                    .map(|&ab| {
                        let snr = ab / (1.0 - ab);
                        snr.min(gamma) / snr
                    })
                    .collect();
                Some(
                    Tensor::from_slice(&w)
                        .to_kind(Kind::Float)
                        .to_device(device),
                )
            }
        }
    }
}

/// What a training step minimises.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Objective {
    /// Probability of replacing each sample's label by the null label, independently.
    pub label_dropout: f64,
    pub weighting: LossWeighting,
}

impl Default for Objective {
    /// The seed's: 10 % label dropout, plain ε-MSE.
    fn default() -> Self {
        Objective {
            label_dropout: 0.1,
            weighting: LossWeighting::Uniform,
        }
    }
}

/// The random draws of one training step for a batch of B samples.
#[derive(Debug)]
pub struct StepDraws {
    /// t ~ U{0..T−1}, `[B]` int64.
    pub t: Tensor,
    /// ε ~ N(0, I), `[B, C, H, W]`: standard normal, not the seed's uniform.
    pub noise: Tensor,
    /// Which samples lose their label, `[B]` bool (`None`: none do).
    pub dropped: Option<Tensor>,
}

impl StepDraws {
    /// Draws from libtorch's generator on `x0`'s device (the caller seeds it), in a fixed
    /// order: t, then ε, then the dropout mask. The PyTorch references draw in the same
    /// order, so the same seed gives the same draws on both sides.
    pub fn sample(schedule: &NoiseSchedule, x0: &Tensor, label_dropout: f64) -> StepDraws {
        let (b, device) = (x0.size()[0], x0.device());
        let t = Tensor::randint(schedule.timesteps() as i64, [b], (Kind::Int64, device));
        let noise = x0.randn_like();
        let dropped = (label_dropout > 0.0)
            .then(|| Tensor::rand([b], (Kind::Float, device)).lt(label_dropout));
        StepDraws { t, noise, dropped }
    }

    /// The draws of samples `share` of a global batch of `global` samples shaped like
    /// `x0_share` (the share's images): everything is drawn for the whole global batch
    /// in [`StepDraws::sample`]'s order and then sliced, so a sample's draws depend on
    /// its index in the global batch, never on which rank computes it. With the whole
    /// batch as the share this is exactly [`StepDraws::sample`].
    pub fn sample_share(
        schedule: &NoiseSchedule,
        x0_share: &Tensor,
        global: i64,
        share: std::ops::Range<i64>,
        label_dropout: f64,
    ) -> Result<StepDraws> {
        let size = x0_share.size();
        let len = share.end - share.start;
        if size.first() != Some(&len) || share.start < 0 || share.end > global {
            return Err(CoreError::Input(format!(
                "a share {share:?} of a global batch of {global} does not match images of shape {size:?}"
            )));
        }
        let device = x0_share.device();
        let mut shape = size.clone();
        shape[0] = global;
        let t = Tensor::randint(schedule.timesteps() as i64, [global], (Kind::Int64, device));
        let noise = Tensor::randn(shape.as_slice(), (x0_share.kind(), device));
        let dropped = (label_dropout > 0.0)
            .then(|| Tensor::rand([global], (Kind::Float, device)).lt(label_dropout));
        let slice = |x: Tensor| x.narrow(0, share.start, len);
        Ok(StepDraws {
            t: slice(t),
            noise: slice(noise),
            dropped: dropped.map(slice),
        })
    }
}

/// One step's loss.
#[derive(Debug)]
pub struct StepLoss {
    /// The objective to call `backward()` on (0-d): the batch mean of the weighted
    /// per-sample ε-MSE.
    pub loss: Tensor,
    /// Each sample's plain ε-MSE, `[B]` f32, detached: what the trainer logs (comparable
    /// across weightings) and splits by timestep.
    pub per_sample: Tensor,
    /// Each sample's timestep, `[B]` int64.
    pub t: Tensor,
}

/// The noise-prediction loss for a batch `x0: [B, C, H, W]` in [−1, 1] with class
/// `labels: [B]` (ignored by an unconditional model). Draws t, ε and the dropout from
/// libtorch's generator on the batch's device (the caller seeds it).
pub fn diffusion_loss(
    model: &Model,
    schedule: &NoiseSchedule,
    x0: &Tensor,
    labels: Option<&Tensor>,
    objective: &Objective,
) -> Result<StepLoss> {
    check_batch(model, x0)?;
    let draws = StepDraws::sample(schedule, x0, objective.label_dropout);
    diffusion_loss_with(model, schedule, x0, labels, &draws, objective.weighting)
}

/// [`diffusion_loss`] with the step's random draws given (the parity tests feed
/// PyTorch's).
pub fn diffusion_loss_with(
    model: &Model,
    schedule: &NoiseSchedule,
    x0: &Tensor,
    labels: Option<&Tensor>,
    draws: &StepDraws,
    weighting: LossWeighting,
) -> Result<StepLoss> {
    check_batch(model, x0)?;
    let b = x0.size()[0];
    let xt = schedule.q_sample(x0, &draws.t, &draws.noise)?;
    let labels = match (model.config().null_label(), labels) {
        (Some(null), Some(l)) => {
            if l.size() != [b] {
                return Err(CoreError::Input(format!(
                    "labels have shape {:?}, expected [{b}]",
                    l.size()
                )));
            }
            Some(match &draws.dropped {
                Some(dropped) => l.where_self(&dropped.logical_not(), &l.full_like(null)),
                None => l.shallow_clone(),
            })
        }
        _ => None,
    };
    // Labels come from the dataset (ids below num_classes); no per-step range check, which
    // would sync with the GPU.
    let eps = model.net.forward(&xt, &draws.t, labels.as_ref());
    let per_sample =
        (eps - &draws.noise)
            .square()
            .mean_dim([1i64, 2, 3].as_slice(), false, Kind::Float); // [B]
    let loss = match weighting.table(schedule, x0.device()) {
        None => per_sample.mean(Kind::Float),
        Some(weights) => (&per_sample * weights.index_select(0, &draws.t)).mean(Kind::Float),
    };
    Ok(StepLoss {
        loss,
        per_sample: per_sample.detach(),
        t: draws.t.shallow_clone(),
    })
}

fn check_batch(model: &Model, x0: &Tensor) -> Result<()> {
    let cfg = model.config();
    let size = x0.size();
    if size.len() != 4 || size[1..] != [cfg.in_channels, cfg.image_size, cfg.image_size] {
        return Err(CoreError::Input(format!(
            "training batch has shape {size:?}, the model takes [B, {}, {}, {}]",
            cfg.in_channels, cfg.image_size, cfg.image_size
        )));
    }
    Ok(())
}

/// How the learning rate moves over a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    /// Linear warm-up, then constant (the seed, with no warm-up).
    #[default]
    Constant,
    /// Linear warm-up, then a half cosine from the peak down to 0 at the last step
    /// (Loshchilov & Hutter 2017 without restarts; `get_cosine_schedule_with_warmup`).
    Cosine,
}

impl LrSchedule {
    /// The learning rate of `step` (1-based) of `total_steps`, with peak `lr` reached
    /// linearly over `warmup_steps`.
    pub fn lr_at(self, lr: f64, warmup_steps: i64, total_steps: i64, step: i64) -> f64 {
        if warmup_steps > 0 && step < warmup_steps {
            return lr * step as f64 / warmup_steps as f64;
        }
        match self {
            LrSchedule::Constant => lr,
            LrSchedule::Cosine => {
                let span = (total_steps - warmup_steps).max(1) as f64;
                let progress = ((step - warmup_steps) as f64 / span).clamp(0.0, 1.0);
                lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ScheduleConfig;

    #[test]
    fn label_dropout_is_per_sample() {
        tch::manual_seed(0);
        let schedule = NoiseSchedule::new(ScheduleConfig::default(), Device::Cpu).unwrap();
        let x0 = Tensor::zeros([10_000, 1, 1, 1], (Kind::Float, Device::Cpu));
        let draws = StepDraws::sample(&schedule, &x0, 0.1);
        let frac = draws
            .dropped
            .unwrap()
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        // Whole-batch dropout would give 0 or 1; per-sample gives ≈ p.
        assert!((frac - 0.1).abs() < 0.02, "{frac}");
        assert!(StepDraws::sample(&schedule, &x0, 0.0).dropped.is_none());
    }

    #[test]
    fn min_snr_weights_follow_their_definition() {
        let schedule = NoiseSchedule::new(ScheduleConfig::default(), Device::Cpu).unwrap();
        let w = LossWeighting::MinSnr { gamma: 5.0 }
            .table(&schedule, Device::Cpu)
            .unwrap();
        let w = Vec::<f32>::try_from(&w).unwrap();
        for t in [0usize, 10, 100, 500, 999] {
            let ab = schedule.alphas_cumprod[t];
            let snr = ab / (1.0 - ab);
            let expected = if snr > 5.0 { 5.0 / snr } else { 1.0 };
            assert!((w[t] as f64 - expected).abs() < 1e-6, "t={t}");
        }
        // High SNR (little noise) is down-weighted, low SNR is left alone.
        assert!(w[0] < 1e-3);
        assert_eq!(w[999], 1.0);
        assert!(LossWeighting::MinSnr { gamma: 0.0 }.validate().is_err());
        assert!(LossWeighting::Uniform
            .table(&schedule, Device::Cpu)
            .is_none());
    }

    #[test]
    fn learning_rate_warms_up_then_holds_or_decays() {
        let c = LrSchedule::Constant;
        assert_eq!(c.lr_at(1.0, 0, 100, 1), 1.0);
        assert_eq!(c.lr_at(1.0, 4, 100, 1), 0.25);
        assert_eq!(c.lr_at(1.0, 4, 100, 4), 1.0);
        assert_eq!(c.lr_at(1.0, 4, 100, 100), 1.0);
        let cos = LrSchedule::Cosine;
        assert_eq!(cos.lr_at(2.0, 10, 110, 5), 1.0);
        assert!((cos.lr_at(2.0, 10, 110, 10) - 2.0).abs() < 1e-12);
        assert!((cos.lr_at(2.0, 10, 110, 60) - 1.0).abs() < 1e-12);
        assert!(cos.lr_at(2.0, 10, 110, 110).abs() < 1e-12);
        assert!(cos.lr_at(2.0, 10, 110, 200).abs() < 1e-12);
    }
}
