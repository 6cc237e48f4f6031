//! Checkpoint rows: registering, finding the newest, listing, deleting.

use ddpm_registry::{CheckpointKind, NewCheckpoint, RegistryError};
use ddpm_testkit::both_backends;

use crate::helpers::{running_run, TestContext};

fn checkpoint(run_id: i64, step: i64, kind: CheckpointKind) -> NewCheckpoint {
    NewCheckpoint {
        run_id,
        step,
        kind,
        path: format!("runs/{run_id}/{kind}-{step:08}.safetensors"),
        size_bytes: 1000 + step,
        sha256: format!("{:064x}", step),
    }
}

async fn registered_checkpoints_read_back(t: TestContext) {
    let run = running_run(&t.registry, "h").await;
    let new = checkpoint(run.id, 100, CheckpointKind::Ema);
    let record = t.registry.register_checkpoint(&new).await.unwrap();
    assert_eq!(
        (record.run_id, record.step, record.kind),
        (run.id, 100, CheckpointKind::Ema)
    );
    assert_eq!(
        (&record.path, record.size_bytes, &record.sha256),
        (&new.path, new.size_bytes, &new.sha256)
    );
    assert!((chrono::Utc::now() - record.created_at).num_seconds().abs() < 60);
    assert_eq!(
        t.registry.get_checkpoint(record.id).await.unwrap(),
        Some(record.clone())
    );
    assert_eq!(
        t.registry.get_checkpoint(record.id + 100).await.unwrap(),
        None
    );
    let json = serde_json::to_value(&record).unwrap();
    assert_eq!(json["kind"], "ema");
}

async fn newest_is_the_last_registered_optionally_pinned(t: TestContext) {
    let a = running_run(&t.registry, "h").await;
    let b = running_run(&t.registry, "h").await;
    assert_eq!(
        t.registry
            .newest_checkpoint(None, CheckpointKind::Ema)
            .await
            .unwrap(),
        None
    );
    let a_100 = t
        .registry
        .register_checkpoint(&checkpoint(a.id, 100, CheckpointKind::Ema))
        .await
        .unwrap();
    let b_50 = t
        .registry
        .register_checkpoint(&checkpoint(b.id, 50, CheckpointKind::Ema))
        .await
        .unwrap();
    let a_state = t
        .registry
        .register_checkpoint(&checkpoint(a.id, 200, CheckpointKind::State))
        .await
        .unwrap();

    let newest = |run_id, kind| {
        let registry = t.registry.clone();
        async move {
            registry
                .newest_checkpoint(run_id, kind)
                .await
                .unwrap()
                .map(|c| c.id)
        }
    };
    // Newest by registration, not by step; kinds are separate.
    assert_eq!(newest(None, CheckpointKind::Ema).await, Some(b_50.id));
    assert_eq!(
        newest(Some(a.id), CheckpointKind::Ema).await,
        Some(a_100.id)
    );
    assert_eq!(newest(Some(b.id), CheckpointKind::Ema).await, Some(b_50.id));
    assert_eq!(newest(None, CheckpointKind::State).await, Some(a_state.id));
    assert_eq!(newest(Some(b.id), CheckpointKind::State).await, None);
    assert_eq!(newest(Some(b.id + 100), CheckpointKind::Ema).await, None);
}

async fn listing_is_by_step(t: TestContext) {
    let run = running_run(&t.registry, "h").await;
    let other = running_run(&t.registry, "h").await;
    for (step, kind) in [
        (300, CheckpointKind::Ema),
        (100, CheckpointKind::State),
        (100, CheckpointKind::Ema),
    ] {
        t.registry
            .register_checkpoint(&checkpoint(run.id, step, kind))
            .await
            .unwrap();
    }
    t.registry
        .register_checkpoint(&checkpoint(other.id, 200, CheckpointKind::Ema))
        .await
        .unwrap();
    let listed: Vec<_> = t
        .registry
        .list_checkpoints(run.id)
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.step, c.kind))
        .collect();
    assert_eq!(
        listed,
        [
            (100, CheckpointKind::State),
            (100, CheckpointKind::Ema),
            (300, CheckpointKind::Ema)
        ]
    );
    assert!(t
        .registry
        .list_checkpoints(other.id + 100)
        .await
        .unwrap()
        .is_empty());
}

async fn registering_a_path_again_replaces_it(t: TestContext) {
    let run = running_run(&t.registry, "h").await;
    let first = t
        .registry
        .register_checkpoint(&checkpoint(run.id, 100, CheckpointKind::Ema))
        .await
        .unwrap();
    let later = t
        .registry
        .register_checkpoint(&checkpoint(run.id, 200, CheckpointKind::Ema))
        .await
        .unwrap();
    // A resumed attempt saves step 100 again, to the same path.
    let mut again = checkpoint(run.id, 100, CheckpointKind::Ema);
    again.sha256 = "f".repeat(64);
    let replaced = t.registry.register_checkpoint(&again).await.unwrap();
    assert!(replaced.id > later.id);
    assert_eq!(t.registry.get_checkpoint(first.id).await.unwrap(), None);
    let listed = t.registry.list_checkpoints(run.id).await.unwrap();
    assert_eq!(listed, [replaced.clone(), later]);
    assert_eq!(
        t.registry
            .newest_checkpoint(Some(run.id), CheckpointKind::Ema)
            .await
            .unwrap(),
        Some(replaced)
    );
}

