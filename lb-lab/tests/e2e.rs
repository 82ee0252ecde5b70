//! End-to-end tests in a namespace lab (`lb_lab::lab`): the real `xlb` binary (daemon
//! and command line), real TCP and UDP clients (`xlb-lab request`) and servers (`xlb-lab
//! serve`) on a client, an xlb host and three reals joined by one L2 segment.
//!
//! Each test builds its own lab and tears it down, also when it fails (the lab's `Drop`); on a
//! failure the daemon's log is printed. Root is needed: without it every test prints SKIPPED,
//! except under `CI=true`, where it fails. Run one at a time (`--test-threads=1`), after
//! `cargo build --release` of the binaries (`cargo xtask build` does it).

mod common;

use std::{
    io::Read,
    net::{IpAddr, SocketAddr},
    process::Stdio,
    time::{Duration, Instant},
};

use lb_lab::lab::{self, Spread};
use lb_userspace::{api, core::config};

#[path = "common/harness.rs"]
#[allow(dead_code)]
mod harness;

use harness::*;

// ---- the tests ----------------------------------------------------------------------------

/// IPv4 and IPv6 VIPs, TCP and UDP, through three equal reals.
///
/// Expected spread: Maglev gives each of 3 equal reals 1/3 of the ring (± < 1 % at M = 65537),
/// and every request comes from a new source port, so each request picks a real independently
/// with p = 1/3: a real's count is Binomial(n, 1/3). For n = 300 (mean 100, σ 8.2) the bounds
/// 15 % and 52 % are 45 and 156 requests, more than 6.5 σ away; for the 150 UDP exchanges
/// (mean 50, σ 5.8) 22.5 and 78, more than 4.8 σ away. A failure means a skewed ring or hash,
/// not bad luck.
#[test]
fn ipv4_and_ipv6_vips_spread_tcp_and_udp() {
    let Some(e) = E2e::start_dual("ipv4_and_ipv6_vips_spread_tcp_and_udp") else {
        return;
    };
    e.add_vip(TCP4, false);
    e.add_vip(UDP4, false);
    e.add_vip(TCP6, true);

    e.step("300 HTTP requests over IPv4");
    let v4 = e.http(&e.url4(), 300);
    e.assert_spread("HTTP over IPv4", &v4, 15.0, 52.0);
    e.step("300 HTTP requests over IPv6");
    let v6 = e.http(&e.lab.url(IpAddr::V6(lab::VIP6)), 300);
    e.assert_spread("HTTP over IPv6", &v6, 15.0, 52.0);
    e.step("150 UDP exchanges over IPv4");
    let addr = SocketAddr::new(IpAddr::V4(lab::VIP4), e.lab.udp_port);
    let replies = e
        .lab
        .udp(&e.client_ns(), addr, 150)
        .unwrap_or_else(|err| panic!("UDP to {addr}: {err:#}"));
    assert_eq!(replies.len(), 150);
    e.assert_spread("UDP over IPv4", &replies, 15.0, 52.0);

    // The counters saw it too: every real of every VIP forwarded packets.
    let stats: serde_json::Value =
        serde_json::from_str(&e.xlb_ok(&["stats", "--json"])).expect("xlb stats --json is JSON");
    for vip in stats["vips"].as_array().expect("vips") {
        for real in vip["reals"].as_array().expect("reals") {
            assert!(
                real["packets"].as_u64().unwrap_or(0) > 0,
                "xlb stats: {} of {} forwarded nothing: {stats:#}",
                real["addr"],
                vip["vip"]
            );
        }
    }
}

/// Weight 0 drains: no new connection reaches the real, an established one keeps working on it.
#[test]
fn weight_zero_drains() {
    let Some(e) = E2e::start("weight_zero_drains", vec![IpAddr::V4(lab::VIP4)]) else {
        return;
    };
    e.add_vip(TCP4, false);
    let url = e.url4();
    let mut ka = e.keepalive("keep-alive", &url, 50);
    let a = e.real(&ka.first_real());
    ka.wait_more(3);

    e.step(&format!(
        "the kept-alive connection is on {}: draining it",
        a.role
    ));
    e.xlb_ok(&["real", "weight", TCP4, &a.ipv4.to_string(), "0"]);
    let before = ka.poll();

    e.step("200 new connections");
    let spread = Spread::of(&e.http(&url, 200));
    let table = spread.table(&e.lab.reals);
    assert!(
        spread.failures.is_empty(),
        "new connections failed:\n{table}"
    );
    assert_eq!(
        spread.count(&a.role),
        0,
        "{} was drained (weight 0) but took new connections:\n{table}",
        a.role
    );

    let list = e.xlb_ok(&["list"]);
    let line = list
        .lines()
        .find(|l| l.split_whitespace().next() == Some(a.ipv4.to_string().as_str()))
        .unwrap_or_else(|| panic!("xlb list does not show {}:\n{list}", a.ipv4));
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert!(
        fields.get(1) == Some(&"0") && fields.get(4) == Some(&"draining"),
        "xlb list should show {} with weight 0, draining:\n{list}",
        a.ipv4
    );
    for other in e.lab.reals.iter().filter(|r| r.role != a.role) {
        assert!(
            list.lines()
                .any(|l| l.contains(&format!(" {} ", other.ipv4)) && l.contains(" active ")),
            "xlb list should show {} active:\n{list}",
            other.ipv4
        );
    }

    ka.wait_more(10);
    let replies = ka.stop();
    assert!(
        replies.len() >= before + 10,
        "the kept-alive connection stalled after the drain: {}",
        summary(&replies)
    );
    assert_all_from("the kept-alive connection", &replies, &a.role);
}

