//! ns/packet of the XDP balancer, measured with BPF_PROG_TEST_RUN as docs/benchmarks.md says:
//! a wrapper program restores the frame before every iteration and tail-calls the balancer;
//! the wrapper's own cost (tail-calling a program that returns at once) is measured in the
//! same run and subtracted; counters must rise by exactly the iteration count; the thread is
//! pinned to one CPU. Run it with `cargo xtask bench [--json]`.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::ExitCode,
    time::Duration,
};

use anyhow::{bail, ensure, Context, Result};
use lb_common::{
    Real, RevNat, TunnelConf, VipAddrValue, VipKey, VipMeta, IPPROTO_TCP, IPPROTO_UDP,
    REAL_F_ALIVE, REAL_F_NAT, REAL_F_TUNNEL, REAL_F_V6, VIP_F_NO_CONNTRACK,
};
use lb_lab::{
    bench::{off_cpu, pin_to_cpu, Bench, Vary},
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
    /// New flows of the flood row.
    flood: u32,
    /// Exit non-zero when a budget (`lb_lab::budget`) is missed.
    check: bool,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        json: false,
        runs: 7,
        repeat: 1_000_000,
        cpu: 0,
        only: vec![],
        conntrack_size: lb_common::DEFAULT_CONNTRACK_SIZE,
        flood: 10_000_000,
        check: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--json" => args.json = true,
            "--check" => args.check = true,
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
            "--flood" => args.flood = value("--flood")?.parse().context("--flood: not a number")?,
            "-h" | "--help" => {
                println!(
                    "usage: xlb-bench [--json] [--check] [--runs N (7)] [--repeat N (1000000)] [--cpu N (0)] [--case NAME]... [--conntrack-size N (1048576)] [--flood N (10000000)]"
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
    // As the daemon writes them: the address (and its VIP_FILTER bit) first.
    dp.set_vip_addr(
        &key.addr,
        &VipAddrValue {
            vip_count: 1,
            port0: 0,
        },
    )?;
    dp.set_vip(&key, vip_id)?;
    Ok(())
}

/// A TCP VIP of NAT reals (`reals`' .1 to .4, port 8080), with their `REVNAT` entries.
fn add_nat_vip(
    dp: &mut EbpfDataplane,
    vip_id: u32,
    addr: Ipv4Addr,
    port: u16,
    reals: Ipv4Addr,
) -> Result<()> {
    add_vip_with(
        dp,
        vip_id,
        addr.into(),
        port,
        IPPROTO_TCP,
        0,
        Some(reals.into()),
    )?;
    let first_real = 1 + vip_id * 4;
    for i in 0..4 {
        let mut real = dp.real(first_real + i)?;
        real.flags = REAL_F_ALIVE | REAL_F_NAT;
        real.port_be = 8080u16.to_be();
        dp.set_real(first_real + i, &real)?;
        let key = |port: u16, proto: u8| VipKey {
            addr: real.addr,
            port_be: port.to_be(),
            proto,
            _pad: 0,
        };
        let rv = RevNat {
            vip_addr: map_addr(addr.into()),
            vip_port_be: port.to_be(),
            _pad: 0,
            real_id: first_real + i,
            vip_id,
        };
        dp.set_revnat(&key(8080, IPPROTO_TCP), &rv)?;
        dp.set_revnat(&key(0, 0), &RevNat::default())?;
    }
    Ok(())
}

struct Case {
    name: &'static str,
    /// `dr`, `tunnel` or `nat`.
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
    /// Packets of the runs and how many of them were untracked flows.
    packets: u64,
    untracked: u64,
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
    measure_on(dp, case, args, None)
}

/// `measure` with the frames coming in by interface `ingress` (its namespace's routes).
fn measure_on(
    dp: &mut EbpfDataplane,
    case: &Case,
    args: &Args,
    ingress: Option<u32>,
) -> Result<Measured> {
    // Each case on an empty table: another case's flows are live for 900 s and would fill
    // this one's buckets.
    dp.flow_table().clear();
    let mut bench = Bench::new(dp)?.on_ingress(ingress);
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
        packets: 0,
        untracked: 0,
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
            let untracked = after.untracked - before.untracked;
            ensure!(
                packets == u64::from(args.repeat),
                "{}: VIP counted {packets} packets for {} iterations",
                case.name,
                args.repeat
            );
            if every_new {
                // A new flow may match a live flow's fingerprint (one in 2 M new flows into a
                // full table, lb-common's `ct`) and share its real: not new.
                let want = u64::from(args.repeat);
                ensure!(
                    new <= want && new + want / 100_000 >= want,
                    "{}: {new} new flows for {want} iterations",
                    case.name
                );
            } else {
                // Established flows are new again only when their bucket had no room for
                // them (each such packet is counted untracked), and those stay below 0.1 %.
                ensure!(
                    new == untracked && untracked * 1000 <= u64::from(args.repeat),
                    "{}: {new} new flows ({untracked} untracked) for {} iterations: the table \
                     did not hold the working set",
                    case.name,
                    args.repeat
                );
            }
            m.untracked += untracked;
            m.packets += packets;
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
            max_vips: 9,
            max_reals: 64,
            ring_size: lb_common::DEFAULT_RING_SIZE,
        },
        conntrack_size: args.conntrack_size,
        ..LoadOptions::default()
    };
    // Off the measured CPU: the dataplane's drainer thread must not run there.
    let mut dp = off_cpu(args.cpu, || EbpfDataplane::load(&opts))?
        .context("loading the XDP programs (root needed)")?;

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
    // NAT (id 8): port 82 to reals 10.9.1.1-4 on port 8080.
    add_nat_vip(&mut dp, 8, vip4, 82, Ipv4Addr::new(10, 9, 1, 0))?;

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
        Case {
            name: "tcp4_established",
            mode: "nat",
            frame: Frame::tcp4(client4, 40000, vip4, 82)
                .with_payload(&payload)
                .build(),
            vary: Vary::None,
            vip: Some((8, false)),
            action: XDP_TX,
        },
        Case {
            name: "tcp4_new_flow",
            mode: "nat",
            frame: Frame::tcp4(client4, 40001, vip4, 82)
                .with_payload(&payload)
                .build(),
            vary: Vary::NewFlows { off: V4_SRC_OFF },
            vip: Some((8, true)),
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
    let mut live = if args.only.is_empty() || args.only.iter().any(|o| "live".contains(o.as_str()))
    {
        live_rows(&mut dp, &cases, &args)?
    } else {
        Vec::new()
    };
    // NAT replies: from real 10.9.1.1:8080 back to the client, routed by a FIB lookup.
    let reply = Case {
        name: "tcp4_reply",
        mode: "nat",
        frame: Frame::tcp4(Ipv4Addr::new(10, 9, 1, 1), 8080, client4, 40000)
            .with_payload(&payload)
            .build(),
        vary: Vary::None,
        vip: None,
        action: XDP_TX,
    };
    if args.only.is_empty() || args.only.iter().any(|o| reply.name.contains(o.as_str())) {
        let (row, live_row) = reply_rows(&mut dp, &reply, &args)?;
        results.push(row);
        live.push((reply.name, reply.mode, live_row));
    }

    // Established flows over working sets up to the table's nominal capacity (1 M flows by
    // default): one table for all CPUs, sized for the set.
    let scale: [(&'static str, u32); 3] = [
        ("tcp4_established_1k_flows", 1_000),
        ("tcp4_established_64k_flows", 65_536),
        ("tcp4_established_1m_flows", 1_000_000),
    ];
    let mut flooded: Option<Flood> = None;
    // New flows' tuples the log lost, in every dataplane the cases ran on.
    let mut tuples_lost = 0;
    for (name, flows) in scale {
        if !args.only.is_empty() && !args.only.iter().any(|o| name.contains(o.as_str())) {
            continue;
        }
        let big = LoadOptions {
            limits: opts.limits,
            conntrack_size: flows.max(4096),
            ..LoadOptions::default()
        };
        let mut dp = off_cpu(args.cpu, || EbpfDataplane::load(&big))?
            .context("loading for the working-set cases")?;
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
            let new_frame = Frame::tcp4(client4, 40001, vip4, 80)
                .with_payload(&payload)
                .build();
            flooded = Some(flood(&mut dp, &case, &new_frame, args.flood)?);
        }
        dp.drain_ct_log();
        tuples_lost += dp.ct_log_lost();
    }
    ensure!(
        dp.failed_calls() == 0,
        "{} map calls failed",
        dp.failed_calls()
    );
    dp.drain_ct_log();
    tuples_lost += dp.ct_log_lost();

    let control =
        if args.only.is_empty() || args.only.iter().any(|o| "control".contains(o.as_str())) {
            Some(control_rows()?)
        } else {
            None
        };

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
        for m in results.iter().filter(|m| m.untracked != 0) {
            println!(
                "{}: {:.4} % of packets were of untracked flows (their bucket was full)",
                m.name,
                m.untracked as f64 * 100.0 / m.packets.max(1) as f64
            );
        }
        if tuples_lost > 0 {
            println!(
                "new-flow and flood cases: {tuples_lost} tuples overwritten in the kernel's log before \
                 its drain filed them (those flows were tracked and forwarded alike; walks \
                 miss them)"
            );
        }
        if let Some(f) = &flooded {
            println!(
                "flood: {} new flows into the 1 M established ones, the ring changed half-way: \
                 {:.1} ns/pkt median, {} untracked; established flows moved: {} (of {} tracked)",
                f.flows, f.ns_per_pkt, f.untracked, f.moved, f.tracked
            );
        }
        if let Some(w) = &walk {
            println!(
                "conntrack walk (xlb real flows) over {} ways: {:.0} ms median, {:.0} ms \
                 min of {} walks ({} flows of the real counted)",
                w.entries, w.median_ms, w.min_ms, w.walks, w.flows
            );
        }
        for (name, mode, l) in &live {
            println!(
                "live frames {name:<20} {mode:>6}: {:.2} Mpps forwarded on one CPU \
                 ({} of {} frames received)",
                l.mpps(),
                l.received,
                l.sent
            );
        }
        if let Some(c) = &control {
            c.print();
        }
        println!("reproduce: {cmd}   (JSON: {cmd} --json)");
    }
    if let (true, Some(f)) = (args.json, &flooded) {
        println!(
            "{{\"case\":\"tcp4_flood_into_1m_flows\",\"flows\":{},\"ns_per_pkt_median\":{:.1},\
             \"untracked\":{},\"moved\":{},\"tracked\":{}}}",
            f.flows, f.ns_per_pkt, f.untracked, f.moved, f.tracked
        );
    }
    if let (true, Some(w)) = (args.json, &walk) {
        println!(
            "{{\"case\":\"conntrack_walk_1m_flows\",\"entries\":{},\"ms_median\":{:.1},\
             \"ms_min\":{:.1},\"walks\":{}}}",
            w.entries, w.median_ms, w.min_ms, w.walks
        );
    }
    if args.json {
        for (name, mode, l) in &live {
            println!(
                "{{\"case\":\"live_{name}\",\"mode\":\"{mode}\",\"mpps\":{:.3},\"sent\":{},\"received\":{}}}",
                l.mpps(),
                l.sent,
                l.received
            );
        }
    }
    if let (true, Some(c)) = (args.json, &control) {
        c.print_json();
    }
    if args.check {
        let mut medians: Vec<(&str, &str, f64)> = results
            .iter()
            .map(|m| (m.name, m.mode, median(&m.net)))
            .collect();
        if let Some(f) = &flooded {
            medians.push(("tcp4_flood_into_1m_flows", "dr", f.ns_per_pkt));
        }
        let verdicts = lb_lab::budget::check(&medians);
        let wrapper: Vec<f64> = results.iter().flat_map(|m| m.baseline.clone()).collect();
        if !wrapper.is_empty() {
            eprintln!(
                "this run's wrapper alone: {:.0} ns/iteration (a quiet machine of the budgets' \
                 kind: {:.0} ns; a busier host slows every figure alike)",
                median(&wrapper),
                lb_lab::budget::QUIET_WRAPPER_NS
            );
        }
        let missed = verdicts.iter().filter(|v| !v.held()).count();
        for v in &verdicts {
            let mark = if v.held() { "holds" } else { "MISSED" };
            eprintln!(
                "budget {:<44} {:>8.1} ns, budget {:>6.1}: {mark}",
                v.what, v.got, v.budget
            );
        }
        ensure!(
            missed == 0,
            "{missed} of {} budgets missed (README, Performance)",
            verdicts.len()
        );
    }
    Ok(())
}

