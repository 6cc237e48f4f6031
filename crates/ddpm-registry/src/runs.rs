//! Runs and the run queue: creation, claiming, heartbeats, finishing, listing.
//!
//! A run's life:
//!
//! ```text
//! queued ──claim──► running ──finish──► completed | failed | interrupted | cancelled
//!   ▲                ▲   │                                  │
//!   │                │   └─ heartbeat stale (crashed worker) ─┤ (deferred: after retry_at)
//!   │                └────────────── claim ◄─────────────────┘
//!   └── restart --from-scratch (operator; `restart` alone makes it interrupted)
//! ```
//!
//! A launcher that starts rank processes itself finds or creates its run by a launch key
//! ([`Registry::find_or_create_launched_run`]) and, when it restarts them, takes the run
//! back at once ([`Registry::claim_relaunched`]): it killed the old holder itself.
//!
//! Claims hand out a [`Lease`](crate::Lease); everything the worker writes afterwards
//! goes through [`LeasedRun`](crate::LeasedRun) and is refused once the lease is gone.
//! The operator's commands (cancel, restart, delete) are in `control.rs`.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{Any, Executor};

use crate::db::{from_millis, from_millis_opt, Backend, Registry};
use crate::error::{RegistryError, Result};

/// Where a run is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// Waiting for a trainer to claim it.
    Queued,
    /// A trainer holds it and sends heartbeats.
    Running,
    /// Trained to its last step.
    Completed,
    /// Stopped by an error (see [`Run::error`]); not resumed automatically.
    Failed,
    /// Stopped on purpose (shutdown) or deferred; resumable from its newest state.
    Interrupted,
    /// Stopped for good by an operator; only a restart brings it back.
    Cancelled,
}

impl RunStatus {
    /// Every status, in life order.
    pub const ALL: [RunStatus; 6] = [
        RunStatus::Queued,
        RunStatus::Running,
        RunStatus::Completed,
        RunStatus::Failed,
        RunStatus::Interrupted,
        RunStatus::Cancelled,
    ];

    /// The name stored in the database and used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::Interrupted => "interrupted",
            RunStatus::Cancelled => "cancelled",
        }
    }
}

/// How a run ends: the statuses [`LeasedRun::finish`](crate::LeasedRun::finish) takes, so
/// that ending a run as queued or running does not compile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinalStatus {
    Completed,
    Failed,
    Interrupted,
    Cancelled,
}

impl From<FinalStatus> for RunStatus {
    fn from(status: FinalStatus) -> RunStatus {
        match status {
            FinalStatus::Completed => RunStatus::Completed,
            FinalStatus::Failed => RunStatus::Failed,
            FinalStatus::Interrupted => RunStatus::Interrupted,
            FinalStatus::Cancelled => RunStatus::Cancelled,
        }
    }
}

impl fmt::Display for FinalStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        RunStatus::from(*self).fmt(f)
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RunStatus {
    type Err = RegistryError;

    fn from_str(s: &str) -> Result<Self> {
        RunStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| RegistryError::UnknownStatus(s.to_owned()))
    }
}

/// What it takes to queue a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewRun {
    /// The full training config, enough to repeat the run.
    pub config: serde_json::Value,
    /// The dataset's summary: path, image count, class names.
    pub dataset: serde_json::Value,
    /// Optimiser steps to train for (> 0).
    pub total_steps: i64,
}

/// The processes an attempt trains on: `size` rank processes, rank r on `devices[r]`
/// (`"cuda:0"`, `"cpu"`, …). One process training alone is a world of one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunWorld {
    /// How many rank processes (≥ 1).
    pub size: i64,
    /// Each rank's device, by rank: exactly `size` of them.
    pub devices: Vec<String>,
}

impl RunWorld {
    /// Refuses a world that is empty or whose device list does not have one entry per
    /// rank: the registry stores only worlds it can show as they are.
    pub fn validate(&self) -> Result<()> {
        let ranks = usize::try_from(self.size).ok().filter(|&n| n > 0);
        match ranks {
            Some(n) if n == self.devices.len() => Ok(()),
            _ => Err(RegistryError::InvalidArgument(format!(
                "a world of {} ranks needs one device per rank, got {}",
                self.size,
                self.devices.len()
            ))),
        }
    }

