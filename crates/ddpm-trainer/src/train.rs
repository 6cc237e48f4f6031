//! The training loop, on its own thread (libtorch is blocking).
//!
//! Step s (1-based) seeds libtorch with f(seed, s) before any draw and trains on batch
//! s − 1 of the data stream, so a run resumed from the state saved after step S replays
//! steps S + 1, … exactly. Every `log_every` steps a metric row (loss and grad norm
//! averaged over the window, learning rate, images/s) goes to the recorder over an
//! unbounded channel, so recording never stalls a step; every `checkpoint_every` steps,
//! at the end and on a stop request, the EMA checkpoint, its sample grid and the
//! training state are written to the store, and the recorder registers them.

use std::{
    io::IsTerminal,
    sync::{
        atomic::{AtomicBool, AtomicI64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use chrono::Utc;
use ddpm_core::{
    checkpoint::{
        checkpoint_bytes, load_training_state, save_training_state, CheckpointInfo, StateInfo,
    },
    training::{diffusion_loss, Learner},
    NoiseSchedule,
};
use ddpm_registry::{CheckpointKind, CheckpointRecord, CheckpointStore, MetricPoint, StoredFile};
use indicatif::{ProgressBar, ProgressStyle};
use tch::{Device, Kind, Tensor};
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use crate::{
    config::{CacheMode, RunConfig, AUTO_CACHE_BYTES},
    dataset::{mix, Item, Transform},
    error::{Result, TrainerError},
    grid::{png_bytes, sample_grid, GridSpec},
    loader::DataLoader,
    ImageSource,
};

/// Batches the loader keeps ready ahead of the step.
const PREFETCH_BATCHES: usize = 4;

/// What the training thread tells the recorder, in order.
#[derive(Debug)]
pub enum Event {
    /// Training (re)starts after `step` steps: metric rows after it belong to an
    /// abandoned attempt and are deleted before any new one is written.
    Started {
        step: i64,
    },
    Metrics(MetricPoint),
    /// Durable files, to register.
    Checkpoint {
        step: i64,
        ema: StoredFile,
        state: StoredFile,
    },
}

/// How the loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Trained to the last step; the final checkpoint is written.
    Completed { step: i64 },
    /// Stopped on request after `step` steps, with a state saved at that step.
    Interrupted { step: i64 },
    /// Another worker holds the run now: stopped without writing anything.
    Lost { step: i64 },
}

/// Everything the training thread needs.
pub struct TrainJob {
    pub run_id: i64,
    pub config: RunConfig,
    pub class_names: Vec<String>,
    pub items: Vec<Item>,
    pub device: Device,
    pub store: CheckpointStore,
    /// The run's registered training states, newest first: the first that verifies and
    /// loads is resumed from.
    pub states: Vec<CheckpointRecord>,
    pub events: UnboundedSender<Event>,
    /// Set by SIGINT / SIGTERM: save and stop.
    pub stop: CancellationToken,
    /// Set when a heartbeat finds the run taken by another worker: stop, save nothing.
    pub lost: Arc<AtomicBool>,
    /// The last finished step, read by the heartbeat task.
    pub step: Arc<AtomicI64>,
    /// Draw a progress bar (stderr is a terminal) instead of logging each window.
    pub progress: bool,
}

/// libtorch's seed for step `step` of a run seeded with `seed`.
pub fn step_seed(seed: u64, step: i64) -> i64 {
    (mix(seed, step as u64 ^ 0x5EED_0000_0000) >> 1) as i64
}

/// The learning rate at step `s` (1-based): linear warm-up to `lr`, then constant.
pub fn lr_at(lr: f64, warmup_steps: i64, s: i64) -> f64 {
    if warmup_steps > 0 && s < warmup_steps {
        lr * s as f64 / warmup_steps as f64
    } else {
        lr
    }
}

/// Switches CUDA autocast to bf16 on this thread: `tch::autocast` enables autocast with
/// libtorch's default CUDA dtype, f16, which needs loss scaling; bf16 does not. `tch`
/// exposes no setter, so this calls libtorch's `at::autocast::set_autocast_dtype`
/// directly (a plain function of two 1-byte enums, C-compatible on the Itanium ABI).
fn use_bf16_autocast() {
    extern "C" {
        #[link_name = "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE"]
        fn at_set_autocast_dtype(device_type: i8, dtype: i8);
    }
    const DEVICE_CUDA: i8 = 1; // c10::DeviceType::CUDA
    const SCALAR_BFLOAT16: i8 = 15; // c10::ScalarType::BFloat16
                                    // SAFETY: the symbol is libtorch's (checked present at link time); it only stores
                                    // the dtype in a thread-local.
    unsafe { at_set_autocast_dtype(DEVICE_CUDA, SCALAR_BFLOAT16) }
}

/// Running sums over a logging window, kept on the device (no sync per step).
struct Window {
    loss: Tensor,
    grad_norm: Tensor,
    steps: i64,
    started: Instant,
    waited: Duration,
}

impl Window {
    fn new(device: Device) -> Window {
        Window {
            loss: Tensor::zeros([], (Kind::Double, device)),
            grad_norm: Tensor::zeros([], (Kind::Double, device)),
            steps: 0,
            started: Instant::now(),
            waited: Duration::ZERO,
        }
    }
}

/// The models and optimizer of one run.
struct State {
    learner: Learner,
    schedule: NoiseSchedule,
}

fn build(config: &RunConfig, device: Device) -> Result<State> {
    tch::manual_seed(step_seed(config.training.seed, 0));
    let schedule = NoiseSchedule::new(config.schedule, device)?;
    let learner = Learner::new(&config.model, device, config.optimizer(), config.ema)?;
    Ok(State { learner, schedule })
}

/// Restores the newest usable state; returns its step (0 when there is none).
fn resume(job: &TrainJob, state: &mut State) -> i64 {
    for record in &job.states {
        let loaded = job
            .store
            .verify(record)
            .map_err(TrainerError::from)
            .and_then(|path| {
                Ok(load_training_state(
                    &path,
                    &state.learner.model,
                    &state.learner.ema,
                    &mut state.learner.optimizer,
                )?)
            });
        match loaded {
            Ok(manifest) => {
                tracing::info!(step = manifest.step, path = %record.path, "resuming from a training state");
                return manifest.step;
            }
            Err(e) => {
                tracing::warn!(path = %record.path, error = %e, "training state unusable; trying an older one")
            }
        }
    }
    if !job.states.is_empty() {
        tracing::warn!("no usable training state: starting over from step 0");
    }
    0
}

fn make_source(job: &TrainJob) -> Arc<ImageSource> {
    let cfg = &job.config;
    let transform = Transform {
        image_size: cfg.model.image_size as u32,
        augment: cfg.dataset.augment,
        flip: cfg.dataset.flip,
    };
    let base = transform.base_size() as u64;
    let decoded_bytes = job.items.len() as u64 * base * base * 3;
    let cache = match cfg.dataset.cache {
        CacheMode::Always => true,
        CacheMode::Never => false,
        CacheMode::Auto => decoded_bytes <= AUTO_CACHE_BYTES,
    };
    let source = Arc::new(ImageSource::new(job.items.clone(), transform, cache));
    if cache {
        let t0 = Instant::now();
        source.warm_up();
        tracing::info!(
            images = source.len(),
            broken = source.broken_count(),
            seconds = t0.elapsed().as_secs_f64(),
            "dataset decoded into memory"
        );
    }
    source
}

/// Trains the run to its last step or until stopped. Blocking: call on its own thread.
pub fn train(job: TrainJob) -> Result<Outcome> {
    let cfg = job.config.clone();
    let t = &cfg.training;
    let bf16 = t.bf16 && job.device.is_cuda();
    if bf16 {
        use_bf16_autocast();
    } else if t.bf16 {
        tracing::warn!("training.bf16 applies to CUDA only: training in f32 on this device");
    }
    let mut state = build(&cfg, job.device)?;
    let start = resume(&job, &mut state);
    job.step.store(start, Ordering::Relaxed);
    let _ = job.events.send(Event::Started { step: start });
    if start >= t.steps {
        return Ok(Outcome::Completed { step: start });
    }
    tracing::info!(
        parameters = state.learner.model.parameter_count(),
        device = ?job.device,
        start,
        steps = t.steps,
        "training"
    );

    let source = make_source(&job);
    let loader = DataLoader::start(
        source.clone(),
        t.seed,
        t.batch_size as usize,
        start as u64,
        PREFETCH_BATCHES,
    );
    let size = cfg.model.image_size;
    let clip = (t.max_grad_norm > 0.0).then_some(t.max_grad_norm);
    let conditional = cfg.model.num_classes.is_some();
    let bar = job.progress.then(|| progress_bar(t.steps, start));

    let mut window = Window::new(job.device);
    let mut step = start;
    let mut saved = start;
    while step < t.steps {
        if job.lost.load(Ordering::Relaxed) {
            return Ok(Outcome::Lost { step });
        }
        if job.stop.is_cancelled() {
            break;
        }
        let s = step + 1;
        tch::manual_seed(step_seed(t.seed, s));
        let waiting = Instant::now();
        let batch = loader.next_batch()?;
        window.waited += waiting.elapsed();
        let x0 = Tensor::f_from_slice(&batch.images)?
            .f_view([t.batch_size, 3, size, size])? // [B, 3, S, S]
            .f_to_device(job.device)?;
        let labels = conditional.then(|| Tensor::from_slice(&batch.labels).to_device(job.device)); // [B]
        let lr = lr_at(t.lr, t.warmup_steps, s);
        let loss = tch::autocast(bf16, || {
            diffusion_loss(
                &state.learner.model,
                &state.schedule,
                &x0,
                labels.as_ref(),
                t.label_dropout,
            )
        })?;
        loss.f_backward()?;
        let grad_norm = state.learner.update(lr, clip)?;
        window.loss += loss.detach().to_kind(Kind::Double);
        window.grad_norm += grad_norm.to_kind(Kind::Double);
        window.steps += 1;
        step = s;
        job.step.store(s, Ordering::Relaxed);
        if let Some(bar) = &bar {
            bar.set_position(s as u64);
        }

        if s % t.log_every == 0 || s == t.steps {
            let point = window_metrics(&mut window, s, lr, t.batch_size);
            report(&point, &window, bar.as_ref());
            let _ = job.events.send(Event::Metrics(point));
            window = Window::new(job.device);
        }
        if s % t.checkpoint_every == 0 || s == t.steps {
            save(&job, &state, s)?;
            saved = s;
        }
    }
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    if source.broken_count() > 0 {
        tracing::warn!(
            count = source.broken_count(),
            "images skipped as corrupt while training"
        );
    }
    if step >= t.steps {
        return Ok(Outcome::Completed { step });
    }
    if step > saved {
        save(&job, &state, step)?;
    }
    tracing::info!(step, "stopped on request; training state saved");
    Ok(Outcome::Interrupted { step })
}

fn window_metrics(window: &mut Window, s: i64, lr: f64, batch: i64) -> MetricPoint {
    let n = window.steps.max(1) as f64;
    let seconds = window.started.elapsed().as_secs_f64();
    MetricPoint {
        step: s,
        // Reading the sums is the only host sync of the window.
        loss: window.loss.double_value(&[]) / n,
        learning_rate: lr,
        grad_norm: Some(window.grad_norm.double_value(&[]) / n),
        images_per_sec: (seconds > 0.0).then(|| window.steps as f64 * batch as f64 / seconds),
        recorded_at: Utc::now(),
        loss_smoothed: None,
        loss_by_timestep: [None; 4],
    }
}

fn report(p: &MetricPoint, window: &Window, bar: Option<&ProgressBar>) {
    let ips = p.images_per_sec.unwrap_or(0.0);
    match bar {
        Some(bar) => bar.set_message(format!("loss {:.4} | {ips:.0} img/s", p.loss)),
        None => tracing::info!(
            step = p.step,
            loss = p.loss,
            lr = p.learning_rate,
            grad_norm = p.grad_norm.unwrap_or(f64::NAN),
            images_per_sec = ips,
            loader_wait_s = window.waited.as_secs_f64(),
            "train"
        ),
    }
}

fn progress_bar(total: i64, start: i64) -> ProgressBar {
    let bar = ProgressBar::new(total as u64);
    if let Ok(style) = ProgressStyle::with_template(
        "{bar:30} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
    ) {
        bar.set_style(style);
    }
    bar.set_position(start as u64);
    bar
}

/// Whether to draw a progress bar: only for a person at a terminal.
pub fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}

/// Writes the EMA checkpoint, its grid and the training state at step `s`, then tells
/// the recorder to register them.
fn save(job: &TrainJob, state: &State, s: i64) -> Result<()> {
    let t0 = Instant::now();
    let cfg = &job.config;
    let info = CheckpointInfo {
        schedule: cfg.schedule,
        class_names: job.class_names.clone(),
        run_id: Some(job.run_id),
        step: s,
    };
    let (bytes, _) = checkpoint_bytes(state.learner.ema.model(), &info)?;
    let ema_rel = job.store.path_for(job.run_id, s, CheckpointKind::Ema);
    let ema = job.store.write_bytes(&ema_rel, &bytes)?;
    if cfg.training.sample_grid_per_class > 0 {
        let spec = GridSpec {
            per_class: cfg.training.sample_grid_per_class,
            steps: cfg.training.sample_steps,
            guidance_scale: cfg.training.guidance_scale,
            seed: cfg.training.seed,
        };
        // A grid is a picture for people: failing to draw one never costs a checkpoint.
        let written =
            sample_grid(state.learner.ema.model(), &state.schedule, &spec).and_then(|grid| {
                let png = png_bytes(&grid).map_err(|source| TrainerError::Image {
                    path: ema_rel.clone(),
                    source,
                })?;
                Ok(job
                    .store
                    .write_bytes(&CheckpointStore::grid_path_for(&ema_rel), &png)?)
            });
        if let Err(e) = written {
            tracing::warn!(step = s, error = %e, "sample grid not written");
        }
    }
    let state_rel = job.store.path_for(job.run_id, s, CheckpointKind::State);
    let info = StateInfo {
        step: s,
        seed: cfg.training.seed,
        extra: serde_json::json!({ "run_id": job.run_id }),
    };
    let state_file = job.store.write_atomic(&state_rel, |tmp| {
        save_training_state(
            tmp,
            &state.learner.model,
            &state.learner.ema,
            &state.learner.optimizer,
            &info,
        )
        .map(|_| ())
    })?;
    tracing::info!(step = s, seconds = t0.elapsed().as_secs_f64(), path = %ema.path, "checkpoint written");
    let _ = job.events.send(Event::Checkpoint {
        step: s,
        ema,
        state: state_file,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_up_is_linear_then_constant() {
        assert_eq!(lr_at(1.0, 0, 1), 1.0);
        assert_eq!(lr_at(1.0, 4, 1), 0.25);
        assert_eq!(lr_at(1.0, 4, 4), 1.0);
        assert_eq!(lr_at(1.0, 4, 100), 1.0);
    }

    #[test]
    fn step_seeds_differ_by_step_and_seed() {
        assert_ne!(step_seed(0, 1), step_seed(0, 2));
        assert_ne!(step_seed(0, 1), step_seed(1, 1));
        assert_eq!(step_seed(3, 7), step_seed(3, 7));
        assert!(step_seed(u64::MAX, i64::MAX) >= 0);
    }
}
