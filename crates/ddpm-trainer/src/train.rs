//! The training loop, on its own thread (libtorch is blocking).
//!
//! Step s (1-based) seeds libtorch with f(seed, s) before any draw and trains on batch
//! s − 1 of the data stream, so a run resumed from the state saved after step S replays
//! steps S + 1, … exactly. Every `log_every` steps a metric row goes to the recorder over
//! an unbounded channel, so recording never stalls a step: the plain ε-MSE and the grad
//! norm averaged over the window, the ε-MSE by quarter of the timestep range, an
//! exponentially smoothed loss (whose state travels in the training state, so a resumed
//! run continues the same curve), the learning rate and images/s; every `checkpoint_every` steps,
//! at the end and on a stop request, the EMA checkpoint, its sample grid and the
//! training state are written to the store, and the recorder registers them.

use std::{
    io::IsTerminal,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicI64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use chrono::Utc;
use ddpm_core::{
    checkpoint::{
        checkpoint_bytes, load_training_state_bytes, training_state_bytes, CheckpointInfo,
        StateInfo,
    },
    training::{diffusion_loss_with, Learner, Objective, StepDraws},
    NoiseSchedule,
};
use ddpm_registry::{
    CheckpointKind, CheckpointRecord, CheckpointStore, MetricPoint, ScoreValues, StoredFile,
};
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
    parallel::{Control, RankJob, World, CHECKPOINT_WAIT},
    quality::{split_items, Scorer, Split, PROBE_TRUSTED},
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
    /// Durable files, to register; the EMA checkpoint's score goes in the same
    /// transaction as its row.
    Checkpoint {
        step: i64,
        ema: StoredFile,
        state: StoredFile,
        score: Option<ScoreValues>,
    },
}

/// How the training loop ended (the worker turns it into the run's [`RunEnd`](crate::RunEnd)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoopEnd {
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
    /// Asks the registry, right before a checkpoint is written, whether this worker
    /// still holds the run (it also records the step). A worker paused past
    /// `stale_after` and then resumed has lost it, and must not write files over the
    /// new owner's; waiting for the next heartbeat would leave it a window to.
    pub holds_lease: Arc<dyn Fn(i64) -> bool + Send + Sync>,
    /// Draw a progress bar (stderr is a terminal) instead of logging each window.
    pub progress: bool,
}

/// libtorch's seed for step `step` of a run seeded with `seed`.
pub fn step_seed(seed: u64, step: i64) -> i64 {
    (mix(seed, step as u64 ^ 0x5EED_0000_0000) >> 1) as i64
}

/// Quarters of the timestep range the loss is split into (metric `loss_by_timestep`).
const TIMESTEP_BUCKETS: i64 = 4;
/// Decay of the smoothed loss per step: a time constant of about 100 steps, the window
/// over which runs are usually compared.
const LOSS_SMOOTHING: f64 = 0.99;

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
    /// Sum of per-sample ε-MSE and sample count per timestep quarter, `[4]` f64 each.
    bucket_loss: Tensor,
    bucket_count: Tensor,
    steps: i64,
    started: Instant,
    waited: Duration,
    /// Time spent in the gradient all-reduce (0 for one rank): what data parallelism
    /// costs per step. For NCCL this is the enqueue, not the transfer.
    all_reduce: Duration,
}

impl Window {
    fn new(device: Device) -> Window {
        Window {
            loss: Tensor::zeros([], (Kind::Double, device)),
            grad_norm: Tensor::zeros([], (Kind::Double, device)),
            bucket_loss: Tensor::zeros([TIMESTEP_BUCKETS], (Kind::Double, device)),
            bucket_count: Tensor::zeros([TIMESTEP_BUCKETS], (Kind::Double, device)),
            steps: 0,
            started: Instant::now(),
            waited: Duration::ZERO,
            all_reduce: Duration::ZERO,
        }
    }

    /// Adds one step: its per-sample losses `[B]` at timesteps `t: [B]` of `timesteps`.
    fn add(&mut self, per_sample: &Tensor, t: &Tensor, timesteps: i64, grad_norm: &Tensor) {
        let per_sample = per_sample.to_kind(Kind::Double);
        self.loss += per_sample.mean(Kind::Double);
        self.grad_norm += grad_norm.to_kind(Kind::Double);
        let bucket = (t * TIMESTEP_BUCKETS).floor_divide_scalar(timesteps); // [B] in 0..4
        let _ = self.bucket_loss.index_add_(0, &bucket, &per_sample);
        let _ = self
            .bucket_count
            .index_add_(0, &bucket, &per_sample.ones_like());
        self.steps += 1;
    }

