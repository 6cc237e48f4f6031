//! Step-level (continuous) batching: the model runs on one dedicated thread that keeps the
//! accepted requests' samples and advances a selection of them by one step per forward pass.
//!
//! [`Batcher`] is the cheap `Clone` handle the HTTP handlers use. [`Batcher::submit`]
//! admits a request or refuses it at once: by images (a semaphore sized by the queue
//! capacity: each sample holds tensors) and, under the fair policy, by cost
//! ([`Scheduler::admit`]: accepted work must finish by its deadline at the measured pass
//! time, or the request gets 429 with the wait the backlog implies). It puts the request's
//! one record, a [`Request`] inside a scheduler [`Entry`], into the queue, wakes the model
//! thread and hands back a [`Ticket`]: the request's name, its place in line and the
//! `oneshot` the answer comes on.
//!
//! The queue ([`Scheduler`], the pure state machine in [`scheduler`] that orders requests
//! and picks the samples of each pass, priced by [`cost`]) is the one owner of every
//! request's state: the handlers lock it to admit and to cancel, the model thread
//! ([`worker`]) to run each iteration's bookkeeping; the model thread never holds it over
//! a forward pass. The samples' tensors stay on the model thread. Every iteration it
//! starts the new requests' samples, drops those cancelled, abandoned by their client or
//! past their deadline, runs one guided forward pass per model over the selected samples
//! (each at its own timestep, with its own sampler, class, guidance and seeded noise),
//! reports progress and finished images to streaming requests, and answers the requests
//! whose samples all reached t = 0.
//!
//! A request carries the model it was validated against (`Arc<LoadedModel>`), so a hot swap
//! never changes the model under a request: samples of different models simply never share
//! a forward pass (during a swap an iteration runs one pass per model).

pub mod cost;
pub mod scheduler;
mod worker;

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc, Mutex, MutexGuard,
    },
    thread,
    time::{Duration, Instant},
};

use ddpm_core::{sampler::StepRows, CoreError, SampleSpec};
use tokio::sync::{oneshot, watch, OwnedSemaphorePermit, Semaphore};

pub use cost::{Priority, RequestId};
pub use scheduler::{Entry, Policy, Progress, Scheduler};

use crate::{metrics::BatcherMetrics, model::LoadedModel};
use cost::{PassTime, Refusal};
use scheduler::Work;

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

