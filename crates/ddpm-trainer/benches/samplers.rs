//! Sampler quality per network evaluation (issue 23): which sampler, step count and
//! options give the 1000-step ancestral sample's fidelity, and the data's variety, at
//! the fewest network evaluations.
//!
//! `cargo bench -p ddpm-trainer --bench samplers` does, for each data set (the demo
//! shapes, `ddpm_trainer::demo`, and the harder varied shapes, `demo::varied`: 8 classes
//! of 16×16 images each):
//!
//! 1. generates it (250 images per class), holds out a stratified fifth of each class
//!    (`quality::split_items`) and builds the per-checkpoint scorer on the rest
//!    (`quality::Scorer`: the class probe, the held-out images' features);
//! 2. trains the tiny network (0.36 M parameters) with the `fast` preset on the training
//!    share (batch 32, seeded batches), or loads the EMA checkpoint an earlier run
//!    cached in the output folder;
//! 3. draws K guided samples per class (guidance 3) with every sampler cell — the same
//!    seeds, so the same initial noise, in every cell — and scores them as the
//!    checkpoint scores do: class accuracy, Fréchet distance (FD) and KID to the held-out
//!    images in the probe's features, within-class diversity relative to K real
//!    training images per class, and roughness relative to the held-out images'. The
//!    standard errors come from a stratified bootstrap over the samples
//!    (`quality::stats::stratified_resamples`), resampled alike in every cell, so the
//!    ratio of a cell's FD to DDPM-1000's has a paired standard error too;
//! 4. writes one PNG grid per cell (a row per class, the first 8 samples, the same seeds
//!    in every grid, 3× enlarged) into `<out>/<data set>/grids/`, the table into
//!    `<out>/<data set>/table.md` and every figure into `<out>/<data set>/results.json`.
//!    The samples are cached under `<out>/<data set>/samples/` (keyed by checkpoint,
//!    K, sampler settings, guidance and seed): a rerun rescores without sampling, and a
//!    new cell costs only its own sampling.
//!
//! NFE counts network passes: one per step for every sampler here (DPM-Solver++(2M) is
//! a multistep method: one evaluation per step), and a guided step, whose conditional
//! and unconditional halves go through the network as one batch of 2B, counts once, as
//! the other benches count. Outside a guidance interval the pass is B wide, and counts
//! once too.
//!
//! Settings: `DDPM_BENCH_OUT` (`target/bench-samplers`), `DDPM_BENCH_DATASETS`
//! (`shapes,varied`), `DDPM_BENCH_TRAIN_STEPS` (4000; the cached checkpoint is per step
//! count; delete the output folder to start afresh), `DDPM_BENCH_SAMPLES_PER_CLASS` (K, 25: 200 samples per cell),
//! `DDPM_BENCH_REF_STEPS` (1000: the reference DDPM's steps; lower it for a quick
//! run), `DDPM_BENCH_CELLS` (a comma list of cell names; default all),
//! `DDPM_BENCH_BOOTSTRAP` (resamples, 200), `DDPM_BENCH_THREADS` (libtorch threads, 1).
//! CPU only.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Instant,
};

use ddpm_core::{
    checkpoint::{checkpoint_bytes, load_checkpoint_bytes, CheckpointInfo},
    sampler::{DpmSolverAlgorithm, DynamicThresholding},
    training::{diffusion_loss, Learner},
    AncestralVariance, Model, NoiseSchedule, SamplerConfig, TimestepSpacing, UNetConfig,
};
use ddpm_trainer::{
    config::{Preset, RunConfig},
    dataset::{mix, ImageFolder},
    demo::{write_demo_dataset, write_varied_dataset, DemoSpec},
    grid::tile_images,
    probe::{roughness, sample_classes},
    quality::{
        decode, split_items,
        stats::{standard_error, stratified_resamples},
        QualityConfig, Scorer,
    },
};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

