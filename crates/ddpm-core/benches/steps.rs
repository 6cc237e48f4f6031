//! One training step and one guided sampling step, ours beside PyTorch's, in one run.
//!
//! `cargo bench -p ddpm-core --bench steps` times, at the tiny config and at the seed
//! config (64×64), batch 8, on the GPU if present else the CPU:
//! - `train`: forward + ε-MSE (per-sample label dropout) + backward + AdamW + EMA;
//! - `guided`: one classifier-free-guided DDIM step, a single forward of the 2B batch;
//! - `two-pass`: the same guidance with two forward passes of B (the seed's way);
//!
//! then runs `benches/reference/torch_steps.py` (the same model and steps in PyTorch, its
//! fastest eager variants) with the same batch, device and thread count, and prints the
//! medians and the ratios. Ours and PyTorch's alternate in rounds, and each figure is the
//! median over rounds of the per-round medians, so a load spike on a shared machine hits
//! both sides alike. Settings: `DDPM_BENCH_CONFIGS` (default `tiny,seed`),
//! `DDPM_BENCH_BATCH` (8), `DDPM_BENCH_ITERS` (tiny: 20, seed: 3 on CPU),
//! `DDPM_BENCH_ROUNDS` (tiny: 5, seed: 1 on CPU), `DDPM_PYTHON` (default: the cached torch
//! venv's python).

use std::{path::PathBuf, process::Command, time::Instant};

use ddpm_core::{
    ema::EmaConfig,
    optim::AdamWConfig,
    sampler::{denoise_step, DenoiseBatch, StepCoefficients},
    training::{diffusion_loss, Learner, Objective},
    NoiseSchedule, ScheduleConfig, UNetConfig,
};
use tch::{Device, Kind, Tensor};

