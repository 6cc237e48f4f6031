//! Prometheus metrics through `prometheus-client`: one registry per server (tests run
//! several servers in one process, so nothing is global), rendered in the OpenMetrics
//! text format at `/metrics`.
//!
//! Each part of the server holds only its own handles ([`HttpMetrics`],
//! [`BatcherMetrics`], [`ModelMetrics`]: cheap clones sharing the registered values).
//! Every label set is bounded: methods are a fixed enum, routes are the router's
//! templates (or `unmatched`), statuses are the codes the server answers.

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};

/// Request latency buckets, seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// Samples per forward pass.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// Every metric of one server and the registry that renders them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub http: HttpMetrics,
    pub batcher: BatcherMetrics,
    pub model: ModelMetrics,
}

/// The route label of every request answered 401.
pub const UNAUTHENTICATED: &str = "unauthenticated";

/// Requests by method, route and status, and their latency by route.
#[derive(Clone, Debug)]
pub struct HttpMetrics {
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram>,
}

/// The model thread's queue, slots and output.
#[derive(Clone, Debug, Default)]
pub struct BatcherMetrics {
    /// Samples waiting for a slot.
    pub queue_depth: Gauge,
    /// Samples in the forward pass's slots.
    pub active_samples: Gauge,
    pub forward_passes: Counter,
    pub batch_size: BatchSize,
    pub images_generated: Counter,
    /// Requests dropped because their client went away or cancelled them.
    pub requests_cancelled: Counter,
    /// Requests refused because the queue was full or the backlog too long.
    pub requests_rejected: Counter,
    /// Estimated seconds of accepted work left at the measured pass time.
    pub backlog_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub requests_timed_out: Counter,
}

/// Samples per forward pass (a histogram with the batch buckets).
#[derive(Clone, Debug)]
pub struct BatchSize(pub Histogram);

impl Default for BatchSize {
    fn default() -> Self {
        BatchSize(Histogram::new(BATCH_BUCKETS.iter().copied()))
    }
}

/// The checkpoint being served, and the swaps.
#[derive(Clone, Debug)]
pub struct ModelMetrics {
    pub step: Gauge,
    pub run: Gauge,
    pub checkpoint: Gauge,
    pub swaps: Counter,
    pub load_failures: Counter,
}

impl Default for ModelMetrics {
    fn default() -> Self {
        let none = || {
            let g = Gauge::default();
            g.set(-1);
            g
        };
        ModelMetrics {
            step: none(),
            run: none(),
            checkpoint: none(),
            swaps: Counter::default(),
            load_failures: Counter::default(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: Method,
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

/// The HTTP methods the API has, and one value for every other.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum Method {
    Get,
    Post,
    Delete,
    Head,
    Options,
    Other,
}

impl Method {
    fn of(method: &axum::http::Method) -> Method {
        match *method {
            axum::http::Method::GET => Method::Get,
            axum::http::Method::POST => Method::Post,
            axum::http::Method::DELETE => Method::Delete,
            axum::http::Method::HEAD => Method::Head,
            axum::http::Method::OPTIONS => Method::Options,
            _ => Method::Other,
        }
    }
}

impl EncodeLabelValue for Method {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Delete => "DELETE",
            Method::Head => "HEAD",
            Method::Options => "OPTIONS",
            Method::Other => "other",
        })
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let http = HttpMetrics {
            requests: Family::default(),
            latency: Family::new_with_constructor(|| {
                Histogram::new(LATENCY_BUCKETS.iter().copied())
            }),
        };
        let batcher = BatcherMetrics::default();
        let model = ModelMetrics::default();
        // Counters are registered without `_total`: the encoder appends it.
        registry.register(
            "ddpm_http_requests",
            "HTTP requests by method, route and status",
            http.requests.clone(),
        );
        registry.register_with_unit(
            "ddpm_http_request_duration",
            "HTTP request latency by route",
            Unit::Seconds,
            http.latency.clone(),
        );
        let b = &batcher;
        registry.register(
            "ddpm_batch_size",
            "Samples per forward pass",
            b.batch_size.0.clone(),
        );
        registry.register(
            "ddpm_queue_depth",
            "Samples waiting for a slot",
            b.queue_depth.clone(),
        );
        registry.register(
            "ddpm_active_samples",
            "Samples in the forward pass",
            b.active_samples.clone(),
        );
        registry.register(
            "ddpm_forward_passes",
            "Forward passes of the model",
            b.forward_passes.clone(),
        );
        registry.register(
            "ddpm_images_generated",
            "Images generated",
            b.images_generated.clone(),
        );
        registry.register(
            "ddpm_requests_cancelled",
            "Sampling requests dropped because the client went away or cancelled them",
            b.requests_cancelled.clone(),
        );
        registry.register(
            "ddpm_requests_rejected",
            "Sampling requests refused because the queue was full or the backlog too long",
            b.requests_rejected.clone(),
        );
        registry.register_with_unit(
            "ddpm_backlog",
            "Estimated time to finish the accepted sampling work at the measured pass time",
            Unit::Seconds,
            b.backlog_seconds.clone(),
        );
        registry.register(
            "ddpm_requests_timed_out",
            "Sampling requests that passed their deadline",
            b.requests_timed_out.clone(),
        );
        let m = &model;
        registry.register(
            "ddpm_model_step",
            "Training step of the loaded checkpoint (-1: none)",
            m.step.clone(),
        );
        registry.register(
            "ddpm_model_run",
            "Run id of the loaded checkpoint (-1: none)",
            m.run.clone(),
        );
        registry.register(
            "ddpm_model_checkpoint",
            "Registry id of the loaded checkpoint (-1: none)",
            m.checkpoint.clone(),
        );
        registry.register(
            "ddpm_model_swaps",
            "Checkpoints loaded and swapped in",
            m.swaps.clone(),
        );
        registry.register(
            "ddpm_model_load_failures",
            "Checkpoints refused (corrupt, missing or incompatible)",
            m.load_failures.clone(),
        );
        Metrics {
            registry,
            http,
            batcher,
            model,
        }
    }
}

