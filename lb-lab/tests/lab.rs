//! The namespace lab itself (no daemon): the client reaches every real's own address over
//! HTTP and UDP through the bridge, IPv4 and IPv6, and teardown leaves nothing behind.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Instant,
};

mod common;

use lb_lab::lab::{self, Lab, LabConfig, Spread};

#[test]
fn lab_reaches_every_real_and_tears_down_cleanly() {
    if !common::bpf_available("lab") {
        return;
    }
    let started = Instant::now();
    let mut lab = Lab::new(LabConfig {
        reals: 3,
        lab_bin: Some(PathBuf::from(env!("CARGO_BIN_EXE_xlb-lab"))),
        ..LabConfig::default()
    })
    .expect("building the lab");
    let prefix = lab.prefix.clone();
    let made = lab.namespaces();
    assert_eq!(made.len(), 6, "sw, client, lb, r1..r3: {made:?}");
    assert!(made.iter().all(|n| n.starts_with(&prefix)));
    let listed = lab::list_netns().expect("ip netns list");
    for n in &made {
        assert!(listed.contains(n), "{n} is not listed: {listed:?}");
    }

    // The pass program sits on the lb's bridge port.
    let port = lab
        .exec(&lab.sw, &["ip", "link", "show", &lab.lb.port])
        .expect("ip link show");
    assert!(
        port.contains("xdp"),
        "no XDP program on {}: {port}",
        lab.lb.port
    );

    let client = lab.client.ns.clone();
    for r in lab.reals.clone() {
        for addr in [IpAddr::V4(r.ipv4), IpAddr::V6(r.ipv6)] {
            let replies = lab.http(&client, &lab.url(addr), 3).expect("request");
            let spread = Spread::of(&replies);
            assert_eq!(spread.count(&r.role), 3, "HTTP to {addr}: {replies:?}");
            let replies = lab
                .udp(&client, SocketAddr::new(addr, lab.udp_port), 3)
                .expect("request");
            assert_eq!(
                Spread::of(&replies).count(&r.role),
                3,
                "UDP to {addr}: {replies:?}"
            );
        }
        // Reals hold the VIPs on lo but do not answer ARP for them.
        let lo = lab
            .exec(&r.ns, &["ip", "addr", "show", "dev", "lo"])
            .unwrap();
        assert!(lo.contains("10.222.1.100/32"), "{lo}");
        assert!(lo.contains("fd00:222:1::100/128"), "{lo}");
        let ignore = lab
            .exec(&r.ns, &["cat", "/proc/sys/net/ipv4/conf/all/arp_ignore"])
            .unwrap();
        assert_eq!(ignore.trim(), "1");
    }

    // A long-lived connection answers every request on one socket.
    let r1 = lab.reals[0].clone();
    let replies = lab
        .request(
            &client,
            &[
                "--url",
                &lab.url(IpAddr::V4(r1.ipv4)),
                "--count",
                "5",
                "--keepalive",
            ],
        )
        .expect("request");
    assert_eq!(Spread::of(&replies).count("r1"), 5, "{replies:?}");

    // The client routes the VIP via the lb, which does not hold it: without a balancer the
    // request fails (and says why) instead of reaching a real by some other path.
    let route = lab
        .exec(&client, &["ip", "route", "get", "10.222.1.100"])
        .unwrap();
    assert!(route.contains("via 10.222.0.3"), "{route}");
    let replies = lab
        .http(&client, &lab.url(IpAddr::V4(lab::VIP4)), 1)
        .expect("request");
    assert!(
        matches!(&replies[..], [Err(reason)] if reason.contains("connect")),
        "{replies:?}"
    );

    lab.teardown().expect("teardown");
    let left: Vec<String> = lab::list_netns()
        .expect("ip netns list")
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
    assert!(!lab.dir.exists(), "{} left", lab.dir.display());
    eprintln!("lab test: {:.2} s", started.elapsed().as_secs_f64());
}
