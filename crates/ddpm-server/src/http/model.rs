//! `GET /v1/model`: the checkpoint being served.

use axum::{extract::State, routing::get, Json, Router};

use super::AppState;
use crate::{error::ApiError, model::ModelInfo};

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/model", get(current_model))
}

async fn current_model(State(state): State<AppState>) -> Result<Json<ModelInfo>, ApiError> {
    let model = state.current.get().ok_or(ApiError::NoModel)?;
    Ok(Json(model.info()))
}
