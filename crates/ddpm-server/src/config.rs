//! The server's configuration: CLI flags with `DDPM_*` environment fallbacks.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};
use ddpm_core::{sampler::DpmSolverAlgorithm, AncestralVariance, SamplerKind, TimestepSpacing};
use ddpm_service::{parse_duration, CommonOptions};

use crate::{
    validate::samples::{Thresholding, MAX_SAMPLE_MAX_VALUE},
    watcher::{BestMetric, ServePolicy},
};

/// The default sampler of requests that name none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum DefaultSampler {
    Ddpm,
    Ddim,
    #[default]
    #[value(name = "dpmpp_2m")]
    DpmPp2m,
}

impl From<DefaultSampler> for SamplerKind {
    fn from(s: DefaultSampler) -> Self {
        match s {
            DefaultSampler::Ddpm => SamplerKind::Ddpm,
            DefaultSampler::Ddim => SamplerKind::Ddim,
            DefaultSampler::DpmPp2m => SamplerKind::DpmPp2m,
        }
    }
}

/// The timestep spacing of requests that name none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum DefaultSpacing {
    /// Each sampler's own: trailing for ddpm and ddim, linspace for dpmpp_2m.
    #[default]
    Sampler,
    Leading,
    Trailing,
    Linspace,
}

impl From<DefaultSpacing> for Option<TimestepSpacing> {
    fn from(s: DefaultSpacing) -> Self {
        match s {
            DefaultSpacing::Sampler => None,
            DefaultSpacing::Leading => Some(TimestepSpacing::Leading),
            DefaultSpacing::Trailing => Some(TimestepSpacing::Trailing),
            DefaultSpacing::Linspace => Some(TimestepSpacing::Linspace),
        }
    }
}

/// The ddpm sampler's σ² for requests that name none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum DefaultVariance {
    /// β̃, the posterior variance.
    #[default]
    #[value(name = "fixed_small")]
    FixedSmall,
    /// β, the seed's.
    #[value(name = "fixed_large")]
    FixedLarge,
}

impl From<DefaultVariance> for AncestralVariance {
    fn from(v: DefaultVariance) -> Self {
        match v {
            DefaultVariance::FixedSmall => AncestralVariance::FixedSmall,
            DefaultVariance::FixedLarge => AncestralVariance::FixedLarge,
        }
    }
}

/// The dpmpp_2m sampler's solver for requests that name none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum DefaultAlgorithm {
    /// The ODE's, deterministic.
    #[value(name = "dpmsolver++")]
    DpmSolverPp,
    /// The SDE's, fresh noise at every step.
    #[default]
    #[value(name = "sde-dpmsolver++")]
    SdeDpmSolverPp,
}

impl From<DefaultAlgorithm> for DpmSolverAlgorithm {
    fn from(a: DefaultAlgorithm) -> Self {
        match a {
            DefaultAlgorithm::DpmSolverPp => DpmSolverAlgorithm::DpmSolverPp,
            DefaultAlgorithm::SdeDpmSolverPp => DpmSolverAlgorithm::SdeDpmSolverPp,
        }
    }
}

/// How x̂₀ is kept in range for requests that name no `thresholding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum DefaultThresholding {
    None,
    /// Clamped to [−1, 1].
    #[default]
    Static,
    /// Imagen's dynamic thresholding.
    Dynamic,
}

impl From<DefaultThresholding> for Thresholding {
    fn from(t: DefaultThresholding) -> Self {
        match t {
            DefaultThresholding::None => Thresholding::None,
            DefaultThresholding::Static => Thresholding::Static,
            DefaultThresholding::Dynamic => Thresholding::Dynamic,
        }
    }
}

/// How the model thread shares its forward pass between requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum SchedulerPolicy {
    /// Shortest remaining work first with ageing, admission by cost (requests that could
    /// not finish by their deadline are refused up front with 429 and Retry-After).
    #[default]
    Fair,
    /// First come, first served, admission by images only (the behaviour before cost-based
    /// scheduling: a large request holds the batch).
    Fifo,
}