/// Removing a real moves only its flows: kept-alive connections to the other reals keep
/// working on the same real, and new connections never reach the removed one.
#[test]
fn removing_a_real_moves_only_its_flows() {
    let Some(e) = E2e::start(
        "removing_a_real_moves_only_its_flows",
        vec![IpAddr::V4(lab::VIP4)],
    ) else {
        return;
    };
    e.add_vip(TCP4, false);
    let url = e.url4();
    // Connections until every real holds at least two (each lands on a real with p = 1/3).
    let mut conns: Vec<(String, Stream)> = Vec::new();
    let enough = |conns: &[(String, Stream)]| {
        e.lab
            .reals
            .iter()
            .all(|r| conns.iter().filter(|(n, _)| *n == r.role).count() >= 2)
    };
    while !enough(&conns) {
        assert!(
            conns.len() < 40,
            "40 connections and still a real with fewer than 2: {:?}",
            conns.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>()
        );
        let mut s = e.keepalive(&format!("keep-alive #{}", conns.len()), &url, 50);
        let real = s.first_real();
        conns.push((real, s));
    }
    e.step(&format!("{} kept-alive connections", conns.len()));
    for (_, s) in &mut conns {
        s.wait_total(3);
    }

    let b = e.lab.reals[1].clone();
    e.step(&format!("removing {}", b.role));
    let marks: Vec<usize> = conns.iter_mut().map(|(_, s)| s.poll()).collect();
    e.xlb_ok(&["real", "del", TCP4, &b.ipv4.to_string()]);
    let list = e.xlb_ok(&["list"]);
    assert!(
        !list.contains(&format!(" {} ", b.ipv4)),
        "xlb list still shows {} after its removal:\n{list}",
        b.ipv4
    );

    e.step("150 new connections");
    let spread = Spread::of(&e.http(&url, 150));
    let table = spread.table(&e.lab.reals);
    assert!(
        spread.failures.is_empty(),
        "new connections failed:\n{table}"
    );
    assert_eq!(
        spread.count(&b.role),
        0,
        "new connections reached the removed {}:\n{table}",
        b.role
    );

    e.step("the kept-alive connections after the removal");

    for ((_, s), mark) in conns.iter_mut().zip(&marks) {
        s.wait_total(mark + 20);
    }
    for ((real, s), mark) in conns.into_iter().zip(marks) {
        let label = format!("{} (on {real})", s.label);
        let replies = s.stop();
        if real == b.role {
            // Its real is gone: the connection may be reset. Only said, not asserted.
            eprintln!(
                "{label}, whose real was removed: {}",
                summary(&replies[mark..])
            );
            continue;
        }
        assert!(
            replies.len() >= mark + 20,
            "{label} stalled after {} was removed: {}",
            b.role,
            summary(&replies)
        );
        assert_all_from(&label, &replies, &real);
    }
}

/// The daemon SIGKILLed and restarted while traffic runs: forwarding never stops, the new
/// daemon adopts the pinned program and maps and rewrites no ring.
#[test]
fn daemon_sigkill_restart_is_hitless() {
    let Some(mut e) = E2e::start(
        "daemon_sigkill_restart_is_hitless",
        vec![IpAddr::V4(lab::VIP4)],
    ) else {
        return;
    };
    e.add_vip(TCP4, false);
    let url = e.url4();
    let mut ka = e.keepalive("keep-alive", &url, 50);
    let ka_real = ka.first_real();
    let mut fresh = e.stream(
        "new connections",
        &["--url", &url, "--count", "1000000", "--interval-ms", "20"],
    );
    fresh.first_real();
    ka.wait_more(3);
    fresh.wait_more(10);

    let list_before = e.xlb_ok(&["list"]);
    let save_before = e.xlb_ok(&["save"]);
    let packets_before = e.vip_packets(TCP4);
    let log_len = e.daemon_log().len();

    e.step(&format!(
        "SIGKILL to the daemon (kept-alive connection on {ka_real})"
    ));
    let status = e
        .lab
        .stop_daemon(libc::SIGKILL)
        .expect("killing the daemon");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "the daemon should have died of SIGKILL: {status}"
    );
    // No daemon: the pinned program forwards on.
    let at_kill = fresh.poll();
    fresh.wait_more(10);
    ka.wait_more(3);

    e.step("restarting the daemon");
    let hello = e
        .lab
        .start_daemon(&e.xlb, &[])
        .unwrap_or_else(|err| panic!("restarting the daemon: {err:#}"));
    // The adopted link runs natively still, and hello says so (as the kernel reports it).
    assert_eq!(
        hello.xdp_mode, "native",
        "after adoption xdp_mode is the mode the program runs in: {hello:?}"
    );
    let log = e.daemon_log();
    let restart_log = &log[log_len..];
    assert!(
        restart_log.contains("replaced on the pinned link")
            && restart_log.contains("maps adopted")
            && restart_log.contains("(0 rings rewritten,"),
        "the restarted daemon should adopt the link and the maps and rewrite no ring; its \
         log:\n{restart_log}"
    );
    let at_restart = fresh.poll();

    e.step("traffic after the restart");
    ka.wait_more(10);
    fresh.wait_more(40);
    let list_after = e.xlb_ok(&["list"]);
    assert_eq!(
        list_after, list_before,
        "xlb list changed across the restart"
    );
    assert_eq!(e.xlb_ok(&["save"]), save_before, "xlb save changed");
    let packets_after = e.vip_packets(TCP4);
    assert!(
        packets_after > packets_before,
        "the counters should carry on in the adopted maps: {packets_before} packets before the \
         restart, {packets_after} after"
    );

    let new_conns = fresh.stop();
    let spread = Spread::of(&new_conns);
    assert!(
        spread.failures.is_empty(),
        "new connections failed around the restart: {}",
        summary(&new_conns)
    );
    assert!(
        new_conns.len() >= at_kill + 50,
        "the new-connection client stalled: {}",
        summary(&new_conns)
    );
    let after = Spread::of(&new_conns[at_restart..]);
    for r in &e.lab.reals {
        assert!(
            after.count(&r.role) > 0,
            "after the restart no new connection reached {}:\n{}",
            r.role,
            after.table(&e.lab.reals)
        );
    }
    assert_all_from("the kept-alive connection", &ka.stop(), &ka_real);
}

