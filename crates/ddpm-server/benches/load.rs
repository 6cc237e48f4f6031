//! Load benchmark of the real server, in-process on port 0, against the tiny model.
//!
//! All in one run, each server configuration started fresh:
//! 1. Throughput: C concurrent clients (1, 4, 16) each request one image at 20 DDIM steps,
//!    back to back: requests/s and p50/p99 latency, under the fair scheduler with cost
//!    admission, under FIFO (the scheduler before it), both at max batch 16, and without
//!    batching (max batch 1).
//! 2. The mixed-load target: a 10-step n = 1 request sent behind a running n = 64,
//!    1000-step DDPM request, against its unloaded latency, fair and FIFO; and whether the
//!    long request finishes.
//! 3. A mixed load: 2 clients sending 1000-step DDPM requests among 8 sending 20-step DDIM
//!    ones, fair and FIFO.
//! 4. Time to the first `progress` event of a streamed request, idle and under load.
//!
//! 5. Requests that name no sampler, under the sampling defaults before and after the
//!    sampler bench (issue 23), alone and among long requests.
//!
//! `cargo bench -p ddpm-server --bench load` (`DDPM_BENCH_PARTS=defaults` runs part 5
//! alone; `DDPM_BENCH_SECONDS` sets each measurement's
//! length, default 5; `DDPM_BENCH_TORCH_THREADS` libtorch's intra-op threads, default
//! libtorch's own choice).

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context;
use ddpm_core::{
    checkpoint::{checkpoint_bytes, CheckpointInfo},
    Model, ScheduleConfig, UNetConfig,
};
use ddpm_registry::{CheckpointKind, CheckpointStore, NewRun, Registry};
use ddpm_server::{Config, SchedulerPolicy};
use serde_json::json;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

const CLASSES: usize = 10;

/// The schedulers compared side by side, as the tables name them.
const SCHEDULERS: [(&str, SchedulerPolicy); 2] = [
    ("fair", SchedulerPolicy::Fair),
    ("fifo", SchedulerPolicy::Fifo),
];

struct Server {
    address: String,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<Result<(), ddpm_server::ServerError>>,
}

impl Server {
    async fn start(
        data_dir: &Path,
        max_batch: u32,
        scheduler: SchedulerPolicy,
    ) -> anyhow::Result<Server> {
        Server::start_with(data_dir, max_batch, scheduler, |_| {}).await
    }