const CLASSES: usize = 8;
const PER_CLASS: usize = 250;
const HOLDOUT: f64 = 0.2;
const SIZE: i64 = 16;
const BATCH: i64 = 32;
const GUIDANCE: f64 = 3.0;
const SEED: u64 = 23;
/// Samples per class shown in each grid.
const GRID_COLUMNS: i64 = 8;

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One row of the table: a sampler with its options.
#[derive(Clone)]
struct Cell {
    name: String,
    sampler: SamplerConfig,
    /// Whether the server's `--default-*` options can make this every request's sampler
    /// (DDIM's η has no server default).
    defaultable: bool,
}

fn cell(name: impl Into<String>, sampler: SamplerConfig) -> Cell {
    Cell {
        name: name.into(),
        sampler,
        defaultable: true,
    }
}

fn ddpm(steps: usize) -> SamplerConfig {
    SamplerConfig::ddpm(steps)
}

fn ddim(steps: usize) -> SamplerConfig {
    SamplerConfig::ddim(steps)
}

fn dpm(steps: usize) -> SamplerConfig {
    SamplerConfig::dpmpp_2m(steps)
}

fn sde(steps: usize) -> SamplerConfig {
    SamplerConfig {
        dpm_solver: DpmSolverAlgorithm::SdeDpmSolverPp,
        ..SamplerConfig::dpmpp_2m(steps)
    }
}

fn spaced(s: SamplerConfig, spacing: TimestepSpacing) -> SamplerConfig {
    SamplerConfig { spacing, ..s }
}

fn interval(s: SamplerConfig, lo: i64, hi: i64) -> SamplerConfig {
    SamplerConfig {
        guidance_interval: Some((lo, hi)),
        ..s
    }
}

/// Every cell, the reference (ancestral DDPM over `ref_steps`) first.
///
/// The guidance intervals: [80, 580] is where Kynkäänniemi et al. (2024) found guidance
/// useful on ImageNet-512 (σ from about 0.28 to 5.4), mapped to t by the linear β
/// schedule's σ_t = √((1−ᾱ_t)/ᾱ_t); [0, 700] only leaves out the noisiest 30 %.
fn cells(ref_steps: usize) -> Vec<Cell> {
    use TimestepSpacing::{Leading, Trailing};
    let large = |s: SamplerConfig| SamplerConfig {
        variance: AncestralVariance::FixedLarge,
        ..s
    };
    let eta1 = |s: SamplerConfig| SamplerConfig { eta: 1.0, ..s };
    let mut out = vec![cell(format!("DDPM-{ref_steps}"), ddpm(ref_steps))];
    for n in [50, 20, 15, 10] {
        out.push(cell(format!("DDPM-{n}"), ddpm(n)));
    }
    for n in [50, 20, 10] {
        out.push(cell(format!("DDPM-{n} β"), large(ddpm(n))));
    }
    for n in [20, 10] {
        out.push(cell(format!("DDPM-{n} leading"), spaced(ddpm(n), Leading)));
    }
    for n in [20, 10] {
        out.push(cell(format!("DDIM-{n}"), ddim(n)));
    }
    for n in [20, 10] {
        out.push(cell(format!("DDIM-{n} leading"), spaced(ddim(n), Leading)));
    }
    for n in [20, 10] {
        out.push(Cell {
            defaultable: false,
            ..cell(format!("DDIM-{n} η=1"), eta1(ddim(n)))
        });
    }
    for n in [20, 15, 10] {
        out.push(cell(format!("DPM++2M-{n}"), dpm(n)));
    }
    for n in [20, 10] {
        out.push(cell(
            format!("DPM++2M-{n} trailing"),
            spaced(dpm(n), Trailing),
        ));
    }
    out.push(cell("DPM++2M-10 leading", spaced(dpm(10), Leading)));
    for n in [20, 15, 10] {
        out.push(cell(format!("SDE-DPM++2M-{n}"), sde(n)));
    }
    for n in [20, 10] {
        out.push(cell(
            format!("SDE-DPM++2M-{n} trailing"),
            spaced(sde(n), Trailing),
        ));
    }
    for (lo, hi) in [(80, 580), (0, 700)] {
        for n in [20, 10] {
            out.push(cell(
                format!("DDPM-{n} GI[{lo},{hi}]"),
                interval(ddpm(n), lo, hi),
            ));
            out.push(cell(
                format!("DPM++2M-{n} GI[{lo},{hi}]"),
                interval(dpm(n), lo, hi),
            ));
            out.push(cell(
                format!("SDE-DPM++2M-{n} GI[{lo},{hi}]"),
                interval(sde(n), lo, hi),
            ));
        }
    }
    // Around the best cell of the first sitting: its other step counts and spacing, and
    // which end of the interval matters.
    out.push(cell(
        "SDE-DPM++2M-15 GI[80,580]",
        interval(sde(15), 80, 580),
    ));
    out.push(cell(
        "SDE-DPM++2M-10 trailing GI[80,580]",
        interval(spaced(sde(10), Trailing), 80, 580),
    ));
    out.push(cell("SDE-DPM++2M-10 GI[0,580]", interval(sde(10), 0, 580)));
    out.push(cell(
        "SDE-DPM++2M-10 GI[80,999]",
        interval(sde(10), 80, 999),
    ));
    for (name, s) in [("DDPM-20", ddpm(20)), ("DPM++2M-20", dpm(20))] {
        out.push(cell(
            format!("{name} no clamp"),
            SamplerConfig {
                clip_denoised: false,
                ..s
            },
        ));
        out.push(cell(
            format!("{name} dynamic thr."),
            SamplerConfig {
                dynamic_thresholding: Some(DynamicThresholding {
                    ratio: 0.995,
                    max_value: 1.5,
                }),
                ..s
            },
        ));
    }
    for (name, s) in [("DPM++2M-20", dpm(20)), ("SDE-DPM++2M-20", sde(20))] {
        out.push(cell(
            format!("{name} rescale 0.7"),
            SamplerConfig {
                guidance_rescale: 0.7,
                ..s
            },
        ));
    }
    out
}

