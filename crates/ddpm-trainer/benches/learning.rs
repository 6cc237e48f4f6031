//! Learning speed: how fast a model learns per step, ours beside PyTorch's, and which
//! training options learn fastest.
//!
//! `cargo bench -p ddpm-trainer --bench learning` generates the demo dataset (8 shape
//! classes, 16×16, 175 images each: 1,400 images, no augmentation), fixes the batches
//! (epoch-wise shuffles) and every step's seed, then:
//!
//! - **parity** — trains the seed's training settings (AdamW 3e-4, batch 32, linear β,
//!   label dropout 0.1, no clipping, EMA 0.995 copied for 2000 steps) on the seed's
//!   architecture at base width 32 with attention at every level, once with ddpm-core
//!   (the trainer's own `RunConfig`, `Learner` and `diffusion_loss`) and once in PyTorch
//!   (`benches/reference/torch_learning.py`: `GeneralUNet` with PyTorch's own
//!   initialisation, `torch.optim.AdamW`), side by side on one thread each. Both seed the
//!   generator with the same value before each step's draws (t, ε, dropout), and both
//!   draw in the same order, so they see the same data, timesteps and noise; only the
//!   initial weights (each side's own draw) and float rounding differ. Prints the 100-step
//!   mean loss of both at every 100 steps and their ratio (target ≤ 1.05 from step 200).
//! - **options** — trains the tiny network under the seed's settings, the `tiny`
//!   preset's, each option of the `tiny` preset alone (Min-SNR-5, diffusers' EMA ramp, the
//!   cosine β schedule, cosine learning-rate decay) and the `fast` preset, at equal steps;
//!   prints the plain ε-MSE (comparable across loss weightings, not across β schedules)
//!   and its part at t < T/4 (the low-noise steps that remove the last noise), and
//!   sample quality: the class-probe accuracy (`ddpm_trainer::probe`, luminance only,
//!   so the shape must be right) of 16 guided DDIM-50 samples per class from the EMA
//!   model (guidance 3) at several steps, and their roughness relative to the real
//!   images' (residual noise raises it; 1 = as smooth as the data); at the last step
//!   the same for DDIM-50 with η = 1 and for ancestral DDPM-50, the server's other
//!   samplers at equal cost (with `DDPM_BENCH_SAMPLER_SWEEP=1` also DDIM and
//!   DPM-Solver++(2M) at 10, 15, 20 and 50 steps).
//!
//! Settings: `DDPM_BENCH_PARTS` (`parity,options`), `DDPM_BENCH_STEPS` (2000),
//! `DDPM_BENCH_PARITY_MODEL` (`seed32`, or `tiny`), `DDPM_BENCH_INIT_SEEDS` (the parity
//! part's initial-weight seeds, a comma list, `1`: with several, the table shows the
//! mean over seeds of each side and every seed's own ratio), `DDPM_BENCH_SHARED_INIT`
//! (`1`: our side starts from PyTorch's initial weights, so only float rounding differs), `DDPM_BENCH_VARIANTS` (a comma list
//! of the variant names below; default all), `DDPM_BENCH_THREADS` (libtorch threads of the
//! options part, 1), `DDPM_PYTHON` (default: the cached torch venv's python). CPU only: the figures are per step, not per second.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use ddpm_core::{
    ema::EmaWarmup,
    schedule::{BetaSchedule, ScheduleConfig},
    training::{diffusion_loss, Learner, LrSchedule},
    NoiseSchedule, SamplerConfig, SamplerKind, UNetConfig,
};
use ddpm_trainer::{
    config::{Preset, RunConfig},
    dataset::{mix, ImageFolder, ImageSource, Transform},
    demo::{write_demo_dataset, DemoSpec},
    probe::{roughness, sample_classes, ClassProbe, ProbeConfig},
};
use rand::{seq::SliceRandom, SeedableRng};
use rand_pcg::Pcg64Mcg;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

