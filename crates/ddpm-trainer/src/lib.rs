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
//! - [`worker`]: a trainer process as the registry knows it (name, connections, device,
//!   settings).
//! - [`attempt`]: one attempt at a claimed run, with one owner: its heartbeat, recorder
//!   and training part started and stopped, its ending decided once and recorded.
//! - [`lease`]: an attempt's hold on its lease: heartbeats, the check before a
//!   checkpoint, the one flag a lost lease sets.
//! - [`recorder`]: metric batching, checkpoint registration, retention.
//! - [`resolve`]: a run's config and dataset, resolved (new from a file, claimed from its
//!   registry row).
//! - `commands`: one function per CLI command.
//! - [`history`]: `runs list` / `runs show`.
//! - `error`: [`TrainerError`], the one error type.

pub mod attempt;
pub mod cli;
mod commands;
pub mod config;
pub mod dataset;
pub mod demo;
mod error;
pub mod grid;
pub mod history;
pub mod lease;
pub mod loader;
pub mod parallel;
pub mod probe;
pub mod quality;
pub mod recorder;
pub mod resolve;
pub mod train;
pub mod worker;

use std::future::Future;

pub use attempt::RunEnd;
pub use cli::{CheckpointsCommand, Cli, Command, GlobalOptions, RunsCommand};
pub use config::{Overrides, Preset, RunConfig};
pub use dataset::{DatasetSummary, ImageFolder, ImageSource};
pub use error::{Result, TrainerError};
pub use worker::Worker;

/// Runs one command. `shutdown` resolving (SIGINT / SIGTERM in the binary) makes a
/// training run save its state, mark itself interrupted and return.
pub async fn run(cli: Cli, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
    let Cli { global, command } = cli;
    let global = &global;
    match command {
        Command::DemoData {
            out_dir,
            size,
            per_class,
            classes,
            seed,
        } => {
            let spec = demo::DemoSpec {
                size,
                per_class,
                classes,
                seed,
            };
            commands::demo_data(&out_dir, &spec)
        }
        Command::Train {
            config,
            overrides,
            nproc_per_node,
            launch_id,
        } => {
            let launch = commands::TrainLaunch {
                nproc_per_node,
                launch_id,
            };
            commands::train(global, &config, &overrides, launch, shutdown).await
        }
        Command::Submit { config, overrides } => {
            commands::submit(global, &config, &overrides).await
        }
        Command::Daemon {
            once,
            poll_interval,
            stale_after,
            nproc_per_node,
        } => {
            let settings = commands::DaemonSettings {
                poll_interval,
                stale_after,
                once,
                nproc_per_node,
            };
            commands::daemon(global, &settings, shutdown).await
        }
        Command::Rank => commands::rank(global, shutdown).await,
        Command::Runs { command } => match command {
            RunsCommand::List { status, limit } => commands::runs_list(global, status, limit).await,
            RunsCommand::Show { id } => commands::runs_show(global, id).await,
            RunsCommand::Cancel { id } => commands::runs_cancel(global, id).await,
            RunsCommand::Restart { id, from_scratch } => {
                commands::runs_restart(global, id, from_scratch).await
            }
            RunsCommand::Delete { id } => commands::runs_delete(global, id).await,
        },
        Command::Checkpoints { command } => commands::checkpoints(global, &command).await,
    }
}
