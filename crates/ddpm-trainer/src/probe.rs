//! A class probe: a small CNN trained on a dataset's own images that tells which class a
//! generated image shows. Its accuracy on guided samples ("the fraction of samples of
//! class c that the probe calls c") is the quality measure of the learning benchmark.
//!
//! The probe sees luminance only. The demo classes differ in colour as well as shape,
//! and a colour-aware probe would pass a blob of the right colour; on luminance it has to
//! recognise the shape. Its own accuracy on held-out real images is reported beside
//! every score, since a probe must be good before it judges. [`roughness`] measures what
//! the probe forgives: residual noise on a recognisable shape. Its penultimate layer
//! ([`ClassProbe::features`], [`FEATURES`] wide) is the feature space in which
//! [`crate::quality`] compares generated and real image sets.

use rand::{seq::SliceRandom, SeedableRng};
use rand_pcg::Pcg64Mcg;
use tch::{
    nn::{self, Module, OptimizerConfig},
    Kind, Tensor,
};

use crate::error::Result;

/// Training settings of the probe.
#[derive(Debug, Clone, Copy)]
pub struct ProbeConfig {
    pub steps: i64,
    pub batch_size: i64,
    pub lr: f64,
    /// Fraction of each class held out to measure the probe itself.
    pub holdout: f64,
    pub seed: u64,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            steps: 600,
            batch_size: 64,
            lr: 2e-3,
            holdout: 0.1,
            seed: 0,
        }
    }
}

/// Width of the probe's penultimate layer: the features the Fréchet distance, KID and
/// diversity of [`crate::quality`] are computed in. Small, because the statistics are
/// estimated from a few dozen images per set (a covariance of width d needs well over d
/// images to be more than noise).
pub const FEATURES: i64 = 32;

/// A trained probe and how well it classifies real images it never saw.
#[derive(Debug)]
pub struct ClassProbe {
    _vs: nn::VarStore,
    conv1: nn::Conv2D,
    conv2: nn::Conv2D,
    fc1: nn::Linear,
    fc2: nn::Linear,
    /// Accuracy on the held-out real images.
    pub holdout_accuracy: f64,
}

/// `[B, 3, S, S]` in [−1, 1] → `[B, 1, S, S]` luminance (Rec. 601 weights).
fn luminance(images: &Tensor) -> Tensor {
    let w = Tensor::from_slice(&[0.299f32, 0.587, 0.114])
        .to_device(images.device())
        .view([1, 3, 1, 1]);
    (images * w).sum_dim_intlist([1i64].as_slice(), true, Kind::Float)
}

/// A stratified split of `labels` (values in `0..classes`): of each class's indices,
/// shuffled with a generator seeded by `seed`, the first `round(n · fraction)` are held
/// out. Returns (kept, held out), each in class order.
pub fn stratified_split(
    labels: &[i64],
    classes: i64,
    fraction: f64,
    seed: u64,
) -> (Vec<i64>, Vec<i64>) {
    let mut rng = Pcg64Mcg::seed_from_u64(seed);
    let (mut kept, mut held) = (Vec::new(), Vec::new());
    for c in 0..classes {
        let mut idx: Vec<i64> = (0..labels.len() as i64)
            .filter(|&i| labels[i as usize] == c)
            .collect();
        idx.shuffle(&mut rng);
        let n_held = ((idx.len() as f64 * fraction).round() as usize).min(idx.len());
        held.extend_from_slice(&idx[..n_held]);
        kept.extend_from_slice(&idx[n_held..]);
    }
    (kept, held)
}

impl ClassProbe {
    /// Trains on `images: [N, 3, S, S]` in [−1, 1] (S divisible by 4) with `labels: [N]`
    /// in `0..classes`, holding out `config.holdout` of each class to measure it.
    pub fn train(
        images: &Tensor,
        labels: &Tensor,
        classes: i64,
        config: &ProbeConfig,
    ) -> Result<ClassProbe> {
        let device = images.device();
        let labels_host = Vec::<i64>::try_from(labels)?;
        let (train_idx, test_idx) =
            stratified_split(&labels_host, classes, config.holdout, config.seed);
        let pick = |idx: &[i64]| Tensor::from_slice(idx).to_device(device);
        let (train_x, train_y) = (
            images.index_select(0, &pick(&train_idx)),
            labels.index_select(0, &pick(&train_idx)),
        );
        let mut probe = ClassProbe::fit(&train_x, &train_y, classes, config)?;
        if !test_idx.is_empty() {
            let idx = pick(&test_idx);
            probe.holdout_accuracy =
                probe.accuracy(&images.index_select(0, &idx), &labels.index_select(0, &idx));
        }
        Ok(probe)
    }

