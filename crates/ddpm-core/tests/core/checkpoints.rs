//! Checkpoint and training-state round trips through bytes; corrupt, truncated and
//! mismatched bytes are clear errors, never panics.

use std::path::Path;

use ddpm_core::{
    checkpoint::{
        checkpoint_bytes, load_checkpoint_bytes, load_training_state_bytes, read_manifest,
        training_state_bytes, CheckpointInfo, StateInfo,
    },
    ema::EmaConfig,
    optim::AdamWConfig,
    training::{diffusion_loss, Learner, Objective},
    CoreError, Model, NoiseSchedule, ScheduleConfig, UNetConfig,
};
use tch::{Device, Kind, Tensor};

use crate::helpers::{colour_dataset, exclusive_rng, micro_config};

fn info() -> CheckpointInfo {
    CheckpointInfo {
        schedule: ScheduleConfig::cosine(1000),
        class_names: vec!["red".into(), "green".into(), "blue".into()],
        run_id: Some(7),
        step: 1234,
    }
}

fn outputs(model: &Model) -> Tensor {
    tch::manual_seed(9);
    let x = Tensor::randn([4, 3, 8, 8], (Kind::Float, Device::Cpu));
    let t = Tensor::from_slice(&[0i64, 10, 500, 999]);
    let y = Tensor::from_slice(&[0i64, 1, 2, 3]);
    tch::no_grad(|| model.net.forward(&x, &t, Some(&y)))
}

#[test]
fn checkpoint_round_trip_gives_identical_outputs() {
    let path = Path::new("runs/7/ema.safetensors");
    tch::manual_seed(3);
    let model = Model::new(&micro_config(3), Device::Cpu).unwrap();
    let (bytes, saved) = checkpoint_bytes(&model, &info()).unwrap();
    assert!(saved.checksum.starts_with("sha256:"));

    let manifest = read_manifest(path, &bytes).unwrap();
    assert_eq!(manifest, saved);
    assert_eq!(manifest.step, 1234);
    assert_eq!(manifest.run_id, Some(7));
    assert_eq!(manifest.class_names, ["red", "green", "blue"]);
    assert_eq!(manifest.model, micro_config(3));

    let loaded = load_checkpoint_bytes(path, &bytes, Device::Cpu).unwrap();
    assert_eq!(loaded.manifest, saved);
    let (a, b) = (outputs(&model), outputs(&loaded.model));
    assert!(a.equal(&b), "outputs differ after a round trip");
}

fn expect_checkpoint_error(result: Result<impl std::fmt::Debug, CoreError>, needle: &str) {
    match result {
        Err(e @ CoreError::Checkpoint { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains(needle),
                "error {msg:?} does not mention {needle:?}"
            );
        }
        other => panic!("expected a checkpoint error mentioning {needle:?}, got {other:?}"),
    }
}

#[test]
fn corrupt_truncated_and_mismatched_checkpoints_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::new(&micro_config(3), Device::Cpu).unwrap();
    let (bytes, _) = checkpoint_bytes(&model, &info()).unwrap();
    let load =
        |name: &str, bytes: &[u8]| load_checkpoint_bytes(Path::new(name), bytes, Device::Cpu);

    expect_checkpoint_error(load("truncated", &bytes[..bytes.len() / 2]), "truncated");
    expect_checkpoint_error(load("header", &bytes[..5]), "safetensors");
    expect_checkpoint_error(read_manifest(Path::new("header"), &bytes[..5]), "header");

    // One flipped bit in the weights: the checksum catches it.
    let mut flipped = bytes.clone();
    let last = flipped.len() - 3;
    flipped[last] ^= 0x10;
    expect_checkpoint_error(load("corrupt", &flipped), "checksum");

    // A manifest that describes another network than the tensors hold (same-length edit,
    // so the file stays well-formed and the checksum of the tensors still matches).
    let text = String::from_utf8_lossy(&bytes).to_string();
    assert!(text.contains("\\\"base_channels\\\":16"));
    let edited = bytes_replace(
        &bytes,
        b"\\\"base_channels\\\":16",
        b"\\\"base_channels\\\":32",
    );
    expect_checkpoint_error(load("mismatched", &edited), "shape");

    // A safetensors file that is not ours.
    let foreign = dir.path().join("foreign.safetensors");
    model.vs.save(&foreign).unwrap();
    let foreign = std::fs::read(&foreign).unwrap();
    expect_checkpoint_error(load("foreign", &foreign), "not a ddpm");
    expect_checkpoint_error(read_manifest(Path::new("foreign"), &foreign), "not a ddpm");
}