/// Live frames through a veth pair (`lb_lab::live`): the established and new-flow cases of
/// both modes, median of `args.runs` runs of 2 M frames each.
fn live_rows(
    dp: &mut EbpfDataplane,
    cases: &[Case],
    args: &Args,
) -> Result<Vec<(&'static str, &'static str, lb_lab::live::Live)>> {
    const FRAMES: u32 = 2_000_000;
    let link = lb_lab::live::LiveLink::new()?;
    let mut bench = Bench::new(dp)?;
    bench.attach_sink()?;
    let mut out = Vec::new();
    for case in cases {
        if !matches!(case.name, "tcp4_established" | "tcp4_new_flow") {
            continue;
        }
        let mut runs = Vec::new();
        for _ in 0..args.runs {
            dp.flow_table().clear();
            runs.push(bench.run_live(&case.frame, case.vary, FRAMES, link.inject_ifindex)?);
        }
        runs.sort_by(|a, b| a.mpps().total_cmp(&b.mpps()));
        out.push((case.name, case.mode, runs[runs.len() / 2]));
    }
    drop(bench);
    drop(link);
    Ok(out)
}

/// NAT mode's reply path, which looks up the client's route: measured in the live-frames
/// namespace, whose `inject` interface has the clients' subnet and forwards. Every iteration
/// must be rewritten and routed by XDP (`nat_reply`), none left to the host. Also as live
/// frames, forwarded and counted at the sink.
fn reply_rows(
    dp: &mut EbpfDataplane,
    case: &Case,
    args: &Args,
) -> Result<(Measured, lb_lab::live::Live)> {
    let link = lb_lab::live::LiveLink::new()?;
    let routed = |dp: &EbpfDataplane| -> Result<u64> {
        Ok(dp.global_stats()?.get(lb_common::counter::NAT_REPLY))
    };
    let before = routed(dp)?;
    let m = measure_on(dp, case, args, Some(link.inject_ifindex))?;
    let got = routed(dp)? - before;
    // The warm-up's iterations and every run's.
    let want = 1000 + args.runs as u64 * u64::from(args.repeat);
    ensure!(
        got == want,
        "{}: {got} replies routed by XDP for {want} iterations",
        case.name
    );
    let mut bench = Bench::new(dp)?;
    bench.attach_sink()?;
    let mut runs = Vec::new();
    for _ in 0..args.runs {
        runs.push(bench.run_live(&case.frame, case.vary, 2_000_000, link.inject_ifindex)?);
    }
    runs.sort_by(|a, b| a.mpps().total_cmp(&b.mpps()));
    let live = runs[runs.len() / 2];
    drop(bench);
    drop(link);
    Ok((m, live))
}

