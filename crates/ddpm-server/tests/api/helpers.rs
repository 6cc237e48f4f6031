//! Shared plumbing: a tiny trained checkpoint (the micro model of `ddpm-testkit-model`,
//! trained once per test binary), a fresh registry database per test (SQLite file, or a
//! PostgreSQL database on the server named by `DDPM_TEST_POSTGRES_URL`), [`spawn_app`],
//! which runs the real server on port 0, and [`wait_until`], which tests wait with
//! instead of sleeping. `TEST_LOG=1` turns the server's logs on.

use std::{
    future::Future,
    path::{Path, PathBuf},
    sync::{Once, OnceLock},
    time::Duration,
};

use ddpm_core::checkpoint::{checkpoint_bytes, load_checkpoint_bytes, CheckpointInfo};
use ddpm_registry::{CheckpointKind, CheckpointRecord, CheckpointStore, NewRun, Registry};
use ddpm_server::{Config, SchedulerPolicy};
use ddpm_testkit_model::{
    colour_dataset, exclusive_rng, micro_config, one_torch_thread, train, TrainSpec,
    MICRO_IMAGE_SIZE,
};
use tch::Device;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

pub const CLASSES: [&str; 3] = ["red", "green", "blue"];
pub const IMAGE_SIZE: u32 = MICRO_IMAGE_SIZE as u32;

pub use ddpm_testkit::{Db, FreshDatabase};

/// How to start a test server.
#[derive(Debug, Clone)]
pub struct Options {
    pub db: Db,
    /// Register a trained checkpoint (run 1, step 100) before the server starts.
    pub checkpoint: bool,
    pub max_batch: u32,
    pub queue_capacity: u32,
    pub max_images_per_request: u32,
    pub poll_interval: Duration,
    pub request_timeout: Duration,
    pub api_token: Option<String>,
    pub scheduler: SchedulerPolicy,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            db: Db::Sqlite,
            checkpoint: true,
            max_batch: 16,
            queue_capacity: 64,
            max_images_per_request: 16,
            poll_interval: Duration::from_millis(100),
            request_timeout: Duration::from_secs(60),
            api_token: None,
            scheduler: SchedulerPolicy::Fair,
            header_read_timeout: Duration::from_secs(15),
            body_read_timeout: Duration::from_secs(15),
        }
    }
}

pub struct TestApp {
    /// `http://127.0.0.1:<port>`.
    pub address: String,
    pub client: reqwest::Client,
    pub registry: Registry,
    pub store: CheckpointStore,
    /// The store's directory, for tests that damage files behind the registry's back.
    pub checkpoints: PathBuf,
    /// The run the first checkpoint belongs to.
    pub run_id: i64,
    _dir: tempfile::TempDir,
    database: FreshDatabase,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<Result<(), ddpm_server::ServerError>>>,
}

/// Starts the real server on 127.0.0.1:0 with a fresh registry.
pub async fn spawn_app(options: Options) -> TestApp {
    init_logging();
    one_torch_thread();
    let dir = tempfile::tempdir().expect("temp dir");
    let database = FreshDatabase::create(options.db, dir.path()).await;
    let registry = Registry::connect(&database.url)
        .await
        .expect("connect to the test registry");
    let checkpoints = dir.path().join("checkpoints");
    let store = CheckpointStore::new(&checkpoints).expect("store");
    let run_id = registry
        .create_run(&new_run())
        .await
        .expect("create run")
        .id;
    if options.checkpoint {
        add_checkpoint(&registry, &store, run_id, 100).await;
    }
    let mut config = Config::with_data_dir(dir.path());
    config.common.database_url = Some(database.url.clone());
    config.common.checkpoint_dir = Some(checkpoints.clone());
    config.common.device = "cpu".into();
    config.max_batch = options.max_batch;
    config.queue_capacity = options.queue_capacity;
    config.max_images_per_request = options.max_images_per_request;
    config.poll_interval = options.poll_interval;
    config.request_timeout = options.request_timeout;
    config.api_token = options.api_token.clone();
    config.scheduler = options.scheduler;
    config.header_read_timeout = options.header_read_timeout;
    config.body_read_timeout = options.body_read_timeout;
    config.default_steps = 20;
    config.pin_run = None;
    config.pin_checkpoint = None;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
    let address = format!("http://{}", listener.local_addr().expect("address"));
    let (shutdown, stop) = oneshot::channel::<()>();
    let server = tokio::spawn(ddpm_server::run(config, listener, async move {
        let _ = stop.await;
    }));
    let app = TestApp {
        address,
        client: reqwest::Client::new(),
        registry,
        store,
        checkpoints,
        run_id,
        _dir: dir,
        database,
        shutdown: Some(shutdown),
        server: Some(server),
    };
    app.wait_until_up().await;
    app
}

