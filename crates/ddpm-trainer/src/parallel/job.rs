//! What rank 0 tells the other ranks through the rendezvous store: the run, its config
//! and the exact training items (after the quality hold-out), so every rank builds the
//! same model and reads the same data stream without a registry connection or a
//! dataset scan of its own.

use serde::{Deserialize, Serialize};

use crate::{
    config::RunConfig,
    dataset::Item,
    error::{Result, TrainerError},
};

/// The store key the job is published under (in the attempt's namespace).
pub const KEY: &str = "job";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankJob {
    pub run_id: i64,
    pub config: RunConfig,
    pub class_names: Vec<String>,
    /// The training items, in rank 0's order.
    pub items: Vec<Item>,
}

impl RankJob {
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self)
            .map_err(|e| TrainerError::Rank(format!("cannot encode the rank job: {e}")))
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<RankJob> {
        serde_json::from_slice(bytes).map_err(|e| {
            TrainerError::Rank(format!(
                "rank 0 published a job this rank cannot read (another ddpm version?): {e}"
            ))
        })
    }
}
