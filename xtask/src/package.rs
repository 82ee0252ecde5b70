//! `cargo xtask package`: the Debian package, built with dpkg-deb (Debian's own tool) from a
//! staged tree: the `xlb` binary, the systemd unit, man pages, bash/zsh/fish completions, an
//! example config, the README and the Grafana dashboard.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

use super::{output, root, run};

/// The version of the `xlb` crate (the workspace's).
fn version() -> Result<String> {
    let text = std::fs::read_to_string(root().join("Cargo.toml")).context("reading Cargo.toml")?;
    let mut in_package = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_package = line == "[workspace.package]";
        } else if in_package {
            if let Some(v) = line.strip_prefix("version") {
                let v = v.trim_start_matches([' ', '=']).trim().trim_matches('"');
                return Ok(v.to_string());
            }
        }
    }
    anyhow::bail!("no version in [workspace.package] of Cargo.toml")
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    let bytes = std::fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    write(to, &bytes)
}

/// Build `target/debian/xlb_<version>_<arch>.deb` from the release binary; returns its path.
pub fn package() -> Result<PathBuf> {
    let version = version()?;
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?
        .trim()
        .to_string();
    let out_dir = root().join("target/debian");
    let stage = out_dir.join("stage");
    let _ = std::fs::remove_dir_all(&stage);
    let xlb = root().join("target/release/xlb");
    let bin = stage.join("usr/sbin/xlb");
    copy(&xlb, &bin)?;
    std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let dist = root().join("dist");
    copy(
        &dist.join("systemd/xlb@.service"),
        &stage.join("lib/systemd/system/xlb@.service"),
    )?;
    let doc = stage.join("usr/share/doc/xlb");
    copy(
        &dist.join("xlb.example.toml"),
        &doc.join("examples/xlb.toml"),
    )?;
    copy(
        &dist.join("grafana/xlb.json"),
        &doc.join("grafana/xlb.json"),
    )?;
    copy(&root().join("README.md"), &doc.join("README.md"))?;
    write(
        &doc.join("copyright"),
        b"Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
          Upstream-Name: xlb\n\nFiles: *\nCopyright: the xlb developers\nLicense: MIT or \
          Apache-2.0\n",
    )?;
    let man = stage.join("usr/share/man/man1");
    std::fs::create_dir_all(&man)?;
    run(Command::new(&xlb).args(["man", "--out-dir"]).arg(&man))?;
    // Debian compresses man pages (reproducibly: -n, no name or time stamp).
    run(Command::new("sh")
        .arg("-c")
        .arg(format!("gzip -9n {}/*.1", man.display())))?;
    for (shell, path) in [
        ("bash", "usr/share/bash-completion/completions/xlb"),
        ("zsh", "usr/share/zsh/vendor-completions/_xlb"),
        ("fish", "usr/share/fish/vendor_completions.d/xlb.fish"),
    ] {
        let text = output(Command::new(&xlb).args(["completions", shell]))?;
        write(&stage.join(path), text.as_bytes())?;
    }
    let control = format!(
        "Package: xlb\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: xlb developers <xlb@localhost>\n\
         Depends: libc6\n\
         Recommends: iproute2\n\
         Section: net\n\
         Priority: optional\n\
         Homepage: https://github.com/xlb/xlb\n\
         Description: Layer-4 load balancer in XDP (LVS-DR and tunnel modes, Maglev)\n \
         xlb balances TCP and UDP virtual services over real servers at line rate\n \
         with an XDP program: a Maglev ring and a connection table, direct routing\n \
         or IPIP/GUE tunnels, health checks, flow sync between nodes, Prometheus\n \
         metrics. The daemon runs per interface (xlb@eth0.service).\n"
    );
    write(&stage.join("DEBIAN/control"), control.as_bytes())?;
    let deb = out_dir.join(format!("xlb_{version}_{arch}.deb"));
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "--build"])
        .arg(&stage)
        .arg(&deb))?;
    eprintln!("xtask: built {}", deb.display());
    Ok(deb)
}
