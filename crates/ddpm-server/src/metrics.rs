//! Prometheus metrics, hand-written: a few counters, gauges and histograms rendered in the
//! text exposition format (version 0.0.4) at `/metrics`.

use std::{
    collections::BTreeMap,
    fmt::Write,
    sync::{
        atomic::{AtomicI64, AtomicU64, Ordering},
        Mutex, MutexGuard,
    },
};

/// Request latency buckets, seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// Samples per forward pass.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    /// Non-cumulative counts per bucket; the last is +Inf.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        let i = self
            .bounds
            .iter()
            .position(|&b| v <= b)
            .unwrap_or(self.bounds.len());
        self.counts[i] += 1;
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, count) in self.counts.iter().enumerate() {
            cumulative += count;
            let le = self
                .bounds
                .get(i)
                .map_or("+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
            );
        }
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Everything `/metrics` reports. Shared by the HTTP layer, the model thread and the
/// watcher.
#[derive(Debug)]
pub struct Metrics {
    /// (method, route, status) → requests.
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    /// route → latency histogram.
    latency: Mutex<BTreeMap<String, Histogram>>,
    batch_size: Mutex<Histogram>,
    /// Samples waiting for a slot.
    pub queue_depth: AtomicU64,
    /// Samples in the forward pass's slots.
    pub active_samples: AtomicU64,
    pub forward_passes: AtomicU64,
    pub images_generated: AtomicU64,
    /// Requests dropped because their client went away.
    pub requests_cancelled: AtomicU64,
    /// Requests refused because the queue was full.
    pub requests_rejected: AtomicU64,
    pub requests_timed_out: AtomicU64,
    pub model_step: AtomicI64,
    pub model_run: AtomicI64,
    pub model_checkpoint: AtomicI64,
    pub model_swaps: AtomicU64,
    pub model_load_failures: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::default(),
            latency: Mutex::default(),
            batch_size: Mutex::new(Histogram::new(BATCH_BUCKETS)),
            queue_depth: AtomicU64::new(0),
            active_samples: AtomicU64::new(0),
            forward_passes: AtomicU64::new(0),
            images_generated: AtomicU64::new(0),
            requests_cancelled: AtomicU64::new(0),
            requests_rejected: AtomicU64::new(0),
            requests_timed_out: AtomicU64::new(0),
            model_step: AtomicI64::new(-1),
            model_run: AtomicI64::new(-1),
            model_checkpoint: AtomicI64::new(-1),
            model_swaps: AtomicU64::new(0),
            model_load_failures: AtomicU64::new(0),
        }
    }
}

/// Escapes a label value.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    pub fn observe_request(&self, method: &str, route: &str, status: u16, seconds: f64) {
        *lock(&self.requests)
            .entry((method.to_string(), route.to_string(), status))
            .or_default() += 1;
        lock(&self.latency)
            .entry(route.to_string())
            .or_insert_with(|| Histogram::new(LATENCY_BUCKETS))
            .observe(seconds);
    }

    /// One forward pass over `batch` samples.
    pub fn observe_forward_pass(&self, batch: usize) {
        self.forward_passes.fetch_add(1, Ordering::Relaxed);
        lock(&self.batch_size).observe(batch as f64);
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        out.push_str(
            "# HELP ddpm_http_requests_total HTTP requests by method, route and status.\n",
        );
        out.push_str("# TYPE ddpm_http_requests_total counter\n");
        for ((method, route, status), n) in lock(&self.requests).iter() {
            let _ = writeln!(
                out,
                "ddpm_http_requests_total{{method=\"{}\",route=\"{}\",status=\"{status}\"}} {n}",
                escape(method),
                escape(route)
            );
        }
        out.push_str("# HELP ddpm_http_request_duration_seconds HTTP request latency by route.\n");
        out.push_str("# TYPE ddpm_http_request_duration_seconds histogram\n");
        for (route, h) in lock(&self.latency).iter() {
            h.render(
                &mut out,
                "ddpm_http_request_duration_seconds",
                &format!("route=\"{}\"", escape(route)),
            );
        }
        out.push_str(
            "# HELP ddpm_batch_size Samples per forward pass.\n# TYPE ddpm_batch_size histogram\n",
        );
        lock(&self.batch_size).render(&mut out, "ddpm_batch_size", "");
        let mut scalar = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        scalar(
            "ddpm_queue_depth",
            "gauge",
            "Samples waiting for a slot.",
            get(&self.queue_depth).to_string(),
        );
        scalar(
            "ddpm_active_samples",
            "gauge",
            "Samples in the forward pass.",
            get(&self.active_samples).to_string(),
        );
        scalar(
            "ddpm_forward_passes_total",
            "counter",
            "Forward passes of the model.",
            get(&self.forward_passes).to_string(),
        );
        scalar(
            "ddpm_images_generated_total",
            "counter",
            "Images generated.",
            get(&self.images_generated).to_string(),
        );
        scalar(
            "ddpm_requests_cancelled_total",
            "counter",
            "Sampling requests dropped because the client went away.",
            get(&self.requests_cancelled).to_string(),
        );
        scalar(
            "ddpm_requests_rejected_total",
            "counter",
            "Sampling requests refused because the queue was full.",
            get(&self.requests_rejected).to_string(),
        );
        scalar(
            "ddpm_requests_timed_out_total",
            "counter",
            "Sampling requests that passed their deadline.",
            get(&self.requests_timed_out).to_string(),
        );
        scalar(
            "ddpm_model_step",
            "gauge",
            "Training step of the loaded checkpoint (-1: none).",
            self.model_step.load(Ordering::Relaxed).to_string(),
        );
        scalar(
            "ddpm_model_run",
            "gauge",
            "Run id of the loaded checkpoint (-1: none).",
            self.model_run.load(Ordering::Relaxed).to_string(),
        );
        scalar(
            "ddpm_model_checkpoint",
            "gauge",
            "Registry id of the loaded checkpoint (-1: none).",
            self.model_checkpoint.load(Ordering::Relaxed).to_string(),
        );
        scalar(
            "ddpm_model_swaps_total",
            "counter",
            "Checkpoints loaded and swapped in.",
            get(&self.model_swaps).to_string(),
        );
        scalar(
            "ddpm_model_load_failures_total",
            "counter",
            "Checkpoints refused (corrupt, missing or incompatible).",
            get(&self.model_load_failures).to_string(),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_histograms() {
        let m = Metrics::default();
        m.observe_request("POST", "/v1/samples", 200, 0.02);
        m.observe_request("POST", "/v1/samples", 200, 3.0);
        m.observe_request("GET", "/healthz", 200, 0.001);
        m.observe_forward_pass(3);
        m.images_generated.fetch_add(3, Ordering::Relaxed);
        let text = m.render();
        assert!(
            text.contains(
                "ddpm_http_requests_total{method=\"POST\",route=\"/v1/samples\",status=\"200\"} 2"
            ),
            "{text}"
        );
        assert!(text.contains(
            "ddpm_http_request_duration_seconds_bucket{route=\"/v1/samples\",le=\"0.025\"} 1"
        ));
        assert!(text.contains(
            "ddpm_http_request_duration_seconds_bucket{route=\"/v1/samples\",le=\"+Inf\"} 2"
        ));
        assert!(text.contains("ddpm_batch_size_bucket{le=\"4\"} 1"));
        assert!(text.contains("ddpm_forward_passes_total 1"));
        assert!(text.contains("ddpm_images_generated_total 3"));
        assert!(text.contains("ddpm_model_step -1"));
    }
}
