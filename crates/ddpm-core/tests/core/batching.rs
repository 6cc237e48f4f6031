//! Guidance in one pass equals two passes; an image depends only on its own seed and
//! settings, not on what it is batched with.
//!
//! Tolerance: batched convolutions may pick other algorithms than single ones and sum in
//! another order, so equality holds to float round-off. We require max |Δ| ≤ 1e-4 on
//! images in [−1, 1] after a whole trajectory (observed: ~1e-6).

use ddpm_core::{
    guidance::guided_epsilon,
    sampler::{sample, SamplerKind, TimestepSpacing},
    Model, NoiseSchedule, SampleSpec, SamplerConfig, ScheduleConfig,
};
use tch::{Device, Kind, Tensor};

use crate::helpers::micro_config;

const TOLERANCE: f64 = 1e-4;

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn single_pass_guidance_equals_two_passes_per_sample() {
    tch::manual_seed(1);
    let model = Model::new(&micro_config(3), Device::Cpu).unwrap();
    let _guard = tch::no_grad_guard();
    let x = Tensor::randn([5, 3, 8, 8], (Kind::Float, Device::Cpu));
    let t = Tensor::from_slice(&[999i64, 500, 10, 0, 250]);
    // Guided, guided, w = 1 (no unconditional half), unconditional (null label), w = 0.
    let labels = [0i64, 2, 1, 3, 1];
    let scales = [3.0, 7.5, 1.0, 4.0, 0.0];
    let eps = guided_epsilon(&model, &x, &t, &labels, &scales, &[]).unwrap();

    let cond = model
        .net
        .forward(&x, &t, Some(&Tensor::from_slice(&labels)));
    let uncond = model.net.forward(
        &x,
        &t,
        Some(&Tensor::full([5], 3, (Kind::Int64, Device::Cpu))),
    );
    for (i, &w) in scales.iter().enumerate() {
        let i = i as i64;
        let expected = if labels[i as usize] == 3 || w == 1.0 {
            cond.get(i)
        } else {
            uncond.get(i) + (cond.get(i) - uncond.get(i)) * w
        };
        let d = max_abs_diff(&eps.get(i), &expected);
        assert!(d < 1e-5, "sample {i}: |Δ| = {d}");
    }
}

#[test]
fn an_image_depends_only_on_its_own_seed_and_settings() {
    tch::manual_seed(2);
    let model = Model::new(&micro_config(3), Device::Cpu).unwrap();
    let schedule = NoiseSchedule::new(ScheduleConfig::default(), Device::Cpu).unwrap();
    let ddpm50 = SamplerConfig {
        kind: SamplerKind::Ddpm,
        steps: 50,
        eta: 0.0,
        spacing: TimestepSpacing::Leading,
        clip_denoised: true,
        dynamic_thresholding: None,
        guidance_rescale: 0.0,
        guidance_interval: None,
        dpm_solver: Default::default(),
        variance: Default::default(),
    };
    let stochastic_ddim = SamplerConfig {
        eta: 1.0,
        ..SamplerConfig::ddim(10)
    };
    let target = SampleSpec {
        label: Some(1),
        guidance_scale: 3.0,
        seed: 42,
        sampler: ddpm50,
    };
    let alone = sample(&model, &schedule, &[target], 1).unwrap();
    let again = sample(&model, &schedule, &[target], 1).unwrap();
    assert_eq!(max_abs_diff(&alone, &again), 0.0, "same seed, same image");

    // Inside a batch of other classes, seeds, samplers and step counts, in the middle.
    let others = |seed| SampleSpec {
        label: Some(seed as i64 % 3),
        guidance_scale: 1.0 + seed as f64,
        seed,
        sampler: if seed % 2 == 0 {
            SamplerConfig::ddim(7)
        } else {
            stochastic_ddim
        },
    };
    let specs = [
        others(1),
        others(2),
        target,
        others(3),
        SampleSpec {
            label: None,
            ..others(4)
        },
    ];
    let batched = sample(&model, &schedule, &specs, 8).unwrap();
    let d = max_abs_diff(&alone.get(0), &batched.get(2));
    assert!(d <= TOLERANCE, "batched image differs by {d}");

    // A different seed gives a different image.
    let other_seed = sample(&model, &schedule, &[SampleSpec { seed: 43, ..target }], 1).unwrap();
    assert!(max_abs_diff(&alone, &other_seed) > 1e-2);
}

