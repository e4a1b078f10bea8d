//! Each sensor, driven by real actions against the real kernel.

use std::{
    net::{TcpListener, TcpStream},
    process::Command,
};

use driftwatch_tests::{
    c_helper, file_events, final_stats, policy, python, run, sha256_file, Agent, Dir,
};
use serde_json::Value;

/// A mount undone however the test ends, so that none outlives it.
struct Unmount(String);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg(&self.0)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Binds `other` over the watched directory `at`, waits for the digest of
/// `file` under it to show `shown`, unmounts, and waits for the digest of
/// it showing `restored` again; returns the digest under the mount.
fn mount_over_and_back(
    agent: &mut Agent,
    other: &str,
    at: &str,
    file: &str,
    (shown, restored): (&str, &str),
) -> Value {
    run(Command::new("mount").args(["--bind", other, at]));
    let _mounted = Unmount(at.to_owned());
    let over = agent.wait_digest(
        file,
        shown,
        &format!("the digest of what {file} shows under the mount"),
    );
    run(Command::new("umount").arg(at));
    agent.wait_for(
        |e| {
            e["kind"] == "digest"
                && e["path"] == file
                && e["sha256"] == restored
                && e["reason"] == "change"
        },
        &format!("the digest of {file} after the unmount"),
    );
    over
}

fn ops(events: &[&Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["op"].as_str().unwrap_or("").to_owned())
        .collect()
}

#[test]
fn sed_in_place_on_a_watched_file_reports_the_rename_into_place() {
    let dir = Dir::new();
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    let conf = dir.join("etc/app.conf");
    std::fs::write(&conf, "debug=false\n").unwrap();
    // Watch the single file, not its directory.
    let agent = Agent::start(&policy(std::slice::from_ref(&conf), &[]));
    run(Command::new("sed").args(["-i", "s/debug=false/debug=true/", &conf]));
    let events = agent.stop();

    let on_conf = file_events(&events, &conf);
    let rename = on_conf
        .iter()
        .find(|e| e["op"] == "rename")
        .unwrap_or_else(|| panic!("no rename into {conf}: {on_conf:?}"));
    assert_eq!(rename["new_path"], conf.as_str());
    assert!(rename["path"]
        .as_str()
        .unwrap()
        .starts_with(&dir.join("etc/sed")));
    assert_eq!(rename["result"]["ok"], true);
    assert_eq!(rename["resource"], "cfg");
    let p = &rename["process"];
    assert_eq!(p["comm"], "sed");
    assert!(p["exe"].as_str().unwrap().ends_with("/sed"), "{p}");
    assert!(
        p["args"].as_array().unwrap().iter().any(|a| a == "-i"),
        "{p}"
    );
    assert_eq!(p["user"], "root");
    // sed's temp file sits beside the file but is not the watched file: the
    // kernel filter must not report its creation.
    assert!(
        !events
            .iter()
            .any(|e| e["kind"] == "file" && e["op"] == "open"),
        "a single-file watch reported another file's open"
    );
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), "debug=true\n");
}

#[test]
fn python_temp_file_then_os_replace_into_a_watched_dir() {
    let dir = Dir::new();
    let models = dir.join("models");
    std::fs::create_dir_all(&models).unwrap();
    let agent = Agent::start(&policy(&[format!("{models}/")], &[]));
    run(&mut python(&format!(
        "import os\nwith open('{models}/.model.tmp','wb') as f: f.write(b'weights')\nos.replace('{models}/.model.tmp','{models}/model.bin')"
    )));
    let events = agent.stop();

    let tmp = format!("{models}/.model.tmp");
    let model = format!("{models}/model.bin");
    let on_tmp = file_events(&events, &tmp);
    assert_eq!(
        ops(&on_tmp),
        ["open", "close_write", "rename"],
        "{on_tmp:?}"
    );
    let open = on_tmp[0];
    assert_eq!(open["resolved_from"], "file");
    assert!(open["flags"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f == "O_CREAT"));
    let rename = on_tmp[2];
    assert_eq!(rename["new_path"], model.as_str());
    assert!(rename["process"]["exe"]
        .as_str()
        .unwrap()
        .contains("python"));
}

#[test]
fn relative_paths_from_a_cwd_inside_the_tree_and_openat_with_a_dirfd() {
    let dir = Dir::new();
    let tree = dir.join("tree");
    std::fs::create_dir_all(dir.join("tree/sub")).unwrap();
    std::fs::write(dir.join("tree/old.conf"), "x").unwrap();
    let agent = Agent::start(&policy(&[format!("{tree}/")], &[]));
    // cwd inside the tree; writes through `..`, a rename by relative names,
    // and an openat() relative to a directory fd.
    run(python(&format!(
        "import os\nos.chdir('{tree}/sub')\nopen('../rel.conf','w').write('a')\nos.rename('../old.conf','../new.conf')\nd=os.open('{tree}', os.O_RDONLY)\nfd=os.open('viafd.conf', os.O_WRONLY|os.O_CREAT, 0o640, dir_fd=d)\nos.close(fd)"
    ))
    .current_dir(dir.join("tree/sub")));
    let events = agent.stop();

    let rel = file_events(&events, &format!("{tree}/rel.conf"));
    assert_eq!(ops(&rel), ["open", "close_write"], "{events:#?}");
    let renamed = file_events(&events, &format!("{tree}/new.conf"));
    assert_eq!(renamed.len(), 1, "{events:#?}");
    assert_eq!(renamed[0]["path"], format!("{tree}/old.conf"));
    assert_eq!(renamed[0]["resolved_from"], "name");
    let viafd = file_events(&events, &format!("{tree}/viafd.conf"));
    assert_eq!(ops(&viafd), ["open", "close_write"], "{events:#?}");
    assert_eq!(viafd[0]["mode"], "0640");
}

#[test]
fn writes_through_a_symlinked_directory_and_dotdot_report_the_real_path() {
    let dir = Dir::new();
    let real = dir.join("real");
    std::fs::create_dir_all(&real).unwrap();
    std::os::unix::fs::symlink(&real, dir.join("link")).unwrap();
    std::fs::create_dir_all(dir.join("elsewhere")).unwrap();
    let agent = Agent::start(&policy(&[format!("{real}/")], &[]));
    run(Command::new("sh").args([
        "-c",
        &format!("echo a > {}/viasymlink.conf", dir.join("link")),
    ]));
    run(Command::new("sh").args([
        "-c",
        &format!("echo b > {}/../real/viadotdot.conf", dir.join("elsewhere")),
    ]));
    // A path-string call (chmod) whose literal path escapes and re-enters the tree.
    run(Command::new("chmod").args([
        "600",
        &format!("{}/../real/viadotdot.conf", dir.join("elsewhere")),
    ]));
    let events = agent.stop();

    assert_eq!(
        ops(&file_events(&events, &format!("{real}/viasymlink.conf"))),
        ["open", "close_write"]
    );
    let dotdot = file_events(&events, &format!("{real}/viadotdot.conf"));
    assert_eq!(
        ops(&dotdot),
        ["open", "close_write", "chmod"],
        "{events:#?}"
    );
    assert_eq!(dotdot[2]["mode"], "0600");
    assert!(!events
        .iter()
        .any(|e| e["kind"] == "file" && e["path"].as_str().unwrap().contains("/link/")));
}

#[test]
fn chmod_chown_truncate_link_symlink_and_unlink() {
    let dir = Dir::new();
    let tree = dir.join("cfg");
    std::fs::create_dir_all(&tree).unwrap();
    let f = format!("{tree}/app.conf");
    std::fs::write(&f, "content").unwrap();
    let agent = Agent::start(&policy(&[format!("{tree}/")], &[]));
    run(Command::new("chmod").args(["640", &f]));
    run(Command::new("chown").args(["65534:65534", &f]));
    run(Command::new("truncate").args(["-s", "0", &f]));
    run(Command::new("ln").args([&f, &format!("{tree}/hard.conf")]));
    run(Command::new("ln").args(["-s", "/etc/passwd", &format!("{tree}/sym.conf")]));
    run(Command::new("rm").args([&f]));
    let events = agent.stop();

    let on_f = file_events(&events, &f);
    let find = |op: &str| -> &Value {
        on_f.iter()
            .find(|e| e["op"] == op)
            .copied()
            .unwrap_or_else(|| panic!("no {op} on {f}: {on_f:#?}"))
    };
    assert_eq!(find("chmod")["mode"], "0640");
    assert_eq!(find("chown")["owner_uid"], 65534);
    assert_eq!(find("chown")["owner_gid"], 65534);
    assert_eq!(find("truncate")["process"]["comm"], "truncate");
    assert_eq!(find("link")["new_path"], format!("{tree}/hard.conf"));
    let unlink = find("unlink");
    assert_eq!(unlink["process"]["comm"], "rm");
    assert_eq!(unlink["result"]["ok"], true);
    let sym = file_events(&events, &format!("{tree}/sym.conf"));
    assert_eq!(sym[0]["op"], "symlink");
    assert_eq!(sym[0]["target"], "/etc/passwd");
}

