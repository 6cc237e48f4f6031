//! The web console: a static single-page app under `/` (`console/` in this crate, embedded
//! in the binary at build time, so it works offline and never drifts from the server).
//!
//! It is a thin client of the JSON API: the pages fetch `/v1/...` with the bearer token the
//! user typed (kept by the browser, never put in a URL), so serving the files needs no
//! token and they hold no data. Responses carry an `ETag` (revalidated on every load, so an
//! upgraded server is picked up at once) and, for the page itself, a Content-Security-Policy
//! that allows nothing but this origin: no inline script, no third-party host.

use std::{collections::HashMap, sync::LazyLock};

use axum::{
    extract::Path,
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};

use super::AppState;
use crate::http::ApiError;

/// The page itself: scripts and styles from this origin only; images also from `blob:`
/// and `data:` URLs (grids fetched with the token, generated PNGs).
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; \
                   form-action 'none'; frame-ancestors 'none'";

struct Asset {
    path: &'static str,
    mime: &'static str,
    bytes: &'static [u8],
}

macro_rules! asset {
    ($path:literal, $mime:literal) => {
        Asset {
            path: $path,
            mime: $mime,
            bytes: include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/console/", $path)),
        }
    };
}

/// Every file of `console/` (a test checks the list against the folder).
const ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("app.css", "text/css; charset=utf-8"),
    asset!("favicon.svg", "image/svg+xml"),
    asset!("js/main.js", "text/javascript; charset=utf-8"),
    asset!("js/api.js", "text/javascript; charset=utf-8"),
    asset!("js/ui.js", "text/javascript; charset=utf-8"),
    asset!("js/runs.js", "text/javascript; charset=utf-8"),
    asset!("js/run.js", "text/javascript; charset=utf-8"),
    asset!("js/charts.js", "text/javascript; charset=utf-8"),
    asset!("js/checkpoints.js", "text/javascript; charset=utf-8"),
    asset!("js/playground.js", "text/javascript; charset=utf-8"),
    asset!("js/model.js", "text/javascript; charset=utf-8"),
    asset!("vendor/uPlot.iife.min.js", "text/javascript; charset=utf-8"),
    asset!("vendor/uPlot.min.css", "text/css; charset=utf-8"),
    asset!("vendor/uPlot.LICENSE", "text/plain; charset=utf-8"),
    asset!("vendor/SOURCES.txt", "text/plain; charset=utf-8"),
];

/// Each asset's entity tag: a hash of its bytes, so it changes exactly when they do.
static ETAGS: LazyLock<HashMap<&'static str, HeaderValue>> = LazyLock::new(|| {
    ASSETS
        .iter()
        .map(|a| {
            let tag = format!("\"{:016x}\"", fnv1a(a.bytes));
            (
                a.path,
                HeaderValue::from_str(&tag).expect("hex is a header value"),
            )
        })
        .collect()
});

/// `/` and `/console/{*path}`: outside the API (not in [`super::ROUTES`] or the OpenAPI
/// document) and outside the token guard.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(|headers: HeaderMap| async move { serve("index.html", &headers) }))
        .route(
            "/console/{*path}",
            get(|Path(path): Path<String>, headers: HeaderMap| async move {
                serve(&path, &headers)
            }),
        )
}

fn serve(path: &str, request: &HeaderMap) -> Response {
    let Some(asset) = ASSETS.iter().find(|a| a.path == path) else {
        return ApiError::NotFound(format!("no console file {path:?}")).into_response();
    };
    let etag = ETAGS[asset.path].clone();
    let mut headers = HeaderMap::new();
    headers.insert(header::ETAG, etag.clone());
    // Cached, but revalidated on every use: a 304 costs one round trip, and a new server
    // version is never hidden behind a stale script.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if asset.path == "index.html" {
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        );
        headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    }
    let fresh = request
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|tag| tag.trim() == etag || tag.trim() == "*");
    if fresh {
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(asset.mime));
    (headers, asset.bytes).into_response()
}

/// 64-bit FNV-1a: not for security, only to tell two versions of a file apart.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file added to `console/` but not to [`ASSETS`] would be a 404 in the browser.
    #[test]
    fn every_console_file_is_embedded() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("console");
        let mut on_disk = Vec::new();
        let mut dirs = vec![root.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                } else {
                    let rel = path.strip_prefix(&root).unwrap();
                    on_disk.push(rel.to_string_lossy().replace('\\', "/"));
                }
            }
        }
        on_disk.sort();
        let mut embedded: Vec<String> = ASSETS.iter().map(|a| a.path.to_string()).collect();
        embedded.sort();
        assert_eq!(on_disk, embedded);
    }

    #[test]
    fn etags_differ_with_content() {
        assert_ne!(fnv1a(b"console v1"), fnv1a(b"console v2"));
        let tags: std::collections::HashSet<_> = ETAGS.values().collect();
        assert_eq!(tags.len(), ASSETS.len());
    }
}
