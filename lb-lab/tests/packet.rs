//! Packet tests of the XDP balancer through BPF_PROG_TEST_RUN: exact input bytes → exact
//! action and output bytes, with the userspace Maglev predicting the real for every forwarded
//! flow and the counters checked after each case. Needs root (see common::bpf_available).

mod common;

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use lb_common::{counter, flow_hash, ring_slot, FlowKey, GlobalStats};
use lb_lab::{
    bench::pin_to_cpu,
    packet::{self, Ext, Frame},
};
use lb_userspace::{
    core::{
        balancer::{Balancer, Change},
        maglev::{build_ring, MaglevReal},
    },
    dataplane::{
        ebpf::{EbpfDataplane, LoadOptions},
        CounterSource, Dataplane, Limits,
    },
    model::{map_addr, CheckFields, VipFlags, VipOptions, VipSpec},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const M: u32 = 65537;

macro_rules! require_bpf {
    () => {
        if !common::bpf_available(module_path!()) {
            return;
        }
    };
}

/// Each real's MAC is derived from its address, so an output frame names its real.
fn mac_of(ip: IpAddr) -> [u8; 6] {
    let o = map_addr(ip);
    [0x02, 0xaa, o[12], o[13], o[14], o[15]]
}

fn ip(s: &str) -> IpAddr {
    s.parse()
        .unwrap_or_else(|e| panic!("bad test address {s}: {e}"))
}

fn c4(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0xC000_0200u32.wrapping_add(i)) // 192.0.2.x and up
}

struct Lab {
    bal: Balancer<EbpfDataplane>,
}

/// The id quarantine of the packet tests: short, so the reuse of an id can be seen.
const QUARANTINE: Duration = Duration::from_millis(300);

impl Lab {
    fn options() -> LoadOptions {
        LoadOptions {
            limits: Limits {
                max_vips: 8,
                max_reals: 64,
                ring_size: M,
            },
            conntrack_size: 1 << 16,
            ..LoadOptions::default()
        }
    }

    fn new() -> Lab {
        Lab::with(Lab::options())
    }

    fn with(opts: LoadOptions) -> Lab {
        let dp = EbpfDataplane::load(&opts).unwrap_or_else(|e| panic!("loading: {e:#?}"));
        Lab {
            bal: Balancer::new(dp, QUARANTINE),
        }
    }

    fn vip(&mut self, spec: &str, flags: VipFlags) -> VipSpec {
        let spec: VipSpec = spec.parse().unwrap_or_else(|e| panic!("{spec}: {e}"));
        self.bal
            .add_vip(spec, flags)
            .unwrap_or_else(|e| panic!("add_vip {spec}: {e}"));
        spec
    }

    fn real(&mut self, vip: VipSpec, addr: &str, weight: u32) {
        let a = ip(addr);
        self.bal
            .add_real(vip, a, weight, Some(mac_of(a)))
            .unwrap_or_else(|e| panic!("add_real {vip} {addr}: {e}"));
    }

    fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.bal
            .dataplane_mut()
            .test_run(frame)
            .unwrap_or_else(|e| panic!("test_run of {} bytes: {e:#?}", frame.len()))
    }

    fn global(&self) -> GlobalStats {
        self.bal.dataplane().global_stats().expect("global stats")
    }

    fn vip_stats(&self, vip: &VipSpec) -> lb_common::VipStats {
        let id = self.bal.vip_id(vip).expect("vip id");
        self.bal.dataplane().vip_stats(id).expect("vip stats")
    }

    /// The ring the userspace Maglev builds for the VIP's current reals, checked against the
    /// live one in the kernel's map.
    fn predicted_ring(&self, vip: &VipSpec) -> (Vec<u32>, HashMap<u32, IpAddr>) {
        let snap = self.bal.snapshot();
        let v = snap
            .vips
            .iter()
            .find(|v| v.spec == *vip)
            .unwrap_or_else(|| panic!("VIP {vip} not in the snapshot"));
        let members: Vec<MaglevReal> = v
            .reals
            .iter()
            .filter(|r| r.in_ring)
            .map(|r| MaglevReal {
                addr: map_addr(r.addr.ip),
                port: 0,
                weight: r.weight,
                id: r.id,
            })
            .collect();
        let ring = build_ring(&members, M).expect("maglev");
        let live = self.bal.live_ring(vip).expect("read ring").expect("vip");
        assert!(live == ring, "the live ring of {vip} differs from Maglev's");
        let ids = v.reals.iter().map(|r| (r.id, r.addr.ip)).collect();
        (ring, ids)
    }

    /// The real userspace predicts for `frame` sent to `vip`.
    fn predict(&self, vip: &VipSpec, frame: &[u8]) -> IpAddr {
        let (ring, ids) = self.predicted_ring(vip);
        let flags = self
            .bal
            .snapshot()
            .vips
            .iter()
            .find(|v| v.spec == *vip)
            .map(|v| v.flags)
            .unwrap_or_default();
        let mut key = flow_key(frame);
        if flags.no_src_port {
            key.src_port_be = 0;
        }
        let id = ring[ring_slot(flow_hash(&key, 0), M) as usize];
        *ids.get(&id)
            .unwrap_or_else(|| panic!("ring slot names id {id}, which is no real"))
    }

    /// Send `frame`; it must leave with XDP_TX towards the predicted real, every byte but the
    /// MACs unchanged, and the VIP's and the real's counters up by one packet.
    fn expect_forward(&mut self, name: &str, vip: &VipSpec, frame: &[u8]) -> IpAddr {
        let real = self.predict(vip, frame);
        let vip_id = self.bal.vip_id(vip).expect("vip id");
        let real_id = self.bal.real_id(vip, real).expect("real id");
        let dp = self.bal.dataplane();
        let (v0, r0) = (
            dp.vip_stats(vip_id).expect("stats"),
            dp.real_stats(real_id).expect("stats"),
        );
        let (action, out) = self.run(frame);
        let mut want = frame.to_vec();
        packet::set_src_mac(&mut want, packet::dst_mac(frame));
        packet::set_dst_mac(&mut want, mac_of(real));
        assert_eq!(action, XDP_TX, "{name}: action {action}, expected XDP_TX");
        assert!(
            out == want,
            "{name}: output differs from the input with MACs rewritten for {real}:\n{}",
            packet::hex_diff(&want, &out)
        );
        let dp = self.bal.dataplane();
        let (v1, r1) = (
            dp.vip_stats(vip_id).expect("stats"),
            dp.real_stats(real_id).expect("stats"),
        );
        assert_eq!(v1.packets, v0.packets + 1, "{name}: VIP packet counter");
        assert_eq!(
            v1.bytes,
            v0.bytes + frame.len() as u64,
            "{name}: VIP byte counter"
        );
        assert_eq!(r1.packets, r0.packets + 1, "{name}: real packet counter");
        real
    }

    /// Send `frame`; it must come back with `action` and unchanged.
    fn expect_untouched(&mut self, name: &str, frame: &[u8], action: u32) {
        let (got, out) = self.run(frame);
        assert_eq!(got, action, "{name}: action {got}, expected {action}");
        assert!(
            out == frame,
            "{name}: frame changed:\n{}",
            packet::hex_diff(frame, &out)
        );
    }

    /// Which real the kernel sent `frame` to (by the MAC it wrote), or None if not forwarded.
    fn send(&mut self, frame: &[u8]) -> Option<[u8; 6]> {
        let (action, out) = self.run(frame);
        (action == XDP_TX).then(|| packet::dst_mac(&out))
    }
}

/// The flow key the kernel builds for a frame (addresses as in the packet, v4-mapped).
fn flow_key(frame: &[u8]) -> FlowKey {
    let l = packet::parse(frame).expect("test frame parses");
    let (sport, dport) = l.ports(frame).expect("test frame has ports");
    let o = l.l3_offset;
    let (src, dst) = if l.ethertype == packet::ETH_P_IPV6 {
        let mut s = [0u8; 16];
        let mut d = [0u8; 16];
        s.copy_from_slice(&frame[o + 8..o + 24]);
        d.copy_from_slice(&frame[o + 24..o + 40]);
        (s, d)
    } else {
        let mut s = [0u8; 4];
        let mut d = [0u8; 4];
        s.copy_from_slice(&frame[o + 12..o + 16]);
        d.copy_from_slice(&frame[o + 16..o + 20]);
        (lb_common::v4_mapped(s), lb_common::v4_mapped(d))
    };
    FlowKey {
        src,
        dst,
        src_port_be: sport.to_be(),
        dst_port_be: dport.to_be(),
        proto: l.proto,
        _pad: [0; 3],
    }
}

