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

use harness::release_bin;

const UNIT: &str = include_str!("../../dist/systemd/xlb@.service");

/// A root tree for `systemd-analyze verify --root`, removed on drop.
struct Tree(PathBuf);

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tree(name: &str, unit: &str) -> Tree {
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
    Tree(root)
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
