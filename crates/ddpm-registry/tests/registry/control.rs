//! Leases (every write of a worker that lost its run is refused and changes nothing),
//! the claim order, the operator's cancel / restart / delete, and the 0004 upgrade.

use std::time::Duration;

use chrono::Utc;
use ddpm_registry::{
    CheckpointKind, CheckpointStore, FinalStatus, MetricPoint, NewCheckpoint, Registry,
    RegistryError, RunStatus, RunWorld,
};
use ddpm_testkit::both_backends;

use crate::helpers::{
    lease, new_run, objects, objects_of, queue_runs, running_run, save, store,
    with_database_at_version, TestContext,
};

fn point(step: i64) -> MetricPoint {
    MetricPoint {
        step,
        loss: 0.5,
        learning_rate: 1e-3,
        grad_norm: None,
        images_per_sec: None,
        recorded_at: Utc::now(),
        loss_smoothed: None,
        loss_by_timestep: [None; 4],
    }
}

fn lost(result: Result<impl std::fmt::Debug, RegistryError>) -> bool {
    matches!(result, Err(RegistryError::ClaimLost { .. }))
}

async fn a_lost_lease_writes_nothing(t: TestContext) {
    let store = store(&t);
    let first = running_run(&t.registry, "w").await;
    let old = lease(&t.registry, &first);
    old.record_metrics(&[point(10), point(20)]).await.unwrap();
    save(&store, &old, first.id, 20, CheckpointKind::State, b"state")
        .await
        .unwrap();
    // The worker falls silent; the same worker name claims the run again (a new
    // attempt): the old lease is gone even though the name matches.
    tokio::time::sleep(Duration::from_millis(30)).await;
    let again = t
        .registry
        .claim_next("w", Duration::from_millis(10))
        .await
        .unwrap()
        .expect("the stale run");
    assert_eq!((again.id, again.attempts), (first.id, 2));
    let new = lease(&t.registry, &again);

    assert!(lost(old.heartbeat(999).await));
    assert!(lost(old.record_metrics(&[point(30)]).await));
    assert!(lost(old.truncate_metrics_after(0).await));
    let file = store
        .write_bytes(
            &store.path_for(first.id, 30, CheckpointKind::Ema),
            b"zombie",
        )
        .unwrap();
    assert!(lost(
        store
            .register(&old, first.id, 30, CheckpointKind::Ema, &file)
            .await
    ));
    assert!(lost(store.apply_retention(&old, first.id, 0).await));
    assert!(lost(old.finish(FinalStatus::Failed, Some("zombie")).await));
    assert!(lost(old.defer("zombie", Duration::ZERO).await));
    assert!(lost(old.crashed("zombie").await));
    let zombie_world = RunWorld {
        size: 1,
        devices: vec!["cpu".into()],
    };
    assert!(lost(old.record_world(&zombie_world).await));

    // Nothing of the old attempt's late writes is there.
    let run = t.registry.get_run(first.id).await.unwrap().unwrap();
    assert_eq!(
        (run.status, run.current_step, run.error),
        (RunStatus::Running, 0, None)
    );
    assert_eq!((run.crashes, run.world), (1, None));
    let steps: Vec<i64> = t
        .registry
        .metrics(first.id, None, None, 100)
        .await
        .unwrap()
        .iter()
        .map(|p| p.step)
        .collect();
    assert_eq!(steps, [10, 20]);
    let checkpoints = t.registry.list_checkpoints(first.id).await.unwrap();
    assert_eq!(checkpoints.len(), 1);
    assert_eq!(checkpoints[0].step, 20);

    // The new holder writes as usual, and may not register another run's files.
    new.heartbeat(5).await.unwrap();
    new.truncate_metrics_after(10).await.unwrap();
    assert_eq!(
        t.registry
            .metrics(first.id, None, None, 100)
            .await
            .unwrap()
            .len(),
        1
    );
    let other = t.registry.create_run(&new_run(9)).await.unwrap();
    assert!(matches!(
        new.register_checkpoint(&NewCheckpoint {
            run_id: other.id,
            step: 1,
            kind: CheckpointKind::Ema,
            path: format!("runs/{}/ema-00000001.safetensors", other.id),
            size_bytes: 1,
            sha256: "ab".repeat(32),
        })
        .await,
        Err(RegistryError::InvalidArgument(_))
    ));
    new.finish(FinalStatus::Completed, None).await.unwrap();
}

