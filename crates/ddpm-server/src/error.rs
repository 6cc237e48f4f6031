//! The library's error type: what starting and running the server can fail with. What a
//! client sees is [`crate::http::ApiError`]; this module knows nothing of HTTP, so the
//! model, the watcher and the batcher can name it without depending on the API.

/// What starting and running the server can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Registry(#[from] ddpm_registry::RegistryError),
    #[error(transparent)]
    Core(#[from] ddpm_core::CoreError),
    /// A checkpoint that loads but cannot be served by this server or contradicts its record.
    #[error("checkpoint {id} is incompatible: {message}")]
    IncompatibleCheckpoint { id: i64, message: String },
    #[error("configuration: {0}")]
    Config(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("the model thread is gone")]
    WorkerGone,
}
