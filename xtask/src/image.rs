//! `cargo xtask image`: the agent's and the collector's container images,
//! FROM scratch over a root assembled here (release binaries, the shared
//! libraries `ldd` names, a passwd with the collector's non-root user), built
//! with Debian's buildah (installed if missing; vfs storage, chroot
//! isolation: no daemon, no registry). Each image is then checked by
//! running its binary from the image's own root.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::{root, setup};

/// The images: (name, binaries, Containerfile).
const IMAGES: [(&str, &[&str], &str); 2] = [
    ("agent", &["driftwatch-agent"], "Containerfile.agent"),
    (
        "collector",
        &["driftwatch-collector", "driftwatch"],
        "Containerfile.collector",
    ),
];

/// The image tag of `name`.
pub fn tag(name: &str) -> String {
    format!("driftwatch/{name}:{}", env!("CARGO_PKG_VERSION"))
}

/// Shared libraries a binary loads (with the loader), from `ldd`.
fn libraries(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .context("running ldd")?;
    let mut libs = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x…)".
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

fn copy_into(rootfs: &Path, file: &Path, to: &Path) -> Result<()> {
    let dest = rootfs.join(to.strip_prefix("/").unwrap_or(to));
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // Resolved: the image holds files, not links into the build host.
    let real = std::fs::canonicalize(file).with_context(|| format!("{}", file.display()))?;
    std::fs::copy(&real, &dest).with_context(|| format!("copying {}", real.display()))?;
    Ok(())
}

/// Assembles the root of image `name` from `bins` in the profile directory
/// `release`.
fn assemble(name: &str, bins: &[&str], release: &Path) -> Result<PathBuf> {
    let rootfs = root().join("target/image").join(name);
    if rootfs.exists() {
        std::fs::remove_dir_all(&rootfs)?;
    }
    for b in bins {
        let bin = release.join(b);
        let dest = Path::new("/usr/bin").join(b);
        copy_into(&rootfs, &bin, &dest)?;
        // Debug information stays out of the image (a debug build's is
        // hundreds of MiB); symbols stay, for backtraces.
        let _ = Command::new("strip")
            .arg("--strip-debug")
            .arg(rootfs.join(dest.strip_prefix("/").unwrap_or(&dest)))
            .status();
        for lib in libraries(&bin)? {
            copy_into(&rootfs, &lib, &lib)?;
        }
    }
    let etc = rootfs.join("etc");
    std::fs::create_dir_all(&etc)?;
    std::fs::write(
        etc.join("passwd"),
        "root:x:0:0:root:/root:/sbin/nologin\ndriftwatch:x:65532:65532:driftwatch:/nonexistent:/sbin/nologin\n",
    )?;
    std::fs::write(etc.join("group"), "root:x:0:\ndriftwatch:x:65532:\n")?;
    for dir in ["tmp", "var/lib/driftwatch", "run/driftwatch"] {
        std::fs::create_dir_all(rootfs.join(dir))?;
    }
    Ok(rootfs)
}

fn buildah() -> Command {
    let mut c = Command::new("buildah");
    // No daemon, no overlay module needed, no user namespaces.
    c.args(["--storage-driver", "vfs"]);
    c
}

/// `cargo xtask image`: release (or debug) binaries, both images, checked.
pub fn run(debug: bool) -> Result<()> {
    setup::require_root("cargo xtask image")?;
    setup::ensure()?;
    crate::build_agent(!debug)?;
    build(&root().join(if debug {
        "target/debug"
    } else {
        "target/release"
    }))
}

/// Builds both images from the binaries in `profile_dir` and checks them.
pub fn build(profile_dir: &Path) -> Result<()> {
    setup::apt(&["buildah"])?;
    for (name, bins, containerfile) in IMAGES {
        let rootfs = assemble(name, bins, profile_dir)?;
        let tag = tag(name);
        eprintln!("xtask: building image {tag} from {}", rootfs.display());
        setup::run(
            buildah()
                .args([
                    "bud",
                    "--isolation",
                    "chroot",
                    "--layers=false",
                    "-t",
                    &tag,
                    "-f",
                ])
                .arg(root().join("deploy/image").join(containerfile))
                .arg(&rootfs),
        )?;
        check(name, bins)?;
    }
    // Images the tags moved away from.
    let _ = buildah()
        .args(["rmi", "--prune"])
        .stdout(std::process::Stdio::null())
        .status();
    Ok(())
}

/// Runs each binary of image `name` from the image's root (mounted, then
/// chrooted into): the image holds everything it needs to start.
fn check(name: &str, bins: &[&str]) -> Result<()> {
    let tag = tag(name);
    let out = buildah().args(["from", &tag]).output()?;
    if !out.status.success() {
        bail!(
            "buildah from {tag}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let container = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let mounted = buildah().args(["mount", &container]).output()?;
    let result = (|| -> Result<()> {
        if !mounted.status.success() {
            bail!(
                "buildah mount: {}",
                String::from_utf8_lossy(&mounted.stderr)
            );
        }
        let dir = String::from_utf8_lossy(&mounted.stdout).trim().to_owned();
        // As the image's own user.
        let user = buildah()
            .args(["inspect", "--format", "{{.OCIv1.Config.User}}", &tag])
            .output()?;
        let user = String::from_utf8_lossy(&user.stdout).trim().to_owned();
        if name == "collector" && (user.is_empty() || user.starts_with('0')) {
            bail!("image {tag} runs as {user:?}: the collector must not run as root");
        }
        for b in bins {
            let out = Command::new("chroot")
                .arg(format!("--userspec={user}"))
                .arg(&dir)
                .arg(format!("/usr/bin/{b}"))
                .arg("--version")
                .output()
                .context("chroot")?;
            if !out.status.success() {
                bail!(
                    "{b} does not start from image {tag}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            eprintln!(
                "xtask: {tag}: {} runs from the image's root as {user}",
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        if name == "collector" {
            serves(&dir, &user)?;
        }
        Ok(())
    })();
    let _ = buildah().args(["umount", &container]).status();
    let _ = buildah().args(["rm", &container]).status();
    result
}

/// Starts the collector from the image's root `dir` as `user`, on a data
/// directory in the image's /tmp, and waits for its /readyz: it opens its
/// store and serves with nothing but what the image holds.
fn serves(dir: &str, user: &str) -> Result<()> {
    let free = || -> Result<u16> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port())
    };
    let (api, metrics) = (free()?, free()?);
    let data = Path::new(dir).join("tmp/store");
    std::fs::create_dir_all(&data)?;
    setup::run(Command::new("chown").arg("-R").arg(user).arg(&data))?;
    let mut child = Command::new("chroot")
        .arg(format!("--userspec={user}"))
        .arg(dir)
        .arg("/usr/bin/driftwatch-collector")
        .args(["--data-dir", "/tmp/store"])
        .arg(format!("--listen=127.0.0.1:{api}"))
        .arg(format!("--metrics-listen=127.0.0.1:{metrics}"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting the collector from the image")?;
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let ready = loop {
        if readyz(metrics) {
            break true;
        }
        if std::time::Instant::now() >= until || child.try_wait()?.is_some() {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let _ = child.kill();
    let _ = child.wait();
    if !ready {
        bail!("the collector started from the image never answered /readyz");
    }
    eprintln!("xtask: the collector from the image serves, as {user}, and says it is ready");
    Ok(())
}

fn readyz(port: u16) -> bool {
    use std::io::{Read as _, Write as _};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(2)));
    if s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.1 200")
}
