//! The run queue: claiming queued runs and resuming interrupted or orphaned ones.

use std::collections::HashSet;
use std::time::Duration;

use ddpm_registry::{FinalStatus, RegistryError, RunStatus};
use ddpm_testkit::both_backends;

use crate::helpers::{lease, lease_as, queue_runs, running_run, TestContext};

const LONG: Duration = Duration::from_secs(3600);

async fn claims_take_the_oldest_queued_run(t: TestContext) {
    assert_eq!(t.registry.claim_next_queued("h").await.unwrap(), None);
    let runs = queue_runs(&t.registry, 3).await;
    for expected in &runs {
        let claimed = t.registry.claim_next_queued("h").await.unwrap().unwrap();
        assert_eq!(claimed.id, expected.id);
        assert_eq!(claimed.status, RunStatus::Running);
        assert_eq!(claimed.host.as_deref(), Some("h"));
        assert!(claimed.started_at.is_some() && claimed.heartbeat_at.is_some());
        assert_eq!(claimed.config, expected.config);
    }
    assert_eq!(t.registry.claim_next_queued("h").await.unwrap(), None);
}

async fn a_run_can_be_claimed_by_id_once(t: TestContext) {
    let runs = queue_runs(&t.registry, 3).await;
    // The newest, ahead of the older queued ones.
    let newest = runs[2].id;
    let claimed = t.registry.claim_run(newest, "fg").await.unwrap().unwrap();
    assert_eq!((claimed.id, claimed.status), (newest, RunStatus::Running));
    assert_eq!(claimed.host.as_deref(), Some("fg"));
    assert_eq!(claimed.attempts, 1);
    assert_eq!(
        t.registry.claim_run(newest, "other").await.unwrap(),
        None,
        "already running"
    );
    assert_eq!(
        t.registry.claim_run(newest + 100, "fg").await.unwrap(),
        None,
        "no such run"
    );
    // The others are still queued, oldest first.
    let next = t.registry.claim_next_queued("d").await.unwrap().unwrap();
    assert_eq!(next.id, runs[0].id);
}

async fn racing_claims_never_share_a_run(t: TestContext) {
    let runs = queue_runs(&t.registry, 3).await;
    let racers: Vec<_> = (0..8)
        .map(|i| {
            let registry = t.registry.clone();
            tokio::spawn(async move { registry.claim_next_queued(&format!("daemon-{i}")).await })
        })
        .collect();
    let mut claimed = Vec::new();
    for racer in racers {
        if let Some(run) = racer.await.unwrap().unwrap() {
            claimed.push(run);
        }
    }
    let ids: HashSet<i64> = claimed.iter().map(|r| r.id).collect();
    assert_eq!(
        claimed.len(),
        3,
        "each queued run claimed once: {claimed:?}"
    );
    assert_eq!(ids, runs.iter().map(|r| r.id).collect());
    // The stored holder is the daemon that got the run.
    for run in &claimed {
        let stored = t.registry.get_run(run.id).await.unwrap().unwrap();
        assert_eq!(stored.host, run.host);
        assert_eq!(stored.attempts, 1);
    }
}

async fn racing_daemons_drain_the_queue_exactly_once(t: TestContext) {
    let runs = queue_runs(&t.registry, 30).await;
    let daemons: Vec<_> = (0..8)
        .map(|i| {
            let registry = t.registry.clone();
            tokio::spawn(async move {
                let mut mine = Vec::new();
                while let Some(run) = registry
                    .claim_next_queued(&format!("daemon-{i}"))
                    .await
                    .unwrap()
                {
                    mine.push(run.id);
                }
                mine
            })
        })
        .collect();
    let mut claimed = Vec::new();
    for daemon in daemons {
        claimed.extend(daemon.await.unwrap());
    }
    claimed.sort_unstable();
    assert_eq!(claimed, runs.iter().map(|r| r.id).collect::<Vec<_>>());
    assert_eq!(
        t.registry
            .count_runs(Some(RunStatus::Running))
            .await
            .unwrap(),
        30
    );
}

async fn interrupted_runs_are_resumed(t: TestContext) {
    let run = running_run(&t.registry, "old").await;
    lease(&t.registry, &run).heartbeat(400).await.unwrap();
    lease(&t.registry, &run)
        .finish(FinalStatus::Interrupted, Some("SIGTERM"))
        .await
        .unwrap();

    let resumed = t
        .registry
        .claim_next("new", LONG)
        .await
        .unwrap()
        .expect("the interrupted run");
    assert_eq!(resumed.id, run.id);
    assert_eq!(resumed.status, RunStatus::Running);
    assert_eq!(resumed.host.as_deref(), Some("new"));
    assert_eq!(resumed.attempts, 2);
    assert_eq!(resumed.crashes, 0, "a clean interrupt is no crash");
    assert_eq!(resumed.current_step, 400);
    assert_eq!((resumed.finished_at, resumed.error), (None, None));
    assert_eq!(resumed.started_at, run.started_at);
    assert_eq!(t.registry.claim_next("new", LONG).await.unwrap(), None);
}

