//! NAT mode end to end, two-arm: the balancer runs on two interfaces (`--iface eth0 --iface
//! eth1`), eth0 towards the router and the client (10.224.0.2, a subnet of its own), eth1 on
//! the reals' private segment (10.223.0.0/24); the reals hold no VIP, serve on ports 8080 and
//! 5353 behind VIP ports 80 and 53, and their default route is the balancer's eth1. Packets
//! to the VIP come in by eth0 and leave by eth1 (the route to the reals); replies come in by
//! eth1, are rewritten to the VIP there and leave by eth0 (the route to the client). Real HTTP
//! and UDP clients over IPv4 and IPv6 (connected sockets: answers only from the VIP), a 1 MB
//! upload and download, a real's "port unreachable" reaching the client's UDP socket as the
//! VIP's (translated ICMP: the socket sees "connection refused"), a restart that replaces the
//! program on both pinned links, `xlb down` detaching both, and the same service with the
//! interfaces named the other way round. Needs root; skipped otherwise.

mod common;

#[path = "common/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::time::{Duration, Instant};

use harness::*;
use lb_lab::lab::{self, LabConfig, Spread};

fn two_arm_lab(test: &'static str) -> Option<E2e> {
    let cfg = LabConfig {
        reals: 3,
        // The reals hold no VIP: NAT sends them packets to their own addresses.
        vips: Vec::new(),
        tcp_port: 8080,
        udp_port: 5353,
        routed: true,
        lb_on_reals: true,
        ..LabConfig::default()
    };
    let e = E2e::start_with(test, cfg, &["--iface", "eth1", "--mode", "nat"])?;
    let run = |ns: &str, args: &[&str]| {
        e.lab
            .exec(ns, args)
            .unwrap_or_else(|err| panic!("{args:?} in {ns}: {err:#}"));
    };
    // The router sends the VIPs to the balancer's eth0.
    let router = e.lab.router.clone().expect("a routed lab has a router");
    let (lb4, lb6) = (e.lab.lb.ipv4.to_string(), e.lab.lb.ipv6.to_string());
    run(
        &router.ns,
        &[
            "ip",
            "route",
            "add",
            &format!("{}/32", lab::VIP4),
            "via",
            &lb4,
        ],
    );
    run(
        &router.ns,
        &[
            "ip",
            "-6",
            "route",
            "add",
            &format!("{}/128", lab::VIP6),
            "via",
            &lb6,
        ],
    );
    // The reals' default route: the balancer's leg on their segment, as ipvsadm -m requires.
    for r in e.lab.reals.clone() {
        run(
            &r.ns,
            &["ip", "route", "replace", "default", "via", "10.223.0.3"],
        );
        run(
            &r.ns,
            &[
                "ip",
                "-6",
                "route",
                "replace",
                "default",
                "via",
                "fd00:223::3",
            ],
        );
    }
    Some(e)
}

/// `ip -d link show` of the balancer's `dev`.
fn link(e: &E2e, dev: &str) -> String {
    let lb = e.lab.lb.ns.clone();
    e.lab
        .exec(&lb, &["ip", "-d", "link", "show", "dev", dev])
        .unwrap_or_else(|err| panic!("ip link show {dev}: {err:#}"))
}

