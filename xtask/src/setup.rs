//! Installs what building and testing need, idempotently, saying what it does.

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context as _, Result};

/// Where Debian's LLVM 22 lives; bpf-linker links against it.
pub const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

fn say(msg: &str) {
    eprintln!("xtask: {msg}");
}

/// Runs a command, failing with its name and status.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn cargo_bin(name: &str) -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"));
    home.join("bin").join(name)
}

fn deb_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Installs missing Debian packages (one `apt-get update` first).
pub fn apt(pkgs: &[&str]) -> Result<()> {
    let missing: Vec<&str> = pkgs.iter().copied().filter(|p| !deb_installed(p)).collect();
    if missing.is_empty() {
        say(&format!("Debian packages present: {}", pkgs.join(" ")));
        return Ok(());
    }
    say(&format!(
        "installing Debian packages: {}",
        missing.join(" ")
    ));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Everything the eBPF build and the tests need.
pub fn ensure() -> Result<()> {
    apt(&[
        "llvm-22-dev",
        "libpolly-22-dev",
        "libzstd-dev",
        "zlib1g-dev",
        "python3",
        "iproute2",
    ])?;

    if succeeds(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        say("nightly toolchain present");
    } else {
        say("installing the nightly toolchain (builds the eBPF programs)");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let components = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .context("running rustup")?;
    if String::from_utf8_lossy(&components.stdout).contains("rust-src") {
        say("nightly rust-src present");
    } else {
        say("installing nightly rust-src (core is rebuilt for the BPF target)");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    let linker = cargo_bin("bpf-linker");
    if succeeds(Command::new(&linker).arg("--version")) {
        say("bpf-linker present");
    } else {
        say("building bpf-linker against LLVM 22 (about a minute)");
        let path = format!(
            "{LLVM_PREFIX}/bin:{}",
            std::env::var("PATH").unwrap_or_default()
        );
        run(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("PATH", path)
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env("LLVM_SYS_220_PREFIX", LLVM_PREFIX)
            .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX))?;
    }
    Ok(())
}

/// `PATH` with cargo's bin directory first, so aya-build finds bpf-linker.
pub fn path_with_cargo_bin() -> String {
    let bin = cargo_bin("");
    format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// Fails unless running as root (loading eBPF programs needs it).
pub fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} loads eBPF programs into the kernel and must run as root (try: sudo -E cargo xtask ...)");
    }
    Ok(())
}

/// The virtual environment of the Python tools the tests run.
pub fn venv() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
        .join(".cache/driftwatch/venv")
}

/// Installs `packages` from PyPI into [`venv`] (made if missing), each
/// only when absent.
pub fn pip(packages: &[&str]) -> Result<()> {
    apt(&["python3-venv"])?;
    let venv = venv();
    let python = venv.join("bin/python3");
    if !python.exists() {
        say(&format!(
            "making a Python environment in {}",
            venv.display()
        ));
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    }
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !succeeds(Command::new(&python).args(["-m", "pip", "show", "-q", p])))
        .collect();
    if missing.is_empty() {
        say(&format!("Python packages present: {}", packages.join(" ")));
        return Ok(());
    }
    say(&format!("installing from PyPI: {}", missing.join(" ")));
    run(Command::new(&python)
        .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
        .args(&missing))
}
