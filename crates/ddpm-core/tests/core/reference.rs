//! Numbers checked against independent implementations. The vectors and the scripts that
//! produced them sit in `tests/reference/` (see the scripts' headers to regenerate):
//! - `scheduler_vectors.json`: Hugging Face diffusers' `DDPMScheduler`/`DDIMScheduler`;
//! - `seed_unet_state_dict.json`: the seed's PyTorch `UNet_conditional(num_classes=10)`;
//! - `tiny_state_dict.json`, `tiny_forward.safetensors`: the generalised PyTorch UNet at
//!   the tiny config, its (float16-exact) weights, inputs and float32 output;
//! - and the clipped DDIM path, against our own definition computed by hand (diffusers'
//!   `clip_sample` is another one: see the `sampler` module's doc).

use ddpm_core::{
    noise::SampleRng,
    sampler::{sample, Ddim, Ddpm, Sampler, SamplerKind, TimestepSpacing},
    Model, NoiseSchedule, SampleSpec, SamplerConfig, ScheduleConfig, UNetConfig,
};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use crate::helpers::{
    exclusive_rng, micro_config, reference_json as json, reference_path as reference,
};

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn assert_close(name: &str, actual: &[f64], expected: &[f64], rel: f64, abs: f64) {
    assert_eq!(actual.len(), expected.len(), "{name}: lengths");
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        let tol = abs + rel * e.abs();
        assert!(
            (a - e).abs() <= tol,
            "{name}[{i}]: {a} vs reference {e} (tol {tol})"
        );
    }
}

#[test]
fn schedules_match_diffusers() {
    let v = json("scheduler_vectors.json");
    for (name, config) in [
        ("linear", ScheduleConfig::default()),
        ("cosine", ScheduleConfig::cosine(1000)),
    ] {
        let r = &v["schedules"][name];
        let s = NoiseSchedule::new(config, Device::Cpu).unwrap();
        assert_close(
            &format!("{name} betas"),
            &s.betas,
            &floats(&r["betas"]),
            1e-12,
            1e-15,
        );
        assert_close(
            &format!("{name} alphas"),
            &s.alphas,
            &floats(&r["alphas"]),
            1e-12,
            1e-15,
        );
        assert_close(
            &format!("{name} alphas_cumprod"),
            &s.alphas_cumprod,
            &floats(&r["alphas_cumprod"]),
            1e-9,
            1e-15,
        );
        let ts: Vec<usize> = r["posterior_variance_t"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as usize)
            .collect();
        let ours: Vec<f64> = ts.iter().map(|&t| s.posterior_variance[t]).collect();
        assert_close(
            &format!("{name} posterior variance"),
            &ours,
            &floats(&r["posterior_variance"]),
            1e-9,
            1e-15,
        );
    }
}

/// x' = a·x + b·ε + c·z in f64, elementwise.
fn step(c: ddpm_core::sampler::StepCoefficients, x: &[f64], eps: &[f64], z: &[f64]) -> Vec<f64> {
    x.iter()
        .zip(eps)
        .zip(z)
        .map(|((x, e), z)| c.x * x + c.eps * e + c.noise * z)
        .collect()
}

#[test]
fn ddpm_steps_match_diffusers() {
    let v = json("scheduler_vectors.json");
    let (x, eps, z) = (
        floats(&v["inputs"]["x"]),
        floats(&v["inputs"]["eps"]),
        floats(&v["inputs"]["z"]),
    );
    let s = NoiseSchedule::new(ScheduleConfig::default(), Device::Cpu).unwrap();
    for case in v["ddpm"]["cases"].as_array().unwrap() {
        let (t, prev) = (
            case["t"].as_i64().unwrap(),
            case["prev_t"].as_i64().unwrap(),
        );
        let ours = step(Ddpm.coefficients(&s, t, prev), &x, &eps, &z);
        assert_close(
            &format!("ddpm t={t}→{prev}"),
            &ours,
            &floats(&case["prev_sample"]),
            1e-9,
            1e-10,
        );
    }
    // The 50-step plan visits diffusers' timesteps (leading spacing).
    let cfg = SamplerConfig {
        kind: SamplerKind::Ddpm,
        steps: 50,
        eta: 0.0,
        spacing: TimestepSpacing::Leading,
        clip_denoised: false,
    };
    let plan: Vec<i64> = cfg.plan(&s).unwrap().iter().map(|p| p.timestep).collect();
    let expected: Vec<i64> = v["ddpm"]["set_timesteps_50"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_i64().unwrap())
        .collect();
    assert_eq!(plan, expected);
}

