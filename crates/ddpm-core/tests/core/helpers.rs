//! Shared test parts: a tiny coloured dataset and a small training loop.

use ddpm_core::{
    ema::{Ema, EmaConfig},
    optim::AdamWConfig,
    training::{diffusion_loss, Learner, Objective},
    NoiseSchedule, ScheduleConfig, UNetConfig,
};
use tch::{Device, Kind, Tensor};

/// A file of `tests/reference/`.
pub fn reference_path(name: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/reference")
        .join(name)
}

/// A JSON file of `tests/reference/`.
pub fn reference_json(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(reference_path(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// libtorch has one global generator: a test that seeds it and expects the seeded
/// stream holds this lock for as long as it draws, so tests on other threads cannot
/// take numbers out of the middle of its stream. Every test that seeds holds it.
pub fn exclusive_rng() -> std::sync::MutexGuard<'static, ()> {
    static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
    RNG.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One libtorch thread per test (see main.rs); every test that runs a model calls it.
pub fn one_thread() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| tch::set_num_threads(1));
}

/// The colour of class `c` in [−1, 1] RGB: red, green, blue.
pub fn class_colour(c: i64) -> [f64; 3] {
    let mut rgb = [-0.8; 3];
    rgb[c as usize] = 0.8;
    rgb
}

/// `n` images per class of `classes` (≤ 3) flat colours with a random brightness ramp and
/// per-pixel noise, `[n·classes, 3, size, size]`, and their labels.
pub fn colour_dataset(classes: i64, n: i64, size: i64) -> (Tensor, Tensor) {
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for c in 0..classes {
        let rgb = Tensor::from_slice(&class_colour(c))
            .to_kind(Kind::Float)
            .view([1, 3, 1, 1]);
        let ramp =
            Tensor::linspace(-0.15, 0.15, size, (Kind::Float, Device::Cpu)).view([1, 1, 1, size]);
        let sign = (Tensor::rand([n, 1, 1, 1], (Kind::Float, Device::Cpu)) - 0.5).sign();
        let noise = Tensor::randn([n, 3, size, size], (Kind::Float, Device::Cpu)) * 0.05;
        images.push((rgb + ramp * sign + noise).clamp(-1.0, 1.0));
        labels.push(Tensor::full([n], c, (Kind::Int64, Device::Cpu)));
    }
    (Tensor::cat(&images, 0), Tensor::cat(&labels, 0))
}

/// A network small enough to learn the colour dataset in seconds on a CPU.
pub fn micro_config(classes: i64) -> UNetConfig {
    one_thread();
    UNetConfig {
        image_size: 8,
        in_channels: 3,
        out_channels: 3,
        base_channels: 16,
        channel_mults: vec![1, 2],
        bottleneck_mult: 2,
        attention_resolutions: vec![4],
        attention_heads: 2,
        time_embedding_dim: 32,
        num_classes: Some(classes),
    }
}

pub struct Trained {
    pub ema: Ema,
    pub schedule: NoiseSchedule,
    pub losses: Vec<f64>,
}

/// Trains `config` on `(images, labels)` for `steps` steps of `batch` with label dropout.
pub fn train(
    config: &UNetConfig,
    images: &Tensor,
    labels: &Tensor,
    steps: i64,
    batch: i64,
    lr: f64,
    seed: i64,
) -> Trained {
    let _rng = exclusive_rng();
    tch::manual_seed(seed);
    let schedule = NoiseSchedule::new(ScheduleConfig::default(), Device::Cpu).unwrap();
    let ema_cfg = EmaConfig {
        decay: 0.99,
        warmup_steps: steps / 4,
        ..Default::default()
    };
    let adamw = AdamWConfig {
        lr,
        ..Default::default()
    };
    let mut learner = Learner::new(config, Device::Cpu, adamw, ema_cfg).unwrap();
    let n = images.size()[0];
    let mut losses = Vec::new();
    for _ in 0..steps {
        let idx = Tensor::randint(n, [batch], (Kind::Int64, Device::Cpu));
        let x0 = images.index_select(0, &idx);
        let y = labels.index_select(0, &idx);
        let loss = diffusion_loss(
            &learner.model,
            &schedule,
            &x0,
            Some(&y),
            &Objective::default(),
        )
        .unwrap()
        .loss;
        loss.backward();
        let _ = learner.update(lr, Some(1.0)).unwrap();
        losses.push(loss.double_value(&[]));
    }
    Trained {
        ema: learner.ema,
        schedule,
        losses,
    }
}

/// Mean of each channel per image: `[N, 3]` as rows.
pub fn channel_means(images: &Tensor) -> Vec<[f64; 3]> {
    let m = images.mean_dim([2i64, 3].as_slice(), false, Kind::Float);
    (0..m.size()[0])
        .map(|i| [0, 1, 2].map(|c| m.double_value(&[i, c])))
        .collect()
}
