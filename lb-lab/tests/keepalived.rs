//! `xlb import-keepalived` against keepalived itself: every test file is a configuration the
//! real keepalived accepts (`keepalived --config-test`), and the `xlb` binary converts it to
//! the config the unit tests expect. keepalived comes from Debian's packages (`cargo xtask
//! test` installs it); without it the test is skipped, except under `CI=true`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../lb-userspace/src/core/config/keepalived/testdata")
}

fn have_keepalived() -> bool {
    let found = Command::new("keepalived").arg("--version").output().is_ok();
    if !found {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        assert!(
            !ci,
            "keepalived is not installed, and CI=true forbids skipping"
        );
        eprintln!("SKIPPED: keepalived is not installed");
    }
    found
}

#[test]
fn keepalived_accepts_every_test_file_and_xlb_converts_it() {
    if !have_keepalived() {
        return;
    }
    let xlb = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/xlb");
    assert!(
        xlb.is_file(),
        "build the binaries first (cargo xtask build)"
    );
    for name in ["dr-tcp", "http-urls", "misc-dynamic", "sorry-quorum"] {
        let conf = testdata().join(format!("{name}.conf"));
        let out = Command::new("keepalived")
            .arg("--config-test")
            .arg("-f")
            .arg(&conf)
            .output()
            .expect("keepalived --config-test");
        assert!(
            out.status.success(),
            "keepalived refuses {name}.conf ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let out = Command::new(&xlb)
            .arg("import-keepalived")
            .arg(&conf)
            .arg("--print")
            .output()
            .expect("xlb import-keepalived");
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let want = std::fs::read_to_string(testdata().join(format!("{name}.toml"))).expect("toml");
        assert_eq!(String::from_utf8_lossy(&out.stdout), want, "{name}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr
                .lines()
                .all(|l| l.starts_with("xlb: warning: ") || l.starts_with("xlb: note: ")),
            "{name}: {stderr}"
        );
    }
}

#[test]
fn a_refused_line_is_named_and_nothing_is_printed() {
    let dir = std::env::temp_dir().join(format!("xlb-keepalived-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let conf = dir.join("fullnat.conf");
    std::fs::write(
        &conf,
        "virtual_server 10.0.0.100 80 {\n    lb_kind FULLNAT\n    protocol TCP\n}\n",
    )
    .expect("write");
    let xlb = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/xlb");
    let out = Command::new(&xlb)
        .arg("import-keepalived")
        .arg(&conf)
        .arg("--print")
        .output()
        .expect("xlb");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("fullnat.conf:2: lb_kind FULLNAT: FULLNAT is not a forwarding method"),
        "{stderr}"
    );
}