const CLASSES: usize = 8;
const PER_CLASS: usize = 175;
const SIZE: i64 = 16;
const BATCH: i64 = 32;
const LOG_EVERY: usize = 100;
const SEED: u64 = 7;
/// Guided samples per class that the probe scores.
const PROBE_SAMPLES: i64 = 16;

struct Data {
    images: Tensor, // [N, 3, S, S] in [−1, 1]
    labels: Tensor, // [N]
    /// `[steps, B]` indices into `images`.
    batches: Tensor,
    step_seeds: Vec<i64>,
}

fn make_data(dir: &Path, steps: usize) -> Data {
    let spec = DemoSpec {
        size: SIZE as u32,
        per_class: PER_CLASS,
        classes: CLASSES,
        seed: 0,
    };
    write_demo_dataset(dir, &spec).expect("demo dataset");
    let folder = ImageFolder::scan(dir, Default::default()).expect("scan");
    let transform = Transform {
        image_size: SIZE as u32,
        augment: false,
        flip: false,
    };
    let source = ImageSource::new(folder.items.clone(), transform, false, Default::default());
    let len = transform.sample_len();
    let mut pixels = vec![0f32; source.len() * len];
    let mut labels = Vec::with_capacity(source.len());
    for (i, out) in pixels.chunks_mut(len).enumerate() {
        labels.push(source.sample(i, 0, out).expect("decodable demo image"));
    }
    let n = source.len();
    let images = Tensor::from_slice(&pixels).view([n as i64, 3, SIZE, SIZE]);
    // Epoch-wise shuffles, the same for every run of the bench.
    let mut rng = Pcg64Mcg::seed_from_u64(SEED);
    let mut order: Vec<i64> = Vec::new();
    let mut batches = Vec::with_capacity(steps * BATCH as usize);
    while batches.len() < steps * BATCH as usize {
        if order.is_empty() {
            order = (0..n as i64).collect();
            order.shuffle(&mut rng);
        }
        batches.push(order.pop().unwrap_or(0));
    }
    Data {
        images,
        labels: Tensor::from_slice(&labels),
        batches: Tensor::from_slice(&batches).view([steps as i64, BATCH]),
        step_seeds: (1..=steps as u64)
            .map(|s| (mix(SEED, s) >> 1) as i64)
            .collect(),
    }
}

/// What the PyTorch side needs of a run config.
#[derive(Serialize)]
struct TorchSetting {
    model: UNetConfig,
    images: usize,
    steps: usize,
    batch_size: i64,
    timesteps: usize,
    beta_schedule: &'static str,
    lr: f64,
    warmup_steps: i64,
    lr_schedule: LrSchedule,
    weight_decay: f64,
    max_grad_norm: f64,
    min_snr_gamma: f64,
    ema_decay: f64,
    ema_warmup: EmaWarmup,
    ema_warmup_steps: i64,
    label_dropout: f64,
    init_seed: i64,
}

impl TorchSetting {
    fn of(c: &RunConfig) -> TorchSetting {
        TorchSetting {
            model: c.model.clone(),
            images: CLASSES * PER_CLASS,
            steps: c.training.steps as usize,
            batch_size: c.training.batch_size,
            timesteps: c.schedule.timesteps,
            beta_schedule: match c.schedule.betas {
                BetaSchedule::Linear { .. } => "linear",
                BetaSchedule::Cosine { .. } => "cosine",
            },
            lr: c.training.lr,
            warmup_steps: c.training.warmup_steps,
            lr_schedule: c.training.lr_schedule,
            weight_decay: c.training.weight_decay,
            max_grad_norm: c.training.max_grad_norm,
            min_snr_gamma: c.training.min_snr_gamma,
            ema_decay: c.ema.decay,
            ema_warmup: c.ema.warmup,
            ema_warmup_steps: c.ema.warmup_steps,
            label_dropout: c.training.label_dropout,
            init_seed: c.training.seed as i64,
        }
    }
}

