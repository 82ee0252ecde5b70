//! `xlb trace` end to end: while UDP clients send from chosen ports, a trace of the VIP
//! prints each datagram's decision, naming the real that answered it; a flow's next datagram
//! is traced as its tracked entry's; another VIP's traffic is left out. Needs root.

mod common;

#[path = "common/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::{
    collections::HashMap,
    io::Read,
    net::IpAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use harness::*;
use lb_lab::lab;

/// Runs `xlb trace ARGS` while `traffic` sends (it is called again and again until the trace
/// ends): its standard output.
fn trace_while(e: &E2e, args: &[&str], mut traffic: impl FnMut()) -> String {
    let mut child = Command::new(&e.xlb)
        .arg("trace")
        .args(args)
        .env("XLB_SOCKET", e.lab.socket())
        .stdout(Stdio::piped())
        .spawn()
        .expect("xlb trace");
    let start = Instant::now();
    loop {
        if child.try_wait().expect("xlb trace").is_some() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "xlb trace {args:?} did not end"
        );
        traffic();
    }
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("trace output");
    assert!(child.wait().expect("xlb trace").success());
    out
}

#[test]
fn trace_prints_each_decision_with_the_real_that_answered() {
    let Some(e) = E2e::start("trace", vec![IpAddr::V4(lab::VIP4)]) else {
        return;
    };
    e.add_vip(TCP4, false);
    e.add_vip(UDP4, false);
    let addr_of = |role: &str| e.real(role).ipv4.to_string();

    // New flows, one datagram each (and HTTP to the other VIP, which must not show).
    let mut answered: HashMap<u16, String> = HashMap::new();
    let mut port = 41000u16;
    let out = trace_while(&e, &["--vip", UDP4, "--count", "10", "--json"], || {
        let role = e.udp4_from(port);
        answered.insert(port, addr_of(&role));
        port += 1;
        e.http(&e.url4(), 1);
    });
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|err| panic!("{err}: {l}")))
        .collect();
    assert_eq!(lines.len(), 10, "{out}");
    for l in &lines {
        let sport = l["sport"].as_u64().expect("sport") as u16;
        assert_eq!(l["vip"], UDP4, "{l}");
        assert_eq!(l["proto"], "udp", "{l}");
        assert_eq!(l["src"], "10.222.0.2", "{l}");
        assert_eq!(l["dst"], lab::VIP4.to_string(), "{l}");
        assert_eq!(l["dport"], e.lab.udp_port, "{l}");
        assert_eq!(
            l["real"].as_str(),
            answered.get(&sport).map(String::as_str),
            "{l}"
        );
        assert_eq!(l["how"], "ring", "{l}");
        assert!(l["slot"].as_u64().is_some(), "{l}");
        assert_eq!(l["action"], "tx", "{l}");
        assert!(l["reason"].is_null(), "{l}");
        assert!(l["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{l}");
    }
    e.step("a trace of 10 new UDP flows names the real each one reached, by its ring slot");

    // The same flows again: their tracked entries decide; plain text this time.
    let known: Vec<(u16, String)> = answered.into_iter().collect();
    let mut i = 0;
    let out = trace_while(&e, &["--vip", UDP4, "--count", "3"], || {
        let (port, real) = &known[i % known.len()];
        assert_eq!(&addr_of(&e.udp4_from(*port)), real);
        i += 1;
    });
    assert_eq!(out.lines().count(), 3, "{out}");
    for l in out.lines() {
        assert!(l.contains(" udp 10.222.0.2:"), "{l}");
        assert!(l.contains("(tracked entry) tx"), "{l}");
        let real = known
            .iter()
            .find(|(p, _)| l.contains(&format!("10.222.0.2:{p} ")))
            .map(|(_, r)| r)
            .unwrap_or_else(|| panic!("a port of ours: {l}"));
        assert!(l.contains(&format!("-> {real} ")), "{l}");
    }
    e.step("the same flows again are traced as their tracked entries'");

    // Nothing asked for a trace now: the kernel stops tracing (after its linger).
    std::thread::sleep(Duration::from_secs(3));
    let (_, stderr) = e.xlb_fails(&["trace", "--vip", "tcp/10.9.9.9:80", "--count", "1"]);
    assert!(stderr.contains("10.9.9.9"), "{stderr}");
}