    /// Makes the sums the world's: the loss (a mean per step) averaged over the ranks,
    /// the per-quarter sums and counts added up. The grad norm is already the same on
    /// every rank (it is taken after the gradient all-reduce).
    fn reduce(&mut self, world: &World) -> Result<()> {
        world.mean_(&mut self.loss)?;
        world.sum_(&mut self.bucket_loss)?;
        world.sum_(&mut self.bucket_count)
    }
}

/// An exponential moving average of the per-step loss with Adam's bias correction, so
/// the first values are not pulled towards 0. Its raw state is saved with the training
/// state; a resumed run continues it exactly.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
struct SmoothedLoss {
    /// Σ (1 − β)·β^(n−i)·loss_i, not yet bias-corrected.
    raw: f64,
    steps: i64,
}

impl SmoothedLoss {
    /// Where the training state keeps it.
    const KEY: &'static str = "smoothed_loss";

    fn value(&self) -> Option<f64> {
        (self.steps > 0).then(|| self.raw / (1.0 - LOSS_SMOOTHING.powi(self.steps as i32)))
    }
}

/// The smoothed loss kept on the device, updated every step without a sync. With
/// several ranks each keeps it over its own losses; being linear in them, the mean over
/// the ranks is the smoothed loss of the global batch, taken when it is read.
struct DeviceSmoothedLoss {
    raw: Tensor,
    steps: i64,
    /// Already the world's mean since the last step (reading twice must not average
    /// twice: it is not exact for every world size).
    reduced: bool,
}

impl DeviceSmoothedLoss {
    fn new(from: SmoothedLoss, device: Device) -> Self {
        DeviceSmoothedLoss {
            raw: Tensor::from(from.raw)
                .to_kind(Kind::Double)
                .to_device(device),
            steps: from.steps,
            reduced: true,
        }
    }

    fn add(&mut self, loss: &Tensor) {
        self.raw *= LOSS_SMOOTHING;
        self.raw += loss.to_kind(Kind::Double) * (1.0 - LOSS_SMOOTHING);
        self.steps += 1;
        self.reduced = false;
    }

    /// Reads the world's state (a host sync: only when logging or saving; every rank
    /// calls it at the same steps).
    fn read(&mut self, world: &World) -> Result<SmoothedLoss> {
        if !self.reduced {
            world.mean_(&mut self.raw)?;
            self.reduced = true;
        }
        Ok(SmoothedLoss {
            raw: self.raw.double_value(&[]),
            steps: self.steps,
        })
    }
}

/// One run's training session: the model, its EMA and optimizer (the learner), the noise
/// schedule, and the smoothed loss restored with the training state.
struct Session {
    learner: Learner,
    schedule: NoiseSchedule,
    /// What was restored with the training state.
    smoothed: SmoothedLoss,
}

fn build(config: &RunConfig, device: Device) -> Result<Session> {
    tch::manual_seed(step_seed(config.training.seed, 0));
    let schedule = NoiseSchedule::new(config.schedule, device)?;
    let learner = Learner::new(&config.model, device, config.optimizer(), config.ema)?;
    Ok(Session {
        learner,
        schedule,
        smoothed: SmoothedLoss::default(),
    })
}

