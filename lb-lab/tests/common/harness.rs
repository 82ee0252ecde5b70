//! The end-to-end harness shared by the namespace test files: a lab with the daemon running
//! (`E2e`), streaming clients (`Stream`) and the checks on their replies. Included by each
//! test file with `#[path]`; a file that uses only part of it allows the rest to go unused.

use std::{
    cell::RefCell,
    io::{BufRead, BufReader},
    net::{IpAddr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, ExitStatus, Stdio},
    sync::mpsc::{self, Receiver, RecvTimeoutError},
    time::{Duration, Instant},
};

use lb_lab::lab::{self, Host, Lab, LabConfig, Reply, Spread};
use lb_userspace::api;

use super::common;

pub const TCP4: &str = "tcp/10.222.1.100:80";
pub const UDP4: &str = "udp/10.222.1.100:53";
pub const TCP6: &str = "tcp/[fd00:222:1::100]:80";

/// How long a streaming client may take to print its next line.
pub const LINE_TIMEOUT: Duration = Duration::from_secs(8);

// ---- binaries and the lab ---------------------------------------------------------------------

/// A binary of `target/release` (the tests run with `cargo test --release`).
pub fn release_bin(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release");
    let path = dir.canonicalize().unwrap_or(dir).join(name);
    assert!(
        path.is_file(),
        "{} is missing: build it first with `cargo xtask build` (or `cargo build --release -p \
         lb-userspace --bins`)",
        path.display()
    );
    path
}

/// A lab with the daemon running; its `Drop` prints the daemon's log when the test panics, then
/// the lab tears itself down.
pub struct E2e {
    pub test: &'static str,
    pub lab: Lab,
    pub xlb: PathBuf,
    pub started: Instant,
    /// Tentative IPv6 addresses seen just before the last IPv6 requests were sent.
    pub tentative_at_send: RefCell<String>,
}

impl E2e {
    /// `None` (skipped) without root.
    pub fn start(test: &'static str, vips: Vec<IpAddr>) -> Option<E2e> {
        let cfg = LabConfig {
            reals: 3,
            vips,
            ..LabConfig::default()
        };
        E2e::start_with(test, cfg, &[])
    }

    /// A lab of `cfg` (its `lab_bin` set here) with the daemon started with `daemon_args`.
    pub fn start_with(test: &'static str, cfg: LabConfig, daemon_args: &[&str]) -> Option<E2e> {
        if !common::bpf_available(test) {
            return None;
        }
        let xlb = release_bin("xlb");
        let lab_bin = release_bin("xlb-lab");
        let started = Instant::now();
        let lab = Lab::new(LabConfig {
            lab_bin: Some(lab_bin),
            ..cfg
        })
        .unwrap_or_else(|e| panic!("{test}: building the lab: {e:#}"));
        let mut e = E2e {
            test,
            lab,
            xlb,
            started,
            tentative_at_send: RefCell::default(),
        };
        let hello = e
            .lab
            .start_daemon(&e.xlb, daemon_args)
            .unwrap_or_else(|err| panic!("{test}: starting the daemon: {err:#}"));
        assert_eq!(hello.iface, e.lab.lb.iface, "{hello:?}");
        assert_eq!(
            hello.xdp_mode, "native",
            "veth runs XDP natively: {hello:?}"
        );
        Some(e)
    }

    /// Both VIP addresses of the lab.
    pub fn start_dual(test: &'static str) -> Option<E2e> {
        E2e::start(test, vec![IpAddr::V4(lab::VIP4), IpAddr::V6(lab::VIP6)])
    }

    /// Say what the test does next, with the time since it started (shown when it fails).
    pub fn step(&self, what: &str) {
        println!("[{:6.2} s] {what}", self.started.elapsed().as_secs_f64());
    }

    pub fn client_ns(&self) -> String {
        self.lab.client.ns.clone()
    }

    /// One datagram from the client's `port` to the IPv4 UDP VIP: the name of the real that
    /// answered.
    pub fn udp4_from(&self, port: u16) -> String {
        let vip: SocketAddr = (lab::VIP4, self.lab.udp_port).into();
        lab::in_netns(&self.client_ns(), move || {
            let s = UdpSocket::bind(("10.222.0.2", port))?;
            s.set_read_timeout(Some(std::time::Duration::from_secs(3)))?;
            s.send_to(b"ping", vip)?;
            let mut buf = [0u8; 64];
            let (n, _) = s.recv_from(&mut buf)?;
            Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
        })
        .unwrap_or_else(|err| panic!("{}: a UDP exchange from port {port}: {err:#}", self.test))
    }

    pub fn url4(&self) -> String {
        self.lab.url(IpAddr::V4(lab::VIP4))
    }