/// A run's per-step plain ε-MSE, and by step: the probe's accuracy and the samples'
/// roughness.
struct Curve {
    losses: Vec<f64>,
    /// Per step: (Σ ε-MSE, count) of the samples with t in the lowest quarter.
    low_noise: Vec<(f64, f64)>,
    /// (step, accuracy, roughness) of DDIM-50 (η = 0) samples.
    accuracy: Vec<(usize, f64, f64)>,
    /// At the last step, per other sampler of [`final_samplers`]: (accuracy, roughness).
    final_samplers: Vec<(f64, f64)>,
}

/// The samplers compared at the last step, beside the DDIM-50 η = 0 of the earlier
/// columns: the server's other samplers at equal cost (50 network evaluations), and with
/// `DDPM_BENCH_SAMPLER_SWEEP=1` also DDIM and DPM-Solver++(2M) at 10, 15, 20 and 50 steps.
fn final_samplers() -> Vec<String> {
    let mut names = vec!["DDIM-50 η=1".to_string(), "DDPM-50".to_string()];
    if std::env::var("DDPM_BENCH_SAMPLER_SWEEP").is_ok_and(|v| v == "1") {
        for steps in [10, 15, 20] {
            names.push(format!("DDIM-{steps}"));
        }
        for steps in [10, 15, 20, 50] {
            names.push(format!("DPM++2M-{steps}"));
        }
    }
    names
}

/// A sampler by its column name: `DDIM-<n>`, `DDIM-<n> η=1`, `DDPM-<n>`, `DPM++2M-<n>`.
fn final_sampler(name: &str) -> SamplerConfig {
    let (kind, rest) = name.split_once('-').expect("<kind>-<steps>");
    let (steps, eta) = match rest.split_once(' ') {
        Some((steps, "η=1")) => (steps, 1.0),
        _ => (rest, 0.0),
    };
    let steps: usize = steps.parse().expect("a step count");
    match kind {
        "DDIM" => SamplerConfig {
            eta,
            ..SamplerConfig::ddim(steps)
        },
        "DDPM" => SamplerConfig {
            kind: SamplerKind::Ddpm,
            ..SamplerConfig::ddim(steps)
        },
        "DPM++2M" => SamplerConfig::dpmpp_2m(steps),
        other => unreachable!("no sampler {other}"),
    }
}