/// A cell's figures; `*_se` are bootstrap standard errors.
#[derive(Serialize, Clone)]
struct Row {
    name: String,
    sampler: SamplerConfig,
    defaultable: bool,
    nfe: usize,
    seconds: f64,
    class_accuracy: f64,
    class_accuracy_se: f64,
    fd: f64,
    fd_se: f64,
    /// FD over the reference's, with the paired bootstrap's standard error.
    fd_ratio: f64,
    fd_ratio_se: f64,
    kid: f64,
    kid_std: f64,
    diversity: f64,
    diversity_se: f64,
    roughness: f64,
}

#[derive(Serialize)]
struct Results {
    dataset: String,
    train_steps: usize,
    samples_per_class: i64,
    probe_accuracy: f64,
    fd_floor: Option<f64>,
    holdout_images: usize,
    rows: Vec<Row>,
}

/// Writes the data set under `dir` once (a marker file says it is complete).
fn ensure_dataset(name: &str, dir: &Path) -> PathBuf {
    let root = dir.join("dataset");
    let marker = dir.join("dataset.complete");
    if !marker.exists() {
        let _ = std::fs::remove_dir_all(&root);
        let spec = DemoSpec {
            size: SIZE as u32,
            per_class: PER_CLASS,
            classes: CLASSES,
            seed: 0,
        };
        match name {
            "shapes" => write_demo_dataset(&root, &spec),
            "varied" => write_varied_dataset(&root, &spec),
            other => panic!("no data set {other:?}: use shapes or varied"),
        }
        .expect("generate the data set");
        std::fs::write(&marker, b"").expect("write the marker");
    }
    root
}