    /// The real whose server answers with `name`.
    pub fn real(&self, name: &str) -> Host {
        self.lab
            .reals
            .iter()
            .find(|r| r.role == name)
            .cloned()
            .unwrap_or_else(|| panic!("no real is named {name:?}"))
    }

    /// `xlb ARGS` run through the binary; its stdout, or a panic with its stderr.
    pub fn xlb_ok(&self, args: &[&str]) -> String {
        self.lab
            .xlb_ok(args)
            .unwrap_or_else(|e| panic!("{}: {e:#}", self.test))
    }

    /// `xlb ARGS`, which must fail: (exit code, stderr).
    pub fn xlb_fails(&self, args: &[&str]) -> (i32, String) {
        let out = self
            .lab
            .xlb(args)
            .unwrap_or_else(|e| panic!("running xlb {args:?}: {e:#}"));
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "`xlb {}` should have failed, but succeeded; stdout: {}; stderr: {stderr}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        );
        (out.status.code().unwrap_or(-1), stderr)
    }

    /// `xlb vip add VIP` and `xlb real add VIP R` for each real (IPv4 or IPv6 as the VIP),
    /// then wait until every real is `active`.
    pub fn add_vip(&self, vip: &str, v6: bool) {
        self.add_vip_with(vip, &[], None, v6);
    }

    /// `add_vip` with more `vip add` arguments (`--mode nat`), and the reals written
    /// `ADDR:PORT` (`[ADDR]:PORT`) when they serve on `port`.
    pub fn add_vip_with(&self, vip: &str, vip_args: &[&str], port: Option<u16>, v6: bool) {
        let mut add = vec!["vip", "add", vip];
        add.extend_from_slice(vip_args);
        self.xlb_ok(&add);
        for r in &self.lab.reals {
            let real = match (port, v6) {
                (None, false) => r.ipv4.to_string(),
                (None, true) => r.ipv6.to_string(),
                (Some(p), false) => format!("{}:{p}", r.ipv4),
                (Some(p), true) => format!("[{}]:{p}", r.ipv6),
            };
            self.xlb_ok(&["real", "add", vip, &real]);
        }
        self.wait_active(vip, self.lab.reals.len());
    }

    /// The daemon's view, over the control socket.
    pub fn list(&self) -> api::ListReply {
        let resp = self
            .lab
            .api(api::Op::List {})
            .unwrap_or_else(|e| panic!("list: {e:#}"));
        match resp.result {
            Some(api::Reply::List(l)) if resp.ok => l,
            _ => panic!("unexpected answer to list: {resp:?}"),
        }
    }