/// The control path and the maps' memory (`lb_lab::control`).
struct Control {
    maglev: Vec<(u32, Duration)>,
    real_del: Duration,
    quiesce: Duration,
    apply: Duration,
    memory: std::collections::BTreeMap<String, u64>,
    /// Bytes per flow of `--conntrack-size`, per VIP of `--max-vips`, per real of
    /// `--max-reals`.
    per_flow: f64,
    per_vip: f64,
    per_real: f64,
}

const APPLY_VIPS: u32 = 512;
const APPLY_REALS: u32 = 8;

fn control_rows() -> Result<Control> {
    use lb_lab::control;
    let m = lb_common::DEFAULT_RING_SIZE;
    let mut maglev = Vec::new();
    for reals in [8, 100, 4096] {
        maglev.push((reals, control::maglev_build(reals, m, 5)?));
    }
    let base = LoadOptions::default();
    let memory = control::memory(&base)?;
    let total = |m: &std::collections::BTreeMap<String, u64>| m.values().sum::<u64>() as f64;
    let t0 = total(&memory);
    let grown = |o: LoadOptions, by: u32| -> Result<f64> {
        Ok((total(&control::memory(&o)?) - t0) / f64::from(by))
    };
    let l = base.limits;
    let per_flow = grown(
        LoadOptions {
            conntrack_size: base.conntrack_size * 2,
            ..base
        },
        base.conntrack_size,
    )?;
    // One limit doubled, the others at their defaults.
    let doubled = |limits: Limits, by: u32| grown(LoadOptions { limits, ..base }, by);
    let per_vip = doubled(
        Limits {
            max_vips: l.max_vips * 2,
            ..l
        },
        l.max_vips,
    )?;
    let per_real = doubled(
        Limits {
            max_reals: l.max_reals * 2,
            ..l
        },
        l.max_reals,
    )?;
    Ok(Control {
        maglev,
        real_del: control::real_del(9)?,
        quiesce: control::quiesce(9)?,
        apply: control::apply(APPLY_VIPS, APPLY_REALS)?,
        memory,
        per_flow,
        per_vip,
        per_real,
    })
}

