//! The API's error type ([`ApiError`]): every error a client sees is a JSON [`ErrorBody`]
//! `{"error": {"code", "message"}}` whose `code` is an [`ErrorCode`]. The lower layers'
//! errors ([`ValidationError`], [`BatchError`], [`NotAcceptable`], the registry's) are
//! mapped to statuses here, once.

use std::time::Duration;

use axum::{
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{batcher::BatchError, encode::NotAcceptable, validate::ValidationError};

/// The stable, machine-readable kind of an error. The OpenAPI document's list of codes is
/// generated from this enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidRequest,
    InvalidN,
    UnknownClass,
    InvalidSteps,
    InvalidSampler,
    InvalidEta,
    /// `timestep_spacing` or `variance_type` is unknown or does not apply to the sampler.
    InvalidSamplerOption,
    InvalidGuidanceScale,
    InvalidQuery,
    InvalidStatus,
    InvalidId,
    /// A request that would take longer than the server's request timeout even alone.
    TooCostly,
    /// `priority` or `preview_every` is invalid.
    InvalidStreamOption,
    MalformedJson,
    PayloadTooLarge,
    /// The request body did not arrive within the server's body read timeout.
    BodyTimeout,
    UnsupportedMediaType,
    NotAcceptable,
    BadRequest,
    NotFound,
    MethodNotAllowed,
    Unauthorized,
    ControlDisabled,
    Conflict,
    /// The request was cancelled (`DELETE /v1/samples/{id}`).
    Cancelled,
    Overloaded,
    ModelNotLoaded,
    Unavailable,
    Timeout,
    Internal,
}

/// Every error response's body.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    /// What went wrong and what to fix.
    pub message: String,
}

/// An error answered to a client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is well-formed but asks for something invalid (422).
    #[error(transparent)]
    Validation(#[from] ValidationError),
    /// The body is not parseable JSON (400).
    #[error("{0}")]
    MalformedJson(String),
    #[error("the request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// The body did not arrive within the server's body read timeout (408).
    #[error("the request body did not arrive in time")]
    BodyTimeout,
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    NotAcceptable(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    #[error("missing or wrong bearer token: send `Authorization: Bearer <token>`")]
    Unauthorized,
    /// A command that changes a run, on a server without a token (403).
    #[error("run control is disabled: the server has no API token; set DDPM_API_TOKEN (--api-token) to enable cancel, restart and delete")]
    ControlDisabled,
    /// The run's state does not allow the command (409).
    #[error("{0}")]
    Conflict(String),
    /// The queue is full (429 with Retry-After).
    #[error("{message}")]
    Overloaded {
        message: String,
        /// Seconds to wait, whole, at least 1.
        retry_after: u64,
    },
    /// The request was cancelled by `DELETE /v1/samples/{id}` (409, code `cancelled`).
    #[error("the request was cancelled")]
    Cancelled,
    #[error("no model is loaded yet: the server serves the newest checkpoint in the registry once one is registered")]
    NoModel,
    /// The server is shutting down or the model thread is gone (503).
    #[error("{0}")]
    Unavailable(String),
    #[error("the request did not finish within {0:?}")]
    Timeout(Duration),
    /// Anything else: the detail is logged, never sent.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        ApiError::Internal(detail.to_string())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::MalformedJson(_) | ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::NotAcceptable(_) => StatusCode::NOT_ACCEPTABLE,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::ControlDisabled => StatusCode::FORBIDDEN,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Cancelled => StatusCode::CONFLICT,
            ApiError::NoModel | ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine-readable code.
    pub fn code(&self) -> ErrorCode {
        match self {
            ApiError::Validation(e) => match e {
                ValidationError::Request(_) => ErrorCode::InvalidRequest,
                ValidationError::N(_) => ErrorCode::InvalidN,
                ValidationError::UnknownClass(_) => ErrorCode::UnknownClass,
                ValidationError::Steps(_) => ErrorCode::InvalidSteps,
                ValidationError::Sampler(_) => ErrorCode::InvalidSampler,
                ValidationError::Eta(_) => ErrorCode::InvalidEta,
                ValidationError::SamplerOption(_) => ErrorCode::InvalidSamplerOption,
                ValidationError::GuidanceScale(_) => ErrorCode::InvalidGuidanceScale,
                ValidationError::Query(_) => ErrorCode::InvalidQuery,
                ValidationError::Status(_) => ErrorCode::InvalidStatus,
                ValidationError::Id(_) => ErrorCode::InvalidId,
                ValidationError::TooCostly(_) => ErrorCode::TooCostly,
                // One code for the two options a stream's client sets, as before the
                // variants were told apart.
                ValidationError::Priority(_) | ValidationError::PreviewEvery(_) => {
                    ErrorCode::InvalidStreamOption
                }
            },
            ApiError::MalformedJson(_) => ErrorCode::MalformedJson,
            ApiError::PayloadTooLarge { .. } => ErrorCode::PayloadTooLarge,
            ApiError::BodyTimeout => ErrorCode::BodyTimeout,
            ApiError::UnsupportedMediaType(_) => ErrorCode::UnsupportedMediaType,
            ApiError::NotAcceptable(_) => ErrorCode::NotAcceptable,
            ApiError::BadRequest(_) => ErrorCode::BadRequest,
            ApiError::NotFound(_) => ErrorCode::NotFound,
            ApiError::MethodNotAllowed => ErrorCode::MethodNotAllowed,
            ApiError::Unauthorized => ErrorCode::Unauthorized,
            ApiError::ControlDisabled => ErrorCode::ControlDisabled,
            ApiError::Conflict(_) => ErrorCode::Conflict,
            ApiError::Overloaded { .. } => ErrorCode::Overloaded,
            ApiError::Cancelled => ErrorCode::Cancelled,
            ApiError::NoModel => ErrorCode::ModelNotLoaded,
            ApiError::Unavailable(_) => ErrorCode::Unavailable,
            ApiError::Timeout(_) => ErrorCode::Timeout,
            ApiError::Internal(_) => ErrorCode::Internal,
        }
    }
}

/// Seconds a client should wait before retrying an overloaded or unavailable server.
const RETRY_AFTER_SECONDS: &str = "1";

impl ApiError {
    /// What the client is sent: the code and the message. An internal error's detail is
    /// logged here, where it is answered, and never sent.
    pub fn body(&self) -> ErrorBody {
        if let ApiError::Internal(detail) = self {
            tracing::error!(%detail, "internal error");
        }
        ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message: self.to_string(),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), Json(self.body())).into_response();
        let headers = response.headers_mut();
        match self {
            ApiError::Overloaded { retry_after, .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after.max(1)));
            }
            ApiError::NoModel | ApiError::Unavailable(_) => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from_static(RETRY_AFTER_SECONDS),
                );
            }
            ApiError::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        response
    }
}

