//! An exponential moving average of the weights, the model that is sampled from and
//! served.
//!
//! θ_ema ← β_n·θ_ema + (1 − β_n)·θ at update n (counting from 0), with β_n set by the
//! warm-up ([`EmaWarmup`]):
//! - `copy` (the seed): β_n = 0 (a plain copy) for n < `warmup_steps`, then β;
//! - `ramp` (diffusers' `EMAModel`): β_0 = 0, then β_n = min(β, (1 + n)/(10 + n)), so the
//!   average forgets its random start within tens of updates instead of thousands.
//!
//! Both models' variables live in flat buffers of the same layout, so an update is one
//! `lerp_` (or `copy_`) under no-grad, whatever the size of the network.

use crate::{
    error::{CoreError, Result},
    flat::FlatParams,
    unet::{Model, UNetConfig},
};
use serde::{Deserialize, Serialize};

/// How the EMA starts (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EmaWarmup {
    /// Copy the weights for the first `warmup_steps` updates (the seed).
    #[default]
    Copy,
    /// β_n = min(β, (1 + n)/(10 + n)) after a first copy (diffusers' `EMAModel`).
    Ramp,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EmaConfig {
    /// β, the decay once warmed up.
    pub decay: f64,
    /// Updates during which the EMA copies the weights instead of averaging them
    /// (`warmup = "copy"` only).
    pub warmup_steps: i64,
    /// Absent in configs written before it existed: those runs used `copy`.
    #[serde(default)]
    pub warmup: EmaWarmup,
}

impl Default for EmaConfig {
    /// The seed's: β = 0.995, copied for 2000 updates.
    fn default() -> Self {
        EmaConfig {
            decay: 0.995,
            warmup_steps: 2000,
            warmup: EmaWarmup::Copy,
        }
    }
}

impl EmaConfig {
    pub fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.decay) {
            return Err(CoreError::config(
                "ema.decay",
                format!("must be in [0, 1), got {}", self.decay),
            ));
        }
        if self.warmup_steps < 0 {
            return Err(CoreError::config("ema.warmup_steps", "must be >= 0"));
        }
        Ok(())
    }

    /// β_n of update `n` (the number of updates before it); 0 means copy.
    pub fn decay_at(&self, n: i64) -> f64 {
        match self.warmup {
            EmaWarmup::Copy if n < self.warmup_steps => 0.0,
            EmaWarmup::Copy => self.decay,
            EmaWarmup::Ramp if n <= 0 => 0.0,
            EmaWarmup::Ramp => self.decay.min((1 + n) as f64 / (10 + n) as f64),
        }
    }
}

#[derive(Debug)]
pub struct Ema {
    config: EmaConfig,
    model: Model,
    params: FlatParams,
}

impl Ema {
    /// An EMA of the model whose flat parameters are `source` (same layout: built from
    /// `model_config`), starting as a copy of them.
    pub fn new(model_config: &UNetConfig, source: &FlatParams, config: EmaConfig) -> Result<Self> {
        config.validate()?;
        let model = Model::new(model_config, source.flat().device())?;
        let vars = model
            .named_variables()
            .into_iter()
            .map(|(_, t)| t)
            .collect();
        let params = FlatParams::new(vars);
        if params.len() != source.len() {
            return Err(CoreError::Input("EMA and model configs differ".into()));
        }
        let _guard = tch::no_grad_guard();
        params.flat().shallow_clone().copy_(source.flat());
        Ok(Ema {
            config,
            model,
            params,
        })
    }

    pub fn config(&self) -> &EmaConfig {
        &self.config
    }

    /// The EMA weights as one `[N]` buffer (for saving and restoring a training state).
    pub fn flat(&self) -> &FlatParams {
        &self.params
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// `updates_done` counts the optimizer steps before this one (the seed's `step`).
    pub fn update(&mut self, source: &FlatParams, updates_done: i64) -> Result<()> {
        if source.len() != self.params.len() {
            return Err(CoreError::Input(format!(
                "EMA holds {} parameters, the model {}",
                self.params.len(),
                source.len()
            )));
        }
        let _guard = tch::no_grad_guard();
        let mut flat = self.params.flat().shallow_clone();
        let decay = self.config.decay_at(updates_done);
        if decay == 0.0 {
            flat.copy_(source.flat());
        } else {
            let _ = flat.lerp_(source.flat(), 1.0 - decay);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_ups_give_their_decays() {
        let copy = EmaConfig {
            decay: 0.995,
            warmup_steps: 3,
            warmup: EmaWarmup::Copy,
        };
        let decays: Vec<f64> = (0..5).map(|n| copy.decay_at(n)).collect();
        assert_eq!(decays, [0.0, 0.0, 0.0, 0.995, 0.995]);
        let ramp = EmaConfig {
            warmup: EmaWarmup::Ramp,
            ..copy
        };
        assert_eq!(ramp.decay_at(0), 0.0);
        assert_eq!(ramp.decay_at(1), 2.0 / 11.0);
        assert_eq!(ramp.decay_at(10), 11.0 / 20.0);
        // (1 + n)/(10 + n) passes 0.995 at n = 1791.
        assert_eq!(ramp.decay_at(5000), 0.995);
        let old: EmaConfig = serde_json::from_str(r#"{"decay": 0.99, "warmup_steps": 5}"#).unwrap();
        assert_eq!(old.warmup, EmaWarmup::Copy);
    }
}
