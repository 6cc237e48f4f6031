//! The training objective (Ho et al. 2020, Algorithm 1) with classifier-free guidance's
//! label dropout: L = ‖ε − ε_θ(√ᾱ_t·x₀ + √(1−ᾱ_t)·ε, t, ỹ)‖², t ~ U{0..T−1}, ε ~ N(0, I),
//! and ỹ the null label with probability p, independently per sample (the seed dropped
//! the labels of the whole batch at once).

use tch::{Device, Kind, Reduction, Tensor};

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
        let updates_done = self.optimizer.steps();
        let grad_norm = self.optimizer.step(lr, max_grad_norm);
        self.ema.update(self.optimizer.params(), updates_done)?;
        Ok(grad_norm)
    }
}

/// Replaces each label by `null` with probability `p`, independently. `[B]` int64.
pub fn drop_labels(labels: &Tensor, null: i64, p: f64) -> Tensor {
    if p <= 0.0 {
        return labels.shallow_clone();
    }
    let mask = Tensor::rand([labels.size()[0]], (Kind::Float, labels.device())).lt(p);
    labels.where_self(&mask.logical_not(), &labels.full_like(null))
}

/// The mean-squared noise-prediction loss for a batch `x0: [B, C, H, W]` in [−1, 1] with
/// class `labels: [B]` (ignored by an unconditional model). Draws t, ε and the dropout
/// from libtorch's generator on the batch's device (the caller seeds it).
pub fn diffusion_loss(
    model: &Model,
    schedule: &NoiseSchedule,
    x0: &Tensor,
    labels: Option<&Tensor>,
    label_dropout: f64,
) -> Result<Tensor> {
    let cfg = model.config();
    let size = x0.size();
    if size.len() != 4 || size[1..] != [cfg.in_channels, cfg.image_size, cfg.image_size] {
        return Err(CoreError::Input(format!(
            "training batch has shape {size:?}, the model takes [B, {}, {}, {}]",
            cfg.in_channels, cfg.image_size, cfg.image_size
        )));
    }
    let (b, device) = (size[0], x0.device());
    let t = Tensor::randint(schedule.timesteps() as i64, [b], (Kind::Int64, device));
    let noise = x0.randn_like(); // ε ~ N(0, I): standard normal, not the seed's uniform
    let xt = schedule.q_sample(x0, &t, &noise)?;
    let labels = match (cfg.null_label(), labels) {
        (Some(null), Some(l)) => Some(drop_labels(l, null, label_dropout)),
        _ => None,
    };
    if let Some(l) = &labels {
        if l.size() != [b] {
            return Err(CoreError::Input(format!(
                "labels have shape {:?}, expected [{b}]",
                l.size()
            )));
        }
    }
    // Labels come from the dataset (ids below num_classes); no per-step range check, which
    // would sync with the GPU.
    let eps = model.net.forward(&xt, &t, labels.as_ref());
    Ok(eps.mse_loss(&noise, Reduction::Mean))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_dropout_is_per_sample() {
        tch::manual_seed(0);
        let labels = Tensor::zeros([10_000], (Kind::Int64, tch::Device::Cpu));
        let dropped = drop_labels(&labels, 3, 0.1);
        let frac = dropped
            .eq(3)
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        // Whole-batch dropout would give 0 or 1; per-sample gives ≈ p.
        assert!((frac - 0.1).abs() < 0.02, "{frac}");
        assert_eq!(
            drop_labels(&labels, 3, 0.0)
                .eq(3)
                .sum(Kind::Int64)
                .int64_value(&[]),
            0
        );
    }
}
