//! The checkpoint store on S3 (a bucket of moto's server, `DDPM_TEST_S3_URL`), through
//! the binaries:
//!
//! - trainer → S3 → server: a run trained with `--store s3://…` is served by
//!   `ddpm-server` on the same bucket, which caches what it loads by SHA-256; a newer
//!   checkpoint whose object does not match its row is refused and the previous model
//!   keeps serving, and a new replica (empty cache) starts on the good one;
//! - S3 down in the middle of a run (a proxy in front of moto cut, then restored): the
//!   run is deferred, not failed, resumes when the store is back, and its series and
//!   checkpoints audit clean.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ddpm_registry::{CheckpointKind, CheckpointStore, NewCheckpoint, RunStatus};
use tokio::net::{TcpListener, TcpStream};

use crate::audit::{audit, Audit};
use crate::helpers::{micro_config, signal, with_env_on_s3, TestEnv};

const LIMIT: Duration = Duration::from_secs(180);

/// `ddpm-server`, built beside this crate's binary by a workspace build
/// (`cargo test --workspace`, which `scripts/test.sh` runs).
fn server_exe() -> PathBuf {
    let exe = Path::new(env!("CARGO_BIN_EXE_ddpm-trainer")).with_file_name("ddpm-server");
    assert!(
        exe.is_file(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        exe.display()
    );
    exe
}

/// A server replica on the environment's database and bucket, with its own cache.
struct Replica {
    child: Child,
    url: String,
    log: PathBuf,
    cache: PathBuf,
}

impl Replica {
    fn start(env: &TestEnv, name: &str) -> Replica {
        let port = ddpm_testkit::free_port();
        let cache = env.dir.path().join(format!("{name}-cache"));
        let log = env.log_path(name);
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(server_exe())
            .args(["--database-url", &env.url])
            .args(env.s3_args(None))
            .arg("--data-dir")
            .arg(env.dir.path())
            .arg("--cache-dir")
            .arg(&cache)
            .args(["--bind", &format!("127.0.0.1:{port}")])
            .args(["--device", "cpu", "--torch-threads", "1"])
            .args(["--poll-interval", "200ms", "--log-format", "json"])
            .env_remove("DDPM_API_TOKEN")
            .env("RUST_LOG", "info,sqlx=warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start ddpm-server");
        Replica {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
            cache,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `/readyz` answers 200 (a model is loaded).
    async fn ready(&self, client: &reqwest::Client) {
        let start = std::time::Instant::now();
        loop {
            if let Ok(r) = client.get(format!("{}/readyz", self.url)).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(
                start.elapsed() < LIMIT,
                "the replica never got ready:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The checkpoint id `/v1/model` says is served.
    async fn serving(&self, client: &reqwest::Client) -> i64 {
        let model: serde_json::Value = client
            .get(format!("{}/v1/model", self.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        model["checkpoint_id"].as_i64().expect("a checkpoint id")
    }

    /// One guided sample of class 0 as a PNG, decoded.
    async fn sample(&self, client: &reqwest::Client) -> image::DynamicImage {
        let response = client
            .post(format!("{}/v1/samples", self.url))
            .header("accept", "image/png")
            .json(&serde_json::json!({ "class": 0, "n": 1, "steps": 4, "seed": 7 }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{}", self.log());
        image::load_from_memory(&response.bytes().await.unwrap()).expect("a PNG")
    }

    /// A counter of the server's Prometheus page.
    async fn counter(&self, client: &reqwest::Client, name: &str) -> f64 {
        let text = client
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    }

    fn stop(mut self) {
        signal(&self.child, "TERM");
        let _ = self.child.wait();
    }
}

async fn trainer_to_s3_to_server(env: TestEnv) {
    let config = env.write_config("run.toml", &micro_config(&env.dataset, 60, 5, 20));
    let status = env
        .run_to_end("train", &["train", config.to_str().unwrap()], LIMIT)
        .await;
    assert!(status.success(), "{}", env.log("train"));
    let run = env.registry.list_runs(None, 1, 0).await.unwrap()[0].clone();
    assert_eq!((run.status, run.current_step), (RunStatus::Completed, 60));
    // Every registered object is in the bucket, under a key with its hash; no directory
    // store was written.
    let store = env.store();
    let records = env.registry.list_checkpoints(run.id).await.unwrap();
    let keys = store.run_keys(run.id).await.unwrap();
    for record in &records {
        assert!(
            keys.contains(&record.path),
            "{} not in {keys:?}",
            record.path
        );
        assert!(
            record.path.contains(&record.sha256[..12]),
            "{}",
            record.path
        );
    }
    assert!(!env.checkpoints.join("runs").exists());
    let newest = env
        .registry
        .newest_checkpoint(Some(run.id), CheckpointKind::Ema)
        .await
        .unwrap()
        .unwrap();

    let client = reqwest::Client::new();
    let first = Replica::start(&env, "server-1");
    first.ready(&client).await;
    assert_eq!(first.serving(&client).await, newest.id);
    let image = first.sample(&client).await;
    assert_eq!((image.width(), image.height()), (8, 8));
    // Cached by hash.
    assert!(
        first.cache.join(&newest.sha256).is_file(),
        "{}",
        first.log()
    );
    // The grid, read from the bucket.
    let grid = client
        .get(format!(
            "{}/v1/checkpoints/{}/grid.png",
            first.url, newest.id
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(grid.status(), 200);
    image::load_from_memory(&grid.bytes().await.unwrap()).expect("the grid is a PNG");

    // A newer checkpoint whose object does not match its row (the row's hash is another
    // content's, not in any cache): refused, and the model being served stays.
    let mut bytes = store.open(&newest).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    let file = store
        .write_bytes(
            Path::new(&format!(
                "runs/{}/ema-00000080-tampered.safetensors",
                run.id
            )),
            &bytes,
        )
        .unwrap();
    let failures_before = first.counter(&client, "ddpm_model_load_failures").await;
    env.registry
        .register_checkpoint(&NewCheckpoint {
            run_id: run.id,
            step: 80,
            kind: CheckpointKind::Ema,
            path: file.path.clone(),
            size_bytes: file.size_bytes as i64,
            sha256: "5a".repeat(32),
        })
        .await
        .unwrap();
    let start = std::time::Instant::now();
    while first.counter(&client, "ddpm_model_load_failures").await <= failures_before {
        assert!(start.elapsed() < LIMIT, "never tried:\n{}", first.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(first.log().contains("checksum mismatch"), "{}", first.log());
    assert_eq!(first.serving(&client).await, newest.id);
    first.sample(&client).await;
    assert!(!first.cache.join(&file.sha256).exists());

    // A new replica, cache empty: it refuses the bad one and serves the good one.
    let second = Replica::start(&env, "server-2");
    second.ready(&client).await;
    assert_eq!(second.serving(&client).await, newest.id);
    second.sample(&client).await;
    first.stop();
    second.stop();
}

/// A TCP proxy in front of the S3 server that can be cut (connections refused and
/// broken) and restored: an S3 outage as the trainer sees it.
struct Proxy {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
}

impl Proxy {
    async fn start(upstream: &str) -> Proxy {
        let upstream: SocketAddr = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let (accepting, cuts) = (Arc::clone(&up), cut.subscribe());
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                if !accepting.load(Ordering::SeqCst) {
                    continue; // dropped: the connection is reset
                }
                let mut cuts = cuts.clone();
                // Only cuts after this connection was accepted end it.
                cuts.borrow_and_update();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cuts.changed() => {}
                    }
                });
            }
        });
        Proxy { addr, up, cut }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        if !up {
            self.cut.send_modify(|n| *n += 1);
        }
    }
}

async fn s3_down_mid_run_defers_and_resumes(mut env: TestEnv) {
    const TOTAL: i64 = 400;
    let proxy = Proxy::start(env.s3.as_ref().unwrap().endpoint.as_deref().unwrap()).await;
    env.s3.as_mut().unwrap().endpoint = Some(proxy.url());
    let config = env.write_config("run.toml", &micro_config(&env.dataset, TOTAL, 5, 25));
    let id = env.submit(&config).await;
    let daemon = env.spawn(
        "daemon",
        &[
            "daemon",
            "--poll-interval",
            "100ms",
            "--retry-backoff",
            "500ms",
            "--store-timeout",
            "1s",
        ],
    );
    env.wait_until("daemon", LIMIT, "a checkpoint at step 50", || async {
        env.newest_step(id, CheckpointKind::Ema)
            .await
            .is_some_and(|s| s >= 50)
    })
    .await;

    proxy.set_up(false);
    env.wait_until("daemon", LIMIT, "the run deferred", || async {
        let run = env.run(id).await;
        run.status == RunStatus::Interrupted
            && run
                .error
                .as_deref()
                .is_some_and(|e| e.contains("store unavailable") || e.contains("unavailable"))
    })
    .await;
    let deferred = env.run(id).await;
    assert!(deferred.retry_at.is_some(), "{deferred:?}");
    // The daemon keeps trying (and deferring) while the store stays away; never failed.
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(4) {
        let run = env.run(id).await;
        assert_ne!(run.status, RunStatus::Failed, "{}", env.log("daemon"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    proxy.set_up(true);
    env.wait_until("daemon", LIMIT, "the run completed", || async {
        env.run(id).await.status == RunStatus::Completed
    })
    .await;
    signal(&daemon, "TERM");
    env.wait(daemon, "daemon", Duration::from_secs(60)).await;
    let log = env.log("daemon");
    assert!(log.contains("run deferred"), "{log}");
    let run = env.run(id).await;
    assert_eq!(run.current_step, TOTAL);
    assert!(run.attempts >= 2, "{run:?}");
    assert_eq!(audit(&env, id, TOTAL, 5).await, Audit::default());
}

/// `daemon --once` on `env` stops at start with an error that contains `why`.
fn stops_at_start_saying(env: &TestEnv, why: &str) {
    let out = env
        .trainer(&["daemon", "--once"])
        .output()
        .expect("run the trainer");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(why), "{err}");
}

/// A bucket that does not exist stops the trainer at start, saying so.
async fn a_missing_bucket_is_refused_at_start(mut env: TestEnv) {
    let spec = env.s3.as_mut().unwrap();
    spec.bucket = format!("{}-missing", spec.bucket);
    stops_at_start_saying(&env, "bucket does not exist");
}

/// Credentials the store refuses stop the trainer at start, saying so: permanent, not a
/// run deferred for ever.
async fn a_refused_key_is_refused_at_start(mut env: TestEnv) {
    let spec = env.s3.as_mut().unwrap();
    spec.endpoint = Some(ddpm_testkit::s3_auth_server_url());
    stops_at_start_saying(&env, "check the credentials");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trainer_to_s3_to_server_with_a_tampered_checkpoint() {
    with_env_on_s3(trainer_to_s3_to_server).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_down_in_the_middle_of_a_run() {
    with_env_on_s3(s3_down_mid_run_defers_and_resumes).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_bucket_stops_the_trainer() {
    with_env_on_s3(a_missing_bucket_is_refused_at_start).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_stop_the_trainer() {
    with_env_on_s3(a_refused_key_is_refused_at_start).await
}

/// The store the tests read with is the one the binaries write to.
#[test]
fn the_store_spec_points_at_the_bucket() {
    let spec = ddpm_testkit::s3_bucket("x");
    let store = CheckpointStore::open_spec(&ddpm_service::StoreSpec::S3(spec)).unwrap();
    assert!(store.is_remote());
    assert!(store.to_string().starts_with("s3://ddpm-test-"), "{store}");
}