impl Control {
    fn print(&self) {
        let builds: Vec<String> = self
            .maglev
            .iter()
            .map(|(n, t)| format!("{n} reals {:.2} ms", t.as_secs_f64() * 1e3))
            .collect();
        println!("control: Maglev build, M = 65537: {}", builds.join(", "));
        println!(
            "control: a real's removal returns, its VIP's new ring live, in {:.1} ms (median \
             of 9; of it, the kernel's RCU grace period before the real's entry is cleared: \
             {:.1} ms; `xlb real del` adds its socket round trip)",
            self.real_del.as_secs_f64() * 1e3,
            self.quiesce.as_secs_f64() * 1e3
        );
        println!(
            "control: apply of {APPLY_VIPS} VIPs x {APPLY_REALS} reals: {:.0} ms",
            self.apply.as_secs_f64() * 1e3
        );
        let total: u64 = self.memory.values().sum();
        let maps: Vec<String> = self
            .memory
            .iter()
            .filter(|(_, b)| **b >= 1 << 20)
            .map(|(n, b)| format!("{n} {:.1}", *b as f64 / f64::from(1 << 20)))
            .collect();
        println!(
            "memory at the default limits: {:.1} MiB in all maps ({} MiB; the rest under 1 MiB \
             each); per flow of --conntrack-size {:.0} B, per VIP of --max-vips {:.0} B, per \
             real of --max-reals {:.0} B",
            total as f64 / f64::from(1 << 20),
            maps.join(", "),
            self.per_flow,
            self.per_vip,
            self.per_real
        );
    }