    /// The stored columns (`world_size`, `rank_devices`) read back; both NULL is no
    /// world. Anything else that is not a valid world is the reason it is corrupt.
    fn from_columns(
        size: Option<i64>,
        devices: Option<&str>,
    ) -> std::result::Result<Option<RunWorld>, String> {
        let (size, devices) = match (size, devices) {
            (None, None) => return Ok(None),
            (Some(size), Some(devices)) => (size, devices),
            _ => return Err("world_size and rank_devices must be set together".into()),
        };
        let devices: Vec<String> = serde_json::from_str(devices)
            .map_err(|e| format!("rank_devices is not a JSON array of strings: {e}"))?;
        let world = RunWorld { size, devices };
        world.validate().map_err(|e| e.to_string())?;
        Ok(Some(world))
    }
}

/// A run as the registry records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    pub id: i64,
    pub status: RunStatus,
    /// The full training config it was queued with.
    pub config: serde_json::Value,
    /// The dataset's summary: path, image count, class names.
    pub dataset: serde_json::Value,
    pub total_steps: i64,
    /// The step of the newest heartbeat.
    pub current_step: i64,
    /// The worker that holds the run, or held it last.
    pub host: Option<String>,
    /// How many times the run was claimed: 1 for a run that never had to be
    /// resumed. A climbing count flags a run that keeps crashing its trainer.
    pub attempts: i64,
    /// Why a failed run failed.
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    /// When it was first claimed.
    pub started_at: Option<DateTime<Utc>>,
    /// When it last became completed, failed or interrupted; cleared on resumption.
    pub finished_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    /// The worker's latest sign of life; a running run whose heartbeat is old
    /// has lost its worker.
    pub heartbeat_at: Option<DateTime<Utc>>,
    /// A deferred run (see [`LeasedRun::defer`](crate::LeasedRun::defer)) is not claimed before this;
    /// `None` once claimed again.
    pub retry_at: Option<DateTime<Utc>>,
    /// How many times an attempt died: the run was taken over from a worker whose
    /// heartbeat went stale or that a launcher killed ([`Registry::claim_relaunched`]), or
    /// the attempt ended itself as [`crashed`](crate::LeasedRun::crashed) when a rank
    /// process died. Clean interrupts and deferrals do not count.
    pub crashes: i64,
    /// When an operator asked this running run to stop (`runs cancel`); its worker
    /// then saves a state and ends it as cancelled. Cleared by a restart.
    pub cancel_requested_at: Option<DateTime<Utc>>,
    /// The world (rank processes and their devices) of the newest attempt, recorded by
    /// that attempt ([`LeasedRun::record_world`](crate::LeasedRun::record_world)); `None`
    /// before it has, and from each claim until the new attempt records its own.
    pub world: Option<RunWorld>,
    /// The key a launcher created the run under
    /// ([`Registry::find_or_create_launched_run`]); `None` for a run queued by hand.
    pub launch_key: Option<String>,
}

/// The columns of `runs`, in [`RunRow`]'s order.
pub(crate) const RUN_COLUMNS: &str = "id, status, config, dataset, total_steps, current_step, host, \
     attempts, error, created_at, started_at, finished_at, updated_at, heartbeat_at, retry_at, crashes, \
     cancel_requested_at, world_size, rank_devices, launch_key";

/// A `runs` row as stored (portable types).
#[derive(sqlx::FromRow)]
pub(crate) struct RunRow {
    id: i64,
    status: String,
    config: String,
    dataset: String,
    total_steps: i64,
    current_step: i64,
    host: Option<String>,
    attempts: i64,
    error: Option<String>,
    created_at: i64,
    started_at: Option<i64>,
    finished_at: Option<i64>,
    updated_at: i64,
    heartbeat_at: Option<i64>,
    retry_at: Option<i64>,
    crashes: i64,
    cancel_requested_at: Option<i64>,
    world_size: Option<i64>,
    rank_devices: Option<String>,
    launch_key: Option<String>,
}

impl TryFrom<RunRow> for Run {
    type Error = RegistryError;

