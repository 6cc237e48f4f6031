//! The training runs' history from the registry: runs, their metric series, their
//! checkpoints; and, in [`control`], an operator's commands on them.

mod body;
pub(super) mod control;

use axum::{
    extract::State,
    routing::{get, post},
    Json, Router,
};
use serde::Serialize;
use utoipa::{IntoParams, ToSchema};

pub use body::{CheckpointBody, MetricPointBody, RunBody, ScoreBody};

use super::{
    extract::{PathId, QueryParams},
    AppState,
};
use crate::{
    http::error::{ApiError, ErrorBody},
    validate::{MetricsQuery, RunsQuery},
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/runs", get(list_runs))
        .route("/v1/runs/{id}", get(get_run).delete(control::delete_run))
        .route("/v1/runs/{id}/metrics", get(run_metrics))
        .route("/v1/runs/{id}/checkpoints", get(run_checkpoints))
        .route("/v1/runs/{id}/cancel", post(control::cancel_run))
        .route("/v1/runs/{id}/restart", post(control::restart_run))
}

/// The `{id}` of the run routes, as [`PathId`] parses it (the document's view of it).
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
struct RunIdParam {
    /// Run id.
    #[param(schema_with = super::extract::path_id_schema, required = true)]
    id: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RunsPage {
    pub runs: Vec<RunBody>,
    /// Runs matching the filter, on all pages.
    pub total: i64,
    pub limit: i64,
    pub offset: i64,
}

/// Training runs, newest first.
#[utoipa::path(
    get,
    path = "/v1/runs",
    tag = "runs",
    params(RunsQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of runs.", body = RunsPage),
        (status = 422, description = "Invalid query.", body = ErrorBody),
        (status = 503, description = "The run registry is unavailable.", body = ErrorBody,
            headers(("retry-after" = i64, description = "Seconds to wait."))),
    )
)]
#[tracing::instrument(skip_all)]
pub(super) async fn list_runs(
    State(state): State<AppState>,
    QueryParams(q): QueryParams<RunsQuery>,
) -> Result<Json<RunsPage>, ApiError> {
    let filter = q.validate()?;
    let runs = state
        .registry
        .list_runs(filter.status, filter.limit, filter.offset)
        .await?;
    let total = state.registry.count_runs(filter.status).await?;
    Ok(Json(RunsPage {
        runs: runs.into_iter().map(RunBody::from).collect(),
        total,
        limit: filter.limit,
        offset: filter.offset,
    }))
}

async fn find_run(state: &AppState, id: i64) -> Result<ddpm_registry::Run, ApiError> {
    state
        .registry
        .get_run(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("run {id} not found")))
}

/// One run.
#[utoipa::path(
    get,
    path = "/v1/runs/{id}",
    tag = "runs",
    params(RunIdParam),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The run.", body = RunBody),
        (status = 404, description = "No such run.", body = ErrorBody),
        (status = 422, description = "The id is not an integer.", body = ErrorBody),
        (status = 503, description = "The run registry is unavailable.", body = ErrorBody,
            headers(("retry-after" = i64, description = "Seconds to wait."))),
    )
)]
#[tracing::instrument(skip_all, fields(run = id))]
pub(super) async fn get_run(
    State(state): State<AppState>,
    PathId(id): PathId,
) -> Result<Json<RunBody>, ApiError> {
    Ok(Json(find_run(&state, id).await?.into()))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MetricSeries {
    pub run_id: i64,
    pub from_step: Option<i64>,
    pub to_step: Option<i64>,
    pub max_points: usize,
    /// Evenly spaced, the newest always included; empty when `from_step` is after
    /// `to_step`.
    #[schema(inline)]
    pub points: Vec<MetricPointBody>,
    /// The checkpoints' scores in the same step range, by step (all of them: one per
    /// checkpoint, far fewer than the points).
    pub scores: Vec<ScoreBody>,
}

/// A run's metric series, downsampled.
#[utoipa::path(
    get,
    path = "/v1/runs/{id}/metrics",
    tag = "runs",
    params(RunIdParam, MetricsQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Evenly spaced points, the newest always included.", body = MetricSeries),
        (status = 404, description = "No such run.", body = ErrorBody),
        (status = 422, description = "Invalid id or query.", body = ErrorBody),
        (status = 503, description = "The run registry is unavailable.", body = ErrorBody,
            headers(("retry-after" = i64, description = "Seconds to wait."))),
    )
)]
#[tracing::instrument(skip_all, fields(run = id))]
pub(super) async fn run_metrics(
    State(state): State<AppState>,
    PathId(id): PathId,
    QueryParams(q): QueryParams<MetricsQuery>,
) -> Result<Json<MetricSeries>, ApiError> {
    let range = q.validate()?;
    find_run(&state, id).await?;
    let (points, scores) = if range.is_empty() {
        (Vec::new(), Vec::new())
    } else {
        let points = state
            .registry
            .metrics(id, range.from_step, range.to_step, range.max_points)
            .await?;
        let in_range = |step: i64| {
            range.from_step.is_none_or(|from| step >= from)
                && range.to_step.is_none_or(|to| step <= to)
        };
        let scores = state.registry.scores(id).await?;
        let scores = scores.into_iter().filter(|s| in_range(s.step)).collect();
        (points, scores)
    };
    Ok(Json(MetricSeries {
        run_id: id,
        from_step: range.from_step,
        to_step: range.to_step,
        max_points: range.max_points,
        points: points.into_iter().map(MetricPointBody::from).collect(),
        scores: scores.into_iter().map(ScoreBody::from).collect::<Vec<_>>(),
    }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Checkpoints {
    pub run_id: i64,
    /// By step.
    pub checkpoints: Vec<CheckpointBody>,
}

/// A run's checkpoints.
#[utoipa::path(
    get,
    path = "/v1/runs/{id}/checkpoints",
    tag = "runs",
    params(RunIdParam),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "By step.", body = Checkpoints),
        (status = 404, description = "No such run.", body = ErrorBody),
        (status = 422, description = "The id is not an integer.", body = ErrorBody),
        (status = 503, description = "The run registry is unavailable.", body = ErrorBody,
            headers(("retry-after" = i64, description = "Seconds to wait."))),
    )
)]
#[tracing::instrument(skip_all, fields(run = id))]
pub(super) async fn run_checkpoints(
    State(state): State<AppState>,
    PathId(id): PathId,
) -> Result<Json<Checkpoints>, ApiError> {
    find_run(&state, id).await?;
    let checkpoints = state.registry.list_checkpoints(id).await?;
    let scores = state.registry.scores(id).await?;
    Ok(Json(Checkpoints {
        run_id: id,
        checkpoints: checkpoints
            .into_iter()
            .map(|c| CheckpointBody::scored(c, &scores))
            .collect(),
    }))
}