    fn print_json(&self) {
        for (n, t) in &self.maglev {
            println!(
                "{{\"case\":\"maglev_build\",\"reals\":{n},\"ring_size\":65537,\"ms\":{:.3}}}",
                t.as_secs_f64() * 1e3
            );
        }
        println!(
            "{{\"case\":\"real_del_ring_live\",\"ms_median\":{:.2},\"rcu_grace_ms_median\":{:.2}}}",
            self.real_del.as_secs_f64() * 1e3,
            self.quiesce.as_secs_f64() * 1e3
        );
        println!(
            "{{\"case\":\"apply\",\"vips\":{APPLY_VIPS},\"reals_per_vip\":{APPLY_REALS},\"ms\":{:.1}}}",
            self.apply.as_secs_f64() * 1e3
        );
        let maps: Vec<String> = self
            .memory
            .iter()
            .map(|(n, b)| format!("\"{n}\":{b}"))
            .collect();
        println!(
            "{{\"case\":\"memory\",\"total_bytes\":{},\"maps\":{{{}}},\"bytes_per_flow\":{:.1},\
             \"bytes_per_vip\":{:.1},\"bytes_per_real\":{:.1}}}",
            self.memory.values().sum::<u64>(),
            maps.join(","),
            self.per_flow,
            self.per_vip,
            self.per_real
        );
    }
}

