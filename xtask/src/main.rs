//! `cargo xtask`: set-up, build, demo, tests and benchmarks for Driftwatch.
//!
//! Every command first installs what it needs (idempotently, saying so):
//! Debian's LLVM 22, the nightly toolchain's rust-src, and bpf-linker.

mod agent;
mod bench;
mod demo;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Driftwatch developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the toolchain pieces (LLVM 22, nightly rust-src, bpf-linker).
    Setup,
    /// Build the agent (release) with its embedded eBPF object.
    Build,
    /// Start the agent on a sample policy, make real changes and connects,
    /// and show what it saw.
    Demo,
    /// Lints (fmt, clippy) and the whole test suite, kernel tests included (root).
    Test {
        /// Arguments passed to `cargo test` after `--` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Benchmarks, reported as ratios measured in one run.
    Bench {
        /// Which benchmark.
        #[arg(value_enum, default_value = "sensors")]
        which: bench::Which,
    },
}

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// A `cargo` command in the workspace with bpf-linker on `PATH`.
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root())
        .env("PATH", setup::path_with_cargo_bin());
    c
}

/// Builds the agent; returns the binary's path.
pub fn build_agent(release: bool) -> Result<PathBuf> {
    eprintln!(
        "xtask: building driftwatch-agent ({})",
        if release { "release" } else { "debug" }
    );
    let mut c = cargo();
    c.args(["build", "-p", "driftwatch-agent"]);
    if release {
        c.arg("--release");
    }
    setup::run(&mut c)?;
    Ok(root()
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("driftwatch-agent"))
}

fn test(args: &[String]) -> Result<()> {
    setup::require_root("cargo xtask test")?;
    setup::ensure()?;
    eprintln!("xtask: cargo fmt --check");
    setup::run(cargo().args(["fmt", "--all", "--check"]))?;
    eprintln!("xtask: cargo clippy --workspace --all-targets -- -D warnings");
    setup::run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    let agent = build_agent(false)?;
    eprintln!("xtask: cargo test --workspace (kernel tests load real programs)");
    setup::run(
        cargo()
            .args(["test", "--workspace", "--"])
            .args(args)
            .env("DRIFTWATCH_AGENT_BIN", &agent),
    )
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Setup => setup::ensure(),
        Cmd::Build => setup::ensure().and_then(|_| build_agent(true).map(|_| ())),
        Cmd::Demo => demo::run(),
        Cmd::Test { args } => test(&args),
        Cmd::Bench { which } => bench::run(which),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
