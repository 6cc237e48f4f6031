//! The run config: a TOML file with a `preset` that fills every default, optional tables
//! that override single fields, and CLI overrides on top; resolved into a [`RunConfig`]
//! that is validated before anything starts and stored whole in the run's registry row,
//! so a resume (on any host) rebuilds exactly the same run.
//!
//! ```toml
//! preset = "tiny"            # or "seed": the seed's 64×64 CIFAR-10 setting
//! [dataset]
//! path = "data/demo"
//! [training]
//! steps = 3000
//! ```
//!
//! One path for every setting: the preset as a TOML table, the file laid over it key by
//! key, then the CLI overrides, deserialized once. A key the preset lacks is an error
//! that names it (`training.lrr`), and so is a value of the wrong type; each section
//! validates itself and names the field.

use std::path::{Path, PathBuf};

use ddpm_core::{
    ema::{EmaConfig, EmaWarmup},
    optim::AdamWConfig,
    schedule::ScheduleConfig,
    training::{LossWeighting, LrSchedule, Objective},
    UNetConfig,
};
use serde::{Deserialize, Deserializer, Serialize};

use crate::{
    dataset::{ImageLimits, DEFAULT_MAX_PIXELS},
    error::{Result, TrainerError},
    quality::QualityConfig,
};

/// Named starting points for a run config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// A 16×16 network and a setting that learns the demo dataset in minutes on a CPU.
    #[default]
    Tiny,
    /// The seed: its UNet at 64×64, batch 48, AdamW 3e-4, EMA 0.995 after 2000 steps.
    Seed,
    /// The tiny network with the training options that learned fastest per step in the
    /// learning benchmark (BENCHMARKS.md): what the demo and the README use.
    Fast,
}

impl Preset {
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Seed => "seed",
            Preset::Fast => "fast",
        }
    }
}

/// Whether decoded images are kept in memory between epochs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// Cache when the decoded dataset fits in [`AUTO_CACHE_BYTES`].
    #[default]
    Auto,
    Always,
    Never,
}

/// The decoded size up to which `cache = "auto"` keeps a dataset in memory.
pub const AUTO_CACHE_BYTES: u64 = 2 << 30;

impl<'de> Deserialize<'de> for CacheMode {
    /// `true` / `false` or `"auto"` / `"always"` / `"never"`.
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Name(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(true) => Ok(CacheMode::Always),
            Raw::Bool(false) => Ok(CacheMode::Never),
            Raw::Name(s) => match s.as_str() {
                "auto" => Ok(CacheMode::Auto),
                "always" | "true" => Ok(CacheMode::Always),
                "never" | "false" => Ok(CacheMode::Never),
                other => Err(serde::de::Error::custom(format!(
                    "cache = {other:?}: use true, false or \"auto\""
                ))),
            },
        }
    }
}

/// `[dataset]`, resolved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    /// An image folder: one subfolder per class (sorted names give the class ids), or a
    /// flat folder of images for an unconditional model.
    pub path: PathBuf,
    /// The seed's augmentation: resize to 1.25× the image size, then a random resized
    /// crop (scale 0.8–1.0). Off: resize the shorter side and center-crop.
    pub augment: bool,
    /// Random horizontal flips.
    pub flip: bool,
    pub cache: CacheMode,
    /// Width × height above which an image is skipped (and counted, like a corrupt one),
    /// read from its header before it is decoded; it also caps file sizes and decoder
    /// allocations (see [`crate::dataset`]). Absent from configs stored before it
    /// existed: those get the default, 64 Mi (8192 × 8192).
    #[serde(default = "default_max_pixels")]
    pub max_pixels: u64,
}

fn default_max_pixels() -> u64 {
    DEFAULT_MAX_PIXELS
}

