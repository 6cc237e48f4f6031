//! An operator's commands on runs: cancel, restart (resuming or from scratch) and
//! delete. Each is one conditional statement or transaction, so it races safely with
//! workers claiming and ending runs; the files go after the rows, so nothing is ever
//! served or resumed from a file that is about to disappear.
//!
//! | command | queued | running | interrupted | failed / cancelled | completed |
//! | --- | --- | --- | --- | --- | --- |
//! | cancel | cancelled | stops at its next step, saving a state | cancelled | refused / no-op | refused |
//! | restart | refused | refused | retried now | interrupted (resumes) | refused |
//! | restart from scratch | refused | refused | queued, history gone | queued, history gone | queued, history gone |
//! | delete | gone | refused | gone | gone | gone |

use sqlx::{Any, Executor};

use crate::db::{Backend, Registry};
use crate::error::{RegistryError, Result};
use crate::runs::{select_run, Run, RunRow, RunStatus, RUN_COLUMNS};
use crate::store::CheckpointStore;

/// A statement that returns the changed run, if the `WHERE` matched.
async fn update_returning<'e>(
    ex: impl Executor<'e, Database = Any>,
    sql: &str,
    id: i64,
) -> Result<Option<Run>> {
    let sql = format!("{sql} RETURNING {RUN_COLUMNS}");
    let row: Option<RunRow> = sqlx::query_as(&sql).bind(id).fetch_optional(ex).await?;
    row.map(Run::try_from).transpose()
}