/// Restores the newest usable state and returns its step; 0 when the run has none.
///
/// Never silently starts over: a state that fails its checksum or does not load is
/// skipped for the next older one, but one that cannot be read at all (the file is
/// missing, the store not mounted, an I/O error) stops the resume with
/// [`TrainerError::StateUnavailable`] (resuming from an older state would drop the steps
/// after it, which may come back), and a run whose states are all corrupt fails with
/// [`TrainerError::StatesCorrupt`] naming them.
fn resume(job: &TrainJob, session: &mut Session) -> Result<i64> {
    let mut corrupt = Vec::new();
    for record in &job.states {
        let bytes = match job.store.open(record) {
            Ok(bytes) => bytes,
            Err(e @ ddpm_registry::RegistryError::ChecksumMismatch { .. }) => {
                tracing::warn!(path = %record.path, error = %e, "training state corrupt; trying an older one");
                corrupt.push(format!("{} (step {}): {e}", record.path, record.step));
                continue;
            }
            Err(e) => {
                return Err(TrainerError::StateUnavailable(format!(
                    "{} (step {}): {e}",
                    record.path, record.step
                )))
            }
        };
        let loaded = load_training_state_bytes(
            std::path::Path::new(&record.path),
            &bytes,
            &session.learner.model,
            &session.learner.ema,
            &mut session.learner.optimizer,
        );
        match loaded {
            Ok(manifest) => {
                tracing::info!(step = manifest.step, path = %record.path, "resuming from a training state");
                // States written before the smoothed loss existed restart it.
                session.smoothed = manifest
                    .extra
                    .get(SmoothedLoss::KEY)
                    .and_then(|v| serde_json::from_value(v.clone()).ok())
                    .unwrap_or_default();
                return Ok(manifest.step);
            }
            Err(e) => {
                tracing::warn!(path = %record.path, error = %e, "training state unusable; trying an older one");
                corrupt.push(format!("{} (step {}): {e}", record.path, record.step));
            }
        }
    }
    if corrupt.is_empty() {
        Ok(0)
    } else {
        Err(TrainerError::StatesCorrupt(corrupt.join("; ")))
    }
}

fn make_source(cfg: &RunConfig, items: Vec<Item>) -> Arc<ImageSource> {
    let transform = Transform {
        image_size: cfg.model.image_size as u32,
        augment: cfg.dataset.augment,
        flip: cfg.dataset.flip,
    };
    let base = transform.base_size() as u64;
    let decoded_bytes = items.len() as u64 * base * base * 3;
    let cache = match cfg.dataset.cache {
        CacheMode::Always => true,
        CacheMode::Never => false,
        CacheMode::Auto => decoded_bytes <= AUTO_CACHE_BYTES,
    };
    let source = Arc::new(ImageSource::new(
        items,
        transform,
        cache,
        cfg.dataset.image_limits(),
    ));
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

/// Trains the run to its last step or until stopped, as rank 0 of `world` (the whole
/// world when it is one process). Blocking: call on its own thread.
pub fn train(job: TrainJob, world: World) -> Result<LoopEnd> {
    let cfg = job.config.clone();
    world.check_batch(cfg.training.batch_size)?;
    let bf16 = autocast_dtype(&cfg, job.device);
    let mut session = build(&cfg, job.device)?;
    let start = resume(&job, &mut session)?;
    let quality = Quality::new(&job);
    let train_items = match &quality.split {
        Some(split) => split.train.clone(),
        None => job.items.clone(),
    };
    if world.size() > 1 {
        world.publish_job(&RankJob {
            run_id: job.run_id,
            config: cfg.clone(),
            class_names: job.class_names.clone(),
            items: train_items.clone(),
        })?;
    }
    let start = share_start(&world, &mut session, start)?;
    job.step.store(start, Ordering::Relaxed);
    let _ = job.events.send(Event::Started { step: start });
    if start >= cfg.training.steps {
        return Ok(LoopEnd::Completed { step: start });
    }
    tracing::info!(
        parameters = session.learner.model.parameter_count(),
        device = ?job.device,
        world_size = world.size(),
        start,
        steps = cfg.training.steps,
        "training"
    );
    let source = make_source(&cfg, train_items);
    let leader = Leader { job: &job, quality };
    run_steps(&cfg, &world, session, source, start, bf16, Some(leader))
}

/// Trains rank `world.rank()` (> 0) of a data-parallel run on its share of each global
/// batch, until rank 0's loop ends: the same steps and the same decisions as rank 0,
/// with nothing recorded or written.
pub fn train_follower(job: RankJob, world: World) -> Result<LoopEnd> {
    let cfg = job.config;
    world.check_batch(cfg.training.batch_size)?;
    let bf16 = autocast_dtype(&cfg, world.device());
    let mut session = build(&cfg, world.device())?;
    let start = share_start(&world, &mut session, 0)?;
    if start >= cfg.training.steps {
        return Ok(LoopEnd::Completed { step: start });
    }
    tracing::info!(run = job.run_id, start, "training as a follower rank");
    let source = make_source(&cfg, job.items);
    run_steps(&cfg, &world, session, source, start, bf16, None)
}

/// Whether to train in bf16 autocast (CUDA only), switching it on for this thread.
fn autocast_dtype(cfg: &RunConfig, device: Device) -> bool {
    let bf16 = cfg.training.bf16 && device.is_cuda();
    if bf16 {
        use_bf16_autocast();
    } else if cfg.training.bf16 {
        tracing::warn!("training.bf16 applies to CUDA only: training in f32 on this device");
    }
    bf16
}

/// Makes every rank start where rank 0 does: its step, weights, EMA, AdamW moments and
/// smoothed loss are broadcast to the others. Returns the start step.
fn share_start(world: &World, session: &mut Session, start: i64) -> Result<i64> {
    if world.size() == 1 {
        return Ok(start);
    }
    let _guard = tch::no_grad_guard();
    let learner = &mut session.learner;
    let mut meta = Tensor::from_slice(&[
        start as f64,
        learner.optimizer.steps() as f64,
        session.smoothed.raw,
        session.smoothed.steps as f64,
    ]);
    world.broadcast_(&mut meta)?;
    let meta = Vec::<f64>::try_from(&meta)?;
    let (m, v) = learner.optimizer.moments();
    let (mut m, mut v) = (m.shallow_clone(), v.shallow_clone());
    for t in [
        &mut learner.optimizer.params().flat().shallow_clone(),
        &mut learner.ema.flat().flat().shallow_clone(),
        &mut m,
        &mut v,
    ] {
        world.broadcast_(t)?;
    }
    learner.optimizer.restore(&m, &v, meta[1] as i64)?;
    session.smoothed = SmoothedLoss {
        raw: meta[2],
        steps: meta[3] as i64,
    };
    Ok(meta[0] as i64)
}

/// What only rank 0 does in the loop: heed stops and the lease, record, save.
struct Leader<'j> {
    job: &'j TrainJob,
    quality: Quality,
}

