//! The model thread's loop: the tensor side of step-level batching.
//!
//! The queue ([`Queue`]) holds every request's record; this thread holds their samples'
//! tensors ([`Trajectory`], by request id) and the pass-time fit. Each iteration locks the
//! queue twice, for the bookkeeping before and after the forward passes, and never over a
//! pass: a handler admitting or cancelling waits for bookkeeping only. A libtorch failure
//! comes back as a [`CoreError`] (the step is fallible end to end); [`forward`] holds the
//! one `catch_unwind`, the last guard for the network's own panicking operators.

use std::{
    collections::{BTreeMap, HashMap},
    panic::{catch_unwind, AssertUnwindSafe},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc, Mutex,
    },
    time::Instant,
};

use ddpm_core::{
    sampler::{step_trajectories, to_uint8, Trajectory},
    CoreError, DeviceFault, Model, SampleSpec, SamplerConfig,
};
use tch::Tensor;

use super::{
    cost::{PassTimes, RequestId},
    lock, BatchError, BatcherConfig, GeneratedImage, Queue, StreamItem,
};
use crate::{metrics::BatcherMetrics, model::LoadedModel};

/// The selected samples of one model: their requests' ids and indices, in queue order.
type Selection = Vec<(Arc<LoadedModel>, Vec<(RequestId, usize)>)>;

pub(super) struct Worker {
    config: BatcherConfig,
    queue: Arc<Mutex<Queue>>,
    /// The tensors of the queue's started requests, by id (ids grow in arrival order).
    samples: BTreeMap<RequestId, Vec<Trajectory>>,
    metrics: BatcherMetrics,
    broken: Arc<AtomicBool>,
    times: PassTimes,
    /// The checkpoint the pass times were calibrated on.
    calibrated_for: Option<i64>,
}

impl Worker {
    pub(super) fn new(
        config: BatcherConfig,
        metrics: BatcherMetrics,
        queue: Arc<Mutex<Queue>>,
        broken: Arc<AtomicBool>,
    ) -> Worker {
        Worker {
            config,
            queue,
            samples: BTreeMap::new(),
            metrics,
            broken,
            times: PassTimes::default(),
            calibrated_for: None,
        }
    }