/// `[training]`, resolved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    /// Optimizer steps of the whole run.
    pub steps: i64,
    pub batch_size: i64,
    /// AdamW's peak learning rate.
    pub lr: f64,
    /// Steps of linear learning-rate warm-up from lr/warmup_steps to lr (0: none).
    pub warmup_steps: i64,
    /// After the warm-up: `constant` (the seed) or `cosine` (decays to 0 at the last step).
    /// Absent from configs stored before it existed: those runs were constant.
    #[serde(default)]
    pub lr_schedule: LrSchedule,
    /// Min-SNR-γ loss weighting's γ (Hang et al. 2023; 5 in the paper); 0 turns it off
    /// (the seed's plain ε-MSE).
    #[serde(default)]
    pub min_snr_gamma: f64,
    /// Gradient-norm clipping threshold (0: no clipping).
    pub max_grad_norm: f64,
    /// AdamW's decoupled weight decay (PyTorch's default 0.01).
    pub weight_decay: f64,
    /// Probability of replacing each sample's label by the null label (classifier-free
    /// guidance), independently per sample.
    pub label_dropout: f64,
    /// Seeds the initial weights, the data order and augmentation, and every step's
    /// random draws (t, ε, label dropout) as a function of (seed, step).
    pub seed: u64,
    /// bf16 autocast of the forward pass (CUDA only; ignored with a warning on a CPU).
    pub bf16: bool,
    /// Steps between metric rows (loss and grad norm are averaged over the window).
    pub log_every: i64,
    /// Steps between checkpoints (EMA + training state + sample grid); one is always
    /// written at the end.
    pub checkpoint_every: i64,
    /// Checkpoints of each kind kept per run (older ones are deleted).
    pub keep_last: usize,
    /// Samples per class in each checkpoint's grid (0: no grid).
    pub sample_grid_per_class: i64,
    /// DDIM steps used to draw the grid.
    pub sample_steps: usize,
    /// Guidance scale of the grid's samples.
    pub guidance_scale: f64,
}

impl DatasetConfig {
    /// What reading one of the dataset's images may cost.
    pub fn image_limits(&self) -> ImageLimits {
        ImageLimits {
            max_pixels: self.max_pixels,
        }
    }

    /// The dataset path names an existing folder; the pixel limit is positive.
    pub fn validate(&self) -> Result<()> {
        if self.max_pixels == 0 {
            return Err(TrainerError::config(
                "dataset.max_pixels",
                "must be positive",
            ));
        }
        let path = &self.path;
        if path.as_os_str().is_empty() {
            return Err(TrainerError::config(
                "dataset.path",
                "is required (an image folder)",
            ));
        }
        if !path.exists() {
            // Perhaps a volume not mounted yet: a daemon retries rather than fails.
            return Err(TrainerError::DatasetUnavailable {
                path: path.clone(),
                message: "dataset.path does not exist (a volume not mounted?)".into(),
            });
        }
        if !path.is_dir() {
            return Err(TrainerError::config(
                "dataset.path",
                format!("{} is not a directory", path.display()),
            ));
        }
        Ok(())
    }
}

