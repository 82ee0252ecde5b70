//! Attaching the balancer to a real interface (a veth pair in a namespace of its own).

mod common;

use std::process::Command;

use common::sh;
use lb_userspace::dataplane::{
    ebpf::{AttachMode, EbpfDataplane, LoadOptions},
    Limits,
};

/// A namespace with a veth pair, removed on drop (also when the test panics).
struct Netns(String);

impl Netns {
    fn new() -> Netns {
        let name = format!("xlbt-attach-{}", std::process::id());
        sh(&["ip", "netns", "add", &name]);
        let ns = Netns(name);
        ns.exec(&[
            "ip", "link", "add", "va", "type", "veth", "peer", "name", "vb",
        ]);
        ns.exec(&["ip", "link", "set", "va", "up"]);
        ns.exec(&["ip", "link", "set", "vb", "up"]);
        ns
    }

    fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.0];
        full.extend_from_slice(args);
        sh(&full)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Enter the namespace for this thread (the test harness runs each test on its own thread).
fn enter(ns: &str) {
    let f = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("netns file");
    use std::os::fd::AsRawFd;
    // SAFETY: setns on a valid namespace fd for the calling thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

#[test]
fn attaches_natively_to_veth_and_detaches_on_drop() {
    if !common::bpf_available("attach") {
        return;
    }
    let ns = Netns::new();
    let opts = LoadOptions {
        limits: Limits {
            max_vips: 2,
            max_reals: 8,
            ring_size: 13,
        },
        conntrack_size: 1024,
        ..LoadOptions::default()
    };
    let handle = std::thread::spawn({
        let name = ns.0.clone();
        move || {
            // By name: a second guard would delete the namespace when it went (the outer one
            // does, once this thread is done).
            enter(&name);
            let mut dp = EbpfDataplane::load(&opts).expect("load");
            let mode = dp.attach("va", AttachMode::Auto).expect("attach");
            let shown = sh(&["ip", "link", "show", "va"]);
            let err = dp.attach("no-such-if0", AttachMode::Native).unwrap_err();
            drop(dp);
            let after = sh(&["ip", "link", "show", "va"]);
            (format!("{mode:?}"), shown, err.to_string(), after)
        }
    });
    let (mode, shown, err, after) = handle.join().expect("attach thread");
    assert_eq!(mode, "Driver", "veth supports native XDP");
    assert!(shown.contains("xdp"), "no XDP program on va: {shown}");
    assert!(
        err.contains("no-such-if0"),
        "error names the interface: {err}"
    );
    assert!(
        !after.contains("prog/xdp"),
        "program left attached: {after}"
    );
    drop(ns);
}

/// `CONFIG_HZ` from /proc/config.gz, when the kernel exposes its config.
fn config_hz() -> Option<u64> {
    let out = Command::new("sh")
        .args([
            "-c",
            "zcat /proc/config.gz 2>/dev/null | grep '^CONFIG_HZ='",
        ])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .strip_prefix("CONFIG_HZ=")?
        .parse()
        .ok()
}

/// The kernel's jiffies as /proc/timer_list shows them (root only).
fn timer_list_jiffies() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/timer_list").ok()?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix("jiffies: "))?
        .trim()
        .parse()
        .ok()
}

#[test]
fn kernel_hz_matches_what_the_kernel_says_of_itself() {
    if !common::bpf_available("kernel_hz") {
        return;
    }
    let hz = lb_userspace::dataplane::ebpf::kernel_hz().expect("measuring HZ");
    // Two witnesses that do not go through the probe program: the kernel's config, and its
    // jiffies counted over a second. At least one must be there.
    let config = config_hz();
    if let Some(c) = config {
        assert_eq!(c, hz, "CONFIG_HZ={c}, measured {hz}");
    }
    let counted = timer_list_jiffies().and_then(|j0| {
        let t0 = std::time::Instant::now();
        std::thread::sleep(std::time::Duration::from_secs(1));
        let j1 = timer_list_jiffies()?;
        Some((j1 - j0) as f64 / t0.elapsed().as_secs_f64())
    });
    if let Some(rate) = counted {
        assert!(
            (rate - hz as f64).abs() < hz as f64 * 0.1,
            "/proc/timer_list counts {rate:.0} jiffies a second, the probe measured {hz}"
        );
    }
    assert!(
        config.is_some() || counted.is_some(),
        "neither /proc/config.gz nor /proc/timer_list can confirm HZ {hz}"
    );
}

/// A bpffs of the test's own, unmounted (with everything pinned in it) on drop.
struct Bpffs(std::path::PathBuf);

