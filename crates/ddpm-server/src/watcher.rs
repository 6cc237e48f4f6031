//! Model loading and hot swap: finds the checkpoint to serve in the registry, loads and
//! verifies it on a blocking thread, and makes it the current model.
//!
//! The registry is polled every `poll_interval`; on PostgreSQL its announcements
//! ([`ddpm_registry::Announcements`]) trigger a check as soon as a checkpoint is
//! registered (the poll still runs, for announcements lost while the connection was down). A checkpoint that
//! fails to load (missing file, checksum mismatch, corrupt or incompatible weights) is
//! logged, remembered and never retried; the model being served stays.

use std::{collections::HashSet, sync::Arc, time::Duration};

use ddpm_registry::{Announcements, CheckpointKind, CheckpointRecord, CheckpointStore, Registry};
use tch::Device;
use tokio_util::sync::CancellationToken;

use crate::{
    error::ServerError,
    metrics::ModelMetrics,
    model::{CurrentModel, LoadedModel},
};

/// Which checkpoint to serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pin {
    /// The newest EMA checkpoint of any run.
    Newest,
    /// The newest EMA checkpoint of this run.
    Run(i64),
    /// Exactly this checkpoint, never swapped.
    Checkpoint(i64),
}

/// Most runs looked at when searching for an older usable checkpoint.
const FALLBACK_RUNS: i64 = 1000;

pub struct Watcher {
    pub registry: Registry,
    pub store: CheckpointStore,
    pub device: Device,
    pub pin: Pin,
    pub current: CurrentModel,
    pub metrics: ModelMetrics,
    /// Checkpoints that failed to load: never tried again.
    failed: HashSet<i64>,
}

impl Watcher {
    pub fn new(
        registry: Registry,
        store: CheckpointStore,
        device: Device,
        pin: Pin,
        current: CurrentModel,
        metrics: ModelMetrics,
    ) -> Self {
        Watcher {
            registry,
            store,
            device,
            pin,
            current,
            metrics,
            failed: HashSet::new(),
        }
    }

    /// Looks for a checkpoint to serve and swaps it in; returns the one now loaded, if it
    /// changed.
    pub async fn check(&mut self) -> Result<Option<i64>, ServerError> {
        let current = self.current.get().map(|m| m.checkpoint.id);
        if current.is_some() && matches!(self.pin, Pin::Checkpoint(_)) {
            return Ok(None);
        }
        let newest = match self.pin {
            Pin::Newest => {
                self.registry
                    .newest_checkpoint(None, CheckpointKind::Ema)
                    .await?
            }
            Pin::Run(run) => {
                self.registry
                    .newest_checkpoint(Some(run), CheckpointKind::Ema)
                    .await?
            }
            Pin::Checkpoint(id) => self
                .registry
                .get_checkpoint(id)
                .await?
                .filter(|c| c.kind == CheckpointKind::Ema),
        };
        let Some(newest) = newest else {
            if current.is_none() {
                tracing::debug!(pin = ?self.pin, "no checkpoint to serve yet");
            }
            return Ok(None);
        };
        if Some(newest.id) == current {
            return Ok(None);
        }
        if !self.failed.contains(&newest.id) && self.try_load(newest).await {
            return Ok(self.current.get().map(|m| m.checkpoint.id));
        }
        if current.is_some() || matches!(self.pin, Pin::Checkpoint(_)) {
            return Ok(None);
        }
        // Nothing served yet and the newest is unusable: fall back to older ones.
        for candidate in self.older_candidates().await? {
            if !self.failed.contains(&candidate.id) && self.try_load(candidate).await {
                return Ok(self.current.get().map(|m| m.checkpoint.id));
            }
        }
        Ok(None)
    }

    /// Every EMA checkpoint the pin allows, newest first.
    async fn older_candidates(&self) -> Result<Vec<CheckpointRecord>, ServerError> {
        let runs = match self.pin {
            Pin::Run(run) => vec![run],
            _ => self
                .registry
                .list_runs(None, FALLBACK_RUNS, 0)
                .await?
                .into_iter()
                .map(|r| r.id)
                .collect(),
        };
        let mut all = Vec::new();
        for run in runs {
            all.extend(
                self.registry
                    .list_checkpoints(run)
                    .await?
                    .into_iter()
                    .filter(|c| c.kind == CheckpointKind::Ema),
            );
        }
        all.sort_by_key(|c| std::cmp::Reverse(c.id));
        Ok(all)
    }

    /// Loads `record` off the async runtime; on success it becomes the current model.
    async fn try_load(&mut self, record: CheckpointRecord) -> bool {
        let (store, device, id) = (self.store.clone(), self.device, record.id);
        tracing::info!(checkpoint = id, run = record.run_id, step = record.step, path = %record.path, "loading checkpoint");
        let started = std::time::Instant::now();
        let outcome =
            tokio::task::spawn_blocking(move || LoadedModel::load(&store, &record, device)).await;
        let loaded = match outcome {
            Ok(Ok(model)) => model,
            Ok(Err(e)) => return self.refuse(id, &e.to_string()),
            Err(e) => return self.refuse(id, &format!("the loading thread failed: {e}")),
        };
        let info = loaded.info();
        let previous = self.current.set(Arc::new(loaded));
        self.metrics.step.set(info.step);
        self.metrics.run.set(info.run_id);
        self.metrics.checkpoint.set(info.checkpoint_id);
        self.metrics.swaps.inc();
        tracing::info!(
            checkpoint = info.checkpoint_id,
            run = info.run_id,
            step = info.step,
            previous = previous.map(|p| p.checkpoint.id),
            device = %info.device,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "model swapped in"
        );
        true
    }

    fn refuse(&mut self, id: i64, error: &str) -> bool {
        tracing::warn!(checkpoint = id, %error, "checkpoint refused: keeping the current model");
        self.failed.insert(id);
        self.metrics.load_failures.inc();
        false
    }

    /// Checks every `poll` and whenever the registry announces a checkpoint (PostgreSQL),
    /// until `shutdown`.
    pub async fn run(mut self, poll: Duration, shutdown: CancellationToken) {
        // A pinned checkpoint never changes: no LISTEN connection for it.
        let mut announcements = match self.pin {
            Pin::Checkpoint(_) => None,
            _ => Some(self.registry.announcements().await),
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(poll) => {}
                _ = announced(&mut announcements) => tracing::debug!("checkpoint announced"),
            }
            if let Err(e) = self.check().await {
                tracing::warn!(error = %e, "checking the registry for checkpoints failed");
            }
        }
    }
}

/// The next announcement, or never when there are none to listen for.
async fn announced(announcements: &mut Option<Announcements>) {
    match announcements {
        Some(a) => a.next().await,
        None => std::future::pending().await,
    }
}