/// Why a request was not answered with its images. `crate::error` maps each to a status.
#[derive(Debug, thiserror::Error)]
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
    #[error(transparent)]
    TooCostly(#[from] TooCostly),
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
    InvalidSpec(#[source] CoreError),
    /// The forward pass failed; shared by every request of the pass.
    #[error("the forward pass failed: {0}")]
    ForwardPass(#[source] Arc<CoreError>),
    /// A finished sample could not be turned into pixels.
    #[error("a finished sample could not be read: {0}")]
    Image(#[source] CoreError),
}

impl BatchError {
    /// A refusal by cost, for a request of this timeout.
    fn refused(refusal: Refusal, timeout: Duration) -> BatchError {
        match refusal {
            Refusal::Busy { retry_after } => BatchError::Busy {
                retry_after,
                timeout,
            },
            Refusal::TooCostly { needs } => TooCostly { needs, timeout }.into(),
        }
    }
}

/// More work than the server can do within its request timeout, even idle: the client
/// must ask for less (422, not 429).
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[error("this request needs about {needs:?} of the model at its measured speed, more than the server's request timeout of {timeout:?}: ask for fewer images or steps")]
pub struct TooCostly {
    pub needs: Duration,
    pub timeout: Duration,
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

/// The server's part of a request's one record (the scheduler's [`Entry`] holds the rest:
/// its place in line and its samples' progress), from admission to its answer.
#[derive(Debug)]
pub(crate) struct Request {
    /// The client's id for it (`DELETE /v1/samples/{id}`).
    name: String,
    model: Arc<LoadedModel>,
    specs: Vec<SampleSpec>,
    timeout: Duration,
    reply: oneshot::Sender<Reply>,
    stream: Option<StreamSink>,
    /// Asked for by [`Batcher::cancel`]; carried out by the model thread.
    cancelled: bool,
    /// Released (the queue slots freed) when the request is answered or dropped.
    permit: OwnedSemaphorePermit,
}

impl Request {
    /// Frees the request's queue slots, then answers it: a client that sends its next
    /// request as soon as it has the answer finds the capacity back.
    fn answer(self, reply: Reply) {
        drop(self.permit);
        let _ = self.reply.send(reply);
    }

    /// Whether nobody waits for the answer any more (the client went away).
    fn abandoned(&self) -> bool {
        self.reply.is_closed()
            || self
                .stream
                .as_ref()
                .is_some_and(|s| s.items.is_closed() && s.progress.is_closed())
    }
}

/// One sample's place in its plan, as the queue counts it: the model thread holds the
/// tensors and moves this on with every step it takes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Steps {
    rows: StepRows,
    done: usize,
}

impl Steps {
    /// A sample of `spec` before its first step, on a model of `t_max` timesteps.
    fn of(spec: &SampleSpec, t_max: usize) -> Result<Steps, CoreError> {
        Ok(Steps {
            rows: spec.step_rows(t_max)?,
            done: 0,
        })
    }
}

impl Work for Steps {
    fn rows(&self) -> usize {
        self.rows.at(self.done)
    }

    fn rows_left(&self) -> usize {
        self.rows.from(self.done)
    }

    fn progress(&self) -> (usize, usize) {
        (self.done, self.rows.steps())
    }
}

/// The queue as the handlers and the model thread share it.
#[derive(Debug)]
pub(crate) struct Queue {
    requests: Scheduler<Steps, Request>,
    /// The model thread's pass-time estimate; `None` until it calibrated on a model.
    pass: Option<PassTime>,
    next_id: RequestId,
}

impl Queue {
    fn backlog_seconds(&self) -> f64 {
        self.pass
            .map_or(0.0, |pass| self.requests.backlog_seconds(&pass))
    }
}

fn lock(queue: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    queue
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
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

/// The handle on the model thread. Cloning is cheap.
#[derive(Debug, Clone)]
pub struct Batcher {
    /// Wakes the model thread for a new request; its end of the channel closing (every
    /// handle dropped) tells the thread to finish.
    wake: mpsc::Sender<()>,
    permits: Arc<Semaphore>,
    config: BatcherConfig,
    metrics: BatcherMetrics,
    queue: Arc<Mutex<Queue>>,
    /// Cleared when the model thread ends, by returning or by a panic the step guard did
    /// not catch: liveness and readiness read it.
    alive: Arc<AtomicBool>,
    /// Set when a forward pass failed with an error the device does not recover from (a
    /// sticky CUDA error): every later pass would fail too, so liveness fails.
    broken: Arc<AtomicBool>,
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

/// How a request is to be run, besides its samples: the caller's options, moved into the
/// request's record at admission.
#[derive(Debug, Default)]
pub struct Submission {
    pub timeout: Duration,
    pub priority: Priority,
    /// The client's id for the request; one is made up when absent.
    pub name: Option<String>,
    pub stream: Option<StreamSink>,
}

/// The caller's end of an accepted request (the record's `reply` is the other end).
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
        // The model thread answers a request past its deadline itself; this is the backstop.
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
        let (wake, woken) = mpsc::channel();
        let queue = Arc::new(Mutex::new(Queue {
            requests: Scheduler::new(config.max_batch, config.policy),
            pass: None,
            next_id: 0,
        }));
        let alive = Arc::new(AtomicBool::new(true));
        let broken = Arc::new(AtomicBool::new(false));
        let worker = worker::Worker::new(config, metrics.clone(), queue.clone(), broken.clone());
        let span = tracing::Span::current();
        let guard = AliveGuard(alive.clone());
        let thread = thread::Builder::new()
            .name("ddpm-model".into())
            .spawn(move || {
                let _alive = guard;
                let _entered = span.enter();
                worker.run(woken);
            })?;
        Ok((
            Batcher {
                wake,
                permits: Arc::new(Semaphore::new(config.queue_capacity)),
                config,
                metrics,
                queue,
                alive,
                broken,
            },
            WorkerHandle(thread),
        ))
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
        let Submission {
            timeout,
            priority,
            name,
            stream,
        } = submission;
        let permit = self.permit(specs.len())?;
        let name = name.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        // The handler validated the specs against this very model.
        let t_max = model.manifest.schedule.timesteps;
        let samples = specs
            .iter()
            .map(|spec| Steps::of(spec, t_max))
            .collect::<Result<Vec<Steps>, CoreError>>()
            .map_err(BatchError::InvalidSpec)?;
        let now = Instant::now();
        let deadline = now + timeout;
        let (reply, answer) = oneshot::channel();
        let mut queue = lock(&self.queue);
        if queue.requests.requests().any(|e| e.request.name == name) {
            return Err(BatchError::DuplicateId(name));
        }
        let work = scheduler::remaining(&samples);
        let position = queue
            .requests
            .admit(priority, work, now, deadline, queue.pass.as_ref())
            .map_err(|refusal| {
                self.metrics.requests_rejected.inc();
                BatchError::refused(refusal, timeout)
            })?;
        let id = queue.next_id;
        queue.next_id += 1;
        let request = Request {
            name: name.clone(),
            model,
            specs,
            timeout,
            reply,
            stream,
            cancelled: false,
            permit,
        };
        queue
            .requests
            .enqueue(id, samples, priority, now, deadline, request);
        if self.wake.send(()).is_err() {
            queue.requests.cancel(id);
            return Err(BatchError::Stopped);
        }
        Ok(Ticket {
            name,
            position,
            timeout,
            answer,
        })
    }

    /// Queue slots for `images` images, or why there are none.
    fn permit(&self, images: usize) -> Result<OwnedSemaphorePermit, BatchError> {
        let capacity = self.config.queue_capacity;
        let n = u32::try_from(images)
            .ok()
            .filter(|&n| n as usize <= capacity)
            .ok_or(BatchError::TooLarge {
                requested: images,
                capacity,
            })?;
        self.permits.clone().try_acquire_many_owned(n).map_err(|_| {
            self.metrics.requests_rejected.inc();
            BatchError::QueueFull {
                in_flight: self.in_flight(),
                capacity,
                retry_after: Duration::from_secs_f64(self.backlog_seconds()),
            }
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
        let mut queue = lock(&self.queue);
        let found = queue.requests.requests_mut().find(|(_, r)| r.name == name);
        let cancelled = found.map(|(_, request)| request.cancelled = true);
        cancelled.is_some()
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
        lock(&self.queue).backlog_seconds()
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
