//! Initialisation against PyTorch's (`tests/reference/init_stats.json`, written by
//! `make_training_reference.py`): for the seed and tiny presets, every parameter follows
//! the rule of the PyTorch module that owns it (uniform with its bound, normal, or a
//! constant), and its standard deviation matches PyTorch's draw within sampling error.

use std::collections::BTreeMap;

use ddpm_core::{Model, UNetConfig};
use serde_json::Value;
use tch::{Device, Kind};

use crate::helpers::{exclusive_rng, one_torch_thread, reference_json};

/// Standard error of a sample standard deviation over `n` draws, as a multiple of σ:
/// √((κ − 1) / 4n) with kurtosis κ = 1.8 for a uniform and 3 for a normal distribution.
fn std_error(kind: &str, n: f64) -> f64 {
    let kurtosis = if kind == "uniform" { 1.8 } else { 3.0 };
    ((kurtosis - 1.0) / (4.0 * n)).sqrt()
}

fn check_preset(name: &str, config: UNetConfig) {
    let stats = reference_json("init_stats.json");
    let expected: Vec<Value> = stats["configs"][name].as_array().unwrap().clone();
    let _rng = exclusive_rng();
    tch::manual_seed(0);
    let model = Model::new(&config, Device::Cpu).unwrap();
    let vars: BTreeMap<String, tch::Tensor> = model.named_variables().into_iter().collect();
    assert_eq!(vars.len(), expected.len(), "{name}: parameter count");
    for e in &expected {
        let pname = e["name"].as_str().unwrap();
        let var = vars
            .get(pname)
            .unwrap_or_else(|| panic!("{name}: no variable {pname}"));
        let x = var.to_kind(Kind::Double);
        let n = x.numel() as f64;
        let mean = x.mean(Kind::Double).double_value(&[]);
        let std = x.std(false).double_value(&[]);
        let absmax = x.abs().max().double_value(&[]);
        let kind = e["kind"].as_str().unwrap();
        let what = format!("{name} {pname} ({kind}, n = {n})");
        match kind {
            "const" => {
                let value = e["value"].as_f64().unwrap();
                assert!(
                    std == 0.0 && mean == value,
                    "{what}: mean {mean} std {std}, PyTorch: constant {value}"
                );
            }
            "uniform" | "normal" => {
                let sigma = if kind == "uniform" {
                    let bound = e["bound"].as_f64().unwrap();
                    // Inside the bound, and not a constant (tch leaves conv biases at 0).
                    assert!(
                        absmax <= bound * (1.0 + 1e-6) && absmax > 0.0,
                        "{what}: |x| up to {absmax}, PyTorch's bound is {bound}"
                    );
                    bound / 3f64.sqrt()
                } else {
                    e["std"].as_f64().unwrap()
                };
                // Ours and PyTorch's are two independent draws of the same distribution:
                // their standard deviations differ by √2·SE at one sigma; allow 5.
                let torch_std = e["std"].as_f64().unwrap();
                let se = std_error(kind, n) * sigma;
                let tol = 5.0 * std::f64::consts::SQRT_2 * se;
                assert!(
                    (std - torch_std).abs() <= tol,
                    "{what}: std {std:.5}, PyTorch's draw {torch_std:.5} (tolerance {tol:.5})"
                );
                let mean_tol = 5.0 * sigma / n.sqrt();
                assert!(
                    mean.abs() <= mean_tol,
                    "{what}: mean {mean} (tolerance {mean_tol})"
                );
            }
            other => panic!("{what}: unknown rule {other}"),
        }
    }
}

#[test]
fn seed_preset_initialises_like_pytorch() {
    one_torch_thread();
    check_preset("seed", UNetConfig::seed(Some(10)));
}

#[test]
fn tiny_preset_initialises_like_pytorch() {
    one_torch_thread();
    check_preset("tiny", UNetConfig::tiny(Some(3)));
}

#[test]
fn reference_configs_are_the_presets() {
    let stats = reference_json("init_stats.json");
    for (name, config) in [
        ("seed", UNetConfig::seed(Some(10))),
        ("tiny", UNetConfig::tiny(Some(3))),
    ] {
        let theirs = &stats["preset_configs"][name];
        let ours = serde_json::to_value(&config).unwrap();
        for (key, value) in theirs.as_object().unwrap() {
            assert_eq!(&ours[key], value, "{name}.{key}");
        }
    }
}
