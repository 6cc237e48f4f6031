//! Numbers checked against independent implementations. The vectors and the scripts that
//! produced them sit in `tests/reference/` (see the scripts' headers to regenerate):
//! - `scheduler_vectors.json`: Hugging Face diffusers' `DDPMScheduler`/`DDIMScheduler`
//!   (steps, σ² = β̃ and β, dynamic thresholding) and the three `timestep_spacing`s of those and of
//!   `DPMSolverMultistepScheduler`;
//! - `dpmpp_vectors.json`: diffusers' `DPMSolverMultistepScheduler` (DPM-Solver++(2M)):
//!   timesteps, single steps and whole trajectories under a fake ε, unclipped and clipped,
//!   and of its `sde-dpmsolver++` with the noise given;
//! - `seed_unet_state_dict.json`: the seed's PyTorch `UNet_conditional(num_classes=10)`;
//! - `tiny_state_dict.json`, `tiny_forward.safetensors`: the generalised PyTorch UNet at
//!   the tiny config, its (float16-exact) weights, inputs and float32 output;
//! - and the clipped DDIM path and DPM-Solver++(2M) sampling with a model, against our
//!   own definitions computed by hand (for DDIM, diffusers' `clip_sample` is another one:
//!   see the `sampler` module's doc).

use ddpm_core::{
    noise::SampleRng,
    sampler::{
        sample, step_trajectories, threshold_x0, AncestralVariance, Ddim, Ddpm, DpmSolverAlgorithm,
        DynamicThresholding, PlannedStep, Sampler, SamplerKind, TimestepSpacing, Trajectory,
    },
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
    let (mut large, mut thresholded) = (0, 0);
    for case in v["ddpm"]["cases"].as_array().unwrap() {
        let (t, prev) = (
            case["t"].as_i64().unwrap(),
            case["prev_t"].as_i64().unwrap(),
        );
        let variance = match case["variance_type"].as_str().unwrap() {
            "fixed_small" => AncestralVariance::FixedSmall,
            "fixed_large" => {
                large += 1;
                AncestralVariance::FixedLarge
            }
            other => panic!("variance_type {other}"),
        };
        // Thresholded: the step from x_t and the ε consistent with the thresholded x̂₀.
        let eps = match case["thresholding"].as_array() {
            None => eps.clone(),
            Some(setting) => {
                thresholded += 1;
                let setting = DynamicThresholding {
                    ratio: setting[0].as_f64().unwrap(),
                    max_value: setting[1].as_f64().unwrap(),
                };
                let ab = s.alpha_cumprod(t);
                let x0: Vec<f64> = x
                    .iter()
                    .zip(&eps)
                    .map(|(x, e)| (x - (1.0 - ab).sqrt() * e) / ab.sqrt())
                    .collect();
                let x0 = Tensor::from_slice(&x0).view([2, -1]); // [B, C·H·W]
                let x0 = threshold_x0(&x0, &[Some(setting); 2]).unwrap();
                let x0 = Vec::<f64>::try_from(x0.flatten(0, -1)).unwrap();
                assert_close(
                    &format!("thresholded x̂₀ t={t} {setting:?}"),
                    &x0,
                    &floats(&case["pred_original_sample"]),
                    1e-12,
                    1e-12,
                );
                x.iter()
                    .zip(&x0)
                    .map(|(x, x0)| (x - ab.sqrt() * x0) / (1.0 - ab).sqrt())
                    .collect()
            }
        };
        let ours = step(Ddpm { variance }.coefficients(&s, t, prev), &x, &eps, &z);
        assert_close(
            &format!("ddpm {variance:?} t={t}→{prev}"),
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
        dynamic_thresholding: None,
        guidance_rescale: 0.0,
        guidance_interval: None,
        dpm_solver: Default::default(),
        variance: AncestralVariance::FixedSmall,
    };
    assert!(large >= 5, "fixed_large cases: {large}");
    assert!(thresholded >= 12, "thresholded cases: {thresholded}");
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

fn ints(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_i64().unwrap())
        .collect()
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
}

/// x' = a·x + b·ε + d·x̂₀' in f64, elementwise (a step that adds no noise).
fn multistep(
    c: ddpm_core::sampler::StepCoefficients,
    x: &[f64],
    eps: &[f64],
    prev_x0: &[f64],
) -> Vec<f64> {
    assert_eq!(c.noise, 0.0);
    x.iter()
        .zip(eps)
        .zip(prev_x0)
        .map(|((x, e), p)| c.x * x + c.eps * e + c.prev_x0 * p)
        .collect()
}

/// x̂₀ = (x_t − √(1−ᾱ_t)·ε)/√ᾱ_t of a plan step and the ε the update uses: with the step's
/// clip, x̂₀ clamped to [−1, 1] and ε the one consistent with it (the `sampler` module's
/// doc).
fn predicted_x0(
    schedule: &NoiseSchedule,
    step: &PlannedStep,
    x: &[f64],
    eps: &[f64],
) -> (Vec<f64>, Vec<f64>) {
    let ab = schedule.alpha_cumprod(step.timestep);
    let (alpha, sigma) = (ab.sqrt(), (1.0 - ab).sqrt());
    x.iter()
        .zip(eps)
        .map(|(x, e)| {
            let x0 = (x - sigma * e) / alpha;
            match step.clip {
                Some(_) => {
                    let x0 = x0.clamp(-1.0, 1.0);
                    (x0, (x - alpha * x0) / sigma)
                }
                None => (x0, *e),
            }
        })
        .unzip()
}

/// The linspace timesteps of `DPMSolverMultistepScheduler.set_timesteps(n)`.
#[test]
fn dpmpp_2m_timesteps_match_diffusers() {
    let v = json("dpmpp_vectors.json");
    let s = NoiseSchedule::new(ScheduleConfig::default(), Device::Cpu).unwrap();
    let runs = v["timesteps"].as_object().unwrap();
    assert!(runs.len() >= 10);
    for (n, expected) in runs {
        let n: usize = n.parse().unwrap();
        let expected = ints(expected);
        assert_eq!(
            TimestepSpacing::Linspace.timesteps(1000, n),
            expected,
            "n = {n}"
        );
        let plan: Vec<i64> = SamplerConfig::dpmpp_2m(n)
            .plan(&s)
            .unwrap()
            .iter()
            .map(|p| p.timestep)
            .collect();
        assert_eq!(plan, expected, "n = {n}: the plan's timesteps");
    }
}

/// Steps k of n-step plans (first order at k = 0 and k = n − 1, second order between),
/// from fixed x_t, ε̃ and previous x̂₀, unclipped as diffusers' default.
#[test]
fn dpmpp_2m_steps_match_diffusers() {
    let v = json("dpmpp_vectors.json");
    let inputs = &v["inputs"];
    let (x, eps, prev_x0) = (
        floats(&inputs["x"]),
        floats(&inputs["eps"]),
        floats(&inputs["prev_x0"]),
    );
    let s = NoiseSchedule::new(ScheduleConfig::default(), Device::Cpu).unwrap();
    let cases = v["steps"].as_array().unwrap();
    assert!(cases.len() >= 10);
    let mut worst: f64 = 0.0;
    for case in cases {
        let n = case["num_inference_steps"].as_u64().unwrap() as usize;
        let k = case["index"].as_u64().unwrap() as usize;
        let plan = SamplerConfig {
            clip_denoised: false,
            ..SamplerConfig::dpmpp_2m(n)
        }
        .plan(&s)
        .unwrap();
        let step = plan[k];
        let name = format!("dpmpp_2m n={n} step {k}");
        assert_eq!(
            (step.timestep, step.prev_timestep),
            (
                case["t"].as_i64().unwrap(),
                case["prev_t"].as_i64().unwrap()
            ),
            "{name}"
        );
        let second_order = case["order"].as_u64().unwrap() == 2;
        assert_eq!(step.coefficients.prev_x0 != 0.0, second_order, "{name}");
        let ours = multistep(step.coefficients, &x, &eps, &prev_x0);
        let expected = floats(&case["prev_sample"]);
        assert_close(&name, &ours, &expected, 1e-9, 1e-10);
        worst = worst.max(max_abs_diff(&ours, &expected));
    }
    eprintln!("dpmpp_2m single steps: max |Δ| vs diffusers (float64) = {worst:e}");
}

/// The fake noise prediction of `make_dpmpp_vectors.py`: 0.8·tanh(x) + 0.3·cos(t/100)·e.
fn fake_eps(x: &[f64], t: i64, e: &[f64]) -> Vec<f64> {
    let w = 0.3 * (t as f64 / 100.0).cos();
    x.iter()
        .zip(e)
        .map(|(x, e)| 0.8 * x.tanh() + w * e)
        .collect()
}

/// Whole trajectories from x_T under the fake ε, every intermediate sample compared: the
/// plan's coefficients and the x̂₀ each step keeps for the next. The clipped run is our
/// `clip_denoised` against diffusers with a clamp as its thresholding.
#[test]
fn dpmpp_2m_trajectories_match_diffusers() {
    let v = json("dpmpp_vectors.json");
    let (x_t, e) = (floats(&v["inputs"]["x"]), floats(&v["inputs"]["eps"]));
    let s = NoiseSchedule::new(ScheduleConfig::default(), Device::Cpu).unwrap();
    let runs = v["trajectories"].as_object().unwrap();
    assert!(runs.len() >= 5);
    let mut worst: f64 = 0.0;
    for (name, run) in runs {
        let n = run["num_inference_steps"].as_u64().unwrap() as usize;
        let plan = SamplerConfig {
            clip_denoised: run["clip"].as_bool().unwrap(),
            ..SamplerConfig::dpmpp_2m(n)
        }
        .plan(&s)
        .unwrap();
        let timesteps: Vec<i64> = plan.iter().map(|p| p.timestep).collect();
        assert_eq!(timesteps, ints(&run["timesteps"]), "{name}");
        let samples = run["samples"].as_array().unwrap();
        assert_eq!(samples.len(), n);
        let (mut x, mut prev_x0) = (x_t.clone(), vec![0.0; x_t.len()]);
        let mut clamped = 0;
        for (i, (step, expected)) in plan.iter().zip(samples).enumerate() {
            let (x0, eps) = predicted_x0(&s, step, &x, &fake_eps(&x, step.timestep, &e));
            clamped += x0.iter().filter(|v| v.abs() == 1.0).count();
            x = multistep(step.coefficients, &x, &eps, &prev_x0);
            if step.keep_x0.is_some() {
                prev_x0 = x0;
            }
            let expected = floats(expected);
            assert_close(&format!("{name} step {i}"), &x, &expected, 1e-9, 1e-10);
            worst = worst.max(max_abs_diff(&x, &expected));
        }
        if plan[0].clip.is_some() {
            assert!(clamped > x.len(), "{name}: the clamp was hardly active");
        }
    }
    eprintln!("dpmpp_2m trajectories: max |Δ| vs diffusers (float64) = {worst:e}");
}

/// DPM-Solver++(2M) sampling with a model, in a batch with DDPM and DDIM samples and
/// another DPM-Solver++ plan, against the solver computed by hand in f64 in the paper's
/// form (x̂₀(t), x̂₀(u), λ = ln(α/σ)), clipped and not. Each step starts from the
/// trajectory's own x_t, so the comparison holds to one step's float32 round-off and
/// checks `denoise_step` and the x̂₀ each `Trajectory` keeps (the final clamp to [−1, 1]
/// would hide most of a whole trajectory on this untrained model).
#[test]
fn dpmpp_2m_sampling_follows_the_solver_by_hand() {
    let _rng = exclusive_rng();
    tch::manual_seed(5);
    let model = Model::new(&micro_config(3), Device::Cpu).unwrap();
    let schedule = NoiseSchedule::new(ScheduleConfig::default(), Device::Cpu).unwrap();
    let (label, w) = (2, 3.0);
    let marginal = |t: i64| {
        let ab = schedule.alpha_cumprod(t);
        let (alpha, sigma) = (ab.sqrt(), (1.0 - ab).sqrt());
        (alpha, sigma, alpha.ln() - sigma.ln())
    };
    let as_f64 = |t: &Tensor| Vec::<f64>::try_from(t.to_kind(Kind::Double).view([-1])).unwrap();
    for clip_denoised in [true, false] {
        let spec = SampleSpec {
            label: Some(label),
            guidance_scale: w,
            seed: 17,
            sampler: SamplerConfig {
                clip_denoised,
                ..SamplerConfig::dpmpp_2m(6)
            },
        };
        let neighbour = |sampler, seed| SampleSpec {
            label: Some(0),
            guidance_scale: 1.5,
            seed,
            sampler,
        };
        let mut trajectories = [
            neighbour(SamplerConfig::ddpm(8), 1),
            spec,
            neighbour(SamplerConfig::ddim(3), 2),
            neighbour(SamplerConfig::dpmpp_2m(4), 3),
        ]
        .map(|s| Trajectory::new(&model, &schedule, s).unwrap());
        let mut previous: Option<(f64, Vec<f64>)> = None; // (λ_u, x̂₀(u))
        let (mut clamped, mut worst) = (0, 0.0f64);
        while !trajectories[1].is_done() {
            let (t, s) = {
                let step = trajectories[1].current();
                (step.timestep, step.prev_timestep)
            };
            let x = as_f64(trajectories[1].x());
            let (alpha_t, sigma_t, lambda_t) = marginal(t);
            let eps = guided_eps_by_hand(&model, &x, t, label, w);
            let x0: Vec<f64> = x
                .iter()
                .zip(&eps)
                .map(|(x, e)| {
                    let x0 = (x - sigma_t * e) / alpha_t;
                    let kept = if clip_denoised {
                        x0.clamp(-1.0, 1.0)
                    } else {
                        x0
                    };
                    clamped += usize::from(kept != x0);
                    kept
                })
                .collect();
            let expected: Vec<f64> = if s < 0 {
                x0.clone() // σ_s = 0, α_s = 1: the first-order step returns x̂₀
            } else {
                let (alpha_s, sigma_s, lambda_s) = marginal(s);
                let h = lambda_s - lambda_t;
                let a = -alpha_s * ((-h).exp() - 1.0);
                (0..x.len())
                    .map(|k| {
                        let d = match &previous {
                            None => x0[k],
                            Some((lambda_u, x0_u)) => {
                                let r = (lambda_t - lambda_u) / h;
                                x0[k] + 0.5 / r * (x0[k] - x0_u[k])
                            }
                        };
                        sigma_s / sigma_t * x[k] + a * d
                    })
                    .collect()
            };
            previous = Some((lambda_t, x0));
            let mut active: Vec<&mut Trajectory> =
                trajectories.iter_mut().filter(|t| !t.is_done()).collect();
            step_trajectories(&model, &mut active).unwrap();
            let name = format!("dpmpp_2m clip_denoised={clip_denoised} t={t}→{s}");
            let ours = as_f64(trajectories[1].x());
            assert_close(&name, &ours, &expected, 1e-5, 1e-4);
            worst = worst.max(max_abs_diff(&ours, &expected));
        }
        eprintln!(
            "dpmpp_2m with a model, clip_denoised={clip_denoised}: max |Δ| per step {worst:e}"
        );
        assert_eq!(
            clamped > 0,
            clip_denoised,
            "clamp active only when clipping"
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

/// Every spacing of every sampler visits diffusers' timesteps for its scheduler (DDPM →
/// `DDPMScheduler`, DDIM → `DDIMScheduler`, DPM-Solver++(2M) → `DPMSolverMultistepScheduler`),
/// except trailing's documented rounding of halves (away from zero here, to even there).
#[test]
fn spacings_match_diffusers_schedulers() {
    let v = json("scheduler_vectors.json");
    let spacings = v["spacings"].as_object().unwrap();
    assert_eq!(spacings.len(), 9, "three schedulers × three spacings");
    let mut halves = 0;
    for (name, runs) in spacings {
        let (scheduler, spacing) = name.split_once('_').unwrap();
        let kind = match scheduler {
            "ddpm" => SamplerKind::Ddpm,
            "ddim" => SamplerKind::Ddim,
            "dpmsolver" => SamplerKind::DpmPp2m,
            other => panic!("scheduler {other}"),
        };
        let spacing: TimestepSpacing = serde_json::from_value(Value::from(spacing)).unwrap();
        for (n, expected) in runs.as_object().unwrap() {
            let n: usize = n.parse().unwrap();
            let expected = ints(expected);
            let ours = spacing.timesteps_for(kind, 1000, n);
            assert_eq!(ours.len(), expected.len(), "{name} n={n}");
            for (k, (a, e)) in ours.iter().zip(&expected).enumerate() {
                let half = (k as f64 * 1000.0 / n as f64).fract() == 0.5;
                if spacing == TimestepSpacing::Trailing && half && a != e {
                    assert_eq!(*a, e + 1, "{name} n={n} k={k}: half rounded away from 0");
                    halves += 1;
                } else {
                    assert_eq!(a, e, "{name} n={n} k={k}: {ours:?} vs {expected:?}");
                }
            }
            // The plan visits them too.
            let plan = SamplerConfig {
                kind,
                steps: n,
                eta: 0.0,
                spacing,
                clip_denoised: true,
                dynamic_thresholding: None,
                guidance_rescale: 0.0,
                guidance_interval: None,
                dpm_solver: Default::default(),
                variance: AncestralVariance::FixedSmall,
            }
            .plan(&NoiseSchedule::new(ScheduleConfig::default(), Device::Cpu).unwrap())
            .unwrap();
            let visited: Vec<i64> = plan.iter().map(|p| p.timestep).collect();
            assert_eq!(visited, ours, "{name} n={n}");
        }
    }
    assert!(halves > 0, "the rounding difference is exercised");
}

/// A config that does not name the new options (as stored configs and requests written
/// before them) samples bit-identically to one that names their defaults, for every
/// sampler.
#[test]
fn unset_options_sample_as_their_explicit_defaults() {
    let _rng = exclusive_rng();
    let model = Model::new(&micro_config(3), Device::Cpu).unwrap();
    let s = NoiseSchedule::new(ScheduleConfig::default(), Device::Cpu).unwrap();
    for (kind, spacing) in [
        ("ddpm", "trailing"),
        ("ddim", "trailing"),
        ("dpmpp_2m", "linspace"),
    ] {
        let implicit: SamplerConfig = serde_json::from_value(serde_json::json!({
            "kind": kind, "steps": 8, "spacing": spacing,
        }))
        .unwrap();
        let explicit: SamplerConfig = serde_json::from_value(serde_json::json!({
            "kind": kind, "steps": 8, "spacing": spacing, "eta": 0.0,
            "clip_denoised": true, "variance": "fixed_small", "dynamic_thresholding": null, "guidance_rescale": 0.0, "guidance_interval": null, "dpm_solver": "dpmsolver++",
        }))
        .unwrap();
        let spec = |sampler| SampleSpec {
            label: Some(1),
            guidance_scale: 2.0,
            seed: 5,
            sampler,
        };
        let a = sample(&model, &s, &[spec(implicit)], 4).unwrap();
        let b = sample(&model, &s, &[spec(explicit)], 4).unwrap();
        assert!(a.equal(&b), "{kind}: not bit-identical");
    }
}

/// Guidance rescale against diffusers' `rescale_noise_cfg`, each row with its own φ.
#[test]
fn guidance_rescale_matches_diffusers() {
    let v = json("scheduler_vectors.json");
    let r = &v["guidance_rescale"];
    let guided = Tensor::from_slice(&floats(&r["guided"])).view([2, 3, 4, 4]);
    let cond = Tensor::from_slice(&floats(&v["inputs"]["eps"])).view([2, 3, 4, 4]);
    let cases = r["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    let phi = |c: &Value| c["guidance_rescale"].as_f64().unwrap();
    let rows = |c: &Value| floats(&c["rescaled"]);
    for (a, b) in [(0, 0), (1, 1), (2, 3), (3, 1)] {
        let ours = ddpm_core::guidance::rescale_guidance(
            &guided,
            &cond,
            &[phi(&cases[a]), phi(&cases[b])],
        )
        .unwrap();
        let ours = Vec::<f64>::try_from(ours.flatten(0, -1)).unwrap();
        let expected = [&rows(&cases[a])[..48], &rows(&cases[b])[48..]].concat();
        assert_close(
            &format!("rescale φ = {}, {}", phi(&cases[a]), phi(&cases[b])),
            &ours,
            &expected,
            1e-12,
            1e-12,
        );
    }
}

/// The SDE solver (diffusers' `algorithm_type="sde-dpmsolver++"`) as whole trajectories
/// under the fake ε with the same noise fed to both sides: each step's z is the
/// vectors' `noises[k]`, unclipped and clipped.
#[test]
fn dpmpp_2m_sde_trajectories_match_diffusers() {
    let v = json("dpmpp_vectors.json");
    let (x_t, e) = (floats(&v["inputs"]["x"]), floats(&v["inputs"]["eps"]));
    let s = NoiseSchedule::new(ScheduleConfig::default(), Device::Cpu).unwrap();
    let runs = v["sde_trajectories"].as_object().unwrap();
    assert!(runs.len() >= 6);
    let mut worst: f64 = 0.0;
    for (name, run) in runs {
        let n = run["num_inference_steps"].as_u64().unwrap() as usize;
        let plan = SamplerConfig {
            clip_denoised: run["clip"].as_bool().unwrap(),
            dpm_solver: DpmSolverAlgorithm::SdeDpmSolverPp,
            ..SamplerConfig::dpmpp_2m(n)
        }
        .plan(&s)
        .unwrap();
        let timesteps: Vec<i64> = plan.iter().map(|p| p.timestep).collect();
        assert_eq!(timesteps, ints(&run["timesteps"]), "{name}");
        let samples = run["samples"].as_array().unwrap();
        let noises = run["noises"].as_array().unwrap();
        assert_eq!(samples.len(), n);
        let (mut x, mut prev_x0) = (x_t.clone(), vec![0.0; x_t.len()]);
        for (i, step) in plan.iter().enumerate() {
            let (x0, eps) = predicted_x0(&s, step, &x, &fake_eps(&x, step.timestep, &e));
            let z = floats(&noises[i]);
            let c = step.coefficients;
            assert_eq!(
                c.noise == 0.0,
                i + 1 == n,
                "{name} step {i}: noise but on the last"
            );
            x = (0..x.len())
                .map(|j| c.x * x[j] + c.eps * eps[j] + c.noise * z[j] + c.prev_x0 * prev_x0[j])
                .collect();
            if step.keep_x0.is_some() {
                prev_x0 = x0;
            }
            let expected = floats(&samples[i]);
            assert_close(&format!("{name} step {i}"), &x, &expected, 1e-9, 1e-10);
            worst = worst.max(max_abs_diff(&x, &expected));
        }
    }
    eprintln!("sde-dpmsolver++ trajectories: max |Δ| vs diffusers (float64) = {worst:e}");
}
