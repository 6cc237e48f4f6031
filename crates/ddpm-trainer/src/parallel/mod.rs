//! Data parallelism, with the semantics of PyTorch's DDP: W ranks, one process and one
//! device each, every rank holding the same weights, EMA and AdamW moments.
//!
//! - Rank 0 is the trainer the registry knows: it claims the run, resumes it, records
//!   metrics and writes checkpoints. The other ranks never touch the registry or the
//!   store; they get the job (config and training items) from rank 0 through the
//!   rendezvous store ([`job`]) and the weights by broadcast.
//! - Step s: each rank takes its contiguous share of global batch s − 1 and of the
//!   step's random draws (drawn for the whole global batch from the step seed, then
//!   sliced: a sample's image, timestep, noise and label dropout depend on the run seed,
//!   the step and its index in the global batch, never on the rank), so W = 1 and W = 2
//!   see the same samples. The flat gradient is all-reduced and averaged; then every
//!   rank applies the same clipping, AdamW and EMA update.
//! - Decisions are collective ([`World::agree`]): at the top of each step the ranks sum a
//!   few flags (rank 0's stop request and lost lease, any rank's non-finite loss), so all
//!   ranks stop at the same step. A rank that dies closes its connections and the others'
//!   next collective fails at once; one that hangs is given up on after the rank timeout.
//! - [`launcher`]: `--nproc-per-node N` starts local ranks 1..N−1 as child processes of
//!   rank 0 with the environment torchrun would set. Such a rank (or a torchrun-launched
//!   rank other than 0) joins the world, takes the job and runs `train_follower`
//!   (`commands/work.rs`).

pub mod job;
pub mod launcher;

use std::{ops::Range, time::Duration};

use ddpm_dist::{Launch, ProcessGroup, Store};
use tch::{Device, Kind, Tensor};

use crate::error::{Result, TrainerError};
pub use job::RankJob;
pub use launcher::{LocalRanks, RankOptions};

/// Where an attempt's ranks come from.
#[derive(Clone)]
pub enum Ranks {
    /// One process: this one.
    Single,
    /// `n` ranks on this host, this process rank 0, the others started per attempt
    /// (`--nproc-per-node`).
    Local { n: usize, options: RankOptions },
    /// This process is rank 0 of a world a launcher (torchrun) started and that it joined
    /// at start-up; the one attempt of the process takes it.
    Launched(std::sync::Arc<std::sync::Mutex<Option<World>>>),
}

/// How long to wait for rank 0 after a checkpoint step: it writes (and may score) the
/// checkpoint while the others wait in the next collective. A rank that dies meanwhile
/// is still noticed at once (its connections close).
pub const CHECKPOINT_WAIT: Duration = Duration::from_secs(6 * 3600);

/// This process's ranks: alone, or one of a group.
pub struct World {
    /// `None` for a world of one: every collective is a no-op.
    group: Option<Joined>,
    device: Device,
}

struct Joined {
    group: ProcessGroup,
    store: Store,
    /// Where collectives' tensors live: the CPU for Gloo, the device for NCCL.
    comm_device: Device,
    /// Every rank's device name, in rank order, as each announced it.
    devices: Vec<String>,
}

/// The flags the ranks agree on before each step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Control {
    /// Rank 0 was asked to stop (SIGTERM, cancel): save and stop.
    pub stop: bool,
    /// Rank 0 no longer holds the run: stop, save nothing.
    pub lost: bool,
    /// Some rank's last loss was not finite.
    pub non_finite: bool,
}

impl World {
    /// A world of one process on `device`.
    pub fn single(device: Device) -> World {
        World {
            group: None,
            device,
        }
    }

    /// Joins the world `launch` describes as its rank, on `device`: meets the others
    /// through the rendezvous store (served by rank 0 unless torchrun's agent serves it),
    /// waiting at most `timeout` for each of them.
    pub fn join(launch: &Launch, device: Device, timeout: Duration) -> Result<World> {
        if launch.world_size == 1 {
            return Ok(World::single(device));
        }
        let store = launch.store(timeout)?;
        World::meet(store, launch, device, timeout)
    }

