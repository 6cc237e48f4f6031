//! `POST /v1/samples`: validate, hand the samples to the batcher, encode what `Accept`
//! asks for.

use axum::{
    extract::{Path, State},
    http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::{delete, post},
    Json, Router,
};
use ddpm_core::{
    sampler::DpmSolverAlgorithm, AncestralVariance, SamplerConfig, SamplerKind, TimestepSpacing,
};
use serde::Serialize;
use utoipa::{
    openapi::{ObjectBuilder, Type},
    ToSchema,
};

use super::{
    extract::JsonBody,
    image::{ImageContext, ImageJson},
    model::ModelRef,
    stream, AppState,
};
use crate::{
    batcher::{GeneratedImage, StreamSink, Submission},
    encode::{self, Format},
    http::error::{ApiError, ErrorBody},
    model::ModelInfo,
    validate::{
        plan,
        samples::{Thresholding, DPM_ALGORITHMS, SAMPLERS, SPACINGS, THRESHOLDINGS, VARIANCES},
        Plan, SampleRequest,
    },
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/samples", post(create_samples))
        .route("/v1/samples/{id}", delete(cancel_sample))
}

/// The header that carries a sampling request's id: given by the client, or made up by
/// the server; answered on every accepted request.
pub const REQUEST_ID: &str = "x-ddpm-request-id";

/// The client's id for its request, if it gave one: 1 to 64 of `A–Z a–z 0–9 - _ .`.
fn client_request_id(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(REQUEST_ID) else {
        return Ok(None);
    };
    let id = value.to_str().unwrap_or("");
    let valid = (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !valid {
        return Err(ApiError::BadRequest(format!(
            "{REQUEST_ID} must be 1 to 64 characters of A-Z, a-z, 0-9, '-', '_' and '.'"
        )));
    }
    Ok(Some(id.to_owned()))
}

/// The JSON response.
#[derive(Debug, Serialize, ToSchema)]
pub struct SampleResponse {
    pub model: ModelRef,
    pub sampler: SamplerUsed,
    pub guidance_scale: f64,
    pub images: Vec<ImageJson>,
}

/// The sampler the images were made with, defaults filled in.
#[derive(Debug, Serialize, ToSchema)]
pub struct SamplerUsed {
    #[schema(schema_with = sampler_kind_schema)]
    pub kind: SamplerKind,
    pub steps: usize,
    pub eta: f64,
    #[schema(schema_with = timestep_spacing_schema)]
    pub timestep_spacing: TimestepSpacing,
    /// The ddpm sampler's σ² (fixed_small for the others, which do not read it).
    #[schema(schema_with = variance_type_schema)]
    pub variance_type: AncestralVariance,
    /// dpmpp_2m's solver (dpmsolver++ for the others, which do not read it).
    #[schema(schema_with = algorithm_type_schema)]
    pub algorithm_type: DpmSolverAlgorithm,
    #[schema(schema_with = thresholding_schema)]
    pub thresholding: Thresholding,
    /// With dynamic thresholding only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dynamic_thresholding_ratio: Option<f64>,
    /// With dynamic thresholding only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample_max_value: Option<f64>,
    pub guidance_rescale: f64,
    /// `[lo, hi]`; absent: guidance at every step.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<i64>>, min_items = 2, max_items = 2)]
    pub guidance_interval: Option<[i64; 2]>,
}

fn timestep_spacing_schema() -> ObjectBuilder {
    names_schema(&SPACINGS)
}

fn variance_type_schema() -> ObjectBuilder {
    names_schema(&VARIANCES)
}

fn thresholding_schema() -> ObjectBuilder {
    names_schema(&THRESHOLDINGS)
}

fn algorithm_type_schema() -> ObjectBuilder {
    names_schema(&DPM_ALGORITHMS)
}

/// A string naming one of `values` (by their serde names).
fn names_schema<T: Serialize>(values: &[T]) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(
            values.iter().filter_map(|v| serde_json::to_value(v).ok()),
        ))
}

fn sampler_kind_schema() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(
            SAMPLERS
                .iter()
                .filter_map(|kind| serde_json::to_value(kind).ok()),
        ))
}

/// A stream of Server-Sent Events (`text/event-stream`): text, as the document describes
/// it (the events are listed in the operation's description).
pub struct EventStreamBody;

impl utoipa::PartialSchema for EventStreamBody {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        ObjectBuilder::new().schema_type(Type::String).into()
    }
}

impl ToSchema for EventStreamBody {}

