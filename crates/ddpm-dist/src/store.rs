//! The rendezvous store: a `c10d::TCPStore` (the one `torchrun` and PyTorch use), or a
//! view of one whose keys carry a prefix. Ranks find each other through it, and the
//! trainer passes rank 0's job description to the other ranks through it.

use std::{
    ffi::{c_void, CString},
    ptr,
    time::Duration,
};

use crate::{
    error::{DistError, Result},
    ffi,
};

/// A handle on a store. Cloning is not offered: [`Store::prefixed`] makes a view.
#[derive(Debug)]
pub struct Store {
    raw: *mut c_void,
}

// SAFETY: c10d's stores are used from many threads in PyTorch (every store call takes
// the store's own lock); the handle is only freed in `Drop`.
unsafe impl Send for Store {}
unsafe impl Sync for Store {}

fn c_string(what: &str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| DistError::Input(format!("{what} {s:?} contains a NUL byte")))
}

fn millis(timeout: Duration) -> i64 {
    i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX)
}

impl Store {
    /// Serves a store on `host:port` (port 0: a free port, see [`Store::port`]) for
    /// `world_size` ranks; each call on it waits at most `timeout`.
    pub fn serve(host: &str, port: u16, world_size: usize, timeout: Duration) -> Result<Store> {
        Store::tcp(host, port, true, world_size, timeout)
    }

    /// Connects to the store at `host:port`, trying for up to `timeout` (then a clear
    /// error, never a hang); each later call waits at most `timeout` too.
    pub fn connect(host: &str, port: u16, world_size: usize, timeout: Duration) -> Result<Store> {
        Store::tcp(host, port, false, world_size, timeout)
    }

    fn tcp(
        host: &str,
        port: u16,
        is_server: bool,
        world_size: usize,
        timeout: Duration,
    ) -> Result<Store> {
        let host_c = c_string("host", host)?;
        let world = i32::try_from(world_size)
            .map_err(|_| DistError::Input(format!("world size {world_size} is too large")))?;
        let mut err = ptr::null_mut();
        // SAFETY: valid C string; the shim catches every exception.
        let raw = unsafe {
            ffi::ddpm_store_tcp(
                host_c.as_ptr(),
                i32::from(port),
                i32::from(is_server),
                world,
                millis(timeout),
                &mut err,
            )
        };
        if raw.is_null() {
            let what = if is_server {
                "serving the rendezvous store"
            } else {
                "connecting to the rendezvous store"
            };
            return Err(ffi::take_error(what, err));
        }
        Ok(Store { raw })
    }

    /// A view whose keys are `prefix/<key>`: one namespace per attempt, so a restarted
    /// attempt never reads the keys of the one before it in a store that outlived it.
    pub fn prefixed(&self, prefix: &str) -> Result<Store> {
        let prefix_c = c_string("store prefix", prefix)?;
        let mut err = ptr::null_mut();
        // SAFETY: `self.raw` is live; the shim catches every exception.
        let raw = unsafe { ffi::ddpm_store_prefixed(self.raw, prefix_c.as_ptr(), &mut err) };
        if raw.is_null() {
            return Err(ffi::take_error("prefixing the store", err));
        }
        Ok(Store { raw })
    }

    /// The TCP port of the store (the bound one, for a server started on port 0).
    pub fn port(&self) -> u16 {
        // SAFETY: `self.raw` is live.
        let port = unsafe { ffi::ddpm_store_port(self.raw) };
        u16::try_from(port).unwrap_or(0)
    }

    pub fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        let key_c = c_string("store key", key)?;
        let mut err = ptr::null_mut();
        // SAFETY: `value` outlives the call; the shim copies it.
        let status = unsafe {
            ffi::ddpm_store_set(
                self.raw,
                key_c.as_ptr(),
                value.as_ptr(),
                value.len(),
                &mut err,
            )
        };
        if status != 0 {
            return Err(ffi::take_error("writing to the rendezvous store", err));
        }
        Ok(())
    }

    /// The value of `key`, waiting for it up to the store's timeout.
    pub fn get(&self, key: &str) -> Result<Vec<u8>> {
        let key_c = c_string("store key", key)?;
        let (mut data, mut len, mut err) = (ptr::null_mut(), 0usize, ptr::null_mut());
        // SAFETY: out-pointers are valid; on success `data` is a malloc'd buffer of `len`
        // bytes that we copy and free once.
        let status =
            unsafe { ffi::ddpm_store_get(self.raw, key_c.as_ptr(), &mut data, &mut len, &mut err) };
        if status != 0 {
            return Err(ffi::take_error("reading from the rendezvous store", err));
        }
        let value = unsafe { std::slice::from_raw_parts(data, len) }.to_vec();
        unsafe { ffi::ddpm_dist_free_bytes(data) };
        Ok(value)
    }

    pub(crate) fn raw(&self) -> *mut c_void {
        self.raw
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: freed once, here.
        unsafe { ffi::ddpm_store_free(self.raw) }
    }
}
