//! The commands that start a [`Worker`] and run attempts: `train` (one run, in the
//! foreground) and `daemon` (claiming runs until the queue is empty or shutdown), and
//! `rank`, a data-parallel rank other than 0 (no worker: it never touches the registry).
//!
//! Ranks come from `--nproc-per-node` (this process is rank 0 and starts the others per
//! attempt) or from a launcher such as torchrun, which starts every rank of `train` with
//! RANK, WORLD_SIZE, … set: rank 0 is the trainer, the others run as `rank` does.

use std::{future::Future, path::Path, sync::Arc, time::Duration};

use ddpm_dist::Launch;
use tch::Device;

use crate::{
    attempt::{Attempt, RunEnd},
    cli::{GlobalOptions, NprocPerNode},
    config::Overrides,
    error::{Result, TrainerError},
    parallel::{rank_device, RankOptions, Ranks, World},
    resolve,
    train::train_follower,
    worker::Worker,
};

/// How `train` is launched, besides its config.
#[derive(Debug, Clone)]
pub struct TrainLaunch {
    pub nproc_per_node: NprocPerNode,
    /// `--launch-id`: the key of the run this launch trains.
    pub launch_id: Option<String>,
}

/// `train`: creates the run a config file describes, claims it ahead of older queued
/// runs (which stay for the daemons) and executes it here. A run that did not end
/// completed, interrupted or cancelled is an error.
///
/// Under a launcher (RANK set), ranks other than 0 follow rank 0. With a launch key
/// (`--launch-id`, else torchrun's rendezvous id) rank 0 trains the run created under
/// that key, creating it the first time: when torchrun restarts the workers, or a
/// PyTorchJob a pod, rank 0 resumes that run.
pub async fn train(
    global: &GlobalOptions,
    config: &Path,
    overrides: &Overrides,
    how: TrainLaunch,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let launch = Launch::from_env()?;
    if let Some(launch) = &launch {
        if how.nproc_per_node != NprocPerNode::Count(1) {
            return Err(TrainerError::config(
                "nproc-per-node",
                "a launcher already started the ranks (RANK and WORLD_SIZE are set): leave \
                 --nproc-per-node at 1",
            ));
        }
        if launch.rank > 0 {
            return follow(global, launch.clone(), shutdown).await;
        }
    }
    let key = how.launch_id.clone().or_else(|| {
        launch
            .as_ref()
            .and_then(|l| l.run_id.clone())
            // torchrun's default id when none is given: it names no launch.
            .filter(|id| id != "none")
    });
    if key.is_none() && launch.as_ref().is_some_and(|l| l.restart_count > 0) {
        return Err(TrainerError::Rank(
            "torchrun restarted the workers but names no launch (no --rdzv-id, no \
             --launch-id): refusing to start the run over; give torchrun --rdzv-id (or \
             --standalone) or ddpm --launch-id"
                .into(),
        ));
    }
    let mut worker = Worker::start(global, shutdown).await?;
    let new = resolve::new_run(config, overrides).await?;
    match &launch {
        Some(launch) => {
            worker.device = rank_device(worker.device, launch.local_rank);
            let world = join(launch, worker.device, global.rank_timeout).await?;
            worker.ranks = Ranks::Launched(Arc::new(std::sync::Mutex::new(Some(world))));
        }
        None => worker.ranks = local_ranks(global, how.nproc_per_node, &mut worker)?,
    }
    let (id, run) = match &key {
        Some(key) => match claim_keyed(&worker, &new, key).await? {
            Keyed::Claimed(id, run) => (id, run.map(|run| *run)),
            Keyed::AlreadyCompleted(id) => {
                tracing::info!(id, launch = %key, "the launch's run is already completed");
                return Ok(());
            }
        },
        None => {
            let id = worker.registry.create_run(&new).await?.id;
            tracing::info!(id, "run created");
            (id, worker.registry.claim_run(id, &worker.name).await?)
        }
    };
    let Some(run) = run else {
        return Err(TrainerError::Run {
            id,
            message: "was claimed by another trainer before this one".into(),
        });
    };
    let message = match Attempt::execute(&worker, run).await? {
        RunEnd::Completed | RunEnd::Interrupted | RunEnd::Cancelled => return Ok(()),
        RunEnd::Deferred(message) => format!("deferred, a daemon retries it: {message}"),
        RunEnd::Failed(message) => message,
        RunEnd::Lost => "taken over by another worker".into(),
        RunEnd::Crashed(message) => {
            format!("a rank failed; the run is interrupted and a daemon resumes it: {message}")
        }
    };
    Err(TrainerError::Run { id, message })
}

/// What a launch key leads to.
enum Keyed {
    Claimed(i64, Option<Box<ddpm_registry::Run>>),
    AlreadyCompleted(i64),
}

/// The run created under `key`, created now the first time, and claimed even from a
/// worker still marked running (a launcher restarts workers only after stopping every
/// old one; a second launch with the same key takes the run over, as a crash).
async fn claim_keyed(worker: &Worker, new: &ddpm_registry::NewRun, key: &str) -> Result<Keyed> {
    let (run, created) = worker
        .registry
        .find_or_create_launched_run(new, key)
        .await?;
    let id = run.id;
    if created {
        tracing::info!(id, launch = key, "run created");
        let run = worker.registry.claim_run(id, &worker.name).await?;
        return Ok(Keyed::Claimed(id, run.map(Box::new)));
    }
    match run.status {
        ddpm_registry::RunStatus::Completed => return Ok(Keyed::AlreadyCompleted(id)),
        ddpm_registry::RunStatus::Failed | ddpm_registry::RunStatus::Cancelled => {
            return Err(TrainerError::Run {
                id,
                message: format!(
                    "launch {key:?} names this run, which is {}: restart it \
                     (`runs restart`) or use another launch id",
                    run.status.as_str()
                ),
            })
        }
        _ => {}
    }
    tracing::info!(id, launch = key, "resuming the launch's run");
    let run = worker.registry.claim_relaunched(id, &worker.name).await?;
    Ok(Keyed::Claimed(id, run.map(Box::new)))
}