/// `ddpm-server`: guided DDPM sampling over HTTP, with step-level batching, hot-swapped
/// checkpoints and the training runs' history.
#[derive(Clone, Parser)]
#[command(name = "ddpm-server", version, about, long_about = None)]
// The shared options keep the device as a name (ddpm-service links no libtorch): check it
// here, when the command line is parsed.
#[command(mut_arg("device", |arg| arg.value_parser(ddpm_core::device_arg)))]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "DDPM_BIND", default_value = "0.0.0.0:8080")]
    pub bind: SocketAddr,

    #[command(flatten)]
    pub common: CommonOptions,

    /// Most samples in one forward pass (1 turns batching off).
    #[arg(long, env = "DDPM_MAX_BATCH", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub max_batch: u32,

    /// Most images accepted and not yet finished (waiting or in flight); beyond it requests
    /// are answered 429 with Retry-After.
    #[arg(long, env = "DDPM_QUEUE_CAPACITY", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub queue_capacity: u32,

    /// How requests share the forward pass: `fair` (shortest remaining work first with
    /// ageing, admission by cost) or `fifo`.
    #[arg(long, env = "DDPM_SCHEDULER", value_enum, default_value = "fair")]
    pub scheduler: SchedulerPolicy,

    /// Fair scheduling: how much longer (×) a forward pass may take for the requests due
    /// first, so that longer requests share it. On a GPU a bigger batch costs little and
    /// they fill it; on a CPU the pass time grows with the batch and this bounds it.
    #[arg(long, env = "DDPM_BATCH_STRETCH", default_value_t = 1.5, value_parser = parse_stretch)]
    pub batch_stretch: f64,

    /// Most images one request may ask for.
    #[arg(long, env = "DDPM_MAX_IMAGES_PER_REQUEST", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_images_per_request: u32,

    /// Sampler of requests that name none. `dpmpp_2m` by default, with the defaults
    /// below its stochastic solver at 10 steps with guidance only at 80 ≤ t ≤ 580: of
    /// every sampler, step count and option, the best Fréchet distance at diversity ≥ 0.9
    /// of the data's at the fewest network evaluations (BENCHMARKS.md, "Samplers:
    /// quality per network evaluation").
    #[arg(
        long,
        env = "DDPM_DEFAULT_SAMPLER",
        value_enum,
        default_value = "dpmpp_2m"
    )]
    pub default_sampler: DefaultSampler,

    /// Steps of requests that give none (whatever their sampler).
    #[arg(long, env = "DDPM_DEFAULT_STEPS", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub default_steps: u32,

    /// Timestep spacing of requests that name none: `sampler` (each sampler's own,
    /// trailing for ddpm and ddim, linspace for dpmpp_2m), `leading`, `trailing` or
    /// `linspace`.
    #[arg(
        long,
        env = "DDPM_DEFAULT_TIMESTEP_SPACING",
        value_enum,
        default_value = "sampler"
    )]
    pub default_timestep_spacing: DefaultSpacing,

    /// The ddpm sampler's σ² for requests that name none: `fixed_small` (β̃, the
    /// posterior variance) or `fixed_large` (β).
    #[arg(
        long,
        env = "DDPM_DEFAULT_VARIANCE_TYPE",
        value_enum,
        default_value = "fixed_small"
    )]
    pub default_variance_type: DefaultVariance,

    /// The dpmpp_2m sampler's solver for requests that name none: `dpmsolver++` (the
    /// ODE's) or `sde-dpmsolver++` (the SDE's, the default).
    #[arg(
        long,
        env = "DDPM_DEFAULT_ALGORITHM_TYPE",
        value_enum,
        default_value = "sde-dpmsolver++"
    )]
    pub default_algorithm_type: DefaultAlgorithm,

    /// How x̂₀ is kept in range for requests that name no `thresholding`: `none`,
    /// `static` (clamped to [−1, 1]) or `dynamic` (Imagen's).
    #[arg(
        long,
        env = "DDPM_DEFAULT_THRESHOLDING",
        value_enum,
        default_value = "static"
    )]
    pub default_thresholding: DefaultThresholding,

    /// Dynamic thresholding's quantile of |x̂₀| for requests that give none, in (0, 1].
    #[arg(long, env = "DDPM_DEFAULT_DYNAMIC_THRESHOLDING_RATIO", default_value_t = 0.995, value_parser = parse_ratio)]
    pub default_dynamic_thresholding_ratio: f64,

    /// Dynamic thresholding's largest bound for requests that give none, in [1, 1000].
    #[arg(long, env = "DDPM_DEFAULT_SAMPLE_MAX_VALUE", default_value_t = 1.0, value_parser = parse_sample_max_value)]
    pub default_sample_max_value: f64,

    /// Guidance rescale φ in [0, 1] for requests that give none (0: none).
    #[arg(long, env = "DDPM_DEFAULT_GUIDANCE_RESCALE", default_value_t = 0.0, value_parser = parse_unit)]
    pub default_guidance_rescale: f64,

    /// `LO,HI`: guide only at the timesteps LO ≤ t ≤ HI for requests that give no
    /// `guidance_interval`, or `all`: at every step. Ignored for a model whose T is not
    /// above HI.
    #[arg(
        long,
        env = "DDPM_DEFAULT_GUIDANCE_INTERVAL",
        default_value = "80,580",
        value_parser = parse_interval
    )]
    pub default_guidance_interval: Option<(i64, i64)>,

    /// How often the registry is asked for a newer checkpoint (PostgreSQL also notifies).
    #[arg(long, env = "DDPM_POLL_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub poll_interval: Duration,

    /// A sampling request not answered within this is abandoned with 504.
    #[arg(long, env = "DDPM_REQUEST_TIMEOUT", default_value = "120s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// A client must send a request's whole header within this, counted from when the
    /// connection can take a request: it is also how long an idle kept-alive connection
    /// stays open.
    #[arg(long, env = "DDPM_HEADER_READ_TIMEOUT", default_value = "15s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,

    /// A request's body must arrive within this (a slow upload is answered 408).
    #[arg(long, env = "DDPM_BODY_READ_TIMEOUT", default_value = "15s", value_parser = parse_duration)]
    pub body_read_timeout: Duration,

    /// Serve only checkpoints of this run (the newest of it).
    #[arg(long, env = "DDPM_PIN_RUN")]
    pub pin_run: Option<i64>,

    /// Serve exactly this checkpoint and never swap.
    #[arg(long, env = "DDPM_PIN_CHECKPOINT", conflicts_with = "pin_run")]
    pub pin_checkpoint: Option<i64>,

    /// Bearer token required on every route except /healthz and /readyz; without one,
    /// run control (cancel, restart, delete) is disabled (403).
    #[arg(long, env = "DDPM_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,

    /// Start even where that is unsafe: on a non-loopback address without a token (or
    /// with an empty one), or with a token or database password left at a placeholder of
    /// deploy/.env.example. For a trusted network only.
    #[arg(long, env = "DDPM_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,

    /// How the checkpoint to serve is chosen: `newest`; `best`, the best-scored of the
    /// candidate run (the pinned run, else the newest checkpoint's) by --best-metric,
    /// never swapping in one whose KID is worse than the serving one's by more than its
    /// standard deviation; `promoted`, only the promoted checkpoint.
    #[arg(long, env = "DDPM_SERVE_POLICY", value_enum, default_value = "newest")]
    pub serve_policy: ServePolicy,

    /// What `--serve-policy best` ranks the trainer's scores by.
    #[arg(long, env = "DDPM_BEST_METRIC", value_enum, default_value = "kid")]
    pub best_metric: BestMetric,

    /// With a remote store (`--store s3://…`): the directory of local copies of the
    /// checkpoints loaded, named by SHA-256; default `<data-dir>/cache`.
    #[arg(long, env = "DDPM_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,

    /// The most MiB the cache keeps besides the checkpoint being served; copies no
    /// checkpoint row refers to go first, then the least recently used.
    #[arg(long, env = "DDPM_CACHE_MAX_MIB", default_value_t = 4096)]
    pub cache_max_mib: u64,
}

