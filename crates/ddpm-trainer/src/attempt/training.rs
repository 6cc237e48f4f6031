//! The training part of an attempt, one delimited piece: today one thread running
//! [`train`]; a data-parallel attempt will start its rank processes here instead. The
//! attempt starts it, stops it through the job's `stop` token (save, then stop) or
//! `lost` flag (stop, save nothing), and waits for how it ended.

use tokio::sync::oneshot;

use crate::{
    error::{Result, TrainerError},
    train::{train, LoopEnd, TrainJob},
};

/// The training part, running.
pub struct Training {
    done: oneshot::Receiver<Result<LoopEnd>>,
}

impl Training {
    /// Starts `job` on its own thread (libtorch blocks), in the current span.
    pub fn start(job: TrainJob) -> Result<Training> {
        let (done_tx, done) = oneshot::channel();
        let span = tracing::Span::current();
        std::thread::Builder::new()
            .name(format!("ddpm-train-{}", job.run_id))
            .spawn(move || {
                let _span = span.entered();
                let _ = done_tx.send(train(job));
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
