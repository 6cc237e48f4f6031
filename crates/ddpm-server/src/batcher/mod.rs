//! Step-level (continuous) batching: the model runs on one dedicated thread that keeps the
//! accepted requests' samples and advances a selection of them by one step per forward pass.
//!
//! [`Batcher`] is the cheap `Clone` handle the HTTP handlers use. [`Batcher::submit`]
//! admits a request or refuses it at once: by images (a semaphore sized by the queue
//! capacity: each sample holds tensors) and, under the fair policy, by cost ([`cost`]:
//! accepted work must finish by its deadline at the measured pass time, or the request
//! gets 429 with the wait the backlog implies). It sends the job over a channel and hands
//! back a [`Ticket`]: the request's id, its place in line and the `oneshot` the answer
//! comes on. The model thread ([`worker`]) owns a [`Scheduler`] (the pure state machine in
//! [`scheduler`] that picks the samples of each pass): every iteration it takes new jobs,
//! drops those cancelled, abandoned by their client or past their deadline, runs one
//! guided forward pass per model over the selected samples (each at its own timestep,
//! with its own sampler, class, guidance and seeded noise), reports progress and finished
//! images to streaming requests, and answers the requests whose samples all reached t = 0.
//!
//! The [`Ledger`] is what the handlers and the model thread share: the accepted requests'
//! remaining work and deadlines, their ids, the cancellations asked for and the pass-time
//! estimate.
//!
//! A job carries the model it was validated against (`Arc<LoadedModel>`), so a hot swap
//! never changes the model under a request: samples of different models simply never share
//! a forward pass (during a swap an iteration runs one pass per model).

pub mod cost;
pub mod scheduler;
mod worker;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc, Mutex, MutexGuard,
    },
    thread,
    time::{Duration, Instant},
};

use ddpm_core::SampleSpec;
use tokio::sync::{oneshot, watch, OwnedSemaphorePermit, Semaphore};

pub use scheduler::{Policy, Priority, Progress, Scheduler};

use crate::{metrics::BatcherMetrics, model::LoadedModel};
use cost::{Booking, PassTime, Refusal};
use scheduler::RequestId;

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
        "the queue is full ({in_flight} of {capacity} images waiting or in flight): retry in {retry_after:?}"
    )]
    QueueFull {
        in_flight: usize,
        capacity: usize,
        /// The backlog's estimated time to finish.
        retry_after: Duration,
    },
    /// The accepted work would not let this request (or one already accepted) finish by
    /// its deadline.
    #[error("the server is busy: this request would not finish within {timeout:?} behind the work already accepted; retry in {retry_after:?}")]
    Busy {
        retry_after: Duration,
        timeout: Duration,
    },
    /// More work than the server can do within its request timeout, even idle.
    #[error("this request needs about {needs:?} of the model at its measured speed, more than the server's request timeout of {timeout:?}: ask for fewer images or steps")]
    TooCostly { needs: Duration, timeout: Duration },
    /// The request's id is already taken by a request in flight.
    #[error("request id {0:?} is already in use by a request in flight")]
    DuplicateId(String),
    #[error("the request was cancelled")]
    Cancelled,
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

/// What the model thread answers: the images (none for a streamed request, whose images
/// went out one by one).
pub type Reply = Result<Vec<GeneratedImage>, BatchError>;

/// What a streamed request receives besides its final answer.
#[derive(Debug)]
pub enum StreamItem {
    Image {
        index: usize,
        image: GeneratedImage,
    },
    /// The current x̂₀ of one image.
    Preview {
        index: usize,
        step: usize,
        image: GeneratedImage,
    },
}

/// Where the model thread sends a streamed request's progress and images.
#[derive(Debug)]
pub struct StreamSink {
    /// The latest progress (a watch: a slow reader skips values, never the worker).
    pub progress: watch::Sender<Progress>,
    pub items: tokio::sync::mpsc::UnboundedSender<StreamItem>,
    /// Send each image's x̂₀ every this many of its steps.
    pub preview_every: Option<usize>,
}

/// A sampling job as the model thread receives it.
pub(crate) struct Job {
    id: RequestId,
    model: Arc<LoadedModel>,
    specs: Vec<SampleSpec>,
    priority: Priority,
    deadline: Instant,
    timeout: Duration,
    reply: oneshot::Sender<Reply>,
    stream: Option<StreamSink>,
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
    pub policy: Policy,
}

/// Admission plans on forward passes this much slower than measured.
const ADMISSION_MARGIN: f64 = 1.25;

