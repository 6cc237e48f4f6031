//! One function per command of the command line; [`crate::run`] dispatches to them with
//! one match. Each does the whole command, printing included (stdout is the command's
//! output; logs go to stderr). [`work`] has the two that start a worker and run
//! attempts (`train`, `daemon`); [`runs`] an operator's (`runs …`, `checkpoints …`).

mod runs;
mod work;

use std::path::Path;

use ddpm_registry::Registry;

pub use runs::{checkpoints, runs_cancel, runs_delete, runs_list, runs_restart, runs_show};
pub use work::{daemon, rank, train, DaemonSettings, TrainLaunch};

use crate::{
    cli::GlobalOptions,
    config::Overrides,
    demo::{write_demo_dataset, DemoSpec},
    error::Result,
    resolve,
};

/// `demo-data`: writes the generated demo dataset under `out_dir`.
pub fn demo_data(out_dir: &Path, spec: &DemoSpec) -> Result<()> {
    let dirs = write_demo_dataset(out_dir, spec)?;
    println!(
        "wrote {} classes × {} images of {size}×{size} px to {}",
        dirs.len(),
        spec.per_class,
        out_dir.display(),
        size = spec.size,
    );
    Ok(())
}

/// `submit`: queues the run a config file describes, for a daemon; prints its id.
pub async fn submit(global: &GlobalOptions, config: &Path, overrides: &Overrides) -> Result<()> {
    let new = resolve::new_run(config, overrides).await?;
    let run = connect(global).await?.create_run(&new).await?;
    tracing::info!(id = run.id, steps = run.total_steps, "run queued");
    println!("{}", run.id);
    Ok(())
}

async fn connect(global: &GlobalOptions) -> Result<Registry> {
    Ok(Registry::connect(&global.common.database_url()).await?)
}
