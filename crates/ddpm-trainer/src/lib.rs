//! # ddpm-trainer
//!
//! Trains class-conditional diffusion models (DDPM with classifier-free guidance and
//! EMA, on [`ddpm_core`]) from image folders, records every run in the registry
//! ([`ddpm_registry`]) and writes EMA checkpoints, training states and sample grids to
//! the checkpoint store. The `ddpm-trainer` binary is a thin shell around [`run`].
//!
//! A run is queued (`submit`) or created and run at once (`train`); a daemon claims
//! queued runs one at a time, heartbeats while it trains, and on start resumes runs that
//! were interrupted (SIGINT/SIGTERM save a state first) or whose heartbeat went stale
//! (a crash), from their newest state, continuing the step count and the metric series.
//!
//! ## Layout
//!
//! - [`cli`]: the command line (global options with env fallbacks, subcommands).
//! - [`config`]: run configs: TOML with presets (`tiny`, `seed`, `fast`), overrides, validation
//!   that names the field.
//! - [`dataset`]: image folders (classes from subfolders), decoding, the seed's
//!   augmentation, corrupt files skipped and counted.
//! - [`loader`]: batches decoded and augmented in parallel ahead of the step, as a
//!   deterministic function of (seed, position) so resumes replay the stream.
//! - [`demo`]: the generated demo dataset.
//! - [`train`]: the training loop on its own thread; checkpoints and sample grids.
//! - [`grid`]: the sample grid beside each EMA checkpoint.
//! - [`probe`]: a small classifier trained on a dataset, to score samples by class.
//! - [`quality`]: the held-out split and the score of every EMA checkpoint (class
//!   accuracy, Fréchet distance, KID, diversity in the probe's features).
//! - [`recorder`]: metric batching, checkpoint registration, retention, heartbeats.
//! - [`worker`]: queueing, executing and resuming runs; the daemon loop.
//! - [`history`]: `runs list` / `runs show`.
//! - `error`: [`TrainerError`], the one error type.

pub mod cli;
pub mod config;
pub mod dataset;
pub mod demo;
mod error;
pub mod grid;
pub mod history;
pub mod loader;
pub mod probe;
pub mod quality;
pub mod recorder;
pub mod train;
pub mod worker;

use std::future::Future;

use ddpm_core::DeviceChoice;
use ddpm_registry::{redact_password, CheckpointStore, Registry, RunStatus};
use ddpm_service::LogFormat;
use tokio_util::sync::CancellationToken;

pub use cli::{CheckpointsCommand, Cli, Command, GlobalOptions, RunsCommand};
pub use config::{Overrides, Preset, RunConfig};
pub use dataset::{DatasetSummary, ImageFolder, ImageSource};
pub use error::{Result, TrainerError};
pub use worker::{RunEnd, Worker};

