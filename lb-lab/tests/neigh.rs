//! MAC resolution against the kernel: our namespace holds `va`, the peer's namespace `vb`, a
//! veth pair between them (10.203.0.0/24 and fd00:203::/64). No traffic leaves the two.

use std::{
    net::IpAddr,
    os::fd::AsRawFd,
    process::Command,
    time::{Duration, Instant},
};

mod common;

use lb_userspace::{
    dataplane::neigh::{resolve_all, KernelNeighbours, NeighError},
    model::format_mac,
};

const PREFIX: &str = "xlbt-neigh-";

use common::sh;

/// Our namespace and the peer's, both removed on drop (also when the test panics).
struct Namespaces {
    ours: String,
    peer: String,
}

impl Namespaces {
    fn new() -> Namespaces {
        sweep_stale();
        let ours = format!("{PREFIX}{}", std::process::id());
        let ns = Namespaces {
            peer: format!("{ours}-peer"),
            ours,
        };
        sh(&["ip", "netns", "add", &ns.ours]);
        sh(&["ip", "netns", "add", &ns.peer]);
        ns
    }

    fn exec(name: &str, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", name];
        full.extend_from_slice(args);
        sh(&full)
    }

    fn ours(&self, args: &[&str]) -> String {
        Self::exec(&self.ours, args)
    }

