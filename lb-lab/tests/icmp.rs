//! ICMP through BPF_PROG_TEST_RUN, exact bytes: echo requests to a VIP answered in both
//! families; errors quoting a VIP flow forwarded to the flow's real in direct routing and in
//! tunnel mode, by the connection table and by the ring; quoted headers that name no flow
//! dropped; "fragmentation needed" and "packet too big" for tunnel packets that do not fit,
//! and their rate limit.

mod common;

#[path = "common/tunnel_lab.rs"]
#[allow(dead_code)]
mod tunnel_lab;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{counter, flow_hash, v4_mapped, FlowKey, ENCAP_IPIP, IPPROTO_TCP};
use lb_lab::packet::{self, Frame, L3, L4};
use lb_userspace::{dataplane::Dataplane, model::Mode};
use tunnel_lab::*;

macro_rules! require_bpf {
    () => {
        if !common::bpf_available(module_path!()) {
            return;
        }
    };
}

const VIP4: Ipv4Addr = Ipv4Addr::new(10, 50, 0, 100);
const ROUTER4: Ipv4Addr = Ipv4Addr::new(10, 60, 0, 1);

fn vip6() -> Ipv6Addr {
    v6("2001:db8:50::100")
}

/// The echo reply the balancer must send for `request`: addresses and MACs swapped, TTL 64,
/// the reply type, checksums computed afresh.
fn echo_reply(request: &[u8]) -> Vec<u8> {
    let mut out = request.to_vec();
    out[..6].copy_from_slice(&request[6..12]);
    out[6..12].copy_from_slice(&request[..6]);
    let o = packet::l3_offset(request);
    if out[o] >> 4 == 4 {
        out[o + 12..o + 16].copy_from_slice(&request[o + 16..o + 20]);
        out[o + 16..o + 20].copy_from_slice(&request[o + 12..o + 16]);
        out[o + 8] = 64;
        out[o + 10..o + 12].fill(0);
        let sum = packet::ipv4_checksum(&out[o..o + 20]);
        out[o + 10..o + 12].copy_from_slice(&sum.to_be_bytes());
        let l4 = o + 20;
        out[l4] = 0;
        out[l4 + 2..l4 + 4].fill(0);
        let sum = packet::ipv4_checksum(&out[l4..]);
        out[l4 + 2..l4 + 4].copy_from_slice(&sum.to_be_bytes());
    } else {
        out[o + 8..o + 24].copy_from_slice(&request[o + 24..o + 40]);
        out[o + 24..o + 40].copy_from_slice(&request[o + 8..o + 24]);
        out[o + 7] = 64;
        let l4 = o + 40;
        out[l4] = 129;
        out[l4 + 2..l4 + 4].fill(0);
        let src = Ipv6Addr::from(<[u8; 16]>::try_from(&out[o + 8..o + 24]).unwrap());
        let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&out[o + 24..o + 40]).unwrap());
        let sum = packet::ipv6_transport_checksum(src, dst, 58, &out[l4..]);
        out[l4 + 2..l4 + 4].copy_from_slice(&sum.to_be_bytes());
    }
    out
}

#[test]
fn echo_requests_to_a_vip_are_answered_and_others_left_alone() {
    require_bpf!();
    let mut lab = Lab::new(conf(ENCAP_IPIP));
    lab.vip("tcp/10.50.0.100:80");
    lab.vip("tcp/[2001:db8:50::100]:80");
    for (name, req) in [
        (
            "IPv4",
            Frame::icmp4(c4(1), VIP4).with_payload(b"ping").build(),
        ),
        ("IPv6", Frame::icmp6(v6("2001:db8:ee::1"), vip6()).build()),
        (
            "802.1Q",
            Frame::icmp4(c4(2), VIP4).with_vlan(0x0064).build(),
        ),
    ] {
        let before = lab.global().get(counter::ICMP_ECHO_REPLY);
        let (action, out) = lab.run(&req);
        assert_eq!(action, XDP_TX, "{name}");
        let want = echo_reply(&req);
        assert!(out == want, "{name}:\n{}", packet::hex_diff(&want, &out));
        packet::verify_checksums(&out).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(lab.global().get(counter::ICMP_ECHO_REPLY), before + 1);
    }
    // Not a VIP: the host's own.
    let other = Frame::icmp4(c4(1), Ipv4Addr::new(10, 50, 0, 1)).build();
    let (action, out) = lab.run(&other);
    assert_eq!((action, out), (XDP_PASS, other));
    // Neighbour discovery for a VIP address (the host may own it): passed, counted.
    let ns = Frame::new(
        L3::v6(v6("2001:db8:ee::1"), vip6()),
        L4::Raw {
            proto: 58,
            bytes: vec![135, 0, 0, 0, 0, 0, 0, 0],
        },
    )
    .build();
    let before = lab.global().get(counter::PASS_ICMP);
    let (action, out) = lab.run(&ns);
    assert_eq!((action, out), (XDP_PASS, ns));
    assert_eq!(lab.global().get(counter::PASS_ICMP), before + 1);
}

