//! The server's configuration: CLI flags with `DDPM_*` environment fallbacks.

use std::{fmt, net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};
use ddpm_core::{DeviceChoice, SamplerKind};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormat {
    /// Human-readable, coloured when on a terminal.
    #[default]
    Pretty,
    /// One JSON object per line, for log collectors.
    Json,
}

/// The default sampler of requests that name none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum DefaultSampler {
    Ddpm,
    #[default]
    Ddim,
}

impl From<DefaultSampler> for SamplerKind {
    fn from(s: DefaultSampler) -> Self {
        match s {
            DefaultSampler::Ddpm => SamplerKind::Ddpm,
            DefaultSampler::Ddim => SamplerKind::Ddim,
        }
    }
}

/// `ddpm-server`: guided DDPM sampling over HTTP, with step-level batching, hot-swapped
/// checkpoints and the training runs' history.
#[derive(Clone, Parser)]
#[command(name = "ddpm-server", version, about, long_about = None)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "DDPM_BIND", default_value = "0.0.0.0:8080")]
    pub bind: SocketAddr,

    /// Root of the local state: the default registry file and checkpoint store live here.
    #[arg(long, env = "DDPM_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Run registry URL (`postgres://…` or `sqlite:…`); default: the SQLite file
    /// `<data-dir>/registry.db`, as the trainer uses.
    #[arg(long, env = "DDPM_DATABASE_URL")]
    pub database_url: Option<String>,

    /// Checkpoint store root (registry paths are relative to it); default
    /// `<data-dir>/checkpoints`.
    #[arg(long, env = "DDPM_CHECKPOINT_DIR")]
    pub checkpoint_dir: Option<PathBuf>,

    /// Where the model runs: auto (the GPU when present, else the CPU), cpu, cuda, cuda:N.
    #[arg(long, env = "DDPM_DEVICE", default_value = "auto", value_parser = parse_device)]
    pub device: DeviceChoice,

    /// Log format.
    #[arg(long, env = "DDPM_LOG_FORMAT", value_enum, default_value = "pretty")]
    pub log_format: LogFormat,

    /// libtorch's CPU threads (0: libtorch's default, one per core). On a small CPU host,
    /// 1 often serves more requests/s: intra-op threads of small passes spin on each other.
    #[arg(long, env = "DDPM_TORCH_THREADS", default_value_t = 0)]
    pub torch_threads: i32,

    /// Most samples in one forward pass (1 turns batching off).
    #[arg(long, env = "DDPM_MAX_BATCH", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub max_batch: u32,

    /// Most images accepted and not yet finished (waiting or in flight); beyond it requests
    /// are answered 429 with Retry-After.
    #[arg(long, env = "DDPM_QUEUE_CAPACITY", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub queue_capacity: u32,

    /// Most images one request may ask for.
    #[arg(long, env = "DDPM_MAX_IMAGES_PER_REQUEST", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_images_per_request: u32,

    /// Sampler of requests that name none.
    #[arg(long, env = "DDPM_DEFAULT_SAMPLER", value_enum, default_value = "ddim")]
    pub default_sampler: DefaultSampler,

    /// Steps of requests that give none (whatever their sampler).
    #[arg(long, env = "DDPM_DEFAULT_STEPS", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    pub default_steps: u32,

    /// How often the registry is asked for a newer checkpoint (PostgreSQL also notifies).
    #[arg(long, env = "DDPM_POLL_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub poll_interval: Duration,

    /// A sampling request not answered within this is abandoned with 504.
    #[arg(long, env = "DDPM_REQUEST_TIMEOUT", default_value = "120s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// Serve only checkpoints of this run (the newest of it).
    #[arg(long, env = "DDPM_PIN_RUN")]
    pub pin_run: Option<i64>,

    /// Serve exactly this checkpoint and never swap.
    #[arg(long, env = "DDPM_PIN_CHECKPOINT", conflicts_with = "pin_run")]
    pub pin_checkpoint: Option<i64>,

    /// Bearer token required on every route except /healthz and /readyz.
    #[arg(long, env = "DDPM_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
}

impl Config {
    /// A configuration with every default (no environment read), rooted at `data_dir`
    /// (for tests and embedding).
    pub fn with_data_dir(data_dir: impl Into<PathBuf>) -> Config {
        Config {
            data_dir: data_dir.into(),
            ..Config::default()
        }
    }