impl TrainingConfig {
    /// Every field in range; `timesteps` is the schedule's T (the grid's DDIM steps are
    /// at most T).
    pub fn validate(&self, timesteps: usize) -> Result<()> {
        let positive = |field: &str, v: i64| {
            if v > 0 {
                Ok(())
            } else {
                Err(TrainerError::config(
                    field,
                    format!("must be positive, got {v}"),
                ))
            }
        };
        positive("training.steps", self.steps)?;
        positive("training.batch_size", self.batch_size)?;
        positive("training.log_every", self.log_every)?;
        positive("training.checkpoint_every", self.checkpoint_every)?;
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(TrainerError::config(
                "training.lr",
                format!("must be a positive number, got {}", self.lr),
            ));
        }
        if self.warmup_steps < 0 {
            return Err(TrainerError::config(
                "training.warmup_steps",
                "must be >= 0",
            ));
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            return Err(TrainerError::config(
                "training.max_grad_norm",
                "must be >= 0 (0 turns clipping off)",
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(TrainerError::config(
                "training.weight_decay",
                "must be >= 0",
            ));
        }
        if !(self.min_snr_gamma.is_finite() && self.min_snr_gamma >= 0.0) {
            return Err(TrainerError::config(
                "training.min_snr_gamma",
                format!(
                    "must be >= 0 (0 turns the weighting off), got {}",
                    self.min_snr_gamma
                ),
            ));
        }
        if !(0.0..1.0).contains(&self.label_dropout) {
            return Err(TrainerError::config(
                "training.label_dropout",
                format!("must be in [0, 1), got {}", self.label_dropout),
            ));
        }
        if self.keep_last == 0 {
            return Err(TrainerError::config(
                "training.keep_last",
                "must be at least 1 (the newest state is what a resume needs)",
            ));
        }
        if self.sample_grid_per_class < 0 {
            return Err(TrainerError::config(
                "training.sample_grid_per_class",
                "must be >= 0",
            ));
        }
        if self.sample_grid_per_class > 0
            && (self.sample_steps == 0 || self.sample_steps > timesteps)
        {
            return Err(TrainerError::config(
                "training.sample_steps",
                format!("must be in 1..={}", timesteps),
            ));
        }
        if !self.guidance_scale.is_finite() {
            return Err(TrainerError::config(
                "training.guidance_scale",
                "must be finite",
            ));
        }
        Ok(())
    }
}

/// A fully resolved run: what the registry stores and a resume rebuilds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub preset: Preset,
    pub dataset: DatasetConfig,
    /// `num_classes` is filled from the dataset.
    pub model: UNetConfig,
    pub schedule: ScheduleConfig,
    pub training: TrainingConfig,
    pub ema: EmaConfig,
    /// How checkpoints are scored ([`crate::quality`]). Absent from configs stored
    /// before it existed: those runs are not scored and hold nothing out.
    #[serde(default = "QualityConfig::off")]
    pub quality: QualityConfig,
}

/// The common overrides, as CLI flags of `train` and `submit`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Overrides {
    /// Override `training.steps`.
    #[arg(long, env = "DDPM_STEPS")]
    pub steps: Option<i64>,
    /// Override `training.batch_size`.
    #[arg(long, env = "DDPM_BATCH_SIZE")]
    pub batch_size: Option<i64>,
    /// Override `training.lr`.
    #[arg(long, env = "DDPM_LR")]
    pub lr: Option<f64>,
    /// Override `training.seed`.
    #[arg(long, env = "DDPM_SEED")]
    pub seed: Option<u64>,
    /// Override `dataset.path`.
    #[arg(long, env = "DDPM_DATASET")]
    pub dataset: Option<PathBuf>,
}

impl Overrides {
    /// The overrides that are set, as (dotted config key, value).
    fn values(&self) -> Result<Vec<(&'static str, toml::Value)>> {
        fn value<T: Serialize>(key: &'static str, v: &T) -> Result<(&'static str, toml::Value)> {
            toml::Value::try_from(v)
                .map(|v| (key, v))
                .map_err(|e| TrainerError::config(key, e.to_string()))
        }
        let mut out = Vec::new();
        if let Some(v) = &self.steps {
            out.push(value("training.steps", v)?);
        }
        if let Some(v) = &self.batch_size {
            out.push(value("training.batch_size", v)?);
        }
        if let Some(v) = &self.lr {
            out.push(value("training.lr", v)?);
        }
        if let Some(v) = &self.seed {
            out.push(value("training.seed", v)?);
        }
        if let Some(v) = &self.dataset {
            out.push(value("dataset.path", v)?);
        }
        Ok(out)
    }
}

