//! One attempt at a claimed run, from the claim to the run's end in the registry, with
//! one owner. [`Attempt`] starts its parts and stops them: the heartbeat from the claim
//! on, then (once the run is prepared) the recorder and the training part
//! ([`training`]). [`conclude`] is the one place that decides how the attempt ended;
//! [`Attempt::end`] writes that ending to the registry, once.

mod training;

use std::{
    sync::{atomic::AtomicI64, Arc},
    time::Duration,
};

use ddpm_registry::{CheckpointKind, FinalStatus, Lease, RegistryError, Run, RunWorld};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};
use tracing::Instrument;

use crate::{
    error::{Result, TrainerError},
    lease::LeaseHold,
    recorder::{record, Sink},
    resolve,
    train::{Event, LoopEnd, TrainJob},
    worker::Worker,
};
use training::Training;

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
    /// A rank of a data-parallel attempt died or hung: the run is interrupted (it
    /// resumes from its last state) and the attempt counts as a crash.
    Crashed(String),
}

/// How an attempt ended, decided before anything is written.
#[derive(Debug)]
enum Ending {
    /// Trained to its last step.
    Completed { step: i64 },
    /// Stopped by SIGINT / SIGTERM with a state at `step`: it resumes from there.
    Interrupted { step: i64 },
    /// Stopped by an operator: before it started (nothing to save), or with a state
    /// at `step`.
    Cancelled { step: Option<i64> },
    /// Stopped by an error: deferred if the error may pass, failed otherwise.
    Failed(TrainerError),
    /// Another worker holds the run: nothing more is written.
    Lost,
    /// A rank of a data-parallel attempt died or hung: interrupted, resumed like any
    /// interrupted run, and counted as a crash.
    Crashed(TrainerError),
}

/// One attempt at a run this worker has claimed.
pub struct Attempt<'w> {
    worker: &'w Worker,
    run: Run,
    hold: LeaseHold,
}