#[test]
fn ddim_steps_and_timesteps_match_diffusers() {
    let v = json("scheduler_vectors.json");
    let (x, eps, z) = (
        floats(&v["inputs"]["x"]),
        floats(&v["inputs"]["eps"]),
        floats(&v["inputs"]["z"]),
    );
    let s = NoiseSchedule::new(ScheduleConfig::default(), Device::Cpu).unwrap();
    let runs = v["ddim"]["runs"].as_object().unwrap();
    assert_eq!(runs.len(), 4);
    for (name, run) in runs {
        let spacing = match run["timestep_spacing"].as_str().unwrap() {
            "leading" => TimestepSpacing::Leading,
            "trailing" => TimestepSpacing::Trailing,
            other => panic!("unexpected spacing {other}"),
        };
        let n = run["num_inference_steps"].as_u64().unwrap() as usize;
        let expected: Vec<i64> = run["timesteps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_i64().unwrap())
            .collect();
        assert_eq!(spacing.timesteps(1000, n), expected, "{name} timesteps");
        for case in run["cases"].as_array().unwrap() {
            let (t, prev, eta) = (
                case["t"].as_i64().unwrap(),
                case["prev_t"].as_i64().unwrap(),
                case["eta"].as_f64().unwrap(),
            );
            let ours = step(Ddim { eta }.coefficients(&s, t, prev), &x, &eps, &z);
            assert_close(
                &format!("{name} ddim t={t}→{prev} η={eta}"),
                &ours,
                &floats(&case["prev_sample"]),
                1e-9,
                1e-10,
            );
        }
    }
}

/// ε̃ of `model` for one sample `x: [C, H, W]` at `t`, guided by hand from a conditional
/// and an unconditional pass: ε∅ + w·(ε_y − ε∅).
fn guided_eps_by_hand(model: &Model, x: &[f64], t: i64, label: i64, w: f64) -> Vec<f64> {
    let size = model.config().image_size;
    let null = model.config().null_label().expect("a conditional model");
    let input = Tensor::from_slice(x)
        .to_kind(Kind::Float)
        .view([1, 3, size, size]); // [1, C, H, W]
    let eps = |y: i64| -> Vec<f64> {
        let out = tch::no_grad(|| {
            model.net.forward(
                &input,
                &Tensor::from_slice(&[t]),
                Some(&Tensor::from_slice(&[y])),
            )
        });
        Vec::<f64>::try_from(out.to_kind(Kind::Double).view([-1])).unwrap()
    };
    let (cond, uncond) = (eps(label), eps(null));
    cond.iter()
        .zip(&uncond)
        .map(|(c, u)| u + w * (c - u))
        .collect()
}

/// The default `clip_denoised = true` path of DDIM, computed by hand in f64 from ᾱ (see
/// the `sampler` module's doc): x̂₀ = (x_t − √(1−ᾱ_t)·ε̃)/√ᾱ_t clamped to [−1, 1],
/// ε' = (x_t − √ᾱ_t·clip(x̂₀))/√(1−ᾱ_t), x_s = √ᾱ_s·clip(x̂₀) + √(1−ᾱ_s−σ²)·ε' + σ·z,
/// σ = η·√((1−ᾱ_s)/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_s)). The sampler must follow it, and not diffusers'
/// `clip_sample` (the same with ε̃ in place of ε'), which the same run tells apart.
#[test]
fn clipped_ddim_follows_our_definition_not_diffusers() {
    let _rng = exclusive_rng();
    tch::manual_seed(7);
    let model = Model::new(&micro_config(3), Device::Cpu).unwrap();
    let schedule = NoiseSchedule::new(ScheduleConfig::default(), Device::Cpu).unwrap();
    let (label, w, seed) = (1, 3.0, 11);
    // Trailing spacing over T = 1000 in 5 steps: round(1000 − 200·k) − 1.
    let timesteps = [999i64, 799, 599, 399, 199];
    for eta in [0.0, 0.5] {
        let spec = SampleSpec {
            label: Some(label),
            guidance_scale: w,
            seed,
            sampler: SamplerConfig {
                eta,
                ..SamplerConfig::ddim(timesteps.len())
            },
        };
        assert!(spec.sampler.clip_denoised, "clipping is the default");
        let sampled = sample(&model, &schedule, &[spec], 1).unwrap(); // [1, 3, 8, 8]
        let sampled = Vec::<f64>::try_from(sampled.to_kind(Kind::Double).view([-1])).unwrap();

        // The sample's own noise stream: x_T first, then z for every step that adds noise.
        let mut rng = SampleRng::new(seed);
        let n = sampled.len();
        let x_t: Vec<f64> = rng.normal(n).into_iter().map(f64::from).collect();
        let (mut ours, mut diffusers) = (x_t.clone(), x_t);
        let mut clamped = 0;
        for (i, &t) in timesteps.iter().enumerate() {
            let s = timesteps.get(i + 1).copied().unwrap_or(-1);
            let ab_t = schedule.alpha_cumprod(t);
            let ab_s = if s < 0 {
                1.0
            } else {
                schedule.alpha_cumprod(s)
            };
            let sigma = eta
                * ((1.0 - ab_s) / (1.0 - ab_t) * (1.0 - ab_t / ab_s))
                    .max(0.0)
                    .sqrt();
            let z: Vec<f64> = if sigma > 0.0 {
                rng.normal(n).into_iter().map(f64::from).collect()
            } else {
                vec![0.0; n]
            };
            let direction = (1.0 - ab_s - sigma * sigma).max(0.0).sqrt();
            let eps = guided_eps_by_hand(&model, &ours, t, label, w);
            ours = (0..n)
                .map(|k| {
                    let x0 = (ours[k] - (1.0 - ab_t).sqrt() * eps[k]) / ab_t.sqrt();
                    let x0_clipped = x0.clamp(-1.0, 1.0);
                    clamped += usize::from(x0 != x0_clipped);
                    let eps_consistent = (ours[k] - ab_t.sqrt() * x0_clipped) / (1.0 - ab_t).sqrt();
                    ab_s.sqrt() * x0_clipped + direction * eps_consistent + sigma * z[k]
                })
                .collect();
            let eps = guided_eps_by_hand(&model, &diffusers, t, label, w);
            diffusers = (0..n)
                .map(|k| {
                    let x0 = (diffusers[k] - (1.0 - ab_t).sqrt() * eps[k]) / ab_t.sqrt();
                    ab_s.sqrt() * x0.clamp(-1.0, 1.0) + direction * eps[k] + sigma * z[k]
                })
                .collect();
        }
        assert!(
            clamped > n,
            "η={eta}: the clamp was hardly active ({clamped})"
        );
        let by_hand: Vec<f64> = ours.iter().map(|x| x.clamp(-1.0, 1.0)).collect();
        assert_close(
            &format!("clipped DDIM η={eta}"),
            &sampled,
            &by_hand,
            0.0,
            1e-4,
        );
        let apart = sampled
            .iter()
            .zip(&diffusers)
            .map(|(a, d)| (a - d.clamp(-1.0, 1.0)).abs())
            .fold(0.0, f64::max);
        assert!(
            apart > 1e-2,
            "η={eta}: indistinguishable from diffusers' clip_sample (max |Δ| {apart})"
        );
    }
}

fn state_dict(name: &str) -> (Vec<(String, Vec<i64>)>, i64) {
    let v = json(name);
    let entries = v["state_dict"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let name = e[0].as_str().unwrap().to_string();
            let shape = e[1]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_i64().unwrap())
                .collect();
            (name, shape)
        })
        .collect();
    (entries, v["total_parameters"].as_i64().unwrap_or(-1))
}

