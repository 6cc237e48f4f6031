//! Checkpoint rows: which checkpoint files exist, with their size and checksum.
//! The registry is the source of truth; the files live in a
//! [`CheckpointStore`](crate::CheckpointStore).

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{Any, Executor};

use crate::db::{from_millis, run_fk, Backend, Registry};
use crate::error::{RegistryError, Result};
use crate::relpath::validate_rel_path;

/// The PostgreSQL `LISTEN` channel on which every registered checkpoint's id
/// is announced (payload: the id in decimal).
pub const CHECKPOINT_CHANNEL: &str = "ddpm_checkpoints";

/// What a checkpoint file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckpointKind {
    /// EMA weights plus manifest: the servable `.safetensors`. Its sample grid
    /// sits beside it as `<stem>.png`.
    Ema,
    /// The resumable training state (raw and EMA weights, optimiser moments,
    /// step, RNG state).
    State,
}

impl CheckpointKind {
    /// Every kind.
    pub const ALL: [CheckpointKind; 2] = [CheckpointKind::Ema, CheckpointKind::State];

    /// The name stored in the database, used in the API and in file names.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckpointKind::Ema => "ema",
            CheckpointKind::State => "state",
        }
    }
}

impl fmt::Display for CheckpointKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CheckpointKind {
    type Err = RegistryError;

    fn from_str(s: &str) -> Result<Self> {
        CheckpointKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == s)
            .ok_or_else(|| RegistryError::UnknownKind(s.to_owned()))
    }
}

/// A durable checkpoint file to register.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewCheckpoint {
    pub run_id: i64,
    /// The training step the file was saved at.
    pub step: i64,
    pub kind: CheckpointKind,
    /// Relative to the store's root, `/`-separated.
    pub path: String,
    pub size_bytes: i64,
    /// Lowercase hex SHA-256 of the file's bytes.
    pub sha256: String,
}

/// A registered checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    /// Grows with every registration: the highest id of a kind is the newest.
    pub id: i64,
    pub run_id: i64,
    pub step: i64,
    pub kind: CheckpointKind,
    /// Relative to the store's root, `/`-separated.
    pub path: String,
    pub size_bytes: i64,
    /// Lowercase hex SHA-256 of the file's bytes; a loader verifies it.
    pub sha256: String,
    pub created_at: DateTime<Utc>,
}

const CHECKPOINT_COLUMNS: &str = "id, run_id, step, kind, path, size_bytes, sha256, created_at";

#[derive(sqlx::FromRow)]
struct CheckpointRow {
    id: i64,
    run_id: i64,
    step: i64,
    kind: String,
    path: String,
    size_bytes: i64,
    sha256: String,
    created_at: i64,
}

impl TryFrom<CheckpointRow> for CheckpointRecord {
    type Error = RegistryError;

    fn try_from(row: CheckpointRow) -> Result<CheckpointRecord> {
        let kind = row.kind.parse().map_err(|e| RegistryError::CorruptRow {
            table: "checkpoints",
            id: row.id,
            reason: format!("{e}"),
        })?;
        Ok(CheckpointRecord {
            id: row.id,
            run_id: row.run_id,
            step: row.step,
            kind,
            path: row.path,
            size_bytes: row.size_bytes,
            sha256: row.sha256,
            created_at: from_millis("checkpoints", row.id, row.created_at)?,
        })
    }
}

fn to_records(rows: Vec<CheckpointRow>) -> Result<Vec<CheckpointRecord>> {
    rows.into_iter().map(CheckpointRecord::try_from).collect()
}

/// Checks what the database's constraints would refuse, with a clear message.
pub(crate) fn validate(new: &NewCheckpoint) -> Result<()> {
    validate_rel_path(std::path::Path::new(&new.path))?;
    if new.size_bytes < 0 {
        return Err(RegistryError::InvalidArgument(format!(
            "size_bytes must not be negative, got {}",
            new.size_bytes
        )));
    }
    let is_hex = new
        .sha256
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if new.sha256.len() != 64 || !is_hex {
        return Err(RegistryError::InvalidArgument(format!(
            "sha256 must be 64 lowercase hex digits, got {:?}",
            new.sha256
        )));
    }
    Ok(())
}