/// An ICMP error from `router` to the VIP quoting the real's reply of the flow
/// client:cport → VIP:vport (so quoting VIP:vport → client:cport).
fn icmp_error(client: IpAddr, cport: u16, vip: IpAddr, vport: u16, router: IpAddr) -> Vec<u8> {
    let reply = match (vip, client) {
        (IpAddr::V4(v), IpAddr::V4(c)) => Frame::tcp4(v, vport, c, cport).build(),
        (IpAddr::V6(v), IpAddr::V6(c)) => Frame::tcp6(v, vport, c, cport).build(),
        _ => panic!("one family"),
    };
    let o = packet::l3_offset(&reply);
    let hlen = if vip.is_ipv4() { 20 } else { 40 };
    let quoted = &reply[o..o + hlen + 8];
    // Fragmentation needed (IPv4) or packet too big (IPv6), MTU 1400.
    let kind = if vip.is_ipv4() { [3, 4] } else { [2, 0] };
    packet::icmp_error(router, vip, kind, 1400, quoted).build()
}

fn flow(client: IpAddr, cport: u16, vip: IpAddr, vport: u16) -> FlowKey {
    let m = |a: IpAddr| match a {
        IpAddr::V4(a) => v4_mapped(a.octets()),
        IpAddr::V6(a) => a.octets(),
    };
    FlowKey {
        src: m(client),
        dst: m(vip),
        src_port_be: cport.to_be(),
        dst_port_be: vport.to_be(),
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    }
}

#[test]
fn an_error_about_a_vip_flow_reaches_its_real_in_both_modes_by_conntrack_and_by_ring() {
    require_bpf!();
    let c = conf(ENCAP_IPIP);
    for mode in [Mode::Dr, Mode::Tunnel] {
        let mut lab = Lab::new(c);
        let v4 = lab.vip("tcp/10.50.0.100:80");
        let v6s = lab.vip("tcp/[2001:db8:50::100]:80");
        let mac = |i: u8| match mode {
            Mode::Dr => [0x02, 0xaa, 0, 0, 0, i],
            Mode::Tunnel | Mode::Nat => GW_MAC,
        };
        for i in 1..=3u8 {
            lab.real(v4, &format!("10.50.0.1{i}"), mode, Some(mac(i)));
            lab.real(v6s, &format!("2001:db8:50::1{i}"), mode, Some(mac(i)));
        }
        let cases = [
            (IpAddr::V4(c4(7)), IpAddr::V4(VIP4), IpAddr::V4(ROUTER4), v4),
            (
                ip("2001:db8:ee::7"),
                IpAddr::V6(vip6()),
                ip("2001:db8:60::1"),
                v6s,
            ),
        ];
        for (client, vip, router, spec) in cases {
            for tracked in [false, true] {
                let cport = if tracked { 50001 } else { 50002 };
                let key = flow(client, cport, vip, 80);
                let real = lab.predict_key(&spec, &key);
                if tracked {
                    // The flow first, then its real leaves the ring: the error must still
                    // follow the tracked flow.
                    let pkt = match (client, vip) {
                        (IpAddr::V4(cl), IpAddr::V4(v)) => Frame::tcp4(cl, cport, v, 80).build(),
                        (IpAddr::V6(cl), IpAddr::V6(v)) => Frame::tcp6(cl, cport, v, 80).build(),
                        _ => unreachable!(),
                    };
                    assert_eq!(lab.run(&pkt).0, XDP_TX);
                    lab.bal.set_weight(spec, real, 0).expect("drain");
                }
                let err = icmp_error(client, cport, vip, 80, router);
                let before = lab.global().get(counter::ICMP_ERROR_FORWARDED);
                let (action, out) = lab.run(&err);
                let what = format!("{mode} {vip} tracked {tracked}");
                assert_eq!(action, XDP_TX, "{what}");
                let want = match mode {
                    Mode::Dr => {
                        let mut w = err.clone();
                        w[6..12].copy_from_slice(&err[..6]);
                        w[..6].copy_from_slice(&mac(real_index(real)));
                        w
                    }
                    Mode::Tunnel => {
                        let hash16 = (flow_hash(&key, 0) & 0xFFFF) as u16;
                        encapsulated_with(&err, real, &c, GW_MAC, hash16)
                    }
                    Mode::Nat => unreachable!("not among the modes of this test"),
                };
                assert!(
                    out == want,
                    "{what} to {real}:\n{}",
                    packet::hex_diff(&want, &out)
                );
                assert_eq!(lab.global().get(counter::ICMP_ERROR_FORWARDED), before + 1);
                if tracked {
                    lab.bal.set_weight(spec, real, 1).expect("undrain");
                }
            }
        }
        // Errors are never tracked as flows of their own: the table holds only the two
        // flows sent above.
        assert_eq!(lab.bal.dataplane().conntrack_count().expect("count"), 2);
    }
}