/// The `fast` preset on the tiny network, as the trainer runs it, for `steps` steps.
fn run_config(steps: usize) -> RunConfig {
    let mut c = RunConfig::preset(Preset::Fast);
    c.model = UNetConfig::tiny(Some(CLASSES as i64));
    c.training.batch_size = BATCH;
    c.training.steps = steps as i64;
    c.training.seed = 1;
    c
}

/// Trains `config` on `images: [N, 3, S, S]`, `labels: [N]` as the trainer's loop does
/// (seeded per step, `diffusion_loss` with the run's objective, `Learner::update` at the
/// run's learning rate); returns the EMA model's checkpoint bytes.
fn train(
    config: &RunConfig,
    schedule: &NoiseSchedule,
    images: &Tensor,
    labels: &Tensor,
) -> Vec<u8> {
    tch::manual_seed(config.training.seed as i64);
    let mut learner =
        Learner::new(&config.model, Device::Cpu, config.optimizer(), config.ema).expect("learner");
    let objective = config.objective();
    let clip = (config.training.max_grad_norm > 0.0).then_some(config.training.max_grad_norm);
    let steps = config.training.steps;
    let n = images.size()[0];
    let started = Instant::now();
    let mut window = 0.0;
    for s in 1..=steps {
        tch::manual_seed((mix(SEED, s as u64) >> 1) as i64);
        let idx = Tensor::randint(n, [config.training.batch_size], (Kind::Int64, Device::Cpu));
        let x0 = images.index_select(0, &idx);
        let y = labels.index_select(0, &idx);
        let loss =
            diffusion_loss(&learner.model, schedule, &x0, Some(&y), &objective).expect("loss");
        loss.loss.backward();
        let _ = learner.update(config.lr_at(s), clip).expect("update");
        window += loss.per_sample.mean(Kind::Float).double_value(&[]);
        if s % 500 == 0 {
            eprintln!(
                "  step {s}/{steps}: ε-MSE {:.4} (500-step mean), {:.0} s",
                window / 500.0,
                started.elapsed().as_secs_f64()
            );
            window = 0.0;
        }
    }
    let (bytes, _) = checkpoint_bytes(
        learner.ema.model(),
        &CheckpointInfo {
            schedule: config.schedule,
            class_names: (0..CLASSES).map(|c| c.to_string()).collect(),
            run_id: None,
            step: steps,
        },
    )
    .expect("checkpoint");
    bytes
}

fn load(bytes: &[u8]) -> Model {
    load_checkpoint_bytes(Path::new("cached checkpoint"), bytes, Device::Cpu)
        .expect("load the checkpoint")
        .model
}

/// The EMA model, trained or read from `<dir>/model-<steps>.safetensors`.
fn model(
    dir: &Path,
    config: &RunConfig,
    schedule: &NoiseSchedule,
    train_x: &Tensor,
    train_y: &Tensor,
) -> Model {
    let path = dir.join(format!("model-{}.safetensors", config.training.steps));
    if let Ok(bytes) = std::fs::read(&path) {
        eprintln!("  checkpoint: {} (cached)", path.display());
        return load(&bytes);
    }
    let started = Instant::now();
    let bytes = train(config, schedule, train_x, train_y);
    std::fs::write(&path, &bytes).expect("cache the checkpoint");
    eprintln!(
        "  trained {} steps in {:.0} s: {}",
        config.training.steps,
        started.elapsed().as_secs_f64(),
        path.display()
    );
    load(&bytes)
}

