//! Shared plumbing: every test runs once per backend, each time on a fresh
//! database (SQLite: a temp file; PostgreSQL: a database with a random name on
//! the server named by `DDPM_TEST_POSTGRES_URL`, dropped afterwards).
//! `TEST_LOG=1` turns the registry's tracing output on.

use std::future::Future;
use std::sync::Once;

use ddpm_registry::{NewRun, Registry, Run, RunStatus};
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
}

/// Generates, for each named `async fn(TestContext)` of the enclosing module,
/// a `sqlite::<name>` and a `postgres::<name>` test.
macro_rules! both_backends {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    crate::helpers::run(crate::helpers::Db::Sqlite, super::$test).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    crate::helpers::run(crate::helpers::Db::Postgres, super::$test).await;
                }
            )*
        }
    };
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
    };
    let outcome = tokio::spawn(test(ctx)).await;
    registry.close().await;
    scratch.drop_database().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
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
