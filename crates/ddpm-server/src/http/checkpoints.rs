//! One checkpoint: its record with the trainer's score (`GET /v1/checkpoints/{id}`), the
//! sample grid the trainer drew beside it (`GET /v1/checkpoints/{id}/grid.png`), and its
//! promotion (`POST /v1/checkpoints/{id}/promote`, run control: it needs the token), which
//! servers with `--serve-policy promoted` follow.

use axum::{
    extract::State,
    http::header,
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use chrono::{DateTime, Utc};
use ddpm_registry::{CheckpointKind, CheckpointRecord, CheckpointStore, Promotion, RegistryError};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{
    extract::{JsonBody, PathId},
    runs::CheckpointBody,
    samples::FileBody,
    AppState, ControlAllowed,
};
use crate::{
    http::error::{ApiError, ErrorBody},
    validate::ValidationError,
};

/// Longest `reason` or `by` accepted.
const MAX_TEXT: usize = 1000;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/checkpoints/{id}", get(get_checkpoint))
        .route("/v1/checkpoints/{id}/grid.png", get(checkpoint_grid))
        .route("/v1/checkpoints/{id}/promote", post(promote_checkpoint))
}

/// The `{id}` of the checkpoint routes.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
struct CheckpointIdParam {
    /// Checkpoint id.
    #[param(schema_with = super::extract::path_id_schema, required = true)]
    id: i64,
}

async fn find(state: &AppState, id: i64) -> Result<CheckpointRecord, ApiError> {
    state
        .registry
        .get_checkpoint(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("checkpoint {id} not found")))
}

/// One checkpoint, with its score.
#[utoipa::path(
    get,
    path = "/v1/checkpoints/{id}",
    tag = "runs",
    params(CheckpointIdParam),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The checkpoint and, for a scored EMA checkpoint, its score.", body = CheckpointBody),
        (status = 404, description = "No such checkpoint.", body = ErrorBody),
        (status = 422, description = "The id is not an integer.", body = ErrorBody),
        (status = 503, description = "The run registry is unavailable.", body = ErrorBody,
            headers(("retry-after" = i64, description = "Seconds to wait."))),
    )
)]
#[tracing::instrument(skip_all, fields(checkpoint = id))]
pub(super) async fn get_checkpoint(
    State(state): State<AppState>,
    PathId(id): PathId,
) -> Result<Json<CheckpointBody>, ApiError> {
    let record = find(&state, id).await?;
    let score = state.registry.score_at(record.run_id, record.step).await?;
    Ok(Json(CheckpointBody::scored(record, score.as_slice())))
}

/// The sample grid the trainer drew with an EMA checkpoint (a row per class).
#[utoipa::path(
    get,
    path = "/v1/checkpoints/{id}/grid.png",
    tag = "runs",
    params(CheckpointIdParam),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The grid.", content((FileBody = "image/png"))),
        (status = 404, description = "No such checkpoint, or it has no grid (a training state; a run without grids).", body = ErrorBody),
        (status = 422, description = "The id is not an integer.", body = ErrorBody),
        (status = 503, description = "The run registry or the checkpoint store is unavailable.", body = ErrorBody,
            headers(("retry-after" = i64, description = "Seconds to wait."))),
    )
)]
#[tracing::instrument(skip_all, fields(checkpoint = id))]
pub(super) async fn checkpoint_grid(
    State(state): State<AppState>,
    PathId(id): PathId,
) -> Result<Response, ApiError> {
    let record = find(&state, id).await?;
    if record.kind != CheckpointKind::Ema {
        return Err(ApiError::NotFound(format!(
            "checkpoint {id} is a training state: only EMA checkpoints have a grid"
        )));
    }
    let grid = CheckpointStore::grid_path_for(std::path::Path::new(&record.path));
    let store = state.store.clone();
    let read = tokio::task::spawn_blocking(move || store.read(&grid)).await;
    match read {
        Ok(Ok(bytes)) => Ok(([(header::CONTENT_TYPE, "image/png")], bytes).into_response()),
        Ok(Err(RegistryError::ObjectMissing(_))) => Err(ApiError::NotFound(format!(
            "checkpoint {id} has no sample grid"
        ))),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "sample grid unreadable");
            Err(ApiError::Unavailable(
                "the checkpoint store is unavailable".into(),
            ))
        }
        Err(e) => {
            tracing::warn!(error = %e, "sample grid read did not finish");
            Err(ApiError::Unavailable(
                "the checkpoint store is unavailable".into(),
            ))
        }
    }
}

/// A promotion's why and who. "Not blank" is, in the document, a character outside
/// Unicode's White_Space (the set `str::trim` removes), listed one by one: `\S` would not
/// do, as JSON Schema's regular expressions are ECMAScript's, whose `\s` is another set
/// (without U+0085, with U+FEFF).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PromoteRequest {
    /// Why this checkpoint should be served (recorded; not blank).
    #[schema(
        min_length = 1,
        max_length = 1000,
        pattern = r"[^\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
    )]
    pub reason: String,
    /// Who promotes it (recorded; not blank; default `api`).
    #[schema(
        min_length = 1,
        max_length = 1000,
        pattern = r"[^\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
    )]
    pub by: Option<String>,
}