/// A cell's K samples per class (`[K·C, 3, S, S]`, class-major) with their labels and
/// the seconds drawing them took, drawn or read from the cache under `<dir>/samples/`,
/// keyed by everything they depend on (the checkpoint's step count, K, the sampler's
/// settings, guidance and seed), so a rerun rescoring the same cells samples nothing.
fn samples(
    dir: &Path,
    train_steps: usize,
    model: &Model,
    schedule: &NoiseSchedule,
    k: i64,
    c: &Cell,
) -> (Tensor, Tensor, f64) {
    let key = format!(
        "{train_steps}|{k}|{GUIDANCE}|{SEED}|{}",
        serde_json::to_string(&c.sampler).expect("json")
    );
    // FNV-1a of the key.
    let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    let cache = dir.join("samples");
    std::fs::create_dir_all(&cache).expect("samples folder");
    let path = cache.join(format!("{}-{hash:016x}.pt", slug(&c.name)));
    let seconds_path = path.with_extension("seconds");
    if let (Ok(tensors), Ok(seconds)) = (
        Tensor::load_multi(&path),
        std::fs::read_to_string(&seconds_path),
    ) {
        let mut named: BTreeMap<String, Tensor> = tensors.into_iter().collect();
        if let (Some(images), Some(labels), Ok(seconds)) = (
            named.remove("images"),
            named.remove("labels"),
            seconds.trim().parse::<f64>(),
        ) {
            return (images, labels, seconds);
        }
    }
    let t = Instant::now();
    let (images, labels) =
        sample_classes(model, schedule, k, c.sampler, GUIDANCE, SEED).expect("samples");
    let seconds = t.elapsed().as_secs_f64();
    Tensor::save_multi(&[("images", &images), ("labels", &labels)], &path)
        .expect("cache the samples");
    std::fs::write(&seconds_path, format!("{seconds}")).expect("cache the seconds");
    (images, labels, seconds)
}

/// A cell's name as a file name: `DPM++2M-20 GI[80,580]` → `dpmpp2m-20_gi_80_580`.
fn slug(name: &str) -> String {
    name.replace("++", "pp")
        .replace("η=", "eta")
        .to_lowercase()
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '-' => c,
            'β' => 'b',
            'η' => 'e',
            _ => '_',
        })
        .collect::<String>()
        .replace("__", "_")
        .trim_matches('_')
        .to_string()
}

