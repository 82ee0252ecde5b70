//! Packet tests of tunnel mode through BPF_PROG_TEST_RUN: every encapsulation (IPIP, IP6IP6,
//! 6in4, 4in6, each also as GUE) for TCP and UDP, exact output bytes built here independently
//! of the kernel's code (outer header, checksums computed over the whole packet), the outer
//! fields taken from the inner packet and the flow hash, a VIP mixing direct-routing and
//! tunnel reals, an unresolved next hop, the MTU, a missing source, a VLAN tag; and xlb_decap,
//! which must give back the exact original packet of each.

mod common;

#[path = "common/tunnel_lab.rs"]
#[allow(dead_code)]
mod tunnel_lab;

use std::net::Ipv4Addr;

use lb_common::{counter, flow_hash, TunnelConf, ENCAP_GUE, ENCAP_IPIP};
use lb_lab::packet::{self, Frame};
use lb_userspace::{
    core::balancer::Change,
    dataplane::ebpf::decap::Decapsulator,
    model::{Mode, VipSpec},
};
use tunnel_lab::*;

macro_rules! require_bpf {
    () => {
        if !common::bpf_available(module_path!()) {
            return;
        }
    };
}

/// A VIP of each family with three tunnel reals of the given family.
fn lab_with(c: TunnelConf, v4_reals: bool) -> (Lab, VipSpec, VipSpec, VipSpec) {
    let mut lab = Lab::new(c);
    let tcp4 = lab.vip("tcp/10.50.0.100:80");
    let udp4 = lab.vip("udp/10.50.0.100:53");
    let tcp6 = lab.vip("tcp/[2001:db8:50::100]:443");
    let reals: [&str; 3] = if v4_reals {
        ["10.9.0.11", "10.9.0.12", "10.9.0.13"]
    } else {
        ["2001:db8:9::11", "2001:db8:9::12", "2001:db8:9::13"]
    };
    for vip in [tcp4, udp4, tcp6] {
        for r in reals {
            lab.real(vip, r, Mode::Tunnel, Some(GW_MAC));
        }
    }
    (lab, tcp4, udp4, tcp6)
}

fn frames() -> Vec<(&'static str, usize, Vec<u8>)> {
    let vip6 = v6("2001:db8:50::100");
    let client6 = v6("2001:db8:ee::1");
    let mut out = Vec::new();
    for i in 0..8u32 {
        let sport = 40000 + i as u16;
        out.push((
            "tcp4",
            0,
            Frame::tcp4(c4(i), sport, Ipv4Addr::new(10, 50, 0, 100), 80)
                .with_payload(&[0x5a; 64])
                .build(),
        ));
        out.push((
            "udp4",
            1,
            Frame::udp4(c4(i), sport, Ipv4Addr::new(10, 50, 0, 100), 53)
                .with_payload(b"query")
                .build(),
        ));
        out.push((
            "tcp6",
            2,
            Frame::tcp6(client6, sport, vip6, 443)
                .with_payload(&[7; 10])
                .build(),
        ));
    }
    out
}

#[test]
fn every_encapsulation_is_exact_for_tcp_and_udp_over_both_families() {
    require_bpf!();
    for (encap, name) in [(ENCAP_IPIP, "ipip"), (ENCAP_GUE, "gue")] {
        for v4_reals in [true, false] {
            let c = conf(encap);
            let (mut lab, tcp4, udp4, tcp6) = lab_with(c, v4_reals);
            let vips = [tcp4, udp4, tcp6];
            for (kind, v, frame) in frames() {
                let what = format!("{name} {kind} to IPv{} reals", if v4_reals { 4 } else { 6 });
                expect_encap(&mut lab, &what, &vips[v], &frame, &c);
                // The flow is tracked now: its next packet takes the same outer fields from
                // the connection table (no hash computed).
                expect_encap(&mut lab, &format!("{what}, tracked"), &vips[v], &frame, &c);
            }
        }
    }
}

