//! The options every ddpm process takes, each with its `DDPM_*` environment fallback.

use std::{fmt, path::PathBuf};

use clap::ValueEnum;

use crate::store_options::{StoreOptions, StoreSpec};

/// Where the state lives, where the model runs and how the process logs. Flattened into
/// both binaries' command lines (`#[command(flatten)]`); `global`, so the trainer's
/// subcommands take them after their own name too.
#[derive(Clone, clap::Args)]
pub struct CommonOptions {
    /// Root of the local state: the default registry file and checkpoint store live here.
    #[arg(long, env = "DDPM_DATA_DIR", default_value = "./data", global = true)]
    pub data_dir: PathBuf,

    /// Run registry URL (`postgres://…` or `sqlite:…`); default: the SQLite file
    /// `<data-dir>/registry.db`.
    // hide_env_values: a PostgreSQL URL may carry a password.
    #[arg(long, env = "DDPM_DATABASE_URL", hide_env_values = true, global = true)]
    pub database_url: Option<String>,

    /// Checkpoint store root (registry paths are relative to it) when `--store` names
    /// none; default `<data-dir>/checkpoints`.
    #[arg(long, env = "DDPM_CHECKPOINT_DIR", global = true)]
    pub checkpoint_dir: Option<PathBuf>,

    /// `--store` (a directory or an S3 bucket) and the S3 settings.
    #[command(flatten)]
    pub store: StoreOptions,

    /// Where the model runs: auto (the GPU when present, else the CPU), cpu, cuda, cuda:N.
    // A name, not ddpm-core's `DeviceChoice`: this crate links neither libtorch nor the
    // database drivers. Each binary checks it with `DeviceChoice`'s parser at parse time
    // (`device_arg`), and turns it into a device when it starts.
    #[arg(long, env = "DDPM_DEVICE", default_value = "auto", global = true)]
    pub device: String,

    /// Log format.
    #[arg(long, env = "DDPM_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty, global = true)]
    pub log_format: LogFormat,

    /// libtorch's CPU threads (0: libtorch's default, one per core). On a small CPU host,
    /// 1 often serves more requests/s: intra-op threads of small passes spin on each other.
    #[arg(long, env = "DDPM_TORCH_THREADS", default_value_t = 0, global = true)]
    pub torch_threads: i32,
}

impl CommonOptions {
    /// Every default, no environment read, rooted at `data_dir` (for tests and embedding;
    /// a test keeps it equal to the flags' defaults).
    pub fn with_data_dir(data_dir: impl Into<PathBuf>) -> CommonOptions {
        CommonOptions {
            data_dir: data_dir.into(),
            database_url: None,
            checkpoint_dir: None,
            store: StoreOptions::defaults(),
            device: "auto".into(),
            log_format: LogFormat::Pretty,
            torch_threads: 0,
        }
    }

    /// The registry URL in effect: the given one, or the SQLite file in the data dir
    /// (which the registry creates, with its directories, on first use).
    pub fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite:{}", self.data_dir.join("registry.db").display()))
    }

    /// The directory store's root when `--store` names no store.
    pub fn checkpoint_dir(&self) -> PathBuf {
        self.checkpoint_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("checkpoints"))
    }

    /// The checkpoint store in effect: `--store`'s, or the directory `checkpoint_dir()`.
    pub fn store_spec(&self) -> StoreSpec {
        self.store.spec(self.checkpoint_dir())
    }
}

/// Everything but the registry URL, which may hold a password: the binaries log it
/// through the registry's `redact_password` (this crate does not link the registry).
impl fmt::Debug for CommonOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommonOptions")
            .field("data_dir", &self.data_dir)
            .field("checkpoint_dir", &self.checkpoint_dir())
            .field("store", &self.store)
            .field("device", &self.device)
            .field("log_format", &self.log_format)
            .field("torch_threads", &self.torch_threads)
            .finish_non_exhaustive()
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormat {
    /// Human-readable, coloured when on a terminal.
    #[default]
    Pretty,
    /// One JSON object per line, for log collectors.
    Json,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{FromArgMatches, Parser};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        common: CommonOptions,
    }

    /// The flags without their `DDPM_*` fallbacks: whatever the test's environment holds,
    /// this parses the given arguments alone.
    fn parse(args: &[&str]) -> Result<CommonOptions, clap::Error> {
        use clap::CommandFactory;
        let command = Cli::command().mut_args(|arg| arg.env(None::<&'static str>));
        let matches =
            command.try_get_matches_from(std::iter::once("x").chain(args.iter().copied()))?;
        Ok(Cli::from_arg_matches(&matches)?.common)
    }

    #[test]
    fn with_data_dir_matches_the_flags_defaults() {
        let parsed = parse(&["--data-dir", "/srv/ddpm"]).unwrap();
        let built = CommonOptions::with_data_dir("/srv/ddpm");
        assert_eq!(format!("{parsed:?}"), format!("{built:?}"));
        assert_eq!(parsed.database_url(), built.database_url());
    }

    #[test]
    fn defaults_derive_from_the_data_dir() {
        let options = parse(&["--data-dir", "/srv/ddpm"]).unwrap();
        assert_eq!(options.database_url(), "sqlite:/srv/ddpm/registry.db");
        assert_eq!(
            options.checkpoint_dir(),
            PathBuf::from("/srv/ddpm/checkpoints")
        );
        let options = parse(&[
            "--database-url",
            "postgres://ddpm:hunter2@db/ddpm",
            "--checkpoint-dir",
            "/mnt/ckpt",
        ])
        .unwrap();
        assert_eq!(options.database_url(), "postgres://ddpm:hunter2@db/ddpm");
        assert_eq!(options.checkpoint_dir(), PathBuf::from("/mnt/ckpt"));
        let logged = format!("{options:?}");
        assert!(!logged.contains("hunter2"), "{logged}");
    }

    #[test]
    fn bad_values_are_refused() {
        // `--device` is checked by the binaries (`device_arg`), which know the devices.
        assert!(parse(&["--log-format", "xml"]).is_err());
        assert!(parse(&["--torch-threads", "many"]).is_err());
        let options = parse(&["--device", "cuda:1", "--log-format", "json"]).unwrap();
        assert_eq!(options.device, "cuda:1");
        assert_eq!(options.log_format, LogFormat::Json);
    }
}
