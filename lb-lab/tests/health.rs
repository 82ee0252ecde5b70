//! Health checks end to end, in a namespace lab with real servers: the lab's own TCP and UDP
//! servers, nginx (HTTP and HTTPS with a self-signed certificate), dnsmasq (DNS), the reals'
//! kernels (ping) and a program (exec). Each test builds its own lab and tears it down. Needs
//! root, nginx, dnsmasq and openssl (`cargo xtask test` installs them).

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
use lb_userspace::api;

/// The real `name` of the VIP `vip` as `xlb list --json` shows it.
fn real_info(e: &E2e, vip: &str, addr: &str) -> api::RealInfo {
    e.list()
        .vips
        .into_iter()
        .find(|v| v.vip == vip)
        .and_then(|v| v.reals.into_iter().find(|r| r.addr == addr))
        .unwrap_or_else(|| panic!("{vip} has no real {addr}"))
}

fn vip_info(e: &E2e, vip: &str) -> api::VipInfo {
    e.list()
        .vips
        .into_iter()
        .find(|v| v.vip == vip)
        .unwrap_or_else(|| panic!("no VIP {vip}"))
}

fn status(e: &E2e, vip: &str, addr: &str) -> String {
    real_info(e, vip, addr)
        .health
        .map(|h| h.status)
        .unwrap_or_default()
}

/// Wait until the real's health status is `want`; how long it took.
fn wait_status(e: &E2e, vip: &str, addr: &str, want: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let info = real_info(e, vip, addr);
        let now = info.health.as_ref().map(|h| h.status.as_str());
        if now == Some(want) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "real {addr} of {vip} is not {want} after {limit:?}: {info:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn addr4(e: &E2e, role: &str) -> String {
    e.real(role).ipv4.to_string()
}

/// A VIP on port 80 of the lab's IPv4 VIP, with the given reals, all active.
fn vip_with(e: &E2e, vip: &str, roles: &[&str]) {
    e.xlb_ok(&["vip", "add", vip]);
    for r in roles {
        e.xlb_ok(&["real", "add", vip, &addr4(e, r)]);
    }
    e.wait_active(vip, roles.len());
}

#[test]
fn a_stopped_server_leaves_the_ring_in_time_and_returns_after_rise() {
    let Some(mut e) = E2e::start("health_stop_and_return", vec![IpAddr::V4(lab::VIP4)]) else {
        return;
    };
    vip_with(&e, TCP4, &["r1", "r2", "r3"]);
    let (interval, timeout, rise, fall) = (500u64, 300u64, 2u64, 3u64);
    e.step("a tcp check on port 80, every 500ms, timeout 300ms, rise 2, fall 3");
    e.xlb_ok(&[
        "check",
        "set",
        TCP4,
        "--type",
        "tcp",
        "--interval",
        "500ms",
        "--timeout",
        "300ms",
        "--rise",
        "2",
        "--fall",
        "3",
    ]);
    let r2 = addr4(&e, "r2");
    // Every real up (they start up) and seen passing.
    let start = Instant::now();
    while real_info(&e, TCP4, &r2).health.map(|h| h.last) != Some("ok".into()) {
        assert!(start.elapsed() < Duration::from_secs(5), "no result for r2");
        std::thread::sleep(Duration::from_millis(50));
    }
    e.step("stop r2's server");
    e.lab.stop_server("r2").expect("stop r2's server");
    // Scheduling and the batch window on top of the worst case.
    let slack = Duration::from_millis(700);
    let worst_down = Duration::from_millis(interval * fall + timeout);
    let took = wait_status(&e, TCP4, &r2, "down", worst_down + slack);
    e.step(&format!(
        "r2 is down after {took:?} (bound {worst_down:?} + slack)"
    ));
    let info = real_info(&e, TCP4, &r2);
    assert_eq!(info.state, "down", "{info:?}");
    assert_eq!(info.effective_weight, 0);
    assert_eq!(
        info.health.as_ref().map(|h| h.last.as_str()),
        Some("connect: refused")
    );
    let replies = e.http(&e.url4(), 90);
    let spread = lab::Spread::of(&replies);
    assert_eq!(spread.count("r2"), 0, "a new connection reached r2");
    assert!(replies.iter().all(|r| r.is_ok()), "{}", summary(&replies));
    assert!(spread.count("r1") > 0 && spread.count("r3") > 0);
    let log = e.daemon_log();
    assert!(
        log.contains(&format!(
            "real {r2} of {TCP4}: up -> down (connect: refused)"
        )),
        "{log}"
    );

    e.step("start r2's server again");
    e.lab.start_server("r2").expect("start r2's server");
    let worst_up = Duration::from_millis(interval * rise);
    let took = wait_status(&e, TCP4, &r2, "up", worst_up + slack);
    e.step(&format!(
        "r2 is up after {took:?} (bound {worst_up:?} + slack)"
    ));
    assert!(e
        .daemon_log()
        .contains(&format!("real {r2} of {TCP4}: down -> up (ok)")));
    let replies = e.http(&e.url4(), 90);
    assert!(
        lab::Spread::of(&replies).count("r2") > 0,
        "r2 takes no flows"
    );
}

