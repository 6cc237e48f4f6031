//! Sample quality of every EMA checkpoint, measured on the run's own data (issue 9).
//!
//! No pretrained network is available offline, and an ImageNet one would judge 16×16
//! shapes poorly, so the judge is a [`ClassProbe`] trained on the run's data:
//!
//! 1. A deterministic, stratified share of each class ([`QualityConfig::holdout`], 10 %
//!    by default) is held out: training never sees it ([`split_items`]).
//! 2. Before the first score of an attempt, the probe is trained on the training share
//!    (a few seconds on a CPU for the demo data) and its accuracy on the held-out share
//!    recorded with every score; below [`PROBE_TRUSTED`] the scores are flagged.
//! 3. Each EMA checkpoint draws K images per class with fixed seeds (the same at every
//!    checkpoint) and is scored ([`Scorer::score`]): class accuracy, Fréchet distance to
//!    the held-out images in the probe's penultimate features (scaled so the held-out
//!    images' RMS feature is 1; with the distance of as
//!    many real training images as the floor), KID with its spread over subsets, and
//!    within-class diversity relative to real images ([`stats`]).
//!
//! Everything is seeded, so re-scoring a checkpoint gives the same numbers on the same
//! device. Runs queued before this existed carry no `[quality]` section and are not
//! scored (their data stream stays as it was: nothing is held out).

pub mod stats;

use std::time::Instant;

use ddpm_core::{
    sampler::{DpmSolverAlgorithm, SamplerKind},
    AncestralVariance, Model, NoiseSchedule, SamplerConfig, TimestepSpacing,
};
use ddpm_registry::ScoreValues;
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use crate::{
    dataset::{mix, ImageLimits, ImageSource, Item, Transform},
    error::{Result, TrainerError},
    probe::{sample_classes, stratified_split, ClassProbe, ProbeConfig, FEATURES},
};

/// Held-out accuracy below which the probe is too weak to judge with: its scores are
/// recorded, flagged in `runs show` and logged as unreliable.
pub const PROBE_TRUSTED: f64 = 0.8;

/// Images per class the probe trains on and the scores compare with, at most: a large
/// data set (CIFAR-10: 4 500 training and 500 held-out images per class) is subsampled
/// (in the split's seeded order), so that building the scorer stays within seconds and
/// memory whatever the data set's size. KID subsets are capped at 1 000 anyway.
const MAX_PER_CLASS: usize = 500;

/// Held-out images a class needs, at the least, for the run to be scored (and training
/// images: the probe must learn the class).
const MIN_PER_CLASS: usize = 2;

/// `[quality]`: how checkpoints are scored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QualityConfig {
    /// Fraction of each class held out from training and scored against (0: no holdout
    /// and no scores). A data set too small to hold out 2 images of every class is not
    /// scored either (and keeps every image for training).
    pub holdout: f64,
    /// Generated images per class in each score (K).
    pub samples_per_class: i64,
    /// Sampler of the scored images (`ddpm`, `ddim`, `dpmpp_2m`). A run stores its
    /// whole `[quality]`, so changing the default changes no stored run's scores.
    pub sampler: SamplerKind,
    /// Its steps.
    pub steps: usize,
    /// Its timestep spacing; absent: the sampler's own (trailing for `ddpm` and `ddim`,
    /// linspace for `dpmpp_2m`), what runs stored before this option existed used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestep_spacing: Option<TimestepSpacing>,
    /// `dpmpp_2m`'s solver: `dpmsolver++` (the ODE's, when absent) or `sde-dpmsolver++`.
    #[serde(default, skip_serializing_if = "is_default")]
    pub algorithm_type: DpmSolverAlgorithm,
    /// `ddpm`'s σ²: `fixed_small` (β̃, when absent) or `fixed_large` (β).
    #[serde(default, skip_serializing_if = "is_default")]
    pub variance_type: AncestralVariance,
    /// `[lo, hi]`: guidance only at the timesteps lo ≤ t ≤ hi; absent: at every step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance_interval: Option<(i64, i64)>,
    /// Guidance scale of the scored images.
    pub guidance_scale: f64,
    /// Seeds the split, the probe, the samples and the KID subsets.
    pub seed: u64,
    /// Optimizer steps of the probe (batch 64).
    pub probe_steps: i64,
    /// Subset pairs the KID is averaged over.
    pub kid_subsets: usize,
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