/// Trains `config` with ddpm-core exactly as the trainer's loop does (seeded per step,
/// `diffusion_loss` with the run's objective, `Learner::update` at the run's lr).
fn train_ours(
    config: &RunConfig,
    data: &Data,
    init: Option<&HashMap<String, Tensor>>,
    probe: Option<(&ClassProbe, &[usize])>,
) -> Curve {
    let device = Device::Cpu;
    tch::manual_seed(config.training.seed as i64);
    let schedule = NoiseSchedule::new(config.schedule, device).expect("schedule");
    let mut learner =
        Learner::new(&config.model, device, config.optimizer(), config.ema).expect("learner");
    if let Some(init) = init {
        // Given initial weights into the model and its EMA (which starts as a copy).
        tch::no_grad(|| {
            for model in [&learner.model, learner.ema.model()] {
                for (name, var) in model.named_variables() {
                    let value = init
                        .get(&name)
                        .unwrap_or_else(|| panic!("no initial weight for {name}"));
                    var.shallow_clone().copy_(value);
                }
            }
        });
        assert_eq!(init.len(), learner.model.named_variables().len());
    }
    let objective = config.objective();
    let clip = (config.training.max_grad_norm > 0.0).then_some(config.training.max_grad_norm);
    let steps = config.training.steps as usize;
    let mut curve = Curve {
        losses: Vec::with_capacity(steps),
        low_noise: Vec::with_capacity(steps),
        accuracy: Vec::new(),
        final_samplers: Vec::new(),
    };
    let quarter = config.schedule.timesteps as i64 / 4;
    for s in 1..=steps {
        tch::manual_seed(data.step_seeds[s - 1]);
        let idx = data.batches.get(s as i64 - 1);
        let x0 = data.images.index_select(0, &idx);
        let y = data.labels.index_select(0, &idx);
        let loss =
            diffusion_loss(&learner.model, &schedule, &x0, Some(&y), &objective).expect("loss");
        loss.loss.backward();
        let _ = learner
            .update(config.lr_at(s as i64), clip)
            .expect("update");
        curve
            .losses
            .push(loss.per_sample.mean(Kind::Float).double_value(&[]));
        let low = loss.t.lt(quarter).to_kind(Kind::Float);
        curve.low_noise.push((
            (&loss.per_sample * &low)
                .sum(Kind::Double)
                .double_value(&[]),
            low.sum(Kind::Double).double_value(&[]),
        ));
        if let Some((probe, at)) = probe {
            let score = |sampler: SamplerConfig| {
                let (samples, labels) = sample_classes(
                    learner.ema.model(),
                    &schedule,
                    PROBE_SAMPLES,
                    sampler,
                    3.0,
                    SEED,
                )
                .expect("samples");
                (
                    probe.accuracy(&samples, &labels),
                    roughness(&samples) / roughness(&data.images),
                )
            };
            if at.contains(&s) {
                let (accuracy, rough) = score(SamplerConfig::ddim(50));
                curve.accuracy.push((s, accuracy, rough));
            }
            if s == steps {
                curve.final_samplers = final_samplers()
                    .iter()
                    .map(|name| score(final_sampler(name)))
                    .collect();
            }
        }
    }
    curve
}

/// Mean of the 100 steps ending at `step` (1-based).
fn window_mean(losses: &[f64], step: usize) -> f64 {
    let w = &losses[step.saturating_sub(LOG_EVERY)..step];
    w.iter().sum::<f64>() / w.len() as f64
}

fn python() -> PathBuf {
    std::env::var("DDPM_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
            PathBuf::from(home).join(".cache/ddpm/torch-2.11.0/bin/python")
        })
}

/// One parity pair: ours and PyTorch's per-step losses from one initial-weight seed.
struct Pair {
    seed: u64,
    ours: Vec<f64>,
    theirs: Vec<f64>,
}