fn parse_stretch(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (1.0..=100.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a number in [1, 100]")),
    }
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 1.0 => Ok(v),
        _ => Err(format!("{s:?} is not a number in (0, 1]")),
    }
}

fn parse_unit(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a number in [0, 1]")),
    }
}

/// `LO,HI`, or `all`: [0, i64::MAX], which no model's T is above, so guidance applies
/// at every step.
fn parse_interval(s: &str) -> Result<(i64, i64), String> {
    if s.trim() == "all" {
        return Ok(ALL_STEPS);
    }
    let parsed = s
        .split_once(',')
        .and_then(|(lo, hi)| Some((lo.trim().parse().ok()?, hi.trim().parse().ok()?)));
    match parsed {
        Some((lo, hi)) if 0 <= lo && lo <= hi => Ok((lo, hi)),
        _ => Err(format!("{s:?} is not LO,HI with 0 ≤ LO ≤ HI, nor all")),
    }
}

fn parse_sample_max_value(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (1.0..=MAX_SAMPLE_MAX_VALUE).contains(&v) => Ok(v),
        _ => Err(format!(
            "{s:?} is not a number in [1, {MAX_SAMPLE_MAX_VALUE}]"
        )),
    }
}

/// `--default-guidance-interval all`: an interval no model's timesteps reach past, which
/// the request planner therefore drops (guidance at every step, as with no interval).
pub const ALL_STEPS: (i64, i64) = (0, i64::MAX);