    /// Wait until `n` reals of `vip` are `active` (MAC resolved): an unresolved real takes no
    /// new flows, which would skew a spread.
    pub fn wait_active(&self, vip: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let list = self.list();
            let reals = list
                .vips
                .iter()
                .find(|v| v.vip == vip)
                .map(|v| v.reals.clone())
                .unwrap_or_default();
            if reals.iter().filter(|r| r.state == "active").count() == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the reals of {vip} are not all active after 10 s: {reals:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `count` HTTP GETs to `url`, each on a new connection: a reply per request, in order.
    pub fn http(&self, url: &str, count: usize) -> Vec<Reply> {
        if url.contains('[') {
            *self.tentative_at_send.borrow_mut() = self.tentative();
        }
        let replies = self
            .lab
            .http(&self.client_ns(), url, count)
            .unwrap_or_else(|e| panic!("requests to {url}: {e:#}"));
        assert_eq!(replies.len(), count, "one line per request: {replies:?}");
        replies
    }

    /// A client in the client namespace printing a line per request as it goes.
    pub fn stream(&self, label: &str, args: &[&str]) -> Stream {
        Stream::spawn(&self.lab, label, args)
    }

    /// A kept-alive HTTP connection to `url` sending a request every `interval_ms`.
    pub fn keepalive(&self, label: &str, url: &str, interval_ms: u64) -> Stream {
        self.keepalive_waiting(label, url, interval_ms, 5)
    }

    /// `keepalive`, waiting up to `io_timeout_secs` for each answer.
    pub fn keepalive_waiting(
        &self,
        label: &str,
        url: &str,
        interval_ms: u64,
        io_timeout_secs: u64,
    ) -> Stream {
        let (interval, io) = (interval_ms.to_string(), io_timeout_secs.to_string());
        self.stream(
            label,
            &[
                "--url",
                url,
                "--count",
                "1000000",
                "--keepalive",
                "--interval-ms",
                &interval,
                "--io-timeout",
                &io,
            ],
        )
    }

    /// No failure, every answer from a lab real, each real's share within [min, max] percent.
    pub fn assert_spread(&self, label: &str, replies: &[Reply], min_pct: f64, max_pct: f64) {
        let reals = &self.lab.reals;
        let spread = Spread::of(replies);
        let table = spread.table(reals);
        let failed: Vec<usize> = (0..replies.len())
            .filter(|&i| replies[i].is_err())
            .collect();
        assert!(
            failed.is_empty(),
            "{label}: {} of {} requests failed (requests #{failed:?}, from 0):\n{table}{}",
            failed.len(),
            replies.len(),
            self.diagnosis()
        );
        let total = spread.total() as f64;
        for r in reals {
            let pct = 100.0 * spread.count(&r.role) as f64 / total;
            assert!(
                (min_pct..=max_pct).contains(&pct),
                "{label}: {} got {pct:.1} % of the requests, expected {min_pct} % to {max_pct} \
                 %:\n{table}",
                r.role
            );
        }
        let known: usize = reals.iter().map(|r| spread.count(&r.role)).sum();
        assert_eq!(
            known,
            spread.total(),
            "{label}: answers from unknown servers:\n{table}"
        );
    }

    /// Addresses still in IPv6 duplicate address detection, a line each.
    pub fn tentative(&self) -> String {
        let mut out = String::new();
        for h in self.lab.hosts() {
            let tentative = self
                .lab
                .exec(&h.ns, &["ip", "-6", "-o", "addr", "show", "tentative"])
                .unwrap_or_else(|e| format!("{e:#}"));
            for line in tentative.lines() {
                let addr = line.split_whitespace().nth(3).unwrap_or(line);
                out.push_str(&format!("  {}: {addr}\n", h.role));
            }
        }
        out
    }

    /// What may explain failed requests: addresses in IPv6 duplicate address detection when
    /// the requests left (a real whose link-local address is tentative sends no neighbour
    /// solicitation, so its replies from the VIP on lo go nowhere), and the daemon's view.
    pub fn diagnosis(&self) -> String {
        let mut out = String::new();
        let at_send = self.tentative_at_send.borrow();
        if !at_send.is_empty() {
            out.push_str(&format!(
                "IPv6 addresses still tentative (DAD running) when the last IPv6 requests were \
                 sent:\n{at_send}"
            ));
        }
        let now = self.tentative();
        if !now.is_empty() {
            out.push_str(&format!("IPv6 addresses tentative now:\n{now}"));
        }
        match self.lab.xlb_ok(&["list"]) {
            Ok(list) => out.push_str(&format!("xlb list:\n{list}")),
            Err(e) => out.push_str(&format!("xlb list: {e:#}\n")),
        }
        out
    }

    /// The packets `xlb stats --json` counts for `vip`.
    pub fn vip_packets(&self, vip: &str) -> u64 {
        let text = self.xlb_ok(&["stats", "--json"]);
        let stats: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|err| panic!("xlb stats --json is not JSON ({err}): {text}"));
        stats["vips"]
            .as_array()
            .and_then(|vips| vips.iter().find(|v| v["vip"] == vip))
            .and_then(|v| v["packets"].as_u64())
            .unwrap_or_else(|| panic!("xlb stats --json has no packet count for {vip}: {text}"))
    }

    /// A counter of `STATS_GLOBAL` as `xlb stats --json` gives it (0 when absent).
    pub fn global_counter(&self, name: &str) -> u64 {
        let text = self.xlb_ok(&["stats", "--json"]);
        let stats: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|err| panic!("xlb stats --json is not JSON ({err}): {text}"));
        stats["global"][name].as_u64().unwrap_or(0)
    }

    /// 1 MB uploaded to `url` and 1 MB downloaded from it, each arriving whole.
    pub fn megabyte_both_ways(&self, url: &str) {
        for args in [["--upload", "1048576"], ["--download", "1048576"]] {
            let mut full = vec!["--url", url];
            full.extend_from_slice(&args);
            let r = self
                .lab
                .request(&self.client_ns(), &full)
                .unwrap_or_else(|err| panic!("{args:?}: {err:#}"));
            match r.as_slice() {
                [Ok(line)] => assert!(line.ends_with(" 1048576"), "{args:?}: {line}"),
                other => panic!("{args:?}: {other:?}"),
            }
        }
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.lab.daemon_log()).unwrap_or_default()
    }

    /// The XDP program attached to the lb's interface, as `ip -d link show` says.
    pub fn lb_link(&self) -> String {
        let lb = self.lab.lb.clone();
        self.lab
            .exec(&lb.ns, &["ip", "-d", "link", "show", "dev", &lb.iface])
            .unwrap_or_else(|e| panic!("ip link show: {e:#}"))
    }
}

