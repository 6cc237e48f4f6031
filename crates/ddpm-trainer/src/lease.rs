//! An attempt's hold on its run's lease, as every part of the attempt sees it. All the
//! attempt's writes go through the lease; the first one refused with `ClaimLost`
//! (another worker claimed the run) sets one flag, here and nowhere else, and that flag
//! stops the training thread and every later write. Heartbeats, periodic or right
//! before a checkpoint, also carry an operator's cancel into the attempt's stop token.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicI64, Ordering},
        Arc,
    },
    time::Duration,
};

use ddpm_registry::{LeasedRun, RegistryError};
use tokio_util::sync::CancellationToken;

/// The lease one attempt holds, and what its writes have learnt about it. Cheap to
/// clone: every clone shares the flags.
#[derive(Clone)]
pub struct LeaseHold {
    leased: LeasedRun,
    /// Set by the first write refused for a lost lease: stop, write nothing more.
    lost: Arc<AtomicBool>,
    /// Set when a heartbeat reports an operator's `runs cancel`.
    cancelled: Arc<AtomicBool>,
    /// Save and stop: the worker's shutdown (SIGINT / SIGTERM) or an operator's cancel.
    stop: CancellationToken,
}

impl LeaseHold {
    /// Holds `leased`; `shutdown` stopping stops the attempt too.
    pub fn new(leased: LeasedRun, shutdown: &CancellationToken) -> Self {
        LeaseHold {
            leased,
            lost: Arc::default(),
            cancelled: Arc::default(),
            stop: shutdown.child_token(),
        }
    }

    /// The run's registry handle; every write through it is conditional on the lease.
    pub fn leased(&self) -> &LeasedRun {
        &self.leased
    }

    /// Whether another worker holds the run now.
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }

    /// The lost flag itself, for the training thread to poll between steps.
    pub fn lost_flag(&self) -> Arc<AtomicBool> {
        self.lost.clone()
    }

    /// Whether an operator asked the run to stop for good.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// The token the training part stops on (saving a state first).
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Whether `e` says the lease is gone. If so, marks it lost (the first time, with
    /// the one log line that says so).
    pub fn lost_by(&self, e: &RegistryError) -> bool {
        let lost = matches!(e, RegistryError::ClaimLost { .. });
        if lost && !self.lost.swap(true, Ordering::Relaxed) {
            tracing::error!(error = %e, "lost the run to another worker: stopping, writing nothing more");
        }
        lost
    }

    /// One heartbeat at `step`: records the step and forwards an operator's cancel.
    /// `false` only when the lease is gone; any other failure is logged and leaves the
    /// question open (the database may be briefly away), so it counts as held.
    pub async fn beat(&self, step: i64) -> bool {
        match self.leased.heartbeat(step).await {
            Ok(beat) => {
                if beat.cancel_requested && !self.cancelled.swap(true, Ordering::Relaxed) {
                    tracing::info!("an operator cancelled the run: saving and stopping");
                    self.stop.cancel();
                }
                true
            }
            Err(e) if self.lost_by(&e) => false,
            Err(e) => {
                tracing::warn!(error = %e, step, "heartbeat failed");
                true
            }
        }
    }

    /// Beats with the current `step` every `interval` until the lease is lost (or the
    /// task is aborted).
    pub async fn heartbeat(self, step: Arc<AtomicI64>, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !self.beat(step.load(Ordering::Relaxed)).await {
                return;
            }
        }
    }

    /// The training thread's check before it writes a checkpoint (see
    /// [`TrainJob::holds_lease`](crate::train::TrainJob::holds_lease)): a beat, on the
    /// current runtime, from the blocking thread. If the beat fails for another reason
    /// the files are written anyway; should the lease turn out lost, their registration
    /// is refused and the next attempt removes them.
    pub fn checker(&self) -> Arc<dyn Fn(i64) -> bool + Send + Sync> {
        let (hold, runtime) = (self.clone(), tokio::runtime::Handle::current());
        Arc::new(move |step| runtime.block_on(hold.beat(step)))
    }
}
