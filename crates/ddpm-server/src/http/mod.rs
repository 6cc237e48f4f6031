//! The HTTP API: shared state, the router, and the layers every route goes through
//! (tracing, metrics, body limit, bearer token); and the web [`console`], a client of it.
//! Handlers parse (the [`extract`]ors), call ([`crate::validate`], the batcher, the
//! registry) and map (to the response types each resource module declares, from which
//! [`openapi`] generates the document; errors to [`ApiError`], in [`error`]).

mod checkpoints;
mod console;
pub mod error;
pub use error::ApiError;
mod extract;
pub use extract::BodyReadTimeout;
mod health;
mod image;
mod model;
pub mod openapi;
mod runs;
mod samples;
mod stream;

use std::{sync::Arc, time::Duration, time::Instant};

use axum::{
    extract::{DefaultBodyLimit, FromRequestParts, MatchedPath, Request, State},
    http::{header, request::Parts, Method},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    Router,
};
use ddpm_registry::{CheckpointStore, Registry};
use tower_http::trace::TraceLayer;

use crate::{batcher::Batcher, metrics::Metrics, model::CurrentModel, validate::SampleDefaults};

/// Largest request body accepted.
pub const BODY_LIMIT: usize = 64 * 1024;

/// Every route as `(method, path)`, in OpenAPI's path syntax; the generated OpenAPI
/// document is tested to describe exactly these, and the server to answer each.
pub const ROUTES: &[(&str, &str)] = &[
    ("post", "/v1/samples"),
    ("delete", "/v1/samples/{id}"),
    ("get", "/v1/model"),
    ("get", "/v1/runs"),
    ("get", "/v1/runs/{id}"),
    ("delete", "/v1/runs/{id}"),
    ("post", "/v1/runs/{id}/cancel"),
    ("post", "/v1/runs/{id}/restart"),
    ("get", "/v1/runs/{id}/metrics"),
    ("get", "/v1/runs/{id}/checkpoints"),
    ("get", "/v1/checkpoints/{id}"),
    ("get", "/v1/checkpoints/{id}/grid.png"),
    ("post", "/v1/checkpoints/{id}/promote"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
];

/// Request limits and defaults the handlers apply.
#[derive(Debug, Clone)]
pub struct Settings {
    /// What a sampling request is checked against and completed with.
    pub samples: SampleDefaults,
    pub request_timeout: Duration,
    /// Required as `Authorization: Bearer <token>` on every route but the health checks.
    /// Without one the read-only routes are open and run control is refused (403).
    pub api_token: Option<String>,
}

/// What every handler can reach.
#[derive(Debug, Clone)]
pub struct AppState {
    pub registry: Registry,
    /// Where the runs' files are: restarting from scratch and deleting remove them.
    pub store: CheckpointStore,
    pub current: CurrentModel,
    pub batcher: Batcher,
    pub metrics: Arc<Metrics>,
    pub settings: Arc<Settings>,
}

/// The whole API.
pub fn router(state: AppState) -> Router {
    let protected = Router::new()
        .merge(samples::router())
        .merge(model::router())
        .merge(runs::router())
        .merge(checkpoints::router())
        .merge(health::metrics_router())
        .merge(openapi::router())
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .merge(protected)
        .merge(health::router())
        .merge(console::router())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route: see /openapi.json".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Counts requests and their latency by method, route template and status.
async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let response = next.run(request).await;
    state.metrics.http.observe(
        &method,
        &route,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

/// Refuses requests without the configured bearer token.
async fn require_token(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(expected) = &state.settings.api_token else {
        return next.run(request).await;
    };
    if request.method() == Method::OPTIONS {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    match given {
        Some(token) if constant_time_eq(token.as_bytes(), expected.as_bytes()) => {
            next.run(request).await
        }
        _ => ApiError::Unauthorized.into_response(),
    }
}

/// The guard of the routes that change runs (cancel, restart, delete), taken before
/// anything else the handler reads: [`require_token`] has let the request through, so
/// with a token configured it carried that token; without one the server is open for
/// reading only, and run control is refused (403 `control_disabled`).
#[derive(Debug)]
pub struct ControlAllowed;

impl FromRequestParts<AppState> for ControlAllowed {
    type Rejection = ApiError;

    async fn from_request_parts(_: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        match state.settings.api_token {
            Some(_) => Ok(ControlAllowed),
            None => Err(ApiError::ControlDisabled),
        }
    }
}

/// Compares without an early exit, so the time taken does not reveal the matching prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_exactly() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
