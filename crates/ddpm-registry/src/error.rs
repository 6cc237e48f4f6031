//! The crate's one error type. It depends on no other module of the crate, so that every module can use it.

use std::path::PathBuf;

/// `Result` with [`RegistryError`].
pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

/// Everything the registry and the checkpoint store can fail with.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The connection URL names no supported backend.
    #[error("unsupported database URL {0:?}: expected postgres://… or sqlite:…")]
    UnsupportedUrl(String),

    /// A query, a connection or the pool failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),

    /// Applying the migrations failed (e.g. an applied migration was edited).
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),

    /// No run has this id.
    #[error("run {0} not found")]
    RunNotFound(i64),

    /// No checkpoint has this id.
    #[error("checkpoint {0} not found")]
    CheckpointNotFound(i64),

    /// An operator action the run's state does not allow (deleting a running run,
    /// restarting a completed one without `--from-scratch`, …), with the reason.
    #[error("run {id}: {reason}")]
    Refused { id: i64, reason: String },

    /// A heartbeat for a run this worker no longer holds: another worker
    /// claimed it (the heartbeat had gone stale) or it was finished.
    #[error("run {id} is no longer running on {host}")]
    ClaimLost { id: i64, host: String },

    /// An argument the caller passed is out of range or malformed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// A stored row holds a value this version cannot read.
    #[error("corrupt {table} row {id}: {reason}")]
    CorruptRow {
        table: &'static str,
        id: i64,
        reason: String,
    },

    /// A string is not one of the run statuses.
    #[error(
        "unknown run status {0:?} (expected queued, running, completed, failed, interrupted or cancelled)"
    )]
    UnknownStatus(String),

    /// A string is not one of the checkpoint kinds.
    #[error("unknown checkpoint kind {0:?} (expected ema or state)")]
    UnknownKind(String),

    /// Serialising a run's config or dataset summary failed.
    #[error("JSON error: {0}")]
    Json(#[from] serde_json::Error),

    /// A file-system operation of the checkpoint store failed.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The checkpoint store holds nothing under this key (a store not mounted, a file
    /// deleted behind the registry's back).
    #[error("no object {0:?} in the checkpoint store")]
    ObjectMissing(String),

    /// The checkpoint store did not answer in time, or answered with a server error,
    /// after its retries (an S3 server down or overloaded, a network cut): may pass.
    #[error("checkpoint store unavailable: {0}")]
    StoreUnavailable(String),

    /// The checkpoint store refused the request for a reason that will not pass by
    /// itself: credentials refused, a bucket that does not exist, a request the server
    /// does not support. Someone must act.
    #[error("checkpoint store refused: {0}")]
    StoreRefused(String),

    /// A write found its key taken by other bytes: keys carry the content's hash, so
    /// this is not a retry of the same write, and the object is left as it is.
    #[error(
        "object {0:?} exists in the checkpoint store with other content; it is never overwritten"
    )]
    ObjectConflict(String),

    /// A path is not a plain relative path inside the store.
    #[error("invalid store path {0:?}: must be relative, non-empty, without `.`/`..`")]
    InvalidPath(String),

    /// A checkpoint file's content does not match its registered checksum.
    #[error("checksum mismatch for {}: registered {expected}, file has {actual}", path.display())]
    ChecksumMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
}

impl RegistryError {
    /// Whether the database could not be reached at all, as opposed to a query that
    /// failed: a caller may answer "try again later" rather than "internal error". That is
    /// no connection in time, the pool shut down, a broken or refused connection, or
    /// PostgreSQL refusing sessions: SQLSTATE class 08 (connection exception), 57P0x
    /// (shutting down, starting up), 53300 (too many connections) and 55000 (a database
    /// not accepting connections; no query of ours raises it otherwise).
    pub fn is_unavailable(&self) -> bool {
        let RegistryError::Database(e) = self else {
            return false;
        };
        match e {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => true,
            sqlx::Error::Database(db) => db.code().is_some_and(|code| {
                code.starts_with("08")
                    || code.starts_with("57P")
                    || code == "53300"
                    || code == "55000"
            }),
            _ => false,
        }
    }
}

impl RegistryError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> RegistryError {
        let path = path.into();
        move |source| RegistryError::Io { path, source }
    }
}
