//! The command line: global options (each with an environment fallback) and the
//! subcommands.

use std::{path::PathBuf, time::Duration};

use clap::{Parser, Subcommand};
use ddpm_registry::RunStatus;
use ddpm_service::{parse_duration, CommonOptions};

use crate::config::Overrides;

/// Trains class-conditional diffusion models (DDPM + classifier-free guidance + EMA)
/// from image folders, records runs in the registry and writes EMA checkpoints.
#[derive(Debug, Clone, Parser)]
#[command(name = "ddpm-trainer", version, about, long_about = None)]
// The shared options keep the device as a name (ddpm-service links no libtorch): check it
// here, when the command line is parsed.
#[command(mut_arg("device", |arg| arg.value_parser(ddpm_core::device_arg)))]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalOptions,
    #[command(subcommand)]
    pub command: Command,
}

/// The options every subcommand takes: the ones the server shares, and the worker's own.
#[derive(Debug, Clone, clap::Args)]
pub struct GlobalOptions {
    #[command(flatten)]
    pub common: CommonOptions,
    /// This machine's name in the registry (the process id and a random instance id are
    /// appended) [default: the hostname].
    #[arg(long, env = "DDPM_HOST_NAME", global = true)]
    pub host_name: Option<String>,
    /// How often a training worker tells the registry it is alive.
    #[arg(long, env = "DDPM_HEARTBEAT_INTERVAL", default_value = "10s", value_parser = parse_duration, global = true)]
    pub heartbeat_interval: Duration,
    /// The first delay before a run that failed for a reason that may pass (a full disk,
    /// a store or dataset not mounted, the database away) is tried again; it doubles
    /// with each attempt, up to 64×.
    #[arg(long, env = "DDPM_RETRY_BACKOFF", default_value = "30s", value_parser = parse_duration, global = true)]
    pub retry_backoff: Duration,
    /// A run whose workers stopped heartbeating (a crash, an out-of-memory kill) more than
    /// this many times fails when next taken over, instead of being trained again.
    #[arg(long, env = "DDPM_MAX_CRASHES", default_value_t = 3, value_parser = clap::value_parser!(i64).range(1..), global = true)]
    pub max_crashes: i64,
    /// How long a data-parallel rank waits for the others: to reach the rendezvous store
    /// and meet at start, and at each step for the slowest (a rank that dies is noticed
    /// at once; this bounds one that hangs or never comes).
    #[arg(long, env = "DDPM_RANK_TIMEOUT", default_value = "60s", value_parser = parse_duration, global = true)]
    pub rank_timeout: Duration,
}

/// How many ranks `--nproc-per-node` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NprocPerNode {
    /// One per visible GPU (one rank on a host without).
    Auto,
    Count(usize),
}

