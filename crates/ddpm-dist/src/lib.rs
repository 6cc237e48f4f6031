//! Data-parallel collectives on libtorch's own c10d, the C++ core of
//! `torch.distributed`: the same rendezvous store (`TCPStore`) and the same backends
//! (Gloo on CPUs, NCCL on CUDA devices) that PyTorch's DDP and `torchrun` use, reached
//! through a small C++ shim (`csrc/shim.cpp`, compiled by `build.rs` against the
//! workspace's libtorch).
//!
//! - [`ffi`]: the shim's C ABI; every C++ exception becomes an error message.
//! - [`store`]: [`Store`], a key-value rendezvous (a `TCPStore`, or a prefixed view of one).
//! - [`group`]: [`ProcessGroup`], in-place all-reduce (sum) and broadcast of tch tensors,
//!   on a [`Backend`] chosen by the device; only the constructor differs by backend.
//! - [`launch`]: [`Launch`], a rank's place in the world as `torchrun` (or ddpm's own
//!   launcher, which sets the same variables) describes it in the environment.
//!
//! Timeouts are explicit everywhere: c10d's defaults (5 to 30 minutes) are far longer
//! than a trainer should wait for a rank that is gone.

mod error;
mod ffi;
pub mod group;
pub mod launch;
pub mod store;

pub use error::{DistError, Result};
pub use group::{Backend, GlooInterface, ProcessGroup};
pub use launch::Launch;
pub use store::Store;

/// Whether this build can make NCCL process groups (its build found NCCL's headers).
pub fn has_nccl() -> bool {
    // SAFETY: a constant query with no arguments.
    unsafe { ffi::ddpm_dist_has_nccl() != 0 }
}