#[test]
fn nat_two_arm_serves_from_the_vip_across_both_interfaces() {
    let Some(mut e) = two_arm_lab("nat_two_arm") else {
        return;
    };
    for dev in ["eth0", "eth1"] {
        assert!(link(&e, dev).contains("xdp"), "no XDP program on {dev}");
    }
    let (tcp4, udp4) = (
        format!("tcp/{}:80", lab::VIP4),
        format!("udp/{}:53", lab::VIP4),
    );
    let tcp6 = format!("tcp/[{}]:80", lab::VIP6);
    // No `--mode` on the VIPs: the daemon's `--mode nat` makes them NAT VIPs.
    e.add_vip_with(&tcp4, &[], Some(8080), false);
    e.add_vip_with(&udp4, &[], Some(5353), false);
    e.add_vip_with(&tcp6, &[], Some(8080), true);
    let url4 = format!("http://{}:80/", lab::VIP4);
    let url6 = format!("http://[{}]:80/", lab::VIP6);

    e.step("HTTP and UDP through the VIPs, in by eth0 and out by eth1, answered from the VIP");
    let replies = e.http(&url4, 150);
    e.assert_spread("IPv4 HTTP", &replies, 15.0, 55.0);
    let replies = e.http(&url6, 120);
    e.assert_spread("IPv6 HTTP", &replies, 10.0, 60.0);
    let udp = |e: &E2e, count: usize| {
        let replies = e
            .lab
            .udp(&e.client_ns(), (lab::VIP4, 53).into(), count)
            .unwrap_or_else(|err| panic!("UDP: {err:#}"));
        Spread::of(&replies)
    };
    let spread = udp(&e, 30);
    assert!(spread.failures.is_empty(), "UDP: {spread:?}");
    assert_eq!(spread.counts.len(), 3, "UDP reaches every real: {spread:?}");
    // The replies crossed from eth1 to eth0 in XDP (or by the host, for the first ones
    // whose next hop the kernel had not resolved yet).
    assert!(
        e.global_counter("nat_reply") > 0,
        "no reply was routed by XDP"
    );

    e.step("1 MB up and 1 MB down, whole");
    e.megabyte_both_ways(&url4);

    e.step("a real's port unreachable reaches the client as the VIP's: connection refused");
    e.lab.stop_server("r1").expect("stop r1");
    // Every datagram gets its error (Linux sends a peer about one a second after a burst of 6).
    let r1 = e.real("r1");
    e.lab
        .exec(&r1.ns, &["sysctl", "-qw", "net.ipv4.icmp_ratelimit=0"])
        .expect("sysctl");
    let before = e.global_counter("nat_icmp_reply");
    let spread = udp(&e, 30);
    let refused = spread
        .failures
        .iter()
        .filter(|f| f.contains("refused"))
        .count();
    // Untranslated, the error would name the real's address and port, which the client's
    // socket (connected to the VIP) does not know: it would wait for its timeout instead.
    assert!(
        refused > 0 && refused == spread.failures.len() && spread.count("r1") == 0,
        "r1's datagrams should be refused, nothing else fail: {spread:?}"
    );
    assert!(
        e.global_counter("nat_icmp_reply") >= before + refused as u64,
        "the errors were translated by XDP"
    );
    e.lab.start_server("r1").expect("start r1");

    e.step("a restart replaces the program on both pinned links; traffic goes on");
    e.lab.stop_daemon(libc::SIGTERM).expect("stop the daemon");
    let spread = udp(&e, 20);
    assert!(
        spread.failures.is_empty(),
        "UDP without a daemon: {spread:?}"
    );
    let log_len = e.daemon_log().len();
    e.lab
        .start_daemon(&e.xlb, &["--iface", "eth1", "--mode", "nat"])
        .unwrap_or_else(|err| panic!("restarting the daemon: {err:#}"));
    let log = e.daemon_log();
    let restart = &log[log_len..];
    for dev in ["eth0", "eth1"] {
        assert!(
            restart.contains(&format!(
                "XDP program on {dev} (native, replaced on the pinned link)"
            )),
            "{dev} not replaced on its link:\n{restart}"
        );
    }
    let replies = e.http(&url4, 120);
    e.assert_spread("IPv4 HTTP after the restart", &replies, 10.0, 60.0);

    e.step("xlb down detaches both interfaces");
    e.xlb_ok(&["down"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    for dev in ["eth0", "eth1"] {
        loop {
            let l = link(&e, dev);
            if !l.contains("xdp") {
                break;
            }
            assert!(Instant::now() < deadline, "{dev} still runs XDP:\n{l}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let pins = e.lab.pin_root().join("eth0");
    assert!(!pins.exists(), "{} left behind", pins.display());

    e.step("the reals' interface first (--iface eth1 --iface eth0): the same service");
    // Reaped (it stops on its own after `down`).
    let _ = e.lab.stop_daemon(libc::SIGTERM);
    // The first interface names the state file: this is another daemon's configuration.
    let _ = std::fs::remove_file(e.lab.state_file());
    e.lab.lb.iface = "eth1".to_string();
    let hello = e
        .lab
        .start_daemon(&e.xlb, &["--iface", "eth0", "--mode", "nat"])
        .unwrap_or_else(|err| panic!("starting with eth1 first: {err:#}"));
    assert_eq!(hello.ifaces, ["eth1", "eth0"], "{hello:?}");
    e.add_vip_with(&tcp4, &[], Some(8080), false);
    // VIP packets now come in by the second interface and leave by the first.
    let replies = e.http(&url4, 120);
    e.assert_spread("IPv4 HTTP, eth1 first", &replies, 10.0, 60.0);
    e.xlb_ok(&["down"]);
}
