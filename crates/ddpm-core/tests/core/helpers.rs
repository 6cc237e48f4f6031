//! Shared test parts: the reference files; the micro model, its colour dataset and
//! training loop come from `ddpm-testkit-model`.

use tch::{Kind, Tensor};

/// A file of `tests/reference/`.
pub fn reference_path(name: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/reference")
        .join(name)
}

/// A JSON file of `tests/reference/`.
pub fn reference_json(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(reference_path(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub use ddpm_testkit_model::{
    colour_dataset, exclusive_rng, micro_config, one_torch_thread, train, TrainSpec,
};

/// Mean of each channel per image: `[N, 3]` as rows.
pub fn channel_means(images: &Tensor) -> Vec<[f64; 3]> {
    let m = images.mean_dim([2i64, 3].as_slice(), false, Kind::Float);
    (0..m.size()[0])
        .map(|i| [0, 1, 2].map(|c| m.double_value(&[i, c])))
        .collect()
}
