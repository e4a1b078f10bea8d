//! Compiles `driftwatch/v1/driftwatch.proto` with protox (pure Rust: no
//! protoc to install) and generates the tonic/prost code into `OUT_DIR`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "driftwatch/v1/driftwatch.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["."])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
