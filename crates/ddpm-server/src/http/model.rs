//! `GET /v1/model`: the checkpoint being served.

use axum::{extract::State, routing::get, Json, Router};
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use crate::{
    http::error::{ApiError, ErrorBody},
    model::ModelInfo,
};

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/model", get(current_model))
}

/// Which checkpoint made something: in sampling responses and the readiness check.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelRef {
    pub checkpoint_id: i64,
    pub run_id: i64,
    pub step: i64,
}

impl From<&ModelInfo> for ModelRef {
    fn from(info: &ModelInfo) -> Self {
        ModelRef {
            checkpoint_id: info.checkpoint_id,
            run_id: info.run_id,
            step: info.step,
        }
    }
}

/// The checkpoint being served.
#[utoipa::path(
    get,
    path = "/v1/model",
    tag = "model",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The model.", body = ModelInfo),
        (status = 503, description = "No model is loaded yet.", body = ErrorBody,
            headers(("retry-after" = i64, description = "Seconds to wait."))),
    )
)]
pub(super) async fn current_model(
    State(state): State<AppState>,
) -> Result<Json<ModelInfo>, ApiError> {
    let model = state.current.get().ok_or(ApiError::NoModel)?;
    Ok(Json(model.info()))
}