fn run_dataset(name: &str, out: &Path) -> Results {
    let dir = out.join(name);
    std::fs::create_dir_all(dir.join("grids")).expect("output folder");
    let root = ensure_dataset(name, &dir);
    let folder = ImageFolder::scan(&root, Default::default()).expect("scan");
    let k: i64 = env("DDPM_BENCH_SAMPLES_PER_CLASS", 25);
    let quality = QualityConfig {
        holdout: HOLDOUT,
        samples_per_class: k,
        probe_steps: 2000,
        seed: SEED,
        ..QualityConfig::default()
    };
    let classes = folder.class_names.len() as i64;
    let split = split_items(&folder.items, Some(classes), SIZE, &quality).expect("split");
    let started = Instant::now();
    let scorer = Scorer::build(
        &split,
        classes,
        SIZE,
        Default::default(),
        Device::Cpu,
        &quality,
    )
    .expect("scorer");
    eprintln!(
        "{name}: {} training, {} held-out images; probe held-out accuracy {:.3}, FD floor {:.3} ({:.0} s)",
        split.train.len(),
        split.holdout.len(),
        scorer.probe_accuracy(),
        scorer.fd_floor().unwrap_or(f64::NAN),
        started.elapsed().as_secs_f64()
    );
    let (train_x, train_y) =
        decode(&split.train, SIZE, Default::default(), Device::Cpu).expect("decode");
    let (held_x, _) =
        decode(&split.holdout, SIZE, Default::default(), Device::Cpu).expect("decode");
    let real_roughness = roughness(&held_x);
    let steps: usize = env("DDPM_BENCH_TRAIN_STEPS", 4000);
    let config = run_config(steps);
    let schedule = NoiseSchedule::new(config.schedule, Device::Cpu).expect("schedule");
    let model = model(
        &dir,
        &config,
        &schedule,
        &train_x,
        &Tensor::from_slice(&train_y),
    );

    let ref_steps: usize = env("DDPM_BENCH_REF_STEPS", 1000);
    let wanted: Option<Vec<String>> = std::env::var("DDPM_BENCH_CELLS")
        .ok()
        .map(|v| v.split(',').map(|s| s.trim().to_string()).collect());
    let reps: usize = env("DDPM_BENCH_BOOTSTRAP", 200);
    let mut rows: Vec<Row> = Vec::new();
    let mut ref_fds: Option<Vec<f64>> = None;
    let mut resamples: Option<Vec<Vec<i64>>> = None;
    for (i, c) in cells(ref_steps).into_iter().enumerate() {
        // The reference always runs: every ratio needs it.
        if i > 0 && wanted.as_ref().is_some_and(|w| !w.contains(&c.name)) {
            continue;
        }
        let (images, labels, seconds) = samples(&dir, steps, &model, &schedule, k, &c);
        let features = scorer.features(&images);
        let labels_host = Vec::<i64>::try_from(&labels).expect("labels");
        let resamples =
            resamples.get_or_insert_with(|| stratified_resamples(&labels_host, reps, SEED));
        let correct: Vec<f64> = Vec::<f64>::try_from(
            scorer
                .classify(&images)
                .eq_tensor(&labels)
                .to_kind(Kind::Double),
        )
        .expect("classes");
        let fd = scorer.fd(&features).unwrap_or(f64::NAN);
        let diversity = scorer
            .diversity(&features, &labels_host)
            .unwrap_or(f64::NAN);
        let (mut fds, mut divs, mut accs) = (Vec::new(), Vec::new(), Vec::new());
        for rows_idx in resamples.iter() {
            let idx = Tensor::from_slice(rows_idx);
            let f = features.index_select(0, &idx);
            let l: Vec<i64> = rows_idx.iter().map(|&r| labels_host[r as usize]).collect();
            fds.push(scorer.fd(&f).unwrap_or(f64::NAN));
            divs.push(scorer.diversity(&f, &l).unwrap_or(f64::NAN));
            accs.push(rows_idx.iter().map(|&r| correct[r as usize]).sum::<f64>() / l.len() as f64);
        }
        let reference = ref_fds.get_or_insert_with(|| fds.clone());
        let ratios: Vec<f64> = fds
            .iter()
            .zip(reference.iter())
            .map(|(a, b)| a / b)
            .collect();
        let ref_fd = rows.first().map_or(fd, |r| r.fd);
        let kid = scorer.kid(&features).unwrap_or((f64::NAN, f64::NAN));
        let row = Row {
            name: c.name.clone(),
            sampler: c.sampler,
            defaultable: c.defaultable,
            nfe: c.sampler.steps,
            seconds,
            class_accuracy: correct.iter().sum::<f64>() / correct.len().max(1) as f64,
            class_accuracy_se: standard_error(&accs).unwrap_or(f64::NAN),
            fd,
            fd_se: standard_error(&fds).unwrap_or(f64::NAN),
            fd_ratio: fd / ref_fd,
            fd_ratio_se: standard_error(&ratios).unwrap_or(f64::NAN),
            kid: kid.0,
            kid_std: kid.1,
            diversity,
            diversity_se: standard_error(&divs).unwrap_or(f64::NAN),
            roughness: roughness(&images) / real_roughness,
        };
        eprintln!("  {}", table_row(&row));
        // The first GRID_COLUMNS samples of every class: the same seeds in every grid.
        let pick: Vec<i64> = (0..classes)
            .flat_map(|cl| (0..GRID_COLUMNS.min(k)).map(move |j| cl * k + j))
            .collect();
        let grid = tile_images(
            &images.index_select(0, &Tensor::from_slice(&pick)),
            GRID_COLUMNS.min(k) as u32,
            3,
        )
        .expect("grid");
        grid.save(dir.join("grids").join(format!("{}.png", slug(&c.name))))
            .expect("save the grid");
        rows.push(row);
    }
    let results = Results {
        dataset: name.to_string(),
        train_steps: steps,
        samples_per_class: k,
        probe_accuracy: scorer.probe_accuracy(),
        fd_floor: scorer.fd_floor(),
        holdout_images: split.holdout.len(),
        rows,
    };
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_vec_pretty(&results).expect("json"),
    )
    .expect("write results");
    std::fs::write(dir.join("table.md"), table(&results)).expect("write table");
    results
}

