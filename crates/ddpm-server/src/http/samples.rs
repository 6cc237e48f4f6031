//! `POST /v1/samples`: validate, hand the samples to the batcher, encode what `Accept`
//! asks for.

use axum::{
    extract::State,
    http::{header, HeaderMap, HeaderName, HeaderValue},
    response::{IntoResponse, Response},
    routing::post,
    Json, Router,
};
use base64::Engine;
use ddpm_core::{SamplerConfig, SamplerKind};
use serde::Serialize;
use utoipa::{
    openapi::{ObjectBuilder, Type},
    ToSchema,
};

use super::{extract::JsonBody, model::ModelRef, AppState};
use crate::{
    batcher::GeneratedImage,
    encode::{self, Format},
    error::{ApiError, ErrorBody},
    model::ModelInfo,
    validate::{plan, samples::SAMPLERS, Plan, SampleRequest},
};

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/samples", post(create_samples))
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
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ImageJson {
    pub index: usize,
    /// The class name; null for an unconditional image.
    pub class: Option<String>,
    pub class_index: Option<i64>,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    pub run_id: i64,
    pub step: i64,
    /// The PNG file, base64 (standard alphabet, padded).
    #[schema(content_encoding = "base64", content_media_type = "image/png")]
    pub png_base64: String,
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

/// A file in the response body (PNG or ZIP).
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
pub struct FileBody(#[allow(dead_code)] Vec<u8>);

/// Generate images.
///
/// Samples join the model's step-level batch at its next iteration. The response follows
/// `Accept`: application/json (default), image/png (one PNG for n = 1, else a labelled
/// grid), application/zip (one PNG per image).
#[utoipa::path(
    post,
    path = "/v1/samples",
    tag = "samples",
    request_body = SampleRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The images.",
            headers(
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
            )),
        (status = 400, description = "The body is not JSON.", body = ErrorBody),
        (status = 406, description = "None of the `Accept`ed types can be produced.", body = ErrorBody),
        (status = 413, description = "The body is too large.", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`.", body = ErrorBody),
        (status = 422, description = "A field is invalid; the code says which.", body = ErrorBody),
        (status = 429, description = "The queue is full.", body = ErrorBody,
            headers(("retry-after" = i64, description = "Seconds to wait."))),
        (status = 503, description = "No model is loaded yet, or the server is stopping.", body = ErrorBody,
            headers(("retry-after" = i64, description = "Seconds to wait."))),
        (status = 504, description = "Not finished within the server's request timeout.", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all, fields(n, checkpoint))]
pub(super) async fn create_samples(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(request): JsonBody<SampleRequest>,
) -> Result<Response, ApiError> {
    let format = encode::negotiate(headers.get(header::ACCEPT).map(HeaderValue::as_bytes))?;
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
    let images = state
        .batcher
        .generate(model, plan.specs.clone(), state.settings.request_timeout)
        .await?;
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
    Ok(encoded)
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
        Format::Json => {
            let items = images
                .iter()
                .enumerate()
                .map(|(index, image)| {
                    Ok(ImageJson {
                        index,
                        class: plan.class_names.get(index).cloned().flatten(),
                        class_index: image.label,
                        seed: image.seed,
                        width: image.width,
                        height: image.height,
                        run_id: info.run_id,
                        step: info.step,
                        png_base64: base64::engine::general_purpose::STANDARD
                            .encode(encode::png(image)?),
                    })
                })
                .collect::<Result<Vec<_>, encode::EncodeError>>()
                .map_err(ApiError::internal)?;
            Json(SampleResponse {
                model: ModelRef::from(info),
                sampler: SamplerUsed {
                    kind: sampler.kind,
                    steps: sampler.steps,
                    eta: sampler.eta,
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
