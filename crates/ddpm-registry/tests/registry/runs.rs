//! Creating, reading, listing and finishing runs.

use ddpm_registry::{FinalStatus, Lease, RegistryError, RunStatus};
use ddpm_testkit::both_backends;

use crate::helpers::{lease, lease_as, new_run, queue_runs, running_run, TestContext};

async fn created_runs_read_back(t: TestContext) {
    let new = new_run(7);
    let run = t.registry.create_run(&new).await.unwrap();
    assert_eq!(run.status, RunStatus::Queued);
    assert_eq!(run.config, new.config);
    assert_eq!(run.dataset, new.dataset);
    assert_eq!(run.total_steps, 1000);
    assert_eq!(run.current_step, 0);
    assert_eq!(run.attempts, 0);
    assert_eq!((run.host.as_deref(), run.error.as_deref()), (None, None));
    assert_eq!(
        (run.started_at, run.finished_at, run.heartbeat_at),
        (None, None, None)
    );
    let age = chrono::Utc::now() - run.created_at;
    assert!(
        age.num_seconds().abs() < 60,
        "created_at {}",
        run.created_at
    );
    assert_eq!(run.updated_at, run.created_at);

    assert_eq!(t.registry.get_run(run.id).await.unwrap(), Some(run.clone()));
    assert_eq!(t.registry.get_run(run.id + 1000).await.unwrap(), None);
    // The server returns runs as JSON.
    let json = serde_json::to_value(&run).unwrap();
    assert_eq!(json["status"], "queued");
    assert_eq!(json["dataset"]["class_names"][1], "square");
}

async fn bad_new_runs_are_refused(t: TestContext) {
    let mut new = new_run(1);
    new.total_steps = 0;
    assert!(matches!(
        t.registry.create_run(&new).await,
        Err(RegistryError::InvalidArgument(_))
    ));
    assert_eq!(t.registry.count_runs(None).await.unwrap(), 0);
}

