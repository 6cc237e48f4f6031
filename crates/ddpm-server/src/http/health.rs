//! Liveness, readiness and the Prometheus metrics.

use axum::{
    extract::State,
    http::{header, StatusCode},
    response::IntoResponse,
    routing::get,
    Json, Router,
};
use serde_json::json;

use super::AppState;

/// `/healthz` and `/readyz`: never behind the bearer token.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

pub fn metrics_router() -> Router<AppState> {
    Router::new().route("/metrics", get(metrics))
}

/// The process is up and answering.
async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

/// Ready to serve samples: a model is loaded and the registry answers.
async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let model = state.current.get().map(|m| m.info());
    let registry = state.registry.ping().await;
    let ready = model.is_some() && registry.is_ok();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "model_loaded": model.is_some(),
        "registry_reachable": registry.is_ok(),
        "model": model.map(|m| json!({ "checkpoint_id": m.checkpoint_id, "run_id": m.run_id, "step": m.step })),
    });
    (status, Json(body))
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}
