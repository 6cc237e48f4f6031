//! ddpm's own launcher for the ranks of one host (`--nproc-per-node N`), for images
//! without Python (and so without torchrun): rank 0 is the process that claimed the
//! run; it serves the rendezvous store and starts ranks 1..N−1 as child processes of
//! its own binary (`ddpm-trainer rank`) with the variables torchrun would set. The
//! children are stopped when the attempt ends, whichever way it ends.

use std::{
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use ddpm_dist::Launch;
use tch::Device;

use crate::error::{Result, TrainerError};

/// What every local rank is started with, besides its place in the world.
#[derive(Debug, Clone)]
pub struct RankOptions {
    /// The trainer binary (normally this process's own).
    pub exe: PathBuf,
    pub torch_threads: i32,
    pub log_format: String,
    pub rank_timeout: Duration,
}

/// Local ranks 1..N−1, running.
pub struct LocalRanks {
    children: Vec<(usize, Child)>,
}

impl LocalRanks {
    /// Starts ranks 1..`n` of a world of `n` on this host, meeting at the store rank 0
    /// serves on `port`. Rank r runs on [`super::rank_device`]`(device, r)`.
    pub fn spawn(n: usize, port: u16, device: Device, options: &RankOptions) -> Result<LocalRanks> {
        let mut ranks = LocalRanks {
            children: Vec::new(),
        };
        for rank in 1..n {
            let launch = Launch::local(rank, n, port);
            let device = ddpm_core::device::device_name(super::rank_device(device, rank));
            let mut command = Command::new(&options.exe);
            command
                .arg("rank")
                .args(["--device", &device])
                .args(["--torch-threads", &options.torch_threads.to_string()])
                .args(["--log-format", &options.log_format])
                .args([
                    "--rank-timeout",
                    &format!("{}ms", options.rank_timeout.as_millis()),
                ])
                .envs(launch.to_vars())
                .stdin(Stdio::null());
            let child = command.spawn().map_err(|e| {
                TrainerError::Rank(format!(
                    "cannot start rank {rank} ({}): {e}",
                    options.exe.display()
                ))
            })?;
            tracing::info!(rank, pid = child.id(), device, "rank started");
            ranks.children.push((rank, child));
        }
        Ok(ranks)
    }

    /// The process ids of the ranks, in rank order.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(|(_, c)| c.id()).collect()
    }

    /// Waits up to `grace` for every rank to exit on its own (they stop at the same step
    /// as rank 0), then kills those left. Returns each rank's exit status.
    pub fn stop(mut self, grace: Duration) -> Vec<(usize, Option<ExitStatus>)> {
        let deadline = Instant::now() + grace;
        let mut out = Vec::new();
        for (rank, mut child) in std::mem::take(&mut self.children) {
            let status = loop {
                match child.try_wait() {
                    Ok(Some(status)) => break Some(status),
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        tracing::warn!(rank, "rank still running after the attempt: killed");
                        let _ = child.kill();
                        break child.wait().ok();
                    }
                }
            };
            out.push((rank, status));
        }
        out
    }
}

impl Drop for LocalRanks {
    /// On every path out of an attempt (an error, a panic): no rank outlives it.
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
