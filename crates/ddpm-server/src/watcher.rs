//! Model loading and hot swap: finds the checkpoint to serve in the registry, loads and
//! verifies it on a blocking thread, and makes it the current model.
//!
//! The registry is polled every `poll_interval`; on PostgreSQL its announcements
//! ([`ddpm_registry::Announcements`]) trigger a check as soon as a checkpoint is
//! registered (the poll still runs, for announcements lost while the connection was
//! down). A checkpoint that fails to load is logged and the model being served stays. A
//! corrupt or incompatible one (checksum mismatch, unparsable, contradicting its record)
//! is never tried again; one that failed for a reason that may pass (its file missing or
//! unreadable, the store not mounted, an out-of-memory on the device) is tried again after
//! a backoff: [`RETRY_FIRST`] doubling per failure, up to [`RETRY_MAX`].

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

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

/// The first wait before a checkpoint that failed for a reason that may pass is tried
/// again; it doubles with each failure, up to [`RETRY_MAX`].
pub const RETRY_FIRST: Duration = Duration::from_secs(2);
pub const RETRY_MAX: Duration = Duration::from_secs(300);

/// Why a checkpoint is not tried now.
#[derive(Debug, Clone, Copy)]
enum Refused {
    /// Corrupt or incompatible: never again.
    ForGood,
    /// Failed `failures` times for reasons that may pass; not before `retry_at`.
    Until { retry_at: Instant, failures: u32 },
}

/// Whether a load failure may pass by itself (retry later) or not (never retry).
fn may_pass(error: &ServerError) -> bool {
    use ddpm_core::CoreError;
    use ddpm_registry::RegistryError;
    match error {
        // A file that is not there or not readable (yet): a store not mounted, a copy
        // in progress. A checksum mismatch is corruption: for good.
        ServerError::Registry(RegistryError::Io { .. }) | ServerError::Io(_) => true,
        ServerError::Registry(e) => e.is_unavailable(),
        // libtorch failing to place the weights (out of memory on the device) may pass;
        // a file that does not parse as a checkpoint does not.
        ServerError::Core(CoreError::Io { .. } | CoreError::Torch(_)) => true,
        _ => false,
    }
}

pub struct Watcher {
    pub registry: Registry,
    pub store: CheckpointStore,
    pub device: Device,
    pub pin: Pin,
    pub current: CurrentModel,
    pub metrics: ModelMetrics,
    /// Checkpoints that failed to load, and when (if ever) to try each again.
    failed: HashMap<i64, Refused>,
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
            failed: HashMap::new(),
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
        if self.may_try(newest.id) && self.try_load(newest).await {
            return Ok(self.current.get().map(|m| m.checkpoint.id));
        }
        if current.is_some() || matches!(self.pin, Pin::Checkpoint(_)) {
            return Ok(None);
        }
        // Nothing served yet and the newest is unusable: fall back to older ones.
        for candidate in self.older_candidates().await? {
            if self.may_try(candidate.id) && self.try_load(candidate).await {
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
            Ok(Err(e)) => return self.refuse(id, &e.to_string(), may_pass(&e)),
            // A panic while loading (libtorch aborting an op): may pass, like an OOM.
            Err(e) => return self.refuse(id, &format!("the loading thread failed: {e}"), true),
        };
        self.failed.remove(&id);
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

    /// Whether checkpoint `id` may be tried now.
    fn may_try(&self, id: i64) -> bool {
        match self.failed.get(&id) {
            None => true,
            Some(Refused::ForGood) => false,
            Some(Refused::Until { retry_at, .. }) => Instant::now() >= *retry_at,
        }
    }

    /// Records a failed load; `false`, for `try_load` to return.
    fn refuse(&mut self, id: i64, error: &str, may_pass: bool) -> bool {
        self.metrics.load_failures.inc();
        if !may_pass {
            tracing::warn!(checkpoint = id, %error, "checkpoint refused for good: keeping the current model");
            self.failed.insert(id, Refused::ForGood);
            return false;
        }
        let failures = match self.failed.get(&id) {
            Some(Refused::Until { failures, .. }) => failures + 1,
            _ => 1,
        };
        let wait = retry_wait(failures);
        tracing::warn!(checkpoint = id, %error, ?wait, "checkpoint failed to load, for a reason that may pass: keeping the current model, trying again later");
        self.failed.insert(
            id,
            Refused::Until {
                retry_at: Instant::now() + wait,
                failures,
            },
        );
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

/// How long to wait after the `failures`-th failure that may pass.
fn retry_wait(failures: u32) -> Duration {
    RETRY_FIRST
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(RETRY_MAX)
}

/// The next announcement, or never when there are none to listen for.
async fn announced(announcements: &mut Option<Announcements>) {
    match announcements {
        Some(a) => a.next().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_waits_double_up_to_the_cap() {
        let waits: Vec<u64> = (1..=10).map(|f| retry_wait(f).as_secs()).collect();
        assert_eq!(waits, [2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
    }

    #[test]
    fn corruption_is_for_good_and_missing_files_may_pass() {
        let missing = ServerError::Registry(ddpm_registry::RegistryError::Io {
            path: "x".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
        assert!(may_pass(&missing));
        let corrupt = ServerError::Registry(ddpm_registry::RegistryError::ChecksumMismatch {
            path: "x".into(),
            expected: "a".into(),
            actual: "b".into(),
        });
        assert!(!may_pass(&corrupt));
        let incompatible = ServerError::IncompatibleCheckpoint {
            id: 1,
            message: "step".into(),
        };
        assert!(!may_pass(&incompatible));
    }
}
