//! Errors of the collectives and the rendezvous.

/// What went wrong, with c10d's own message where it has one.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// c10d threw: a peer closed its connection, a timeout passed, a store is
    /// unreachable. `what` names the call.
    #[error("{what}: {message}")]
    C10d { what: &'static str, message: String },
    /// The launch environment is incomplete or contradictory.
    #[error("launch environment: {0}")]
    Launch(String),
    /// A tensor the collective cannot take (wrong device for the backend, not contiguous).
    #[error("{0}")]
    Input(String),
}

pub type Result<T, E = DistError> = std::result::Result<T, E>;