#[test]
fn a_refused_write_is_reported_with_its_errno_and_the_callers_identity() {
    let dir = Dir::new();
    let tree = dir.join("locked");
    std::fs::create_dir_all(&tree).unwrap();
    let f = format!("{tree}/secret.conf");
    std::fs::write(&f, "x").unwrap();
    let agent = Agent::start(&policy(&[format!("{tree}/")], &[]));
    // As nobody, with a login uid as sshd/sudo would leave it, try to write.
    let status = python(&format!(
        "import os\nopen('/proc/self/loginuid','w').write('4242')\nos.setgid(65534); os.setuid(65534)\ntry:\n  open('{f}','w')\nexcept PermissionError:\n  raise SystemExit(7)"
    ))
    .status()
    .unwrap();
    assert_eq!(status.code(), Some(7), "the write should have been refused");
    let events = agent.stop();

    let on_f = file_events(&events, &f);
    assert_eq!(on_f.len(), 1, "{on_f:#?}");
    let e = on_f[0];
    assert_eq!(e["op"], "open");
    assert_eq!(e["result"]["ok"], false);
    assert_eq!(e["result"]["errno"], 13);
    assert_eq!(e["result"]["error"], "EACCES");
    assert_eq!(e["resolved_from"], "name");
    assert_eq!(e["process"]["uid"], 65534);
    assert_eq!(e["process"]["user"], "nobody");
    assert_eq!(e["process"]["loginuid"], 4242);
}

#[test]
fn a_short_lived_exec_is_complete_with_masked_arguments_and_its_exit() {
    let agent = Agent::start(&policy(&["/nonexistent-dw-test/".into()], &[]));
    let marker = format!("dw-marker-{}", std::process::id());
    run(Command::new("/bin/sh").args([
        "-c",
        "exit 0",
        &marker,
        "--password=hunter2",
        "postgresql://app:s3cret@db:5432/prod",
    ]));
    let status = Command::new("/bin/sh")
        .args(["-c", "exit 3", &format!("{marker}-exit")])
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(3));
    let events = agent.stop();

    let exec = events
        .iter()
        .find(|e| {
            e["kind"] == "exec"
                && e["process"]["args"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x == marker.as_str()))
        })
        .unwrap_or_else(|| panic!("no exec with {marker}"));
    let p = &exec["process"];
    assert_eq!(
        p["args"],
        serde_json::json!([
            "/bin/sh",
            "-c",
            "exit 0",
            marker,
            "--password=****",
            "postgresql://app:****@db:5432/prod"
        ])
    );
    assert!(p["exe"].as_str().unwrap().ends_with("sh"), "{p}");
    assert_eq!(p["ppid"], std::process::id());
    assert!(p["ancestors"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a["pid"] == std::process::id()));
    assert_eq!(p["exec_id"].as_str().unwrap().len(), 16);
    let exit_marker = format!("{marker}-exit");
    let exit = events
        .iter()
        .find(|e| {
            e["kind"] == "exit"
                && e["process"]["args"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x == exit_marker.as_str()))
        })
        .expect("exit event of the short-lived process");
    assert_eq!(exit["exit_code"], 3);
}

#[test]
fn connects_to_watched_ports_are_reported_with_results_unwatched_are_not() {
    let watched4 = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = watched4.local_addr().unwrap().port();
    let watched6 = TcpListener::bind(("::1", port)).ok();
    let unwatched = TcpListener::bind("127.0.0.1:0").unwrap();
    let other = unwatched.local_addr().unwrap().port();
    // A watched port nobody listens on: the refused attempt counts too.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let agent = Agent::start(&policy(&[], &[port, closed_port]));

    TcpStream::connect(("127.0.0.1", port)).unwrap();
    TcpStream::connect(("127.0.0.1", other)).unwrap();
    assert!(TcpStream::connect(("127.0.0.1", closed_port)).is_err());
    if watched6.is_some() {
        TcpStream::connect(("::1", port)).unwrap();
    }
    let events = agent.stop();

    let me = std::process::id();
    let connects: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "connect" && e["process"]["pid"] == me)
        .collect();
    let to = |p: u16, fam: &str| {
        connects
            .iter()
            .find(|e| e["port"] == p && e["family"] == fam)
            .copied()
    };
    let ok = to(port, "ipv4").unwrap_or_else(|| panic!("no connect to {port}: {connects:#?}"));
    assert_eq!(ok["address"], "127.0.0.1");
    assert_eq!(ok["result"]["ok"], true);
    assert_eq!(ok["resource"], "db");
    let refused = to(closed_port, "ipv4").expect("refused connect reported");
    assert_eq!(refused["result"]["error"], "ECONNREFUSED");
    assert!(
        to(other, "ipv4").is_none(),
        "unwatched port reported: {connects:#?}"
    );
    if watched6.is_some() {
        assert_eq!(to(port, "ipv6").expect("ipv6 connect")["address"], "::1");
    }
    assert!(
        final_stats(&events)["connect"]["filtered_kernel"]
            .as_u64()
            .unwrap()
            >= 1
    );
}

/// `renameat2`'s flags are reported, and an exchange, which leaves both
/// names with other content, has both names digested.
#[test]
fn an_exchange_rename_is_named_and_both_names_are_digested() {
    let dir = Dir::new();
    let etc = dir.join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    let (a, b, c) = (
        format!("{etc}/a.conf"),
        format!("{etc}/b.conf"),
        format!("{etc}/c.conf"),
    );
    std::fs::write(&a, "alpha\n").unwrap();
    std::fs::write(&b, "beta\n").unwrap();
    let (sha_alpha, sha_beta) = (sha256_file(&a), sha256_file(&b));
    let mut agent = Agent::start(&policy(&[format!("{etc}/")], &[]));
    agent.wait_for(|e| e["kind"] == "scan_done", "the first watch scan");
    run(&mut python(&format!(
        "import ctypes, os\n\
         libc = ctypes.CDLL(None, use_errno=True)\n\
         AT_FDCWD = -100\n\
         assert libc.renameat2(AT_FDCWD, b'{a}', AT_FDCWD, b'{b}', 2) == 0, os.strerror(ctypes.get_errno())\n\
         assert libc.renameat2(AT_FDCWD, b'{a}', AT_FDCWD, b'{c}', 1) == 0, os.strerror(ctypes.get_errno())\n"
    )));
    agent.wait_digest(
        &c,
        &sha_beta,
        "the digest of the name renamed to without replacing",
    );
    agent.wait_digest(
        &b,
        &sha_alpha,
        "the digest of the second name after the exchange",
    );
    let events = agent.stop();
    let renames: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "file" && e["op"] == "rename")
        .collect();
    assert_eq!(renames.len(), 2, "{renames:#?}");
    assert_eq!(renames[0]["path"], a.as_str());
    assert_eq!(renames[0]["new_path"], b.as_str());
    assert_eq!(renames[0]["flags"], serde_json::json!(["RENAME_EXCHANGE"]));
    assert_eq!(renames[1]["flags"], serde_json::json!(["RENAME_NOREPLACE"]));
    // After the exchange the first name held the second's content, and
    // was digested so before it moved on.
    assert!(
        events.iter().any(|e| e["kind"] == "digest"
            && e["path"] == a.as_str()
            && (e["sha256"] == sha_beta.as_str() || e["exists"] == false)),
        "no digest of the first name after the exchange"
    );
}