fn our_shapes(model: &Model) -> Vec<(String, Vec<i64>)> {
    model
        .named_variables()
        .into_iter()
        .map(|(n, t)| (n, t.size()))
        .collect()
}

#[test]
fn seed_preset_has_the_seed_models_parameters() {
    let (mut theirs, total) = state_dict("seed_unet_state_dict.json");
    let model = Model::new(&UNetConfig::seed(Some(10)), Device::Cpu).unwrap();
    // Our label embedding has one more row: the learned null label for guidance.
    let null_row = 256;
    assert_eq!(
        model.parameter_count(),
        total + null_row,
        "parameter count vs the seed's {total}"
    );
    for (name, shape) in theirs.iter_mut() {
        if name == "label_emb.weight" {
            assert_eq!(shape, &vec![10, 256]);
            shape[0] = 11;
        }
    }
    theirs.sort();
    assert_eq!(
        our_shapes(&model),
        theirs,
        "names and shapes differ from the seed's state dict"
    );
}

#[test]
fn tiny_config_layout_matches_the_pytorch_model() {
    let config: UNetConfig = serde_json::from_value(json("tiny_config.json")).unwrap();
    assert_eq!(
        config,
        UNetConfig::tiny(Some(3)),
        "the tiny preset is the reference's config"
    );
    let (mut theirs, total) = state_dict("tiny_state_dict.json");
    theirs.sort();
    let model = Model::new(&config, Device::Cpu).unwrap();
    assert_eq!(model.parameter_count(), total);
    assert_eq!(our_shapes(&model), theirs);
}

#[test]
fn tiny_forward_matches_pytorch_numerically() {
    let tensors = Tensor::read_safetensors(reference("tiny_forward.safetensors")).unwrap();
    let get = |name: &str| {
        tensors
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.shallow_clone())
            .unwrap()
    };
    let model = Model::new(&UNetConfig::tiny(Some(3)), Device::Cpu).unwrap();
    tch::no_grad(|| {
        for (name, var) in model.named_variables() {
            var.shallow_clone().copy_(&get(&name).to_kind(Kind::Float));
        }
    });
    let (x, t, y) = (
        get("input.x").to_kind(Kind::Float),
        get("input.t").to_kind(Kind::Int64),
        get("input.y").to_kind(Kind::Int64),
    );
    let expected = get("output.eps").to_kind(Kind::Float);
    let eps = tch::no_grad(|| model.net.forward(&x, &t, Some(&y)));
    let diff = (&eps - &expected).abs().max().double_value(&[]);
    assert!(diff < 1e-4, "max |Δ| vs PyTorch = {diff}");
}