impl RunConfig {
    /// The preset's values; the dataset path is left empty (every run names its own).
    pub fn preset(preset: Preset) -> RunConfig {
        match preset {
            Preset::Tiny => RunConfig {
                preset,
                dataset: DatasetConfig {
                    path: PathBuf::new(),
                    augment: true,
                    flip: true,
                    cache: CacheMode::Auto,
                    max_pixels: DEFAULT_MAX_PIXELS,
                },
                model: UNetConfig::tiny(None),
                schedule: ScheduleConfig::default(),
                training: TrainingConfig {
                    steps: 3000,
                    batch_size: 32,
                    lr: 1e-3,
                    warmup_steps: 100,
                    lr_schedule: LrSchedule::Constant,
                    min_snr_gamma: 0.0,
                    max_grad_norm: 1.0,
                    weight_decay: 0.01,
                    label_dropout: 0.1,
                    seed: 0,
                    bf16: false,
                    log_every: 25,
                    checkpoint_every: 500,
                    keep_last: 3,
                    sample_grid_per_class: 8,
                    sample_steps: 50,
                    guidance_scale: 3.0,
                },
                ema: EmaConfig {
                    decay: 0.995,
                    warmup_steps: 200,
                    warmup: EmaWarmup::Copy,
                },
                quality: QualityConfig::default(),
            },
            Preset::Seed => RunConfig {
                preset,
                dataset: DatasetConfig {
                    path: PathBuf::new(),
                    augment: true,
                    flip: true,
                    cache: CacheMode::Auto,
                    max_pixels: DEFAULT_MAX_PIXELS,
                },
                model: UNetConfig::seed(None),
                schedule: ScheduleConfig::default(),
                training: TrainingConfig {
                    // The seed trains CIFAR-10 for 300 epochs of 50 000 / 48 batches.
                    steps: 312_500,
                    batch_size: 48,
                    lr: 3e-4,
                    warmup_steps: 0,
                    lr_schedule: LrSchedule::Constant,
                    min_snr_gamma: 0.0,
                    // The seed does not clip; clipping stays available.
                    max_grad_norm: 0.0,
                    weight_decay: 0.01,
                    label_dropout: 0.1,
                    seed: 0,
                    bf16: false,
                    log_every: 100,
                    checkpoint_every: 5000,
                    keep_last: 3,
                    sample_grid_per_class: 8,
                    sample_steps: 50,
                    guidance_scale: 3.0,
                },
                ema: EmaConfig::default(),
                quality: QualityConfig::default(),
            },
            Preset::Fast => {
                // The tiny preset with what the learning benchmark showed learns fastest
                // per step (BENCHMARKS.md, "Learning speed").
                let mut c = RunConfig::preset(Preset::Tiny);
                c.preset = preset;
                c.training.min_snr_gamma = 5.0;
                c.training.lr_schedule = LrSchedule::Cosine;
                c.ema = EmaConfig {
                    decay: 0.995,
                    warmup_steps: 0,
                    warmup: EmaWarmup::Ramp,
                };
                c
            }
        }
    }

    /// Reads a TOML file and applies `overrides`. Not yet validated.
    pub fn from_file(path: &Path, overrides: &Overrides) -> Result<RunConfig> {
        let text = std::fs::read_to_string(path).map_err(TrainerError::io(path))?;
        Self::from_toml(&text, overrides).map_err(|e| match e {
            TrainerError::ConfigFile { message, .. } => TrainerError::ConfigFile {
                path: path.to_path_buf(),
                message,
            },
            TrainerError::Config { field, message } => TrainerError::ConfigFile {
                path: path.to_path_buf(),
                message: format!("{field}: {message}"),
            },
            other => other,
        })
    }

    /// [`from_file`](Self::from_file) on a string; relative dataset paths stay relative.
    ///
    /// One path for every setting: the preset is written out as a TOML table, the file's
    /// tables are laid over it key by key, then the CLI overrides, and the result is
    /// deserialized once. A key the preset does not have is unknown (a typo), and a
    /// mistyped value is reported with its dotted path, so adding a setting to a config
    /// struct (with its preset value) is all it takes for files and overrides to reach it.
    pub fn from_toml(text: &str, overrides: &Overrides) -> Result<RunConfig> {
        let mut file: toml::Table = toml::from_str(text).map_err(|e| TrainerError::ConfigFile {
            path: PathBuf::from("<string>"),
            message: e.to_string(),
        })?;
        let preset = match file.remove("preset") {
            None => Preset::default(),
            Some(v) => Preset::deserialize(v).map_err(|e| {
                TrainerError::config("preset", format!("{e} (use tiny, fast or seed)"))
            })?,
        };
        let mut merged = RunConfig::preset(preset).to_table()?;
        merged.insert("preset".into(), preset.name().into());
        if let Some(toml::Value::Table(schedule)) = file.get_mut("schedule") {
            // The cosine offset under its paper name, as older files (and the serde alias)
            // write it.
            if let Some(offset) = schedule.remove("s") {
                schedule.insert("offset".into(), offset);
            }
        }
        if let Some(toml::Value::Table(schedule)) = file.get("schedule") {
            switch_schedule_kind(&mut merged, schedule)?;
        }
        lay_over(&mut merged, file, "")?;
        for (key, value) in overrides.values()? {
            lay_over(&mut merged, dotted(key, value), "")?;
        }
        serde_path_to_error::deserialize(toml::Value::Table(merged))
            .map_err(|e| TrainerError::config(e.path().to_string(), e.inner().to_string()))
    }