/// A lab with the VIPs most cases use: TCP and UDP on an IPv4 and an IPv6 address, and a
/// port-0 VIP, each with three reals.
fn standard_lab() -> (Lab, Vec<VipSpec>) {
    let mut lab = Lab::new();
    let specs = [
        "tcp/10.0.0.100:80",
        "udp/10.0.0.100:53",
        "tcp/[2001:db8::100]:443",
        "udp/[2001:db8::100]:53",
        "tcp/10.0.0.102:0",
    ];
    let mut vips = vec![];
    for s in specs {
        let v = lab.vip(s, VipFlags::default());
        let six = s.contains('[');
        for i in 11..14 {
            let a = if six {
                format!("2001:db8::{i}")
            } else {
                format!("10.0.0.{i}")
            };
            lab.real(v, &a, 1);
        }
        vips.push(v);
    }
    (lab, vips)
}

fn v6(s: &str) -> Ipv6Addr {
    s.parse().expect("test IPv6 address")
}

/// Frames that must be forwarded, with the VIP they belong to.
fn forward_cases(vips: &[VipSpec]) -> Vec<(&'static str, VipSpec, Vec<u8>)> {
    let vip4 = Ipv4Addr::new(10, 0, 0, 100);
    let vip6 = v6("2001:db8::100");
    let cl6 = v6("2001:db8:1::10");
    vec![
        (
            "tcp4",
            vips[0],
            Frame::tcp4(c4(10), 40000, vip4, 80)
                .with_payload(b"GET / HTTP/1.1\r\n\r\n")
                .build(),
        ),
        (
            "tcp4 syn",
            vips[0],
            Frame::tcp4(c4(11), 40001, vip4, 80)
                .with_tcp_flags(packet::TCP_SYN)
                .build(),
        ),
        (
            "udp4",
            vips[1],
            Frame::udp4(c4(10), 5353, vip4, 53)
                .with_payload(&[1, 2, 3, 4])
                .build(),
        ),
        (
            "tcp6",
            vips[2],
            Frame::tcp6(cl6, 40000, vip6, 443)
                .with_payload(b"hello")
                .build(),
        ),
        (
            "udp6",
            vips[3],
            Frame::udp6(cl6, 5353, vip6, 53)
                .with_payload(&[9; 30])
                .build(),
        ),
        (
            "tcp4 to a port-0 VIP",
            vips[4],
            Frame::tcp4(c4(12), 40000, Ipv4Addr::new(10, 0, 0, 102), 8443).build(),
        ),
        (
            "udp4 is not caught by a tcp port-0 VIP but tcp4 port 1 is",
            vips[4],
            Frame::tcp4(c4(13), 1, Ipv4Addr::new(10, 0, 0, 102), 1).build(),
        ),
        (
            "tcp4 with a VLAN tag",
            vips[0],
            Frame::tcp4(c4(14), 40000, vip4, 80).with_vlan(42).build(),
        ),
        (
            "tcp4 with IPv4 options (IHL 8)",
            vips[0],
            Frame::tcp4(c4(15), 40000, vip4, 80)
                .with_ipv4_options(&[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0])
                .build(),
        ),
        (
            "tcp6 with 4 extension headers (the limit)",
            vips[2],
            Frame::tcp6(cl6, 40001, vip6, 443)
                .with_ext(Ext::HopByHop(8))
                .with_ext(Ext::DestOpts(16))
                .with_ext(Ext::Routing(8))
                .with_ext(Ext::DestOpts(8))
                .build(),
        ),
        (
            "udp6 behind an authentication header",
            vips[3],
            Frame::udp6(cl6, 5354, vip6, 53)
                .with_ext(Ext::Auth(24))
                .with_payload(&[7; 12])
                .build(),
        ),
        ("tcp4 with an 802.1ad service tag", vips[0], {
            let mut f = Frame::tcp4(c4(17), 40000, vip4, 80).with_vlan(300).build();
            f[12..14].copy_from_slice(&packet::ETH_P_8021AD.to_be_bytes());
            f
        }),
        ("tcp4 with Ethernet padding after the IP packet", vips[0], {
            let mut f = Frame::tcp4(c4(16), 40000, vip4, 80).build();
            f.extend_from_slice(&[0; 6]);
            f
        }),
    ]
}

#[test]
fn forwards_each_vip_kind_to_the_predicted_real() {
    require_bpf!();
    let (mut lab, vips) = standard_lab();
    for (name, vip, frame) in forward_cases(&vips) {
        lab.expect_forward(name, &vip, &frame);
        // The same packet again takes the tracked flow: same real, same bytes.
        lab.expect_forward(name, &vip, &frame);
    }
    let g = lab.global();
    assert_eq!(g, GlobalStats::default(), "no packet was refused: {g:?}");
    assert_eq!(lab.bal.dataplane().failed_calls(), 0);
}

#[test]
fn not_for_a_vip_passes_unchanged() {
    require_bpf!();
    let (mut lab, _) = standard_lab();
    let vip4 = Ipv4Addr::new(10, 0, 0, 100);
    let vip6 = v6("2001:db8::100");
    let cl6 = v6("2001:db8:1::10");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "other address",
            Frame::tcp4(c4(1), 40000, Ipv4Addr::new(10, 0, 0, 200), 80).build(),
        ),
        ("other port", Frame::tcp4(c4(1), 40000, vip4, 81).build()),
        (
            "other protocol (UDP to a TCP-only port)",
            Frame::udp4(c4(1), 40000, vip4, 80).build(),
        ),
        (
            "TCP to a UDP-only port",
            Frame::tcp4(c4(1), 40000, vip4, 53).build(),
        ),
        (
            "IPv6 other address",
            Frame::tcp6(cl6, 40000, v6("2001:db8::200"), 443).build(),
        ),
        (
            "IPv6 other port",
            Frame::tcp6(cl6, 40000, vip6, 444).build(),
        ),
        (
            "port-0 VIP is TCP only",
            Frame::udp4(c4(1), 40000, Ipv4Addr::new(10, 0, 0, 102), 8443).build(),
        ),
        (
            "VIP address inside a VLAN frame, other port",
            Frame::tcp4(c4(1), 40000, vip4, 8080).with_vlan(7).build(),
        ),
    ];
    for (name, frame) in &cases {
        lab.expect_untouched(name, frame, XDP_PASS);
    }
    assert_eq!(
        lab.global(),
        GlobalStats::default(),
        "plain passes are not counted"
    );

    let g0 = lab.global();
    let arp = packet::arp_request([2, 0, 0, 0, 0, 1], c4(1), vip4);
    lab.expect_untouched("ARP", &arp, XDP_PASS);
    let mut other = Frame::tcp4(c4(1), 1, vip4, 80).build();
    other[12..14].copy_from_slice(&0x88CCu16.to_be_bytes()); // LLDP
    lab.expect_untouched("non-IP ethertype", &other, XDP_PASS);
    // Two tags (QinQ): one is parsed, so the inner tag reads as the ethertype.
    let mut qinq = Frame::tcp4(c4(1), 1, vip4, 80).with_vlan(5).build();
    qinq.splice(12..12, [0x88, 0xA8, 0x00, 0x64]);
    lab.expect_untouched("QinQ (802.1ad + 802.1Q) to a VIP", &qinq, XDP_PASS);
    assert_eq!(
        lab.global().get(counter::PASS_NOT_IP),
        g0.get(counter::PASS_NOT_IP) + 3
    );

    // (ICMP to a VIP is the balancer's: tests/icmp.rs.)
    let sctp = |l3| {
        Frame::new(
            l3,
            packet::L4::Raw {
                proto: 132,
                bytes: vec![0; 12],
            },
        )
        .build()
    };
    lab.expect_untouched(
        "SCTP to a VIP",
        &sctp(packet::L3::v4(c4(1), vip4)),
        XDP_PASS,
    );
    lab.expect_untouched(
        "SCTP over IPv6 to a VIP",
        &sctp(packet::L3::v6(cl6, vip6)),
        XDP_PASS,
    );
    assert_eq!(
        lab.global().get(counter::PASS_UNKNOWN_L4),
        g0.get(counter::PASS_UNKNOWN_L4) + 2
    );
}

/// The bits set in the kernel's `VIP_FILTER`.
fn filter_bits(lab: &Lab) -> std::collections::BTreeSet<u32> {
    common::filter_bits(&lab.bal.dataplane().vip_filter().expect("read VIP_FILTER"))
}