async fn bad_registrations_are_refused(t: TestContext) {
    let run = running_run(&t.registry, "h").await;
    assert!(matches!(
        t.registry
            .register_checkpoint(&checkpoint(run.id + 100, 1, CheckpointKind::Ema))
            .await,
        Err(RegistryError::RunNotFound(id)) if id == run.id + 100
    ));
    let mut bad_sha = checkpoint(run.id, 1, CheckpointKind::Ema);
    bad_sha.sha256 = "not hex".into();
    assert!(matches!(
        t.registry.register_checkpoint(&bad_sha).await,
        Err(RegistryError::InvalidArgument(_))
    ));
    let mut escaping = checkpoint(run.id, 1, CheckpointKind::Ema);
    escaping.path = "../../etc/passwd".into();
    assert!(matches!(
        t.registry.register_checkpoint(&escaping).await,
        Err(RegistryError::InvalidPath(_))
    ));
    assert!(t
        .registry
        .list_checkpoints(run.id)
        .await
        .unwrap()
        .is_empty());
}

async fn deleting_removes_the_row(t: TestContext) {
    let run = running_run(&t.registry, "h").await;
    let older = t
        .registry
        .register_checkpoint(&checkpoint(run.id, 100, CheckpointKind::Ema))
        .await
        .unwrap();
    let newer = t
        .registry
        .register_checkpoint(&checkpoint(run.id, 200, CheckpointKind::Ema))
        .await
        .unwrap();
    t.registry.delete_checkpoint(newer.id).await.unwrap();
    assert_eq!(t.registry.get_checkpoint(newer.id).await.unwrap(), None);
    assert_eq!(
        t.registry
            .newest_checkpoint(None, CheckpointKind::Ema)
            .await
            .unwrap(),
        Some(older)
    );
    assert!(matches!(
        t.registry.delete_checkpoint(newer.id).await,
        Err(RegistryError::CheckpointNotFound(id)) if id == newer.id
    ));
    // Ids are never reused: the next registration is newer than the deleted one.
    let next = t
        .registry
        .register_checkpoint(&checkpoint(run.id, 300, CheckpointKind::Ema))
        .await
        .unwrap();
    assert!(next.id > newer.id);
}

both_backends!(
    crate::helpers::run;
    registered_checkpoints_read_back,
    newest_is_the_last_registered_optionally_pinned,
    listing_is_by_step,
    registering_a_path_again_replaces_it,
    bad_registrations_are_refused,
    deleting_removes_the_row,
);

/// PostgreSQL announces every registration on `ddpm_checkpoints`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_announces_registered_checkpoints() {
    crate::helpers::run(crate::helpers::Db::Postgres, |t: TestContext| async move {
        let mut listener = sqlx::postgres::PgListener::connect(&t.url).await.unwrap();
        listener
            .listen(ddpm_registry::CHECKPOINT_CHANNEL)
            .await
            .unwrap();
        let run = running_run(&t.registry, "h").await;
        let record = t
            .registry
            .register_checkpoint(&checkpoint(run.id, 100, CheckpointKind::Ema))
            .await
            .unwrap();
        let note = tokio::time::timeout(std::time::Duration::from_secs(10), listener.recv())
            .await
            .expect("a notification within 10 s")
            .unwrap();
        assert_eq!(note.channel(), ddpm_registry::CHECKPOINT_CHANNEL);
        assert_eq!(note.payload(), record.id.to_string());
        // A refused registration announces nothing.
        let _ = t
            .registry
            .register_checkpoint(&checkpoint(run.id + 100, 1, CheckpointKind::Ema))
            .await
            .unwrap_err();
        let quiet =
            tokio::time::timeout(std::time::Duration::from_millis(300), listener.recv()).await;
        assert!(quiet.is_err(), "unexpected notification {quiet:?}");
        listener.unlisten_all().await.unwrap();
    })
    .await;
}

/// `Registry::announcements` turns those notifications into "look now": once per
/// registration, and once more after the LISTEN connection was cut (what was announced
/// while it was down is lost, so the caller must look).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_announcements_wake_on_registration_and_reconnect() {
    use sqlx::Connection;
    use std::time::Duration;
    crate::helpers::run(crate::helpers::Db::Postgres, |t: TestContext| async move {
        let mut announcements = t.registry.announcements().await;
        let run = running_run(&t.registry, "h").await;
        t.registry
            .register_checkpoint(&checkpoint(run.id, 100, CheckpointKind::Ema))
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), announcements.next())
            .await
            .expect("an announcement within 10 s");

        // Cut the LISTEN connection from the server side, as a database restart would.
        let mut admin = sqlx::PgConnection::connect(&t.url).await.unwrap();
        let cut: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND query ILIKE 'LISTEN%'",
        )
        .fetch_all(&mut admin)
        .await
        .unwrap();
        assert_eq!(cut, [true], "one LISTEN connection to cut");
        tokio::time::timeout(Duration::from_secs(10), announcements.next())
            .await
            .expect("the lost connection is reported as a wake-up");
        // Listening again: the next registration is announced.
        t.registry
            .register_checkpoint(&checkpoint(run.id, 200, CheckpointKind::Ema))
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), announcements.next())
            .await
            .expect("an announcement after the reconnect");
    })
    .await;
}

/// SQLite has no announcements: `next` never completes, callers rely on polling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_has_no_announcements() {
    crate::helpers::run(crate::helpers::Db::Sqlite, |t: TestContext| async move {
        // The whole context, not just the registry: its temp dir holds the database file
        // (an `async move` block captures only the fields it uses).
        let t = t;
        let mut announcements = t.registry.announcements().await;
        let run = running_run(&t.registry, "h").await;
        t.registry
            .register_checkpoint(&checkpoint(run.id, 100, CheckpointKind::Ema))
            .await
            .unwrap();
        let woke =
            tokio::time::timeout(std::time::Duration::from_millis(300), announcements.next()).await;
        assert!(woke.is_err(), "SQLite announced something");
    })
    .await;
}