impl From<BatchError> for ApiError {
    fn from(e: BatchError) -> Self {
        match e {
            BatchError::TooLarge { .. } => ApiError::Overloaded {
                message: e.to_string(),
                retry_after: 1,
            },
            BatchError::Busy { retry_after, .. } | BatchError::QueueFull { retry_after, .. } => {
                ApiError::Overloaded {
                    message: e.to_string(),
                    // Whole seconds, rounded up: a client that waits that long finds room.
                    retry_after: retry_after.as_secs_f64().ceil() as u64,
                }
            }
            BatchError::TooCostly(too_costly) => ValidationError::TooCostly(too_costly).into(),
            BatchError::DuplicateId(_) => ApiError::Conflict(e.to_string()),
            BatchError::Cancelled => ApiError::Cancelled,
            BatchError::Stopped | BatchError::Dropped => ApiError::Unavailable(e.to_string()),
            BatchError::Timeout(after) => ApiError::Timeout(after),
            // The handler validated the request against this very model: only a programmer
            // error gets here, answered as the request it came from.
            BatchError::InvalidSpec(e) => ValidationError::Request(e.to_string()).into(),
            BatchError::ForwardPass(_) | BatchError::Image(_) => ApiError::internal(e),
        }
    }
}

impl From<NotAcceptable> for ApiError {
    fn from(e: NotAcceptable) -> Self {
        ApiError::NotAcceptable(e.0)
    }
}

impl From<ddpm_registry::RegistryError> for ApiError {
    fn from(e: ddpm_registry::RegistryError) -> Self {
        match e {
            ddpm_registry::RegistryError::RunNotFound(id) => {
                ApiError::NotFound(format!("run {id} not found"))
            }
            ddpm_registry::RegistryError::CheckpointNotFound(id) => {
                ApiError::NotFound(format!("checkpoint {id} not found"))
            }
            e @ ddpm_registry::RegistryError::Refused { .. } => ApiError::Conflict(e.to_string()),
            e if e.is_unavailable() => {
                ApiError::Unavailable("the run registry is unavailable".into())
            }
            ddpm_registry::RegistryError::StoreUnavailable(message) => {
                tracing::warn!(%message, "checkpoint store unavailable");
                ApiError::Unavailable("the checkpoint store is unavailable".into())
            }
            other => ApiError::internal(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_body(response: Response) -> ErrorBody {
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn errors_have_stable_codes_and_hide_internal_details() {
        let response = ApiError::internal("db password is hunter2").into_response();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = read_body(response).await;
        assert_eq!(body.error.code, ErrorCode::Internal);
        assert!(!body.error.message.contains("hunter2"));

        let response = ApiError::Overloaded {
            message: "queue full".into(),
            retry_after: 7,
        }
        .into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "7");
        assert_eq!(ApiError::NoModel.status(), StatusCode::SERVICE_UNAVAILABLE);
        let invalid_n = ApiError::from(ValidationError::N("n".into()));
        assert_eq!(invalid_n.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let body = read_body(invalid_n.into_response()).await;
        assert_eq!(serde_json::to_value(body.error.code).unwrap(), "invalid_n");
    }

    #[test]
    fn batch_errors_map_to_their_statuses() {
        let status = |e: BatchError| ApiError::from(e).status();
        assert_eq!(
            status(BatchError::QueueFull {
                in_flight: 4,
                capacity: 4,
                retry_after: Duration::from_secs(3),
            }),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(status(BatchError::Stopped), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            status(BatchError::Timeout(Duration::from_secs(1))),
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(
            status(BatchError::ForwardPass(std::sync::Arc::new(
                ddpm_core::CoreError::Input("nan".into())
            ))),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }

    #[tokio::test]
    async fn registry_errors_map_to_their_statuses() {
        use ddpm_registry::RegistryError;
        let refused = ApiError::from(RegistryError::Refused {
            id: 7,
            reason: "is running: cancel it first".into(),
        });
        assert_eq!(refused.status(), StatusCode::CONFLICT);
        let body = read_body(refused.into_response()).await;
        assert_eq!(body.error.code, ErrorCode::Conflict);
        assert_eq!(body.error.message, "run 7: is running: cancel it first");
        let missing = ApiError::from(RegistryError::RunNotFound(7));
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
        assert_eq!(missing.code(), ErrorCode::NotFound);
        let disabled = ApiError::ControlDisabled;
        assert_eq!(disabled.status(), StatusCode::FORBIDDEN);
        let body = read_body(disabled.into_response()).await;
        assert_eq!(body.error.code, ErrorCode::ControlDisabled);
        assert!(body.error.message.contains("DDPM_API_TOKEN"));
    }
}