#[test]
fn the_vip_filter_holds_every_vip_address_through_adds_and_deletes() {
    require_bpf!();
    let mut lab = Lab::new();
    assert!(
        filter_bits(&lab).is_empty(),
        "a new balancer filters everything"
    );
    let a = Ipv4Addr::new(10, 0, 0, 100);
    let bit = |ip: Ipv4Addr| lb_common::vip_filter_bit_of(&map_addr(IpAddr::V4(ip)));
    // An address sharing A's bit: deleting its VIP must not hide A's.
    let b = (1..=u32::MAX)
        .map(|i| Ipv4Addr::from(0x0A01_0000u32 + i))
        .find(|x| bit(*x) == bit(a))
        .expect("a colliding address");
    let vip_a = lab.vip(&format!("tcp/{a}:80"), VipFlags::default());
    lab.real(vip_a, "10.0.0.11", 1);
    let vip_a6 = lab.vip("tcp/[2001:db8::100]:443", VipFlags::default());
    lab.real(vip_a6, "2001:db8::11", 1);
    let vip_b = lab.vip(&format!("tcp/{b}:80"), VipFlags::default());
    lab.real(vip_b, "10.0.0.12", 1);
    let six = lb_common::vip_filter_bit_of(&map_addr(ip("2001:db8::100")));
    let want = [bit(a), six].into();
    assert_eq!(filter_bits(&lab), want, "{a} and {b} share one bit");
    let to_a = Frame::tcp4(c4(1), 40000, a, 80).build();
    let to_b = Frame::tcp4(c4(1), 40000, b, 80).build();
    let to_a6 = Frame::tcp6(v6("2001:db8:1::10"), 40000, v6("2001:db8::100"), 443).build();
    lab.expect_forward("to A", &vip_a, &to_a);
    lab.expect_forward("to B", &vip_b, &to_b);
    lab.expect_forward("to A over IPv6", &vip_a6, &to_a6);

    lab.bal.del_vip(vip_b).expect("del B");
    assert_eq!(filter_bits(&lab), want, "A still needs the bit B had");
    lab.expect_forward("to A after B went", &vip_a, &to_a);
    lab.expect_untouched("to B after it went", &to_b, XDP_PASS);

    // A second VIP on A's address, then the first one gone: the address stays.
    let vip_a2 = lab.vip(&format!("udp/{a}:53"), VipFlags::default());
    lab.real(vip_a2, "10.0.0.13", 1);
    lab.bal.del_vip(vip_a).expect("del A:80");
    assert_eq!(filter_bits(&lab), want, "udp/{a}:53 still uses the address");
    lab.expect_forward(
        "UDP to A",
        &vip_a2,
        &Frame::udp4(c4(1), 40000, a, 53).build(),
    );
    lab.bal.del_vip(vip_a2).expect("del A:53");
    assert_eq!(filter_bits(&lab), [six].into(), "only the IPv6 VIP is left");
    lab.expect_untouched("to A after it went", &to_a, XDP_PASS);
    lab.bal.del_vip(vip_a6).expect("del A6");
    assert!(filter_bits(&lab).is_empty(), "no VIP, no bit");
    assert_eq!(
        lab.global(),
        GlobalStats::default(),
        "plain passes are not counted"
    );
}

/// `frame` cut to `len` bytes with its IP length field saying the same (and the IPv4
/// checksum fixed): only the per-header bounds checks can then find the cut. `None` when the
/// cut falls before the length field's header is whole, or after the L4 header (a shorter
/// payload is a valid packet).
fn cut_consistently(frame: &[u8], len: usize) -> Option<Vec<u8>> {
    let lay = packet::parse(frame).expect("test frame parses");
    let l4_len = if lay.proto == packet::IPPROTO_TCP {
        20
    } else {
        8
    };
    if len >= lay.l4_offset + l4_len {
        return None;
    }
    let l3 = packet::l3_offset(frame);
    let mut f = frame[..len].to_vec();
    let v6 = u16::from_be_bytes([frame[l3 - 2], frame[l3 - 1]]) == packet::ETH_P_IPV6;
    if v6 {
        let payload = len.checked_sub(l3 + 40)?;
        f[l3 + 4..l3 + 6].copy_from_slice(&(payload as u16).to_be_bytes());
        Some(f)
    } else {
        let ihl = (frame[l3] & 0x0F) as usize * 4;
        if len < l3 + ihl {
            return None;
        }
        Some(patch_v4(&f, |ip| {
            ip[2..4].copy_from_slice(&((len - l3) as u16).to_be_bytes())
        }))
    }
}

#[test]
fn every_truncation_passes_and_is_counted() {
    require_bpf!();
    let (mut lab, vips) = standard_lab();
    for (name, _, frame) in forward_cases(&vips) {
        if name.contains("padding") {
            continue; // its last bytes are padding: cutting them changes nothing
        }
        for len in 0..frame.len() {
            let cut = &frame[..len];
            if len < 14 {
                let r = lab.bal.dataplane_mut().test_run(cut);
                assert!(
                    r.is_err(),
                    "{name} cut to {len}: the kernel accepted it: {r:?}"
                );
                continue;
            }
            // Cut as a lost tail would cut it (the IP length now says more than there is),
            // and cut with a consistent IP length (each header's own bounds check must see
            // it: inside the VLAN tag, the IP header and its options, each extension header,
            // the TCP or UDP header).
            let consistent = cut_consistently(&frame, len);
            for (how, f) in [
                ("cut", Some(cut.to_vec())),
                ("cut consistently", consistent),
            ] {
                let Some(f) = f else { continue };
                let before = lab.global().get(counter::PASS_TRUNCATED);
                lab.expect_untouched(&format!("{name} {how} to {len} bytes"), &f, XDP_PASS);
                assert_eq!(
                    lab.global().get(counter::PASS_TRUNCATED),
                    before + 1,
                    "{name} {how} to {len}: pass_truncated did not rise"
                );
            }
        }
    }
}

/// Rewrite the IPv4 header of a built frame and fix its checksum.
fn patch_v4(frame: &[u8], f: impl FnOnce(&mut [u8])) -> Vec<u8> {
    let mut out = frame.to_vec();
    let o = packet::l3_offset(&out);
    f(&mut out[o..]);
    let ihl = ((out[o] & 0x0F) as usize * 4).clamp(20, 60);
    out[o + 10..o + 12].copy_from_slice(&[0, 0]);
    if o + ihl <= out.len() {
        let c = packet::ipv4_checksum(&out[o..o + ihl]);
        out[o + 10..o + 12].copy_from_slice(&c.to_be_bytes());
    }
    out
}

