//! High availability with real components: two xlb nodes on one segment under keepalived's
//! VRRP (keepalived from Debian's package owns the VIP address; xlb balances), with flow sync
//! between them; and flow sync's security against forged, replayed and oversized messages.
//! Needs root and keepalived (`cargo xtask setup`).

mod common;

#[path = "common/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    process::{Child, Stdio},
    time::Duration,
};

#[path = "common/pair.rs"]
#[allow(dead_code)]
mod pair;

use harness::*;
use lb_lab::lab::{self, LabConfig};
use lb_userspace::{core::balancer::sync::SyncFlow, daemon::sync::wire, model::RealAddr};
use pair::*;

/// keepalived (VRRP only) in `ns`, owning the VIP address at `priority`.
fn keepalived(e: &E2e, role: &str, ns: &str, priority: u32) -> Child {
    let dir = e.lab.dir.join(format!("keepalived-{role}"));
    std::fs::create_dir_all(&dir).expect("keepalived dir");
    let conf = dir.join("keepalived.conf");
    std::fs::write(
        &conf,
        format!(
            "global_defs {{\n  router_id xlb-{role}\n  vrrp_garp_master_repeat 3\n}}\n\
             vrrp_instance VI_1 {{\n  state BACKUP\n  interface eth0\n  virtual_router_id 51\n  \
             priority {priority}\n  advert_int 1\n  virtual_ipaddress {{\n    {}/32 dev eth0\n  \
             }}\n}}\n",
            lab::VIP4
        ),
    )
    .expect("keepalived.conf");
    let log = std::fs::File::create(dir.join("log")).expect("keepalived log");
    let path = |f: &str| dir.join(f).display().to_string();
    let args = [
        "keepalived",
        "-n",
        "-l",
        "-D",
        "-P",
        "-f",
        &path("keepalived.conf"),
        "-p",
        &path("keepalived.pid"),
        "-r",
        &path("vrrp.pid"),
    ];
    e.lab
        .spawn_with(ns, &args, |c| {
            c.stdout(Stdio::null()).stderr(log);
        })
        .expect("starting keepalived")
}

fn holds_vip(e: &E2e, ns: &str) -> bool {
    e.lab
        .exec(ns, &["ip", "-4", "-o", "addr", "show", "dev", "eth0"])
        .is_ok_and(|out| out.contains(&format!("{}/32", lab::VIP4)))
}

