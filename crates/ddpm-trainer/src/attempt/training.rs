//! The training part of an attempt, one delimited piece: a thread running [`train`] as
//! rank 0, and for a data-parallel attempt the other ranks ([`crate::parallel`]): local
//! rank processes it starts and stops here, or the world a launcher started. The
//! attempt starts it, stops it through the job's `stop` token (save, then stop) or
//! `lost` flag (stop, save nothing), and waits for how it ended.

use std::time::Duration;

use tokio::sync::oneshot;

use crate::{
    error::{Result, TrainerError},
    parallel::{check_global_batch, LocalRanks, Ranks, World},
    train::{train, LoopEnd, TrainJob},
};

/// The training part, running.
pub struct Training {
    done: oneshot::Receiver<Result<LoopEnd>>,
}

/// The world an attempt trains in, once its ranks have met.
pub struct Joined {
    pub size: usize,
    pub devices: Vec<String>,
}

impl Training {
    /// Starts `job` on its own thread (libtorch blocks), in the current span, with its
    /// ranks from `ranks`; `joined` hears the world's size and devices once every rank
    /// has met (or is dropped if they never do).
    pub fn start(job: TrainJob, ranks: Ranks, joined: oneshot::Sender<Joined>) -> Result<Training> {
        let (done_tx, done) = oneshot::channel();
        let span = tracing::Span::current();
        std::thread::Builder::new()
            .name(format!("ddpm-train-{}", job.run_id))
            .spawn(move || {
                let _span = span.entered();
                let _ = done_tx.send(run(job, ranks, joined));
            })
            .map_err(|e| TrainerError::Thread(format!("cannot start the training thread: {e}")))?;
        Ok(Training { done })
    }

    /// How the training loop ended; a panic is an error.
    pub async fn finished(self) -> Result<LoopEnd> {
        self.done
            .await
            .unwrap_or_else(|_| Err(TrainerError::Thread("the training thread panicked".into())))
    }
}

/// Makes the world, trains, and stops the local ranks whatever happened.
fn run(job: TrainJob, ranks: Ranks, joined: oneshot::Sender<Joined>) -> Result<LoopEnd> {
    let (world, local) = match ranks {
        Ranks::Single => (World::single(job.device), None),
        Ranks::Local { n, options } => {
            // Refused before any rank is started.
            check_global_batch(job.config.training.batch_size, n)?;
            let timeout = options.rank_timeout;
            let (world, local) = World::serve_local(n, job.device, timeout, |port| {
                LocalRanks::spawn(n, port, job.device, &options)
            })?;
            (world, Some((local, timeout)))
        }
        Ranks::Launched(slot) => {
            let world = slot.lock().ok().and_then(|mut w| w.take()).ok_or_else(|| {
                TrainerError::Rank(
                    "the launched world was used by an earlier attempt: a launched \
                         trainer runs one attempt (torchrun restarts it for the next)"
                        .into(),
                )
            })?;
            (world, None)
        }
    };
    let _ = joined.send(Joined {
        size: world.size(),
        devices: world.devices(),
    });
    let outcome = train(job, world);
    if let Some((local, grace)) = local {
        stop_local(local, grace, outcome.is_ok());
    }
    outcome
}

/// Waits for the local ranks to exit (they stop at the same step as rank 0), killing any
/// that outlive `grace`, and logs how each ended.
fn stop_local(local: LocalRanks, grace: Duration, clean: bool) {
    // After an error rank 0 stops talking to the others: they notice at their next
    // collective, so there is nothing to wait for.
    let grace = if clean { grace } else { Duration::from_secs(1) };
    for (rank, status) in local.stop(grace) {
        match status {
            Some(s) if s.success() => tracing::debug!(rank, "rank exited"),
            Some(s) => tracing::warn!(rank, status = %s, "rank exited with an error"),
            None => tracing::warn!(rank, "rank's exit status unknown"),
        }
    }
}
