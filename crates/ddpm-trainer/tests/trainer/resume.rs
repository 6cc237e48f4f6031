//! Crashes and stops: a trainer killed with SIGKILL mid-run is resumed by a restarted
//! daemon once its heartbeat is stale; SIGTERM saves a state and marks the run
//! interrupted, and a daemon resumes it. Either way the run finishes with every step's
//! metric row exactly once, and a resumed run's curve is the uninterrupted run's.

use std::time::Duration;

use ddpm_registry::{CheckpointKind, RunStatus};
use ddpm_testkit::both_backends;

use crate::helpers::{expected_steps, micro_config, signal, TestEnv};

const LIMIT: Duration = Duration::from_secs(300);
const TOTAL: i64 = 600;
const LOG_EVERY: i64 = 10;

async fn sigkill_mid_run_is_resumed_by_a_restarted_daemon(env: TestEnv) {
    let config = env.write_config(
        "run.toml",
        &micro_config(&env.dataset, TOTAL, LOG_EVERY, 50),
    );
    let id = env.submit(&config).await;
    let child = env.spawn(
        "first",
        &["daemon", "--poll-interval", "100ms", "--stale-after", "1s"],
    );

    // Mid-run: a state is registered and rows beyond it were recorded.
    env.wait_until(
        "first",
        LIMIT,
        "a state at step >= 100 and rows after it",
        || async {
            match env.newest_step(id, CheckpointKind::State).await {
                Some(s) if s >= 100 => env
                    .metric_steps(id)
                    .await
                    .last()
                    .is_some_and(|&last| last > s),
                _ => false,
            }
        },
    )
    .await;
    signal(&child, "KILL");
    let status = env.wait(child, "first", Duration::from_secs(10)).await;
    assert!(!status.success(), "SIGKILL ends the process");
    let crashed = env.run(id).await;
    assert_eq!(
        crashed.status,
        RunStatus::Running,
        "a crash leaves the run running, its heartbeat stopping"
    );
    assert!(crashed.current_step < TOTAL, "the run was killed mid-run");
    let rows_before = env.metric_steps(id).await;

    // Past the stale threshold a restarted daemon takes it over.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status = env
        .run_to_end(
            "second",
            &[
                "daemon",
                "--once",
                "--poll-interval",
                "100ms",
                "--stale-after",
                "1s",
            ],
            LIMIT,
        )
        .await;
    assert!(status.success(), "daemon failed:\n{}", env.log("second"));
    let run = env.run(id).await;
    assert_eq!(run.status, RunStatus::Completed, "{}", env.log("second"));
    assert_eq!((run.current_step, run.attempts), (TOTAL, 2));
    assert_eq!(
        env.metric_steps(id).await,
        expected_steps(TOTAL, LOG_EVERY),
        "no gaps, no duplicates"
    );
    assert!(
        rows_before.len() >= 10,
        "rows recorded before the crash: {rows_before:?}"
    );
    assert!(
        env.log("second").contains("resuming from a training state"),
        "{}",
        env.log("second")
    );
    assert_eq!(env.newest_step(id, CheckpointKind::Ema).await, Some(TOTAL));
}

async fn sigterm_interrupts_and_the_run_resumes(env: TestEnv) {
    // The fast preset's options (Min-SNR, cosine lr, EMA ramp) through a stop and resume.
    let config = env.write_config(
        "run.toml",
        &micro_config(&env.dataset, TOTAL, LOG_EVERY, 1000)
            .replace("preset = \"tiny\"", "preset = \"fast\""),
    );
    let id = env.train_then_sigterm(&config, 30, LIMIT).await;
    let run = env.run(id).await;
    assert_eq!(run.status, RunStatus::Interrupted, "{}", env.log("train"));
    let stopped_at = run.current_step;
    assert!((30..TOTAL).contains(&stopped_at), "{stopped_at}");
    // The state is saved at the step it stopped at, not at a checkpoint interval.
    assert_eq!(
        env.newest_step(id, CheckpointKind::State).await,
        Some(stopped_at)
    );
    assert_eq!(
        env.newest_step(id, CheckpointKind::Ema).await,
        Some(stopped_at)
    );

    let status = env
        .run_to_end(
            "daemon",
            &["daemon", "--once", "--poll-interval", "100ms"],
            LIMIT,
        )
        .await;
    assert!(status.success(), "daemon failed:\n{}", env.log("daemon"));
    let run = env.run(id).await;
    assert_eq!(
        (run.status, run.current_step, run.attempts),
        (RunStatus::Completed, TOTAL, 2)
    );
    assert_eq!(env.metric_steps(id).await, expected_steps(TOTAL, LOG_EVERY));

    // The same config trained without a stop: the resumed run's rows are its rows. The
    // smoothed loss carries its state in the training state, so it matches at every row;
    // the window means match wherever a window lies wholly before the stop or after it.
    let status = env
        .run_to_end("straight", &["train", config.to_str().unwrap()], LIMIT)
        .await;
    assert!(status.success(), "train failed:\n{}", env.log("straight"));
    let straight_id = env.registry.list_runs(None, 1, 0).await.unwrap()[0].id;
    assert_ne!(straight_id, id);
    let (resumed, straight) = (env.metrics(id).await, env.metrics(straight_id).await);
    assert_eq!(resumed.len(), straight.len());
    for (a, b) in resumed.iter().zip(&straight) {
        assert_eq!(a.step, b.step);
        let smoothed = (a.loss_smoothed, b.loss_smoothed);
        assert!(
            matches!(smoothed, (Some(x), Some(y)) if (x - y).abs() <= 1e-9 * y.abs()),
            "step {}: smoothed loss {smoothed:?} (resumed, straight)",
            a.step
        );
        let straddles = a.step > stopped_at && a.step - LOG_EVERY < stopped_at;
        if !straddles {
            assert_eq!(
                (a.loss, a.loss_by_timestep),
                (b.loss, b.loss_by_timestep),
                "step {}: the window's losses",
                a.step
            );
        }
        // A window cut by the stop may hold only a step or two after the resume, too few
        // samples to land in every quarter; a whole window holds enough.
        assert!(
            a.loss_by_timestep
                .iter()
                .all(|q| q.is_some_and(f64::is_finite) || (straddles && q.is_none())),
            "step {}: a quarter of the timesteps without samples: {:?}",
            a.step,
            a.loss_by_timestep
        );
    }
}

both_backends!(
    crate::helpers::with_env;
    sigkill_mid_run_is_resumed_by_a_restarted_daemon,
    sigterm_interrupts_and_the_run_resumes
);
