//! The `driftwatch` CLI behaves as the ecosystem's tools do: arguments
//! checked before any connection, connection errors that name the address
//! and the cause, `-o json` as one document (`jsonl`, `yaml` beside it),
//! host globs with one meaning everywhere, human durations, digests
//! accepted as printed, `sha256sum --tag` manifests from stdin,
//! `--timeout`, shell completion and a manual page.

use std::{
    io::Write as _,
    net::TcpListener,
    process::{Command, Output, Stdio},
};

use driftwatch_tests::{bin, free_port, run, sha256_file, ConfigTree, Dir};
use serde_json::Value;

fn driftwatch(args: &[&str]) -> Output {
    Command::new(bin("driftwatch"))
        .args(args)
        .env_remove("DRIFTWATCH_COLLECTOR")
        .output()
        .expect("run driftwatch")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn mistakes_are_named_before_the_collector_is_asked() {
    // Nothing listens here: an error about the arguments must come first.
    let down = format!("http://127.0.0.1:{}", free_port());
    let dir = Dir::new();
    let manifest = dir.join("bad.sha256");
    std::fs::write(
        &manifest,
        format!("{}  /etc/a\nzz  /etc/b\n", "a".repeat(64)),
    )
    .unwrap();
    let cases: [(&[&str], &str); 8] = [
        (
            &[
                "approvals",
                "request",
                "--resource",
                "x",
                "--window",
                "1 fortnight",
                "--reason",
                "r",
            ],
            "--window",
        ),
        (
            &["baseline", "import", &manifest],
            "bad.sha256:2: \"zz\" is not a SHA-256",
        ),
        (
            &["baseline", "import", "/nonexistent/m"],
            "cannot read the manifest",
        ),
        (
            &["timeline", "--kind", "bogus"],
            "possible values: exec, exit, file, connect",
        ),
        (
            &["timeline", "--since", "10m", "--until", "1h"],
            "is not before --until",
        ),
        (
            &[
                "approvals",
                "request",
                "--resource",
                "x",
                "--digest",
                "sha256:abc",
                "--reason",
                "r",
            ],
            "is not a SHA-256",
        ),
        (&["timeline", "--follow", "-o", "json"], "use -o jsonl"),
        (&["findings", "watch", "-o", "yaml"], "use -o jsonl"),
    ];
    for (args, want) in cases {
        let mut all = vec!["--collector", &down];
        all.extend_from_slice(args);
        let o = driftwatch(&all);
        let err = stderr(&o);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(
            !err.contains("cannot reach"),
            "{args:?} connected first: {err}"
        );
    }
    // With good arguments, the connection error names the address and the
    // cause, once.
    let o = driftwatch(&["--collector", &down, "findings", "list"]);
    let err = stderr(&o);
    assert!(
        err.contains(&format!("cannot reach the collector at {down}"))
            && err.contains("Connection refused"),
        "{err}"
    );
    assert!(
        !err.contains("tcp connect error: tcp connect error"),
        "{err}"
    );
    assert!(!err.contains("transport error"), "{err}");
    // Durations people write are accepted.
    for d in ["1h30m", "500ms", "2 hours"] {
        let o = driftwatch(&["--collector", &down, "timeline", "--since", d]);
        assert!(stderr(&o).contains("cannot reach"), "{d}: {}", stderr(&o));
    }
}

#[test]
fn a_collector_that_never_answers_is_given_up_on_after_the_timeout() {
    // Accepts connections (the kernel's backlog) and never speaks.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let o = driftwatch(&["--collector", &url, "--timeout", "1s", "findings", "list"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains(&url) || err.contains("findings list"), "{err}");
    assert!(
        err.to_lowercase().contains("timed out") || err.contains("timeout"),
        "{err}"
    );
}

#[test]
fn completion_scripts_and_the_manual_page() {
    for shell in ["bash", "zsh", "fish"] {
        let o = driftwatch(&["completion", shell]);
        assert!(o.status.success(), "{shell}: {}", stderr(&o));
        let script = String::from_utf8_lossy(&o.stdout);
        assert!(
            script.contains("driftwatch") && script.contains("findings"),
            "{shell}"
        );
    }
    let o = driftwatch(&["man"]);
    let page = String::from_utf8_lossy(&o.stdout);
    assert!(
        page.contains(".TH driftwatch 1") && page.contains("timeline"),
        "{page}"
    );
}

#[test]
fn output_formats_host_globs_digest_prefixes_and_stdin_manifests() {
    let w = ConfigTree::new("node-glob", &[("app.yaml", "replicas: 1\n")], &[]);
    let (c, dir, file) = (&w.collector, &w.dir, w.path("app.yaml"));
    run(Command::new("sed").args(["-i", "s/replicas: 1/replicas: 2/", &file]));
    let f = c.wait_findings(
        30,
        |f| f.iter().any(|x| x["kind"] == "drift"),
        "a drift finding",
    );
    let drift = f.iter().find(|x| x["kind"] == "drift").unwrap();
    let id = drift["id"].as_u64().unwrap().to_string();

    // `-o json` is one document that json.tool reads, list or empty.
    let json_tool = |bytes: &[u8]| {
        let mut child = Command::new("python3")
            .args(["-m", "json.tool"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(bytes).unwrap();
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let list = c.cli_ok("reader", &["findings", "list", "--all", "-o", "json"]);
    json_tool(&list.stdout);
    let all: Value = serde_json::from_slice(&list.stdout).unwrap();
    assert!(all.as_array().is_some_and(|a| a.len() >= 2), "{all:#}");
    let none = c.cli_ok(
        "reader",
        &["findings", "list", "--host", "elsewhere", "-o", "json"],
    );
    json_tool(&none.stdout);
    assert_eq!(
        serde_json::from_slice::<Value>(&none.stdout).unwrap(),
        Value::Array(vec![])
    );
    let shown = c.cli_ok("reader", &["findings", "show", &id, "-o", "json"]);
    let one: Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(one["id"].as_u64().map(|x| x.to_string()), Some(id.clone()));
    // YAML says the same.
    let yaml = c.cli_ok("reader", &["findings", "show", &id, "-o", "yaml"]);
    let from_yaml: Value = serde_norway::from_slice(&yaml.stdout).unwrap();
    assert_eq!(from_yaml["id"], one["id"]);
    assert_eq!(from_yaml["diff"], one["diff"]);
    // JSON Lines: one object per line.
    let lines = c.cli_ok("reader", &["findings", "list", "--all", "-o", "jsonl"]);
    for l in String::from_utf8_lossy(&lines.stdout).lines() {
        serde_json::from_str::<Value>(l).unwrap();
    }

    // A process has one shape: the finding's actor and the timeline's
    // process carry the same fields.
    let keys = |v: &Value| {
        let mut k: Vec<String> = v
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        k.sort();
        k
    };
    let events = c.json("", &["timeline", "--host", "node-glob", "--kind", "file"]);
    let by_sed = events
        .iter()
        .find(|e| e["process"]["exe"] == "/usr/bin/sed")
        .expect("sed's events");
    assert_eq!(keys(&by_sed["process"]), keys(&drift["actor"]));
    assert!(keys(&drift["actor"]).len() >= 20, "{:#}", drift["actor"]);

    // Tables fit the terminal's width (COLUMNS stands for it here): long
    // summaries wrap instead of running off; -o wide does not fit.
    let table = |extra: &[&str]| {
        let mut args = vec!["findings", "list", "--all"];
        args.extend_from_slice(extra);
        let o = c
            .command("reader")
            .args(&args)
            .env("COLUMNS", "72")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let fitted = table(&[]);
    let header = fitted.lines().next().unwrap_or("");
    assert!(
        header.contains("AGE") && header.contains("SUMMARY"),
        "{fitted}"
    );
    assert!(
        fitted.lines().all(|l| l.chars().count() <= 72),
        "a line is wider than 72:\n{fitted}"
    );
    assert!(fitted.contains("drifted"), "{fitted}");
    let wide = table(&["-o", "wide"]);
    assert!(wide.lines().any(|l| l.chars().count() > 72), "{wide}");
    assert!(
        wide.lines().next().unwrap_or("").contains("LAST SEEN"),
        "{wide}"
    );

    // A host is a name or a glob, the same on findings, timeline and
    // baselines.
    for (host, found) in [
        ("node-glob", true),
        ("node-*", true),
        ("node-gl?b", true),
        ("other-*", false),
    ] {
        let f = c.json("", &["findings", "list", "--all", "--host", host]);
        assert_eq!(!f.is_empty(), found, "findings --host {host}");
        let t = c.json(
            "",
            &[
                "timeline", "--host", host, "--kind", "file", "--since", "1h30m",
            ],
        );
        assert_eq!(
            t.iter().any(|e| e["node"] == "node-glob"),
            found,
            "timeline --host {host}"
        );
        assert!(t
            .iter()
            .all(|e| e["node"] == "node-glob" || e["type"] == "gap"));
    }
    assert!(!c
        .json("", &["baseline", "list", "--hosts", "node-*"])
        .is_empty());
    assert!(c
        .json("", &["baseline", "list", "--hosts", "other-*"])
        .is_empty());

    // A digest as `findings show` prints it (sha256: and 12 digits) is
    // taken for the one finding's digest it starts.
    let full = sha256_file(&file);
    let printed = format!("sha256:{}", &full[..12]);
    let request = |digest: &str| {
        let args = [
            "approvals",
            "request",
            "--resource",
            "app-config",
            "--digest",
            digest,
        ];
        c.cli(
            "alice",
            &[&args[..], &["--reason", "r", "-o", "json"]].concat(),
        )
    };
    let req: Value = serde_json::from_slice(&request(&printed).stdout).unwrap();
    assert_eq!(req["digest"], full.as_str(), "{req:#}");
    let unknown = request("sha256:0123456789ab");
    assert!(stderr(&unknown).contains("no finding or baseline has a digest starting so"));

    // `sha256sum --tag` output, from standard input.
    let model = dir.join("m.bin");
    std::fs::write(&model, b"weights").unwrap();
    let tagged = Command::new("sha256sum")
        .arg("--tag")
        .arg(&model)
        .output()
        .unwrap();
    let mut import = c
        .command("alice")
        .args(["baseline", "import", "-", "--hosts", "node-glob"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    import
        .stdin
        .take()
        .unwrap()
        .write_all(&tagged.stdout)
        .unwrap();
    let o = import.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let b = c.json("", &["baseline", "list", "--path", &model]);
    assert_eq!(
        b[0]["state"]["sha256"],
        sha256_file(&model).as_str(),
        "{b:#?}"
    );
}
