//! The async side of a run: the recorder that writes what the training thread reports
//! (metric rows in batches, checkpoint registrations, retention) and the heartbeat.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicI64, Ordering},
        Arc,
    },
    time::Duration,
};

use ddpm_registry::{CheckpointKind, CheckpointStore, MetricPoint, Registry, RegistryError};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::train::Event;

/// Rows buffered before a write; a tick writes whatever is buffered.
const FLUSH_ROWS: usize = 64;
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Attempts at a write that must happen (truncation before new rows, the last flush).
const ATTEMPTS: u32 = 30;

/// Where the recorder writes.
#[derive(Clone)]
pub struct Sink {
    pub registry: Registry,
    pub store: CheckpointStore,
    pub run_id: i64,
    pub keep_last: usize,
}

/// What the recorder did, for the end-of-run log.
#[derive(Debug, Default, Clone, Copy)]
pub struct RecorderReport {
    pub rows: usize,
    pub checkpoints: usize,
    /// Rows that could not be written (the registry was unreachable to the end).
    pub lost_rows: usize,
}

/// Records events until the training thread drops its sender, then flushes.
pub async fn record(sink: Sink, mut events: UnboundedReceiver<Event>) -> RecorderReport {
    let mut pending: Vec<MetricPoint> = Vec::new();
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
                Some(Event::Checkpoint { step, ema, state }) => {
                    // Rows up to the checkpoint land before it is registered.
                    flush(&sink, &mut pending, &mut report, 1).await;
                    if register(&sink, step, &ema, &state).await {
                        report.checkpoints += 1;
                    }
                }
                None => break,
            },
            _ = tick.tick() => flush(&sink, &mut pending, &mut report, 1).await,
        }
    }
    flush(&sink, &mut pending, &mut report, ATTEMPTS).await;
    report.lost_rows = pending.len();
    if !pending.is_empty() {
        tracing::error!(rows = pending.len(), "metric rows could not be recorded");
    }
    report
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
    for attempt in 1..=attempts {
        match sink.registry.record_metrics(sink.run_id, pending).await {
            Ok(()) => {
                report.rows += pending.len();
                pending.clear();
                return;
            }
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
        match sink
            .registry
            .truncate_metrics_after(sink.run_id, step)
            .await
        {
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
            Err(e) => {
                tracing::warn!(error = %e, attempt, "truncating metrics failed; will retry");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

async fn register(
    sink: &Sink,
    step: i64,
    ema: &ddpm_registry::StoredFile,
    state: &ddpm_registry::StoredFile,
) -> bool {
    let result: Result<(), RegistryError> = async {
        sink.store
            .register(&sink.registry, sink.run_id, step, CheckpointKind::Ema, ema)
            .await?;
        sink.store
            .register(
                &sink.registry,
                sink.run_id,
                step,
                CheckpointKind::State,
                state,
            )
            .await?;
        let deleted = sink
            .store
            .apply_retention(&sink.registry, sink.run_id, sink.keep_last)
            .await?;
        if !deleted.is_empty() {
            tracing::debug!(count = deleted.len(), "old checkpoints deleted");
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(step, error = %e, "registering a checkpoint failed");
            false
        }
    }
}

/// Sends a heartbeat with the current step every `interval` until aborted; sets `lost`
/// (and stops) when the run is no longer this worker's.
pub async fn heartbeat(
    registry: Registry,
    run_id: i64,
    worker: String,
    step: Arc<AtomicI64>,
    lost: Arc<AtomicBool>,
    interval: Duration,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match registry
            .heartbeat(run_id, &worker, step.load(Ordering::Relaxed))
            .await
        {
            Ok(()) => {}
            Err(e @ RegistryError::ClaimLost { .. }) => {
                tracing::error!(error = %e, "lost the run to another worker: stopping without saving");
                lost.store(true, Ordering::Relaxed);
                return;
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
        }
    }
}
