//! Operating xlb, end to end with the real daemon and CLI: `xlb conns` lists the flows real
//! clients made, on the reals they reached; `xlb whereis` predicts the real a new flow lands
//! on and then names its tracked entry; `stats` rates are the daemon's, the same for every
//! client. Needs root.

mod common;

#[path = "common/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::{net::IpAddr, time::Duration};

use harness::*;
use lb_lab::lab::{self, LabConfig};

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// TCP4's entry in `stats --json`.
fn tcp_vip(stats: &serde_json::Value) -> serde_json::Value {
    stats["vips"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["vip"] == TCP4))
        .cloned()
        .unwrap_or_default()
}

#[test]
fn conns_whereis_and_rates_agree_with_real_traffic() {
    let cfg = LabConfig {
        reals: 3,
        vips: vec![IpAddr::V4(lab::VIP4)],
        ..LabConfig::default()
    };
    let Some(e) = E2e::start_with("ops", cfg, &["--hash-seed", "2718281"]) else {
        return;
    };
    e.add_vip(TCP4, false);
    e.add_vip(UDP4, false);
    let addr_of = |role: &str| e.real(role).ipv4.to_string();

    let mut ka = e.keepalive("keep-alive", &e.url4(), 100);
    let role = ka.first_real();
    ka.wait_more(3);
    let conns = json(&e.xlb_ok(&["conns", "--json"]));
    let flows = conns["flows"].as_array().expect("flows");
    assert_eq!(flows.len(), 1, "{conns:#}");
    assert_eq!(flows[0]["vip"], TCP4, "{conns:#}");
    assert_eq!(flows[0]["real"], addr_of(&role), "{conns:#}");
    assert_eq!(conns["per_real"][0]["flows"], 1, "{conns:#}");
    let client = flows[0]["client"].as_str().expect("client").to_string();
    assert!(client.starts_with("10.222.0.2:"), "{client}");
    let w = json(&e.xlb_ok(&["whereis", TCP4, &client, "--json"]));
    assert_eq!(w["real"], addr_of(&role), "{w:#}");
    assert_eq!(w["reason"], "tracked", "{w:#}");
    assert_eq!(
        e.xlb_ok(&["whereis", TCP4, &client]).trim(),
        format!("{} (tracked entry)", addr_of(&role))
    );
    e.step("conns and whereis find the kept-alive connection on its real");

    // A UDP flow from a chosen port: whereis predicts its real from the ring, the datagram
    // lands there, and from then on whereis names the tracked entry.
    // UDP flows from chosen ports: whereis predicts each one's real from the ring (and the
    // daemon's --hash-seed), the datagram lands there, and from then on whereis names the
    // tracked entry. Five flows: a prediction that ignored the seed would miss.
    let mut per_real: std::collections::BTreeMap<String, usize> = Default::default();
    for port in 40123..40128u16 {
        let src = format!("10.222.0.2:{port}");
        let w = json(&e.xlb_ok(&["whereis", UDP4, &src, "--json"]));
        assert_eq!(w["reason"], "ring", "{w:#}");
        assert!(w["slot"].as_u64().is_some(), "{w:#}");
        let predicted = w["real"].as_str().expect("a real").to_string();
        let answer = e.udp4_from(port);
        assert_eq!(
            addr_of(&answer),
            predicted,
            "port {port}: whereis said {predicted}, {answer} answered"
        );
        let w = json(&e.xlb_ok(&["whereis", UDP4, &src, "--json"]));
        assert_eq!(
            (w["real"].as_str(), w["reason"].as_str()),
            (Some(predicted.as_str()), Some("tracked"))
        );
        *per_real.entry(predicted).or_default() += 1;
    }
    assert_eq!(e.xlb_ok(&["conns", "--count"]).trim(), "6");
    assert_eq!(e.xlb_ok(&["conns", "--vip", UDP4, "--count"]).trim(), "5");
    for (real, n) in &per_real {
        assert_eq!(
            e.xlb_ok(&["conns", "--real", real, "--vip", UDP4, "--count"])
                .trim(),
            n.to_string()
        );
    }
    e.xlb_ok(&["ready"]);
    e.step("whereis predicted 5 UDP flows' reals under --hash-seed; conns counts them");

    // Two clients asking at once see the same rates: the daemon's samples, not theirs.
    let stats = || {
        let start = || {
            std::process::Command::new(&e.xlb)
                .args(["stats", "--json"])
                .env("XLB_SOCKET", e.lab.socket())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("xlb stats")
        };
        let (one, two) = (start(), start());
        let out = |c: std::process::Child| {
            String::from_utf8_lossy(&c.wait_with_output().expect("xlb stats").stdout).into_owned()
        };
        let a = (out(one), out(two));
        let rate = |t: &str| {
            tcp_vip(&json(t))["packets_per_sec"]
                .as_f64()
                .unwrap_or(-1.0)
        };
        (rate(&a.0), rate(&a.1))
    };
    std::thread::sleep(Duration::from_secs(2));
    let agreed = (0..5).map(|_| stats()).find(|(a, b)| a == b && *a > 0.0);
    assert!(
        agreed.is_some(),
        "two stats clients never agreed on a nonzero rate: {:?}\n{}",
        stats(),
        e.xlb_ok(&["stats", "--json"])
    );
    let st = json(&e.xlb_ok(&["stats", "--json"]));
    assert!(
        tcp_vip(&st)["packets_per_sec_10s"].as_f64() > Some(0.0),
        "{st:#}"
    );
    assert_eq!(
        st["conntrack"]["capacity"],
        lb_common::DEFAULT_CONNTRACK_SIZE,
        "{st:#}"
    );
    e.step(&format!("two stats clients agree: {:?} packets/s", agreed));
    ka.stop();
}