#[test]
fn dscp_ecn_and_ttl_are_copied_and_a_vlan_tag_is_kept() {
    require_bpf!();
    for v4_reals in [true, false] {
        let c = conf(ENCAP_IPIP);
        let (mut lab, tcp4, _, tcp6) = lab_with(c, v4_reals);
        // DSCP EF (46) with ECT(1), and CE.
        for tos in [0xB9u8, 0x03] {
            let f4 = Frame::tcp4(c4(1), 41000, Ipv4Addr::new(10, 50, 0, 100), 80)
                .with_ttl(17)
                .build();
            let f4 = with_tos(f4, tos);
            assert_eq!(f4[15], tos);
            expect_encap(&mut lab, &format!("tos {tos:#x} v4"), &tcp4, &f4, &c);
            let f6 = Frame::tcp6(v6("2001:db8:ee::2"), 41000, v6("2001:db8:50::100"), 443)
                .with_ttl(9)
                .build();
            expect_encap(
                &mut lab,
                &format!("tos {tos:#x} v6"),
                &tcp6,
                &with_tos(f6, tos),
                &c,
            );
        }
        let tagged = Frame::tcp4(c4(3), 41001, Ipv4Addr::new(10, 50, 0, 100), 80)
            .with_vlan(0x2064)
            .build();
        expect_encap(&mut lab, "802.1Q", &tcp4, &tagged, &c);
    }
}

#[test]
fn one_vip_mixes_direct_routing_and_tunnel_reals() {
    require_bpf!();
    let c = conf(ENCAP_IPIP);
    let mut lab = Lab::new(c);
    let vip = lab.vip("tcp/10.50.0.100:80");
    let dr_mac = [0x02, 0xaa, 0, 0, 0, 0x11];
    lab.real(vip, "10.50.0.11", Mode::Dr, Some(dr_mac));
    lab.real(vip, "10.9.0.12", Mode::Tunnel, Some(GW_MAC));
    lab.real(vip, "2001:db8:9::13", Mode::Tunnel, Some(GW_MAC));
    let mut seen = [0; 3];
    for i in 0..64 {
        let frame = Frame::tcp4(c4(i), 42000, Ipv4Addr::new(10, 50, 0, 100), 80).build();
        let real = lab.predict(&vip, &frame);
        if real == ip("10.50.0.11") {
            let (action, out) = lab.run(&frame);
            let mut want = frame.clone();
            packet::set_src_mac(&mut want, packet::dst_mac(&frame));
            packet::set_dst_mac(&mut want, dr_mac);
            assert_eq!(action, XDP_TX);
            assert!(out == want, "DR:\n{}", packet::hex_diff(&want, &out));
            seen[0] += 1;
        } else {
            expect_encap(&mut lab, "tunnel", &vip, &frame, &c);
            seen[if real.is_ipv4() { 1 } else { 2 }] += 1;
        }
    }
    assert!(
        seen.iter().all(|n| *n > 0),
        "every real took flows: {seen:?}"
    );
    let snap = lab.bal.snapshot();
    let modes: Vec<Mode> = snap.vips[0]
        .reals
        .iter()
        .map(|r| r.effective_mode)
        .collect();
    assert_eq!(modes, vec![Mode::Tunnel, Mode::Dr, Mode::Tunnel]);
}

#[test]
fn a_direct_routing_real_of_another_family_is_refused_and_a_tunnel_one_is_not() {
    require_bpf!();
    let mut lab = Lab::new(conf(ENCAP_IPIP));
    let vip = lab.vip("tcp/10.50.0.100:80");
    let e = lab
        .bal
        .add_real(vip, ip("2001:db8:9::11"), 1, Some(GW_MAC))
        .expect_err("DR across families");
    assert!(e.to_string().contains("different address families"), "{e}");
    lab.real(vip, "2001:db8:9::11", Mode::Tunnel, Some(GW_MAC));
    // Back to direct routing is refused as a whole: the real keeps its tunnel.
    let e = lab
        .bal
        .apply(vec![Change::SetMode {
            vip,
            real: Some(ip("2001:db8:9::11").into()),
            mode: None,
        }])
        .expect_err("DR across families");
    assert!(e.to_string().contains("different address families"), "{e}");
    assert_eq!(
        lab.bal.snapshot().vips[0].reals[0].effective_mode,
        Mode::Tunnel
    );
}