    fn peer(&self, args: &[&str]) -> String {
        Self::exec(&self.peer, args)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in [&self.ours, &self.peer] {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// Remove namespaces of earlier runs of this test whose process is gone (killed mid-test).
fn sweep_stale() {
    let Ok(dir) = std::fs::read_dir("/var/run/netns") else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or_default();
        if !pid.is_empty()
            && pid.bytes().all(|b| b.is_ascii_digit())
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

/// Enter the namespace for the calling thread only.
fn enter(name: &str) {
    let f = std::fs::File::open(format!("/var/run/netns/{name}")).expect("netns file");
    // SAFETY: setns on a valid namespace fd, for the calling thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn resolves_reals_on_a_veth_in_a_namespace() {
    if !common::bpf_available("resolves_reals_on_a_veth_in_a_namespace") {
        return;
    }
    let ns = Namespaces::new();
    ns.ours(&["ip", "link", "set", "lo", "up"]);
    ns.ours(&[
        "ip", "link", "add", "va", "type", "veth", "peer", "name", "vb",
    ]);
    ns.ours(&["ip", "link", "set", "vb", "netns", &ns.peer]);
    ns.ours(&["ip", "addr", "add", "10.203.0.1/24", "dev", "va"]);
    ns.ours(&["ip", "addr", "add", "fd00:203::1/64", "dev", "va", "nodad"]);
    ns.ours(&["ip", "link", "set", "va", "up"]);
    ns.peer(&["ip", "link", "set", "lo", "up"]);
    ns.peer(&["ip", "addr", "add", "10.203.0.2/24", "dev", "vb"]);
    ns.peer(&["ip", "addr", "add", "fd00:203::2/64", "dev", "vb", "nodad"]);
    ns.peer(&["ip", "link", "set", "vb", "up"]);
    ns.ours(&["ip", "route", "add", "198.51.100.0/24", "via", "10.203.0.2"]);
    ns.ours(&["ip", "route", "add", "blackhole", "203.0.113.0/25"]);
    ns.ours(&["ip", "route", "add", "prohibit", "203.0.113.128/25"]);
    ns.ours(&["ip", "route", "add", "blackhole", "2001:db8:1::/48"]);
    // Permanent entries: two on va, one on another interface that must not show up.
    ns.ours(&[
        "ip",
        "neigh",
        "add",
        "10.203.0.9",
        "lladdr",
        "02:00:00:00:00:09",
        "dev",
        "va",
        "nud",
        "permanent",
    ]);
    ns.ours(&[
        "ip",
        "neigh",
        "add",
        "fd00:203::9",
        "lladdr",
        "02:00:00:00:00:19",
        "dev",
        "va",
        "nud",
        "permanent",
    ]);
    ns.ours(&[
        "ip", "link", "add", "vc", "type", "veth", "peer", "name", "vd",
    ]);
    ns.ours(&[
        "ip",
        "neigh",
        "add",
        "10.203.0.10",
        "lladdr",
        "02:00:00:00:00:0a",
        "dev",
        "vc",
        "nud",
        "permanent",
    ]);
    let peer_mac = ns
        .peer(&["cat", "/sys/class/net/vb/address"])
        .trim()
        .to_owned();

    let ours = ns.ours.clone();
    let checks = std::thread::spawn(move || {
        enter(&ours);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();

        let err = KernelNeighbours::new("xlbt-nope0").unwrap_err();
        assert!(matches!(err, NeighError::NoInterface { .. }), "{err}");
        assert!(err.to_string().contains("xlbt-nope0"), "{err}");

        let n = KernelNeighbours::new("va").unwrap();
        assert_eq!(n.iface(), "va");

        // The permanent entries, as IPv4 and IPv6; vc's entry is not va's.
        let table = n.dump().unwrap();
        let mac = |a: &str| table.get(&ip(a)).map(format_mac);
        assert_eq!(mac("10.203.0.9").as_deref(), Some("02:00:00:00:00:09"));
        assert_eq!(mac("fd00:203::9").as_deref(), Some("02:00:00:00:00:19"));
        assert_eq!(mac("10.203.0.10"), None, "entry of another interface");
        assert!(table
            .keys()
            .all(|a| !matches!(a, IpAddr::V6(v) if v.to_ipv4_mapped().is_some())));
        assert_eq!(mac("10.203.0.2"), None, "not resolved yet");

        // On-link: connected routes of va only.
        for (a, want) in [
            ("10.203.0.2", true),
            ("10.203.0.9", true),
            ("fd00:203::2", true),
            ("fe80::1", true),
            ("10.203.0.1", false),   // our own address: a local route out of lo
            ("10.203.0.255", false), // broadcast
            ("192.0.2.1", false),    // no route at all (ENETUNREACH)
            ("198.51.100.7", false), // via a gateway
            ("2001:db8::1", false),  // no IPv6 route
            ("203.0.113.1", false),  // blackhole (EINVAL)
            ("203.0.113.129", false), // prohibit (EACCES)
            ("2001:db8:1::1", false), // IPv6 blackhole (a route of type RTN_BLACKHOLE)
            ("127.0.0.1", false),
            ("::1", false),
        ] {
            assert_eq!(n.on_link(ip(a)).unwrap(), want, "on_link({a})");
        }

        // The peer's addresses resolve to its veth's MAC well within the wait.
        let started = Instant::now();
        let addrs = [ip("10.203.0.2"), ip("fd00:203::2"), ip("10.203.0.9")];
        let got = rt
            .block_on(resolve_all(&n, &addrs, Duration::from_secs(1)))
            .unwrap();
        let took = started.elapsed();
        eprintln!("resolved {got:?} in {took:?}");
        assert_eq!(got.len(), 3);
        assert_eq!(
            got[&ip("10.203.0.2")].map(|m| format_mac(&m)),
            Some(peer_mac.clone())
        );
        assert_eq!(
            got[&ip("fd00:203::2")].map(|m| format_mac(&m)),
            Some(peer_mac.clone())
        );
        assert_eq!(
            got[&ip("10.203.0.9")].map(|m| format_mac(&m)).as_deref(),
            Some("02:00:00:00:00:09")
        );
        assert!(took < Duration::from_secs(1), "took {took:?}");
        // And they stay in the table.
        let table = n.dump().unwrap();
        assert_eq!(
            table.get(&ip("10.203.0.2")).map(format_mac),
            Some(peer_mac.clone())
        );

        // Nobody behind 10.203.0.77: None once the wait is over, not much later.
        let started = Instant::now();
        let wait = Duration::from_millis(300);
        let got = rt
            .block_on(resolve_all(&n, &[ip("10.203.0.77")], wait))
            .unwrap();
        let took = started.elapsed();
        assert_eq!(got, [(ip("10.203.0.77"), None)].into_iter().collect());
        assert!(
            took >= wait && took < wait + Duration::from_millis(500),
            "took {took:?}"
        );
        assert!(!n.dump().unwrap().contains_key(&ip("10.203.0.77")));

        // A zero wait dumps (and probes) once.
        let got = rt
            .block_on(resolve_all(
                &n,
                &[ip("10.203.0.9"), ip("10.203.0.78")],
                Duration::ZERO,
            ))
            .unwrap();
        assert_eq!(got[&ip("10.203.0.9")], Some([2, 0, 0, 0, 0, 9]));
        assert_eq!(got[&ip("10.203.0.78")], None);
    });
    let result = checks.join();
    eprintln!("{}", ns.ours(&["ip", "neigh", "show"]));
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}
