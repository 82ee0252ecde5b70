//! NAT mode end to end, one-arm: the client (its address 10.77.0.7 / fd00:77::7 on another
//! subnet, routed through the balancer), the balancer and the reals on one segment; the reals
//! hold no VIP, serve on ports 8080 (HTTP) and 5353 (UDP) behind VIP ports 80 and 53, and route
//! everything that is not on their segment through the balancer (their default route), which
//! rewrites their replies back to the VIP. Real TCP and UDP clients and servers over IPv4 and
//! IPv6: every reply comes from the VIP (the client's sockets are connected to it), spread by
//! weight; a TCP health check on the real's own port takes a stopped real out; a 1 MB upload
//! and a 1 MB download arrive whole; a VIP of direct-routing and tunnel reals (the modes that
//! may share one) serves beside the NAT VIPs; a direct-routing real is refused in a NAT VIP.
//! Needs root; skipped otherwise.

mod common;

#[path = "common/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use harness::*;
use lb_lab::lab::{self, LabConfig, Spread};

const CLIENT4: &str = "10.77.0.7";
/// A VIP the reals hold on their loopback, of direct-routing and tunnel reals.
const SHARED4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 222, 1, 101);
const CLIENT6: &str = "fd00:77::7";

fn nat_lab(test: &'static str) -> Option<E2e> {
    let cfg = LabConfig {
        reals: 3,
        // The reals hold no NAT VIP (NAT sends them packets to their own addresses), only the
        // VIP of direct routing and tunnel mode.
        vips: vec![std::net::IpAddr::V4(SHARED4)],
        tcp_port: 8080,
        udp_port: 5353,
        ..LabConfig::default()
    };
    let e = E2e::start_with(test, cfg, &[])?;
    let (lb4, lb6) = (e.lab.lb.ipv4.to_string(), e.lab.lb.ipv6.to_string());
    let client = e.lab.client.clone();
    let run = |ns: &str, args: &[&str]| {
        e.lab
            .exec(ns, args)
            .unwrap_or_else(|err| panic!("{args:?} in {ns}: {err:#}"));
    };
    // The client's own addresses on another subnet, the VIPs via the balancer from them.
    run(
        &client.ns,
        &[
            "ip",
            "addr",
            "add",
            &format!("{CLIENT4}/32"),
            "dev",
            &client.iface,
        ],
    );
    run(
        &client.ns,
        &[
            "ip",
            "addr",
            "add",
            &format!("{CLIENT6}/128"),
            "dev",
            &client.iface,
            "nodad",
        ],
    );
    let vip4 = format!("{}/32", lab::VIP4);
    let vip6 = format!("{}/128", lab::VIP6);
    run(
        &client.ns,
        &["ip", "route", "add", &vip4, "via", &lb4, "src", CLIENT4],
    );
    run(
        &client.ns,
        &[
            "ip", "-6", "route", "add", &vip6, "via", &lb6, "src", CLIENT6,
        ],
    );
    // The balancer routes the client's subnet to it, forwards, and sends no redirects (a
    // one-arm router would otherwise tell the reals to go to the client directly).
    let lb = e.lab.lb.ns.clone();
    run(
        &lb,
        &[
            "ip",
            "route",
            "add",
            &format!("{CLIENT4}/32"),
            "via",
            &client.ipv4.to_string(),
        ],
    );
    run(
        &lb,
        &[
            "ip",
            "-6",
            "route",
            "add",
            &format!("{CLIENT6}/128"),
            "via",
            &client.ipv6.to_string(),
        ],
    );
    for knob in [
        "net.ipv4.ip_forward=1",
        "net.ipv6.conf.all.forwarding=1",
        "net.ipv4.conf.all.send_redirects=0",
        "net.ipv4.conf.eth0.send_redirects=0",
    ] {
        run(&lb, &["sysctl", "-qw", knob]);
    }
    // The reals: default route through the balancer, as ipvsadm -m requires.
    for r in e.lab.reals.clone() {
        run(&r.ns, &["ip", "route", "replace", "default", "via", &lb4]);
        run(
            &r.ns,
            &["ip", "-6", "route", "replace", "default", "via", &lb6],
        );
        run(
            &r.ns,
            &["sysctl", "-qw", "net.ipv4.conf.all.accept_redirects=0"],
        );
    }
    Some(e)
}

fn udp_spread(e: &E2e, addr: SocketAddr, count: usize) -> Spread {
    let replies = e
        .lab
        .udp(&e.client_ns(), addr, count)
        .unwrap_or_else(|err| panic!("UDP to {addr}: {err:#}"));
    Spread::of(&replies)
}

