//! Harness for the end-to-end tests: start the real agent on a policy, act,
//! stop it, and look at what it printed.
//!
//! The tests load programs into the running kernel, so they need root; run
//! them with `cargo xtask test`, which builds the agent and points
//! `DRIFTWATCH_AGENT_BIN` at it. Without root they fail saying so: a kernel
//! test that quietly passes would prove nothing.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

/// The agent binary under test.
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("DRIFTWATCH_AGENT_BIN") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/driftwatch-agent");
    assert!(
        p.exists(),
        "no agent binary at {}; run the tests with `cargo xtask test`",
        p.display()
    );
    p
}

/// Fails the test unless it can load eBPF programs.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "kernel tests load eBPF programs and need root; run `cargo xtask test` as root"
    );
}

/// A temporary directory with its canonical path (the kernel reports real paths).
pub struct Dir {
    _tmp: tempfile::TempDir,
    /// Canonical path.
    pub path: PathBuf,
}

impl Dir {
    /// A fresh directory under /tmp.
    pub fn new() -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("dw-test-")
            .tempdir()
            .expect("temp dir");
        let path = tmp.path().canonicalize().expect("canonical temp dir");
        Self { _tmp: tmp, path }
    }

    /// `self.path/rel` as text.
    pub fn join(&self, rel: &str) -> String {
        self.path.join(rel).display().to_string()
    }
}

impl Default for Dir {
    fn default() -> Self {
        Self::new()
    }
}

/// A policy watching `paths` (as config) and `ports` (as a database).
pub fn policy(paths: &[String], ports: &[u16]) -> String {
    let mut s = String::from("apiVersion: driftwatch.dev/v1\nkind: Policy\nresources:\n");
    if !paths.is_empty() {
        let list: Vec<String> = paths.iter().map(|p| format!("{p:?}")).collect();
        s += &format!(
            "  - name: cfg\n    kind: config\n    paths: [{}]\n",
            list.join(", ")
        );
    }
    if !ports.is_empty() {
        let list: Vec<String> = ports.iter().map(|p| p.to_string()).collect();
        s += &format!(
            "  - name: db\n    kind: database\n    ports: [{}]\n",
            list.join(", ")
        );
    }
    s
}

/// A running agent.
pub struct Agent {
    child: Child,
    out: PathBuf,
    /// The policy file it reads (rewrite it and call [`Agent::reload`]).
    pub policy: PathBuf,
    _dir: Dir,
}

impl Agent {
    /// Starts the agent on `policy_yaml` and waits until its sensors are attached.
    pub fn start(policy_yaml: &str) -> Self {
        Self::start_with(policy_yaml, &[])
    }

    /// As [`Agent::start`], with extra command-line arguments.
    pub fn start_with(policy_yaml: &str, extra: &[&str]) -> Self {
        Self::spawn(Some(policy_yaml), extra)
    }

    /// Starts the agent, on `policy_yaml` if given, and waits until its
    /// sensors are attached.
    fn spawn(policy_yaml: Option<&str>, extra: &[&str]) -> Self {
        require_root();
        let dir = Dir::new();
        let policy = dir.path.join("policy.yaml");
        let mut cmd = Command::new(agent_bin());
        if let Some(yaml) = policy_yaml {
            std::fs::write(&policy, yaml).expect("write policy");
            cmd.arg("--policy").arg(&policy);
        }
        let out = dir.path.join("events.jsonl");
        let child = cmd
            .args(["--stdout", "--loss-interval", "1"])
            .args(extra)
            .stdout(std::fs::File::create(&out).expect("output file"))
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the agent");
        let mut agent = Self {
            child,
            out,
            policy,
            _dir: dir,
        };
        agent.wait_for(|e| e["kind"] == "agent_start", "agent_start");
        agent
    }

    /// Waits for a `policy_applied` whose watched paths include `path`
    /// (the start applies the first policy too).
    pub fn wait_policy_watching(&mut self, path: &str) -> Value {
        self.wait_for(
            |e| {
                e["kind"] == "policy_applied"
                    && e["watched_paths"]
                        .as_array()
                        .is_some_and(|p| p.iter().any(|x| x.as_str() == Some(path)))
            },
            &format!("a policy watching {path} applied"),
        )
    }

