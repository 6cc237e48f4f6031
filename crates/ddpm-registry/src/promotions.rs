//! Promotions: an operator's choice of the checkpoint servers serve under their
//! `promoted` policy (issue 9). Each promotion records who, when and why; the one in
//! force is the newest that is not revoked, and a rollback revokes it, which puts the one
//! before it back in force. On PostgreSQL both are announced on
//! [`CHECKPOINT_CHANNEL`](crate::CHECKPOINT_CHANNEL) when they commit, so every replica
//! looks at once (the others find out at their next poll).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{Any, Executor};

use crate::checkpoints::{CheckpointKind, CHECKPOINT_CHANNEL};
use crate::db::{from_millis, from_millis_opt, Backend, Registry};
use crate::error::{RegistryError, Result};

/// One promotion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Promotion {
    pub id: i64,
    pub checkpoint_id: i64,
    pub run_id: i64,
    pub step: i64,
    /// Who promoted it (a user name, or what the API caller said).
    pub promoted_by: String,
    pub reason: String,
    pub created_at: DateTime<Utc>,
    /// When a rollback revoked it, and who; `None` while it may be in force.
    pub revoked_at: Option<DateTime<Utc>>,
    pub revoked_by: Option<String>,
}

const PROMOTION_COLUMNS: &str =
    "id, checkpoint_id, run_id, step, promoted_by, reason, created_at, revoked_at, revoked_by";

#[derive(sqlx::FromRow)]
struct PromotionRow {
    id: i64,
    checkpoint_id: i64,
    run_id: i64,
    step: i64,
    promoted_by: String,
    reason: String,
    created_at: i64,
    revoked_at: Option<i64>,
    revoked_by: Option<String>,
}

impl TryFrom<PromotionRow> for Promotion {
    type Error = RegistryError;

    fn try_from(row: PromotionRow) -> Result<Promotion> {
        Ok(Promotion {
            created_at: from_millis("checkpoint_promotions", row.id, row.created_at)?,
            revoked_at: from_millis_opt("checkpoint_promotions", row.id, row.revoked_at)?,
            id: row.id,
            checkpoint_id: row.checkpoint_id,
            run_id: row.run_id,
            step: row.step,
            promoted_by: row.promoted_by,
            reason: row.reason,
            revoked_by: row.revoked_by,
        })
    }
}

async fn select_current<'e>(ex: impl Executor<'e, Database = Any>) -> Result<Option<Promotion>> {
    let sql = format!(
        "SELECT {PROMOTION_COLUMNS} FROM checkpoint_promotions \
         WHERE revoked_at IS NULL ORDER BY id DESC LIMIT 1"
    );
    let row: Option<PromotionRow> = sqlx::query_as(&sql).fetch_optional(ex).await?;
    row.map(Promotion::try_from).transpose()
}

/// PostgreSQL: tells the servers to look again (delivered at commit).
async fn announce<'e>(
    ex: impl Executor<'e, Database = Any>,
    backend: Backend,
    id: i64,
) -> Result<()> {
    if backend == Backend::Postgres {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHECKPOINT_CHANNEL)
            .bind(id.to_string())
            .execute(ex)
            .await?;
    }
    Ok(())
}

