//! Checkpoints: the servable EMA weights with a manifest, and the resumable training state.
//!
//! **A checkpoint** is one `.safetensors` file of EMA weights (f32, names as the PyTorch
//! state dict) whose metadata holds a JSON [`Manifest`] under the key `ddpm.manifest`:
//! everything needed to rebuild the model with no other input, and a SHA-256 of the
//! tensors (names, shapes, bytes) that loading verifies.
//!
//! **A training state** is a separate `.safetensors` file: the raw weights (`model.*`),
//! the EMA weights (`ema.*`), AdamW's moments (`adamw.exp_avg`, `adamw.exp_avg_sq`) and a
//! [`StateManifest`] with the step and the seed. Random draws during training are seeded
//! from (seed, step), so (seed, step) *is* the RNG state.
//!
//! This module makes and reads bytes only: where they are kept, and how durably, is the
//! checkpoint store's job (`ddpm-registry`). The loaders take the bytes with the name they
//! are known by, for errors. Loading never panics: truncated bytes, flipped bits, a
//! foreign file or weights of another shape are each a [`CoreError::Checkpoint`] naming
//! the file and the problem.

use std::{
    collections::HashMap,
    path::Path,
    time::{SystemTime, UNIX_EPOCH},
};

use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use crate::{
    ema::{Ema, EmaConfig},
    error::{CoreError, Result},
    optim::{AdamW, AdamWConfig},
    schedule::ScheduleConfig,
    unet::{Model, UNetConfig},
};

pub const CHECKPOINT_FORMAT: &str = "ddpm-checkpoint/1";
pub const STATE_FORMAT: &str = "ddpm-training-state/1";
const MANIFEST_KEY: &str = "ddpm.manifest";

/// What a checkpoint says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`CHECKPOINT_FORMAT`].
    pub format: String,
    pub model: UNetConfig,
    pub schedule: ScheduleConfig,
    /// Class names by label index (empty for an unconditional model).
    pub class_names: Vec<String>,
    pub image_size: i64,
    /// The registry's run id, when the checkpoint was written by a recorded run.
    pub run_id: Option<i64>,
    /// Optimizer steps taken when the weights were saved.
    pub step: i64,
    /// Unix time in milliseconds.
    pub created_at_ms: u64,
    /// `sha256:<hex>` over the tensors' names, shapes and bytes.
    pub checksum: String,
}

/// The caller-supplied part of a [`Manifest`].
#[derive(Debug, Clone)]
pub struct CheckpointInfo {
    pub schedule: ScheduleConfig,
    pub class_names: Vec<String>,
    pub run_id: Option<i64>,
    pub step: i64,
}

/// A loaded, verified checkpoint.
#[derive(Debug)]
pub struct LoadedCheckpoint {
    pub manifest: Manifest,
    pub model: Model,
}

/// What a training state says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateManifest {
    /// [`STATE_FORMAT`].
    pub format: String,
    pub model: UNetConfig,
    pub optimizer: AdamWConfig,
    pub ema: EmaConfig,
    /// Optimizer steps taken.
    pub step: i64,
    /// The run's base seed; with `step` it determines every later random draw.
    pub seed: u64,
    pub created_at_ms: u64,
    pub checksum: String,
    /// Anything else the trainer wants back on resume (its config, data-loader epoch, …).
    #[serde(default)]
    pub extra: serde_json::Value,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A tensor's f32 values as little-endian bytes, with its shape.
