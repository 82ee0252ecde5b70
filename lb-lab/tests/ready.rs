//! Readiness end to end, with the real daemon and CLI: `xlb ready` without VIPs, with a VIP
//! whose reals are missing, with working reals (JSON too), for an unknown VIP; `xlb
//! maintenance on|off` (draining while traffic still flows, kept in a file across restarts);
//! `--withdraw-on-stop`: not ready from SIGTERM until the daemon stops. Needs root.

mod common;

#[path = "common/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use harness::*;
use lb_lab::lab;

fn ready_json(e: &E2e, args: &[&str]) -> (bool, serde_json::Value) {
    let mut all = vec!["ready", "--json"];
    all.extend_from_slice(args);
    let out = e.lab.xlb(&all).expect("xlb ready");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|err| panic!("{err}: {}", String::from_utf8_lossy(&out.stdout)));
    (out.status.success(), v)
}

#[test]
fn ready_follows_the_vips_maintenance_and_a_withdrawing_stop() {
    let cfg = lab::LabConfig {
        reals: 2,
        vips: vec![IpAddr::V4(lab::VIP4)],
        ..lab::LabConfig::default()
    };
    let Some(mut e) = E2e::start_with("ready", cfg, &["--withdraw-on-stop", "3"]) else {
        return;
    };
    let (code, err) = e.xlb_fails(&["ready"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no VIP is configured"), "{err}");
    e.step("no VIP: not ready (exit 1)");

    e.xlb_ok(&["vip", "add", TCP4]);
    let (code, err) = e.xlb_fails(&["ready", TCP4]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("down") && err.contains("no usable real"),
        "{err}"
    );
    e.step("a VIP without reals: down");

    for r in e.lab.reals.clone() {
        e.xlb_ok(&["real", "add", TCP4, &r.ipv4.to_string()]);
    }
    e.wait_active(TCP4, 2);
    e.xlb_ok(&["ready"]);
    e.xlb_ok(&["ready", TCP4]);
    let (ok, v) = ready_json(&e, &[TCP4]);
    assert!(ok, "{v:#}");
    assert_eq!(v["ready"], true, "{v:#}");
    assert_eq!(v["vips"][0]["vip"], TCP4, "{v:#}");
    assert_eq!(v["vips"][0]["state"], "ready", "{v:#}");
    // The self-tests neither count nor track.
    let before = e.vip_packets(TCP4);
    for _ in 0..5 {
        e.xlb_ok(&["ready"]);
    }
    assert_eq!(e.vip_packets(TCP4), before, "self-tests were counted");
    e.step("reals up: ready, self-tests uncounted");

    let (code, err) = e.xlb_fails(&["ready", "tcp/10.9.9.9:80"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("does not exist"), "{err}");

    e.xlb_ok(&["maintenance", "on"]);
    let (ok, v) = ready_json(&e, &[]);
    assert!(!ok, "{v:#}");
    assert_eq!(v["vips"][0]["state"], "draining", "{v:#}");
    assert_eq!(v["vips"][0]["reason"], "maintenance", "{v:#}");
    let replies = e.http(&e.url4(), 10);
    assert!(replies.iter().all(|r| r.is_ok()), "{}", summary(&replies));
    let marker = e.lab.dir.join("state.json.maintenance");
    assert!(marker.exists(), "{}", marker.display());
    e.step("maintenance on: draining, still forwarding, kept in a file");

    // A restart keeps it.
    let status = e.lab.stop_daemon(libc::SIGKILL).expect("kill");
    assert!(!status.success());
    let xlb = e.xlb.clone();
    e.lab
        .start_daemon(&xlb, &["--withdraw-on-stop", "3"])
        .expect("restart");
    let (code, err) = e.xlb_fails(&["ready"]);
    assert!(code == 1 && err.contains("maintenance"), "{code}: {err}");
    e.xlb_ok(&["maintenance", "off"]);
    assert!(!marker.exists());
    e.xlb_ok(&["ready"]);
    e.step("restarted in maintenance; off: ready again");

    let pid = e.lab.daemon().expect("daemon").id();
    let sent = Instant::now();
    // SAFETY: the pid is the lab's unreaped child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    std::thread::sleep(Duration::from_millis(300));
    let (code, err) = e.xlb_fails(&["ready"]);
    assert!(code == 1 && err.contains("stopping"), "{code}: {err}");
    let replies = e.http(&e.url4(), 5);
    assert!(replies.iter().all(|r| r.is_ok()), "{}", summary(&replies));
    let child = e.lab.daemon().expect("daemon");
    let status = wait_exit(child, "the daemon", Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    let took = sent.elapsed();
    assert!(took >= Duration::from_secs(3), "stopped after {took:?}");
    e.step(&format!("SIGTERM: not ready, stopped after {took:?}"));
}
