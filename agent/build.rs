//! Builds the eBPF object with the nightly toolchain and `bpf-linker`, and
//! leaves it in `OUT_DIR/driftwatch-ebpf` for `include_bytes_aligned!`.
//! `AYA_BUILD_SKIP=1` leaves an empty object instead (lint-only builds); the
//! agent then refuses to start with a message saying so.

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let skip =
        std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        std::fs::write(out.join("driftwatch-ebpf"), [])?;
        return Ok(());
    }
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?)
        .join("../agent-ebpf")
        .canonicalize()?;
    let root = root
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", root.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "agent-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