impl Default for QualityConfig {
    /// What the presets use: about a tenth held out, 16 images per class drawn with the
    /// server's default sampler at guidance 3 — the stochastic DPM-Solver++(2M) in 10
    /// steps (its own linspace spacing) with guidance only at 80 ≤ t ≤ 580, which had the
    /// best Fréchet distance at diversity ≥ 0.9 of the data's at the fewest network
    /// evaluations in the sampler benchmark (BENCHMARKS.md, "Samplers: quality per
    /// network evaluation").
    fn default() -> Self {
        QualityConfig {
            holdout: 0.1,
            samples_per_class: 16,
            sampler: SamplerKind::DpmPp2m,
            steps: 10,
            timestep_spacing: None,
            algorithm_type: DpmSolverAlgorithm::SdeDpmSolverPp,
            variance_type: AncestralVariance::FixedSmall,
            guidance_interval: Some((80, 580)),
            guidance_scale: 3.0,
            seed: 0,
            probe_steps: 300,
            kid_subsets: 100,
        }
    }
}

impl QualityConfig {
    /// No scoring: what a run stored before `[quality]` existed reads as.
    pub fn off() -> Self {
        QualityConfig {
            holdout: 0.0,
            ..QualityConfig::default()
        }
    }

    pub fn enabled(&self) -> bool {
        self.holdout > 0.0
    }

    /// The sampler the scored images are drawn with, for a schedule of `timesteps` steps:
    /// as the server treats its defaults, `algorithm_type` applies to `dpmpp_2m` only,
    /// `variance_type` to `ddpm` only, and a guidance interval whose upper end is not
    /// below T is not applied (guidance at every step).
    pub fn sampler_config(&self, timesteps: usize) -> SamplerConfig {
        let base = match self.sampler {
            SamplerKind::Ddpm => SamplerConfig::ddpm(self.steps),
            SamplerKind::Ddim => SamplerConfig::ddim(self.steps),
            SamplerKind::DpmPp2m => SamplerConfig::dpmpp_2m(self.steps),
        };
        SamplerConfig {
            spacing: self.timestep_spacing.unwrap_or(base.spacing),
            dpm_solver: match self.sampler {
                SamplerKind::DpmPp2m => self.algorithm_type,
                _ => base.dpm_solver,
            },
            variance: match self.sampler {
                SamplerKind::Ddpm => self.variance_type,
                _ => base.variance,
            },
            guidance_interval: self
                .guidance_interval
                .filter(|&(_, hi)| hi < timesteps as i64),
            ..base
        }
    }

