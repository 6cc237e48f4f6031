//! What data-parallel training needs of the registry: the world an attempt trains on,
//! an attempt whose rank process died, the run a launcher finds or creates by its key,
//! and the claim with which a launcher takes its run back after a restart.

use std::collections::HashSet;
use std::time::Duration;

use chrono::Utc;
use ddpm_registry::{
    FinalStatus, Lease, MetricPoint, Registry, RegistryError, RunStatus, RunWorld,
};
use ddpm_testkit::both_backends;

use crate::helpers::{
    lease, lease_as, new_run, queue_runs, running_run, with_database_at_version, TestContext,
};

const LONG: Duration = Duration::from_secs(3600);

fn world(devices: &[&str]) -> RunWorld {
    RunWorld {
        size: devices.len() as i64,
        devices: devices.iter().map(|d| d.to_string()).collect(),
    }
}

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

async fn stored_world(registry: &Registry, id: i64) -> Option<RunWorld> {
    registry.get_run(id).await.unwrap().unwrap().world
}

async fn an_attempt_records_its_world_under_its_lease(t: TestContext) {
    let run = running_run(&t.registry, "rank0").await;
    assert_eq!(run.world, None, "no attempt has recorded one yet");
    let two_cpus = world(&["cpu", "cpu"]);
    lease(&t.registry, &run)
        .record_world(&two_cpus)
        .await
        .unwrap();
    let stored = t.registry.get_run(run.id).await.unwrap().unwrap();
    assert_eq!(stored.world.as_ref(), Some(&two_cpus));
    assert_eq!(stored.status, RunStatus::Running);
    // As the server sends it.
    let json = serde_json::to_value(&stored).unwrap();
    assert_eq!(
        json["world"],
        serde_json::json!({"size": 2, "devices": ["cpu", "cpu"]})
    );

    // Only the holder may write it, and only a world with one device per rank.
    assert!(matches!(
        lease_as(&t.registry, &run, "other")
            .record_world(&world(&["cuda:0"]))
            .await,
        Err(RegistryError::ClaimLost { .. })
    ));
    let short = RunWorld {
        size: 3,
        devices: vec!["cuda:0".into()],
    };
    assert!(matches!(
        lease(&t.registry, &run).record_world(&short).await,
        Err(RegistryError::InvalidArgument(_))
    ));
    assert_eq!(
        stored_world(&t.registry, run.id).await,
        Some(two_cpus.clone())
    );

    // The next attempt starts without one (the claim clears it) and records its own:
    // the run shows the current attempt's world, not the first one's.
    lease(&t.registry, &run)
        .finish(FinalStatus::Interrupted, None)
        .await
        .unwrap();
    assert_eq!(
        stored_world(&t.registry, run.id).await,
        Some(two_cpus.clone()),
        "an ended run keeps its last attempt's world"
    );
    let again = t
        .registry
        .claim_next("rank0-b", LONG)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((again.id, again.world.as_ref()), (run.id, None));
    let four_gpus = world(&["cuda:0", "cuda:1", "cuda:2", "cuda:3"]);
    lease(&t.registry, &again)
        .record_world(&four_gpus)
        .await
        .unwrap();
    assert_eq!(
        stored_world(&t.registry, run.id).await,
        Some(four_gpus.clone())
    );
    // The ended attempt's lease writes nothing any more.
    assert!(matches!(
        lease(&t.registry, &run).record_world(&two_cpus).await,
        Err(RegistryError::ClaimLost { .. })
    ));
    assert!(matches!(
        t.registry
            .leased(Lease {
                run_id: run.id + 1000,
                ..Lease::of(&again).unwrap()
            })
            .record_world(&two_cpus)
            .await,
        Err(RegistryError::RunNotFound(_))
    ));
    assert_eq!(stored_world(&t.registry, run.id).await, Some(four_gpus));
}

async fn a_crashed_attempt_interrupts_the_run_and_counts(t: TestContext) {
    let run = running_run(&t.registry, "rank0").await;
    let held = lease(&t.registry, &run);
    held.record_metrics(&[point(10), point(20)]).await.unwrap();
    held.heartbeat(20).await.unwrap();
    // Only the holder may end it.
    assert!(matches!(
        lease_as(&t.registry, &run, "other").crashed("x").await,
        Err(RegistryError::ClaimLost { .. })
    ));
    held.crashed("rank 1 exited: signal 9 (SIGKILL)")
        .await
        .unwrap();

    let stored = t.registry.get_run(run.id).await.unwrap().unwrap();
    assert_eq!(stored.status, RunStatus::Interrupted);
    assert_eq!(
        stored.error.as_deref(),
        Some("rank 1 exited: signal 9 (SIGKILL)")
    );
    assert_eq!(stored.crashes, 1);
    assert_eq!((stored.attempts, stored.current_step), (1, 20));
    assert_eq!(stored.retry_at, None, "no retry delay");
    assert!(stored.finished_at.is_some());
    // History is left alone.
    let steps: Vec<i64> = t
        .registry
        .metrics(run.id, None, None, 100)
        .await
        .unwrap()
        .iter()
        .map(|p| p.step)
        .collect();
    assert_eq!(steps, [10, 20]);
    // The lease ended with it.
    assert!(matches!(
        held.heartbeat(21).await,
        Err(RegistryError::ClaimLost { .. })
    ));
    assert!(matches!(
        held.crashed("again").await,
        Err(RegistryError::ClaimLost { .. })
    ));

    // It resumes at once, like any interrupted run, and its claim adds no second crash
    // for the same death; the next crash counts again.
    let resumed = t
        .registry
        .claim_next("rank0-b", LONG)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resumed.id, run.id);
    assert_eq!((resumed.attempts, resumed.crashes), (2, 1));
    assert_eq!(resumed.error, None);
    lease(&t.registry, &resumed)
        .crashed("rank 0 exited: code 1")
        .await
        .unwrap();
    let stored = t.registry.get_run(run.id).await.unwrap().unwrap();
    assert_eq!((stored.status, stored.crashes), (RunStatus::Interrupted, 2));
}

