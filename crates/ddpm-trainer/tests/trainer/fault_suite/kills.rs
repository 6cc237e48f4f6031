//! Twenty SIGKILLs at random moments of one run, then an audit. The moments are drawn
//! from a seed printed at the start (`DDPM_FAULT_SEED=<seed>` repeats them): a third are
//! external SIGKILLs after a random delay (during start-up, the dataset scan, training,
//! a write…), two thirds named points inside the trainer where a crash is most awkward.

use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use ddpm_registry::{CheckpointKind, RunStatus};
use rand::{Rng, SeedableRng};

use crate::audit::{audit, Audit};
use crate::helpers::{micro_config, signal, TestEnv};
use ddpm_testkit::both_backends;

const TOTAL: i64 = 3000;
const LOG_EVERY: i64 = 5;
const CHECKPOINT_EVERY: i64 = 25;
const KILLS: usize = 20;
const STALE: Duration = Duration::from_secs(1);
const LIMIT: Duration = Duration::from_secs(120);

/// The named points (`ddpm_registry::failpoint`) and the range of passes to kill at.
const POINTS: [(&str, u64); 6] = [
    ("store.written", 4),
    ("store.published", 4),
    ("recorder.ema_registered", 2),
    ("store.row_deleted", 3),
    ("recorder.metrics_written", 8),
    ("train.step", 60),
];

const DAEMON: [&str; 7] = [
    "daemon",
    "--poll-interval",
    "100ms",
    "--stale-after",
    "1s",
    "--max-crashes",
    "1000",
];

fn spawn(env: &TestEnv, log: &str, failpoint: Option<&str>) -> Child {
    let out = std::fs::File::create(env.log_path(log)).unwrap();
    let mut cmd = env.trainer(&DAEMON);
    if let Some(spec) = failpoint {
        cmd.env("DDPM_FAILPOINTS", spec);
    }
    cmd.stdout(out.try_clone().unwrap())
        .stderr(out)
        .stdin(Stdio::null())
        .spawn()
        .expect("start ddpm-trainer")
}

async fn twenty_sigkills_lose_nothing(env: TestEnv) {
    let config = env.write_config(
        "run.toml",
        &micro_config(&env.dataset, TOTAL, LOG_EVERY, CHECKPOINT_EVERY),
    );
    let id = env.submit(&config).await;
    let seed = std::env::var("DDPM_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("fault suite: seed {seed} (DDPM_FAULT_SEED={seed} repeats these kills)");
    let mut rng = rand_pcg::Pcg64::seed_from_u64(seed);

    let mut kills = 0;
    for attempt in 0..KILLS {
        let log = format!("attempt-{attempt}");
        let choice = rng.random_range(0..POINTS.len() + 3);
        let (mut child, how) = match POINTS.get(choice) {
            Some(&(point, passes)) => {
                let spec = format!("{point}=kill@{}", rng.random_range(1..=passes));
                (spawn(&env, &log, Some(&spec)), spec)
            }
            None => {
                let delay = Duration::from_millis(rng.random_range(200..3000));
                let child = spawn(&env, &log, None);
                tokio::time::sleep(delay).await;
                signal(&child, "KILL");
                (child, format!("external SIGKILL after {delay:?}"))
            }
        };
        // Wait for the kill; a point never reached within the limit, or a run that
        // completed first, ends the attempt with a SIGTERM instead.
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            let done = env.run(id).await.status == RunStatus::Completed;
            if done || start.elapsed() > LIMIT {
                signal(&child, "TERM");
                break env.wait(child, &log, LIMIT).await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let killed = status.signal() == Some(9);
        let run = env.run(id).await;
        eprintln!(
            "attempt {attempt}: {how}: {} at step {} ({})",
            if killed { "killed" } else { "not killed" },
            run.current_step,
            run.status
        );
        kills += usize::from(killed);
        if run.status == RunStatus::Completed {
            break;
        }
        assert_eq!(run.status, RunStatus::Running, "{}", env.log(&log));
        // The next daemon takes the run over once its heartbeat is stale.
        tokio::time::sleep(STALE + Duration::from_millis(300)).await;
    }

    let status = env
        .run_to_end("final", &[&DAEMON[..], &["--once"]].concat(), LIMIT)
        .await;
    assert!(status.success(), "{}", env.log("final"));
    let run = env.run(id).await;
    assert_eq!(
        (run.status, run.current_step),
        (RunStatus::Completed, TOTAL),
        "{}",
        env.log("final")
    );
    let found = audit(&env, id, TOTAL, LOG_EVERY).await;
    eprintln!(
        "fault suite ({}, {}): kills survived {kills}/{kills}, lost metric rows {}, orphan \
         files {}, broken checkpoints {}",
        env.url.split(':').next().unwrap_or("?"),
        if env.s3.is_some() {
            "S3 store"
        } else {
            "directory store"
        },
        found.lost_rows,
        found.orphan_files,
        found.broken_checkpoints
    );
    assert_eq!(found, Audit::default());
    assert!(
        kills >= KILLS / 2,
        "only {kills} of {KILLS} attempts were killed: the suite tests too little"
    );

    // The same config trained without a fault ends with the same weights, bit for bit:
    // every step's noise, timesteps and batch derive from (seed, step), and a state
    // holds everything else (weights, EMA, optimiser moments, smoothed loss).
    let straight = env.submit(&config).await;
    let status = env
        .run_to_end("straight", &[&DAEMON[..], &["--once"]].concat(), LIMIT)
        .await;
    assert!(status.success(), "{}", env.log("straight"));
    assert!(
        same_final_weights(&env, id, straight).await,
        "the killed run's final EMA weights differ from an uninterrupted run's"
    );
}

both_backends!(crate::helpers::with_env; twenty_sigkills_lose_nothing);

/// The same on SQLite with the checkpoints in a bucket of the S3 test server: its kill
/// points sit before and after the one PUT that publishes an object.
mod s3 {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn twenty_sigkills_lose_nothing() {
        crate::helpers::with_env_on_s3(super::twenty_sigkills_lose_nothing).await
    }
}

/// The tensors of the final EMA checkpoints of two runs are bit for bit the same.
pub async fn same_final_weights(env: &TestEnv, a: i64, b: i64) -> bool {
    let store = env.store();
    let scratch = tempfile::tempdir().unwrap();
    let mut tensors = Vec::new();
    for id in [a, b] {
        let newest = env
            .registry
            .newest_checkpoint(Some(id), CheckpointKind::Ema)
            .await
            .unwrap()
            .expect("a final EMA checkpoint");
        let bytes = store.open(&newest).expect("the file matches its row");
        let path = scratch.path().join(format!("{id}.safetensors"));
        std::fs::write(&path, bytes).unwrap();
        let mut named = tch::Tensor::read_safetensors(path).unwrap();
        named.sort_by(|x, y| x.0.cmp(&y.0));
        tensors.push(named);
    }
    let (x, y) = (&tensors[0], &tensors[1]);
    x.len() == y.len()
        && x.iter()
            .zip(y)
            .all(|((na, ta), (nb, tb))| na == nb && ta.equal(tb))
}
