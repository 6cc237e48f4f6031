//! A foreground `train` records the run, its metric series and its checkpoints; the
//! EMA checkpoint loads in ddpm-core; corrupt images are skipped and counted, and so are
//! oversized images and symbolic-link loops.

use std::{path::Path, time::Duration};

use ddpm_core::checkpoint::load_checkpoint_bytes;
use ddpm_registry::{CheckpointKind, CheckpointStore, RunStatus};
use ddpm_testkit::both_backends;
use tch::Device;

use crate::helpers::{expected_steps, micro_config, TestEnv};

const LIMIT: Duration = Duration::from_secs(240);

async fn train_records_the_run_its_metrics_and_checkpoints(env: TestEnv) {
    let config = env.write_config("run.toml", &micro_config(&env.dataset, 60, 10, 25));
    let status = env
        .run_to_end("train", &["train", config.to_str().unwrap()], LIMIT)
        .await;
    assert!(status.success(), "train failed:\n{}", env.log("train"));

    let runs = env.registry.list_runs(None, 10, 0).await.unwrap();
    assert_eq!(runs.len(), 1);
    let run = &runs[0];
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!(
        (run.current_step, run.total_steps, run.attempts),
        (60, 60, 1)
    );
    assert_eq!(run.config["training"]["steps"], 60);
    assert_eq!(run.config["model"]["num_classes"], 3);
    assert_eq!(run.dataset["image_count"], 36);
    assert_eq!(
        run.dataset["class_names"],
        serde_json::json!(["circle", "square", "stripes"])
    );

    let metrics = env.metrics(run.id).await;
    assert_eq!(
        metrics.iter().map(|p| p.step).collect::<Vec<_>>(),
        expected_steps(60, 10)
    );
    for p in &metrics {
        assert!(p.loss.is_finite() && p.loss > 0.0, "{p:?}");
        assert!(
            p.learning_rate > 0.0 && p.grad_norm.is_some() && p.images_per_sec.is_some(),
            "{p:?}"
        );
    }
    assert_eq!(
        metrics[0].learning_rate, 1e-3,
        "warm-up (10 steps) is over at step 10"
    );

    // Checkpoints at 25, 50 and the end (60); keep_last = 2 of each kind.
    let checkpoints = env.registry.list_checkpoints(run.id).await.unwrap();
    let steps = |kind| {
        checkpoints
            .iter()
            .filter(|c| c.kind == kind)
            .map(|c| c.step)
            .collect::<Vec<_>>()
    };
    assert_eq!(steps(CheckpointKind::Ema), [50, 60]);
    assert_eq!(steps(CheckpointKind::State), [50, 60]);
    let store = CheckpointStore::new(&env.checkpoints).unwrap();
    let newest = env
        .registry
        .newest_checkpoint(Some(run.id), CheckpointKind::Ema)
        .await
        .unwrap()
        .unwrap();
    let path = Path::new(&newest.path);
    let bytes = store
        .open(&newest)
        .expect("the registered checksum matches the file");
    let grid = store
        .read(&CheckpointStore::grid_path_for(path))
        .expect("the grid beside the checkpoint");
    let grid = image::load_from_memory(&grid).expect("the grid is an image");
    assert_eq!(
        (grid.width(), grid.height()),
        (2 + 2 * 10, 2 + 3 * 10),
        "one row per class"
    );
    // Retention deleted step 25's files and grid; what is left is what rows name, each
    // key carrying its content's hash.
    let mut keys = store.run_keys(run.id).await.unwrap();
    keys.sort();
    let mut named: Vec<String> = checkpoints
        .iter()
        .flat_map(|c| {
            let grid = CheckpointStore::grid_path_for(Path::new(&c.path));
            let mut keys = vec![c.path.clone()];
            if c.kind == CheckpointKind::Ema {
                keys.push(grid.to_string_lossy().into_owned());
            }
            keys
        })
        .collect();
    named.sort();
    assert_eq!(keys, named, "retention deletes files and their grids");
    for c in &checkpoints {
        assert!(
            c.path
                .ends_with(&format!("-{}.safetensors", &c.sha256[..12])),
            "{}",
            c.path
        );
    }

    let loaded = load_checkpoint_bytes(path, &bytes, Device::Cpu)
        .expect("the EMA checkpoint loads in ddpm-core");
    assert_eq!(loaded.manifest.step, 60);
    assert_eq!(loaded.manifest.run_id, Some(run.id));
    assert_eq!(loaded.manifest.class_names, ["circle", "square", "stripes"]);
    assert_eq!(loaded.manifest.model.image_size, 8);

    // History as the CLI prints it.
    let out = env.trainer(&["runs", "list"]).output().unwrap();
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && list.contains("completed") && list.contains("60/60"),
        "{list}"
    );
    let out = env
        .trainer(&["runs", "show", &run.id.to_string()])
        .output()
        .unwrap();
    let show = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "run 1: completed",
        "6 rows, steps 10..60",
        "curve",
        "by t:",
        "ema-00000060-",
        "\"lr\"",
    ] {
        assert!(show.contains(needle), "runs show lacks {needle:?}:\n{show}");
    }
    let out = env.trainer(&["runs", "show", "99"]).output().unwrap();
    assert!(!out.status.success());
}