#[test]
fn an_unresolved_next_hop_takes_no_new_flow_and_its_tracked_flows_go_to_the_host_encapsulated() {
    require_bpf!();
    let c = conf(ENCAP_IPIP);
    let mut lab = Lab::new(c);
    let vip = lab.vip("tcp/10.50.0.100:80");
    lab.real(vip, "10.9.0.11", Mode::Tunnel, Some(GW_MAC));
    let frame = Frame::tcp4(c4(1), 43000, Ipv4Addr::new(10, 50, 0, 100), 80).build();
    expect_encap(&mut lab, "resolved", &vip, &frame, &c);
    lab.bal
        .apply(vec![Change::SetMac {
            vip: None,
            addr: ip("10.9.0.11"),
            mac: None,
        }])
        .expect("unresolve");
    let before = lab.global();
    let (action, out) = lab.run(&frame);
    assert_eq!(
        action, XDP_PASS,
        "the tracked flow goes to the host's stack"
    );
    // Still addressed to us (the host routes it), never as the bare VIP packet.
    let mut want = encapsulated(&frame, ip("10.9.0.11"), &c, packet::dst_mac(&frame));
    packet::set_src_mac(&mut want, packet::src_mac(&frame));
    assert!(out == want, "{}", packet::hex_diff(&want, &out));
    let after = lab.global();
    assert_eq!(
        after.get(counter::PASS_NEXT_HOP),
        before.get(counter::PASS_NEXT_HOP) + 1
    );
    // A new flow finds no real: the ring is empty.
    let new = Frame::tcp4(c4(2), 43000, Ipv4Addr::new(10, 50, 0, 100), 80).build();
    let (action, _) = lab.run(&new);
    assert_eq!(action, XDP_DROP);
    assert_eq!(
        lab.global().get(counter::DROP_NO_REAL),
        after.get(counter::DROP_NO_REAL) + 1
    );
}

#[test]
fn too_big_for_the_mtu_and_no_source_of_the_family_are_dropped_and_counted() {
    require_bpf!();
    let mut c = conf(ENCAP_IPIP);
    c.mtu = 120;
    c.src6 = [0; 16];
    let (mut lab, tcp4, _, _) = lab_with(c, true);
    let vip4 = Ipv4Addr::new(10, 50, 0, 100);
    // 20 + 20 + 80 = 120 inner bytes: 140 with the outer header.
    // Without DF: it may be fragmented, which XDP cannot do (with DF it gets an ICMP answer).
    let big = Frame::tcp4(c4(1), 44000, vip4, 80)
        .with_ipv4_frag(0, 0)
        .with_payload(&[1; 80])
        .build();
    expect_drop(&mut lab, "no DF", &big, counter::DROP_TOO_BIG);
    // 100 inner bytes fit exactly.
    let fits = Frame::tcp4(c4(1), 44001, vip4, 80)
        .with_payload(&[1; 60])
        .build();
    expect_encap(&mut lab, "exactly the MTU", &tcp4, &fits, &c);

    let mut lab = Lab::new(c);
    let vip = lab.vip("tcp/10.50.0.100:80");
    lab.real(vip, "2001:db8:9::11", Mode::Tunnel, Some(GW_MAC));
    let frame = Frame::tcp4(c4(1), 44002, vip4, 80).build();
    let before = lab.global();
    let (action, _) = lab.run(&frame);
    assert_eq!(action, XDP_DROP);
    assert_eq!(
        lab.global().get(counter::DROP_NO_TUNNEL_SOURCE),
        before.get(counter::DROP_NO_TUNNEL_SOURCE) + 1
    );
}

#[test]
fn a_source_prefix_puts_flow_hash_bits_in_the_outer_source() {
    require_bpf!();
    let mut c = conf(ENCAP_IPIP);
    c.src4 = [10, 1, 7, 0];
    c.src4_hash_mask = u32::from_ne_bytes([0, 0, 0, 0xff]);
    let (mut lab, tcp4, _, _) = lab_with(c, true);
    let mut sources = std::collections::BTreeSet::new();
    for i in 0..32 {
        let frame = Frame::tcp4(c4(i), 45000, Ipv4Addr::new(10, 50, 0, 100), 80).build();
        let (action, out) = lab.run(&frame);
        assert_eq!(action, XDP_TX);
        let hash16 = flow_hash(&flow_key(&frame), 0) & 0xFFFF;
        let src: [u8; 4] = out[26..30].try_into().unwrap();
        assert_eq!(src, [10, 1, 7, hash16 as u8], "the hash's low byte");
        let mut fixed = c;
        fixed.src4 = src;
        fixed.src4_hash_mask = 0;
        let real = lab.predict(&tcp4, &frame);
        let want = encapsulated(&frame, real, &fixed, GW_MAC);
        assert!(out == want, "{}", packet::hex_diff(&want, &out));
        sources.insert(src);
    }
    assert!(
        sources.len() > 16,
        "flows spread over the prefix: {sources:?}"
    );
}

// ---- xlb_decap --------------------------------------------------------------------------

fn decap_counter(d: &Decapsulator, name: &str) -> u64 {
    d.counters()
        .expect("counters")
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
        .expect("counter")
}