/// A DPM-Solver++(2M) sample keeps its own x̂₀ history whatever it is batched with: DDPM
/// and DDIM samples (no history) and other DPM-Solver++ plans at other steps.
#[test]
fn a_multistep_sample_depends_only_on_its_own_history() {
    tch::manual_seed(3);
    let model = Model::new(&micro_config(3), Device::Cpu).unwrap();
    let schedule = NoiseSchedule::new(ScheduleConfig::default(), Device::Cpu).unwrap();
    let target = SampleSpec {
        label: Some(2),
        guidance_scale: 2.0,
        seed: 9,
        sampler: SamplerConfig::dpmpp_2m(8),
    };
    let alone = sample(&model, &schedule, &[target], 1).unwrap();
    let other = |seed: u64, sampler| SampleSpec {
        label: Some(seed as i64 % 3),
        guidance_scale: 1.0 + seed as f64,
        seed,
        sampler,
    };
    let specs = [
        other(1, SamplerConfig::dpmpp_2m(5)),
        other(2, SamplerConfig::ddim(6)),
        target,
        other(3, SamplerConfig::ddpm(12)),
        other(4, SamplerConfig::dpmpp_2m(11)),
    ];
    let batched = sample(&model, &schedule, &specs, 8).unwrap();
    let d = max_abs_diff(&alone.get(0), &batched.get(2));
    assert!(d <= TOLERANCE, "batched image differs by {d}");
    // In batches of 2 the target meets other samples at other steps of their plans.
    let pairs = sample(&model, &schedule, &specs, 2).unwrap();
    let d = max_abs_diff(&alone.get(0), &pairs.get(2));
    assert!(d <= TOLERANCE, "image batched in pairs differs by {d}");
}

#[test]
fn bad_sample_requests_are_errors() {
    let model = Model::new(&micro_config(3), Device::Cpu).unwrap();
    let schedule = NoiseSchedule::new(ScheduleConfig::default(), Device::Cpu).unwrap();
    let spec = SampleSpec {
        label: Some(3),
        guidance_scale: 3.0,
        seed: 0,
        sampler: SamplerConfig::ddim(5),
    };
    let err = sample(&model, &schedule, &[spec], 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("class 3"), "{err}");
    let nan = SampleSpec {
        label: Some(0),
        guidance_scale: f64::NAN,
        ..spec
    };
    assert!(sample(&model, &schedule, &[nan], 1).is_err());
    let too_many = SampleSpec {
        label: Some(0),
        sampler: SamplerConfig::ddim(5000),
        ..spec
    };
    assert!(sample(&model, &schedule, &[too_many], 1)
        .unwrap_err()
        .to_string()
        .contains("steps"));
    assert!(sample(&model, &schedule, &[], 1).is_err());
}

#[test]
fn tracking_x0_exposes_the_prediction_without_changing_the_sample() {
    use ddpm_core::sampler::{step_trajectories, Trajectory};
    tch::manual_seed(4);
    let model = Model::new(&micro_config(3), Device::Cpu).unwrap();
    let schedule = NoiseSchedule::new(ScheduleConfig::default(), Device::Cpu).unwrap();
    let _guard = tch::no_grad_guard();
    for sampler in [SamplerConfig::ddim(8), SamplerConfig::ddpm(8)] {
        let spec = SampleSpec {
            label: Some(1),
            guidance_scale: 3.0,
            seed: 9,
            sampler,
        };
        assert_eq!(spec.rows_per_step(), 2, "a guided sample costs two rows");
        let mut plain = Trajectory::new(&model, &schedule, spec).unwrap();
        let mut tracked = Trajectory::new(&model, &schedule, spec).unwrap();
        tracked.track_x0(true);
        while !plain.is_done() {
            let x_t = tracked.x().shallow_clone();
            step_trajectories(&model, &mut [&mut plain]).unwrap();
            step_trajectories(&model, &mut [&mut tracked]).unwrap();
            assert!(max_abs_diff(plain.x(), tracked.x()) < TOLERANCE);
            assert!(
                plain.x0().is_none(),
                "{:?}: kept without asking",
                sampler.kind
            );
            // x̂₀ is the clamped prediction of the image from x_t, in [−1, 1].
            let x0 = tracked.x0().expect("tracked x̂₀");
            assert!(x0.abs().max().double_value(&[]) <= 1.0 + 1e-6);
            assert_eq!(x0.size(), x_t.size());
        }
    }
    let unguided = SampleSpec {
        label: Some(1),
        guidance_scale: 1.0,
        seed: 0,
        sampler: SamplerConfig::ddim(2),
    };
    assert_eq!(unguided.rows_per_step(), 1);
    assert_eq!(
        SampleSpec {
            label: None,
            ..unguided
        }
        .rows_per_step(),
        1
    );
}