impl Attempt<'_> {
    /// Executes a run `worker` has claimed, to its end, and records the end in the
    /// registry. `Err` only for registry failures while recording it.
    pub async fn execute(worker: &Worker, run: Run) -> Result<RunEnd> {
        let span = tracing::info_span!("run", id = run.id, attempt = run.attempts);
        async move {
            tracing::info!(
                from_step = run.current_step,
                total = run.total_steps,
                "run claimed"
            );
            // Every write from here on holds the lease the claim returned.
            let leased = worker.registry.leased(Lease::of(&run)?);
            let hold = LeaseHold::new(leased, &worker.shutdown);
            let attempt = Attempt { worker, run, hold };
            let ending = match refusal(&attempt.run, worker.max_crashes) {
                Some(ending) => ending,
                None => attempt.supervise().await,
            };
            attempt.end(ending).await
        }
        .instrument(span)
        .await
    }

    /// Runs the parts and says how the attempt ended. The heartbeat runs from the claim
    /// until every other part has stopped: a dataset scan longer than `stale_after`
    /// must not let another worker take the run while this one still prepares it.
    async fn supervise(&self) -> Ending {
        let step = Arc::new(AtomicI64::new(self.run.current_step));
        let heartbeat = self
            .hold
            .clone()
            .heartbeat(step.clone(), self.worker.heartbeat_interval);
        let _heartbeat = AbortOnDrop(tokio::spawn(heartbeat.in_current_span()));
        let (events, events_rx) = unbounded_channel();
        let job = match self.prepare(events, step).await {
            Ok(job) => job,
            Err(e) => return conclude(Err(e), self.hold.is_lost(), false),
        };
        let sink = Sink {
            hold: self.hold.clone(),
            store: self.worker.store.clone(),
            keep_last: job.config.training.keep_last,
        };
        let recorder = tokio::spawn(record(sink, events_rx).in_current_span());
        let (joined_tx, joined) = tokio::sync::oneshot::channel();
        let outcome = match Training::start(job, self.worker.ranks.clone(), joined_tx) {
            Ok(training) => {
                let world = tokio::spawn(self.record_world(joined).in_current_span());
                let outcome = training.finished().await;
                let _ = world.await;
                outcome
            }
            Err(e) => Err(e),
        };
        // The training part has dropped its sender: the recorder writes what is left.
        let report = recorder.await.unwrap_or_default();
        tracing::info!(
            rows = report.rows,
            checkpoints = report.checkpoints,
            unregistered = report.unregistered,
            "recorder finished"
        );
        conclude(outcome, self.hold.is_lost(), self.hold.is_cancelled())
    }

    /// Records the attempt's world (size and each rank's device) once its ranks have
    /// met; a failure to record it is logged, never worth the attempt.
    fn record_world(
        &self,
        joined: tokio::sync::oneshot::Receiver<training::Joined>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let leased = self.hold.leased().clone();
        async move {
            let Ok(world) = joined.await else { return };
            tracing::info!(size = world.size, devices = ?world.devices, "ranks joined");
            let world = RunWorld {
                size: world.size as i64,
                devices: world.devices,
            };
            if let Err(e) = leased.record_world(&world).await {
                tracing::warn!(error = %e, "the attempt's world was not recorded");
            }
        }
    }

    /// The training part's job: the run's config and dataset (checked against what was
    /// queued), and its training states, newest first, after tidying its folder.
    async fn prepare(
        &self,
        events: UnboundedSender<Event>,
        step: Arc<AtomicI64>,
    ) -> Result<TrainJob> {
        let (run, worker) = (&self.run, self.worker);
        let (config, folder) = resolve::claimed_run(run).await?;
        let registered = worker.registry.list_checkpoints(run.id).await?;
        // Files of attempts that are over and never registered, and temp files of
        // writes a crash cut short: this worker holds the lease, nobody else may write.
        let removed = worker.store.tidy_run(run.id, &registered).await?;
        if !removed.is_empty() {
            tracing::info!(files = ?removed, "removed what ended attempts left in the store");
        }
        let mut states: Vec<_> = registered
            .into_iter()
            .filter(|c| c.kind == CheckpointKind::State)
            .collect();
        states.sort_by_key(|c| std::cmp::Reverse((c.step, c.id)));
        Ok(TrainJob {
            run_id: run.id,
            class_names: folder.class_names,
            items: folder.items,
            config,
            device: worker.device,
            store: worker.store.clone(),
            states,
            events,
            stop: self.hold.stop_token(),
            lost: self.hold.lost_flag(),
            step,
            holds_lease: self.hold.checker(),
            progress: worker.progress,
        })
    }

    /// Records `ending` in the registry, once: the last step (with a heartbeat), then the
    /// run's final status, or its deferral. [`RunEnd::Lost`], and nothing written, when
    /// another worker holds the run now.
    async fn end(&self, ending: Ending) -> Result<RunEnd> {
        let (status, error, end) = match ending {
            Ending::Lost => {
                tracing::warn!("run taken over by another worker: this one wrote nothing more");
                return Ok(RunEnd::Lost);
            }
            Ending::Failed(e) if e.is_transient() => return self.defer(&e).await,
            Ending::Crashed(e) => {
                let message = e.to_string();
                tracing::warn!(error = %message, "a rank failed: the run is interrupted and resumes; this counts as a crash");
                let crashed = self.hold.leased().crashed(&message).await;
                return self.recorded(crashed, RunEnd::Crashed(message));
            }
            Ending::Failed(e) => {
                tracing::error!(error = %e, "run failed");
                let message = e.to_string();
                (
                    FinalStatus::Failed,
                    Some(message.clone()),
                    RunEnd::Failed(message),
                )
            }
            Ending::Completed { step } => {
                self.hold.beat(step).await;
                tracing::info!(step, "run completed");
                (FinalStatus::Completed, None, RunEnd::Completed)
            }
            Ending::Interrupted { step } => {
                self.hold.beat(step).await;
                tracing::info!(step, "run interrupted; it resumes from this step");
                (FinalStatus::Interrupted, None, RunEnd::Interrupted)
            }
            Ending::Cancelled { step } => {
                if let Some(step) = step {
                    self.hold.beat(step).await;
                }
                tracing::info!(step, "run cancelled; its last state is kept");
                (FinalStatus::Cancelled, None, RunEnd::Cancelled)
            }
        };
        let finished = self.hold.leased().finish(status, error.as_deref()).await;
        self.recorded(finished, end)
    }

    /// Puts the run back with a backoff for an error that may pass (see
    /// [`TrainerError::is_transient`]), its history kept.
    async fn defer(&self, e: &TrainerError) -> Result<RunEnd> {
        let message = e.to_string();
        let delay = retry_delay(self.worker.retry_backoff, self.run.attempts);
        tracing::warn!(error = %message, ?delay, "run deferred: the failure may pass; it is retried");
        let deferred = self.hold.leased().defer(&message, delay).await;
        self.recorded(deferred, RunEnd::Deferred(message))
    }

    /// `end`, once the write that records it went through; [`RunEnd::Lost`] when it
    /// was refused because another worker holds the run now.
    fn recorded(&self, write: Result<(), RegistryError>, end: RunEnd) -> Result<RunEnd> {
        match write {
            Ok(()) => Ok(end),
            Err(e) if self.hold.lost_by(&e) => Ok(RunEnd::Lost),
            Err(e) => Err(e.into()),
        }
    }
}

