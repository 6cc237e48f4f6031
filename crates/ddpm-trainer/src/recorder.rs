//! The async side of a run: the recorder that writes what the training thread reports
//! (metric rows in batches, checkpoint registrations, retention) and the heartbeat. Every
//! write goes through the run's lease: once it is gone (another worker claimed the run)
//! they set `lost`, which stops the training thread, and write nothing more.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicI64, Ordering},
        Arc,
    },
    time::Duration,
};

use ddpm_registry::{
    failpoint, CheckpointKind, CheckpointStore, LeasedRun, MetricPoint, RegistryError, ScoreValues,
    StoredFile,
};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::sync::CancellationToken;

use crate::train::Event;

/// Rows buffered before a write; a tick writes whatever is buffered.
const FLUSH_ROWS: usize = 64;
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Attempts at a write that must happen (truncation before new rows, the last flush,
/// the last registrations).
const ATTEMPTS: u32 = 30;

/// Where the recorder writes.
#[derive(Clone)]
pub struct Sink {
    pub leased: LeasedRun,
    pub store: CheckpointStore,
    pub keep_last: usize,
    /// Set when a write finds the lease gone.
    pub lost: Arc<AtomicBool>,
}

impl Sink {
    fn run_id(&self) -> i64 {
        self.leased.run_id()
    }

    /// Whether `e` means the lease is gone; sets `lost` if so.
    fn check_lost(&self, e: &RegistryError) -> bool {
        if matches!(e, RegistryError::ClaimLost { .. }) {
            if !self.lost.swap(true, Ordering::Relaxed) {
                tracing::error!(error = %e, "lost the run to another worker: writing nothing more");
            }
            true
        } else {
            false
        }
    }

    fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }
}

/// What the recorder did, for the end-of-run log.
#[derive(Debug, Default, Clone, Copy)]
pub struct RecorderReport {
    pub rows: usize,
    pub checkpoints: usize,
    /// Rows that could not be written (the registry was unreachable to the end, or
    /// the lease was lost).
    pub lost_rows: usize,
    /// Checkpoints written but not registered (same reasons); the next attempt's
    /// tidying removes their files.
    pub unregistered: usize,
}

/// A checkpoint's files, durable, waiting for their registration.
struct Written {
    step: i64,
    ema: StoredFile,
    state: StoredFile,
    score: Option<ScoreValues>,
}

/// Records events until the training thread drops its sender, then flushes. A
/// registration that fails is retried at every tick (after the metric rows before it),
/// and to the end; retention only ever follows a successful registration.
pub async fn record(sink: Sink, mut events: UnboundedReceiver<Event>) -> RecorderReport {
    let mut pending: Vec<MetricPoint> = Vec::new();
    let mut written: Vec<Written> = Vec::new();
    let mut report = RecorderReport::default();
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(Event::Started { step }) => {
                    flush(&sink, &mut pending, &mut report, ATTEMPTS).await;
                    truncate(&sink, step).await;
                }
                Some(Event::Metrics(point)) => {
                    pending.push(point);
                    if pending.len() >= FLUSH_ROWS {
                        flush(&sink, &mut pending, &mut report, 1).await;
                    }
                }
                Some(Event::Checkpoint { step, ema, state, score }) => {
                    written.push(Written { step, ema, state, score });
                    register_written(&sink, &mut pending, &mut written, &mut report, 1).await;
                }
                None => break,
            },
            _ = tick.tick() => {
                flush(&sink, &mut pending, &mut report, 1).await;
                register_written(&sink, &mut pending, &mut written, &mut report, 1).await;
            }
        }
    }
    register_written(&sink, &mut pending, &mut written, &mut report, ATTEMPTS).await;
    flush(&sink, &mut pending, &mut report, ATTEMPTS).await;
    report.lost_rows = pending.len();
    report.unregistered = written.len();
    if !pending.is_empty() {
        tracing::error!(rows = pending.len(), "metric rows could not be recorded");
    }
    if !written.is_empty() {
        tracing::error!(
            checkpoints = written.len(),
            "checkpoints could not be registered; the next attempt removes their files"
        );
    }
    report
}

