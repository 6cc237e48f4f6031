//! The model thread's loop: the tensor side of step-level batching.

use std::{
    collections::HashMap,
    panic::{catch_unwind, AssertUnwindSafe},
    sync::{mpsc, Arc},
    time::Instant,
};

use ddpm_core::sampler::{step_trajectories, to_uint8, Trajectory};
use tokio::sync::oneshot;

use super::{
    slots::{RequestId, SlotSet},
    BatchError, GeneratedImage, Job, Reply,
};
use crate::{metrics::BatcherMetrics, model::LoadedModel};

/// A request between acceptance and its answer.
struct Pending {
    model: Arc<LoadedModel>,
    deadline: Instant,
    timeout: std::time::Duration,
    reply: oneshot::Sender<Reply>,
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
}

struct Worker<'m> {
    slots: SlotSet<Trajectory>,
    pending: HashMap<RequestId, Pending>,
    next_id: RequestId,
    metrics: &'m BatcherMetrics,
}

/// Runs until every sender is gone and the work in flight is answered.
pub(super) fn run(jobs: mpsc::Receiver<Job>, max_batch: usize, metrics: &BatcherMetrics) {
    let _no_grad = tch::no_grad_guard();
    let mut worker = Worker {
        slots: SlotSet::new(max_batch),
        pending: HashMap::new(),
        next_id: 0,
        metrics,
    };
    let mut senders_gone = false;
    loop {
        if worker.slots.is_idle() {
            if senders_gone {
                break;
            }
            // Nothing to do: sleep until a job comes.
            match jobs.recv() {
                Ok(job) => worker.accept(job),
                Err(_) => break,
            }
        }
        loop {
            match jobs.try_recv() {
                Ok(job) => worker.accept(job),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    senders_gone = true;
                    break;
                }
            }
        }
        worker.drop_abandoned();
        worker.slots.admit();
        worker.publish_gauges();
        worker.step();
        worker.retire();
    }
    worker.publish_gauges();
    tracing::info!("model thread stopped");
}

impl Worker<'_> {
    /// Builds a job's trajectories (x_T from each sample's seed) and queues them.
    fn accept(&mut self, job: Job) {
        let id = self.next_id;
        self.next_id += 1;
        let trajectories: Result<Vec<Trajectory>, _> = {
            let net = job.model.net();
            job.specs
                .iter()
                .map(|spec| Trajectory::new(&net.model, &net.schedule, *spec))
                .collect()
        };
        match trajectories {
            Ok(trajectories) => {
                self.slots.enqueue(id, trajectories);
                self.pending.insert(
                    id,
                    Pending {
                        model: job.model,
                        deadline: job.deadline,
                        timeout: job.timeout,
                        reply: job.reply,
                        _permit: job._permit,
                    },
                );
            }
            Err(e) => {
                // The handler validated the request against this very model: only a
                // programmer error gets here, but the client still gets an answer.
                let _ = job.reply.send(Err(BatchError::InvalidSpec(e.to_string())));
            }
        }
    }

    /// Drops requests whose client has gone and answers those past their deadline.
    fn drop_abandoned(&mut self) {
        let now = Instant::now();
        let ids: Vec<RequestId> = self.slots.requests().collect();
        for id in ids {
            let Some(p) = self.pending.get(&id) else {
                continue;
            };
            if p.reply.is_closed() {
                self.slots.cancel(id);
                self.pending.remove(&id);
                self.metrics.requests_cancelled.inc();
                tracing::debug!(request = id, "client gone: samples dropped");
            } else if now >= p.deadline {
                self.slots.cancel(id);
                if let Some(p) = self.pending.remove(&id) {
                    let timeout = p.timeout;
                    p.answer(Err(BatchError::Timeout(timeout)));
                }
                self.metrics.requests_timed_out.inc();
            }
        }
    }

    fn publish_gauges(&self) {
        self.metrics
            .queue_depth
            .set(self.slots.waiting_samples() as i64);
        self.metrics
            .active_samples
            .set(self.slots.active().len() as i64);
    }

    /// One forward pass per model over the active samples (one pass in all, except during
    /// a hot swap).
    fn step(&mut self) {
        let mut groups: Vec<(Arc<LoadedModel>, Vec<RequestId>, Vec<&mut Trajectory>)> = Vec::new();
        for slot in self.slots.active_mut() {
            let Some(p) = self.pending.get(&slot.request) else {
                continue;
            };
            match groups.iter_mut().find(|(m, _, _)| Arc::ptr_eq(m, &p.model)) {
                Some((_, requests, batch)) => {
                    requests.push(slot.request);
                    batch.push(&mut slot.sample);
                }
                None => groups.push((p.model.clone(), vec![slot.request], vec![&mut slot.sample])),
            }
        }
        let mut failed = Vec::new();
        for (model, requests, mut batch) in groups {
            let size = batch.len();
            let outcome = catch_unwind(AssertUnwindSafe(|| {
                step_trajectories(&model.net().model, &mut batch)
            }));
            self.metrics.observe_forward_pass(size);
            let error = match outcome {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e.to_string(),
                Err(_) => "the forward pass panicked".to_string(),
            };
            tracing::error!(%error, batch = size, "forward pass failed: failing its requests");
            failed.extend(requests.into_iter().map(|r| (r, error.clone())));
        }
        for (id, error) in failed {
            self.slots.cancel(id);
            if let Some(p) = self.pending.remove(&id) {
                p.answer(Err(BatchError::ForwardPass(error)));
            }
        }
    }

    /// Answers the requests whose samples are all done.
    fn retire(&mut self) {
        for done in self.slots.retire(Trajectory::is_done) {
            let Some(p) = self.pending.remove(&done.request) else {
                continue;
            };
            let images: Result<Vec<GeneratedImage>, BatchError> =
                done.samples.iter().map(to_image).collect();
            if let Ok(images) = &images {
                self.metrics.images_generated.inc_by(images.len() as u64);
            }
            p.answer(images);
        }
    }
}

/// A finished trajectory's x₀ as 8-bit `[H, W, C]` pixels.
fn to_image(t: &Trajectory) -> Result<GeneratedImage, BatchError> {
    let x = t.x(); // [C, H, W]
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
    let spec = t.spec();
    Ok(GeneratedImage {
        label: spec.label,
        seed: spec.seed,
        width: w as u32,
        height: h as u32,
        channels: c as u8,
        pixels,
    })
}
