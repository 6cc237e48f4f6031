//! Logging: human-readable or JSON lines on stderr, filtered by `RUST_LOG`.
//!
//! Both binaries log to stderr, so that stdout stays free for what a command prints as
//! its result (`ddpm-trainer runs list`) and a collector reads one stream per process.

use std::io::IsTerminal;

use tracing_subscriber::{fmt, EnvFilter};

use crate::LogFormat;

/// The filter when `RUST_LOG` is unset: `info`, with sqlx's per-query lines quieted.
pub const DEFAULT_FILTER: &str = "info,sqlx=warn";

/// Installs the global subscriber; a second call (tests) leaves the first in place.
pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    // Colours only on a terminal: piped into a file or a collector they are noise.
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
