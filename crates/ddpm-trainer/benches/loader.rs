//! Data-loader throughput against what a training step consumes, measured in the same
//! run: images/s of the loader at 64×64 from PNG files (augmentation and flips on, as
//! the seed trains), with the in-memory cache off (every image decoded every time) and
//! on, next to images/s of the seed preset's training step (batch 48) on the device.
//!
//! `cargo bench -p ddpm-trainer --bench loader` (env: `DDPM_BENCH_IMAGES`,
//! `DDPM_BENCH_BATCHES`, `DDPM_BENCH_STEPS`, `DDPM_DEVICE`).

use std::{sync::Arc, time::Instant};

use ddpm_core::{
    ema::EmaConfig,
    optim::AdamWConfig,
    training::{diffusion_loss, Learner, Objective},
    DeviceChoice, NoiseSchedule, ScheduleConfig, UNetConfig,
};
use ddpm_trainer::{
    dataset::{ImageFolder, ImageSource, Transform},
    demo::{write_demo_dataset, DemoSpec},
    loader::DataLoader,
};
use tch::{Device, Kind, Tensor};

const SIZE: u32 = 64;
const BATCH: usize = 48;
const CLASSES: usize = 4;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Images/s of a loader over `batches` batches (after one to start the pipeline).
fn loader_rate(source: Arc<ImageSource>, batches: usize) -> f64 {
    let loader = DataLoader::start(source, 0, BATCH, 0..BATCH, 0, 4);
    let _ = loader.next_batch().expect("first batch");
    let t0 = Instant::now();
    for _ in 0..batches {
        let _ = loader.next_batch().expect("batch");
    }
    (batches * BATCH) as f64 / t0.elapsed().as_secs_f64()
}

/// Images/s of the seed preset's training step (forward, backward, AdamW, EMA).
fn step_rate(device: Device, steps: usize) -> f64 {
    let config = UNetConfig::seed(Some(CLASSES as i64));
    let schedule = NoiseSchedule::new(ScheduleConfig::default(), device).expect("schedule");
    let mut learner = Learner::new(
        &config,
        device,
        AdamWConfig::default(),
        EmaConfig::default(),
    )
    .expect("learner");
    let x0 = Tensor::rand(
        [BATCH as i64, 3, SIZE as i64, SIZE as i64],
        (Kind::Float, device),
    ) * 2.0
        - 1.0;
    let labels = Tensor::randint(CLASSES as i64, [BATCH as i64], (Kind::Int64, device));
    let mut step = || {
        let loss = diffusion_loss(
            &learner.model,
            &schedule,
            &x0,
            Some(&labels),
            &Objective::default(),
        )
        .expect("loss")
        .loss;
        loss.backward();
        let _ = learner.update(3e-4, None).expect("update");
        loss
    };
    let _ = step().double_value(&[]); // warm-up (allocations, cuDNN autotuning)
    let t0 = Instant::now();
    let mut last = Tensor::zeros([], (Kind::Float, device));
    for _ in 0..steps {
        last = step();
    }
    let _ = last.double_value(&[]); // waits for the device
    (steps * BATCH) as f64 / t0.elapsed().as_secs_f64()
}

fn main() {
    let images: usize = env_or("DDPM_BENCH_IMAGES", 2048);
    let batches: usize = env_or("DDPM_BENCH_BATCHES", 40);
    let device_choice: DeviceChoice = env_or("DDPM_DEVICE", DeviceChoice::Auto);
    let device = device_choice.resolve().expect("device");
    let default_steps = if device.is_cuda() { 50 } else { 3 };
    let steps: usize = env_or("DDPM_BENCH_STEPS", default_steps);

    let dir = tempfile::tempdir().expect("temp dir");
    let spec = DemoSpec {
        size: SIZE,
        per_class: images / CLASSES,
        classes: CLASSES,
        seed: 0,
    };
    write_demo_dataset(dir.path(), &spec).expect("write PNGs");
    let folder = ImageFolder::scan(dir.path(), Default::default()).expect("scan");
    let transform = Transform {
        image_size: SIZE,
        augment: true,
        flip: true,
    };
    let threads = rayon::current_num_threads();
    println!(
        "data loader: {} PNG files of {SIZE}×{SIZE}, batch {BATCH}, augment + flip, {threads} loader threads",
        folder.items.len()
    );
    let uncached = loader_rate(
        Arc::new(ImageSource::new(
            folder.items.clone(),
            transform,
            false,
            Default::default(),
        )),
        batches,
    );
    let cached_source = Arc::new(ImageSource::new(
        folder.items.clone(),
        transform,
        true,
        Default::default(),
    ));
    cached_source.warm_up();
    let cached = loader_rate(cached_source, batches);
    let consumed = step_rate(device, steps);
    println!("  loader, decoding every PNG      {uncached:>9.0} images/s");
    println!("  loader, decoded cache in memory {cached:>9.0} images/s");
    println!(
        "  training step (seed UNet, {:?}) {consumed:>9.0} images/s consumed ({steps} steps)",
        device
    );
    println!(
        "  loader / step: {:.1}× uncached, {:.1}× cached (target ≥ 2×)",
        uncached / consumed,
        cached / consumed
    );
}
