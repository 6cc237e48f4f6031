//! The crate's one error type.

use std::path::PathBuf;

/// Everything the trainer library can fail with. Binaries wrap it in `anyhow`.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    /// A run config (or CLI override) that cannot work, with the field named.
    #[error("invalid config: {field}: {message}")]
    Config { field: String, message: String },

    /// A run config file that is not valid TOML or has unknown / mistyped fields
    /// (toml's message names the key and the line).
    #[error("invalid run config {path}: {message}")]
    ConfigFile { path: PathBuf, message: String },

    /// A dataset that cannot be trained on: missing, empty, an empty class, …
    #[error("dataset {path}: {message}")]
    Dataset { path: PathBuf, message: String },

    /// A dataset folder that is not there (yet): a volume not mounted, a path on a
    /// network share that went away. Transient: the run is deferred, not failed.
    #[error("dataset {path}: {message}")]
    DatasetUnavailable { path: PathBuf, message: String },

    /// The data loader stopped (its thread panicked or the dataset went away).
    #[error("data loader: {0}")]
    Loader(String),

    #[error(transparent)]
    Core(#[from] ddpm_core::CoreError),

    #[error(transparent)]
    Registry(#[from] ddpm_registry::RegistryError),

    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),

    #[error("image {path}: {source}")]
    Image {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },

    #[error("i/o on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A run stored in the registry whose config or dataset summary this version cannot
    /// read, or whose dataset changed since it was queued.
    #[error("run {id}: {message}")]
    Run { id: i64, message: String },

    /// A run whose workers kept stopping without ending it (a trainer killed, out of
    /// memory?): failed when claimed once more than `--max-crashes` allows.
    #[error(
        "its workers stopped {crashes} times without ending it (last at step {step}): a run \
         that keeps killing its trainer (out of memory?) is not taken up again; the limit is \
         --max-crashes {max_crashes}"
    )]
    CrashLoop {
        crashes: i64,
        step: i64,
        max_crashes: i64,
    },

    /// A collective or the rendezvous failed: a rank died or hung past the rank timeout,
    /// or could not reach the others. The attempt ends interrupted and counts as a
    /// crash (see [`crate::attempt`]).
    #[error("data-parallel ranks: {0}")]
    Collective(#[from] ddpm_dist::DistError),

    /// A rank process could not be started, or its job could not be handed over.
    #[error("rank: {0}")]
    Rank(String),

    /// The loss of some rank was not finite: every rank stopped at this step.
    #[error("the loss became non-finite at step {step}: training stopped; the states saved before it are kept")]
    NonFinite { step: i64 },

    /// The training thread panicked (a bug, or libtorch aborting an op).
    #[error("training thread: {0}")]
    Thread(String),

    /// A registered training state could not be read (missing file, store not mounted,
    /// I/O error): the run is deferred, not restarted, since the state may come back.
    #[error("training state unavailable: {0}; the run is deferred and retried, its history kept")]
    StateUnavailable(String),

    /// Every registered training state is corrupt (checksum mismatch or unloadable): the
    /// run fails with their names, its history kept.
    #[error("no usable training state: {0}")]
    StatesCorrupt(String),
}

impl TrainerError {
    /// Whether the failure may pass by itself, so that the run goes back to the queue
    /// with a backoff instead of failing: I/O (a full disk, an unmounted volume), an S3
    /// server that does not answer, a database that cannot be reached, a dataset folder that is missing, a training
    /// state that cannot be read. Everything else (an invalid config, an empty or
    /// changed dataset, a corrupt state, a libtorch error) needs someone to act: failed.
    pub fn is_transient(&self) -> bool {
        match self {
            TrainerError::StateUnavailable(_)
            | TrainerError::DatasetUnavailable { .. }
            | TrainerError::Io { .. }
            | TrainerError::Loader(_) => true,
            TrainerError::Registry(e) => matches!(
                e,
                ddpm_registry::RegistryError::Database(_)
                    | ddpm_registry::RegistryError::Io { .. }
                    | ddpm_registry::RegistryError::ObjectMissing(_)
                    | ddpm_registry::RegistryError::StoreUnavailable(_)
            ),
            _ => false,
        }
    }

    pub(crate) fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        TrainerError::Config {
            field: field.into(),
            message: message.into(),
        }
    }

    pub(crate) fn dataset(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        TrainerError::Dataset {
            path: path.into(),
            message: message.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| TrainerError::Io { path, source }
    }
}

pub type Result<T, E = TrainerError> = std::result::Result<T, E>;