/// Why a claimed run ends without being trained: cancelled while no worker held it
/// (nothing to save), or it crashed its workers more than `max_crashes` times.
fn refusal(run: &Run, max_crashes: i64) -> Option<Ending> {
    if run.cancel_requested_at.is_some() {
        return Some(Ending::Cancelled { step: None });
    }
    (run.crashes > max_crashes).then(|| {
        Ending::Failed(TrainerError::CrashLoop {
            crashes: run.crashes,
            step: run.current_step,
            max_crashes,
        })
    })
}

/// How the attempt ended, decided in one place: a lost lease outweighs everything
/// (nothing more may be written), and a stop asked for by an operator is a cancel.
fn conclude(outcome: Result<LoopEnd>, lost: bool, cancelled: bool) -> Ending {
    match outcome {
        _ if lost => Ending::Lost,
        Ok(LoopEnd::Lost { .. }) => Ending::Lost,
        Ok(LoopEnd::Completed { step }) => Ending::Completed { step },
        Ok(LoopEnd::Interrupted { step }) if cancelled => Ending::Cancelled { step: Some(step) },
        Ok(LoopEnd::Interrupted { step }) => Ending::Interrupted { step },
        Err(e @ TrainerError::Collective(_)) => Ending::Crashed(e),
        Err(e) => Ending::Failed(e),
    }
}

/// Aborts a background task when dropped: the heartbeat ends with the attempt on every
/// path out of it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
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

    fn stopped_by_error() -> Result<LoopEnd> {
        Err(TrainerError::Loader("the data loader stopped".into()))
    }

    #[test]
    fn a_lost_lease_outweighs_how_the_loop_ended() {
        for outcome in [
            Ok(LoopEnd::Completed { step: 9 }),
            Ok(LoopEnd::Interrupted { step: 9 }),
            stopped_by_error(),
        ] {
            assert!(matches!(conclude(outcome, true, true), Ending::Lost));
        }
        let lost_in_loop = conclude(Ok(LoopEnd::Lost { step: 9 }), false, false);
        assert!(matches!(lost_in_loop, Ending::Lost));
    }

    #[test]
    fn a_stop_is_a_cancel_only_when_an_operator_asked() {
        let interrupted =
            |cancelled| conclude(Ok(LoopEnd::Interrupted { step: 7 }), false, cancelled);
        assert!(matches!(
            interrupted(false),
            Ending::Interrupted { step: 7 }
        ));
        assert!(matches!(
            interrupted(true),
            Ending::Cancelled { step: Some(7) }
        ));
        let completed = conclude(Ok(LoopEnd::Completed { step: 9 }), false, true);
        assert!(matches!(completed, Ending::Completed { step: 9 }));
        let crashed = conclude(
            Err(TrainerError::Collective(ddpm_dist::DistError::Launch(
                "x".into(),
            ))),
            false,
            false,
        );
        assert!(matches!(crashed, Ending::Crashed(_)));
        let failed = conclude(stopped_by_error(), false, true);
        assert!(matches!(failed, Ending::Failed(TrainerError::Loader(_))));
    }
}