#[test]
fn nat_one_arm_serves_tcp_and_udp_on_other_ports_from_the_vip() {
    let Some(mut e) = nat_lab("nat_one_arm") else {
        return;
    };
    let (tcp4, udp4) = (
        format!("tcp/{}:80", lab::VIP4),
        format!("udp/{}:53", lab::VIP4),
    );
    let tcp6 = format!("tcp/[{}]:80", lab::VIP6);
    e.add_vip_with(&tcp4, &["--mode", "nat"], Some(8080), false);
    e.add_vip_with(&udp4, &["--mode", "nat"], Some(5353), false);
    e.add_vip_with(&tcp6, &["--mode", "nat"], Some(8080), true);
    let list = e.xlb_ok(&["list"]);
    assert!(list.contains("10.222.0.11:8080"), "{list}");
    let url4 = format!("http://{}:80/", lab::VIP4);
    let url6 = format!("http://[{}]:80/", lab::VIP6);

    e.step("HTTP and UDP through the VIPs: every real answers, from the VIP");
    // A connected client socket takes replies from the VIP only: each answer proves the
    // rewrite (the reals' own address or port would be refused or reset).
    let replies = e.http(&url4, 150);
    e.assert_spread("IPv4 HTTP", &replies, 15.0, 55.0);
    let replies = e.http(&url6, 120);
    e.assert_spread("IPv6 HTTP", &replies, 10.0, 60.0);
    let spread = udp_spread(&e, (lab::VIP4, 53).into(), 30);
    assert!(spread.failures.is_empty(), "UDP: {spread:?}");
    assert_eq!(spread.counts.len(), 3, "UDP reaches every real: {spread:?}");

    e.step("connections as ipvsadm counts them: closed ones inactive, a kept-alive one active");
    let mut ka = e.keepalive("kept alive", &url4, 200);
    let ka_real = ka.first_real();
    let conns = |e: &E2e| {
        let list = e.list();
        let v = list
            .vips
            .iter()
            .find(|v| v.vip == tcp4)
            .expect("VIP")
            .clone();
        v.reals
            .iter()
            .map(|r| {
                (
                    r.addr.clone(),
                    r.active_conns.expect("active"),
                    r.inactive_conns.expect("inactive"),
                )
            })
            .collect::<Vec<_>>()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let c = conns(&e);
        let active: u64 = c.iter().map(|r| r.1).sum();
        let inactive: u64 = c.iter().map(|r| r.2).sum();
        // The 60 requests above closed their connections (both sides' FINs seen) within
        // the closing idle time: inactive; the kept-alive one is the only active one.
        if active == 1 && inactive >= 60 {
            let owner = e.real(&ka_real);
            let mine = c
                .iter()
                .find(|r| r.0 == format!("{}:8080", owner.ipv4))
                .expect("real");
            assert_eq!(mine.1, 1, "{c:?}");
            break;
        }
        assert!(Instant::now() < deadline, "counts: {c:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(ka);

    e.step("1 MB up and 1 MB down, whole");
    e.megabyte_both_ways(&url4);

    e.step("a VIP of direct-routing and tunnel reals beside the NAT VIPs");
    // Those modes keep the port: the VIP's is the servers' own.
    let shared = format!("tcp/{SHARED4}:8080");
    let r2 = e.real("r2");
    let xlb = e.xlb.display().to_string();
    e.lab
        .exec(&r2.ns, &[&xlb, "decap", "--iface", &r2.iface])
        .unwrap_or_else(|err| panic!("xlb decap on r2: {err:#}"));
    e.xlb_ok(&["vip", "add", &shared]);
    for (r, mode) in [
        ("10.222.0.11", "dr"),
        ("10.222.0.12", "tunnel"),
        ("10.222.0.13", "dr"),
    ] {
        e.xlb_ok(&["real", "add", &shared, r, "--mode", mode]);
    }
    e.wait_active(&shared, 3);
    let replies = e.http(&format!("http://{SHARED4}:8080/"), 150);
    e.assert_spread("DR and tunnel reals", &replies, 15.0, 55.0);
    e.xlb_ok(&["vip", "del", &shared]);

    e.step("weights: r1 at 3, the others at 1");
    e.xlb_ok(&["real", "weight", &tcp4, "10.222.0.11:8080", "3"]);
    let replies = e.http(&url4, 200);
    let spread = Spread::of(&replies);
    let r1 = spread.count("r1");
    assert!(
        (90..=150).contains(&r1),
        "r1 should take about 60 %: {spread:?}"
    );

    e.step("a TCP check on the real's own port takes a stopped real out");
    e.xlb_ok(&[
        "check",
        "set",
        &tcp4,
        "--type",
        "tcp",
        "--interval",
        "1s",
        "--fall",
        "2",
    ]);
    e.lab.stop_server("r2").expect("stop r2");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let list = e.list();
        let v = list.vips.iter().find(|v| v.vip == tcp4).expect("VIP");
        let r2 = v
            .reals
            .iter()
            .find(|r| r.addr == "10.222.0.12:8080")
            .expect("r2");
        if r2.state == "down" {
            break;
        }
        assert!(Instant::now() < deadline, "r2 not taken out: {r2:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let replies = e.http(&url4, 40);
    let spread = Spread::of(&replies);
    assert!(spread.failures.is_empty(), "{spread:?}");
    assert_eq!(spread.count("r2"), 0, "{spread:?}");

    e.step("a direct-routing real is refused in a NAT VIP, saying why");
    let (_, err) = e.xlb_fails(&["real", "add", &tcp4, "10.222.0.14", "--mode", "dr"]);
    assert!(err.contains("NAT reals cannot share a VIP"), "{err}");

    let routed = e.global_counter("nat_reply");
    assert!(routed > 0, "replies routed by XDP: {routed}");
}