/// Malformed config files and command lines are refused, naming what is wrong, and change
/// nothing.
#[test]
fn bad_input_changes_nothing() {
    let Some(e) = E2e::start("bad_input_changes_nothing", vec![IpAddr::V4(lab::VIP4)]) else {
        return;
    };
    e.add_vip(TCP4, false);
    let save0 = e.xlb_ok(&["save"]);
    let list0 = e.xlb_ok(&["list"]);
    let unchanged = |after: &str| {
        assert_eq!(e.xlb_ok(&["save"]), save0, "xlb save changed after {after}");
        assert_eq!(e.xlb_ok(&["list"]), list0, "xlb list changed after {after}");
    };

    // Each file would change the state (r1's weight, a new VIP) were it accepted.
    let good_vip = "[[vip]]\naddr = \"10.222.1.100:80\"\nproto = \"tcp\"\nreals = [\n  { addr = \
                    \"10.222.0.11\", weight = 5 },\n  { addr = \"10.222.0.12\" },\n]\n";
    let files: [(&str, String, &[&str]); 6] = [
        (
            "syntax error",
            format!("version = 1\n{good_vip}[[vip]\naddr = \"10.222.1.100:81\"\n"),
            &["line 9"],
        ),
        (
            "unknown key",
            format!("version = 1\n{good_vip}[[vip]]\naddr = \"10.222.1.100:81\"\nproto = \"tcp\"\nport = 81\n"),
            &["line 12", "vip[1].port", "unknown key"],
        ),
        (
            "bad address",
            format!("version = 1\n{good_vip}[[vip]]\naddr = \"10.0.0.300:80\"\nproto = \"tcp\"\n"),
            &["line 10", "vip[1].addr", "10.0.0.300", "bad IPv4 address"],
        ),
        (
            "weight 70000",
            "version = 1\n[[vip]]\naddr = \"10.222.1.100:80\"\nproto = \"tcp\"\nreals = [\n  { \
             addr = \"10.222.0.11\", weight = 70000 },\n]\n"
                .to_string(),
            &["line 6", "vip[0].reals[0].weight", "70000"],
        ),
        (
            "duplicate VIP",
            format!("version = 1\n{good_vip}{good_vip}"),
            &["line 10", "duplicate VIP tcp/10.222.1.100:80"],
        ),
        (
            "version 2",
            format!("version = 2\n{good_vip}"),
            &["line 1", "version", "unsupported version 2"],
        ),
    ];
    for (what, text, expected) in files {
        let path = e.lab.dir.join("bad.toml");
        std::fs::write(&path, &text).expect("writing the config file");
        let path = path.display().to_string();
        for dry in [false, true] {
            let mut args = vec!["apply", "-f", path.as_str()];
            if dry {
                args.push("--dry-run");
            }
            let (_, stderr) = e.xlb_fails(&args);
            for want in expected {
                assert!(
                    stderr.contains(want),
                    "xlb {} with a config file with a {what} should say {want:?}; it said: \
                     {stderr}\nthe file:\n{text}",
                    args.join(" ")
                );
            }
        }
        unchanged(&format!("a config file with a {what}"));
    }

    let cli: [(&[&str], &[&str]); 7] = [
        (
            &["vip", "add", "tcp/10.0.0.300:80"],
            &["tcp/10.0.0.300:80", "bad IPv4 address"],
        ),
        (
            &["real", "add", TCP4, "10.0.0.x"],
            &["10.0.0.x", "expected an IPv4 or IPv6 address"],
        ),
        (
            &["real", "add", "tcp/10.222.1.100:8080", "10.222.0.11"],
            &["tcp/10.222.1.100:8080", "does not exist"],
        ),
        (
            &["real", "add", TCP4, "10.222.0.14", "--weight", "70000"],
            &["weight", "70000"],
        ),
        (
            &["real", "weight", TCP4, "10.222.0.11", "70000"],
            &["weight", "70000"],
        ),
        (
            &["real", "add", TCP4, "fd00:222::11"],
            &["fd00:222::11", "IPv4"],
        ),
        (&["vip", "add", TCP4], &["tcp/10.222.1.100:80", "exists"]),
    ];
    for (args, expected) in cli {
        let (code, stderr) = e.xlb_fails(args);
        for want in expected {
            assert!(
                stderr.contains(want),
                "`xlb {}` (exit {code}) should say {want:?}; it said: {stderr}",
                args.join(" ")
            );
        }
        unchanged(&format!("`xlb {}`", args.join(" ")));
    }

    // The same bad requests straight over the socket (the CLI refuses most of them before
    // sending): the daemon refuses each, naming the field, and changes nothing.
    let req = |op: api::Op| e.lab.api(op).unwrap_or_else(|err| panic!("{err:#}"));
    let raw: [(&str, api::Op, api::ErrorCode, &str, &str); 8] = [
        (
            "bad VIP address",
            api::Op::VipAdd {
                mode: None,
                vip: "tcp/10.0.0.300:80".into(),
                flags: vec![],
            },
            api::ErrorCode::InvalidArgument,
            "vip",
            "bad IPv4 address",
        ),
        (
            "v4-mapped VIP",
            api::Op::VipAdd {
                mode: None,
                vip: "tcp/[::ffff:10.222.1.100]:80".into(),
                flags: vec![],
            },
            api::ErrorCode::InvalidArgument,
            "vip",
            "write the IPv4 VIP as tcp/10.222.1.100:80",
        ),
        (
            "bad real address",
            api::Op::RealAdd {
                mode: None,
                vip: TCP4.into(),
                real: "10.0.0.x".into(),
                weight: 1,
            },
            api::ErrorCode::InvalidArgument,
            "real",
            "10.0.0.x",
        ),
        (
            "weight above the maximum",
            api::Op::RealAdd {
                mode: None,
                vip: TCP4.into(),
                real: "10.222.0.14".into(),
                weight: 70000,
            },
            api::ErrorCode::InvalidArgument,
            "weight",
            "70000",
        ),
        (
            "weight above the maximum, reweighting",
            api::Op::RealWeight {
                vip: TCP4.into(),
                real: "10.222.0.11".into(),
                weight: 70000,
            },
            api::ErrorCode::InvalidArgument,
            "weight",
            "70000",
        ),
        (
            "real of the other family",
            api::Op::RealAdd {
                mode: None,
                vip: TCP4.into(),
                real: "fd00:222::11".into(),
                weight: 1,
            },
            api::ErrorCode::InvalidArgument,
            "real",
            "different address families",
        ),
        (
            "unknown flag",
            api::Op::VipAdd {
                mode: None,
                vip: "tcp/10.222.1.100:81".into(),
                flags: vec!["no-such-flag".into()],
            },
            api::ErrorCode::InvalidArgument,
            "flags",
            "no-such-flag",
        ),
        (
            "real of a VIP that does not exist",
            api::Op::RealDel {
                vip: "tcp/10.222.1.100:8080".into(),
                real: "10.222.0.11".into(),
            },
            api::ErrorCode::NotFound,
            "vip",
            "does not exist",
        ),
    ];
    for (what, op, code, field, says) in raw {
        let resp = req(op);
        let err = resp
            .error
            .unwrap_or_else(|| panic!("{what}: accepted over the socket: {:?}", resp.result));
        assert!(!resp.ok, "{what}");
        assert_eq!(err.code, code, "{what}: {err:?}");
        assert_eq!(err.field.as_deref(), Some(field), "{what}: {err:?}");
        assert!(
            err.message.contains(says),
            "{what}: {:?} lacks {says:?}",
            err.message
        );
        unchanged(&format!("a socket request with a {what}"));
    }

    let spread = e.http(&e.url4(), 60);
    e.assert_spread("HTTP after the refusals", &spread, 5.0, 80.0);
}

