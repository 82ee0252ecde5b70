//! Tunnel mode end to end: a client on one subnet, the balancer (`xlb daemon --mode tunnel`)
//! on another, the reals behind a router on a third running `xlb decap`; real TCP and UDP
//! clients and servers over IPv4 and IPv6 VIPs, both mixed-family pairs, IPIP and GUE, and
//! a 1 MB upload arriving whole. Needs root; skipped otherwise.

mod common;

#[path = "common/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::net::IpAddr;

use harness::*;
use lb_lab::lab::{self, LabConfig, Spread};

const TCP6_VIP: &str = "tcp/[fd00:222:1::100]:80";

fn routed_lab(test: &'static str, daemon_args: &[&str]) -> Option<E2e> {
    let cfg = LabConfig {
        reals: 3,
        vips: vec![IpAddr::V4(lab::VIP4), IpAddr::V6(lab::VIP6)],
        routed: true,
        ..LabConfig::default()
    };
    let e = E2e::start_with(test, cfg, daemon_args)?;
    for r in e.lab.reals.clone() {
        let xlb = e.xlb.display().to_string();
        let out = e
            .lab
            .exec(&r.ns, &[&xlb, "decap", "--iface", &r.iface])
            .unwrap_or_else(|err| panic!("xlb decap on {}: {err:#}", r.role));
        assert!(out.starts_with("attached  program "), "{out}");
    }
    Some(e)
}

/// Each VIP gets one real of the other family: IPv4 VIP → r2's IPv6 address (4in6), IPv6
/// VIP → r2's IPv4 address (6in4); the others are of the VIP's family.
fn mixed_vips(e: &E2e) {
    for (vip, v6) in [(TCP4, false), (UDP4, false), (TCP6_VIP, true)] {
        e.xlb_ok(&["vip", "add", vip]);
        for r in &e.lab.reals {
            let other = r.role == "r2" && vip != UDP4;
            let addr = if v6 != other {
                r.ipv6.to_string()
            } else {
                r.ipv4.to_string()
            };
            e.xlb_ok(&["real", "add", vip, &addr]);
        }
        e.wait_active(vip, e.lab.reals.len());
    }
}

fn every_real_answers(e: &E2e, label: &str, replies: &[lab::Reply]) {
    assert!(
        replies.iter().all(|r| r.is_ok()),
        "{label}: {}",
        summary(replies)
    );
    let spread = Spread::of(replies);
    for r in ["r1", "r2", "r3"] {
        assert!(
            spread.count(r) > 0,
            "{label}: {r} answered nothing: {spread:?}"
        );
    }
    e.step(&format!(
        "{label}: {} replies from every real",
        replies.len()
    ));
}

fn upload(e: &E2e, url: &str) {
    let replies = e
        .lab
        .request(&e.client_ns(), &["--url", url, "--upload", "1048576"])
        .unwrap_or_else(|err| panic!("upload to {url}: {err:#}"));
    match replies.as_slice() {
        [Ok(answer)] => assert!(answer.ends_with(" 1048576"), "{url}: {answer}"),
        other => panic!("upload to {url}: {other:?}"),
    }
    e.step(&format!("1 MB uploaded whole to {url}"));
}

fn decapsulated(e: &E2e, role: &str) -> u64 {
    let r = e.real(role);
    let out = e
        .lab
        .exec(
            &r.ns,
            &[
                &e.xlb.display().to_string(),
                "decap",
                "--iface",
                &r.iface,
                "--status",
            ],
        )
        .expect("decap status");
    out.lines()
        .find_map(|l| l.trim().strip_prefix("decapsulated"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no decapsulated counter in {out}"))
}

fn tunnel_end_to_end(test: &'static str, encap: &str) {
    let Some(e) = routed_lab(test, &["--mode", "tunnel", "--encap", encap]) else {
        return;
    };
    e.step("reals behind the router, each running xlb decap");
    mixed_vips(&e);
    let list = e.list();
    for v in &list.vips {
        assert_eq!(v.mode, "tunnel", "{v:?}");
        assert!(v.reals.iter().all(|r| r.mode == "tunnel"), "{v:?}");
        // The next hop of every real is the router.
        let router = e.lab.router.as_ref().expect("router").mac.clone();
        assert!(
            v.reals
                .iter()
                .all(|r| r.mac.as_deref() == Some(router.as_str())),
            "{v:?}"
        );
    }
    let url6 = e.lab.url(IpAddr::V6(lab::VIP6));
    every_real_answers(&e, &format!("{encap} TCP/IPv4"), &e.http(&e.url4(), 40));
    every_real_answers(&e, &format!("{encap} TCP/IPv6"), &e.http(&url6, 40));
    let udp = e
        .lab
        .udp(
            &e.client_ns(),
            std::net::SocketAddr::new(IpAddr::V4(lab::VIP4), e.lab.udp_port),
            40,
        )
        .expect("udp");
    every_real_answers(&e, &format!("{encap} UDP/IPv4"), &udp);
    upload(&e, &e.url4());
    upload(&e, &url6);
    for r in ["r1", "r2", "r3"] {
        assert!(decapsulated(&e, r) > 0, "{r} decapsulated nothing");
    }
    // Nothing was too big for the tunnel, nor passed for want of a next hop.
    let stats: serde_json::Value =
        serde_json::from_str(&e.xlb_ok(&["stats", "--json"])).expect("stats JSON");
    for counter in ["drop_too_big", "pass_next_hop", "drop_no_tunnel_source"] {
        assert_eq!(stats["global"][counter], 0, "{counter}: {stats:#}");
    }
}

#[test]
fn ipip_carries_tcp_udp_and_both_mixed_pairs_to_reals_behind_a_router() {
    tunnel_end_to_end("tunnel_ipip", "ipip");
}

#[test]
fn gue_carries_tcp_udp_and_both_mixed_pairs_to_reals_behind_a_router() {
    tunnel_end_to_end("tunnel_gue", "gue");
}