async fn claims_go_by_when_a_run_may_next_be_tried(t: TestContext) {
    // A run that crashed its worker, queued runs behind it, a deferred run.
    let crashed = running_run(&t.registry, "dead").await;
    let deferred = running_run(&t.registry, "w").await;
    lease(&t.registry, &deferred)
        .defer("store not mounted", Duration::from_secs(3600))
        .await
        .unwrap();
    let queued = queue_runs(&t.registry, 2).await;
    // With a long staleness limit the crashed run is not due before the queued ones:
    // they go first, in order; the deferred one waits for its time.
    let stale = Duration::from_millis(200);
    tokio::time::sleep(Duration::from_millis(250)).await;
    let order: Vec<i64> = {
        let mut ids = Vec::new();
        while let Some(run) = t.registry.claim_next("w2", stale).await.unwrap() {
            ids.push(run.id);
            if ids.len() > 5 {
                break;
            }
        }
        ids
    };
    // The crashed run became due 200 ms after its last heartbeat, later than the queued
    // runs were created: they come first, although it is older.
    assert_eq!(order, [queued[0].id, queued[1].id, crashed.id]);
    let run = t.registry.get_run(deferred.id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Interrupted);
}

async fn cancel_stops_queued_runs_and_asks_running_ones(t: TestContext) {
    let queued = t.registry.create_run(&new_run(1)).await.unwrap();
    let cancelled = t.registry.cancel_run(queued.id).await.unwrap();
    assert_eq!(cancelled.status, RunStatus::Cancelled);
    assert!(cancelled.finished_at.is_some());
    // Idempotent, and never claimed.
    assert_eq!(
        t.registry.cancel_run(queued.id).await.unwrap().status,
        RunStatus::Cancelled
    );
    assert_eq!(
        t.registry.claim_next("w", Duration::ZERO).await.unwrap(),
        None
    );

    let running = running_run(&t.registry, "w").await;
    let asked = t.registry.cancel_run(running.id).await.unwrap();
    assert_eq!(asked.status, RunStatus::Running);
    assert!(asked.cancel_requested_at.is_some());
    let held = lease(&t.registry, &running);
    assert!(held.heartbeat(7).await.unwrap().cancel_requested);
    held.finish(FinalStatus::Cancelled, None).await.unwrap();

    let done = running_run(&t.registry, "w").await;
    lease(&t.registry, &done)
        .finish(FinalStatus::Completed, None)
        .await
        .unwrap();
    assert!(matches!(
        t.registry.cancel_run(done.id).await,
        Err(RegistryError::Refused { .. })
    ));
    assert!(matches!(
        t.registry.cancel_run(done.id + 1000).await,
        Err(RegistryError::RunNotFound(_))
    ));
}

