//! Builds the gVisor compatibility shim (`compat/statx_compat.c`) into a shared object the
//! Docker backend embeds and preloads in gVisor boxes. Needs a C compiler (`cc`, or `$CC`).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "compat/statx_compat.c";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-env-changed=CC");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("statx_compat.so");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .args(["-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o"])
        .arg(&out)
        .arg(src)
        .status()
        .unwrap_or_else(|e| panic!("running the C compiler {cc:?}: {e}"));
    assert!(status.success(), "{cc} failed to build {src}");
}
