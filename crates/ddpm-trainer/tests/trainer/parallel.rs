//! Data parallelism with real processes: two ranks on Gloo over loopback, one torch
//! thread each. Two ranks train the same model as one process on the same global batch;
//! a two-rank run stopped by SIGTERM and resumed ends bit-identical to an uninterrupted
//! one; a rank killed with SIGKILL (rank 1 or rank 0) stops the other within the bound,
//! the attempt is interrupted and the run resumes with every metric row exactly once; a
//! rank that cannot reach the store says so; and torchrun launches the ranks, restarting
//! them after a kill with rank 0 resuming the same run.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use ddpm_registry::{CheckpointKind, RunStatus};
use ddpm_testkit::both_backends;
use tch::Tensor;

use crate::helpers::{expected_steps, micro_config, signal, with_env, Db, TestEnv};

const LIMIT: Duration = Duration::from_secs(300);
/// What the tests give `--rank-timeout`: a rank that dies must stop the others well
/// within it (they notice its connections closing, not the timeout).
const RANK_TIMEOUT: &str = "20s";
const RANK_BOUND: Duration = Duration::from_secs(20);

/// The micro run with a global batch of 8 (4 per rank at W = 2).
fn config(env: &TestEnv, name: &str, steps: i64, log_every: i64, checkpoint_every: i64) -> PathBuf {
    env.write_config(
        name,
        &micro_config(&env.dataset, steps, log_every, checkpoint_every),
    )
}

/// `args` with the rank timeout every test uses.
fn with_timeout<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec!["--rank-timeout", RANK_TIMEOUT];
    all.extend_from_slice(args);
    all
}

/// Where run `id`'s newest training state is.
async fn final_state(env: &TestEnv, id: i64) -> PathBuf {
    let record = env
        .registry
        .newest_checkpoint(Some(id), CheckpointKind::State)
        .await
        .expect("newest state")
        .expect("a state");
    env.checkpoints.join(&record.path)
}

/// A checkpoint's tensors, by name.
fn tensors(path: &Path) -> Vec<(String, Tensor)> {
    let mut tensors = Tensor::read_safetensors(path).expect("read checkpoint");
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors
}

/// The largest absolute difference between two states' tensors (they must have the
/// same names and shapes).
fn max_difference(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> f64 {
    assert_eq!(
        a.iter().map(|t| &t.0).collect::<Vec<_>>(),
        b.iter().map(|t| &t.0).collect::<Vec<_>>()
    );
    a.iter()
        .zip(b)
        .map(|((name, x), (_, y))| {
            assert_eq!(x.size(), y.size(), "{name}");
            let x = x.to_kind(tch::Kind::Double);
            let y = y.to_kind(tch::Kind::Double);
            (x - y).abs().max().double_value(&[])
        })
        .fold(0.0, f64::max)
}

/// The rank processes a trainer started (`ddpm-trainer rank`, children of `parent`).
fn rank_pids(parent: u32) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // `pid (comm) state ppid …`: the fields after the last ')'.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let is_rank = cmdline.split(|&b| b == 0).any(|arg| arg == b"rank");
        if fields.get(1) == Some(&parent.to_string().as_str()) && is_rank {
            pids.push(pid);
        }
    }
    pids
}

