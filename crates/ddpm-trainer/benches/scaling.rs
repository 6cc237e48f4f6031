//! Data-parallel scaling: images per second of the real trainer binary at W = 2 ranks ×
//! 1 torch thread against W = 1 × 1 thread and W = 1 × 2 threads, in one run, on the
//! same data, model and global batch, with the gradient all-reduce's time per step.
//!
//! `cargo bench -p ddpm-trainer --bench scaling` writes the demo dataset (32×32, 4
//! classes), then for each configuration trains a run (SQLite registry, a temp
//! checkpoint directory, no scoring or grids) and reads rank 0's `train` log lines: the
//! images/s and all-reduce ms/step of every logging window after the first (warm-up:
//! dataset decode, allocator, rendezvous). The configurations run one after another,
//! each with the whole machine. Rounds alternate the order (W=1×1, W=1×2, W=2×1, then
//! reversed) so drift in the machine's speed does not favour one.
//!
//! Settings: `DDPM_BENCH_STEPS` (steps per run, 100), `DDPM_BENCH_ROUNDS` (2),
//! `DDPM_BENCH_WIDTH` (base channels, 32), `DDPM_BENCH_BATCH` (global batch, 32),
//! `DDPM_BENCH_SIZE` (image side, 32). The fixed costs of a step (the all-reduce, and
//! AdamW and the EMA, which every rank runs over all parameters) weigh more the less
//! work a step has: BENCHMARKS.md has the figures at 16×16 too.

use std::{path::Path, process::Command};

use ddpm_trainer::demo::{write_demo_dataset, DemoSpec};

fn setting(name: &str, default: i64) -> i64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One way to spend the machine: ranks × threads per rank.
#[derive(Clone, Copy)]
struct Layout {
    ranks: usize,
    threads: usize,
}

impl Layout {
    fn name(self) -> String {
        format!(
            "W={} × {} thread{}",
            self.ranks,
            self.threads,
            if self.threads == 1 { "" } else { "s" }
        )
    }
}

/// What one run measured (means over the windows after the first).
struct Measured {
    images_per_sec: f64,
    all_reduce_ms: f64,
}

fn config(dataset: &Path, steps: i64, width: i64, batch: i64, size: i64) -> String {
    format!(
        r#"preset = "tiny"

[dataset]
path = {dataset:?}
cache = true

[model]
image_size = {size}
base_channels = {width}
channel_mults = [1, 2]
bottleneck_mult = 2
attention_resolutions = [{attn}]
attention_heads = 2
time_embedding_dim = 64

[schedule]
timesteps = 1000

[training]
steps = {steps}
batch_size = {batch}
lr = 2e-4
log_every = 20
checkpoint_every = {steps}
sample_grid_per_class = 0

[quality]
holdout = 0
"#,
        dataset = dataset.display().to_string(),
        attn = size / 2,
    )
}

fn run(dir: &Path, config: &Path, layout: Layout, index: usize) -> Measured {
    let db = dir.join(format!("bench-{index}.db"));
    let log = dir.join(format!("bench-{index}.log"));
    let out = std::fs::File::create(&log).expect("log");
    let status = Command::new(env!("CARGO_BIN_EXE_ddpm-trainer"))
        .arg("--database-url")
        .arg(format!("sqlite:{}", db.display()))
        .arg("--checkpoint-dir")
        .arg(dir.join(format!("checkpoints-{index}")))
        .args(["--device", "cpu", "--log-format", "json"])
        .args(["--torch-threads", &layout.threads.to_string()])
        .arg("train")
        .arg(config)
        .args(["--nproc-per-node", &layout.ranks.to_string()])
        .env("RUST_LOG", "info,sqlx=warn")
        .env("RAYON_NUM_THREADS", "1")
        .stdout(out.try_clone().expect("log"))
        .stderr(out)
        .status()
        .expect("start ddpm-trainer");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "{} failed:\n{text}", layout.name());
    let windows: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|v| v["message"] == "train")
        .map(|v| {
            (
                v["images_per_sec"].as_f64().unwrap_or(0.0),
                v["all_reduce_ms_per_step"].as_f64().unwrap_or(0.0),
            )
        })
        .skip(1)
        .collect();
    assert!(!windows.is_empty(), "no windows after warm-up:\n{text}");
    let n = windows.len() as f64;
    Measured {
        images_per_sec: windows.iter().map(|w| w.0).sum::<f64>() / n,
        all_reduce_ms: windows.iter().map(|w| w.1).sum::<f64>() / n,
    }
}

fn main() {
    let steps = setting("DDPM_BENCH_STEPS", 100);
    let rounds = setting("DDPM_BENCH_ROUNDS", 2) as usize;
    let width = setting("DDPM_BENCH_WIDTH", 32);
    let batch = setting("DDPM_BENCH_BATCH", 32);
    let size = setting("DDPM_BENCH_SIZE", 32);
    let dir = tempfile::tempdir().expect("temp dir");
    let dataset = dir.path().join("dataset");
    let spec = DemoSpec {
        size: size as u32,
        per_class: 64,
        classes: 4,
        seed: 0,
    };
    write_demo_dataset(&dataset, &spec).expect("demo dataset");
    let config_path = dir.path().join("run.toml");
    std::fs::write(&config_path, config(&dataset, steps, width, batch, size)).expect("config");

    let layouts = [
        Layout {
            ranks: 1,
            threads: 1,
        },
        Layout {
            ranks: 1,
            threads: 2,
        },
        Layout {
            ranks: 2,
            threads: 1,
        },
    ];
    let mut results: Vec<Vec<Measured>> = layouts.iter().map(|_| Vec::new()).collect();
    let mut index = 0;
    for round in 0..rounds {
        let mut order: Vec<usize> = (0..layouts.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let m = run(dir.path(), &config_path, layouts[i], index);
            eprintln!(
                "round {round}: {:<16} {:8.1} img/s  all-reduce {:.2} ms/step",
                layouts[i].name(),
                m.images_per_sec,
                m.all_reduce_ms
            );
            results[i].push(m);
            index += 1;
        }
    }
    let mean =
        |ms: &[Measured], f: fn(&Measured) -> f64| ms.iter().map(f).sum::<f64>() / ms.len() as f64;
    let base = mean(&results[0], |m| m.images_per_sec);
    println!(
        "scaling: {size}×{size} images, base width {width}, global batch {batch}, {steps} steps \
         per run, {rounds} rounds, CPU, Gloo over loopback"
    );
    println!("layout             img/s   vs W=1×1   all-reduce ms/step");
    for (layout, ms) in layouts.iter().zip(&results) {
        let ips = mean(ms, |m| m.images_per_sec);
        let comm = mean(ms, |m| m.all_reduce_ms);
        println!(
            "{:<16} {:7.1}   {:6.2}×    {}",
            layout.name(),
            ips,
            ips / base,
            if layout.ranks > 1 {
                format!("{comm:.2}")
            } else {
                "-".into()
            }
        );
    }
}