impl Metrics {
    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

impl HttpMetrics {
    /// One answered request; `route` is the router's template (or `unmatched`).
    pub fn observe(&self, method: &axum::http::Method, route: &str, status: u16, seconds: f64) {
        // A request refused for its token counts as one kind whatever its method and
        // route: a client without the token adds no series of its choosing.
        let (method, route) = match status {
            401 => (Method::Other, UNAUTHENTICATED),
            _ => (Method::of(method), route),
        };
        self.requests
            .get_or_create(&RequestLabels {
                method,
                route: route.to_string(),
                status,
            })
            .inc();
        self.latency
            .get_or_create(&RouteLabels {
                route: route.to_string(),
            })
            .observe(seconds);
    }
}

impl BatcherMetrics {
    /// One forward pass over `batch` samples.
    pub fn observe_forward_pass(&self, batch: usize) {
        self.forward_passes.inc();
        self.batch_size.0.observe(batch as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the line that starts with `series ` in `text`.
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn unauthenticated_requests_share_one_series() {
        let m = Metrics::default();
        for (method, route) in [
            (axum::http::Method::GET, "/v1/runs"),
            (axum::http::Method::POST, "/v1/samples"),
            (axum::http::Method::DELETE, "/v1/runs/{id}"),
        ] {
            m.http.observe(&method, route, 401, 0.001);
        }
        let text = m.render();
        let series =
            r#"ddpm_http_requests_total{method="other",route="unauthenticated",status="401"}"#;
        assert_eq!(value(&text, series), Some(3.0), "{text}");
        assert!(!text.contains(r#"route="/v1/runs""#), "{text}");
    }

    #[test]
    fn renders_counters_gauges_and_cumulative_histograms() {
        let m = Metrics::default();
        let post = axum::http::Method::POST;
        m.http.observe(&post, "/v1/samples", 200, 0.02);
        m.http.observe(&post, "/v1/samples", 200, 3.0);
        m.http
            .observe(&axum::http::Method::GET, "/healthz", 200, 0.001);
        m.batcher.observe_forward_pass(3);
        m.batcher.images_generated.inc_by(3);
        let text = m.render();
        let at =
            |series: &str| value(&text, series).unwrap_or_else(|| panic!("{series} in\n{text}"));
        assert_eq!(
            at("ddpm_http_requests_total{method=\"POST\",route=\"/v1/samples\",status=\"200\"}"),
            2.0
        );
        // Cumulative: 0.02 falls in le=0.025, 3.0 only from le=5 on.
        assert_eq!(
            at("ddpm_http_request_duration_seconds_bucket{le=\"0.025\",route=\"/v1/samples\"}"),
            1.0
        );
        assert_eq!(
            at("ddpm_http_request_duration_seconds_bucket{le=\"+Inf\",route=\"/v1/samples\"}"),
            2.0
        );
        assert_eq!(at("ddpm_batch_size_bucket{le=\"2.0\"}"), 0.0);
        assert_eq!(at("ddpm_batch_size_bucket{le=\"4.0\"}"), 1.0);
        assert_eq!(at("ddpm_forward_passes_total"), 1.0);
        assert_eq!(at("ddpm_images_generated_total"), 3.0);
        assert_eq!(at("ddpm_model_step"), -1.0);
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn methods_are_a_bounded_label() {
        let m = Metrics::default();
        for custom in ["BREW", "PROPFIND", "X-ANYTHING"] {
            let method = axum::http::Method::from_bytes(custom.as_bytes()).unwrap();
            m.http.observe(&method, "unmatched", 405, 0.001);
        }
        let text = m.render();
        assert_eq!(
            value(
                &text,
                "ddpm_http_requests_total{method=\"other\",route=\"unmatched\",status=\"405\"}"
            ),
            Some(3.0),
            "{text}"
        );
        assert!(!text.contains("BREW"), "{text}");
        // DELETE is one of the API's methods (`DELETE /v1/runs/{id}`).
        m.http
            .observe(&axum::http::Method::DELETE, "/v1/runs/{id}", 200, 0.001);
        let text = m.render();
        assert_eq!(
            value(
                &text,
                "ddpm_http_requests_total{method=\"DELETE\",route=\"/v1/runs/{id}\",status=\"200\"}"
            ),
            Some(1.0),
            "{text}"
        );
    }
}
