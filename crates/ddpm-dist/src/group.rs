//! A process group: W ranks that reduce and broadcast tensors together, over Gloo (CPU
//! tensors) or NCCL (CUDA tensors). Everything but the constructor is the same code for
//! both, so the CPU tests cover the NCCL path's logic too.

use std::{ffi::c_void, ptr, time::Duration};

use tch::{Device, Tensor};

use crate::{
    error::{DistError, Result},
    ffi,
    store::Store,
};

/// Which c10d backend carries the collectives; it follows the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// CPU tensors, over TCP.
    Gloo,
    /// CUDA tensors, over NVLink / PCIe / InfiniBand.
    Nccl,
}

impl Backend {
    /// NCCL for a CUDA device, Gloo otherwise (as PyTorch's default does).
    pub fn for_device(device: Device) -> Backend {
        if device.is_cuda() {
            Backend::Nccl
        } else {
            Backend::Gloo
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        }
    }
}

/// Where a Gloo rank binds its sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GlooInterface {
    /// The address of this hostname (e.g. `127.0.0.1` for ranks on one host).
    Hostname(String),
    /// A network interface by name (`eth0`), as `GLOO_SOCKET_IFNAME` names it.
    Interface(String),
    /// torch's default: the address this machine's hostname resolves to.
    Default,
}

/// This rank's membership of a process group.
#[derive(Debug)]
pub struct ProcessGroup {
    raw: *mut c_void,
    rank: usize,
    size: usize,
    backend: Backend,
    device: Device,
    /// The bound on one collective unless a call names its own.
    timeout: Duration,
}

// SAFETY: a c10d backend may be called from any thread; this handle is used by one at a
// time (`&mut self` or `&self` on the training thread) and freed once in `Drop`.
unsafe impl Send for ProcessGroup {}

fn millis(timeout: Duration) -> i64 {
    i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX)
}

impl ProcessGroup {
    /// Joins the group of `size` ranks as `rank`, meeting the others through `store`
    /// (waits for them up to `timeout`). The backend follows `device`.
    pub fn new(
        store: &Store,
        rank: usize,
        size: usize,
        device: Device,
        interface: &GlooInterface,
        timeout: Duration,
    ) -> Result<ProcessGroup> {
        if rank >= size {
            return Err(DistError::Launch(format!(
                "rank {rank} is outside a world of {size}"
            )));
        }
        let (rank_c, size_c) = (rank as i32, size as i32);
        let backend = Backend::for_device(device);
        let mut err = ptr::null_mut();
        let raw = match backend {
            Backend::Gloo => {
                let (host, iface) = match interface {
                    GlooInterface::Hostname(h) => (h.as_str(), ""),
                    GlooInterface::Interface(i) => ("", i.as_str()),
                    GlooInterface::Default => ("", ""),
                };
                let c = |s: &str| {
                    std::ffi::CString::new(s)
                        .map_err(|_| DistError::Input(format!("{s:?} contains a NUL byte")))
                };
                let (host, iface) = (c(host)?, c(iface)?);
                // SAFETY: live store, valid C strings; the shim catches every exception.
                unsafe {
                    ffi::ddpm_group_gloo(
                        store.raw(),
                        rank_c,
                        size_c,
                        host.as_ptr(),
                        iface.as_ptr(),
                        millis(timeout),
                        &mut err,
                    )
                }
            }
            // SAFETY: as above.
            Backend::Nccl => unsafe {
                ffi::ddpm_group_nccl(store.raw(), rank_c, size_c, millis(timeout), &mut err)
            },
        };
        if raw.is_null() {
            return Err(ffi::take_error("joining the process group", err));
        }
        Ok(ProcessGroup {
            raw,
            rank,
            size,
            backend,
            device,
            timeout,
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// In place: `tensor` becomes the sum of every rank's, within the group's timeout.
    pub fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<()> {
        self.all_reduce_sum_within(tensor, self.timeout)
    }

    /// [`ProcessGroup::all_reduce_sum`] waiting up to `timeout` (a rank that is gone is
    /// noticed at once, as its connections close; the timeout is for one that hangs).
    pub fn all_reduce_sum_within(&self, tensor: &mut Tensor, timeout: Duration) -> Result<()> {
        self.check(tensor)?;
        let mut err = ptr::null_mut();
        // SAFETY: a live tch tensor is an `at::Tensor*`; the shim catches every exception.
        let status = unsafe {
            ffi::ddpm_group_allreduce_sum(
                self.raw,
                tensor.as_mut_ptr().cast(),
                millis(timeout),
                &mut err,
            )
        };
        if status != 0 {
            return Err(ffi::take_error("all-reduce", err));
        }
        Ok(())
    }

    /// In place: every rank's `tensor` becomes `root`'s.
    pub fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<()> {
        self.check(tensor)?;
        let mut err = ptr::null_mut();
        // SAFETY: as in `all_reduce_sum_within`.
        let status = unsafe {
            ffi::ddpm_group_broadcast(
                self.raw,
                tensor.as_mut_ptr().cast(),
                root as i32,
                millis(self.timeout),
                &mut err,
            )
        };
        if status != 0 {
            return Err(ffi::take_error("broadcast", err));
        }
        Ok(())
    }

    /// A collective reads and writes the tensor's storage directly: it must be dense and
    /// on the group's device.
    fn check(&self, tensor: &Tensor) -> Result<()> {
        if tensor.device() != self.device {
            return Err(DistError::Input(format!(
                "a {} collective got a tensor on {:?}, the group is on {:?}",
                self.backend.name(),
                tensor.device(),
                self.device
            )));
        }
        if !tensor.is_contiguous() {
            return Err(DistError::Input(
                "collectives take contiguous tensors".into(),
            ));
        }
        Ok(())
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: freed once, here.
        unsafe { ffi::ddpm_group_free(self.raw) }
    }
}