/// `GET /metrics` from inside the lb's namespace, parsed by a Prometheus text parser.
fn scrape(e: &E2e) -> prometheus_parse::Scrape {
    let text = lab::in_netns(&e.lab.lb.ns, || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect("127.0.0.1:9100")?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
    .expect("scraping /metrics");
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    let lines = body.lines().map(|l| Ok(l.to_string()));
    prometheus_parse::Scrape::parse(lines).expect("Prometheus text format")
}

fn value(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .find(|m| m.metric == name && labels.iter().all(|(k, v)| m.labels.get(k) == Some(*v)))
        .map(|m| match m.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

#[test]
fn metrics_count_the_traffic_per_vip_and_real() {
    let cfg = LabConfig {
        reals: 3,
        vips: vec![IpAddr::V4(lab::VIP4)],
        ..LabConfig::default()
    };
    let Some(e) = E2e::start_with("metrics", cfg, &["--metrics", "127.0.0.1:9100"]) else {
        return;
    };
    e.add_vip(TCP4, false);
    let before = scrape(&e);
    for r in &e.lab.reals {
        let l = [("vip", TCP4), ("real", &r.ipv4.to_string())];
        assert_eq!(
            value(&before, "xlb_real_new_flows_total", &l),
            Some(0.0),
            "{l:?}"
        );
        assert_eq!(value(&before, "xlb_real_up", &l), Some(1.0), "{l:?}");
        assert_eq!(value(&before, "xlb_real_weight", &l), Some(1.0), "{l:?}");
    }
    assert_eq!(
        value(&before, "xlb_vip_packets_total", &[("vip", TCP4)]),
        Some(0.0)
    );
    e.step("every series there from the first scrape");

    let replies = e.http(&e.url4(), 60);
    let spread = lab::Spread::of(&replies);
    assert!(spread.failures.is_empty(), "{:?}", spread.failures);
    let after = scrape(&e);
    let vip = [("vip", TCP4)];
    assert_eq!(value(&after, "xlb_vip_new_flows_total", &vip), Some(60.0));
    let packets = value(&after, "xlb_vip_packets_total", &vip).unwrap_or(0.0);
    assert!(
        packets >= 60.0 * 4.0,
        "{packets} packets for 60 connections"
    );
    for r in &e.lab.reals {
        let l = [("vip", TCP4), ("real", &r.ipv4.to_string())];
        assert_eq!(
            value(&after, "xlb_real_new_flows_total", &l),
            Some(spread.count(&r.role) as f64),
            "{} answered {} requests",
            r.role,
            spread.count(&r.role)
        );
    }
    let sum: f64 = e
        .lab
        .reals
        .iter()
        .filter_map(|r| {
            value(
                &after,
                "xlb_real_packets_total",
                &[("real", &r.ipv4.to_string())],
            )
        })
        .sum();
    assert_eq!(sum, packets, "the reals' packets add up to the VIP's");
    e.step("60 connections: new flows per VIP and per real as the replies say");

    // Two fragments of a packet to the VIP: dropped, and counted under their reason.
    let frag = [("action", "drop"), ("reason", "fragment")];
    let dropped = value(&after, "xlb_packets_total", &frag).expect("the fragment series");
    let mac = |s: &str| lb_userspace::model::parse_mac(s).expect("mac");
    let frame = lb_lab::packet::Frame::tcp4(e.lab.client.ipv4, 40000, lab::VIP4, 80)
        .with_ipv4_frag(0x2000, 7)
        .with_macs(mac(&e.lab.client.mac), mac(&e.lab.lb.mac))
        .build();
    let hex: String = frame.iter().map(|b| format!("{b:02x}")).collect();
    let lab_bin = release_bin("xlb-lab").display().to_string();
    for _ in 0..2 {
        e.lab
            .exec(
                &e.client_ns(),
                &[&lab_bin, "inject", "--iface", "eth0", "--hex", &hex],
            )
            .expect("inject");
    }
    let last = scrape(&e);
    assert_eq!(
        value(&last, "xlb_packets_total", &frag),
        Some(dropped + 2.0)
    );
    assert!(value(&last, "xlb_ring_rebuilds_total", &[]).unwrap_or(0.0) >= 1.0);
    assert_eq!(
        value(&last, "xlb_config_changes_total", &[("result", "applied")]),
        Some(4.0),
        "vip add and three real adds"
    );
    e.step("fragments counted under drop/fragment");
}

fn config(reals: &[&str], weight: &str) -> String {
    let list: Vec<String> = reals
        .iter()
        .map(|r| format!("{{ addr = \"{r}\", weight = {weight} }}"))
        .collect();
    format!(
        "version = 1\n[[vip]]\naddr = \"{}:80\"\nproto = \"tcp\"\nreals = [ {} ]\n",
        lab::VIP4,
        list.join(", ")
    )
}

fn reals_of(e: &E2e) -> Vec<String> {
    let list = json(&e.xlb_ok(&["list", "--json"]));
    list["vips"][0]["reals"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .map(|r| r["addr"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn config_file_applied_at_start_and_on_sighup_a_bad_one_changing_nothing() {
    let path = std::env::temp_dir().join(format!("xlb-test-{}-reload.toml", std::process::id()));
    let _guard = common::Removed(path.clone());
    let (r1, r2, r3) = ("10.222.0.11", "10.222.0.12", "10.222.0.13");
    std::fs::write(&path, config(&[r1, r2], "1")).expect("config");
    let cfg = LabConfig {
        reals: 3,
        vips: vec![IpAddr::V4(lab::VIP4)],
        ..LabConfig::default()
    };
    let path_s = path.display().to_string();
    let Some(mut e) = E2e::start_with("reload", cfg, &["--config", &path_s]) else {
        return;
    };
    let wait_reals = |e: &E2e, want: &[&str]| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while reals_of(e) != want {
            assert!(
                std::time::Instant::now() < deadline,
                "reals {:?}, expected {want:?}; log:\n{}",
                reals_of(e),
                e.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_reals(&e, &[r1, r2]);
    e.step("--config applied at start");
    let hup = |e: &mut E2e| {
        let pid = e.lab.daemon().expect("daemon").id() as i32;
        // SAFETY: our child's pid.
        unsafe { libc::kill(pid, libc::SIGHUP) };
    };
    std::fs::write(&path, config(&[r1, r2, r3], "1")).expect("config");
    hup(&mut e);
    wait_reals(&e, &[r1, r2, r3]);
    e.step("SIGHUP: a third real");

    for (bad, why) in [
        ("version = 1\n[[vip]\n".to_string(), "a syntax error"),
        (config(&[r1], "70000"), "a weight out of range"),
    ] {
        let refusals = |e: &E2e| {
            e.daemon_log()
                .matches("the running configuration stays")
                .count()
        };
        let before = refusals(&e);
        std::fs::write(&path, bad).expect("config");
        hup(&mut e);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while refusals(&e) == before {
            assert!(
                std::time::Instant::now() < deadline,
                "{why}: no refusal logged"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(
            reals_of(&e),
            [r1, r2, r3],
            "{why} changed the configuration"
        );
    }
    let replies = e.http(&e.url4(), 120);
    e.assert_spread("after the refused reloads", &replies, 10.0, 60.0);
    e.step("SIGHUP with a bad file: refused, logged, nothing changed");
}

#[test]
fn the_read_only_socket_serves_reads_and_refuses_every_change() {
    let ro = std::env::temp_dir().join(format!("xlb-test-{}-ro.sock", std::process::id()));
    let _guard = common::Removed(ro.clone());
    let ro_s = ro.display().to_string();
    let cfg = LabConfig {
        reals: 1,
        vips: vec![IpAddr::V4(lab::VIP4)],
        ..LabConfig::default()
    };
    let Some(e) = E2e::start_with("ro_socket", cfg, &["--ro-socket", &ro_s]) else {
        return;
    };
    e.add_vip(TCP4, false);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&ro)
        .expect("ro socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o666, "{mode:o}");
    let ro_xlb = |args: &[&str]| {
        std::process::Command::new(&e.xlb)
            .arg("--socket")
            .arg(&ro)
            .args(args)
            .output()
            .expect("xlb")
    };
    for read in [
        vec!["list"],
        vec!["stats", "--json"],
        vec!["save"],
        vec!["conns", "--count"],
        vec!["whereis", TCP4, "10.222.0.2:5000"],
        vec!["ready"],
    ] {
        let out = ro_xlb(&read);
        assert!(
            out.status.success(),
            "{read:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let real = e.lab.reals[0].ipv4.to_string();
    let config = e.xlb_ok(&["save"]);
    let file = e.lab.dir.join("ro.toml");
    std::fs::write(&file, &config).expect("config");
    let file_s = file.display().to_string();
    for change in [
        vec!["vip", "add", "tcp/10.222.1.100:8080"],
        vec!["vip", "del", TCP4],
        vec!["real", "add", TCP4, "10.222.0.99"],
        vec!["real", "weight", TCP4, &real, "0"],
        vec!["real", "del", TCP4, &real],
        vec!["check", "set", TCP4, "--type", "tcp"],
        vec!["apply", "-f", &file_s],
        vec!["maintenance", "on"],
        vec!["down"],
    ] {
        let out = ro_xlb(&change);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{change:?}: {err}");
        assert!(err.contains("read-only"), "{change:?}: {err}");
    }
    assert_eq!(
        e.xlb_ok(&["save"]),
        config,
        "the read-only socket changed something"
    );
    e.xlb_ok(&["ready"]);
    assert!(
        e.daemon_log().contains("request from uid=0 pid="),
        "changes are logged with the peer's credentials:\n{}",
        e.daemon_log()
    );
    e.step("reads served, nine kinds of change refused, changes logged with uid and pid");
}

#[test]
fn systemd_hears_ready_once_the_socket_answers_then_reloading_and_stopping() {
    let path = std::env::temp_dir().join(format!("xlb-test-{}-notify.toml", std::process::id()));
    let _guard = common::Removed(path.clone());
    std::fs::write(&path, config(&["10.222.0.11"], "1")).expect("config");
    let cfg = LabConfig {
        reals: 1,
        vips: vec![IpAddr::V4(lab::VIP4)],
        ..LabConfig::default()
    };
    let path_s = path.display().to_string();
    let args = ["--config", path_s.as_str()];
    let Some(mut e) = E2e::start_with("notify", cfg, &args) else {
        return;
    };
    e.lab.stop_daemon(libc::SIGTERM).expect("stop");
    // systemd's end of NOTIFY_SOCKET: a datagram socket.
    let sock_path = e.lab.dir.join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&sock_path).expect("notify socket");
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    e.lab
        .set_daemon_env("NOTIFY_SOCKET", &sock_path.display().to_string());
    let control = e.lab.socket();
    let watcher = std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        let n = notify.recv(&mut buf).expect("READY=1 within 20 s");
        let answers = std::os::unix::net::UnixStream::connect(&control).is_ok();
        (
            String::from_utf8_lossy(&buf[..n]).into_owned(),
            answers,
            notify,
        )
    });
    let xlb = e.xlb.clone();
    e.lab.start_daemon(&xlb, &args).expect("restart");
    let (first, answered, notify) = watcher.join().expect("watcher");
    assert_eq!(first.trim(), "READY=1");
    assert!(answered, "READY=1 before the control socket answered");
    assert_eq!(
        reals_of(&e),
        ["10.222.0.11"],
        "READY=1 before the config was applied"
    );
    let next = || {
        let mut buf = [0u8; 512];
        let n = notify.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let pid = e.lab.daemon().expect("daemon").id() as i32;
    // SAFETY: our child's pid.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    let reloading = next();
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading:?}"
    );
    assert_eq!(next().trim(), "READY=1");
    e.lab.stop_daemon(libc::SIGTERM).expect("stop");
    assert_eq!(next().trim(), "STOPPING=1");
    e.step("READY=1 once the socket answered, RELOADING=1/READY=1 on SIGHUP, STOPPING=1");
}

#[test]
fn every_thread_of_the_daemon_holds_only_the_documented_capabilities() {
    let cfg = LabConfig {
        reals: 1,
        vips: vec![IpAddr::V4(lab::VIP4)],
        ..LabConfig::default()
    };
    let Some(mut e) = E2e::start_with("caps", cfg, &[]) else {
        return;
    };
    // Exercise what needs privileges after the start: a real (ARP), a self-test
    // (BPF_PROG_TEST_RUN), a walk (the clock probe), a ping check (raw ICMP).
    e.add_vip(TCP4, false);
    e.xlb_ok(&["ready"]);
    e.xlb_ok(&["conns", "--count"]);
    e.xlb_ok(&[
        "check",
        "set",
        TCP4,
        "--type",
        "ping",
        "--interval",
        "500ms",
    ]);
    e.wait_active(TCP4, 1);
    std::thread::sleep(Duration::from_secs(2));
    let list = json(&e.xlb_ok(&["list", "--json"]));
    assert_eq!(
        list["vips"][0]["reals"][0]["health"]["status"], "up",
        "the ping check works without other capabilities: {list:#}"
    );
    // CAP_NET_ADMIN 12, CAP_NET_RAW 13, CAP_SYS_ADMIN 21, CAP_PERFMON 38, CAP_BPF 39.
    let want = (1u64 << 12) | (1 << 13) | (1 << 21) | (1 << 38) | (1 << 39);
    let pid = e.lab.daemon().expect("daemon").id();
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the daemon's threads")
        .map(|t| t.expect("task").path())
        .collect();
    assert!(tasks.len() > 2, "{tasks:?}");
    for t in &tasks {
        let status = std::fs::read_to_string(t.join("status")).expect("status");
        for set in ["CapEff", "CapPrm", "CapBnd"] {
            let hex = status
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{set}:")))
                .map(str::trim)
                .expect("a capability line");
            let got = u64::from_str_radix(hex, 16).expect("hex");
            assert_eq!(got, want, "{}: {set} {hex}", t.display());
        }
    }
    e.step(&format!(
        "{} threads hold CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, CAP_NET_RAW, CAP_SYS_ADMIN only",
        tasks.len()
    ));
}

#[test]
fn xlb_top_runs_in_a_pseudo_terminal_and_quits_on_q() {
    let cfg = LabConfig {
        reals: 2,
        vips: vec![IpAddr::V4(lab::VIP4)],
        ..LabConfig::default()
    };
    let Some(e) = E2e::start_with("top", cfg, &[]) else {
        return;
    };
    e.add_vip(TCP4, false);
    // script(1) gives `xlb top` a pseudo-terminal of 80×24; `q` on its input quits.
    let line = format!(
        "stty rows 24 cols 80; exec {} --socket {} top",
        e.xlb.display(),
        e.lab.socket().display()
    );
    let mut child = std::process::Command::new("script")
        .args(["-qfec", &line, "/dev/null"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("script (bsdutils)");
    std::thread::sleep(Duration::from_secs(3));
    {
        use std::io::Write;
        let stdin = child.stdin.as_mut().expect("stdin");
        stdin.write_all(b"s").expect("s");
        std::thread::sleep(Duration::from_millis(500));
        stdin.write_all(b"q").expect("q");
    }
    let status = wait_exit(&mut child, "xlb top", Duration::from_secs(10));
    let mut out = String::new();
    use std::io::Read;
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("output");
    assert!(status.success(), "xlb top: {status}: {out}");
    // The screen arrives as cursor moves and words: look for words.
    for want in [TCP4, "10.222.0.11", "sorted", "pkt/s", "quit"] {
        assert!(out.contains(want), "{want:?} not on the screen:\n{out}");
    }
    e.step("xlb top drew the VIP and its reals in an 80x24 pty, sorted on s, quit on q");
}
