//! AdamW (Loshchilov & Hutter 2019) with PyTorch's `torch.optim.AdamW` semantics, over a
//! [`FlatParams`] buffer, with gradient-norm clipping. Its moments are plain tensors so a
//! training state can save and restore them exactly.

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::{
    error::{CoreError, Result},
    flat::FlatParams,
};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// The seed's learning rate (3e-4) with PyTorch's AdamW defaults.
    fn default() -> Self {
        AdamWConfig {
            lr: 3e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    params: FlatParams,
    /// First moment m, `[N]`.
    exp_avg: Tensor,
    /// Second moment v, `[N]`.
    exp_avg_sq: Tensor,
    /// Updates taken (t in the bias corrections).
    steps: i64,
}

impl AdamW {
    pub fn new(params: FlatParams, config: AdamWConfig) -> Self {
        let exp_avg = params.flat().zeros_like();
        let exp_avg_sq = params.flat().zeros_like();
        AdamW {
            config,
            params,
            exp_avg,
            exp_avg_sq,
            steps: 0,
        }
    }

    pub fn params(&self) -> &FlatParams {
        &self.params
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    pub fn steps(&self) -> i64 {
        self.steps
    }

    /// (m, v) for saving.
    pub fn moments(&self) -> (&Tensor, &Tensor) {
        (&self.exp_avg, &self.exp_avg_sq)
    }

    /// Restores saved moments and the update count.
    pub fn restore(&mut self, exp_avg: &Tensor, exp_avg_sq: &Tensor, steps: i64) -> Result<()> {
        let n = self.params.len();
        for (name, t) in [("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)] {
            if t.size() != [n] {
                return Err(CoreError::Input(format!(
                    "optimizer {name} has shape {:?}, expected [{n}]",
                    t.size()
                )));
            }
        }
        let _guard = tch::no_grad_guard();
        self.exp_avg.copy_(exp_avg);
        self.exp_avg_sq.copy_(exp_avg_sq);
        self.steps = steps;
        Ok(())
    }

    /// Clips the gradient to `max_grad_norm` (if given), takes one AdamW step at `lr`, drops
    /// the gradients and returns the gradient norm before clipping as a 0-d tensor (read it
    /// only when logging: reading syncs with the GPU).
    pub fn step(&mut self, lr: f64, max_grad_norm: Option<f64>) -> Tensor {
        match self.step_with(
            lr,
            max_grad_norm,
            |_| Ok::<(), std::convert::Infallible>(()),
        ) {
            Ok(norm) => norm,
            Err(never) => match never {},
        }
    }

    /// [`AdamW::step`] with `reduce` applied in place to the flat gradient first: the
    /// tensor the update reads, which before every variable has a gradient is a fresh
    /// copy (see [`FlatParams::flat_grad`]), so reducing anything else would be lost.
    pub fn step_with<E>(
        &mut self,
        lr: f64,
        max_grad_norm: Option<f64>,
        reduce: impl FnOnce(&mut Tensor) -> std::result::Result<(), E>,
    ) -> std::result::Result<Tensor, E> {
        let _guard = tch::no_grad_guard();
        // Once bound this is the gradient buffer itself: clipping scales it in place, which
        // is fine as it is zeroed at the end of the step.
        let mut grad = self.params.flat_grad(); // [N]
        reduce(&mut grad)?;
        let norm = grad.norm(); // the norm before clipping, what users compare across runs
        if let Some(max) = max_grad_norm {
            // min(1, max / (‖g‖ + 1e-6)), computed on the device: no host sync per step.
            let scale = ((&norm + 1e-6).reciprocal() * max).clamp_max(1.0);
            grad *= scale;
        }
        self.steps += 1;
        let c = self.config;
        let mut flat = self.params.flat().shallow_clone();
        flat *= 1.0 - lr * c.weight_decay;
        let _ = self.exp_avg.lerp_(&grad, 1.0 - c.beta1);
        self.exp_avg_sq *= c.beta2;
        self.exp_avg_sq += grad.square() * (1.0 - c.beta2);
        let bias1 = 1.0 - c.beta1.powi(self.steps as i32);
        let bias2 = 1.0 - c.beta2.powi(self.steps as i32);
        let denom = self.exp_avg_sq.sqrt() / bias2.sqrt() + c.eps;
        flat -= (&self.exp_avg / denom) * (lr / bias1);
        self.params.zero_grad();
        Ok(norm)
    }
}