const HEADER: &str = "| cell | NFE | FD ± SE | FD / DDPM-ref ± SE | KID ± sd | diversity ± SE | class acc ± SE | roughness | s |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |";

fn table_row(r: &Row) -> String {
    format!(
        "| {} | {} | {:.3} ± {:.3} | {:.3} ± {:.3} | {:.3} ± {:.3} | {:.3} ± {:.3} | {:.3} ± {:.3} | {:.2} | {:.0} |",
        r.name,
        r.nfe,
        r.fd,
        r.fd_se,
        r.fd_ratio,
        r.fd_ratio_se,
        r.kid,
        r.kid_std,
        r.diversity,
        r.diversity_se,
        r.class_accuracy,
        r.class_accuracy_se,
        r.roughness,
        r.seconds
    )
}

/// The table and the choice: the cells the server can default to, diversity ≥ 0.9,
/// by NFE the lowest FD; then the target check.
fn table(results: &Results) -> String {
    let mut s = format!(
        "{}: {} steps of the `fast` preset, {} samples per class, probe held-out accuracy {:.3}, FD floor {:.3} ({} held-out images)\n\n{HEADER}\n",
        results.dataset,
        results.train_steps,
        results.samples_per_class,
        results.probe_accuracy,
        results.fd_floor.unwrap_or(f64::NAN),
        results.holdout_images,
    );
    for r in &results.rows {
        s += &table_row(r);
        s.push('\n');
    }
    let mut best: BTreeMap<usize, &Row> = BTreeMap::new();
    for r in results
        .rows
        .iter()
        .filter(|r| r.defaultable && r.diversity >= 0.9)
    {
        let e = best.entry(r.nfe).or_insert(r);
        if r.fd < e.fd {
            *e = r;
        }
    }
    s += "\nbest FD per NFE among cells with diversity >= 0.9 (server-expressible):\n";
    for (nfe, r) in &best {
        s += &format!(
            "  {nfe:>4} NFE: {} FD {:.3} ({:.3} ± {:.3} × the reference), diversity {:.3}\n",
            r.name, r.fd, r.fd_ratio, r.fd_ratio_se, r.diversity
        );
    }
    let meets = |r: &&Row, nfe: usize, ratio: f64| r.nfe <= nfe && r.fd_ratio <= ratio;
    let pick = best
        .values()
        .find(|r| meets(r, 20, 1.05))
        .map(|r| r.name.clone());
    s += &format!(
        "target at <= 20 NFE (FD <= 1.05x, diversity >= 0.9): {}\n",
        pick.unwrap_or_else(|| "not met".into())
    );
    let ten = best
        .values()
        .find(|r| meets(r, 10, 1.25))
        .map(|r| r.name.clone());
    s += &format!(
        "target at 10 NFE (FD <= 1.25x): {}\n",
        ten.unwrap_or_else(|| "not met".into())
    );
    s
}

fn main() {
    tch::set_num_threads(env("DDPM_BENCH_THREADS", 1));
    let out = PathBuf::from(std::env::var("DDPM_BENCH_OUT").unwrap_or_else(|_| {
        let target = std::env::var("CARGO_TARGET_DIR")
            .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../../target").to_string());
        format!("{target}/bench-samplers")
    }));
    let datasets = std::env::var("DDPM_BENCH_DATASETS").unwrap_or_else(|_| "shapes,varied".into());
    let started = Instant::now();
    let mut tables = Vec::new();
    for name in datasets.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let results = run_dataset(name, &out);
        tables.push(table(&results));
    }
    for t in &tables {
        println!("\n{t}");
    }
    println!(
        "wall time {:.0} s; output in {}",
        started.elapsed().as_secs_f64(),
        out.display()
    );
}