/// A second daemon for the same interface (and pin root), even with a socket of its own, is
/// refused; the first keeps serving and forwarding.
#[test]
fn second_daemon_on_the_same_interface_is_refused() {
    let Some(e) = E2e::start(
        "second_daemon_on_the_same_interface_is_refused",
        vec![IpAddr::V4(lab::VIP4)],
    ) else {
        return;
    };
    e.add_vip(TCP4, false);
    let link_before = e.lb_link();
    assert!(
        link_before.contains("xdp"),
        "no XDP program:\n{link_before}"
    );

    let second_socket = e.lab.dir.join("second.sock");
    let mut args = e.lab.daemon_args(&e.xlb, &[]);
    let at = args
        .iter()
        .position(|a| a == "--socket")
        .expect("the lab gives --socket");
    args[at + 1] = second_socket.display().to_string();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut second = e
        .lab
        .spawn_with(&e.lab.lb.ns, &args, |c| {
            c.stdout(Stdio::null()).stderr(Stdio::piped());
        })
        .expect("starting the second daemon");
    let status = wait_exit(
        &mut second,
        "the second daemon (it should refuse to run)",
        Duration::from_secs(15),
    );
    let mut stderr = String::new();
    if let Some(mut err) = second.stderr.take() {
        let _ = err.read_to_string(&mut stderr);
    }
    assert!(
        !status.success(),
        "the second daemon exited with success: {stderr}"
    );
    assert!(
        stderr.contains("another xlb daemon"),
        "the second daemon should say another daemon runs; it said: {stderr}"
    );
    assert!(
        !second_socket.exists(),
        "the refused daemon left its socket {}",
        second_socket.display()
    );

    let hello = e.lab.hello().expect("the first daemon answers");
    assert_eq!(hello.iface, e.lab.lb.iface);
    assert_eq!(
        e.lb_link(),
        link_before,
        "the XDP attachment changed (the program was replaced)"
    );
    e.wait_active(TCP4, 3);
    let spread = e.http(&e.url4(), 60);
    e.assert_spread("HTTP after the refusal", &spread, 5.0, 80.0);
}

