//! Connecting: backend choice from the URL, the pool, migrations, and the
//! few SQL fragments that differ between the dialects.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::any::AnyPoolOptions;
use sqlx::migrate::Migrator;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::AnyPool;

use crate::error::{RegistryError, Result};

static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("../../migrations/postgres");
static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("../../migrations/sqlite");

/// How often [`Registry::connect`] retries the SQLite migrations (see there).
const SQLITE_MIGRATION_ATTEMPTS: u32 = 3;

/// Which database a [`Registry`] talks to; picked by the URL's scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// `postgres://…` or `postgresql://…`: the deployment database.
    Postgres,
    /// `sqlite:path`, `sqlite://path?mode=rwc`, `sqlite::memory:`: the
    /// zero-configuration default.
    Sqlite,
}

impl Backend {
    /// The backend a connection URL names.
    pub fn from_url(url: &str) -> Result<Backend> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else {
            Err(RegistryError::UnsupportedUrl(redact_password(url)))
        }
    }

    /// SQL for "now" in unix milliseconds, on the database's clock. Every
    /// timestamp is taken from the database so that heartbeats written by one
    /// host and compared by another share one clock. It is fixed for the whole
    /// statement on both backends (PostgreSQL's `statement_timestamp()`, SQLite's
    /// 'now' within one step), so one UPDATE's `updated_at` and `heartbeat_at` are
    /// equal; `clock_timestamp()` would differ between the two by a millisecond now
    /// and then.
    pub(crate) fn now_ms(self) -> &'static str {
        match self {
            Backend::Postgres => "CAST(EXTRACT(EPOCH FROM statement_timestamp()) * 1000 AS BIGINT)",
            // unixepoch('subsec') needs SQLite 3.42; sqlx bundles 3.46.
            Backend::Sqlite => "CAST(unixepoch('subsec') * 1000 AS INTEGER)",
        }
    }

    /// Row-lock clause for a queue claim's inner `SELECT`. SQLite needs none:
    /// an `UPDATE` takes the database's write lock before it reads.
    pub(crate) fn skip_locked(self) -> &'static str {
        match self {
            Backend::Postgres => "FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        }
    }
}

/// A handle on the run registry. Cloning is cheap (the pool is shared).
#[derive(Debug, Clone)]
pub struct Registry {
    pub(crate) pool: AnyPool,
    pub(crate) backend: Backend,
    /// The connection URL, for the dedicated `LISTEN` connection of
    /// [`Registry::announcements`].
    pub(crate) url: std::sync::Arc<str>,
}

impl Registry {
    /// Connects to `url` and brings the schema up to date.
    ///
    /// For SQLite the file and its parent directories are created when
    /// missing and the database is switched to WAL so that a trainer and a
    /// server can use it at once. Migrations are idempotent; on PostgreSQL
    /// concurrent start-ups serialise on sqlx's advisory lock, on SQLite (no
    /// such lock) a start-up that loses the race retries.
    ///
    /// Installs sqlx's default `Any` drivers (once per process): code that
    /// installs other drivers with `sqlx::any::install_drivers` must not run
    /// in the same process.
    #[tracing::instrument(skip_all, fields(url = %redact_password(url)))]
    pub async fn connect(url: &str) -> Result<Registry> {
        sqlx::any::install_default_drivers();
        let backend = Backend::from_url(url)?;
        let options = match backend {
            Backend::Postgres => AnyPoolOptions::new().max_connections(10),
            Backend::Sqlite if is_sqlite_memory(url) => {
                // Each connection to `:memory:` would be a fresh database:
                // keep exactly one, forever.
                AnyPoolOptions::new()
                    .max_connections(1)
                    .min_connections(1)
                    .idle_timeout(None)
                    .max_lifetime(None)
            }
            Backend::Sqlite => {
                create_sqlite_file(url)?;
                AnyPoolOptions::new().max_connections(5)
            }
        };
        let pool = options
            .acquire_timeout(Duration::from_secs(30))
            .connect(url)
            .await?;
        if backend == Backend::Sqlite && !is_sqlite_memory(url) {
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&pool)
                .await?;
        }
        let registry = Registry {
            pool,
            backend,
            url: url.into(),
        };
        registry.migrate().await?;
        tracing::debug!(?backend, "registry connected");
        Ok(registry)
    }

    async fn migrate(&self) -> Result<()> {
        match self.backend {
            Backend::Postgres => POSTGRES_MIGRATIONS.run(&self.pool).await?,
            Backend::Sqlite => {
                let mut attempt = 1;
                loop {
                    match self.migrate_sqlite().await {
                        Ok(()) => break,
                        Err(e) if attempt < SQLITE_MIGRATION_ATTEMPTS => {
                            tracing::debug!(error = %e, attempt, "SQLite migration raced, retrying");
                            tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt)))
                                .await;
                            attempt += 1;
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Ok(())
    }

    /// Applies the SQLite migrations on one connection with foreign keys off, as
    /// SQLite's procedure for rebuilding a table asks (0004 rebuilds `runs`; with
    /// them on, dropping the old table would cascade into `metrics`), then checks
    /// every foreign key and turns them back on, whatever the outcome.
    async fn migrate_sqlite(&self) -> Result<()> {
        let mut conn = self.pool.acquire().await?;
        sqlx::query("PRAGMA foreign_keys = OFF")
            .execute(&mut *conn)
            .await?;
        let migrated = SQLITE_MIGRATIONS.run_direct(&mut *conn).await;
        let checked = sqlx::query("PRAGMA foreign_key_check")
            .fetch_optional(&mut *conn)
            .await;
        let restored = sqlx::query("PRAGMA foreign_keys = ON")
            .execute(&mut *conn)
            .await;
        if restored.is_err() {
            // Never hand a connection without foreign keys back to the pool.
            conn.detach();
        }
        migrated?;
        if checked?.is_some() {
            return Err(sqlx::Error::Protocol(
                "a migration left rows whose foreign key points at nothing \
                 (PRAGMA foreign_key_check)"
                    .into(),
            )
            .into());
        }
        restored?;
        Ok(())
    }

    /// The backend this registry talks to.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Checks that the database answers (for health endpoints).
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Closes every connection of the pool; later calls fail.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// `sqlite::memory:` and `?mode=memory` databases live in the process.
fn is_sqlite_memory(url: &str) -> bool {
    url.starts_with("sqlite::memory:") || url.contains("mode=memory")
}

/// Creates the SQLite file (an empty file is an empty database) and its
/// directories, so that `sqlite:data/ddpm.db` works without `?mode=rwc`.
fn create_sqlite_file(url: &str) -> Result<()> {
    let options = SqliteConnectOptions::from_str(url)?;
    let file = options.get_filename();
    if file.exists() {
        return Ok(());
    }
    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(RegistryError::io(dir))?;
    }
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(file)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(RegistryError::io(Path::new(file))(e)),
    }
}

