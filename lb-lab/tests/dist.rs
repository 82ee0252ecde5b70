//! What ships besides the binary: the systemd unit passes `systemd-analyze verify` (offline,
//! with `--root` on a tree holding the unit, the binary, its man pages and systemd's targets:
//! PID 1 is not systemd here), and a unit that names a missing binary does not (so the check
//! can fail).

mod common;

#[path = "common/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use common::Removed;
use harness::release_bin;

const UNIT: &str = include_str!("../../dist/systemd/xlb@.service");

/// A root tree for `systemd-analyze verify --root`, removed on drop.
fn tree(name: &str, unit: &str) -> Removed {
    let root = std::env::temp_dir().join(format!("xlb-unit-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let dir = |p: &str| {
        let d = root.join(p);
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    };
    std::fs::write(dir("etc/systemd/system").join("xlb@.service"), unit).expect("unit");
    std::fs::copy(release_bin("xlb"), dir("usr/sbin").join("xlb")).expect("binary");
    std::fs::copy("/bin/kill", dir("bin").join("kill")).expect("kill");
    let targets = dir("lib/systemd/system");
    for entry in std::fs::read_dir("/lib/systemd/system").expect("systemd's units") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "target") {
            std::fs::copy(&path, targets.join(path.file_name().expect("name"))).expect("target");
        }
    }
    let man = dir("usr/share/man/man1");
    let out = Command::new(release_bin("xlb"))
        .args(["man", "--out-dir"])
        .arg(&man)
        .output()
        .expect("xlb man");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Removed(root)
}

fn verify(root: &Path) -> (bool, String) {
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .arg(root.join("etc/systemd/system/xlb@eth0.service"))
        // `Documentation=man:` is checked with man(1): against the tree's pages.
        .env("MANPATH", root.join("usr/share/man"))
        .output()
        .expect("systemd-analyze (Debian's systemd package)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && text.trim().is_empty(), text)
}

#[test]
fn the_unit_verifies_and_says_what_operators_expect() {
    for line in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=CAP_BPF ",
        "--socket /run/xlb/%i.sock",
        "--config /etc/xlb/%i.toml",
    ] {
        assert!(UNIT.contains(line), "the unit lacks {line:?}");
    }
    let t = tree("good", UNIT);
    let (ok, text) = verify(&t.0);
    assert!(ok, "systemd-analyze verify: {text}");
    let broken = UNIT.replace("/usr/sbin/xlb daemon", "/usr/sbin/xlb-missing daemon");
    let t = tree("broken", &broken);
    let (ok, text) = verify(&t.0);
    assert!(!ok, "a unit with a missing binary verified: {text}");
}

/// The package `cargo xtask package` built (`cargo xtask test` builds it first).
fn the_deb() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debian");
    let found = std::fs::read_dir(&dir).ok().and_then(|d| {
        d.filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
    });
    if found.is_none() {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "no .deb in {}: `cargo xtask test` builds it (cargo xtask package)",
            dir.display()
        );
        eprintln!("SKIPPED: no package; run `cargo xtask package`");
    }
    found
}

#[test]
fn the_debian_package_holds_what_it_should_and_its_binary_runs() {
    let Some(deb) = the_deb() else {
        return;
    };
    let name = deb
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    let version = env!("CARGO_PKG_VERSION");
    assert!(name.starts_with(&format!("xlb_{version}_")), "{name}");
    let contents = Command::new("dpkg-deb")
        .arg("--contents")
        .arg(&deb)
        .output()
        .expect("dpkg-deb");
    let listing = String::from_utf8_lossy(&contents.stdout);
    for path in [
        "./usr/sbin/xlb",
        "./lib/systemd/system/xlb@.service",
        "./usr/share/man/man1/xlb.1.gz",
        "./usr/share/man/man1/xlb-daemon.1.gz",
        "./usr/share/bash-completion/completions/xlb",
        "./usr/share/zsh/vendor-completions/_xlb",
        "./usr/share/fish/vendor_completions.d/xlb.fish",
        "./usr/share/doc/xlb/examples/xlb.toml",
        "./usr/share/doc/xlb/copyright",
        "./usr/share/doc/xlb/grafana/xlb.json",
    ] {
        assert!(
            listing.lines().any(|l| l.ends_with(path)),
            "{path} is not in {name}:\n{listing}"
        );
    }
    assert!(
        listing
            .lines()
            .filter(|l| l.ends_with("./usr/sbin/xlb"))
            .all(|l| l.starts_with("-rwxr-xr-x root/root")),
        "{listing}"
    );
    let field = |f: &str| {
        let out = Command::new("dpkg-deb")
            .args(["--field"])
            .arg(&deb)
            .arg(f)
            .output()
            .expect("dpkg-deb --field");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(field("Package"), "xlb");
    assert_eq!(field("Version"), version);
    let dir = std::env::temp_dir().join(format!("xlb-deb-{}", std::process::id()));
    let _tree = Removed(dir.clone());
    let x = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&dir)
        .status()
        .expect("dpkg-deb -x");
    assert!(x.success());
    let unit = std::fs::read_to_string(dir.join("lib/systemd/system/xlb@.service")).expect("unit");
    assert_eq!(unit, UNIT, "the packaged unit is dist/systemd/xlb@.service");
    let out = Command::new(dir.join("usr/sbin/xlb"))
        .arg("--version")
        .output()
        .expect("the packaged xlb runs");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("xlb {version}")
    );
}
