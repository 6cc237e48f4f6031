//! Connecting and migrating.

use ddpm_registry::{Backend, Registry, RegistryError};
use ddpm_testkit::both_backends;

use crate::helpers::{migration_files, new_run, Db, TestContext};

async fn connecting_again_is_idempotent(t: TestContext) {
    let run = t.registry.create_run(&new_run(1)).await.unwrap();
    // A second start-up migrates nothing and sees the same data.
    let again = Registry::connect(&t.url).await.unwrap();
    assert_eq!(again.get_run(run.id).await.unwrap(), Some(run));
    again.close().await;
    let raw = sqlx::AnyPool::connect(&t.url).await.unwrap();
    let (migrations,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM _sqlx_migrations WHERE success")
            .fetch_one(&raw)
            .await
            .unwrap();
    // Every migration file of the dialect, each applied once.
    assert_eq!(migrations, migration_files(t.db, i64::MAX).len() as i64);
    raw.close().await;
}

async fn concurrent_start_ups_all_succeed(t: TestContext) {
    let connects: Vec<_> = (0..4)
        .map(|_| {
            let url = t.url.clone();
            tokio::spawn(async move { Registry::connect(&url).await })
        })
        .collect();
    for connect in connects {
        let registry = connect.await.unwrap().unwrap();
        registry.ping().await.unwrap();
        registry.close().await;
    }
}

async fn backend_and_ping(t: TestContext) {
    let expected = match t.db {
        Db::Sqlite => Backend::Sqlite,
        Db::Postgres => Backend::Postgres,
    };
    assert_eq!(t.registry.backend(), expected);
    assert_eq!(Backend::from_url(&t.url).unwrap(), expected);
    t.registry.ping().await.unwrap();
}

async fn a_closed_registry_reports_errors(t: TestContext) {
    let missing = t.registry.get_run(424242).await.unwrap();
    assert!(missing.is_none());
    t.registry.close().await;
    let error = t.registry.ping().await.unwrap_err();
    assert!(matches!(error, RegistryError::Database(_)), "{error:?}");
    // What a caller answers "try again later" for, unlike a query's own failure.
    assert!(error.is_unavailable(), "{error:?}");
    assert!(!RegistryError::RunNotFound(1).is_unavailable());
}

both_backends!(
    crate::helpers::run;
    connecting_again_is_idempotent,
    concurrent_start_ups_all_succeed,
    backend_and_ping,
    a_closed_registry_reports_errors,
);

#[tokio::test]
async fn sqlite_file_and_directories_are_created() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data/nested/registry.db");
    let registry = Registry::connect(&format!("sqlite:{}", file.display()))
        .await
        .unwrap();
    assert!(file.is_file());
    registry.create_run(&new_run(1)).await.unwrap();
    registry.close().await;
    // sqlite://…?mode=rwc works too.
    let other = dir.path().join("other.db");
    let registry = Registry::connect(&format!("sqlite://{}?mode=rwc", other.display()))
        .await
        .unwrap();
    registry.ping().await.unwrap();
    registry.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_first_start_ups_racing_on_a_new_file_all_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("fresh.db").display());
    let connects: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { Registry::connect(&url).await })
        })
        .collect();
    for connect in connects {
        let registry = connect.await.unwrap().unwrap();
        assert_eq!(registry.count_runs(None).await.unwrap(), 0);
        registry.close().await;
    }
}

#[tokio::test]
async fn sqlite_in_memory_works_with_its_single_connection() {
    let registry = Registry::connect("sqlite::memory:").await.unwrap();
    let run = registry.create_run(&new_run(1)).await.unwrap();
    assert_eq!(registry.get_run(run.id).await.unwrap(), Some(run));
}

#[tokio::test]
async fn unsupported_urls_are_refused() {
    assert!(matches!(
        Registry::connect("mysql://root:secret@localhost/ddpm").await,
        Err(RegistryError::UnsupportedUrl(url)) if !url.contains("secret")
    ));
}