/// A file in the response body (PNG or ZIP).
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
pub struct FileBody(#[allow(dead_code)] Vec<u8>);

/// Generate images.
///
/// Samples join the model's step-level batch at its next iteration. The response follows
/// `Accept`: application/json (default), image/png (one PNG for n = 1, else a labelled
/// grid), application/zip (one PNG per image), or text/event-stream: Server-Sent Events
/// `queued` (first: the request's id and place in line), `progress` (at most 10 a
/// second), `preview` (with `preview_every`), `image` (one per image as it finishes), then
/// `done` or `error`. Closing the stream cancels the request. Every accepted request has
/// an id (`x-ddpm-request-id`; a client may choose it by sending that header), with which
/// `DELETE /v1/samples/{id}` cancels it.
#[utoipa::path(
    post,
    path = "/v1/samples",
    tag = "samples",
    request_body = SampleRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The images.",
            headers(
                ("x-ddpm-request-id" = String, description = "The request's id, for DELETE /v1/samples/{id}."),
                ("x-ddpm-run-id" = i64, description = "The run of the model that made them."),
                ("x-ddpm-step" = i64, description = "Its training step."),
                ("x-ddpm-checkpoint-id" = i64, description = "Its checkpoint."),
                ("x-ddpm-seeds" = String, description = "Each image's seed, comma-separated."),
                ("x-ddpm-classes" = String, description = "image/png: each image's class, comma-separated."),
                ("x-ddpm-grid-columns" = i64, description = "image/png of several images: the grid's columns."),
                ("x-ddpm-grid-rows" = i64, description = "image/png of several images: the grid's rows."),
            ),
            content(
                (SampleResponse = "application/json"),
                (FileBody = "image/png"),
                (FileBody = "application/zip"),
                (EventStreamBody = "text/event-stream"),
            )),
        (status = 400, description = "The body is not JSON, or x-ddpm-request-id is malformed.", body = ErrorBody),
        (status = 406, description = "None of the `Accept`ed types can be produced.", body = ErrorBody),
        (status = 408, description = "The body did not arrive within the server's body read timeout.", body = ErrorBody),
        (status = 413, description = "The body is too large.", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`.", body = ErrorBody),
        (status = 409, description = "The request was cancelled (`cancelled`), or its x-ddpm-request-id is in use (`conflict`).", body = ErrorBody),
        (status = 422, description = "A field is invalid, or the request needs more time than the server's timeout even alone (`too_costly`); the code says which.", body = ErrorBody),
        (status = 429, description = "The queue is full, or the work already accepted would not let this request finish in time.", body = ErrorBody,
            headers(("retry-after" = i64, description = "Seconds until the backlog leaves room for it."))),
        (status = 503, description = "No model is loaded yet, or the server is stopping.", body = ErrorBody,
            headers(("retry-after" = i64, description = "Seconds to wait."))),
        (status = 504, description = "Not finished within the server's request timeout.", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all, fields(n, checkpoint, id))]
pub(super) async fn create_samples(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(request): JsonBody<SampleRequest>,
) -> Result<Response, ApiError> {
    let format = encode::negotiate(headers.get(header::ACCEPT).map(HeaderValue::as_bytes))?;
    let name = client_request_id(&headers)?;
    let model = state.current.get().ok_or(ApiError::NoModel)?;
    let info = model.info();
    let plan = plan(
        &request,
        &info,
        model.is_conditional(),
        &state.settings.samples,
    )?;
    tracing::Span::current()
        .record("n", plan.specs.len())
        .record("checkpoint", info.checkpoint_id);
    let sampler = plan.specs[0].sampler;
    let guidance_scale = plan.specs[0].guidance_scale;
    let mut submission = Submission {
        timeout: state.settings.request_timeout,
        priority: plan.priority,
        name,
        stream: None,
    };
    if format == Format::EventStream {
        let (progress, progress_rx) = tokio::sync::watch::channel(Default::default());
        let (items, items_rx) = tokio::sync::mpsc::unbounded_channel();
        submission.stream = Some(StreamSink {
            progress,
            items,
            preview_every: plan.preview_every,
        });
        let ticket = state
            .batcher
            .submit(model, plan.specs.clone(), submission)?;
        tracing::Span::current().record("id", &ticket.name);
        let id = ticket.name.clone();
        let context = ImageContext {
            class_names: plan.class_names,
            info,
        };
        let response = stream::respond(ticket, progress_rx, items_rx, context, sampler.steps);
        return Ok(with_headers(
            response,
            vec![(HeaderName::from_static(REQUEST_ID), id)],
        ));
    }
    // preview_every is for streams only; a plain response has nowhere to put previews.
    let ticket = state
        .batcher
        .submit(model, plan.specs.clone(), submission)?;
    tracing::Span::current().record("id", &ticket.name);
    let id = ticket.name.clone();
    let images = ticket.wait().await?;
    let labels: Vec<String> = plan
        .class_names
        .iter()
        .map(|c| c.clone().unwrap_or_else(|| "unconditional".into()))
        .collect();
    let encoded = tokio::task::spawn_blocking(move || {
        encode_response(
            format,
            &images,
            &plan,
            &labels,
            &info,
            sampler,
            guidance_scale,
        )
    })
    .await
    .map_err(ApiError::internal)??;
    Ok(with_headers(
        encoded,
        vec![(HeaderName::from_static(REQUEST_ID), id)],
    ))
}

/// What `DELETE /v1/samples/{id}` answers.
#[derive(Debug, Serialize, ToSchema)]
pub struct CancelResponse {
    pub id: String,
    /// Always `cancelling`: the samples leave the model's batch at its next step, and the
    /// request is answered 409 `cancelled` (a stream ends with an `error` event).
    pub status: String,
}

/// Cancel a sampling request in flight.
///
/// The id is the request's `x-ddpm-request-id` (or the `id` of its stream's `queued`
/// event). Its samples leave the batch at the model's next step.
#[utoipa::path(
    delete,
    path = "/v1/samples/{id}",
    tag = "samples",
    params(("id" = String, Path, description = "The request's id.")),
    security(("bearer" = [])),
    responses(
        (status = 202, description = "The request is being cancelled.", body = CancelResponse),
        (status = 404, description = "No request in flight has this id.", body = ErrorBody),
    )
)]
pub(super) async fn cancel_sample(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if !state.batcher.cancel(&id) {
        return Err(ApiError::NotFound(format!(
            "no sampling request {id:?} is in flight"
        )));
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(CancelResponse {
            id,
            status: "cancelling".into(),
        }),
    )
        .into_response())
}

fn model_headers(info: &ModelInfo, images: &[GeneratedImage]) -> Vec<(HeaderName, String)> {
    let seeds: Vec<String> = images.iter().map(|i| i.seed.to_string()).collect();
    vec![
        (
            HeaderName::from_static("x-ddpm-run-id"),
            info.run_id.to_string(),
        ),
        (
            HeaderName::from_static("x-ddpm-step"),
            info.step.to_string(),
        ),
        (
            HeaderName::from_static("x-ddpm-checkpoint-id"),
            info.checkpoint_id.to_string(),
        ),
        (HeaderName::from_static("x-ddpm-seeds"), seeds.join(",")),
    ]
}

fn with_headers(mut response: Response, headers: Vec<(HeaderName, String)>) -> Response {
    for (name, value) in headers {
        if let Ok(value) = HeaderValue::from_str(&value) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

/// A file-name-safe version of a label.
fn safe_name(label: &str) -> String {
    label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect()
}

fn encode_response(
    format: Format,
    images: &[GeneratedImage],
    plan: &Plan,
    labels: &[String],
    info: &ModelInfo,
    sampler: SamplerConfig,
    guidance_scale: f64,
) -> Result<Response, ApiError> {
    let mut headers = model_headers(info, images);
    let response = match format {
        // A stream is answered before encoding; it never gets here.
        Format::Json | Format::EventStream => {
            let context = ImageContext {
                class_names: plan.class_names.clone(),
                info: info.clone(),
            };
            let items = images
                .iter()
                .enumerate()
                .map(|(index, image)| context.image_json(index, image))
                .collect::<Result<Vec<_>, ApiError>>()?;
            Json(SampleResponse {
                model: ModelRef::from(info),
                sampler: SamplerUsed {
                    kind: sampler.kind,
                    steps: sampler.steps,
                    eta: sampler.eta,
                    timestep_spacing: sampler.spacing,
                    variance_type: sampler.variance,
                    algorithm_type: sampler.dpm_solver,
                    thresholding: match (sampler.clip_denoised, sampler.dynamic_thresholding) {
                        (false, _) => Thresholding::None,
                        (true, None) => Thresholding::Static,
                        (true, Some(_)) => Thresholding::Dynamic,
                    },
                    dynamic_thresholding_ratio: sampler.dynamic_thresholding.map(|d| d.ratio),
                    sample_max_value: sampler.dynamic_thresholding.map(|d| d.max_value),
                    guidance_rescale: sampler.guidance_rescale,
                    guidance_interval: sampler.guidance_interval.map(|(lo, hi)| [lo, hi]),
                },
                guidance_scale,
                images: items,
            })
            .into_response()
        }
        Format::Png => {
            let bytes = match images {
                [one] => encode::png(one).map_err(ApiError::internal)?,
                _ => {
                    let (bytes, layout) =
                        encode::grid(images, labels).map_err(ApiError::internal)?;
                    headers.push((
                        HeaderName::from_static("x-ddpm-grid-columns"),
                        layout.columns.to_string(),
                    ));
                    headers.push((
                        HeaderName::from_static("x-ddpm-grid-rows"),
                        layout.rows.to_string(),
                    ));
                    bytes
                }
            };
            headers.push((HeaderName::from_static("x-ddpm-classes"), labels.join(",")));
            ([(header::CONTENT_TYPE, "image/png")], bytes).into_response()
        }
        Format::Zip => {
            let names: Vec<String> = images
                .iter()
                .zip(labels)
                .enumerate()
                .map(|(i, (image, label))| {
                    format!("{i:03}-{}-seed{}.png", safe_name(label), image.seed)
                })
                .collect();
            let bytes = encode::zip(images, &names).map_err(ApiError::internal)?;
            (
                [
                    (header::CONTENT_TYPE, "application/zip"),
                    (
                        header::CONTENT_DISPOSITION,
                        "attachment; filename=\"samples.zip\"",
                    ),
                ],
                bytes,
            )
                .into_response()
        }
    };
    Ok(with_headers(response, headers))
}
