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
//!
//! Which checkpoint is wanted is a [`ServePolicy`] (issue 9): the newest (as before),
//! the best-scored of the candidate run by a [`BestMetric`], never swapping in one whose
//! KID is worse than the serving one's by more than its KID standard deviation, or the
//! promoted one (`ddpm-trainer checkpoints promote`, `POST /v1/checkpoints/{id}/promote`).
//! A promotion and a rollback are announced like a registration, so replicas follow at
//! once on PostgreSQL and at their next poll on SQLite.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use ddpm_registry::{
    Announcements, CheckpointKind, CheckpointRecord, CheckpointScore, CheckpointStore, Registry,
};
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

/// How the checkpoint to serve is chosen (a pinned checkpoint overrides it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ServePolicy {
    /// The newest EMA checkpoint (of the pinned run, if any).
    #[default]
    Newest,
    /// The best-scored EMA checkpoint of the candidate run (the pinned run, else the run
    /// of the newest checkpoint) by `--best-metric`; while none of it is scored, the
    /// newest. Never swaps in one whose KID exceeds the serving one's by more than its
    /// own KID standard deviation.
    Best,
    /// Only the promoted checkpoint (none promoted: nothing is served).
    Promoted,
}

/// What `best` ranks by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum BestMetric {
    /// Lowest KID.
    #[default]
    Kid,
    /// Lowest Fréchet distance.
    Fd,
    /// Highest class accuracy.
    ClassAccuracy,
}

impl BestMetric {
    /// The score's value, oriented so that lower is better.
    fn cost(self, score: &CheckpointScore) -> Option<f64> {
        let v = &score.values;
        match self {
            BestMetric::Kid => v.kid,
            BestMetric::Fd => v.fd,
            BestMetric::ClassAccuracy => v.class_accuracy.map(|a| -a),
        }
    }
}

/// Whether `candidate` may replace `serving` under `best`: not when its KID is worse than
/// the serving one's by more than the candidate's KID standard deviation (the spread of
/// its own estimate). Without both KIDs there is nothing to gate on.
pub fn passes_gate(candidate: &CheckpointScore, serving: Option<&CheckpointScore>) -> bool {
    let (Some(serving), Some(kid)) = (serving.and_then(|s| s.values.kid), candidate.values.kid)
    else {
        return true;
    };
    kid <= serving + candidate.values.kid_std.unwrap_or(0.0)
}

