//! Shared plumbing: a fresh database per test (SQLite file or a PostgreSQL database with
//! a random name, dropped afterwards), a generated dataset, a micro run config, and the
//! `ddpm-trainer` binary as a child process with its logs in a file.

use std::{
    future::Future,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use ddpm_registry::{CheckpointKind, CheckpointStore, MetricPoint, Registry, Run};
use ddpm_service::{S3Spec, StoreSpec};
pub use ddpm_testkit::{Db, FreshDatabase};
use ddpm_trainer::demo::{write_demo_dataset, DemoSpec};

/// What a test gets: a database, a dataset, a checkpoint store (a directory, or a
/// bucket of the S3 test server).
pub struct TestEnv {
    pub registry: Registry,
    pub url: String,
    pub dir: tempfile::TempDir,
    pub dataset: PathBuf,
    /// The directory store's root (unused when `s3` is set).
    pub checkpoints: PathBuf,
    /// The test's own bucket, when the store is S3 ([`with_env_on_s3`]).
    pub s3: Option<S3Spec>,
}

/// Runs `test` in a fresh environment on `db`; the database is dropped afterwards, also
/// when the test panics.
pub async fn with_env<F, Fut>(db: Db, test: F)
where
    F: FnOnce(TestEnv) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    with_store(db, None, test).await
}

/// [`with_env`] on SQLite with the checkpoints in a fresh bucket of the S3 test server
/// (`DDPM_TEST_S3_URL`).
pub async fn with_env_on_s3<F, Fut>(test: F)
where
    F: FnOnce(TestEnv) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    with_store(Db::Sqlite, Some(ddpm_testkit::s3_bucket("ddpm/ckpt")), test).await
}

async fn with_store<F, Fut>(db: Db, s3: Option<S3Spec>, test: F)
where
    F: FnOnce(TestEnv) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let dir = tempfile::tempdir().expect("temp dir");
    let database = FreshDatabase::create(db, dir.path()).await;
    let url = database.url.clone();
    let registry = Registry::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    let dataset = dir.path().join("dataset");
    let spec = DemoSpec {
        size: 8,
        per_class: 12,
        classes: 3,
        seed: 1,
    };
    write_demo_dataset(&dataset, &spec).expect("demo dataset");
    let env = TestEnv {
        registry: registry.clone(),
        url,
        checkpoints: dir.path().join("checkpoints"),
        dataset,
        dir,
        s3,
    };
    let outcome = tokio::spawn(test(env)).await;
    registry.close().await;
    database.drop_database().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// A run config for an 8×8 micro network that trains a step in milliseconds.
pub fn micro_config(dataset: &Path, steps: i64, log_every: i64, checkpoint_every: i64) -> String {
    format!(
        r#"preset = "tiny"

[dataset]
path = {dataset:?}
cache = true

[model]
image_size = 8
base_channels = 8
channel_mults = [1, 2]
bottleneck_mult = 2
attention_resolutions = [4]
attention_heads = 2
time_embedding_dim = 16

[schedule]
timesteps = 100

[training]
steps = {steps}
batch_size = 8
lr = 1e-3
warmup_steps = 10
log_every = {log_every}
checkpoint_every = {checkpoint_every}
keep_last = 2
sample_grid_per_class = 2
sample_steps = 4

[ema]
warmup_steps = 10
"#,
        dataset = dataset.display().to_string()
    )
}

impl TestEnv {
    /// Writes a config file into the test's directory.
    pub fn write_config(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("write config");
        path
    }

    /// The store the trainer writes to, opened the way the binary opens it.
    pub fn store(&self) -> CheckpointStore {
        CheckpointStore::open_spec(&self.store_spec()).expect("open the store")
    }

    pub fn store_spec(&self) -> StoreSpec {
        match &self.s3 {
            Some(spec) => StoreSpec::S3(spec.clone()),
            None => StoreSpec::Dir(self.checkpoints.clone()),
        }
    }

    /// The options that point a binary at the S3 test bucket through `endpoint` (the
    /// server itself, or a proxy in front of it); none for a directory store.
    pub fn s3_args(&self, endpoint: Option<&str>) -> Vec<String> {
        let Some(spec) = &self.s3 else {
            return Vec::new();
        };
        let endpoint = endpoint.or(spec.endpoint.as_deref()).expect("an endpoint");
        ddpm_testkit::s3_cli_args(spec, endpoint)
    }

