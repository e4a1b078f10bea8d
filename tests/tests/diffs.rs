//! Config diffs end to end: real `sed -i` edits of YAML, JSON, TOML, INI and
//! `.env` files under a watched tree, seen by the real agent, judged by a
//! real collector. Each drift finding names what changed (`replicas: 1 →
//! 3`, `password: changed`), and neither secret value is anywhere the
//! collector stored, in the agent's spool, or in any output.

use std::{path::Path, process::Command};

use driftwatch_tests::{run, Agent, Collector, ConfigTree, Dir};
use serde_json::Value;

const OLD: &str = "s3cret-OLD-7f3a";
const NEW: &str = "s3cret-NEW-9c1d";
/// A plain value in every file: found wherever values are kept, so a
/// search that misses the secrets is known to look in the right places.
const MARKER: &str = "registry.example/app-marker-5e1b";

struct Case {
    name: &'static str,
    body: String,
    /// sed expressions: replicas 1 → 3 and the password OLD → NEW.
    sed: [String; 2],
    replicas: &'static str,
    password: &'static str,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "app.yaml",
            body: format!("image: {MARKER}\nreplicas: 1\npassword: {OLD}\n"),
            sed: [
                "s/replicas: 1/replicas: 3/".into(),
                format!("s/password: {OLD}/password: {NEW}/"),
            ],
            replicas: "replicas",
            password: "password",
        },
        Case {
            name: "app.json",
            body: format!(
                "{{\n  \"image\": \"{MARKER}\",\n  \"replicas\": 1,\n  \"db\": {{\"password\": \"{OLD}\"}}\n}}\n"
            ),
            sed: [
                "s/\"replicas\": 1/\"replicas\": 3/".into(),
                format!("s/\"password\": \"{OLD}\"/\"password\": \"{NEW}\"/"),
            ],
            replicas: "replicas",
            password: "db.password",
        },
        Case {
            name: "app.toml",
            body: format!("image = \"{MARKER}\"\nreplicas = 1\n[db]\npassword = \"{OLD}\"\n"),
            sed: [
                "s/replicas = 1/replicas = 3/".into(),
                format!("s/password = \"{OLD}\"/password = \"{NEW}\"/"),
            ],
            replicas: "replicas",
            password: "db.password",
        },
        Case {
            name: "app.ini",
            body: format!("[app]\nimage = {MARKER}\nreplicas = 1\npassword = {OLD}\n"),
            sed: [
                "s/replicas = 1/replicas = 3/".into(),
                format!("s/password = {OLD}/password = {NEW}/"),
            ],
            replicas: "app.replicas",
            password: "app.password",
        },
        Case {
            name: ".env",
            body: format!("IMAGE={MARKER}\nREPLICAS=1\nDB_PASSWORD={OLD}\n"),
            sed: [
                "s/REPLICAS=1/REPLICAS=3/".into(),
                format!("s/DB_PASSWORD={OLD}/DB_PASSWORD={NEW}/"),
            ],
            replicas: "REPLICAS",
            password: "DB_PASSWORD",
        },
    ]
}

/// Every file under `dir` holding `needle`, read as bytes.
fn files_holding(dir: &Path, needle: &str) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                if bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                    hits.push(p.display().to_string());
                }
            }
        }
    }
    hits
}

fn drift<'a>(f: &'a [Value], path: &str) -> Option<&'a Value> {
    f.iter().find(|x| x["kind"] == "drift" && x["path"] == path)
}

fn change<'a>(d: &'a Value, key: &str) -> Option<&'a Value> {
    d["diff"].as_array()?.iter().find(|c| c["key"] == key)
}

