//! Pod metadata from the Kubernetes API on real agent events. No API server
//! runs on these machines: `tests/k8s/apiserver.py` stands in for its pod
//! endpoints (list, watch from a resourceVersion, 410 when it is gone), and
//! processes are placed in pod-named cgroups as the kubelet would.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use driftwatch_tests::{free_port, http_get, policy, run, Agent, Collector, Dir};
use serde_json::{json, Value};

struct ApiServer {
    child: Child,
    addr: String,
}

impl ApiServer {
    fn start() -> Self {
        let port = free_port();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("k8s/apiserver.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(port.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "listening");
        Self {
            child,
            addr: format!("127.0.0.1:{port}"),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn post(&self, path: &str, body: &Value) {
        let out = Command::new("python3")
            .args([
                "-c",
                "import sys, urllib.request; urllib.request.urlopen(urllib.request.Request(sys.argv[1], data=sys.argv[2].encode(), method='POST')).read()",
            ])
            .arg(format!("{}{path}", self.url()))
            .arg(body.to_string())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn add(&self, pod: &Value, quiet: bool) {
        self.post(
            if quiet {
                "/test/pods?quiet=1"
            } else {
                "/test/pods"
            },
            pod,
        );
    }

    /// Waits until an agent has listed and started to watch.
    fn wait_watched(&self) {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while self.requests()["watch"].as_u64().unwrap_or(0) == 0 {
            assert!(std::time::Instant::now() < until, "the agent never watched");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    fn requests(&self) -> Value {
        serde_json::from_str(&http_get(&self.addr, "/test/requests").unwrap().1).unwrap()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pod(node: &str, name: &str, uid: &str, container_id: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "payments",
            "uid": uid,
            "labels": {"app": name, "tier": "backend"},
        },
        "spec": {
            "nodeName": node,
            "serviceAccountName": format!("{name}-sa"),
            "containers": [{"name": "main", "image": format!("registry.local/{name}:1.2")}],
        },
        "status": {
            "containerStatuses": [{
                "name": "main",
                "image": format!("registry.local/{name}:1.2"),
                "imageID": "",
                "containerID": format!("containerd://{container_id}"),
                "ready": true,
                "restartCount": 0,
            }],
        },
    })
}

/// The cgroup v2 mount.
fn cgroup2() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .expect("a cgroup2 mount (the agent's preflight makes one)")
}

/// A pod's container cgroup as the kubelet (systemd driver) and containerd
/// name it; removed on drop.
struct PodCgroup(Vec<PathBuf>);

impl PodCgroup {
    fn new(uid: &str, container_id: &str) -> Self {
        let root = cgroup2();
        let pod = format!("kubepods-besteffort-pod{}.slice", uid.replace('-', "_"));
        let mut dirs = Vec::new();
        let mut at = root.join("kubepods.slice");
        for part in [
            "kubepods-besteffort.slice".to_owned(),
            pod,
            format!("cri-containerd-{container_id}.scope"),
        ] {
            if !at.exists() {
                std::fs::create_dir(&at).unwrap();
                dirs.push(at.clone());
            }
            at = at.join(part);
        }
        std::fs::create_dir(&at).unwrap();
        dirs.push(at);
        Self(dirs)
    }

    /// Runs `script` with sh inside the container's cgroup.
    fn run(&self, script: &str) {
        let procs = self.0.last().unwrap().join("cgroup.procs");
        run(Command::new("sh").args([
            "-c",
            // It lives a moment before acting, as a container's process
            // does, so its exec is read while /proc still shows it.
            &format!(
                "echo $$ > {} && exec sh -c 'sleep 0.3; {script}'",
                procs.display()
            ),
        ]));
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        for d in self.0.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

fn write_event<'a>(events: &'a [Value], path: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["kind"] == "file" && e["op"] == "close_write" && e["path"] == path)
        .collect()
}

#[test]
fn pod_metadata_from_the_api_fills_real_events_and_survives_a_relist() {
    const NODE: &str = "k8s-node-1";
    let api = ApiServer::start();
    let (uid_a, ctr_a) = ("0b6f9a52-1c1e-4a55-9d43-5a3a1f0c0001", "a".repeat(64));
    let (uid_b, ctr_b) = ("0b6f9a52-1c1e-4a55-9d43-5a3a1f0c0002", "b".repeat(64));
    let (uid_c, ctr_c) = ("0b6f9a52-1c1e-4a55-9d43-5a3a1f0c0003", "c".repeat(64));
    api.add(&pod(NODE, "api", uid_a, &ctr_a), false);
    // Another node's pod: the field selector keeps it out.
    api.add(&pod("other-node", "elsewhere", uid_b, &ctr_b), true);
    let dir = Dir::new();
    let tree = dir.join("etc");
    std::fs::create_dir_all(&tree).unwrap();
    let mut agent = Agent::start_with(
        &policy(&[format!("{tree}/")], &[]),
        &["--node-name", NODE, "--kube-api", &api.url()],
    );
    let a = PodCgroup::new(uid_a, &ctr_a);
    let b = PodCgroup::new(uid_b, &ctr_b);
    let c = PodCgroup::new(uid_c, &ctr_c);
    // Wait for the first list to be in.
    api.wait_watched();

    let in_a = format!("{tree}/in-a.conf");
    a.run(&format!("echo x > {in_a}"));
    let e = agent.wait_for(
        |e| e["kind"] == "file" && e["op"] == "close_write" && e["path"] == in_a.as_str(),
        "a write from pod api",
    );
    assert_eq!(e["process"]["pod_metadata"], "known", "{e}");
    assert_eq!(e["process"]["pod"]["name"], "api", "{e}");
    assert_eq!(e["process"]["pod"]["namespace"], "payments");
    assert_eq!(e["process"]["pod"]["labels"]["app"], "api");
    assert_eq!(e["process"]["pod"]["service_account"], "api-sa");
    assert_eq!(e["process"]["container_meta"]["name"], "main");
    assert_eq!(
        e["process"]["container_meta"]["image"],
        "registry.local/api:1.2"
    );
    assert_eq!(e["process"]["pod_uid"], uid_a);

    // A pod the API has not told of (another node's): pending, never
    // filled with anything else.
    let in_b = format!("{tree}/in-b.conf");
    b.run(&format!("echo x > {in_b}"));
    let e = agent.wait_for(
        |e| e["kind"] == "file" && e["op"] == "close_write" && e["path"] == in_b.as_str(),
        "a write from an unknown pod",
    );
    assert_eq!(e["process"]["pod_metadata"], "pending", "{e}");
    assert!(e["process"].get("pod").is_none(), "{e}");

    // Pod c's process starts before the API tells of its pod; its later
    // events are filled once the watch brings the pod.
    let early = format!("{tree}/c-early.conf");
    let late = format!("{tree}/c-late.conf");
    c.run(&format!("echo x > {early}"));
    api.add(&pod(NODE, "worker", uid_c, &ctr_c), false);
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        c.run(&format!("echo y > {late}"));
        let events = agent.events();
        if write_event(&events, &late).iter().any(|e| {
            e["process"]["pod_metadata"] == "known" && e["process"]["pod"]["name"] == "worker"
        }) {
            let early_events = write_event(&events, &early);
            assert!(
                early_events
                    .iter()
                    .all(|e| e["process"]["pod_metadata"] == "pending"),
                "{early_events:?}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "pod worker's metadata never reached its events"
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    }

    // The API forgets old versions (410 Gone): the agent lists again and
    // learns of a pod that only the new list shows.
    let lists = api.requests()["list"].as_u64().unwrap_or(0);
    api.add(&pod(NODE, "relisted", uid_b, &ctr_b), true);
    api.post("/test/expire", &json!({}));
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let relisted = api.requests()["list"].as_u64().unwrap_or(0) > lists;
        b.run(&format!("echo z > {in_b}"));
        let events = agent.events();
        if relisted
            && write_event(&events, &in_b)
                .iter()
                .any(|e| e["process"]["pod"]["name"] == "relisted")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "no relist after 410 (lists: {lists} -> {})",
            api.requests()["list"]
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    drop(agent.stop());
    drop((a, b, c));
}

#[test]
fn without_an_api_server_the_agent_says_so_and_carries_on() {
    let dir = Dir::new();
    let tree = dir.join("etc");
    std::fs::create_dir_all(&tree).unwrap();
    // An address where nothing listens: pending metadata, events still flow.
    let port = free_port();
    let mut agent = Agent::start_with(
        &policy(&[format!("{tree}/")], &[]),
        &["--kube-api", &format!("http://127.0.0.1:{port}")],
    );
    let uid = "0b6f9a52-1c1e-4a55-9d43-5a3a1f0c00ff";
    let cg = PodCgroup::new(uid, &"f".repeat(64));
    let path = format!("{tree}/x.conf");
    cg.run(&format!("echo x > {path}"));
    let e = agent.wait_for(
        |e| e["kind"] == "file" && e["op"] == "close_write" && e["path"] == path.as_str(),
        "the write",
    );
    assert_eq!(e["process"]["pod_metadata"], "pending", "{e}");
    drop(agent.stop());
    drop(cg);
}

#[test]
fn a_namespace_selector_is_judged_from_pod_metadata_at_the_collector() {
    const NODE: &str = "k8s-node-2";
    let api = ApiServer::start();
    let (uid_in, ctr_in) = ("0b6f9a52-1c1e-4a55-9d43-5a3a1f0c0011", "d".repeat(64));
    let (uid_out, ctr_out) = ("0b6f9a52-1c1e-4a55-9d43-5a3a1f0c0012", "e".repeat(64));
    api.add(&pod(NODE, "deployer", uid_in, &ctr_in), false);
    let mut outsider = pod(NODE, "intruder", uid_out, &ctr_out);
    outsider["metadata"]["namespace"] = json!("sandbox");
    api.add(&outsider, false);
    let dir = Dir::new();
    let tree = dir.join("etc");
    std::fs::create_dir_all(&tree).unwrap();
    let yaml = format!(
        "apiVersion: driftwatch.dev/v1\nkind: Policy\nresources:\n  - name: app-config\n    kind: config\n    paths: [\"{tree}/\"]\n    writers: [ {{ namespace: payments }} ]\n"
    );
    let c = Collector::judging(&yaml, &[]);
    let agent = Agent::streaming_with(
        &yaml,
        &c,
        NODE,
        &dir.path.join("spool"),
        &["--kube-api", &api.url()],
    );
    let inside = PodCgroup::new(uid_in, &ctr_in);
    let outside = PodCgroup::new(uid_out, &ctr_out);
    api.wait_watched();
    let allowed = format!("{tree}/by-payments.conf");
    let refused = format!("{tree}/by-sandbox.conf");
    inside.run(&format!("echo x > {allowed}"));
    outside.run(&format!("echo x > {refused}"));
    let found = c.wait_findings(
        60,
        |f| {
            f.iter()
                .any(|x| x["kind"] == "unauthorized_write" && x["path"] == refused.as_str())
        },
        "the sandbox pod's write judged unauthorized",
    );
    assert!(
        !found
            .iter()
            .any(|x| x["kind"] == "unauthorized_write" && x["path"] == allowed.as_str()),
        "a write from the payments namespace was judged unauthorized: {found:#?}"
    );
    let w = found
        .iter()
        .find(|x| x["kind"] == "unauthorized_write")
        .unwrap();
    assert_eq!(w["actor"]["pod_namespace"], "sandbox", "{w}");
    assert_eq!(w["actor"]["pod_name"], "intruder", "{w}");
    // The timeline shows where the allowed write came from.
    let t = c.wait_timeline(
        &["--path", &allowed],
        |t| t.iter().any(|e| e["op"] == "close_write"),
        "the allowed write",
    );
    let e = t.iter().find(|e| e["op"] == "close_write").unwrap();
    assert_eq!(e["process"]["pod_namespace"], "payments", "{e}");
    assert_eq!(
        e["process"]["container"]["image"],
        "registry.local/deployer:1.2"
    );
    assert_eq!(e["process"]["pod_metadata"], "known");
    drop(agent.stop());
    drop((inside, outside));
}

/// A shell line: Python connects to `port` and writes `ok` or the error's
/// name into `out` (the program in a file of `dir`: no quoting through sh).
fn connect_script(dir: &Dir, port: u16, out: &str) -> String {
    let py = dir.join("connect.py");
    std::fs::write(
        &py,
        format!(
            "import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port})).close()\n    print('ok')\nexcept OSError as e:\n    print(type(e).__name__)\n"
        ),
    )
    .unwrap();
    format!("python3 {py} > {out}")
}

#[test]
fn an_enforced_database_admits_a_namespace_by_its_pods_cgroups() {
    const NODE: &str = "k8s-node-3";
    let api = ApiServer::start();
    let (uid_in, ctr_in) = ("0b6f9a52-1c1e-4a55-9d43-5a3a1f0c0021", "a".repeat(64));
    let (uid_out, ctr_out) = ("0b6f9a52-1c1e-4a55-9d43-5a3a1f0c0022", "b".repeat(64));
    let (uid_late, ctr_late) = ("0b6f9a52-1c1e-4a55-9d43-5a3a1f0c0023", "c".repeat(64));
    api.add(&pod(NODE, "api", uid_in, &ctr_in), false);
    let mut outsider = pod(NODE, "notebook", uid_out, &ctr_out);
    outsider["metadata"]["namespace"] = json!("sandbox");
    api.add(&outsider, false);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || for _ in listener.incoming() {});
    let dir = Dir::new();
    let yaml = format!(
        "apiVersion: driftwatch.dev/v1\nkind: Policy\nresources:\n  - name: postgres\n    kind: database\n    ports: [{port}]\n    mode: enforce\n    clients: [ {{ namespace: payments }} ]\n"
    );
    let c = Collector::judging(&yaml, &[]);
    let agent = Agent::streaming_with(
        &yaml,
        &c,
        NODE,
        &dir.path.join("spool"),
        &["--kube-api", &api.url()],
    );
    let inside = PodCgroup::new(uid_in, &ctr_in);
    let outside = PodCgroup::new(uid_out, &ctr_out);
    api.wait_watched();
    let out = dir.join("answer");
    let ask = |cg: &PodCgroup| -> String {
        let _ = std::fs::remove_file(&out);
        cg.run(&connect_script(&dir, port, &out));
        std::fs::read_to_string(&out)
            .unwrap_or_default()
            .trim()
            .to_owned()
    };
    // The payments pod's cgroup reaches the kernel's gate within a second
    // of the pod and its cgroup being seen.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while ask(&inside) != "ok" {
        assert!(
            std::time::Instant::now() < until,
            "the payments pod was never let through"
        );
    }
    assert_eq!(ask(&outside), "PermissionError");
    // Root on the host, outside every pod, is no client either.
    let host = Command::new("sh")
        .args(["-c", &connect_script(&dir, port, &out)])
        .status()
        .unwrap();
    assert!(host.success());
    assert_eq!(
        std::fs::read_to_string(&out).unwrap().trim(),
        "PermissionError"
    );
    // A payments pod scheduled later is admitted once the agent sees it.
    api.add(&pod(NODE, "worker", uid_late, &ctr_late), false);
    let late = PodCgroup::new(uid_late, &ctr_late);
    let until = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while ask(&late) != "ok" {
        assert!(
            std::time::Instant::now() < until,
            "the new payments pod was never let through"
        );
    }
    let f = c.wait_findings(
        30,
        |f| {
            f.iter()
                .any(|x| x["kind"] == "blocked" && x["actor"]["pod_namespace"] == "sandbox")
        },
        "the sandbox pod's blocked connect",
    );
    let b = f
        .iter()
        .find(|x| x["kind"] == "blocked" && x["actor"]["pod_namespace"] == "sandbox")
        .unwrap();
    assert_eq!(b["actor"]["pod_name"], "notebook", "{b}");
    drop(agent.stop());
    drop((inside, outside, late));
}
