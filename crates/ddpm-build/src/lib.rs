//! Build-script helper shared by every crate whose binaries (bins, tests, benches) link
//! libtorch.
//!
//! Two things must hold for a binary to use libtorch without hand-set variables:
//!
//! 1. **It finds the libraries at run time.** The `LIBTORCH` path (set by the workspace's
//!    `.cargo/config.toml` to the `.libtorch` symlink that `scripts/setup-libtorch.sh`
//!    makes) is resolved to the real cache directory and written as an rpath, so the
//!    binary keeps working wherever it is run from.
//! 2. **It sees the GPU.** Nothing calls into `libtorch_cuda.so` directly, so the linker's
//!    `--as-needed` drops it, CUDA kernels are never registered and `tch` silently reports
//!    no GPU. It is linked with `--no-as-needed`; a test in `ddpm-core` checks `NEEDED`.

use std::path::PathBuf;

/// Emits the link arguments for the calling package's binaries. Call from `build.rs`.
pub fn link_libtorch() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let Some(libtorch) = std::env::var_os("LIBTORCH").map(PathBuf::from) else {
        panic!("LIBTORCH is not set: build from the workspace (its .cargo/config.toml sets it)");
    };
    let Ok(libtorch) = libtorch.canonicalize() else {
        panic!(
            "libtorch not found at {}: run scripts/setup-libtorch.sh (it installs the \
             torch==2.11.0 wheel into a cache and links it there)",
            libtorch.display()
        );
    };
    let lib = libtorch.join("lib");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
