//! Helpers of the tests with two balancer nodes (`LabConfig::second_lb`): the flow sync key
//! and flags, JSON answers, the long-lived connections that must keep their reals.

use std::time::{Duration, Instant};

use super::{common::Removed, harness::*};

pub const KEY: &[u8] = b"a shared key of the two balancers\n";
pub const LB1: &str = "10.222.0.3:8848";
pub const LB2: &str = "10.222.0.4:8848";

pub fn key_file(test: &str) -> Removed {
    let path = std::env::temp_dir().join(format!("xlb-test-{}-{test}.key", std::process::id()));
    std::fs::write(&path, KEY).expect("writing the key file");
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod 600 the key file");
    Removed(path)
}

pub fn sync_args<'a>(listen: &'a str, peer: &'a str, key: &'a str) -> Vec<&'a str> {
    vec![
        "--sync-listen",
        listen,
        "--sync-peer",
        peer,
        "--sync-key-file",
        key,
    ]
}

pub fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

pub fn sync_of(v: &serde_json::Value) -> serde_json::Value {
    v["sync"].clone()
}

pub fn digest(list: &serde_json::Value, vip: &str) -> String {
    list["vips"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["vip"] == vip))
        .map(|v| v["ring_digest"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

/// `xlb ARGS` against lb2's daemon, which must succeed.
pub fn on_lb2(e: &E2e, args: &[&str]) -> std::process::Output {
    let out = e.lab.xlb_lb2(args).expect("xlb on lb2");
    assert!(
        out.status.success(),
        "xlb {args:?} on lb2: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every stream's replies since `marks` come from the real it started on, and there are
/// at least `more` of them.
pub fn keep_their_reals(
    label: &str,
    streams: &mut [(String, Stream)],
    marks: &[usize],
    more: usize,
) {
    for ((real, s), mark) in streams.iter_mut().zip(marks) {
        s.wait_total(mark + more);
        let since = &s.replies[*mark..];
        assert_all_from(&format!("{label}: {}", s.label), since, real);
    }
}

/// `n` kept-alive connections to `url`, a request every 100 ms each, waiting up to 30 s for an
/// answer (a failover takes seconds of retransmissions), with the real each started on.
pub fn long_lived(e: &E2e, url: &str, n: usize) -> Vec<(String, Stream)> {
    (0..n)
        .map(|i| {
            let mut s = e.keepalive_waiting(&format!("long #{i}"), url, 100, 30);
            (s.first_real(), s)
        })
        .collect()
}

/// Every reply of every connection was a success.
pub fn none_failed(streams: Vec<(String, Stream)>) {
    for (_, s) in streams {
        let label = s.label.clone();
        let replies = s.stop();
        assert!(
            replies.iter().all(Result::is_ok),
            "{label} failed: {}",
            summary(&replies)
        );
    }
}