#[test]
fn malformed_headers_are_dropped_or_passed_and_counted() {
    require_bpf!();
    let (mut lab, vips) = standard_lab();
    let vip4 = Ipv4Addr::new(10, 0, 0, 100);
    let vip6 = v6("2001:db8::100");
    let cl6 = v6("2001:db8:1::10");
    let tcp4 = Frame::tcp4(c4(20), 40000, vip4, 80)
        .with_payload(b"x")
        .build();
    let tcp6 = Frame::tcp6(cl6, 40000, vip6, 443).build();
    type Counter = fn(&GlobalStats) -> u64;
    let bad_header: Counter = |g| g.get(counter::DROP_BAD_HEADER);
    let truncated: Counter = |g| g.get(counter::PASS_TRUNCATED);
    let fragment: Counter = |g| g.get(counter::DROP_FRAGMENT);
    let ext: Counter = |g| g.get(counter::PASS_IPV6_EXT);
    let cases: Vec<(&str, Vec<u8>, u32, Counter)> = vec![
        (
            "IPv4 IHL 4",
            patch_v4(&tcp4, |ip| ip[0] = 0x44),
            XDP_DROP,
            bad_header,
        ),
        (
            "IPv4 IHL 0",
            patch_v4(&tcp4, |ip| ip[0] = 0x40),
            XDP_DROP,
            bad_header,
        ),
        (
            "version 6 in an IPv4 ethertype",
            patch_v4(&tcp4, |ip| ip[0] = 0x65),
            XDP_DROP,
            bad_header,
        ),
        (
            "IPv4 total length below its header",
            patch_v4(&tcp4, |ip| ip[2..4].copy_from_slice(&19u16.to_be_bytes())),
            XDP_DROP,
            bad_header,
        ),
        (
            "IPv4 total length beyond the frame",
            patch_v4(&tcp4, |ip| ip[2..4].copy_from_slice(&1500u16.to_be_bytes())),
            XDP_PASS,
            truncated,
        ),
        (
            "IPv4 IHL 15 beyond the total length",
            patch_v4(&tcp4, |ip| ip[0] = 0x4F),
            XDP_DROP,
            bad_header,
        ),
        (
            "IPv4 TCP header cut short inside a consistent IP length",
            {
                let f = patch_v4(&tcp4, |ip| ip[2..4].copy_from_slice(&30u16.to_be_bytes()));
                f[..14 + 30].to_vec()
            },
            XDP_PASS,
            truncated,
        ),
        (
            "IPv6 version 4 in an IPv6 ethertype",
            {
                let mut f = tcp6.clone();
                f[14] = 0x40;
                f
            },
            XDP_DROP,
            bad_header,
        ),
        (
            "IPv6 payload length beyond the frame",
            {
                let mut f = tcp6.clone();
                f[18..20].copy_from_slice(&1000u16.to_be_bytes());
                f
            },
            XDP_PASS,
            truncated,
        ),
        (
            "IPv4 total length ends before the TCP header, padding after it",
            {
                let mut f = patch_v4(&tcp4, |ip| ip[2..4].copy_from_slice(&20u16.to_be_bytes()));
                // The bytes after the IP packet are padding: no ports may be read there.
                f[14 + 20..].fill(0x55);
                f
            },
            XDP_PASS,
            truncated,
        ),
        (
            "IPv6 payload ends before the UDP header, padding after it",
            {
                let mut f = Frame::udp6(cl6, 40000, vip6, 53).build();
                f[18..20].copy_from_slice(&4u16.to_be_bytes());
                f[14 + 40 + 4..].fill(0x55);
                f
            },
            XDP_PASS,
            truncated,
        ),
        (
            "IPv6 extension headers run past the payload length",
            {
                let mut f = Frame::tcp6(cl6, 40000, vip6, 443)
                    .with_ext(Ext::HopByHop(16))
                    .build();
                f[18..20].copy_from_slice(&8u16.to_be_bytes());
                f
            },
            XDP_PASS,
            truncated,
        ),
        (
            "IPv4 first fragment (MF) to a VIP",
            Frame::tcp4(c4(21), 40000, vip4, 80)
                .with_ipv4_frag(packet::IPV4_MF, 7)
                .build(),
            XDP_DROP,
            fragment,
        ),
        (
            "IPv4 later fragment to a VIP",
            Frame::tcp4(c4(21), 40000, vip4, 80)
                .with_ipv4_frag(100, 7)
                .build(),
            XDP_DROP,
            fragment,
        ),
        (
            "IPv6 fragment to a VIP",
            Frame::udp6(cl6, 40000, vip6, 53)
                .with_ext(Ext::Fragment {
                    offset: 0,
                    more: true,
                    id: 9,
                })
                .build(),
            XDP_DROP,
            fragment,
        ),
        (
            "IPv6 fragment after a hop-by-hop header to a VIP",
            Frame::udp6(cl6, 40000, vip6, 53)
                .with_ext(Ext::HopByHop(8))
                .with_ext(Ext::Fragment {
                    offset: 10,
                    more: false,
                    id: 9,
                })
                .build(),
            XDP_DROP,
            fragment,
        ),
        (
            "IPv6 fragment header after 4 extension headers to a VIP",
            Frame::udp6(cl6, 40000, vip6, 53)
                .with_ext(Ext::HopByHop(8))
                .with_ext(Ext::DestOpts(8))
                .with_ext(Ext::Routing(8))
                .with_ext(Ext::Auth(16))
                .with_ext(Ext::Fragment {
                    offset: 0,
                    more: true,
                    id: 3,
                })
                .build(),
            XDP_DROP,
            fragment,
        ),
        (
            "IPv6 extension chain of 5 headers",
            Frame::tcp6(cl6, 40000, vip6, 443)
                .with_ext(Ext::HopByHop(8))
                .with_ext(Ext::DestOpts(8))
                .with_ext(Ext::Routing(8))
                .with_ext(Ext::DestOpts(8))
                .with_ext(Ext::DestOpts(8))
                .build(),
            XDP_PASS,
            ext,
        ),
    ];
    for (name, frame, action, counter) in &cases {
        let before = counter(&lab.global());
        lab.expect_untouched(name, frame, *action);
        assert_eq!(
            counter(&lab.global()),
            before + 1,
            "{name}: its counter did not rise"
        );
    }

    // Fragments not sent to a VIP are the host's own: passed, not counted.
    let before = lab.global();
    lab.expect_untouched(
        "IPv4 fragment to another address",
        &Frame::udp4(c4(22), 1, Ipv4Addr::new(10, 0, 0, 200), 53)
            .with_ipv4_frag(packet::IPV4_MF, 8)
            .build(),
        XDP_PASS,
    );
    lab.expect_untouched(
        "IPv6 fragment to another address",
        &Frame::udp6(cl6, 1, v6("2001:db8::200"), 53)
            .with_ext(Ext::Fragment {
                offset: 0,
                more: true,
                id: 1,
            })
            .build(),
        XDP_PASS,
    );
    assert_eq!(lab.global(), before);
    // DF alone is not a fragment.
    lab.expect_forward(
        "IPv4 with DF",
        &vips[0],
        &Frame::tcp4(c4(23), 1, vip4, 80)
            .with_ipv4_frag(packet::IPV4_DF, 0)
            .build(),
    );
}

/// Flows from distinct clients to `dst:port`, one frame each.
fn flows(n: u32, dst: Ipv4Addr, port: u16, first: u32) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            Frame::tcp4(c4(first + i), 1024 + (i % 50000) as u16, dst, port)
                .with_payload(b"x")
                .build()
        })
        .collect()
}

#[test]
fn tracked_flows_stay_on_their_real_when_the_ring_changes() {
    require_bpf!();
    let mut lab = Lab::new();
    let vip = lab.vip("tcp/10.0.0.100:80", VipFlags::default());
    for i in 11..14 {
        lab.real(vip, &format!("10.0.0.{i}"), 1);
    }
    let vip4 = Ipv4Addr::new(10, 0, 0, 100);
    let frames = flows(300, vip4, 80, 100);
    let before: Vec<IpAddr> = frames
        .iter()
        .enumerate()
        .map(|(i, f)| lab.expect_forward(&format!("flow {i}"), &vip, f))
        .collect();

    // Two more reals: the ring changes under the established flows.
    lab.real(vip, "10.0.0.14", 1);
    lab.real(vip, "10.0.0.15", 1);
    let mut would_move = 0;
    for (i, f) in frames.iter().enumerate() {
        if lab.predict(&vip, f) != before[i] {
            would_move += 1;
        }
        assert_eq!(
            lab.send(f),
            Some(mac_of(before[i])),
            "flow {i} left its real {} after reals were added",
            before[i]
        );
    }
    assert!(
        would_move > 50,
        "only {would_move} of 300 flows would move: the test proves nothing"
    );
    // New flows follow the new ring.
    for (i, f) in flows(200, vip4, 80, 1000).iter().enumerate() {
        lab.expect_forward(&format!("new flow {i}"), &vip, f);
    }

    // Remove the neighbours of the first flow's real: its flows stay.
    let a = before[0];
    for n in ["10.0.0.11", "10.0.0.12", "10.0.0.13"] {
        if ip(n) != a {
            lab.bal.del_real(vip, ip(n)).expect("del_real");
        }
    }
    for (i, f) in frames.iter().enumerate() {
        if before[i] == a {
            assert_eq!(lab.send(f), Some(mac_of(a)), "flow {i} left {a}");
        }
    }

    // Remove the real itself: its flows re-pick from the ring, counted as stale.
    let stale0 = lab.global().get(counter::CT_STALE);
    lab.bal.del_real(vip, a).expect("del_real");
    let mut moved = 0;
    for (i, f) in frames.iter().enumerate() {
        if before[i] == a {
            let got = lab.expect_forward(&format!("flow {i} after its real left"), &vip, f);
            assert_ne!(got, a);
            moved += 1;
        }
    }
    assert!(moved > 0);
    assert_eq!(lab.global().get(counter::CT_STALE), stale0 + moved);
}

