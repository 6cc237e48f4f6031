//! Load benchmark of the real server, in-process on port 0, against the tiny model.
//!
//! C concurrent clients (1, 4, 16) each request one image at 20 DDIM steps, back to back,
//! with step-level batching on (max batch 16) and off (max batch 1), in the same run:
//! requests/s and p50/p99 latency. Then a mixed load: a few clients sending 1000-step
//! DDPM requests among many sending 20-step DDIM ones; the short requests' p50 latency is
//! compared with their latency alone and with the same short load without the long ones.
//!
//! `cargo bench -p ddpm-server --bench load` (`DDPM_BENCH_SECONDS` sets each measurement's
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
use ddpm_server::Config;
use serde_json::json;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

const CLASSES: usize = 10;

struct Server {
    address: String,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<Result<(), ddpm_server::ServerError>>,
}

impl Server {
    async fn start(data_dir: &Path, max_batch: u32) -> anyhow::Result<Server> {
        let mut config = Config::with_data_dir(data_dir);
        config.common.device = ddpm_core::DeviceChoice::Cpu;
        config.max_batch = max_batch;
        config.queue_capacity = 1024;
        config.request_timeout = Duration::from_secs(600);
        config.api_token = None;
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
                    let t0 = Instant::now();
                    let response = client
                        .post(&url)
                        .header("accept", "image/png")
                        .json(&body)
                        .send()
                        .await?;
                    anyhow::ensure!(
                        response.status().is_success(),
                        "status {}",
                        response.status()
                    );
                    response.bytes().await?;
                    latencies.push(t0.elapsed());
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
/// send 20-step DDIM ones; returns the short requests' latencies. The long requests still
/// running at the end are abandoned (their clients go away, so the server drops them).
async fn mixed(
    address: &str,
    long_clients: usize,
    short_clients: usize,
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
    let short = load(address, short_clients, duration, short_request()).await;
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
    store
        .save_and_register(
            &registry,
            run.id,
            1,
            CheckpointKind::Ema,
            move |tmp: &Path| std::fs::write(tmp, &bytes),
        )
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
    println!("n = 1, DDIM 20 steps, guidance 3.0, C clients back to back");
    println!("| clients | batching | max batch | requests/s | p50 ms | p99 ms | forward passes / image |");
    println!("| ---: | --- | ---: | ---: | ---: | ---: | ---: |");
    let mut throughput = std::collections::HashMap::new();
    let mut mixed_rows = Vec::new();
    let mut mixed_counts = Vec::new();
    for (label, max_batch) in [("on", 16u32), ("off", 1u32)] {
        let server = Server::start(dir.path(), max_batch).await?;
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
            throughput.insert((clients, label), result.throughput());
        }
        let alone = load(&server.address, 1, duration, short_request()).await?;
        let without_long = load(&server.address, 8, duration, short_request()).await?;
        let loaded = mixed(&server.address, 2, 8, duration).await?;
        mixed_rows.push([
            alone.percentile(0.5),
            without_long.percentile(0.5),
            loaded.percentile(0.5),
            loaded.percentile(0.99),
        ]);
        mixed_counts.push((label, max_batch, loaded.latencies.len()));
        server.stop().await?;
    }
    let on = throughput.get(&(16, "on")).copied().unwrap_or(0.0);
    let off = throughput.get(&(16, "off")).copied().unwrap_or(f64::NAN);
    println!();
    println!(
        "At 16 clients batching gives {:.1}x the throughput of no batching (target: at least 3x).",
        on / off
    );
    println!();
    println!("Mixed load: 2 clients sending DDPM 1000-step requests, 8 clients sending DDIM 20-step ones");
    println!("| batching | max batch | short p50, 1 client alone ms | short p50, 8 clients, no long ms | short p50 mixed ms | short p99 mixed ms | short requests in mixed |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for ((label, max_batch, count), row) in mixed_counts.into_iter().zip(mixed_rows) {
        let cells: Vec<String> = row.into_iter().map(ms).collect();
        println!(
            "| {label} | {max_batch} | {} | {count} |",
            cells.join(" | ")
        );
    }
    Ok(())
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