/// A mount namespace of its own (as a container's) with a bind mount of a
/// watched tree at another path (as a hostPath volume): changes made
/// through that path are reported as the watched files they are, with the
/// path the process saw. A namespace made while the agent runs is found
/// after its mount.
#[test]
fn changes_through_a_bind_mount_in_another_mount_namespace_are_the_watched_files() {
    use std::io::BufRead as _;
    let dir = Dir::new();
    let etc = dir.join("etc");
    let (view, later_view) = (dir.join("ns-view"), dir.join("later-view"));
    for d in [&etc, &view, &later_view] {
        std::fs::create_dir_all(d).unwrap();
    }
    let conf = format!("{etc}/app.conf");
    std::fs::write(&conf, "mode=prod\n").unwrap();
    let namespace = |target: &str| {
        let mut child = Command::new("unshare")
            .args([
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                &format!("mount --bind {etc} {target} && echo ready && exec sleep 120"),
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready");
        child
    };
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let first = Kill(namespace(&view));
    let inside = |ns: &Kill, cmd: &str| {
        run(Command::new("nsenter").args(["-t", &ns.0.id().to_string(), "-m", "sh", "-c", cmd]));
    };
    let mut agent = Agent::start(&policy(&[format!("{etc}/")], &[]));
    agent.wait_for(|e| e["kind"] == "scan_done", "the first watch scan");
    inside(&first, &format!("sed -i s/prod/debug/ {view}/app.conf"));
    let sha = sha256_file(&conf);
    agent.wait_digest(
        &conf,
        &sha,
        "the digest of the watched file written through the other view",
    );
    // A namespace made now: found once its mount is seen.
    let second = Kill(namespace(&later_view));
    let mut found = false;
    let probes = format!("{etc}/probe-");
    for i in 0..60 {
        inside(&second, &format!("echo {i} > {later_view}/probe-{i}"));
        std::thread::sleep(std::time::Duration::from_millis(250));
        if agent.events().iter().any(|e| {
            e["kind"] == "file" && e["path"].as_str().is_some_and(|p| p.starts_with(&probes))
        }) {
            found = true;
            break;
        }
    }
    let events = agent.stop();
    drop((first, second));
    assert!(
        found,
        "no write through the later namespace's view was seen"
    );

    let rename = events
        .iter()
        .find(|e| e["kind"] == "file" && e["op"] == "rename" && e["new_path"] == conf.as_str())
        .unwrap_or_else(|| panic!("no rename into {conf}"));
    assert_eq!(rename["new_path_seen_as"], format!("{view}/app.conf"));
    assert!(
        rename["path"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{etc}/")),
        "{rename}"
    );
    assert!(
        rename["seen_as"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{view}/")),
        "{rename}"
    );
    assert_eq!(rename["resource"], "cfg");
    assert_eq!(rename["process"]["comm"], "sed");
    let probe = events
        .iter()
        .find(|e| {
            e["kind"] == "file"
                && e["path"]
                    .as_str()
                    .is_some_and(|p| p.starts_with(&format!("{etc}/probe-")))
        })
        .unwrap();
    assert!(
        probe["seen_as"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{later_view}/probe-")),
        "{probe}"
    );
}

/// A shared writable mapping can end with no report of its own: at an
/// exec, which drops every mapping, and at a `munmap` inside the window in
/// which the kernel reports a process's `munmap`s once. Both are read while
/// the process runs on, not at its exit.
#[test]
fn a_mapping_ended_by_exec_or_an_unreported_munmap_is_read_while_the_process_runs() {
    let dir = Dir::new();
    let etc = dir.join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    let (burst, execed) = (format!("{etc}/burst.bin"), format!("{etc}/execed.bin"));
    for f in [&burst, &execed] {
        std::fs::write(f, "........").unwrap();
    }
    let mut agent = Agent::start(&policy(&[format!("{etc}/")], &[]));
    agent.wait_for(|e| e["kind"] == "scan_done", "the first watch scan");
    let map = |path: &str| {
        format!(
            "import mmap, os, time\n\
             fd = os.open('{path}', os.O_RDWR)\n\
             mm = mmap.mmap(fd, 8, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)\n\
             os.close(fd)\n\
             time.sleep(0.3)\n"
        )
    };
    // An anonymous unmap the kernel reports, then the watched one 30 ms
    // later, inside the window: unreported.
    let mut burst_proc = python(&format!(
        "{}a = mmap.mmap(-1, 4096)\n\
         a.close()\n\
         time.sleep(0.03)\n\
         mm[0:8] = b'BURST!!!'\n\
         mm.close()\n\
         time.sleep(60)\n",
        map(&burst)
    ))
    .spawn()
    .unwrap();
    // Written, then the process becomes another program.
    let mut exec_proc = python(&format!(
        "{}mm[0:8] = b'EXECED!!'\n\
         os.execv('/bin/sleep', ['sleep', '60'])\n",
        map(&execed)
    ))
    .spawn()
    .unwrap();
    let expected = dir.join("expected");
    for (path, content) in [(&burst, "BURST!!!"), (&execed, "EXECED!!")] {
        std::fs::write(&expected, content).unwrap();
        agent.wait_digest(
            path,
            &sha256_file(&expected),
            &format!("the digest of what the mapping of {path} wrote"),
        );
    }
    // Read while both still run: not at their exits.
    for p in [&mut burst_proc, &mut exec_proc] {
        assert!(p.try_wait().unwrap().is_none(), "{p:?} has exited");
        let _ = p.kill();
        let _ = p.wait();
    }
    let events = agent.stop();
    let execs: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "exec" && e["process"]["pid"] == exec_proc.id())
        .collect();
    assert!(
        execs
            .last()
            .and_then(|e| e["process"]["exe"].as_str())
            .is_some_and(|x| x.ends_with("/sleep")),
        "{execs:#?}"
    );
    // The new program's unmaps are not the old image's mapping's.
    assert!(
        !events.iter().any(|e| e["kind"] == "file"
            && e["op"] == "munmap"
            && e["process"]["exe"]
                .as_str()
                .is_some_and(|x| x.ends_with("/sleep"))),
        "a munmap reported for the program exec'd after the mapping"
    );
}

/// Write handles the agent did not see opened: an fd open for write since
/// before its start, a `dup` of a tracked fd written after the original
/// closed, and shared writable mappings (one made since, written after its
/// fd closed; one made before the start, written by a child that then
/// exits while its parent runs on). Each ends in a digest of what was
/// written.
#[test]
fn writes_through_handles_the_agent_did_not_see_opened_are_digested() {
    use std::io::{BufRead as _, Write as _};
    let dir = Dir::new();
    let etc = dir.join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    let [early, duped, mapped, premapped] =
        ["early.conf", "duped.conf", "mapped.bin", "premapped.bin"].map(|n| format!("{etc}/{n}"));
    for f in [&early, &duped] {
        std::fs::write(f, "v1\n").unwrap();
    }
    for f in [&mapped, &premapped] {
        std::fs::write(f, "........\n").unwrap();
    }
    // Opened and mapped before the agent starts; written when told.
    let mut before = Command::new("python3")
        .args([
            "-c",
            &format!(
                "import mmap, os, sys\n\
                 fd = os.open('{early}', os.O_WRONLY | os.O_TRUNC)\n\
                 mfd = os.open('{premapped}', os.O_RDWR)\n\
                 mm = mmap.mmap(mfd, 9, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)\n\
                 os.close(mfd)\n\
                 print('ready', flush=True)\n\
                 sys.stdin.readline()\n\
                 os.write(fd, b'written after the start\\n')\n\
                 os.close(fd)\n\
                 pid = os.fork()\n\
                 if pid == 0:\n    mm[0:8] = b'PREMAPPD'\n    os._exit(0)\n\
                 os.waitpid(pid, 0)\n\
                 sys.stdin.readline()\n\
                 os._exit(0)\n"
            ),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(before.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    let mut agent = Agent::start(&policy(&[format!("{etc}/")], &[]));
    agent.wait_for(|e| e["kind"] == "scan_done", "the first watch scan");
    let mut told = before.stdin.take().unwrap();
    writeln!(told).unwrap();
    run(&mut python(&format!(
        "import mmap, os, time\n\
         fd = os.open('{duped}', os.O_WRONLY | os.O_TRUNC)\n\
         fd2 = os.dup(fd)\n\
         os.close(fd)\n\
         os.write(fd2, b'written through the dup\\n')\n\
         os.close(fd2)\n\
         fd = os.open('{mapped}', os.O_RDWR)\n\
         mm = mmap.mmap(fd, 9, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)\n\
         os.close(fd)\n\
         time.sleep(0.2)\n\
         mm[0:8] = b'MAPPED!!'\n\
         mm.close()\n\
         time.sleep(1)\n"
    )));
    for (path, content) in [
        (&early, "written after the start\n"),
        (&duped, "written through the dup\n"),
        (&mapped, "MAPPED!!\n"),
        (&premapped, "PREMAPPD\n"),
    ] {
        agent.wait_written(path, content);
    }
    // The mapping found at start was written by a child, which exited
    // while its parent still runs.
    writeln!(told).unwrap();
    assert!(before.wait().unwrap().success());
    let events = agent.stop();
    let on_mapped = file_events(&events, &mapped);
    assert!(
        ["mmap", "munmap"]
            .iter()
            .all(|op| on_mapped.iter().any(|e| e["op"] == *op)),
        "{:?}",
        ops(&on_mapped)
    );
}

/// Write files followed by the `struct file`, not the opener's fd: a
/// child that inherited one and writes after the parent closed it, a
/// process it was passed to over a Unix socket, a child that exits with it
/// open, a close-on-exec fd closed by an exec, and `close_range`. Each
/// close is reported by the process that made it, and each ends in a
/// digest of what was written.
#[test]
fn write_fds_inherited_passed_or_dropped_without_close_are_followed() {
    use std::io::BufRead as _;
    let dir = Dir::new();
    let etc = dir.join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    let names = ["inherited", "exit", "exec", "range", "passed"];
    let files = names.map(|n| format!("{etc}/{n}.conf"));
    for f in &files {
        std::fs::write(f, "v1\n").unwrap();
    }
    let [inherited, at_exit, at_exec, range, passed] = &files;
    let sock = dir.join("pass.sock");
    let mut agent = Agent::start(&policy(&[format!("{etc}/")], &[]));
    agent.wait_for(|e| e["kind"] == "scan_done", "the first watch scan");

    // Not related to the sender: it holds the file only by receiving it.
    let mut receiver = python(&format!(
        "import os, socket, time\n\
         s = socket.socket(socket.AF_UNIX)\n\
         s.bind('{sock}')\n\
         s.listen(1)\n\
         s.settimeout(60)\n\
         print('ready', flush=True)\n\
         c, _ = s.accept()\n\
         _, fds, _, _ = socket.recv_fds(c, 16, 1)\n\
         time.sleep(0.3)\n\
         os.write(fds[0], b'written by the receiver\\n')\n\
         os.close(fds[0])\n\
         print(os.getpid(), flush=True)\n"
    ))
    .stdout(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let mut out = std::io::BufReader::new(receiver.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");

    // Indented Python: a raw string, the paths filled in after.
    let script = r#"
import ctypes, json, os, socket, time

W = os.O_WRONLY | os.O_TRUNC
pids = {'parent': os.getpid()}

def child_after_close(path, body):
    fd = os.open(path, W)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.read(r, 1)
        body(fd)
    os.close(fd)
    os.write(w, b'x')
    os.waitpid(pid, 0)
    return pid

def write_close(fd):
    os.write(fd, b'written by the child\n')
    os.close(fd)
    os._exit(0)

def write_exit(fd):
    os.write(fd, b'written, then exit\n')
    os._exit(0)

pids['inherited'] = child_after_close('INHERITED', write_close)
pids['exit'] = child_after_close('AT_EXIT', write_exit)

pid = os.fork()
if pid == 0:
    fd = os.open('AT_EXEC', W)
    assert not os.get_inheritable(fd)
    os.write(fd, b'written, then exec\n')
    os.execv('/bin/true', ['true'])
os.waitpid(pid, 0)
pids['exec'] = pid

pid = os.fork()
if pid == 0:
    fd = os.open('RANGE', W)
    os.write(fd, b'closed by close_range\n')
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.syscall(436, fd, fd, 0) == 0
    os._exit(0)
os.waitpid(pid, 0)
pids['range'] = pid

fd = os.open('PASSED', W)
c = socket.socket(socket.AF_UNIX)
c.connect('SOCK')
time.sleep(0.3)  # the receiver is waiting in recvmsg before the fd sets off
socket.send_fds(c, [b'x'], [fd])
os.close(fd)
print(json.dumps(pids))
"#
    .replace("INHERITED", inherited)
    .replace("AT_EXIT", at_exit)
    .replace("AT_EXEC", at_exec)
    .replace("RANGE", range)
    .replace("PASSED", passed)
    .replace("SOCK", &sock);
    let driver = python(&script).output().unwrap();
    assert!(driver.status.success(), "{driver:?}");
    let pids: Value = serde_json::from_slice(&driver.stdout).unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    let receiver_pid: u64 = line.trim().parse().unwrap();
    assert!(receiver.wait().unwrap().success());

    for (path, content, pid, via) in [
        (
            inherited,
            "written by the child\n",
            &pids["inherited"],
            None,
        ),
        (at_exit, "written, then exit\n", &pids["exit"], Some("exit")),
        (at_exec, "written, then exec\n", &pids["exec"], Some("exec")),
        (range, "closed by close_range\n", &pids["range"], None),
        (
            passed,
            "written by the receiver\n",
            &Value::from(receiver_pid),
            None,
        ),
    ] {
        agent.wait_written(path, content);
        let close = agent.wait_for(
            |e| {
                e["kind"] == "file"
                    && e["op"] == "close_write"
                    && e["path"] == path.as_str()
                    && e["process"]["pid"] == *pid
            },
            &format!("the close of {path} by pid {pid}"),
        );
        assert_eq!(close["via"].as_str(), via, "{close}");
        assert_eq!(close["resource"], "cfg", "{close}");
    }
    let events = agent.stop();
    // The parent's close left the file open in its child.
    let parent_close = file_events(&events, inherited)
        .into_iter()
        .find(|e| e["op"] == "close_write" && e["process"]["pid"] == pids["parent"])
        .unwrap_or_else(|| panic!("no close of {inherited} by the parent"));
    assert_eq!(
        parent_close["flags"],
        serde_json::json!(["still_open"]),
        "{parent_close}"
    );
    // What the agent says the kernel offers is what it could attach: a
    // kprobe program loads here, but there is nothing to attach it to.
    let start = events
        .iter()
        .find(|e| e["kind"] == "agent_start")
        .expect("agent_start");
    assert_eq!(
        start["probes"]["kprobe"],
        std::path::Path::new("/sys/bus/event_source/devices/kprobe").exists(),
        "{start}"
    );
}

/// A hard link made before the tree was watched, outside it: a write
/// through that name is caught by the file's inode and reported as the
/// watched file, with the name used.
#[test]
fn a_write_through_an_outside_hard_link_is_the_watched_file() {
    let dir = Dir::new();
    let etc = dir.join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    let conf = format!("{etc}/app.conf");
    let outside = dir.join("outside.conf");
    std::fs::write(&conf, "mode=prod\n").unwrap();
    std::fs::hard_link(&conf, &outside).unwrap();
    let mut agent = Agent::start(&policy(&[format!("{etc}/")], &[]));
    agent.wait_for(|e| e["kind"] == "scan_done", "the first watch scan");
    run(&mut python(&format!(
        "open('{outside}', 'w').write('mode=debug\\n')\n"
    )));
    let sha = sha256_file(&conf);
    agent.wait_digest(
        &conf,
        &sha,
        "the digest of the watched file written through its other name",
    );
    let events = agent.stop();
    let open = file_events(&events, &conf)
        .into_iter()
        .find(|e| e["op"] == "open")
        .unwrap_or_else(|| panic!("no open of {conf}"));
    // The whole name while the writer holds its fd, else the last part.
    let seen = open["seen_as"].as_str().unwrap_or_default();
    assert!(
        outside.ends_with(seen) && seen.ends_with("outside.conf"),
        "{open}"
    );
    assert_eq!(open["resource"], "cfg");
    assert_eq!(open["process"]["comm"], "python3");
}

/// Paths longer than an event record holds (256 bytes), and than the walk
/// that matches them (511): each change is reported with its whole path,
/// built from the open file or from the name and the directory it starts
/// in, and digested under it.
#[test]
fn paths_longer_than_a_record_are_reported_whole_and_digested() {
    let dir = Dir::new();
    let etc = dir.join("etc");
    let deep = format!("{etc}/{}", vec!["d".repeat(60); 20].join("/"));
    std::fs::create_dir_all(&deep).unwrap();
    let file = format!("{deep}/app.conf");
    let moved = format!("{deep}/moved.conf");
    assert!(file.len() > 1200);
    let mut agent = Agent::start(&policy(&[format!("{etc}/")], &[]));
    agent.wait_for(|e| e["kind"] == "scan_done", "the first watch scan");
    // By the open file, by an absolute name, by a name relative to the cwd.
    run(python(&format!(
        "import os\n\
         open('{file}', 'w').write('mode=debug\\n')\n\
         os.chmod('{file}', 0o600)\n\
         os.chdir('{deep}')\n\
         os.rename('app.conf', 'moved.conf')\n"
    ))
    .current_dir(&etc));
    // An io_uring request, and a shared writable mapping.
    let uring = c_helper(&dir, "uring");
    let by_uring = format!("{deep}/uring.conf");
    run(Command::new(&uring).args(["write", &by_uring, "by io_uring\n"]));
    let mapped = format!("{deep}/mapped.bin");
    std::fs::write(&mapped, "........").unwrap();
    run(&mut python(&format!(
        "import mmap, os\n\
         fd = os.open('{mapped}', os.O_RDWR)\n\
         mm = mmap.mmap(fd, 8, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)\n\
         mm[0:8] = b'MAPPED!!'\n\
         mm.close()\n\
         os.close(fd)\n"
    )));
    for path in [&moved, &by_uring, &mapped] {
        let sha = sha256_file(path);
        agent.wait_digest(
            path,
            &sha,
            &format!("the digest of {path}, under its whole path"),
        );
    }
    std::fs::remove_file(&moved).unwrap();
    agent.wait_for(
        |e| e["kind"] == "digest" && e["path"] == moved.as_str() && e["exists"] == false,
        "the digest of the removed file",
    );
    // io_uring requests that name their files: the names are freed when
    // the request runs, so its whole paths are built at submission. Names
    // relative to the deep cwd, and absolute ones.
    let fixed = format!("{deep}/fixed.conf");
    run(Command::new(&uring).args(["write-fixed", &fixed, "through a fixed slot\n"]));
    let uring_old = format!("{deep}/uring.old");
    let linked = format!("{deep}/uring.link");
    let sym = format!("{deep}/uring.sym");
    run(Command::new(&uring)
        .args(["rename", "uring.conf", "uring.old"])
        .current_dir(&deep));
    run(Command::new(&uring).args(["link", &uring_old, &linked]));
    run(Command::new(&uring)
        .args(["symlink", "uring.old", "uring.sym"])
        .current_dir(&deep));
    run(Command::new(&uring).args(["unlink", &uring_old]));
    // Symlinks whose target text is longer than a record, by syscall and
    // by io_uring.
    let text = format!("{}target", "../".repeat(120));
    let (long_sym, uring_long_sym) = (format!("{deep}/long.sym"), format!("{deep}/uring.long.sym"));
    std::os::unix::fs::symlink(&text, &long_sym).unwrap();
    run(Command::new(&uring).args(["symlink", &text, &uring_long_sym]));
    for path in [&fixed, &linked] {
        let sha = sha256_file(path);
        agent.wait_digest(path, &sha, &format!("the digest of {path}, by io_uring"));
    }
    agent.wait_for(
        |e| e["kind"] == "digest" && e["path"] == uring_old.as_str() && e["exists"] == false,
        "the digest of the name io_uring unlinked",
    );
    // A mount over a deep watched directory, and its unmount.
    let sub = format!("{deep}/sub");
    let sub_conf = format!("{sub}/app.conf");
    std::fs::create_dir_all(&sub).unwrap();
    std::fs::write(&sub_conf, "mode=prod\n").unwrap();
    let sha_prod = sha256_file(&sub_conf);
    let other = dir.join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(format!("{other}/app.conf"), "mode=debug\n").unwrap();
    let sha_debug = sha256_file(&format!("{other}/app.conf"));
    agent.wait_digest(&sub_conf, &sha_prod, "the digest of the deep file to cover");
    mount_over_and_back(&mut agent, &other, &sub, &sub_conf, (&sha_debug, &sha_prod));
    // As deep where nothing is watched: dropped in the kernel, and its
    // directory remembered as clean until a rename moves it into the tree.
    let outside = dir.join("outside");
    let noise = format!("{outside}/{}/noise.txt", vec!["e".repeat(60); 20].join("/"));
    std::fs::create_dir_all(std::path::Path::new(&noise).parent().unwrap()).unwrap();
    let n = 50;
    for i in 0..n {
        std::fs::write(&noise, i.to_string()).unwrap();
    }
    let moved_in = format!("{etc}/moved-in");
    std::fs::rename(&outside, &moved_in).unwrap();
    let noise_in = noise.replacen(&outside, &moved_in, 1);
    std::fs::write(&noise_in, "inside now").unwrap();
    let sha_in = sha256_file(&noise_in);
    agent.wait_digest(
        &noise_in,
        &sha_in,
        "the digest of a deep file moved into the tree, under its whole path",
    );
    let events = agent.stop();
    assert!(file_events(&events, &noise).is_empty());
    let stats = &final_stats(&events)["file"];
    assert!(stats["filtered_kernel"].as_u64().unwrap() >= n, "{stats}");
    let find = |op: &str, path: &str| {
        events
            .iter()
            .find(|e| e["kind"] == "file" && e["op"] == op && e["path"] == path)
            .unwrap_or_else(|| {
                let ops: Vec<String> = events
                    .iter()
                    .filter(|e| e["kind"] == "file")
                    .map(|e| format!("{} {}", e["op"], e["path"]))
                    .collect();
                panic!("no {op} of the whole {path}: {ops:#?}")
            })
    };
    for op in ["open", "close_write", "chmod"] {
        find(op, &file);
    }
    assert_eq!(find("rename", &file)["new_path"], moved.as_str());
    find("unlink", &moved);
    assert_eq!(find("open", &by_uring)["via"], "io_uring");
    find("mmap", &mapped);
    assert_eq!(find("open", &fixed)["via"], "io_uring");
    let rename = find("rename", &by_uring);
    assert_eq!(
        (&rename["new_path"], &rename["via"]),
        (
            &serde_json::json!(uring_old),
            &serde_json::json!("io_uring")
        )
    );
    assert_eq!(find("link", &uring_old)["new_path"], linked.as_str());
    let symlink = find("symlink", &sym);
    assert_eq!(
        (&symlink["target"], &symlink["via"]),
        (
            &serde_json::json!("uring.old"),
            &serde_json::json!("io_uring")
        )
    );
    assert_eq!(find("unlink", &uring_old)["via"], "io_uring");
    for path in [&long_sym, &uring_long_sym] {
        assert_eq!(find("symlink", path)["target"], text.as_str());
    }
    for op in ["mount", "umount"] {
        assert_eq!(find(op, &sub)["resource"], "cfg");
    }
    let cut: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "file" && e["path_truncated"] == true)
        .collect();
    assert!(cut.is_empty(), "{cut:#?}");
}

/// Names through `/proc/self/root`, `/proc/PID/root` and `/proc/self/cwd`
/// reach watched files by another path; they are reported as the files
/// (a `cwd` link is read while the process lives: it stays a little).
#[test]
fn names_through_proc_root_and_cwd_links_are_the_watched_files() {
    let dir = Dir::new();
    let etc = dir.join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    let conf = format!("{etc}/app.conf");
    std::fs::write(&conf, "mode=prod\n").unwrap();
    let agent = Agent::start(&policy(&[format!("{etc}/")], &[]));
    run(&mut python(&format!(
        "import os\n\
         os.chmod('/proc/self/root{conf}', 0o600)\n\
         os.link('/proc/%d/root{conf}' % os.getpid(), '/proc/self/root{etc}/hard')\n\
         os.chdir('{etc}')\n\
         os.rename('/proc/self/cwd/hard', '/proc/self/cwd/moved')\n\
         os.unlink('/proc/thread-self/root{etc}/moved')\n\
         import time; time.sleep(0.5)\n"
    )));
    let events = agent.stop();
    let on_conf = file_events(&events, &conf);
    let chmod = on_conf
        .iter()
        .find(|e| e["op"] == "chmod")
        .unwrap_or_else(|| panic!("no chmod of {conf}: {on_conf:#?}"));
    assert_eq!(chmod["resource"], "cfg");
    assert_eq!(chmod["mode"], "0600");
    let link = on_conf
        .iter()
        .find(|e| e["op"] == "link")
        .expect("the link");
    assert_eq!(link["new_path"], format!("{etc}/hard"));
    let moved = format!("{etc}/moved");
    let rename = file_events(&events, &moved)
        .into_iter()
        .find(|e| e["op"] == "rename")
        .expect("the rename through /proc/self/cwd");
    assert_eq!(rename["path"], format!("{etc}/hard"));
    assert!(
        file_events(&events, &moved)
            .iter()
            .any(|e| e["op"] == "unlink"),
        "no unlink through /proc/thread-self/root"
    );
}

/// A watched directory replaced whole: a staged copy renamed into place.
/// No file under it is written, yet each now holds other content: each is
/// digested.
#[test]
fn a_watched_directory_replaced_by_a_staged_one_is_digested() {
    let dir = Dir::new();
    let (app, staged, old) = (dir.join("app"), dir.join("app.new"), dir.join("app.old"));
    std::fs::create_dir_all(format!("{app}/conf.d")).unwrap();
    std::fs::create_dir_all(format!("{staged}/conf.d")).unwrap();
    std::fs::write(format!("{app}/conf.d/db.conf"), "host=db-1\n").unwrap();
    std::fs::write(format!("{staged}/conf.d/db.conf"), "host=db-evil\n").unwrap();
    let sha = sha256_file(&format!("{staged}/conf.d/db.conf"));
    let mut agent = Agent::start(&policy(&[format!("{app}/")], &[]));
    agent.wait_for(|e| e["kind"] == "scan_done", "the first watch scan");
    std::fs::rename(&app, &old).unwrap();
    std::fs::rename(&staged, &app).unwrap();
    let conf = format!("{app}/conf.d/db.conf");
    let d = agent.wait_digest(&conf, &sha, "the digest of a file the replacement brought");
    agent.stop();
    assert_eq!(d["reason"], "change");
    assert_eq!(d["resource"], "cfg");
}

/// A bind mount over a watched directory, and its unmount, are events of
/// their own, and what the watched names show afterwards is digested.
#[test]
fn a_mount_over_a_watched_directory_is_reported_and_what_it_shows_digested() {
    let dir = Dir::new();
    let etc = dir.join("etc");
    let other = dir.join("other");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::create_dir_all(&other).unwrap();
    let conf = format!("{etc}/app.conf");
    std::fs::write(&conf, "mode=prod\n").unwrap();
    std::fs::write(format!("{other}/app.conf"), "mode=debug\n").unwrap();
    let (sha_prod, sha_debug) = (
        sha256_file(&conf),
        sha256_file(&format!("{other}/app.conf")),
    );
    let mut agent = Agent::start(&policy(&[format!("{etc}/")], &[]));
    agent.wait_for(|e| e["kind"] == "scan_done", "the first watch scan");
    let over = mount_over_and_back(&mut agent, &other, &etc, &conf, (&sha_debug, &sha_prod));
    let events = agent.stop();
    assert_eq!(over["reason"], "change");
    let mounts: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "file" && (e["op"] == "mount" || e["op"] == "umount"))
        .collect();
    assert_eq!(ops(&mounts), ["mount", "umount"], "{mounts:#?}");
    for m in &mounts {
        assert_eq!(m["path"], etc.as_str());
        assert_eq!(m["resource"], "cfg");
        assert_eq!(m["result"]["ok"], true);
    }
    assert_eq!(mounts[0]["process"]["comm"], "mount");
}

/// Every exec carries its executable's SHA-256; a program run from memory
/// (`memfd_create` + `execveat(AT_EMPTY_PATH)`) or from a file unlinked
/// before it ran is named as such and flagged fileless, and still hashed
/// while it runs (one that has exited when the agent reads the ring has no
/// file left to hash: the digest is then absent, never wrong).
#[test]
fn execs_carry_the_executable_digest_and_fileless_programs_are_named() {
    let dir = Dir::new();
    let tool = dir.join("tool");
    std::fs::copy("/bin/sleep", &tool).unwrap();
    let sha_sleep = sha256_file("/bin/sleep");
    let sha_sed = sha256_file("/usr/bin/sed");
    let agent = Agent::start(&policy(&[], &[]));
    run(Command::new("sed").args(["-n", "1p", "/dev/null"]));
    run(&mut python(
        "import os\n\
         fd = os.memfd_create('payload')\n\
         os.write(fd, open('/bin/sleep', 'rb').read())\n\
         os.execve(fd, ['payload', '0.5'], {})\n",
    ));
    run(&mut python(&format!(
        "import os\n\
         fd = os.open('{tool}', os.O_RDONLY)\n\
         os.unlink('{tool}')\n\
         os.execve(fd, ['tool', '0.6'], {{}})\n"
    )));
    let events = agent.stop();

    let exec_with = |arg: &str| {
        events
            .iter()
            .find(|e| {
                e["kind"] == "exec"
                    && e["process"]["args"]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|x| x == arg))
            })
            .unwrap_or_else(|| panic!("no exec with {arg}"))
    };
    let sed = &exec_with("/dev/null")["process"];
    assert_eq!(sed["exe"], "/usr/bin/sed");
    assert_eq!(sed["exe_sha256"], sha_sed.as_str());
    assert!(sed.get("fileless").is_none_or(|f| f == false), "{sed}");
    let memfd = &exec_with("0.5")["process"];
    assert_eq!(memfd["exe"], "memfd:payload", "{memfd}");
    assert_eq!(memfd["fileless"], true);
    assert_eq!(memfd["exe_sha256"], sha_sleep.as_str());
    let unlinked = &exec_with("0.6")["process"];
    assert_eq!(unlinked["exe"], format!("{tool} (deleted)"), "{unlinked}");
    assert_eq!(unlinked["fileless"], true);
    assert_eq!(unlinked["exe_sha256"], sha_sleep.as_str());
}

/// Changes to a watched file's metadata are events: extended attributes
/// (by name and by fd; a binary's `security.capability` called out),
/// timestamps (`os.utime`, `touch -d`, by fd) and inode flags (`chattr`).
/// A file opened for write by handle (`open_by_handle_at`) is an open.
#[test]
fn metadata_changes_and_opens_by_handle_are_reported() {
    let dir = Dir::new();
    let etc = dir.join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    let conf = format!("{etc}/app.conf");
    let tool = format!("{etc}/tool");
    let other = dir.join("other.conf");
    for f in [&conf, &tool, &other] {
        std::fs::write(f, "v1\n").unwrap();
    }
    let agent = Agent::start(&policy(&[format!("{etc}/")], &[]));
    run(&mut python(&format!(
        "import ctypes, os, struct\n\
         os.setxattr('{other}', 'user.noise', b'1')\n\
         os.setxattr('{conf}', 'user.owner', b'team-a')\n\
         fd = os.open('{conf}', os.O_RDONLY)\n\
         os.setxattr(fd, 'user.by_fd', b'1')\n\
         os.utime(fd, (1, 1))\n\
         os.close(fd)\n\
         os.removexattr('{conf}', 'user.owner')\n\
         os.utime('{conf}', (0, 0))\n\
         os.setxattr('{tool}', 'security.capability', struct.pack('<IIIII', 0x02000001, 1 << 13, 0, 0, 0))\n\
         libc = ctypes.CDLL(None, use_errno=True)\n\
         handle = ctypes.create_string_buffer(8 + 128)\n\
         struct.pack_into('<I', handle, 0, 128)\n\
         mount_id = ctypes.c_int()\n\
         assert libc.name_to_handle_at(-100, b'{conf}', handle, ctypes.byref(mount_id), 0) == 0, os.strerror(ctypes.get_errno())\n\
         mount_fd = os.open('{etc}', os.O_RDONLY)\n\
         fd = libc.open_by_handle_at(mount_fd, handle, os.O_WRONLY | os.O_TRUNC)\n\
         assert fd >= 0, os.strerror(ctypes.get_errno())\n\
         os.write(fd, b'v2 by handle\\n')\n\
         os.close(fd)\n"
    )));
    run(Command::new("touch").args(["-d", "@1000000000", &conf]));
    run(Command::new("chattr").args(["+i", &conf]));
    run(Command::new("chattr").args(["-i", &conf]));
    let events = agent.stop();

    let on_conf = file_events(&events, &conf);
    let find = |op: &str, pred: &dyn Fn(&Value) -> bool| {
        on_conf
            .iter()
            .find(|e| e["op"] == op && pred(e))
            .copied()
            .unwrap_or_else(|| panic!("no {op} on {conf}: {on_conf:#?}"))
    };
    let set = find("setxattr", &|e| e["xattr"] == "user.owner");
    assert_eq!(set["resolved_from"], "name");
    assert_eq!(set["process"]["comm"], "python3");
    assert_eq!(
        find("setxattr", &|e| e["xattr"] == "user.by_fd")["resolved_from"],
        "file"
    );
    find("removexattr", &|e| e["xattr"] == "user.owner");
    let utimes: Vec<&&Value> = on_conf.iter().filter(|e| e["op"] == "utimes").collect();
    assert!(
        utimes.len() >= 3,
        "by fd, by name and touch: {:#?}",
        ops(&on_conf)
    );
    assert!(utimes.iter().any(|e| e["process"]["comm"] == "touch"));
    find("setflags", &|e| {
        e["flags"] == serde_json::json!(["immutable"])
    });
    // Cleared: no flag named.
    find("setflags", &|e| {
        e["flags"].as_array().is_none_or(|a| a.is_empty())
    });
    let by_handle = find("open", &|e| e["process"]["comm"] == "python3");
    assert_eq!(by_handle["resolved_from"], "file");
    assert_eq!(
        by_handle["flags"],
        serde_json::json!(["O_WRONLY", "O_TRUNC"])
    );
    find("close_write", &|_| true);
    let cap = file_events(&events, &tool)
        .into_iter()
        .find(|e| e["op"] == "setxattr")
        .expect("the capability set on the binary");
    assert_eq!(cap["xattr"], "security.capability");
    assert_eq!(cap["flags"], serde_json::json!(["file_capability"]));
    assert!(
        file_events(&events, &other).is_empty(),
        "an unwatched file's attribute was reported"
    );
}

/// File requests made through io_uring (open, write and close; rename;
/// unlink) are reported like their syscall twins, named as io_uring, and
/// the written content is digested.
#[test]
fn io_uring_file_requests_are_reported_like_their_syscalls_and_digested() {
    let dir = Dir::new();
    let uring = c_helper(&dir, "uring");
    let etc = dir.join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    let conf = format!("{etc}/app.conf");
    let moved = format!("{etc}/app.conf.old");
    let other = dir.join("other.txt");
    std::fs::write(&conf, "v1\n").unwrap();
    let mut agent = Agent::start(&policy(&[format!("{etc}/")], &[]));
    agent.wait_for(|e| e["kind"] == "scan_done", "the first watch scan");
    run(Command::new(&uring).args(["write", &other, "noise"]));
    run(Command::new(&uring).args(["write", &conf, "v2 written by io_uring\n"]));
    let sha = sha256_file(&conf);
    agent.wait_digest(&conf, &sha, "the digest of what io_uring wrote");
    // Through a fixed-file slot: no fd is installed to follow.
    let fixed = format!("{etc}/fixed.conf");
    run(Command::new(&uring).args(["write-fixed", &fixed, "written through a fixed slot\n"]));
    let sha_fixed = sha256_file(&fixed);
    agent.wait_digest(
        &fixed,
        &sha_fixed,
        "the digest of what io_uring wrote through a fixed file",
    );
    run(Command::new(&uring).args(["rename", &conf, &moved]));
    agent.wait_digest(&moved, &sha, "the digest of the name io_uring renamed to");
    run(Command::new(&uring).args(["unlink", &moved]));
    agent.wait_for(
        |e| e["kind"] == "digest" && e["path"] == moved.as_str() && e["exists"] == false,
        "the digest of the name io_uring unlinked",
    );
    // A ring polled by a kernel thread (SQPOLL): requests submitted and
    // run with no system call of the process's own.
    let polled = format!("{etc}/polled.conf");
    let polled_old = format!("{etc}/polled.old");
    for args in [
        ["write", polled.as_str(), "by a polled ring\n"],
        ["rename", polled.as_str(), polled_old.as_str()],
    ] {
        run(Command::new(&uring).args(args).env("URING_SQPOLL", "1"));
    }
    let sha_polled = sha256_file(&polled_old);
    agent.wait_digest(
        &polled_old,
        &sha_polled,
        "the digest of what a polled ring wrote and renamed",
    );
    let events = agent.stop();

    let changes: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "file" && e["process"]["exe"] == uring.as_str())
        .collect();
    // Requests that io-wq runs are reported from its worker thread, named
    // by its process (the thread itself is `iou-wrk-PID`).
    assert!(
        changes
            .iter()
            .any(|e| e["process"]["tid"] != e["process"]["pid"]),
        "no request ran on an io-wq worker: {changes:#?}"
    );
    assert!(
        changes.iter().all(|e| e["process"]["comm"] == "uring"),
        "{changes:#?}"
    );
    let summary: Vec<(String, String)> = changes
        .iter()
        .map(|e| {
            (
                e["op"].as_str().unwrap_or("").to_owned(),
                e["path"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert!(
        changes
            .iter()
            .all(|e| e["via"] == "io_uring" && e["result"]["ok"] == true),
        "{changes:#?}"
    );
    assert!(
        !summary.iter().any(|(_, p)| p == &other),
        "an unwatched file was reported: {summary:?}"
    );
    for (op, path) in [
        ("open", &conf),
        ("write", &conf),
        ("open", &fixed),
        ("write", &fixed),
        ("rename", &conf),
        ("unlink", &moved),
        ("open", &polled),
        ("write", &polled),
        ("rename", &polled),
    ] {
        assert!(
            summary.iter().any(|(o, p)| o == op && p == path),
            "no {op} of {path}: {summary:?}"
        );
    }
    let rename = changes.iter().find(|e| e["op"] == "rename").unwrap();
    assert_eq!(rename["new_path"], moved.as_str());
    let open = changes.iter().find(|e| e["op"] == "open").unwrap();
    assert_eq!(open["resolved_from"], "file");
    assert_eq!(
        open["flags"],
        serde_json::json!(["O_WRONLY", "O_CREAT", "O_TRUNC"])
    );
}

/// Connects that never pass through `connect(2)` (io_uring, TCP Fast Open)
/// and datagrams sent to a watched port are reported when the kernel checks
/// the destination, say so, and leave nothing behind for the thread's next
/// plain connect to inherit.
#[test]
fn connects_by_io_uring_fast_open_and_datagrams_are_reported_and_not_lent_to_the_next_connect() {
    let dir = Dir::new();
    let uring = c_helper(&dir, "uring");
    let watched = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = watched.local_addr().unwrap().port();
    let unwatched = TcpListener::bind("127.0.0.1:0").unwrap();
    let other = unwatched.local_addr().unwrap().port();
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp_port = udp.local_addr().unwrap().port();
    let agent = Agent::start(&policy(&[], &[port, closed_port, udp_port]));

    // io_uring's connect, then a plain connect(2) to an unwatched port on
    // the same thread.
    let out = Command::new(&uring)
        .args([
            "connect",
            "127.0.0.1",
            &port.to_string(),
            &other.to_string(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("then 0"),
        "{out:?}"
    );
    // TCP Fast Open: the send connects. Then a plain connect to an
    // unwatched port and one to a watched port nobody listens on; three
    // datagrams to a watched UDP port, one to an unwatched one.
    let py = python(&format!(
        "import socket\n\
         s = socket.socket()\n\
         s.sendto(b'x', socket.MSG_FASTOPEN, ('127.0.0.1', {port}))\n\
         socket.create_connection(('127.0.0.1', {other})).close()\n\
         try:\n    socket.create_connection(('127.0.0.1', {closed_port}))\nexcept ConnectionRefusedError:\n    pass\n\
         u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         for _ in range(3):\n    u.sendto(b'ping', ('127.0.0.1', {udp_port}))\n\
         u.sendto(b'ping', ('127.0.0.1', {other}))\n\
         import os; print(os.getpid())\n"
    ))
    .output()
    .unwrap();
    assert!(py.status.success(), "{py:?}");
    let py_pid: u64 = String::from_utf8_lossy(&py.stdout).trim().parse().unwrap();
    let events = agent.stop();

    let connects = |pid: Option<u64>, comm: &str| -> Vec<&Value> {
        events
            .iter()
            .filter(|e| {
                e["kind"] == "connect"
                    && match pid {
                        Some(p) => e["process"]["pid"] == p,
                        None => e["process"]["comm"] == comm,
                    }
            })
            .collect()
    };
    let by_uring = connects(None, "uring");
    assert_eq!(by_uring.len(), 1, "{by_uring:#?}");
    assert_eq!(by_uring[0]["via"], "io_uring", "{by_uring:#?}");
    assert_eq!(by_uring[0]["port"], port);
    assert_eq!(by_uring[0]["protocol"], "tcp");
    assert!(by_uring[0]["result"].is_null(), "{by_uring:#?}");

    let by_py = connects(Some(py_pid), "");
    let fast = by_py
        .iter()
        .find(|e| e["via"] == "fastopen")
        .unwrap_or_else(|| panic!("no fast open connect: {by_py:#?}"));
    assert_eq!(fast["port"], port);
    assert!(fast["result"].is_null());
    let refused = by_py
        .iter()
        .find(|e| e["port"] == closed_port)
        .unwrap_or_else(|| panic!("no connect to the closed port: {by_py:#?}"));
    assert_eq!(refused["via"], "connect");
    assert_eq!(refused["result"]["error"], "ECONNREFUSED");
    let sent: Vec<&&Value> = by_py.iter().filter(|e| e["via"] == "sendmsg").collect();
    assert_eq!(sent.len(), 1, "one report for three datagrams: {by_py:#?}");
    assert_eq!(sent[0]["port"], udp_port);
    assert_eq!(sent[0]["protocol"], "udp");
    assert_eq!(
        by_py.len(),
        3,
        "the connects to the unwatched port were reported: {by_py:#?}"
    );
}

#[test]
fn writes_outside_watched_paths_are_filtered_in_the_kernel() {
    let dir = Dir::new();
    std::fs::create_dir_all(dir.join("watched")).unwrap();
    std::fs::create_dir_all(dir.join("unwatched")).unwrap();
    let agent = Agent::start(&policy(&[format!("{}/", dir.join("watched"))], &[]));
    let n = 300;
    let target = dir.join("unwatched/noise.txt");
    run(&mut python(&format!(
        "import os\nfor i in range({n}):\n  open('{target}','w').write(str(i))\n  os.chmod('{target}', 0o600)"
    )));
    let events = agent.stop();

    assert!(file_events(&events, &target).is_empty());
    let file = &final_stats(&events)["file"];
    // Each iteration is two unwatched calls (an open for write and a chmod),
    // all of them dropped before the ring buffer.
    assert!(file["filtered_kernel"].as_u64().unwrap() >= 2 * n, "{file}");
    assert_eq!(file["emitted"], file["received"], "{file}");
    assert_eq!(file["dropped"], 0);
}

/// The kernel caches directories found to hold nothing watched; a rename
/// or a mount that gives one a watched path must not leave it cached.
#[test]
fn a_directory_moved_or_mounted_into_a_watched_tree_is_watched_at_once() {
    let dir = Dir::new();
    let watched = dir.join("w");
    std::fs::create_dir_all(&watched).unwrap();
    std::fs::create_dir_all(dir.join("outside/sub")).unwrap();
    std::fs::create_dir_all(dir.join("elsewhere")).unwrap();
    std::fs::create_dir_all(dir.join("w/m")).unwrap();
    let agent = Agent::start(&policy(&[format!("{watched}/")], &[]));
    // Writes where nothing is watched: the directories are cached clean.
    for _ in 0..3 {
        std::fs::write(dir.join("outside/sub/x.conf"), "before").unwrap();
        std::fs::write(dir.join("elsewhere/y.conf"), "before").unwrap();
    }
    // The same directory, renamed into the tree: its dentry and inode are
    // the same ones the cache knows.
    std::fs::rename(dir.join("outside/sub"), dir.join("w/sub")).unwrap();
    let moved = dir.join("w/sub/x.conf");
    std::fs::write(&moved, "after").unwrap();
    // Another, bind-mounted over a directory of the tree.
    let (from, onto) = (dir.join("elsewhere"), dir.join("w/m"));
    run(Command::new("mount").args(["--bind", from.as_str(), onto.as_str()]));
    let mounted = dir.join("w/m/y.conf");
    std::fs::write(&mounted, "after").unwrap();
    run(Command::new("umount").arg(dir.join("w/m")));
    let events = agent.stop();

    assert!(file_events(&events, &dir.join("outside/sub/x.conf")).is_empty());
    assert_eq!(ops(&file_events(&events, &moved)), ["open", "close_write"]);
    assert_eq!(
        ops(&file_events(&events, &mounted)),
        ["open", "close_write"]
    );
}

/// Calls that name a file by a plain name relative to a directory fd
/// (`rm -rf`, `tar`) are judged from the verdict of that directory: one
/// known to hold nothing watched drops them without building a path, and
/// neither a rename into the tree nor a watched neighbour may be missed.
#[test]
fn plain_names_relative_to_a_directory_fd_are_judged_by_that_directory() {
    let dir = Dir::new();
    let watched = dir.join("w");
    std::fs::create_dir_all(&watched).unwrap();
    std::fs::create_dir_all(dir.join("outside/sub")).unwrap();
    let agent = Agent::start(&policy(&[format!("{watched}/")], &[]));
    let (outside, parent) = (dir.join("outside/sub"), dir.path.display().to_string());
    run(&mut python(&format!(
        "import os\n\
         fd = os.open('{outside}', os.O_RDONLY)\n\
         for i in range(20):\n\
         \x20 open('{outside}/n%d.conf' % i, 'w').close()\n\
         \x20 os.chmod('n%d.conf' % i, 0o600, dir_fd=fd)\n\
         \x20 os.unlink('n%d.conf' % i, dir_fd=fd)\n\
         open('{outside}/z.conf', 'w').close()\n\
         os.rename('{outside}', '{watched}/sub')\n\
         os.chmod('z.conf', 0o640, dir_fd=fd)\n\
         os.unlink('z.conf', dir_fd=fd)\n\
         p = os.open('{parent}', os.O_RDONLY)\n\
         for i in range(5):\n\
         \x20 os.chmod('outside', 0o755, dir_fd=p)\n\
         os.chmod('w', 0o750, dir_fd=p)\n\
         wfd = os.open('{watched}', os.O_RDONLY)\n\
         open('{watched}/a.conf', 'w').close()\n\
         os.chmod('a.conf', 0o600, dir_fd=wfd)\n\
         os.unlink('a.conf', dir_fd=wfd)\n"
    )));
    let events = agent.stop();

    for i in [0, 19] {
        assert!(file_events(&events, &dir.join(&format!("outside/sub/n{i}.conf"))).is_empty());
    }
    // The same directory, renamed into the tree while held open.
    assert_eq!(
        ops(&file_events(&events, &dir.join("w/sub/z.conf"))),
        ["chmod", "unlink"]
    );
    // The parent of the tree holds a watched entry: never cached clean.
    assert_eq!(ops(&file_events(&events, &watched)), ["chmod"]);
    assert_eq!(
        ops(&file_events(&events, &dir.join("w/a.conf"))),
        ["open", "close_write", "chmod", "unlink"]
    );
    let file = &final_stats(&events)["file"];
    assert_eq!(file["dropped"], 0, "{file}");
}

#[test]
fn a_policy_file_changed_on_disk_is_applied_without_a_signal() {
    let dir = Dir::new();
    std::fs::create_dir_all(dir.join("a")).unwrap();
    std::fs::create_dir_all(dir.join("b")).unwrap();
    let a = format!("{}/", dir.join("a"));
    let b = format!("{}/", dir.join("b"));
    let mut agent = Agent::start(&policy(std::slice::from_ref(&a), &[]));
    // Replaced as an editor or a ConfigMap update does: a new file
    // renamed over the old one. No SIGHUP.
    let next = agent.policy.with_extension("new");
    std::fs::write(&next, policy(std::slice::from_ref(&b), &[])).unwrap();
    std::fs::rename(&next, &agent.policy).unwrap();
    agent.wait_policy_watching(&b);
    let after = dir.join("b/after.conf");
    std::fs::write(&after, "y").unwrap();
    agent.wait_for(
        |e| e["kind"] == "file" && e["path"] == after.as_str(),
        "a change under the newly watched tree",
    );
    let events = agent.stop();
    assert_eq!(
        events
            .iter()
            .filter(|e| e["kind"] == "policy_applied")
            .count(),
        2,
        "applied at start and once after the change"
    );
}

#[test]
fn the_watched_set_changes_at_run_time_without_reloading_programs() {
    let dir = Dir::new();
    std::fs::create_dir_all(dir.join("a")).unwrap();
    std::fs::create_dir_all(dir.join("b")).unwrap();
    let a = format!("{}/", dir.join("a"));
    let b = format!("{}/", dir.join("b"));
    let mut agent = Agent::start(&policy(std::slice::from_ref(&a), &[]));
    let before = dir.join("b/before.conf");
    std::fs::write(&before, "x").unwrap();

    std::fs::write(&agent.policy, policy(std::slice::from_ref(&b), &[])).unwrap();
    agent.reload();
    agent.wait_policy_watching(&b);
    let after = dir.join("b/after.conf");
    std::fs::write(&after, "y").unwrap();
    let no_longer = dir.join("a/no-longer.conf");
    std::fs::write(&no_longer, "z").unwrap();

    // A bad policy is refused and the running one stays.
    std::fs::write(&agent.policy, "apiVersion: driftwatch.dev/v1\nkind: Policy\nresources: [ { name: x, kind: config, paths: [relative] } ]\n").unwrap();
    agent.reload();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let still = dir.join("b/still.conf");
    std::fs::write(&still, "w").unwrap();
    let events = agent.stop();

    assert!(file_events(&events, &before).is_empty());
    assert_eq!(ops(&file_events(&events, &after)), ["open", "close_write"]);
    assert!(file_events(&events, &no_longer).is_empty());
    assert_eq!(ops(&file_events(&events, &still)), ["open", "close_write"]);
    assert_eq!(
        events.iter().filter(|e| e["kind"] == "agent_start").count(),
        1
    );
}

#[test]
fn a_bad_policy_is_refused_with_file_field_and_reason() {
    let dir = Dir::new();
    let p = dir.path.join("bad.yaml");
    std::fs::write(&p, "apiVersion: driftwatch.dev/v1\nkind: Policy\nresources:\n  - { name: db, kind: database, ports: [0] }\n").unwrap();
    let out = Command::new(driftwatch_tests::agent_bin())
        .args(["--policy", &p.display().to_string(), "--stdout"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}: resources[0].ports[0]: must be between 1 and 65535",
            p.display()
        )),
        "{err}"
    );
    let missing = Command::new(driftwatch_tests::agent_bin())
        .args(["--policy", "/nonexistent/policy.yaml", "--stdout"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&missing.stderr)
        .contains("/nonexistent/policy.yaml: cannot read policy"));
}

#[test]
fn ring_buffer_overflow_is_counted_and_reported_as_loss() {
    let dir = Dir::new();
    let tree = dir.join("busy");
    std::fs::create_dir_all(&tree).unwrap();
    let f = format!("{tree}/hot.conf");
    std::fs::write(&f, "x").unwrap();
    // The smallest ring (1 MiB holds ~1,700 file records), and a reader that
    // is stopped while 20,000 watched changes happen: records must be lost,
    // and the loss must be said.
    let mut agent = Agent::start_with(&policy(&[format!("{tree}/")], &[]), &["--ring-mib", "1"]);
    agent.signal(libc::SIGSTOP);
    let t = std::time::Instant::now();
    while agent.state() != "T" && t.elapsed() < std::time::Duration::from_secs(5) {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(
        agent.state(),
        "T",
        "the agent must be stopped while the ring fills"
    );
    let n = 20_000;
    run(&mut python(&format!(
        "import os\nfor i in range({n}):\n  os.chmod('{f}', 0o600 if i % 2 else 0o640)"
    )));
    agent.signal(libc::SIGCONT);
    let loss = agent.wait_for(|e| e["kind"] == "loss", "a loss event");
    let events = agent.stop();

    let lost_reported: u64 = events
        .iter()
        .filter(|e| e["kind"] == "loss")
        .map(|e| e["dropped"]["file"].as_u64().unwrap_or(0))
        .sum();
    assert!(loss["dropped"]["file"].as_u64().unwrap() > 0, "{loss}");
    let file = &final_stats(&events)["file"];
    let chmods = file_events(&events, &f)
        .into_iter()
        .filter(|e| e["op"] == "chmod")
        .count() as u64;
    // Every change is either delivered or counted as lost: nothing
    // vanishes. On a loaded machine the stop can come before the agent has
    // read the whole ring; what it left is counted too (`unread_at_stop`,
    // records of any kind).
    let unread: u64 = events
        .iter()
        .filter(|e| e["kind"] == "loss")
        .map(|e| e["dropped"]["unread_at_stop"].as_u64().unwrap_or(0))
        .sum();
    let counted = chmods + file["dropped"].as_u64().unwrap();
    assert!(
        counted <= n && counted + unread >= n,
        "{chmods} delivered + {file} + {unread} unread at stop, of {n}"
    );
    assert_eq!(lost_reported, file["dropped"].as_u64().unwrap(), "{file}");
    assert!(chmods < n);
}
