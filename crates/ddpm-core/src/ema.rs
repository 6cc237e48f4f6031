//! An exponential moving average of the weights, the model that is sampled from and
//! served.
//!
//! θ_ema ← β·θ_ema + (1 − β)·θ after the first `warmup_steps` updates, during which θ_ema is
//! a plain copy of θ (the seed: β = 0.995, 2000 copied steps). Both models' variables live
//! in flat buffers of the same layout, so an update is one `lerp_` (or `copy_`) under
//! no-grad, whatever the size of the network.

use crate::{
    error::{CoreError, Result},
    flat::FlatParams,
    unet::{Model, UNetConfig},
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EmaConfig {
    /// β.
    pub decay: f64,
    /// Updates during which the EMA copies the weights instead of averaging them.
    pub warmup_steps: i64,
}

impl Default for EmaConfig {
    fn default() -> Self {
        EmaConfig {
            decay: 0.995,
            warmup_steps: 2000,
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
        if updates_done < self.config.warmup_steps {
            flat.copy_(source.flat());
        } else {
            let _ = flat.lerp_(source.flat(), 1.0 - self.config.decay);
        }
        Ok(())
    }
}
