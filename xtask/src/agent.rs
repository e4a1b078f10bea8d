//! Running the agent as a child process and reading what it printed.

use std::{
    io::BufRead,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

/// A running agent writing JSON lines to `out`.
pub struct Agent {
    child: Child,
    /// Where its standard output goes.
    pub out: PathBuf,
}

impl Agent {
    /// Starts `bin` on `policy` and waits until its sensors are attached.
    pub fn start(bin: &Path, policy: &Path, out: &Path, extra: &[&str]) -> Result<Self> {
        Self::spawn(bin, Some(policy), out, extra)
    }

    /// Starts `bin` without a policy of its own (`extra` names the
    /// collector, which sends one) and waits until its sensors are attached.
    pub fn start_managed(bin: &Path, out: &Path, extra: &[&str]) -> Result<Self> {
        Self::spawn(bin, None, out, extra)
    }

    fn spawn(bin: &Path, policy: Option<&Path>, out: &Path, extra: &[&str]) -> Result<Self> {
        let stdout =
            std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
        let mut cmd = Command::new(bin);
        if let Some(p) = policy {
            cmd.arg("--policy").arg(p);
        }
        let child = cmd
            .arg("--stdout")
            .args(extra)
            .stdout(stdout)
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut agent = Self {
            child,
            out: out.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if std::fs::read_to_string(out).is_ok_and(|s| s.contains("\"kind\":\"agent_start\"")) {
                return Ok(agent);
            }
            // Output to /dev/null: the attached hooks show in the kernel instead.
            if out == Path::new("/dev/null") && attached(agent.child.id()) {
                // The watch maps are filled right after the last attach.
                std::thread::sleep(Duration::from_secs(1));
                return Ok(agent);
            }
            if let Some(status) = agent.child.try_wait()? {
                bail!("the agent exited before attaching its sensors ({status})");
            }
            if Instant::now() > deadline {
                bail!("the agent did not attach its sensors within 90 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGINT without waiting.
    pub fn interrupt(&self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Asks for its counters now (SIGUSR1: a stats event, and the
    /// `--stats-file` rewritten).
    pub fn ask_stats(&self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGUSR1) };
    }

    /// Stops the agent with SIGINT, without reading its output.
    pub fn stop_quiet(mut self) -> Result<()> {
        self.interrupt();
        let status = self.child.wait()?;
        if !status.success() {
            bail!("the agent exited with {status}");
        }
        Ok(())
    }

    /// Stops the agent with SIGINT and returns every JSON line it printed.
    pub fn stop(self) -> Result<Vec<serde_json::Value>> {
        let out = self.out.clone();
        self.stop_quiet()?;
        let file = std::fs::File::open(&out)?;
        let mut events = Vec::new();
        for line in std::io::BufReader::new(file).lines() {
            let line = line?;
            events.push(
                serde_json::from_str(&line)
                    .with_context(|| format!("agent printed non-JSON: {line}"))?,
            );
        }
        Ok(events)
    }
}

/// True once the process holds the cgroup connect links, the last hooks the
/// agent attaches before its start-up event.
/// Waits until the agent `pid` has attached its sensors (its cgroup
/// link, the last it makes, shows in its fds).
pub fn wait_attached(pid: u32, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !attached(pid) {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            bail!("the agent exited before attaching its sensors");
        }
        if Instant::now() > deadline {
            bail!(
                "the agent did not attach its sensors within {} s",
                limit.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // The watch maps are filled right after the last attach.
    std::thread::sleep(Duration::from_secs(1));
    Ok(())
}

fn attached(pid: u32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fdinfo")).is_ok_and(|rd| {
        rd.flatten().any(|e| {
            std::fs::read_to_string(e.path()).is_ok_and(|t| t.contains("link_type:\tcgroup"))
        })
    })
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
