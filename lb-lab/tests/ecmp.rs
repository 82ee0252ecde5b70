//! Scale-out with real components: two xlb nodes announce the VIP with `--announce bird` to
//! BIRD 2 on each node, which speaks BGP to a router running BIRD with multipath (the client's
//! namespace, so its kernel spreads connections over both nodes by ECMP). Maintenance
//! withdraws a node without breaking a connection; a node that fails right after a real was
//! added on both loses no connection either (flow sync). Needs root and bird2 (`cargo xtask
//! setup`).

mod common;

#[path = "common/harness.rs"]
#[allow(dead_code)]
mod harness;

#[path = "common/pair.rs"]
#[allow(dead_code)]
mod pair;

use std::{net::IpAddr, path::Path, process::Stdio, time::Duration};

use harness::*;
use lb_lab::lab::{self, LabConfig};
use pair::*;

/// The BGP timers that make a lab converge in seconds.
const FAST: &str = "hold time 3; keepalive time 1; connect delay time 1; connect retry time 1; \
                    error wait time 1, 2;";

/// BIRD in `ns`, in the foreground (the lab owns it), configured by `conf`, its files in
/// `dir`.
fn bird(e: &mut E2e, role: &str, ns: &str, dir: &Path, conf: &str) {
    std::fs::create_dir_all(dir).expect("bird dir");
    std::fs::write(dir.join("bird.conf"), conf).expect("bird.conf");
    let log = std::fs::File::create(dir.join("log")).expect("bird log");
    let path = |f: &str| dir.join(f).display().to_string();
    let args = [
        "bird",
        "-f",
        "-c",
        &path("bird.conf"),
        "-s",
        &path("bird.ctl"),
        "-P",
        &path("bird.pid"),
    ];
    let child = e
        .lab
        .spawn_with(ns, &args, |c| {
            c.stdout(Stdio::null()).stderr(log);
        })
        .expect("starting bird");
    e.lab.own(&format!("bird {role}"), child);
}

/// The balancer node's BIRD: the VIP routes xlb writes, announced to the router.
fn balancer_bird(me: &str, routes: &Path) -> String {
    format!(
        "router id {me};\nlog stderr all;\nprotocol device {{ scan time 1; }}\n\
         protocol static vips {{\n  ipv4;\n  include \"{}\";\n}}\n\
         protocol bgp uplink {{\n  local {me} as 65001;\n  neighbor 10.222.0.2 as 65000;\n  \
         {FAST}\n  ipv4 {{ import none; export where proto = \"vips\"; }};\n}}\n",
        routes.display()
    )
}

/// The router's BIRD, peering with each `(name, address)` balancer.
fn router_bird(balancers: &[(&str, &str)]) -> String {
    let peer = |name: &str, addr: &str| {
        format!(
            "protocol bgp {name} {{\n  local 10.222.0.2 as 65000;\n  neighbor {addr} as \
             65001;\n  {FAST}\n  ipv4 {{ import all; export none; }};\n}}\n"
        )
    };
    let peers: String = balancers.iter().map(|(n, a)| peer(n, a)).collect();
    format!(
        "router id 10.222.0.2;\nlog stderr all;\nprotocol device {{ scan time 1; }}\n\
         protocol kernel {{\n  ipv4 {{ import none; export all; }};\n  merge paths on;\n}}\n{peers}"
    )
}

/// The next hops of the client's route to the VIP.
fn next_hops(e: &E2e) -> Vec<String> {
    let out = e
        .lab
        .exec(
            &e.client_ns(),
            &["ip", "-4", "route", "show", &lab::VIP4.to_string()],
        )
        .unwrap_or_default();
    let mut hops: Vec<String> = out
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "via")
        .map(|w| w[1].to_string())
        .collect();
    hops.sort();
    hops
}

/// `--announce` for a node whose BIRD keeps its files in `dir`.
fn announce_arg(dir: &Path) -> String {
    format!(
        "bird:{}:birdc -s {} configure",
        dir.join("vips.conf").display(),
        dir.join("bird.ctl").display()
    )
}

