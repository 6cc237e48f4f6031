//! The checkpoint store's cost, directory against S3, in one run: publishing and loading a
//! seed-size EMA checkpoint (the seed preset's UNet, about 90 MB of safetensors), and the
//! time a new server replica takes from its start to ready (`/readyz` 200: the checkpoint
//! read, verified, loaded and warmed up).
//!
//! - publish: `CheckpointStore::write_checkpoint` (hash, write and fsync + rename, or one
//!   create-only PUT) of a fresh checkpoint;
//! - load: `CheckpointStore::open` (read and check the SHA-256): the directory, S3 through
//!   an empty cache (the object streamed into the cache), S3 from the cache;
//! - replica: the `ddpm-server` binary started on a registry holding the checkpoint, until
//!   `/readyz` answers 200: on the directory, on S3 with an empty cache (a new replica),
//!   on S3 with the previous replica's cache (a restart).
//!
//! `cargo bench --profile dev -p ddpm-server --bench store` with an S3-compatible server at
//! `DDPM_TEST_S3_URL` (`scripts/test-s3.sh` starts moto's and prints its URL; moto keeps
//! objects in memory, on loopback). `DDPM_BENCH_REPEATS` sets the repeats per row
//! (default 3); each row gives the median and the range.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use ddpm_core::{
    checkpoint::{checkpoint_bytes, CheckpointInfo},
    Model, ScheduleConfig, UNetConfig,
};
use ddpm_registry::{CheckpointKind, CheckpointStore, NewRun, ObjectCache, Registry};
use ddpm_service::StoreSpec;
use serde_json::json;

const CLASSES: usize = 10;

/// Median and range of `samples` in seconds, as a table cell.
fn cell(samples: &mut [f64]) -> String {
    samples.sort_by(|a, b| a.total_cmp(b));
    let median = samples[samples.len() / 2];
    format!(
        "{median:.2} s ({:.2}–{:.2})",
        samples[0],
        samples[samples.len() - 1]
    )
}