async fn corrupt_images_are_skipped_counted_and_reported(env: TestEnv) {
    std::fs::write(env.dataset.join("circle/garbage.png"), b"this is not a png").unwrap();
    let good = std::fs::read(env.dataset.join("square/0000.png")).unwrap();
    // A PNG whose header is intact but whose pixel data is cut off: found while decoding.
    std::fs::write(
        env.dataset.join("square/truncated.png"),
        &good[..good.len() / 2],
    )
    .unwrap();
    std::fs::write(env.dataset.join("stripes/empty.jpg"), b"").unwrap();
    let config = env.write_config("run.toml", &micro_config(&env.dataset, 20, 10, 20));
    let status = env
        .run_to_end("train", &["train", config.to_str().unwrap()], LIMIT)
        .await;
    assert!(status.success(), "train failed:\n{}", env.log("train"));
    let run = env.registry.list_runs(None, 1, 0).await.unwrap().remove(0);
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!(run.dataset["skipped_count"], 2, "{}", run.dataset);
    assert_eq!(run.dataset["image_count"], 37);
    let log = env.log("train");
    assert!(
        log.contains("garbage.png") && log.contains("skipping unreadable image"),
        "{log}"
    );
    assert!(
        log.contains("truncated.png") && log.contains("skipping corrupt image"),
        "{log}"
    );
}

/// Issue 10's fault injection: a dataset with an oversized image and a symlink loop
/// trains, and counts them; a thin image within the limit trains too.
#[cfg(unix)]
async fn oversized_images_and_symlink_loops_are_skipped_and_counted(env: TestEnv) {
    // 1 000 000 pixels in a PNG of a few KB: over this run's limit of 500 000.
    image::GrayImage::new(1_000_000, 1)
        .save(env.dataset.join("circle/huge.png"))
        .unwrap();
    // 1 × 50 000: within the limit; trained on, its center cut to 1 × 2 before the resize.
    image::GrayImage::from_pixel(1, 50_000, image::Luma([255]))
        .save(env.dataset.join("square/thin.png"))
        .unwrap();
    // A class folder's subfolder that is the dataset root again.
    std::os::unix::fs::symlink("..", env.dataset.join("stripes/loop")).unwrap();
    let text = micro_config(&env.dataset, 20, 10, 20)
        .replace("cache = true", "cache = true\nmax_pixels = 500_000");
    let config = env.write_config("run.toml", &text);
    let status = env
        .run_to_end("train", &["train", config.to_str().unwrap()], LIMIT)
        .await;
    assert!(status.success(), "train failed:\n{}", env.log("train"));
    let run = env.registry.list_runs(None, 1, 0).await.unwrap().remove(0);
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!(run.current_step, 20);
    assert_eq!(run.dataset["skipped_count"], 2, "{}", run.dataset);
    assert_eq!(run.dataset["image_count"], 37, "{}", run.dataset);
    assert_eq!(run.dataset["class_counts"], serde_json::json!([12, 13, 12]));
    let skipped = run.dataset["skipped"].as_array().unwrap();
    let listed = |end: &str, says: &str| {
        skipped.iter().any(|s| {
            s["path"].as_str().unwrap().ends_with(end)
                && s["reason"].as_str().unwrap().contains(says)
        })
    };
    assert!(listed("stripes/loop", "symbolic-link loop"), "{skipped:?}");
    assert!(listed("circle/huge.png", "max_pixels"), "{skipped:?}");
    let log = env.log("train");
    assert!(log.contains("skipping a folder"), "{log}");
    assert!(!log.contains("skipping corrupt image"), "{log}");
}

both_backends!(crate::helpers::with_env; train_records_the_run_its_metrics_and_checkpoints);

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_images_and_symlink_loops_are_skipped() {
    crate::helpers::with_env(
        crate::helpers::Db::Sqlite,
        oversized_images_and_symlink_loops_are_skipped_and_counted,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_images_are_skipped() {
    crate::helpers::with_env(
        crate::helpers::Db::Sqlite,
        corrupt_images_are_skipped_counted_and_reported,
    )
    .await;
}
