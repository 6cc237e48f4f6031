//! An operator's commands: run history (`runs list|show`), a run's control (`runs
//! cancel|restart|delete`) and promotions (`checkpoints …`), each printing what it did.

use ddpm_registry::{CheckpointStore, RunStatus};

use super::connect;
use crate::{cli::CheckpointsCommand, cli::GlobalOptions, error::Result, history};

/// `runs list`: runs, newest first, optionally of one status.
pub async fn runs_list(
    global: &GlobalOptions,
    status: Option<RunStatus>,
    limit: i64,
) -> Result<()> {
    print!(
        "{}",
        history::list(&connect(global).await?, status, limit).await?
    );
    Ok(())
}

/// `runs show`: one run's config, dataset, loss curve and checkpoints.
pub async fn runs_show(global: &GlobalOptions, id: i64) -> Result<()> {
    print!("{}", history::show(&connect(global).await?, id).await?);
    Ok(())
}

/// `runs cancel`: a running run stops at its worker's next heartbeat, any other at once.
pub async fn runs_cancel(global: &GlobalOptions, id: i64) -> Result<()> {
    let run = connect(global).await?.cancel_run(id).await?;
    match run.status {
        RunStatus::Running => println!(
            "run {id} is running: its worker saves a state and stops it at its next heartbeat"
        ),
        status => println!("run {id} is {status}"),
    }
    Ok(())
}

/// `runs restart`: queues the run again, resuming or (`from_scratch`) from step 0.
pub async fn runs_restart(global: &GlobalOptions, id: i64, from_scratch: bool) -> Result<()> {
    let store = CheckpointStore::open_spec(&global.common.store_spec())?;
    let run = connect(global)
        .await?
        .restart_run(id, from_scratch, &store)
        .await?;
    match from_scratch {
        true => println!("run {id} is queued again from step 0"),
        false => println!(
            "run {id} is {}: a daemon resumes it from step {}",
            run.status, run.current_step
        ),
    }
    Ok(())
}

/// `runs delete`: the run's rows and files.
pub async fn runs_delete(global: &GlobalOptions, id: i64) -> Result<()> {
    let store = CheckpointStore::open_spec(&global.common.store_spec())?;
    let run = connect(global).await?.delete_run(id, &store).await?;
    println!("run {id} ({}) deleted with its checkpoints", run.status);
    Ok(())
}

/// `checkpoints promote|rollback|promotions`.
pub async fn checkpoints(global: &GlobalOptions, command: &CheckpointsCommand) -> Result<()> {
    let registry = connect(global).await?;
    print!(
        "{}",
        history::checkpoints_command(&registry, command).await?
    );
    Ok(())
}