    /// Runs until every handle is gone and the work in flight is answered.
    pub(super) fn run(mut self, woken: mpsc::Receiver<()>) {
        let _no_grad = tch::no_grad_guard();
        let shared = Arc::clone(&self.queue);
        let mut handles_gone = false;
        loop {
            if lock(&shared).requests.is_idle() {
                // Nothing to do: sleep until a request comes (or every handle is gone).
                if handles_gone || woken.recv().is_err() {
                    break;
                }
            }
            loop {
                match woken.try_recv() {
                    Ok(()) => {}
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        handles_gone = true;
                        break;
                    }
                }
            }
            if let Some(model) = self.uncalibrated_model() {
                self.calibrate(&model);
            }
            let selection = {
                let mut queue = lock(&shared);
                self.start_new(&mut queue);
                self.drop_abandoned(&mut queue);
                queue
                    .requests
                    .select(Instant::now(), &self.times.estimate());
                self.publish_gauges(&queue);
                selection(&queue)
            };
            let failed = self.step(selection);
            let mut queue = lock(&shared);
            self.fail(&mut queue, failed);
            for (_, _, steps) in queue.requests.selected_mut() {
                steps.done += 1;
            }
            self.retire(&mut queue);
            self.report(&mut queue);
        }
        self.publish_gauges(&lock(&self.queue));
        tracing::info!("model thread stopped");
    }

    /// The model of a request not started yet, when the pass times were fitted on another.
    fn uncalibrated_model(&self) -> Option<Arc<LoadedModel>> {
        let queue = lock(&self.queue);
        let model = queue
            .requests
            .requests()
            .filter(|e| !self.samples.contains_key(&e.id()))
            .map(|e| &e.request.model)
            .find(|m| self.calibrated_for != Some(m.info().checkpoint_id))
            .cloned();
        model
    }

    /// Builds the trajectories (x_T from each sample's seed) of the requests not started.
    fn start_new(&mut self, queue: &mut Queue) {
        let mut invalid = Vec::new();
        for entry in queue.requests.requests() {
            let id = entry.id();
            if self.samples.contains_key(&id) {
                continue;
            }
            let request = &entry.request;
            let preview = request
                .stream
                .as_ref()
                .is_some_and(|s| s.preview_every.is_some());
            let net = request.model.net();
            let built = request
                .specs
                .iter()
                .map(|spec| {
                    let mut t = Trajectory::new(&net.model, &net.schedule, *spec)?;
                    t.track_x0(preview);
                    Ok(t)
                })
                .collect::<Result<Vec<Trajectory>, CoreError>>();
            match built {
                Ok(trajectories) => {
                    self.samples.insert(id, trajectories);
                }
                // The handler validated the request against this very model: only a
                // programmer error gets here, but the client still gets an answer.
                Err(e) => invalid.push((id, BatchError::InvalidSpec(e))),
            }
        }
        for (id, error) in invalid {
            if let Some(request) = queue.requests.cancel(id) {
                request.answer(Err(error));
            }
        }
    }

    /// Timed calibration passes per size. Their median, not their minimum: admission plans
    /// on this estimate until the model's own passes replace it, and the fastest of a few
    /// passes on a busy machine promises deadlines the typical pass does not keep
    /// (measured on the 2-core development VM: the minimum is 10–15 % under the median).
    const CALIBRATION_PASSES: usize = 3;

    /// Times passes of a single guided sample and of a full batch, so that the cost model
    /// has two sizes to fit from: per size one untimed pass (the first pass of a size may
    /// pay for allocation), then [`Self::CALIBRATION_PASSES`] timed ones, whose median is the
    /// anchor. Takes a fraction of a second once per model on the micro models of the
    /// tests.
    fn calibrate(&mut self, model: &LoadedModel) {
        let started = Instant::now();
        let net = model.net();
        let spec = SampleSpec {
            label: model.is_conditional().then_some(0),
            guidance_scale: 3.0,
            seed: 0,
            sampler: SamplerConfig::ddim(2),
        };
        let mut anchors = Vec::new();
        let mut measure = || -> Result<(), CoreError> {
            for n in [1, self.config.max_batch] {
                let mut seconds = Vec::with_capacity(Self::CALIBRATION_PASSES + 1);
                for _ in 0..=Self::CALIBRATION_PASSES {
                    let mut batch = (0..n)
                        .map(|_| Trajectory::new(&net.model, &net.schedule, spec))
                        .collect::<Result<Vec<_>, _>>()?;
                    let mut refs: Vec<&mut Trajectory> = batch.iter_mut().collect();
                    let t = Instant::now();
                    forward(&net.model, &mut refs)?;
                    seconds.push(t.elapsed().as_secs_f64());
                }
                let timed = &mut seconds[1..];
                timed.sort_by(f64::total_cmp);
                anchors.push((n * spec.rows_per_step(), timed[timed.len() / 2]));
            }
            Ok(())
        };
        match measure() {
            Ok(()) => {
                self.times = PassTimes::calibrated(&anchors);
                let estimate = self.times.estimate();
                tracing::info!(
                    fixed_ms = estimate.fixed * 1e3,
                    per_row_ms = estimate.per_row * 1e3,
                    took_ms = started.elapsed().as_millis() as u64,
                    "forward pass time calibrated"
                );
            }
            Err(e) => tracing::warn!(error = %e, "pass time calibration failed"),
        }
        self.calibrated_for = Some(model.info().checkpoint_id);
    }

    /// Drops requests cancelled or abandoned by their client and answers those past their
    /// deadline. The gauges are updated before the answers go out, so a client that reads
    /// `/metrics` after its answer sees its samples gone.
    fn drop_abandoned(&mut self, queue: &mut Queue) {
        let now = Instant::now();
        let mut leaving = Vec::new();
        for entry in queue.requests.requests() {
            let r = &entry.request;
            // The answer to send, if anyone still waits for one.
            let answer = if r.cancelled {
                self.metrics.requests_cancelled.inc();
                Some(BatchError::Cancelled)
            } else if r.abandoned() {
                self.metrics.requests_cancelled.inc();
                tracing::debug!(request = entry.id(), "client gone: samples dropped");
                None
            } else if now >= entry.deadline() {
                self.metrics.requests_timed_out.inc();
                Some(BatchError::Timeout(r.timeout))
            } else {
                continue;
            };
            leaving.push((entry.id(), answer));
        }
        if leaving.is_empty() {
            return;
        }
        let mut answers = Vec::new();
        for (id, answer) in leaving {
            self.samples.remove(&id);
            if let (Some(request), Some(error)) = (queue.requests.cancel(id), answer) {
                answers.push((request, error));
            }
        }
        self.publish_gauges(queue);
        for (request, error) in answers {
            request.answer(Err(error));
        }
    }

    fn publish_gauges(&self, queue: &Queue) {
        self.metrics
            .queue_depth
            .set(queue.requests.waiting_samples() as i64);
        self.metrics
            .active_samples
            .set(queue.requests.active() as i64);
    }

    /// One forward pass per model over the selected samples (one pass in all, except
    /// during a hot swap). Returns the requests whose pass failed, with its error.
    fn step(&mut self, selection: Selection) -> Vec<(RequestId, Arc<CoreError>)> {
        let mut failed = Vec::new();
        for (model, picked) in selection {
            let mut requests: Vec<RequestId> = picked.iter().map(|&(id, _)| id).collect();
            requests.dedup();
            let mut batch: Vec<&mut Trajectory> = Vec::with_capacity(picked.len());
            // Both in id, then index, order: a merge.
            let mut picked = picked.iter().peekable();
            for (id, trajectories) in self.samples.iter_mut() {
                for (index, t) in trajectories.iter_mut().enumerate() {
                    if picked.next_if_eq(&&(*id, index)).is_some() {
                        batch.push(t);
                    }
                }
            }
            let size = batch.len();
            // The rows this pass really runs: outside its guidance interval a guided
            // sample costs one.
            let rows: usize = batch.iter().map(|t| t.rows_now()).sum();
            let started = Instant::now();
            let outcome = forward(&model.net().model, &mut batch);
            self.metrics.observe_forward_pass(size);
            let error = match outcome {
                Ok(()) => {
                    self.times.observe(rows, started.elapsed().as_secs_f64());
                    continue;
                }
                Err(e) => Arc::new(e),
            };
            if error.device_fault() == DeviceFault::Sticky {
                // The CUDA context is unusable until the process restarts: say so to
                // the orchestrator through /healthz.
                self.broken.store(true, Ordering::SeqCst);
                tracing::error!(%error, "the device is in an unrecoverable state: /healthz now fails");
            }
            tracing::error!(%error, batch = size, "forward pass failed: failing its requests");
            failed.extend(requests.into_iter().map(|r| (r, error.clone())));
        }
        failed
    }
    /// Answers the requests whose forward pass failed.
    fn fail(&mut self, queue: &mut Queue, failed: Vec<(RequestId, Arc<CoreError>)>) {
        for (id, error) in failed {
            self.samples.remove(&id);
            if let Some(request) = queue.requests.cancel(id) {
                request.answer(Err(BatchError::ForwardPass(error)));
            }
        }
    }

    /// Sends finished images to streaming requests and answers the requests whose
    /// samples are all done.
    fn retire(&mut self, queue: &mut Queue) {
        let samples = &self.samples;
        // A streamed request's images go out as they finish, each converted once; one that
        // cannot be read fails its request when it completes.
        let mut unreadable: HashMap<RequestId, BatchError> = HashMap::new();
        let completed = queue.requests.retire(|id, index, request| {
            let Some(sink) = &request.stream else {
                return;
            };
            let Some(t) = samples.get(&id).and_then(|ts| ts.get(index)) else {
                return;
            };
            match to_image(t.x(), t.spec()) {
                Ok(image) => {
                    let _ = sink.items.send(StreamItem::Image { index, image });
                }
                Err(e) => {
                    unreadable.entry(id).or_insert(e);
                }
            }
        });
        for done in completed {
            let trajectories = self.samples.remove(&done.id).unwrap_or_default();
            let request = done.request;
            let reply = match &request.stream {
                Some(sink) => {
                    sink.progress.send_if_modified(|progress| {
                        progress.images_done = progress.images;
                        progress.step = progress.total;
                        true
                    });
                    match unreadable.remove(&done.id) {
                        Some(e) => Err(e),
                        None => Ok(Vec::new()),
                    }
                }
                None => trajectories
                    .iter()
                    .map(|t| to_image(t.x(), t.spec()))
                    .collect(),
            };
            if reply.is_ok() {
                self.metrics
                    .images_generated
                    .inc_by(done.samples.len() as u64);
            }
            request.answer(reply);
        }
    }

    /// Progress and previews for streaming requests; the pass-time estimate for admission.
    fn report(&mut self, queue: &mut Queue) {
        for entry in queue.requests.requests() {
            let Some(sink) = &entry.request.stream else {
                continue;
            };
            if let Some(progress) = queue.requests.progress(entry.id()) {
                sink.progress.send_if_modified(|old| {
                    let changed = *old != progress;
                    *old = progress;
                    changed
                });
            }
        }
        self.send_previews(queue);
        queue.pass = self.times.is_calibrated().then(|| self.times.estimate());
        self.metrics.backlog_seconds.set(queue.backlog_seconds());
    }

    /// x̂₀ of each streamed sample that asked for previews, every k of its steps.
    fn send_previews(&self, queue: &Queue) {
        for (id, index) in queue.requests.selected() {
            let Some(sink) = queue.requests.request(id).and_then(|r| r.stream.as_ref()) else {
                continue;
            };
            let Some(every) = sink.preview_every else {
                continue;
            };
            let Some(sample) = self.samples.get(&id).and_then(|ts| ts.get(index)) else {
                continue;
            };
            let (step, total) = sample.progress();
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

/// The selected samples, grouped by model (one group in all, except during a hot swap).
fn selection(queue: &Queue) -> Selection {
    let mut groups: Selection = Vec::new();
    for (id, index) in queue.requests.selected() {
        let Some(request) = queue.requests.request(id) else {
            continue;
        };
        match groups
            .iter_mut()
            .find(|(m, _)| Arc::ptr_eq(m, &request.model))
        {
            Some((_, picked)) => picked.push((id, index)),
            None => groups.push((request.model.clone(), vec![(id, index)])),
        }
    }
    groups
}

/// Steps `batch` by one forward pass and waits for the device, so that the time measured
/// is the pass's. The last guard: a panic of the network's forward pass (tch's panicking
/// operators) comes back as an error, its device fault classified like any other.
fn forward(model: &Model, batch: &mut [&mut Trajectory]) -> Result<(), CoreError> {
    catch_unwind(AssertUnwindSafe(|| {
        step_trajectories(model, batch)?;
        if let Some(t) = batch.first() {
            sync(t.x());
        }
        Ok(())
    }))
    .unwrap_or_else(|panic| Err(CoreError::from_panic(panic.as_ref())))
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
        return Err(BatchError::Image(CoreError::Input(format!(
            "an image of shape {size:?}"
        ))));
    };
    let pixels = || -> Result<Vec<u8>, CoreError> {
        let hwc = to_uint8(&x.f_unsqueeze(0)?)?
            .f_squeeze_dim(0)?
            .f_permute([1, 2, 0])?
            .f_contiguous()?; // [H, W, C]
        Ok(Vec::<u8>::try_from(hwc.f_view([-1])?)?)
    };
    Ok(GeneratedImage {
        label: spec.label,
        seed: spec.seed,
        width: w as u32,
        height: h as u32,
        channels: c as u8,
        pixels: pixels().map_err(BatchError::Image)?,
    })
}