/// The secrets deploy/.env.example ships with: never accepted as real ones.
pub const PLACEHOLDER_SECRETS: [&str; 2] = ["change-me", "change-me-too"];

impl Config {
    /// The checkpoint cache's directory in effect.
    pub fn cache_dir(&self) -> PathBuf {
        self.cache_dir
            .clone()
            .unwrap_or_else(|| self.common.data_dir.join("cache"))
    }

    /// Refuses a start that would expose the server: without a token (or with an empty
    /// one) on an address other than loopback, or with the token or the database
    /// password still at a shipped placeholder; `--insecure-no-auth` allows it.
    /// `bind` is the address actually listened on.
    pub fn check_security(&self, bind: SocketAddr) -> Result<(), String> {
        if self.insecure_no_auth {
            return Ok(());
        }
        let token = self.api_token.as_deref().map(str::trim);
        if token.is_some_and(|t| PLACEHOLDER_SECRETS.contains(&t)) {
            return Err(
                "DDPM_API_TOKEN is still the placeholder of deploy/.env.example: \
                 set a secret of your own (e.g. `openssl rand -hex 32`)"
                    .into(),
            );
        }
        let password = ddpm_registry::database_password(&self.common.database_url());
        if password.is_some_and(|p| PLACEHOLDER_SECRETS.contains(&p.as_str())) {
            return Err("the database password is still the placeholder of \
                 deploy/.env.example (POSTGRES_PASSWORD): set a secret of your own"
                .into());
        }
        if token.is_none_or(str::is_empty) && !bind.ip().is_loopback() {
            return Err(format!(
                "no API token (DDPM_API_TOKEN is unset or empty) on {bind}, which other \
                 machines can reach: set DDPM_API_TOKEN, bind to 127.0.0.1, or pass \
                 --insecure-no-auth on a trusted network"
            ));
        }
        Ok(())
    }
}

impl Config {
    /// A configuration with every default (no environment read), rooted at `data_dir`
    /// (for tests and embedding).
    pub fn with_data_dir(data_dir: impl Into<PathBuf>) -> Config {
        Config {
            common: CommonOptions::with_data_dir(data_dir),
            ..Config::default()
        }
    }
}

/// The flags' defaults (kept equal to them by a test).
impl Default for Config {
    fn default() -> Self {
        Config {
            bind: SocketAddr::from(([0, 0, 0, 0], 8080)),
            common: CommonOptions::with_data_dir("./data"),
            max_batch: 16,
            queue_capacity: 256,
            scheduler: SchedulerPolicy::Fair,
            batch_stretch: 1.5,
            max_images_per_request: 64,
            default_sampler: DefaultSampler::DpmPp2m,
            default_steps: 10,
            default_timestep_spacing: DefaultSpacing::Sampler,
            default_variance_type: DefaultVariance::FixedSmall,
            default_algorithm_type: DefaultAlgorithm::SdeDpmSolverPp,
            default_thresholding: DefaultThresholding::Static,
            default_dynamic_thresholding_ratio: 0.995,
            default_sample_max_value: 1.0,
            default_guidance_rescale: 0.0,
            default_guidance_interval: Some((80, 580)),
            poll_interval: Duration::from_secs(10),
            request_timeout: Duration::from_secs(120),
            header_read_timeout: Duration::from_secs(15),
            body_read_timeout: Duration::from_secs(15),
            pin_run: None,
            pin_checkpoint: None,
            api_token: None,
            insecure_no_auth: false,
            serve_policy: ServePolicy::Newest,
            best_metric: BestMetric::Kid,
            cache_dir: None,
            cache_max_mib: 4096,
        }
    }
}