async fn a_launch_key_finds_its_run_instead_of_queueing_another(t: TestContext) {
    let (run, created) = t
        .registry
        .find_or_create_launched_run(&new_run(1), "job-a")
        .await
        .unwrap();
    assert!(created);
    assert_eq!(run.status, RunStatus::Queued);
    assert_eq!(run.launch_key.as_deref(), Some("job-a"));
    assert_eq!(
        (run.config["n"].as_i64(), run.world.as_ref()),
        (Some(1), None)
    );

    // Another rank, or a restart: the same run, as stored, whatever `new` says now.
    let (again, created) = t
        .registry
        .find_or_create_launched_run(&new_run(2), "job-a")
        .await
        .unwrap();
    assert!(!created);
    assert_eq!(again, run);
    // Also once it runs.
    let claimed = t
        .registry
        .claim_run(run.id, "rank0")
        .await
        .unwrap()
        .unwrap();
    let (found, created) = t
        .registry
        .find_or_create_launched_run(&new_run(1), "job-a")
        .await
        .unwrap();
    assert!(!created);
    assert_eq!(found, claimed);

    // Another key is another run; runs without a key are as many as are created.
    let (other, created) = t
        .registry
        .find_or_create_launched_run(&new_run(1), "job-b")
        .await
        .unwrap();
    assert!(created && other.id != run.id);
    let plain = queue_runs(&t.registry, 2).await;
    assert!(plain.iter().all(|r| r.launch_key.is_none()));
    assert_eq!(t.registry.count_runs(None).await.unwrap(), 4);

    assert!(matches!(
        t.registry
            .find_or_create_launched_run(&new_run(1), "")
            .await,
        Err(RegistryError::InvalidArgument(_))
    ));
    let mut bad = new_run(1);
    bad.total_steps = 0;
    assert!(matches!(
        t.registry.find_or_create_launched_run(&bad, "job-c").await,
        Err(RegistryError::InvalidArgument(_))
    ));
    assert_eq!(t.registry.count_runs(None).await.unwrap(), 4);

    // A deleted run frees its key: the next launch under it is a new run.
    t.registry.cancel_run(other.id).await.unwrap();
    let store = ddpm_registry::CheckpointStore::new(t.dir.path().join("checkpoints")).unwrap();
    t.registry.delete_run(other.id, &store).await.unwrap();
    let (fresh, created) = t
        .registry
        .find_or_create_launched_run(&new_run(3), "job-b")
        .await
        .unwrap();
    assert!(created && fresh.id > other.id);
}

async fn racing_launches_create_one_run(t: TestContext) {
    // Every rank process of a launch at once, each on its own connection.
    let racers: Vec<_> = (0..8)
        .map(|rank| {
            let registry = t.registry.clone();
            tokio::spawn(async move {
                registry
                    .find_or_create_launched_run(&new_run(rank), "job-race")
                    .await
            })
        })
        .collect();
    let mut ids = HashSet::new();
    let mut creators = 0;
    for racer in racers {
        let (run, created) = racer.await.unwrap().unwrap();
        ids.insert(run.id);
        creators += usize::from(created);
        assert_eq!(run.launch_key.as_deref(), Some("job-race"));
    }
    assert_eq!(ids.len(), 1, "one run for the key: {ids:?}");
    assert_eq!(creators, 1, "exactly one caller created it");
    assert_eq!(t.registry.count_runs(None).await.unwrap(), 1);
}

