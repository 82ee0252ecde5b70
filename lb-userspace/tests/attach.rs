//! Attaching the balancer to a real interface (a veth pair in a namespace of its own).

mod common;

use std::process::Command;

use lb_userspace::{
    dataplane::Limits,
    ebpf::{AttachMode, EbpfDataplane, LoadOptions},
};

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A namespace with a veth pair, removed on drop (also when the test panics).
struct Netns(String);

impl Netns {
    fn new() -> Netns {
        let name = format!("xlbt-attach-{}", std::process::id());
        sh(&["ip", "netns", "add", &name]);
        let ns = Netns(name);
        ns.exec(&[
            "ip", "link", "add", "va", "type", "veth", "peer", "name", "vb",
        ]);
        ns.exec(&["ip", "link", "set", "va", "up"]);
        ns.exec(&["ip", "link", "set", "vb", "up"]);
        ns
    }

    fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.0];
        full.extend_from_slice(args);
        sh(&full)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Enter the namespace for this thread (the test harness runs each test on its own thread).
fn enter(ns: &Netns) {
    let f = std::fs::File::open(format!("/var/run/netns/{}", ns.0)).expect("netns file");
    use std::os::fd::AsRawFd;
    // SAFETY: setns on a valid namespace fd for the calling thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

#[test]
fn attaches_natively_to_veth_and_detaches_on_drop() {
    if !common::bpf_available("attach") {
        return;
    }
    let ns = Netns::new();
    let opts = LoadOptions {
        limits: Limits {
            max_vips: 2,
            max_reals: 8,
            ring_size: 13,
        },
        conntrack_size: 1024,
        ..LoadOptions::default()
    };
    let handle = std::thread::spawn({
        let name = ns.0.clone();
        move || {
            enter(&Netns(name.clone()));
            let mut dp = EbpfDataplane::load(&opts).expect("load");
            let mode = dp.attach("va", AttachMode::Auto).expect("attach");
            let shown = sh(&["ip", "link", "show", "va"]);
            let err = dp.attach("no-such-if0", AttachMode::Native).unwrap_err();
            drop(dp);
            let after = sh(&["ip", "link", "show", "va"]);
            // Keep the Netns guard in the outer scope: forget this copy.
            std::mem::forget(Netns(name));
            (format!("{mode:?}"), shown, err.to_string(), after)
        }
    });
    let (mode, shown, err, after) = handle.join().expect("attach thread");
    assert_eq!(mode, "Driver", "veth supports native XDP");
    assert!(shown.contains("xdp"), "no XDP program on va: {shown}");
    assert!(
        err.contains("no-such-if0"),
        "error names the interface: {err}"
    );
    assert!(
        !after.contains("prog/xdp"),
        "program left attached: {after}"
    );
    drop(ns);
}

#[test]
fn kernel_hz_is_a_linux_hz_and_matches_the_config() {
    if !common::bpf_available("kernel_hz") {
        return;
    }
    let hz = lb_userspace::ebpf::kernel_hz().expect("measuring HZ");
    assert!([100, 250, 300, 1000].contains(&hz), "HZ {hz}");
    // Where the kernel config is readable, it must agree.
    if let Ok(out) = Command::new("sh")
        .args([
            "-c",
            "zcat /proc/config.gz 2>/dev/null | grep '^CONFIG_HZ='",
        ])
        .output()
    {
        let text = String::from_utf8_lossy(&out.stdout);
        if let Some(v) = text.trim().strip_prefix("CONFIG_HZ=") {
            assert_eq!(
                v.parse::<u64>().ok(),
                Some(hz),
                "CONFIG_HZ={v}, measured {hz}"
            );
        }
    }
}
