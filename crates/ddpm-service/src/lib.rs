//! The plumbing both binaries share, so that the trainer and the server parse, log and
//! stop the same way.
//!
//! - [`options`]: the options every process takes ([`CommonOptions`], flattened into
//!   each binary's clap definition) and their derived defaults (registry URL, checkpoint
//!   store);
//! - [`duration`]: how a duration is written on the command line or in the environment;
//! - [`telemetry`]: the `tracing` subscriber, pretty or JSON, always on stderr;
//! - [`shutdown`]: the future that completes on SIGINT or SIGTERM;
//! - [`store_options`]: `--store` (a directory or `s3://bucket/prefix`) and the S3
//!   settings, as the plain [`StoreSpec`] that `ddpm-registry` opens;
//! - [`cli_spec`]: every option of a clap `Command` as JSON, which
//!   `scripts/deploy_env.py` reads instead of parsing `--help`.
//!
//! Nothing here knows about models, HTTP or training, and it links neither libtorch nor
//! the database drivers: the device is a name that each binary checks with `ddpm-core`'s
//! parser, and the registry URL is logged redacted by the binaries through
//! `ddpm-registry`. Besides the two binary crates, only `ddpm-registry` depends on it,
//! for the [`StoreSpec`] it opens.

pub mod cli_spec;
pub mod duration;
pub mod options;
pub mod shutdown;
pub mod store_options;
pub mod telemetry;

pub use duration::parse_duration;
pub use options::{CommonOptions, LogFormat};
pub use shutdown::shutdown_signal;
pub use store_options::{S3Spec, Secret, StoreOptions, StoreSpec, StoreUrl};