impl Drop for E2e {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "{}: FAILED after {:.1} s; the daemon's log ({}):\n{}",
                self.test,
                self.started.elapsed().as_secs_f64(),
                self.lab.daemon_log().display(),
                self.lab.daemon_log_tail(40)
            );
        } else {
            eprintln!(
                "{}: {:.1} s",
                self.test,
                self.started.elapsed().as_secs_f64()
            );
        }
        // The lab tears itself down when dropped, next.
    }
}

// ---- streaming clients ----------------------------------------------------------------------

/// `xlb-lab request` running in the client namespace, its lines read as they come.
pub struct Stream {
    pub label: String,
    pub child: Child,
    pub lines: Receiver<String>,
    /// Every reply read so far, in order.
    pub replies: Vec<Reply>,
}

impl Stream {
    pub fn spawn(lab: &Lab, label: &str, args: &[&str]) -> Stream {
        let bin = lab.lab_bin().display().to_string();
        let mut full = vec![bin.as_str(), "request"];
        full.extend_from_slice(args);
        let mut child = lab
            .spawn_with(&lab.client.ns, &full, |c| {
                c.stdout(Stdio::piped());
            })
            .unwrap_or_else(|e| panic!("starting client {label}: {e:#}"));
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Stream {
            label: label.to_string(),
            child,
            lines: rx,
            replies: Vec::new(),
        }
    }

    pub fn record(&mut self, line: &str) -> Option<Reply> {
        let reply = lab::parse_replies(line).into_iter().next()?;
        self.replies.push(reply.clone());
        Some(reply)
    }

    /// The next reply, waiting up to `timeout`; `None` if none came (or the client ended).
    pub fn next(&mut self, timeout: Duration) -> Option<Reply> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(r) = self.record(&line) {
                        return Some(r);
                    }
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// The first reply, which must be a success: the real that answered.
    pub fn first_real(&mut self) -> String {
        match self.next(LINE_TIMEOUT) {
            Some(Ok(name)) => name,
            Some(Err(reason)) => panic!("client {}: first request failed: {reason}", self.label),
            None => panic!("client {}: no reply within {LINE_TIMEOUT:?}", self.label),
        }
    }

    /// Read what arrived so far without waiting; the number of replies read in all.
    pub fn poll(&mut self) -> usize {
        while let Ok(line) = self.lines.try_recv() {
            self.record(&line);
        }
        self.replies.len()
    }

    /// Wait until `n` more replies than now have been read.
    pub fn wait_more(&mut self, n: usize) {
        let want = self.poll() + n;
        self.wait_total(want);
    }

    /// Wait until `total` replies have been read in all.
    pub fn wait_total(&mut self, total: usize) {
        self.poll();
        while self.replies.len() < total {
            if self.next(LINE_TIMEOUT).is_none() {
                panic!(
                    "client {}: no reply within {LINE_TIMEOUT:?} (got {} in all, waiting for \
                     {total}: {})",
                    self.label,
                    self.replies.len(),
                    summary(&self.replies)
                );
            }
        }
    }

    /// Kill the client and return every reply it printed.
    pub fn stop(mut self) -> Vec<Reply> {
        self.kill();
        // The reader thread ends at EOF, once the killed process's stdout closes.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.record(&line);
        }
        std::mem::take(&mut self.replies)
    }

    pub fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: an unreaped child of ours leading its own process group (the lab starts
            // every command in one).
            unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `r1 ×12, FAIL connection reset ×1` for a failure message (in order, runs collapsed).
pub fn summary(replies: &[Reply]) -> String {
    let mut runs: Vec<(String, usize)> = Vec::new();
    for r in replies {
        let s = match r {
            Ok(name) => name.clone(),
            Err(reason) => format!("FAIL {reason}"),
        };
        match runs.last_mut() {
            Some((last, n)) if *last == s => *n += 1,
            _ => runs.push((s, 1)),
        }
    }
    let parts: Vec<String> = runs.iter().map(|(s, n)| format!("{s} ×{n}")).collect();
    parts.join(", ")
}

/// Every reply is a success from `real`.
pub fn assert_all_from(label: &str, replies: &[Reply], real: &str) {
    assert!(
        !replies.is_empty() && replies.iter().all(|r| matches!(r, Ok(n) if n == real)),
        "{label}: every reply should come from {real} without a failure, got: {}",
        summary(replies)
    );
}

/// Wait for a child with a deadline; kill it and panic if it does not exit in time.
pub fn wait_exit(child: &mut Child, what: &str, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() >= deadline {
            // SAFETY: our unreaped child, leading its own process group.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
