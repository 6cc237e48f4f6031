//! `/openapi.json`: the API described in OpenAPI 3.1, written by hand and kept accurate by
//! a test that every route in [`ROUTES`](super::ROUTES) is in it.

use axum::{routing::get, Json, Router};
use serde_json::{json, Value};

use super::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/openapi.json", get(|| async { Json(document()) }))
}

fn error_response(description: &str) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } })
}

fn json_response(description: &str, schema: &str) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{schema}") } } } })
}

fn id_param() -> Value {
    json!({ "name": "id", "in": "path", "required": true, "schema": { "type": "integer" }, "description": "Run id." })
}

/// The document.
pub fn document() -> Value {
    let class_ref = json!({ "oneOf": [{ "type": "integer", "minimum": 0 }, { "type": "string" }], "description": "A class by index or by name." });
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "ddpm-server",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Class-conditional diffusion sampling (DDPM/DDIM with classifier-free guidance) with step-level batching, and the training runs' history. Every route except /healthz and /readyz requires `Authorization: Bearer <token>` when the server has a token. Errors are JSON `{\"error\": {\"code\", \"message\"}}` with a stable code."
        },
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "schemas": {
                "Error": {
                    "type": "object",
                    "properties": { "error": { "type": "object", "properties": {
                        "code": { "type": "string", "enum": [
                            "invalid_request", "invalid_n", "unknown_class", "invalid_steps", "invalid_sampler", "invalid_eta",
                            "invalid_guidance_scale", "invalid_query", "invalid_status", "invalid_id", "malformed_json",
                            "payload_too_large", "unsupported_media_type", "not_acceptable", "bad_request", "not_found",
                            "method_not_allowed", "unauthorized", "overloaded", "model_not_loaded", "unavailable", "timeout", "internal"
                        ] },
                        "message": { "type": "string", "description": "What went wrong and what to fix." }
                    } } }
                },
                "SampleRequest": {
                    "type": "object",
                    "additionalProperties": false,
                    "properties": {
                        "class": class_ref,
                        "classes": { "type": "array", "items": class_ref, "description": "One image per entry (a mixed request); excludes `class`." },
                        "n": { "type": "integer", "minimum": 1, "description": "Images to generate: default 1 or the length of `classes`; at most the server's --max-images-per-request." },
                        "guidance_scale": { "type": "number", "minimum": 0, "maximum": 50, "default": 3.0, "description": "Classifier-free guidance w: ε̃ = ε∅ + w·(εy − ε∅)." },
                        "sampler": { "type": "string", "enum": ["ddpm", "ddim"], "description": "Default: the server's --default-sampler." },
                        "steps": { "type": "integer", "minimum": 1, "description": "Network evaluations, at most the model's T; default: the server's --default-steps." },
                        "eta": { "type": "number", "minimum": 0, "maximum": 1, "default": 0, "description": "DDIM's η (ddim only)." },
                        "seed": { "type": "integer", "minimum": 0, "description": "Image i uses seed + i; the same seed and settings give the same image, alone or batched. Random when absent." }
                    }
                },
                "SampleResponse": {
                    "type": "object",
                    "properties": {
                        "model": { "type": "object", "properties": { "checkpoint_id": { "type": "integer" }, "run_id": { "type": "integer" }, "step": { "type": "integer" } } },
                        "sampler": { "type": "object", "properties": { "kind": { "type": "string" }, "steps": { "type": "integer" }, "eta": { "type": "number" } } },
                        "guidance_scale": { "type": "number" },
                        "images": { "type": "array", "items": { "type": "object", "properties": {
                            "index": { "type": "integer" }, "class": { "type": ["string", "null"] }, "class_index": { "type": ["integer", "null"] },
                            "seed": { "type": "integer" }, "width": { "type": "integer" }, "height": { "type": "integer" },
                            "run_id": { "type": "integer" }, "step": { "type": "integer" },
                            "png_base64": { "type": "string", "contentEncoding": "base64", "contentMediaType": "image/png" }
                        } } }
                    }
                },
                "Model": {
                    "type": "object",
                    "properties": {
                        "checkpoint_id": { "type": "integer" }, "run_id": { "type": "integer" }, "step": { "type": "integer" },
                        "classes": { "type": "array", "items": { "type": "string" } }, "image_size": { "type": "integer" },
                        "channels": { "type": "integer" }, "timesteps": { "type": "integer" }, "parameters": { "type": "integer" },
                        "device": { "type": "string" }, "checkpoint_path": { "type": "string" },
                        "checkpoint_created_at": { "type": "string", "format": "date-time" }, "loaded_at": { "type": "string", "format": "date-time" }
                    }
                },
                "Run": {
                    "type": "object",
                    "properties": {
                        "id": { "type": "integer" }, "status": { "type": "string", "enum": ["queued", "running", "completed", "failed", "interrupted"] },
                        "config": { "type": "object" }, "dataset": { "type": "object" }, "total_steps": { "type": "integer" },
                        "current_step": { "type": "integer" }, "host": { "type": ["string", "null"] }, "attempts": { "type": "integer" },
                        "error": { "type": ["string", "null"] }, "created_at": { "type": "string", "format": "date-time" },
                        "started_at": { "type": ["string", "null"], "format": "date-time" }, "finished_at": { "type": ["string", "null"], "format": "date-time" },
                        "updated_at": { "type": "string", "format": "date-time" }, "heartbeat_at": { "type": ["string", "null"], "format": "date-time" }
                    }
                },
                "RunsPage": { "type": "object", "properties": {
                    "runs": { "type": "array", "items": { "$ref": "#/components/schemas/Run" } },
                    "total": { "type": "integer" }, "limit": { "type": "integer" }, "offset": { "type": "integer" }
                } },
                "MetricSeries": { "type": "object", "properties": {
                    "run_id": { "type": "integer" }, "from_step": { "type": ["integer", "null"] }, "to_step": { "type": ["integer", "null"] },
                    "max_points": { "type": "integer" },
                    "points": { "type": "array", "items": { "type": "object", "properties": {
                        "step": { "type": "integer", "description": "The last optimiser step of the logging window the point describes." },
                        "loss": { "type": ["number", "null"], "description": "The plain, unweighted ε-MSE averaged over the logging window; null for a diverged (NaN) window." },
                        "learning_rate": { "type": ["number", "null"] },
                        "grad_norm": { "type": ["number", "null"] }, "images_per_sec": { "type": ["number", "null"] },
                        "recorded_at": { "type": "string", "format": "date-time" },
                        "loss_smoothed": { "type": ["number", "null"], "description": "Exponential moving average of the per-step loss, bias-corrected, as of `step`; null when not recorded (rows logged before the trainer computed it)." },
                        "loss_by_timestep": { "type": "array", "minItems": 4, "maxItems": 4, "items": { "type": ["number", "null"] }, "description": "Mean ε-MSE of the window's samples by the quarter of [0, T) their diffusion timestep t falls in: [0, T/4) (least noise), [T/4, T/2), [T/2, 3T/4), [3T/4, T) (most noise). An entry is null when no sample of the window fell in that quarter, and all four are null for rows logged before the trainer recorded them." }
                    } } }
                } },
                "Checkpoints": { "type": "object", "properties": {
                    "run_id": { "type": "integer" },
                    "checkpoints": { "type": "array", "items": { "type": "object", "properties": {
                        "id": { "type": "integer" }, "run_id": { "type": "integer" }, "step": { "type": "integer" },
                        "kind": { "type": "string", "enum": ["ema", "state"] }, "path": { "type": "string" },
                        "size_bytes": { "type": "integer" }, "sha256": { "type": "string" }, "created_at": { "type": "string", "format": "date-time" }
                    } } }
                } }
            }
        },
        "security": [{ "bearer": [] }],
        "paths": {
            "/v1/samples": { "post": {
                "summary": "Generate images",
                "description": "Samples join the model's step-level batch at its next iteration. The response follows `Accept`: application/json (default), image/png (one PNG for n = 1, else a labelled grid), application/zip (one PNG per image). Headers x-ddpm-run-id, x-ddpm-step, x-ddpm-checkpoint-id and x-ddpm-seeds name the model and seeds.",
                "requestBody": { "required": true, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/SampleRequest" } } } },
                "responses": {
                    "200": { "description": "The images.", "content": {
                        "application/json": { "schema": { "$ref": "#/components/schemas/SampleResponse" } },
                        "image/png": { "schema": { "type": "string", "format": "binary" } },
                        "application/zip": { "schema": { "type": "string", "format": "binary" } }
                    } },
                    "400": error_response("Malformed JSON."),
                    "401": error_response("Missing or wrong bearer token."),
                    "406": error_response("No acceptable response type."),
                    "413": error_response("Body too large."),
                    "415": error_response("Not application/json."),
                    "422": error_response("Invalid field (see code)."),
                    "429": error_response("Queue full; see Retry-After."),
                    "503": error_response("No model loaded yet, or shutting down; see Retry-After."),
                    "504": error_response("Not finished within the request timeout.")
                }
            } },
            "/v1/model": { "get": {
                "summary": "The checkpoint being served",
                "responses": { "200": json_response("The model.", "Model"), "503": error_response("No model loaded yet.") }
            } },
            "/v1/runs": { "get": {
                "summary": "Training runs, newest first",
                "parameters": [
                    { "name": "status", "in": "query", "schema": { "type": "string", "enum": ["queued", "running", "completed", "failed", "interrupted"] } },
                    { "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": 500, "default": 50 } },
                    { "name": "offset", "in": "query", "schema": { "type": "integer", "minimum": 0, "default": 0 } }
                ],
                "responses": { "200": json_response("A page of runs.", "RunsPage"), "422": error_response("Invalid query.") }
            } },
            "/v1/runs/{id}": { "get": {
                "summary": "One run",
                "parameters": [id_param()],
                "responses": { "200": json_response("The run.", "Run"), "404": error_response("No such run.") }
            } },
            "/v1/runs/{id}/metrics": { "get": {
                "summary": "A run's metric series, downsampled",
                "parameters": [
                    id_param(),
                    { "name": "from_step", "in": "query", "schema": { "type": "integer" } },
                    { "name": "to_step", "in": "query", "schema": { "type": "integer" } },
                    { "name": "max_points", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": 10000, "default": 500 } }
                ],
                "responses": { "200": json_response("Evenly spaced points, the newest always included.", "MetricSeries"), "404": error_response("No such run."), "422": error_response("Invalid query.") }
            } },
            "/v1/runs/{id}/checkpoints": { "get": {
                "summary": "A run's checkpoints",
                "parameters": [id_param()],
                "responses": { "200": json_response("By step.", "Checkpoints"), "404": error_response("No such run.") }
            } },
            "/healthz": { "get": { "summary": "Liveness", "security": [], "responses": { "200": { "description": "Up." } } } },
            "/readyz": { "get": { "summary": "Readiness: a model is loaded and the registry answers", "security": [],
                "responses": { "200": { "description": "Ready." }, "503": { "description": "Not ready; the body says why." } } } },
            "/metrics": { "get": { "summary": "Prometheus metrics", "responses": { "200": { "description": "Text exposition format 0.0.4.", "content": { "text/plain": {} } } } } },
            "/openapi.json": { "get": { "summary": "This document", "responses": { "200": { "description": "OpenAPI 3.1." } } } }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_described() {
        let doc = document();
        for (method, path) in super::super::ROUTES {
            assert!(
                doc["paths"][path][method].is_object(),
                "{method} {path} is not in /openapi.json"
            );
        }
        let described: usize = doc["paths"]
            .as_object()
            .unwrap()
            .values()
            .map(|p| p.as_object().unwrap().len())
            .sum();
        assert_eq!(
            described,
            super::super::ROUTES.len(),
            "the document describes routes the server lacks"
        );
    }
}