async fn a_relaunch_takes_its_run_back_at_once(t: TestContext) {
    // Running, with a fresh heartbeat: its holder was killed by the launcher.
    let running = running_run(&t.registry, "rank0-old").await;
    lease(&t.registry, &running)
        .record_world(&world(&["cpu", "cpu"]))
        .await
        .unwrap();
    assert_eq!(t.registry.claim_next("daemon", LONG).await.unwrap(), None);
    let taken = t
        .registry
        .claim_relaunched(running.id, "rank0-new")
        .await
        .unwrap()
        .expect("a running run is taken back");
    assert_eq!(taken.status, RunStatus::Running);
    assert_eq!(taken.host.as_deref(), Some("rank0-new"));
    assert_eq!(
        (taken.attempts, taken.crashes),
        (2, 1),
        "taken from a dead worker"
    );
    assert_eq!(taken.world, None, "the new attempt records its own");
    assert!(matches!(
        lease(&t.registry, &running).heartbeat(1).await,
        Err(RegistryError::ClaimLost { .. })
    ));
    lease(&t.registry, &taken).heartbeat(1).await.unwrap();

    // Interrupted (and deferred far ahead): claimed without a crash, the delay ignored.
    lease(&t.registry, &taken)
        .defer("store not mounted", LONG)
        .await
        .unwrap();
    let resumed = t
        .registry
        .claim_relaunched(running.id, "rank0-third")
        .await
        .unwrap()
        .expect("an interrupted run is claimed");
    assert_eq!((resumed.attempts, resumed.crashes), (3, 1));
    assert_eq!(
        (
            resumed.retry_at,
            resumed.error.as_deref(),
            resumed.finished_at
        ),
        (None, None, None)
    );
    // A crash the attempt recorded itself is counted once, not again by the claim.
    lease(&t.registry, &resumed)
        .crashed("rank 1 died")
        .await
        .unwrap();
    let after_crash = t
        .registry
        .claim_relaunched(running.id, "rank0-fourth")
        .await
        .unwrap()
        .unwrap();
    assert_eq!((after_crash.attempts, after_crash.crashes), (4, 2));

    // Queued: an ordinary first claim.
    let queued = t.registry.create_run(&new_run(5)).await.unwrap();
    let first = t
        .registry
        .claim_relaunched(queued.id, "rank0")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (first.status, first.attempts, first.crashes),
        (RunStatus::Running, 1, 0)
    );
    assert!(first.started_at.is_some());

    // Ended for good, or missing: nothing to take back, and nothing changes.
    lease(&t.registry, &first)
        .finish(FinalStatus::Completed, None)
        .await
        .unwrap();
    let completed = t.registry.get_run(first.id).await.unwrap().unwrap();
    assert_eq!(
        t.registry.claim_relaunched(first.id, "late").await.unwrap(),
        None
    );
    assert_eq!(t.registry.get_run(first.id).await.unwrap(), Some(completed));
    let failed = running_run(&t.registry, "h").await;
    lease(&t.registry, &failed)
        .finish(FinalStatus::Failed, Some("boom"))
        .await
        .unwrap();
    assert_eq!(
        t.registry
            .claim_relaunched(failed.id, "late")
            .await
            .unwrap(),
        None
    );
    let cancelled = t.registry.create_run(&new_run(6)).await.unwrap();
    t.registry.cancel_run(cancelled.id).await.unwrap();
    assert_eq!(
        t.registry
            .claim_relaunched(cancelled.id, "late")
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        t.registry
            .claim_relaunched(cancelled.id + 1000, "late")
            .await
            .unwrap(),
        None
    );
}

/// A database that release 0005 left takes the new columns with its runs intact: no
/// world, no launch key, and keys work on it at once.
async fn a_database_from_before_worlds_upgrades(t: TestContext) {
    with_database_at_version(t.db, 5, |url| async move {
        let raw = sqlx::AnyPool::connect(&url).await.unwrap();
        for _ in 0..2 {
            sqlx::query(
                "INSERT INTO runs (status, config, dataset, total_steps, current_step, \
                     created_at, updated_at) VALUES ('interrupted', '{}', '{}', 100, 40, 0, 0)",
            )
            .execute(&raw)
            .await
            .unwrap();
        }
        raw.close().await;
        let registry = Registry::connect(&url).await.unwrap();
        let runs = registry.list_runs(None, 10, 0).await.unwrap();
        assert_eq!(runs.len(), 2);
        for run in &runs {
            assert_eq!(
                (run.world.as_ref(), run.launch_key.as_deref()),
                (None, None)
            );
            assert_eq!((run.status, run.current_step), (RunStatus::Interrupted, 40));
        }
        let (launched, created) = registry
            .find_or_create_launched_run(&new_run(1), "job-after-upgrade")
            .await
            .unwrap();
        assert!(created && launched.id > runs[0].id);
        let claimed = registry
            .claim_relaunched(runs[0].id, "rank0")
            .await
            .unwrap()
            .unwrap();
        registry
            .leased(Lease::of(&claimed).unwrap())
            .record_world(&world(&["cuda:0", "cuda:1"]))
            .await
            .unwrap();
        assert_eq!(stored_world(&registry, claimed.id).await.unwrap().size, 2);
        registry.close().await;
    })
    .await;
}

both_backends!(
    crate::helpers::run;
    an_attempt_records_its_world_under_its_lease,
    a_crashed_attempt_interrupts_the_run_and_counts,
    a_launch_key_finds_its_run_instead_of_queueing_another,
    racing_launches_create_one_run,
    a_relaunch_takes_its_run_back_at_once,
    a_database_from_before_worlds_upgrades,
);