fn real_index(real: IpAddr) -> u8 {
    let s = real.to_string();
    s.as_bytes()[s.len() - 1] - b'0'
}

#[test]
fn errors_quoting_no_vip_flow_are_dropped_and_counted() {
    require_bpf!();
    let mut lab = Lab::new(conf(ENCAP_IPIP));
    let v4 = lab.vip("tcp/10.50.0.100:80");
    lab.real(v4, "10.50.0.11", Mode::Dr, Some([0x02, 0xaa, 0, 0, 0, 1]));
    let good = icmp_error(
        IpAddr::V4(c4(7)),
        50003,
        IpAddr::V4(VIP4),
        80,
        IpAddr::V4(ROUTER4),
    );
    let o = 14 + 20 + 8;
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    // The quoted header cut short of its ports.
    let mut cut = good[..o + 20 + 2].to_vec();
    cut[16..18].copy_from_slice(&((20 + 8 + 22) as u16).to_be_bytes());
    cut[24..26].fill(0);
    let sum = packet::ipv4_checksum(&cut[14..34]);
    cut[24..26].copy_from_slice(&sum.to_be_bytes());
    cases.push(("truncated", cut));
    // Quoting a packet from another address than the VIP the error is sent to.
    let mut other = good.clone();
    other[o + 12..o + 16].copy_from_slice(&[10, 50, 0, 101]);
    cases.push(("another source", other));
    // Quoting a port no VIP has.
    let mut port = good.clone();
    port[o + 20..o + 22].copy_from_slice(&81u16.to_be_bytes());
    cases.push(("another port", port));
    // Quoting ICMP.
    let mut proto = good.clone();
    proto[o + 9] = 1;
    cases.push(("not TCP/UDP", proto));
    for (name, frame) in cases {
        let before = lab.global().get(counter::DROP_ICMP_UNMATCHED);
        let (action, _) = lab.run(&frame);
        assert_eq!(action, XDP_DROP, "{name}");
        assert_eq!(
            lab.global().get(counter::DROP_ICMP_UNMATCHED),
            before + 1,
            "{name}"
        );
    }
}