/// Logs the config with the token and the database password hidden.
impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("bind", &self.bind)
            .field("common", &self.common)
            .field(
                "database_url",
                &ddpm_registry::redact_password(&self.common.database_url()),
            )
            .field("max_batch", &self.max_batch)
            .field("queue_capacity", &self.queue_capacity)
            .field("scheduler", &self.scheduler)
            .field("batch_stretch", &self.batch_stretch)
            .field("max_images_per_request", &self.max_images_per_request)
            .field("default_sampler", &self.default_sampler)
            .field("default_steps", &self.default_steps)
            .field("default_timestep_spacing", &self.default_timestep_spacing)
            .field("default_variance_type", &self.default_variance_type)
            .field("default_algorithm_type", &self.default_algorithm_type)
            .field("default_thresholding", &self.default_thresholding)
            .field(
                "default_dynamic_thresholding_ratio",
                &self.default_dynamic_thresholding_ratio,
            )
            .field("default_sample_max_value", &self.default_sample_max_value)
            .field("default_guidance_rescale", &self.default_guidance_rescale)
            .field("default_guidance_interval", &self.default_guidance_interval)
            .field("poll_interval", &self.poll_interval)
            .field("request_timeout", &self.request_timeout)
            .field("header_read_timeout", &self.header_read_timeout)
            .field("body_read_timeout", &self.body_read_timeout)
            .field("pin_run", &self.pin_run)
            .field("pin_checkpoint", &self.pin_checkpoint)
            .field("api_token", &self.api_token.as_ref().map(|_| "<redacted>"))
            .field("insecure_no_auth", &self.insecure_no_auth)
            .field("serve_policy", &self.serve_policy)
            .field("best_metric", &self.best_metric)
            .field("cache_dir", &self.cache_dir())
            .field("cache_max_mib", &self.cache_max_mib)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches};

    #[test]
    fn unsafe_starts_are_refused_unless_asked_for() {
        let open: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let with = |token: Option<&str>, url: &str| {
            let mut config = Config::with_data_dir("/srv");
            config.api_token = token.map(str::to_owned);
            config.common.database_url = Some(url.to_owned());
            config
        };
        let sqlite = "sqlite:/srv/registry.db";
        // Loopback without a token: the demo. Any address with a real token: deployment.
        assert!(with(None, sqlite).check_security(local).is_ok());
        assert!(with(Some("s3cret"), sqlite).check_security(open).is_ok());
        // Reachable without a token, or with an empty one.
        for token in [None, Some(""), Some("  ")] {
            let refused = with(token, sqlite).check_security(open).unwrap_err();
            assert!(refused.contains("no API token"), "{refused}");
        }
        // Placeholders, even on loopback; percent-encoding does not hide them.
        assert!(with(Some("change-me-too"), sqlite)
            .check_security(local)
            .is_err());
        let pg = |password: &str| format!("postgres://ddpm:{password}@db:5432/ddpm");
        for password in ["change-me", "change%2Dme"] {
            let refused = with(Some("s3cret"), &pg(password))
                .check_security(open)
                .unwrap_err();
            assert!(refused.contains("database password"), "{refused}");
        }
        assert!(with(Some("s3cret"), &pg("good"))
            .check_security(open)
            .is_ok());
        // --insecure-no-auth allows all of it.
        let mut insecure = with(Some("change-me-too"), &pg("change-me"));
        insecure.insecure_no_auth = true;
        assert!(insecure.check_security(open).is_ok());
    }

    #[test]
    fn defaults_follow_the_data_dir() {
        let config = Config::with_data_dir("/srv/ddpm");
        assert_eq!(config.common.database_url(), "sqlite:/srv/ddpm/registry.db");
        assert_eq!(
            config.common.checkpoint_dir(),
            PathBuf::from("/srv/ddpm/checkpoints")
        );
        assert_eq!(config.bind.to_string(), "0.0.0.0:8080");
        assert_eq!(config.max_batch, 16);
        assert_eq!(config.common.device, "auto");
    }

    #[test]
    fn default_matches_the_flags_defaults() {
        // The flags without their `DDPM_*` fallbacks: whatever the test's environment
        // holds, this parses the defaults alone.
        let command = Config::command().mut_args(|arg| arg.env(None::<&'static str>));
        let matches = command.try_get_matches_from(["ddpm-server"]).unwrap();
        let parsed = Config::from_arg_matches(&matches).unwrap();
        assert_eq!(format!("{parsed:?}"), format!("{:?}", Config::default()));
    }

    #[test]
    fn the_default_guidance_interval_can_be_lifted() {
        let parse = |args: &[&str]| {
            let command = Config::command().mut_args(|arg| arg.env(None::<&'static str>));
            let matches = command
                .try_get_matches_from(std::iter::once("ddpm-server").chain(args.iter().copied()))
                .unwrap();
            Config::from_arg_matches(&matches).unwrap()
        };
        assert_eq!(parse(&[]).default_guidance_interval, Some((80, 580)));
        let all = parse(&["--default-guidance-interval", "all"]);
        assert_eq!(all.default_guidance_interval, Some(ALL_STEPS));
        let some = parse(&["--default-guidance-interval", "100, 700"]);
        assert_eq!(some.default_guidance_interval, Some((100, 700)));
        assert!(parse_interval("700,100").is_err() && parse_interval("none").is_err());
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
        assert_eq!(config.common.device, "cpu");
        assert!(Config::try_parse_from(["ddpm-server", "--device", "tpu"]).is_err());
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
}