    /// Rank 0 of `n` ranks on this host, which [`launcher::LocalRanks`] starts: serves a
    /// fresh store on a free loopback port, has `spawn` start the others with that port,
    /// and meets them.
    pub fn serve_local(
        n: usize,
        device: Device,
        timeout: Duration,
        spawn: impl FnOnce(u16) -> Result<launcher::LocalRanks>,
    ) -> Result<(World, launcher::LocalRanks)> {
        let launch = Launch::local(0, n, 0);
        let base = Store::serve(&launch.master_addr, 0, n, timeout)?;
        let ranks = spawn(base.port())?;
        let store = base.prefixed(&format!("ddpm/attempt_{}", launch.restart_count))?;
        Ok((World::meet(store, &launch, device, timeout)?, ranks))
    }

    /// Joins the process group through `store`: announces this rank's device, waits
    /// (up to `timeout` each) for every other rank's, and only then builds the group, so
    /// that a rank that never comes is reported by number.
    fn meet(store: Store, launch: &Launch, device: Device, timeout: Duration) -> Result<World> {
        store.set(
            &format!("device/{}", launch.rank),
            ddpm_core::device::device_name(device).as_bytes(),
        )?;
        let devices = (0..launch.world_size)
            .map(|rank| {
                let name = store.get(&format!("device/{rank}")).map_err(|e| {
                    TrainerError::Rank(format!(
                        "rank {rank} of {} did not join within {timeout:?}: {e}",
                        launch.world_size
                    ))
                })?;
                Ok(String::from_utf8_lossy(&name).into_owned())
            })
            .collect::<Result<Vec<String>>>()?;
        let group = ProcessGroup::new(
            &store,
            launch.rank,
            launch.world_size,
            device,
            &launch.gloo_interface(),
            timeout,
        )?;
        let comm_device = if group.backend() == ddpm_dist::Backend::Nccl {
            device
        } else {
            Device::Cpu
        };
        tracing::info!(
            rank = launch.rank,
            world_size = launch.world_size,
            backend = group.backend().name(),
            device = ?device,
            "joined the process group"
        );
        Ok(World {
            group: Some(Joined {
                group,
                store,
                comm_device,
                devices,
            }),
            device,
        })
    }

    pub fn rank(&self) -> usize {
        self.group.as_ref().map_or(0, |j| j.group.rank())
    }

    pub fn size(&self) -> usize {
        self.group.as_ref().map_or(1, |j| j.group.size())
    }