async fn restart_resumes_or_starts_over_explicitly(t: TestContext) {
    let store = store(&t);
    let run = running_run(&t.registry, "w").await;
    let held = lease(&t.registry, &run);
    held.record_metrics(&[point(10), point(20)]).await.unwrap();
    for kind in CheckpointKind::ALL {
        save(&store, &held, run.id, 20, kind, b"x").await.unwrap();
    }
    held.heartbeat(20).await.unwrap();
    held.finish(FinalStatus::Failed, Some("disk on fire"))
        .await
        .unwrap();
    // Refused while queued or running, and a completed run needs --from-scratch.
    let running = running_run(&t.registry, "w").await;
    assert!(matches!(
        t.registry.restart_run(running.id, false, &store).await,
        Err(RegistryError::Refused { .. })
    ));
    assert!(matches!(
        t.registry.restart_run(running.id, true, &store).await,
        Err(RegistryError::Refused { .. })
    ));

    // Plain restart: interrupted, history kept, claimable now.
    let restarted = t.registry.restart_run(run.id, false, &store).await.unwrap();
    assert_eq!(restarted.status, RunStatus::Interrupted);
    assert_eq!((restarted.current_step, restarted.error), (20, None));
    assert_eq!(t.registry.list_checkpoints(run.id).await.unwrap().len(), 2);
    let claimed = t
        .registry
        .claim_next("w", Duration::from_secs(3600))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claimed.id, run.id);
    let world = RunWorld {
        size: 2,
        devices: vec!["cuda:0".into(), "cuda:1".into()],
    };
    lease(&t.registry, &claimed)
        .record_world(&world)
        .await
        .unwrap();
    lease(&t.registry, &claimed)
        .finish(FinalStatus::Completed, None)
        .await
        .unwrap();
    assert!(matches!(
        t.registry.restart_run(run.id, false, &store).await,
        Err(RegistryError::Refused { .. })
    ));

    // From scratch: history and files gone, queued at 0, attempts kept (leases stay
    // unique).
    let objects = objects(&t);
    assert_eq!(objects_of(&*objects, run.id).len(), 2);
    let fresh = t.registry.restart_run(run.id, true, &store).await.unwrap();
    assert_eq!(fresh.status, RunStatus::Queued);
    assert_eq!((fresh.current_step, fresh.attempts), (0, claimed.attempts));
    assert_eq!(
        fresh.world, None,
        "no attempt of the new start has recorded one"
    );
    assert!(t
        .registry
        .list_checkpoints(run.id)
        .await
        .unwrap()
        .is_empty());
    assert!(t
        .registry
        .metrics(run.id, None, None, 10)
        .await
        .unwrap()
        .is_empty());
    assert!(objects_of(&*objects, run.id).is_empty());
}

async fn delete_removes_rows_and_files_but_not_a_running_run(t: TestContext) {
    let store = store(&t);
    let run = running_run(&t.registry, "w").await;
    let held = lease(&t.registry, &run);
    held.record_metrics(&[point(10)]).await.unwrap();
    save(&store, &held, run.id, 10, CheckpointKind::Ema, b"x")
        .await
        .unwrap();
    assert!(matches!(
        t.registry.delete_run(run.id, &store).await,
        Err(RegistryError::Refused { .. })
    ));
    assert_eq!(t.registry.list_checkpoints(run.id).await.unwrap().len(), 1);
    held.finish(FinalStatus::Interrupted, None).await.unwrap();

    let deleted = t.registry.delete_run(run.id, &store).await.unwrap();
    assert_eq!(deleted.status, RunStatus::Interrupted);
    assert_eq!(t.registry.get_run(run.id).await.unwrap(), None);
    assert!(t
        .registry
        .list_checkpoints(run.id)
        .await
        .unwrap()
        .is_empty());
    assert!(t
        .registry
        .metrics(run.id, None, None, 10)
        .await
        .unwrap()
        .is_empty());
    assert!(objects_of(&*objects(&t), run.id).is_empty());
    assert!(matches!(
        t.registry.delete_run(run.id, &store).await,
        Err(RegistryError::RunNotFound(_))
    ));
    // Ids are never reused, even for the newest run deleted.
    let next = t.registry.create_run(&new_run(2)).await.unwrap();
    assert!(next.id > run.id);
}

async fn tidying_removes_unregistered_and_temp_files_only(t: TestContext) {
    let store = store(&t);
    let run = running_run(&t.registry, "w").await;
    let held = lease(&t.registry, &run);
    for kind in CheckpointKind::ALL {
        save(&store, &held, run.id, 10, kind, b"x").await.unwrap();
    }
    let ema10 = store.path_for(run.id, 10, CheckpointKind::Ema);
    store
        .write_bytes(&CheckpointStore::grid_path_for(&ema10), b"png")
        .unwrap();
    // Written but never registered, a crash's temp file, and a file it does not know.
    let ema20 = store.path_for(run.id, 20, CheckpointKind::Ema);
    store.write_bytes(&ema20, b"y").unwrap();
    store
        .write_bytes(&CheckpointStore::grid_path_for(&ema20), b"png")
        .unwrap();
    let objects = objects(&t);
    let r = |name: &str| format!("runs/{}/{name}", run.id);
    objects
        .put(&r(".state-00000030.safetensors.XyZ123.tmp"), b"torn")
        .unwrap();
    objects.put(&r("NOTES.md"), b"mine").unwrap();

    let registered = t.registry.list_checkpoints(run.id).await.unwrap();
    let removed = store.tidy_run(run.id, &registered).await.unwrap();
    assert_eq!(
        removed,
        [
            r(".state-00000030.safetensors.XyZ123.tmp"),
            r("ema-00000020.png"),
            r("ema-00000020.safetensors"),
        ]
    );
    assert_eq!(
        objects_of(&*objects, run.id),
        [
            "NOTES.md",
            "ema-00000010.png",
            "ema-00000010.safetensors",
            "state-00000010.safetensors"
        ]
    );
    // Every registered file is still intact.
    for record in registered {
        store.open(&record).unwrap();
    }
}

