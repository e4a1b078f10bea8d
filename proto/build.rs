//! Compiles `driftwatch/v1/driftwatch.proto` with protox (pure Rust: no
//! protoc to install) and generates the tonic/prost code into `OUT_DIR`,
//! with the encoded descriptor set for server reflection.

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "driftwatch/v1/driftwatch.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["."])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("driftwatch_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