fn median_ms(device: Device, iters: usize, warmup: usize, mut f: impl FnMut()) -> f64 {
    let sync = || {
        if let Device::Cuda(n) = device {
            tch::Cuda::synchronize(n as i64);
        }
    };
    for _ in 0..warmup {
        f();
    }
    sync();
    let mut times: Vec<f64> = (0..iters)
        .map(|_| {
            let start = Instant::now();
            f();
            sync();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

struct Timings {
    train: f64,
    guided: f64,
    two_pass: f64,
}

fn ours(config: &UNetConfig, batch: i64, device: Device, iters: usize, warmup: usize) -> Timings {
    tch::manual_seed(0);
    let schedule = NoiseSchedule::new(ScheduleConfig::default(), device).unwrap();
    let ema = EmaConfig {
        decay: 0.995,
        warmup_steps: 0,
        ..Default::default()
    };
    let mut learner = Learner::new(config, device, AdamWConfig::default(), ema).unwrap();
    let classes = config.num_classes.unwrap_or(1);
    let size = config.image_size;
    let train = median_ms(device, iters, warmup, || {
        let x0 = Tensor::randn([batch, 3, size, size], (Kind::Float, device));
        let y = Tensor::randint(classes, [batch], (Kind::Int64, device));
        let loss = diffusion_loss(
            &learner.model,
            &schedule,
            &x0,
            Some(&y),
            &Objective::default(),
        )
        .unwrap()
        .loss;
        loss.backward();
        let _ = learner.update(3e-4, None).unwrap();
    });
    let model = &learner.model;

    let x = Tensor::randn([batch, 3, size, size], (Kind::Float, device));
    let labels: Vec<i64> = (0..batch).map(|i| i % classes).collect();
    let scales = vec![3.0; batch as usize];
    let timesteps = vec![500i64; batch as usize];
    let coefficients = vec![
        StepCoefficients {
            x: 1.01,
            eps: -0.1,
            noise: 0.0,
            prev_x0: 0.0
        };
        batch as usize
    ];
    let clips = vec![None; batch as usize];
    let guided = median_ms(device, iters, warmup, || {
        let _ = denoise_step(
            model,
            &DenoiseBatch {
                x: &x,
                timesteps: &timesteps,
                labels: &labels,
                guidance_scales: &scales,
                coefficients: &coefficients,
                clips: &clips,
                keep_x0: &clips,
                thresholds: &[],
                guidance_rescales: &[],
                noise: None,
                prev_x0: None,
            },
        )
        .unwrap();
    });
    let t = Tensor::from_slice(&timesteps).to_device(device);
    let y = Tensor::from_slice(&labels).to_device(device);
    let null = Tensor::full([batch], classes, (Kind::Int64, device));
    let a = Tensor::full([batch, 1, 1, 1], 1.01, (Kind::Float, device));
    let b = Tensor::full([batch, 1, 1, 1], -0.1, (Kind::Float, device));
    let w = Tensor::full([batch, 1, 1, 1], 3.0, (Kind::Float, device));
    let two_pass = median_ms(device, iters, warmup, || {
        let _guard = tch::no_grad_guard();
        let cond = model.net.forward(&x, &t, Some(&y));
        let uncond = model.net.forward(&x, &t, Some(&null));
        let eps = &uncond + (&cond - &uncond) * &w;
        let _ = &x * &a + eps * &b;
    });
    Timings {
        train,
        guided,
        two_pass,
    }
}

fn pytorch(
    config: &str,
    batch: i64,
    device: Device,
    iters: usize,
    warmup: usize,
) -> Option<(Timings, String)> {
    let python = std::env::var("DDPM_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            let home = std::env::var("HOME").unwrap_or_default();
            PathBuf::from(home).join(".cache/ddpm/torch-2.11.0/bin/python")
        });
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/reference/torch_steps.py");
    let mut cmd = Command::new(&python);
    cmd.arg(&script)
        .args(["--config", config, "--batch", &batch.to_string()])
        .args(["--device", if device.is_cuda() { "cuda" } else { "cpu" }])
        .args(["--threads", &tch::get_num_threads().to_string()])
        .args([
            "--iters",
            &iters.to_string(),
            "--warmup",
            &warmup.to_string(),
        ]);
    if config == "seed" && !device.is_cuda() {
        // Timing every attention variant at 64×64 on a CPU takes many minutes; sdpa won
        // every trial there (see BENCHMARKS.md), so pin it.
        cmd.args(["--attention", "sdpa"]);
    }
    let out = match cmd.output() {
        Ok(o) if o.status.success() => o,
        Ok(o) => {
            eprintln!(
                "PyTorch reference failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            return None;
        }
        Err(e) => {
            eprintln!(
                "cannot run {} ({e}): run scripts/setup-libtorch.sh",
                python.display()
            );
            return None;
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last()?).ok()?;
    let ms = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let variants = format!(
        "attention {}, optimizer {}, ema {}",
        v["attention_variant"].as_str().unwrap_or("?"),
        v["optimizer_variant"].as_str().unwrap_or("?"),
        v["ema_variant"].as_str().unwrap_or("?")
    );
    Some((
        Timings {
            train: ms("train_step_ms"),
            guided: ms("guided_step_ms"),
            two_pass: ms("guided_two_pass_ms"),
        },
        variants,
    ))
}

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn median_timings(rounds: &[Timings]) -> Timings {
    Timings {
        train: median(rounds.iter().map(|t| t.train).collect()),
        guided: median(rounds.iter().map(|t| t.guided).collect()),
        two_pass: median(rounds.iter().map(|t| t.two_pass).collect()),
    }
}

fn main() {
    let device = Device::cuda_if_available();
    if device.is_cuda() {
        tch::Cuda::cudnn_set_benchmark(true);
    }
    let batch: i64 = std::env::var("DDPM_BENCH_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let configs = std::env::var("DDPM_BENCH_CONFIGS").unwrap_or_else(|_| "tiny,seed".into());
    println!(
        "device {device:?}, {} threads, batch {batch}",
        tch::get_num_threads()
    );
    for name in configs.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let config = match name {
            "tiny" => UNetConfig::tiny(Some(10)),
            "seed" => UNetConfig::seed(Some(10)),
            other => panic!("unknown config {other}: use tiny or seed"),
        };
        let default_iters = if name == "seed" && !device.is_cuda() {
            3
        } else {
            20
        };
        let iters = std::env::var("DDPM_BENCH_ITERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default_iters);
        let warmup = (iters / 4).max(1);
        let default_rounds = if name == "seed" && !device.is_cuda() {
            1
        } else {
            5
        };
        let rounds = env_usize("DDPM_BENCH_ROUNDS")
            .unwrap_or(default_rounds)
            .max(1);
        let mut ours_rounds = Vec::new();
        let mut theirs_rounds = Vec::new();
        let mut variants = String::new();
        for _ in 0..rounds {
            ours_rounds.push(ours(&config, batch, device, iters, warmup));
            if let Some((t, v)) = pytorch(name, batch, device, iters, warmup) {
                theirs_rounds.push(t);
                variants = v;
            }
        }
        let us = median_timings(&ours_rounds);
        println!("\n[{name}] {rounds} round(s) of {iters} iterations, medians in ms");
        println!(
            "{:<28}{:>12}{:>12}{:>10}",
            "step", "ddpm (Rust)", "PyTorch", "ratio"
        );
        if theirs_rounds.len() == rounds {
            let them = median_timings(&theirs_rounds);
            for (label, a, b) in [
                ("train step", us.train, them.train),
                ("guided step (one 2B pass)", us.guided, them.guided),
                ("guided step (two passes)", us.two_pass, them.two_pass),
            ] {
                println!("{label:<28}{a:>12.2}{b:>12.2}{:>10.2}", a / b);
            }
            println!("PyTorch's fastest variants: {variants}");
        } else {
            println!(
                "(PyTorch reference unavailable; ours: train {:.2}, guided {:.2}, two-pass {:.2})",
                us.train, us.guided, us.two_pass
            );
        }
        println!(
            "one-pass / two-pass guidance (ours): {:.2}; training images/s (ours): {:.1}",
            us.guided / us.two_pass,
            batch as f64 / (us.train / 1e3)
        );
    }
}