fn bytes_replace(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let mut out = haystack.to_vec();
    let pos = haystack
        .windows(from.len())
        .position(|w| w == from)
        .expect("pattern present");
    out[pos..pos + to.len()].copy_from_slice(to);
    out
}

fn new_run(config: &UNetConfig) -> Learner {
    tch::manual_seed(11);
    let ema = EmaConfig {
        decay: 0.9,
        warmup_steps: 2,
        ..Default::default()
    };
    Learner::new(config, Device::Cpu, AdamWConfig::default(), ema).unwrap()
}

/// Steps `from..to`, every random draw seeded by (seed, step) as the trainer does.
fn steps(run: &mut Learner, schedule: &NoiseSchedule, data: &(Tensor, Tensor), from: i64, to: i64) {
    for step in from..to {
        tch::manual_seed(1000 + step);
        let idx = Tensor::randint(data.0.size()[0], [8], (Kind::Int64, Device::Cpu));
        let loss = diffusion_loss(
            &run.model,
            schedule,
            &data.0.index_select(0, &idx),
            Some(&data.1.index_select(0, &idx)),
            &Objective::default(),
        )
        .unwrap()
        .loss;
        loss.backward();
        let _ = run.update(1e-3, Some(1.0)).unwrap();
    }
}

#[test]
fn training_state_resumes_exactly() {
    let _rng = exclusive_rng();
    let path = Path::new("state.safetensors");
    let schedule = NoiseSchedule::new(ScheduleConfig::default(), Device::Cpu).unwrap();
    let data = colour_dataset(3, 8, 8);
    let config = micro_config(3);

    let mut straight = new_run(&config);
    steps(&mut straight, &schedule, &data, 0, 4);
    let info = StateInfo {
        step: 4,
        seed: 1000,
        extra: serde_json::json!({"epoch": 1}),
    };
    let (state, saved) =
        training_state_bytes(&straight.model, &straight.ema, &straight.optimizer, &info).unwrap();
    assert_eq!(saved.step, 4);
    steps(&mut straight, &schedule, &data, 4, 8);

    // A fresh process would rebuild everything from the config, then load the state.
    let mut resumed = new_run(&config);
    tch::manual_seed(99); // different init: the state must overwrite it all
    let manifest = load_training_state_bytes(
        path,
        &state,
        &resumed.model,
        &resumed.ema,
        &mut resumed.optimizer,
    )
    .unwrap();
    assert_eq!(manifest, saved);
    assert_eq!((manifest.step, manifest.seed), (4, 1000));
    assert_eq!(manifest.extra["epoch"], 1);
    assert_eq!(resumed.optimizer.steps(), 4);
    steps(&mut resumed, &schedule, &data, 4, 8);

    assert!(
        straight
            .optimizer
            .params()
            .flat()
            .equal(resumed.optimizer.params().flat()),
        "weights diverged"
    );
    assert!(
        straight.ema.flat().flat().equal(resumed.ema.flat().flat()),
        "EMA diverged"
    );

    // A state of another network is refused and changes nothing.
    let mut other = new_run(&UNetConfig {
        base_channels: 8,
        ..config.clone()
    });
    let before = other.optimizer.params().flat().copy();
    let err =
        load_training_state_bytes(path, &state, &other.model, &other.ema, &mut other.optimizer)
            .unwrap_err();
    assert!(err.to_string().contains("config"), "{err}");
    assert!(other.optimizer.params().flat().equal(&before));
}