impl std::str::FromStr for NprocPerNode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "auto" => Ok(NprocPerNode::Auto),
            n => match n.parse::<usize>() {
                Ok(n) if n >= 1 => Ok(NprocPerNode::Count(n)),
                _ => Err(format!("{s:?}: use a number of ranks (1 or more) or auto")),
            },
        }
    }
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Write a demo dataset: a few classes of generated shapes, one folder per class.
    DemoData {
        /// Where the class folders go.
        out_dir: PathBuf,
        /// Image side in pixels.
        #[arg(long, env = "DDPM_DEMO_SIZE", default_value_t = 16)]
        size: u32,
        /// Images per class.
        #[arg(long, env = "DDPM_DEMO_PER_CLASS", default_value_t = 64)]
        per_class: usize,
        /// Number of classes (at most 8).
        #[arg(long, env = "DDPM_DEMO_CLASSES", default_value_t = 4)]
        classes: usize,
        /// Seed of the generator.
        #[arg(long, env = "DDPM_DEMO_SEED", default_value_t = 0)]
        seed: u64,
    },
    /// Run one training run in the foreground, recorded like the daemon's.
    Train {
        /// The run config (TOML).
        config: PathBuf,
        #[command(flatten)]
        overrides: Overrides,
        /// Data-parallel ranks on this host (`auto`: one per visible GPU), this process
        /// rank 0. Under torchrun leave it at 1: torchrun starts the ranks.
        #[arg(long, env = "DDPM_NPROC_PER_NODE", default_value = "1")]
        nproc_per_node: NprocPerNode,
        /// A key naming this launch: the first `train` with it creates the run, every
        /// later one (a restarted pod or worker) resumes that run instead of starting a
        /// new one [default: torchrun's rendezvous id, TORCHELASTIC_RUN_ID].
        #[arg(long, env = "DDPM_LAUNCH_ID")]
        launch_id: Option<String>,
    },
    /// Queue a run for a daemon.
    Submit {
        /// The run config (TOML).
        config: PathBuf,
        #[command(flatten)]
        overrides: Overrides,
    },
    /// Take runs one at a time, the one that has waited longest first: queued ones, and
    /// interrupted, deferred and crashed ones to resume.
    Daemon {
        /// Exit when nothing is left to claim (for tests and CI).
        #[arg(long, env = "DDPM_DAEMON_ONCE")]
        once: bool,
        /// How long to wait before looking at an empty queue again.
        #[arg(long, env = "DDPM_POLL_INTERVAL", default_value = "5s", value_parser = parse_duration)]
        poll_interval: Duration,
        /// A running run whose heartbeat is older than this lost its worker and is resumed.
        #[arg(long, env = "DDPM_STALE_AFTER", default_value = "60s", value_parser = parse_duration)]
        stale_after: Duration,
        /// Data-parallel ranks on this host for every run (`auto`: one per visible GPU),
        /// this process rank 0.
        #[arg(long, env = "DDPM_NPROC_PER_NODE", default_value = "1")]
        nproc_per_node: NprocPerNode,
    },
    /// One rank (not 0) of a data-parallel run, as `--nproc-per-node` starts it; reads
    /// RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT like a torchrun worker.
    #[command(hide = true)]
    Rank,
    /// Run history.
    Runs {
        #[command(subcommand)]
        command: RunsCommand,
    },
    /// Which checkpoint servers with `--serve-policy promoted` serve.
    Checkpoints {
        #[command(subcommand)]
        command: CheckpointsCommand,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum CheckpointsCommand {
    /// Promote an EMA checkpoint: servers with `--serve-policy promoted` swap to it.
    Promote {
        id: i64,
        /// Why (recorded with the promotion).
        #[arg(long, env = "DDPM_PROMOTE_REASON")]
        reason: String,
        /// Who (recorded; default: the user and host running the command).
        #[arg(long, env = "DDPM_PROMOTE_BY")]
        by: Option<String>,
    },
    /// Revoke the promotion in force: the one before it is in force again.
    Rollback {
        /// Who (recorded; default: the user and host running the command).
        #[arg(long, env = "DDPM_PROMOTE_BY")]
        by: Option<String>,
    },
    /// Promotions, newest first (revoked ones too).
    Promotions {
        /// How many to list.
        #[arg(long, env = "DDPM_PROMOTIONS_LIMIT", default_value_t = 20)]
        limit: i64,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum RunsCommand {
    /// Runs, newest first.
    List {
        /// Only runs with this status (queued, running, completed, failed, interrupted,
        /// cancelled).
        #[arg(long, env = "DDPM_RUNS_STATUS")]
        status: Option<RunStatus>,
        /// How many runs to list.
        #[arg(long, env = "DDPM_RUNS_LIMIT", default_value_t = 20)]
        limit: i64,
    },
    /// One run: config, dataset, loss curve summary, checkpoints.
    Show { id: i64 },
    /// Stop a run for good: a queued or interrupted one at once; a running one at its
    /// next heartbeat, after saving a training state.
    Cancel { id: i64 },
    /// Train a failed, cancelled or interrupted run again from its newest training state
    /// (its history kept), or with --from-scratch any run that is not queued or running
    /// from step 0 (its metrics and checkpoints deleted).
    Restart {
        id: i64,
        /// Delete the run's metrics and checkpoints and queue it again at step 0.
        #[arg(long, env = "DDPM_RUNS_FROM_SCRATCH")]
        from_scratch: bool,
    },
    /// Delete a run that is not running: its registry rows and its checkpoint files.
    Delete { id: i64 },
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_derive_from_the_data_dir() {
        let cli =
            Cli::try_parse_from(["ddpm-trainer", "--data-dir", "/srv/d", "runs", "list"]).unwrap();
        assert_eq!(
            cli.global.common.database_url(),
            "sqlite:/srv/d/registry.db"
        );
        assert_eq!(
            cli.global.common.checkpoint_dir(),
            PathBuf::from("/srv/d/checkpoints")
        );
        let cli = Cli::try_parse_from([
            "ddpm-trainer",
            "daemon",
            "--once",
            "--stale-after",
            "2s",
            "--device",
            "cpu",
        ])
        .unwrap();
        assert!(matches!(cli.command, Command::Daemon { once: true, .. }));
        assert_eq!(cli.global.common.device, "cpu");
        assert!(Cli::try_parse_from(["ddpm-trainer", "--device", "tpu", "daemon"]).is_err());
    }
}
