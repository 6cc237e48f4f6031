//! The GPU must be visible to our binaries: `libtorch_cuda.so` has to be a NEEDED entry,
//! or CUDA kernels are never registered and `tch` silently reports no GPU. No GPU here
//! would notice, so this checks the ELF itself (see crates/ddpm-build).

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
    assert_eq!(ddpm_core::LIBTORCH_VERSION, "2.11.0");
    let t = tch::Tensor::from_slice(&[1.0f32, 2.0]).sum(tch::Kind::Float);
    assert_eq!(t.double_value(&[]), 3.0);
}
