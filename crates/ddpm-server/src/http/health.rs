//! Liveness, readiness and the Prometheus metrics.

use axum::{
    extract::State,
    http::{header, StatusCode},
    response::IntoResponse,
    routing::get,
    Json, Router,
};
use serde::Serialize;
use utoipa::ToSchema;

use super::{model::ModelRef, AppState};

/// `/healthz` and `/readyz`: never behind the bearer token.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

pub fn metrics_router() -> Router<AppState> {
    Router::new().route("/metrics", get(metrics))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok`, or `failing` (answered 503: restart the process).
    #[schema(schema_with = health_status_schema)]
    pub status: &'static str,
    /// Whether the thread that runs the model is alive; every sampling request fails
    /// without it.
    pub model_thread_alive: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// `ready`, or `not_ready` (answered 503).
    #[schema(schema_with = readiness_status_schema)]
    pub status: &'static str,
    pub model_loaded: bool,
    pub model_thread_alive: bool,
    /// Reported, not required: sampling does not use the registry, only the run-history
    /// routes do (they answer 503 while it is away).
    pub registry_reachable: bool,
    /// The model being served; null until one is loaded.
    pub model: Option<ModelRef>,
}

const READY: &str = "ready";
const NOT_READY: &str = "not_ready";

fn health_status_schema() -> utoipa::openapi::ObjectBuilder {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::Type::String)
        .enum_values(Some(["ok", "failing"]))
}

fn readiness_status_schema() -> utoipa::openapi::ObjectBuilder {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::Type::String)
        .enum_values(Some([READY, NOT_READY]))
}

/// Liveness: the process is up and its model thread alive. A 503 means it cannot recover
/// by itself (the model thread died): an orchestrator should restart it.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses(
        (status = 200, description = "Up.", body = Health),
        (status = 503, description = "Failing: restart the process.", body = Health),
    )
)]
pub(super) async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    let alive = state.batcher.is_alive();
    let status = match alive {
        true => StatusCode::OK,
        false => StatusCode::SERVICE_UNAVAILABLE,
    };
    let body = Health {
        status: if alive { "ok" } else { "failing" },
        model_thread_alive: alive,
    };
    (status, Json(body))
}

/// Readiness: a model is loaded and the model thread is alive. The registry's state is
/// reported but not required: a database outage leaves sampling up.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready.", body = Readiness),
        (status = 503, description = "Not ready; the body says why.", body = Readiness),
    )
)]
pub(super) async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let model = state.current.get().map(|m| ModelRef::from(&m.info()));
    let registry = state.registry.ping().await;
    let alive = state.batcher.is_alive();
    let ready = model.is_some() && alive;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Readiness {
        status: if ready { READY } else { NOT_READY },
        model_loaded: model.is_some(),
        model_thread_alive: alive,
        registry_reachable: registry.is_ok(),
        model,
    };
    (status, Json(body))
}

/// Prometheus metrics.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "OpenMetrics text format 1.0.0.", body = String,
            content_type = "application/openmetrics-text"),
    )
)]
pub(super) async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
}