fn parity(dir: &Path, steps: usize, data: &Data) {
    let model = match std::env::var("DDPM_BENCH_PARITY_MODEL").as_deref() {
        Ok("tiny") => UNetConfig::tiny(Some(CLASSES as i64)),
        _ => UNetConfig {
            image_size: SIZE,
            base_channels: 32,
            // The seed's four levels; at 16×16 they sit at 16, 8, 4 and 2 pixels.
            attention_resolutions: vec![2, 4, 8, 16],
            ..UNetConfig::seed(Some(CLASSES as i64))
        },
    };
    let mut config = RunConfig::preset(Preset::Seed);
    config.model = model;
    config.training.batch_size = BATCH;
    config.training.steps = steps as i64;
    // The initial weights' seeds (each side its own draw per seed); the data and every
    // step's draws do not depend on them.
    let seeds: Vec<u64> = std::env::var("DDPM_BENCH_INIT_SEEDS")
        .unwrap_or_else(|_| "1".into())
        .split(',')
        .map(|v| {
            v.trim()
                .parse()
                .expect("DDPM_BENCH_INIT_SEEDS: a comma list of integers")
        })
        .collect();
    // With DDPM_BENCH_SHARED_INIT=1 our side starts from PyTorch's very initial weights,
    // which leaves only float rounding between the two runs.
    let shared_init = std::env::var("DDPM_BENCH_SHARED_INIT").is_ok_and(|v| v == "1");
    write_torch_data(dir, data);
    println!(
        "parity: {} parameters, {steps} steps of batch {BATCH}, ours and PyTorch side by side; \
         initial weights: {}, seeds {seeds:?}",
        tch::no_grad(|| ddpm_core::Model::new(&config.model, Device::Cpu)
            .expect("model")
            .parameter_count()),
        if shared_init {
            "PyTorch's, shared"
        } else {
            "each side its own draw"
        },
    );
    let t0 = Instant::now();
    let mut pairs = Vec::new();
    for &seed in &seeds {
        config.training.seed = seed;
        let (ours, theirs) = parity_pair(dir, &config, data, shared_init);
        let (a, b) = (window_mean(&ours, steps), window_mean(&theirs, steps));
        eprintln!(
            "parity seed {seed}: at step {steps} ours {a:.4}, PyTorch {b:.4}, ratio {:.3}",
            a / b
        );
        pairs.push(Pair { seed, ours, theirs });
    }

    // Per logged step: the mean over seeds of each side's 100-step mean, their ratio,
    // and each seed's own ratio (the spread that different initial draws alone give).
    let mut header = String::from("| step | ddpm, 100-step mean loss | PyTorch | ratio |");
    let mut rule = String::from("| ---: | ---: | ---: | ---: |");
    if pairs.len() > 1 {
        for p in &pairs {
            header += &format!(" ratio, seed {} |", p.seed);
            rule += " ---: |";
        }
    }
    println!("\n{header}\n{rule}");
    let mut worst: f64 = 0.0;
    for step in (LOG_EVERY..=steps).step_by(LOG_EVERY) {
        let mean = |side: fn(&Pair) -> &[f64]| {
            pairs
                .iter()
                .map(|p| window_mean(side(p), step))
                .sum::<f64>()
                / pairs.len() as f64
        };
        let (a, b) = (mean(|p| &p.ours), mean(|p| &p.theirs));
        if step >= 200 {
            worst = worst.max(a / b);
        }
        let mut row = format!("| {step} | {a:.4} | {b:.4} | {:.3} |", a / b);
        if pairs.len() > 1 {
            for p in &pairs {
                row += &format!(
                    " {:.3} |",
                    window_mean(&p.ours, step) / window_mean(&p.theirs, step)
                );
            }
        }
        println!("{row}");
    }
    println!(
        "\nworst ratio of the means from step 200 on: {worst:.3} (target ≤ 1.05); wall time \
         {:.0} s for {} pair(s), one thread per side",
        t0.elapsed().as_secs_f64(),
        pairs.len()
    );
}

/// The data for the PyTorch side, as raw little-endian arrays (the torch venv has no
/// safetensors package).
fn write_torch_data(dir: &Path, data: &Data) {
    let data_dir = dir.join("run");
    std::fs::create_dir_all(&data_dir).expect("run dir");
    let seeds = Tensor::from_slice(&data.step_seeds);
    for (name, tensor) in [
        ("images.f32", &data.images),
        ("labels.i64", &data.labels),
        ("batches.i64", &data.batches),
        ("step_seeds.i64", &seeds),
    ] {
        let flat = tensor.contiguous().view([-1]);
        let bytes: Vec<u8> = match tensor.kind() {
            Kind::Float => Vec::<f32>::try_from(&flat)
                .expect("f32")
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            _ => Vec::<i64>::try_from(&flat)
                .expect("i64")
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        };
        std::fs::write(data_dir.join(name), bytes).expect("write run data");
    }
}

