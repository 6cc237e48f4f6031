//! The one error type of the core crate.

use std::path::PathBuf;

/// Everything the core can fail at. Shapes and files come from outside (requests,
/// checkpoints, configs), so these are returned, never panicked on.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// A model, schedule or sampler configuration that cannot work, with the field named.
    #[error("invalid config: {field}: {message}")]
    Config { field: String, message: String },
    /// A sampling or training input outside what the model accepts.
    #[error("invalid input: {0}")]
    Input(String),
    /// A libtorch operation failed (bad shape, device, out of memory, …).
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// A checkpoint or training-state file that is unreadable, truncated, corrupt or does
    /// not match the model it is loaded into.
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
}

impl CoreError {
    pub(crate) fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        CoreError::Config {
            field: field.into(),
            message: message.into(),
        }
    }

    pub(crate) fn checkpoint(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        CoreError::Checkpoint {
            path: path.into(),
            message: message.into(),
        }
    }
}

pub type Result<T, E = CoreError> = std::result::Result<T, E>;
