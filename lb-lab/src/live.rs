//! The benchmark's live-frames rows: BPF_PROG_TEST_RUN with `BPF_F_TEST_XDP_LIVE_FRAMES`
//! (what xdp-trafficgen does) injects the wrapper's frames as if received on one end of a veth
//! pair, in a namespace of its own; what the balancer sends with `XDP_TX` really leaves by
//! that veth, and the peer's XDP program (`xlb_bench_sink`) counts and drops it. Frames
//! counted at the receiver over the wall time of the run: forwarded packets per second on the
//! one CPU the thread is pinned to (the veth delivers on the sending CPU).

use std::{
    os::fd::{AsRawFd, OwnedFd},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use aya::{
    maps::{PerCpuArray, PerCpuValues},
    programs::{xdp::XdpMode, TestRun, TestRunAttrs, TestRunOptions, Xdp},
};

use crate::bench::{Bench, Vary};

/// A namespace with a veth pair: `inject` (frames enter here, and `XDP_TX` leaves here) and
/// `sink` (its XDP program counts what arrives). Removed on drop. The benchmark's clients
/// (`CLIENTS4`) are on `inject`'s subnet, forwarding is on, and its client
/// `CLIENT4` is a permanent neighbour at the sink's MAC: a NAT reply coming in by `inject` is
/// routed back out of it (the FIB lookup of the reply path succeeds, as on a balancer).
pub struct LiveLink {
    netns: String,
    /// The namespace this thread was in before entering ours.
    home: OwnedFd,
    pub inject_ifindex: u32,
}

/// The benchmark's clients' subnets, as `inject`'s addresses.
pub const CLIENTS4: &str = "192.0.2.254/24";
/// The benchmark's IPv4 client, a neighbour of `inject`.
pub const CLIENT4: &str = "192.0.2.10";
const SINK_MAC: &str = "02:00:00:00:be:01";

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn setns(fd: i32) -> Result<()> {
    // SAFETY: setns on an fd we hold; it changes this thread's network namespace only.
    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setns");
    }
    Ok(())
}

impl LiveLink {
    /// Create the namespace and the pair, and move this thread into the namespace (a test run
    /// resolves the ingress interface in the calling thread's namespace).
    pub fn new() -> Result<LiveLink> {
        let netns = format!("xlb-live-{}", std::process::id());
        let home: OwnedFd = std::fs::File::open("/proc/thread-self/ns/net")
            .context("opening this thread's network namespace")?
            .into();
        ip(&["netns", "add", &netns])?;
        let mut link = LiveLink {
            netns,
            home,
            inject_ifindex: 0,
        };
        let n = link.netns.as_str();
        // No IPv6 on the pair: its neighbour discovery and MLD frames would reach the sink.
        for knob in [
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ] {
            ip(&["netns", "exec", n, "sysctl", "-qw", knob])?;
        }
        ip(&[
            "-n", n, "link", "add", "inject", "type", "veth", "peer", "name", "sink",
        ])?;
        ip(&["-n", n, "link", "set", "sink", "address", SINK_MAC])?;
        ip(&["-n", n, "link", "set", "inject", "up"])?;
        ip(&["-n", n, "link", "set", "sink", "up"])?;
        ip(&["-n", n, "addr", "add", CLIENTS4, "dev", "inject"])?;
        ip(&[
            "-n",
            n,
            "neigh",
            "replace",
            CLIENT4,
            "lladdr",
            SINK_MAC,
            "dev",
            "inject",
            "nud",
            "permanent",
        ])?;
        let ns = std::fs::File::open(format!("/run/netns/{n}"))
            .with_context(|| format!("opening namespace {n}"))?;
        setns(ns.as_raw_fd())?;
        let name = std::ffi::CString::new("inject").expect("no NUL");
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        ensure!(ifindex != 0, "no interface inject in {n}");
        link.inject_ifindex = ifindex;
        Ok(link)
    }
}

impl Drop for LiveLink {
    fn drop(&mut self) {
        let _ = setns(self.home.as_raw_fd());
        let _ = ip(&["netns", "del", &self.netns]);
    }
}

/// What one live-frames run forwarded.
#[derive(Clone, Copy, Debug)]
pub struct Live {
    pub sent: u64,
    pub received: u64,
    pub elapsed: Duration,
}

impl Live {
    pub fn mpps(&self) -> f64 {
        self.received as f64 / self.elapsed.as_secs_f64().max(1e-9) / 1e6
    }
}

impl Bench {
    /// Attach the sink to the pair's `sink` end (this thread is in the pair's namespace).
    pub fn attach_sink(&mut self) -> Result<()> {
        let prog: &mut Xdp = self
            .ebpf_mut()
            .program_mut(lb_common::PROG_BENCH_SINK)
            .context("program xlb_bench_sink")?
            .try_into()?;
        prog.load().context("loading xlb_bench_sink")?;
        prog.attach("sink", XdpMode::Driver)
            .context("attaching xlb_bench_sink to the veth (native XDP)")?;
        Ok(())
    }

    fn sunk(&self) -> Result<u64> {
        let map: PerCpuArray<_, u64> = PerCpuArray::try_from(
            self.ebpf()
                .map(lb_common::MAP_BENCH_SINK)
                .context("map BENCH_SINK")?,
        )?;
        let v: PerCpuValues<u64> = map.get(&0, 0)?;
        Ok(v.iter().sum())
    }

    /// `repeat` live frames of `frame` (varied as `vary` says) injected on `ifindex`.
    pub fn run_live(
        &mut self,
        frame: &[u8],
        vary: Vary,
        repeat: u32,
        ifindex: u32,
    ) -> Result<Live> {
        self.prepare(frame, vary, false)?;
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex; the kernel wants data_end to be the frame's length.
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
        ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
        let before = self.sunk()?;
        let start = Instant::now();
        self.wrapper()?
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ctx_in: Some(&ctx),
                repeat,
                attrs: TestRunAttrs::new().xdp_live_frames(64),
                ..TestRunOptions::new()
            })
            .map_err(|e| anyhow::anyhow!("live-frames BPF_PROG_TEST_RUN: {e:?}"))?;
        let elapsed = start.elapsed();
        self.advance(vary, repeat);
        // The veth delivers within the run; what is still queued arrives at once.
        std::thread::sleep(Duration::from_millis(20));
        Ok(Live {
            sent: u64::from(repeat),
            received: self.sunk()? - before,
            elapsed,
        })
    }
}
