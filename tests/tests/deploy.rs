//! The Kubernetes manifests under `deploy/`: valid for the API's schemas
//! (kubernetes-validate, strict), put together by the kustomization, and
//! saying only what the binaries and the policy parser accept.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use driftwatch_tests::{agent_bin, bin, Dir};
use serde_norway::Value;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// `kubernetes-validate`, from the environment `cargo xtask test` makes.
fn validator() -> PathBuf {
    let venv = std::env::var_os("DRIFTWATCH_VENV").map_or_else(
        || {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/driftwatch/venv")
        },
        PathBuf::from,
    );
    let v = venv.join("bin/kubernetes-validate");
    assert!(
        v.exists(),
        "{} is missing: run the tests with cargo xtask test, which installs it",
        v.display()
    );
    v
}

fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "yaml")
                && p.file_name().is_some_and(|n| n != "kustomization.yaml")
        })
        .collect();
    files.sort();
    assert!(files.len() >= 5, "{files:?}");
    files
}

/// Every document of every manifest.
fn documents() -> Vec<(PathBuf, Value)> {
    let mut out = Vec::new();
    for f in manifests() {
        let text = std::fs::read_to_string(&f).unwrap();
        for doc in serde_norway::Deserializer::from_str(&text) {
            let v: Value = serde::Deserialize::deserialize(doc).unwrap();
            if !v.is_null() {
                out.push((f.clone(), v));
            }
        }
    }
    out
}

fn validate(files: &[PathBuf], version: &str) -> (bool, String) {
    let out = Command::new(validator())
        .args(["--strict", "-k", version])
        .args(files)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn every_manifest_is_valid_for_current_kubernetes_versions() {
    let files = manifests();
    for version in ["1.33.0", "1.37.0"] {
        let (ok, text) = validate(&files, version);
        assert!(ok, "against {version}:\n{text}");
        assert!(
            !text.contains("WARN") && !text.contains("ERROR"),
            "against {version}:\n{text}"
        );
        let passed = text.matches(" passed for resource ").count();
        assert_eq!(passed, documents().len(), "{text}");
    }
    // The validator does catch a mistake: a misspelt field fails.
    let dir = Dir::new();
    let broken = dir.path.join("broken.yaml");
    let ds = std::fs::read_to_string(deploy().join("agent-daemonset.yaml")).unwrap();
    std::fs::write(&broken, ds.replace("hostPID: true", "hostPid: true")).unwrap();
    let (ok, text) = validate(&[broken], "1.37.0");
    assert!(!ok, "a misspelt field passed:\n{text}");
}

#[test]
fn the_kustomization_puts_every_manifest_and_reference_together() {
    let k: Value = serde_norway::from_str(
        &std::fs::read_to_string(deploy().join("kustomization.yaml")).unwrap(),
    )
    .unwrap();
    let listed: Vec<&str> = k["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for f in manifests() {
        let name = f.file_name().unwrap().to_str().unwrap();
        assert!(listed.contains(&name), "{name} is not in the kustomization");
    }
    for name in &listed {
        assert!(deploy().join(name).exists(), "{name} is listed but missing");
    }
    // Every ConfigMap, Secret and ServiceAccount a workload names is made
    // by a manifest, the secret generator, or (agent certificates) by the
    // kubectl command the kustomization and the README give.
    let docs = documents();
    let mut made: Vec<String> = docs
        .iter()
        .map(|(_, d)| {
            format!(
                "{}/{}",
                d["kind"].as_str().unwrap_or(""),
                d["metadata"]["name"].as_str().unwrap_or("")
            )
        })
        .collect();
    for g in k["secretGenerator"].as_sequence().unwrap() {
        made.push(format!("Secret/{}", g["name"].as_str().unwrap()));
    }
    let by_kubectl = "Secret/driftwatch-agent-tls";
    made.push(by_kubectl.into());
    let kustomization = std::fs::read_to_string(deploy().join("kustomization.yaml")).unwrap();
    assert!(kustomization.contains("create secret generic driftwatch-agent-tls"));
    for (file, d) in &docs {
        let Some(spec) = d["spec"]["template"]["spec"].as_mapping() else {
            continue;
        };
        if let Some(sa) = spec.get("serviceAccountName").and_then(Value::as_str) {
            let want = format!("ServiceAccount/{sa}");
            assert!(
                made.contains(&want),
                "{}: {want} is not made",
                file.display()
            );
        }
        for v in spec
            .get("volumes")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            let want = if let Some(n) = v["secret"]["secretName"].as_str() {
                format!("Secret/{n}")
            } else if let Some(n) = v["configMap"]["name"].as_str() {
                format!("ConfigMap/{n}")
            } else {
                continue;
            };
            assert!(
                made.contains(&want),
                "{}: {want} is not made",
                file.display()
            );
        }
    }
}

