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
use ddpm_core::{sampler::TimestepSpacing, SampleSpec, SamplerConfig, SamplerKind};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{extract::JsonBody, AppState, Settings};
use crate::{
    batcher::GeneratedImage,
    encode::{self, Format},
    error::ApiError,
    model::ModelInfo,
};

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/samples", post(create_samples))
}

/// Guidance scales above this are refused (past it images saturate; it is a typo).
pub const MAX_GUIDANCE_SCALE: f64 = 50.0;
/// w of a request that gives none.
pub const DEFAULT_GUIDANCE_SCALE: f64 = 3.0;

/// A class by index or by name.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum ClassRef {
    Index(i64),
    Name(String),
}

/// The request body.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleRequest {
    /// One class for all `n` images.
    pub class: Option<ClassRef>,
    /// One image per entry (a mixed request); excludes `class`.
    pub classes: Option<Vec<ClassRef>>,
    /// Images to generate (default 1, or the length of `classes`).
    pub n: Option<i64>,
    /// Classifier-free guidance w (a number, or a string such as "2.5").
    pub guidance_scale: Option<serde_json::Value>,
    /// `ddpm` or `ddim`.
    pub sampler: Option<String>,
    pub steps: Option<i64>,
    /// DDIM's η in [0, 1].
    pub eta: Option<f64>,
    /// Image i uses seed + i; random when absent.
    pub seed: Option<u64>,
}

/// A validated request: one spec per image, plus what the response reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub specs: Vec<SampleSpec>,
    /// The class name (or `None`, unconditional) of each image.
    pub class_names: Vec<Option<String>>,
}

