//! Shared plumbing: every test runs once per backend, each time on a fresh
//! database (SQLite: a temp file; PostgreSQL: a database with a random name on
//! the server named by `DDPM_TEST_POSTGRES_URL`, dropped afterwards).
//! `TEST_LOG=1` turns the registry's tracing output on.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};

use ddpm_registry::{
    CheckpointKind, CheckpointLedger, CheckpointRecord, CheckpointStore, DirStore, Lease,
    LeasedRun, NewRun, ObjectStore, Registry, RegistryError, Run, RunStatus, S3Store,
};
pub use ddpm_testkit::{Db, FreshDatabase};

/// What a test gets.
pub struct TestContext {
    /// Connected to the test's own, migrated database.
    pub registry: Registry,
    /// The database's URL, to connect again.
    pub url: String,
    /// A scratch directory for checkpoint stores and extra files.
    pub dir: tempfile::TempDir,
    pub db: Db,
    /// The test's own bucket, when its store is S3 ([`run_on_s3`]); else the store is a
    /// directory in `dir`.
    pub s3: Option<ddpm_service::S3Spec>,
}

/// Runs `test` on a fresh database of `db`, then removes the database, also
/// when the test panics (the panic is re-raised afterwards).
pub async fn run<F, Fut>(db: Db, test: F)
where
    F: FnOnce(TestContext) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    init_logging();
    let dir = tempfile::tempdir().expect("create a temp dir");
    let scratch = FreshDatabase::create(db, dir.path()).await;
    let registry = Registry::connect(&scratch.url)
        .await
        .unwrap_or_else(|e| panic!("connect to {}: {e}", scratch.url));
    let ctx = TestContext {
        registry: registry.clone(),
        url: scratch.url.clone(),
        dir,
        db,
        s3: None,
    };
    let outcome = tokio::spawn(test(ctx)).await;
    registry.close().await;
    scratch.drop_database().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// The source tree's migrations folder for `db`'s dialect (what the registry
/// embeds).
pub fn migrations_dir(db: Db) -> PathBuf {
    let dialect = match db {
        Db::Sqlite => "sqlite",
        Db::Postgres => "postgres",
    };
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../migrations")
        .join(dialect)
}

/// The migration files of `db`'s dialect up to and including `version`.
pub fn migration_files(db: Db, version: i64) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(migrations_dir(db))
        .expect("read the migrations folder")
        .map(|entry| entry.expect("list the migrations folder").path())
        .filter(|path| {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            let number = name.split('_').next().and_then(|n| n.parse::<i64>().ok());
            name.ends_with(".sql") && number.is_some_and(|n| n <= version)
        })
        .collect();
    files.sort();
    files
}

/// Runs `test` with the URL of another fresh database of `db` whose schema is
/// what a release that shipped migration `version` left behind: only the
/// migrations up to `version` applied, recorded in `_sqlx_migrations` as sqlx
/// records them, so that `Registry::connect` later applies the rest as an
/// upgrade. The database is removed afterwards, also when `test` panics.
pub async fn with_database_at_version<F, Fut>(db: Db, version: i64, test: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let dir = tempfile::tempdir().expect("create a temp dir");
    let scratch = FreshDatabase::create(db, dir.path()).await;
    if db == Db::Sqlite {
        // An empty file is an empty SQLite database; sqlx opens only existing
        // files unless told to create them.
        std::fs::File::create(dir.path().join("registry.db")).expect("create the SQLite file");
    }
    // sqlx reads a folder; copying the released files keeps their checksums.
    let older = dir.path().join("migrations");
    std::fs::create_dir(&older).expect("create the migrations folder");
    let files = migration_files(db, version);
    assert!(!files.is_empty(), "no migrations up to {version}");
    for file in files {
        std::fs::copy(&file, older.join(file.file_name().unwrap())).expect("copy a migration");
    }
    let migrator = sqlx::migrate::Migrator::new(older)
        .await
        .expect("read the older migrations");
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&scratch.url)
        .await
        .unwrap_or_else(|e| panic!("connect to {}: {e}", scratch.url));
    migrator
        .run(&pool)
        .await
        .expect("apply the older migrations");
    pool.close().await;
    let outcome = tokio::spawn(test(scratch.url.clone())).await;
    scratch.drop_database().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// Runs `test` like [`run`] on SQLite, with the checkpoint store in a fresh bucket of
