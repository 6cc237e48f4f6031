//! Two daemons and a short `stale_after`: the first, frozen with SIGSTOP past it, loses
//! its run to the second. Thawed with SIGCONT, it learns it lost the lease at its next
//! registry call, writes nothing more, and exits (`--once`); only the new owner's writes
//! survive.

use std::time::Duration;

use ddpm_registry::{CheckpointKind, RunStatus};

use crate::audit::{audit, Audit};
use crate::helpers::{micro_config, signal, TestEnv};
use ddpm_testkit::both_backends;

const TOTAL: i64 = 800;
const LOG_EVERY: i64 = 5;
const LIMIT: Duration = Duration::from_secs(120);
const DAEMON: [&str; 6] = [
    "daemon",
    "--once",
    "--poll-interval",
    "100ms",
    "--stale-after",
    "1s",
];

async fn a_paused_daemon_loses_its_run_and_writes_nothing(env: TestEnv) {
    let config = env.write_config(
        "run.toml",
        &micro_config(&env.dataset, TOTAL, LOG_EVERY, 20),
    );
    let id = env.submit(&config).await;
    let first = env.spawn("first", &DAEMON);
    env.wait_until("first", LIMIT, "a state and rows past it", || async {
        env.newest_step(id, CheckpointKind::State)
            .await
            .is_some_and(|s| s >= 40)
    })
    .await;
    signal(&first, "STOP");
    let frozen = env.run(id).await;
    assert_eq!((frozen.status, frozen.attempts), (RunStatus::Running, 1));

    // Past stale_after a second daemon takes the run (a new lease: attempt 2).
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let second = env.spawn("second", &DAEMON);
    env.wait_until("second", LIMIT, "the takeover", || async {
        env.run(id).await.attempts == 2
    })
    .await;
    let owner = env.run(id).await.host;
    assert_ne!(owner, frozen.host);

    // Thawed, the first daemon is told it lost the run before it writes again.
    signal(&first, "CONT");
    let status = env.wait(first, "first", LIMIT).await;
    assert!(status.success(), "{}", env.log("first"));
    let log = env.log("first");
    let lost_at = log
        .find("lost the run")
        .or_else(|| log.find("taken over by another worker"))
        .unwrap_or_else(|| panic!("the thawed daemon never noticed:\n{log}"));
    assert!(
        !log[lost_at..].contains("checkpoint written"),
        "it wrote a checkpoint after losing the run:\n{log}"
    );

    let status = env.wait(second, "second", LIMIT).await;
    assert!(status.success(), "{}", env.log("second"));
    let run = env.run(id).await;
    assert_eq!(
        (run.status, run.current_step, run.host.clone(), run.attempts),
        (RunStatus::Completed, TOTAL, owner, 2),
        "the old worker ended nothing"
    );
    assert_eq!(audit(&env, id, TOTAL, LOG_EVERY).await, Audit::default());
}

both_backends!(crate::helpers::with_env; a_paused_daemon_loses_its_run_and_writes_nothing);
