//! Leases: what a claim hands a worker, and every write the worker makes under it.
//!
//! A claim names the worker in `runs.host` and raises `runs.attempts`; that pair, with
//! the run still `running`, is the lease. Each write through [`LeasedRun`] opens with an
//! `UPDATE runs … WHERE id AND host AND attempts AND status = 'running'` in the write's
//! own transaction (a heartbeat, the attempt's world, a finish, a deferral and a crash
//! are that one statement). Once
//! another worker has claimed the run (this one's heartbeat went stale) or the run was
//! ended, the condition matches no row: nothing is written and the call fails with
//! [`RegistryError::ClaimLost`], and the worker must stop. On PostgreSQL the opening
//! update also locks the row until the write commits, so no claim slips in between the
//! check and the write; on SQLite it takes the database's write lock, with the same
//! effect.

use std::time::Duration;

use sqlx::{Any, Transaction};

use crate::checkpoints::{delete_by_id, register_in, validate, CheckpointRecord, NewCheckpoint};
use crate::db::Registry;
use crate::error::{RegistryError, Result};
use crate::metrics::{delete_metrics_after, record_in, MetricPoint};
use crate::runs::{FinalStatus, Run, RunStatus, RunWorld};
use crate::scores::{upsert_score, ScoreValues};

/// A worker's hold on a running run: granted by a claim, lost to a later claim or the
/// run's end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub run_id: i64,
    /// The claiming worker's unique name (`host:pid:instance`).
    pub worker: String,
    /// The run's `attempts` after the claim: every claim makes a new one.
    pub attempt: i64,
}

impl Lease {
    /// The lease a claim returned `run` under. Fails with
    /// [`RegistryError::InvalidArgument`] for a run that is not running for a worker.
    pub fn of(run: &Run) -> Result<Lease> {
        match (&run.host, run.status) {
            (Some(worker), RunStatus::Running) => Ok(Lease {
                run_id: run.id,
                worker: worker.clone(),
                attempt: run.attempts,
            }),
            _ => Err(RegistryError::InvalidArgument(format!(
                "run {} is {} without a worker: it has no lease",
                run.id, run.status
            ))),
        }
    }
}

/// What a heartbeat learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Beat {
    /// An operator asked the run to stop (`runs cancel`): save a state and
    /// [`finish`](LeasedRun::finish) it as cancelled.
    pub cancel_requested: bool,
}

/// A run's registry as its lease holder may write it. Cloning is cheap.
#[derive(Debug, Clone)]
pub struct LeasedRun {
    registry: Registry,
    lease: Lease,
}

/// The lease condition on `runs`; binds `$1` id, `$2` worker, `$3` attempt.
const HELD: &str = "id = $1 AND host = $2 AND attempts = $3 AND status = 'running'";

impl Registry {
    /// The registry as the holder of `lease` writes it.
    pub fn leased(&self, lease: Lease) -> LeasedRun {
        LeasedRun {
            registry: self.clone(),
            lease,
        }
    }
}

impl LeasedRun {
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    pub fn run_id(&self) -> i64 {
        self.lease.run_id
    }