/// Whether process `pid` has exited (gone, or a zombie nobody reaped yet).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// Waits until `pid` has exited; returns how long that took.
async fn time_to_exit(pid: u32, limit: Duration) -> Duration {
    let start = Instant::now();
    while !exited(pid) {
        assert!(
            start.elapsed() < limit,
            "process {pid} still running after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

/// Waits until run `id` has recorded metric rows at `step` or later.
async fn wait_for_rows(env: &TestEnv, log: &str, id: i64, step: i64) {
    env.wait_until(log, LIMIT, &format!("rows at step {step}"), || async {
        env.metric_steps(id)
            .await
            .last()
            .is_some_and(|&s| s >= step)
    })
    .await;
}

/// Two ranks with a global batch of 8 and one process with a batch of 8 see the same
/// samples: the same loss at every step and the same weights after 50 steps, to float
/// tolerance (the gradient is summed in another order).
async fn two_ranks_train_the_same_model_as_one_process(env: TestEnv) {
    const STEPS: i64 = 50;
    let config = config(&env, "run.toml", STEPS, 1, 25);
    let path = config.to_str().unwrap();
    for (log, nproc) in [("one", "1"), ("two", "2")] {
        let args = with_timeout(&["train", path, "--nproc-per-node", nproc]);
        let status = env.run_to_end(log, &args, LIMIT).await;
        assert!(status.success(), "{log}:\n{}", env.log(log));
    }
    let (one, two) = (env.run(1).await, env.run(2).await);
    assert_eq!(
        (one.status, two.status),
        (RunStatus::Completed, RunStatus::Completed)
    );
    let world = two.world.expect("the attempt recorded its world");
    assert_eq!(world.size, 2);
    assert_eq!(world.devices, ["cpu", "cpu"]);
    assert_eq!(one.world.expect("a world of one").size, 1);

    let (a, b) = (env.metrics(1).await, env.metrics(2).await);
    assert_eq!(a.len(), STEPS as usize);
    assert_eq!(
        a.iter().map(|p| p.step).collect::<Vec<_>>(),
        b.iter().map(|p| p.step).collect::<Vec<_>>()
    );
    for (x, y) in a.iter().zip(&b) {
        let tolerance = 1e-5 * x.loss.abs().max(1.0);
        assert!(
            (x.loss - y.loss).abs() < tolerance,
            "step {}: loss {} (one process) vs {} (two ranks)",
            x.step,
            x.loss,
            y.loss
        );
        let (gx, gy) = (x.grad_norm.unwrap(), y.grad_norm.unwrap());
        assert!(
            (gx - gy).abs() < 1e-4 * gx.max(1.0),
            "step {}: grad norm {gx} vs {gy}",
            x.step
        );
        for (qx, qy) in x.loss_by_timestep.iter().zip(&y.loss_by_timestep) {
            match (qx, qy) {
                (Some(qx), Some(qy)) => assert!((qx - qy).abs() < 1e-4, "step {}", x.step),
                (None, None) => {}
                other => panic!("step {}: quarters differ: {other:?}", x.step),
            }
        }
    }
    // Weights, EMA and both AdamW moments after 50 steps.
    let (one, two) = (final_state(&env, 1).await, final_state(&env, 2).await);
    let difference = max_difference(&tensors(&one), &tensors(&two));
    assert!(difference < 1e-4, "final states differ by {difference}");
    // And the comparison tells models apart: the state 25 steps earlier is far off.
    let earlier = env
        .registry
        .list_checkpoints(1)
        .await
        .unwrap()
        .into_iter()
        .find(|c| c.kind == CheckpointKind::State && c.step == 25)
        .expect("the state at step 25");
    let earlier = env.checkpoints.join(&earlier.path);
    assert!(max_difference(&tensors(&earlier), &tensors(&one)) > 1e-3);
}

/// SIGTERM to rank 0 of a two-rank run: both stop at the same step, a state is saved, and
/// the run a daemon resumes (again with two ranks) ends bit-identical to one never
/// stopped, with every metric row once.
async fn a_stopped_two_rank_run_resumes_bit_identical(env: TestEnv) {
    const STEPS: i64 = 80;
    let config = config(&env, "run.toml", STEPS, 5, 20);
    let path = config.to_str().unwrap();
    let straight = env
        .run_to_end(
            "straight",
            &with_timeout(&["train", path, "--nproc-per-node", "2"]),
            LIMIT,
        )
        .await;
    assert!(straight.success(), "{}", env.log("straight"));

    let child = env.spawn(
        "stopped",
        &with_timeout(&["train", path, "--nproc-per-node", "2"]),
    );
    wait_for_rows(&env, "stopped", 2, 30).await;
    let ranks = rank_pids(child.id());
    assert_eq!(ranks.len(), 1, "rank 1 runs beside rank 0");
    signal(&child, "TERM");
    let status = env.wait(child, "stopped", LIMIT).await;
    assert!(status.success(), "{}", env.log("stopped"));
    time_to_exit(ranks[0], RANK_BOUND).await;
    let stopped = env.run(2).await;
    assert_eq!(stopped.status, RunStatus::Interrupted);
    assert!(stopped.current_step < STEPS, "stopped mid-run");
    assert_eq!(
        env.newest_step(2, CheckpointKind::State).await,
        Some(stopped.current_step),
        "a state at the step both ranks stopped at"
    );

    let resumed = env
        .run_to_end(
            "resumed",
            &with_timeout(&["daemon", "--once", "--nproc-per-node", "2"]),
            LIMIT,
        )
        .await;
    assert!(resumed.success(), "{}", env.log("resumed"));
    assert_eq!(env.run(2).await.status, RunStatus::Completed);
    assert_eq!(env.metric_steps(2).await, expected_steps(STEPS, 5));
    let (a, b) = (final_state(&env, 1).await, final_state(&env, 2).await);
    let (a, b) = (tensors(&a), tensors(&b));
    assert_eq!(
        max_difference(&a, &b),
        0.0,
        "bit-identical after the resume"
    );
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        assert!(x.equal(y), "{name} differs");
    }
    // The resumed curve is the straight one: the smoothed loss at every row (its state
    // travels with the training state); a window's mean wherever the window lies wholly
    // before the stop or after it.
    let stopped_at = stopped.current_step;
    let rows = (env.metrics(1).await, env.metrics(2).await);
    for (x, y) in rows.0.iter().zip(&rows.1) {
        assert_eq!(x.step, y.step);
        let smoothed = (x.loss_smoothed, y.loss_smoothed);
        assert!(
            matches!(smoothed, (Some(a), Some(b)) if (a - b).abs() <= 1e-9 * a.abs()),
            "step {}: smoothed loss {smoothed:?} (straight, resumed)",
            x.step
        );
        let straddles = x.step > stopped_at && x.step - 5 < stopped_at;
        if !straddles {
            assert_eq!(x.loss, y.loss, "step {}: the window's loss", x.step);
        }
    }
}

/// Queues the micro run and starts a two-rank daemon on it; returns the daemon, its
/// rank 1's pid and the run id, once rows past step 30 are recorded.
async fn two_rank_daemon_mid_run(
    env: &TestEnv,
    log: &str,
    steps: i64,
) -> (std::process::Child, u32, i64) {
    let config = config(env, "run.toml", steps, 10, 50);
    let id = env.submit(&config).await;
    let daemon = env.spawn(
        log,
        &with_timeout(&[
            "daemon",
            "--once",
            "--nproc-per-node",
            "2",
            "--poll-interval",
            "100ms",
            "--stale-after",
            "2s",
        ]),
    );
    wait_for_rows(env, log, id, 30).await;
    let ranks = rank_pids(daemon.id());
    assert_eq!(
        ranks.len(),
        1,
        "rank 1 runs beside rank 0:\n{}",
        env.log(log)
    );
    (daemon, ranks[0], id)
}

/// SIGKILL of rank 1 mid-step: rank 0 notices at once, the attempt is interrupted and
/// counts as a crash, and the daemon resumes the run to the end with every metric row
/// exactly once.
async fn sigkill_of_rank_1_interrupts_the_attempt_and_the_run_resumes(env: TestEnv) {
    const STEPS: i64 = 300;
    let (daemon, rank1, id) = two_rank_daemon_mid_run(&env, "daemon", STEPS).await;
    let killed_at = Instant::now();
    Command::new("kill")
        .args(["-KILL", &rank1.to_string()])
        .status()
        .expect("kill");
    env.wait_until("daemon", RANK_BOUND, "the attempt to end", || async {
        env.run(id).await.attempts >= 2 || env.run(id).await.crashes >= 1
    })
    .await;
    let noticed = killed_at.elapsed();
    assert!(noticed < RANK_BOUND, "rank 0 noticed after {noticed:?}");
    let status = env.wait(daemon, "daemon", LIMIT).await;
    assert!(status.success(), "{}", env.log("daemon"));
    let run = env.run(id).await;
    assert_eq!(run.status, RunStatus::Completed, "{}", env.log("daemon"));
    assert_eq!(
        (run.attempts, run.crashes),
        (2, 1),
        "one crashed attempt, then one that finished"
    );
    assert_eq!(env.metric_steps(id).await, expected_steps(STEPS, 10));
    let log = env.log("daemon");
    assert!(log.contains("a rank failed"), "the crash is logged:\n{log}");
    eprintln!("rank 0 noticed rank 1's SIGKILL after {noticed:?}");
}

/// SIGKILL of rank 0 (the daemon) mid-step: rank 1 exits within the bound on its own; a
/// new daemon takes the stale run over and finishes it with every metric row once.
async fn sigkill_of_rank_0_stops_rank_1_and_the_run_resumes(env: TestEnv) {
    const STEPS: i64 = 300;
    let (daemon, rank1, id) = two_rank_daemon_mid_run(&env, "first", STEPS).await;
    signal(&daemon, "KILL");
    let waited = time_to_exit(rank1, RANK_BOUND).await;
    let _ = env.wait(daemon, "first", Duration::from_secs(10)).await;
    assert_eq!(
        env.run(id).await.status,
        RunStatus::Running,
        "left running, its heartbeat stopping"
    );

    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = env
        .run_to_end(
            "second",
            &with_timeout(&[
                "daemon",
                "--once",
                "--nproc-per-node",
                "2",
                "--stale-after",
                "2s",
            ]),
            LIMIT,
        )
        .await;
    assert!(status.success(), "{}", env.log("second"));
    let run = env.run(id).await;
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!(run.crashes, 1);
    assert_eq!(env.metric_steps(id).await, expected_steps(STEPS, 10));
    eprintln!("rank 1 exited {waited:?} after rank 0's SIGKILL");
}

both_backends!(
    crate::helpers::with_env;
    sigkill_of_rank_1_interrupts_the_attempt_and_the_run_resumes,
    sigkill_of_rank_0_stops_rank_1_and_the_run_resumes,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_ranks_match_one_process() {
    with_env(Db::Sqlite, two_ranks_train_the_same_model_as_one_process).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_ranks_resume_bit_identical() {
    with_env(Db::Sqlite, a_stopped_two_rank_run_resumes_bit_identical).await;
}

#[test]
fn a_rank_that_cannot_reach_the_store_fails_clearly_within_the_timeout() {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_ddpm-trainer"))
        .args([
            "--device",
            "cpu",
            "--rank-timeout",
            "2s",
            "--log-format",
            "json",
            "rank",
        ])
        .envs([
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", &ddpm_testkit::free_port().to_string()),
        ])
        .output()
        .expect("run rank");
    let elapsed = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("connecting to the rendezvous store"),
        "the error says what failed:\n{stderr}"
    );
    assert!(
        elapsed < Duration::from_secs(20),
        "gave up after {elapsed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_global_batch_the_ranks_cannot_split_is_refused_before_any_work() {
    with_env(Db::Sqlite, |env| async move {
        let config = config(&env, "run.toml", 20, 5, 10);
        let args = with_timeout(&["train", config.to_str().unwrap(), "--nproc-per-node", "3"]);
        let status = env.run_to_end("train", &args, LIMIT).await;
        assert!(!status.success());
        let log = env.log("train");
        assert!(log.contains("does not divide by the world size 3"), "{log}");
        assert!(env.metric_steps(1).await.is_empty(), "no step was trained");
        assert!(!log.contains("rank started"), "no rank was started:\n{log}");
    })
    .await;
}

/// torchrun from the wheel the set-up script installs (its venv's `bin/`).
fn torchrun() -> PathBuf {
    let torch = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../.libtorch")
        .canonicalize()
        .expect(".libtorch (scripts/setup-libtorch.sh)");
    // <venv>/lib/python3.X/site-packages/torch
    let venv = torch.ancestors().nth(4).expect("the venv of the wheel");
    let path = venv.join("bin/torchrun");
    assert!(path.exists(), "torchrun not found at {}", path.display());
    path
}

/// The parent of process `pid`, from `/proc/<pid>/stat`.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Whether `pid` is `ancestor` or one of its descendants.
fn descends_from(mut pid: u32, ancestor: u32) -> bool {
    for _ in 0..16 {
        if pid == ancestor {
            return true;
        }
        match parent_of(pid) {
            Some(parent) if parent > 1 => pid = parent,
            _ => return false,
        }
    }
    false
}

/// The worker of rank `rank` that the torchrun process `torchrun` started: our binary,
/// below it, with RANK=`rank` (other tests' ranks run beside it with the same binary).
fn torchrun_worker(torchrun: u32, rank: usize) -> Option<u32> {
    let binary = env!("CARGO_BIN_EXE_ddpm-trainer");
    let wanted = format!("RANK={rank}");
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid = entry.file_name().to_string_lossy().parse::<u32>().ok()?;
            let exe = std::fs::read_link(entry.path().join("exe")).ok()?;
            let environ = std::fs::read(entry.path().join("environ")).ok()?;
            let has = environ.split(|&b| b == 0).any(|v| v == wanted.as_bytes());
            (exe == Path::new(binary) && has && !exited(pid) && descends_from(pid, torchrun))
                .then_some(pid)
        })
}

/// `torchrun --no-python` starts two ranks of `train`; rank 1 is killed mid-run;
/// torchrun restarts both, and rank 0 resumes the run the first attempt created (keyed
/// by the rendezvous id) to the end: one run, every metric row once.
async fn torchrun_launches_and_restarts_the_ranks(env: TestEnv) {
    const STEPS: i64 = 600;
    let config = config(&env, "run.toml", STEPS, 10, 50);
    let log = std::fs::File::create(env.log_path("torchrun")).unwrap();
    let mut cmd = Command::new(torchrun());
    cmd.args([
        "--standalone",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "1",
        "--no-python",
        env!("CARGO_BIN_EXE_ddpm-trainer"),
    ]);
    // The worker's own arguments, as `env.trainer` passes them.
    let worker = env.trainer(&with_timeout(&["train", config.to_str().unwrap()]));
    cmd.args(worker.get_args())
        .envs(worker.get_envs().filter_map(|(k, v)| Some((k, v?))))
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    let child = cmd.spawn().expect("start torchrun");
    wait_for_rows(&env, "torchrun", 1, 40).await;
    let rank1 = torchrun_worker(child.id(), 1).expect("torchrun's rank 1");
    Command::new("kill")
        .args(["-KILL", &rank1.to_string()])
        .status()
        .unwrap();
    let status = env.wait(child, "torchrun", LIMIT).await;
    assert!(status.success(), "{}", env.log("torchrun"));
    let runs = env.registry.list_runs(None, 10, 0).await.unwrap();
    assert_eq!(
        runs.len(),
        1,
        "the restart resumed the run, it made no new one"
    );
    let run = &runs[0];
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!(run.attempts, 2, "{}", env.log("torchrun"));
    assert!(run.launch_key.is_some(), "keyed by the rendezvous id");
    assert_eq!(run.world.as_ref().map(|w| w.size), Some(2));
    assert_eq!(env.metric_steps(run.id).await, expected_steps(STEPS, 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn torchrun_launches_train() {
    with_env(Db::Sqlite, torchrun_launches_and_restarts_the_ranks).await;
}

/// `--launch-id` (what a PyTorchJob pod passes, from its job's name) names one run: a
/// restarted `train` with the same id resumes it rather than starting over, and once it
/// is completed another start with the id trains nothing.
async fn a_launch_id_names_one_run_across_restarts(env: TestEnv) {
    const STEPS: i64 = 200;
    let config = config(&env, "run.toml", STEPS, 10, 50);
    let args = ["train", config.to_str().unwrap(), "--launch-id", "job-1"];
    let child = env.spawn("first", &args);
    wait_for_rows(&env, "first", 1, 60).await;
    signal(&child, "TERM");
    assert!(
        env.wait(child, "first", LIMIT).await.success(),
        "{}",
        env.log("first")
    );
    assert_eq!(env.run(1).await.status, RunStatus::Interrupted);

    for log in ["restarted", "again"] {
        let status = env.run_to_end(log, &args, LIMIT).await;
        assert!(status.success(), "{}", env.log(log));
    }
    let runs = env.registry.list_runs(None, 10, 0).await.unwrap();
    assert_eq!(runs.len(), 1, "one run for the launch");
    assert_eq!(runs[0].launch_key.as_deref(), Some("job-1"));
    assert_eq!(
        (runs[0].status, runs[0].attempts),
        (RunStatus::Completed, 2)
    );
    assert_eq!(env.metric_steps(1).await, expected_steps(STEPS, 10));
    assert!(
        env.log("again").contains("already completed"),
        "{}",
        env.log("again")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_launch_id_resumes_its_run() {
    with_env(Db::Sqlite, a_launch_id_names_one_run_across_restarts).await;
}

/// A loss that turns non-finite on a checkpoint step: every rank stops at that step,
/// nothing is written from the broken weights, and the run fails saying why.
async fn a_non_finite_loss_stops_every_rank_before_a_checkpoint(env: TestEnv) {
    // A learning rate of 1e12 (1e11 in the first warm-up step) breaks the weights at
    // step 1; step 2's loss is NaN, and step 2 is a checkpoint step.
    let text = micro_config(&env.dataset, 50, 1, 2).replace("lr = 1e-3", "lr = 1e12");
    let config = env.write_config("run.toml", &text);
    let args = with_timeout(&["train", config.to_str().unwrap(), "--nproc-per-node", "2"]);
    let status = env.run_to_end("train", &args, LIMIT).await;
    assert!(!status.success());
    let run = env.run(1).await;
    assert_eq!(run.status, RunStatus::Failed);
    let error = run.error.unwrap_or_default();
    assert!(error.contains("non-finite at step 2"), "{error}");
    assert_eq!(
        env.newest_step(1, CheckpointKind::State).await,
        None,
        "nothing saved"
    );
    assert_eq!(
        env.metric_steps(1).await,
        [1, 2],
        "rows up to the step that broke"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_non_finite_loss_stops_every_rank() {
    with_env(
        Db::Sqlite,
        a_non_finite_loss_stops_every_rank_before_a_checkpoint,
    )
    .await;
}