/// Replaces any row of `new.path` by a new row, announced on PostgreSQL, inside `tx`.
pub(crate) async fn register_in(
    tx: &mut sqlx::Transaction<'static, Any>,
    backend: Backend,
    new: &NewCheckpoint,
) -> Result<CheckpointRecord> {
    delete_by_path(&mut **tx, &new.path).await?;
    let record = insert_checkpoint(&mut **tx, backend, new).await?;
    if backend == Backend::Postgres {
        notify_checkpoint(&mut **tx, record.id).await?;
    }
    Ok(record)
}

/// Removes the row of `path` (a file written again at the same path replaces
/// its registration).
async fn delete_by_path<'e>(ex: impl Executor<'e, Database = Any>, path: &str) -> Result<u64> {
    let done = sqlx::query("DELETE FROM checkpoints WHERE path = $1")
        .bind(path)
        .execute(ex)
        .await?;
    Ok(done.rows_affected())
}

async fn insert_checkpoint<'e>(
    ex: impl Executor<'e, Database = Any>,
    backend: Backend,
    new: &NewCheckpoint,
) -> Result<CheckpointRecord> {
    let now = backend.now_ms();
    let sql = format!(
        "INSERT INTO checkpoints (run_id, step, kind, path, size_bytes, sha256, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, {now}) RETURNING {CHECKPOINT_COLUMNS}"
    );
    let row: CheckpointRow = sqlx::query_as(&sql)
        .bind(new.run_id)
        .bind(new.step)
        .bind(new.kind.as_str())
        .bind(&new.path)
        .bind(new.size_bytes)
        .bind(&new.sha256)
        .fetch_one(ex)
        .await
        .map_err(run_fk(new.run_id))?;
    row.try_into()
}

/// PostgreSQL only: announces `id` on [`CHECKPOINT_CHANNEL`] (delivered when
/// the surrounding transaction commits).
async fn notify_checkpoint<'e>(ex: impl Executor<'e, Database = Any>, id: i64) -> Result<()> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHECKPOINT_CHANNEL)
        .bind(id.to_string())
        .execute(ex)
        .await?;
    Ok(())
}

async fn select_checkpoint<'e>(
    ex: impl Executor<'e, Database = Any>,
    id: i64,
) -> Result<Option<CheckpointRecord>> {
    let sql = format!("SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE id = $1");
    let row: Option<CheckpointRow> = sqlx::query_as(&sql).bind(id).fetch_optional(ex).await?;
    row.map(CheckpointRecord::try_from).transpose()
}

async fn select_newest<'e>(
    ex: impl Executor<'e, Database = Any>,
    run_id: Option<i64>,
    kind: CheckpointKind,
) -> Result<Option<CheckpointRecord>> {
    let sql = format!(
        "SELECT {CHECKPOINT_COLUMNS} FROM checkpoints \
         WHERE kind = $1 AND ($2 IS NULL OR run_id = $2) ORDER BY id DESC LIMIT 1"
    );
    let row: Option<CheckpointRow> = sqlx::query_as(&sql)
        .bind(kind.as_str())
        .bind(run_id)
        .fetch_optional(ex)
        .await?;
    row.map(CheckpointRecord::try_from).transpose()
}

async fn select_run_checkpoints<'e>(
    ex: impl Executor<'e, Database = Any>,
    run_id: i64,
) -> Result<Vec<CheckpointRecord>> {
    let sql =
        format!("SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE run_id = $1 ORDER BY step, id");
    let rows: Vec<CheckpointRow> = sqlx::query_as(&sql).bind(run_id).fetch_all(ex).await?;
    to_records(rows)
}

pub(crate) async fn delete_by_id<'e>(
    ex: impl Executor<'e, Database = Any>,
    id: i64,
) -> Result<u64> {
    let done = sqlx::query("DELETE FROM checkpoints WHERE id = $1")
        .bind(id)
        .execute(ex)
        .await?;
    Ok(done.rows_affected())
}

