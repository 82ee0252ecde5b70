//! ns/packet of the XDP balancer, measured with BPF_PROG_TEST_RUN as docs/benchmarks.md says:
//! a wrapper program restores the frame before every iteration and tail-calls the balancer;
//! the wrapper's own cost (tail-calling a program that returns at once) is measured in the
//! same run and subtracted; counters must rise by exactly the iteration count; the thread is
//! pinned to one CPU. Run it with `cargo xtask bench [--json]`.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::ExitCode,
};

use anyhow::{bail, ensure, Context, Result};
use lb_common::{
    Real, TunnelConf, VipKey, VipMeta, IPPROTO_TCP, IPPROTO_UDP, REAL_F_ALIVE, REAL_F_TUNNEL,
    REAL_F_V6, VIP_F_NO_CONNTRACK,
};
use lb_lab::{
    bench::{pin_to_cpu, Bench, Vary},
    packet::Frame,
};
use lb_userspace::{
    dataplane::{
        ebpf::{EbpfDataplane, LoadOptions},
        CounterSource, Dataplane, FlowSource, Limits,
    },
    model::map_addr,
};

const XDP_PASS: u32 = 2;
/// The IPv4 source address in an untagged frame: 14 (Ethernet) + 12.
const V4_SRC_OFF: u32 = 26;
const XDP_TX: u32 = 3;

