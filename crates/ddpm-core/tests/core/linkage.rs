//! The GPU must be visible to our binaries: `libtorch_cuda.so` has to be a NEEDED entry,
//! or CUDA kernels are never registered and `tch` silently reports no GPU. No GPU here
//! would notice, so this checks the ELF itself (see crates/ddpm-build). And the libtorch
//! the process loads is the release [`ddpm_core::LIBTORCH_VERSION`] names.

use std::process::Command;

pub fn needed_libraries(binary: &std::path::Path) -> Vec<String> {
    let out = Command::new("readelf")
        .arg("-d")
        .arg(binary)
        .output()
        .expect("readelf (binutils) must be installed to run this test");
    assert!(
        out.status.success(),
        "readelf failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| {
            l.split('[')
                .nth(1)
                .map(|s| s.trim_end_matches(']').to_string())
        })
        .collect()
}

#[test]
fn test_binary_links_libtorch_cuda_and_finds_it_by_rpath() {
    let exe = std::env::current_exe().unwrap();
    let needed = needed_libraries(&exe);
    assert!(
        needed.iter().any(|l| l == "libtorch_cuda.so"),
        "libtorch_cuda.so is not NEEDED by {}: {needed:?}",
        exe.display()
    );
    let out = Command::new("readelf")
        .arg("-d")
        .arg(&exe)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("RUNPATH") || text.contains("RPATH"),
        "no rpath in {}",
        exe.display()
    );
    // And libtorch really works from this binary without any environment set up.
    let t = tch::Tensor::from_slice(&[1.0f32, 2.0]).sum(tch::Kind::Float);
    assert_eq!(t.double_value(&[]), 3.0);
}

#[test]
fn the_loaded_libtorch_is_the_version_the_crate_declares() {
    // Map libtorch in (it is NEEDED, so it already is; this keeps the test honest).
    let _ = tch::Tensor::from_slice(&[1.0f32]);
    let library =
        loaded_library("libtorch_cpu.so").expect("libtorch_cpu.so is not mapped into this process");
    // The wheel's layout: torch/lib/libtorch_cpu.so beside torch/version.py.
    let torch = library
        .parent()
        .and_then(|lib| lib.parent())
        .expect("torch/lib/");
    let version_py = torch.join("version.py");
    let text = std::fs::read_to_string(&version_py)
        .unwrap_or_else(|e| panic!("{}: {e}", version_py.display()));
    let version = text
        .lines()
        .find_map(|l| l.strip_prefix("__version__ = "))
        .map(|v| v.trim().trim_matches(|c| c == '\'' || c == '"'))
        .unwrap_or_else(|| panic!("no __version__ in {}", version_py.display()));
    // `2.11.0+cu130`: the local part names the CUDA build, not the API.
    let release = version.split('+').next().unwrap_or(version);
    assert_eq!(
        release,
        ddpm_core::LIBTORCH_VERSION,
        "this process loaded libtorch {version} from {}",
        library.display()
    );
}

/// The file of a shared library mapped into this process, from `/proc/self/maps`.
fn loaded_library(name: &str) -> Option<std::path::PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(std::path::PathBuf::from)
        .find(|p| p.file_name().is_some_and(|f| f == name))
}