/// Runs one command. `shutdown` resolving (SIGINT / SIGTERM in the binary) makes a
/// training run save its state, mark itself interrupted and return.
pub async fn run(cli: Cli, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
    let global = &cli.global;
    match &cli.command {
        Command::DemoData {
            out_dir,
            size,
            per_class,
            classes,
            seed,
        } => {
            let spec = demo::DemoSpec {
                size: *size,
                per_class: *per_class,
                classes: *classes,
                seed: *seed,
            };
            let dirs = demo::write_demo_dataset(out_dir, &spec)?;
            println!(
                "wrote {} classes × {} images of {size}×{size} px to {}",
                dirs.len(),
                per_class,
                out_dir.display()
            );
            return Ok(());
        }
        Command::Runs { command } => {
            let registry = connect(global).await?;
            let text = match command {
                RunsCommand::List { status, limit } => {
                    history::list(&registry, *status, *limit).await?
                }
                RunsCommand::Show { id } => history::show(&registry, *id).await?,
                RunsCommand::Cancel { id } => {
                    let run = registry.cancel_run(*id).await?;
                    match run.status {
                        RunStatus::Running => format!(
                            "run {id} is running: its worker saves a state and stops it \
                             at its next heartbeat\n"
                        ),
                        status => format!("run {id} is {status}\n"),
                    }
                }
                RunsCommand::Restart { id, from_scratch } => {
                    let store = CheckpointStore::new(global.common.checkpoint_dir())?;
                    let run = registry.restart_run(*id, *from_scratch, &store).await?;
                    match from_scratch {
                        true => format!("run {id} is queued again from step 0\n"),
                        false => format!(
                            "run {id} is {}: a daemon resumes it from step {}\n",
                            run.status, run.current_step
                        ),
                    }
                }
                RunsCommand::Delete { id } => {
                    let store = CheckpointStore::new(global.common.checkpoint_dir())?;
                    let run = registry.delete_run(*id, &store).await?;
                    format!("run {id} ({}) deleted with its checkpoints\n", run.status)
                }
            };
            print!("{text}");
            return Ok(());
        }
        Command::Checkpoints { command } => {
            let registry = connect(global).await?;
            print!(
                "{}",
                history::checkpoints_command(&registry, command).await?
            );
            return Ok(());
        }
        Command::Submit { config, overrides } => {
            let (_, new) = worker::resolve_new_run(config, overrides).await?;
            let registry = connect(global).await?;
            let run = registry.create_run(&new).await?;
            tracing::info!(id = run.id, steps = run.total_steps, "run queued");
            println!("{}", run.id);
            return Ok(());
        }
        Command::Train { .. } | Command::Daemon { .. } => {}
    }

    let token = CancellationToken::new();
    let on_signal = token.clone();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutdown requested: saving state and stopping");
        on_signal.cancel();
    });
    ddpm_core::set_cpu_threads(global.common.torch_threads);
    let device = global.common.device.parse::<DeviceChoice>()?.resolve()?;
    let host = global.host_name.clone().unwrap_or_else(|| {
        hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "unknown-host".into())
    });
    let worker = Worker {
        registry: connect(global).await?,
        store: CheckpointStore::new(global.common.checkpoint_dir())?,
        device,
        name: worker_name(&host, std::process::id()),
        heartbeat_interval: global.heartbeat_interval,
        retry_backoff: global.retry_backoff,
        max_crashes: global.max_crashes,
        progress: train::stderr_is_terminal() && global.common.log_format == LogFormat::Pretty,
        shutdown: token,
    };
    tracing::info!(
        database_url = %redact_password(&global.common.database_url()),
        checkpoint_dir = %global.common.checkpoint_dir().display(),
        device = ?device,
        worker = %worker.name,
        heartbeat_interval = ?global.heartbeat_interval,
        "ddpm-trainer starting"
    );
    match &cli.command {
        Command::Train { config, overrides } => {
            let (_, new) = worker::resolve_new_run(config, overrides).await?;
            let run = worker.registry.create_run(&new).await?;
            tracing::info!(id = run.id, "run created");
            match worker.train_own(run.id).await? {
                RunEnd::Completed | RunEnd::Interrupted | RunEnd::Cancelled => Ok(()),
                RunEnd::Deferred(message) => Err(TrainerError::Run {
                    id: run.id,
                    message: format!("deferred, a daemon retries it: {message}"),
                }),
                RunEnd::Failed(message) => Err(TrainerError::Run {
                    id: run.id,
                    message,
                }),
                RunEnd::Lost => Err(TrainerError::Run {
                    id: run.id,
                    message: "taken over by another worker".into(),
                }),
            }
        }
        Command::Daemon {
            once,
            poll_interval,
            stale_after,
        } => worker.daemon(*poll_interval, *stale_after, *once).await,
        _ => Ok(()),
    }
}

async fn connect(global: &GlobalOptions) -> Result<Registry> {
    Ok(Registry::connect(&global.common.database_url()).await?)
}

/// A worker's identity in the registry: `host:pid:instance`. The pid alone does not tell
/// two containers apart (each is pid 1 in its own), so a random instance id is appended.
fn worker_name(host: &str, pid: u32) -> String {
    format!("{host}:{pid}:{:08x}", rand::random::<u32>())
}

#[cfg(test)]
mod tests {
    #[test]
    fn workers_with_the_same_host_and_pid_have_different_names() {
        let (a, b) = (
            super::worker_name("trainer", 1),
            super::worker_name("trainer", 1),
        );
        assert!(
            a.starts_with("trainer:1:") && b.starts_with("trainer:1:"),
            "{a} {b}"
        );
        assert_ne!(a, b);
    }
}