    /// The binary with this environment's database and store, on one CPU thread.
    pub fn trainer(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ddpm-trainer"));
        cmd.args(["--database-url", &self.url])
            .arg("--checkpoint-dir")
            .arg(&self.checkpoints)
            .args(self.s3_args(None))
            .arg("--data-dir")
            .arg(self.dir.path())
            .args([
                "--device",
                "cpu",
                "--torch-threads",
                "1",
                "--log-format",
                "json",
            ])
            .args(["--heartbeat-interval", "200ms"])
            .args(args)
            .env("RUST_LOG", "info,sqlx=warn")
            .env("RAYON_NUM_THREADS", "1")
            .stdin(Stdio::null());
        cmd
    }

    /// Starts the binary with stdout and stderr in `<dir>/<log>.log`.
    pub fn spawn(&self, log: &str, args: &[&str]) -> Child {
        let path = self.log_path(log);
        let out = std::fs::File::create(&path).expect("log file");
        let err = out.try_clone().expect("log file");
        self.trainer(args)
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start ddpm-trainer")
    }

    pub fn log_path(&self, log: &str) -> PathBuf {
        self.dir.path().join(format!("{log}.log"))
    }

    pub fn log(&self, log: &str) -> String {
        std::fs::read_to_string(self.log_path(log)).unwrap_or_default()
    }

    /// Runs the binary to its end; panics with its log if it takes longer than `limit`.
    pub async fn run_to_end(&self, log: &str, args: &[&str], limit: Duration) -> ExitStatus {
        let child = self.spawn(log, args);
        self.wait(child, log, limit).await
    }

    pub async fn wait(&self, mut child: Child, log: &str, limit: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if start.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "ddpm-trainer {log} ran over {limit:?}; its log:\n{}",
                    self.log(log)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Queues a run through the CLI; returns its id.
    pub async fn submit(&self, config: &Path) -> i64 {
        let out = self
            .trainer(&["submit", config.to_str().expect("utf-8 path")])
            .output()
            .expect("submit");
        assert!(
            out.status.success(),
            "submit failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("submit prints the run id")
    }

    pub async fn run(&self, id: i64) -> Run {
        self.registry
            .get_run(id)
            .await
            .expect("get run")
            .expect("run exists")
    }

    pub async fn metric_steps(&self, id: i64) -> Vec<i64> {
        self.metrics(id).await.iter().map(|p| p.step).collect()
    }

    pub async fn metrics(&self, id: i64) -> Vec<MetricPoint> {
        self.registry
            .metrics(id, None, None, 1_000_000)
            .await
            .expect("metrics")
    }

    /// The newest registered checkpoint step of `kind`, if any.
    pub async fn newest_step(&self, id: i64, kind: CheckpointKind) -> Option<i64> {
        self.registry
            .newest_checkpoint(Some(id), kind)
            .await
            .expect("newest checkpoint")
            .map(|c| c.step)
    }

    /// Runs `ddpm-trainer train config` (log `train`) in the foreground until the newest
    /// run has metric rows at step `past` or later, then stops it with SIGTERM and asserts
    /// a clean exit; returns the run's id.
    pub async fn train_then_sigterm(&self, config: &Path, past: i64, limit: Duration) -> i64 {
        let child = self.spawn("train", &["train", config.to_str().unwrap()]);
        self.wait_until(
            "train",
            limit,
            &format!("rows past step {past}"),
            || async {
                let runs = self
                    .registry
                    .list_runs(None, 1, 0)
                    .await
                    .unwrap_or_default();
                match runs.first() {
                    Some(run) => self
                        .metric_steps(run.id)
                        .await
                        .last()
                        .is_some_and(|&s| s >= past),
                    None => false,
                }
            },
        )
        .await;
        signal(&child, "TERM");
        let status = self.wait(child, "train", Duration::from_secs(60)).await;
        assert!(
            status.success(),
            "SIGTERM is a clean exit:\n{}",
            self.log("train")
        );
        self.registry.list_runs(None, 1, 0).await.unwrap()[0].id
    }

    /// Polls `check` every 50 ms until it holds; panics with `log` after `limit`.
    pub async fn wait_until<F, Fut>(&self, log: &str, limit: Duration, what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let start = Instant::now();
        while !check().await {
            if start.elapsed() > limit {
                panic!(
                    "timed out waiting for {what}; log of {log}:\n{}",
                    self.log(log)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The log-step series of an uninterrupted run: every `log_every`-th step and the last.
pub fn expected_steps(total: i64, log_every: i64) -> Vec<i64> {
    let mut steps: Vec<i64> = (1..=total).filter(|s| s % log_every == 0).collect();
    if steps.last() != Some(&total) {
        steps.push(total);
    }
    steps
}

/// Sends `signal` (`KILL`, `TERM`) to a child.
pub fn signal(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} failed");
}