async fn upgrading_to_0004_keeps_every_row_and_id(t: TestContext) {
    let db = t.db;
    with_database_at_version(db, 3, move |url| async move {
        let raw = sqlx::AnyPool::connect(&url).await.unwrap();
        let insert = "INSERT INTO runs (status, config, dataset, total_steps, current_step, \
             created_at, updated_at, crashes) VALUES ($1, '{}', '{}', 100, $2, 0, 0, 1) RETURNING id";
        let mut ids = Vec::new();
        for (status, step) in [("completed", 100), ("running", 40), ("queued", 0)] {
            let (id,): (i64,) = sqlx::query_as(insert)
                .bind(status)
                .bind(step)
                .fetch_one(&raw)
                .await
                .unwrap();
            ids.push(id);
        }
        sqlx::query(
            "INSERT INTO metrics (run_id, step, loss, learning_rate, recorded_at) \
             VALUES ($1, 10, 0.5, 0.001, 0), ($1, 20, 0.4, 0.001, 0)",
        )
        .bind(ids[1])
        .execute(&raw)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO checkpoints (run_id, step, kind, path, size_bytes, sha256, created_at) \
             VALUES ($1, 20, 'state', 'runs/x/state-00000020.safetensors', 1, $2, 0)",
        )
        .bind(ids[1])
        .bind("ab".repeat(32))
        .execute(&raw)
        .await
        .unwrap();
        // The newest run is deleted before the upgrade: its id must stay used.
        sqlx::query("DELETE FROM runs WHERE id = $1")
            .bind(ids[2])
            .execute(&raw)
            .await
            .unwrap();
        raw.close().await;

        let registry = Registry::connect(&url).await.unwrap();
        let run = registry.get_run(ids[1]).await.unwrap().unwrap();
        assert_eq!((run.status, run.current_step, run.crashes), (RunStatus::Running, 40, 1));
        assert_eq!(run.cancel_requested_at, None);
        assert_eq!(registry.metrics(ids[1], None, None, 10).await.unwrap().len(), 2);
        assert_eq!(registry.list_checkpoints(ids[1]).await.unwrap().len(), 1);
        assert_eq!(registry.count_runs(None).await.unwrap(), 2);
        let next = registry.create_run(&new_run(1)).await.unwrap();
        assert!(next.id > ids[2], "id {} reused", next.id);
        // The new status is accepted, and foreign keys still hold: a metric row of a
        // run that does not exist is refused.
        registry.cancel_run(next.id).await.unwrap();
        assert!(registry
            .record_metrics(next.id + 1000, &[point(1)])
            .await
            .is_err());
        // Deleting works on the rebuilt table.
        let store = CheckpointStore::new(tempfile::tempdir().unwrap().path()).unwrap();
        registry.delete_run(ids[0], &store).await.unwrap();
        assert_eq!(registry.count_runs(None).await.unwrap(), 2);
        registry.close().await;
    })
    .await;
}

both_backends!(
    crate::helpers::run;
    a_lost_lease_writes_nothing,
    claims_go_by_when_a_run_may_next_be_tried,
    cancel_stops_queued_runs_and_asks_running_ones,
    restart_resumes_or_starts_over_explicitly,
    delete_removes_rows_and_files_but_not_a_running_run,
    tidying_removes_unregistered_and_temp_files_only,
    upgrading_to_0004_keeps_every_row_and_id,
);
