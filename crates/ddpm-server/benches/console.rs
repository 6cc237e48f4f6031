//! What the web console costs the server at real data sizes: the requests its pages make,
//! timed on the real server over loopback, against a run with 100,000 metric points beside
//! the same requests against a run with 1,000 (the baseline, measured in the same run).
//!
//! - run page, charts: `GET /v1/runs/{id}/metrics?max_points=1000` (what the charts ask for
//!   on load and on each live refresh);
//! - run page, zoomed: the same over a tenth of the steps (a drag across a chart);
//! - run page, the rest: the run, its checkpoints, its newest point
//!   (`metrics?max_points=1`), the model;
//! - runs list: `GET /v1/runs?limit=25` and `metrics?max_points=1` per run.
//!
//! Each is timed once cold (the first request after the points were recorded), then
//! `DDPM_BENCH_REPEATS` times after a warm-up.
//!
//! On SQLite, and on PostgreSQL when `DDPM_TEST_POSTGRES_URL` names a server.
//! `cargo bench -p ddpm-server --bench console` (`DDPM_BENCH_REPEATS`: timed repeats of
//! each request, default 30).

use std::time::{Duration, Instant};

use chrono::{Duration as ChronoDuration, Utc};
use ddpm_registry::{MetricPoint, NewRun, Registry};
use ddpm_server::Config;
use ddpm_testkit::{Db, FreshDatabase};
use serde_json::json;
use tokio::{net::TcpListener, sync::oneshot};

const BIG: i64 = 100_000;

/// The paths a page asks for, given a run's id and its number of points.
type Paths = Box<dyn Fn(i64, i64) -> Vec<String>>;
const BASELINE: i64 = 1_000;

fn points(n: i64) -> Vec<MetricPoint> {
    let start = Utc::now() - ChronoDuration::seconds(n);
    (1..=n)
        .map(|i| MetricPoint {
            step: i * 10,
            loss: 0.05 + 1.0 / (1.0 + i as f64 / 100.0),
            learning_rate: 2e-4,
            grad_norm: Some(1.0),
            images_per_sec: Some(500.0),
            recorded_at: start + ChronoDuration::seconds(i),
            loss_smoothed: Some(0.05 + 1.0 / (1.0 + i as f64 / 100.0)),
            loss_by_timestep: [Some(0.1), Some(0.05), Some(0.03), Some(0.02)],
        })
        .collect()
}

async fn run_with(registry: &Registry, n: i64) -> anyhow::Result<i64> {
    let run = registry
        .create_run(&NewRun {
            config: json!({"training": {"batch_size": 64, "steps": n * 10}}),
            dataset: json!({"path": "bench", "image_count": 0, "class_names": []}),
            total_steps: n * 10,
        })
        .await?;
    for chunk in points(n).chunks(10_000) {
        registry.record_metrics(run.id, chunk).await?;
    }
    Ok(run.id)
}

/// What the run page asks for besides its charts' series.
fn run_page(id: i64) -> Vec<String> {
    vec![
        format!("/v1/runs/{id}"),
        format!("/v1/runs/{id}/checkpoints"),
        format!("/v1/runs/{id}/metrics?max_points=1"),
        "/v1/model".to_string(),
    ]
}

/// One GET of each path in turn; the time of all of them, in ms.
async fn get_all(client: &reqwest::Client, base: &str, paths: &[String]) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    for path in paths {
        let response = client.get(format!("{base}{path}")).send().await?;
        anyhow::ensure!(
            response.status().is_success() || response.status() == 503,
            "{path}: {}",
            response.status()
        );
        response.bytes().await?;
    }
    Ok(t0.elapsed().as_secs_f64() * 1000.0)
}

/// The first round of `paths` (cold: the first since the points were recorded, as a user
/// opening the page after a run), then the median and 95th percentile of `repeats` more
/// after a warm-up, in ms.
async fn time_gets(
    client: &reqwest::Client,
    base: &str,
    paths: &[String],
    repeats: usize,
) -> anyhow::Result<(f64, f64, f64)> {
    let first = get_all(client, base, paths).await?;
    get_all(client, base, paths).await?;
    let mut samples = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        samples.push(get_all(client, base, paths).await?);
    }
    samples.sort_by(f64::total_cmp);
    let at = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    Ok((first, at(0.5), at(0.95)))
}

async fn bench(db: Db, repeats: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let database = FreshDatabase::create(db, dir.path()).await;
    let registry = Registry::connect(&database.url).await?;
    let t0 = Instant::now();
    let small = run_with(&registry, BASELINE).await?;
    let big = run_with(&registry, BIG).await?;
    let recorded = t0.elapsed();

    let mut config = Config::with_data_dir(dir.path());
    config.common.database_url = Some(database.url.clone());
    config.common.device = "cpu".into();
    config.api_token = None;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let (shutdown, stop) = oneshot::channel::<()>();
    let server = tokio::spawn(ddpm_server::run(config, listener, async move {
        let _ = stop.await;
    }));
    let client = reqwest::Client::new();
    for _ in 0..200 {
        if client.get(format!("{base}/healthz")).send().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    println!(
        "\n{db:?}: {} + {} metric points recorded in {:.1} s",
        BASELINE,
        BIG,
        recorded.as_secs_f64()
    );
    println!(
        "{:<44} {:>28} {:>28}",
        "requests (sequential)", "1,000 points: first, p50/p95", "100,000 points: first, p50/p95"
    );
    let zoom = |n: i64| {
        let last = n * 10;
        format!(
            "/v1/runs/{{}}/metrics?max_points=1000&from_step={}&to_step={}",
            last / 2,
            last / 2 + last / 10
        )
    };
    let cases: Vec<(&str, Paths)> = vec![
        (
            "charts: metrics?max_points=1000",
            Box::new(|id, _| vec![format!("/v1/runs/{id}/metrics?max_points=1000")]),
        ),
        (
            "zoomed chart: a tenth of the steps",
            Box::new(move |id, n| vec![zoom(n).replace("{}", &id.to_string())]),
        ),
        (
            "run page: run, checkpoints, newest, model",
            Box::new(|id, _| run_page(id)),
        ),
        (
            "run page load: all of the above but zoom",
            Box::new(|id, _| {
                let mut paths = run_page(id);
                paths.push(format!("/v1/runs/{id}/metrics?max_points=1000"));
                paths
            }),
        ),
        (
            "runs list: runs?limit=25, newest point",
            Box::new(|id, _| {
                vec![
                    "/v1/runs?limit=25".to_string(),
                    format!("/v1/runs/{id}/metrics?max_points=1"),
                ]
            }),
        ),
    ];
    for (name, paths) in &cases {
        let small = time_gets(&client, &base, &paths(small, BASELINE), repeats).await?;
        let big = time_gets(&client, &base, &paths(big, BIG), repeats).await?;
        println!(
            "{name:<44} {:>7.1} {:>7.1} / {:>6.1} ms {:>7.1} {:>7.1} / {:>6.1} ms",
            small.0, small.1, small.2, big.0, big.1, big.2
        );
    }
    let _ = shutdown.send(());
    server.await??;
    registry.close().await;
    database.drop_database().await;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let repeats = std::env::var("DDPM_BENCH_REPEATS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    bench(Db::Sqlite, repeats).await?;
    if std::env::var(ddpm_testkit::POSTGRES_URL_VAR).is_ok_and(|v| !v.is_empty()) {
        bench(Db::Postgres, repeats).await?;
    } else {
        println!(
            "\nPostgreSQL: skipped ({} not set)",
            ddpm_testkit::POSTGRES_URL_VAR
        );
    }
    Ok(())
}