impl Registry {
    /// Promotes the EMA checkpoint `checkpoint_id`: it is in force from now on (until a
    /// later promotion, or a rollback of this one). Fails with
    /// [`RegistryError::CheckpointNotFound`] for a checkpoint that does not exist and
    /// [`RegistryError::InvalidArgument`] for a training state or an empty `by`/`reason`.
    #[tracing::instrument(skip(self))]
    pub async fn promote_checkpoint(
        &self,
        checkpoint_id: i64,
        by: &str,
        reason: &str,
    ) -> Result<Promotion> {
        if by.trim().is_empty() || reason.trim().is_empty() {
            return Err(RegistryError::InvalidArgument(
                "a promotion needs who made it and why".into(),
            ));
        }
        let mut tx = self.pool.begin().await?;
        let checkpoint = sqlx::query_as::<_, (i64, i64, String)>(
            "SELECT run_id, step, kind FROM checkpoints WHERE id = $1",
        )
        .bind(checkpoint_id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(RegistryError::CheckpointNotFound(checkpoint_id))?;
        let (run_id, step, kind) = checkpoint;
        if kind != CheckpointKind::Ema.as_str() {
            return Err(RegistryError::InvalidArgument(format!(
                "checkpoint {checkpoint_id} is a training state: only EMA checkpoints are served"
            )));
        }
        let sql = format!(
            "INSERT INTO checkpoint_promotions \
                 (checkpoint_id, run_id, step, promoted_by, reason, created_at) \
             VALUES ($1, $2, $3, $4, $5, {}) RETURNING {PROMOTION_COLUMNS}",
            self.backend.now_ms()
        );
        let row: PromotionRow = sqlx::query_as(&sql)
            .bind(checkpoint_id)
            .bind(run_id)
            .bind(step)
            .bind(by)
            .bind(reason)
            .fetch_one(&mut *tx)
            .await?;
        announce(&mut *tx, self.backend, checkpoint_id).await?;
        tx.commit().await?;
        row.try_into()
    }

    /// Revokes the promotion in force; returns the one in force after it (the one
    /// before, if any). Fails with [`RegistryError::InvalidArgument`] when nothing is
    /// promoted.
    #[tracing::instrument(skip(self))]
    pub async fn rollback_promotion(&self, by: &str) -> Result<Option<Promotion>> {
        let mut tx = self.pool.begin().await?;
        let current = select_current(&mut *tx)
            .await?
            .ok_or_else(|| RegistryError::InvalidArgument("no promotion to roll back".into()))?;
        let sql = format!(
            "UPDATE checkpoint_promotions SET revoked_at = {}, revoked_by = $2 \
             WHERE id = $1 AND revoked_at IS NULL",
            self.backend.now_ms()
        );
        sqlx::query(&sql)
            .bind(current.id)
            .bind(by)
            .execute(&mut *tx)
            .await?;
        let now = select_current(&mut *tx).await?;
        announce(&mut *tx, self.backend, current.checkpoint_id).await?;
        tx.commit().await?;
        Ok(now)
    }

    /// The promotion in force, if any.
    #[tracing::instrument(skip(self))]
    pub async fn current_promotion(&self) -> Result<Option<Promotion>> {
        select_current(&self.pool).await
    }

    /// The checkpoints of run `run_id` that retention keeps whatever `keep_last` says:
    /// every promoted one (a rollback may put it back in force) and the EMA checkpoint
    /// with the lowest KID (what the `best` policy serves by default).
    pub(crate) async fn servable_keepers(&self, run_id: i64) -> Result<Vec<i64>> {
        let promoted: Vec<(i64,)> = sqlx::query_as(
            "SELECT DISTINCT checkpoint_id FROM checkpoint_promotions WHERE run_id = $1",
        )
        .bind(run_id)
        .fetch_all(&self.pool)
        .await?;
        let best: Option<(i64,)> = sqlx::query_as(
            "SELECT c.id FROM checkpoint_scores s              JOIN checkpoints c ON c.run_id = s.run_id AND c.step = s.step AND c.kind = 'ema'              WHERE s.run_id = $1 AND s.kid IS NOT NULL ORDER BY s.kid, c.id DESC LIMIT 1",
        )
        .bind(run_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(promoted.into_iter().chain(best).map(|(id,)| id).collect())
    }

    /// The newest `limit` promotions, revoked ones included, newest first.
    #[tracing::instrument(skip(self))]
    pub async fn promotions(&self, limit: i64) -> Result<Vec<Promotion>> {
        let sql = format!(
            "SELECT {PROMOTION_COLUMNS} FROM checkpoint_promotions ORDER BY id DESC LIMIT $1"
        );
        let rows: Vec<PromotionRow> = sqlx::query_as(&sql)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(Promotion::try_from).collect()
    }
}