fn vip_packets_on(out: &std::process::Output) -> u64 {
    json(out)["vips"][0]["packets"].as_u64().unwrap_or(0)
}

#[test]
fn two_nodes_behind_bgp_ecmp_share_connections_and_keep_them_through_maintenance_and_failure() {
    let test = "ecmp";
    let key = key_file(test);
    let key_path = key.0.display().to_string();
    let cfg = LabConfig {
        reals: 3,
        vips: vec![IpAddr::V4(lab::VIP4)],
        second_lb: true,
        ..LabConfig::default()
    };
    // The lab's directory is known once it exists: the first daemon's announce file lives in
    // a directory named after the test instead.
    let dir_a = std::env::temp_dir().join(format!("xlb-test-{}-ecmp-lb", std::process::id()));
    std::fs::create_dir_all(&dir_a).expect("dir");
    let _dir_guard = common::Removed(dir_a.clone());
    let announce_a = announce_arg(&dir_a);
    let mut args_a = sync_args(LB1, LB2, &key_path);
    args_a.extend(["--announce", &announce_a]);
    let Some(mut e) = E2e::start_with(test, cfg, &args_a) else {
        return;
    };
    let dir_b = e.lab.dir.join("bird-lb2");
    let announce_b = announce_arg(&dir_b);
    std::fs::create_dir_all(&dir_b).expect("dir");
    let mut args_b = sync_args(LB2, LB1, &key_path);
    args_b.extend(["--announce", &announce_b]);
    let xlb = e.xlb.clone();
    e.lab
        .start_daemon_lb2(&xlb, &args_b)
        .expect("the daemon on lb2");
    let (lb1, lb2) = (e.lab.lb.ns.clone(), e.lab.lb2.clone().expect("lb2").ns);
    let client = e.client_ns();
    make_router(&e);
    let (routes_a, routes_b) = (dir_a.join("vips.conf"), dir_b.join("vips.conf"));
    wait_for(
        "both announce files written",
        Duration::from_secs(10),
        || routes_a.exists() && routes_b.exists(),
    );
    assert_eq!(
        std::fs::read_to_string(&routes_a).expect("file"),
        "",
        "no VIP yet"
    );
    bird(
        &mut e,
        "lb",
        &lb1,
        &dir_a,
        &balancer_bird("10.222.0.3", &routes_a),
    );
    bird(
        &mut e,
        "lb2",
        &lb2,
        &dir_b,
        &balancer_bird("10.222.0.4", &routes_b),
    );
    let dir_r = e.lab.dir.join("bird-router");
    bird(
        &mut e,
        "router",
        &client,
        &dir_r,
        &router_bird(&[("lb", "10.222.0.3"), ("lb2", "10.222.0.4")]),
    );
    e.step("BIRD on both nodes and the router; nothing announced");

    let [r1, r2, r3] = [0, 1, 2].map(|i| e.lab.reals[i].ipv4.to_string());
    e.xlb_ok(&["vip", "add", TCP4]);
    e.xlb_ok(&["real", "add", TCP4, &r1]);
    e.xlb_ok(&["real", "add", TCP4, &r2]);
    on_lb2(&e, &["vip", "add", TCP4]);
    on_lb2(&e, &["real", "add", TCP4, &r2]);
    on_lb2(&e, &["real", "add", TCP4, &r1]);
    let route = format!("route {}/32 blackhole;\n", lab::VIP4);
    wait_for("both nodes announcing", Duration::from_secs(10), || {
        std::fs::read_to_string(&routes_a).is_ok_and(|t| t == route)
            && std::fs::read_to_string(&routes_b).is_ok_and(|t| t == route)
    });
    let both = vec!["10.222.0.3".to_string(), "10.222.0.4".to_string()];
    wait_for(
        "the router's route over both nodes",
        Duration::from_secs(20),
        || next_hops(&e) == both,
    );
    e.step("VIP ready on both: the router has two next hops");

    let url = e.url4();
    let mut streams = long_lived(&e, &url, 24);
    let (a0, b0) = (
        vip_packets_on(&e.lab.xlb_checked(&["stats", "--json"]).expect("stats")),
        vip_packets_on(&on_lb2(&e, &["stats", "--json"])),
    );
    let marks: Vec<usize> = streams.iter_mut().map(|(_, s)| s.poll()).collect();
    keep_their_reals("spread", &mut streams, &marks, 10);
    let (a1, b1) = (
        vip_packets_on(&e.lab.xlb_checked(&["stats", "--json"]).expect("stats")),
        vip_packets_on(&on_lb2(&e, &["stats", "--json"])),
    );
    assert!(
        a1 > a0 && b1 > b0,
        "connections do not use both nodes: lb {a0} -> {a1}, lb2 {b0} -> {b1} packets"
    );
    e.step("24 long-lived connections over both nodes");

    let marks: Vec<usize> = streams.iter_mut().map(|(_, s)| s.poll()).collect();
    let stats = json(&e.lab.xlb_checked(&["stats", "--json"]).expect("stats"));
    // The first reload ran before BIRD did: that one failed.
    let failures = stats["announce"]["reload_failures"].clone();
    e.xlb_ok(&["maintenance", "on"]);
    wait_for("lb withdrawn", Duration::from_secs(15), || {
        next_hops(&e) == vec!["10.222.0.4".to_string()]
    });
    assert_eq!(std::fs::read_to_string(&routes_a).expect("file"), "");
    keep_their_reals("lb in maintenance", &mut streams, &marks, 10);
    let st = json(&e.lab.xlb_checked(&["stats", "--json"]).expect("stats"));
    assert_eq!(st["announce"]["announced"], serde_json::json!([]), "{st:#}");
    assert_eq!(st["announce"]["reload_failures"], failures, "{st:#}");
    e.xlb_ok(&["maintenance", "off"]);
    wait_for("lb back", Duration::from_secs(15), || next_hops(&e) == both);
    let marks: Vec<usize> = streams.iter_mut().map(|(_, s)| s.poll()).collect();
    keep_their_reals("lb out of maintenance", &mut streams, &marks, 10);
    e.step("maintenance on lb: withdrawn and back, every connection on its real");

    // A hitless restart of lb's daemon withdraws nothing: the file stays as it is.
    let marks: Vec<usize> = streams.iter_mut().map(|(_, s)| s.poll()).collect();
    e.lab.stop_daemon(libc::SIGTERM).expect("SIGTERM");
    assert_eq!(std::fs::read_to_string(&routes_a).expect("file"), route);
    assert_eq!(next_hops(&e), both, "lb withdrawn by a restart");
    e.lab
        .start_daemon(&xlb, &args_a)
        .expect("restarting lb's daemon");
    keep_their_reals("lb's daemon restarted", &mut streams, &marks, 10);
    assert_eq!(next_hops(&e), both, "lb withdrawn by a restart");
    e.step("lb's daemon restarted: still announced, every connection on its real");

    // A real on both nodes, then lb fails: its flows move to lb2, those whose slot moved too.
    e.xlb_ok(&["real", "add", TCP4, &r3]);
    on_lb2(&e, &["real", "add", TCP4, &r3]);
    let sent = sync_of(&json(
        &e.lab.xlb_checked(&["stats", "--json"]).expect("stats"),
    ));
    let marks: Vec<usize> = streams.iter_mut().map(|(_, s)| s.poll()).collect();
    let (sw, port) = (e.lab.sw.clone(), e.lab.lb.port.clone());
    e.lab
        .exec(&sw, &["ip", "link", "set", &port, "down"])
        .expect("lb's link down");
    wait_for(
        "the router dropping lb (hold timer)",
        Duration::from_secs(20),
        || next_hops(&e) == vec!["10.222.0.4".to_string()],
    );
    keep_their_reals("lb failed", &mut streams, &marks, 20);
    let fresh = e.http(&url, 120);
    e.assert_spread("new connections after the failure", &fresh, 10.0, 60.0);
    e.step(&format!(
        "real {r3} added, lb failed ({} flows synced before): every connection kept its real",
        sent["flows_sent"]
    ));
    none_failed(streams);
}