    /// Every field in range; `timesteps` is the schedule's T.
    pub fn validate(&self, timesteps: usize) -> Result<()> {
        if !(0.0..=0.5).contains(&self.holdout) {
            return Err(TrainerError::config(
                "quality.holdout",
                format!("must be in [0, 0.5] (0: no scores), got {}", self.holdout),
            ));
        }
        if self.samples_per_class < 2 {
            return Err(TrainerError::config(
                "quality.samples_per_class",
                "must be at least 2",
            ));
        }
        if self.steps == 0 || self.steps > timesteps {
            return Err(TrainerError::config(
                "quality.steps",
                format!("must be in 1..={timesteps}"),
            ));
        }
        if let Some((lo, hi)) = self.guidance_interval {
            if !(0 <= lo && lo <= hi) {
                return Err(TrainerError::config(
                    "quality.guidance_interval",
                    format!("must be [lo, hi] with 0 <= lo <= hi, got [{lo}, {hi}]"),
                ));
            }
        }
        if !(self.guidance_scale.is_finite() && self.guidance_scale >= 0.0) {
            return Err(TrainerError::config(
                "quality.guidance_scale",
                "must be a number >= 0",
            ));
        }
        if self.probe_steps < 1 {
            return Err(TrainerError::config(
                "quality.probe_steps",
                "must be at least 1",
            ));
        }
        if self.kid_subsets < 1 {
            return Err(TrainerError::config(
                "quality.kid_subsets",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// A run's images split for scoring.
#[derive(Debug, Clone)]
pub struct Split {
    /// What training sees.
    pub train: Vec<Item>,
    /// What it never sees: the reference of every score.
    pub holdout: Vec<Item>,
}

/// Splits `items` (labels in `0..classes`) for scoring, or says why the run is not
/// scored. Deterministic: the same items and config give the same split on every host
/// and attempt, so a resumed run trains on the same images.
pub fn split_items(
    items: &[Item],
    classes: Option<i64>,
    image_size: i64,
    config: &QualityConfig,
) -> std::result::Result<Split, String> {
    if !config.enabled() {
        return Err("quality.holdout is 0".into());
    }
    let Some(classes) = classes else {
        return Err("the data set is unconditional: the probe needs classes".into());
    };
    if image_size % 4 != 0 {
        return Err(format!(
            "the probe needs an image size divisible by 4, not {image_size}"
        ));
    }
    let labels: Vec<i64> = items.iter().map(|i| i.label).collect();
    let (kept, held) = stratified_split(&labels, classes, config.holdout, mix(config.seed, 0x5917));
    for c in 0..classes {
        let count = |idx: &[i64]| idx.iter().filter(|&&i| labels[i as usize] == c).count();
        if count(&held) < MIN_PER_CLASS || count(&kept) < MIN_PER_CLASS {
            return Err(format!(
                "class {c} is too small to hold out {MIN_PER_CLASS} images at {} and keep {MIN_PER_CLASS} to train on",
                config.holdout
            ));
        }
    }
    let pick = |idx: &[i64]| idx.iter().map(|&i| items[i as usize].clone()).collect();
    Ok(Split {
        train: pick(&kept),
        holdout: pick(&held),
    })
}

/// Decodes `items` without augmentation (resized, centre-cropped) into `[N, 3, S, S]` in
/// [−1, 1] on `device`, with their labels.
pub fn decode(
    items: &[Item],
    size: i64,
    limits: ImageLimits,
    device: Device,
) -> Result<(Tensor, Vec<i64>)> {
    let transform = Transform {
        image_size: size as u32,
        augment: false,
        flip: false,
    };
    let source = ImageSource::new(items.to_vec(), transform, false, limits);
    let len = transform.sample_len();
    let mut pixels = vec![0f32; items.len() * len];
    let mut labels = Vec::with_capacity(items.len());
    for (i, out) in pixels.chunks_mut(len).enumerate() {
        // A broken file is replaced by the next good one (and its label).
        let label = source
            .sample(i, 0, out)
            .ok_or_else(|| TrainerError::Loader("every held-out image failed to decode".into()))?;
        labels.push(label);
    }
    let images = Tensor::f_from_slice(&pixels)?
        .f_view([items.len() as i64, 3, size, size])?
        .f_to_device(device)?;
    Ok((images, labels))
}

/// Up to `k` items of each class, in order.
fn capped(items: &[Item], classes: i64, k: usize) -> Vec<Item> {
    (0..classes)
        .flat_map(|c| items.iter().filter(move |i| i.label == c).take(k))
        .cloned()
        .collect()
}

/// Up to `k` indices of each class of `labels`, in order.
fn first_per_class(labels: &[i64], classes: i64, k: usize) -> Vec<i64> {
    (0..classes)
        .flat_map(|c| {
            (0..labels.len() as i64)
                .filter(move |&i| labels[i as usize] == c)
                .take(k)
        })
        .collect()
}

/// The probe and the real images' features: what every score of an attempt compares
/// with. Built once (lazily, before the first score).
pub struct Scorer {
    config: QualityConfig,
    classes: i64,
    probe: ClassProbe,
    /// `[H, F]`: the held-out images.
    holdout: Tensor,
    /// `[≤K·C, F]` and labels: K training images per class (the floor and diversity's
    /// reference).
    real: Tensor,
    real_labels: Vec<i64>,
    /// Fréchet distance of `real` to `holdout`.
    fd_floor: Option<f64>,
    /// What every feature vector is divided by: the held-out images' RMS feature value,
    /// so that x·y/D is about 1 for real images. KID's cubic kernel (x·y/D + 1)³ assumes
    /// features of that order (Inception's are); the probe's raw ReLU features are not,
    /// and the cube let outliers dominate.
    feature_scale: f64,
    /// Seconds taken to build this (probe training included).
    pub build_seconds: f64,
}

impl Scorer {
    /// Trains the probe on `split.train` and measures it on `split.holdout`.
    pub fn build(
        split: &Split,
        classes: i64,
        image_size: i64,
        limits: ImageLimits,
        device: Device,
        config: &QualityConfig,
    ) -> Result<Scorer> {
        let started = Instant::now();
        let (train_x, train_y) = decode(
            &capped(&split.train, classes, MAX_PER_CLASS),
            image_size,
            limits,
            device,
        )?;
        let (held_x, held_y) = decode(
            &capped(&split.holdout, classes, MAX_PER_CLASS),
            image_size,
            limits,
            device,
        )?;
        let to_tensor = |v: &[i64]| Tensor::from_slice(v).to_device(device);
        let probe_config = ProbeConfig {
            steps: config.probe_steps,
            seed: mix(config.seed, 0x9C0BE),
            ..ProbeConfig::default()
        };
        let mut probe = ClassProbe::fit(&train_x, &to_tensor(&train_y), classes, &probe_config)?;
        probe.holdout_accuracy = probe.accuracy(&held_x, &to_tensor(&held_y));
        let k = config.samples_per_class as usize;
        let real_idx = first_per_class(&train_y, classes, k);
        let real_x = train_x.index_select(0, &to_tensor(&real_idx));
        let real_labels: Vec<i64> = real_idx.iter().map(|&i| train_y[i as usize]).collect();
        let holdout = probe.features(&held_x);
        let rms = holdout
            .square()
            .mean(tch::Kind::Double)
            .double_value(&[])
            .sqrt();
        let feature_scale = if rms.is_finite() && rms > 0.0 {
            rms
        } else {
            1.0
        };
        let holdout = holdout / feature_scale;
        let real = probe.features(&real_x) / feature_scale;
        let fd_floor = stats::frechet_distance(&real, &holdout);
        let scorer = Scorer {
            config: config.clone(),
            classes,
            probe,
            holdout,
            real,
            real_labels,
            fd_floor,
            feature_scale,
            build_seconds: started.elapsed().as_secs_f64(),
        };
        Ok(scorer)
    }

    /// The probe's accuracy on the held-out images.
    pub fn probe_accuracy(&self) -> f64 {
        self.probe.holdout_accuracy
    }

    /// The Fréchet distance of the real training images to the held-out ones: the
    /// floor a perfect model's samples would reach, up to sampling noise.
    pub fn fd_floor(&self) -> Option<f64> {
        self.fd_floor
    }

    /// The class the probe sees in each of `images: [N, 3, S, S]`, `[N]` int64.
    pub fn classify(&self, images: &Tensor) -> Tensor {
        self.probe.classify(images)
    }

    /// The fraction of `images: [N, 3, S, S]` that the probe calls their `labels: [N]`.
    pub fn class_accuracy(&self, images: &Tensor, labels: &Tensor) -> f64 {
        self.probe.accuracy(images, labels)
    }

    /// `[N, F]` f64 on the CPU: the probe's features of `images`, in the units every
    /// distance here is measured in (scaled by the held-out images' RMS feature).
    pub fn features(&self, images: &Tensor) -> Tensor {
        self.probe.features(images) / self.feature_scale
    }

    /// Fréchet distance of [`Scorer::features`] rows to the held-out images'.
    pub fn fd(&self, features: &Tensor) -> Option<f64> {
        stats::frechet_distance(features, &self.holdout)
    }

    /// KID of [`Scorer::features`] rows to the held-out images' (mean, standard deviation
    /// over the configured subsets).
    pub fn kid(&self, features: &Tensor) -> Option<(f64, f64)> {
        stats::kernel_distance(
            features,
            &self.holdout,
            self.config.kid_subsets,
            self.config.seed,
        )
    }

    /// Within-class diversity of [`Scorer::features`] rows (classes `labels`) relative to
    /// K real training images per class.
    pub fn diversity(&self, features: &Tensor, labels: &[i64]) -> Option<f64> {
        stats::relative_diversity(
            features,
            labels,
            &self.real,
            &self.real_labels,
            self.classes,
        )
    }

    /// Draws K images per class from `model` with the configured sampler and fixed seeds
    /// and scores them.
    pub fn score(&self, model: &Model, schedule: &NoiseSchedule) -> Result<ScoreValues> {
        let started = Instant::now();
        let c = &self.config;
        let sampler = c.sampler_config(schedule.timesteps());
        let (images, labels) = sample_classes(
            model,
            schedule,
            c.samples_per_class,
            sampler,
            c.guidance_scale,
            mix(c.seed, 0x5A3B1E),
        )?;
        let class_accuracy = self.class_accuracy(&images, &labels);
        let features = self.features(&images);
        let labels = Vec::<i64>::try_from(&labels.to_device(Device::Cpu))?;
        let fd = self.fd(&features);
        let kid = self.kid(&features);
        let diversity = self.diversity(&features, &labels);
        Ok(ScoreValues {
            samples_per_class: c.samples_per_class,
            holdout_images: self.holdout.size()[0],
            class_accuracy: Some(class_accuracy),
            fd,
            fd_floor: self.fd_floor,
            kid: kid.map(|k| k.0),
            kid_std: kid.map(|k| k.1),
            diversity,
            probe_accuracy: Some(self.probe.holdout_accuracy),
            settings: serde_json::json!({
                "sampler": c.sampler,
                "steps": c.steps,
                "timestep_spacing": sampler.spacing,
                "algorithm_type": sampler.dpm_solver,
                "variance_type": sampler.variance,
                "guidance_interval": sampler.guidance_interval,
                "guidance_scale": c.guidance_scale,
                "seed": c.seed,
                "kid_subsets": c.kid_subsets,
                "features": FEATURES,
                "probe_trusted": self.probe.holdout_accuracy >= PROBE_TRUSTED,
            }),
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(per_class: &[usize]) -> Vec<Item> {
        per_class
            .iter()
            .enumerate()
            .flat_map(|(c, &n)| {
                (0..n).map(move |i| Item {
                    path: format!("{c}/{i}.png").into(),
                    label: c as i64,
                    size: (8, 8),
                })
            })
            .collect()
    }

    #[test]
    fn the_split_is_stratified_disjoint_and_repeatable() {
        let all = items(&[30, 20, 41]);
        let config = QualityConfig::default();
        let split = split_items(&all, Some(3), 8, &config).unwrap();
        let held_per_class: Vec<usize> = (0..3)
            .map(|c| split.holdout.iter().filter(|i| i.label == c).count())
            .collect();
        assert_eq!(held_per_class, [3, 2, 4], "round(n · 0.1) of each class");
        assert_eq!(split.train.len() + split.holdout.len(), all.len());
        assert!(split.holdout.iter().all(|h| !split.train.contains(h)));
        let again = split_items(&all, Some(3), 8, &config).unwrap();
        assert_eq!(again.holdout, split.holdout);
        // A large class is subsampled in the split's (seeded) order.
        let few = capped(&split.train, 3, 5);
        for c in 0..3 {
            let of_class: Vec<&Item> = split.train.iter().filter(|i| i.label == c).collect();
            let kept: Vec<&Item> = few.iter().filter(|i| i.label == c).collect();
            assert_eq!(kept, of_class[..5]);
        }
        // Another seed holds out other images.
        let other = QualityConfig {
            seed: 1,
            ..config.clone()
        };
        assert_ne!(
            split_items(&all, Some(3), 8, &other).unwrap().holdout,
            split.holdout
        );
    }

    #[test]
    fn too_small_or_unconditional_data_sets_are_not_scored() {
        let config = QualityConfig::default();
        // 12 images hold out round(1.2) = 1 < 2.
        assert!(split_items(&items(&[12, 30]), Some(2), 8, &config).is_err());
        assert!(split_items(&items(&[30]), None, 8, &config).is_err());
        assert!(split_items(&items(&[30, 30]), Some(2), 10, &config).is_err());
        assert!(split_items(&items(&[30, 30]), Some(2), 8, &QualityConfig::off()).is_err());
    }

    #[test]
    fn sampler_options_default_to_what_runs_stored_before_them_used() {
        // A stored `[quality]` without the options reads as the sampler's own spacing,
        // the ODE solver, β̃ and guidance at every step: the sampler it always had.
        let old: QualityConfig = toml::from_str(
            "holdout = 0.1\nsamples_per_class = 16\nsampler = \"dpmpp_2m\"\nsteps = 20\n\
             guidance_scale = 3.0\nseed = 0\nprobe_steps = 300\nkid_subsets = 100\n",
        )
        .unwrap();
        assert_eq!(old.sampler_config(1000), SamplerConfig::dpmpp_2m(20));
        // The options round-trip, and a config without them serializes without them.
        let mut with = old.clone();
        with.timestep_spacing = Some(TimestepSpacing::Trailing);
        with.algorithm_type = DpmSolverAlgorithm::SdeDpmSolverPp;
        with.guidance_interval = Some((0, 700));
        let text = toml::to_string(&with).unwrap();
        assert_eq!(toml::from_str::<QualityConfig>(&text).unwrap(), with);
        assert!(!toml::to_string(&old).unwrap().contains("spacing"));
        let sampler = with.sampler_config(1000);
        assert_eq!(sampler.spacing, TimestepSpacing::Trailing);
        assert_eq!(sampler.dpm_solver, DpmSolverAlgorithm::SdeDpmSolverPp);
        assert_eq!(sampler.guidance_interval, Some((0, 700)));
        with.validate(1000).unwrap();
        // An interval that does not fit under T is not applied; options of another
        // sampler are ignored, as the server ignores its defaults for them.
        assert_eq!(with.sampler_config(700).guidance_interval, None);
        let ddim = QualityConfig {
            sampler: SamplerKind::Ddim,
            variance_type: AncestralVariance::FixedLarge,
            ..with.clone()
        };
        ddim.validate(1000).unwrap();
        let sampler = ddim.sampler_config(1000);
        assert_eq!(sampler.dpm_solver, DpmSolverAlgorithm::DpmSolverPp);
        assert_eq!(sampler.variance, AncestralVariance::FixedSmall);
        let bad = QualityConfig {
            guidance_interval: Some((500, 400)),
            ..with
        };
        assert!(bad.validate(1000).is_err());
    }
}
