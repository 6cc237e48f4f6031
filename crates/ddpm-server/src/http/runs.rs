//! The training runs' history from the registry: runs, their metric series, their
//! checkpoints.

use axum::{extract::State, routing::get, Json, Router};
use ddpm_registry::{CheckpointRecord, MetricPoint, Run, RunStatus};
use serde::{Deserialize, Serialize};

use super::{
    extract::{PathId, QueryParams},
    AppState,
};
use crate::error::ApiError;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/runs", get(list_runs))
        .route("/v1/runs/{id}", get(get_run))
        .route("/v1/runs/{id}/metrics", get(run_metrics))
        .route("/v1/runs/{id}/checkpoints", get(run_checkpoints))
}

/// Runs per page when the client gives no `limit`.
pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 500;
/// Metric points when the client gives no `max_points`.
pub const DEFAULT_MAX_POINTS: usize = 500;
pub const MAX_POINTS: usize = 10_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunsQuery {
    status: Option<String>,
    limit: Option<i64>,
    offset: Option<i64>,
}

#[derive(Debug, Serialize)]
struct RunsPage {
    runs: Vec<Run>,
    total: i64,
    limit: i64,
    offset: i64,
}

#[tracing::instrument(skip_all)]
async fn list_runs(
    State(state): State<AppState>,
    QueryParams(q): QueryParams<RunsQuery>,
) -> Result<Json<RunsPage>, ApiError> {
    let status = q
        .status
        .as_deref()
        .map(|s| {
            s.parse::<RunStatus>().map_err(|_| {
                ApiError::validation(
                    "invalid_status",
                    format!("unknown status {s:?}: use queued, running, completed, failed or interrupted"),
                )
            })
        })
        .transpose()?;
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::validation(
            "invalid_query",
            format!("limit must be in 1..={MAX_LIMIT}, got {limit}"),
        ));
    }
    let offset = q.offset.unwrap_or(0);
    if offset < 0 {
        return Err(ApiError::validation(
            "invalid_query",
            format!("offset must not be negative, got {offset}"),
        ));
    }
    let runs = state.registry.list_runs(status, limit, offset).await?;
    let total = state.registry.count_runs(status).await?;
    Ok(Json(RunsPage {
        runs,
        total,
        limit,
        offset,
    }))
}

async fn find_run(state: &AppState, id: i64) -> Result<Run, ApiError> {
    state
        .registry
        .get_run(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("run {id} not found")))
}

#[tracing::instrument(skip_all, fields(run = id))]
async fn get_run(State(state): State<AppState>, PathId(id): PathId) -> Result<Json<Run>, ApiError> {
    Ok(Json(find_run(&state, id).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsQuery {
    from_step: Option<i64>,
    to_step: Option<i64>,
    max_points: Option<usize>,
}

#[derive(Debug, Serialize)]
struct MetricSeries {
    run_id: i64,
    from_step: Option<i64>,
    to_step: Option<i64>,
    max_points: usize,
    points: Vec<MetricPoint>,
}

#[tracing::instrument(skip_all, fields(run = id))]
async fn run_metrics(
    State(state): State<AppState>,
    PathId(id): PathId,
    QueryParams(q): QueryParams<MetricsQuery>,
) -> Result<Json<MetricSeries>, ApiError> {
    let max_points = q.max_points.unwrap_or(DEFAULT_MAX_POINTS);
    if !(1..=MAX_POINTS).contains(&max_points) {
        return Err(ApiError::validation(
            "invalid_query",
            format!("max_points must be in 1..={MAX_POINTS}, got {max_points}"),
        ));
    }
    if let (Some(from), Some(to)) = (q.from_step, q.to_step) {
        if from > to {
            return Err(ApiError::validation(
                "invalid_query",
                format!("from_step {from} is after to_step {to}"),
            ));
        }
    }
    find_run(&state, id).await?;
    let points = state
        .registry
        .metrics(id, q.from_step, q.to_step, max_points)
        .await?;
    Ok(Json(MetricSeries {
        run_id: id,
        from_step: q.from_step,
        to_step: q.to_step,
        max_points,
        points,
    }))
}

#[derive(Debug, Serialize)]
struct Checkpoints {
    run_id: i64,
    checkpoints: Vec<CheckpointRecord>,
}

#[tracing::instrument(skip_all, fields(run = id))]
async fn run_checkpoints(
    State(state): State<AppState>,
    PathId(id): PathId,
) -> Result<Json<Checkpoints>, ApiError> {
    find_run(&state, id).await?;
    let checkpoints = state.registry.list_checkpoints(id).await?;
    Ok(Json(Checkpoints {
        run_id: id,
        checkpoints,
    }))
}
