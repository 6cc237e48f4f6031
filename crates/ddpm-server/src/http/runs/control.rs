//! An operator's commands on runs: cancel, restart, delete (the registry's
//! `ddpm_registry::Registry::{cancel_run, restart_run, delete_run}`, whose one statement
//! or transaction each races safely with the workers). They change state, so each takes
//! [`ControlAllowed`] first: with a token they need it, and a server without one refuses
//! them (403). A command the run's state does not allow is 409 `conflict`, with the
//! registry's reason.

use axum::{extract::State, Json};
use serde::Deserialize;
use utoipa::ToSchema;

use super::{RunBody, RunIdParam};
use crate::{
    http::error::{ApiError, ErrorBody},
    http::{
        extract::{OptionalJsonBody, PathId},
        AppState, ControlAllowed,
    },
};

/// Cancels a run. A queued or interrupted run is cancelled at once; a running one gets
/// `cancel_requested_at`, and its worker saves a training state and ends it as
/// cancelled at its next heartbeat. Cancelling a cancelled run changes nothing.
#[utoipa::path(
    post,
    path = "/v1/runs/{id}/cancel",
    tag = "runs",
    params(RunIdParam),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The run: `cancelled`, or still `running` with \
            `cancel_requested_at` set until its worker stops.", body = RunBody),
        (status = 403, description = "Run control is disabled: the server has no API token.",
            body = ErrorBody),
        (status = 404, description = "No such run.", body = ErrorBody),
        (status = 409, description = "The run has ended already (completed or failed).",
            body = ErrorBody),
        (status = 422, description = "The id is not an integer.", body = ErrorBody),
        (status = 503, description = "The run registry is unavailable.", body = ErrorBody,
            headers(("retry-after" = i64, description = "Seconds to wait."))),
    )
)]
#[tracing::instrument(skip_all, fields(run = id))]
pub(in crate::http) async fn cancel_run(
    _: ControlAllowed,
    State(state): State<AppState>,
    PathId(id): PathId,
) -> Result<Json<RunBody>, ApiError> {
    let run = state.registry.cancel_run(id).await?;
    tracing::info!(status = %run.status, "cancel requested");
    Ok(Json(run.into()))
}

/// How to restart a run. The body may be left out: it then resumes.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestartRequest {
    /// Start over: delete the run's checkpoints and metrics and queue it at step 0
    /// (allowed for any run that is not queued or running). Without it a failed,
    /// cancelled or interrupted run becomes interrupted and a trainer resumes it from
    /// its newest training state, keeping its history.
    #[serde(default)]
    #[schema(default = false)]
    pub from_scratch: bool,
}

/// Restarts a run: resumes a failed, cancelled or interrupted one, or, with
/// `from_scratch`, starts any run that is not queued or running over.
#[utoipa::path(
    post,
    path = "/v1/runs/{id}/restart",
    tag = "runs",
    params(RunIdParam),
    request_body(content = Option<RestartRequest>,
        description = "Optional: an empty body (or `null`) resumes (`from_scratch` false).",
        content_type = "application/json"),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The run: `interrupted` (a trainer resumes it), or \
            `queued` at step 0 from scratch.", body = RunBody),
        (status = 400, description = "The body is not JSON.", body = ErrorBody),
        (status = 403, description = "Run control is disabled: the server has no API token.",
            body = ErrorBody),
        (status = 404, description = "No such run.", body = ErrorBody),
        (status = 409, description = "The run's status does not allow it: it is queued or \
            running, or completed (only a restart from scratch trains it again).",
            body = ErrorBody),
        (status = 413, description = "The body is too large.", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`.", body = ErrorBody),
        (status = 422, description = "The id is not an integer, or the body does not match \
            the schema.", body = ErrorBody),
        (status = 503, description = "The run registry is unavailable.", body = ErrorBody,
            headers(("retry-after" = i64, description = "Seconds to wait."))),
    )
)]
#[tracing::instrument(skip_all, fields(run = id))]
pub(in crate::http) async fn restart_run(
    _: ControlAllowed,
    State(state): State<AppState>,
    PathId(id): PathId,
    OptionalJsonBody(request): OptionalJsonBody<RestartRequest>,
) -> Result<Json<RunBody>, ApiError> {
    let run = state
        .registry
        .restart_run(id, request.from_scratch, &state.store)
        .await?;
    tracing::info!(from_scratch = request.from_scratch, status = %run.status, "restarted");
    Ok(Json(run.into()))
}

/// Deletes a run: its checkpoints, metrics and files. Refused while it runs (cancel it
/// and wait for it to stop).
#[utoipa::path(
    delete,
    path = "/v1/runs/{id}",
    tag = "runs",
    params(RunIdParam),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The run as it was before it was deleted.", body = RunBody),
        (status = 403, description = "Run control is disabled: the server has no API token.",
            body = ErrorBody),
        (status = 404, description = "No such run.", body = ErrorBody),
        (status = 409, description = "The run is running: cancel it and wait for it to stop.",
            body = ErrorBody),
        (status = 422, description = "The id is not an integer.", body = ErrorBody),
        (status = 503, description = "The run registry is unavailable.", body = ErrorBody,
            headers(("retry-after" = i64, description = "Seconds to wait."))),
    )
)]
#[tracing::instrument(skip_all, fields(run = id))]
pub(in crate::http) async fn delete_run(
    _: ControlAllowed,
    State(state): State<AppState>,
    PathId(id): PathId,
) -> Result<Json<RunBody>, ApiError> {
    let run = state.registry.delete_run(id, &state.store).await?;
    tracing::info!(status = %run.status, "deleted");
    Ok(Json(run.into()))
}
