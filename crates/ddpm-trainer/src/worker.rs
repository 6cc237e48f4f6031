//! Runs as the registry sees them: queueing a new run, executing a claimed one (fresh or
//! resumed) with its recorder and heartbeat, and the daemon loop that claims them.

use std::{
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicI64, Ordering},
        Arc,
    },
    time::Duration,
};

use ddpm_registry::{
    CheckpointKind, CheckpointStore, FinalStatus, Lease, LeasedRun, NewRun, Registry,
    RegistryError, Run,
};
use tch::Device;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    config::{DatasetConfig, Overrides, RunConfig},
    dataset::{DatasetSummary, ImageFolder},
    error::{Result, TrainerError},
    recorder::{heartbeat, record, Sink},
    train::{train, LoopEnd, TrainJob},
};

/// How a run this worker executed ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEnd {
    Completed,
    Interrupted,
    Failed(String),
    /// Another worker took it over (our heartbeat had gone stale).
    Lost,
    /// Put back for a later attempt after a failure that may pass, history kept.
    Deferred(String),
    /// Stopped by an operator (`runs cancel`), its state saved.
    Cancelled,
}

/// A trainer process as the registry knows it.
#[derive(Clone)]
pub struct Worker {
    pub registry: Registry,
    pub store: CheckpointStore,
    pub device: Device,
    /// Unique per process (`host:pid:instance`, the instance id random): heartbeats check it.
    pub name: String,
    pub heartbeat_interval: Duration,
    /// The first delay of a deferred run (doubling per attempt, capped at 64×).
    pub retry_backoff: Duration,
    /// A run with more crashes than this is failed when claimed, not executed.
    pub max_crashes: i64,
    pub progress: bool,
    pub shutdown: CancellationToken,
}

/// Scans a dataset off the async threads.
async fn scan(dataset: &DatasetConfig) -> Result<ImageFolder> {
    let (path, limits) = (dataset.path.clone(), dataset.image_limits());
    tokio::task::spawn_blocking(move || ImageFolder::scan(&path, limits))
        .await
        .map_err(|e| TrainerError::Thread(e.to_string()))?
}

/// Reads, overrides and validates a run config and its dataset: what `submit` queues
/// and `train` runs. The dataset path becomes absolute so any worker finds it.
pub async fn resolve_new_run(
    config_path: &Path,
    overrides: &Overrides,
) -> Result<(RunConfig, NewRun)> {
    let mut config = RunConfig::from_file(config_path, overrides)?;
    if config.dataset.path.is_relative() && !config.dataset.path.as_os_str().is_empty() {
        config.dataset.path = std::path::absolute(&config.dataset.path)
            .map_err(TrainerError::io(&config.dataset.path))?;
    }
    config.validate()?;
    let folder = scan(&config.dataset).await?;
    config.model.num_classes = folder.num_classes();
    config.validate()?;
    let summary = folder.summary();
    tracing::info!(
        path = %summary.path.display(),
        images = summary.image_count,
        classes = ?summary.class_names,
        skipped = summary.skipped_count,
        "dataset scanned"
    );
    let new = NewRun {
        config: serde_json::to_value(&config)
            .map_err(|e| TrainerError::config("config", e.to_string()))?,
        dataset: serde_json::to_value(&summary)
            .map_err(|e| TrainerError::config("dataset", e.to_string()))?,
        total_steps: config.training.steps,
    };
    Ok((config, new))
}

impl Worker {
    /// Executes a run this worker has claimed, to its end; records the end in the
    /// registry. `Err` only for registry failures while finishing.
    pub async fn execute(&self, run: Run) -> Result<RunEnd> {
        let span = tracing::info_span!("run", id = run.id, attempt = run.attempts);
        self.execute_inner(run).instrument(span).await
    }