    fn try_from(row: RunRow) -> Result<Run> {
        let id = row.id;
        let corrupt = |reason: String| RegistryError::CorruptRow {
            table: "runs",
            id,
            reason,
        };
        Ok(Run {
            id,
            status: row.status.parse().map_err(|e| corrupt(format!("{e}")))?,
            config: serde_json::from_str(&row.config)
                .map_err(|e| corrupt(format!("config is not JSON: {e}")))?,
            dataset: serde_json::from_str(&row.dataset)
                .map_err(|e| corrupt(format!("dataset is not JSON: {e}")))?,
            total_steps: row.total_steps,
            current_step: row.current_step,
            host: row.host,
            attempts: row.attempts,
            error: row.error,
            created_at: from_millis("runs", id, row.created_at)?,
            started_at: from_millis_opt("runs", id, row.started_at)?,
            finished_at: from_millis_opt("runs", id, row.finished_at)?,
            updated_at: from_millis("runs", id, row.updated_at)?,
            heartbeat_at: from_millis_opt("runs", id, row.heartbeat_at)?,
            retry_at: from_millis_opt("runs", id, row.retry_at)?,
            crashes: row.crashes,
            cancel_requested_at: from_millis_opt("runs", id, row.cancel_requested_at)?,
            world: RunWorld::from_columns(row.world_size, row.rank_devices.as_deref())
                .map_err(corrupt)?,
            launch_key: row.launch_key,
        })
    }
}

/// `stale_after` in milliseconds, for SQL.
fn millis(stale_after: Duration) -> Result<i64> {
    i64::try_from(stale_after.as_millis()).map_err(|_| {
        RegistryError::InvalidArgument(format!("stale_after {stale_after:?} is too long"))
    })
}

pub(crate) fn to_runs(rows: Vec<RunRow>) -> Result<Vec<Run>> {
    rows.into_iter().map(Run::try_from).collect()
}

/// Inserts a queued run, under `launch_key` if given. With a key another run already
/// has, nothing is inserted and `None` comes back (the unique index decides, so racing
/// inserts of one key leave one row on either backend).
pub(crate) async fn insert_run<'e>(
    ex: impl Executor<'e, Database = Any>,
    backend: Backend,
    new: &NewRun,
    launch_key: Option<&str>,
) -> Result<Option<Run>> {
    if new.total_steps <= 0 {
        return Err(RegistryError::InvalidArgument(format!(
            "total_steps must be positive, got {}",
            new.total_steps
        )));
    }
    let now = backend.now_ms();
    // DO NOTHING rather than catching the violation: on PostgreSQL a second inserter
    // waits for the first to commit and then inserts nothing, without an error.
    let sql = format!(
        "INSERT INTO runs (status, config, dataset, total_steps, launch_key, created_at, updated_at) \
         VALUES ('queued', $1, $2, $3, $4, {now}, {now}) \
         ON CONFLICT (launch_key) DO NOTHING RETURNING {RUN_COLUMNS}"
    );
    let row: Option<RunRow> = sqlx::query_as(&sql)
        .bind(serde_json::to_string(&new.config)?)
        .bind(serde_json::to_string(&new.dataset)?)
        .bind(new.total_steps)
        .bind(launch_key)
        .fetch_optional(ex)
        .await?;
    row.map(Run::try_from).transpose()
}

/// The run created under `launch_key`, if any.
pub(crate) async fn select_launched<'e>(
    ex: impl Executor<'e, Database = Any>,
    launch_key: &str,
) -> Result<Option<Run>> {
    let sql = format!("SELECT {RUN_COLUMNS} FROM runs WHERE launch_key = $1");
    let row: Option<RunRow> = sqlx::query_as(&sql)
        .bind(launch_key)
        .fetch_optional(ex)
        .await?;
    row.map(Run::try_from).transpose()
}

/// The `SET` of every claim (`$1` is the claiming worker): the run becomes running for
/// it with a fresh heartbeat and a new attempt (the lease's); what the last attempt left
/// (finished_at, error, retry delay, world) is cleared, and taking a run that is still
/// `running` from its worker counts as a crash. The `CASE` reads the row as it was
/// before the update, on both backends.
fn claim_set(backend: Backend) -> String {
    let now = backend.now_ms();
    format!(
        "status = 'running', host = $1, attempts = attempts + 1, \
         started_at = COALESCE(started_at, {now}), heartbeat_at = {now}, updated_at = {now}, \
         finished_at = NULL, error = NULL, retry_at = NULL, \
         world_size = NULL, rank_devices = NULL, \
         crashes = crashes + CASE WHEN status = 'running' THEN 1 ELSE 0 END"
    )
}