impl Registry {
    /// Registers a durable checkpoint file (write it first: see
    /// [`CheckpointStore::write_checkpoint`](crate::CheckpointStore::write_checkpoint) and
    /// [`CheckpointStore::register`](crate::CheckpointStore::register)).
    ///
    /// A path registered before is replaced: its old row goes and the new one
    /// gets a new, higher id, so it counts as the newest. On PostgreSQL the
    /// new id is announced on [`CHECKPOINT_CHANNEL`] when the registration
    /// commits. Fails with [`RegistryError::RunNotFound`] for an unknown run.
    #[tracing::instrument(skip(self, new), fields(run_id = new.run_id, step = new.step, kind = %new.kind))]
    pub async fn register_checkpoint(&self, new: &NewCheckpoint) -> Result<CheckpointRecord> {
        validate(new)?;
        let mut tx = self.pool.begin().await?;
        let record = register_in(&mut tx, self.backend, new).await?;
        tx.commit().await?;
        Ok(record)
    }

    /// The newest (last registered) checkpoint of `kind`, of run `run_id` or
    /// of any run.
    #[tracing::instrument(skip(self))]
    pub async fn newest_checkpoint(
        &self,
        run_id: Option<i64>,
        kind: CheckpointKind,
    ) -> Result<Option<CheckpointRecord>> {
        select_newest(&self.pool, run_id, kind).await
    }

    /// One checkpoint, if it exists.
    #[tracing::instrument(skip(self))]
    pub async fn get_checkpoint(&self, id: i64) -> Result<Option<CheckpointRecord>> {
        select_checkpoint(&self.pool, id).await
    }

    /// The SHA-256 of every registered checkpoint, of every run: what a server's cache
    /// of loaded checkpoints keeps before anything else.
    #[tracing::instrument(skip(self))]
    pub async fn checkpoint_hashes(&self) -> Result<std::collections::HashSet<String>> {
        let hashes: Vec<String> = sqlx::query_scalar("SELECT DISTINCT sha256 FROM checkpoints")
            .fetch_all(&self.pool)
            .await?;
        Ok(hashes.into_iter().collect())
    }

    /// The checkpoints of run `run_id`, by step (then id).
    #[tracing::instrument(skip(self))]
    pub async fn list_checkpoints(&self, run_id: i64) -> Result<Vec<CheckpointRecord>> {
        select_run_checkpoints(&self.pool, run_id).await
    }

    /// Removes a checkpoint's row (only the row: use
    /// [`CheckpointStore::delete`](crate::CheckpointStore::delete) to remove
    /// the file too). Fails with [`RegistryError::CheckpointNotFound`] when
    /// there is no such row.
    #[tracing::instrument(skip(self))]
    pub async fn delete_checkpoint(&self, id: i64) -> Result<()> {
        match delete_by_id(&self.pool, id).await? {
            0 => Err(RegistryError::CheckpointNotFound(id)),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_checkpoint() -> NewCheckpoint {
        NewCheckpoint {
            run_id: 1,
            step: 100,
            kind: CheckpointKind::Ema,
            path: "runs/1/ema-00000100.safetensors".into(),
            size_bytes: 10,
            sha256: "ab".repeat(32),
        }
    }

    #[test]
    fn kind_names_round_trip() {
        for kind in CheckpointKind::ALL {
            assert_eq!(kind.as_str().parse::<CheckpointKind>().unwrap(), kind);
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{kind}\""));
        }
        assert!(matches!(
            "EMA".parse::<CheckpointKind>(),
            Err(RegistryError::UnknownKind(_))
        ));
    }

    #[test]
    fn validation_accepts_a_good_checkpoint() {
        assert!(validate(&new_checkpoint()).is_ok());
    }

    #[test]
    fn validation_refuses_bad_checksums_sizes_and_paths() {
        for sha256 in ["AB".repeat(32), "ab".repeat(31), "zz".repeat(32)] {
            let bad = NewCheckpoint {
                sha256,
                ..new_checkpoint()
            };
            assert!(matches!(
                validate(&bad),
                Err(RegistryError::InvalidArgument(_))
            ));
        }
        let negative = NewCheckpoint {
            size_bytes: -1,
            ..new_checkpoint()
        };
        assert!(validate(&negative).is_err());
        for path in ["/etc/passwd", "../x", "runs/../../x", ""] {
            let bad = NewCheckpoint {
                path: path.into(),
                ..new_checkpoint()
            };
            assert!(
                matches!(validate(&bad), Err(RegistryError::InvalidPath(_))),
                "{path}"
            );
        }
    }
}