impl TestApp {
    async fn wait_until_up(&self) {
        for _ in 0..200 {
            if let Ok(r) = self.client.get(self.url("/healthz")).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the server did not come up");
    }

    /// The server's registry database (a PostgreSQL or SQLite URL).
    pub fn database_url(&self) -> &str {
        &self.database.url
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    /// `POST /v1/samples` with `body` and `Accept: accept`.
    pub async fn sample(&self, body: serde_json::Value, accept: &str) -> reqwest::Response {
        self.client
            .post(self.url("/v1/samples"))
            .header("accept", accept)
            .json(&body)
            .send()
            .await
            .expect("request")
    }

    /// The JSON answer of a sampling request that must succeed.
    pub async fn sample_json(&self, body: serde_json::Value) -> serde_json::Value {
        let response = self.sample(body, "application/json").await;
        let status = response.status();
        let text = response.text().await.expect("body");
        assert_eq!(status, 200, "{text}");
        serde_json::from_str(&text).expect("JSON")
    }

    pub async fn get_json(&self, path: &str) -> (u16, serde_json::Value) {
        let response = self
            .client
            .get(self.url(path))
            .send()
            .await
            .expect("request");
        let status = response.status().as_u16();
        (
            status,
            response.json().await.unwrap_or(serde_json::Value::Null),
        )
    }

    /// A metric's value from `/metrics` (0 when absent).
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self
            .client
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// The step of the model `/v1/model` reports.
    pub async fn model_step(&self) -> Option<i64> {
        let (status, body) = self.get_json("/v1/model").await;
        (status == 200).then(|| body["step"].as_i64()).flatten()
    }

    /// Waits up to `limit` for `/v1/model` to report `step`.
    pub async fn wait_for_step(&self, step: i64, limit: Duration) -> bool {
        let until = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < until {
            if self.model_step().await == Some(step) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// Whether the server holds a PostgreSQL `LISTEN` on the test database: a session whose
    /// last statement was a `LISTEN` and has completed. `false` on SQLite.
    pub async fn postgres_listening(&self) -> bool {
        use sqlx::Connection;
        if !self.database.url.starts_with("postgres") {
            return false;
        }
        let mut connection = sqlx::PgConnection::connect(&self.database.url)
            .await
            .expect("connect to the test database");
        let listening: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND state = 'idle' AND query LIKE 'LISTEN %'",
        )
        .fetch_one(&mut connection)
        .await
        .expect("query pg_stat_activity");
        let _ = connection.close().await;
        listening > 0
    }

    /// Stops the server gracefully and waits for it.
    pub async fn stop(mut self) -> Result<(), ddpm_server::ServerError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let result = match self.server.take() {
            Some(server) => server.await.expect("server task"),
            None => Ok(()),
        };
        self.registry.close().await;
        std::mem::replace(&mut self.database, FreshDatabase::none())
            .drop_database()
            .await;
        result
    }

    /// Sends the shutdown signal without waiting.
    pub fn signal_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    pub fn take_server(&mut self) -> Option<JoinHandle<Result<(), ddpm_server::ServerError>>> {
        self.server.take()
    }
}

/// One Server-Sent Event: its name and its data as JSON.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub name: String,
    pub data: serde_json::Value,
}

/// Reads a `text/event-stream` response event by event, as a browser's EventSource would
/// (comment lines, such as keep-alives, are skipped).
pub struct SseReader {
    response: reqwest::Response,
    buffer: String,
}

impl SseReader {
    pub fn new(response: reqwest::Response) -> SseReader {
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        SseReader {
            response,
            buffer: String::new(),
        }
    }

    /// The next event, or `None` once the stream has ended.
    pub async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut name = String::from("message");
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() {
                    continue; // a comment (keep-alive)
                }
                let data = serde_json::from_str(&data).expect("event data is JSON");
                return Some(SseEvent { name, data });
            }
            match self.response.chunk().await.expect("read the stream") {
                Some(bytes) => self
                    .buffer
                    .push_str(std::str::from_utf8(&bytes).expect("UTF-8 stream")),
                None => return None,
            }
        }
    }

    /// Every remaining event.
    pub async fn rest(&mut self) -> Vec<SseEvent> {
        let mut events = Vec::new();
        while let Some(e) = self.next().await {
            events.push(e);
        }
        events
    }
}

/// How long [`wait_until`] waits: long enough for a loaded machine, short enough that a
/// test that waits for something that never happens fails rather than hangs.
pub const WAIT_LIMIT: Duration = Duration::from_secs(60);