/// Moves the oldest queued run to running for `host`.
pub(crate) async fn claim_queued<'e>(
    ex: impl Executor<'e, Database = Any>,
    backend: Backend,
    host: &str,
) -> Result<Option<Run>> {
    let (set, lock) = (claim_set(backend), backend.skip_locked());
    // PostgreSQL: SKIP LOCKED lets concurrent claimers each lock a different
    // row instead of queueing behind (and then missing) the same one.
    // SQLite: the UPDATE holds the write lock from before its subquery reads.
    let sql = format!(
        "UPDATE runs SET {set} \
         WHERE status = 'queued' AND id = ( \
             SELECT id FROM runs WHERE status = 'queued' ORDER BY id LIMIT 1 {lock}) \
         RETURNING {RUN_COLUMNS}"
    );
    let row: Option<RunRow> = sqlx::query_as(&sql).bind(host).fetch_optional(ex).await?;
    row.map(Run::try_from).transpose()
}

/// Moves run `id` to running for `host` if its status is one of `statuses` (SQL string
/// literals, comma-separated); `None` when it is not (any more), or does not exist.
async fn claim_by_id<'e>(
    ex: impl Executor<'e, Database = Any>,
    backend: Backend,
    id: i64,
    host: &str,
    statuses: &str,
) -> Result<Option<Run>> {
    let set = claim_set(backend);
    let sql = format!(
        "UPDATE runs SET {set} WHERE id = $2 AND status IN ({statuses}) RETURNING {RUN_COLUMNS}"
    );
    let row: Option<RunRow> = sqlx::query_as(&sql)
        .bind(host)
        .bind(id)
        .fetch_optional(ex)
        .await?;
    row.map(Run::try_from).transpose()
}

/// Moves queued run `id` to running for `host`; `None` when it is not queued (any
/// more): another worker claimed it first, or it does not exist.
pub(crate) async fn claim_run<'e>(
    ex: impl Executor<'e, Database = Any>,
    backend: Backend,
    id: i64,
    host: &str,
) -> Result<Option<Run>> {
    claim_by_id(ex, backend, id, host, "'queued'").await
}

/// Moves run `id` to running for `host` whatever its heartbeat's age, when it is
/// queued, interrupted (deferred or not) or running; `None` when it has ended for good
/// (completed, failed, cancelled) or does not exist.
pub(crate) async fn claim_relaunched<'e>(
    ex: impl Executor<'e, Database = Any>,
    backend: Backend,
    id: i64,
    host: &str,
) -> Result<Option<Run>> {
    claim_by_id(ex, backend, id, host, "'queued', 'interrupted', 'running'").await
}

/// How many times [`Registry::find_or_create_launched_run`] reads and inserts before it
/// gives up: a second round only follows a run deleted while another caller created it.
const LAUNCH_ROUNDS: usize = 3;

/// When a claimable run may next be tried, as SQL over a `runs` row (`$2` is the
/// staleness limit in ms): a queued run, or one interrupted cleanly, at its place in
/// the queue (`created_at`); a deferred run at its `retry_at`; a crashed worker's run
/// when its heartbeat went stale. Claims take the smallest, so a run that keeps
/// failing goes behind the runs queued meanwhile instead of starving them.
const NEXT_TRY: &str = "CASE status \
     WHEN 'queued' THEN created_at \
     WHEN 'interrupted' THEN COALESCE(retry_at, created_at) \
     ELSE COALESCE(heartbeat_at, updated_at) + $2 END";