/// Joins a launcher's world (blocking: on a thread of its own).
async fn join(launch: &Launch, device: Device, timeout: Duration) -> Result<World> {
    let launch = launch.clone();
    tokio::task::spawn_blocking(move || World::join(&launch, device, timeout))
        .await
        .map_err(|e| TrainerError::Thread(format!("joining the ranks: {e}")))?
}

/// The ranks `--nproc-per-node` asks for; rank 0 takes the first GPU of several.
fn local_ranks(global: &GlobalOptions, nproc: NprocPerNode, worker: &mut Worker) -> Result<Ranks> {
    let n = match nproc {
        NprocPerNode::Count(n) => n,
        NprocPerNode::Auto => (tch::Cuda::device_count().max(1)) as usize,
    };
    if n == 1 {
        return Ok(Ranks::Single);
    }
    if worker.device.is_cuda() && (tch::Cuda::device_count() as usize) < n {
        return Err(TrainerError::config(
            "nproc-per-node",
            format!(
                "{n} ranks on CUDA need {n} GPUs, {} are visible",
                tch::Cuda::device_count()
            ),
        ));
    }
    worker.device = rank_device(worker.device, 0);
    let exe = std::env::current_exe()
        .map_err(|e| TrainerError::Rank(format!("cannot find this program to start ranks: {e}")))?;
    Ok(Ranks::Local {
        n,
        options: RankOptions {
            exe,
            torch_threads: global.common.torch_threads,
            log_format: format!("{:?}", global.common.log_format).to_lowercase(),
            rank_timeout: global.rank_timeout,
        },
    })
}

/// A rank other than 0: joins the world, trains rank 0's job, exits. Signals are left
/// to rank 0 (torchrun and a terminal send them to every rank): it decides when all
/// stop, at the same step.
async fn follow(
    global: &GlobalOptions,
    launch: Launch,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("signal received: rank 0 decides when the ranks stop");
    });
    ddpm_core::set_cpu_threads(global.common.torch_threads);
    let device = global
        .common
        .device
        .parse::<ddpm_core::DeviceChoice>()?
        .resolve()?;
    let device = rank_device(device, launch.local_rank);
    let timeout = global.rank_timeout;
    let span = tracing::info_span!("rank", rank = launch.rank);
    let end = tokio::task::spawn_blocking(move || {
        let _span = span.entered();
        let world = World::join(&launch, device, timeout)?;
        let job = world.receive_job()?;
        tracing::info!(run = job.run_id, "job received from rank 0");
        train_follower(job, world)
    })
    .await
    .map_err(|e| TrainerError::Thread(format!("rank thread: {e}")))??;
    tracing::info!(?end, "rank done");
    Ok(())
}

/// `rank`: one rank (not 0) of a data-parallel run started by `--nproc-per-node`.
pub async fn rank(
    global: &GlobalOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let launch = Launch::from_env()?.ok_or_else(|| {
        TrainerError::Rank(
            "`rank` is started by `--nproc-per-node` (or a launcher) with RANK, WORLD_SIZE, \
             MASTER_ADDR and MASTER_PORT set"
                .into(),
        )
    })?;
    if launch.rank == 0 {
        return Err(TrainerError::Rank(
            "rank 0 is the trainer itself: run `train` or `daemon`".into(),
        ));
    }
    follow(global, launch, shutdown).await
}

/// What `daemon` was asked to do.
#[derive(Debug, Clone)]
pub struct DaemonSettings {
    pub poll_interval: Duration,
    pub stale_after: Duration,
    pub once: bool,
    pub nproc_per_node: NprocPerNode,
}

/// `daemon`: claims and executes runs until the queue is empty (`once`) or shutdown,
/// each time the one that has waited longest to be tried: queued, interrupted,
/// deferred (after its retry time) or running with a stale heartbeat (its worker died).
pub async fn daemon(
    global: &GlobalOptions,
    settings: &DaemonSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    if Launch::from_env()?.is_some() {
        return Err(TrainerError::Rank(
            "the daemon starts its own ranks (--nproc-per-node); under torchrun or a \
             PyTorchJob run `train` instead"
                .into(),
        ));
    }
    let DaemonSettings {
        poll_interval,
        stale_after,
        once,
        nproc_per_node,
    } = *settings;
    let mut worker = Worker::start(global, shutdown).await?;
    worker.ranks = local_ranks(global, nproc_per_node, &mut worker)?;
    tracing::info!(worker = %worker.name, ?poll_interval, ?stale_after, once, "daemon started");
    while !worker.shutdown.is_cancelled() {
        let claimed = worker.registry.claim_next(&worker.name, stale_after).await;
        match claimed {
            Ok(Some(run)) => match Attempt::execute(&worker, run).await {
                // The next run is claimed at once; only an empty queue waits.
                Ok(_) => continue,
                Err(e) if once => return Err(e),
                Err(e) => tracing::error!(error = %e, "recording a run's end failed"),
            },
            Ok(None) if once => {
                tracing::info!("queue empty: exiting (--once)");
                break;
            }
            Ok(None) => {}
            Err(e) if once => return Err(e.into()),
            Err(e) => tracing::error!(error = %e, "claiming a run failed; retrying"),
        }
        if !once {
            tokio::select! {
                _ = tokio::time::sleep(poll_interval) => {}
                _ = worker.shutdown.cancelled() => {}
            }
        }
    }
    tracing::info!("daemon stopped");
    Ok(())
}