/// Trains `config` (its seed: the initial weights') on both sides at once; returns
/// (ours, PyTorch's) per-step losses.
fn parity_pair(
    dir: &Path,
    config: &RunConfig,
    data: &Data,
    shared_init: bool,
) -> (Vec<f64>, Vec<f64>) {
    let setting_path = dir.join("setting.json");
    std::fs::write(
        &setting_path,
        serde_json::to_vec(&TorchSetting::of(config)).expect("json"),
    )
    .expect("write setting");
    let out_path = dir.join("torch.json");
    let init_path = dir.join("init.f32");
    for stale in [&out_path, &init_path, &init_path.with_extension("f32.json")] {
        let _ = std::fs::remove_file(stale);
    }
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/reference/torch_learning.py");
    let mut command = Command::new(python());
    command
        .arg(&script)
        .arg("--data")
        .arg(dir.join("run"))
        .arg("--setting")
        .arg(&setting_path)
        .arg("--out")
        .arg(&out_path);
    if shared_init {
        command.arg("--init-out").arg(&init_path);
    }
    let mut torch = command
        .spawn()
        .expect("start the PyTorch side (set DDPM_PYTHON to a python with torch)");
    let init = shared_init.then(|| read_init(&init_path, &mut torch));
    let ours = train_ours(config, data, init.as_ref(), None);
    let status = torch.wait().expect("wait for PyTorch");
    assert!(status.success(), "the PyTorch side failed: {status}");
    let theirs: HashMap<String, serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&out_path).expect("PyTorch output")).expect("json");
    let theirs = theirs["losses"]
        .as_array()
        .expect("losses")
        .iter()
        .map(|v| v.as_f64().unwrap_or(f64::NAN))
        .collect();
    (ours.losses, theirs)
}

/// Waits for the PyTorch side's initial weights (`torch_learning.py --init-out`) and reads
/// them by parameter name.
fn read_init(path: &Path, torch: &mut std::process::Child) -> HashMap<String, Tensor> {
    let index_path = path.with_extension("f32.json");
    while !index_path.exists() {
        if let Some(status) = torch.try_wait().expect("poll PyTorch") {
            panic!("the PyTorch side exited ({status}) before writing its initial weights");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let index: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&index_path).expect("init index")).expect("json");
    let bytes = std::fs::read(path).expect("initial weights");
    let values: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let mut offset = 0usize;
    let mut out = HashMap::new();
    for entry in index {
        let shape: Vec<i64> = serde_json::from_value(entry["shape"].clone()).expect("shape");
        let len = shape.iter().product::<i64>() as usize;
        let tensor = Tensor::from_slice(&values[offset..offset + len]).view(shape.as_slice());
        offset += len;
        out.insert(entry["name"].as_str().expect("name").to_string(), tensor);
    }
    assert_eq!(
        offset,
        values.len(),
        "initial weights and their index disagree"
    );
    out
}

/// The option variants, each a run config on the tiny network.
fn variants(steps: usize) -> Vec<(&'static str, RunConfig)> {
    let base = |preset: Preset| {
        let mut c = RunConfig::preset(preset);
        c.model = UNetConfig::tiny(Some(CLASSES as i64));
        c.training.batch_size = BATCH;
        c.training.steps = steps as i64;
        c.training.seed = 1;
        c
    };
    let tiny = base(Preset::Tiny);
    let with = |f: &dyn Fn(&mut RunConfig)| {
        let mut c = tiny.clone();
        f(&mut c);
        c
    };
    vec![
        ("seed settings", base(Preset::Seed)),
        ("tiny preset", tiny.clone()),
        (
            "tiny + min-SNR-5",
            with(&|c| c.training.min_snr_gamma = 5.0),
        ),
        (
            "tiny + EMA ramp",
            with(&|c| {
                c.ema.warmup = EmaWarmup::Ramp;
                c.ema.warmup_steps = 0;
            }),
        ),
        (
            "tiny + cosine beta",
            with(&|c| c.schedule = ScheduleConfig::cosine(1000)),
        ),
        (
            "tiny + cosine lr",
            with(&|c| c.training.lr_schedule = LrSchedule::Cosine),
        ),
        (
            "tiny + cosine lr + EMA ramp",
            with(&|c| {
                c.training.lr_schedule = LrSchedule::Cosine;
                c.ema.warmup = EmaWarmup::Ramp;
                c.ema.warmup_steps = 0;
            }),
        ),
        ("fast preset", base(Preset::Fast)),
    ]
}