    /// This config as a TOML table: every field present (`Option`s that are `None`, only
    /// `model.num_classes`, are absent: it comes from the dataset).
    fn to_table(&self) -> Result<toml::Table> {
        match toml::Value::try_from(self) {
            Ok(toml::Value::Table(t)) => Ok(t),
            Ok(_) => unreachable!("a struct serializes to a table"),
            Err(e) => Err(TrainerError::config("config", e.to_string())),
        }
    }

    /// The AdamW settings of this run.
    pub fn optimizer(&self) -> AdamWConfig {
        AdamWConfig {
            lr: self.training.lr,
            weight_decay: self.training.weight_decay,
            ..AdamWConfig::default()
        }
    }

    /// What each step minimises.
    pub fn objective(&self) -> Objective {
        let gamma = self.training.min_snr_gamma;
        Objective {
            label_dropout: self.training.label_dropout,
            weighting: if gamma > 0.0 {
                LossWeighting::MinSnr { gamma }
            } else {
                LossWeighting::Uniform
            },
        }
    }

    /// The learning rate of `step` (1-based).
    pub fn lr_at(&self, step: i64) -> f64 {
        let training = &self.training;
        training
            .lr_schedule
            .lr_at(training.lr, training.warmup_steps, training.steps, step)
    }

    /// Checks every field that can be checked without reading the dataset's images,
    /// section by section; errors name the field (`training.lr`, `model.image_size`,
    /// `dataset.path`, …).
    pub fn validate(&self) -> Result<()> {
        self.dataset.validate()?;
        // The model's own checks (divisibility by the downsampling, attention sizes, …)
        // already name `model.<field>`.
        self.model.validate().map_err(core_config)?;
        if self.model.in_channels != 3 || self.model.out_channels != 3 {
            return Err(TrainerError::config(
                "model.in_channels",
                "the image-folder loader produces RGB: in_channels and out_channels must be 3",
            ));
        }
        self.schedule.validate().map_err(core_config)?;
        self.ema.validate().map_err(core_config)?;
        self.training.validate(self.schedule.timesteps)?;
        self.quality.validate(self.schedule.timesteps)
    }

    /// The TOML that reproduces this config (what `deploy/runs/*.toml` are made of).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).map_err(|e| TrainerError::config("config", e.to_string()))
    }
}

/// A core config error keeps its field name.
fn core_config(e: ddpm_core::CoreError) -> TrainerError {
    match e {
        ddpm_core::CoreError::Config { field, message } => TrainerError::Config { field, message },
        other => TrainerError::Core(other),
    }
}

/// Lays `over` onto `base` key by key (tables recursively, anything else replaced);
/// `prefix` is the dotted path of `base`, for errors. A key `base` lacks is an error.
fn lay_over(base: &mut toml::Table, over: toml::Table, prefix: &str) -> Result<()> {
    for (key, value) in over {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match (base.get_mut(&key), value) {
            (None, _) => return Err(unknown_field(&path)),
            (Some(toml::Value::Table(inner)), toml::Value::Table(value)) => {
                lay_over(inner, value, &path)?
            }
            (Some(toml::Value::Table(_)), _) => {
                return Err(TrainerError::config(path, "must be a table ([section])"))
            }
            (Some(slot), value) => *slot = value,
        }
    }
    Ok(())
}

fn unknown_field(path: &str) -> TrainerError {
    let message = match path {
        "model.num_classes" => "is not set in a run config: it is the dataset's class count",
        "schedule.offset" | "schedule.max_beta" => "only applies to kind = \"cosine\"",
        "schedule.beta_start" | "schedule.beta_end" => "only applies to kind = \"linear\"",
        _ => "unknown field",
    };
    TrainerError::config(path, message)
}