/// A self-signed certificate for `www.example.test`, and an nginx on real `role` serving
/// HTTP on 8080 and HTTPS on 8443: `/healthz` answers 200, `/bad` 503.
fn start_nginx(e: &mut E2e, role: &str) {
    let dir = e.lab.dir.join(format!("nginx-{role}"));
    std::fs::create_dir_all(&dir).expect("nginx dir");
    let d = dir.display().to_string();
    let ns = e.real(role).ns;
    e.lab
        .exec(
            &ns,
            &[
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &format!("{d}/key.pem"),
                "-out",
                &format!("{d}/cert.pem"),
                "-days",
                "2",
                "-subj",
                "/CN=www.example.test",
            ],
        )
        .expect("openssl req");
    let locations = "location = /healthz { return 200 \"ok\\n\"; } \
                     location = /bad { return 503; } location / { return 200 \"hello\\n\"; }";
    let conf = format!(
        "user root; worker_processes 1; daemon off; pid {d}/nginx.pid; error_log {d}/error.log;\n\
         events {{ worker_connections 64; }}\n\
         http {{ access_log off; client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
           fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
           server {{ listen 8080; {locations} }}\n\
           server {{ listen 8443 ssl; ssl_certificate {d}/cert.pem;\n\
             ssl_certificate_key {d}/key.pem; {locations} }}\n\
         }}\n"
    );
    std::fs::write(dir.join("nginx.conf"), conf).expect("nginx.conf");
    let child = e
        .lab
        .spawn(
            &ns,
            &[
                "nginx",
                "-p",
                &d,
                "-e",
                &format!("{d}/error.log"),
                "-c",
                &format!("{d}/nginx.conf"),
            ],
        )
        .expect("starting nginx");
    e.lab.own(&format!("nginx {role}"), child);
    wait_listening(e, role, "8443");
}