fn options(steps: usize, data: &Data) {
    let t0 = Instant::now();
    let probe = ClassProbe::train(
        &data.images,
        &data.labels,
        CLASSES as i64,
        &ProbeConfig::default(),
    )
    .expect("probe");
    println!(
        "\noptions: probe trained in {:.0} s, held-out accuracy on real images {:.3}",
        t0.elapsed().as_secs_f64(),
        probe.holdout_accuracy
    );
    let wanted: Option<Vec<String>> = std::env::var("DDPM_BENCH_VARIANTS")
        .ok()
        .map(|v| v.split(',').map(|s| s.trim().to_string()).collect());
    let probe_at: Vec<usize> = [steps / 4, steps / 2, steps]
        .into_iter()
        .filter(|&s| s > 0)
        .collect();
    let loss_at: Vec<usize> = [200, 500, 1000, 2000, steps]
        .into_iter()
        .filter(|&s| s <= steps && s >= LOG_EVERY)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut header = String::from("| variant |");
    let mut rule = String::from("| --- |");
    for s in &loss_at {
        header += &format!(" loss @{s} |");
        rule += " ---: |";
    }
    header += &format!(" loss t<T/4 @{steps} |");
    rule += " ---: |";
    for s in &probe_at {
        header += &format!(" probe acc @{s} |");
        rule += " ---: |";
    }
    header += &format!(" roughness @{steps} |");
    rule += " ---: |";
    for name in final_samplers() {
        header += &format!(" {name}: probe acc, roughness @{steps} |");
        rule += " ---: |";
    }
    let mut rows = Vec::new();
    for (name, config) in variants(steps) {
        if let Some(w) = &wanted {
            if !w.iter().any(|v| v == name) {
                continue;
            }
        }
        let t = Instant::now();
        let curve = train_ours(&config, data, None, Some((&probe, &probe_at)));
        let mut row = format!("| {name} |");
        for &s in &loss_at {
            row += &format!(" {:.4} |", window_mean(&curve.losses, s));
        }
        let tail = &curve.low_noise[steps.saturating_sub(LOG_EVERY)..];
        let (sum, count) = tail
            .iter()
            .fold((0.0, 0.0), |(a, b), (s, c)| (a + s, b + c));
        row += &format!(" {:.4} |", sum / count.max(1.0));
        for (_, acc, _) in &curve.accuracy {
            row += &format!(" {acc:.3} |");
        }
        let rough = curve.accuracy.last().map(|a| a.2).unwrap_or(f64::NAN);
        row += &format!(" {rough:.2} |");
        for (acc, rough) in &curve.final_samplers {
            row += &format!(" {acc:.3}, {rough:.2} |");
        }
        eprintln!("{row}  ({:.0} s)", t.elapsed().as_secs_f64());
        rows.push(row);
    }
    println!("\n{header}\n{rule}");
    for row in rows {
        println!("{row}");
    }
}

fn main() {
    let steps: usize = std::env::var("DDPM_BENCH_STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let parts = std::env::var("DDPM_BENCH_PARTS").unwrap_or_else(|_| "parity,options".into());
    let dir = tempfile::tempdir().expect("temp dir");
    let data = make_data(&dir.path().join("dataset"), steps);
    if parts.contains("parity") {
        // One thread each: the two sides run side by side.
        tch::set_num_threads(1);
        parity(dir.path(), steps, &data);
    }
    if parts.contains("options") {
        // One thread by default: on a small shared CPU, libtorch's spinning OpenMP threads
        // waste more than a second thread gains; split variants over processes instead.
        let threads = std::env::var("DDPM_BENCH_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        tch::set_num_threads(threads);
        options(steps, &data);
    }
}