/// Checks a request against the model and the limits; every refusal names what to fix.
pub fn plan(
    request: &SampleRequest,
    model: &ModelInfo,
    conditional: bool,
    settings: &Settings,
) -> Result<Plan, ApiError> {
    let max_n = settings.max_images_per_request;
    let resolve = |c: &ClassRef| -> Result<i64, ApiError> {
        if !conditional {
            return Err(ApiError::validation(
                "unknown_class",
                "the loaded model is unconditional: omit `class` and `classes`",
            ));
        }
        let listed = || {
            let names: Vec<&str> = model.classes.iter().take(50).map(String::as_str).collect();
            names.join(", ")
        };
        match c {
            ClassRef::Index(i) if (0..model.classes.len() as i64).contains(i) => Ok(*i),
            ClassRef::Index(i) => Err(ApiError::validation(
                "unknown_class",
                format!(
                    "class index {i} is out of range: use 0..={} or a name ({})",
                    model.classes.len().saturating_sub(1),
                    listed()
                ),
            )),
            ClassRef::Name(name) => model
                .classes
                .iter()
                .position(|c| c == name)
                .map(|i| i as i64)
                .ok_or_else(|| {
                    ApiError::validation(
                        "unknown_class",
                        format!("unknown class {name:?}: use one of {}", listed()),
                    )
                }),
        }
    };
    let labels: Vec<Option<i64>> = match (&request.class, &request.classes) {
        (Some(_), Some(_)) => {
            return Err(ApiError::validation(
                "invalid_request",
                "give either `class` or `classes`, not both",
            ));
        }
        (None, Some(classes)) => {
            if classes.is_empty() || classes.len() > max_n {
                return Err(ApiError::validation(
                    "invalid_n",
                    format!(
                        "`classes` must list 1 to {max_n} classes, got {}",
                        classes.len()
                    ),
                ));
            }
            if let Some(n) = request.n.filter(|&n| n != classes.len() as i64) {
                return Err(ApiError::validation(
                    "invalid_n",
                    format!(
                        "n = {n} but `classes` lists {}: omit n or make them agree",
                        classes.len()
                    ),
                ));
            }
            classes
                .iter()
                .map(|c| resolve(c).map(Some))
                .collect::<Result<_, _>>()?
        }
        (class, None) => {
            let n = request.n.unwrap_or(1);
            if n < 1 || n > max_n as i64 {
                return Err(ApiError::validation(
                    "invalid_n",
                    format!("n must be in 1..={max_n}, got {n}"),
                ));
            }
            let label = class.as_ref().map(resolve).transpose()?;
            vec![label; n as usize]
        }
    };
    let kind = match request.sampler.as_deref() {
        None => settings.default_sampler,
        Some(s) => s.to_ascii_lowercase().parse::<SamplerKind>().map_err(|_| {
            ApiError::validation(
                "invalid_sampler",
                format!("unknown sampler {s:?}: use \"ddpm\" or \"ddim\""),
            )
        })?,
    };
    let t_max = model.timesteps as i64;
    let steps = request.steps.unwrap_or(settings.default_steps as i64);
    if steps < 1 || steps > t_max {
        return Err(ApiError::validation(
            "invalid_steps",
            format!("steps must be in 1..={t_max}, got {steps}"),
        ));
    }
    let eta = request.eta.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&eta) {
        return Err(ApiError::validation(
            "invalid_eta",
            format!("eta must be in [0, 1], got {eta}"),
        ));
    }
    if eta != 0.0 && kind == SamplerKind::Ddpm {
        return Err(ApiError::validation(
            "invalid_eta",
            "eta applies to the ddim sampler only: omit it for ddpm",
        ));
    }
    let guidance_scale = match &request.guidance_scale {
        None => DEFAULT_GUIDANCE_SCALE,
        Some(serde_json::Value::Number(n)) => n.as_f64().unwrap_or(f64::NAN),
        Some(serde_json::Value::String(s)) => s.trim().parse::<f64>().unwrap_or(f64::NAN),
        Some(other) => {
            return Err(ApiError::validation(
                "invalid_guidance_scale",
                format!("guidance_scale must be a number, got {other}"),
            ));
        }
    };
    if !guidance_scale.is_finite() || !(0.0..=MAX_GUIDANCE_SCALE).contains(&guidance_scale) {
        return Err(ApiError::validation(
            "invalid_guidance_scale",
            format!("guidance_scale must be a finite number in [0, {MAX_GUIDANCE_SCALE}], got {guidance_scale}"),
        ));
    }
    let sampler = SamplerConfig {
        kind,
        steps: steps as usize,
        eta,
        spacing: TimestepSpacing::Trailing,
        clip_denoised: true,
    };
    let seed = request.seed.unwrap_or_else(rand::random);
    let specs = labels
        .iter()
        .enumerate()
        .map(|(i, &label)| SampleSpec {
            label,
            guidance_scale,
            seed: seed.wrapping_add(i as u64),
            sampler,
        })
        .collect();
    let class_names = labels
        .iter()
        .map(|l| l.and_then(|i| model.classes.get(i as usize).cloned()))
        .collect();
    Ok(Plan { specs, class_names })
}

#[derive(Debug, Serialize)]
struct ImageJson {
    index: usize,
    class: Option<String>,
    class_index: Option<i64>,
    seed: u64,
    width: u32,
    height: u32,
    run_id: i64,
    step: i64,
    /// The PNG file, base64 (standard alphabet, padded).
    png_base64: String,
}

