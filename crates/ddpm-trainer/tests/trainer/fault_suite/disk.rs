//! A full disk: the checkpoint store is a small tmpfs (mounted in a user and mount
//! namespace of its own, which needs no root: `unshare --user --map-root-user
//! --mount`), big enough for the first checkpoint and not the second. The write fails
//! with ENOSPC; the run goes back to the queue with a retry time, its history kept, and
//! is not failed.

use std::process::Command;
use std::time::Duration;

use ddpm_registry::{CheckpointKind, RunStatus};
use ddpm_testkit::both_backends;

use crate::helpers::{micro_config, TestEnv};

const CHECKPOINT_EVERY: i64 = 20;
const LOG_EVERY: i64 = 5;
const LIMIT: Duration = Duration::from_secs(120);

/// Bytes under `dir`, recursively.
fn bytes_under(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            match e.file_type().unwrap().is_dir() {
                true => bytes_under(&e.path()),
                false => e.metadata().unwrap().len(),
            }
        })
        .sum()
}

async fn a_full_disk_defers_the_run_with_its_history(env: TestEnv) {
    // One checkpoint's size (EMA, grid, state), from a run one checkpoint long.
    let probe = env.write_config(
        "probe.toml",
        &micro_config(&env.dataset, CHECKPOINT_EVERY, LOG_EVERY, CHECKPOINT_EVERY),
    );
    let status = env
        .run_to_end("probe", &["train", probe.to_str().unwrap()], LIMIT)
        .await;
    assert!(status.success(), "{}", env.log("probe"));
    let probe_id = env.registry.list_runs(None, 1, 0).await.unwrap()[0].id;
    let one = bytes_under(&env.checkpoints.join(format!("runs/{probe_id}")));
    // Room for one and a half: the second checkpoint does not fit.
    let size = (one * 3 / 2).div_ceil(4096) * 4096 + 4096;

    let config = env.write_config(
        "run.toml",
        &micro_config(&env.dataset, 200, LOG_EVERY, CHECKPOINT_EVERY),
    );
    let trainer = env.trainer(&["train", config.to_str().unwrap(), "--retry-backoff", "1h"]);
    let mut args: Vec<String> = vec![trainer.get_program().to_string_lossy().into_owned()];
    args.extend(trainer.get_args().map(|a| a.to_string_lossy().into_owned()));
    let script = r#"mount -t tmpfs -o size="$SIZE" tmpfs "$STORE" && exec "$@""#;
    let out = std::fs::File::create(env.log_path("full")).unwrap();
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--user",
        "--map-root-user",
        "--mount",
        "sh",
        "-c",
        script,
        "sh",
    ])
    .args(&args)
    .env("SIZE", size.to_string())
    .env("STORE", &env.checkpoints)
    .envs(trainer.get_envs().filter_map(|(k, v)| v.map(|v| (k, v))))
    .stdout(out.try_clone().unwrap())
    .stderr(out);
    let child = cmd.spawn().expect("run unshare");
    let status = env.wait(child, "full", LIMIT).await;
    let log = env.log("full");
    assert!(
        !status.success(),
        "a deferred run is no success for `train`:\n{log}"
    );
    assert!(log.contains("No space left on device"), "{log}");

    let run = env.registry.list_runs(None, 1, 0).await.unwrap()[0].clone();
    assert_eq!(run.status, RunStatus::Interrupted, "{log}");
    assert!(run.retry_at.is_some(), "deferred with a retry time");
    assert!(
        run.error.as_deref().unwrap_or("").contains("No space left"),
        "{:?}",
        run.error
    );
    // Its history up to the full disk is kept: the first checkpoint registered, the
    // rows up to the second.
    assert_eq!(
        env.newest_step(run.id, CheckpointKind::State).await,
        Some(CHECKPOINT_EVERY)
    );
    let steps = env.metric_steps(run.id).await;
    assert_eq!(steps.last(), Some(&(2 * CHECKPOINT_EVERY)), "{steps:?}");
    assert_eq!(steps.len() as i64, 2 * CHECKPOINT_EVERY / LOG_EVERY);
}

both_backends!(crate::helpers::with_env; a_full_disk_defers_the_run_with_its_history);