struct Args {
    json: bool,
    runs: usize,
    repeat: u32,
    cpu: usize,
    /// Only the cases whose name contains one of these.
    only: Vec<String>,
    conntrack_size: u32,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        json: false,
        runs: 7,
        repeat: 1_000_000,
        cpu: 0,
        only: vec![],
        conntrack_size: lb_common::DEFAULT_CONNTRACK_SIZE,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--json" => args.json = true,
            "--runs" => args.runs = value("--runs")?.parse().context("--runs: not a number")?,
            "--repeat" => {
                args.repeat = value("--repeat")?
                    .parse()
                    .context("--repeat: not a number")?
            }
            "--cpu" => args.cpu = value("--cpu")?.parse().context("--cpu: not a number")?,
            "--case" => args.only.push(value("--case")?),
            "--conntrack-size" => {
                args.conntrack_size = value("--conntrack-size")?
                    .parse()
                    .context("--conntrack-size: not a number")?
            }
            "-h" | "--help" => {
                println!(
                    "usage: xlb-bench [--json] [--runs N (7)] [--repeat N (1000000)] [--cpu N (0)] [--case NAME]... [--conntrack-size N (1048576)]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    ensure!(args.runs >= 1, "--runs: must be at least 1");
    ensure!(args.repeat >= 1, "--repeat: must be at least 1");
    Ok(args)
}

/// A VIP with four reals spread over its ring, written straight into the maps (the bench
/// measures the kernel, not the control plane).
fn add_vip(
    dp: &mut EbpfDataplane,
    vip_id: u32,
    addr: IpAddr,
    port: u16,
    proto: u8,
    flags: u32,
) -> Result<()> {
    add_vip_with(dp, vip_id, addr, port, proto, flags, None)
}

/// A VIP with four reals; `tunnel`: tunnel reals at that address's .1 to .4 (IPv4 or IPv6
/// by the address), else direct-routing reals.
fn add_vip_with(
    dp: &mut EbpfDataplane,
    vip_id: u32,
    addr: IpAddr,
    port: u16,
    proto: u8,
    flags: u32,
    tunnel: Option<IpAddr>,
) -> Result<()> {
    let m = dp.limits().ring_size;
    let first_real = 1 + vip_id * 4;
    for i in 0..4 {
        let (real_addr, real_flags) = match tunnel {
            Some(base) => {
                let mut a = map_addr(base);
                a[15] = 1 + i as u8;
                let v6 = if base.is_ipv6() { REAL_F_V6 } else { 0 };
                (a, REAL_F_ALIVE | REAL_F_TUNNEL | v6)
            }
            None => (map_addr(addr), REAL_F_ALIVE),
        };
        let real = Real {
            addr: real_addr,
            mac: [0x02, 0xbb, 0, 0, vip_id as u8, i as u8],
            flags: real_flags,
            vip_id,
            ..Default::default()
        };
        dp.set_real(first_real + i, &real)?;
    }
    let ring: Vec<u32> = (0..m).map(|s| first_real + s % 4).collect();
    dp.write_ring(vip_id, 0, &ring)?;
    dp.set_vip_meta(
        vip_id,
        &VipMeta {
            flags,
            generation: 0,
            in_use: 1,
            _reserved: 0,
        },
    )?;
    let key = VipKey {
        addr: map_addr(addr),
        port_be: port.to_be(),
        proto,
        _pad: 0,
    };
    dp.set_vip(&key, vip_id)?;
    Ok(())
}

struct Case {
    name: &'static str,
    /// `dr` or `tunnel`.
    mode: &'static str,
    frame: Vec<u8>,
    /// What the wrapper varies between iterations.
    vary: Vary,
    /// VIP whose counters must rise, with whether every packet must be a new flow.
    vip: Option<(u32, bool)>,
    action: u32,
}

struct Measured {
    name: &'static str,
    mode: &'static str,
    net: Vec<f64>,
    raw: Vec<f64>,
    baseline: Vec<f64>,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

/// Warm up (the first pass creates the case's tracked flows), then `args.runs` runs of the
/// case and of the wrapper alone, checking the counters rose by exactly the iterations.
fn measure(dp: &mut EbpfDataplane, case: &Case, args: &Args) -> Result<Measured> {
    let mut bench = Bench::new(dp)?;
    let warmup = match case.vary {
        Vary::Cycle { flows, .. } => flows,
        _ => 1000,
    };
    let (action, _) = bench.run(&case.frame, case.vary, warmup, false)?;
    ensure!(
        action == case.action,
        "{}: action {action}, expected {}",
        case.name,
        case.action
    );
    let mut m = Measured {
        name: case.name,
        mode: case.mode,
        net: vec![],
        raw: vec![],
        baseline: vec![],
    };
    for _ in 0..args.runs {
        let (_, base) = bench.run(&case.frame, case.vary, args.repeat, true)?;
        let before = match case.vip {
            Some((vip, _)) => Some(dp.vip_stats(vip)?),
            None => None,
        };
        let (action, raw) = bench.run(&case.frame, case.vary, args.repeat, false)?;
        ensure!(
            action == case.action,
            "{}: action {action}, expected {}",
            case.name,
            case.action
        );
        if let (Some((vip, every_new)), Some(before)) = (case.vip, before) {
            let after = dp.vip_stats(vip)?;
            let packets = after.packets - before.packets;
            let new = after.new_flows - before.new_flows;
            ensure!(
                packets == u64::from(args.repeat),
                "{}: VIP counted {packets} packets for {} iterations",
                case.name,
                args.repeat
            );
            let want_new = if every_new { u64::from(args.repeat) } else { 0 };
            ensure!(
                new == want_new,
                "{}: {new} new flows for {} iterations (expected {want_new}): the table \
                 did not hold the working set",
                case.name,
                args.repeat
            );
        }
        m.raw.push(raw);
        m.baseline.push(base);
        m.net.push(raw - base);
    }
    Ok(m)
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xlb-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let args = parse_args()?;
    pin_to_cpu(args.cpu)?;
    let opts = LoadOptions {
        limits: Limits {
            max_vips: 8,
            max_reals: 64,
            ring_size: lb_common::DEFAULT_RING_SIZE,
        },
        conntrack_size: args.conntrack_size,
        ..LoadOptions::default()
    };
    let mut dp = EbpfDataplane::load(&opts).context("loading the XDP programs (root needed)")?;

    let client4 = Ipv4Addr::new(192, 0, 2, 10);
    let client6: Ipv6Addr = "2001:db8:1::10".parse()?;
    let vip4 = Ipv4Addr::new(10, 0, 0, 100);
    let vip4_bypass = Ipv4Addr::new(10, 0, 0, 101);
    let vip6: Ipv6Addr = "2001:db8::100".parse()?;
    add_vip(&mut dp, 0, vip4.into(), 80, IPPROTO_TCP, 0)?;
    add_vip(
        &mut dp,
        1,
        vip4_bypass.into(),
        80,
        IPPROTO_TCP,
        VIP_F_NO_CONNTRACK,
    )?;
    add_vip(&mut dp, 2, vip4.into(), 53, IPPROTO_UDP, 0)?;
    add_vip(&mut dp, 3, vip6.into(), 80, IPPROTO_TCP, 0)?;
    // The same VIPs on other ports (ids 4 to 7), with tunnel reals (IPIP; IP6IP6 for IPv6).
    let reals4: IpAddr = Ipv4Addr::new(10, 9, 0, 0).into();
    let reals6: IpAddr = "2001:db8:9::".parse::<Ipv6Addr>()?.into();
    dp.set_tunnel(&TunnelConf {
        src4: [10, 0, 0, 1],
        src6: "2001:db8::1".parse::<Ipv6Addr>()?.octets(),
        mtu: 1500,
        ..TunnelConf::default()
    })?;
    add_vip_with(&mut dp, 4, vip4.into(), 81, IPPROTO_TCP, 0, Some(reals4))?;
    add_vip_with(
        &mut dp,
        5,
        vip4_bypass.into(),
        81,
        IPPROTO_TCP,
        VIP_F_NO_CONNTRACK,
        Some(reals4),
    )?;
    add_vip_with(&mut dp, 6, vip4.into(), 54, IPPROTO_UDP, 0, Some(reals4))?;
    add_vip_with(&mut dp, 7, vip6.into(), 81, IPPROTO_TCP, 0, Some(reals6))?;

    let payload = [0u8; 64];
    let cases = [
        Case {
            name: "tcp4_established",
            mode: "dr",
            frame: Frame::tcp4(client4, 40000, vip4, 80)
                .with_payload(&payload)
                .build(),
            vary: Vary::None,
            vip: Some((0, false)),
            action: XDP_TX,
        },
        Case {
            name: "tcp4_new_flow",
            mode: "dr",
            frame: Frame::tcp4(client4, 40001, vip4, 80)
                .with_payload(&payload)
                .build(),
            vary: Vary::NewFlows { off: V4_SRC_OFF },
            vip: Some((0, true)),
            action: XDP_TX,
        },
        Case {
            name: "tcp4_conntrack_bypass",
            mode: "dr",
            frame: Frame::tcp4(client4, 40000, vip4_bypass, 80)
                .with_payload(&payload)
                .build(),
            vary: Vary::None,
            vip: Some((1, true)),
            action: XDP_TX,
        },
        Case {
            name: "udp4_established",
            mode: "dr",
            frame: Frame::udp4(client4, 40000, vip4, 53)
                .with_payload(&payload)
                .build(),
            vary: Vary::None,
            vip: Some((2, false)),
            action: XDP_TX,
        },
        Case {
            name: "tcp6_established",
            mode: "dr",
            frame: Frame::tcp6(client6, 40000, vip6, 80)
                .with_payload(&payload)
                .build(),
            vary: Vary::None,
            vip: Some((3, false)),
            action: XDP_TX,
        },
        Case {
            name: "non_vip",
            mode: "dr",
            frame: Frame::tcp4(client4, 40000, Ipv4Addr::new(10, 0, 0, 200), 80)
                .with_payload(&payload)
                .build(),
            vary: Vary::None,
            vip: None,
            action: XDP_PASS,
        },
        Case {
            name: "tcp4_established",
            mode: "tunnel",
            frame: Frame::tcp4(client4, 40000, vip4, 81)
                .with_payload(&payload)
                .build(),
            vary: Vary::None,
            vip: Some((4, false)),
            action: XDP_TX,
        },
        Case {
            name: "tcp4_new_flow",
            mode: "tunnel",
            frame: Frame::tcp4(client4, 40001, vip4, 81)
                .with_payload(&payload)
                .build(),
            vary: Vary::NewFlows { off: V4_SRC_OFF },
            vip: Some((4, true)),
            action: XDP_TX,
        },
        Case {
            name: "tcp4_conntrack_bypass",
            mode: "tunnel",
            frame: Frame::tcp4(client4, 40000, vip4_bypass, 81)
                .with_payload(&payload)
                .build(),
            vary: Vary::None,
            vip: Some((5, true)),
            action: XDP_TX,
        },
        Case {
            name: "udp4_established",
            mode: "tunnel",
            frame: Frame::udp4(client4, 40000, vip4, 54)
                .with_payload(&payload)
                .build(),
            vary: Vary::None,
            vip: Some((6, false)),
            action: XDP_TX,
        },
        Case {
            name: "tcp6_established",
            mode: "tunnel",
            frame: Frame::tcp6(client6, 40000, vip6, 81)
                .with_payload(&payload)
                .build(),
            vary: Vary::None,
            vip: Some((7, false)),
            action: XDP_TX,
        },
    ];

    let mut results = Vec::new();
    let mut walk: Option<Walk> = None;
    for case in &cases {
        if !args.only.is_empty() && !args.only.iter().any(|o| case.name.contains(o.as_str())) {
            continue;
        }
        results.push(measure(&mut dp, case, &args)?);
    }

    // Established flows over a working set as large as the table allows: the budget asks for
    // "flat from 1 K to 1 M tracked flows". The bench thread runs on one CPU, whose LRU holds only its
    // share of the table (max entries / possible CPUs): size it for the whole set on that CPU.
    // (Not available_parallelism: the pinned thread would see 1.)
    let cpus =
        aya::util::nr_cpus().map_err(|(path, e)| anyhow::anyhow!("reading {path}: {e}"))? as u32;
    let scale: [(&'static str, u32); 3] = [
        ("tcp4_established_1k_flows", 1_000),
        ("tcp4_established_64k_flows", 65_536),
        ("tcp4_established_1m_flows", 1_000_000),
    ];
    for (name, flows) in scale {
        if !args.only.is_empty() && !args.only.iter().any(|o| name.contains(o.as_str())) {
            continue;
        }
        let big = LoadOptions {
            limits: opts.limits,
            conntrack_size: flows
                .saturating_mul(cpus)
                .saturating_add(flows / 4 * cpus)
                .max(4096),
            ..LoadOptions::default()
        };
        let mut dp = EbpfDataplane::load(&big).context("loading for the working-set cases")?;
        add_vip(&mut dp, 0, vip4.into(), 80, IPPROTO_TCP, 0)?;
        let case = Case {
            name,
            mode: "dr",
            frame: Frame::tcp4(client4, 40000, vip4, 80)
                .with_payload(&payload)
                .build(),
            vary: Vary::Cycle {
                off: V4_SRC_OFF,
                flows,
            },
            vip: Some((0, false)),
            action: XDP_TX,
        };
        results.push(measure(&mut dp, &case, &args)?);
        ensure!(
            dp.failed_calls() == 0,
            "{} map calls failed",
            dp.failed_calls()
        );
        if flows == 1_000_000 {
            walk = Some(time_walk(&dp)?);
        }
    }
    ensure!(
        dp.failed_calls() == 0,
        "{} map calls failed",
        dp.failed_calls()
    );

    let cmd = "cargo xtask bench";
    if args.json {
        for m in &results {
            println!(
                "{{\"case\":\"{}\",\"mode\":\"{}\",\"ns_per_pkt_median\":{:.1},\
                 \"ns_per_pkt_min\":{:.1},\"runs\":{},\"repeat\":{},\
                 \"raw_ns_median\":{:.1},\"wrapper_ns_median\":{:.1},\"cpu\":{}}}",
                m.name,
                m.mode,
                median(&m.net),
                min(&m.net),
                args.runs,
                args.repeat,
                median(&m.raw),
                median(&m.baseline),
                args.cpu
            );
        }
    } else {
        println!(
            "xlb XDP balancer, BPF_PROG_TEST_RUN, {} runs x {} packets, CPU {} \
             (wrapper cost subtracted)",
            args.runs, args.repeat, args.cpu
        );
        println!(
            "{:<28} {:>6} {:>12} {:>9} {:>10} {:>10}",
            "case", "mode", "ns/pkt med", "min", "raw med", "wrapper"
        );
        for m in &results {
            println!(
                "{:<28} {:>6} {:>12.1} {:>9.1} {:>10.1} {:>10.1}",
                m.name,
                m.mode,
                median(&m.net),
                min(&m.net),
                median(&m.raw),
                median(&m.baseline)
            );
        }
        if let Some(w) = &walk {
            println!(
                "conntrack walk (xlb real flows) over {} tracked flows: {:.0} ms median, {:.0} ms \
                 min of {} walks ({} flows of the real counted)",
                w.entries, w.median_ms, w.min_ms, w.walks, w.flows
            );
        }
        println!("reproduce: {cmd}   (JSON: {cmd} --json)");
    }
    if let (true, Some(w)) = (args.json, &walk) {
        println!(
            "{{\"case\":\"conntrack_walk_1m_flows\",\"entries\":{},\"ms_median\":{:.1},\
             \"ms_min\":{:.1},\"walks\":{}}}",
            w.entries, w.median_ms, w.min_ms, w.walks
        );
    }
    Ok(())
}

struct Walk {
    entries: u64,
    flows: u64,
    walks: usize,
    median_ms: f64,
    min_ms: f64,
}

/// `xlb real flows` over the table the 1 M-flow case filled: how long the daemon's walk takes.
fn time_walk(dp: &EbpfDataplane) -> Result<Walk> {
    let reader = dp.flow_reader()?;
    let mut ms = Vec::new();
    let mut last = lb_userspace::dataplane::FlowCount::default();
    for _ in 0..5 {
        last = reader.real_flows(1, std::time::Duration::from_secs(900))?;
        ms.push(last.elapsed.as_secs_f64() * 1e3);
    }
    Ok(Walk {
        entries: last.scanned,
        flows: last.flows,
        walks: ms.len(),
        median_ms: median(&ms),
        min_ms: min(&ms),
    })
}
