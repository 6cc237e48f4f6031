//! A rank other than 0: it joins the world, takes rank 0's job from the rendezvous store
//! and trains its share of every step until rank 0's loop ends (see [`super`]).

use std::time::Duration;

use ddpm_dist::Launch;
use tch::Device;

use super::World;
use crate::{
    error::Result,
    train::{train_follower, LoopEnd},
};

/// Runs rank `launch.rank` (> 0) on `device`, waiting at most `timeout` for the others.
pub fn run(launch: &Launch, device: Device, timeout: Duration) -> Result<LoopEnd> {
    let world = World::join(launch, device, timeout)?;
    let job = world.receive_job()?;
    tracing::info!(run = job.run_id, "job received from rank 0");
    train_follower(job, world)
}