/// A recorded promotion.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Promotion)]
pub struct PromotionBody {
    pub id: i64,
    pub checkpoint_id: i64,
    pub run_id: i64,
    pub step: i64,
    pub promoted_by: String,
    pub reason: String,
    pub created_at: DateTime<Utc>,
    /// Set when a rollback revoked it.
    pub revoked_at: Option<DateTime<Utc>>,
    pub revoked_by: Option<String>,
}

impl From<Promotion> for PromotionBody {
    fn from(p: Promotion) -> Self {
        let Promotion {
            id,
            checkpoint_id,
            run_id,
            step,
            promoted_by,
            reason,
            created_at,
            revoked_at,
            revoked_by,
        } = p;
        PromotionBody {
            id,
            checkpoint_id,
            run_id,
            step,
            promoted_by,
            reason,
            created_at,
            revoked_at,
            revoked_by,
        }
    }
}

/// Promotes an EMA checkpoint: servers with `--serve-policy promoted` swap to it (at
/// once on PostgreSQL, at their next poll on SQLite). `ddpm-trainer checkpoints
/// rollback` revokes it.
#[utoipa::path(
    post,
    path = "/v1/checkpoints/{id}/promote",
    tag = "runs",
    params(CheckpointIdParam),
    request_body = PromoteRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The promotion, now in force.", body = PromotionBody),
        (status = 400, description = "The body is not JSON.", body = ErrorBody),
        (status = 403, description = "Run control is disabled: the server has no API token.",
            body = ErrorBody),
        (status = 404, description = "No such checkpoint.", body = ErrorBody),
        (status = 409, description = "The checkpoint is a training state, which is never served.",
            body = ErrorBody),
        (status = 413, description = "The body is too large.", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`.", body = ErrorBody),
        (status = 422, description = "Invalid id or body.", body = ErrorBody),
        (status = 503, description = "The run registry is unavailable.", body = ErrorBody,
            headers(("retry-after" = i64, description = "Seconds to wait."))),
    )
)]
#[tracing::instrument(skip_all, fields(checkpoint = id))]
pub(super) async fn promote_checkpoint(
    _: ControlAllowed,
    State(state): State<AppState>,
    PathId(id): PathId,
    JsonBody(request): JsonBody<PromoteRequest>,
) -> Result<Json<PromotionBody>, ApiError> {
    let by = request.by.unwrap_or_else(|| "api".into());
    for (field, text) in [("reason", &request.reason), ("by", &by)] {
        if text.trim().is_empty() || text.chars().count() > MAX_TEXT {
            return Err(ValidationError::Request(format!(
                "{field} must be 1 to {MAX_TEXT} characters, not blank"
            ))
            .into());
        }
    }
    let record = find(&state, id).await?;
    if record.kind != CheckpointKind::Ema {
        return Err(ApiError::Conflict(format!(
            "checkpoint {id} is a training state: only EMA checkpoints are served"
        )));
    }
    let promotion = state
        .registry
        .promote_checkpoint(id, &by, &request.reason)
        .await?;
    tracing::info!(by = %promotion.promoted_by, reason = %promotion.reason, "checkpoint promoted");
    Ok(Json(promotion.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented pattern lists exactly the characters `trim` removes, so a text is
    /// refused as blank exactly when the document says it does not match.
    #[test]
    fn not_blank_is_what_trim_leaves() {
        let escape = |c: char| match c {
            '\t' => r"\t".to_string(),
            '\r' => r"\r".to_string(),
            ' ' => " ".to_string(),
            c => format!(r"\u{:04x}", c as u32),
        };
        let mut ranges: Vec<(char, char)> = Vec::new();
        for c in (0..=u32::from(char::MAX)).filter_map(char::from_u32) {
            if !c.is_whitespace() {
                continue;
            }
            match ranges.last_mut() {
                Some((_, last)) if u32::from(*last) + 1 == u32::from(c) => *last = c,
                _ => ranges.push((c, c)),
            }
        }
        let class: String = ranges
            .into_iter()
            .map(|(first, last)| match u32::from(last) - u32::from(first) {
                0 => escape(first),
                1 => escape(first) + &escape(last),
                _ => format!("{}-{}", escape(first), escape(last)),
            })
            .collect();
        let schema =
            serde_json::to_value(<PromoteRequest as utoipa::PartialSchema>::schema()).unwrap();
        for field in ["reason", "by"] {
            let pattern = &schema["properties"][field]["pattern"];
            assert_eq!(
                pattern.as_str(),
                Some(format!("[^{class}]").as_str()),
                "{field}"
            );
        }
        assert!("\u{85}".trim().is_empty());
    }
}