struct Flood {
    flows: u64,
    ns_per_pkt: f64,
    untracked: u64,
    /// Established flows that were tracked before the flood and not after it.
    moved: u64,
    tracked: u64,
}

/// `flows` new flows (`new_frame`, its source varied) into the table `established` filled,
/// the VIP's ring replaced by another half-way: every established flow tracked before must
/// still be (a flow that lost its way would be new again and, in a table the flood filled,
/// untracked).
fn flood(
    dp: &mut EbpfDataplane,
    established: &Case,
    new_frame: &[u8],
    flows: u32,
) -> Result<Flood> {
    let Vary::Cycle { flows: set, .. } = established.vary else {
        anyhow::bail!("the flood needs the established case's working set");
    };
    let mut bench = Bench::new(dp)?;
    let pass = |dp: &mut EbpfDataplane, bench: &mut Bench| -> Result<u64> {
        let before = dp.vip_stats(0)?;
        bench.run(&established.frame, established.vary, set, false)?;
        let after = dp.vip_stats(0)?;
        ensure!(
            after.new_flows - before.new_flows == after.untracked - before.untracked,
            "established flows were new without being untracked"
        );
        Ok(after.untracked - before.untracked)
    };
    let untracked_before = pass(dp, &mut bench)?;
    let before = dp.vip_stats(0)?;
    let (_, wrapper) = bench.run(new_frame, Vary::NewFlows { off: V4_SRC_OFF }, 100_000, true)?;
    let chunk = 1_000_000u32;
    let (mut sent, mut ns) = (0u32, Vec::new());
    while sent < flows {
        if sent >= flows / 2 && sent < flows / 2 + chunk {
            // Another ring: every slot to the next real.
            let m = dp.limits().ring_size;
            let ring: Vec<u32> = (0..m).map(|s| 1 + (s + 1) % 4).collect();
            dp.write_ring(0, 1, &ring)?;
            dp.set_vip_meta(
                0,
                &VipMeta {
                    flags: 0,
                    generation: 1,
                    in_use: 1,
                    _reserved: 0,
                },
            )?;
        }
        let n = chunk.min(flows - sent);
        let (_, raw) = bench.run(new_frame, Vary::NewFlows { off: V4_SRC_OFF }, n, false)?;
        ns.push(raw - wrapper);
        sent += n;
    }
    let after = dp.vip_stats(0)?;
    let untracked_after = pass(dp, &mut bench)?;
    ensure!(
        untracked_after <= untracked_before,
        "the flood moved {} established flows",
        untracked_after - untracked_before
    );
    Ok(Flood {
        flows: u64::from(flows),
        ns_per_pkt: median(&ns),
        untracked: after.untracked - before.untracked,
        moved: untracked_after.saturating_sub(untracked_before),
        tracked: u64::from(set) - untracked_before,
    })
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
