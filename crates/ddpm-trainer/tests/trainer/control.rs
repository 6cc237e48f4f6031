//! The operator's commands through the real binary (`runs cancel | restart | delete`)
//! against a real daemon, and the failure classes: a dataset that is not there (yet) is
//! a failure that may pass, and defers the run; an empty one is not, and fails it.

use std::time::Duration;

use ddpm_registry::{CheckpointKind, RunStatus};
use ddpm_testkit::both_backends;

use crate::helpers::{expected_steps, micro_config, TestEnv};

const LIMIT: Duration = Duration::from_secs(300);
const LOG_EVERY: i64 = 10;
const DAEMON: [&str; 6] = [
    "daemon",
    "--once",
    "--poll-interval",
    "100ms",
    "--retry-backoff",
    "1s",
];

/// `ddpm-trainer runs <args…>`: its stdout, or its stderr as the error.
fn runs(env: &TestEnv, args: &[&str]) -> Result<String, String> {
    let out = env
        .trainer(&[&["runs"], args].concat())
        .output()
        .expect("run ddpm-trainer runs");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    match out.status.success() {
        true => Ok(text(&out.stdout)),
        false => Err(text(&out.stderr)),
    }
}

async fn cancel_stops_a_running_run_with_a_state_and_restart_resumes_it(env: TestEnv) {
    let total = 4000;
    let config = env.write_config(
        "run.toml",
        &micro_config(&env.dataset, total, LOG_EVERY, 100_000),
    );
    let id = env.submit(&config).await;
    let daemon = env.spawn("daemon", &DAEMON);
    env.wait_until("daemon", LIMIT, "rows past step 50", || async {
        env.metric_steps(id).await.last().is_some_and(|&s| s >= 50)
    })
    .await;
    let said = runs(&env, &["cancel", &id.to_string()]).unwrap();
    assert!(said.contains("running"), "{said}");
    // The daemon sees it at its next heartbeat, saves a state, ends the run and, the
    // queue empty, exits.
    let status = env.wait(daemon, "daemon", LIMIT).await;
    assert!(status.success(), "{}", env.log("daemon"));
    let run = env.run(id).await;
    assert_eq!(run.status, RunStatus::Cancelled, "{}", env.log("daemon"));
    assert!(run.current_step < total);
    assert_eq!(
        env.newest_step(id, CheckpointKind::State).await,
        Some(run.current_step),
        "a state at the step it stopped"
    );
    // A cancelled run is never taken up by itself …
    let status = env.run_to_end("idle", &DAEMON, LIMIT).await;
    assert!(status.success());
    assert_eq!(env.run(id).await.status, RunStatus::Cancelled);
    // … and delete refuses nothing here, but restart brings it back from its state.
    let said = runs(&env, &["restart", &id.to_string()]).unwrap();
    assert!(
        said.contains(&format!("from step {}", run.current_step)),
        "{said}"
    );
    let status = env.run_to_end("resumed", &DAEMON, LIMIT).await;
    assert!(status.success(), "{}", env.log("resumed"));
    let done = env.run(id).await;
    assert_eq!(
        (done.status, done.current_step),
        (RunStatus::Completed, total)
    );
    assert!(env
        .log("resumed")
        .contains("resuming from a training state"));
    assert_eq!(env.metric_steps(id).await, expected_steps(total, LOG_EVERY));
}

async fn restart_from_scratch_and_delete_remove_history_and_files(env: TestEnv) {
    let total = 60;
    let config = env.write_config(
        "run.toml",
        &micro_config(&env.dataset, total, LOG_EVERY, 20),
    );
    let id = env.submit(&config).await;
    assert!(env.run_to_end("first", &DAEMON, LIMIT).await.success());
    let folder = env.checkpoints.join(format!("runs/{id}"));
    assert!(folder.is_dir());

    // A completed run trains again only from scratch.
    let refused = runs(&env, &["restart", &id.to_string()]).unwrap_err();
    assert!(refused.contains("from scratch"), "{refused}");
    runs(&env, &["restart", &id.to_string(), "--from-scratch"]).unwrap();
    let queued = env.run(id).await;
    assert_eq!((queued.status, queued.current_step), (RunStatus::Queued, 0));
    assert!(env.metric_steps(id).await.is_empty());
    assert!(env.registry.list_checkpoints(id).await.unwrap().is_empty());
    assert!(!folder.exists());
    assert!(env.run_to_end("again", &DAEMON, LIMIT).await.success());
    assert_eq!(env.metric_steps(id).await, expected_steps(total, LOG_EVERY));

    runs(&env, &["delete", &id.to_string()]).unwrap();
    assert_eq!(env.registry.get_run(id).await.unwrap(), None);
    assert!(env.registry.list_checkpoints(id).await.unwrap().is_empty());
    assert!(!folder.exists());
    let missing = runs(&env, &["delete", &id.to_string()]).unwrap_err();
    assert!(missing.contains("not found"), "{missing}");
}

async fn a_missing_dataset_defers_and_an_empty_one_fails(env: TestEnv) {
    let config = env.write_config("run.toml", &micro_config(&env.dataset, 40, LOG_EVERY, 20));
    let id = env.submit(&config).await;
    // The dataset's volume is not mounted when the daemon takes the run.
    let away = env.dir.path().join("dataset.away");
    std::fs::rename(&env.dataset, &away).unwrap();
    assert!(env.run_to_end("unmounted", &DAEMON, LIMIT).await.success());
    let run = env.run(id).await;
    assert_eq!(
        run.status,
        RunStatus::Interrupted,
        "{}",
        env.log("unmounted")
    );
    assert!(run.retry_at.is_some());
    assert!(
        run.error
            .as_deref()
            .unwrap_or("")
            .contains("does not exist"),
        "{:?}",
        run.error
    );
    // Mounted again, it trains once its retry time has passed.
    std::fs::rename(&away, &env.dataset).unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(env.run_to_end("mounted", &DAEMON, LIMIT).await.success());
    assert_eq!(
        env.run(id).await.status,
        RunStatus::Completed,
        "{}",
        env.log("mounted")
    );

    // A dataset emptied since the run was queued cannot pass by itself: failed.
    let id = env.submit(&config).await;
    for class in std::fs::read_dir(&env.dataset).unwrap() {
        for image in std::fs::read_dir(class.unwrap().path()).unwrap() {
            std::fs::remove_file(image.unwrap().path()).unwrap();
        }
    }
    assert!(env.run_to_end("empty", &DAEMON, LIMIT).await.success());
    let run = env.run(id).await;
    assert_eq!(run.status, RunStatus::Failed, "{}", env.log("empty"));
    assert!(run.retry_at.is_none());
}

both_backends!(
    crate::helpers::with_env;
    cancel_stops_a_running_run_with_a_state_and_restart_resumes_it,
    restart_from_scratch_and_delete_remove_history_and_files,
    a_missing_dataset_defers_and_an_empty_one_fails,
);