/// A dynamically thresholded sample is the same alone and batched with samples that clamp
/// or do not clip at all; with `max_value = 1` it is the static clamp, bit for bit.
#[test]
fn dynamic_thresholding_is_per_sample() {
    use ddpm_core::sampler::DynamicThresholding;
    let model = Model::new(&micro_config(3), Device::Cpu).unwrap();
    let schedule = NoiseSchedule::new(ScheduleConfig::default(), Device::Cpu).unwrap();
    let dynamic = |ratio, max_value| SamplerConfig {
        dynamic_thresholding: Some(DynamicThresholding { ratio, max_value }),
        ..SamplerConfig::ddpm(12)
    };
    let spec = |seed, sampler| SampleSpec {
        label: Some(2),
        guidance_scale: 4.0,
        seed,
        sampler,
    };
    let target = spec(9, dynamic(0.9, 1.5));
    let alone = sample(&model, &schedule, &[target], 1).unwrap();
    let unclipped = SamplerConfig {
        clip_denoised: false,
        ..SamplerConfig::ddim(7)
    };
    let batched = sample(
        &model,
        &schedule,
        &[
            spec(1, SamplerConfig::ddpm(12)),
            target,
            spec(2, unclipped),
            spec(3, dynamic(0.5, 3.0)),
        ],
        4,
    )
    .unwrap();
    let d = f64::try_from(alone.get(0).f_sub(&batched.get(1)).unwrap().abs().max()).unwrap();
    assert!(d < 1e-4, "batched differs by {d}");
    let plain = sample(&model, &schedule, &[spec(9, SamplerConfig::ddpm(12))], 1).unwrap();
    assert!(!plain.equal(&alone), "the thresholding acts");
    let unit = sample(&model, &schedule, &[spec(9, dynamic(0.7, 1.0))], 1).unwrap();
    assert!(plain.equal(&unit), "max_value 1 is the static clamp");
}

/// Guidance rescale and the guidance interval are per sample: the same alone and batched
/// with samples without them. An interval that holds every step is no interval, bit for
/// bit; one that holds none is the conditional prediction alone (w = 1).
#[test]
fn guidance_rescale_and_interval_are_per_sample() {
    let model = Model::new(&micro_config(3), Device::Cpu).unwrap();
    let schedule = NoiseSchedule::new(ScheduleConfig::default(), Device::Cpu).unwrap();
    let spec = |seed, w, sampler| SampleSpec {
        label: Some(1),
        guidance_scale: w,
        seed,
        sampler,
    };
    let with = |rescale, interval| SamplerConfig {
        guidance_rescale: rescale,
        guidance_interval: interval,
        ..SamplerConfig::ddim(10)
    };
    let target = spec(4, 5.0, with(0.7, Some((200, 800))));
    let alone = sample(&model, &schedule, &[target], 1).unwrap();
    let batched = sample(
        &model,
        &schedule,
        &[
            spec(1, 3.0, SamplerConfig::ddpm(10)),
            target,
            spec(2, 5.0, with(0.0, Some((0, 500)))),
            spec(3, 2.0, with(1.0, None)),
        ],
        4,
    )
    .unwrap();
    let d = f64::try_from(alone.get(0).f_sub(&batched.get(1)).unwrap().abs().max()).unwrap();
    assert!(d < 1e-4, "batched differs by {d}");

    let plain = sample(&model, &schedule, &[spec(4, 5.0, with(0.0, None))], 1).unwrap();
    assert!(!plain.equal(&alone), "the options act");
    let everywhere = sample(
        &model,
        &schedule,
        &[spec(4, 5.0, with(0.0, Some((0, 999))))],
        1,
    )
    .unwrap();
    assert!(
        plain.equal(&everywhere),
        "an interval of every step is none"
    );
    let nowhere = sample(
        &model,
        &schedule,
        &[spec(4, 5.0, with(0.0, Some((0, 0))))],
        1,
    )
    .unwrap();
    let conditional = sample(&model, &schedule, &[spec(4, 1.0, with(0.0, None))], 1).unwrap();
    assert!(
        conditional.equal(&nowhere),
        "outside the interval: conditional only"
    );
    let rescaled_unguided = sample(&model, &schedule, &[spec(4, 1.0, with(0.8, None))], 1).unwrap();
    assert!(
        conditional.equal(&rescaled_unguided),
        "nothing to rescale without guidance"
    );
}
