//! The shim's C ABI (`csrc/shim.cpp`). Pointers are opaque boxes owned by the safe
//! wrappers; `err` receives a `malloc`'d message on failure, freed with
//! [`ddpm_dist_free_message`] (see [`take_error`]).

use std::ffi::{c_char, c_int, c_void, CStr};

use crate::DistError;

extern "C" {
    pub fn ddpm_dist_free_message(message: *mut c_char);
    pub fn ddpm_dist_has_nccl() -> c_int;
    pub fn ddpm_dist_free_bytes(data: *mut u8);

    pub fn ddpm_store_tcp(
        host: *const c_char,
        port: c_int,
        is_server: c_int,
        world_size: c_int,
        timeout_ms: i64,
        err: *mut *mut c_char,
    ) -> *mut c_void;
    pub fn ddpm_store_prefixed(
        base: *mut c_void,
        prefix: *const c_char,
        err: *mut *mut c_char,
    ) -> *mut c_void;
    pub fn ddpm_store_port(store: *mut c_void) -> c_int;
    pub fn ddpm_store_free(store: *mut c_void);
    pub fn ddpm_store_set(
        store: *mut c_void,
        key: *const c_char,
        data: *const u8,
        len: usize,
        err: *mut *mut c_char,
    ) -> c_int;
    pub fn ddpm_store_get(
        store: *mut c_void,
        key: *const c_char,
        data: *mut *mut u8,
        len: *mut usize,
        err: *mut *mut c_char,
    ) -> c_int;

    pub fn ddpm_group_gloo(
        store: *mut c_void,
        rank: c_int,
        world_size: c_int,
        hostname: *const c_char,
        interface: *const c_char,
        timeout_ms: i64,
        err: *mut *mut c_char,
    ) -> *mut c_void;
    pub fn ddpm_group_nccl(
        store: *mut c_void,
        rank: c_int,
        world_size: c_int,
        timeout_ms: i64,
        err: *mut *mut c_char,
    ) -> *mut c_void;
    pub fn ddpm_group_free(group: *mut c_void);
    pub fn ddpm_group_allreduce_sum(
        group: *mut c_void,
        tensor: *mut c_void,
        timeout_ms: i64,
        err: *mut *mut c_char,
    ) -> c_int;
    pub fn ddpm_group_broadcast(
        group: *mut c_void,
        tensor: *mut c_void,
        root: c_int,
        timeout_ms: i64,
        err: *mut *mut c_char,
    ) -> c_int;
}

/// Turns the shim's error slot into a [`DistError`] (and frees it).
pub fn take_error(what: &'static str, err: *mut c_char) -> DistError {
    let message = if err.is_null() {
        "failed without a message".to_owned()
    } else {
        // SAFETY: the shim wrote a NUL-terminated malloc'd string, ours to free once.
        let text = unsafe { CStr::from_ptr(err) }
            .to_string_lossy()
            .into_owned();
        unsafe { ddpm_dist_free_message(err) };
        text
    };
    DistError::C10d { what, message }
}