    async fn execute_inner(&self, run: Run) -> Result<RunEnd> {
        tracing::info!(
            from_step = run.current_step,
            total = run.total_steps,
            "run claimed"
        );
        // Every write from here on holds the lease the claim returned.
        let leased = self.registry.leased(Lease::of(&run)?);
        if run.cancel_requested_at.is_some() {
            // Cancelled while its worker was away: nothing to save.
            return self.end(&leased, FinalStatus::Cancelled, None).await;
        }
        if run.crashes > self.max_crashes {
            let message = format!(
                "its workers stopped {} times without ending it (last at step {}): a run \
                 that keeps killing its trainer (out of memory?) is not taken up again; \
                 the limit is --max-crashes {}",
                run.crashes, run.current_step, self.max_crashes
            );
            tracing::error!(crashes = run.crashes, "run failed: {message}");
            return self.end(&leased, FinalStatus::Failed, Some(&message)).await;
        }
        // Heartbeats from the claim on: a dataset scan longer than `stale_after` must not
        // let another worker take the run while this one still prepares it.
        let step = Arc::new(AtomicI64::new(run.current_step));
        let lost = Arc::new(AtomicBool::new(false));
        // An operator's cancel (seen by a heartbeat) stops the loop like a shutdown does.
        let cancel = CancellationToken::new();
        let stop = self.shutdown.child_token();
        let _stop_on_cancel: AbortOnDrop = tokio::spawn({
            let (cancel, stop) = (cancel.clone(), stop.clone());
            async move {
                cancel.cancelled().await;
                stop.cancel();
            }
        })
        .into();
        let beats: AbortOnDrop = tokio::spawn(
            heartbeat(
                leased.clone(),
                step.clone(),
                lost.clone(),
                cancel.clone(),
                self.heartbeat_interval,
            )
            .in_current_span(),
        )
        .into();
        let prepared = self.prepare(&run).await;
        if lost.load(Ordering::Relaxed) {
            tracing::warn!("run taken over by another worker while it was being prepared");
            return Ok(RunEnd::Lost);
        }
        let (config, folder, states) = match prepared {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "run cannot start");
                return self.fail_or_defer(&leased, &run, e).await;
            }
        };

        let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
        let sink = Sink {
            leased: leased.clone(),
            store: self.store.clone(),
            keep_last: config.training.keep_last,
            lost: lost.clone(),
        };
        let recorder = tokio::spawn(record(sink, events_rx).in_current_span());
        let keep_last = config.training.keep_last;
        let job = TrainJob {
            run_id: run.id,
            class_names: folder.class_names.clone(),
            items: folder.items,
            config,
            device: self.device,
            store: self.store.clone(),
            states,
            events: events_tx,
            stop: stop.clone(),
            lost: lost.clone(),
            step: step.clone(),
            holds_lease: lease_check(&leased, &lost, &cancel),
            progress: self.progress,
        };
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let span = tracing::Span::current();
        let spawned = std::thread::Builder::new()
            .name(format!("ddpm-train-{}", run.id))
            .spawn(move || {
                let _span = span.entered();
                let _ = done_tx.send(train(job));
            });
        let outcome = match spawned {
            Ok(_) => done_rx.await.unwrap_or_else(|_| {
                Err(TrainerError::Thread("the training thread panicked".into()))
            }),
            Err(e) => Err(TrainerError::Thread(format!(
                "cannot start the training thread: {e}"
            ))),
        };
        drop(beats);
        let report = recorder.await.unwrap_or_default();
        tracing::info!(
            rows = report.rows,
            checkpoints = report.checkpoints,
            unregistered = report.unregistered,
            "recorder finished"
        );
        if lost.load(Ordering::Relaxed) {
            tracing::warn!("run taken over by another worker: this one wrote nothing more");
            return Ok(RunEnd::Lost);
        }

        match outcome {
            Ok(LoopEnd::Completed { step }) => {
                if let Err(e) = leased.heartbeat(step).await {
                    tracing::warn!(error = %e, "final heartbeat failed");
                }
                // Retention while the lease holds; a completed run keeps its newest
                // checkpoint whatever keep_last says.
                if let Err(e) = self
                    .store
                    .apply_retention(&leased, run.id, keep_last.max(1))
                    .await
                {
                    tracing::warn!(error = %e, "retention failed");
                }
                tracing::info!(step, "run completed");
                self.end(&leased, FinalStatus::Completed, None).await
            }
            Ok(LoopEnd::Interrupted { step }) => {
                let _ = leased.heartbeat(step).await;
                if cancel.is_cancelled() {
                    tracing::info!(step, "run cancelled; its state at this step is kept");
                    return self.end(&leased, FinalStatus::Cancelled, None).await;
                }
                tracing::info!(step, "run interrupted; it resumes from this step");
                self.end(&leased, FinalStatus::Interrupted, None).await
            }
            Ok(LoopEnd::Lost { step }) => {
                tracing::warn!(step, "run taken over by another worker");
                Ok(RunEnd::Lost)
            }
            Err(e) => {
                tracing::error!(error = %e, "run stopped by an error");
                self.fail_or_defer(&leased, &run, e).await
            }
        }
    }

    /// Ends the run in the registry as `status`; [`RunEnd::Lost`] (and nothing written)
    /// when another worker holds it now.
    async fn end(
        &self,
        leased: &LeasedRun,
        status: FinalStatus,
        error: Option<&str>,
    ) -> Result<RunEnd> {
        match leased.finish(status, error).await {
            Ok(()) => Ok(match status {
                FinalStatus::Completed => RunEnd::Completed,
                FinalStatus::Cancelled => RunEnd::Cancelled,
                FinalStatus::Failed => RunEnd::Failed(error.unwrap_or_default().to_owned()),
                FinalStatus::Interrupted => RunEnd::Interrupted,
            }),
            Err(RegistryError::ClaimLost { .. }) => {
                tracing::warn!(%status, "run taken over by another worker: not ending it");
                Ok(RunEnd::Lost)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Puts the run back with a backoff for an error that may pass (see
    /// [`TrainerError::is_transient`]), fails it otherwise. The history stays either way.
    async fn fail_or_defer(
        &self,
        leased: &LeasedRun,
        run: &Run,
        e: TrainerError,
    ) -> Result<RunEnd> {
        let message = e.to_string();
        if !e.is_transient() {
            return self.end(leased, FinalStatus::Failed, Some(&message)).await;
        }
        let delay = retry_delay(self.retry_backoff, run.attempts);
        tracing::warn!(error = %message, ?delay, "run deferred: the failure may pass; it is retried");
        match leased.defer(&message, delay).await {
            Ok(()) => Ok(RunEnd::Deferred(message)),
            Err(RegistryError::ClaimLost { .. }) => Ok(RunEnd::Lost),
            Err(other) => Err(other.into()),
        }
    }

    /// The run's config, its dataset (checked against what was queued) and its training
    /// states, newest first.
    async fn prepare(
        &self,
        run: &Run,
    ) -> Result<(RunConfig, ImageFolder, Vec<ddpm_registry::CheckpointRecord>)> {
        let bad = |m: String| TrainerError::Run {
            id: run.id,
            message: m,
        };
        let config: RunConfig = serde_json::from_value(run.config.clone())
            .map_err(|e| bad(format!("unreadable config: {e}")))?;
        config.validate()?;
        let queued: Option<DatasetSummary> = serde_json::from_value(run.dataset.clone()).ok();
        let folder = scan(&config.dataset).await?;
        if folder.num_classes() != config.model.num_classes {
            return Err(bad(format!(
                "the dataset now has {:?} classes, the run was queued with {:?}",
                folder.num_classes(),
                config.model.num_classes
            )));
        }
        if let Some(q) = queued {
            if q.class_names != folder.class_names {
                return Err(bad(format!(
                    "the dataset's classes changed since the run was queued: {:?} → {:?}",
                    q.class_names, folder.class_names
                )));
            }
        }
        let registered = self.registry.list_checkpoints(run.id).await?;
        // Files of attempts that are over and never registered, and temp files of
        // writes a crash cut short: this worker holds the lease, nobody else may write.
        let removed = self.store.tidy_run(run.id, &registered).await?;
        if !removed.is_empty() {
            tracing::info!(files = ?removed, "removed what ended attempts left in the store");
        }
        let mut states: Vec<_> = registered
            .into_iter()
            .filter(|c| c.kind == CheckpointKind::State)
            .collect();
        states.sort_by_key(|c| std::cmp::Reverse((c.step, c.id)));
        Ok((config, folder, states))
    }

    /// Claims and executes runs until the queue is empty (`once`) or shutdown, each time
    /// the one that has waited longest to be tried: queued, interrupted, deferred (after
    /// its retry time) or running with a stale heartbeat (its worker died).
    pub async fn daemon(
        &self,
        poll_interval: Duration,
        stale_after: Duration,
        once: bool,
    ) -> Result<()> {
        tracing::info!(worker = %self.name, ?poll_interval, ?stale_after, once, "daemon started");
        while !self.shutdown.is_cancelled() {
            let claimed = self.registry.claim_next(&self.name, stale_after).await;
            match claimed {
                Ok(Some(run)) => match self.execute(run).await {
                    // The next run is claimed at once; only an empty queue waits.
                    Ok(_) => continue,
                    Err(e) if once => return Err(e),
                    Err(e) => tracing::error!(error = %e, "recording a run's end failed"),
                },
                Ok(None) if once => {
                    tracing::info!("queue empty: exiting (--once)");
                    break;
                }
                Ok(None) => {}
                Err(e) if once => return Err(e.into()),
                Err(e) => tracing::error!(error = %e, "claiming a run failed; retrying"),
            }
            if !once {
                tokio::select! {
                    _ = tokio::time::sleep(poll_interval) => {}
                    _ = self.shutdown.cancelled() => {}
                }
            }
        }
        tracing::info!("daemon stopped");
        Ok(())
    }

    /// Claims the run `id` that this process just queued (ahead of older queued runs,
    /// which stay for the daemons) and executes it in the foreground.
    pub async fn train_own(&self, id: i64) -> Result<RunEnd> {
        match self.registry.claim_run(id, &self.name).await? {
            Some(run) => self.execute(run).await,
            None => Err(TrainerError::Run {
                id,
                message: "was claimed by another trainer before this one".into(),
            }),
        }
    }
}

/// Aborts a background task when dropped: the run's helpers (heartbeat, cancel
/// forwarding) end with the attempt on every path out of it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl From<tokio::task::JoinHandle<()>> for AbortOnDrop {
    fn from(handle: tokio::task::JoinHandle<()>) -> Self {
        AbortOnDrop(handle)
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The training thread's check before it writes a checkpoint (see
/// [`TrainJob::holds_lease`]): a heartbeat, on the runtime, from the blocking thread.
fn lease_check(
    leased: &LeasedRun,
    lost: &Arc<AtomicBool>,
    cancel: &CancellationToken,
) -> Arc<dyn Fn(i64) -> bool + Send + Sync> {
    let (leased, lost, cancel) = (leased.clone(), lost.clone(), cancel.clone());
    let runtime = tokio::runtime::Handle::current();
    Arc::new(move |step| match runtime.block_on(leased.heartbeat(step)) {
        Ok(beat) => {
            if beat.cancel_requested {
                cancel.cancel();
            }
            true
        }
        Err(RegistryError::ClaimLost { .. }) => {
            lost.store(true, Ordering::Relaxed);
            false
        }
        // Unknown: the database may be briefly away. The files are written; if the
        // lease turns out lost their registration is refused, and the next attempt
        // removes them.
        Err(e) => {
            tracing::warn!(error = %e, "lease check before a checkpoint failed");
            true
        }
    })
}

/// `base` doubled for every attempt after the first, capped at 64 × `base`.
fn retry_delay(base: Duration, attempts: i64) -> Duration {
    let doublings = attempts.saturating_sub(1).clamp(0, 6) as u32;
    base.saturating_mul(1 << doublings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_double_then_stop_growing() {
        let base = Duration::from_secs(30);
        let delays: Vec<u64> = (0..10).map(|a| retry_delay(base, a).as_secs()).collect();
        assert_eq!(delays, [30, 30, 60, 120, 240, 480, 960, 1920, 1920, 1920]);
    }
}