#[test]
fn a_freed_real_id_is_quarantined_and_a_reused_one_is_not_followed() {
    require_bpf!();
    // Tracked flows idle out after 200 ms here, before the quarantine (300 ms) ends, as the
    // daemon's quarantine outlasts its idle timeouts.
    let mut lab = Lab::with(LoadOptions {
        ct_tcp_idle: Duration::from_millis(200),
        ..Lab::options()
    });
    let vip = lab.vip("tcp/10.0.0.100:80", VipFlags::default());
    lab.real(vip, "10.0.0.11", 1);
    lab.real(vip, "10.0.0.12", 1);
    let old = ip("10.0.0.11");
    let freed = lab.bal.real_id(&vip, old).expect("id");
    // Flows the ring sends to .11 (whatever the hash does, the test needs them there).
    let on_old: Vec<Vec<u8>> = flows(400, Ipv4Addr::new(10, 0, 0, 100), 80, 1000)
        .into_iter()
        .filter(|f| lab.predict(&vip, f) == old)
        .take(21)
        .collect();
    assert_eq!(on_old.len(), 21);
    for f in &on_old {
        assert_eq!(lab.expect_forward("onto .11", &vip, f), old);
    }
    lab.bal.del_real(vip, old).expect("del");
    lab.real(vip, "10.0.0.13", 1);
    let new_id = lab.bal.real_id(&vip, ip("10.0.0.13")).expect("id");
    assert_ne!(new_id, freed, "a freed id was reused within its quarantine");
    // The first flow comes back at once: its real is gone, it takes the ring's choice.
    let stale0 = lab.global().get(counter::CT_STALE);
    let got = lab.expect_forward("after .11 left", &vip, &on_old[0]);
    assert_ne!(got, old);
    assert_eq!(lab.global().get(counter::CT_STALE), stale0 + 1);

    std::thread::sleep(QUARANTINE);
    let new = ip("10.0.0.14");
    lab.real(vip, "10.0.0.14", 1);
    assert_eq!(
        lab.bal.real_id(&vip, new),
        Some(freed),
        "after the quarantine the lowest id is reused"
    );
    // The other flows' entries still name the reused id, but are older than the idle time:
    // each takes the ring's choice (expect_forward checks it), not the id's new holder.
    let mut elsewhere = 0;
    for (i, f) in on_old[1..].iter().enumerate() {
        if lab.predict(&vip, f) != new {
            elsewhere += 1;
        }
        lab.expect_forward(&format!("flow {i} after the reuse"), &vip, f);
    }
    assert!(
        elsewhere > 0,
        "every flow's ring choice is the new real: nothing was tested"
    );
}

#[test]
fn a_tracked_flow_never_follows_a_real_id_now_of_another_vip() {
    require_bpf!();
    let mut lab = Lab::new();
    let web = lab.vip("tcp/10.0.0.100:80", VipFlags::default());
    let dns = lab.vip("tcp/10.0.0.101:80", VipFlags::default());
    lab.real(web, "10.0.0.11", 1);
    lab.real(web, "10.0.0.12", 1);
    let old = ip("10.0.0.11");
    let freed = lab.bal.real_id(&web, old).expect("id");
    let frame = flows(400, Ipv4Addr::new(10, 0, 0, 100), 80, 3000)
        .into_iter()
        .find(|f| lab.predict(&web, f) == old)
        .expect("a flow onto .11");
    assert_eq!(lab.expect_forward("onto .11", &web, &frame), old);
    // .11 leaves web; after the quarantine its id goes to a real of the other VIP.
    lab.bal.del_real(web, old).expect("del");
    std::thread::sleep(QUARANTINE);
    lab.real(dns, "10.0.0.21", 1);
    assert_eq!(lab.bal.real_id(&dns, ip("10.0.0.21")), Some(freed));
    // The flow's way names that id, alive and fresh, but of another VIP: not this flow's
    // (a fingerprint of another VIP's flow looks the same), so the packet is a new flow.
    let stale0 = lab.global().get(counter::CT_STALE);
    let new0 = lab.vip_stats(&web).new_flows;
    assert_eq!(
        lab.expect_forward("after the id moved", &web, &frame),
        ip("10.0.0.12")
    );
    assert_eq!(lab.global().get(counter::CT_STALE), stale0);
    assert_eq!(lab.vip_stats(&web).new_flows, new0 + 1);
    // Tracked anew, in a way of its own.
    assert_eq!(lab.send(&frame), Some(mac_of(ip("10.0.0.12"))));
    assert_eq!(lab.vip_stats(&web).new_flows, new0 + 1);
}

#[test]
fn weight_zero_drains_a_real() {
    require_bpf!();
    let mut lab = Lab::new();
    let vip = lab.vip("tcp/10.0.0.100:80", VipFlags::default());
    for i in 11..15 {
        lab.real(vip, &format!("10.0.0.{i}"), 1);
    }
    let vip4 = Ipv4Addr::new(10, 0, 0, 100);
    let frames = flows(200, vip4, 80, 100);
    let on: Vec<IpAddr> = frames
        .iter()
        .map(|f| lab.expect_forward("establish", &vip, f))
        .collect();
    let drained = ip("10.0.0.11");
    assert!(on.contains(&drained));
    lab.bal.set_weight(vip, drained, 0).expect("weight 0");
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(
            lab.send(f),
            Some(mac_of(on[i])),
            "established flow {i} moved"
        );
    }
    for f in flows(400, vip4, 80, 5000) {
        let got = lab.expect_forward("new flow while draining", &vip, &f);
        assert_ne!(got, drained, "a new flow went to a drained real");
    }
}

#[test]
fn a_vip_without_reals_drops_and_counts() {
    require_bpf!();
    let mut lab = Lab::new();
    let vip = lab.vip("udp/10.0.0.100:53", VipFlags::default());
    let frame = Frame::udp4(c4(1), 5000, Ipv4Addr::new(10, 0, 0, 100), 53).build();
    lab.expect_untouched("no reals", &frame, XDP_DROP);
    let id = lab.bal.vip_id(&vip).expect("id");
    assert_eq!(lab.bal.dataplane().vip_stats(id).expect("stats").no_real, 1);
    assert_eq!(lab.global().get(counter::DROP_NO_REAL), 1);
    // A real without a MAC takes no flows either.
    lab.bal
        .add_real(vip, ip("10.0.0.11"), 1, None)
        .expect("add real without MAC");
    lab.expect_untouched("real without MAC", &frame, XDP_DROP);
    lab.bal
        .set_mac(Some(vip), ip("10.0.0.11"), Some(mac_of(ip("10.0.0.11"))))
        .expect("set mac");
    lab.expect_forward("MAC resolved", &vip, &frame);
}

#[test]
fn no_src_port_sends_a_client_to_one_real() {
    require_bpf!();
    let mut lab = Lab::new();
    let vip = lab.vip(
        "tcp/10.0.0.100:80",
        VipFlags {
            no_src_port: true,
            no_conntrack: false,
        },
    );
    for i in 11..19 {
        lab.real(vip, &format!("10.0.0.{i}"), 1);
    }
    let vip4 = Ipv4Addr::new(10, 0, 0, 100);
    for client in 0..20 {
        let mut reals = vec![];
        for port in 0..30u16 {
            let f = Frame::tcp4(c4(client), 20000 + port * 7, vip4, 80).build();
            reals.push(lab.expect_forward("no-src-port", &vip, &f));
        }
        reals.dedup();
        assert_eq!(reals.len(), 1, "client {client} was spread over {reals:?}");
    }
}

#[test]
fn no_conntrack_follows_the_ring() {
    require_bpf!();
    let mut lab = Lab::new();
    let vip = lab.vip(
        "tcp/10.0.0.100:80",
        VipFlags {
            no_src_port: false,
            no_conntrack: true,
        },
    );
    for i in 11..14 {
        lab.real(vip, &format!("10.0.0.{i}"), 1);
    }
    let vip4 = Ipv4Addr::new(10, 0, 0, 100);
    let frames = flows(200, vip4, 80, 100);
    let before: Vec<IpAddr> = frames
        .iter()
        .map(|f| lab.expect_forward("bypass", &vip, f))
        .collect();
    let vip_id = lab.bal.vip_id(&vip).expect("id");
    let s = lab.bal.dataplane().vip_stats(vip_id).expect("stats");
    assert_eq!(
        s.new_flows, 200,
        "every packet of a bypass VIP takes the ring"
    );
    assert_eq!(
        lab.bal.dataplane().conntrack_count().expect("walk"),
        0,
        "nothing tracked"
    );
    lab.real(vip, "10.0.0.14", 1);
    let mut moved = 0;
    for (i, f) in frames.iter().enumerate() {
        // expect_forward asserts the new ring's choice.
        if lab.expect_forward("bypass after change", &vip, f) != before[i] {
            moved += 1;
        }
    }
    assert!(moved > 20, "only {moved} flows moved with the ring");
}

