//! Step-level (continuous) batching: the model runs on one dedicated thread that keeps a
//! set of in-flight samples and advances all of them by one step per forward pass.
//!
//! [`Batcher`] is the cheap `Clone` handle the HTTP handlers use: it takes admission
//! permits (one per image) from a semaphore sized by the queue capacity, sends the job
//! over a channel and awaits a `oneshot` reply. The model thread ([`worker`]) owns a
//! [`SlotSet`] (the pure batch-formation state machine in [`slots`]): every iteration it
//! takes new jobs, drops those whose client has gone or whose deadline passed, admits
//! waiting samples into free slots, runs one guided forward pass per model over the active
//! samples (each at its own timestep, with its own sampler, class, guidance and seeded
//! noise), and answers the requests whose samples all reached t = 0.
//!
//! A job carries the model it was validated against (`Arc<LoadedModel>`), so a hot swap
//! never changes the model under a request: samples of different models simply never share
//! a forward pass (during a swap an iteration runs one pass per model).

pub mod slots;
mod worker;

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    thread,
    time::{Duration, Instant},
};

use ddpm_core::SampleSpec;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

pub use slots::SlotSet;

use crate::{metrics::BatcherMetrics, model::LoadedModel};

/// One generated image: 8-bit pixels, rows of `[R, G, B]` (or grey) values.
#[derive(Debug, Clone)]
pub struct GeneratedImage {
    pub label: Option<i64>,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    /// 1 (grey) or 3 (RGB).
    pub channels: u8,
    /// `[H, W, C]` row-major.
    pub pixels: Vec<u8>,
}

/// Why a job was not answered with its images. `crate::error` maps each to a status.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BatchError {
    /// More images than the queue can ever hold.
    #[error("{requested} images exceed the queue's capacity of {capacity}")]
    TooLarge { requested: usize, capacity: usize },
    #[error(
        "the queue is full ({in_flight} of {capacity} images waiting or in flight): retry later"
    )]
    QueueFull { in_flight: usize, capacity: usize },
    #[error("the model thread has stopped")]
    Stopped,
    #[error("the model thread dropped the request")]
    Dropped,
    #[error("the request did not finish within {0:?}")]
    Timeout(Duration),
    /// A spec the model cannot start (the handler validated it against the same model, so
    /// a programmer error).
    #[error("{0}")]
    InvalidSpec(String),
    #[error("the forward pass failed: {0}")]
    ForwardPass(String),
    /// A finished sample could not be turned into pixels.
    #[error("a finished sample could not be read: {0}")]
    Image(String),
}

/// What the model thread answers.
pub type Reply = Result<Vec<GeneratedImage>, BatchError>;

/// A sampling job as the model thread receives it.
pub(crate) struct Job {
    model: Arc<LoadedModel>,
    specs: Vec<SampleSpec>,
    deadline: Instant,
    timeout: Duration,
    reply: oneshot::Sender<Reply>,
    /// Released (the queue slot freed) when the job is answered or dropped.
    _permit: OwnedSemaphorePermit,
}

/// How the model thread batches.
#[derive(Debug, Clone, Copy)]
pub struct BatcherConfig {
    /// Most samples per forward pass.
    pub max_batch: usize,
    /// Most images accepted and not yet answered.
    pub queue_capacity: usize,
}

/// The handle on the model thread. Cloning is cheap.
#[derive(Debug, Clone)]
pub struct Batcher {
    jobs: mpsc::Sender<Job>,
    permits: Arc<Semaphore>,
    capacity: usize,
    metrics: BatcherMetrics,
    /// Cleared when the model thread ends, by returning or by a panic the step guard did
    /// not catch: liveness and readiness read it.
    alive: Arc<AtomicBool>,
}

/// Clears its flag when dropped: on the model thread, that is when the thread ends,
/// however it ends (a panic unwinds through it).
struct AliveGuard(Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
        if thread::panicking() {
            tracing::error!("the model thread died of a panic: every request now fails");
        }
    }
}

/// Joins the model thread; it ends once every [`Batcher`] is dropped and the work in flight
/// is answered.
#[derive(Debug)]
pub struct WorkerHandle(thread::JoinHandle<()>);

impl WorkerHandle {
    /// Waits (blocking) for the model thread to finish.
    pub fn join(self) {
        if self.0.join().is_err() {
            tracing::error!("the model thread panicked");
        }
    }
}

impl Batcher {
    /// Starts the model thread.
    pub fn spawn(
        config: BatcherConfig,
        metrics: BatcherMetrics,
    ) -> std::io::Result<(Batcher, WorkerHandle)> {
        let (jobs, receiver) = mpsc::channel();
        let worker_metrics = metrics.clone();
        let max_batch = config.max_batch.max(1);
        let span = tracing::Span::current();
        let alive = Arc::new(AtomicBool::new(true));
        let guard = AliveGuard(alive.clone());
        let thread = thread::Builder::new()
            .name("ddpm-model".into())
            .spawn(move || {
                let _alive = guard;
                let _entered = span.enter();
                worker::run(receiver, max_batch, &worker_metrics);
            })?;
        Ok((
            Batcher {
                jobs,
                permits: Arc::new(Semaphore::new(config.queue_capacity.max(1))),
                capacity: config.queue_capacity.max(1),
                metrics,
                alive,
            },
            WorkerHandle(thread),
        ))
    }

    /// Generates one image per spec on `model`. Fails fast with [`BatchError::QueueFull`]
    /// when the queue cannot take them; gives up with [`BatchError::Timeout`] after `timeout`.
    /// Dropping the returned future (a client that went away) drops the job's samples at
    /// the model thread's next iteration.
    pub async fn generate(
        &self,
        model: Arc<LoadedModel>,
        specs: Vec<SampleSpec>,
        timeout: Duration,
    ) -> Reply {
        let n = u32::try_from(specs.len())
            .ok()
            .filter(|&n| n as usize <= self.capacity)
            .ok_or(BatchError::TooLarge {
                requested: specs.len(),
                capacity: self.capacity,
            })?;
        let permit = self
            .permits
            .clone()
            .try_acquire_many_owned(n)
            .map_err(|_| {
                self.metrics.requests_rejected.inc();
                BatchError::QueueFull {
                    in_flight: self.in_flight(),
                    capacity: self.capacity,
                }
            })?;
        let (reply, answer) = oneshot::channel();
        let job = Job {
            model,
            specs,
            deadline: Instant::now() + timeout,
            timeout,
            reply,
            _permit: permit,
        };
        self.jobs.send(job).map_err(|_| BatchError::Stopped)?;
        // The model thread answers a job past its deadline itself; this is the backstop.
        match tokio::time::timeout(timeout + Duration::from_secs(1), answer).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Err(BatchError::Dropped),
            Err(_) => Err(BatchError::Timeout(timeout)),
        }
    }

    /// Whether the model thread is still running. Once it is not, every request fails
    /// until the process is restarted: `/healthz` says so.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    /// Images accepted and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.capacity
            .saturating_sub(self.permits.available_permits())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_alive_flag_falls_when_its_thread_ends_even_by_a_panic() {
        for panics in [false, true] {
            let alive = Arc::new(AtomicBool::new(true));
            let guard = AliveGuard(alive.clone());
            let thread = thread::spawn(move || {
                let _alive = guard;
                assert!(!panics, "a panic outside the step guard");
            });
            assert_eq!(thread.join().is_err(), panics);
            assert!(!alive.load(Ordering::SeqCst), "panics: {panics}");
        }
    }
}