#[test]
fn decap_restores_the_exact_original_packet_of_every_encapsulation() {
    require_bpf!();
    let locals = [ip("10.9.0.11"), ip("2001:db8:9::11")];
    let mut d = Decapsulator::load(&locals, &[], GUE_PORT).expect("load xlb_decap");
    let mut n = 0;
    for encap in [ENCAP_IPIP, ENCAP_GUE] {
        let c = conf(encap);
        for real in locals {
            for (kind, _, frame) in frames() {
                let tagged = Frame::tcp4(c4(9), 46000, Ipv4Addr::new(10, 50, 0, 100), 80)
                    .with_vlan(0x0064)
                    .build();
                for f in [frame.clone(), tagged] {
                    let outer = encapsulated(&f, real, &c, GW_MAC);
                    let (action, out) = d.test_run(&outer).expect("run");
                    // The inner frame as it was, with the outer frame's MACs.
                    let mut want = f.clone();
                    want[..12].copy_from_slice(&outer[..12]);
                    assert_eq!(action, XDP_PASS, "{kind} to {real}");
                    assert!(
                        out == want,
                        "{kind} to {real} (encap {encap}):\n{}",
                        packet::hex_diff(&want, &out)
                    );
                    n += 1;
                }
            }
        }
    }
    assert_eq!(decap_counter(&d, "decapsulated"), n);
}

#[test]
fn decap_leaves_what_is_not_its_own_and_combines_ecn() {
    require_bpf!();
    let local = ip("10.9.0.11");
    let vip = ip("10.50.0.100");
    let c = conf(ENCAP_IPIP);
    let mut d = Decapsulator::load(&[local], &[vip], GUE_PORT).expect("load xlb_decap");
    let inner = Frame::tcp4(c4(1), 47000, Ipv4Addr::new(10, 50, 0, 100), 80).build();
    let untouched = |d: &mut Decapsulator, frame: &[u8], action: u32, what: &str| {
        let (got, out) = d.test_run(frame).expect("run");
        assert_eq!(got, action, "{what}");
        assert!(out == frame, "{what}: changed");
    };
    // Plain traffic: untouched, not counted.
    untouched(&mut d, &inner, XDP_PASS, "no tunnel packet");
    let before = d.counters().expect("counters");
    assert!(before.iter().all(|(_, v)| *v == 0), "{before:?}");
    // To another host's address.
    let other = encapsulated(&inner, ip("10.9.0.12"), &c, GW_MAC);
    untouched(&mut d, &other, XDP_PASS, "not local");
    assert_eq!(decap_counter(&d, "pass_not_local"), 1);
    // An inner destination that is not a listed VIP.
    let elsewhere = Frame::tcp4(c4(1), 47000, Ipv4Addr::new(10, 50, 0, 101), 80).build();
    untouched(
        &mut d,
        &encapsulated(&elsewhere, local, &c, GW_MAC),
        XDP_PASS,
        "not a VIP",
    );
    assert_eq!(decap_counter(&d, "pass_not_vip"), 1);
    // GUE to the port with something else than an IP packet (a GUE variant 0 header).
    let mut gue = encapsulated(&inner, local, &conf(ENCAP_GUE), GW_MAC);
    gue[14 + 20 + 8] = 0x00;
    untouched(&mut d, &gue, XDP_PASS, "GUE variant 0");
    assert_eq!(decap_counter(&d, "pass_malformed"), 1);
    // An outer header cut short of the inner one.
    let full = encapsulated(&inner, local, &c, GW_MAC);
    let mut cut = full[..14 + 20 + 10].to_vec();
    cut[16..18].copy_from_slice(&30u16.to_be_bytes());
    untouched(&mut d, &cut, XDP_PASS, "inner header truncated");
    assert_eq!(decap_counter(&d, "pass_malformed"), 2);

    // Outer CE over an ECN-capable inner packet: the mark is kept, the checksum right.
    let ect = with_tos(inner.clone(), 0x02);
    let mut marked = encapsulated(&ect, local, &c, GW_MAC);
    marked[15] |= 0x03;
    marked[24..26].fill(0);
    let sum = packet::ipv4_checksum(&marked[14..34]);
    marked[24..26].copy_from_slice(&sum.to_be_bytes());
    let (action, out) = d.test_run(&marked).expect("run");
    assert_eq!(action, XDP_PASS);
    let mut want = with_tos(inner.clone(), 0x03);
    want[..12].copy_from_slice(&marked[..12]);
    assert!(out == want, "{}", packet::hex_diff(&want, &out));
    packet::verify_checksums(&out).expect("inner checksums");
    // ...and over one that is not ECN-capable: dropped.
    let mut not_ect = encapsulated(&inner, local, &c, GW_MAC);
    not_ect[15] |= 0x03;
    let (action, _) = d.test_run(&not_ect).expect("run");
    assert_eq!(action, XDP_DROP);
    assert_eq!(decap_counter(&d, "drop_ecn"), 1);
}