    /// Trains on all of `images: [N, 3, S, S]` (S divisible by 4) with `labels: [N]`;
    /// `config.holdout` is not used (the caller holds out): `holdout_accuracy` is NaN
    /// until the caller measures it. Deterministic for a seed on the CPU.
    pub fn fit(
        images: &Tensor,
        labels: &Tensor,
        classes: i64,
        config: &ProbeConfig,
    ) -> Result<ClassProbe> {
        let device = images.device();
        let size = images.size()[2];
        tch::manual_seed(config.seed as i64);
        let vs = nn::VarStore::new(device);
        let p = vs.root();
        let probe = ClassProbe {
            conv1: nn::conv2d(&p / "conv1", 1, 32, 3, pad1()),
            conv2: nn::conv2d(&p / "conv2", 32, 64, 3, pad1()),
            fc1: nn::linear(
                &p / "fc1",
                64 * (size / 4) * (size / 4),
                FEATURES,
                Default::default(),
            ),
            fc2: nn::linear(&p / "fc2", FEATURES, classes, Default::default()),
            _vs: vs,
            holdout_accuracy: f64::NAN,
        };
        let mut opt = nn::Adam::default().build(&probe._vs, config.lr)?;
        let n = images.size()[0];
        for _ in 0..config.steps {
            let idx = Tensor::randint(n, [config.batch_size], (Kind::Int64, device));
            // Light noise, so the probe also reads slightly imperfect samples.
            let x = images.index_select(0, &idx);
            let x = &x + x.randn_like() * 0.1;
            let y = labels.index_select(0, &idx);
            let loss = probe.logits(&x).cross_entropy_for_logits(&y);
            opt.backward_step(&loss);
        }
        Ok(probe)
    }

    /// The penultimate activations, `[B, FEATURES]`.
    fn hidden(&self, images: &Tensor) -> Tensor {
        let x = luminance(images);
        let x = self.conv1.forward(&x).relu().max_pool2d_default(2);
        let x = self.conv2.forward(&x).relu().max_pool2d_default(2);
        self.fc1.forward(&x.flatten(1, -1)).relu()
    }

    fn logits(&self, images: &Tensor) -> Tensor {
        self.fc2.forward(&self.hidden(images))
    }

    /// The probe's penultimate features of `images: [B, 3, S, S]`, `[B, FEATURES]` f64
    /// on the CPU: what the distances between image sets are measured in.
    pub fn features(&self, images: &Tensor) -> Tensor {
        chunked(images, |x| {
            self.hidden(x)
                .to_kind(Kind::Double)
                .to_device(tch::Device::Cpu)
        })
    }

    /// The class the probe sees in each image, `[B]` int64.
    pub fn classify(&self, images: &Tensor) -> Tensor {
        chunked(images, |x| self.logits(x).argmax(-1, false))
    }

    /// The fraction of `images` classified as their `labels`.
    pub fn accuracy(&self, images: &Tensor, labels: &Tensor) -> f64 {
        self.classify(images)
            .eq_tensor(labels)
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[])
    }
}

/// Images per forward pass when evaluating: a held-out set of thousands of 64×64 images
/// in one pass would hold gigabytes of activations.
const EVAL_BATCH: i64 = 256;

/// `f` over `images` in chunks of [`EVAL_BATCH`] under no-grad, the results concatenated.
fn chunked(images: &Tensor, f: impl Fn(&Tensor) -> Tensor) -> Tensor {
    tch::no_grad(|| {
        let parts: Vec<Tensor> = images.split(EVAL_BATCH, 0).iter().map(&f).collect();
        Tensor::cat(&parts, 0)
    })
}

fn pad1() -> nn::ConvConfig {
    nn::ConvConfig {
        padding: 1,
        ..Default::default()
    }
}

/// Mean absolute difference between neighbouring pixels (right and down, every channel)
/// of `images: [B, C, H, W]`: residual sampling noise ("speckle") raises it where a
/// class probe, which recognises a speckled shape, does not notice. Compare a sample
/// set's value with the real images' (ratio 1 = as smooth as the data).
pub fn roughness(images: &Tensor) -> f64 {
    let (h, w) = (images.size()[2], images.size()[3]);
    let dx = (images.narrow(3, 1, w - 1) - images.narrow(3, 0, w - 1)).abs();
    let dy = (images.narrow(2, 1, h - 1) - images.narrow(2, 0, h - 1)).abs();
    (dx.mean(Kind::Double).double_value(&[]) + dy.mean(Kind::Double).double_value(&[])) / 2.0
}

/// Samples `per_class` images of every class from `model` with `sampler`, guided, for
/// scoring.
pub fn sample_classes(
    model: &ddpm_core::Model,
    schedule: &ddpm_core::NoiseSchedule,
    per_class: i64,
    sampler: ddpm_core::SamplerConfig,
    guidance_scale: f64,
    seed: u64,
) -> Result<(Tensor, Tensor)> {
    use ddpm_core::{sampler::sample, SampleSpec};
    let classes = model.config().num_classes.unwrap_or(1);
    let specs: Vec<SampleSpec> = (0..classes)
        .flat_map(|c| {
            (0..per_class).map(move |i| SampleSpec {
                label: Some(c),
                guidance_scale,
                seed: crate::dataset::mix(seed, ((c as u64) << 32) | i as u64),
                sampler,
            })
        })
        .collect();
    let images = tch::no_grad(|| sample(model, schedule, &specs, 256))?; // [K·C, 3, S, S]
    let labels: Vec<i64> = specs.iter().map(|s| s.label.unwrap_or(0)).collect();
    Ok((
        images,
        Tensor::from_slice(&labels).to_device(model.device()),
    ))
}