    /// Events printed so far.
    pub fn events(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.out).expect("read output");
        // The agent may be writing its last line as this reads: only
        // lines it has finished (ended by a newline) count.
        let done = text.rfind('\n').map_or("", |i| &text[..i]);
        done.lines()
            .filter(|l| !l.is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("agent printed non-JSON ({e}): {l}"))
            })
            .collect()
    }

    /// Waits for the digest of `path` with content `sha256`.
    pub fn wait_digest(&mut self, path: &str, sha256: &str, what: &str) -> Value {
        self.wait_for(
            |e| e["kind"] == "digest" && e["path"] == path && e["sha256"] == sha256,
            what,
        )
    }

    /// Checks that `path` holds `content`, and waits for its digest.
    pub fn wait_written(&mut self, path: &str, content: &str) -> Value {
        assert_eq!(std::fs::read_to_string(path).unwrap(), content, "{path}");
        let sha = sha256_file(path);
        self.wait_digest(
            path,
            &sha,
            &format!("the digest of what was written to {path}"),
        )
    }

    /// Waits (up to 60 s) for an event matching `pred`.
    pub fn wait_for(&mut self, pred: impl Fn(&Value) -> bool, what: &str) -> Value {
        self.wait_for_progress(pred, what, || 0)
    }

    /// A reader of the bytes the agent has read from files so far
    /// (`rchar`): the progress of its digests.
    pub fn bytes_read_fn(&self) -> impl Fn() -> u64 {
        let io = format!("/proc/{}/io", self.child.id());
        move || {
            std::fs::read_to_string(&io)
                .ok()
                .and_then(|io| {
                    io.lines()
                        .find_map(|l| l.strip_prefix("rchar:"))
                        .and_then(|v| v.trim().parse().ok())
                })
                .unwrap_or(0)
        }
    }

    /// Waits for an event matching `pred` for as long as `progress` keeps
    /// growing, and 60 s past the last time it grew: a verdict that
    /// depends on work being done, not on how busy the machine is.
    pub fn wait_for_progress(
        &mut self,
        pred: impl Fn(&Value) -> bool,
        what: &str,
        progress: impl Fn() -> u64,
    ) -> Value {
        let mut deadline = Instant::now() + Duration::from_secs(60);
        let mut last = progress();
        loop {
            let now = progress();
            if now > last {
                last = now;
                deadline = Instant::now() + Duration::from_secs(60);
            }
            if let Some(e) = self.events().into_iter().find(&pred) {
                return e;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the agent exited ({status}) before printing {what}");
            }
            if Instant::now() > deadline {
                let mut kinds = std::collections::BTreeMap::new();
                for e in self.events() {
                    *kinds
                        .entry(e["kind"].as_str().unwrap_or("?").to_owned())
                        .or_insert(0) += 1;
                }
                panic!("no {what} from the agent within 60 s of its last progress; it printed {kinds:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends a signal to the agent.
    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// The agent's scheduler state letter (`R`, `S`, `T` for stopped, …).
    pub fn state(&self) -> String {
        std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .ok()
            .and_then(|s| {
                s.rsplit(')')
                    .next()
                    .map(|r| r.trim().chars().take(1).collect())
            })
            .unwrap_or_default()
    }

    /// Sends SIGHUP (policy reload).
    pub fn reload(&self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGHUP) };
    }

    /// Stops the agent (SIGINT) and returns everything it printed; asserts a clean exit.
    pub fn stop(self) -> Vec<Value> {
        self.stop_timed().1
    }

    /// As [`Agent::stop`], also returning the time from the signal to the
    /// agent's exit.
    pub fn stop_timed(mut self) -> (Duration, Vec<Value>) {
        let signalled = Instant::now();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = self.child.wait().expect("wait for the agent");
        let took = signalled.elapsed();
        assert!(status.success(), "agent exited with {status}");
        (took, self.events())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs a command and asserts it succeeded.
pub fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    assert!(status.success(), "{cmd:?} failed with {status}");
}

/// Builds the C helper `tests/helpers/NAME.c` with the machine's C compiler
/// into `dir` and returns the binary's path.
pub fn c_helper(dir: &Dir, name: &str) -> String {
    let src = format!("{}/helpers/{name}.c", env!("CARGO_MANIFEST_DIR"));
    let out = dir.join(name);
    run(Command::new("cc").args(["-O1", "-Wall", "-Werror", "-o", &out, &src]));
    out
}

/// Runs `python3 -c script`.
pub fn python(script: &str) -> Command {
    let mut c = Command::new("python3");
    c.args(["-c", script]);
    c
}

/// File events on `path` (as `path` or `new_path`).
pub fn file_events<'a>(events: &'a [Value], path: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["kind"] == "file" && (e["path"] == path || e["new_path"] == path))
        .collect()
}