/// dnsmasq on real `role`, port 5353: `svc.example.test` has an A record and nothing else.
fn start_dnsmasq(e: &mut E2e, role: &str) {
    let r = e.real(role);
    let log = e.lab.dir.join(format!("dnsmasq-{role}.log"));
    let args = [
        "dnsmasq".to_string(),
        "--keep-in-foreground".into(),
        "--conf-file=/dev/null".into(),
        "--no-resolv".into(),
        "--no-hosts".into(),
        "--user=root".into(),
        "--pid-file=".into(),
        "--port=5353".into(),
        "--bind-interfaces".into(),
        format!("--listen-address={}", r.ipv4),
        "--host-record=svc.example.test,10.1.2.3".into(),
        "--local=/example.test/".into(),
        format!("--log-facility={}", log.display()),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let child = e.lab.spawn(&r.ns, &args).expect("starting dnsmasq");
    e.lab.own(&format!("dnsmasq {role}"), child);
    wait_listening(e, role, "5353");
}

/// Wait until something listens on `port` (TCP or UDP) in the real's namespace.
fn wait_listening(e: &E2e, role: &str, port: &str) {
    let ns = e.real(role).ns;
    let start = Instant::now();
    loop {
        let out = e.lab.exec(&ns, &["ss", "-Hlntu"]).unwrap_or_default();
        if out
            .split_whitespace()
            .any(|w| w.ends_with(&format!(":{port}")))
        {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "nothing listens on {role}:{port}: {out}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Set a check with fast timing (every 200ms, rise 1, fall 1) and wait for `want`.
fn check_and_wait(e: &E2e, vip: &str, addr: &str, flags: &[&str], want: &str) -> api::RealInfo {
    let mut args = vec!["check", "set", vip];
    for (flag, value) in [
        ("--interval", "200ms"),
        ("--timeout", "800ms"),
        ("--rise", "1"),
        ("--fall", "1"),
    ] {
        if !flags.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    args.extend_from_slice(flags);
    e.xlb_ok(&args);
    // The status may already be `want` from the check before: wait for a result of this one.
    std::thread::sleep(Duration::from_millis(50));
    let start = Instant::now();
    loop {
        let info = real_info(e, vip, addr);
        let h = info.health.clone().expect("health");
        if h.status == want && h.last != "pending" && (h.successes + h.failures) >= 1 {
            return info;
        }
        assert!(
            start.elapsed() < Duration::from_secs(8),
            "{vip} {flags:?}: real {addr} is not {want}: {info:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn last(info: &api::RealInfo) -> String {
    info.health
        .as_ref()
        .map(|h| h.last.clone())
        .unwrap_or_default()
}

#[test]
fn each_check_type_passes_and_fails_against_a_real_server() {
    let Some(mut e) = E2e::start("health_check_types", vec![IpAddr::V4(lab::VIP4)]) else {
        return;
    };
    let r1 = addr4(&e, "r1");
    start_nginx(&mut e, "r1");
    start_dnsmasq(&mut e, "r1");

    e.step("http: /healthz passes, /bad (503) fails");
    let http = "tcp/10.222.1.100:8080";
    vip_with(&e, http, &["r1"]);
    check_and_wait(
        &e,
        http,
        &r1,
        &["--type", "http", "--path", "/healthz"],
        "up",
    );
    let info = check_and_wait(&e, http, &r1, &["--type", "http", "--path", "/bad"], "down");
    assert_eq!(last(&info), "status 503");
    check_and_wait(
        &e,
        http,
        &r1,
        &[
            "--type",
            "http",
            "--path",
            "/bad",
            "--expect-status",
            "200,500-599",
        ],
        "up",
    );

    e.step("https with a self-signed certificate, SNI from --host");
    let https = "tcp/10.222.1.100:8443";
    vip_with(&e, https, &["r1"]);
    check_and_wait(
        &e,
        https,
        &r1,
        &[
            "--type",
            "https",
            "--path",
            "/healthz",
            "--host",
            "www.example.test",
        ],
        "up",
    );
    let info = check_and_wait(
        &e,
        https,
        &r1,
        &["--type", "https", "--path", "/bad"],
        "down",
    );
    assert_eq!(last(&info), "status 503");
    // Plain HTTP where TLS is expected fails the handshake.
    let info = check_and_wait(
        &e,
        https,
        &r1,
        &["--type", "https", "--port", "8080"],
        "down",
    );
    assert!(last(&info).starts_with("tls: "), "{info:?}");

    e.step("dns against dnsmasq: an A record passes, no AAAA record and an unknown name fail");
    let dns = "udp/10.222.1.100:5353";
    vip_with(&e, dns, &["r1"]);
    check_and_wait(
        &e,
        dns,
        &r1,
        &["--type", "dns", "--name", "svc.example.test"],
        "up",
    );
    let info = check_and_wait(
        &e,
        dns,
        &r1,
        &[
            "--type",
            "dns",
            "--name",
            "svc.example.test",
            "--qtype",
            "AAAA",
        ],
        "down",
    );
    assert_eq!(last(&info), "dns: no answer");
    let info = check_and_wait(
        &e,
        dns,
        &r1,
        &["--type", "dns", "--name", "other.example.test"],
        "down",
    );
    assert!(last(&info).starts_with("dns: "), "{info:?}");

    e.step("udp against the lab's echo (it answers its name)");
    vip_with(&e, UDP4_, &["r1"]);
    check_and_wait(
        &e,
        UDP4_,
        &r1,
        &["--type", "udp", "--send", "hello", "--expect", "r1"],
        "up",
    );
    let info = check_and_wait(
        &e,
        UDP4_,
        &r1,
        &["--type", "udp", "--send", "hello", "--expect", "r9"],
        "down",
    );
    assert!(last(&info).starts_with("reply does not match"), "{info:?}");
    // Without --expect: up unless the port is unreachable (the real's kernel sends about one
    // ICMP error a second to a host: a faster check would see silence, which is up).
    let info = check_and_wait(
        &e,
        UDP4_,
        &r1,
        &["--type", "udp", "--port", "5999", "--interval", "1500ms"],
        "down",
    );
    assert_eq!(last(&info), "icmp: port unreachable");
    e.xlb_ok(&["check", "del", UDP4_]);
    assert_eq!(status(&e, UDP4_, &r1), "unchecked");

    e.step("ping: up, then down while r1 ignores echo requests");
    let ping = "tcp/10.222.1.100:81";
    vip_with(&e, ping, &["r1"]);
    check_and_wait(&e, ping, &r1, &["--type", "ping"], "up");
    let ns1 = e.real("r1").ns;
    e.lab
        .exec(&ns1, &["sysctl", "-qw", "net.ipv4.icmp_echo_ignore_all=1"])
        .expect("sysctl");
    let info = check_and_wait(
        &e,
        ping,
        &r1,
        &["--type", "ping", "--timeout", "300ms"],
        "down",
    );
    assert_eq!(last(&info), "timeout");
    e.lab
        .exec(&ns1, &["sysctl", "-qw", "net.ipv4.icmp_echo_ignore_all=0"])
        .expect("sysctl");

    e.step("exec with dynamic: the exit code sets the weight");
    let exec = "tcp/10.222.1.100:82";
    vip_with(&e, exec, &["r1"]);
    let code = e.lab.dir.join("exec-code");
    let seen = e.lab.dir.join("exec-env");
    let script = e.lab.dir.join("check.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$XLB_VIP $XLB_REAL $XLB_PORT\" > {}\nexit $(cat {})\n",
            seen.display(),
            code.display()
        ),
    )
    .expect("script");
    std::fs::write(&code, "0").expect("code");
    let command = format!("/bin/sh {}", script.display());
    let dynamic = ["--type", "exec", "--command", command.as_str(), "--dynamic"];
    let info = check_and_wait(&e, exec, &r1, &dynamic, "up");
    assert_eq!(info.effective_weight, 1);
    assert_eq!(
        std::fs::read_to_string(&seen).expect("env").trim(),
        format!("{exec} {r1} 82")
    );
    std::fs::write(&code, "7").expect("code");
    let start = Instant::now();
    while real_info(&e, exec, &r1).effective_weight != 5 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "exit 7 should mean weight 5"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::write(&code, "1").expect("code");
    let info = check_and_wait(&e, exec, &r1, &dynamic, "down");
    assert_eq!(last(&info), "exit 1");
    // A program that overruns its timeout is killed and fails. (Programs of runs killed
    // before their daemon could stop them would be counted: gone first.)
    let _ = std::process::Command::new("pkill")
        .args(["-f", "^sleep 30$"])
        .status();
    std::fs::write(&script, "#!/bin/sh\nsleep 30\n").expect("script");
    let info = check_and_wait(
        &e,
        exec,
        &r1,
        &[
            "--type",
            "exec",
            "--command",
            command.as_str(),
            "--timeout",
            "300ms",
        ],
        "down",
    );
    assert_eq!(last(&info), "timeout");
    let sleeping = || {
        let out = std::process::Command::new("pgrep")
            .args(["-f", "^sleep 30$"])
            .output()
            .expect("pgrep");
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    // The probe running now, at most: each overrun was killed with what it started.
    let ps = || {
        let out = std::process::Command::new("sh")
            .args([
                "-c",
                "ps -eo pid,pgid,ppid,stat,etimes,cmd | grep '[s]leep 30'",
            ])
            .output()
            .expect("ps");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(
        sleeping() <= 1,
        "overrunning checks were not killed:\n{}",
        ps()
    );
    e.xlb_ok(&["check", "del", exec]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(sleeping(), 0, "a removed check's program was left running");
}

/// `udp/VIP:53` with r1, checked by udp against the lab's echo server.
const UDP4_: &str = "udp/10.222.1.100:53";

/// Wait until the VIP's quorum is `want` (`ok` or `lost`).
fn wait_quorum(e: &E2e, vip: &str, want: &str) -> api::VipInfo {
    let start = Instant::now();
    loop {
        let v = vip_info(e, vip);
        if v.quorum == want {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(8),
            "quorum of {vip} is not {want}: {v:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn quorum_drops(e: &E2e, vip: &str) -> u64 {
    let text = e.xlb_ok(&["stats", "--json"]);
    let stats: serde_json::Value = serde_json::from_str(&text).expect("stats JSON");
    stats["vips"]
        .as_array()
        .and_then(|vips| vips.iter().find(|v| v["vip"] == vip))
        .and_then(|v| v["quorum_drops"].as_u64())
        .unwrap_or_else(|| panic!("no quorum_drops for {vip}: {text}"))
}

#[test]
fn without_quorum_a_vip_fails_open_drops_or_uses_its_sorry_server_and_recovers() {
    let Some(e) = E2e::start("health_quorum", vec![IpAddr::V4(lab::VIP4)]) else {
        return;
    };
    vip_with(&e, TCP4, &["r1", "r2"]);
    let url = e.url4();
    e.step("every real's check fails (nothing listens on 9999): fail-open");
    e.xlb_ok(&[
        "check",
        "set",
        TCP4,
        "--type",
        "tcp",
        "--port",
        "9999",
        "--interval",
        "200ms",
        "--rise",
        "1",
        "--fall",
        "1",
    ]);
    let v = wait_quorum(&e, TCP4, "lost");
    assert!(!v.sorry_active);
    let v = {
        // Both reals seen down.
        let start = Instant::now();
        loop {
            let v = vip_info(&e, TCP4);
            if v.reals
                .iter()
                .all(|r| r.health.as_ref().is_some_and(|h| h.status == "down"))
            {
                break v;
            }
            assert!(start.elapsed() < Duration::from_secs(5), "{v:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    assert!(
        v.reals.iter().all(|r| r.state == "active"),
        "fail-open puts them back: {v:?}"
    );
    let replies = e.http(&url, 60);
    assert!(replies.iter().all(|r| r.is_ok()), "{}", summary(&replies));
    let spread = lab::Spread::of(&replies);
    assert!(
        spread.count("r1") > 0 && spread.count("r2") > 0,
        "{}",
        summary(&replies)
    );
    assert!(e.daemon_log().contains(&format!(
        "VIP {TCP4}: quorum lost (healthy weight 0 < 1): failing open, every real back in the ring"
    )));

    e.step("on_quorum_lost drop: new connections are dropped and counted");
    e.xlb_ok(&["vip", "set", TCP4, "--on-quorum-lost", "drop"]);
    let replies = e.http(&url, 2);
    assert!(replies.iter().all(|r| r.is_err()), "{}", summary(&replies));
    assert!(
        quorum_drops(&e, TCP4) >= 2,
        "SYNs and retries are quorum drops"
    );
    let list = e.xlb_ok(&["list"]);
    assert!(
        list.contains("quorum LOST (healthy weight 0 < 1): dropping new flows"),
        "{list}"
    );

    e.step("a sorry server (r3) takes every new connection");
    let r3 = addr4(&e, "r3");
    e.xlb_ok(&["vip", "set", TCP4, "--sorry-server", &r3]);
    let v = vip_info(&e, TCP4);
    assert!(v.sorry_active, "{v:?}");
    let replies = e.http(&url, 30);
    assert_all_from("sorry server", &replies, "r3");

    e.step("the checks pass again: quorum regained, the sorry server stands by");
    e.xlb_ok(&[
        "check",
        "set",
        TCP4,
        "--type",
        "tcp",
        "--interval",
        "200ms",
        "--rise",
        "1",
        "--fall",
        "1",
    ]);
    let v = wait_quorum(&e, TCP4, "ok");
    assert!(!v.sorry_active);
    // One real up is quorum already: wait for both to be back in the ring before looking
    // at the spread.
    let start = Instant::now();
    while ["r1", "r2"]
        .iter()
        .any(|r| real_info(&e, TCP4, &addr4(&e, r)).effective_weight == 0)
    {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            vip_info(&e, TCP4)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let replies = e.http(&url, 60);
    let spread = lab::Spread::of(&replies);
    assert!(replies.iter().all(|r| r.is_ok()), "{}", summary(&replies));
    assert_eq!(spread.count("r3"), 0, "the sorry server took a flow");
    assert!(spread.count("r1") > 0 && spread.count("r2") > 0);
    assert!(e
        .daemon_log()
        .contains(&format!("VIP {TCP4}: quorum regained")));
    // It is all saved: the options and the check come back with `xlb save`.
    let saved = e.xlb_ok(&["save"]);
    for want in [
        format!("sorry_server = \"{r3}\""),
        "on_quorum_lost = \"drop\"".to_string(),
        "[vip.check]\ntype = \"tcp\"".to_string(),
    ] {
        assert!(saved.contains(&want), "{want:?} not in:\n{saved}");
    }
}

#[test]
fn a_drained_real_keeps_its_long_connection_and_drain_wait_returns_when_it_closes() {
    let Some(e) = E2e::start("health_drain", vec![IpAddr::V4(lab::VIP4)]) else {
        return;
    };
    vip_with(&e, TCP4, &["r1", "r2", "r3"]);
    let url = e.url4();
    e.step("a long-lived (kept-alive) connection");
    let mut long = e.keepalive("long", &url, 100);
    let name = long.first_real();
    let real = addr4(&e, &name);
    e.step(&format!("drain {name} ({real})"));
    let out = e.xlb_ok(&["real", "drain", TCP4, &real]);
    assert_eq!(out, "1 tracked flow\n");
    let replies = e.http(&url, 60);
    assert!(replies.iter().all(|r| r.is_ok()), "{}", summary(&replies));
    assert_eq!(
        lab::Spread::of(&replies).count(&name),
        0,
        "a new connection reached the drained real"
    );
    long.wait_more(5);
    assert_all_from("the long connection", &long.replies, &name);
    assert_eq!(e.xlb_ok(&["real", "flows", TCP4, &real]), "1\n");
    let json: serde_json::Value =
        serde_json::from_str(&e.xlb_ok(&["real", "flows", TCP4, &real, "--json"])).expect("JSON");
    assert_eq!(json["vip"], TCP4);
    assert_eq!(json["real"], real);
    assert_eq!(json["flows"], 1);
    // The short connections of the other reals are closed (their client sent FIN): none counts.
    for other in ["r1", "r2", "r3"].iter().filter(|r| **r != name) {
        assert_eq!(
            e.xlb_ok(&["real", "flows", TCP4, &addr4(&e, other)]),
            "0\n",
            "{other}"
        );
    }

    e.step("drain --wait while the connection lives, then close it");
    let waiter = std::process::Command::new(&e.xlb)
        .args(["real", "drain", TCP4, &real, "--wait", "--timeout", "20s"])
        .env("XLB_SOCKET", e.lab.socket())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("xlb real drain --wait");
    std::thread::sleep(Duration::from_millis(1500));
    let replies = long.stop();
    assert_all_from("the long connection", &replies, &name);
    let start = Instant::now();
    let out = waiter.wait_with_output().expect("drain --wait");
    assert!(out.status.success(), "drain --wait failed: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text, "1 tracked flow\n0 tracked flows: drained\n");
    e.step(&format!(
        "drain --wait returned {:?} after the close",
        start.elapsed()
    ));
    assert_eq!(e.xlb_ok(&["real", "flows", TCP4, &real]), "0\n");

    e.step("a VIP without connection tracking says it has no flows to keep");
    let bypass = "tcp/10.222.1.100:8080";
    e.xlb_ok(&["vip", "add", bypass, "--no-conntrack"]);
    e.xlb_ok(&["real", "add", bypass, &real]);
    let (code, stderr) = e.xlb_fails(&["real", "flows", bypass, &real]);
    assert_eq!(code, 1);
    assert!(stderr.contains("does not track connections"), "{stderr}");
    let out = e
        .lab
        .xlb(&["real", "drain", bypass, &real, "--wait"])
        .expect("xlb real drain");
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not track connections"),
        "{out:?}"
    );
}

#[test]
fn a_restarted_daemon_keeps_a_down_real_out_and_every_up_real_in() {
    let Some(mut e) = E2e::start("health_restart", vec![IpAddr::V4(lab::VIP4)]) else {
        return;
    };
    vip_with(&e, TCP4, &["r1", "r2", "r3"]);
    // `initial = down` too: the restart must take the saved status, not the check's default.
    e.xlb_ok(&[
        "check",
        "set",
        TCP4,
        "--type",
        "tcp",
        "--interval",
        "300ms",
        "--rise",
        "2",
        "--fall",
        "2",
        "--initial",
        "down",
    ]);
    let r2 = addr4(&e, "r2");
    e.lab.stop_server("r2").expect("stop r2");
    wait_status(&e, TCP4, &r2, "down", Duration::from_secs(5));
    let url = e.url4();
    e.step("SIGKILL the daemon, start it again");
    let mut stream = e.stream(
        "during",
        &["--url", &url, "--count", "1000000", "--interval-ms", "20"],
    );
    stream.wait_more(5);
    let status = e.lab.stop_daemon(libc::SIGKILL).expect("kill");
    assert!(!status.success());
    let xlb = e.xlb.clone();
    e.lab.start_daemon(&xlb, &[]).expect("restart");
    // From its first answer on: r2 down, the others up, for a few checks' time.
    for _ in 0..15 {
        let v = vip_info(&e, TCP4);
        for r in &v.reals {
            let s = r.health.as_ref().map(|h| h.status.as_str());
            let want = if r.addr == r2 { "down" } else { "up" };
            assert_eq!(s, Some(want), "after the restart: {v:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let replies = stream.stop();
    assert!(replies.iter().all(|r| r.is_ok()), "{}", summary(&replies));
    assert_eq!(
        lab::Spread::of(&replies).count("r2"),
        0,
        "a connection went to r2"
    );
    e.step("r2's server back: it comes up after rise checks");
    e.lab.start_server("r2").expect("start r2");
    wait_status(&e, TCP4, &r2, "up", Duration::from_secs(5));
}

#[test]
fn target_vip_takes_out_a_real_that_lost_the_vip_and_target_real_does_not() {
    let Some(e) = E2e::start_dual("health_target_vip") else {
        return;
    };
    vip_with(&e, TCP4, &["r1", "r2", "r3"]);
    // The balancer host owns the VIP itself, as a keepalived pair's active node does: the
    // probes must still go through the reals.
    let lb = e.lab.lb.ns.clone();
    e.lab
        .exec(&lb, &["ip", "addr", "add", "10.222.1.100/32", "dev", "lo"])
        .expect("VIP on the lb's lo");
    let fast = [
        "--interval",
        "300ms",
        "--timeout",
        "250ms",
        "--rise",
        "1",
        "--fall",
        "2",
    ];
    let mut args = vec!["check", "set", TCP4, "--type", "tcp", "--target", "vip"];
    args.extend_from_slice(&fast);
    e.xlb_ok(&args);
    let r2 = addr4(&e, "r2");
    e.step("every real passes through the VIP");
    for role in ["r1", "r2", "r3"] {
        let a = addr4(&e, role);
        let start = Instant::now();
        while real_info(&e, TCP4, &a).health.map(|h| h.last) != Some("ok".into()) {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "{role} does not pass through the VIP: {:?}\n{}",
                real_info(&e, TCP4, &a),
                e.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    e.step("r2 loses the VIP on its loopback: its server still runs");
    let ns2 = e.real("r2").ns;
    e.lab
        .exec(&ns2, &["ip", "addr", "del", "10.222.1.100/32", "dev", "lo"])
        .expect("VIP off r2's lo");
    wait_status(&e, TCP4, &r2, "down", Duration::from_secs(4));
    assert_eq!(
        real_info(&e, TCP4, &r2).health.map(|h| h.last),
        Some("timeout".into())
    );
    let replies = e.http(&e.url4(), 60);
    assert!(replies.iter().all(|r| r.is_ok()), "{}", summary(&replies));
    assert_eq!(lab::Spread::of(&replies).count("r2"), 0);

    e.step("the same check on the real's own address passes");
    let mut args = vec!["check", "set", TCP4, "--type", "tcp", "--target", "real"];
    args.extend_from_slice(&fast);
    e.xlb_ok(&args);
    wait_status(&e, TCP4, &r2, "up", Duration::from_secs(4));

    e.step("back to target vip, and the VIP back on r2's loopback");
    let mut args = vec!["check", "set", TCP4, "--type", "http", "--target", "vip"];
    args.extend_from_slice(&fast);
    e.xlb_ok(&args);
    wait_status(&e, TCP4, &r2, "down", Duration::from_secs(4));
    e.lab
        .exec(&ns2, &["ip", "addr", "add", "10.222.1.100/32", "dev", "lo"])
        .expect("VIP on r2's lo");
    wait_status(&e, TCP4, &r2, "up", Duration::from_secs(4));

    e.step("IPv6 through the VIP");
    let ipv6: Vec<String> = ["r1", "r2", "r3"]
        .iter()
        .map(|r| e.real(r).ipv6.to_string())
        .collect();
    e.xlb_ok(&["vip", "add", TCP6]);
    for a in &ipv6 {
        e.xlb_ok(&["real", "add", TCP6, a]);
    }
    e.wait_active(TCP6, 3);
    let mut args = vec!["check", "set", TCP6, "--type", "http", "--target", "vip"];
    args.extend_from_slice(&fast);
    e.xlb_ok(&args);
    for a in &ipv6 {
        let start = Instant::now();
        while real_info(&e, TCP6, a).health.map(|h| h.last) != Some("ok".into()) {
            assert!(
                start.elapsed() < Duration::from_secs(8),
                "{a} does not pass through the IPv6 VIP: {:?}",
                real_info(&e, TCP6, a)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let stats = e.xlb_ok(&["stats", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stats).expect("JSON");
    assert!(
        v["global"]["probe_reply"].as_u64().unwrap_or(0) > 0,
        "{stats}"
    );
}
