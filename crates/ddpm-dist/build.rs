//! Compiles `csrc/shim.cpp` against the headers of the libtorch the workspace links
//! (`LIBTORCH`, as `torch-sys` does) and links it into this crate.
//!
//! - Gloo: torch's `ProcessGroupGloo.hpp` names gloo's own types, whose headers the wheel
//!   does not ship; gloo's code is inside `libtorch_cpu.so`. The headers come from
//!   Debian's `libgloo-dev` (scripts/setup-libtorch.sh installs it), or from
//!   `DDPM_GLOO_INCLUDE`.
//! - NCCL: compiled in when `libtorch_cuda.so` is there and NCCL's and CUDA's headers
//!   (the wheel's `nvidia-nccl-cu13`, `nvidia-cuda-runtime`, plus `nvidia-cuda-crt` and
//!   `nvidia-cuda-cccl`, which the set-up script adds) are found beside torch. The shim
//!   calls no CUDA runtime function itself, so nothing new is linked. Without them the
//!   NCCL constructor returns a clear error and everything else is the same code.

use std::path::{Path, PathBuf};

fn main() {
    ddpm_build::link_libtorch();
    println!("cargo:rerun-if-changed=csrc/shim.cpp");
    println!("cargo:rerun-if-env-changed=DDPM_GLOO_INCLUDE");
    let torch = std::env::var_os("LIBTORCH")
        .map(PathBuf::from)
        .and_then(|p| p.canonicalize().ok())
        .expect("LIBTORCH (checked by ddpm-build)");
    let gloo = std::env::var_os("DDPM_GLOO_INCLUDE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/include"));
    if !gloo.join("gloo/algorithm.h").exists() {
        panic!(
            "gloo's headers are not in {}: run scripts/setup-libtorch.sh (it installs \
             Debian's libgloo-dev), or set DDPM_GLOO_INCLUDE",
            gloo.display()
        );
    }
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .file("csrc/shim.cpp")
        .std("c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("USE_C10D_GLOO", None)
        .include(torch.join("include"))
        .include(torch.join("include/torch/csrc/api/include"))
        .include(&gloo)
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-interference-size")
        .warnings(false);
    match nccl_includes(&torch) {
        Some(dirs) => {
            build
                .define("USE_C10D_NCCL", None)
                .define("DDPM_DIST_NCCL", None);
            for dir in dirs {
                build.include(dir);
            }
        }
        None => println!(
            "cargo:warning=ddpm-dist: NCCL headers not found beside {}: this build trains \
             on CPUs (Gloo) only",
            torch.display()
        ),
    }
    build.compile("ddpm_dist_shim");
}

/// NCCL's and CUDA's include directories, when this libtorch has CUDA and they exist.
fn nccl_includes(torch: &Path) -> Option<Vec<PathBuf>> {
    if !torch.join("lib/libtorch_cuda.so").exists() {
        return None;
    }
    let nvidia = torch.parent()?.join("nvidia");
    let cuda = nvidia.join("cu13/include");
    let dirs = vec![nvidia.join("nccl/include"), cuda.clone(), cuda.join("cccl")];
    let present = dirs[0].join("nccl.h").exists()
        && cuda.join("cuda_runtime.h").exists()
        && cuda.join("crt/host_config.h").exists()
        && dirs[2].join("cuda/std/version").exists();
    present.then_some(dirs)
}