/// The answer the balancer must give to `frame` too big for a tunnel that leaves `mtu`.
fn too_big_answer(frame: &[u8], mtu: u32) -> Vec<u8> {
    let o = packet::l3_offset(frame);
    let quoted = &frame[o..o + 128];
    let mut out = Vec::new();
    out.extend_from_slice(&frame[6..12]);
    out.extend_from_slice(&frame[..6]);
    out.extend_from_slice(&frame[12..o]);
    if frame[o] >> 4 == 4 {
        let mut h = vec![0x45, 0, 0, 156, 0, 0, 0, 0, 64, 1, 0, 0];
        h.extend_from_slice(&frame[o + 16..o + 20]);
        h.extend_from_slice(&frame[o + 12..o + 16]);
        let sum = packet::ipv4_checksum(&h);
        h[10..12].copy_from_slice(&sum.to_be_bytes());
        let mut icmp = vec![3, 4, 0, 0, 0, 0];
        icmp.extend_from_slice(&(mtu as u16).to_be_bytes());
        icmp.extend_from_slice(quoted);
        let sum = packet::ipv4_checksum(&icmp);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(&icmp);
    } else {
        let src = &frame[o + 24..o + 40];
        let dst = &frame[o + 8..o + 24];
        let mut h = vec![0x60, 0, 0, 0, 0, 136, 58, 64];
        h.extend_from_slice(src);
        h.extend_from_slice(dst);
        let mut icmp = vec![2, 0, 0, 0];
        icmp.extend_from_slice(&mtu.max(1280).to_be_bytes());
        icmp.extend_from_slice(quoted);
        let s = Ipv6Addr::from(<[u8; 16]>::try_from(src).unwrap());
        let d = Ipv6Addr::from(<[u8; 16]>::try_from(dst).unwrap());
        let sum = packet::ipv6_transport_checksum(s, d, 58, &icmp);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(&icmp);
    }
    out
}

#[test]
fn a_packet_too_big_for_the_tunnel_gets_fragmentation_needed_or_packet_too_big() {
    require_bpf!();
    let mut c = conf(ENCAP_IPIP);
    c.mtu = 1400;
    let mut lab = Lab::new(c);
    let v4 = lab.vip("tcp/10.50.0.100:80");
    let v6s = lab.vip("tcp/[2001:db8:50::100]:80");
    lab.real(v4, "10.9.0.11", Mode::Tunnel, Some(GW_MAC));
    // An IPv6 VIP over an IPv4 real: the answer is ICMPv6, its MTU the IPv4 tunnel's left.
    lab.real(v6s, "10.9.0.12", Mode::Tunnel, Some(GW_MAC));
    let big4 = Frame::tcp4(c4(1), 51000, VIP4, 80)
        .with_payload(&[7; 1400 - 40])
        .build();
    let big4_tagged = Frame::tcp4(c4(1), 51001, VIP4, 80)
        .with_vlan(0x0064)
        .with_payload(&[7; 1400 - 40])
        .build();
    let big6 = Frame::tcp6(v6("2001:db8:ee::1"), 51000, vip6(), 80)
        .with_payload(&[7; 1400])
        .build();
    for (name, frame, mtu) in [
        ("IPv4 with DF", big4, 1380),
        ("IPv4 with DF, 802.1Q", big4_tagged, 1380),
        ("IPv6", big6, 1380),
    ] {
        let before = lab.global().get(counter::ICMP_TOO_BIG_SENT);
        let (action, out) = lab.run(&frame);
        assert_eq!(action, XDP_TX, "{name}");
        let want = too_big_answer(&frame, mtu);
        assert!(out == want, "{name}:\n{}", packet::hex_diff(&want, &out));
        packet::verify_checksums(&out).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(lab.global().get(counter::ICMP_TOO_BIG_SENT), before + 1);
    }
    // 1380 bytes fit exactly, and pass.
    let fits = Frame::tcp4(c4(2), 51002, VIP4, 80)
        .with_payload(&[7; 1380 - 40])
        .build();
    assert_eq!(lab.run(&fits).0, XDP_TX);
    // Rate-limited per CPU: past the limit within a second, dropped and counted.
    let big = Frame::tcp4(c4(3), 51003, VIP4, 80)
        .with_payload(&[7; 1400])
        .build();
    // The limit is per CPU: this thread stays on one, or the answers would spread over
    // two counters. A second may end during the run and start a fresh count: the run goes on
    // until the limit has been hit (bounded).
    pin_to_one_cpu();
    let limit = lb_common::DEFAULT_ICMP_TOO_BIG_RATE as usize;
    let mut dropped = 0;
    let mut sent = 0;
    while dropped < 10 && sent < 5 * limit {
        if lab.run(&big).0 == XDP_DROP {
            dropped += 1;
        }
        sent += 1;
    }
    assert!(dropped >= 10, "{dropped} dropped of {sent}");
    assert!(lab.global().get(counter::DROP_TOO_BIG_RATE) >= 10);
}

/// Keep the calling thread on the CPU it runs on now.
fn pin_to_one_cpu() {
    // SAFETY: plain libc calls on a zeroed cpu_set_t owned here.
    unsafe {
        let cpu = libc::sched_getcpu().max(0) as usize;
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let rc = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(
            rc,
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
}
