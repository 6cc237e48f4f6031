//! The command line: global options (each with an environment fallback) and the
//! subcommands.

use std::{path::PathBuf, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use ddpm_core::DeviceChoice;
use ddpm_registry::RunStatus;

use crate::config::Overrides;

/// Trains class-conditional diffusion models (DDPM + classifier-free guidance + EMA)
/// from image folders, records runs in the registry and writes EMA checkpoints.
#[derive(Debug, Clone, Parser)]
#[command(name = "ddpm-trainer", version, about, long_about = None)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalOptions,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, clap::Args)]
pub struct GlobalOptions {
    /// Root of the local state: the default registry file and checkpoint store live here.
    #[arg(long, env = "DDPM_DATA_DIR", default_value = "./data", global = true)]
    pub data_dir: PathBuf,
    /// Run registry URL (`postgres://…` or `sqlite:…`); default: the SQLite file
    /// `<data-dir>/registry.db`, as the trainer uses.
    #[arg(long, env = "DDPM_DATABASE_URL", global = true)]
    pub database_url: Option<String>,
    /// Checkpoint store root (registry paths are relative to it); default
    /// `<data-dir>/checkpoints`.
    #[arg(long, env = "DDPM_CHECKPOINT_DIR", global = true)]
    pub checkpoint_dir: Option<PathBuf>,
    /// Where the model runs: auto (the GPU when present, else the CPU), cpu, cuda, cuda:N.
    #[arg(long, env = "DDPM_DEVICE", default_value = "auto", global = true)]
    pub device: DeviceChoice,
    /// Log format.
    #[arg(long, env = "DDPM_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty, global = true)]
    pub log_format: LogFormat,
    /// This machine's name in the registry (the process id is appended) [default: the hostname].
    #[arg(long, env = "DDPM_HOST_NAME", global = true)]
    pub host_name: Option<String>,
    /// How often a training worker tells the registry it is alive.
    #[arg(long, env = "DDPM_HEARTBEAT_INTERVAL", default_value = "10s", value_parser = parse_duration, global = true)]
    pub heartbeat_interval: Duration,
    /// libtorch's CPU threads (0: libtorch's default, one per core). On a small CPU host,
    /// 1 often serves more requests/s: intra-op threads of small passes spin on each other.
    #[arg(long, env = "DDPM_TORCH_THREADS", default_value_t = 0, global = true)]
    pub torch_threads: i32,
}

impl GlobalOptions {
    pub fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}/registry.db?mode=rwc", self.data_dir.display()))
    }

    pub fn checkpoint_dir(&self) -> PathBuf {
        self.checkpoint_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("checkpoints"))
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable, coloured when on a terminal.
    Pretty,
    /// One JSON object per line, for log collectors.
    Json,
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
    },
    /// Queue a run for a daemon.
    Submit {
        /// The run config (TOML).
        config: PathBuf,
        #[command(flatten)]
        overrides: Overrides,
    },
    /// Take queued runs one at a time; resume interrupted and crashed ones first.
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
    },
    /// Run history.
    Runs {
        #[command(subcommand)]
        command: RunsCommand,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum RunsCommand {
    /// Runs, newest first.
    List {
        /// Only runs with this status (queued, running, completed, failed, interrupted).
        #[arg(long, env = "DDPM_RUNS_STATUS")]
        status: Option<RunStatus>,
        /// How many runs to list.
        #[arg(long, env = "DDPM_RUNS_LIMIT", default_value_t = 20)]
        limit: i64,
    },
    /// One run: config, dataset, loss curve summary, checkpoints.
    Show { id: i64 },
}

/// `500ms`, `30s`, `2m`, `1h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration: use e.g. 500ms, 30s, 2m, 1h"))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?}: use ms, s, m or h"
            ))
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{s:?}: {e}"))
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
    fn durations_parse() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("3 days").is_err());
    }

    #[test]
    fn defaults_derive_from_the_data_dir() {
        let cli =
            Cli::try_parse_from(["ddpm-trainer", "--data-dir", "/srv/d", "runs", "list"]).unwrap();
        assert_eq!(
            cli.global.database_url(),
            "sqlite:///srv/d/registry.db?mode=rwc"
        );
        assert_eq!(
            cli.global.checkpoint_dir(),
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
        assert_eq!(cli.global.device, DeviceChoice::Cpu);
        assert!(Cli::try_parse_from(["ddpm-trainer", "--device", "tpu", "daemon"]).is_err());
    }
}