    /// The registry URL in effect.
    pub fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite:{}", self.data_dir.join("registry.db").display()))
    }

    /// The checkpoint store root in effect.
    pub fn checkpoint_dir(&self) -> PathBuf {
        self.checkpoint_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("checkpoints"))
    }
}

/// The flags' defaults (kept equal to them by a test).
impl Default for Config {
    fn default() -> Self {
        Config {
            bind: SocketAddr::from(([0, 0, 0, 0], 8080)),
            data_dir: PathBuf::from("./data"),
            database_url: None,
            checkpoint_dir: None,
            torch_threads: 0,
            device: DeviceChoice::Auto,
            log_format: LogFormat::Pretty,
            max_batch: 16,
            queue_capacity: 256,
            max_images_per_request: 64,
            default_sampler: DefaultSampler::Ddim,
            default_steps: 50,
            poll_interval: Duration::from_secs(10),
            request_timeout: Duration::from_secs(120),
            pin_run: None,
            pin_checkpoint: None,
            api_token: None,
        }
    }
}

/// Logs the config with the token and the database password hidden.
impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("bind", &self.bind)
            .field("data_dir", &self.data_dir)
            .field(
                "database_url",
                &ddpm_registry::redact_password(&self.database_url()),
            )
            .field("checkpoint_dir", &self.checkpoint_dir())
            .field("device", &self.device.to_string())
            .field("log_format", &self.log_format)
            .field("max_batch", &self.max_batch)
            .field("queue_capacity", &self.queue_capacity)
            .field("max_images_per_request", &self.max_images_per_request)
            .field("default_sampler", &self.default_sampler)
            .field("default_steps", &self.default_steps)
            .field("poll_interval", &self.poll_interval)
            .field("request_timeout", &self.request_timeout)
            .field("pin_run", &self.pin_run)
            .field("pin_checkpoint", &self.pin_checkpoint)
            .field("api_token", &self.api_token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

fn parse_device(s: &str) -> Result<DeviceChoice, String> {
    s.parse().map_err(|e: ddpm_core::CoreError| e.to_string())
}

/// `250ms`, `10s`, `5m`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration: use e.g. 250ms, 10s or 5m"))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?}: use ms, s, m or h"
            ))
        }
    };
    if !seconds.is_finite() || seconds <= 0.0 {
        return Err(format!("{s:?} must be a positive duration"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches};

    #[test]
    fn defaults_follow_the_data_dir() {
        let config = Config::with_data_dir("/srv/ddpm");
        assert_eq!(config.database_url(), "sqlite:/srv/ddpm/registry.db");
        assert_eq!(
            config.checkpoint_dir(),
            PathBuf::from("/srv/ddpm/checkpoints")
        );
        assert_eq!(config.bind.to_string(), "0.0.0.0:8080");
        assert_eq!(config.max_batch, 16);
        assert_eq!(config.device, DeviceChoice::Auto);
    }

    #[test]
    fn default_matches_the_flags_defaults() {
        // The flags without their `DDPM_*` fallbacks: whatever the test's environment
        // holds, this parses the defaults alone.
        let command = Config::command().mut_args(|arg| arg.env(None::<&'static str>));
        let matches = command.try_get_matches_from(["ddpm-server"]).unwrap();
        let parsed = Config::from_arg_matches(&matches).unwrap();
        assert_eq!(format!("{parsed:?}"), format!("{:?}", Config::default()));
        // The one field the `Debug` leaves out.
        assert_eq!(parsed.torch_threads, Config::default().torch_threads);
    }

    #[test]
    fn flags_parse_and_the_token_is_redacted() {
        let config = Config::try_parse_from([
            "ddpm-server",
            "--database-url",
            "postgres://ddpm:hunter2@db/ddpm",
            "--api-token",
            "s3cret",
            "--poll-interval",
            "250ms",
            "--device",
            "cpu",
            "--default-sampler",
            "ddpm",
        ])
        .unwrap();
        assert_eq!(config.poll_interval, Duration::from_millis(250));
        assert_eq!(config.device, DeviceChoice::Cpu);
        let logged = format!("{config:?}");
        assert!(
            !logged.contains("s3cret") && !logged.contains("hunter2"),
            "{logged}"
        );
        assert!(Config::try_parse_from(["ddpm-server", "--max-batch", "0"]).is_err());
        assert!(
            Config::try_parse_from(["ddpm-server", "--pin-run", "1", "--pin-checkpoint", "2"])
                .is_err()
        );
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5y").is_err());
    }
}