/// Registers the written checkpoints in order, each after the metric rows up to it;
/// stops at the first that fails (a later one must not get ahead of it).
async fn register_written(
    sink: &Sink,
    pending: &mut Vec<MetricPoint>,
    written: &mut Vec<Written>,
    report: &mut RecorderReport,
    attempts: u32,
) {
    while let Some(next) = written.first() {
        if sink.is_lost() {
            return;
        }
        // Rows up to the checkpoint land before it is registered: a registered state
        // never has a gap in the series before it.
        let (before, after): (Vec<MetricPoint>, Vec<MetricPoint>) =
            pending.drain(..).partition(|p| p.step <= next.step);
        let mut rows = before;
        flush(sink, &mut rows, report, attempts).await;
        let flushed = rows.is_empty();
        rows.extend(after);
        *pending = rows;
        if !flushed {
            return;
        }
        let mut registered = false;
        for attempt in 1..=attempts {
            match register(sink, next).await {
                Ok(()) => {
                    registered = true;
                    break;
                }
                Err(e) if sink.check_lost(&e) => return,
                Err(e) => {
                    tracing::warn!(step = next.step, error = %e, attempt, "registering a checkpoint failed; will retry");
                    if attempt < attempts {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }
        if !registered {
            return;
        }
        report.checkpoints += 1;
        written.remove(0);
    }
}

async fn flush(
    sink: &Sink,
    pending: &mut Vec<MetricPoint>,
    report: &mut RecorderReport,
    attempts: u32,
) {
    if pending.is_empty() || sink.is_lost() {
        return;
    }
    for attempt in 1..=attempts {
        match sink.leased.record_metrics(pending).await {
            Ok(()) => {
                failpoint::hit("recorder.metrics_written");
                report.rows += pending.len();
                pending.clear();
                return;
            }
            Err(e) if sink.check_lost(&e) => return,
            Err(e) => {
                tracing::warn!(error = %e, rows = pending.len(), attempt, "recording metrics failed; will retry");
                if attempt < attempts {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

/// Deletes the rows after `step` (left by an abandoned attempt); retried, because a row
/// written before it succeeds would be deleted or duplicate a replayed step.
async fn truncate(sink: &Sink, step: i64) {
    for attempt in 1..=ATTEMPTS {
        match sink.leased.truncate_metrics_after(step).await {
            Ok(deleted) => {
                if deleted > 0 {
                    tracing::info!(
                        deleted,
                        after = step,
                        "removed metric rows of the abandoned attempt"
                    );
                }
                return;
            }
            Err(e) if sink.check_lost(&e) => return,
            Err(e) => {
                tracing::warn!(error = %e, attempt, "truncating metrics failed; will retry");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Registers one checkpoint (EMA, then state) and applies retention, under the lease.
async fn register(sink: &Sink, w: &Written) -> Result<(), RegistryError> {
    let (store, leased, id) = (&sink.store, &sink.leased, sink.run_id());
    // The score in the same transaction as the row: whoever sees the checkpoint sees it.
    let ema = w.ema.checkpoint(id, w.step, CheckpointKind::Ema)?;
    leased
        .register_scored_checkpoint(&ema, w.score.as_ref())
        .await?;
    failpoint::hit("recorder.ema_registered");
    store
        .register(leased, id, w.step, CheckpointKind::State, &w.state)
        .await?;
    let deleted = store.apply_retention(leased, id, sink.keep_last).await?;
    if !deleted.is_empty() {
        tracing::debug!(count = deleted.len(), "old checkpoints deleted");
    }
    Ok(())
}

/// Sends a heartbeat with the current step every `interval` until aborted. Sets `lost`
/// (and stops) when the run is no longer this worker's; cancels `cancel` when an
/// operator asked the run to stop.
pub async fn heartbeat(
    leased: LeasedRun,
    step: Arc<AtomicI64>,
    lost: Arc<AtomicBool>,
    cancel: CancellationToken,
    interval: Duration,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match leased.heartbeat(step.load(Ordering::Relaxed)).await {
            Ok(beat) => {
                if beat.cancel_requested && !cancel.is_cancelled() {
                    tracing::info!("an operator cancelled the run: saving and stopping");
                    cancel.cancel();
                }
            }
            Err(e @ RegistryError::ClaimLost { .. }) => {
                tracing::error!(error = %e, "lost the run to another worker: stopping without saving");
                lost.store(true, Ordering::Relaxed);
                return;
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
        }
    }
}