/// `xlb apply -f` (dry run first), `xlb save` back, and idempotence.
#[test]
fn apply_and_save_round_trip() {
    let Some(e) = E2e::start_dual("apply_and_save_round_trip") else {
        return;
    };
    let empty_save = e.xlb_ok(&["save"]);
    let [r1, r2, r3] = [0, 1, 2].map(|i| e.lab.reals[i].clone());
    let text = format!(
        "# two VIPs\n\
         version = 1\n\
         \n\
         [[vip]]\n\
         addr = \"10.222.1.100:80\"\n\
         proto = \"tcp\"\n\
         reals = [\n\
         \x20 {{ addr = \"{}\", weight = 1 }},\n\
         \x20 {{ addr = \"{}\", weight = 2 }},\n\
         \x20 {{ addr = \"{}\", weight = 3 }},\n\
         ]\n\
         \n\
         [[vip]]\n\
         addr = \"[fd00:222:1::100]:80\"\n\
         proto = \"tcp\"\n\
         flags = [\"no-src-port\"]\n\
         reals = [ {{ addr = \"{}\" }}, {{ addr = \"{}\", weight = 0 }} ]\n",
        r1.ipv4, r2.ipv4, r3.ipv4, r1.ipv6, r2.ipv6
    );
    let file = e.lab.dir.join("xlb.toml");
    std::fs::write(&file, &text).expect("writing the config file");
    let file = file.display().to_string();
    let expected_lines = [
        format!("+ vip {TCP4}"),
        format!("+ real {TCP4} {} weight 1", r1.ipv4),
        format!("+ real {TCP4} {} weight 2", r2.ipv4),
        format!("+ real {TCP4} {} weight 3", r3.ipv4),
        format!("+ vip {TCP6} [no-src-port]"),
        format!("+ real {TCP6} {} weight 1", r1.ipv6),
        format!("+ real {TCP6} {} weight 0", r2.ipv6),
    ];

    e.step("dry run");
    let dry = e.xlb_ok(&["apply", "-f", &file, "--dry-run"]);
    for want in &expected_lines {
        assert!(
            dry.lines().any(|l| l.starts_with(want.as_str())),
            "the dry run should show {want:?}:\n{dry}"
        );
    }
    assert!(
        dry.contains("dry run: nothing was applied"),
        "the dry run should say nothing was applied:\n{dry}"
    );
    assert_eq!(
        e.xlb_ok(&["save"]),
        empty_save,
        "the dry run changed the config"
    );
    assert_eq!(e.xlb_ok(&["list"]), "no VIPs\n", "the dry run added VIPs");

    e.step("apply");
    let applied = e.xlb_ok(&["apply", "-f", &file]);
    for want in &expected_lines {
        assert!(
            applied.lines().any(|l| l.starts_with(want.as_str())),
            "xlb apply should show {want:?}:\n{applied}"
        );
    }
    assert!(!applied.contains("dry run"), "{applied}");

    let saved = e.xlb_ok(&["save"]);
    let want = config::parse_config(&text).expect("the test's config parses");
    let got = config::parse_config(&saved)
        .unwrap_or_else(|err| panic!("xlb save output does not parse: {err}\n{saved}"));
    assert_eq!(
        got, want,
        "xlb save differs from the applied file:\n{saved}"
    );

    // The data path follows: weights 1:2:3 over IPv4; over IPv6 (no-src-port: one client, one
    // real) always r1, never the drained r2.
    e.step("traffic through the applied config");
    e.wait_active(TCP4, 3);
    let spread = Spread::of(&e.http(&e.url4(), 300));
    let table = spread.table(&e.lab.reals);
    assert!(spread.failures.is_empty(), "requests failed:\n{table}");
    assert!(
        spread.count("r1") > 0 && spread.count("r1") < spread.count("r3"),
        "weights 1:2:3 should give r1 the fewest requests and fewer than r3:\n{table}"
    );
    e.wait_active(TCP6, 1);
    let v6 = Spread::of(&e.http(&e.lab.url(IpAddr::V6(lab::VIP6)), 20));
    assert!(
        v6.failures.is_empty() && v6.count("r1") == 20,
        "every IPv6 request should go to r1 (r2 drained, no-src-port):\n{}{}",
        v6.table(&e.lab.reals),
        e.diagnosis()
    );

    // A change shown by a dry run, and not made.
    e.step("dry run of a change");
    let changed = e.lab.dir.join("changed.toml");
    let changed_text = text.replace(
        &format!("\"{}\", weight = 1", r1.ipv4),
        &format!("\"{}\", weight = 4", r1.ipv4),
    );
    let changed_text = &changed_text[..changed_text
        .find("\n[[vip]]\naddr = \"[")
        .expect("second VIP")];
    std::fs::write(&changed, changed_text).expect("writing the changed config");
    let dry = e.xlb_ok(&["apply", "-f", &changed.display().to_string(), "--dry-run"]);
    for want in [
        format!("~ real {TCP4} {} weight 1 -> 4", r1.ipv4),
        format!("- vip {TCP6}"),
    ] {
        assert!(
            dry.lines().any(|l| l == want),
            "the dry run should show {want:?}:\n{dry}"
        );
    }
    assert_eq!(
        dry.lines().count(),
        3,
        "two changes and the dry-run note:\n{dry}"
    );
    assert_eq!(e.xlb_ok(&["save"]), saved, "the dry run changed the config");

    // Idempotence: the same file again, and the output of `xlb save`, change nothing.
    e.step("applying the same config again");
    assert_eq!(
        e.xlb_ok(&["apply", "-f", &file]),
        "no changes\n",
        "applying the same file again"
    );
    let saved_file = e.lab.dir.join("saved.toml");
    std::fs::write(&saved_file, &saved).expect("writing the saved config");
    assert_eq!(
        e.xlb_ok(&["apply", "-f", &saved_file.display().to_string()]),
        "no changes\n",
        "applying the output of xlb save"
    );
    assert_eq!(e.xlb_ok(&["save"]), saved, "xlb save changed");
}

