//! The commands that start a [`Worker`] and run attempts: `train` (one run, in the
//! foreground) and `daemon` (claiming runs until the queue is empty or shutdown).

use std::{future::Future, path::Path, time::Duration};

use crate::{
    attempt::{Attempt, RunEnd},
    cli::GlobalOptions,
    config::Overrides,
    error::{Result, TrainerError},
    resolve,
    worker::Worker,
};

/// `train`: creates the run a config file describes, claims it ahead of older queued
/// runs (which stay for the daemons) and executes it here. A run that did not end
/// completed, interrupted or cancelled is an error.
pub async fn train(
    global: &GlobalOptions,
    config: &Path,
    overrides: &Overrides,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let worker = Worker::start(global, shutdown).await?;
    let new = resolve::new_run(config, overrides).await?;
    let id = worker.registry.create_run(&new).await?.id;
    tracing::info!(id, "run created");
    let Some(run) = worker.registry.claim_run(id, &worker.name).await? else {
        return Err(TrainerError::Run {
            id,
            message: "was claimed by another trainer before this one".into(),
        });
    };
    let message = match Attempt::execute(&worker, run).await? {
        RunEnd::Completed | RunEnd::Interrupted | RunEnd::Cancelled => return Ok(()),
        RunEnd::Deferred(message) => format!("deferred, a daemon retries it: {message}"),
        RunEnd::Failed(message) => message,
        RunEnd::Lost => "taken over by another worker".into(),
    };
    Err(TrainerError::Run { id, message })
}

/// `daemon`: claims and executes runs until the queue is empty (`once`) or shutdown,
/// each time the one that has waited longest to be tried: queued, interrupted,
/// deferred (after its retry time) or running with a stale heartbeat (its worker died).
pub async fn daemon(
    global: &GlobalOptions,
    poll_interval: Duration,
    stale_after: Duration,
    once: bool,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let worker = Worker::start(global, shutdown).await?;
    tracing::info!(worker = %worker.name, ?poll_interval, ?stale_after, once, "daemon started");
    while !worker.shutdown.is_cancelled() {
        let claimed = worker.registry.claim_next(&worker.name, stale_after).await;
        match claimed {
            Ok(Some(run)) => match Attempt::execute(&worker, run).await {
                // The next run is claimed at once; only an empty queue waits.
                Ok(_) => continue,
                Err(e) if once => return Err(e),
                Err(e) => tracing::error!(error = %e, "recording a run's end failed"),
            },
            Ok(None) if once => {
                tracing::info!("queue empty: exiting (--once)");
                break;
            }
            Ok(None) => {}
            Err(e) if once => return Err(e.into()),
            Err(e) => tracing::error!(error = %e, "claiming a run failed; retrying"),
        }
        if !once {
            tokio::select! {
                _ = tokio::time::sleep(poll_interval) => {}
                _ = worker.shutdown.cancelled() => {}
            }
        }
    }
    tracing::info!("daemon stopped");
    Ok(())
}
