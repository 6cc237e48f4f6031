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
    let store = env.store();
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
    let orphans: Vec<String> = store
        .run_keys(id)
        .await
        .expect("list the run's objects")
        .into_iter()
        .filter(|key| !named.contains(key))
        .collect();
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