/// The final counters the agent printed at exit.
pub fn final_stats(events: &[Value]) -> &Value {
    let s = events
        .iter()
        .rev()
        .find(|e| e["kind"] == "stats")
        .expect("a stats event at exit");
    &s["counters"]
}

/// A binary built beside the agent (`driftwatch-collector`, `driftwatch`).
pub fn bin(name: &str) -> PathBuf {
    let p = agent_bin().with_file_name(name);
    assert!(
        p.exists(),
        "no {} binary; run the tests with `cargo xtask test`",
        p.display()
    );
    p
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A running collector.
pub struct Collector {
    child: Option<Child>,
    /// Its address, `http://127.0.0.1:PORT`.
    pub url: String,
    port: u16,
    /// Its data directory.
    pub data: PathBuf,
    /// Extra command-line arguments, kept across restarts.
    pub extra: Vec<String>,
    /// The policy file it judges with ([`Collector::judging`]).
    pub policy: Option<PathBuf>,
    /// Its CA directory when it serves TLS and checks client certificates
    /// ([`Collector::judging`], [`Collector::secured`]).
    pub pki: Option<PathBuf>,
    /// Everything it has logged (also copied to the test's stderr).
    log: std::sync::Arc<std::sync::Mutex<String>>,
    _dir: Dir,
    _files: Vec<Dir>,
}

impl Collector {
    /// Starts a collector on a fresh store and waits until it listens.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// As [`Collector::start`], with extra command-line arguments.
    pub fn start_with(extra: &[&str]) -> Self {
        Self::start_with_pki(extra, None)
    }

    /// As [`Collector::start_with`], with its store in `data`.
    pub fn start_at(data: &Path, extra: &[&str]) -> Self {
        let mut c = Self::start_with_pki_at(extra, None, Some(data.to_path_buf()));
        c.data = data.to_path_buf();
        c
    }

    fn start_with_pki(extra: &[&str], pki: Option<PathBuf>) -> Self {
        Self::start_with_pki_at(extra, pki, None)
    }

    fn start_with_pki_at(extra: &[&str], pki: Option<PathBuf>, data: Option<PathBuf>) -> Self {
        let dir = Dir::new();
        let port = free_port();
        let scheme = if pki.is_some() { "https" } else { "http" };
        let mut c = Self {
            child: None,
            url: format!("{scheme}://127.0.0.1:{port}"),
            port,
            data: data.unwrap_or_else(|| dir.path.join("store")),
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            policy: None,
            pki,
            log: Default::default(),
            _dir: dir,
            _files: Vec::new(),
        };
        c.restart();
        c
    }

    /// Starts a collector judging with `policy_yaml` over TLS, checking
    /// client certificates against a CA of its own ([`Collector::secured`]),
    /// with principals `alice`, `bob` and `reader` (tokens `alice-token`,
    /// `bob-token`, `reader-token`), and `extra`.
    pub fn judging(policy_yaml: &str, extra: &[&str]) -> Self {
        let dir = Dir::new();
        let policy = dir.path.join("policy.yaml");
        std::fs::write(&policy, policy_yaml).expect("write policy");
        let policy_arg = policy.display().to_string();
        let mut args = vec!["--policy", &policy_arg];
        args.extend_from_slice(extra);
        let mut c = Self::secured(&args);
        c.policy = Some(policy);
        c._files.push(dir);
        c
    }

    /// Starts a collector serving TLS with a CA made by `driftwatch-collector
    /// certs init`, requiring credentials on every call: client
    /// certificates of that CA, or the tokens of `alice`, `bob` and
    /// `reader`. `extra` may add `--roles FILE`.
    pub fn secured(extra: &[&str]) -> Self {
        let dir = Dir::new();
        let pki = dir.path.join("pki");
        run(Command::new(bin("driftwatch-collector"))
            .args(["certs", "init", "--dir"])
            .arg(&pki)
            .stdout(Stdio::null()));
        let tokens = dir.path.join("tokens");
        std::fs::write(
            &tokens,
            "alice-token alice\nbob-token bob\nreader-token reader\n",
        )
        .expect("write tokens");
        std::fs::set_permissions(&tokens, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod the tokens");
        let path = |p: &Path| p.display().to_string();
        let files = [
            path(&pki.join("server.pem")),
            path(&pki.join("server-key.pem")),
            path(&pki.join("ca.pem")),
            path(&tokens),
        ];
        let mut args = vec![
            "--tls-cert",
            &files[0],
            "--tls-key",
            &files[1],
            "--client-ca",
            &files[2],
            "--tokens",
            &files[3],
        ];
        args.extend_from_slice(extra);
        let mut c = Self::start_with_pki(&args, Some(pki));
        c._files.push(dir);
        c
    }

    /// Another collector with this one's arguments (store, policy, TLS
    /// certificate, client CA, tokens) on a port and data directory of its
    /// own: a replica, when the store is shared.
    pub fn replica(&self) -> Self {
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let mut c = Self::start_with_pki(&extra, self.pki.clone());
        c.policy.clone_from(&self.policy);
        c
    }

    /// Issues a certificate (`node NAME` or `user NAME`) from this
    /// collector's CA; returns (certificate, key).
    pub fn issue(&self, kind: &str, name: &str) -> (PathBuf, PathBuf) {
        let pki = self.pki.as_ref().expect("a collector with a CA");
        run(Command::new(bin("driftwatch-collector"))
            .args(["certs", "issue", "--dir"])
            .arg(pki)
            .args([kind, name])
            .stdout(Stdio::null()));
        (
            pki.join(format!("{kind}-{name}.pem")),
            pki.join(format!("{kind}-{name}-key.pem")),
        )
    }

    /// The arguments an agent needs to stream to this collector as `node`
    /// (a certificate is issued for it when the collector checks them).
    pub fn agent_args(&self, node: &str) -> Vec<String> {
        let mut a = vec!["--collector".to_owned(), self.url.clone()];
        if let Some(pki) = &self.pki {
            let (cert, key) = self.issue("node", node);
            for (flag, p) in [
                ("--ca", pki.join("ca.pem")),
                ("--cert", cert),
                ("--key", key),
            ] {
                a.push(flag.to_owned());
                a.push(p.display().to_string());
            }
        }
        a
    }

    /// What the collector has logged so far (every run of it).
    pub fn log(&self) -> String {
        self.log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The collector's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// `driftwatch ARGS…` as principal `who` (a token name: `alice`, `bob`;
    /// no credential when empty), trusting this collector's CA.
    pub fn cli(&self, who: &str, args: &[&str]) -> std::process::Output {
        self.command(who)
            .args(args)
            .output()
            .expect("run driftwatch")
    }

    /// `driftwatch ARGS…` as `who`, which must succeed (its stderr says
    /// why when not); its output.
    pub fn cli_ok(&self, who: &str, args: &[&str]) -> std::process::Output {
        let out = self.cli(who, args);
        assert!(
            out.status.success(),
            "driftwatch {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// `driftwatch --collector URL [--ca CA]`, as `who` (no credential when
    /// empty).
    pub fn command(&self, who: &str) -> Command {
        let mut cmd = Command::new(bin("driftwatch"));
        cmd.args(["--collector", &self.url]);
        if let Some(pki) = &self.pki {
            cmd.arg("--ca").arg(pki.join("ca.pem"));
        }
        for v in [
            "DRIFTWATCH_TOKEN",
            "DRIFTWATCH_CERT",
            "DRIFTWATCH_KEY",
            "DRIFTWATCH_CA",
        ] {
            cmd.env_remove(v);
        }
        if !who.is_empty() {
            cmd.env("DRIFTWATCH_TOKEN", format!("{who}-token"));
        }
        cmd
    }

    /// `driftwatch approvals request --access RESOURCE --who WHO --for FOR`
    /// as alice; returns the request's id.
    pub fn request_access(&self, resource: &str, who: &str, window: &str) -> String {
        let r = self.json(
            "alice",
            &[
                "approvals",
                "request",
                "--access",
                resource,
                "--who",
                who,
                "--for",
                window,
                "--reason",
                "INC-42: a look at the replica",
            ],
        );
        assert_eq!(r[0]["kind"], "access");
        r[0]["id"].as_u64().expect("an id").to_string()
    }

    /// `driftwatch ARGS… -o json` as `who` (`reader` when empty and the
    /// collector asks for credentials), which must succeed, parsed per line.
    pub fn json(&self, who: &str, args: &[&str]) -> Vec<Value> {
        let who = if who.is_empty() && self.pki.is_some() {
            "reader"
        } else {
            who
        };
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["-o", "jsonl"]);
        let out = self.cli(who, &all);
        assert!(
            out.status.success(),
            "driftwatch {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("non-JSON line ({e}): {l}")))
            .collect()
    }

    /// Waits (up to `secs`) until the findings (all statuses) satisfy `pred`.
    pub fn wait_findings(
        &self,
        secs: u64,
        pred: impl Fn(&[Value]) -> bool,
        what: &str,
    ) -> Vec<Value> {
        self.wait_json(&["findings", "list", "--all"], secs, pred, what)
    }

    /// Waits (up to `secs`) until `driftwatch ARGS… -o json` satisfies `pred`.
    pub fn wait_json(
        &self,
        args: &[&str],
        secs: u64,
        pred: impl Fn(&[Value]) -> bool,
        what: &str,
    ) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let v = self.json("", args);
            if pred(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "driftwatch {args:?} never showed {what}; last: {v:#?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// (Re)starts the process on the same port and store (after
    /// [`Collector::stop`] or [`Collector::kill`]; one still running is
    /// killed first).
    pub fn restart(&mut self) {
        self.kill();
        let mut child = Command::new(bin("driftwatch-collector"))
            .args([
                "--listen",
                &format!("127.0.0.1:{}", self.port),
                "--data-dir",
                &self.data.display().to_string(),
            ])
            .args(&self.extra)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the collector");
        if let Some(stderr) = child.stderr.take() {
            let log = self.log.clone();
            std::thread::spawn(move || {
                use std::io::BufRead as _;
                for line in std::io::BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    eprintln!("{line}");
                    let mut log = log
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "collector did not listen within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, and waits for the collector to exit (it must, within 30 s:
    /// its stop grace is 10 s).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match c.try_wait() {
                    Ok(Some(status)) => {
                        assert!(status.success(), "the collector exited with {status}");
                        return;
                    }
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => {
                        let _ = c.kill();
                        let _ = c.wait();
                        panic!("the collector ignored SIGTERM for 30 s");
                    }
                }
            }
        }
    }

    /// SIGKILL: no flush, no goodbye.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The `grpc.health.v1` status of `service` ("" for the whole
    /// collector), as a plaintext client asks it: 1 SERVING, 2 NOT_SERVING.
    pub fn health(&self, service: &str) -> i32 {
        let url = self.url.clone();
        let service = service.to_owned();
        block_on(async move {
            let channel = tonic::transport::Channel::from_shared(url)
                .expect("a URL")
                .connect()
                .await
                .expect("connect for a health check");
            tonic_health::pb::health_client::HealthClient::new(channel)
                .check(tonic_health::pb::HealthCheckRequest { service })
                .await
                .expect("a health answer")
                .into_inner()
                .status
        })
    }

    /// `driftwatch timeline -o json ARGS…`, parsed.
    pub fn timeline(&self, args: &[&str]) -> Vec<Value> {
        let who = if self.pki.is_some() { "reader" } else { "" };
        let out = self
            .command(who)
            .args(["timeline", "-o", "jsonl"])
            .args(args)
            .output()
            .expect("run driftwatch");
        assert!(
            out.status.success(),
            "driftwatch timeline failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("non-JSON line ({e}): {l}")))
            .collect()
    }

    /// Waits (up to 60 s) until `pred` holds for the timeline `args` select.
    pub fn wait_timeline(
        &self,
        args: &[&str],
        pred: impl Fn(&[Value]) -> bool,
        what: &str,
    ) -> Vec<Value> {
        let mut all = vec!["timeline"];
        all.extend_from_slice(args);
        self.wait_json(&all, 60, pred, what)
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Agent {
    /// Starts an agent streaming to `collector` as `node`, spooling in
    /// `spool` (with a certificate for `node` when the collector checks them).
    pub fn streaming(policy_yaml: &str, collector: &Collector, node: &str, spool: &Path) -> Self {
        let args = Self::streaming_args(collector, node, spool);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Self::spawn(Some(policy_yaml), &args)
    }

    /// As [`Agent::streaming`], with extra command-line arguments.
    pub fn streaming_with(
        policy_yaml: &str,
        collector: &Collector,
        node: &str,
        spool: &Path,
        extra: &[&str],
    ) -> Self {
        let mut args = Self::streaming_args(collector, node, spool);
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Self::spawn(Some(policy_yaml), &args)
    }

    fn streaming_args(collector: &Collector, node: &str, spool: &Path) -> Vec<String> {
        let mut a = collector.agent_args(node);
        a.extend(
            [
                "--node-name",
                node,
                "--spool-dir",
                spool.to_str().expect("a UTF-8 spool path"),
                "--heartbeat-interval",
                "1",
            ]
            .map(str::to_owned),
        );
        a
    }

    /// Starts an agent with no policy of its own: it applies the
    /// collector's. Waits until it has.
    pub fn managed(collector: &Collector, node: &str, spool: &Path) -> Self {
        let args = Self::streaming_args(collector, node, spool);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut agent = Self::spawn(None, &args);
        let applied = agent.wait_for(
            |e| {
                e["kind"] == "policy_applied"
                    && e["source"]
                        .as_str()
                        .is_some_and(|s| s.starts_with("collector"))
            },
            "the collector's policy applied",
        );
        // The state of what the policy watches is read once, at apply.
        if applied["watched_paths"]
            .as_array()
            .is_some_and(|p| !p.is_empty())
        {
            agent.wait_for(|e| e["kind"] == "scan_done", "the first watch scan");
        }
        agent
    }

    /// SIGKILL: no drain, no goodbye.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a test's gRPC client side to its end.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(f)
}

/// An agent stream's first message, saying it is `node`.
pub fn hello(node: &str) -> driftwatch_proto::v1::AgentMessage {
    use driftwatch_proto::v1::{agent_message::Msg, AgentMessage, Hello, NodeInfo};
    AgentMessage {
        msg: Some(Msg::Hello(Hello {
            node: Some(NodeInfo {
                name: node.into(),
                ..Default::default()
            }),
            agent_started_unix_nanos: 1,
        })),
    }
}

/// The SHA-256 of a file, as `sha256sum` prints it.
pub fn sha256_file(path: &str) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("a digest")
        .to_owned()
}

/// `GET path` on a plain-HTTP server at `addr`: (status code, body).
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok((code, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The URL of a new, empty schema on the PostgreSQL server `cargo xtask
/// test` started (`DRIFTWATCH_TEST_POSTGRES`); `None`, the test skipped
/// and said so, only when `DRIFTWATCH_SKIP_POSTGRES=1`.
pub fn pg_schema_url(name: &str) -> Option<String> {
    let Ok(base) = std::env::var("DRIFTWATCH_TEST_POSTGRES") else {
        if std::env::var("DRIFTWATCH_SKIP_POSTGRES").as_deref() == Ok("1") {
            eprintln!("skipped: needs PostgreSQL (DRIFTWATCH_SKIP_POSTGRES=1)");
            return None;
        }
        panic!(
            "DRIFTWATCH_TEST_POSTGRES is not set: run `cargo xtask test`, which starts a throwaway PostgreSQL, \
             or set DRIFTWATCH_SKIP_POSTGRES=1 to skip the PostgreSQL tests"
        );
    };
    let schema = format!("{name}_{}", std::process::id());
    run(Command::new("psql")
        .args(["-q", "-v", "ON_ERROR_STOP=1", &base, "-c"])
        .arg(format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
        ))
        .stdout(Stdio::null()));
    let sep = if base.contains('?') { '&' } else { '?' };
    Some(format!("{base}{sep}options=-c%20search_path%3D{schema}"))
}

/// One value `sql` selects on the database at `url`, as text.
pub fn psql_value(url: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args(["-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", url, "-c", sql])
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `fchmod`s a watched file `count` times (one `chmod` event each), as
/// fast as the machine allows or paced to `per_s`, until `stop` is set;
/// `done` counts the calls made.
pub fn chmod_burst(
    path: &str,
    count: u64,
    per_s: Option<u64>,
    stop: &std::sync::atomic::AtomicBool,
    done: &std::sync::atomic::AtomicU64,
) {
    use std::sync::atomic::Ordering;
    let c = std::ffi::CString::new(path).expect("a path without NUL");
    let start = Instant::now();
    // SAFETY: open, fchmod and close of our own file with a valid C string.
    unsafe {
        let fd = libc::open(c.as_ptr(), libc::O_RDONLY);
        assert!(fd >= 0, "open {path}: {}", std::io::Error::last_os_error());
        for i in 0..count {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            if let Some(rate) = per_s.filter(|_| i % 100 == 0) {
                let due = Duration::from_nanos(i * 1_000_000_000 / rate);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
            assert_eq!(libc::fchmod(fd, if i % 2 == 0 { 0o600 } else { 0o644 }), 0);
            done.fetch_add(1, Ordering::Relaxed);
        }
        libc::close(fd);
    }
}

/// The sequence numbers of `node`'s chmod events on `path` in the
/// collector's timeline, read as the CLI streams them.
pub fn stored_chmods(c: &Collector, node: &str, path: &str) -> Vec<u64> {
    use std::io::BufRead as _;
    let mut child = c
        .command(if c.pki.is_some() { "reader" } else { "" })
        .args(["timeline", "-o", "jsonl", "--host", node])
        .args(["--path", path, "--kind", "file"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("run driftwatch timeline");
    let out = child.stdout.take().expect("stdout");
    let mut seqs = Vec::new();
    for line in std::io::BufReader::new(out).lines() {
        let line = line.expect("read the timeline");
        let v: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("non-JSON line ({e}): {line}"));
        if v["type"] == "event" && v["op"] == "chmod" && v["path"] == path {
            seqs.push(v["seq"].as_u64().expect("a seq"));
        }
    }
    assert!(child.wait().expect("driftwatch timeline").success());
    seqs
}

/// Waits while the count of `node`'s stored chmods of `path` grows, until
/// it is `want`; fails when it stops growing for 90 s short of it (an
/// agent backs off up to 30 s between attempts while its collector cannot
/// store). Progress, not a deadline: a busy machine is slow, not wrong.
pub fn wait_stored(c: &Collector, node: &str, path: &str, want: usize) -> Vec<u64> {
    let mut last = (0, Instant::now());
    loop {
        let seqs = stored_chmods(c, node, path);
        if seqs.len() >= want {
            return seqs;
        }
        if seqs.len() > last.0 {
            last = (seqs.len(), Instant::now());
        }
        assert!(
            last.1.elapsed() < Duration::from_secs(90),
            "stuck at {} of {want} events for 90 s",
            seqs.len()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Fails unless `seqs` holds `want` distinct sequence numbers.
pub fn assert_stored_once(seqs: &[u64], want: usize) {
    let distinct: std::collections::HashSet<u64> = seqs.iter().copied().collect();
    assert_eq!(distinct.len(), seqs.len(), "events stored more than once");
    assert_eq!(seqs.len(), want, "events stored");
}

/// A watched config tree (`etc/app` under a fresh directory, resource
/// `app-config`, writable only by a user that does not exist), judged by a
/// secured collector, watched by a managed agent, with the first state of
/// every file learned before the test changes anything. Fields drop in
/// order: the agent stops before the collector.
pub struct ConfigTree {
    /// The agent watching it.
    pub agent: Agent,
    /// The collector judging it.
    pub collector: Collector,
    /// The tree's path.
    pub tree: String,
    /// The test's directory (the tree, the agent's spool in `spool`).
    pub dir: Dir,
}

impl ConfigTree {
    /// `files` (name, content) in the tree; `node` names the agent's host;
    /// `extra` goes to the collector.
    pub fn new(node: &str, files: &[(&str, &str)], extra: &[&str]) -> Self {
        let dir = Dir::new();
        let tree = dir.join("etc/app");
        std::fs::create_dir_all(&tree).expect("mkdir");
        for (name, content) in files {
            std::fs::write(format!("{tree}/{name}"), content).expect("write");
        }
        let collector = Collector::judging(
            &format!(
                "apiVersion: driftwatch.dev/v1\nkind: Policy\nresources:\n  - {{ name: app-config, kind: config, paths: [\"{tree}/\"], writers: [ {{ user: nobody-else }} ] }}\n"
            ),
            extra,
        );
        let agent = Agent::managed(&collector, node, &dir.path.join("spool"));
        for (name, _) in files {
            let path = format!("{tree}/{name}");
            collector.wait_json(
                &["baseline", "list", "--path", &path],
                30,
                |b| !b.is_empty(),
                &format!("the learned state of {name}"),
            );
        }
        Self {
            agent,
            collector,
            tree,
            dir,
        }
    }

    /// The path of `name` in the tree.
    pub fn path(&self, name: &str) -> String {
        format!("{}/{name}", self.tree)
    }
}