/// Moves the claimable run with the earliest [`NEXT_TRY`] to running for `host`.
pub(crate) async fn claim_next<'e>(
    ex: impl Executor<'e, Database = Any>,
    backend: Backend,
    host: &str,
    stale_after_ms: i64,
) -> Result<Option<Run>> {
    let (now, set, lock) = (backend.now_ms(), claim_set(backend), backend.skip_locked());
    let claimable = format!(
        "(status = 'queued' \
           OR (status = 'interrupted' AND (retry_at IS NULL OR retry_at <= {now})) \
           OR (status = 'running' AND COALESCE(heartbeat_at, updated_at) < {now} - $2))"
    );
    let sql = format!(
        "UPDATE runs SET {set} \
         WHERE {claimable} AND id = ( \
             SELECT id FROM runs WHERE {claimable} ORDER BY {NEXT_TRY}, id LIMIT 1 {lock}) \
         RETURNING {RUN_COLUMNS}"
    );
    let row: Option<RunRow> = sqlx::query_as(&sql)
        .bind(host)
        .bind(stale_after_ms)
        .fetch_optional(ex)
        .await?;
    row.map(Run::try_from).transpose()
}

/// One run by id.
pub(crate) async fn select_run<'e>(
    ex: impl Executor<'e, Database = Any>,
    id: i64,
) -> Result<Option<Run>> {
    let sql = format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = $1");
    let row: Option<RunRow> = sqlx::query_as(&sql).bind(id).fetch_optional(ex).await?;
    row.map(Run::try_from).transpose()
}

/// A page of runs, newest first.
pub(crate) async fn select_runs<'e>(
    ex: impl Executor<'e, Database = Any>,
    status: Option<RunStatus>,
    limit: i64,
    offset: i64,
) -> Result<Vec<Run>> {
    if limit < 0 || offset < 0 {
        return Err(RegistryError::InvalidArgument(format!(
            "limit and offset must not be negative, got {limit} and {offset}"
        )));
    }
    let sql = format!(
        "SELECT {RUN_COLUMNS} FROM runs WHERE ($1 IS NULL OR status = $1) \
         ORDER BY id DESC LIMIT $2 OFFSET $3"
    );
    let rows: Vec<RunRow> = sqlx::query_as(&sql)
        .bind(status.map(RunStatus::as_str))
        .bind(limit)
        .bind(offset)
        .fetch_all(ex)
        .await?;
    to_runs(rows)
}