#[test]
fn manifests_pass_only_flags_the_binaries_know_and_a_policy_that_checks() {
    let help = |exe: PathBuf| {
        let out = Command::new(exe).arg("--help").output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let helps = [
        ("driftwatch-agent", help(agent_bin())),
        ("driftwatch-collector", help(bin("driftwatch-collector"))),
    ];
    let mut checked = 0;
    for (file, d) in documents() {
        let containers = d["spec"]["template"]["spec"]["containers"]
            .as_sequence()
            .cloned()
            .unwrap_or_default();
        for c in containers {
            let image = c["image"].as_str().unwrap_or("");
            let (_, help) = helps
                .iter()
                .find(|(name, _)| image.contains(name.trim_start_matches("driftwatch-")))
                .unwrap_or_else(|| panic!("{}: unknown image {image}", file.display()));
            for a in c["args"].as_sequence().into_iter().flatten() {
                let flag = a.as_str().unwrap().split('=').next().unwrap();
                assert!(
                    help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
                    "{}: {image} does not take {flag}",
                    file.display()
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 10, "{checked}");

    // The policy in the ConfigMap is one the collector accepts.
    let dir = Dir::new();
    let policy = documents()
        .into_iter()
        .find(|(_, d)| d["metadata"]["name"] == "driftwatch-policy")
        .map(|(_, d)| d["data"]["policy.yaml"].as_str().unwrap().to_owned())
        .unwrap();
    let file = dir.path.join("policy.yaml");
    std::fs::write(&file, policy).unwrap();
    let out = Command::new(bin("driftwatch"))
        .args(["policy", "check", "--kubernetes"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid"));
}

/// A strategic merge as kustomize does it for these fields: maps merge,
/// lists of named items merge by name, anything else is replaced.
fn merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Mapping(b), Value::Mapping(p)) => {
            for (k, v) in p {
                match b.get_mut(k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (Value::Sequence(b), Value::Sequence(p))
            if p.iter().all(|x| x.get("name").is_some()) && !p.is_empty() =>
        {
            for item in p {
                match b.iter_mut().find(|x| x.get("name") == item.get("name")) {
                    Some(existing) => merge(existing, item),
                    None => b.push(item.clone()),
                }
            }
        }
        (b, p) => *b = p.clone(),
    }
}

#[test]
fn the_postgres_overlay_makes_valid_replicas_that_share_the_store() {
    let overlay = deploy().join("postgres");
    let k: Value = serde_norway::from_str(
        &std::fs::read_to_string(overlay.join("kustomization.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(k["resources"][0], "../");
    let patch_file = k["patches"][0]["path"].as_str().unwrap();
    let patch: Value =
        serde_norway::from_str(&std::fs::read_to_string(overlay.join(patch_file)).unwrap())
            .unwrap();
    let (_, mut sts) = documents()
        .into_iter()
        .find(|(_, d)| {
            d["kind"] == "StatefulSet" && d["metadata"]["name"] == patch["metadata"]["name"]
        })
        .expect("the patch names the collector's StatefulSet");
    merge(&mut sts, &patch);
    assert_eq!(sts["spec"]["replicas"], 3);
    let pod = &sts["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    // The base's arguments stay; the store comes from the environment the
    // collector reads.
    assert!(c["args"].as_sequence().unwrap().len() >= 5);
    let help = Command::new(bin("driftwatch-collector"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for e in c["env"].as_sequence().unwrap() {
        let name = e["name"].as_str().unwrap();
        assert!(
            help.contains(&format!("env: {name}")),
            "the collector does not read {name}"
        );
    }
    // Every mount names a volume of the pod (or a claim of the set).
    let claims = sts["spec"]["volumeClaimTemplates"].as_sequence().cloned();
    let claims: Vec<String> = claims
        .unwrap_or_default()
        .iter()
        .filter_map(|v| v["metadata"]["name"].as_str().map(str::to_owned))
        .collect();
    let mut volumes: Vec<&str> = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    volumes.extend(claims.iter().map(String::as_str));
    assert!(volumes.contains(&"store-ca"), "{volumes:?}");
    for m in c["volumeMounts"].as_sequence().unwrap() {
        let name = m["name"].as_str().unwrap();
        assert!(volumes.contains(&name), "mount {name} has no volume");
    }
    // And the whole is a valid StatefulSet (written back with the modes
    // YAML 1.1 reads as octal, as kubectl would).
    fn octal_modes(v: &mut Value) {
        match v {
            Value::Mapping(m) => {
                for (k, x) in m.iter_mut() {
                    if k.as_str() == Some("defaultMode") {
                        if let Some(n) = x.as_str().and_then(|t| u64::from_str_radix(t, 8).ok()) {
                            *x = Value::Number(n.into());
                        }
                    }
                    octal_modes(x);
                }
            }
            Value::Sequence(s) => s.iter_mut().for_each(octal_modes),
            _ => {}
        }
    }
    octal_modes(&mut sts);
    let dir = Dir::new();
    let out = dir.path.join("collector-replicas.yaml");
    std::fs::write(&out, serde_norway::to_string(&sts).unwrap()).unwrap();
    for version in ["1.33.0", "1.37.0"] {
        let (ok, text) = validate(std::slice::from_ref(&out), version);
        assert!(ok && !text.contains("WARN"), "against {version}:\n{text}");
    }
}
