//! A run's config and dataset, resolved: a new run from a config file and overrides
//! (what `submit` queues and `train` runs), and a claimed run from its registry row,
//! checked against its dataset as it was queued.

use std::path::Path;

use ddpm_registry::{NewRun, Run};

use crate::{
    config::{DatasetConfig, Overrides, RunConfig},
    dataset::{DatasetSummary, ImageFolder},
    error::{Result, TrainerError},
};

/// Scans a dataset off the async threads.
async fn scan(dataset: &DatasetConfig) -> Result<ImageFolder> {
    let (path, limits) = (dataset.path.clone(), dataset.image_limits());
    tokio::task::spawn_blocking(move || ImageFolder::scan(&path, limits))
        .await
        .map_err(|e| TrainerError::Thread(e.to_string()))?
}

/// Reads, overrides and validates a run config and its dataset: what `submit` queues
/// and `train` runs. The dataset path becomes absolute so any worker finds it.
pub async fn new_run(config_path: &Path, overrides: &Overrides) -> Result<NewRun> {
    let mut config = RunConfig::from_file(config_path, overrides)?;
    if config.dataset.path.is_relative() && !config.dataset.path.as_os_str().is_empty() {
        config.dataset.path = std::path::absolute(&config.dataset.path)
            .map_err(TrainerError::io(&config.dataset.path))?;
    }
    config.validate()?;
    let folder = scan(&config.dataset).await?;
    config.model.num_classes = folder.num_classes();
    config.validate()?;
    let summary = folder.summary();
    tracing::info!(
        path = %summary.path.display(),
        images = summary.image_count,
        classes = ?summary.class_names,
        skipped = summary.skipped_count,
        "dataset scanned"
    );
    Ok(NewRun {
        config: serde_json::to_value(&config)
            .map_err(|e| TrainerError::config("config", e.to_string()))?,
        dataset: serde_json::to_value(&summary)
            .map_err(|e| TrainerError::config("dataset", e.to_string()))?,
        total_steps: config.training.steps,
    })
}

/// A claimed run's config, and its dataset scanned again and checked against what was
/// queued (the same classes).
pub async fn claimed_run(run: &Run) -> Result<(RunConfig, ImageFolder)> {
    let bad = |m: String| TrainerError::Run {
        id: run.id,
        message: m,
    };
    let config: RunConfig = serde_json::from_value(run.config.clone())
        .map_err(|e| bad(format!("unreadable config: {e}")))?;
    config.validate()?;
    let queued: Option<DatasetSummary> = serde_json::from_value(run.dataset.clone()).ok();
    let folder = scan(&config.dataset).await?;
    if folder.num_classes() != config.model.num_classes {
        return Err(bad(format!(
            "the dataset now has {:?} classes, the run was queued with {:?}",
            folder.num_classes(),
            config.model.num_classes
        )));
    }
    if let Some(q) = queued {
        if q.class_names != folder.class_names {
            return Err(bad(format!(
                "the dataset's classes changed since the run was queued: {:?} → {:?}",
                q.class_names, folder.class_names
            )));
        }
    }
    Ok((config, folder))
}