#[test]
fn sed_edits_of_every_config_format_are_diffs_with_secrets_masked_everywhere() {
    let cases = cases();
    let files: Vec<(&str, &str)> = cases.iter().map(|c| (c.name, c.body.as_str())).collect();
    let w = ConfigTree::new("node-diff", &files, &[]);
    let (collector, tree) = (&w.collector, &w.tree);
    let spool = w.dir.path.join("spool");

    let mut outputs = String::new();
    for c in &cases {
        let path = format!("{tree}/{}", c.name);
        run(Command::new("sed").args(["-i", "-e", &c.sed[0], "-e", &c.sed[1], &path]));
        let f = collector.wait_findings(
            30,
            |f| drift(f, &path).is_some_and(|d| change(d, c.replicas).is_some()),
            &format!("a drift of {} naming what changed", c.name),
        );
        let d = drift(&f, &path).expect("drift");
        let replicas = change(d, c.replicas).expect("replicas changed");
        assert_eq!(
            (&replicas["op"], &replicas["old"], &replicas["new"]),
            (&"changed".into(), &"1".into(), &"3".into()),
            "{}: {d:#}",
            c.name
        );
        assert_eq!(replicas["masked"], false);
        let pw = change(d, c.password).unwrap_or_else(|| panic!("{}: {d:#}", c.name));
        assert_eq!(pw["op"], "changed", "{}", c.name);
        assert_eq!(pw["masked"], true, "{}", c.name);
        assert_ne!(pw["old"], pw["new"], "salted hashes of two values");
        // Nothing else changed: the marker line is not in the diff.
        assert_eq!(d["diff"].as_array().map(Vec::len), Some(2), "{d:#}");
        let summary = d["summary"].as_str().unwrap_or("");
        assert!(
            summary.contains(&format!("{}: 1 → 3", c.replicas)),
            "{summary}"
        );

        // People read it in `findings show`.
        let id = d["id"].as_u64().expect("id").to_string();
        let shown = collector.cli_ok("reader", &["findings", "show", &id]);
        let text = String::from_utf8_lossy(&shown.stdout).into_owned();
        assert!(text.contains(&format!("{}: 1 → 3", c.replicas)), "{text}");
        assert!(
            text.contains(&format!("{}: changed (secret", c.password)),
            "{text}"
        );
        outputs.push_str(&text);
        outputs.push_str(&String::from_utf8_lossy(
            &collector
                .cli_ok("reader", &["findings", "show", &id, "-o", "json"])
                .stdout,
        ));
    }

    // Every output: findings, the timeline with sed's own command line,
    // the digests with their structures.
    for args in [
        &["findings", "list", "--all", "-o", "json"][..],
        &["findings", "list", "--all"],
        &["timeline", "--host", "node-diff", "-o", "json"],
        &["timeline", "--host", "node-diff"],
        &["baseline", "list", "-o", "json"],
    ] {
        let out = collector.cli_ok("reader", args);
        outputs.push_str(&String::from_utf8_lossy(&out.stdout));
        outputs.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    outputs.push_str(&collector.log());
    assert!(
        outputs.contains("/usr/bin/sed") && outputs.contains("\"structure\""),
        "the timeline shows sed and the digests' structures"
    );
    assert!(
        outputs.contains(MARKER),
        "plain values are shown, so the search below looks where values are"
    );
    for secret in [OLD, NEW] {
        assert!(!outputs.contains(secret), "{secret} in an output");
    }

    // Everything stored: the collector's data directory (store, audit log)
    // and the agent's spool, read as bytes once the agent has stopped.
    drop(w.agent);
    assert!(
        !files_holding(&collector.data, MARKER).is_empty(),
        "the store keeps plain values as bytes the search can see"
    );
    for secret in [OLD, NEW] {
        for place in [&collector.data, &spool] {
            let hits = files_holding(place, secret);
            assert!(hits.is_empty(), "{secret} stored in {hits:?}");
        }
    }
}

/// A safetensors file: its header and zeroed tensor data.
fn safetensors(dtype: &str, shape: [u64; 2]) -> Vec<u8> {
    let width = if dtype == "F32" { 4 } else { 2 };
    let len = shape[0] * shape[1] * width;
    let header = format!(
        "{{\"__metadata__\":{{\"format\":\"pt\"}},\"w\":{{\"dtype\":\"{dtype}\",\"shape\":[{},{}],\"data_offsets\":[0,{len}]}}}}",
        shape[0], shape[1]
    );
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.resize(bytes.len() + len as usize, 0);
    bytes
}

#[test]
fn other_text_is_diffed_by_line_and_a_model_by_its_header() {
    let dir = Dir::new();
    let conf = dir.join("etc/web");
    let models = dir.join("models");
    std::fs::create_dir_all(&conf).expect("mkdir");
    std::fs::create_dir_all(&models).expect("mkdir");
    let nginx = format!("{conf}/nginx.conf");
    std::fs::write(&nginx, "server {\n  listen 80;\n  server_name app;\n}\n").expect("write");
    let model = format!("{models}/ranker.safetensors");
    std::fs::write(&model, safetensors("F16", [2, 3])).expect("write");
    let candidate = dir.join("candidate.safetensors");
    std::fs::write(&candidate, safetensors("F32", [2, 4])).expect("write");
    let collector = Collector::judging(
        &format!(
            "apiVersion: driftwatch.dev/v1\nkind: Policy\nresources:\n  \
             - {{ name: web, kind: config, paths: [\"{conf}/\"], writers: [ {{ user: nobody-else }} ] }}\n  \
             - {{ name: models, kind: model, paths: [\"{models}/\"], writers: [ {{ user: nobody-else }} ] }}\n"
        ),
        &[],
    );
    let _agent = Agent::managed(&collector, "node-lines", &dir.path.join("spool"));
    for path in [&nginx, &model] {
        collector.wait_json(
            &["baseline", "list", "--path", path],
            30,
            |b| !b.is_empty(),
            "the learned state",
        );
    }

    run(Command::new("python3").args([
        "-c",
        &format!(
            "p='{nginx}'\ns=open(p).read().replace('listen 80;', 'listen 8080;')\nopen(p,'w').write(s)"
        ),
    ]));
    run(Command::new("cp").args([&candidate, &model]));

    let f = collector.wait_findings(
        30,
        |f| {
            drift(f, &nginx).is_some_and(|d| change(d, "line 2").is_some())
                && drift(f, &model).is_some_and(|d| change(d, "tensor.w").is_some())
        },
        "drift of nginx.conf by line and of the model by its header",
    );
    let line = change(drift(&f, &nginx).expect("drift"), "line 2").expect("line 2");
    assert_eq!(
        (&line["op"], &line["old"], &line["new"]),
        (
            &"changed".into(),
            &"  listen 80;".into(),
            &"  listen 8080;".into()
        )
    );
    let d = drift(&f, &model).expect("drift");
    let tensor = change(d, "tensor.w").expect("tensor.w");
    assert_eq!(
        (&tensor["old"], &tensor["new"]),
        (&"F16 [2, 3]".into(), &"F32 [2, 4]".into()),
        "{d:#}"
    );
    let params = change(d, "parameters").expect("parameters");
    assert_eq!((&params["old"], &params["new"]), (&"6".into(), &"8".into()));
    assert!(change(d, "metadata.format").is_none(), "unchanged: {d:#}");
    let id = d["id"].as_u64().expect("id").to_string();
    let shown = collector.cli_ok("reader", &["findings", "show", &id]);
    assert!(String::from_utf8_lossy(&shown.stdout).contains("tensor.w: F16 [2, 3] → F32 [2, 4]"));
}

/// A change that leaves content, mode and owner alone but changes what the
/// file means: a capability set on a binary, an extended attribute, the
/// immutable flag. Each is a drift naming what changed, with the event
/// that did it as evidence.
#[test]
fn attribute_and_inode_flag_changes_are_drift() {
    let w = ConfigTree::new(
        "node-attrs",
        &[("app.conf", "mode=prod\n"), ("tool", "#!/bin/sh\n")],
        &[],
    );
    let (collector, conf, tool) = (&w.collector, w.path("app.conf"), w.path("tool"));
    run(&mut driftwatch_tests::python(&format!(
        "import os, struct\n\
         os.setxattr('{tool}', 'security.capability', struct.pack('<IIIII', 0x02000001, 1 << 13, 0, 0, 0))\n\
         os.setxattr('{conf}', 'user.tier', b'gold')\n"
    )));
    let f = collector.wait_findings(
        30,
        |f| {
            drift(f, &tool).is_some_and(|d| {
                d["summary"]
                    .as_str()
                    .is_some_and(|s| s.contains("+security.capability=cap_net_raw=ep"))
            })
        },
        "a drift naming the capability set on the binary",
    );
    let d = drift(&f, &tool).expect("drift");
    assert!(
        d["differences"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == "xattrs")),
        "{d:#}"
    );
    collector.wait_findings(
        30,
        |f| {
            drift(f, &conf).is_some_and(|d| {
                d["summary"]
                    .as_str()
                    .is_some_and(|s| s.contains("+user.tier=gold"))
            })
        },
        "a drift naming the attribute set on the config",
    );
    run(Command::new("chattr").args(["+i", &conf]));
    let found = collector.wait_json(
        &["findings", "list", "--all"],
        30,
        |f| {
            f.iter().any(|x| {
                x["kind"] == "drift"
                    && x["path"] == conf.as_str()
                    && x["summary"]
                        .as_str()
                        .is_some_and(|s| s.contains("inode flags [] -> [immutable]"))
            })
        },
        "a drift naming the immutable flag",
    );
    // Cleared before anything can fail, so the tree can be removed.
    run(Command::new("chattr").args(["-i", &conf]));
    assert!(!found.is_empty());
}

