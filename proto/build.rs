//! Compiles `proto/caretwin/v1/*.proto` into Rust with protox (a pure-Rust protobuf
//! compiler, so no `protoc` is needed) and tonic-prost-build, and writes the encoded file
//! descriptor set next to the generated code for gRPC reflection.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::{env, fs};

use protox::prost::Message as _;

/// Root of the proto import paths.
const INCLUDE_DIR: &str = "proto";
/// Directory of the `caretwin.v1` package.
const PACKAGE_DIR: &str = "proto/caretwin/v1";
/// File name of the encoded descriptor set in `OUT_DIR`, included by `src/lib.rs`.
const DESCRIPTOR_FILE: &str = "caretwin_descriptor.bin";

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed={INCLUDE_DIR}");
    println!("cargo:rerun-if-changed=build.rs");

    let files = proto_files(Path::new(PACKAGE_DIR))?;
    // Source info is kept: prost turns proto comments into doc comments, and reflection
    // clients show them.
    let fds = protox::compile(&files, [INCLUDE_DIR])?;

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out_dir.join(DESCRIPTOR_FILE), fds.encode_to_vec())?;

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Ordered maps make encoding deterministic, which deterministic simulation needs.
        .btree_map(".")
        // Compressed payloads are handed around without copying.
        .bytes(".caretwin.v1.CompressedFrame.payload")
        .compile_fds(fds)?;
    Ok(())
}

/// Every `.proto` file of the package, sorted so that the output does not depend on the
/// order the file system lists them in.
fn proto_files(dir: &Path) -> Result<Vec<PathBuf>, Box<dyn Error>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "proto") {
            files.push(path);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(format!("no .proto files in {}", dir.display()).into());
    }
    Ok(files)
}