    pub fn is_leader(&self) -> bool {
        self.rank() == 0
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// How long a collective waits for a rank that hangs; `None` alone.
    pub fn timeout(&self) -> Option<Duration> {
        self.group.as_ref().map(|j| j.group.timeout())
    }

    /// This rank's samples of a global batch of `global` (which divides by the world
    /// size: checked when the run starts).
    pub fn share(&self, global: i64) -> Range<i64> {
        let per_rank = global / self.size() as i64;
        let start = per_rank * self.rank() as i64;
        start..start + per_rank
    }

    /// Refuses a global batch the ranks cannot split evenly, before any work.
    pub fn check_batch(&self, global: i64) -> Result<()> {
        check_global_batch(global, self.size())
    }

    /// In place: `t` becomes the mean of every rank's.
    pub fn mean_(&self, t: &mut Tensor) -> Result<()> {
        if let Some(j) = &self.group {
            j.reduce(t, j.group.timeout())?;
            *t /= self.size() as f64;
        }
        Ok(())
    }

    /// In place: `t` becomes the sum of every rank's.
    pub fn sum_(&self, t: &mut Tensor) -> Result<()> {
        match &self.group {
            Some(j) => j.reduce(t, j.group.timeout()),
            None => Ok(()),
        }
    }

    /// In place: every rank's `t` becomes rank 0's.
    pub fn broadcast_(&self, t: &mut Tensor) -> Result<()> {
        let Some(j) = &self.group else {
            return Ok(());
        };
        if t.device() == j.comm_device {
            j.group.broadcast(t, 0)?;
            return Ok(());
        }
        let mut staged = t.to_device(j.comm_device);
        j.group.broadcast(&mut staged, 0)?;
        t.copy_(&staged);
        Ok(())
    }

    /// The flags every rank agrees on: each is set if any rank set it. `loss` is this
    /// rank's last loss (its finiteness is read in the same host sync). Waits up to
    /// `wait` for the slowest rank.
    pub fn agree(&self, mine: Control, loss: Option<&Tensor>, wait: Duration) -> Result<Control> {
        let Some(j) = &self.group else {
            return Ok(mine);
        };
        let mut flags = Tensor::from_slice(&[f32::from(mine.stop), f32::from(mine.lost), 0.0])
            .to_device(j.comm_device);
        if let Some(loss) = loss {
            let bad = loss
                .isfinite()
                .logical_not()
                .to_kind(Kind::Float)
                .to_device(j.comm_device);
            flags.narrow(0, 2, 1).copy_(&bad.reshape([1]));
        }
        j.reduce(&mut flags, wait)?;
        let v = Vec::<f32>::try_from(&flags.to_device(Device::Cpu))?;
        Ok(Control {
            stop: v[0] > 0.0,
            lost: v[1] > 0.0,
            non_finite: v[2] > 0.0,
        })
    }

    /// Every rank's device, in rank order (each announced its own when it joined).
    pub fn devices(&self) -> Vec<String> {
        match &self.group {
            Some(j) => j.devices.clone(),
            None => vec![ddpm_core::device::device_name(self.device)],
        }
    }

    /// Rank 0: hands the job to the other ranks.
    pub fn publish_job(&self, job: &RankJob) -> Result<()> {
        if let Some(j) = &self.group {
            j.store.set(job::KEY, &job.to_bytes()?)?;
        }
        Ok(())
    }

    /// Ranks other than 0: the job rank 0 published, waiting for it as long as rank 0
    /// prepares (scanning a large dataset takes a while) but failing as soon as the store
    /// is gone.
    pub fn receive_job(&self) -> Result<RankJob> {
        let j = self
            .group
            .as_ref()
            .ok_or_else(|| TrainerError::Rank("a world of one has no job to receive".into()))?;
        loop {
            match j.store.get(job::KEY) {
                Ok(bytes) => return RankJob::from_bytes(&bytes),
                Err(e) if is_timeout(&e) => {
                    tracing::info!("waiting for rank 0 to publish the job");
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Joined {
    /// A sum over the ranks, staged through the communication device when `t` lives
    /// elsewhere (a CPU group over CUDA tensors never happens: the backend follows the
    /// device; a CPU tensor in an NCCL group does, for small bookkeeping sums).
    fn reduce(&self, t: &mut Tensor, wait: Duration) -> Result<()> {
        if t.device() == self.comm_device {
            self.group.all_reduce_sum_within(t, wait)?;
            return Ok(());
        }
        let mut staged = t.to_device(self.comm_device);
        self.group.all_reduce_sum_within(&mut staged, wait)?;
        t.copy_(&staged);
        Ok(())
    }
}

/// Refuses a global batch of `global` samples that `world_size` ranks cannot split
/// evenly, naming the fix.
pub fn check_global_batch(global: i64, world_size: usize) -> Result<()> {
    let w = world_size as i64;
    if global % w != 0 {
        return Err(TrainerError::config(
            "training.batch_size",
            format!(
                "the global batch {global} does not divide by the world size {w}: use a \
                 multiple of {w}"
            ),
        ));
    }
    Ok(())
}

/// Whether a store error is a wait that ran out (retry) rather than a store that is gone.
fn is_timeout(e: &ddpm_dist::DistError) -> bool {
    let text = e.to_string().to_ascii_lowercase();
    text.contains("timeout") || text.contains("timed out")
}

/// The device of local rank `local_rank` when the trainer was asked for `device`: the
/// local rank's GPU on a CUDA host (each rank its own), the CPU otherwise.
pub fn rank_device(device: Device, local_rank: usize) -> Device {
    if device.is_cuda() {
        Device::Cuda(local_rank)
    } else {
        device
    }
}