/// Multipath over the 5-tuple on the router (the client's namespace), and no static route to
/// the VIP: it is reached by what BGP brings.
fn make_router(e: &E2e) {
    let client = e.client_ns();
    // Not the sockets' hash, which TCP changes on a retransmission.
    e.lab
        .exec(
            &client,
            &[
                "sysctl",
                "-qw",
                "net.ipv4.fib_multipath_hash_policy=3",
                "net.ipv4.fib_multipath_hash_fields=0x0037",
            ],
        )
        .expect("multipath hash");
    e.lab
        .exec(
            &client,
            &["ip", "route", "del", &format!("{}/32", lab::VIP4)],
        )
        .expect("the lab's static VIP route");
}

#[test]
fn exabgp_announces_a_ready_node_through_xlb_announce() {
    let cfg = LabConfig {
        reals: 2,
        vips: vec![IpAddr::V4(lab::VIP4)],
        ..LabConfig::default()
    };
    let Some(mut e) = E2e::start_with("exabgp", cfg, &[]) else {
        return;
    };
    make_router(&e);
    let dir = e.lab.dir.join("exabgp");
    std::fs::create_dir_all(&dir).expect("dir");
    let conf = dir.join("exabgp.conf");
    std::fs::write(
        &conf,
        format!(
            "process xlb {{\n  run {} --socket {} announce --exabgp;\n  encoder text;\n}}\n\
             neighbor 10.222.0.2 {{\n  router-id 10.222.0.3;\n  local-address 10.222.0.3;\n  \
             local-as 65001;\n  peer-as 65000;\n  hold-time 3;\n  api {{\n    processes [ xlb \
             ];\n  }}\n}}\n",
            e.xlb.display(),
            e.lab.socket().display()
        ),
    )
    .expect("exabgp.conf");
    let log = std::fs::File::create(dir.join("log")).expect("log");
    let lb = e.lab.lb.ns.clone();
    let conf_s = conf.display().to_string();
    let child = e
        .lab
        .spawn_with(&lb, &["exabgp", &conf_s], |c| {
            c.stdout(log.try_clone().expect("log"))
                .stderr(log)
                .env("exabgp_daemon_user", "root")
                .env("exabgp_daemon_daemonize", "false")
                .env("exabgp_log_destination", "stdout");
        })
        .expect("starting exabgp");
    e.lab.own("exabgp", child);
    let client = e.client_ns();
    let dir_r = e.lab.dir.join("bird-router");
    bird(
        &mut e,
        "router",
        &client,
        &dir_r,
        &router_bird(&[("lb", "10.222.0.3")]),
    );
    let exabgp_log = || std::fs::read_to_string(dir.join("log")).unwrap_or_default();
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        next_hops(&e).is_empty(),
        "a route before any VIP: {:?}",
        next_hops(&e)
    );
    e.step("ExaBGP and the router up; no VIP, no route");

    e.add_vip(TCP4, false);
    let lb_only = vec!["10.222.0.3".to_string()];
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        got = next_hops(&e);
        if got == lb_only {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        got,
        lb_only,
        "no route from ExaBGP; its log:\n{}",
        exabgp_log()
    );
    let replies = e.http(&e.url4(), 90);
    e.assert_spread("through the announced route", &replies, 10.0, 90.0);
    e.step("VIP ready: ExaBGP announced it, the router routes it to lb");

    e.xlb_ok(&["maintenance", "on"]);
    wait_for("the route withdrawn", Duration::from_secs(15), || {
        next_hops(&e).is_empty()
    });
    e.xlb_ok(&["maintenance", "off"]);
    wait_for("the route back", Duration::from_secs(15), || {
        next_hops(&e) == lb_only
    });
    e.step("maintenance on: withdrawn; off: announced again");
}
