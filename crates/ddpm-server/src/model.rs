//! A servable model: a verified EMA checkpoint loaded onto the device, with what the API
//! says about it, and the shared slot that holds the current one.

use std::{
    path::Path,
    sync::{Arc, Mutex, MutexGuard, RwLock},
};

use chrono::{DateTime, Utc};
use ddpm_core::{
    checkpoint::{load_checkpoint_bytes, Manifest},
    Model, NoiseSchedule, SamplerConfig,
};
use ddpm_registry::{CheckpointRecord, CheckpointStore};
use serde::Serialize;
use tch::{Device, Kind, Tensor};
use utoipa::ToSchema;

use crate::error::ServerError;

/// A checkpoint loaded, verified and warmed up, ready to sample from. Shared (`Arc`) by the
/// model thread's in-flight samples: a swap replaces the current one for new requests while
/// the samples that started on this one finish on it.
#[derive(Debug)]
pub struct LoadedModel {
    /// The tensors. libtorch tensors are `Send` but not `Sync`: only the model thread
    /// (and the warm-up) lock this, once per forward pass, so the lock is never contended;
    /// handlers read only the plain fields below.
    net: Mutex<Net>,
    pub manifest: Manifest,
    pub parameters: i64,
    /// The registry's record of the file it came from.
    pub checkpoint: CheckpointRecord,
    pub loaded_at: DateTime<Utc>,
    pub device: Device,
}

/// The network and its noise schedule, on the device.
#[derive(Debug)]
pub struct Net {
    pub model: Model,
    pub schedule: NoiseSchedule,
}

/// What `GET /v1/model` and the response headers say about a model.
#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
#[schema(as = Model)]
pub struct ModelInfo {
    pub checkpoint_id: i64,
    pub run_id: i64,
    pub step: i64,
    /// Class names by label index; empty for an unconditional model.
    pub classes: Vec<String>,
    pub image_size: i64,
    pub channels: i64,
    /// T, the number of diffusion timesteps (the most steps a request may ask for).
    pub timesteps: usize,
    pub parameters: i64,
    pub device: String,
    pub checkpoint_path: String,
    pub checkpoint_created_at: DateTime<Utc>,
    pub loaded_at: DateTime<Utc>,
}

impl LoadedModel {
    /// Loads the checkpoint `record` from `store` onto `device`: reads it through the store,
    /// which checks the bytes against the registry's SHA-256, checks the manifest against
    /// the record, loads and verifies the weights, and runs one forward pass. Blocking
    /// (call it off the async runtime).
    pub fn load(
        store: &CheckpointStore,
        record: &CheckpointRecord,
        device: Device,
    ) -> Result<LoadedModel, ServerError> {
        let bytes = store.open(record)?;
        let incompatible = |message: String| ServerError::IncompatibleCheckpoint {
            id: record.id,
            message,
        };
        let loaded = load_checkpoint_bytes(Path::new(&record.path), &bytes, device)?;
        drop(bytes);
        let manifest = loaded.manifest;
        if manifest.run_id.is_some_and(|run| run != record.run_id) {
            return Err(incompatible(format!(
                "its manifest says run {:?}, the registry says run {}",
                manifest.run_id, record.run_id
            )));
        }
        if manifest.step != record.step {
            return Err(incompatible(format!(
                "its manifest says step {}, the registry says step {}",
                manifest.step, record.step
            )));
        }
        let channels = manifest.model.in_channels;
        if !matches!(channels, 1 | 3) || manifest.model.out_channels != channels {
            return Err(incompatible(format!(
                "{channels} image channels: only grey (1) and RGB (3) images can be served"
            )));
        }
        let schedule = NoiseSchedule::new(manifest.schedule, device)?;
        let mut model = loaded.model;
        model.vs.freeze();
        let this = LoadedModel {
            parameters: model.parameter_count(),
            net: Mutex::new(Net { model, schedule }),
            manifest,
            checkpoint: record.clone(),
            loaded_at: Utc::now(),
            device,
        };
        this.warm_up()?;
        Ok(this)
    }

    /// One guided single-step sample: proves the weights run on the device and give finite
    /// values before the model may replace a good one.
    fn warm_up(&self) -> Result<(), ServerError> {
        let spec = ddpm_core::SampleSpec {
            label: (!self.manifest.class_names.is_empty()).then_some(0),
            guidance_scale: 2.0,
            seed: 0,
            sampler: SamplerConfig::ddim(1),
        };
        let net = self.net();
        let x: Tensor = ddpm_core::sampler::sample(&net.model, &net.schedule, &[spec], 1)?;
        let finite = x.isfinite().all().to_kind(Kind::Int64).int64_value(&[]) == 1;
        if !finite {
            return Err(ServerError::IncompatibleCheckpoint {
                id: self.checkpoint.id,
                message: "its weights produce non-finite values".into(),
            });
        }
        Ok(())
    }

    /// The network, for the model thread.
    pub fn net(&self) -> MutexGuard<'_, Net> {
        match self.net.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    pub fn info(&self) -> ModelInfo {
        let cfg = &self.manifest.model;
        ModelInfo {
            checkpoint_id: self.checkpoint.id,
            run_id: self.checkpoint.run_id,
            step: self.checkpoint.step,
            classes: self.manifest.class_names.clone(),
            image_size: cfg.image_size,
            channels: cfg.in_channels,
            timesteps: self.manifest.schedule.timesteps,
            parameters: self.parameters,
            device: ddpm_core::device::device_name(self.device),
            checkpoint_path: self.checkpoint.path.clone(),
            checkpoint_created_at: self.checkpoint.created_at,
            loaded_at: self.loaded_at,
        }
    }

    pub fn is_conditional(&self) -> bool {
        self.manifest.model.num_classes.is_some()
    }
}

/// The model new requests use; `None` until one is loaded. Written by the watcher, read
/// by the handlers (requests pin the model they were validated against).
#[derive(Debug, Clone, Default)]
pub struct CurrentModel(Arc<RwLock<Option<Arc<LoadedModel>>>>);

impl CurrentModel {
    pub fn get(&self) -> Option<Arc<LoadedModel>> {
        match self.0.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Makes `model` the current one; returns the one it replaces.
    pub fn set(&self, model: Arc<LoadedModel>) -> Option<Arc<LoadedModel>> {
        let mut guard = match self.0.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        guard.replace(model)
    }
}
