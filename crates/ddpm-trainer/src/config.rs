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
//! Every table denies unknown fields, so a typo is an error that names the key.

use std::path::{Path, PathBuf};

use ddpm_core::{
    ema::{EmaConfig, EmaWarmup},
    optim::AdamWConfig,
    schedule::{BetaSchedule, ScheduleConfig},
    training::{LossWeighting, LrSchedule, Objective},
    UNetConfig,
};
use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{Result, TrainerError};

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
}

/// `[training]`, resolved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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

/// A fully resolved run: what the registry stores and a resume rebuilds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    pub preset: Preset,
    pub dataset: DatasetConfig,
    /// `num_classes` is filled from the dataset.
    pub model: UNetConfig,
    pub schedule: ScheduleConfig,
    pub training: TrainingConfig,
    pub ema: EmaConfig,
}

// ---- the file as written: every field optional ----------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfigFile {
    pub preset: Option<Preset>,
    #[serde(default)]
    pub dataset: DatasetSection,
    #[serde(default)]
    pub model: ModelSection,
    #[serde(default)]
    pub schedule: ScheduleSection,
    #[serde(default)]
    pub training: TrainingSection,
    #[serde(default)]
    pub ema: EmaSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSection {
    pub path: Option<PathBuf>,
    pub augment: Option<bool>,
    pub flip: Option<bool>,
    pub cache: Option<CacheMode>,
}

/// Overrides of [`UNetConfig`] fields; `num_classes` is not one (it comes from the
/// dataset).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    pub image_size: Option<i64>,
    pub in_channels: Option<i64>,
    pub out_channels: Option<i64>,
    pub base_channels: Option<i64>,
    pub channel_mults: Option<Vec<i64>>,
    pub bottleneck_mult: Option<i64>,
    pub attention_resolutions: Option<Vec<i64>>,
    pub attention_heads: Option<i64>,
    pub time_embedding_dim: Option<i64>,
}

