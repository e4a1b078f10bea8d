//! `cargo xtask fuzz [SECONDS]`: each fuzz target of `tests/fuzz` for a
//! bounded time, with cargo-fuzz (libFuzzer, AddressSanitizer) on the
//! nightly toolchain. The corpus grows in `target/fuzz-corpus`; checked-in
//! seeds are read from `tests/fuzz/seeds`. A crash or a hang (an input
//! taking over 10 s) fails the run, and libFuzzer prints the input's path.

use std::process::Command;

use anyhow::{Context as _, Result};

use crate::{root, setup};

/// The targets: the kernel record decoder, the policy and manifest
/// parsers, and ingest of protobuf batches into a store.
pub const TARGETS: [&str; 4] = ["kernel_record", "policy", "manifest", "ingest_batch"];

fn cargo_fuzz_present() -> bool {
    Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Installs cargo-fuzz unless present.
pub fn ensure_cargo_fuzz() -> Result<()> {
    if cargo_fuzz_present() {
        eprintln!("xtask: cargo-fuzz present");
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz (a minute or two)");
    setup::run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
}

/// Where the sanitized build goes: outside the checkout, so a fresh clone
/// on the same machine (CI) does not build every dependency again.
fn target_dir() -> std::path::PathBuf {
    if let Some(d) = std::env::var_os("DRIFTWATCH_FUZZ_TARGET_DIR") {
        return d.into();
    }
    match std::env::var_os("HOME") {
        Some(h) => std::path::Path::new(&h).join(".cache/driftwatch/fuzz-target"),
        None => root().join("target/fuzz"),
    }
}

/// Runs every target for `seconds`.
pub fn run(seconds: u64) -> Result<()> {
    setup::ensure()?;
    ensure_cargo_fuzz()?;
    let fuzz_dir = root().join("tests/fuzz");
    let target = target_dir();
    eprintln!("xtask: building the fuzz targets (nightly, AddressSanitizer)");
    setup::run(
        Command::new("cargo")
            .args(["+nightly", "fuzz", "build", "--fuzz-dir"])
            .arg(&fuzz_dir)
            .arg("--target-dir")
            .arg(&target)
            .env("AYA_BUILD_SKIP", "1"),
    )?;
    for name in TARGETS {
        let corpus = root().join("target/fuzz-corpus").join(name);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("creating {}", corpus.display()))?;
        let mut cmd = Command::new("cargo");
        cmd.args(["+nightly", "fuzz", "run", "--fuzz-dir"])
            .arg(&fuzz_dir)
            .arg("--target-dir")
            .arg(&target)
            .arg(name)
            .arg(&corpus);
        let seeds = fuzz_dir.join("seeds").join(name);
        if seeds.is_dir() {
            cmd.arg(&seeds);
        }
        cmd.args([
            "--",
            &format!("-max_total_time={seconds}"),
            "-timeout=10",
            "-rss_limit_mb=2048",
            "-print_final_stats=1",
        ])
        .env("AYA_BUILD_SKIP", "1");
        eprintln!("xtask: fuzzing {name} for {seconds} s");
        setup::run(&mut cmd).with_context(|| format!("fuzz target {name} failed"))?;
    }
    eprintln!(
        "xtask: {} fuzz targets ran {seconds} s each without a crash or a hang",
        TARGETS.len()
    );
    Ok(())
}
