//! Build script for the tonic baseline server: compiles the example protos
//! (`../protos`) and the load bench's own (`plan/protos`) with protox (pure
//! Rust, no `protoc` needed) into a `FileDescriptorSet` and generates the
//! prost messages and tonic server stubs from it, exactly as a typical tonic
//! project would.

use std::path::{Path, PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let protos = manifest_dir.join("..").join("protos");
    let bench_protos = manifest_dir.join("plan").join("protos");

    let files = [
        protos.join("helloworld.proto"),
        protos.join("shop").join("v1").join("catalog.proto"),
        bench_protos.join("bench").join("v1").join("bench.proto"),
    ];
    println!("cargo:rerun-if-changed=build.rs");
    rerun_if_changed_dir(&protos)?;
    rerun_if_changed_dir(&bench_protos)?;

    let fds = protox::compile(&files, [&protos, &bench_protos])?;
    tonic_prost_build::configure().build_client(false).build_server(true).build_transport(false).compile_fds(fds)?;
    Ok(())
}

/// Asks cargo to rebuild when any file under `dir` changes.
fn rerun_if_changed_dir(dir: &Path) -> std::io::Result<()> {
    println!("cargo:rerun-if-changed={}", dir.display());
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            rerun_if_changed_dir(&path)?;
        } else {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    Ok(())
}