/// The URL with any password replaced by `***`, for logs and errors.
pub fn redact_password(url: &str) -> String {
    match password_span(url) {
        Some((before, _, after)) => format!("{before}***{after}"),
        None => url.to_owned(),
    }
}

/// The password of a `scheme://user:password@host/…` URL, percent-decoded; `None` when
/// it has none.
pub fn database_password(url: &str) -> Option<String> {
    let (_, password, _) = password_span(url)?;
    let bytes = password.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok())
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// A URL split around its password, as written: (`scheme://user:`, password,
/// `@host…`); `None` when it has none.
fn password_span(url: &str) -> Option<(&str, &str, &str)> {
    let scheme_end = url.find("://")? + 3;
    let rest = &url[scheme_end..];
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    let user_info = &authority[..authority.rfind('@')?];
    let colon = user_info.find(':')?;
    let start = scheme_end + colon + 1;
    let end = scheme_end + user_info.len();
    Some((&url[..start], &url[start..end], &url[end..]))
}

/// A stored timestamp (unix milliseconds) as a `DateTime`.
pub(crate) fn from_millis(
    table: &'static str,
    id: i64,
    millis: i64,
) -> Result<DateTime<Utc>, RegistryError> {
    DateTime::from_timestamp_millis(millis).ok_or_else(|| RegistryError::CorruptRow {
        table,
        id,
        reason: format!("timestamp {millis} ms is out of range"),
    })
}

/// A stored optional timestamp as a `DateTime`.
pub(crate) fn from_millis_opt(
    table: &'static str,
    id: i64,
    millis: Option<i64>,
) -> Result<Option<DateTime<Utc>>, RegistryError> {
    millis.map(|ms| from_millis(table, id, ms)).transpose()
}

/// Maps a foreign-key violation (a row naming a run that does not exist)
/// to [`RegistryError::RunNotFound`].
pub(crate) fn run_fk(run_id: i64) -> impl FnOnce(sqlx::Error) -> RegistryError {
    move |e| match &e {
        sqlx::Error::Database(db) if db.is_foreign_key_violation() => {
            RegistryError::RunNotFound(run_id)
        }
        _ => RegistryError::Database(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_follows_the_scheme() {
        assert_eq!(
            Backend::from_url("postgres://u@h/db").ok(),
            Some(Backend::Postgres)
        );
        assert_eq!(
            Backend::from_url("postgresql://u@h/db").ok(),
            Some(Backend::Postgres)
        );
        assert_eq!(
            Backend::from_url("sqlite:data/x.db").ok(),
            Some(Backend::Sqlite)
        );
        assert_eq!(
            Backend::from_url("sqlite://x.db?mode=rwc").ok(),
            Some(Backend::Sqlite)
        );
        assert!(matches!(
            Backend::from_url("mysql://u:secret@h/db"),
            Err(RegistryError::UnsupportedUrl(u)) if !u.contains("secret")
        ));
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_password("postgres://ddpm:hunter2@db:5432/ddpm?sslmode=disable"),
            "postgres://ddpm:***@db:5432/ddpm?sslmode=disable"
        );
        assert_eq!(
            redact_password("postgres://ddpm@db/ddpm"),
            "postgres://ddpm@db/ddpm"
        );
        assert_eq!(redact_password("sqlite:data/x.db"), "sqlite:data/x.db");
    }

    #[test]
    fn sqlite_file_and_dirs_are_created() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a/b/registry.db");
        let url = format!("sqlite:{}", file.display());
        create_sqlite_file(&url).unwrap();
        assert!(file.is_file());
        // A second call leaves the existing file alone.
        std::fs::write(&file, b"x").unwrap();
        create_sqlite_file(&url).unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
    }

    #[test]
    fn memory_urls_are_recognised() {
        assert!(is_sqlite_memory("sqlite::memory:"));
        assert!(is_sqlite_memory("sqlite:x?mode=memory"));
        assert!(!is_sqlite_memory("sqlite:data/memory.db"));
    }

    #[test]
    fn millis_round_trip() {
        let t = from_millis("runs", 1, 1_700_000_000_123).unwrap();
        assert_eq!(t.timestamp_millis(), 1_700_000_000_123);
        assert!(from_millis("runs", 1, i64::MAX).is_err());
        assert_eq!(from_millis_opt("runs", 1, None).unwrap(), None);
    }
}
