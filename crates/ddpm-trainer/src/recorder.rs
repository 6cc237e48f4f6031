//! The async side of a run: the recorder that writes what the training thread reports
//! (metric rows in batches, checkpoint registrations, retention). Every write goes
//! through the attempt's [`LeaseHold`]: once the lease is gone (another worker claimed
//! the run) the hold is marked lost, which stops the training thread, and nothing more
//! is written.

use std::{future::Future, time::Duration};

use ddpm_registry::{
    failpoint, CheckpointKind, CheckpointStore, MetricPoint, RegistryError, ScoreValues, StoredFile,
};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::{lease::LeaseHold, train::Event};

/// Rows buffered before a write; a tick writes whatever is buffered.
const FLUSH_ROWS: usize = 64;
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Attempts at a write that must happen (truncation before new rows, the last flush,
/// the last registrations).
const ATTEMPTS: u32 = 30;
/// The pause between two attempts at a write.
const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// How old an object without a row must be before reconciliation removes it during an
/// attempt: far longer than a write and its registration take, so that only the objects
/// of ended attempts and of zombie workers (a worker that lost its lease and wrote on)
/// go. Compared with the store's clock (S3's `Last-Modified`), so it also absorbs
/// modest clock skew between hosts.
const RECONCILE_GRACE: Duration = Duration::from_secs(10 * 60);

/// Where the recorder writes.
#[derive(Clone)]
pub struct Sink {
    pub hold: LeaseHold,
    pub store: CheckpointStore,
    pub keep_last: usize,
}

impl Sink {
    fn run_id(&self) -> i64 {
        self.hold.leased().run_id()
    }

    /// Runs `write` until it succeeds, at most `attempts` times, [`RETRY_PAUSE`] apart.
    /// `None` when every attempt failed, or at once when the lease is gone (or was
    /// already). `what` names the write in the warnings.
    async fn retry<T, F, Fut>(&self, what: &str, attempts: u32, mut write: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, RegistryError>>,
    {
        for attempt in 1..=attempts {
            if self.hold.is_lost() {
                return None;
            }
            match write().await {
                Ok(done) => return Some(done),
                Err(e) if self.hold.lost_by(&e) => return None,
                Err(e) => {
                    tracing::warn!(error = %e, attempt, attempts, "{what} failed");
                    if attempt < attempts {
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                }
            }
        }
        None
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
/// and to the end. Retention follows every registration, and the (re)start.
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
                    // What the abandoned attempt registered but did not prune (it died in
                    // between); a run resumed at its last step registers nothing more.
                    sink.retry("retention", 1, || retain(&sink, &[])).await;
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
        // Rows up to the checkpoint land before it is registered: a registered state
        // never has a gap in the series before it.
        let (before, after): (Vec<MetricPoint>, Vec<MetricPoint>) =
            pending.drain(..).partition(|p| p.step <= next.step);
        let mut rows = before;
        flush(sink, &mut rows, report, attempts).await;
        let flushed = rows.is_empty();
        rows.extend(after);
        *pending = rows;
        if !flushed
            || sink
                .retry("registering a checkpoint", attempts, || {
                    register(sink, next)
                })
                .await
                .is_none()
        {
            return;
        }
        // Retention and reconciliation are housekeeping: a failure (the store away) is
        // logged and caught up after the next registration, and never holds one back.
        // What was written and waits for its turn must stay.
        let waiting: Vec<&str> = written[1..]
            .iter()
            .flat_map(|w| [w.ema.path.as_str(), w.state.path.as_str()])
            .collect();
        sink.retry("retention", 1, || retain(sink, &waiting)).await;
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
    if pending.is_empty() {
        return;
    }
    let rows: &[MetricPoint] = pending;
    let recording = || sink.hold.leased().record_metrics(rows);
    if sink
        .retry("recording metrics", attempts, recording)
        .await
        .is_some()
    {
        failpoint::hit("recorder.metrics_written");
        report.rows += pending.len();
        pending.clear();
    }
}

/// Deletes the rows after `step` (left by an abandoned attempt); retried, because a row
/// written before it succeeds would be deleted or duplicate a replayed step.
async fn truncate(sink: &Sink, step: i64) {
    let truncating = || sink.hold.leased().truncate_metrics_after(step);
    if let Some(deleted @ 1..) = sink.retry("truncating metrics", ATTEMPTS, truncating).await {
        tracing::info!(
            deleted,
            after = step,
            "removed metric rows of the abandoned attempt"
        );
    }
}

/// Registers one checkpoint (EMA, then state), under the lease.
async fn register(sink: &Sink, w: &Written) -> Result<(), RegistryError> {
    let (store, leased, id) = (&sink.store, sink.hold.leased(), sink.run_id());
    // The score in the same transaction as the row: whoever sees the checkpoint sees it.
    let ema = w.ema.checkpoint(id, w.step, CheckpointKind::Ema)?;
    leased
        .register_scored_checkpoint(&ema, w.score.as_ref())
        .await?;
    failpoint::hit("recorder.ema_registered");
    store
        .register(leased, id, w.step, CheckpointKind::State, &w.state)
        .await?;
    Ok(())
}

/// Applies retention under the lease (of each kind the `keep_last` newest stay), then
/// reconciles the run's folder with its rows: objects without a row older than
/// [`RECONCILE_GRACE`] go, except `waiting` (written by this attempt, not yet
/// registered).
async fn retain(sink: &Sink, waiting: &[&str]) -> Result<(), RegistryError> {
    let (leased, id) = (sink.hold.leased(), sink.run_id());
    let deleted = sink
        .store
        .apply_retention(leased, id, sink.keep_last)
        .await?;
    if !deleted.is_empty() {
        tracing::debug!(count = deleted.len(), "old checkpoints deleted");
    }
    let registered = leased.registry().list_checkpoints(id).await?;
    let keep: Vec<&str> = registered
        .iter()
        .map(|r| r.path.as_str())
        .chain(waiting.iter().copied())
        .collect();
    let removed = sink.store.reconcile_run(id, &keep, RECONCILE_GRACE).await?;
    if !removed.is_empty() {
        tracing::info!(objects = ?removed, "removed objects no row refers to");
    }
    Ok(())
}
