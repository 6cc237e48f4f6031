//! Request validation, free of HTTP: each raw request type (what deserializes from a body or
//! a query string, and what the OpenAPI document describes) is checked here and becomes a
//! validated value or a [`ValidationError`]. [`crate::http::error`] maps the error to a status
//! and a code once.
//!
//! - [`samples`]: `POST /v1/samples`' body against the model being served and the limits.
//! - [`runs`]: the run-history routes' query parameters.
//! - [`integral`]: integers as the document (JSON Schema) counts them, `2.0` included.

pub mod integral;
pub mod runs;
pub mod samples;

pub use runs::{MetricsQuery, MetricsRange, RunsFilter, RunsQuery};
pub use samples::{plan, ClassRef, Plan, SampleDefaults, SampleRequest};

/// A request that is well-formed but asks for something invalid. The variant names the
/// field (and so the error code); the message says what to fix.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValidationError {
    /// The body does not have the request's shape: a wrong type, an unknown field, or
    /// fields that exclude each other.
    #[error("{0}")]
    Request(String),
    /// `n`, or the length of `classes`.
    #[error("{0}")]
    N(String),
    #[error("{0}")]
    UnknownClass(String),
    #[error("{0}")]
    Steps(String),
    #[error("{0}")]
    Sampler(String),
    #[error("{0}")]
    Eta(String),
    /// One of the sampler's options besides η (`timestep_spacing`, `variance_type`) is
    /// unknown, out of range, or does not apply to the sampler.
    #[error("{0}")]
    SamplerOption(String),
    #[error("{0}")]
    GuidanceScale(String),
    /// A query parameter that does not parse or is out of range.
    #[error("{0}")]
    Query(String),
    /// `status` is not a run status.
    #[error("{0}")]
    Status(String),
    /// The id in the path is not an integer.
    #[error("{0}")]
    Id(String),
    /// More work (images × steps) than the server can finish within its request timeout.
    #[error(transparent)]
    TooCostly(crate::batcher::TooCostly),
    /// `priority` names no priority.
    #[error("{0}")]
    Priority(String),
    /// `preview_every` is out of its bounds.
    #[error("{0}")]
    PreviewEvery(String),
}