/// What the handlers and the model thread share (one lock, taken once per iteration by
/// the model thread and once per request by a handler).
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    /// Accepted requests not yet answered.
    bookings: BTreeMap<RequestId, Booking>,
    /// The clients' names of the requests in `bookings`.
    names: HashMap<String, RequestId>,
    /// Cancellations asked for, not yet carried out.
    cancelled: HashSet<RequestId>,
    /// The model thread's pass-time estimate; `None` until it calibrated on a model.
    pass: Option<PassTime>,
}

impl Ledger {
    /// Forgets a request (answered, dropped or never started).
    fn forget(&mut self, id: RequestId) {
        self.bookings.remove(&id);
        self.cancelled.remove(&id);
        self.names.retain(|_, v| *v != id);
    }

    /// Estimated seconds of accepted work left.
    fn backlog_seconds(&self, full_batch_rows: usize) -> f64 {
        let Some(pass) = self.pass else { return 0.0 };
        let row_steps: f64 = self.bookings.values().map(|b| b.row_steps).sum();
        row_steps * pass.row_seconds(full_batch_rows)
    }
}

/// The handle on the model thread. Cloning is cheap.
#[derive(Debug, Clone)]
pub struct Batcher {
    jobs: mpsc::Sender<Job>,
    permits: Arc<Semaphore>,
    config: BatcherConfig,
    metrics: BatcherMetrics,
    ledger: Arc<Mutex<Ledger>>,
    next_id: Arc<AtomicU64>,
    /// Cleared when the model thread ends, by returning or by a panic the step guard did
    /// not catch: liveness and readiness read it.
    alive: Arc<AtomicBool>,
    /// Set when a forward pass failed with an error the device does not recover from (a
    /// sticky CUDA error): every later pass would fail too, so liveness fails.
    broken: Arc<AtomicBool>,
}

fn lock(ledger: &Mutex<Ledger>) -> MutexGuard<'_, Ledger> {
    ledger
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
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

/// How a request is to be run, besides its samples.
#[derive(Debug, Default)]
pub struct Submission {
    pub timeout: Duration,
    pub priority: Priority,
    /// The client's id for the request; one is made up when absent.
    pub name: Option<String>,
    pub stream: Option<StreamSink>,
}

/// An accepted request.
#[derive(Debug)]
pub struct Ticket {
    /// Its id, for `DELETE /v1/samples/{id}`.
    pub name: String,
    /// Requests ahead of it when it was accepted (0: it is served first).
    pub position: usize,
    pub timeout: Duration,
    pub answer: oneshot::Receiver<Reply>,
}

impl Ticket {
    /// Waits for the answer. Dropping the future (a client that went away) drops the
    /// request's samples at the model thread's next iteration.
    pub async fn wait(self) -> Reply {
        // The model thread answers a job past its deadline itself; this is the backstop.
        match tokio::time::timeout(self.timeout + Duration::from_secs(1), self.answer).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Err(BatchError::Dropped),
            Err(_) => Err(BatchError::Timeout(self.timeout)),
        }
    }
}

impl Batcher {
    /// Starts the model thread.
    pub fn spawn(
        config: BatcherConfig,
        metrics: BatcherMetrics,
    ) -> std::io::Result<(Batcher, WorkerHandle)> {
        let config = BatcherConfig {
            max_batch: config.max_batch.max(1),
            queue_capacity: config.queue_capacity.max(1),
            ..config
        };
        let (jobs, receiver) = mpsc::channel();
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let alive = Arc::new(AtomicBool::new(true));
        let broken = Arc::new(AtomicBool::new(false));
        let worker = worker::Worker::new(config, metrics.clone(), ledger.clone(), broken.clone());
        let span = tracing::Span::current();
        let guard = AliveGuard(alive.clone());
        let thread = thread::Builder::new()
            .name("ddpm-model".into())
            .spawn(move || {
                let _alive = guard;
                let _entered = span.enter();
                worker.run(receiver);
            })?;
        Ok((
            Batcher {
                jobs,
                permits: Arc::new(Semaphore::new(config.queue_capacity)),
                config,
                metrics,
                ledger,
                next_id: Arc::new(AtomicU64::new(0)),
                alive,
                broken,
            },
            WorkerHandle(thread),
        ))
    }

    /// Batch rows of a full pass of guided samples: the size at which throughput is
    /// estimated.
    fn full_batch_rows(&self) -> usize {
        2 * self.config.max_batch
    }

