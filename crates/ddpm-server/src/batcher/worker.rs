//! The model thread's loop: the tensor side of step-level batching.

use std::{
    collections::HashMap,
    panic::{catch_unwind, AssertUnwindSafe},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc, Mutex,
    },
    time::{Duration, Instant},
};

use ddpm_core::{
    sampler::{step_trajectories, to_uint8, Trajectory},
    SampleSpec, SamplerConfig,
};
use tch::Tensor;
use tokio::sync::oneshot;

use super::{
    cost::PassTimes,
    lock,
    scheduler::{RequestId, Scheduler, Work},
    BatchError, BatcherConfig, GeneratedImage, Job, Ledger, Reply, StreamItem, StreamSink,
};
use crate::{metrics::BatcherMetrics, model::LoadedModel};

impl Work for Trajectory {
    fn rows(&self) -> usize {
        self.spec().rows_per_step()
    }

    fn progress(&self) -> (usize, usize) {
        Trajectory::progress(self)
    }
}

/// A request between acceptance and its answer.
struct Pending {
    model: Arc<LoadedModel>,
    deadline: Instant,
    timeout: Duration,
    reply: oneshot::Sender<Reply>,
    stream: Option<StreamSink>,
    /// Held until the request is answered or dropped: frees its queue slots.
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Pending {
    /// Frees the request's queue slots, then answers it: a client that sends its next
    /// request as soon as it has the answer finds the capacity back.
    fn answer(self, reply: Reply) {
        let Pending {
            reply: to, _permit, ..
        } = self;
        drop(_permit);
        let _ = to.send(reply);
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

pub(super) struct Worker {
    config: BatcherConfig,
    scheduler: Scheduler<Trajectory>,
    pending: HashMap<RequestId, Pending>,
    metrics: BatcherMetrics,
    ledger: Arc<Mutex<Ledger>>,
    broken: Arc<AtomicBool>,
    times: PassTimes,
    /// The checkpoint the pass times were calibrated on.
    calibrated_for: Option<i64>,
}

impl Worker {
    pub(super) fn new(
        config: BatcherConfig,
        metrics: BatcherMetrics,
        ledger: Arc<Mutex<Ledger>>,
        broken: Arc<AtomicBool>,
    ) -> Worker {
        Worker {
            config,
            scheduler: Scheduler::new(config.max_batch, config.policy),
            pending: HashMap::new(),
            metrics,
            ledger,
            broken,
            times: PassTimes::default(),
            calibrated_for: None,
        }
    }

    /// Runs until every sender is gone and the work in flight is answered.
    pub(super) fn run(mut self, jobs: mpsc::Receiver<Job>) {
        let _no_grad = tch::no_grad_guard();
        let mut senders_gone = false;
        loop {
            if self.scheduler.is_idle() {
                if senders_gone {
                    break;
                }
                // Nothing to do: sleep until a job comes.
                match jobs.recv() {
                    Ok(job) => self.accept(job),
                    Err(_) => break,
                }
            }
            loop {
                match jobs.try_recv() {
                    Ok(job) => self.accept(job),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        senders_gone = true;
                        break;
                    }
                }
            }
            self.drop_abandoned();
            self.scheduler
                .select(Instant::now(), &self.times.estimate());
            self.publish_gauges();
            self.step();
            self.retire();
            self.report();
        }
        self.publish_gauges();
        tracing::info!("model thread stopped");
    }

    /// Builds a job's trajectories (x_T from each sample's seed) and queues them.
    fn accept(&mut self, job: Job) {
        let id = job.id;
        if self.calibrated_for != Some(job.model.info().checkpoint_id) {
            self.calibrate(&job.model);
        }
        let preview = job
            .stream
            .as_ref()
            .is_some_and(|s| s.preview_every.is_some());
        let built = catch_unwind(AssertUnwindSafe(|| {
            let net = job.model.net();
            job.specs
                .iter()
                .map(|spec| {
                    let mut t = Trajectory::new(&net.model, &net.schedule, *spec)?;
                    t.track_x0(preview);
                    Ok(t)
                })
                .collect::<Result<Vec<Trajectory>, ddpm_core::CoreError>>()
        }));
        match built {
            Ok(Ok(trajectories)) => {
                self.scheduler
                    .enqueue(id, trajectories, job.priority, Instant::now());
                self.pending.insert(
                    id,
                    Pending {
                        model: job.model,
                        deadline: job.deadline,
                        timeout: job.timeout,
                        reply: job.reply,
                        stream: job.stream,
                        _permit: job._permit,
                    },
                );
            }
            failed => {
                // The handler validated the request against this very model: only a
                // programmer error gets here, but the client still gets an answer.
                let message = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "starting the samples panicked".to_string(),
                };
                lock(&self.ledger).forget(id);
                let _ = job.reply.send(Err(BatchError::InvalidSpec(message)));
            }
        }
    }

    /// Times one pass of a single guided sample and one of a full batch (twice each: the
    /// first pass of a size may pay for allocation), so that the cost model has two sizes
    /// to fit from. Takes a fraction of a second once per model.
    fn calibrate(&mut self, model: &LoadedModel) {
        let started = Instant::now();
        let measured = catch_unwind(AssertUnwindSafe(|| -> Result<_, ddpm_core::CoreError> {
            let net = model.net();
            let spec = SampleSpec {
                label: model.is_conditional().then_some(0),
                guidance_scale: 3.0,
                seed: 0,
                sampler: SamplerConfig::ddim(2),
            };
            let mut anchors = Vec::new();
            for n in [1, self.config.max_batch] {
                let mut best = f64::INFINITY;
                for _ in 0..2 {
                    let mut batch = (0..n)
                        .map(|_| Trajectory::new(&net.model, &net.schedule, spec))
                        .collect::<Result<Vec<_>, _>>()?;
                    let mut refs: Vec<&mut Trajectory> = batch.iter_mut().collect();
                    let t = Instant::now();
                    step_trajectories(&net.model, &mut refs)?;
                    sync(&refs[0].x().shallow_clone());
                    best = best.min(t.elapsed().as_secs_f64());
                }
                anchors.push((n * spec.rows_per_step(), best));
            }
            Ok(anchors)
        }));
        match measured {
            Ok(Ok(anchors)) => {
                self.times = PassTimes::calibrated(&anchors);
                let estimate = self.times.estimate();
                tracing::info!(
                    fixed_ms = estimate.fixed * 1e3,
                    per_row_ms = estimate.per_row * 1e3,
                    took_ms = started.elapsed().as_millis() as u64,
                    "forward pass time calibrated"
                );
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "pass time calibration failed"),
            Err(_) => tracing::warn!("pass time calibration panicked"),
        }
        self.calibrated_for = Some(model.info().checkpoint_id);
    }

    /// Drops requests cancelled or abandoned by their client and answers those past their
    /// deadline. The gauges are updated before the answers go out, so a client that reads
    /// `/metrics` after its answer sees its samples gone.
    fn drop_abandoned(&mut self) {
        let now = Instant::now();
        let cancelled = std::mem::take(&mut lock(&self.ledger).cancelled);
        let ids: Vec<RequestId> = self.scheduler.requests().collect();
        let mut answers = Vec::new();
        for id in ids {
            let Some(p) = self.pending.get(&id) else {
                continue;
            };
            // The answer to send, if anyone still waits for one.
            let answer = if cancelled.contains(&id) {
                self.metrics.requests_cancelled.inc();
                Some(BatchError::Cancelled)
            } else if p.abandoned() {
                self.metrics.requests_cancelled.inc();
                tracing::debug!(request = id, "client gone: samples dropped");
                None
            } else if now >= p.deadline {
                self.metrics.requests_timed_out.inc();
                Some(BatchError::Timeout(p.timeout))
            } else {
                continue;
            };
            self.scheduler.cancel(id);
            lock(&self.ledger).forget(id);
            if let (Some(p), Some(error)) = (self.pending.remove(&id), answer) {
                answers.push((p, error));
            }
        }
        if answers.is_empty() {
            return;
        }
        self.publish_gauges();
        for (p, error) in answers {
            p.answer(Err(error));
        }
    }

    fn publish_gauges(&self) {
        self.metrics
            .queue_depth
            .set(self.scheduler.waiting_samples() as i64);
        self.metrics
            .active_samples
            .set(self.scheduler.active() as i64);
    }

    /// One forward pass per model over the selected samples (one pass in all, except
    /// during a hot swap).
    fn step(&mut self) {
        type Group<'a> = (Arc<LoadedModel>, Vec<RequestId>, Vec<&'a mut Trajectory>);
        let mut groups: Vec<Group> = Vec::new();
        for (request, _, sample) in self.scheduler.selected_mut() {
            let Some(p) = self.pending.get(&request) else {
                continue;
            };
            match groups.iter_mut().find(|(m, _, _)| Arc::ptr_eq(m, &p.model)) {
                Some((_, requests, batch)) => {
                    requests.push(request);
                    batch.push(sample);
                }
                None => groups.push((p.model.clone(), vec![request], vec![sample])),
            }
        }
        let mut failed = Vec::new();
        for (model, requests, mut batch) in groups {
            let size = batch.len();
            let rows: usize = batch.iter().map(|t| t.rows()).sum();
            let started = Instant::now();
            let outcome = catch_unwind(AssertUnwindSafe(|| {
                step_trajectories(&model.net().model, &mut batch)?;
                // Wait for the device, so that the time measured is the pass's.
                sync(batch[0].x());
                Ok::<_, ddpm_core::CoreError>(())
            }));
            self.metrics.observe_forward_pass(size);
            let error = match outcome {
                Ok(Ok(())) => {
                    self.times.observe(rows, started.elapsed().as_secs_f64());
                    continue;
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => "the forward pass panicked".to_string(),
            };
            if is_sticky_device_error(&error) {
                // The CUDA context is unusable until the process restarts: say so to
                // the orchestrator through /healthz.
                self.broken.store(true, Ordering::SeqCst);
                tracing::error!(%error, "the device is in an unrecoverable state: /healthz now fails");
            }
            tracing::error!(%error, batch = size, "forward pass failed: failing its requests");
            let mut requests = requests;
            requests.dedup();
            failed.extend(requests.into_iter().map(|r| (r, error.clone())));
        }
        for (id, error) in failed {
            if self.scheduler.cancel(id) {
                lock(&self.ledger).forget(id);
                if let Some(p) = self.pending.remove(&id) {
                    p.answer(Err(BatchError::ForwardPass(error)));
                }
            }
        }
    }

    /// Sends finished images to streaming requests and answers the requests whose
    /// samples are all done.
    fn retire(&mut self) {
        let pending = &self.pending;
        // A streamed request's images go out as they finish, each converted once; one that
        // cannot be read fails its request when it completes.
        let mut unreadable: HashMap<RequestId, BatchError> = HashMap::new();
        let completed = self.scheduler.retire(|request, index, sample| {
            let Some(sink) = pending.get(&request).and_then(|p| p.stream.as_ref()) else {
                return;
            };
            match to_image(sample.x(), sample.spec()) {
                Ok(image) => {
                    let _ = sink.items.send(StreamItem::Image { index, image });
                }
                Err(e) => {
                    unreadable.entry(request).or_insert(e);
                }
            }
        });
        for done in completed {
            lock(&self.ledger).forget(done.request);
            let Some(p) = self.pending.remove(&done.request) else {
                continue;
            };
            let reply = match &p.stream {
                Some(sink) => {
                    sink.progress.send_if_modified(|progress| {
                        progress.images_done = progress.images;
                        progress.step = progress.total;
                        true
                    });
                    match unreadable.remove(&done.request) {
                        Some(e) => Err(e),
                        None => Ok(Vec::new()),
                    }
                }
                None => done
                    .samples
                    .iter()
                    .map(|t| to_image(t.x(), t.spec()))
                    .collect(),
            };
            if reply.is_ok() {
                self.metrics
                    .images_generated
                    .inc_by(done.samples.len() as u64);
            }
            p.answer(reply);
        }
    }

    /// Progress and previews for streaming requests; remaining work for admission.
    fn report(&mut self) {
        for (id, p) in &self.pending {
            let Some(sink) = &p.stream else { continue };
            if let Some(progress) = self.scheduler.progress(*id) {
                sink.progress.send_if_modified(|old| {
                    let changed = *old != progress;
                    *old = progress;
                    changed
                });
            }
        }
        self.send_previews();
        let mut ledger = lock(&self.ledger);
        for (id, row_steps) in self.scheduler.remaining() {
            if let Some(b) = ledger.bookings.get_mut(&id) {
                b.row_steps = row_steps;
            }
        }
        ledger.pass = self.times.is_calibrated().then(|| self.times.estimate());
        self.metrics
            .backlog_seconds
            .set(ledger.backlog_seconds(2 * self.config.max_batch));
    }

    /// x̂₀ of each streamed sample that asked for previews, every k of its steps.
    fn send_previews(&mut self) {
        let pending = &self.pending;
        for (request, index, sample) in self.scheduler.selected_mut() {
            let Some(sink) = pending.get(&request).and_then(|p| p.stream.as_ref()) else {
                continue;
            };
            let Some(every) = sink.preview_every else {
                continue;
            };
            let (step, total) = Work::progress(&*sample);
            if step == 0 || step >= total || step % every != 0 {
                continue;
            }
            let Some(x0) = sample.x0() else { continue };
            if let Ok(image) = to_image(x0, sample.spec()) {
                let _ = sink.items.send(StreamItem::Preview { index, step, image });
            }
        }
    }
}

/// Whether a forward-pass error leaves the device unusable: after a CUDA error such as an
/// illegal memory access or a device-side assert, every later call on the context fails.
/// Out-of-memory is not sticky (the pass can be retried smaller).
pub(crate) fn is_sticky_device_error(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    let sticky = [
        "illegal memory access",
        "device-side assert",
        "unspecified launch failure",
        "an illegal instruction",
        "misaligned address",
        "cuda error: launch failure",
        "uncorrectable ecc error",
        "cudaerrorlaunchfailure",
    ];
    sticky.iter().any(|s| m.contains(s))
}

/// Waits for the device to finish the work queued on `x` (a no-op on the CPU).
fn sync(x: &Tensor) {
    if let tch::Device::Cuda(i) = x.device() {
        tch::Cuda::synchronize(i as i64);
    }
}

/// An image `[C, H, W]` in [−1, 1] as 8-bit `[H, W, C]` pixels.
fn to_image(x: &Tensor, spec: &SampleSpec) -> Result<GeneratedImage, BatchError> {
    let size = x.size();
    let [c, h, w] = size[..] else {
        return Err(BatchError::Image(format!("an image of shape {size:?}")));
    };
    let hwc = to_uint8(&x.unsqueeze(0))
        .squeeze_dim(0)
        .permute([1, 2, 0])
        .contiguous(); // [H, W, C]
    let pixels =
        Vec::<u8>::try_from(hwc.view([-1])).map_err(|e| BatchError::Image(e.to_string()))?;
    Ok(GeneratedImage {
        label: spec.label,
        seed: spec.seed,
        width: w as u32,
        height: h as u32,
        channels: c as u8,
        pixels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sticky_device_errors_are_told_from_recoverable_ones() {
        assert!(is_sticky_device_error(
            "CUDA error: an illegal memory access was encountered"
        ));
        assert!(is_sticky_device_error(
            "Torch(\"CUDA error: device-side assert triggered\")"
        ));
        assert!(!is_sticky_device_error(
            "CUDA out of memory. Tried to allocate 2.00 GiB"
        ));
        assert!(!is_sticky_device_error("label 12 is outside 0..=10"));
    }
}
