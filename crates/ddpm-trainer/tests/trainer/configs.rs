//! Bad configs are rejected before anything starts, with the field named.

use std::process::Command;

use ddpm_trainer::demo::{write_demo_dataset, DemoSpec};

use crate::helpers::micro_config;

fn submit(dir: &std::path::Path, text: &str) -> (bool, String) {
    let path = dir.join("bad.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ddpm-trainer"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("submit")
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_configs_are_rejected_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let dataset = dir.path().join("dataset");
    write_demo_dataset(
        &dataset,
        &DemoSpec {
            size: 8,
            per_class: 2,
            classes: 2,
            seed: 0,
        },
    )
    .unwrap();
    let good = micro_config(&dataset, 10, 5, 5);
    let cases: Vec<(String, &str)> = vec![
        (
            good.replace(
                &format!("{:?}", dataset.display().to_string()),
                "\"/nonexistent/ddpm-data\"",
            ),
            "dataset.path",
        ),
        (
            good.replace("image_size = 8", "image_size = 9"),
            "model.image_size",
        ),
        (
            good.replace("preset = \"tiny\"", "preset = \"huge\""),
            "preset",
        ),
        (good.replace("lr = 1e-3", "lr = -1.0"), "training.lr"),
        (
            good.replace("lr = 1e-3", "learning_rate = 1e-3"),
            "learning_rate",
        ),
        (
            good.replace("attention_heads = 2", "attention_heads = 3"),
            "model.attention_heads",
        ),
        (
            good.replace("steps = 10\n", "steps = 0\n"),
            "training.steps",
        ),
        (format!("{good}\n[optimizer]\nbeta1 = 0.9\n"), "optimizer"),
    ];
    for (text, field) in cases {
        let (ok, stderr) = submit(dir.path(), &text);
        assert!(!ok, "accepted a config with a bad {field}");
        assert!(
            stderr.contains(field),
            "the error does not name {field}:\n{stderr}"
        );
    }
    // Nothing was queued (or even connected to) for any of them.
    assert!(!dir.path().join("data/registry.db").exists());
    let (ok, stderr) = submit(dir.path(), &good);
    assert!(ok, "{stderr}");

    // An empty dataset is a clear error too.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let (ok, stderr) = submit(dir.path(), &micro_config(&empty, 10, 5, 5));
    assert!(!ok && stderr.contains("no readable images"), "{stderr}");
}