/// What [`Watcher::check_best`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BestOutcome {
    /// The candidate run has no scored checkpoint yet: the newest is served instead.
    Unscored,
    /// The best checkpoint allowed is served already, or none could be swapped in (there
    /// is none, the gate refused them, they failed to load).
    Kept,
    /// This checkpoint was swapped in.
    Swapped(i64),
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
        // An S3 server that does not answer, or refuses (credentials being rotated):
        // the checkpoint is not at fault.
        ServerError::Registry(
            RegistryError::Io { .. }
            | RegistryError::ObjectMissing(_)
            | RegistryError::StoreUnavailable(_)
            | RegistryError::StoreRefused(_),
        )
        | ServerError::Io(_) => true,
        ServerError::Registry(e) => e.is_unavailable(),
        // libtorch failing to place the weights (out of memory on the device) may pass;
        // a file that does not parse as a checkpoint does not.
        ServerError::Core(CoreError::Torch { .. }) => true,
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
    pub policy: ServePolicy,
    pub best_metric: BestMetric,
    /// Checkpoints that failed to load, and when (if ever) to try each again.
    failed: HashMap<i64, Refused>,
    /// The last checkpoint the `best` gate refused (logged once, not at every poll).
    gated: Option<i64>,
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
            policy: ServePolicy::Newest,
            best_metric: BestMetric::Kid,
            failed: HashMap::new(),
            gated: None,
        }
    }

    /// The same watcher choosing by `policy` (ranking by `metric` under `best`).
    pub fn with_policy(mut self, policy: ServePolicy, metric: BestMetric) -> Self {
        self.policy = policy;
        self.best_metric = metric;
        self
    }

    /// Looks for a checkpoint to serve and swaps it in; returns the one now loaded, if it
    /// changed.
    pub async fn check(&mut self) -> Result<Option<i64>, ServerError> {
        let current = self.current.get().map(|m| m.checkpoint.id);
        if current.is_some() && matches!(self.pin, Pin::Checkpoint(_)) {
            return Ok(None);
        }
        if !matches!(self.pin, Pin::Checkpoint(_)) {
            match self.policy {
                ServePolicy::Newest => {}
                ServePolicy::Best => match self.check_best().await? {
                    BestOutcome::Unscored => {}
                    BestOutcome::Kept => return Ok(None),
                    BestOutcome::Swapped(id) => return Ok(Some(id)),
                },
                ServePolicy::Promoted => return self.check_promoted().await,
            }
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

    /// `best`: the ranked candidates, tried in order.
    async fn check_best(&mut self) -> Result<BestOutcome, ServerError> {
        let run = match self.pin {
            Pin::Run(run) => Some(run),
            _ => self
                .registry
                .newest_checkpoint(None, CheckpointKind::Ema)
                .await?
                .map(|c| c.run_id),
        };
        let Some(run) = run else {
            return Ok(BestOutcome::Kept);
        };
        let scores = self.registry.scores(run).await?;
        let checkpoints = self.registry.list_checkpoints(run).await?;
        let mut ranked: Vec<(f64, CheckpointRecord, &CheckpointScore)> = checkpoints
            .into_iter()
            .filter(|c| c.kind == CheckpointKind::Ema)
            .filter_map(|c| {
                let score = scores.iter().find(|s| s.step == c.step)?;
                Some((self.best_metric.cost(score)?, c, score))
            })
            .collect();
        if ranked.is_empty() {
            return Ok(BestOutcome::Unscored);
        }
        // Best first; on a tie the newer one.
        ranked.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.id.cmp(&a.1.id)));
        let serving = self.current.get();
        let serving_score = match &serving {
            Some(m) => {
                let c = &m.checkpoint;
                self.registry.score_at(c.run_id, c.step).await?
            }
            None => None,
        };
        for (_, candidate, score) in ranked {
            if serving.as_ref().map(|m| m.checkpoint.id) == Some(candidate.id) {
                return Ok(BestOutcome::Kept);
            }
            if !passes_gate(score, serving_score.as_ref()) {
                if self.gated != Some(candidate.id) {
                    tracing::warn!(
                        checkpoint = candidate.id,
                        kid = score.values.kid,
                        kid_std = score.values.kid_std,
                        serving_kid = serving_score.as_ref().and_then(|s| s.values.kid),
                        "best checkpoint not swapped in: its KID is worse than the serving one's by more than its standard deviation"
                    );
                    self.gated = Some(candidate.id);
                }
                continue;
            }
            let id = candidate.id;
            if self.may_try(id) && self.try_load(candidate).await {
                return Ok(BestOutcome::Swapped(id));
            }
        }
        Ok(BestOutcome::Kept)
    }

    /// `promoted`: the promotion in force, if it is not what is served.
    async fn check_promoted(&mut self) -> Result<Option<i64>, ServerError> {
        let Some(promotion) = self.registry.current_promotion().await? else {
            if self.current.get().is_none() {
                tracing::debug!("nothing promoted yet: nothing to serve");
            }
            return Ok(None);
        };
        if self.current.get().map(|m| m.checkpoint.id) == Some(promotion.checkpoint_id) {
            return Ok(None);
        }
        let Some(record) = self
            .registry
            .get_checkpoint(promotion.checkpoint_id)
            .await?
        else {
            return Ok(None);
        };
        tracing::info!(
            checkpoint = record.id,
            by = %promotion.promoted_by,
            reason = %promotion.reason,
            "serving the promoted checkpoint"
        );
        if self.may_try(record.id) && self.try_load(record).await {
            return Ok(self.current.get().map(|m| m.checkpoint.id));
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
        let sha256 = record.sha256.clone();
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
        self.trim_cache(sha256).await;
        true
    }

    /// Keeps the cache of a remote store within its bound, keeping `serving`: copies no
    /// row refers to go first. A failure only costs disk space: logged.
    async fn trim_cache(&self, serving: String) {
        if !self.store.is_remote() {
            return;
        }
        let trimmed = match self.registry.checkpoint_hashes().await {
            Ok(live) => self.store.trim_cache(live, serving).await,
            Err(e) => Err(e),
        };
        match trimmed {
            Ok(evicted) if !evicted.is_empty() => {
                tracing::info!(evicted = evicted.len(), "checkpoint cache trimmed")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "checkpoint cache not trimmed"),
        }
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
        let missing = ServerError::Registry(ddpm_registry::RegistryError::ObjectMissing(
            "runs/1/ema-00000001.safetensors".into(),
        ));
        assert!(may_pass(&missing));
        let unreadable = ServerError::Registry(ddpm_registry::RegistryError::Io {
            path: "x".into(),
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        });
        assert!(may_pass(&unreadable));
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