/// The step loop every rank runs, from step `start` + 1.
fn run_steps(
    cfg: &RunConfig,
    world: &World,
    session: Session,
    source: Arc<ImageSource>,
    start: i64,
    bf16: bool,
    mut leader: Option<Leader>,
) -> Result<LoopEnd> {
    let training = &cfg.training;
    let device = world.device();
    let share = world.share(training.batch_size);
    let loader = DataLoader::start(
        source.clone(),
        training.seed,
        training.batch_size as usize,
        share.start as usize..share.end as usize,
        start as u64,
        PREFETCH_BATCHES,
    );
    let size = cfg.model.image_size;
    let clip = (training.max_grad_norm > 0.0).then_some(training.max_grad_norm);
    let conditional = cfg.model.num_classes.is_some();
    let objective: Objective = cfg.objective();
    let timesteps = session.schedule.timesteps() as i64;
    let bar = leader
        .as_ref()
        .filter(|l| l.job.progress)
        .map(|_| progress_bar(training.steps, start));
    let mut session = session;

    let mut window = Window::new(device);
    let mut smoothed = DeviceSmoothedLoss::new(session.smoothed, device);
    let mut step = start;
    let mut saved = start;
    // Rank 0 found the lease gone at a checkpoint: the ranks stop at the next agreement.
    let mut lost_at_checkpoint = false;
    let mut last_loss: Option<Tensor> = None;
    let mut wait = world_timeout(world);
    while step < training.steps {
        let mine = Control {
            stop: leader.as_ref().is_some_and(|l| l.job.stop.is_cancelled()),
            lost: lost_at_checkpoint
                || leader
                    .as_ref()
                    .is_some_and(|l| l.job.lost.load(Ordering::Relaxed)),
            non_finite: false,
        };
        let control = world.agree(mine, last_loss.as_ref(), wait)?;
        wait = world_timeout(world);
        if control.lost {
            return Ok(LoopEnd::Lost { step });
        }
        if control.non_finite {
            return Err(TrainerError::NonFinite { step });
        }
        if control.stop {
            break;
        }
        // The step this iteration takes (1-based); `step` counts the steps done.
        let this_step = step + 1;
        tch::manual_seed(step_seed(training.seed, this_step));
        let waiting = Instant::now();
        let batch = loader.next_batch()?;
        window.waited += waiting.elapsed();
        let x0 = Tensor::f_from_slice(&batch.images)?
            .f_view([share.end - share.start, 3, size, size])? // [b, 3, S, S]
            .f_to_device(device)?;
        let labels = conditional.then(|| Tensor::from_slice(&batch.labels).to_device(device)); // [b]
        let draws = StepDraws::sample_share(
            &session.schedule,
            &x0,
            training.batch_size,
            share.clone(),
            objective.label_dropout,
        )?;
        let lr = cfg.lr_at(this_step);
        let loss = tch::autocast(bf16, || {
            diffusion_loss_with(
                &session.learner.model,
                &session.schedule,
                &x0,
                labels.as_ref(),
                &draws,
                objective.weighting,
            )
        })?;
        loss.loss.f_backward()?;
        let grad_norm = session.learner.update_with(lr, clip, |grad| {
            let reducing = Instant::now();
            let reduced = world.mean_(grad);
            window.all_reduce += reducing.elapsed();
            reduced
        })?;
        window.add(&loss.per_sample, &loss.t, timesteps, &grad_norm);
        let step_loss = loss.per_sample.mean(Kind::Float);
        smoothed.add(&step_loss);
        last_loss = Some(step_loss);
        step = this_step;
        if let Some(l) = &leader {
            l.job.step.store(this_step, Ordering::Relaxed);
        }
        ddpm_registry::failpoint::hit("train.step");
        if let Some(bar) = &bar {
            bar.set_position(this_step as u64);
        }

        if this_step % training.log_every == 0 || this_step == training.steps {
            window.reduce(world)?;
            let smoothed_now = smoothed.read(world)?;
            if let Some(l) = &leader {
                let point =
                    window_metrics(&window, smoothed_now, this_step, lr, training.batch_size);
                report(&point, &window, bar.as_ref());
                let _ = l.job.events.send(Event::Metrics(point));
            }
            window = Window::new(device);
        }
        if this_step % training.checkpoint_every == 0 || this_step == training.steps {
            // With several ranks the step's loss is checked before anything is written
            // (one process logs a non-finite loss and keeps going, as it always has).
            if world.size() > 1 {
                let control = world.agree(Control::default(), last_loss.as_ref(), wait)?;
                if control.non_finite {
                    return Err(TrainerError::NonFinite { step: this_step });
                }
            }
            let smoothed_now = smoothed.read(world)?;
            if let Some(l) = &mut leader {
                if (l.job.holds_lease)(this_step) {
                    save(
                        l.job,
                        &session,
                        smoothed_now,
                        this_step,
                        Some(&mut l.quality),
                    )?;
                } else {
                    lost_at_checkpoint = true;
                }
            }
            saved = this_step;
            // The others wait for rank 0's checkpoint in the next agreement.
            wait = CHECKPOINT_WAIT;
        }
    }
    if lost_at_checkpoint {
        return Ok(LoopEnd::Lost { step });
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
    if step >= training.steps {
        return Ok(LoopEnd::Completed { step });
    }
    if step > saved {
        let smoothed_now = smoothed.read(world)?;
        if let Some(l) = &leader {
            if !(l.job.holds_lease)(step) {
                return Ok(LoopEnd::Lost { step });
            }
            // Not scored: a stop should not wait for sampling (nor for the probe).
            save(l.job, &session, smoothed_now, step, None)?;
        }
    }
    tracing::info!(step, "stopped on request; training state saved");
    Ok(LoopEnd::Interrupted { step })
}

/// How long a collective waits for the slowest rank outside checkpoints.
fn world_timeout(world: &World) -> Duration {
    world.timeout().unwrap_or(Duration::MAX)
}

fn window_metrics(
    window: &Window,
    smoothed: SmoothedLoss,
    step: i64,
    lr: f64,
    batch: i64,
) -> MetricPoint {
    let n = window.steps.max(1) as f64;
    let seconds = window.started.elapsed().as_secs_f64();
    // Reading the sums is the only host sync of the window.
    let sums = Vec::<f64>::try_from(&window.bucket_loss).unwrap_or_default();
    let counts = Vec::<f64>::try_from(&window.bucket_count).unwrap_or_default();
    let mut loss_by_timestep = [None; TIMESTEP_BUCKETS as usize];
    for (slot, (sum, count)) in loss_by_timestep.iter_mut().zip(sums.iter().zip(&counts)) {
        *slot = (*count > 0.0).then(|| sum / count);
    }
    MetricPoint {
        step,
        loss: window.loss.double_value(&[]) / n,
        loss_smoothed: smoothed.value(),
        loss_by_timestep,
        learning_rate: lr,
        grad_norm: Some(window.grad_norm.double_value(&[]) / n),
        images_per_sec: (seconds > 0.0).then(|| window.steps as f64 * batch as f64 / seconds),
        recorded_at: Utc::now(),
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
            all_reduce_ms_per_step =
                window.all_reduce.as_secs_f64() * 1e3 / window.steps.max(1) as f64,
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

/// The scoring of a run's checkpoints ([`crate::quality`]) within one attempt: the
/// split made at the start, the probe built before the first score.
struct Quality {
    split: Option<Split>,
    scorer: Option<Scorer>,
    /// Building the scorer failed: this attempt scores nothing.
    unavailable: bool,
}

impl Quality {
    fn new(job: &TrainJob) -> Quality {
        let cfg = &job.config;
        let split = match split_items(
            &job.items,
            cfg.model.num_classes,
            cfg.model.image_size,
            &cfg.quality,
        ) {
            Ok(split) => {
                tracing::info!(
                    train = split.train.len(),
                    held_out = split.holdout.len(),
                    "images held out from training to score checkpoints against"
                );
                Some(split)
            }
            Err(why) => {
                tracing::info!(%why, "checkpoints are not scored");
                None
            }
        };
        Quality {
            split,
            scorer: None,
            unavailable: false,
        }
    }

    /// Scores the EMA model; `None` (logged) when the run is not scored or scoring
    /// failed: a score is never worth a checkpoint.
    fn score(&mut self, job: &TrainJob, session: &Session, step: i64) -> Option<ScoreValues> {
        let split = self.split.as_ref()?;
        if self.unavailable {
            return None;
        }
        if self.scorer.is_none() {
            let cfg = &job.config;
            let built = Scorer::build(
                split,
                cfg.model.num_classes.unwrap_or(1),
                cfg.model.image_size,
                cfg.dataset.image_limits(),
                job.device,
                &cfg.quality,
            );
            match built {
                Ok(scorer) => {
                    let accuracy = scorer.probe_accuracy();
                    if accuracy >= PROBE_TRUSTED {
                        tracing::info!(
                            accuracy,
                            seconds = scorer.build_seconds,
                            "quality probe trained"
                        );
                    } else {
                        tracing::warn!(accuracy, trusted = PROBE_TRUSTED, seconds = scorer.build_seconds, "quality probe trained but too weak to judge with: scores are unreliable");
                    }
                    self.scorer = Some(scorer);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "quality probe not built: checkpoints are not scored");
                    self.unavailable = true;
                    return None;
                }
            }
        }
        let scorer = self.scorer.as_ref()?;
        match scorer.score(session.learner.ema.model(), &session.schedule) {
            Ok(score) => {
                tracing::info!(
                    step,
                    class_accuracy = score.class_accuracy,
                    fd = score.fd,
                    fd_floor = score.fd_floor,
                    kid = score.kid,
                    kid_std = score.kid_std,
                    diversity = score.diversity,
                    seconds = score.seconds,
                    "checkpoint scored"
                );
                Some(score)
            }
            Err(e) => {
                tracing::warn!(step, error = %e, "checkpoint not scored");
                None
            }
        }
    }
}

/// Writes the EMA checkpoint, its grid and the training state at `step`, scores the
/// checkpoint when `quality` is given, then tells the recorder to register them.
fn save(
    job: &TrainJob,
    session: &Session,
    smoothed: SmoothedLoss,
    step: i64,
    quality: Option<&mut Quality>,
) -> Result<()> {
    let t0 = Instant::now();
    let cfg = &job.config;
    let info = CheckpointInfo {
        schedule: cfg.schedule,
        class_names: job.class_names.clone(),
        run_id: Some(job.run_id),
        step,
    };
    let (bytes, _) = checkpoint_bytes(session.learner.ema.model(), &info)?;
    let ema = job
        .store
        .write_checkpoint(job.run_id, step, CheckpointKind::Ema, &bytes)?;
    let grid_rel = CheckpointStore::grid_path_for(Path::new(&ema.path));
    if cfg.training.sample_grid_per_class > 0 {
        let spec = GridSpec {
            per_class: cfg.training.sample_grid_per_class,
            steps: cfg.training.sample_steps,
            guidance_scale: cfg.training.guidance_scale,
            seed: cfg.training.seed,
        };
        // A grid is a picture for people: failing to draw one never costs a checkpoint.
        let written =
            sample_grid(session.learner.ema.model(), &session.schedule, &spec).and_then(|grid| {
                let png = png_bytes(&grid).map_err(|source| TrainerError::Image {
                    path: grid_rel.clone(),
                    source,
                })?;
                Ok(job.store.write_bytes(&grid_rel, &png)?)
            });
        if let Err(e) = written {
            tracing::warn!(step = step, error = %e, "sample grid not written");
        }
    }
    let info = StateInfo {
        step,
        seed: cfg.training.seed,
        extra: serde_json::json!({ "run_id": job.run_id, SmoothedLoss::KEY: smoothed }),
    };
    let (bytes, _) = training_state_bytes(
        &session.learner.model,
        &session.learner.ema,
        &session.learner.optimizer,
        &info,
    )?;
    let state_file = job
        .store
        .write_checkpoint(job.run_id, step, CheckpointKind::State, &bytes)?;
    tracing::info!(step = step, seconds = t0.elapsed().as_secs_f64(), path = %ema.path, "checkpoint written");
    let score = quality.and_then(|q| q.score(job, session, step));
    let _ = job.events.send(Event::Checkpoint {
        step,
        ema,
        state: state_file,
        score,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothed_loss_is_bias_corrected() {
        let mut raw = SmoothedLoss::default();
        assert_eq!(raw.value(), None);
        for _ in 0..3 {
            raw.raw = raw.raw * LOSS_SMOOTHING + 0.5 * (1.0 - LOSS_SMOOTHING);
            raw.steps += 1;
        }
        // A constant loss reads back as itself from the first step on.
        assert!((raw.value().unwrap() - 0.5).abs() < 1e-12);
        let mut device = DeviceSmoothedLoss::new(SmoothedLoss::default(), Device::Cpu);
        for loss in [2.0, 1.0, 0.5] {
            device.add(&Tensor::from(loss));
        }
        let read = device.read(&World::single(Device::Cpu)).unwrap();
        let expected = (2.0 * 0.99 * 0.99 + 1.0 * 0.99 + 0.5) * 0.01 / (1.0 - 0.99f64.powi(3));
        assert!((read.value().unwrap() - expected).abs() < 1e-12);
        let json = serde_json::to_value(read).unwrap();
        assert_eq!(serde_json::from_value::<SmoothedLoss>(json).unwrap(), read);
    }

    #[test]
    fn window_splits_the_loss_by_timestep_quarter() {
        let mut w = Window::new(Device::Cpu);
        let per_sample = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 5.0]);
        let t = Tensor::from_slice(&[0i64, 249, 250, 999]);
        w.add(&per_sample, &t, 1000, &Tensor::from(1.0f32));
        let p = window_metrics(&w, SmoothedLoss::default(), 1, 1e-3, 4);
        assert_eq!(p.loss_by_timestep, [Some(1.5), Some(3.0), None, Some(5.0)]);
        assert_eq!(p.loss, 2.75);
        assert_eq!(p.loss_smoothed, None);
    }

    #[test]
    fn step_seeds_differ_by_step_and_seed() {
        assert_ne!(step_seed(0, 1), step_seed(0, 2));
        assert_ne!(step_seed(0, 1), step_seed(1, 1));
        assert_eq!(step_seed(3, 7), step_seed(3, 7));
        // Distinct across a run's steps, and spread over the whole non-negative i64 range
        // (a seed squeezed into fewer bits would repeat sooner).
        let seeds: std::collections::HashSet<i64> =
            (0..10_000).map(|step| step_seed(u64::MAX, step)).collect();
        assert_eq!(seeds.len(), 10_000);
        assert!(seeds.iter().any(|&s| s > i64::MAX / 2));
    }
}
