//! Tunnel mode end to end: a client on one subnet, the balancer (`xlb daemon --mode tunnel`)
//! on another, the reals behind a router on a third running `xlb decap`; real TCP and UDP
//! clients and servers over IPv4 and IPv6 VIPs, both mixed-family pairs, IPIP and GUE, a
//! 1 MB upload arriving whole (with a tunnel MTU that needs the balancer's "fragmentation
//! needed" / "packet too big" answers), pings to the VIPs; and in direct routing, an ICMP
//! error from the path reaching the flow's real. Needs root; skipped otherwise.

mod common;

#[path = "common/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::net::IpAddr;

use harness::*;
use lb_lab::{
    lab::{self, LabConfig, Spread},
    packet,
};

const TCP6_VIP: &str = "tcp/[fd00:222:1::100]:80";

fn routed_lab(test: &'static str, daemon_args: &[&str]) -> Option<E2e> {
    routed_lab_with(test, daemon_args, false)
}

/// The routed lab; `lb_on_reals` gives the lb a second interface on the reals' segment.
fn routed_lab_with(test: &'static str, daemon_args: &[&str], lb_on_reals: bool) -> Option<E2e> {
    let cfg = LabConfig {
        reals: 3,
        vips: vec![IpAddr::V4(lab::VIP4), IpAddr::V6(lab::VIP6)],
        routed: true,
        lb_on_reals,
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

/// 40 HTTP requests to each VIP and 40 UDP datagrams to the IPv4 one, answered by every real.
fn tcp_and_udp_reach_every_real(e: &E2e, label: &str) {
    let url6 = e.lab.url(IpAddr::V6(lab::VIP6));
    every_real_answers(e, &format!("{label} TCP/IPv4"), &e.http(&e.url4(), 40));
    every_real_answers(e, &format!("{label} TCP/IPv6"), &e.http(&url6, 40));
    let udp = e
        .lab
        .udp(
            &e.client_ns(),
            std::net::SocketAddr::new(IpAddr::V4(lab::VIP4), e.lab.udp_port),
            40,
        )
        .expect("udp");
    every_real_answers(e, &format!("{label} UDP/IPv4"), &udp);
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

fn tunnel_end_to_end(test: &'static str, encap: &str, mtu: Option<&str>) {
    let mut args = vec!["--mode", "tunnel", "--encap", encap];
    if let Some(m) = mtu {
        args.extend(["--tunnel-mtu", m]);
    }
    let Some(e) = routed_lab(test, &args) else {
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
    tcp_and_udp_reach_every_real(&e, encap);
    let url6 = e.lab.url(IpAddr::V6(lab::VIP6));
    upload(&e, &e.url4());
    upload(&e, &url6);
    for r in ["r1", "r2", "r3"] {
        assert!(decapsulated(&e, r) > 0, "{r} decapsulated nothing");
    }
    for (family, vip) in [("-4", lab::VIP4.to_string()), ("-6", lab::VIP6.to_string())] {
        e.lab
            .exec(
                &e.client_ns(),
                &["ping", family, "-c", "2", "-W", "2", &vip],
            )
            .unwrap_or_else(|err| panic!("ping {vip}: {err:#}"));
    }
    e.step("the VIPs answer pings");
    let stats: serde_json::Value =
        serde_json::from_str(&e.xlb_ok(&["stats", "--json"])).expect("stats JSON");
    let global = |c: &str| {
        stats["global"][c]
            .as_u64()
            .unwrap_or_else(|| panic!("{c}: {stats:#}"))
    };
    assert!(global("icmp_echo_reply") >= 4, "{stats:#}");
    // Nothing dropped for its size, nor passed for want of a next hop.
    for counter in ["drop_too_big", "pass_next_hop", "drop_no_tunnel_source"] {
        assert_eq!(global(counter), 0, "{counter}: {stats:#}");
    }
    // The uploads fitted only after the clients learnt the tunnel's MTU from the balancer.
    if mtu.is_some() {
        assert!(global("icmp_too_big_sent") > 0, "{stats:#}");
        e.step(&format!(
            "{} too-big answers sent",
            global("icmp_too_big_sent")
        ));
    } else {
        assert_eq!(global("icmp_too_big_sent"), 0, "{stats:#}");
    }
}

#[test]
fn ipip_carries_tcp_udp_and_both_mixed_pairs_and_answers_too_big_with_the_tunnel_mtu() {
    // The lb's link carries 1600 bytes, its tunnel 1500: full-size client packets do not fit
    // once encapsulated, and the clients must learn it.
    tunnel_end_to_end("tunnel_ipip", "ipip", Some("1500"));
}

#[test]
fn gue_carries_tcp_udp_and_both_mixed_pairs_to_reals_behind_a_router() {
    tunnel_end_to_end("tunnel_gue", "gue", None);
}

/// The lb has a second leg on the reals' segment: packets come in by eth0 from the router,
/// the routes to the reals leave by eth1, so every encapsulated packet is redirected out of
/// eth1 (`XDP_REDIRECT` through the devmap) to the real's own MAC there. Without the
/// redirect no new connection could work (a real not reachable out of the ingress interface
/// would take no flows).
#[test]
fn reals_reached_out_of_another_interface_get_their_packets_redirected_there() {
    let Some(e) = routed_lab_with("tunnel_egress", &["--mode", "tunnel"], true) else {
        return;
    };
    e.step("the lb on both segments: eth0 towards the router, eth1 on the reals'");
    for (vip, v6) in [(TCP4, false), (UDP4, false), (TCP6_VIP, true)] {
        e.xlb_ok(&["vip", "add", vip]);
        for r in &e.lab.reals {
            let addr = if v6 {
                r.ipv6.to_string()
            } else {
                r.ipv4.to_string()
            };
            e.xlb_ok(&["real", "add", vip, &addr]);
            // `real add` resolves it on eth1 itself: in service at once, not at the next
            // MAC refresh.
            let list = e.list();
            let added = list
                .vips
                .iter()
                .filter(|v| v.vip == vip)
                .flat_map(|v| v.reals.iter())
                .find(|x| x.addr == addr)
                .unwrap_or_else(|| panic!("{addr} not in {list:?}"));
            assert_eq!(added.state, "active", "{added:?}");
        }
        e.wait_active(vip, e.lab.reals.len());
    }
    for v in &e.list().vips {
        for r in &v.reals {
            let own = &e
                .lab
                .reals
                .iter()
                .find(|h| h.ipv4.to_string() == r.addr || h.ipv6.to_string() == r.addr);
            let own = own.unwrap_or_else(|| panic!("{r:?}")).mac.clone();
            assert_eq!(r.mac.as_deref(), Some(own.as_str()), "{r:?}");
            assert_eq!(r.egress.as_deref(), Some("eth1"), "{r:?}");
        }
    }
    e.step("every real resolved on eth1 to its own MAC, egress eth1");
    tcp_and_udp_reach_every_real(&e, "redirected");
    let stats: serde_json::Value =
        serde_json::from_str(&e.xlb_ok(&["stats", "--json"])).expect("stats JSON");
    for counter in ["pass_next_hop", "drop_tx_port", "drop_too_big"] {
        assert_eq!(stats["global"][counter], 0, "{counter}: {stats:#}");
    }
}

/// In direct routing a real's replies do not pass the balancer, so a router on their path
/// sends its "fragmentation needed" to the VIP, that is to the balancer: it must reach the
/// real of the flow it quotes. Emulated with a crafted error from the client's namespace,
/// watched for with tcpdump on every real.
#[test]
fn in_direct_routing_an_icmp_error_from_the_path_reaches_the_flows_real() {
    let Some(e) = E2e::start("dr_icmp_error", vec![IpAddr::V4(lab::VIP4)]) else {
        return;
    };
    e.add_vip(TCP4, false);
    let mut watchers = Vec::new();
    for r in e.lab.reals.clone() {
        let mut child = e
            .lab
            .spawn_with(
                &r.ns,
                &[
                    "tcpdump",
                    "-i",
                    "eth0",
                    "-n",
                    "-l",
                    "-c",
                    "1",
                    "--immediate-mode",
                    "icmp",
                    "and",
                    "icmp[0] == 3",
                ],
                |c| {
                    c.stdout(std::process::Stdio::piped());
                    c.stderr(std::process::Stdio::piped());
                },
            )
            .expect("tcpdump");
        let mut err = std::io::BufReader::new(child.stderr.take().expect("stderr"));
        let mut said = String::new();
        while !said.contains("listening on") {
            let mut line = String::new();
            let n = std::io::BufRead::read_line(&mut err, &mut line).expect("tcpdump's stderr");
            assert!(n > 0, "{}: tcpdump ended: {said}", r.role);
            said.push_str(&line);
        }
        watchers.push((r.role.clone(), child));
    }
    // Fragmentation needed (MTU 1400) from 10.222.0.2, quoting the real's reply of the flow
    // client:55555 -> VIP:80.
    let client = e.lab.client.clone();
    let quoted = packet::Frame::tcp4(lab::VIP4, 80, client.ipv4, 55555).build();
    let mut icmp = vec![3, 4, 0, 0, 0, 0, 0x05, 0x78];
    icmp.extend_from_slice(&quoted[14..14 + 28]);
    let sum = packet::ipv4_checksum(&icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let mac = |s: &str| -> [u8; 6] {
        let b: Vec<u8> = s
            .split(':')
            .map(|x| u8::from_str_radix(x, 16).unwrap())
            .collect();
        b.try_into().unwrap()
    };
    let frame = packet::Frame::new(
        packet::L3::v4(client.ipv4, lab::VIP4),
        packet::L4::Raw {
            proto: 1,
            bytes: icmp,
        },
    )
    .with_macs(mac(&client.mac), mac(&e.lab.lb.mac))
    .build();
    let hex: String = frame.iter().map(|b| format!("{b:02x}")).collect();
    let lab_bin = release_bin("xlb-lab").display().to_string();
    e.lab
        .exec(
            &client.ns,
            &[&lab_bin, "inject", "--iface", "eth0", "--hex", &hex],
        )
        .expect("inject");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut seen = Vec::new();
    while std::time::Instant::now() < deadline && seen.is_empty() {
        for (role, child) in watchers.iter_mut() {
            if let Ok(Some(_)) = child.try_wait() {
                seen.push(role.clone());
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    for (role, child) in watchers.iter_mut() {
        if !seen.contains(role) && matches!(child.try_wait(), Ok(Some(_))) {
            seen.push(role.clone());
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    assert_eq!(seen.len(), 1, "the error reached {seen:?}");
    e.step(&format!("the error reached {} only", seen[0]));
    let stats: serde_json::Value =
        serde_json::from_str(&e.xlb_ok(&["stats", "--json"])).expect("stats JSON");
    assert_eq!(stats["global"]["icmp_error_forwarded"], 1, "{stats:#}");
}