/// Kubelet's AtomicWriter updates a ConfigMap volume without writing to the
/// file consumers read: it writes a new timestamped directory, points a
/// `..data_tmp` symlink at it, renames that over `..data`, and removes the
/// old directory; `app.yaml` stays a symlink to `..data/app.yaml`. The
/// change of `app.yaml` itself is judged: a drift with its diff.
#[test]
fn a_configmap_update_by_atomic_symlink_swap_is_judged_on_the_file_consumers_read() {
    let w = ConfigTree::new("node-configmap", &[], &[]);
    let (collector, tree) = (&w.collector, &w.tree);
    let app = w.path("app.yaml");
    let publish = |stamp: &str, replicas: u32, first: bool| {
        run(&mut driftwatch_tests::python(&format!(
            "import os, shutil\n\
             os.chdir('{tree}')\n\
             old = os.readlink('..data') if os.path.islink('..data') else None\n\
             os.mkdir('{stamp}')\n\
             with open('{stamp}/app.yaml', 'w') as f: f.write('image: app:1\\nreplicas: {replicas}\\n')\n\
             os.symlink('{stamp}', '..data_tmp')\n\
             os.rename('..data_tmp', '..data')\n\
             if {first}: os.symlink('..data/app.yaml', 'app.yaml')\n\
             if old: shutil.rmtree(old)\n",
            first = if first { "True" } else { "False" },
        )));
    };
    publish("..2026_12_03_10_00_00.000000001", 1, true);
    collector.wait_json(
        &["baseline", "list", "--path", &app],
        30,
        |b| {
            b.iter()
                .any(|x| x["state"]["sha256"].as_str().is_some_and(|s| !s.is_empty()))
        },
        "the learned state of app.yaml, read through its symlinks",
    );
    publish("..2026_12_03_10_05_00.000000002", 2, false);
    let f = collector.wait_findings(
        30,
        |f| drift(f, &app).is_some_and(|d| change(d, "replicas").is_some()),
        "a drift of app.yaml after the ..data swap, naming what changed",
    );
    let d = drift(&f, &app).expect("drift");
    let replicas = change(d, "replicas").expect("replicas changed");
    assert_eq!(
        (&replicas["old"], &replicas["new"]),
        (&"1".into(), &"2".into()),
        "{d:#}"
    );
    // What the node reported for the name: the file it resolves to, and
    // the link itself.
    let digests = collector.json("", &["timeline", "--path", &app, "--kind", "digest"]);
    assert!(
        digests
            .iter()
            .any(|e| e["link_target"] == "..data/app.yaml"),
        "{digests:#?}"
    );
}
