//! `cargo xtask setup | build | test | bench | demo`: everything a bare machine needs, idempotent.

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context, Result};

mod bench;
mod package;

const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_TARGET: &str = "bpfel-unknown-none";
/// Debian packages the tests and the lab use, by the command that proves each is installed.
/// nginx, dnsmasq and keepalived are the real servers the health tests check and the daemon
/// the keepalived import is checked against; none of their services is started. ping and
/// tcpdump: the ICMP namespace tests ping VIPs and watch what reaches a real. bird2 and exabgp:
/// the BGP speakers of the scale-out tests (keepalived does VRRP in the pair test). scapy: the
/// NAT packet tests check their rewritten checksums against it once.
const DEBIAN_PACKAGES: [(&str, &str); 13] = [
    ("ip", "iproute2"),
    ("ethtool", "ethtool"),
    ("pgrep", "procps"),
    ("ping", "iputils-ping"),
    ("tcpdump", "tcpdump"),
    ("openssl", "openssl"),
    ("nginx", "nginx"),
    ("dnsmasq", "dnsmasq-base"),
    ("keepalived", "keepalived"),
    ("bird", "bird2"),
    ("exabgp", "exabgp"),
    ("systemd-analyze", "systemd"),
    ("scapy", "python3-scapy"),
];

const USAGE: &str = "usage: cargo xtask <command>

commands:
  setup   install what a bare machine lacks (rust-src, bpf-linker, Debian packages)
  build   setup, build the XDP objects into target/bpf/ (xlb, xlb-aux, xlb-bench), then the
          binaries (xlb; xlb-lab and xlb-bench from the lb-lab crate)
  test    build, then lint and run every test (needs root for the kernel tests)
  bench   build, then measure ns/packet with BPF_PROG_TEST_RUN (needs root);
          arguments after `bench` go to xlb-bench (e.g. --json, --runs 5, --check);
          `--baseline REV` builds REV in target/baseline and prints both, run alternately
  package build, then the Debian package target/debian/xlb_<version>_<arch>.deb (dpkg-deb)
  demo    build, then run the namespace lab demo (needs root): a client, the xlb host and
          three reals; VIP and reals added with the CLI, HTTP spread shown, a real removed
          live; arguments after `demo` go to `xlb-lab demo` (e.g. --verbose, --mode tunnel)";

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup(),
        Some("build") => build(),
        Some("test") => test(&args[1..]),
        Some("bench") => bench(&args[1..]),
        Some("demo") => demo(&args[1..]),
        Some("package") => build().and_then(|()| package::package().map(|_| ())),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

fn tools_dir() -> PathBuf {
    root().join("target/tools")
}

/// The XDP objects (binaries of lb-ebpf), copied to `target/bpf/<name>.bpf.o` where
/// `lb-userspace/build.rs` (xlb, xlb-aux) and `lb-lab/build.rs` (xlb-bench) embed them.
const BPF_OBJECTS: [&str; 4] = ["xlb", "xlb-aux", "xlb-decap", "xlb-bench"];

/// A command with the outer cargo's toolchain choice removed, so `+nightly` really selects
/// nightly (cargo sets RUSTC, RUSTUP_TOOLCHAIN etc. for the xtask process).
fn clean_cmd(program: &str) -> Command {
    let mut cmd = Command::new(program);
    for (k, _) in env::vars() {
        if k == "RUSTC"
            || k == "RUSTDOC"
            || k == "RUSTUP_TOOLCHAIN"
            || k == "RUSTC_WRAPPER"
            || k == "RUSTC_WORKSPACE_WRAPPER"
            || (k.starts_with("CARGO") && k != "CARGO_HOME" && k != "CARGO_TARGET_DIR")
        {
            cmd.env_remove(k);
        }
    }
    cmd.current_dir(root());
    cmd
}

fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("starting {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program} >/dev/null 2>&1")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn setup() -> Result<()> {
    let sysroot = output(clean_cmd("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("the nightly toolchain is needed to build the XDP program")?;
    let sysroot = PathBuf::from(sysroot.trim());

    if !sysroot.join("lib/rustlib/src/rust/library/core").exists() {
        eprintln!("xtask: installing rust-src for nightly (needed by -Z build-std=core)");
        run(clean_cmd("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }

    let linker = tools_dir().join("bin/bpf-linker");
    let linker_ok = linker.exists()
        && output(Command::new(&linker).arg("--version"))
            .map(|v| v.contains(BPF_LINKER_VERSION))
            .unwrap_or(false);
    if !linker_ok {
        install_bpf_linker(&sysroot)?;
    }

    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .filter(|(cmd, _)| !have(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    if !missing.is_empty() {
        eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        // Packages with a service (nginx, keepalived) must not start it on this host: a
        // policy-rc.d that says no (Debian's way) while they install.
        let policy = Path::new("/usr/sbin/policy-rc.d");
        let ours = !policy.exists();
        if ours {
            std::fs::write(
                policy,
                "#!/bin/sh\n# xtask: no service starts while packages install\nexit 101\n",
            )
            .context("writing /usr/sbin/policy-rc.d")?;
            std::fs::set_permissions(policy, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        }
        let installed = run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"));
        if ours {
            let _ = std::fs::remove_file(policy);
        }
        installed?;
    }
    Ok(())
}

/// bpf-linker is not prebuilt anywhere reachable: build it against the nightly toolchain's own
/// libLLVM (no system LLVM of that version exists); docs/build.md says why.
fn install_bpf_linker(sysroot: &Path) -> Result<()> {
    let version = output(clean_cmd("rustc").args(["+nightly", "-vV"]))?;
    let llvm_major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc +nightly -vV does not name its LLVM version")?
        .to_string();
    let lib = sysroot.join("lib");
    let llvm_so = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    let prefix = root().join("target/llvm-prefix");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    for name in ["libLLVM.so", llvm_so.as_str()] {
        let link = prefix_lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(lib.join(&llvm_so), &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM {llvm_major} ({llvm_so})"
    );
    run(clean_cmd("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            &format!("llvm-{llvm_major}"),
            "--root",
        ])
        .arg(tools_dir())
        .env("LLVM_PREFIX", &prefix))
}

/// `cargo +nightly <verb> --release --package lb-ebpf --target bpfel-unknown-none -Z
/// build-std=core`, with bpf-linker on PATH.
fn ebpf_cargo(verb: &str) -> Command {
    let path = format!(
        "{}:{}",
        tools_dir().join("bin").display(),
        env::var("PATH").unwrap_or_default()
    );
    let mut cmd = clean_cmd("cargo");
    cmd.args([
        "+nightly",
        verb,
        "--release",
        "--package",
        "lb-ebpf",
        "--target",
        BPF_TARGET,
        "-Z",
        "build-std=core",
    ])
    .env("PATH", path);
    cmd
}

fn build_ebpf() -> Result<()> {
    run(&mut ebpf_cargo("build"))?;
    for name in BPF_OBJECTS {
        let built = root().join(format!("target/{BPF_TARGET}/release/{name}"));
        let dest = root().join(format!("target/bpf/{name}.bpf.o"));
        std::fs::create_dir_all(dest.parent().context("object path has a parent")?)?;
        // Copy only when changed, so the build scripts do not rebuild for nothing.
        let new = std::fs::read(&built).with_context(|| format!("reading {}", built.display()))?;
        if std::fs::read(&dest).ok().as_deref() != Some(&new[..]) {
            std::fs::write(&dest, &new).with_context(|| format!("writing {}", dest.display()))?;
        }
    }
    Ok(())
}

fn build() -> Result<()> {
    setup()?;
    build_ebpf()?;
    run(clean_cmd("cargo").args([
        "build",
        "--release",
        "--package",
        "lb-userspace",
        "--package",
        "lb-lab",
        "--bins",
    ]))
}

/// The `xlb` an operator installs carries no test or bench tooling: none of the names only
/// the lab, the packet builder or the bench wrapper use may appear in it.
fn check_release_binary() -> Result<()> {
    let path = root().join("target/release/xlb");
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    for name in [
        "xlb_bench",
        "BENCH_FRAME",
        "BENCH_PROGS",
        "BENCH_SINK",
        "xlb-lab",
        "lb_lab",
    ] {
        let found = bytes.windows(name.len()).any(|w| w == name.as_bytes());
        if found {
            bail!(
                "{} contains {name:?}: test or bench code reached the binary",
                path.display()
            );
        }
    }
    Ok(())
}

fn test(extra: &[String]) -> Result<()> {
    build()?;
    check_release_binary()?;
    // The package test checks the .deb of this build.
    package::package()?;
    run(clean_cmd("cargo").args(["+nightly", "fmt", "--all", "--check"]))
        .context("formatting differs: run `cargo fmt --all`")?;
    run(clean_cmd("cargo").args([
        "clippy",
        "--release",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // lb-ebpf is outside default-members (it only builds for BPF): linted on its own target.
    run(ebpf_cargo("clippy").args(["--", "-D", "warnings"]))?;
    // Kernel tests load programs and create namespaces: run them one at a time.
    run(clean_cmd("cargo")
        .args(["test", "--release", "--workspace", "--exclude", "lb-ebpf"])
        .args(extra)
        .args(["--", "--test-threads=1"]))
}

fn bench(extra: &[String]) -> Result<()> {
    build()?;
    // `cargo xtask bench -- --json` and `cargo xtask bench --json` mean the same.
    let extra = extra.strip_prefix(&["--".to_string()]).unwrap_or(extra);
    if let Some(at) = extra.iter().position(|a| a == "--baseline") {
        let rev = extra
            .get(at + 1)
            .context("--baseline needs a revision (a commit, tag or branch)")?;
        let rest: Vec<String> = extra[..at]
            .iter()
            .chain(&extra[at + 2..])
            .cloned()
            .collect();
        return bench::compare(rev, &rest);
    }
    run(clean_cmd(
        root()
            .join("target/release/xlb-bench")
            .to_str()
            .context("non-UTF-8 path")?,
    )
    .args(extra))
}

fn demo(extra: &[String]) -> Result<()> {
    use std::os::unix::process::CommandExt;
    build()?;
    // Replace this process: a Ctrl-C then reaches only xlb-lab, which tears its lab down
    // before exiting, and the shell waits for that.
    let lab = root().join("target/release/xlb-lab");
    let err = clean_cmd(lab.to_str().context("non-UTF-8 path")?)
        .arg("demo")
        .args(extra)
        .exec();
    Err(err).with_context(|| format!("starting {}", lab.display()))
}
