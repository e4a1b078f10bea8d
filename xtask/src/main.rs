//! `cargo xtask`: set-up, build, demo, tests and benchmarks for Driftwatch.
//!
//! Every command first installs what it needs (idempotently, saying so):
//! Debian's LLVM 22, the nightly toolchain's rust-src, and bpf-linker.

mod agent;
mod bench;
mod bench_collector;
mod bench_peers;
mod bench_pipeline;
mod demo;
mod floor;
mod fuzz;
mod image;
mod postgres;
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
    /// Lints (fmt, clippy), the whole test suite, kernel tests included
    /// (root), and a short run of every fuzz target.
    Test {
        /// Arguments passed to `cargo test` after `--` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Run each fuzz target (kernel records, policy, manifest, ingest) for
    /// SECONDS with cargo-fuzz on nightly; installs cargo-fuzz if needed.
    Fuzz {
        /// Seconds per target.
        #[arg(default_value_t = 60)]
        seconds: u64,
    },
    /// Build the agent's and the collector's container images (FROM
    /// scratch, with buildah; nothing pulled) and check that each binary
    /// starts from its image's root.
    Image {
        /// From the debug binaries (as `cargo xtask test` does), not release.
        #[arg(long)]
        debug: bool,
    },
    /// Start a throwaway PostgreSQL on loopback and print the exports the
    /// tests find it by (`eval` them before `cargo test`; the URL serves
    /// `driftwatch-collector --store URL` too); stopped and removed on
    /// Ctrl-C.
    Postgres,
    /// Benchmarks, reported as ratios measured in one run.
    Bench {
        /// Which benchmark.
        #[arg(value_enum, default_value = "sensors")]
        which: bench::Which,
        /// The collector benchmark's store.
        #[arg(long, value_enum, default_value = "sled")]
        store: bench_collector::StoreKind,
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
    c.args([
        "build",
        "-p",
        "driftwatch-agent",
        "-p",
        "driftwatch-collector",
    ]);
    if release {
        c.arg("--release");
    }
    setup::run(&mut c)?;
    Ok(root()
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("driftwatch-agent"))
}

/// Seconds per fuzz target in `cargo xtask test`.
const FUZZ_SECONDS_IN_TEST: u64 = 10;

fn test(args: &[String]) -> Result<()> {
    setup::require_root("cargo xtask test")?;
    setup::ensure()?;
    // Real servers the tests start on loopback: Prometheus scrapes both
    // daemons' /metrics.
    setup::apt(&["prometheus"])?;
    // The timeline web view is checked in a headless browser.
    setup::apt(&["chromium"])?;
    // The manifests under deploy/ are validated against the Kubernetes
    // API's schemas.
    setup::pip(&["kubernetes-validate"])?;
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
    // Everything the tests run, built once: with --all-targets the binaries
    // get the same features as the test build below, which then reuses
    // them instead of compiling the dependency tree a second time.
    eprintln!("xtask: building the workspace (debug, all targets)");
    setup::run(cargo().args(["build", "--workspace", "--all-targets"]))?;
    let agent = root().join("target/debug/driftwatch-agent");
    // The store suite runs on PostgreSQL as well as sled: a real server,
    // stopped and removed when the tests end.
    let pg = postgres::Server::start("test")?;
    eprintln!("xtask: cargo test --workspace (kernel tests load real programs)");
    let mut child = cargo()
        .args(["test", "--workspace", "--"])
        .args(args)
        .envs(pg.test_env())
        .env("DRIFTWATCH_AGENT_BIN", &agent)
        .env("DRIFTWATCH_VENV", setup::venv())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    // Pass the output through, and add up the per-binary results so the
    // run ends with one line for the whole suite.
    let (mut passed, mut failed) = (0u64, 0u64);
    if let Some(out) = child.stdout.take() {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines() {
            let line = line?;
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                let count = |word: &str| -> u64 {
                    rest.split(';')
                        .find_map(|p| {
                            p.trim()
                                .strip_suffix(word)
                                .and_then(|n| n.trim().rsplit(' ').next()?.parse().ok())
                        })
                        .unwrap_or(0)
                };
                passed += count(" passed");
                failed += count(" failed");
            }
        }
    }
    let status = child.wait()?;
    println!("{passed} passed, {failed} failed");
    if !status.success() || failed > 0 {
        anyhow::bail!("tests failed ({status})");
    }
    if passed == 0 {
        anyhow::bail!("no tests ran");
    }
    // A short run of every fuzz target, and the container images (from
    // the binaries just tested), when the whole suite ran.
    if args.is_empty() {
        fuzz::run(FUZZ_SECONDS_IN_TEST)?;
        image::build(&root().join("target/debug"))?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Setup => setup::ensure(),
        Cmd::Build => setup::ensure().and_then(|_| build_agent(true).map(|_| ())),
        Cmd::Demo => demo::run(),
        Cmd::Test { args } => test(&args),
        Cmd::Fuzz { seconds } => fuzz::run(seconds),
        Cmd::Image { debug } => image::run(debug),
        Cmd::Postgres => postgres::serve(),
        Cmd::Bench {
            which: bench::Which::Collector,
            store,
        } => bench_collector::run(store),
        Cmd::Bench {
            which: bench::Which::Pipeline,
            ..
        } => bench_pipeline::run(),
        Cmd::Bench {
            which: bench::Which::Peers,
            ..
        } => bench_peers::run(),
        Cmd::Bench { which, .. } => bench::run(which),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