impl Bpffs {
    fn new(name: &str) -> Bpffs {
        let dir = std::env::temp_dir().join(format!("xlbt-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        sh(&[
            "mount",
            "-t",
            "bpf",
            "bpf",
            dir.to_str().expect("utf-8 path"),
        ]);
        Bpffs(dir)
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn pinned_maps_are_adopted_and_checked() {
    if !common::bpf_available("pins") {
        return;
    }
    let fs = Bpffs::new("pins");
    let dir = fs.0.join("eth0");
    std::fs::create_dir_all(&dir).expect("pin dir");
    // 1001 flows: 501 buckets, an odd size a restart must recognise as its own.
    let opts = LoadOptions {
        limits: Limits {
            max_vips: 2,
            max_reals: 8,
            ring_size: 13,
        },
        conntrack_size: 1001,
        ..LoadOptions::default()
    };
    let (mut dp, adopted) = EbpfDataplane::load_pinned(&opts, &dir).expect("first load");
    assert!(!adopted, "nothing was pinned yet");
    use lb_userspace::dataplane::Dataplane;
    let real = lb_common::Real {
        flags: lb_common::REAL_F_ALIVE,
        mac: [2, 0, 0, 0, 0, 7],
        ..Default::default()
    };
    dp.set_real(3, &real).expect("write");
    // A tracked flow: the adopted table still has it.
    let flow = lb_common::FlowKey {
        src: lb_common::v4_mapped([192, 0, 2, 1]),
        dst: lb_common::v4_mapped([10, 0, 0, 100]),
        src_port_be: 40000u16.to_be(),
        dst_port_be: 80u16.to_be(),
        proto: lb_common::IPPROTO_TCP,
        _pad: [0; 3],
    };
    assert!(dp.flow_table().put(&flow, 3, 0), "room for one flow");
    let vip_addr = lb_common::VipAddrValue {
        vip_count: 1,
        port0: 0,
    };
    dp.set_vip_addr(&flow.dst, &vip_addr).expect("write");
    // A NAT real's address with two entries (its port's and its own).
    let nat_real = lb_common::v4_mapped([10, 60, 0, 11]);
    for port in [8080u16, 0] {
        let key = lb_common::RevNatKey {
            addr: nat_real,
            port_be: port.to_be(),
            proto: if port == 0 { 0 } else { lb_common::IPPROTO_TCP },
            _pad: 0,
        };
        dp.set_revnat(&key, &lb_common::RevNat::default())
            .expect("write");
    }
    drop(dp);
    // Filters that lost their bits (a foreign writer, a crash between two writes): the next
    // daemon rebuilds them from VIP_ADDRS and REVNAT rather than trusting them.
    for name in [lb_common::MAP_VIP_FILTER, lb_common::MAP_NAT_FILTER] {
        use aya::maps::{Array, Map, MapData};
        let data = MapData::from_pin(dir.join(name)).expect("filter pin");
        let mut filter: Array<_, lb_common::VipFilter> =
            Array::try_from(Map::Array(data)).expect("an array");
        filter
            .set(0, [0u64; lb_common::VIP_FILTER_WORDS], 0)
            .expect("zero it");
    }

    let (dp, adopted) = EbpfDataplane::load_pinned(&opts, &dir).expect("second load adopts");
    for (what, filter, addr) in [
        ("VIP", dp.vip_filter(), flow.dst),
        ("NAT", dp.nat_filter(), nat_real),
    ] {
        let filter = filter.expect("read the filter");
        let bit = lb_common::vip_filter_bit_of(&addr) as usize;
        assert_ne!(
            filter[bit / 64] & (1 << (bit % 64)),
            0,
            "the adopted {what} address's filter bit was not rebuilt"
        );
        assert_eq!(
            filter.iter().map(|w| w.count_ones()).sum::<u32>(),
            1,
            "one {what} address, one bit"
        );
    }
    assert!(adopted, "the pins were not adopted");
    assert_eq!(
        dp.real(3).expect("read"),
        real,
        "adopted maps lost their contents"
    );
    assert_eq!(
        dp.conntrack_get(&flow, 0)
            .expect("lookup")
            .map(|v| v.real_id),
        Some(3),
        "the adopted connection table lost its flow"
    );
    drop(dp);

    // Maps of an older layout (before the connection table of version 4): refused, saying so.
    let set_version = |version: u32| {
        use aya::maps::{Array, Map, MapData};
        let data = MapData::from_pin(dir.join(lb_common::MAP_LAYOUT)).expect("LAYOUT pin");
        let mut layout: Array<_, lb_common::Layout> =
            Array::try_from(Map::Array(data)).expect("an array");
        let mut l = layout.get(&0, 0).expect("read");
        l.version = version;
        layout.set(0, l, 0).expect("write");
    };
    set_version(3);
    let err = match EbpfDataplane::load_pinned(&opts, &dir) {
        Ok(_) => panic!("maps of layout 3 were adopted"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("layout version 3") && err.contains("xlb down"),
        "the refusal says why and what to do: {err}"
    );
    set_version(lb_common::LAYOUT_VERSION);

    let other = LoadOptions {
        limits: Limits {
            ring_size: 17,
            ..opts.limits
        },
        ..opts
    };
    let err = match EbpfDataplane::load_pinned(&other, &dir) {
        Ok(_) => panic!("maps of another ring size were adopted"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("RING"), "the mismatch names the map: {err}");
    lb_userspace::dataplane::ebpf::remove_pins(&dir).expect("remove pins");
    assert!(!dir.exists());
}
