//! The binary must see the GPU: `libtorch_cuda.so` is NEEDED (see crates/ddpm-build).

use std::process::Command;

#[test]
fn binary_links_libtorch_cuda() {
    let exe = env!("CARGO_BIN_EXE_ddpm-trainer");
    let out = Command::new("readelf")
        .args(["-d", exe])
        .output()
        .expect("readelf (binutils) must be installed to run this test");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let needed: Vec<&str> = text.lines().filter(|l| l.contains("(NEEDED)")).collect();
    assert!(
        needed.iter().any(|l| l.contains("[libtorch_cuda.so]")),
        "libtorch_cuda.so is not NEEDED by {exe}: {needed:?}"
    );
    assert!(
        text.contains("RUNPATH") || text.contains("RPATH"),
        "no rpath in {exe}"
    );
}