#[test]
fn ten_thousand_flows_spread_evenly_over_four_reals() {
    require_bpf!();
    let mut lab = Lab::new();
    let vip = lab.vip("tcp/10.0.0.100:80", VipFlags::default());
    for i in 11..15 {
        lab.real(vip, &format!("10.0.0.{i}"), 1);
    }
    let (ring, ids) = lab.predicted_ring(&vip);
    let vip4 = Ipv4Addr::new(10, 0, 0, 100);
    let mut counts: HashMap<[u8; 6], u32> = HashMap::new();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for _ in 0..10_000 {
        // xorshift: deterministic "random" clients and ports
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let f = Frame::tcp4(Ipv4Addr::from(x as u32), (x >> 32) as u16 | 1, vip4, 80).build();
        let want = ids[&ring[ring_slot(flow_hash(&flow_key(&f), 0), M) as usize]];
        let got = lab.send(&f).expect("forwarded");
        assert_eq!(got, mac_of(want), "kernel and userspace disagree on a flow");
        *counts.entry(got).or_default() += 1;
    }
    assert_eq!(counts.len(), 4);
    for (mac, n) in &counts {
        assert!(
            (2300..=2700).contains(n),
            "real {mac:02x?} got {n} of 10000 flows, outside 25 % ± 2 %: {counts:?}"
        );
    }
}

#[test]
fn idle_tracked_flows_expire() {
    require_bpf!();
    let mut lab = Lab::with(LoadOptions {
        limits: Limits {
            max_vips: 4,
            max_reals: 16,
            ring_size: M,
        },
        conntrack_size: 4096,
        ct_tcp_idle: Duration::from_millis(1),
        ..LoadOptions::default()
    });
    let vip = lab.vip("tcp/10.0.0.100:80", VipFlags::default());
    lab.real(vip, "10.0.0.11", 1);
    let frames = flows(50, Ipv4Addr::new(10, 0, 0, 100), 80, 100);
    for f in &frames {
        lab.expect_forward("establish", &vip, f);
    }
    lab.real(vip, "10.0.0.12", 1);
    std::thread::sleep(Duration::from_millis(50));
    let stale0 = lab.global().get(counter::CT_STALE);
    let mut to_new = 0;
    for f in &frames {
        // After the idle time every flow takes the new ring's choice.
        if lab.expect_forward("after idle", &vip, f) == ip("10.0.0.12") {
            to_new += 1;
        }
    }
    assert!(
        to_new > 10,
        "only {to_new} of 50 expired flows took the new real"
    );
    assert_eq!(lab.global().get(counter::CT_STALE), stale0 + 50);
}

fn cpu_lab(conntrack_size: u32) -> (Lab, VipSpec) {
    let mut lab = Lab::with(LoadOptions {
        limits: Limits {
            max_vips: 2,
            max_reals: 16,
            ring_size: M,
        },
        conntrack_size,
        ..LoadOptions::default()
    });
    let vip = lab.vip("tcp/10.0.0.100:80", VipFlags::default());
    lab.real(vip, "10.0.0.11", 1);
    (lab, vip)
}

#[test]
fn conntrack_holds_its_size_filled_from_every_cpu() {
    require_bpf!();
    // One table for all CPUs: 1000 flows from each, in a table sized for all of them.
    let cpus = aya::util::online_cpus().expect("/sys/devices/system/cpu/online");
    let (mut lab, vip) = cpu_lab(1000 * cpus.len() as u32);
    let vip_id = lab.bal.vip_id(&vip).expect("vip id");
    let mut keys = vec![];
    for cpu in cpus {
        pin_to_cpu(cpu as usize).expect("pinning the thread");
        for f in flows(1000, Ipv4Addr::new(10, 0, 0, 100), 80, cpu * 100_000) {
            lab.send(&f).expect("forwarded");
            keys.push(flow_key(&f));
        }
    }
    let dp = lab.bal.dataplane();
    let tracked = keys
        .iter()
        .filter(|k| dp.conntrack_get(k, vip_id).expect("lookup").is_some())
        .count();
    let untracked = lab.vip_stats(&vip).untracked;
    assert_eq!(tracked + untracked as usize, keys.len());
    // A load of 2 flows per 8-way bucket: a full bucket is rare (0.015 % by Poisson).
    assert!(
        untracked <= 3,
        "{untracked} of {} flows untracked",
        keys.len()
    );
}

#[test]
fn a_flow_tracked_on_one_cpu_keeps_its_real_on_another_across_a_ring_change() {
    require_bpf!();
    let cpus = aya::util::online_cpus().expect("/sys/devices/system/cpu/online");
    if cpus.len() < 2 {
        eprintln!("skipped: one CPU");
        return;
    }
    let (mut lab, vip) = cpu_lab(4096);
    pin_to_cpu(cpus[0] as usize).expect("pinning the thread");
    let frames = flows(300, Ipv4Addr::new(10, 0, 0, 100), 80, 7);
    let first: Vec<_> = frames
        .iter()
        .map(|f| lab.send(f).expect("forwarded"))
        .collect();
    // Two more reals: the ring would give most flows to them.
    lab.real(vip, "10.0.0.12", 1);
    lab.real(vip, "10.0.0.13", 1);
    let new_flows = lab.vip_stats(&vip).new_flows;
    pin_to_cpu(cpus[1] as usize).expect("pinning the thread");
    for (f, mac) in frames.iter().zip(&first) {
        assert_eq!(lab.send(f).as_ref(), Some(mac), "a flow moved between CPUs");
    }
    assert_eq!(
        lab.vip_stats(&vip).new_flows,
        new_flows,
        "a flow was new again"
    );
    assert_eq!(lab.global().get(counter::CT_STALE), 0);
}

/// Collects log records (the kernel's aya-log records arrive through the `log` crate).
struct Capture(std::sync::Mutex<Vec<String>>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, r: &log::Record) {
        if let Ok(mut v) = self.0.lock() {
            v.push(format!("{} {}", r.level(), r.args()));
        }
    }
    fn flush(&self) {}
}

static CAPTURE: Capture = Capture(std::sync::Mutex::new(Vec::new()));

#[test]
fn a_vip_without_meta_is_passed_counted_and_logged_by_the_kernel() {
    require_bpf!();
    // Before loading: the kernel log reader binds to the logger installed at that time.
    let _ = log::set_logger(&CAPTURE);
    log::set_max_level(log::LevelFilter::Trace);
    let mut lab = Lab::new();
    let spec: VipSpec = "tcp/10.0.0.100:80".parse().expect("vip");
    // A VIPS entry whose VIP_META was never written (the daemon never does this), its address
    // in VIP_ADDRS (and so VIP_FILTER) as the daemon writes it first.
    let dp = lab.bal.dataplane_mut();
    dp.set_vip_addr(
        &spec.key().addr,
        &lb_common::VipAddrValue {
            vip_count: 1,
            port0: 0,
        },
    )
    .expect("set_vip_addr");
    dp.set_vip(&spec.key(), 5).expect("set_vip");
    let frame = Frame::tcp4(c4(1), 40000, Ipv4Addr::new(10, 0, 0, 100), 80).build();
    lab.expect_untouched("VIP without VIP_META", &frame, XDP_PASS);
    assert_eq!(lab.global().get(counter::PASS_VIP_META_MISSING), 1);
    let mut logger = lab
        .bal
        .dataplane_mut()
        .take_logger()
        .expect("the kernel log reader");
    logger.flush();
    let lines = CAPTURE.0.lock().expect("capture").clone();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("ERROR") && l.contains("vip_id 5 without VIP_META")),
        "no kernel log record: {lines:?}"
    );
}