/// `[schedule]`: `kind` ("linear" | "cosine") switches the β schedule (with its default
/// constants), the other fields override single constants.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSection {
    pub timesteps: Option<usize>,
    pub kind: Option<String>,
    pub beta_start: Option<f64>,
    pub beta_end: Option<f64>,
    pub s: Option<f64>,
    pub max_beta: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingSection {
    pub steps: Option<i64>,
    pub batch_size: Option<i64>,
    pub lr: Option<f64>,
    pub warmup_steps: Option<i64>,
    pub lr_schedule: Option<LrSchedule>,
    pub min_snr_gamma: Option<f64>,
    pub max_grad_norm: Option<f64>,
    pub weight_decay: Option<f64>,
    pub label_dropout: Option<f64>,
    pub seed: Option<u64>,
    pub bf16: Option<bool>,
    pub log_every: Option<i64>,
    pub checkpoint_every: Option<i64>,
    pub keep_last: Option<usize>,
    pub sample_grid_per_class: Option<i64>,
    pub sample_steps: Option<usize>,
    pub guidance_scale: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmaSection {
    pub decay: Option<f64>,
    pub warmup_steps: Option<i64>,
    pub warmup: Option<EmaWarmup>,
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
            },
            Preset::Seed => RunConfig {
                preset,
                dataset: DatasetConfig {
                    path: PathBuf::new(),
                    augment: true,
                    flip: true,
                    cache: CacheMode::Auto,
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
            },
            Preset::Fast => {
                // The tiny preset with what the learning benchmark showed learns fastest
                // per step (BENCHMARKS.md, "Learning speed").
                let mut c = RunConfig::preset(Preset::Tiny);
                c.preset = preset;
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
            other => other,
        })
    }

    /// [`from_file`](Self::from_file) on a string; relative dataset paths stay relative.
    pub fn from_toml(text: &str, overrides: &Overrides) -> Result<RunConfig> {
        let file: RunConfigFile = toml::from_str(text).map_err(|e| TrainerError::ConfigFile {
            path: PathBuf::from("<string>"),
            message: e.to_string(),
        })?;
        let mut config = Self::merge(file)?;
        config.apply(overrides);
        Ok(config)
    }

    /// The preset with the file's fields on top.
    pub fn merge(file: RunConfigFile) -> Result<RunConfig> {
        let mut c = RunConfig::preset(file.preset.unwrap_or_default());
        fn set<T>(slot: &mut T, value: Option<T>) {
            if let Some(v) = value {
                *slot = v;
            }
        }
        let d = file.dataset;
        set(&mut c.dataset.path, d.path);
        set(&mut c.dataset.augment, d.augment);
        set(&mut c.dataset.flip, d.flip);
        set(&mut c.dataset.cache, d.cache);

        let m = file.model;
        set(&mut c.model.image_size, m.image_size);
        set(&mut c.model.in_channels, m.in_channels);
        set(&mut c.model.out_channels, m.out_channels);
        set(&mut c.model.base_channels, m.base_channels);
        set(&mut c.model.channel_mults, m.channel_mults);
        set(&mut c.model.bottleneck_mult, m.bottleneck_mult);
        set(&mut c.model.attention_resolutions, m.attention_resolutions);
        set(&mut c.model.attention_heads, m.attention_heads);
        set(&mut c.model.time_embedding_dim, m.time_embedding_dim);

        c.schedule = merge_schedule(c.schedule, file.schedule)?;

        let t = file.training;
        set(&mut c.training.steps, t.steps);
        set(&mut c.training.batch_size, t.batch_size);
        set(&mut c.training.lr, t.lr);
        set(&mut c.training.warmup_steps, t.warmup_steps);
        set(&mut c.training.lr_schedule, t.lr_schedule);
        set(&mut c.training.min_snr_gamma, t.min_snr_gamma);
        set(&mut c.training.max_grad_norm, t.max_grad_norm);
        set(&mut c.training.weight_decay, t.weight_decay);
        set(&mut c.training.label_dropout, t.label_dropout);
        set(&mut c.training.seed, t.seed);
        set(&mut c.training.bf16, t.bf16);
        set(&mut c.training.log_every, t.log_every);
        set(&mut c.training.checkpoint_every, t.checkpoint_every);
        set(&mut c.training.keep_last, t.keep_last);
        set(
            &mut c.training.sample_grid_per_class,
            t.sample_grid_per_class,
        );
        set(&mut c.training.sample_steps, t.sample_steps);
        set(&mut c.training.guidance_scale, t.guidance_scale);

        set(&mut c.ema.decay, file.ema.decay);
        set(&mut c.ema.warmup_steps, file.ema.warmup_steps);
        set(&mut c.ema.warmup, file.ema.warmup);
        Ok(c)
    }

    /// Applies the CLI overrides.
    pub fn apply(&mut self, o: &Overrides) {
        if let Some(v) = o.steps {
            self.training.steps = v;
        }
        if let Some(v) = o.batch_size {
            self.training.batch_size = v;
        }
        if let Some(v) = o.lr {
            self.training.lr = v;
        }
        if let Some(v) = o.seed {
            self.training.seed = v;
        }
        if let Some(v) = &o.dataset {
            self.dataset.path = v.clone();
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

    /// The learning rate of step `s` (1-based).
    pub fn lr_at(&self, s: i64) -> f64 {
        let t = &self.training;
        t.lr_schedule.lr_at(t.lr, t.warmup_steps, t.steps, s)
    }

    /// Checks every field that can be checked without reading the dataset's images;
    /// errors name the field (`training.lr`, `model.image_size`, `dataset.path`, …).
    pub fn validate(&self) -> Result<()> {
        let path = &self.dataset.path;
        if path.as_os_str().is_empty() {
            return Err(TrainerError::config(
                "dataset.path",
                "is required (an image folder)",
            ));
        }
        if !path.is_dir() {
            let what = if path.exists() {
                "is not a directory"
            } else {
                "does not exist"
            };
            return Err(TrainerError::config(
                "dataset.path",
                format!("{} {what}", path.display()),
            ));
        }
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
        let t = &self.training;
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
        positive("training.steps", t.steps)?;
        positive("training.batch_size", t.batch_size)?;
        positive("training.log_every", t.log_every)?;
        positive("training.checkpoint_every", t.checkpoint_every)?;
        if !(t.lr.is_finite() && t.lr > 0.0) {
            return Err(TrainerError::config(
                "training.lr",
                format!("must be a positive number, got {}", t.lr),
            ));
        }
        if t.warmup_steps < 0 {
            return Err(TrainerError::config(
                "training.warmup_steps",
                "must be >= 0",
            ));
        }
        if !(t.max_grad_norm.is_finite() && t.max_grad_norm >= 0.0) {
            return Err(TrainerError::config(
                "training.max_grad_norm",
                "must be >= 0 (0 turns clipping off)",
            ));
        }
        if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
            return Err(TrainerError::config(
                "training.weight_decay",
                "must be >= 0",
            ));
        }
        if !(t.min_snr_gamma.is_finite() && t.min_snr_gamma >= 0.0) {
            return Err(TrainerError::config(
                "training.min_snr_gamma",
                format!(
                    "must be >= 0 (0 turns the weighting off), got {}",
                    t.min_snr_gamma
                ),
            ));
        }
        if !(0.0..1.0).contains(&t.label_dropout) {
            return Err(TrainerError::config(
                "training.label_dropout",
                format!("must be in [0, 1), got {}", t.label_dropout),
            ));
        }
        if t.keep_last == 0 {
            return Err(TrainerError::config(
                "training.keep_last",
                "must be at least 1 (the newest state is what a resume needs)",
            ));
        }
        if t.sample_grid_per_class < 0 {
            return Err(TrainerError::config(
                "training.sample_grid_per_class",
                "must be >= 0",
            ));
        }
        if t.sample_grid_per_class > 0
            && (t.sample_steps == 0 || t.sample_steps > self.schedule.timesteps)
        {
            return Err(TrainerError::config(
                "training.sample_steps",
                format!("must be in 1..={}", self.schedule.timesteps),
            ));
        }
        if !t.guidance_scale.is_finite() {
            return Err(TrainerError::config(
                "training.guidance_scale",
                "must be finite",
            ));
        }
        Ok(())
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

fn merge_schedule(base: ScheduleConfig, s: ScheduleSection) -> Result<ScheduleConfig> {
    let mut out = base;
    if let Some(t) = s.timesteps {
        out.timesteps = t;
    }
    if let Some(kind) = s.kind.as_deref() {
        out.betas = match kind {
            "linear" => BetaSchedule::Linear {
                beta_start: 1e-4,
                beta_end: 0.02,
            },
            "cosine" => ScheduleConfig::cosine(out.timesteps).betas,
            other => {
                return Err(TrainerError::config(
                    "schedule.kind",
                    format!("unknown schedule {other:?}: use linear or cosine"),
                ))
            }
        };
    }
    let wrong = |field: &str, kind: &str| {
        TrainerError::config(
            format!("schedule.{field}"),
            format!("only applies to kind = \"{kind}\""),
        )
    };
    match &mut out.betas {
        BetaSchedule::Linear {
            beta_start,
            beta_end,
        } => {
            if s.s.is_some() {
                return Err(wrong("s", "cosine"));
            }
            if s.max_beta.is_some() {
                return Err(wrong("max_beta", "cosine"));
            }
            if let Some(v) = s.beta_start {
                *beta_start = v;
            }
            if let Some(v) = s.beta_end {
                *beta_end = v;
            }
        }
        BetaSchedule::Cosine {
            s: offset,
            max_beta,
        } => {
            if s.beta_start.is_some() {
                return Err(wrong("beta_start", "linear"));
            }
            if s.beta_end.is_some() {
                return Err(wrong("beta_end", "linear"));
            }
            if let Some(v) = s.s {
                *offset = v;
            }
            if let Some(v) = s.max_beta {
                *max_beta = v;
            }
        }
    }
    Ok(out)
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
        assert_eq!(fast.objective().weighting, LossWeighting::Uniform);
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
        let e = parse("[schedule]\ns = 0.1").unwrap_err();
        assert_eq!(field_of(e), "schedule.s");
    }

    #[test]
    fn validation_names_the_field() {
        let e = parse("").unwrap().validate().unwrap_err();
        assert_eq!(field_of(e), "dataset.path");
        let e = parse("[dataset]\npath = \"/nonexistent/ddpm\"")
            .unwrap()
            .validate()
            .unwrap_err();
        assert_eq!(field_of(e), "dataset.path");
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
}
