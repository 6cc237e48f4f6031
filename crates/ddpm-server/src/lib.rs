//! # ddpm-server
//!
//! Serves class-conditional diffusion models over HTTP: guided DDPM/DDIM sampling with
//! step-level (continuous) batching on one model thread, the newest checkpoint from the
//! run registry hot-swapped in as training produces it, and the runs' history.
//!
//! The binary is thin: it parses [`Config`], starts `ddpm_service::telemetry` and calls [`run`] with a
//! bound listener and a shutdown future, so tests bind port 0 and run the real server.
//!
//! ## Layout
//!
//! - [`config`]: CLI flags with `DDPM_*` environment fallbacks.
//! - [`model`]: a verified, warmed-up checkpoint on the device ([`LoadedModel`]) and the
//!   slot holding the current one.
//! - [`watcher`]: finds the checkpoint to serve (newest, or pinned), loads it off the
//!   request path and swaps it in; polling plus PostgreSQL `LISTEN`.
//! - [`batcher`]: the model thread and its handle, with its own [`batcher::BatchError`];
//!   [`batcher::scheduler`] picks each pass's samples and [`batcher::cost`] admits work
//!   by its cost, both pure.
//! - [`validate`]: requests checked into what the model thread and the registry are asked
//!   for, free of HTTP; a typed [`validate::ValidationError`].
//! - [`http`]: the axum router, handlers, extractors, bearer token, the OpenAPI
//!   document generated from the request and response types, and [`ApiError`] (what
//!   clients see: each lower layer's error mapped to a status and an
//!   [`http::error::ErrorCode`], once).
//! - [`encode`]: `Accept` negotiation; PNG, labelled PNG grid, ZIP.
//! - [`metrics`]: Prometheus text exposition.
//! - [`error`]: [`ServerError`], the library's error, free of HTTP.

pub mod batcher;
pub mod config;
pub mod encode;
pub mod error;
pub mod http;
pub mod metrics;
pub mod model;
mod serve;
pub mod validate;
pub mod watcher;

use std::{future::Future, sync::Arc};

use ddpm_core::DeviceChoice;
use ddpm_registry::{CheckpointStore, ObjectCache, Registry};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::{Config, SchedulerPolicy};
pub use error::ServerError;
pub use http::ApiError;
pub use model::{LoadedModel, ModelInfo};

use crate::{
    batcher::{Batcher, BatcherConfig, Policy},
    http::{AppState, Settings},
    metrics::Metrics,
    model::CurrentModel,
    validate::SampleDefaults,
    watcher::{Pin, Watcher},
};

/// Runs the server on `listener` until `shutdown` completes, then stops accepting, answers
/// the requests in flight and returns once the model thread has finished.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    config
        .check_security(listener.local_addr()?)
        .map_err(ServerError::Config)?;
    if config.queue_capacity < config.max_images_per_request {
        return Err(ServerError::Config(format!(
            "--queue-capacity ({}) must be at least --max-images-per-request ({})",
            config.queue_capacity, config.max_images_per_request
        )));
    }
    ddpm_core::set_cpu_threads(config.common.torch_threads);
    let device = config.common.device.parse::<DeviceChoice>()?.resolve()?;
    let registry = Registry::connect(&config.common.database_url()).await?;
    let mut store = CheckpointStore::open_spec(&config.common.store_spec())?;
    match store.check().await {
        Ok(()) => {}
        // It may come back: the watcher keeps trying, /readyz says 503 meanwhile.
        Err(e @ ddpm_registry::RegistryError::StoreUnavailable(_)) => {
            tracing::warn!(error = %e, "checkpoint store not reachable now; loading waits for it")
        }
        Err(e) => return Err(e.into()),
    }
    if store.is_remote() {
        let cache = ObjectCache::new(config.cache_dir(), config.cache_max_mib << 20)?;
        tracing::info!(dir = %cache.dir().display(), max_mib = config.cache_max_mib, "checkpoint cache");
        store = store.with_cache(cache);
    }
    let metrics = Arc::new(Metrics::default());
    let current = CurrentModel::default();
    let pin = match (config.pin_checkpoint, config.pin_run) {
        (Some(id), _) => Pin::Checkpoint(id),
        (None, Some(run)) => Pin::Run(run),
        (None, None) => Pin::Newest,
    };
    tracing::info!(
        device = %ddpm_core::device::device_name(device),
        backend = ?registry.backend(),
        checkpoints = %store,
        ?pin,
        "starting"
    );

    let mut watcher = Watcher::new(
        registry.clone(),
        store.clone(),
        device,
        pin,
        current.clone(),
        metrics.model.clone(),
    )
    .with_policy(config.serve_policy, config.best_metric);
    if let Err(e) = watcher.check().await {
        tracing::warn!(error = %e, "could not look for a checkpoint at start; retrying every poll");
    }
    if current.get().is_none() {
        tracing::warn!("no usable checkpoint yet: sampling answers 503 until one is registered");
    }
    let stop_watching = CancellationToken::new();
    let watching = tokio::spawn(watcher.run(config.poll_interval, stop_watching.clone()));

    let (batcher, worker) = Batcher::spawn(
        BatcherConfig {
            max_batch: config.max_batch as usize,
            queue_capacity: config.queue_capacity as usize,
            policy: match config.scheduler {
                SchedulerPolicy::Fair => Policy::Fair {
                    stretch: config.batch_stretch,
                },
                SchedulerPolicy::Fifo => Policy::Fifo,
            },
        },
        metrics.batcher.clone(),
    )?;
    let state = AppState {
        registry: registry.clone(),
        store,
        current,
        batcher,
        metrics,
        settings: Arc::new(Settings {
            samples: SampleDefaults {
                max_images_per_request: config.max_images_per_request as usize,
                default_sampler: config.default_sampler.into(),
                default_steps: config.default_steps as usize,
                default_timestep_spacing: config.default_timestep_spacing.into(),
                default_variance_type: config.default_variance_type.into(),
                default_algorithm_type: config.default_algorithm_type.into(),
                default_thresholding: config.default_thresholding.into(),
                default_dynamic_thresholding: ddpm_core::sampler::DynamicThresholding {
                    ratio: config.default_dynamic_thresholding_ratio,
                    max_value: config.default_sample_max_value,
                },
                default_guidance_rescale: config.default_guidance_rescale,
                default_guidance_interval: config.default_guidance_interval,
            },
            request_timeout: config.request_timeout,
            api_token: config.api_token.clone().filter(|t| !t.is_empty()),
        }),
    };
    let address = listener.local_addr()?;
    tracing::info!(%address, "listening");
    let limits = serve::ConnectionLimits {
        header_read_timeout: config.header_read_timeout,
    };
    let router = http::router(state).layer(axum::Extension(http::BodyReadTimeout(
        config.body_read_timeout,
    )));
    let served = serve::serve(listener, router, limits, shutdown).await;
    tracing::info!("stopped accepting; finishing the work in flight");
    stop_watching.cancel();
    let _ = watching.await;
    // The router and every batcher handle are gone: the model thread ends when idle.
    let _ = tokio::task::spawn_blocking(move || worker.join()).await;
    registry.close().await;
    served?;
    tracing::info!("shut down");
    Ok(())
}