async fn stale_running_runs_are_taken_over(t: TestContext) {
    let run = running_run(&t.registry, "crashed").await;
    // A fresh heartbeat keeps the run with its worker.
    assert_eq!(t.registry.claim_next("new", LONG).await.unwrap(), None);
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(t.registry.claim_next("new", LONG).await.unwrap(), None);
    let taken = t
        .registry
        .claim_next("new", Duration::from_millis(50))
        .await
        .unwrap()
        .expect("the run whose heartbeat went stale");
    assert_eq!(taken.id, run.id);
    assert_eq!(taken.host.as_deref(), Some("new"));
    assert_eq!(taken.attempts, 2);
    assert_eq!(
        taken.crashes, 1,
        "a takeover from a silent worker is a crash"
    );
    assert!(taken.heartbeat_at.unwrap() > run.heartbeat_at.unwrap());
    // The old worker, should it wake up, learns it lost the run.
    assert!(matches!(
        lease(&t.registry, &run).heartbeat(10).await,
        Err(RegistryError::ClaimLost { .. })
    ));
    lease(&t.registry, &taken).heartbeat(10).await.unwrap();
    // Its heartbeat is fresh again.
    assert_eq!(
        t.registry
            .claim_next("third", Duration::from_millis(50))
            .await
            .unwrap(),
        None
    );
}

async fn finished_runs_are_never_claimed(t: TestContext) {
    let completed = running_run(&t.registry, "h").await;
    lease(&t.registry, &completed)
        .finish(FinalStatus::Completed, None)
        .await
        .unwrap();
    let failed = running_run(&t.registry, "h").await;
    lease(&t.registry, &failed)
        .finish(FinalStatus::Failed, Some("boom"))
        .await
        .unwrap();
    let cancelled = t
        .registry
        .create_run(&crate::helpers::new_run(7))
        .await
        .unwrap();
    t.registry.cancel_run(cancelled.id).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        t.registry.claim_next("h", Duration::ZERO).await.unwrap(),
        None
    );
}

async fn racing_resumers_never_share_a_run(t: TestContext) {
    let mut ids = HashSet::new();
    for _ in 0..3 {
        let run = running_run(&t.registry, "h").await;
        lease(&t.registry, &run)
            .finish(FinalStatus::Interrupted, None)
            .await
            .unwrap();
        ids.insert(run.id);
    }
    let racers: Vec<_> = (0..8)
        .map(|i| {
            let registry = t.registry.clone();
            tokio::spawn(async move { registry.claim_next(&format!("daemon-{i}"), LONG).await })
        })
        .collect();
    let mut claimed = Vec::new();
    for racer in racers {
        if let Some(run) = racer.await.unwrap().unwrap() {
            claimed.push(run.id);
        }
    }
    assert_eq!(claimed.len(), 3, "{claimed:?}");
    assert_eq!(claimed.into_iter().collect::<HashSet<_>>(), ids);
}

async fn deferred_runs_wait_for_their_time_and_hold_up_nothing(t: TestContext) {
    let deferred = running_run(&t.registry, "w").await;
    // Only the holder may defer it.
    assert!(matches!(
        lease_as(&t.registry, &deferred, "other")
            .defer("x", Duration::ZERO)
            .await,
        Err(RegistryError::ClaimLost { .. })
    ));
    lease(&t.registry, &deferred)
        .defer("store not mounted", Duration::from_millis(300))
        .await
        .unwrap();
    let run = t.registry.get_run(deferred.id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Interrupted);
    assert_eq!(run.error.as_deref(), Some("store not mounted"));
    let retry_at = run.retry_at.expect("retry_at set");
    assert!(retry_at >= run.updated_at + chrono::Duration::milliseconds(300));
    // Not yet: neither resumable nor blocking the queue behind it.
    assert_eq!(t.registry.claim_next("w", LONG).await.unwrap(), None);
    let queued = queue_runs(&t.registry, 1).await.remove(0);
    let next = t.registry.claim_next_queued("w").await.unwrap().unwrap();
    assert_eq!(next.id, queued.id);
    // Once its time has come (the database clock's), a claim takes it and clears both.
    let resumed = loop {
        if let Some(run) = t.registry.claim_next("w2", LONG).await.unwrap() {
            break run;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(resumed.id, deferred.id);
    assert!(
        resumed.updated_at >= retry_at,
        "claimed before its retry_at"
    );
    assert_eq!((resumed.retry_at, resumed.error), (None, None));
    assert_eq!(resumed.attempts, 2);
}

both_backends!(
    crate::helpers::run;
    deferred_runs_wait_for_their_time_and_hold_up_nothing,
    claims_take_the_oldest_queued_run,
    a_run_can_be_claimed_by_id_once,
    racing_claims_never_share_a_run,
    racing_daemons_drain_the_queue_exactly_once,
    interrupted_runs_are_resumed,
    stale_running_runs_are_taken_over,
    finished_runs_are_never_claimed,
    racing_resumers_never_share_a_run,
);