#[test]
fn a_syn_takes_the_ring_and_replaces_the_tracked_entry() {
    require_bpf!();
    let mut lab = Lab::new();
    let vip = lab.vip("tcp/10.0.0.100:80", VipFlags::default());
    for i in 11..15 {
        lab.real(vip, &format!("10.0.0.{i}"), 1);
    }
    let vip4 = Ipv4Addr::new(10, 0, 0, 100);
    // A connection (SYN, then data) on some real.
    let syn = Frame::tcp4(c4(50), 40000, vip4, 80)
        .with_tcp_flags(packet::TCP_SYN)
        .build();
    let data = Frame::tcp4(c4(50), 40000, vip4, 80)
        .with_payload(b"x")
        .build();
    let first = lab.expect_forward("syn", &vip, &syn);
    assert_eq!(lab.send(&data), Some(mac_of(first)));
    // Its real is drained: the established connection stays...
    lab.bal.set_weight(vip, first, 0).expect("drain");
    for _ in 0..3 {
        assert_eq!(
            lab.send(&data),
            Some(mac_of(first)),
            "established flow moved"
        );
    }
    // ...but a new connection from the same source port (port reuse) is balanced again,
    // not sent to the drained real, and its real is the one tracked from then on.
    // A SYN-ACK of that tuple is no new connection: it keeps the tracked real.
    let syn_ack = Frame::tcp4(c4(50), 40000, vip4, 80)
        .with_tcp_flags(packet::TCP_SYN | packet::TCP_ACK)
        .build();
    assert_eq!(
        lab.send(&syn_ack),
        Some(mac_of(first)),
        "a SYN-ACK was balanced again"
    );
    let again = lab.expect_forward("reused port's syn", &vip, &syn);
    assert_ne!(again, first, "a new connection went to a drained real");
    for _ in 0..3 {
        assert_eq!(
            lab.send(&data),
            Some(mac_of(again)),
            "the new entry was not kept"
        );
    }
    let vip_id = lab.bal.vip_id(&vip).expect("id");
    let entry = lab
        .bal
        .dataplane()
        .conntrack_get(&flow_key(&data), vip_id)
        .expect("lookup")
        .expect("tracked");
    assert_eq!(Some(entry.real_id), lab.bal.real_id(&vip, again));
    assert_eq!(lab.global().get(counter::CT_STALE), 0);
}

#[test]
fn a_frame_to_a_group_mac_is_passed_and_a_foreign_unicast_mac_is_forwarded() {
    require_bpf!();
    let (mut lab, vips) = standard_lab();
    let vip4 = Ipv4Addr::new(10, 0, 0, 100);
    let base = Frame::tcp4(c4(60), 40000, vip4, 80);
    for (name, dst) in [
        ("broadcast", [0xff; 6]),
        ("IPv4 multicast", [0x01, 0x00, 0x5e, 0x00, 0x00, 0x12]),
        ("IPv6 multicast", [0x33, 0x33, 0x00, 0x00, 0x00, 0x01]),
    ] {
        let frame = base.clone().with_macs([2, 0, 0, 0, 0, 9], dst).build();
        let before = lab.global().get(counter::PASS_GROUP_MAC);
        lab.expect_untouched(name, &frame, XDP_PASS);
        assert_eq!(
            lab.global().get(counter::PASS_GROUP_MAC),
            before + 1,
            "{name}"
        );
    }
    let id = lab.bal.vip_id(&vips[0]).expect("id");
    assert_eq!(lab.bal.dataplane().vip_stats(id).expect("stats").packets, 0);
    // A unicast destination other than ours (a VRRP virtual MAC, a macvlan) is forwarded,
    // with that address as the source.
    let vrrp = [0x00, 0x00, 0x5e, 0x00, 0x01, 0x07];
    let frame = base.with_macs([2, 0, 0, 0, 0, 9], vrrp).build();
    lab.expect_forward("to a VRRP virtual MAC", &vips[0], &frame);
}

#[test]
fn ipv6_to_a_v4_mapped_address_never_reaches_an_ipv4_vip() {
    require_bpf!();
    let mut lab = Lab::new();
    let vip = lab.vip("tcp/10.50.0.100:80", VipFlags::default());
    lab.real(vip, "10.50.0.11", 1);
    let empty = lab.vip("tcp/10.50.0.101:80", VipFlags::default());
    let mapped = v6("::ffff:10.50.0.100");
    let client = v6("2001:db8:ee::1");
    // The frame the review found forwarded to the IPv4 VIP's real.
    let syn = Frame::tcp6(client, 40000, mapped, 80)
        .with_tcp_flags(packet::TCP_SYN)
        .build();
    assert_eq!(syn.len(), 74);
    lab.expect_untouched("IPv6 SYN to ::ffff:10.50.0.100", &syn, XDP_PASS);
    // A fragment to it is not dropped by the IPv4 VIP's fragment policy, and a frame to the
    // mapped form of a VIP without reals is not dropped as no_real.
    let frag = Frame::udp6(client, 1, mapped, 80)
        .with_ext(Ext::Fragment {
            offset: 0,
            more: true,
            id: 5,
        })
        .build();
    lab.expect_untouched("IPv6 fragment to ::ffff:10.50.0.100", &frag, XDP_PASS);
    let to_empty = Frame::tcp6(client, 40001, v6("::ffff:10.50.0.101"), 80).build();
    lab.expect_untouched("IPv6 to ::ffff:10.50.0.101", &to_empty, XDP_PASS);
    let g = lab.global();
    assert_eq!(g.get(counter::PASS_V4_MAPPED), 3);
    assert_eq!(g.get(counter::DROP_FRAGMENT), 0);
    assert_eq!(g.get(counter::DROP_NO_REAL), 0);
    for v in [vip, empty] {
        let id = lab.bal.vip_id(&v).expect("id");
        let s = lab.bal.dataplane().vip_stats(id).expect("stats");
        assert_eq!((s.packets, s.new_flows, s.no_real), (0, 0, 0), "{v}");
    }
    // The IPv4 VIP itself is untouched by all this.
    let frame = Frame::tcp4(c4(70), 40000, Ipv4Addr::new(10, 50, 0, 100), 80).build();
    lab.expect_forward("IPv4 to the VIP", &vip, &frame);
}

#[test]
fn a_client_fin_or_rst_makes_its_flow_closing_and_it_idles_out_sooner() {
    require_bpf!();
    let mut lab = Lab::with(LoadOptions {
        ct_closing_idle: Duration::from_millis(200),
        ..Lab::options()
    });
    let vip = lab.vip("tcp/10.0.0.100:80", VipFlags::default());
    for i in 11..15 {
        lab.real(vip, &format!("10.0.0.{i}"), 1);
    }
    let vip_id = lab.bal.vip_id(&vip).expect("id");
    let vip4 = Ipv4Addr::new(10, 0, 0, 100);
    let entry = |lab: &Lab, frame: &[u8]| {
        lab.bal
            .dataplane()
            .conntrack_get(&flow_key(frame), vip_id)
            .expect("lookup")
            .expect("tracked")
    };
    let data = Frame::tcp4(c4(60), 41000, vip4, 80)
        .with_payload(b"x")
        .build();
    let fin = Frame::tcp4(c4(60), 41000, vip4, 80)
        .with_tcp_flags(packet::TCP_FIN | packet::TCP_ACK)
        .build();
    let real = lab.expect_forward("data", &vip, &data);
    let closing = |flags: u32| flags & lb_common::CT_F_CLOSING;
    assert_eq!(entry(&lab, &data).flags, 0);
    lab.expect_forward("fin", &vip, &fin);
    assert_eq!(entry(&lab, &fin).flags, lb_common::CT_F_CLOSING);
    // Its real drains: the closing flow's last packets still reach it...
    lab.bal.set_weight(vip, real, 0).expect("drain");
    assert_eq!(lab.send(&data), Some(mac_of(real)), "last ACK moved");
    assert_eq!(closing(entry(&lab, &data).flags), lb_common::CT_F_CLOSING);
    // ...until the closing idle time (not the TCP one) has passed.
    std::thread::sleep(Duration::from_millis(350));
    let stale = lab.global().get(counter::CT_STALE);
    let after = lab.send(&data).expect("forwarded");
    assert_ne!(after, mac_of(real), "an idled-out closing flow stayed");
    assert_eq!(lab.global().get(counter::CT_STALE), stale + 1);
    assert_eq!(
        closing(entry(&lab, &data).flags),
        0,
        "a data packet starts a flow"
    );
    // A flow first seen with an RST is tracked as closing from the start.
    let rst = Frame::tcp4(c4(61), 41001, vip4, 80)
        .with_tcp_flags(packet::TCP_RST)
        .build();
    lab.send(&rst).expect("forwarded");
    assert_eq!(closing(entry(&lab, &rst).flags), lb_common::CT_F_CLOSING);
}

