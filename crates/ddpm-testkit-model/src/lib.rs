//! The micro model the tests of `ddpm-core`, `ddpm-server` and `ddpm-trainer` train: an
//! 8×8 UNet small enough to learn flat colour classes in seconds on one CPU thread, the
//! colour dataset, and the training loop.
//!
//! `ddpm-testkit`'s libtorch half. It is a crate of its own because Cargo unifies a
//! crate's features across a workspace build: behind a feature of `ddpm-testkit`, it would
//! link libtorch into the registry's tests too, which have no rpath to find it.

use ddpm_core::{
    ema::{Ema, EmaConfig},
    optim::AdamWConfig,
    training::{diffusion_loss, Learner, Objective},
    NoiseSchedule, ScheduleConfig, UNetConfig,
};
use tch::{Device, Kind, Tensor};

/// Side of the micro model's images.
pub const MICRO_IMAGE_SIZE: i64 = 8;

/// Tests run side by side on few cores: libtorch's intra-op thread pool would only make
/// its threads spin against each other. Every test that runs a model calls this.
pub fn one_torch_thread() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| tch::set_num_threads(1));
}

/// libtorch has one global generator: a test that seeds it and expects the seeded stream
/// holds this lock for as long as it draws, so tests on other threads cannot take numbers
/// out of the middle of its stream. Every test that seeds holds it.
pub fn exclusive_rng() -> std::sync::MutexGuard<'static, ()> {
    static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
    RNG.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The micro network for `classes` classes (8×8 RGB, 16 base channels, attention at 4×4).
pub fn micro_config(classes: i64) -> UNetConfig {
    one_torch_thread();
    UNetConfig {
        image_size: MICRO_IMAGE_SIZE,
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

/// The colour of class `c` (< 3) in [−1, 1] RGB: red, green, blue.
pub fn class_colour(c: i64) -> [f64; 3] {
    let mut rgb = [-0.8; 3];
    rgb[c as usize] = 0.8;
    rgb
}

/// `n` images per class of `classes` (≤ 3) flat colours with a random brightness ramp and
/// per-pixel noise, `[n·classes, 3, size, size]`, and their labels `[n·classes]`.
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

/// How long and how to train.
#[derive(Debug, Clone, Copy)]
pub struct TrainSpec {
    pub steps: i64,
    pub batch: i64,
    /// AdamW learning rate (constant).
    pub lr: f64,
    /// Seeds libtorch's generator before the weights are drawn.
    pub seed: i64,
}

/// A trained model: its EMA weights, the (default) schedule it was trained on, and the
/// loss of every step.
pub struct Trained {
    pub ema: Ema,
    pub schedule: NoiseSchedule,
    pub losses: Vec<f64>,
}

/// Trains `config` on `(images, labels)` with label dropout, gradient clipping at 1 and an
/// EMA (decay 0.99, warm-up over the first quarter). Holds [`exclusive_rng`] throughout.
pub fn train(config: &UNetConfig, images: &Tensor, labels: &Tensor, spec: &TrainSpec) -> Trained {
    one_torch_thread();
    let _rng = exclusive_rng();
    tch::manual_seed(spec.seed);
    let schedule = NoiseSchedule::new(ScheduleConfig::default(), Device::Cpu).expect("schedule");
    let ema_config = EmaConfig {
        decay: 0.99,
        warmup_steps: spec.steps / 4,
        ..Default::default()
    };
    let adamw = AdamWConfig {
        lr: spec.lr,
        ..Default::default()
    };
    let mut learner = Learner::new(config, Device::Cpu, adamw, ema_config).expect("learner");
    let n = images.size()[0];
    let mut losses = Vec::with_capacity(spec.steps.max(0) as usize);
    for _ in 0..spec.steps {
        let idx = Tensor::randint(n, [spec.batch], (Kind::Int64, Device::Cpu));
        let loss = diffusion_loss(
            &learner.model,
            &schedule,
            &images.index_select(0, &idx),
            Some(&labels.index_select(0, &idx)),
            &Objective::default(),
        )
        .expect("loss")
        .loss;
        loss.backward();
        let _ = learner.update(spec.lr, Some(1.0)).expect("update");
        losses.push(loss.double_value(&[]));
    }
    Trained {
        ema: learner.ema,
        schedule,
        losses,
    }
}