/// `schedule.kind` in a file switches the β schedule to that kind with its published
/// constants (keeping T); the file's other schedule fields then override single ones.
fn switch_schedule_kind(merged: &mut toml::Table, file: &toml::Table) -> Result<()> {
    let Some(kind) = file.get("kind") else {
        return Ok(());
    };
    let betas = match kind.as_str() {
        Some("linear") => ScheduleConfig::default().betas,
        Some("cosine") => ScheduleConfig::cosine(0).betas,
        _ => {
            return Err(TrainerError::config(
                "schedule.kind",
                format!("unknown schedule {kind}: use \"linear\" or \"cosine\""),
            ))
        }
    };
    let Some(toml::Value::Table(schedule)) = merged.get_mut("schedule") else {
        unreachable!("every preset has a schedule table");
    };
    // The β schedule serializes as its own table (`kind` plus that kind's constants).
    let fresh = toml::Value::try_from(betas)
        .map_err(|e| TrainerError::config("schedule", e.to_string()))?;
    let toml::Value::Table(mut fresh) = fresh else {
        unreachable!("a tagged enum serializes to a table");
    };
    fresh.insert("timesteps".into(), schedule["timesteps"].clone());
    *schedule = fresh;
    Ok(())
}

/// `training.steps = v` as a nested table, for [`lay_over`].
fn dotted(key: &str, value: toml::Value) -> toml::Table {
    let mut table = toml::Table::new();
    match key.split_once('.') {
        Some((head, rest)) => table.insert(head.into(), toml::Value::Table(dotted(rest, value))),
        None => table.insert(key.into(), value),
    };
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<RunConfig> {
        RunConfig::from_toml(text, &Overrides::default())
    }

    fn with_dataset(text: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let full = format!(
            "{text}\n[dataset]\npath = {:?}\n",
            dir.path().display().to_string()
        );
        (dir, full)
    }

    fn field_of(e: TrainerError) -> String {
        match e {
            TrainerError::Config { field, .. } => field,
            other => panic!("expected a config error, got {other}"),
        }
    }

    #[test]
    fn presets_fill_every_default() {
        let c = parse("preset = \"seed\"").unwrap();
        assert_eq!(c.model, UNetConfig::seed(None));
        assert_eq!((c.training.batch_size, c.training.lr), (48, 3e-4));
        assert_eq!(c.ema, EmaConfig::default());
        assert_eq!(c.schedule, ScheduleConfig::default());
        let tiny = parse("").unwrap();
        assert_eq!(tiny.preset, Preset::Tiny);
        assert_eq!(tiny.model.image_size, 16);
        let fast = parse("preset = \"fast\"").unwrap();
        assert_eq!(fast.model, tiny.model);
        assert_eq!(
            fast.objective().weighting,
            LossWeighting::MinSnr { gamma: 5.0 }
        );
        assert_eq!(fast.training.lr_schedule, LrSchedule::Cosine);
        assert_eq!(fast.ema.warmup, EmaWarmup::Ramp);
        assert_eq!(c.objective(), Objective::default());
        assert_eq!(c.training.lr_schedule, LrSchedule::Constant);
    }

    #[test]
    fn tables_and_overrides_replace_single_fields() {
        let text = "preset = \"tiny\"\n[training]\nsteps = 10\nlr = 0.5\n[model]\nbase_channels = 8\n\
                    [schedule]\nkind = \"cosine\"\ntimesteps = 200\n[ema]\ndecay = 0.9\n[dataset]\npath = \"x\"\ncache = false\n";
        let overrides = Overrides {
            steps: Some(20),
            seed: Some(7),
            ..Default::default()
        };
        let c = RunConfig::from_toml(text, &overrides).unwrap();
        assert_eq!(
            (c.training.steps, c.training.lr, c.training.seed),
            (20, 0.5, 7)
        );
        assert_eq!(c.model.base_channels, 8);
        assert_eq!(c.model.channel_mults, UNetConfig::tiny(None).channel_mults);
        assert_eq!(c.schedule, ScheduleConfig::cosine(200));
        assert_eq!(c.ema.decay, 0.9);
        assert_eq!(c.dataset.cache, CacheMode::Never);
        assert_eq!(c.dataset.path, PathBuf::from("x"));
    }

    #[test]
    fn resolved_config_round_trips_through_json_and_toml() {
        let c = parse("preset = \"seed\"\n[dataset]\npath = \"d\"").unwrap();
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(serde_json::from_value::<RunConfig>(json).unwrap(), c);
        let again = parse(&c.to_toml().unwrap()).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn deployed_run_configs_are_the_presets() {
        let demo = parse(include_str!("../../../deploy/runs/demo.toml")).unwrap();
        let mut expected = RunConfig::preset(Preset::Fast);
        expected.dataset.path = PathBuf::from("data/demo/dataset");
        assert_eq!(demo, expected);
        let seed = parse(include_str!("../../../deploy/runs/seed-cifar10.toml")).unwrap();
        let mut expected = RunConfig::preset(Preset::Seed);
        expected.dataset.path = PathBuf::from("/datasets/cifar10");
        assert_eq!(seed, expected);
    }

    #[test]
    fn typos_and_unknown_presets_are_named() {
        let e = parse("[training]\nlrr = 1.0").unwrap_err().to_string();
        assert!(e.contains("lrr"), "{e}");
        let e = parse("preset = \"huge\"").unwrap_err().to_string();
        assert!(e.contains("preset") && e.contains("huge"), "{e}");
        let e = parse("[model]\nnum_classes = 3").unwrap_err().to_string();
        assert!(e.contains("num_classes"), "{e}");
        let e = parse("[schedule]\nkind = \"quadratic\"").unwrap_err();
        assert_eq!(field_of(e), "schedule.kind");
        let e = parse("[schedule]\noffset = 0.1").unwrap_err();
        assert_eq!(field_of(e), "schedule.offset");
        // The paper's name for it is read too.
        let c = parse("[schedule]\nkind = \"cosine\"\ns = 0.02").unwrap();
        assert!(
            matches!(c.schedule.betas, ddpm_core::schedule::BetaSchedule::Cosine { offset, .. } if offset == 0.02)
        );
    }

    #[test]
    fn mistyped_values_and_misplaced_tables_are_named() {
        let cases = [
            ("[training]\nsteps = \"many\"", "training.steps"),
            ("training = 3", "training"),
            ("[ema]\nwarmup = \"slow\"", "ema.warmup"),
            ("[dataset]\ncache = \"sometimes\"", "dataset.cache"),
            (
                "[model]\nchannel_mults = [1, \"x\"]",
                "model.channel_mults[1]",
            ),
            ("[training]\nwarmup = 5", "training.warmup"),
        ];
        for (text, field) in cases {
            assert_eq!(field_of(parse(text).unwrap_err()), field, "{text}");
        }
        // A stored config (JSON in the registry) is read as strictly.
        let mut stored = serde_json::to_value(RunConfig::preset(Preset::Fast)).unwrap();
        stored["training"]["stepz"] = 1.into();
        assert!(serde_json::from_value::<RunConfig>(stored).is_err());
    }

    #[test]
    fn overrides_apply_after_the_file_and_are_checked_alike() {
        let overrides = Overrides {
            dataset: Some(PathBuf::from("/data/other")),
            batch_size: Some(4),
            ..Default::default()
        };
        let c = RunConfig::from_toml(
            "[dataset]\npath = \"x\"\n[training]\nbatch_size = 8",
            &overrides,
        )
        .unwrap();
        assert_eq!(c.dataset.path, PathBuf::from("/data/other"));
        assert_eq!(c.training.batch_size, 4);
        let huge = Overrides {
            seed: Some(u64::MAX),
            ..Default::default()
        };
        let e = RunConfig::from_toml("", &huge).unwrap_err();
        assert_eq!(field_of(e), "training.seed");
    }

    #[test]
    fn validation_names_the_field() {
        let e = parse("").unwrap().validate().unwrap_err();
        assert_eq!(field_of(e), "dataset.path");
        // A path that is not there may be a volume not mounted yet: a failure that may
        // pass, not a config error.
        let e = parse("[dataset]\npath = \"/nonexistent/ddpm\"")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(
            matches!(e, TrainerError::DatasetUnavailable { .. }) && e.is_transient(),
            "{e}"
        );
        let cases = [
            ("[model]\nimage_size = 18", "model.image_size"),
            ("[training]\nlr = -1.0", "training.lr"),
            ("[training]\nbatch_size = 0", "training.batch_size"),
            ("[training]\nlabel_dropout = 1.5", "training.label_dropout"),
            ("[training]\nkeep_last = 0", "training.keep_last"),
            ("[training]\nmin_snr_gamma = -1.0", "training.min_snr_gamma"),
            ("[ema]\ndecay = 1.5", "ema.decay"),
            ("[schedule]\ntimesteps = 1", "schedule.timesteps"),
            ("[model]\nattention_heads = 5", "model.attention_heads"),
        ];
        for (text, field) in cases {
            let (_dir, full) = with_dataset(text);
            let e = parse(&full).unwrap().validate().unwrap_err();
            assert_eq!(field_of(e), field, "{text}");
        }
        let (_dir, ok) = with_dataset("preset = \"seed\"");
        parse(&ok).unwrap().validate().unwrap();
    }

    #[test]
    fn the_pixel_limit_has_a_default_and_is_checked() {
        let c = parse("").unwrap();
        assert_eq!(c.dataset.max_pixels, DEFAULT_MAX_PIXELS);
        assert_eq!(c.dataset.image_limits(), ImageLimits::default());
        let dir = tempfile::tempdir().unwrap();
        let text = |v: &str| {
            format!(
                "[dataset]\npath = {:?}\nmax_pixels = {v}\n",
                dir.path().display().to_string()
            )
        };
        let c = parse(&text("1_000_000")).unwrap();
        c.validate().unwrap();
        assert_eq!(c.dataset.image_limits().max_pixels, 1_000_000);
        let e = parse(&text("0")).unwrap().validate().unwrap_err();
        assert_eq!(field_of(e), "dataset.max_pixels");
        assert_eq!(
            field_of(parse(&text("-1")).unwrap_err()),
            "dataset.max_pixels"
        );
        // A config stored before the setting existed gets the default.
        let mut stored = serde_json::to_value(RunConfig::preset(Preset::Fast)).unwrap();
        stored["dataset"]
            .as_object_mut()
            .unwrap()
            .remove("max_pixels")
            .unwrap();
        let c: RunConfig = serde_json::from_value(stored).unwrap();
        assert_eq!(c.dataset.max_pixels, DEFAULT_MAX_PIXELS);
    }

    #[test]
    fn runs_stored_before_scoring_are_not_scored_and_presets_are() {
        let mut stored = serde_json::to_value(RunConfig::preset(Preset::Fast)).unwrap();
        stored.as_object_mut().unwrap().remove("quality").unwrap();
        let c: RunConfig = serde_json::from_value(stored).unwrap();
        assert!(!c.quality.enabled());
        for preset in ["tiny", "fast", "seed"] {
            let c = parse(&format!("preset = \"{preset}\"")).unwrap();
            assert_eq!(c.quality, QualityConfig::default());
            assert!(c.quality.enabled());
        }
        let c = parse("[quality]\nsamples_per_class = 4\nsampler = \"ddim\"").unwrap();
        assert_eq!(c.quality.samples_per_class, 4);
        assert_eq!(c.quality.sampler, ddpm_core::sampler::SamplerKind::Ddim);
        let cases = [
            ("[quality]\nholdout = 0.9", "quality.holdout"),
            ("[quality]\nsteps = 0", "quality.steps"),
            (
                "[quality]\nsamples_per_class = 1",
                "quality.samples_per_class",
            ),
        ];
        for (text, field) in cases {
            let (_dir, full) = with_dataset(text);
            let e = parse(&full).unwrap().validate().unwrap_err();
            assert_eq!(field_of(e), field, "{text}");
        }
    }
}