    /// Admits a request of one image per spec on `model`, or refuses it at once:
    /// [`BatchError::TooLarge`] or [`BatchError::QueueFull`] by images,
    /// [`BatchError::Busy`] or [`BatchError::TooCostly`] by cost (fair policy),
    /// [`BatchError::DuplicateId`] for a name in use.
    pub fn submit(
        &self,
        model: Arc<LoadedModel>,
        specs: Vec<SampleSpec>,
        submission: Submission,
    ) -> Result<Ticket, BatchError> {
        let capacity = self.config.queue_capacity;
        let n = u32::try_from(specs.len())
            .ok()
            .filter(|&n| n as usize <= capacity)
            .ok_or(BatchError::TooLarge {
                requested: specs.len(),
                capacity,
            })?;
        let permit = self
            .permits
            .clone()
            .try_acquire_many_owned(n)
            .map_err(|_| {
                self.metrics.requests_rejected.inc();
                BatchError::QueueFull {
                    in_flight: self.in_flight(),
                    capacity,
                    retry_after: Duration::from_secs_f64(self.backlog_seconds()),
                }
            })?;
        let Submission {
            timeout,
            priority,
            name,
            stream,
        } = submission;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let name = name.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let now = Instant::now();
        let booking = Booking {
            id,
            priority,
            arrived: now,
            deadline: now + timeout,
            row_steps: specs
                .iter()
                .map(|s| (s.rows_per_step() * s.sampler.steps) as f64)
                .sum(),
        };
        let position = {
            let mut ledger = lock(&self.ledger);
            if ledger.names.contains_key(&name) {
                return Err(BatchError::DuplicateId(name));
            }
            let position = match (self.config.policy, ledger.pass) {
                (Policy::Fair { .. }, Some(pass)) => {
                    let bookings: Vec<Booking> = ledger.bookings.values().cloned().collect();
                    // Plan on passes 25 % slower than measured: the estimate lags a device
                    // that slows down, and accepted work must not time out.
                    let pessimistic = PassTime {
                        fixed: pass.fixed * ADMISSION_MARGIN,
                        per_row: pass.per_row * ADMISSION_MARGIN,
                    };
                    cost::admit(
                        &bookings,
                        &booking,
                        now,
                        &pessimistic,
                        self.full_batch_rows(),
                    )
                    .map_err(|refusal| {
                        self.metrics.requests_rejected.inc();
                        match refusal {
                            Refusal::Busy { retry_after } => BatchError::Busy {
                                retry_after,
                                timeout,
                            },
                            Refusal::TooCostly { needs } => {
                                BatchError::TooCostly { needs, timeout }
                            }
                        }
                    })?
                }
                // FIFO, or nothing measured yet: behind everything accepted.
                _ => ledger.bookings.len(),
            };
            ledger.bookings.insert(id, booking);
            ledger.names.insert(name.clone(), id);
            position
        };
        let (reply, answer) = oneshot::channel();
        let job = Job {
            id,
            model,
            specs,
            priority,
            deadline: now + timeout,
            timeout,
            reply,
            stream,
            _permit: permit,
        };
        if self.jobs.send(job).is_err() {
            lock(&self.ledger).forget(id);
            return Err(BatchError::Stopped);
        }
        Ok(Ticket {
            name,
            position,
            timeout,
            answer,
        })
    }

    /// Generates one image per spec on `model` and waits for them.
    pub async fn generate(
        &self,
        model: Arc<LoadedModel>,
        specs: Vec<SampleSpec>,
        timeout: Duration,
    ) -> Reply {
        let submission = Submission {
            timeout,
            ..Submission::default()
        };
        self.submit(model, specs, submission)?.wait().await
    }

    /// Cancels the request in flight with this id: its samples leave the pass at the
    /// model thread's next iteration and it is answered [`BatchError::Cancelled`].
    /// Returns whether there was such a request.
    pub fn cancel(&self, name: &str) -> bool {
        let mut ledger = lock(&self.ledger);
        let Some(&id) = ledger.names.get(name) else {
            return false;
        };
        ledger.cancelled.insert(id);
        true
    }

    /// Whether the model thread is still running and its device usable. Once it is not,
    /// every request fails until the process is restarted: `/healthz` says so.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst) && !self.broken.load(Ordering::SeqCst)
    }

    /// Images accepted and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.config
            .queue_capacity
            .saturating_sub(self.permits.available_permits())
    }

    /// Estimated seconds of accepted work left (0 before the first calibration).
    pub fn backlog_seconds(&self) -> f64 {
        lock(&self.ledger).backlog_seconds(self.full_batch_rows())
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