struct HostTensor {
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn to_host(t: &Tensor) -> Result<HostTensor> {
    let t = t
        .f_to_device(Device::Cpu)?
        .f_to_kind(Kind::Float)?
        .f_contiguous()?;
    let numel = t.numel();
    let mut bytes = vec![0u8; numel * 4];
    t.f_copy_data_u8(&mut bytes, numel)?;
    Ok(HostTensor {
        shape: t.size().iter().map(|&d| d as usize).collect(),
        bytes,
    })
}

/// SHA-256 over (name, shape, bytes) of each tensor, in name order.
fn checksum<'a>(tensors: impl Iterator<Item = (&'a str, &'a [usize], &'a [u8])>) -> String {
    let mut sorted: Vec<_> = tensors.collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut h = Sha256::new();
    for (name, shape, bytes) in sorted {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update((shape.len() as u64).to_le_bytes());
        for d in shape {
            h.update((*d as u64).to_le_bytes());
        }
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    format!("sha256:{}", hex::encode(h.finalize()))
}

/// Serialises named tensors with a manifest whose `checksum` field `set_checksum` fills.
fn serialize<M: Serialize>(
    named: Vec<(String, HostTensor)>,
    manifest: &mut M,
    set_checksum: impl FnOnce(&mut M, String),
) -> Result<Vec<u8>> {
    let sum = checksum(
        named
            .iter()
            .map(|(n, t)| (n.as_str(), t.shape.as_slice(), t.bytes.as_slice())),
    );
    set_checksum(manifest, sum);
    let json =
        serde_json::to_string(manifest).map_err(|e| CoreError::Input(format!("manifest: {e}")))?;
    let views = named
        .iter()
        .map(|(n, t)| {
            Ok((
                n.clone(),
                TensorView::new(Dtype::F32, t.shape.clone(), &t.bytes)
                    .map_err(|e| CoreError::Input(e.to_string()))?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(
        views,
        Some(HashMap::from([(MANIFEST_KEY.to_string(), json)])),
    )
    .map_err(|e| CoreError::Input(format!("safetensors: {e}")))
}

/// The manifest in a file's metadata, parsed without reading (nor verifying) the tensors.
fn manifest_of<M: DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<M> {
    let bad = |m: String| CoreError::checkpoint(path, m);
    let (_, meta) = SafeTensors::read_metadata(bytes)
        .map_err(|e| bad(format!("not a readable safetensors file ({e})")))?;
    let json = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(MANIFEST_KEY))
        .ok_or_else(|| {
            bad(format!(
                "no {MANIFEST_KEY} in its metadata: not a ddpm file"
            ))
        })?;
    serde_json::from_str(json).map_err(|e| bad(format!("unreadable manifest: {e}")))
}

/// Parses and verifies a file's bytes: its manifest and the tensors by name.
struct Parsed<'a, M> {
    manifest: M,
    tensors: SafeTensors<'a>,
}

fn parse<'a, M: DeserializeOwned>(
    path: &Path,
    bytes: &'a [u8],
    format: &str,
    checksum_of: impl FnOnce(&M) -> (&str, &str),
) -> Result<Parsed<'a, M>> {
    let bad = |m: String| CoreError::checkpoint(path, m);
    let manifest: M = manifest_of(path, bytes)?;
    let (found_format, expected_sum) = checksum_of(&manifest);
    if found_format != format {
        return Err(bad(format!("format {found_format:?}, expected {format:?}")));
    }
    let expected_sum = expected_sum.to_string();
    let tensors =
        SafeTensors::deserialize(bytes).map_err(|e| bad(format!("truncated or corrupt ({e})")))?;
    let mut views = Vec::new();
    for (name, view) in tensors.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(bad(format!(
                "tensor {name} is {:?}, expected F32",
                view.dtype()
            )));
        }
        views.push((name, view));
    }
    let actual = checksum(views.iter().map(|(n, v)| (n.as_str(), v.shape(), v.data())));
    if actual != expected_sum {
        return Err(bad(format!(
            "checksum mismatch: manifest says {expected_sum}, contents are {actual}"
        )));
    }
    Ok(Parsed { manifest, tensors })
}

/// Copies `prefix + name` from `tensors` into each of `vars`; every variable must be there
/// with its exact shape.
fn copy_into(
    path: &Path,
    tensors: &SafeTensors,
    prefix: &str,
    vars: &[(String, Tensor)],
) -> Result<()> {
    let _guard = tch::no_grad_guard();
    for (name, var) in vars {
        let key = format!("{prefix}{name}");
        let view = tensors
            .tensor(&key)
            .map_err(|_| CoreError::checkpoint(path, format!("missing tensor {key}")))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        if shape != var.size() {
            return Err(CoreError::checkpoint(
                path,
                format!(
                    "tensor {key} has shape {shape:?}, the model expects {:?}",
                    var.size()
                ),
            ));
        }
        let host = Tensor::f_from_data_size(view.data(), &shape, Kind::Float)?;
        var.shallow_clone().f_copy_(&host)?;
    }
    Ok(())
}

/// The servable checkpoint of `model` (the EMA model) as bytes, with its manifest.
pub fn checkpoint_bytes(model: &Model, info: &CheckpointInfo) -> Result<(Vec<u8>, Manifest)> {
    let cfg = model.config();
    let classes = cfg.num_classes.unwrap_or(0) as usize;
    if info.class_names.len() != classes {
        return Err(CoreError::Input(format!(
            "{} class names for a model with {classes} classes",
            info.class_names.len()
        )));
    }
    let named = model
        .named_variables()
        .into_iter()
        .map(|(n, t)| Ok((n, to_host(&t)?)))
        .collect::<Result<Vec<_>>>()?;
    let mut manifest = Manifest {
        format: CHECKPOINT_FORMAT.to_string(),
        model: cfg.clone(),
        schedule: info.schedule,
        class_names: info.class_names.clone(),
        image_size: cfg.image_size,
        run_id: info.run_id,
        step: info.step,
        created_at_ms: now_ms(),
        checksum: String::new(),
    };
    let bytes = serialize(named, &mut manifest, |m, s| m.checksum = s)?;
    Ok((bytes, manifest))
}

/// Reads a checkpoint's manifest from its bytes without loading (nor verifying) its
/// weights; `path` names the bytes in errors.
pub fn read_manifest(path: &Path, bytes: &[u8]) -> Result<Manifest> {
    manifest_of(path, bytes)
}