/// How many runs there are (with this status).
pub(crate) async fn count_runs<'e>(
    ex: impl Executor<'e, Database = Any>,
    status: Option<RunStatus>,
) -> Result<i64> {
    let (count,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM runs WHERE ($1 IS NULL OR status = $1)")
            .bind(status.map(RunStatus::as_str))
            .fetch_one(ex)
            .await?;
    Ok(count)
}

impl Registry {
    /// Queues a run (status [`RunStatus::Queued`]).
    #[tracing::instrument(skip_all)]
    pub async fn create_run(&self, new: &NewRun) -> Result<Run> {
        insert_run(&self.pool, self.backend, new, None)
            .await?
            // NULL keys never conflict: the insert always returns its row.
            .ok_or(RegistryError::Database(sqlx::Error::RowNotFound))
    }

    /// The run a launcher created under `launch_key` (its job id), queuing it from `new`
    /// when there is none yet; `true` with a run this call created. Every rank process of
    /// a launch, and every restart of them, may call it: racing callers, on any hosts,
    /// end with one run, which all of them get. An existing run is returned as it is,
    /// whatever `new` says now (compare its config to refuse a changed one), and whatever
    /// its status.
    #[tracing::instrument(skip(self, new))]
    pub async fn find_or_create_launched_run(
        &self,
        new: &NewRun,
        launch_key: &str,
    ) -> Result<(Run, bool)> {
        if launch_key.is_empty() {
            return Err(RegistryError::InvalidArgument(
                "a launch key must not be empty".into(),
            ));
        }
        // Read first: the common case (every rank after the first, every restart) is a
        // run that exists. An insert that meets the key was beaten by another caller:
        // read again. Only a run deleted in that instant sends us round once more.
        for _ in 0..LAUNCH_ROUNDS {
            if let Some(run) = select_launched(&self.pool, launch_key).await? {
                return Ok((run, false));
            }
            if let Some(run) = insert_run(&self.pool, self.backend, new, Some(launch_key)).await? {
                return Ok((run, true));
            }
        }
        Err(RegistryError::Database(sqlx::Error::RowNotFound))
    }

    /// Atomically moves the oldest queued run to running for `host`, with a
    /// fresh heartbeat. Concurrent callers (in this process or on other
    /// hosts) never get the same run.
    ///
    /// `host` names the worker: it must be unique per trainer process (e.g.
    /// `hostname:pid`) because every leased write checks it.
    #[tracing::instrument(skip(self))]
    pub async fn claim_next_queued(&self, host: &str) -> Result<Option<Run>> {
        claim_queued(&self.pool, self.backend, host).await
    }

    /// Atomically claims the run that has waited longest to be tried (see `NEXT_TRY` in
    /// the source): queued, interrupted (a deferred one once its `retry_at` has passed) or
    /// running with a heartbeat older than `stale_after` (its worker died). It becomes
    /// running for `host` with a fresh heartbeat; `finished_at`, `error` and `retry_at`
    /// are cleared, `attempts` goes up by one (the new [`Lease`](crate::Lease)'s
    /// attempt), and `crashes` too when it was taken from a silent worker.
    ///
    /// `stale_after` must comfortably exceed the heartbeat interval, or a live
    /// trainer's run is taken from it (it then loses its lease and stops).
    #[tracing::instrument(skip(self))]
    pub async fn claim_next(&self, host: &str, stale_after: Duration) -> Result<Option<Run>> {
        claim_next(&self.pool, self.backend, host, millis(stale_after)?).await
    }

    /// Atomically claims queued run `id` for `host` (a foreground `train` claiming
    /// the run it just created, ahead of older queued ones). `None` when the run
    /// is not queued: a daemon took it first, or there is no such run.
    #[tracing::instrument(skip(self))]
    pub async fn claim_run(&self, id: i64, host: &str) -> Result<Option<Run>> {
        claim_run(&self.pool, self.backend, id, host).await
    }

    /// Claims run `id` for `host` for a launcher's restart of its rank processes: unlike
    /// [`claim_next`](Self::claim_next), whatever the age of its heartbeat. A launcher
    /// restarts its workers only after killing every old one, so the holder of a run
    /// still `running` is known to be dead: the run is taken from it at once, which
    /// counts as a crash (`crashes + 1`, checked against the crash cap like any other);
    /// a queued or interrupted run (a deferred one too, its `retry_at` ignored) is
    /// claimed without one. `attempts` goes up by one and the last attempt's
    /// `finished_at`, `error`, `retry_at` and world are cleared, as in every claim.
    /// `None` for a completed, failed or cancelled run, or no such run.
    ///
    /// Only one process per launch may call it: a second call takes the run from the
    /// first (a new lease, and a crash).
    #[tracing::instrument(skip(self))]
    pub async fn claim_relaunched(&self, id: i64, host: &str) -> Result<Option<Run>> {
        claim_relaunched(&self.pool, self.backend, id, host).await
    }

    /// One run, if it exists.
    #[tracing::instrument(skip(self))]
    pub async fn get_run(&self, id: i64) -> Result<Option<Run>> {
        select_run(&self.pool, id).await
    }

    /// Runs newest first, optionally only those with `status`; `limit` and
    /// `offset` page through them.
    #[tracing::instrument(skip(self))]
    pub async fn list_runs(
        &self,
        status: Option<RunStatus>,
        limit: i64,
        offset: i64,
    ) -> Result<Vec<Run>> {
        select_runs(&self.pool, status, limit, offset).await
    }

    /// How many runs [`list_runs`](Self::list_runs) pages through.
    #[tracing::instrument(skip(self))]
    pub async fn count_runs(&self, status: Option<RunStatus>) -> Result<i64> {
        count_runs(&self.pool, status).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_round_trip() {
        for status in RunStatus::ALL {
            assert_eq!(status.as_str().parse::<RunStatus>().unwrap(), status);
            assert_eq!(status.to_string(), status.as_str());
            let json = serde_json::to_string(&status).unwrap();
            assert_eq!(json, format!("\"{}\"", status.as_str()));
        }
        assert!(matches!(
            "Running".parse::<RunStatus>(),
            Err(RegistryError::UnknownStatus(s)) if s == "Running"
        ));
    }

    #[test]
    fn final_statuses_are_the_run_statuses_after_running() {
        use FinalStatus::{Cancelled, Completed, Failed, Interrupted};
        let finals = [Completed, Failed, Interrupted, Cancelled].map(RunStatus::from);
        assert_eq!(finals, RunStatus::ALL[2..]);
        for status in [Completed, Failed, Interrupted, Cancelled] {
            assert_eq!(status.to_string(), RunStatus::from(status).as_str());
            assert_eq!(
                serde_json::to_string(&status).unwrap(),
                serde_json::to_string(&RunStatus::from(status)).unwrap()
            );
        }
    }

    fn row() -> RunRow {
        RunRow {
            id: 7,
            status: "running".into(),
            config: r#"{"lr":0.0003}"#.into(),
            dataset: r#"{"images":10}"#.into(),
            total_steps: 100,
            current_step: 5,
            host: Some("h:1".into()),
            attempts: 1,
            error: None,
            created_at: 1_700_000_000_000,
            started_at: Some(1_700_000_000_500),
            finished_at: None,
            updated_at: 1_700_000_001_000,
            heartbeat_at: Some(1_700_000_001_000),
            retry_at: None,
            crashes: 0,
            cancel_requested_at: None,
            world_size: Some(2),
            rank_devices: Some(r#"["cuda:0","cuda:1"]"#.into()),
            launch_key: Some("job-1".into()),
        }
    }

    #[test]
    fn rows_convert_to_runs() {
        let run = Run::try_from(row()).unwrap();
        assert_eq!(run.status, RunStatus::Running);
        assert_eq!(run.config["lr"], 0.0003);
        assert_eq!(
            run.started_at.unwrap().timestamp_millis(),
            1_700_000_000_500
        );
        assert_eq!(run.finished_at, None);
        assert_eq!(
            run.world,
            Some(RunWorld {
                size: 2,
                devices: vec!["cuda:0".into(), "cuda:1".into()],
            })
        );
        assert_eq!(run.launch_key.as_deref(), Some("job-1"));
        let unrecorded = RunRow {
            world_size: None,
            rank_devices: None,
            ..row()
        };
        assert_eq!(Run::try_from(unrecorded).unwrap().world, None);
    }

    #[test]
    fn worlds_need_one_device_per_rank() {
        let world = |size, devices: &[&str]| RunWorld {
            size,
            devices: devices.iter().map(|d| d.to_string()).collect(),
        };
        world(1, &["cpu"]).validate().unwrap();
        world(2, &["cpu", "cpu"]).validate().unwrap();
        for bad in [world(0, &[]), world(2, &["cuda:0"]), world(-1, &["cpu"])] {
            assert!(
                matches!(bad.validate(), Err(RegistryError::InvalidArgument(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn corrupt_worlds_are_reported_not_panicked_on() {
        let corrupt = |world_size: Option<i64>, rank_devices: Option<&str>| {
            let row = RunRow {
                world_size,
                rank_devices: rank_devices.map(String::from),
                ..row()
            };
            matches!(
                Run::try_from(row),
                Err(RegistryError::CorruptRow {
                    table: "runs",
                    id: 7,
                    ..
                })
            )
        };
        assert!(corrupt(Some(2), Some("cuda:0,cuda:1")), "not JSON");
        assert!(corrupt(Some(2), Some(r#"{"0":"cpu"}"#)), "not an array");
        assert!(corrupt(Some(2), Some("[0, 1]")), "not strings");
        assert!(
            corrupt(Some(3), Some(r#"["cpu","cpu"]"#)),
            "one device short"
        );
        assert!(corrupt(Some(2), None), "a size without devices");
        assert!(corrupt(None, Some(r#"["cpu"]"#)), "devices without a size");
        assert!(!corrupt(Some(1), Some(r#"["cpu"]"#)));
    }

    #[test]
    fn corrupt_rows_are_reported_not_panicked_on() {
        let bad_status = RunRow {
            status: "paused".into(),
            ..row()
        };
        assert!(matches!(
            Run::try_from(bad_status),
            Err(RegistryError::CorruptRow { id: 7, .. })
        ));
        let bad_json = RunRow {
            config: "{".into(),
            ..row()
        };
        assert!(matches!(
            Run::try_from(bad_json),
            Err(RegistryError::CorruptRow { .. })
        ));
    }
}