/// the S3 test server (`DDPM_TEST_S3_URL`).
pub async fn run_on_s3<F, Fut>(test: F)
where
    F: FnOnce(TestContext) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let spec = ddpm_testkit::s3_bucket("ddpm");
    run(Db::Sqlite, move |mut t| {
        t.s3 = Some(spec);
        test(t)
    })
    .await
}

/// The checkpoint store backend the tests run on: the test's bucket, or a directory in
/// its scratch directory. Every store test goes through it (or a [`store`] on it), never
/// the file system, so both backends run the same suite.
pub fn objects(t: &TestContext) -> Arc<dyn ObjectStore> {
    match &t.s3 {
        Some(spec) => Arc::new(S3Store::new(spec).expect("an S3 client")),
        None => {
            Arc::new(DirStore::new(t.dir.path().join("checkpoints")).expect("create the store"))
        }
    }
}

/// A checkpoint store on [`objects`].
pub fn store(t: &TestContext) -> CheckpointStore {
    CheckpointStore::on(objects(t))
}

/// The names of the objects in run `run_id`'s folder, sorted.
pub fn objects_of(objects: &dyn ObjectStore, run_id: i64) -> Vec<String> {
    let prefix = format!("runs/{run_id}/");
    let keys = objects.list(&format!("runs/{run_id}")).expect("list a run");
    keys.iter()
        .map(|listed| {
            listed
                .key
                .strip_prefix(&prefix)
                .expect("a key in the run")
                .to_owned()
        })
        .collect()
}

/// Writes `bytes` as checkpoint `kind` of run `run_id` at `step` and registers it
/// through `ledger`, the way a trainer does.
pub async fn save(
    store: &CheckpointStore,
    ledger: &impl CheckpointLedger,
    run_id: i64,
    step: i64,
    kind: CheckpointKind,
    bytes: &[u8],
) -> Result<CheckpointRecord, RegistryError> {
    let file = store.write_bytes(&store.path_for(run_id, step, kind), bytes)?;
    store.register(ledger, run_id, step, kind, &file).await
}

fn init_logging() {
    static ONCE: Once = Once::new();
    if std::env::var_os("TEST_LOG").is_some() {
        ONCE.call_once(|| {
            tracing_subscriber::fmt()
                .with_env_filter("ddpm_registry=debug,sqlx=info")
                .with_test_writer()
                .init();
        });
    }
}

/// A run to queue, numbered so tests can tell runs apart by config.
pub fn new_run(n: i64) -> NewRun {
    NewRun {
        config: serde_json::json!({ "n": n, "model": { "base_width": 64, "attention": [false, true] } }),
        dataset: serde_json::json!({
            "path": "data/demo",
            "image_count": 120,
            "class_names": ["circle", "square"],
        }),
        total_steps: 1000,
    }
}

/// Queues `count` runs; returns them oldest first.
pub async fn queue_runs(registry: &Registry, count: i64) -> Vec<Run> {
    let mut runs = Vec::new();
    for n in 0..count {
        runs.push(registry.create_run(&new_run(n)).await.expect("create run"));
    }
    runs
}

/// Queues a run and claims it for `host`.
/// The lease `run` was claimed under.
pub fn lease(registry: &Registry, run: &Run) -> LeasedRun {
    registry.leased(Lease::of(run).expect("a claimed run"))
}

/// `run`'s lease, but as if `worker` held it (a worker that lost it, or never had it).
pub fn lease_as(registry: &Registry, run: &Run, worker: &str) -> LeasedRun {
    registry.leased(Lease {
        worker: worker.into(),
        ..Lease::of(run).expect("a claimed run")
    })
}

pub async fn running_run(registry: &Registry, host: &str) -> Run {
    let queued = registry.create_run(&new_run(0)).await.expect("create run");
    let run = registry
        .claim_next_queued(host)
        .await
        .expect("claim")
        .expect("a queued run");
    assert_eq!(run.id, queued.id, "no other queued run expected");
    assert_eq!(run.status, RunStatus::Running);
    run
}
