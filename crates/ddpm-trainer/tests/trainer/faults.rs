//! Resuming never silently starts over (issue 10): a run whose training state cannot be
//! read (the checkpoint store not mounted) is deferred with its history untouched and
//! resumes once the store is back; a run whose states are all corrupt fails, naming them,
//! with its history kept.

use std::time::Duration;

use ddpm_registry::{CheckpointKind, Run, RunStatus};
use ddpm_testkit::both_backends;

use crate::helpers::{expected_steps, micro_config, TestEnv};

const LIMIT: Duration = Duration::from_secs(300);
const TOTAL: i64 = 300;
const LOG_EVERY: i64 = 10;

/// Trains a run in the foreground and stops it with SIGTERM past step 30: an interrupted
/// run with one training state (at the step it stopped) and its metric rows.
async fn interrupted_run(env: &TestEnv) -> Run {
    // checkpoint_every beyond the run: the only state is the one SIGTERM saves.
    let config = env.write_config(
        "run.toml",
        &micro_config(&env.dataset, TOTAL, LOG_EVERY, 1000),
    );
    let id = env.train_then_sigterm(&config, 30, LIMIT).await;
    let run = env.run(id).await;
    assert_eq!(run.status, RunStatus::Interrupted, "{}", env.log("train"));
    assert_eq!(
        env.newest_step(run.id, CheckpointKind::State).await,
        Some(run.current_step)
    );
    run
}

async fn an_unmounted_store_defers_the_run_and_never_restarts_it(env: TestEnv) {
    let run = interrupted_run(&env).await;
    let rows_before = env.metric_steps(run.id).await;
    let checkpoints_before = env.registry.list_checkpoints(run.id).await.unwrap();

    // The volume is not mounted: its mount point is there, empty.
    let away = env.dir.path().join("checkpoints.unmounted");
    std::fs::rename(&env.checkpoints, &away).unwrap();
    std::fs::create_dir(&env.checkpoints).unwrap();
    let daemon = [
        "daemon",
        "--once",
        "--poll-interval",
        "100ms",
        "--retry-backoff",
        "1s",
    ];
    let status = env.run_to_end("deferring", &daemon, LIMIT).await;
    assert!(status.success(), "{}", env.log("deferring"));
    let deferred = env.run(run.id).await;
    assert_eq!(
        deferred.status,
        RunStatus::Interrupted,
        "{}",
        env.log("deferring")
    );
    let error = deferred.error.clone().unwrap_or_default();
    assert!(error.contains("training state unavailable"), "{error}");
    assert!(deferred.retry_at.is_some(), "no retry time: {deferred:?}");
    // Nothing rewritten: same step, rows and checkpoints; nothing trained from step 0.
    assert_eq!(deferred.current_step, run.current_step);
    assert_eq!(env.metric_steps(run.id).await, rows_before);
    assert_eq!(
        env.registry.list_checkpoints(run.id).await.unwrap(),
        checkpoints_before
    );
    assert!(
        !env.log("deferring")
            .contains("resuming from a training state"),
        "{}",
        env.log("deferring")
    );

    // The volume is back; once the retry time has come, a daemon resumes the run.
    std::fs::remove_dir(&env.checkpoints).unwrap();
    std::fs::rename(&away, &env.checkpoints).unwrap();
    let wait = (deferred.retry_at.unwrap() - chrono::Utc::now())
        .to_std()
        .unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(200)).await;
    let status = env.run_to_end("resuming", &daemon, LIMIT).await;
    assert!(status.success(), "{}", env.log("resuming"));
    let done = env.run(run.id).await;
    assert_eq!(
        (done.status, done.current_step, done.retry_at),
        (RunStatus::Completed, TOTAL, None),
        "{}",
        env.log("resuming")
    );
    assert!(env
        .log("resuming")
        .contains("resuming from a training state"));
    assert_eq!(
        env.metric_steps(run.id).await,
        expected_steps(TOTAL, LOG_EVERY),
        "no gaps, no duplicates"
    );
}

async fn corrupt_states_fail_the_run_and_keep_its_history(env: TestEnv) {
    let run = interrupted_run(&env).await;
    let rows_before = env.metric_steps(run.id).await;
    let states: Vec<_> = env
        .registry
        .list_checkpoints(run.id)
        .await
        .unwrap()
        .into_iter()
        .filter(|c| c.kind == CheckpointKind::State)
        .collect();
    assert_eq!(states.len(), 1);
    std::fs::write(
        env.checkpoints.join(&states[0].path),
        b"not a training state",
    )
    .unwrap();

    let status = env
        .run_to_end(
            "daemon",
            &["daemon", "--once", "--poll-interval", "100ms"],
            LIMIT,
        )
        .await;
    assert!(status.success(), "{}", env.log("daemon"));
    let failed = env.run(run.id).await;
    assert_eq!(failed.status, RunStatus::Failed, "{}", env.log("daemon"));
    let error = failed.error.unwrap_or_default();
    assert!(
        error.contains("no usable training state") && error.contains(&states[0].path),
        "{error}"
    );
    assert_eq!(failed.current_step, run.current_step);
    assert_eq!(env.metric_steps(run.id).await, rows_before);
}

async fn a_run_that_keeps_crashing_its_workers_fails(env: TestEnv) {
    let config = env.write_config(
        "run.toml",
        &micro_config(&env.dataset, TOTAL, LOG_EVERY, 1000),
    );
    let id = env.submit(&config).await;
    // Two workers took it and vanished without a word (as an OOM kill leaves it).
    let first = env.registry.claim_next_queued("gone-1").await.unwrap();
    assert_eq!(first.map(|r| r.id), Some(id));
    tokio::time::sleep(Duration::from_millis(20)).await;
    let second = env
        .registry
        .claim_next("gone-2", Duration::from_millis(1))
        .await
        .unwrap()
        .expect("the silent worker's run is taken over");
    assert_eq!(second.crashes, 1);
    tokio::time::sleep(Duration::from_millis(20)).await;

    // The next takeover is its second crash, over --max-crashes 1: failed, not trained.
    let daemon = [
        "daemon",
        "--once",
        "--poll-interval",
        "100ms",
        "--stale-after",
        "10ms",
        "--max-crashes",
        "1",
    ];
    let status = env.run_to_end("daemon", &daemon, LIMIT).await;
    assert!(status.success(), "{}", env.log("daemon"));
    let run = env.run(id).await;
    assert_eq!(
        (run.status, run.crashes),
        (RunStatus::Failed, 2),
        "{}",
        env.log("daemon")
    );
    let error = run.error.unwrap_or_default();
    assert!(error.contains("stopped 2 times"), "{error}");
    assert!(env.metric_steps(id).await.is_empty(), "it trained anyway");
}

both_backends!(
    crate::helpers::with_env;
    an_unmounted_store_defers_the_run_and_never_restarts_it,
    corrupt_states_fail_the_run_and_keep_its_history,
    a_run_that_keeps_crashing_its_workers_fails,
);