async fn listing_is_newest_first_filtered_and_paged(t: TestContext) {
    let runs = queue_runs(&t.registry, 5).await;
    let ids: Vec<i64> = runs.iter().map(|r| r.id).collect();
    // Runs 0 and 1 become running, run 0 then completed.
    let first = t.registry.claim_next_queued("h").await.unwrap().unwrap();
    let second = t.registry.claim_next_queued("h").await.unwrap().unwrap();
    lease(&t.registry, &first)
        .finish(FinalStatus::Completed, None)
        .await
        .unwrap();

    let all = t.registry.list_runs(None, 100, 0).await.unwrap();
    let listed: Vec<i64> = all.iter().map(|r| r.id).collect();
    assert_eq!(listed, ids.iter().rev().copied().collect::<Vec<_>>());

    let page = |limit, offset| {
        let registry = t.registry.clone();
        async move {
            registry
                .list_runs(None, limit, offset)
                .await
                .unwrap()
                .iter()
                .map(|r| r.id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(page(2, 0).await, [ids[4], ids[3]]);
    assert_eq!(page(2, 2).await, [ids[2], ids[1]]);
    assert_eq!(page(2, 4).await, [ids[0]]);
    assert!(page(2, 6).await.is_empty());
    assert!(page(0, 0).await.is_empty());

    let queued = t
        .registry
        .list_runs(Some(RunStatus::Queued), 100, 0)
        .await
        .unwrap();
    assert_eq!(
        queued.iter().map(|r| r.id).collect::<Vec<_>>(),
        [ids[4], ids[3], ids[2]]
    );
    let running = t
        .registry
        .list_runs(Some(RunStatus::Running), 100, 0)
        .await
        .unwrap();
    assert_eq!(
        running.iter().map(|r| r.id).collect::<Vec<_>>(),
        [second.id]
    );
    let queued_page = t
        .registry
        .list_runs(Some(RunStatus::Queued), 1, 1)
        .await
        .unwrap();
    assert_eq!(
        queued_page.iter().map(|r| r.id).collect::<Vec<_>>(),
        [ids[3]]
    );
    assert!(t
        .registry
        .list_runs(Some(RunStatus::Failed), 100, 0)
        .await
        .unwrap()
        .is_empty());

    assert_eq!(t.registry.count_runs(None).await.unwrap(), 5);
    assert_eq!(
        t.registry
            .count_runs(Some(RunStatus::Queued))
            .await
            .unwrap(),
        3
    );
    assert_eq!(
        t.registry
            .count_runs(Some(RunStatus::Completed))
            .await
            .unwrap(),
        1
    );
    assert!(matches!(
        t.registry.list_runs(None, -1, 0).await,
        Err(RegistryError::InvalidArgument(_))
    ));
    assert!(matches!(
        t.registry.list_runs(None, 1, -1).await,
        Err(RegistryError::InvalidArgument(_))
    ));
}

async fn heartbeats_record_progress(t: TestContext) {
    let run = running_run(&t.registry, "trainer-a").await;
    assert_eq!(run.host.as_deref(), Some("trainer-a"));
    assert_eq!(run.attempts, 1);
    let started = run.started_at.expect("started_at set by the claim");
    let first_beat = run.heartbeat_at.expect("heartbeat set by the claim");

    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    lease_as(&t.registry, &run, "trainer-a")
        .heartbeat(250)
        .await
        .unwrap();
    let now = t.registry.get_run(run.id).await.unwrap().unwrap();
    assert_eq!(now.current_step, 250);
    assert!(now.heartbeat_at.unwrap() > first_beat);
    assert_eq!(now.updated_at, now.heartbeat_at.unwrap());
    assert_eq!(now.started_at, Some(started));

    // Only the holder may beat; other runs and unknown ids are refused.
    assert!(matches!(
        lease_as(&t.registry, &run, "trainer-b").heartbeat(300).await,
        Err(RegistryError::ClaimLost { id, host }) if id == run.id && host == "trainer-b"
    ));
    assert!(matches!(
        t.registry
            .leased(Lease {
                run_id: run.id + 1000,
                ..Lease::of(&run).unwrap()
            })
            .heartbeat(300)
            .await,
        Err(RegistryError::ClaimLost { .. })
    ));
    assert_eq!(
        t.registry
            .get_run(run.id)
            .await
            .unwrap()
            .unwrap()
            .current_step,
        250
    );
}

async fn finishing_sets_status_error_and_finished_at(t: TestContext) {
    let completed = running_run(&t.registry, "h").await;
    lease(&t.registry, &completed)
        .finish(FinalStatus::Completed, None)
        .await
        .unwrap();
    let run = t.registry.get_run(completed.id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Completed);
    assert!(run.finished_at.is_some());
    assert_eq!(run.error, None);

    let failed = running_run(&t.registry, "h").await;
    lease(&t.registry, &failed)
        .finish(FinalStatus::Failed, Some("CUDA out of memory"))
        .await
        .unwrap();
    let run = t.registry.get_run(failed.id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Failed);
    assert_eq!(run.error.as_deref(), Some("CUDA out of memory"));
    assert!(run.finished_at.unwrap() >= run.started_at.unwrap());

    let interrupted = running_run(&t.registry, "h").await;
    lease(&t.registry, &interrupted)
        .finish(FinalStatus::Interrupted, None)
        .await
        .unwrap();
    let run = t.registry.get_run(interrupted.id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Interrupted);
    // A finished run's worker has no claim any more.
    assert!(matches!(
        lease(&t.registry, &interrupted).heartbeat(1).await,
        Err(RegistryError::ClaimLost { .. })
    ));
}

async fn invalid_transitions_are_refused(t: TestContext) {
    let queued = t.registry.create_run(&new_run(1)).await.unwrap();
    // Only a running run has a lease to finish it with.
    assert!(matches!(
        Lease::of(&queued),
        Err(RegistryError::InvalidArgument(_))
    ));
    let run = t.registry.claim_next_queued("h").await.unwrap().unwrap();
    // Only the holder may end it: a worker that lost the run changes nothing.
    assert!(matches!(
        lease_as(&t.registry, &run, "lost-worker")
            .finish(FinalStatus::Failed, Some("stale"))
            .await,
        Err(RegistryError::ClaimLost { id, host }) if id == run.id && host == "lost-worker"
    ));
    let still = t.registry.get_run(run.id).await.unwrap().unwrap();
    assert_eq!((still.status, still.error), (RunStatus::Running, None));
    // Running and queued are no `FinalStatus`: ending a run as either does not compile.
    lease(&t.registry, &run)
        .finish(FinalStatus::Completed, None)
        .await
        .unwrap();
    // A finished run stays finished: its lease ended with it.
    assert!(matches!(
        lease(&t.registry, &run)
            .finish(FinalStatus::Failed, Some("late"))
            .await,
        Err(RegistryError::ClaimLost { .. })
    ));
    let run = t.registry.get_run(run.id).await.unwrap().unwrap();
    assert_eq!((run.status, run.error), (RunStatus::Completed, None));
    assert!(matches!(
        t.registry
            .leased(Lease {
                run_id: run.id + 1000,
                worker: "h".into(),
                attempt: 1
            })
            .finish(FinalStatus::Completed, None)
            .await,
        Err(RegistryError::RunNotFound(_))
    ));
}

both_backends!(
    crate::helpers::run;
    created_runs_read_back,
    bad_new_runs_are_refused,
    listing_is_newest_first_filtered_and_paged,
    heartbeats_record_progress,
    finishing_sets_status_error_and_finished_at,
    invalid_transitions_are_refused,
);