/// A VIP with a tcp check on reals .11 and .12, all flows to be seen.
fn checked_lab(on_lost: &str) -> (Lab, VipSpec) {
    let mut lab = Lab::new();
    let vip = lab.vip("tcp/10.0.0.100:80", VipFlags::default());
    lab.real(vip, "10.0.0.11", 1);
    lab.real(vip, "10.0.0.12", 1);
    let check = CheckFields::from_json(&serde_json::json!({"type": "tcp"})).expect("check");
    let options = VipOptions {
        on_quorum_lost: on_lost.parse().expect("on_quorum_lost"),
        ..VipOptions::default()
    };
    lab.bal
        .apply(vec![
            Change::SetCheck {
                vip,
                real: None,
                check: Some(Box::new(check)),
            },
            Change::SetOptions { vip, options },
        ])
        .expect("check and options");
    (lab, vip)
}

fn all_down(lab: &mut Lab, vip: VipSpec, down: bool) {
    let changes = ["10.0.0.11", "10.0.0.12"]
        .iter()
        .map(|a| Change::SetHealth {
            vip,
            addr: ip(a).into(),
            down,
            weight: None,
        })
        .collect();
    lab.bal.apply(changes).expect("health");
}

#[test]
fn a_vip_without_quorum_that_drops_counts_quorum_drops_and_keeps_tracked_flows() {
    require_bpf!();
    let (mut lab, vip) = checked_lab("drop");
    let vip4 = Ipv4Addr::new(10, 0, 0, 100);
    let old = Frame::tcp4(c4(70), 42000, vip4, 80).build();
    let real = lab.expect_forward("established before", &vip, &old);
    all_down(&mut lab, vip, true);
    let id = lab.bal.vip_id(&vip).expect("id");
    let new = Frame::tcp4(c4(71), 42001, vip4, 80).build();
    lab.expect_untouched("new flow without quorum", &new, XDP_DROP);
    let s = lab.bal.dataplane().vip_stats(id).expect("stats");
    assert_eq!((s.quorum_drops, s.no_real), (1, 0));
    assert_eq!(lab.global().get(counter::DROP_QUORUM), 1);
    assert_eq!(lab.global().get(counter::DROP_NO_REAL), 0);
    // down_flows = "keep": the established flow goes on to its real.
    assert_eq!(lab.send(&old), Some(mac_of(real)));
    all_down(&mut lab, vip, false);
    lab.expect_forward("quorum back", &vip, &new);
}

#[test]
fn a_vip_without_quorum_fails_open_or_sends_new_flows_to_its_sorry_server() {
    require_bpf!();
    let (mut lab, vip) = checked_lab("fail-open");
    all_down(&mut lab, vip, true);
    let vip4 = Ipv4Addr::new(10, 0, 0, 100);
    // Fail-open: the ring holds every real again (predict checks it against the kernel's).
    let mut seen = std::collections::BTreeSet::new();
    for f in flows(50, vip4, 80, 9000) {
        seen.insert(lab.expect_forward("fail-open", &vip, &f));
    }
    assert_eq!(seen.len(), 2, "both reals take new flows");
    // A sorry server takes every new flow; a tracked flow stays where it was.
    let sorry = ip("10.0.0.99");
    let mut options = VipOptions {
        sorry_server: Some(sorry),
        ..VipOptions::default()
    };
    options.on_quorum_lost = "fail-open".parse().expect("value");
    lab.bal
        .apply(vec![
            Change::SetOptions { vip, options },
            Change::SetMac {
                vip: Some(vip),
                addr: sorry,
                mac: Some(mac_of(sorry)),
            },
        ])
        .expect("sorry server");
    let tracked = flows(1, vip4, 80, 9000).remove(0);
    assert_ne!(lab.send(&tracked), Some(mac_of(sorry)));
    for f in flows(50, vip4, 80, 9500) {
        assert_eq!(
            lab.send(&f),
            Some(mac_of(sorry)),
            "a new flow missed the sorry server"
        );
    }
    all_down(&mut lab, vip, false);
    for f in flows(50, vip4, 80, 9600) {
        assert_ne!(lab.send(&f), Some(mac_of(sorry)), "quorum is back");
    }
}

const XDP_REDIRECT: u32 = 4;

fn probe_conf() -> lb_common::ProbeConf {
    lb_common::ProbeConf {
        veth_ifindex: 7,
        iface_ifindex: 3,
        port_base: 61000,
        port_count: 64,
        peer_mac: [0x02, 0x78, 0x6c, 0x62, 0, 2],
        iface_mac: [0x02, 0x22, 0, 0, 0, 3],
        _pad: [0; 6],
    }
}

#[test]
fn a_probe_reply_from_a_vip_goes_to_the_probe_namespace_and_nothing_else_does() {
    require_bpf!();
    let mut lab = Lab::new();
    let vip = lab.vip("tcp/10.0.0.100:80", VipFlags::default());
    lab.real(vip, "10.0.0.11", 1);
    let (vip4, lb) = (Ipv4Addr::new(10, 0, 0, 100), Ipv4Addr::new(10, 0, 0, 3));
    let reply = Frame::tcp4(vip4, 80, lb, 61005)
        .with_tcp_flags(packet::TCP_SYN | packet::TCP_ACK)
        .build();
    lab.expect_untouched("probes off", &reply, XDP_PASS);
    let conf = probe_conf();
    lab.bal
        .dataplane_mut()
        .set_probe_conf(&conf)
        .expect("PROBE");
    let (action, out) = lab.run(&reply);
    assert_eq!(action, XDP_REDIRECT);
    let mut want = reply.clone();
    packet::set_dst_mac(&mut want, conf.peer_mac);
    assert!(out == want, "{}", packet::hex_diff(&want, &out));
    assert_eq!(lab.global().get(counter::PROBE_REPLY), 1);
    let udp = Frame::udp4(vip4, 80, lb, 61063).build();
    assert_eq!(lab.run(&udp).0, XDP_REDIRECT, "the last probe port");
    for (name, frame) in [
        (
            "from no VIP",
            Frame::tcp4(Ipv4Addr::new(10, 0, 0, 11), 80, lb, 61005).build(),
        ),
        (
            "above the probe ports",
            Frame::tcp4(vip4, 80, lb, 61064).build(),
        ),
        (
            "below the probe ports",
            Frame::tcp4(vip4, 80, lb, 60999).build(),
        ),
    ] {
        lab.expect_untouched(name, &frame, XDP_PASS);
    }
    // Traffic to the VIP is balanced as before.
    let frame = Frame::tcp4(c4(80), 61005, vip4, 80).build();
    lab.expect_forward("to the VIP from a probe port", &vip, &frame);
}

#[test]
fn a_probe_leaves_for_the_mac_of_the_real_its_source_port_names() {
    require_bpf!();
    let mut lab = Lab::new();
    let vip = lab.vip("tcp/10.0.0.100:80", VipFlags::default());
    lab.real(vip, "10.0.0.11", 1);
    let id = lab.bal.real_id(&vip, ip("10.0.0.11")).expect("id");
    let (vip4, lb) = (Ipv4Addr::new(10, 0, 0, 100), Ipv4Addr::new(10, 0, 0, 3));
    let probe = |port: u16| {
        Frame::tcp4(lb, port, vip4, 80)
            .with_tcp_flags(packet::TCP_SYN)
            .build()
    };
    let run = |lab: &mut Lab, frame: &[u8]| {
        lab.bal
            .dataplane_mut()
            .test_run_probe(frame)
            .unwrap_or_else(|e| panic!("xlb_probe: {e:#?}"))
    };
    let mine = probe(61000 + id as u16);
    assert_eq!(run(&mut lab, &mine).0, XDP_DROP, "probes off");
    let conf = probe_conf();
    lab.bal
        .dataplane_mut()
        .set_probe_conf(&conf)
        .expect("PROBE");
    let (action, out) = run(&mut lab, &mine);
    assert_eq!(action, XDP_REDIRECT);
    let mut want = mine.clone();
    packet::set_dst_mac(&mut want, mac_of(ip("10.0.0.11")));
    packet::set_src_mac(&mut want, conf.iface_mac);
    assert!(out == want, "{}", packet::hex_diff(&want, &out));
    let v6 = Frame::udp6(v6("fd00::3"), 61000 + id as u16, v6("fd00::100"), 53).build();
    assert_eq!(run(&mut lab, &v6).0, XDP_REDIRECT, "IPv6 UDP");
    for (name, frame) in [
        ("an id without a real", probe(61000 + 40)),
        ("not a probe port", probe(40000)),
        ("ICMP", Frame::icmp4(lb, vip4).build()),
        ("ARP", packet::arp_request(conf.peer_mac, lb, vip4)),
    ] {
        assert_eq!(run(&mut lab, &frame).0, XDP_DROP, "{name}");
    }
}
