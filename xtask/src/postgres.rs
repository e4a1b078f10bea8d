//! A throwaway PostgreSQL server on loopback for the tests and benchmarks:
//! Debian's `postgresql` package, a cluster initialised in a directory of
//! its own, a free port, stopped and removed when dropped.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::setup;

/// A running server.
pub struct Server {
    dir: PathBuf,
    bin: PathBuf,
    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub url: String,
}

/// The newest PostgreSQL installed under /usr/lib/postgresql.
fn bin_dir() -> Result<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("reading /usr/lib/postgresql")?
        .filter_map(|e| {
            let e = e.ok()?;
            let v = e.file_name().to_str()?.parse().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, p)| p.join("initdb").exists())
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, p)) => Ok(p),
        None => bail!("no PostgreSQL server under /usr/lib/postgresql/*/bin"),
    }
}

/// Runs a server tool as the `postgres` user (the server refuses root).
fn as_postgres(bin: &Path, tool: &str) -> Command {
    if nix_is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
        c
    } else {
        Command::new(bin.join(tool))
    }
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

impl Server {
    /// The environment the tests find the server by: its URL, and its
    /// data directory and binaries (a test restarts it).
    pub fn test_env(&self) -> [(&'static str, String); 3] {
        [
            ("DRIFTWATCH_TEST_POSTGRES", self.url.clone()),
            (
                "DRIFTWATCH_TEST_POSTGRES_DATA",
                self.dir.join("data").display().to_string(),
            ),
            (
                "DRIFTWATCH_TEST_POSTGRES_BIN",
                self.bin.display().to_string(),
            ),
        ]
    }

    /// Installs PostgreSQL if missing and starts a fresh cluster named
    /// `name` (a leftover of an earlier run under that name is stopped and
    /// removed first).
    pub fn start(name: &str) -> Result<Self> {
        setup::apt(&["postgresql"])?;
        let bin = bin_dir()?;
        let dir = PathBuf::from(format!("/tmp/driftwatch-pg-{name}"));
        let data = dir.join("data");
        if data.join("postmaster.pid").exists() {
            let _ = as_postgres(&bin, "pg_ctl")
                .arg("-D")
                .arg(&data)
                .args(["stop", "-m", "immediate"])
                .stdout(std::process::Stdio::null())
                .status();
        }
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        if nix_is_root() {
            setup::run(Command::new("chown").arg("postgres:postgres").arg(&dir))?;
        }
        eprintln!(
            "xtask: starting a throwaway PostgreSQL ({}) in {}",
            bin.display(),
            dir.display()
        );
        let out = as_postgres(&bin, "initdb")
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--no-locale",
            ])
            .output()
            .context("running initdb")?;
        if !out.status.success() {
            bail!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let port = free_port()?;
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=300 -c shared_buffers=256MB",
            dir.display()
        );
        let status = as_postgres(&bin, "pg_ctl")
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(dir.join("server.log"))
            .args(["-w", "-t", "60", "-o", &options, "start"])
            .stdout(std::process::Stdio::null())
            .status()
            .context("running pg_ctl start")?;
        if !status.success() {
            let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
            bail!("PostgreSQL did not start ({status}): {}", log.trim());
        }
        Ok(Self {
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            dir,
            bin,
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = as_postgres(&self.bin, "pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["stop", "-m", "fast"])
            .stdout(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `cargo xtask postgres`: a server until Ctrl-C.
pub fn serve() -> Result<()> {
    setup::require_root("cargo xtask postgres")?;
    let server = Server::start("dev")?;
    for (k, v) in server.test_env() {
        println!("export {k}={v}");
    }
    eprintln!("xtask: PostgreSQL is up; Ctrl-C stops and removes it");
    let (tx, rx) = std::sync::mpsc::channel();
    ctrlc_on(tx)?;
    let _ = rx.recv();
    drop(server);
    Ok(())
}

/// Sends on `tx` at SIGINT or SIGTERM.
fn ctrlc_on(tx: std::sync::mpsc::Sender<()>) -> Result<()> {
    let mut signals = [libc::SIGINT, libc::SIGTERM];
    // A thread waiting for the signals, blocked in every other thread.
    // SAFETY: sigset operations on a zeroed, owned set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in &mut signals {
            libc::sigaddset(&mut set, *s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        std::thread::spawn(move || {
            let mut sig = 0;
            libc::sigwait(&set, &mut sig);
            let _ = tx.send(());
        });
    }
    Ok(())
}