/// `xlb down` removes the program, the pins and the socket, and the daemon exits 0.
#[test]
fn down_removes_everything() {
    let Some(mut e) = E2e::start("down_removes_everything", vec![IpAddr::V4(lab::VIP4)]) else {
        return;
    };
    e.add_vip(TCP4, false);
    let url = e.url4();
    let spread = Spread::of(&e.http(&url, 30));
    assert!(spread.failures.is_empty(), "{}", spread.table(&e.lab.reals));
    let link = e.lb_link();
    assert!(link.contains("xdp"), "no XDP program before down:\n{link}");
    let pin_dir = e.lab.pin_root().join(&e.lab.lb.iface);
    assert!(
        std::fs::read_dir(&pin_dir).map(|d| d.count()).unwrap_or(0) > 0,
        "nothing pinned under {}",
        pin_dir.display()
    );

    // `down --iface` through a wrong socket while the daemon runs: refused, nothing removed
    // (the daemon holds the interface's lock).
    let pin_root = e.lab.pin_root().display().to_string();
    let iface = e.lab.lb.iface.clone();
    let (code, stderr) = e.xlb_fails(&[
        "--socket",
        "/run/xlb/no-such-daemon.sock",
        "down",
        "--iface",
        &iface,
        "--pin-root",
        &pin_root,
    ]);
    assert!(
        code == 1 && stderr.contains("a daemon runs") && stderr.contains("nothing was removed"),
        "down --iface with a wrong socket (exit {code}): {stderr}"
    );
    assert!(e.lb_link().contains("xdp"), "the program was detached");
    assert!(
        std::fs::read_dir(&pin_dir).map(|d| d.count()).unwrap_or(0) > 0,
        "the pins were removed under a running daemon"
    );
    let spread = Spread::of(&e.http(&url, 10));
    assert!(spread.failures.is_empty(), "{}", spread.table(&e.lab.reals));

    let out = e.xlb_ok(&["down"]);
    assert!(out.contains("down"), "{out}");
    let daemon = e.lab.daemon().expect("the lab owns the daemon");
    let status = wait_exit(daemon, "the daemon after xlb down", Duration::from_secs(10));
    assert!(status.success(), "the daemon exited with {status}");

    let socket = e.lab.socket();
    assert!(
        !socket.exists(),
        "the socket {} is still there",
        socket.display()
    );
    let left: Vec<String> = std::fs::read_dir(&pin_dir)
        .map(|d| {
            d.flatten()
                .map(|x| x.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "pins left under {}: {left:?}",
        pin_dir.display()
    );
    let link = e.lb_link();
    assert!(
        !link.contains("xdp"),
        "an XDP program is still attached after down:\n{link}"
    );
    // The lock file stays (unlinking a held lock would let two daemons lock two files), and
    // a new daemon can take it.
    let lock = lb_userspace::daemon::lock_path(&pin_dir);
    assert!(
        lock.exists(),
        "the lock file {} was removed",
        lock.display()
    );
    drop(lb_userspace::daemon::lock(&pin_dir).expect("the lock is free after down"));
    let (code, stderr) = e.xlb_fails(&["list"]);
    assert!(
        code == 3 && stderr.contains("cannot reach the daemon"),
        "after down, xlb list should fail to reach the daemon (exit 3); it exited {code}: \
         {stderr}"
    );
    let replies = e
        .lab
        .http(&e.client_ns(), &url, 2)
        .unwrap_or_else(|err| panic!("requests: {err:#}"));
    assert!(
        replies.iter().all(|r| r.is_err()),
        "requests to the VIP should fail once nothing forwards: {replies:?}"
    );
}

/// A VIP deleted and added again gets the same id back (lowest free), and its counters must
/// start from zero, not from what the previous VIP of that id counted.
#[test]
fn a_new_vip_does_not_inherit_counters() {
    let Some(mut e) = E2e::start_dual("a_new_vip_does_not_inherit_counters") else {
        return;
    };
    // Short idle timeouts make a short quarantine (4 s): freed real ids come back in time.
    e.step("restarting the daemon with --tcp-idle 2s --udp-idle 2s");
    e.lab
        .stop_daemon(libc::SIGTERM)
        .expect("stopping the daemon");
    e.lab
        .start_daemon(&e.xlb, &["--tcp-idle", "2s", "--udp-idle", "2s"])
        .unwrap_or_else(|err| panic!("restarting the daemon: {err:#}"));
    let stats = |e: &E2e| -> api::StatsReply {
        let resp = e
            .lab
            .api(api::Op::Stats {})
            .unwrap_or_else(|err| panic!("stats: {err:#}"));
        match resp.result {
            Some(api::Reply::Stats(s)) if resp.ok => s,
            _ => panic!("unexpected answer to stats: {resp:?}"),
        }
    };
    let ids = |e: &E2e| -> (u32, Vec<u32>) {
        let list = e.list();
        let v = &list.vips[0];
        (v.id, v.reals.iter().map(|r| r.id).collect())
    };
    e.add_vip(TCP4, false);
    let ids0 = ids(&e);
    let replies = e.http(&e.url4(), 20);
    assert!(replies.iter().all(Result::is_ok), "{}", summary(&replies));
    let before = stats(&e);
    assert!(before.vips[0].counters.packets > 0, "traffic was counted");
    assert!(
        before.vips[0].reals.iter().all(|r| r.counters.packets > 0),
        "every real counted traffic: {:?}",
        before.vips[0].reals
    );
    e.step("deleting the VIP, waiting out the quarantine, re-adding it");
    e.xlb_ok(&["vip", "del", TCP4]);
    std::thread::sleep(Duration::from_secs(5));
    e.add_vip(TCP4, false);
    // The same ids again: the counters checked below are those of ids that counted before.
    assert_eq!(
        ids(&e),
        ids0,
        "the VIP and its reals did not get their ids back"
    );
    let after = stats(&e);
    assert_eq!(
        after.vips[0].counters.packets, 0,
        "the re-added VIP inherited counters: {:?}",
        after.vips[0]
    );
    assert!(
        after.vips[0].reals.iter().all(|r| r.counters.packets == 0),
        "a re-added real inherited counters: {:?}",
        after.vips[0].reals
    );
}

/// The state file is lost while flows are tracked; the operator restarts the daemon and adds
/// the same config again, reals in another order (so a fresh numbering would give them other
/// ids). Ids left in the adopted maps must not be handed to other reals: every kept-alive
/// connection resumes on its own real, without a reset.
#[test]
fn a_lost_state_file_misroutes_no_tracked_flow() {
    let Some(mut e) = E2e::start(
        "a_lost_state_file_misroutes_no_tracked_flow",
        vec![IpAddr::V4(lab::VIP4)],
    ) else {
        return;
    };
    let reals: Vec<String> = e.lab.reals.iter().map(|r| r.ipv4.to_string()).collect();
    e.xlb_ok(&["vip", "add", TCP4]);
    for r in reals.iter().rev() {
        e.xlb_ok(&["real", "add", TCP4, r]);
    }
    e.wait_active(TCP4, reals.len());
    let url = e.url4();
    // Kept-alive connections until the first and the last real (whose ids a forward
    // numbering would swap) each hold one.
    let first = e.lab.reals[0].role.clone();
    let last = e.lab.reals[reals.len() - 1].role.clone();
    let mut conns = Vec::new();
    for i in 0..40 {
        let mut ka = e.keepalive(&format!("keep-alive #{i}"), &url, 100);
        let real = ka.first_real();
        conns.push((ka, real));
        let on = |name: &str| conns.iter().any(|(_, r)| r == name);
        if on(&first) && on(&last) {
            break;
        }
    }
    assert!(
        conns.iter().any(|(_, r)| *r == first) && conns.iter().any(|(_, r)| *r == last),
        "no kept-alive connection landed on {first} and {last}"
    );

    e.step("SIGKILL, state file removed, restart, the same config applied (ids by address)");
    e.lab
        .stop_daemon(libc::SIGKILL)
        .expect("killing the daemon");
    std::fs::remove_file(e.lab.state_file()).expect("removing the state file");
    e.lab
        .start_daemon(&e.xlb, &[])
        .unwrap_or_else(|err| panic!("restarting the daemon: {err:#}"));
    // One apply, as an operator restores a config: the VIP comes back with all its reals at
    // once (added one by one, a flow re-picked while only some were back would move).
    let config = format!(
        "version = 1\n[[vip]]\naddr = \"{}:80\"\nproto = \"tcp\"\nreals = [ {} ]\n",
        lab::VIP4,
        reals
            .iter()
            .map(|r| format!("{{ addr = \"{r}\" }}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let path = e.lab.dir.join("restore.toml");
    std::fs::write(&path, config).expect("writing the config");
    e.xlb_ok(&["apply", "-f", path.to_str().expect("utf-8 path")]);
    e.wait_active(TCP4, reals.len());

    for (ka, real) in &mut conns {
        ka.wait_more(5);
        let _ = real;
    }
    for (ka, real) in conns {
        let label = ka.label.clone();
        assert_all_from(&label, &ka.stop(), &real);
    }
}

/// `list` and `stats` answer at once while a `real add` waits for an unresolvable MAC (the
/// daemon resolves without holding anything the readers need); the unresolved real is then
/// counted as it is, not as a running total.
#[test]
fn reads_answer_while_a_real_add_waits_for_arp() {
    let Some(e) = E2e::start(
        "reads_answer_while_a_real_add_waits_for_arp",
        vec![IpAddr::V4(lab::VIP4)],
    ) else {
        return;
    };
    e.add_vip(TCP4, false);
    let stats = |e: &E2e| -> api::StatsReply {
        let resp = e
            .lab
            .api(api::Op::Stats {})
            .unwrap_or_else(|err| panic!("stats: {err:#}"));
        match resp.result {
            Some(api::Reply::Stats(s)) if resp.ok => s,
            _ => panic!("unexpected answer to stats: {resp:?}"),
        }
    };
    assert_eq!(stats(&e).unresolved_reals, 0);
    // Nobody has 10.222.0.99: the add waits ~1.5 s for ARP before adding it unresolved.
    let mut add = std::process::Command::new(&e.xlb)
        .args(["--socket", &e.lab.socket().display().to_string()])
        .args(["real", "add", TCP4, "10.222.0.99"])
        .spawn()
        .expect("starting xlb real add");
    std::thread::sleep(Duration::from_millis(200));
    for args in [&["list"][..], &["stats"][..], &["save"][..]] {
        let t = Instant::now();
        e.xlb_ok(args);
        let took = t.elapsed();
        assert!(
            took < Duration::from_millis(600),
            "`xlb {}` took {took:?} while a real add waited for ARP",
            args.join(" ")
        );
    }
    assert!(
        add.try_wait().expect("waiting").is_none(),
        "the add did not wait for ARP: the test measured nothing"
    );
    let status = wait_exit(&mut add, "xlb real add", Duration::from_secs(10));
    assert!(status.success(), "real add: {status}");
    let s = stats(&e);
    assert_eq!(s.unresolved_reals, 1, "{s:?}");
    assert!(s.mac_resolution_failures >= 1, "{s:?}");
    let failures = s.mac_resolution_failures;
    e.xlb_ok(&["real", "del", TCP4, "10.222.0.99"]);
    // Refreshes go on: the count is the current one, the failures a running total.
    std::thread::sleep(Duration::from_millis(2500));
    let s = stats(&e);
    assert_eq!(s.unresolved_reals, 0, "{s:?}");
    assert_eq!(s.mac_resolution_failures, failures, "{s:?}");
}

/// A daemon out of file descriptors keeps its accept loop calm (a pause after each failure,
/// not a busy loop flooding the log) and serves again once clients go.
#[test]
fn running_out_of_file_descriptors_does_not_spin() {
    let Some(mut e) = E2e::start(
        "running_out_of_file_descriptors_does_not_spin",
        vec![IpAddr::V4(lab::VIP4)],
    ) else {
        return;
    };
    let pid = e.lab.daemon().expect("daemon").id();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the daemon's fds")
        .count();
    e.step(&format!(
        "restarting the daemon with {} file descriptors",
        fds + 4
    ));
    e.lab.stop_daemon(libc::SIGTERM).expect("stopping");
    let wrapper = e.lab.dir.join("xlb-nofile");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec prlimit --nofile={n}:{n} {} \"$@\"\n",
            e.xlb.display(),
            n = fds + 4
        ),
    )
    .expect("writing the wrapper");
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    e.lab
        .start_daemon(&wrapper, &[])
        .unwrap_or_else(|err| panic!("restarting under prlimit: {err:#}"));
    let log_len = e.daemon_log().len();
    let socket = e.lab.socket();
    let held: Vec<std::os::unix::net::UnixStream> = (0..40)
        .map(|_| std::os::unix::net::UnixStream::connect(&socket).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let log = e.daemon_log();
    let failures = log[log_len..]
        .matches("accepting a control connection")
        .count();
    assert!(
        (1..=3).contains(&failures),
        "{failures} accept failures logged in 2 s (expected the first, then a calm retry):\n{}",
        &log[log_len..]
    );
    drop(held);
    std::thread::sleep(Duration::from_millis(500));
    let hello = e.lab.hello().expect("the daemon answers again");
    assert_eq!(hello.iface, e.lab.lb.iface);
}