#[tracing::instrument(skip_all, fields(n, checkpoint))]
async fn create_samples(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(request): JsonBody<SampleRequest>,
) -> Result<Response, ApiError> {
    let format = encode::negotiate(headers.get(header::ACCEPT).map(HeaderValue::as_bytes))?;
    let model = state.current.get().ok_or(ApiError::NoModel)?;
    let info = model.info();
    let plan = plan(&request, &info, model.is_conditional(), &state.settings)?;
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
            Json(json!({
                "model": { "checkpoint_id": info.checkpoint_id, "run_id": info.run_id, "step": info.step },
                "sampler": { "kind": sampler.kind, "steps": sampler.steps, "eta": sampler.eta },
                "guidance_scale": guidance_scale,
                "images": items,
            }))
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

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use std::time::Duration;

    fn settings() -> Settings {
        Settings {
            max_images_per_request: 8,
            default_sampler: SamplerKind::Ddim,
            default_steps: 20,
            request_timeout: Duration::from_secs(5),
            api_token: None,
        }
    }

    fn info() -> ModelInfo {
        ModelInfo {
            checkpoint_id: 1,
            run_id: 1,
            step: 10,
            classes: vec!["red".into(), "green".into(), "blue".into()],
            image_size: 8,
            channels: 3,
            timesteps: 1000,
            parameters: 1,
            device: "cpu".into(),
            checkpoint_path: "x".into(),
            checkpoint_created_at: Utc::now(),
            loaded_at: Utc::now(),
        }
    }

    fn request(json: serde_json::Value) -> SampleRequest {
        serde_json::from_value(json).unwrap()
    }

    fn code(json: serde_json::Value) -> &'static str {
        plan(&request(json), &info(), true, &settings())
            .unwrap_err()
            .code()
    }

    #[test]
    fn defaults_and_seeds() {
        let p = plan(
            &request(json!({"class": "green", "n": 3, "seed": 7})),
            &info(),
            true,
            &settings(),
        )
        .unwrap();
        assert_eq!(p.specs.len(), 3);
        assert!(p
            .specs
            .iter()
            .all(|s| s.label == Some(1) && s.guidance_scale == DEFAULT_GUIDANCE_SCALE));
        assert_eq!(
            p.specs.iter().map(|s| s.seed).collect::<Vec<_>>(),
            [7, 8, 9]
        );
        assert_eq!(p.specs[0].sampler, SamplerConfig::ddim(20));
        assert_eq!(p.class_names[0].as_deref(), Some("green"));
        let p = plan(
            &request(json!({"classes": [0, "blue"], "sampler": "DDPM", "steps": 1000})),
            &info(),
            true,
            &settings(),
        )
        .unwrap();
        assert_eq!(
            p.specs.iter().map(|s| s.label).collect::<Vec<_>>(),
            [Some(0), Some(2)]
        );
        assert_eq!(p.specs[0].sampler.kind, SamplerKind::Ddpm);
        let p = plan(&request(json!({})), &info(), true, &settings()).unwrap();
        assert_eq!(p.specs[0].label, None);
    }

    #[test]
    fn every_invalid_field_has_its_code() {
        assert_eq!(code(json!({"class": "purple"})), "unknown_class");
        assert_eq!(code(json!({"class": 3})), "unknown_class");
        assert_eq!(code(json!({"class": -1})), "unknown_class");
        assert_eq!(code(json!({"n": 0})), "invalid_n");
        assert_eq!(code(json!({"n": 9})), "invalid_n");
        assert_eq!(code(json!({"classes": []})), "invalid_n");
        assert_eq!(code(json!({"classes": [0, 1], "n": 3})), "invalid_n");
        assert_eq!(code(json!({"class": 0, "classes": [0]})), "invalid_request");
        assert_eq!(code(json!({"steps": 0})), "invalid_steps");
        assert_eq!(code(json!({"steps": 1001})), "invalid_steps");
        assert_eq!(code(json!({"sampler": "euler"})), "invalid_sampler");
        assert_eq!(code(json!({"eta": 1.5})), "invalid_eta");
        assert_eq!(code(json!({"sampler": "ddpm", "eta": 0.5})), "invalid_eta");
        assert_eq!(
            code(json!({"guidance_scale": "NaN"})),
            "invalid_guidance_scale"
        );
        assert_eq!(
            code(json!({"guidance_scale": 1e9})),
            "invalid_guidance_scale"
        );
        assert_eq!(
            code(json!({"guidance_scale": -1})),
            "invalid_guidance_scale"
        );
        assert_eq!(
            code(json!({"guidance_scale": [1]})),
            "invalid_guidance_scale"
        );
        let unconditional =
            plan(&request(json!({"class": 0})), &info(), false, &settings()).unwrap_err();
        assert_eq!(unconditional.code(), "unknown_class");
    }
}
