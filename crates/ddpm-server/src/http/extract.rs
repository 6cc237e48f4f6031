//! Extractors whose rejections are [`ApiError`]s with stable codes.

use axum::{
    body::Bytes,
    extract::{FromRequest, FromRequestParts, Request},
    http::{header, request::Parts},
};
use serde::de::DeserializeOwned;
use std::time::Duration;

use super::{ApiError, BODY_LIMIT};
use crate::validate::ValidationError;

/// A JSON body: 415 without `Content-Type: application/json`, 413 above the body limit,
/// 400 when it is not JSON, 422 when it is JSON of the wrong shape.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        json_content_type(&request)?;
        let bytes = read_body(request, state).await?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// A JSON object body that may be left out: an empty body, with any `Content-Type` or
/// none, is `T::default()`, and so is JSON `null` (the document's schema of an optional
/// body allows it); any other is read as [`JsonBody`] reads it (415, 413, 400, 422), and
/// must be an object (serde would read a struct from an array too).
#[derive(Debug)]
pub struct OptionalJsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for OptionalJsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let content_type = json_content_type(&request);
        let bytes = read_body(request, state).await?;
        if bytes.is_empty() {
            return Ok(OptionalJsonBody(T::default()));
        }
        content_type?;
        let body = match parse_json::<serde_json::Value>(&bytes)? {
            serde_json::Value::Null => T::default(),
            object @ serde_json::Value::Object(_) => T::deserialize(object).map_err(|e| {
                ValidationError::Request(format!("the request does not match the schema: {e}"))
            })?,
            other => {
                return Err(ValidationError::Request(format!(
                    "the body must be a JSON object, null or empty, not {other}"
                ))
                .into())
            }
        };
        Ok(OptionalJsonBody(body))
    }
}

/// 415 unless the request says `Content-Type: application/json`.
fn json_content_type(request: &Request) -> Result<(), ApiError> {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if essence == "application/json" {
        return Ok(());
    }
    let given = if content_type.is_empty() {
        "none".to_string()
    } else {
        format!("{content_type:?}")
    };
    Err(ApiError::UnsupportedMediaType(format!(
        "send the request as JSON with `Content-Type: application/json` (got {given})"
    )))
}

/// How long a request's body may take to arrive: a request extension the router sets
/// from the server's configuration.
#[derive(Debug, Clone, Copy)]
pub struct BodyReadTimeout(pub Duration);

/// The whole body: 413 above the body limit, 408 when it does not arrive within the
/// [`BodyReadTimeout`] (a client that stops sending cannot hold the connection).
async fn read_body<S: Send + Sync>(request: Request, state: &S) -> Result<Bytes, ApiError> {
    let limit = request
        .extensions()
        .get::<BodyReadTimeout>()
        .map_or(Duration::MAX, |t| t.0);
    let read = Bytes::from_request(request, state);
    let bytes = match tokio::time::timeout(limit, read).await {
        Ok(read) => read,
        Err(_) => return Err(ApiError::BodyTimeout),
    };
    bytes.map_err(|e| {
        if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge { limit: BODY_LIMIT }
        } else {
            ApiError::BadRequest(format!("could not read the request body: {e}"))
        }
    })
}

/// 400 when `bytes` are not JSON, 422 when they are JSON of the wrong shape.
fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Data => {
                ValidationError::Request(format!("the request does not match the schema: {e}"))
                    .into()
            }
            Category::Syntax | Category::Eof | Category::Io => {
                ApiError::MalformedJson(format!("the body is not valid JSON: {e}"))
            }
        }
    })
}

/// Query parameters: 422 `invalid_query` when they do not parse.
#[derive(Debug)]
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| QueryParams(q.0))
            .map_err(|e| ValidationError::Query(e.body_text()).into())
    }
}

/// The document's schema of a [`PathId`]: ids are positive, and a number above 2⁶³ − 1
/// does not parse (422 `invalid_id`).
pub fn path_id_schema() -> utoipa::openapi::ObjectBuilder {
    use utoipa::openapi::{ObjectBuilder, Type};
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .minimum(Some(1))
        .maximum(Some(i64::MAX))
}

/// A numeric id in the path: 422 `invalid_id` otherwise.
#[derive(Debug)]
pub struct PathId(pub i64);

impl<S: Send + Sync> FromRequestParts<S> for PathId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<i64>::from_request_parts(parts, state)
            .await
            .map(|p| PathId(p.0))
            .map_err(|e| {
                ValidationError::Id(format!(
                    "the id in the path must be an integer: {}",
                    e.body_text()
                ))
                .into()
            })
    }
}
