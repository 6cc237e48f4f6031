//! End to end: a tiny conditional model learns three colour classes, and guided samples of
//! each class, from both samplers, have that class's colour as their brightest channel.

use ddpm_core::{sampler::sample, SampleSpec, SamplerConfig};

use crate::helpers::{channel_means, colour_dataset, micro_config, train, TrainSpec};

#[test]
fn tiny_model_learns_colour_classes_and_guided_samples_show_them() {
    let (images, labels) = colour_dataset(3, 64, 8);
    let spec = TrainSpec {
        steps: 1500,
        batch: 32,
        lr: 2e-3,
        seed: 0,
    };
    let trained = train(&micro_config(3), &images, &labels, &spec);
    let first: f64 = trained.losses[..50].iter().sum::<f64>() / 50.0;
    let last: f64 = trained.losses[trained.losses.len() - 50..]
        .iter()
        .sum::<f64>()
        / 50.0;
    assert!(
        last < first * 0.5,
        "loss did not fall enough: {first:.4} → {last:.4}"
    );

    let model = trained.ema.model();
    for sampler in [SamplerConfig::ddim(50), SamplerConfig::ddpm(1000)] {
        let specs: Vec<SampleSpec> = (0..3)
            .flat_map(|c| {
                (0..4).map(move |k| SampleSpec {
                    label: Some(c),
                    guidance_scale: 3.0,
                    seed: 100 + 10 * c as u64 + k,
                    sampler,
                })
            })
            .collect();
        let out = sample(model, &trained.schedule, &specs, 16).unwrap();
        assert_eq!(out.size(), [12, 3, 8, 8]);
        let means = channel_means(&out);
        // Every class's average image has that class's colour, clearly.
        for class in 0..3 {
            let avg: Vec<f64> = (0..3)
                .map(|ch| {
                    means[class * 4..class * 4 + 4]
                        .iter()
                        .map(|m| m[ch])
                        .sum::<f64>()
                        / 4.0
                })
                .collect();
            let others = (0..3)
                .filter(|&c| c != class)
                .map(|c| avg[c])
                .fold(f64::MIN, f64::max);
            assert!(
                avg[class] - others > 0.5,
                "{:?} class {class}: average channel means {avg:?}",
                sampler.kind
            );
        }
        // And (nearly) every single image has its class's channel as its brightest.
        let right = means
            .iter()
            .enumerate()
            .filter(|(i, m)| (0..3).max_by(|&a, &b| m[a].total_cmp(&m[b])) == Some(i / 4))
            .count();
        assert!(
            right >= 11,
            "{:?}: only {right}/12 samples show their class: {means:?}",
            sampler.kind
        );
    }
}
