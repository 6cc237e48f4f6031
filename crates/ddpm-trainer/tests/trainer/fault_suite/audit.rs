//! What must hold after any sequence of faults: the metric series is exactly the
//! uninterrupted one's steps, every registered checkpoint verifies and loads, and files
//! and rows match one to one.

use std::collections::BTreeSet;
use std::path::Path;

use ddpm_registry::{CheckpointKind, CheckpointStore};

use crate::helpers::{expected_steps, TestEnv};

/// The audit's findings; all zero for a run that lost nothing.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Audit {
    /// Expected log steps without a row.
    pub lost_rows: usize,
    /// Rows at steps an uninterrupted run does not log (duplicates cannot exist: the
    /// key is (run, step)).
    pub extra_rows: usize,
    /// Files in the run's folder that no row names (temp files included).
    pub orphan_files: usize,
    /// Rows whose file is missing, or does not match its size and SHA-256, or does not load.
    pub broken_checkpoints: usize,
}

pub async fn audit(env: &TestEnv, id: i64, total: i64, log_every: i64) -> Audit {
    let expected: BTreeSet<i64> = expected_steps(total, log_every).into_iter().collect();
    let present: BTreeSet<i64> = env.metric_steps(id).await.into_iter().collect();
    let store = CheckpointStore::new(&env.checkpoints).unwrap();
    let records = env.registry.list_checkpoints(id).await.unwrap();
    let mut named = BTreeSet::new();
    let mut broken = 0;
    for record in &records {
        named.insert(record.path.clone());
        let loads = match store.open(record) {
            Ok(bytes) if record.kind == CheckpointKind::Ema => {
                named.insert(
                    CheckpointStore::grid_path_for(Path::new(&record.path))
                        .to_string_lossy()
                        .into_owned(),
                );
                let name = Path::new(&record.path);
                ddpm_core::checkpoint::load_checkpoint_bytes(name, &bytes, tch::Device::Cpu).is_ok()
            }
            Ok(_) => true,
            Err(e) => {
                eprintln!("checkpoint {}: {e}", record.path);
                false
            }
        };
        broken += usize::from(!loads);
    }
    let dir = env.checkpoints.join(format!("runs/{id}"));
    let orphans: Vec<String> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .map(|e| format!("runs/{id}/{}", e.unwrap().file_name().to_string_lossy()))
                .filter(|rel| !named.contains(rel))
                .collect()
        })
        .unwrap_or_default();
    if !orphans.is_empty() {
        eprintln!("files without a row: {orphans:?}");
    }
    Audit {
        lost_rows: expected.difference(&present).count(),
        extra_rows: present.difference(&expected).count(),
        orphan_files: orphans.len(),
        broken_checkpoints: broken,
    }
}

/// The tensors of the final EMA checkpoints of two runs are bit for bit the same.
pub async fn same_final_weights(env: &TestEnv, a: i64, b: i64) -> bool {
    let store = CheckpointStore::new(&env.checkpoints).unwrap();
    let mut tensors = Vec::new();
    for id in [a, b] {
        let newest = env
            .registry
            .newest_checkpoint(Some(id), CheckpointKind::Ema)
            .await
            .unwrap()
            .expect("a final EMA checkpoint");
        store.open(&newest).expect("the file matches its row");
        let path = env.checkpoints.join(&newest.path);
        let mut named = tch::Tensor::read_safetensors(path).unwrap();
        named.sort_by(|x, y| x.0.cmp(&y.0));
        tensors.push(named);
    }
    let (x, y) = (&tensors[0], &tensors[1]);
    x.len() == y.len()
        && x.iter()
            .zip(y)
            .all(|((na, ta), (nb, tb))| na == nb && ta.equal(tb))
}