#[test]
fn a_vrrp_pair_with_flow_sync_keeps_every_connection_through_failovers() {
    let test = "vrrp_pair";
    let key = key_file(test);
    let key_path = key.0.display().to_string();
    let cfg = LabConfig {
        reals: 3,
        vips: vec![IpAddr::V4(lab::VIP4)],
        second_lb: true,
        ..LabConfig::default()
    };
    let Some(mut e) = E2e::start_with(test, cfg, &sync_args(LB1, LB2, &key_path)) else {
        return;
    };
    let xlb = e.xlb.clone();
    e.lab
        .start_daemon_lb2(&xlb, &sync_args(LB2, LB1, &key_path))
        .expect("the daemon on lb2");
    let lb1 = e.lab.lb.ns.clone();
    let lb2 = e.lab.lb2.clone().expect("lb2").ns;
    let [r1, r2, r3] = [0, 1, 2].map(|i| e.lab.reals[i].ipv4.to_string());

    // The same config, reached in different orders.
    e.xlb_ok(&["vip", "add", TCP4]);
    e.xlb_ok(&["real", "add", TCP4, &r1]);
    e.xlb_ok(&["real", "add", TCP4, &r2]);
    on_lb2(&e, &["vip", "add", TCP4]);
    on_lb2(&e, &["real", "add", TCP4, &r2]);
    on_lb2(&e, &["real", "add", TCP4, &r1]);
    e.wait_active(TCP4, 2);
    wait_for("lb2's reals active", Duration::from_secs(10), || {
        json(&on_lb2(&e, &["list", "--json"]))["vips"][0]["reals"]
            .as_array()
            .is_some_and(|rs| rs.iter().all(|r| r["state"] == "active"))
    });
    let digest_a = digest(
        &json(&e.lab.xlb_checked(&["list", "--json"]).expect("list")),
        TCP4,
    );
    let digest_b = digest(&json(&on_lb2(&e, &["list", "--json"])), TCP4);
    assert_eq!(digest_a.len(), 64, "{digest_a}");
    assert_eq!(digest_a, digest_b, "the two nodes' rings differ");
    e.step("two nodes, one ring (ring_digest equal)");

    let mut ka1 = keepalived(&e, "lb", &lb1, 150);
    let ka2 = keepalived(&e, "lb2", &lb2, 100);
    e.lab.own("keepalived lb2", ka2);
    wait_for("lb holding the VIP", Duration::from_secs(15), || {
        holds_vip(&e, &lb1)
    });
    assert!(!holds_vip(&e, &lb2), "both nodes hold the VIP");
    // The client reaches the VIP on the segment, wherever VRRP puts it.
    let client = e.client_ns();
    e.lab
        .exec(
            &client,
            &[
                "ip",
                "route",
                "replace",
                &format!("{}/32", lab::VIP4),
                "dev",
                "eth0",
            ],
        )
        .expect("client route");
    e.step("keepalived: lb is master");

    let url = e.url4();
    let mut streams = long_lived(&e, &url, 24);
    let marks: Vec<usize> = streams.iter_mut().map(|(_, s)| s.poll()).collect();
    keep_their_reals("before any change", &mut streams, &marks, 3);
    e.step("24 long-lived connections through lb");

    // A third real on both nodes: a third of the slots move, and the flows on them live in
    // lb's table only, until flow sync hands them to lb2.
    e.xlb_ok(&["real", "add", TCP4, &r3]);
    on_lb2(&e, &["real", "add", TCP4, &r3]);
    e.wait_active(TCP4, 3);
    let sent = sync_of(&json(
        &e.lab.xlb_checked(&["stats", "--json"]).expect("stats"),
    ));
    assert!(sent["flows_sent"].as_u64() > Some(0), "{sent:#}");
    let got = sync_of(&json(&on_lb2(&e, &["stats", "--json"])));
    assert!(got["flows_inserted"].as_u64() > Some(0), "{got:#}");
    assert_eq!(got["rejected"], 0, "{got:#}");
    assert!(
        got["peers"][0]["last_seen_secs"].as_f64() < Some(3.0),
        "{got:#}"
    );
    let moved = sent["flows_sent"].as_u64().unwrap_or(0);
    e.step(&format!(
        "real {r3} added on both: lb sent {moved} flows off their slot"
    ));

    // lb2 restarts with an empty connection table (its pins removed): it asks lb again.
    e.lab
        .stop_child("daemon lb2")
        .expect("stopping lb2's daemon");
    let pins = e.lab.bpffs().join("xlb-lb2");
    let down = e
        .lab
        .xlb_lb2(&[
            "down",
            "--iface",
            "eth0",
            "--pin-root",
            &pins.display().to_string(),
        ])
        .expect("xlb down on lb2");
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    e.lab
        .start_daemon_lb2(&xlb, &sync_args(LB2, LB1, &key_path))
        .expect("restarting lb2's daemon");
    wait_for(
        "lb2 given lb's flows again",
        Duration::from_secs(15),
        || {
            sync_of(&json(&on_lb2(&e, &["stats", "--json"])))["flows_inserted"].as_u64()
                >= Some(moved)
        },
    );
    e.step("lb2 restarted empty and asked lb for its flows");

    let marks: Vec<usize> = streams.iter_mut().map(|(_, s)| s.poll()).collect();
    let sw = e.lab.sw.clone();
    let port = e.lab.lb.port.clone();
    e.lab
        .exec(&sw, &["ip", "link", "set", &port, "down"])
        .expect("lb's link down");
    let down_at = std::time::Instant::now();
    wait_for("lb2 taking the VIP", Duration::from_secs(15), || {
        holds_vip(&e, &lb2)
    });
    keep_their_reals("lb's link down", &mut streams, &marks, 20);
    let fresh = e.http(&url, 120);
    e.assert_spread("new connections through lb2", &fresh, 10.0, 60.0);
    e.step("lb's link down: lb2 took over, every connection kept its real");
    // Down long enough for lb's MAC refresh (every 2 s) to find its neighbour entries gone:
    // its own link being down must not take its reals out (their flows would move back
    // to other reals when the link returns).
    std::thread::sleep(Duration::from_secs(7).saturating_sub(down_at.elapsed()));
    let list = json(&e.lab.xlb_checked(&["list", "--json"]).expect("list"));
    let states: Vec<&str> = list["vips"][0]["reals"]
        .as_array()
        .map(|rs| rs.iter().filter_map(|r| r["state"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        states, ["active"; 3],
        "lb's reals while its link is down: {list:#}"
    );

    let marks: Vec<usize> = streams.iter_mut().map(|(_, s)| s.poll()).collect();
    e.lab
        .exec(&sw, &["ip", "link", "set", &port, "up"])
        .expect("lb's link up");
    wait_for("lb taking the VIP back", Duration::from_secs(20), || {
        holds_vip(&e, &lb1) && !holds_vip(&e, &lb2)
    });
    keep_their_reals("lb back", &mut streams, &marks, 20);
    e.step("lb back as master: the connections still on their reals");

    let marks: Vec<usize> = streams.iter_mut().map(|(_, s)| s.poll()).collect();
    // SAFETY: our child's pid (`ip netns exec` became keepalived).
    unsafe { libc::kill(ka1.id() as i32, libc::SIGTERM) };
    let _ = wait_exit(&mut ka1, "keepalived on lb", Duration::from_secs(10));
    wait_for("lb2 taking the VIP", Duration::from_secs(10), || {
        holds_vip(&e, &lb2)
    });
    keep_their_reals("lb's keepalived stopped", &mut streams, &marks, 20);
    let fresh = e.http(&url, 120);
    e.assert_spread("new connections after SIGTERM", &fresh, 10.0, 60.0);
    e.step("lb's keepalived stopped (SIGTERM): lb2 took over, nothing reset");

    none_failed(streams);
}

/// A Flows message as a peer would send it.
fn message(seq: u64, flows: Vec<SyncFlow>) -> wire::Message {
    wire::Message {
        kind: wire::Kind::Flows,
        sender: 42,
        seq,
        time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs(),
        flows,
    }
}

#[test]
fn sync_drops_forged_replayed_and_oversized_messages() {
    let test = "sync_security";
    let key = key_file(test);
    let key_path = key.0.display().to_string();
    let cfg = LabConfig {
        reals: 2,
        vips: vec![IpAddr::V4(lab::VIP4)],
        ..LabConfig::default()
    };
    // The client plays the peer.
    let peer = "10.222.0.2:8848";
    let Some(e) = E2e::start_with(test, cfg, &sync_args(LB1, peer, &key_path)) else {
        return;
    };
    e.add_vip(TCP4, false);
    let r1 = e.lab.reals[0].clone();
    let flow = |port: u16| SyncFlow {
        vip: TCP4.parse().expect("vip"),
        client: "10.222.0.2".parse().expect("ip"),
        client_port: port,
        dst_port: 80,
        real: RealAddr::from(IpAddr::V4(r1.ipv4)),
    };
    let good = wire::key(KEY.trim_ascii_end());
    let datagrams: Vec<(&str, Vec<u8>)> = vec![
        (
            "wrong key",
            wire::encode(
                &wire::key(b"not the key at all!"),
                &message(1, vec![flow(5001)]),
            ),
        ),
        ("oversized", vec![0u8; wire::MAX_MESSAGE + 100]),
        ("good", wire::encode(&good, &message(2, vec![flow(5002)]))),
        (
            "replayed",
            wire::encode(&good, &message(2, vec![flow(5003)])),
        ),
    ];
    let client = e.client_ns();
    let to: SocketAddr = LB1.parse().expect("addr");
    lab::in_netns(&client, move || {
        let s = UdpSocket::bind(peer)?;
        for (_, d) in &datagrams {
            s.send_to(d, to)?;
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    })
    .expect("sending from the client");
    // Another address on the segment is nobody's peer.
    e.lab
        .exec(
            &client,
            &["ip", "addr", "add", "10.222.0.99/24", "dev", "eth0"],
        )
        .expect("second address");
    let stranger = wire::encode(&good, &message(3, vec![flow(5004)]));
    lab::in_netns(&client, move || {
        let s = UdpSocket::bind("10.222.0.99:0")?;
        s.send_to(&stranger, to)?;
        Ok(())
    })
    .expect("sending from a stranger");

    let mut stats = serde_json::Value::Null;
    wait_for("five datagrams counted", Duration::from_secs(5), || {
        stats = sync_of(&json(
            &e.lab.xlb_checked(&["stats", "--json"]).expect("stats"),
        ));
        stats["rejected"].as_u64().unwrap_or(0) + stats["flows_received"].as_u64().unwrap_or(0) >= 5
    });
    assert_eq!(stats["rejected"], 4, "{stats:#}");
    for why in ["auth", "size", "replay", "unknown_peer"] {
        assert_eq!(stats["rejected_by"][why], 1, "{why}: {stats:#}");
    }
    assert_eq!(stats["flows_received"], 1, "{stats:#}");
    wait_for("the good flow merged", Duration::from_secs(5), || {
        sync_of(&json(
            &e.lab.xlb_checked(&["stats", "--json"]).expect("stats"),
        ))["flows_inserted"]
            == 1
    });
    let flows = json(
        &e.lab
            .xlb_checked(&["real", "flows", TCP4, &r1.ipv4.to_string(), "--json"])
            .expect("flows"),
    );
    assert_eq!(
        flows["flows"], 1,
        "only the authenticated flow is tracked: {flows:#}"
    );
    e.step("forged, oversized, replayed and stranger's messages dropped and counted");
}