/// Loads and verifies a checkpoint from its bytes onto `device`; `path` names the bytes
/// in errors.
pub fn load_checkpoint_bytes(
    path: &Path,
    bytes: &[u8],
    device: Device,
) -> Result<LoadedCheckpoint> {
    let parsed: Parsed<Manifest> = parse(path, bytes, CHECKPOINT_FORMAT, |m: &Manifest| {
        (m.format.as_str(), m.checksum.as_str())
    })?;
    let manifest = parsed.manifest;
    let bad = |m: String| CoreError::checkpoint(path, m);
    manifest
        .model
        .validate()
        .map_err(|e| bad(format!("manifest model config: {e}")))?;
    manifest
        .schedule
        .validate()
        .map_err(|e| bad(format!("manifest schedule: {e}")))?;
    let classes = manifest.model.num_classes.unwrap_or(0) as usize;
    if manifest.class_names.len() != classes {
        return Err(bad(format!(
            "{} class names for {classes} classes",
            manifest.class_names.len()
        )));
    }
    let model = Model::new(&manifest.model, device)?;
    let vars = model.named_variables();
    if parsed.tensors.len() != vars.len() {
        return Err(bad(format!(
            "{} tensors, the model has {} variables",
            parsed.tensors.len(),
            vars.len()
        )));
    }
    copy_into(path, &parsed.tensors, "", &vars)?;
    Ok(LoadedCheckpoint { manifest, model })
}

/// The caller-supplied part of a [`StateManifest`].
#[derive(Debug, Clone)]
pub struct StateInfo {
    pub step: i64,
    pub seed: u64,
    pub extra: serde_json::Value,
}

/// The training state as bytes: the raw model, its EMA and the optimizer's moments,
/// with its manifest.
pub fn training_state_bytes(
    model: &Model,
    ema: &Ema,
    optimizer: &AdamW,
    info: &StateInfo,
) -> Result<(Vec<u8>, StateManifest)> {
    let mut named = Vec::new();
    for (prefix, m) in [("model.", model), ("ema.", ema.model())] {
        for (n, t) in m.named_variables() {
            named.push((format!("{prefix}{n}"), to_host(&t)?));
        }
    }
    let (m, v) = optimizer.moments();
    named.push(("adamw.exp_avg".to_string(), to_host(m)?));
    named.push(("adamw.exp_avg_sq".to_string(), to_host(v)?));
    let mut manifest = StateManifest {
        format: STATE_FORMAT.to_string(),
        model: model.config().clone(),
        optimizer: *optimizer.config(),
        ema: *ema.config(),
        step: info.step,
        seed: info.seed,
        created_at_ms: now_ms(),
        checksum: String::new(),
        extra: info.extra.clone(),
    };
    let bytes = serialize(named, &mut manifest, |m, s| m.checksum = s)?;
    Ok((bytes, manifest))
}

/// Restores a training state from its bytes into `model`, `ema` and `optimizer` (built
/// from the same config); `path` names the bytes in errors. Nothing is modified unless
/// the whole state verifies and matches.
pub fn load_training_state_bytes(
    path: &Path,
    bytes: &[u8],
    model: &Model,
    ema: &Ema,
    optimizer: &mut AdamW,
) -> Result<StateManifest> {
    let parsed: Parsed<StateManifest> = parse(path, bytes, STATE_FORMAT, |m: &StateManifest| {
        (m.format.as_str(), m.checksum.as_str())
    })?;
    let manifest = parsed.manifest;
    if &manifest.model != model.config() {
        return Err(CoreError::checkpoint(
            path,
            "the state's model config differs from the run's",
        ));
    }
    // Check every shape before writing anything.
    let model_vars = model.named_variables();
    let ema_vars = ema.model().named_variables();
    let n = optimizer.params().len();
    for (prefix, vars) in [("model.", &model_vars), ("ema.", &ema_vars)] {
        for (name, var) in vars.iter() {
            let key = format!("{prefix}{name}");
            let ok = parsed
                .tensors
                .tensor(&key)
                .is_ok_and(|v| v.shape().iter().map(|&d| d as i64).eq(var.size()));
            if !ok {
                return Err(CoreError::checkpoint(
                    path,
                    format!("tensor {key} is missing or has another shape"),
                ));
            }
        }
    }
    let moment = |key: &str| -> Result<Tensor> {
        let view = parsed
            .tensors
            .tensor(key)
            .map_err(|_| CoreError::checkpoint(path, format!("missing tensor {key}")))?;
        if view.shape() != [n as usize] {
            return Err(CoreError::checkpoint(
                path,
                format!("{key} has shape {:?}, expected [{n}]", view.shape()),
            ));
        }
        Ok(Tensor::f_from_data_size(view.data(), &[n], Kind::Float)?)
    };
    let (m, v) = (moment("adamw.exp_avg")?, moment("adamw.exp_avg_sq")?);
    copy_into(path, &parsed.tensors, "model.", &model_vars)?;
    copy_into(path, &parsed.tensors, "ema.", &ema_vars)?;
    optimizer.restore(
        &m.to_device(model.device()),
        &v.to_device(model.device()),
        manifest.step,
    )?;
    Ok(manifest)
}