    /// The registry underneath, for reads (which need no lease).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    fn lost(&self) -> RegistryError {
        RegistryError::ClaimLost {
            id: self.lease.run_id,
            host: self.lease.worker.clone(),
        }
    }

    /// A transaction that holds the lease (see the module doc); `ClaimLost` when gone.
    async fn begin(&self) -> Result<Transaction<'static, Any>> {
        let mut tx = self.registry.pool.begin().await?;
        let sql = format!(
            "UPDATE runs SET updated_at = {} WHERE {HELD}",
            self.registry.backend.now_ms()
        );
        let held = sqlx::query(&sql)
            .bind(self.lease.run_id)
            .bind(&self.lease.worker)
            .bind(self.lease.attempt)
            .execute(&mut *tx)
            .await?;
        if held.rows_affected() != 1 {
            tx.rollback().await?;
            return Err(self.lost());
        }
        Ok(tx)
    }

    /// Records that the worker is alive at `step`; tells whether an operator asked the
    /// run to stop.
    #[tracing::instrument(skip(self), fields(id = self.lease.run_id))]
    pub async fn heartbeat(&self, step: i64) -> Result<Beat> {
        let now = self.registry.backend.now_ms();
        let sql = format!(
            "UPDATE runs SET current_step = $4, heartbeat_at = {now}, updated_at = {now} \
             WHERE {HELD} RETURNING cancel_requested_at"
        );
        let row: Option<(Option<i64>,)> = sqlx::query_as(&sql)
            .bind(self.lease.run_id)
            .bind(&self.lease.worker)
            .bind(self.lease.attempt)
            .bind(step)
            .fetch_optional(&self.registry.pool)
            .await?;
        match row {
            Some((cancel,)) => Ok(Beat {
                cancel_requested: cancel.is_some(),
            }),
            None => Err(self.lost()),
        }
    }

    /// Records the world this attempt trains on (its rank processes and their devices),
    /// replacing the previous attempt's: the run shows the current attempt's world, not a
    /// history. Called once at the attempt's start (a claim clears the old one).
    /// `InvalidArgument` for a world without one device per rank.
    #[tracing::instrument(skip(self), fields(id = self.lease.run_id))]
    pub async fn record_world(&self, world: &RunWorld) -> Result<()> {
        world.validate()?;
        let now = self.registry.backend.now_ms();
        let sql = format!(
            "UPDATE runs SET world_size = $4, rank_devices = $5, updated_at = {now} \
             WHERE {HELD}"
        );
        let done = sqlx::query(&sql)
            .bind(self.lease.run_id)
            .bind(&self.lease.worker)
            .bind(self.lease.attempt)
            .bind(world.size)
            .bind(serde_json::to_string(&world.devices)?)
            .execute(&self.registry.pool)
            .await?;
        self.held_if(done.rows_affected()).await
    }

    /// [`Registry::record_metrics`] under the lease.
    #[tracing::instrument(skip_all, fields(id = self.lease.run_id, rows = rows.len()))]
    pub async fn record_metrics(&self, rows: &[MetricPoint]) -> Result<()> {
        let mut tx = self.begin().await?;
        record_in(&mut tx, self.lease.run_id, rows).await?;
        tx.commit().await?;
        Ok(())
    }

    /// [`Registry::truncate_metrics_after`] under the lease.
    #[tracing::instrument(skip(self), fields(id = self.lease.run_id))]
    pub async fn truncate_metrics_after(&self, step: i64) -> Result<u64> {
        let mut tx = self.begin().await?;
        let deleted = delete_metrics_after(&mut *tx, self.lease.run_id, step).await?;
        tx.commit().await?;
        Ok(deleted)
    }

    /// [`Registry::register_checkpoint`] under the lease, for a checkpoint of the
    /// leased run only.
    #[tracing::instrument(skip_all, fields(id = self.lease.run_id, step = new.step, kind = %new.kind))]
    pub async fn register_checkpoint(&self, new: &NewCheckpoint) -> Result<CheckpointRecord> {
        self.register_scored_checkpoint(new, None).await
    }

    /// [`register_checkpoint`](Self::register_checkpoint) with the checkpoint's score,
    /// recorded in the same transaction: a server that sees the checkpoint sees its
    /// score (what the `best` policy chooses by). `None` registers it unscored.
    #[tracing::instrument(skip_all, fields(id = self.lease.run_id, step = new.step, kind = %new.kind))]
    pub async fn register_scored_checkpoint(
        &self,
        new: &NewCheckpoint,
        score: Option<&ScoreValues>,
    ) -> Result<CheckpointRecord> {
        validate(new)?;
        if new.run_id != self.lease.run_id {
            return Err(RegistryError::InvalidArgument(format!(
                "the lease on run {} cannot register a checkpoint of run {}",
                self.lease.run_id, new.run_id
            )));
        }
        let mut tx = self.begin().await?;
        let record = register_in(&mut tx, self.registry.backend, new).await?;
        if let Some(score) = score {
            upsert_score(
                &mut *tx,
                self.registry.backend,
                record.run_id,
                record.step,
                record.id,
                score,
            )
            .await?;
        }
        tx.commit().await?;
        Ok(record)
    }

    /// [`Registry::delete_checkpoint`] under the lease (retention).
    #[tracing::instrument(skip(self), fields(run = self.lease.run_id))]
    pub async fn delete_checkpoint(&self, id: i64) -> Result<()> {
        let mut tx = self.begin().await?;
        let deleted = delete_by_id(&mut *tx, id).await?;
        tx.commit().await?;
        match deleted {
            0 => Err(RegistryError::CheckpointNotFound(id)),
            _ => Ok(()),
        }
    }

    /// Ends the run as `status` (completed, failed with `error`, interrupted or
    /// cancelled) and sets `finished_at`; the lease ends with it.
    #[tracing::instrument(skip(self), fields(id = self.lease.run_id))]
    pub async fn finish(&self, status: FinalStatus, error: Option<&str>) -> Result<()> {
        let now = self.registry.backend.now_ms();
        let sql = format!(
            "UPDATE runs SET status = $4, error = $5, finished_at = {now}, updated_at = {now} \
             WHERE {HELD}"
        );
        let done = sqlx::query(&sql)
            .bind(self.lease.run_id)
            .bind(&self.lease.worker)
            .bind(self.lease.attempt)
            .bind(RunStatus::from(status).as_str())
            .bind(error)
            .execute(&self.registry.pool)
            .await?;
        self.held_if(done.rows_affected()).await
    }

    /// Gives the run back for a later attempt: it becomes interrupted (history
    /// untouched) with `reason` as its error, and no claim takes it before `delay` has
    /// passed (a claim clears both). For failures that may pass: a store not mounted
    /// yet, a full disk, a database that went away.
    #[tracing::instrument(skip(self), fields(id = self.lease.run_id))]
    pub async fn defer(&self, reason: &str, delay: Duration) -> Result<()> {
        let delay_ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 2);
        let now = self.registry.backend.now_ms();
        let sql = format!(
            "UPDATE runs SET status = 'interrupted', error = $4, retry_at = {now} + $5, \
                 finished_at = {now}, updated_at = {now} \
             WHERE {HELD}"
        );
        let done = sqlx::query(&sql)
            .bind(self.lease.run_id)
            .bind(&self.lease.worker)
            .bind(self.lease.attempt)
            .bind(reason)
            .bind(delay_ms)
            .execute(&self.registry.pool)
            .await?;
        self.held_if(done.rows_affected()).await
    }

    /// Ends an attempt whose training died under it (a rank process killed or crashed):
    /// the run becomes interrupted (history untouched) with `reason` as its error, may be
    /// claimed again at once (no retry delay), and the crash counts: `crashes` goes up by
    /// one, as when a claim takes a run from a silent worker, so a run that keeps killing
    /// its processes meets the crash cap instead of being resumed forever.
    #[tracing::instrument(skip(self), fields(id = self.lease.run_id))]
    pub async fn crashed(&self, reason: &str) -> Result<()> {
        let now = self.registry.backend.now_ms();
        let sql = format!(
            "UPDATE runs SET status = 'interrupted', error = $4, retry_at = NULL, \
                 crashes = crashes + 1, finished_at = {now}, updated_at = {now} \
             WHERE {HELD}"
        );
        let done = sqlx::query(&sql)
            .bind(self.lease.run_id)
            .bind(&self.lease.worker)
            .bind(self.lease.attempt)
            .bind(reason)
            .execute(&self.registry.pool)
            .await?;
        self.held_if(done.rows_affected()).await
    }

    /// `Ok` when an update under the lease changed its row; `RunNotFound` when the run
    /// is gone, `ClaimLost` otherwise.
    async fn held_if(&self, rows_affected: u64) -> Result<()> {
        if rows_affected == 1 {
            return Ok(());
        }
        match self.registry.get_run(self.lease.run_id).await? {
            None => Err(RegistryError::RunNotFound(self.lease.run_id)),
            Some(_) => Err(self.lost()),
        }
    }
}