    /// [`Server::start`] with `tweak` applied to the config last.
    async fn start_with(
        data_dir: &Path,
        max_batch: u32,
        scheduler: SchedulerPolicy,
        tweak: impl FnOnce(&mut Config),
    ) -> anyhow::Result<Server> {
        let mut config = Config::with_data_dir(data_dir);
        config.common.device = "cpu".into();
        config.max_batch = max_batch;
        config.scheduler = scheduler;
        config.queue_capacity = 1024;
        config.request_timeout = Duration::from_secs(600);
        config.api_token = None;
        tweak(&mut config);
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = format!("http://{}", listener.local_addr()?);
        let (shutdown, stop) = oneshot::channel::<()>();
        let task = tokio::spawn(ddpm_server::run(config, listener, async move {
            let _ = stop.await;
        }));
        let client = reqwest::Client::new();
        for _ in 0..200 {
            if client
                .get(format!("{address}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return Ok(Server {
                    address,
                    shutdown,
                    task,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("the server did not become ready")
    }

    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(());
        self.task.await??;
        Ok(())
    }
}

/// Latencies of completed requests and the wall time they took.
struct Load {
    latencies: Vec<Duration>,
    elapsed: Duration,
}

impl Load {
    fn throughput(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        if sorted.is_empty() {
            return Duration::ZERO;
        }
        let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted[i]
    }
}

/// `clients` clients sending `body` back to back for `duration`.
async fn load(
    address: &str,
    clients: usize,
    duration: Duration,
    body: serde_json::Value,
) -> anyhow::Result<Load> {
    let started = Instant::now();
    let tasks: Vec<JoinHandle<anyhow::Result<Vec<Duration>>>> = (0..clients)
        .map(|k| {
            let url = format!("{address}/v1/samples");
            let mut body = body.clone();
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut latencies = Vec::new();
                let mut seed = k as u64 * 1_000_000;
                while started.elapsed() < duration {
                    seed += 1;
                    body["seed"] = json!(seed);
                    latencies.push(timed(&client, &url, &body).await?);
                }
                Ok(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    Ok(Load {
        latencies,
        elapsed: started.elapsed(),
    })
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

fn short_request() -> serde_json::Value {
    json!({"class": 3, "n": 1, "sampler": "ddim", "steps": 20, "guidance_scale": 3.0})
}

fn long_request() -> serde_json::Value {
    json!({"class": 5, "n": 1, "sampler": "ddpm", "steps": 1000, "guidance_scale": 3.0})
}

/// The mixed load: `long_clients` sending 1000-step DDPM requests while `short_clients`
/// send `short` ones; returns the short requests' latencies. The long requests still
/// running at the end are abandoned (their clients go away, so the server drops them).
async fn mixed(
    address: &str,
    long_clients: usize,
    short_clients: usize,
    short: serde_json::Value,
    duration: Duration,
) -> anyhow::Result<Load> {
    let long: Vec<JoinHandle<()>> = (0..long_clients)
        .map(|k| {
            let url = format!("{address}/v1/samples");
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut body = long_request();
                for seed in 0.. {
                    body["seed"] = json!(k * 1000 + seed);
                    let _ = client.post(&url).json(&body).send().await;
                }
            })
        })
        .collect();
    // Let the long requests get going first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let short = load(address, short_clients, duration, short).await;
    for task in long {
        task.abort();
    }
    short
}

async fn bench() -> anyhow::Result<()> {
    let seconds: f64 = std::env::var("DDPM_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    let duration = Duration::from_secs_f64(seconds);
    if let Some(threads) = std::env::var("DDPM_BENCH_TORCH_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        tch::set_num_threads(threads);
    }
    let dir = tempfile::tempdir()?;
    let registry = Registry::connect(&format!(
        "sqlite:{}",
        dir.path().join("registry.db").display()
    ))
    .await?;
    let store = CheckpointStore::new(dir.path().join("checkpoints"))?;
    let run = registry
        .create_run(&NewRun {
            config: json!({ "model": "tiny" }),
            dataset: json!({ "path": "none", "image_count": 0 }),
            total_steps: 1,
        })
        .await?;
    // Throughput does not depend on the weights: an untrained tiny model will do.
    let model_config = UNetConfig::tiny(Some(CLASSES as i64));
    let model = Model::new(&model_config, tch::Device::Cpu)?;
    let info = CheckpointInfo {
        schedule: ScheduleConfig::default(),
        class_names: (0..CLASSES).map(|c| format!("class{c}")).collect(),
        run_id: Some(run.id),
        step: 1,
    };
    let (bytes, _) = checkpoint_bytes(&model, &info)?;
    drop(model);
    let file = store.write_bytes(&store.path_for(run.id, 1, CheckpointKind::Ema), &bytes)?;
    store
        .register(&registry, run.id, 1, CheckpointKind::Ema, &file)
        .await?;
    registry.close().await;

    println!(
        "ddpm-server load: tiny model ({}x{} RGB, {} classes, {} parameters), CPU, {} libtorch threads, {seconds} s per measurement",
        model_config.image_size,
        model_config.image_size,
        CLASSES,
        Model::new(&model_config, tch::Device::Cpu)?.parameter_count(),
        tch::get_num_threads(),
    );
    println!();
    // DDPM_BENCH_PARTS=defaults: part 5 alone.
    if std::env::var("DDPM_BENCH_PARTS").is_ok_and(|p| p == "defaults") {
        return defaults_under_mix(dir.path(), duration).await;
    }
    println!("1. n = 1, DDIM 20 steps, guidance 3.0, C clients back to back");
    println!("| clients | scheduler | max batch | requests/s | p50 ms | p99 ms | forward passes / image |");
    println!("| ---: | --- | ---: | ---: | ---: | ---: | ---: |");
    let configs = [
        ("fair", 16u32, SchedulerPolicy::Fair),
        ("fifo", 16, SchedulerPolicy::Fifo),
        ("fifo", 1, SchedulerPolicy::Fifo),
    ];
    let mut throughput = std::collections::HashMap::new();
    for (label, max_batch, scheduler) in configs {
        let server = Server::start(dir.path(), max_batch, scheduler).await?;
        // Warm-up.
        load(
            &server.address,
            2,
            Duration::from_millis(500),
            short_request(),
        )
        .await?;
        for clients in [1usize, 4, 16] {
            let (passes0, images0) = counters(&server.address).await?;
            let result = load(&server.address, clients, duration, short_request()).await?;
            let (passes1, images1) = counters(&server.address).await?;
            println!(
                "| {clients} | {label} | {max_batch} | {:.1} | {} | {} | {:.1} |",
                result.throughput(),
                ms(result.percentile(0.5)),
                ms(result.percentile(0.99)),
                (passes1 - passes0) / (images1 - images0).max(1.0),
            );
            throughput.insert((clients, label, max_batch), result.throughput());
        }
        server.stop().await?;
    }
    let at16 = |label, batch| {
        throughput
            .get(&(16, label, batch))
            .copied()
            .unwrap_or(f64::NAN)
    };
    println!();
    println!(
        "At 16 clients: fair {:.1} requests/s, {:.2}x FIFO's {:.1}; batching (fair) {:.1}x no batching.",
        at16("fair", 16),
        at16("fair", 16) / at16("fifo", 16),
        at16("fifo", 16),
        at16("fair", 16) / at16("fifo", 1),
    );

    println!();
    println!("2. A 10-step DDIM n = 1 request behind a running n = 64, 1000-step DDPM request (max batch 16)");
    println!("| scheduler | short alone p50 ms | short behind the long one p50 ms | ratio | short requests | long request s | long status |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | --- |");
    for (label, scheduler) in SCHEDULERS {
        let server = Server::start(dir.path(), 16, scheduler).await?;
        let row = behind_a_long_request(&server.address).await?;
        println!(
            "| {label} | {} | {} | {:.2} | {} | {:.1} | {} |",
            ms(row.alone),
            ms(row.behind),
            row.behind.as_secs_f64() / row.alone.as_secs_f64(),
            row.short_requests,
            row.long.as_secs_f64(),
            row.long_status,
        );
        server.stop().await?;
    }

    println!();
    println!("3. Mixed load: 2 clients sending DDPM 1000-step requests, 8 clients sending DDIM 20-step ones (max batch 16)");
    println!("| scheduler | short p50, 1 client alone ms | short p50, 8 clients, no long ms | short p50 mixed ms | short p99 mixed ms | short requests in mixed |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (label, scheduler) in SCHEDULERS {
        let server = Server::start(dir.path(), 16, scheduler).await?;
        load(
            &server.address,
            2,
            Duration::from_millis(500),
            short_request(),
        )
        .await?;
        let alone = load(&server.address, 1, duration, short_request()).await?;
        let without_long = load(&server.address, 8, duration, short_request()).await?;
        let loaded = mixed(&server.address, 2, 8, short_request(), duration).await?;
        println!(
            "| {label} | {} | {} | {} | {} | {} |",
            ms(alone.percentile(0.5)),
            ms(without_long.percentile(0.5)),
            ms(loaded.percentile(0.5)),
            ms(loaded.percentile(0.99)),
            loaded.latencies.len(),
        );
        server.stop().await?;
    }

    println!();
    println!("4. Time to the first progress event of a streamed n = 1, DDIM 20-step request (fair, max batch 16)");
    println!("| load | first progress p50 ms | p99 ms | whole stream p50 ms | streams |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    let server = Server::start(dir.path(), 16, SchedulerPolicy::Fair).await?;
    load(
        &server.address,
        2,
        Duration::from_millis(500),
        short_request(),
    )
    .await?;
    for background in [0usize, 8] {
        let address = server.address.clone();
        let busy = tokio::spawn(async move {
            if background > 0 {
                let _ = load(
                    &address,
                    background,
                    Duration::from_secs_f64(seconds + 1.0),
                    short_request(),
                )
                .await;
            }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (first, whole) = first_progress(&server.address, 20).await?;
        busy.abort();
        println!(
            "| {} | {} | {} | {} | {} |",
            if background == 0 {
                "idle".to_string()
            } else {
                format!("{background} clients sending short requests")
            },
            ms(first.percentile(0.5)),
            ms(first.percentile(0.99)),
            ms(whole.percentile(0.5)),
            first.latencies.len(),
        );
    }
    server.stop().await?;
    println!();
    defaults_under_mix(dir.path(), duration).await
}

/// Part 5: requests that name no sampler, alone and among long ones, under the server's sampling
/// defaults before the sampler bench (ancestral DDPM, 50 steps, guided at every step) and
/// after it (SDE-DPM-Solver++(2M), 10 steps, guided at 80 ≤ t ≤ 580), the same model.
async fn defaults_under_mix(data_dir: &Path, duration: Duration) -> anyhow::Result<()> {
    use ddpm_server::config::{DefaultAlgorithm, DefaultSampler};
    println!("5. Requests with the server's default sampler (n = 1, guidance 3.0): alone, and 8 clients among 2 sending DDPM 1000-step requests (fair, max batch 16)");
    println!("| defaults | p50 alone ms | p50 mixed ms | p99 mixed ms | requests/s mixed |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    let default_request = json!({"class": 3, "n": 1, "guidance_scale": 3.0});
    let old: fn(&mut Config) = |config| {
        config.default_sampler = DefaultSampler::Ddpm;
        config.default_steps = 50;
        config.default_algorithm_type = DefaultAlgorithm::DpmSolverPp;
        config.default_guidance_interval = None;
    };
    let now: fn(&mut Config) = |_| {};
    let rows = [
        ("before: DDPM, 50 steps", old),
        ("now: SDE-DPM++(2M), 10 steps, guided at 80..580", now),
    ];
    for (label, tweak) in rows {
        let server = Server::start_with(data_dir, 16, SchedulerPolicy::Fair, tweak).await?;
        load(
            &server.address,
            2,
            Duration::from_millis(500),
            default_request.clone(),
        )
        .await?;
        let alone = load(&server.address, 1, duration, default_request.clone()).await?;
        let mixed = mixed(&server.address, 2, 8, default_request.clone(), duration).await?;
        println!(
            "| {label} | {} | {} | {} | {:.1} |",
            ms(alone.percentile(0.5)),
            ms(mixed.percentile(0.5)),
            ms(mixed.percentile(0.99)),
            mixed.throughput(),
        );
        server.stop().await?;
    }
    Ok(())
}

struct BehindRow {
    alone: Duration,
    behind: Duration,
    short_requests: usize,
    long: Duration,
    long_status: String,
}

fn ten_step_request() -> serde_json::Value {
    json!({"class": 1, "n": 1, "sampler": "ddim", "steps": 10, "guidance_scale": 3.0})
}

/// One request answered as PNG: its latency.
async fn timed(
    client: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let response = client
        .post(url)
        .header("accept", "image/png")
        .json(body)
        .send()
        .await?;
    anyhow::ensure!(
        response.status().is_success(),
        "status {}",
        response.status()
    );
    response.bytes().await?;
    Ok(t0.elapsed())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// The item-1 target: the 10-step request's median latency alone, then sent one after
/// another while an n = 64, 1000-step DDPM request runs (until it finishes).
async fn behind_a_long_request(address: &str) -> anyhow::Result<BehindRow> {
    let client = reqwest::Client::new();
    let url = format!("{address}/v1/samples");
    for _ in 0..3 {
        timed(&client, &url, &ten_step_request()).await?;
    }
    let mut alone = Vec::new();
    for _ in 0..20 {
        alone.push(timed(&client, &url, &ten_step_request()).await?);
    }
    let long = tokio::spawn({
        let client = client.clone();
        let url = url.clone();
        async move {
            let t0 = Instant::now();
            let status = client
                .post(&url)
                .json(&json!({"class": 5, "n": 64, "sampler": "ddpm", "steps": 1000, "guidance_scale": 3.0}))
                .send()
                .await
                .map(|r| r.status().to_string())
                .unwrap_or_else(|e| e.to_string());
            (t0.elapsed(), status)
        }
    });
    // Wait until the long request holds the batch.
    let metrics = format!("{address}/metrics");
    while !client
        .get(&metrics)
        .send()
        .await?
        .text()
        .await?
        .contains("ddpm_active_samples 16")
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut behind = Vec::new();
    while !long.is_finished() && behind.len() < 20 {
        behind.push(timed(&client, &url, &ten_step_request()).await?);
    }
    let short_requests = behind.len();
    let (long, long_status) = long.await?;
    Ok(BehindRow {
        alone: median(alone),
        behind: median(behind),
        short_requests,
        long,
        long_status,
    })
}

/// `count` streamed requests one after another: time to the first `progress` event, and
/// to the end of the stream.
async fn first_progress(address: &str, count: usize) -> anyhow::Result<(Load, Load)> {
    let client = reqwest::Client::new();
    let url = format!("{address}/v1/samples");
    let started = Instant::now();
    let (mut first, mut whole) = (Vec::new(), Vec::new());
    for seed in 0..count {
        let mut body = short_request();
        body["seed"] = json!(seed);
        let t0 = Instant::now();
        let mut response = client
            .post(&url)
            .header("accept", "text/event-stream")
            .json(&body)
            .send()
            .await?;
        anyhow::ensure!(
            response.status().is_success(),
            "status {}",
            response.status()
        );
        let mut text = String::new();
        let mut seen = false;
        while let Some(chunk) = response.chunk().await? {
            text.push_str(&String::from_utf8_lossy(&chunk));
            if !seen && text.contains("event: progress") {
                first.push(t0.elapsed());
                seen = true;
            }
        }
        anyhow::ensure!(
            text.contains("event: done"),
            "the stream did not finish: {text}"
        );
        whole.push(t0.elapsed());
    }
    let elapsed = started.elapsed();
    Ok((
        Load {
            latencies: first,
            elapsed,
        },
        Load {
            latencies: whole,
            elapsed,
        },
    ))
}

/// (forward passes, images generated) from `/metrics`.
async fn counters(address: &str) -> anyhow::Result<(f64, f64)> {
    let text = reqwest::get(format!("{address}/metrics"))
        .await?
        .text()
        .await?;
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Ok((
        value("ddpm_forward_passes_total"),
        value("ddpm_images_generated_total"),
    ))
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; this harness takes no arguments.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    runtime.block_on(bench())
}
