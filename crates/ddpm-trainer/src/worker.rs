//! A trainer process as the registry knows it: its name, its connections, its device and
//! the settings every attempt it runs follows (`train` and `daemon` start one).

use std::{future::Future, time::Duration};

use ddpm_core::DeviceChoice;
use ddpm_registry::{redact_password, CheckpointStore, Registry};
use ddpm_service::LogFormat;
use tch::Device;
use tokio_util::sync::CancellationToken;

use crate::{cli::GlobalOptions, error::Result, parallel::Ranks, train::stderr_is_terminal};

/// A trainer process as the registry knows it.
#[derive(Clone)]
pub struct Worker {
    pub registry: Registry,
    pub store: CheckpointStore,
    pub device: Device,
    /// Unique per process (`host:pid:instance`, the instance id random): heartbeats check it.
    pub name: String,
    pub heartbeat_interval: Duration,
    /// The first delay of a deferred run (doubling per attempt, capped at 64×).
    pub retry_backoff: Duration,
    /// A run with more crashes than this is failed when claimed, not executed.
    pub max_crashes: i64,
    pub progress: bool,
    /// Where each attempt's ranks come from: one process unless `--nproc-per-node` or a
    /// launcher says otherwise (the commands set it).
    pub ranks: Ranks,
    /// Cancelled by `shutdown`: the attempt in progress saves, ends interrupted, and no
    /// other is started.
    pub shutdown: CancellationToken,
}

impl Worker {
    /// Connects, picks the device and names this process; `shutdown` resolving
    /// (SIGINT / SIGTERM in the binary) makes the attempt in progress save and stop.
    pub async fn start(
        global: &GlobalOptions,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<Worker> {
        let token = CancellationToken::new();
        let on_signal = token.clone();
        tokio::spawn(async move {
            shutdown.await;
            tracing::info!("shutdown requested: saving state and stopping");
            on_signal.cancel();
        });
        ddpm_core::set_cpu_threads(global.common.torch_threads);
        let device = global.common.device.parse::<DeviceChoice>()?.resolve()?;
        let host = global.host_name.clone().unwrap_or_else(|| {
            hostname::get()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "unknown-host".into())
        });
        let store_spec = global.common.store_spec();
        let store = CheckpointStore::open_spec(&store_spec)?;
        match store.check().await {
            Ok(()) => {}
            // The server may come back: runs that need it are deferred meanwhile.
            Err(e @ ddpm_registry::RegistryError::StoreUnavailable(_)) => {
                tracing::warn!(error = %e, "checkpoint store not reachable now; runs wait for it")
            }
            // A missing bucket or refused credentials will not pass: say so at once.
            Err(e) => return Err(e.into()),
        }
        let worker = Worker {
            registry: Registry::connect(&global.common.database_url()).await?,
            store,
            device,
            name: worker_name(&host, std::process::id()),
            heartbeat_interval: global.heartbeat_interval,
            retry_backoff: global.retry_backoff,
            max_crashes: global.max_crashes,
            progress: stderr_is_terminal() && global.common.log_format == LogFormat::Pretty,
            ranks: Ranks::Single,
            shutdown: token,
        };
        tracing::info!(
            database_url = %redact_password(&global.common.database_url()),
            store = %worker.store,
            device = ?device,
            worker = %worker.name,
            heartbeat_interval = ?global.heartbeat_interval,
            "ddpm-trainer starting"
        );
        Ok(worker)
    }
}

/// A worker's identity in the registry: `host:pid:instance`. The pid alone does not tell
/// two containers apart (each is pid 1 in its own), so a random instance id is appended.
fn worker_name(host: &str, pid: u32) -> String {
    format!("{host}:{pid}:{:08x}", rand::random::<u32>())
}

#[cfg(test)]
mod tests {
    #[test]
    fn workers_with_the_same_host_and_pid_have_different_names() {
        let (a, b) = (
            super::worker_name("trainer", 1),
            super::worker_name("trainer", 1),
        );
        assert!(
            a.starts_with("trainer:1:") && b.starts_with("trainer:1:"),
            "{a} {b}"
        );
        assert_ne!(a, b);
    }
}