/// Wipes a run's history inside `tx`: checkpoint rows and metric rows.
async fn wipe_history(tx: &mut sqlx::Transaction<'static, Any>, id: i64) -> Result<()> {
    for table in ["checkpoint_scores", "checkpoints", "metrics"] {
        sqlx::query(&format!("DELETE FROM {table} WHERE run_id = $1"))
            .bind(id)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// Locks run `id` inside `tx` (PostgreSQL: the row; SQLite: the database) when its
/// status is not `running`; returns it, or why not.
async fn lock_idle(
    tx: &mut sqlx::Transaction<'static, Any>,
    backend: Backend,
    id: i64,
) -> Result<Run> {
    let sql = format!(
        "UPDATE runs SET updated_at = {} WHERE id = $1 AND status <> 'running'",
        backend.now_ms()
    );
    match update_returning(&mut **tx, &sql, id).await? {
        Some(run) => Ok(run),
        None => Err(match select_run(&mut **tx, id).await? {
            None => RegistryError::RunNotFound(id),
            Some(_) => RegistryError::Refused {
                id,
                reason: "is running: cancel it first, and wait for it to stop".into(),
            },
        }),
    }
}

impl Registry {
    /// Cancels run `id`: a queued or interrupted run becomes cancelled at once; a
    /// running one gets `cancel_requested_at`, and its worker saves a state and ends it
    /// as cancelled at its next heartbeat. Cancelling a cancelled run changes nothing.
    /// Refused for a completed or failed run (it has stopped already).
    #[tracing::instrument(skip(self))]
    pub async fn cancel_run(&self, id: i64) -> Result<Run> {
        let now = self.backend.now_ms();
        let stop = format!(
            "UPDATE runs SET status = 'cancelled', finished_at = {now}, updated_at = {now}, \
                 retry_at = NULL WHERE id = $1 AND status IN ('queued', 'interrupted')"
        );
        if let Some(run) = update_returning(&self.pool, &stop, id).await? {
            return Ok(run);
        }
        let ask = format!(
            "UPDATE runs SET cancel_requested_at = COALESCE(cancel_requested_at, {now}), \
                 updated_at = {now} WHERE id = $1 AND status = 'running'"
        );
        if let Some(run) = update_returning(&self.pool, &ask, id).await? {
            return Ok(run);
        }
        match self.get_run(id).await? {
            None => Err(RegistryError::RunNotFound(id)),
            Some(run) if run.status == RunStatus::Cancelled => Ok(run),
            Some(run) => Err(RegistryError::Refused {
                id,
                reason: format!("is {} already: there is nothing to cancel", run.status),
            }),
        }
    }

    /// Restarts run `id`.
    ///
    /// Without `from_scratch`, a failed, cancelled or interrupted run becomes
    /// interrupted with its error, retry delay, crash count and cancel request cleared:
    /// a daemon resumes it from its newest training state at once, keeping its history.
    ///
    /// With `from_scratch`, any run that is not queued or running loses its history
    /// (metric rows, checkpoint rows, then the files) and is queued again at step 0.
    /// The one way a run ever starts over; until the files are gone the run is
    /// cancelled, so no worker writes into the folder being emptied (a failure there
    /// leaves it cancelled, and the command can be repeated).
    #[tracing::instrument(skip(self, store))]
    pub async fn restart_run(
        &self,
        id: i64,
        from_scratch: bool,
        store: &CheckpointStore,
    ) -> Result<Run> {
        let now = self.backend.now_ms();
        let refused = |run: &Run| {
            let reason = match run.status {
                RunStatus::Queued => "is queued: it starts when a trainer is free".to_string(),
                RunStatus::Running => "is running: cancel it first".to_string(),
                RunStatus::Completed => {
                    "is completed: only a restart from scratch trains it again".to_string()
                }
                other => format!("is {other}"),
            };
            RegistryError::Refused { id, reason }
        };
        if !from_scratch {
            let sql = format!(
                "UPDATE runs SET status = 'interrupted', error = NULL, retry_at = NULL, \
                     crashes = 0, cancel_requested_at = NULL, updated_at = {now} \
                 WHERE id = $1 AND status IN ('failed', 'cancelled', 'interrupted')"
            );
            if let Some(run) = update_returning(&self.pool, &sql, id).await? {
                return Ok(run);
            }
            return match self.get_run(id).await? {
                None => Err(RegistryError::RunNotFound(id)),
                Some(run) => Err(refused(&run)),
            };
        }

        let mut tx = self.pool.begin().await?;
        let run = lock_idle(&mut tx, self.backend, id).await?;
        if run.status == RunStatus::Queued {
            return Err(refused(&run));
        }
        wipe_history(&mut tx, id).await?;
        let park = format!(
            "UPDATE runs SET status = 'cancelled', current_step = 0, \
                 error = 'restarting from scratch', retry_at = NULL, updated_at = {now} \
             WHERE id = $1"
        );
        sqlx::query(&park).bind(id).execute(&mut *tx).await?;
        tx.commit().await?;

        store.remove_run(id).await?;

        let queue = format!(
            "UPDATE runs SET status = 'queued', current_step = 0, host = NULL, error = NULL, \
                 started_at = NULL, finished_at = NULL, heartbeat_at = NULL, retry_at = NULL, \
                 crashes = 0, cancel_requested_at = NULL, world_size = NULL, rank_devices = NULL, \
                 updated_at = {now} \
             WHERE id = $1 AND status = 'cancelled'"
        );
        // `attempts` stays: leases stay unique across the restart.
        update_returning(&self.pool, &queue, id)
            .await?
            .ok_or(RegistryError::RunNotFound(id))
    }

    /// Deletes run `id`: its checkpoint rows, metric rows and run row in one
    /// transaction, then its folder in `store`. Refused while it runs (cancel it and
    /// wait). Returns the run as it was.
    ///
    /// When the folder cannot be removed the rows are gone already and the error names
    /// the folder; nothing serves or resumes from it any more, and removing it by hand
    /// is safe (run ids are never reused).
    #[tracing::instrument(skip(self, store))]
    pub async fn delete_run(&self, id: i64, store: &CheckpointStore) -> Result<Run> {
        let mut tx = self.pool.begin().await?;
        let run = lock_idle(&mut tx, self.backend, id).await?;
        wipe_history(&mut tx, id).await?;
        sqlx::query("DELETE FROM runs WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        store.remove_run(id).await?;
        Ok(run)
    }
}