/// Starts `ddpm-server` on the registry at `db` and the store `store_args`, with the cache
/// in `cache`; returns once `/readyz` answers 200, with the seconds it took.
async fn replica_ready(
    db: &str,
    data_dir: &Path,
    cache: &Path,
    store_args: &[String],
) -> anyhow::Result<f64> {
    let port = ddpm_testkit::free_port();
    let started = Instant::now();
    let mut child: Child = Command::new(env!("CARGO_BIN_EXE_ddpm-server"))
        .args(["--database-url", db])
        .args(store_args)
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--cache-dir")
        .arg(cache)
        .args(["--bind", &format!("127.0.0.1:{port}"), "--device", "cpu"])
        .env_remove("DDPM_API_TOKEN")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("start ddpm-server")?;
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/readyz");
    let ready = loop {
        if let Ok(r) = client.get(&url).send().await {
            if r.status() == 200 {
                break started.elapsed().as_secs_f64();
            }
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("ddpm-server exited: {status}");
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(300), "never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    child.wait()?;
    Ok(ready)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let repeats: usize = std::env::var("DDPM_BENCH_REPEATS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let endpoint = ddpm_testkit::s3_server_url();
    let dir = tempfile::tempdir()?;
    let db = format!(
        "sqlite:{}?mode=rwc",
        dir.path().join("registry.db").display()
    );
    let registry = Registry::connect(&db).await?;
    let s3_spec = ddpm_testkit::s3_bucket("bench");
    let dir_store = CheckpointStore::new(dir.path().join("checkpoints"))?;
    let s3_store = CheckpointStore::open_spec(&StoreSpec::S3(s3_spec.clone()))?;

    let run = registry
        .create_run(&NewRun {
            config: json!({ "model": "seed" }),
            dataset: json!({ "path": "none", "image_count": 0 }),
            total_steps: 1,
        })
        .await?;
    let model_config = UNetConfig::seed(Some(CLASSES as i64));
    let model = Model::new(&model_config, tch::Device::Cpu)?;
    let checkpoint = |step: i64| -> anyhow::Result<Vec<u8>> {
        let info = CheckpointInfo {
            schedule: ScheduleConfig::default(),
            class_names: (0..CLASSES).map(|c| format!("class{c}")).collect(),
            run_id: Some(run.id),
            step,
        };
        Ok(checkpoint_bytes(&model, &info)?.0)
    };
    let size = checkpoint(1)?.len();
    println!(
        "ddpm checkpoint store: the seed preset's EMA checkpoint ({} parameters, {:.1} MB), \
         directory on local disk vs S3 (moto at {endpoint}, loopback); median (range) of \
         {repeats}",
        model.parameter_count(),
        size as f64 / 1e6
    );
    println!();
    println!("| operation | directory | S3 |");
    println!("| --- | ---: | ---: |");

    // Publish: a new checkpoint each time (a new step, so a new key and new bytes).
    let (mut publish_dir, mut publish_s3) = (Vec::new(), Vec::new());
    let mut records = Vec::new();
    let mut files = Vec::new();
    for i in 0..repeats {
        let step = 1 + i as i64;
        let bytes = checkpoint(step)?;
        for (store, times) in [(&dir_store, &mut publish_dir), (&s3_store, &mut publish_s3)] {
            let t = Instant::now();
            let file = store.write_checkpoint(run.id, step, CheckpointKind::Ema, &bytes)?;
            times.push(t.elapsed().as_secs_f64());
            if i + 1 == repeats {
                files.push((step, file.clone()));
                records.push(
                    store
                        .register(&registry, run.id, step, CheckpointKind::Ema, &file)
                        .await?,
                );
            }
        }
    }
    println!(
        "| publish (`write_checkpoint`) | {} | {} |",
        cell(&mut publish_dir),
        cell(&mut publish_s3)
    );

    // Load: read and verify; S3 through a fresh cache, then from it.
    let (dir_record, s3_record) = (&records[0], &records[1]);
    let (mut load_dir, mut load_cold, mut load_warm) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..repeats {
        let t = Instant::now();
        dir_store.open(dir_record)?;
        load_dir.push(t.elapsed().as_secs_f64());
        let cache_dir = dir.path().join(format!("load-cache-{i}"));
        let cached = s3_store
            .clone()
            .with_cache(ObjectCache::new(&cache_dir, 1 << 30)?);
        let t = Instant::now();
        cached.open(s3_record)?;
        load_cold.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        cached.open(s3_record)?;
        load_warm.push(t.elapsed().as_secs_f64());
    }
    println!(
        "| load and verify (`open`): a new replica | {} | {} |",
        cell(&mut load_dir),
        cell(&mut load_cold)
    );
    println!(
        "| load and verify: from the replica's cache | – | {} |",
        cell(&mut load_warm)
    );

    // Replicas: one registry per store, each holding only that store's checkpoint.
    registry.close().await;
    let data = dir.path();
    let dir_db = format!("sqlite:{}?mode=rwc", data.join("registry-dir.db").display());
    let s3_db = format!("sqlite:{}?mode=rwc", data.join("registry-s3.db").display());
    for (url, (step, file)) in [(&dir_db, &files[0]), (&s3_db, &files[1])] {
        let r = Registry::connect(url).await?;
        let run = r
            .create_run(&NewRun {
                config: json!({ "model": "seed" }),
                dataset: json!({ "path": "none", "image_count": 0 }),
                total_steps: 1,
            })
            .await?;
        anyhow::ensure!(
            run.id == records[0].run_id,
            "the manifest names run {}",
            records[0].run_id
        );
        r.register_checkpoint(&file.checkpoint(run.id, *step, CheckpointKind::Ema)?)
            .await?;
        r.close().await;
    }
    let dir_args = vec![
        "--checkpoint-dir".to_string(),
        data.join("checkpoints").display().to_string(),
    ];
    let s3_args = ddpm_testkit::s3_cli_args(&s3_spec, &endpoint);
    let (mut ready_dir, mut ready_cold, mut ready_warm) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..repeats {
        let cache = data.join(format!("replica-cache-{i}"));
        ready_dir.push(replica_ready(&dir_db, data, &cache, &dir_args).await?);
        ready_cold.push(replica_ready(&s3_db, data, &cache, &s3_args).await?);
        ready_warm.push(replica_ready(&s3_db, data, &cache, &s3_args).await?);
    }
    println!(
        "| replica start to ready: a new replica | {} | {} |",
        cell(&mut ready_dir),
        cell(&mut ready_cold)
    );
    println!(
        "| replica start to ready: a restart (cache kept) | – | {} |",
        cell(&mut ready_warm)
    );
    Ok(())
}