/// Polls `condition` every 20 ms until it holds; panics naming `what` after [`WAIT_LIMIT`].
pub async fn wait_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let until = tokio::time::Instant::now() + WAIT_LIMIT;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < until,
            "waited {WAIT_LIMIT:?} for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn new_run() -> NewRun {
    NewRun {
        config: serde_json::json!({ "model": "micro", "classes": CLASSES }),
        dataset: serde_json::json!({ "path": "memory:colours", "image_count": 192, "class_names": CLASSES }),
        total_steps: 1000,
    }
}

/// Registers a checkpoint of the trained model for `run_id` at `step`.
pub async fn add_checkpoint(
    registry: &Registry,
    store: &CheckpointStore,
    run_id: i64,
    step: i64,
) -> CheckpointRecord {
    let bytes = tokio::task::spawn_blocking(move || checkpoint_for(run_id, step))
        .await
        .expect("checkpoint thread");
    add_checkpoint_bytes(registry, store, run_id, step, bytes).await
}

/// Registers arbitrary bytes as the EMA checkpoint of `run_id` at `step`.
pub async fn add_checkpoint_bytes(
    registry: &Registry,
    store: &CheckpointStore,
    run_id: i64,
    step: i64,
    bytes: Vec<u8>,
) -> CheckpointRecord {
    let rel = store.path_for(run_id, step, CheckpointKind::Ema);
    let file = store
        .write_bytes(&rel, &bytes)
        .expect("write the checkpoint");
    store
        .register(registry, run_id, step, CheckpointKind::Ema, &file)
        .await
        .expect("register the checkpoint")
}

/// The trained model as a checkpoint of `run_id` at `step`.
pub fn checkpoint_for(run_id: i64, step: i64) -> Vec<u8> {
    let trained = trained_checkpoint();
    let loaded =
        load_checkpoint_bytes(Path::new("trained"), trained, Device::Cpu).expect("reload trained");
    let info = CheckpointInfo {
        schedule: loaded.manifest.schedule,
        class_names: loaded.manifest.class_names.clone(),
        run_id: Some(run_id),
        step,
    };
    checkpoint_bytes(&loaded.model, &info)
        .expect("checkpoint bytes")
        .0
}

/// Steps of training for the shared checkpoint: enough that guided samples show their
/// class's colour.
const TRAIN_STEPS: i64 = 800;

/// The EMA weights of the micro model trained on the colour classes, as checkpoint bytes
/// (trained once per test binary).
pub fn trained_checkpoint() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(train_checkpoint)
}

fn train_checkpoint() -> Vec<u8> {
    let started = std::time::Instant::now();
    let classes = CLASSES.len() as i64;
    let (images, labels) = {
        let _rng = exclusive_rng();
        tch::manual_seed(0);
        colour_dataset(classes, 64, IMAGE_SIZE as i64)
    };
    let spec = TrainSpec {
        steps: TRAIN_STEPS,
        batch: 32,
        lr: 2e-3,
        seed: 0,
    };
    let trained = train(&micro_config(classes), &images, &labels, &spec);
    let info = CheckpointInfo {
        schedule: *trained.schedule.config(),
        class_names: CLASSES.iter().map(|c| c.to_string()).collect(),
        run_id: None,
        step: 0,
    };
    let bytes = checkpoint_bytes(trained.ema.model(), &info)
        .expect("checkpoint bytes")
        .0;
    eprintln!(
        "trained the micro model for {TRAIN_STEPS} steps in {:.1?}",
        started.elapsed()
    );
    bytes
}

/// Decodes a PNG into (width, height, RGB bytes).
pub fn decode_png(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
    let image = image::load_from_memory_with_format(bytes, image::ImageFormat::Png)
        .expect("a PNG")
        .to_rgb8();
    (image.width(), image.height(), image.into_raw())
}

/// Mean of each channel of RGB bytes, in [0, 255].
pub fn channel_means(rgb: &[u8]) -> [f64; 3] {
    let mut sums = [0.0; 3];
    for px in rgb.chunks(3) {
        for c in 0..3 {
            sums[c] += px[c] as f64;
        }
    }
    let n = (rgb.len() / 3).max(1) as f64;
    sums.map(|s| s / n)
}

/// The PNG bytes of image `i` of a JSON sampling response.
pub fn json_png(body: &serde_json::Value, i: usize) -> Vec<u8> {
    use base64::Engine;
    let b64 = body["images"][i]["png_base64"]
        .as_str()
        .expect("png_base64");
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("base64")
}

fn init_logging() {
    static ONCE: Once = Once::new();
    if std::env::var_os("TEST_LOG").is_some() {
        ONCE.call_once(|| {
            let _ = tracing_subscriber::fmt()
                .with_env_filter("ddpm_server=debug,ddpm_registry=info,tower_http=debug")
                .with_test_writer()
                .try_init();
        });
    }
}
