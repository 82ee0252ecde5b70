//! Packet tests of NAT mode's ICMP translation through BPF_PROG_TEST_RUN, both ways, for TCP
//! and UDP over IPv4 and IPv6, quoting the 8 bytes RFC 792 requires and whole packets:
//! - an error to the VIP about the VIP's packet to a client ("fragmentation needed", "packet
//!   too big") reaches the flow's real with the real's address, quoting the real's own packet;
//! - an error about a client's packet to a real (the real's "port unreachable", a router's on
//!   the real's side) reaches the client quoting its packet to the VIP, from the VIP when the
//!   real sent it, routed by the FIB (from another CPU: nothing per-CPU is needed);
//! - errors quoting no NAT real's packet, about the balancer's own connections, or sent to
//!   someone else than the quoted sender are the host's, untouched; a quote too short to
//!   translate is dropped and counted.
//!
//! Every expected frame is built from scratch, checksums (outer, quoted IPv4 header, quoted
//! TCP/UDP, ICMP) computed over the whole of it: an independent check of the incremental
//! updates.

mod common;

#[path = "common/tunnel_lab.rs"]
#[allow(dead_code)]
mod tunnel_lab;

#[path = "common/nat_lab.rs"]
#[allow(dead_code)]
mod nat_lab;

use std::net::{IpAddr, Ipv4Addr};

use lb_common::counter;
use lb_lab::{
    bench::pin_to_cpu,
    packet::{self, icmp_error, DEFAULT_DST_MAC, DEFAULT_TTL},
};
use lb_userspace::model::VipSpec;
use nat_lab::*;
use tunnel_lab::*;

macro_rules! require_bpf {
    () => {
        if !common::bpf_available(module_path!()) {
            return;
        }
    };
}

/// How much of the offending packet an error quotes.
#[derive(Clone, Copy, Debug)]
enum Quote {
    /// Its IP header and the first 8 bytes after it (RFC 792's minimum: ports, and UDP's
    /// checksum, not TCP's).
    Min,
    /// All of it.
    Whole,
    /// Its IP header and 4 bytes: too little to translate.
    Short,
}

/// The first bytes of `frame`'s IP packet, as an error quotes them.
fn quoted(frame: &[u8], q: Quote) -> Vec<u8> {
    let o = packet::l3_offset(frame);
    let ip = &frame[o..];
    let hlen = if ip[0] >> 4 == 4 {
        usize::from(ip[0] & 0x0F) * 4
    } else {
        40
    };
    match q {
        Quote::Min => ip[..hlen + 8].to_vec(),
        Quote::Whole => ip.to_vec(),
        Quote::Short => ip[..hlen + 4].to_vec(),
    }
}

/// "Fragmentation needed" (IPv4) or "packet too big" (IPv6), MTU 1400.
fn too_big(vip: &VipSpec) -> ([u8; 2], u32) {
    if vip.addr.is_ipv4() {
        ([3, 4], 1400)
    } else {
        ([2, 0], 1400)
    }
}

/// "Port unreachable", either family.
fn port_unreachable(vip: &VipSpec) -> ([u8; 2], u32) {
    if vip.addr.is_ipv4() {
        ([3, 3], 0)
    } else {
        ([1, 4], 0)
    }
}

/// A router between the balancer and the clients, and one on the reals' side.
fn router(vip: &VipSpec, reals_side: bool) -> IpAddr {
    match (vip.addr.is_ipv4(), reals_side) {
        (true, false) => ip("203.0.113.1"),
        (false, false) => ip("2001:db8:ff::1"),
        (true, true) => ip("10.60.0.1"),
        (false, true) => ip("2001:db8:60::1"),
    }
}

#[test]
fn errors_to_the_vip_reach_the_real_about_its_own_packet() {
    require_bpf!();
    let NatLab { mut lab, vips } = nat_lab();
    for vip in &vips {
        let mut hit = std::collections::BTreeSet::new();
        for i in 0..12u16 {
            let client = (client_of(vip, 7), 48000 + i);
            let input = frame(vip, client, (vip.addr, vip.port)).build();
            let real = lab.predict_real(vip, &flow_key(&input));
            hit.insert(real);
            assert_eq!(lab.run(&input).0, XDP_TX);
            // The real's reply as it left the balancer, and as the real sent it.
            let sent = frame(vip, (vip.addr, vip.port), client).build();
            let own = frame(vip, (real.ip, real.port_or(vip.port)), client).build();
            let (kind, mtu) = too_big(vip);
            for q in [Quote::Min, Quote::Whole] {
                let from = router(vip, false);
                let err = icmp_error(from, vip.addr, kind, mtu, &quoted(&sent, q)).build();
                let before = lab.global().get(counter::ICMP_ERROR_FORWARDED);
                let (action, out) = lab.run(&err);
                let what = format!("{vip}: {q:?} quote to {real} from {}", client.1);
                assert_eq!(action, XDP_TX, "{what}");
                let want = icmp_error(from, real.ip, kind, mtu, &quoted(&own, q))
                    .with_macs(DEFAULT_DST_MAC, GW_MAC)
                    .build();
                assert_frame(&what, &out, &want);
                assert_eq!(
                    lab.global().get(counter::ICMP_ERROR_FORWARDED),
                    before + 1,
                    "{what}"
                );
            }
        }
        assert_eq!(hit.len(), 3, "{vip}: each real gets its flows' errors");
    }
}

#[test]
fn an_error_to_the_vip_quoting_too_little_is_dropped_and_counted() {
    require_bpf!();
    let NatLab { mut lab, vips } = nat_lab();
    for vip in &vips {
        let client = (client_of(vip, 7), 48100);
        let input = frame(vip, client, (vip.addr, vip.port)).build();
        assert_eq!(lab.run(&input).0, XDP_TX);
        let sent = frame(vip, (vip.addr, vip.port), client).build();
        let (kind, mtu) = too_big(vip);
        let err = icmp_error(
            router(vip, false),
            vip.addr,
            kind,
            mtu,
            &quoted(&sent, Quote::Short),
        )
        .build();
        let before = lab.global().get(counter::DROP_ICMP_NAT);
        assert_eq!(lab.run(&err).0, XDP_DROP, "{vip}");
        assert_eq!(
            lab.global().get(counter::DROP_ICMP_NAT),
            before + 1,
            "{vip}"
        );
    }
}

/// The client's packet as the real got it, and as the client sent it.
fn client_packets(
    lab: &mut Lab,
    vip: &VipSpec,
    client: (IpAddr, u16),
) -> (Vec<u8>, Vec<u8>, IpAddr) {
    let input = frame(vip, client, (vip.addr, vip.port)).build();
    let real = lab.predict_real(vip, &flow_key(&input));
    assert_eq!(lab.run(&input).0, XDP_TX);
    let got = frame(vip, client, (real.ip, real.port_or(vip.port))).build();
    (got, input, real.ip)
}

#[test]
fn errors_about_a_client_s_packet_to_a_real_reach_the_client_about_its_packet_to_the_vip() {
    require_bpf!();
    let ns = Netns::new("icmpfib");
    ns.veth("natc", "natcp");
    ns.exec(&["ip", "addr", "add", "192.0.2.254/24", "dev", "natc"]);
    ns.exec(&[
        "ip",
        "addr",
        "add",
        "2001:db8:ee::fe/64",
        "dev",
        "natc",
        "nodad",
    ]);
    ns.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
    let neigh = [0x02, 0xcc, 0, 0, 0, 0x07];
    for addr in ["192.0.2.7", "2001:db8:ee::7"] {
        ns.exec(&[
            "ip",
            "neigh",
            "replace",
            addr,
            "lladdr",
            "02:cc:00:00:00:07",
            "dev",
            "natc",
            "nud",
            "permanent",
        ]);
    }
    let c_if = ifindex(&ns, "natc");
    let c_mac = mac_of(&ns, "natc");
    let cpus = aya::util::online_cpus().expect("/sys/devices/system/cpu/online");
    let (first, last) = (cpus[0] as usize, *cpus.last().expect("a CPU") as usize);
    inside(&ns, move || {
        let NatLab { mut lab, vips } = nat_lab();
        for vip in &vips {
            for i in 0..6u16 {
                let client = (client_of(vip, 7), 49000 + i);
                pin_to_cpu(first).expect("pin");
                let (got, sent, real) = client_packets(&mut lab, vip, client);
                // Nothing about the flow is per CPU: the error comes in on another.
                pin_to_cpu(last).expect("pin");
                for (from_real, (kind, info)) in
                    [(true, port_unreachable(vip)), (false, too_big(vip))]
                {
                    for q in [Quote::Min, Quote::Whole] {
                        let from = if from_real { real } else { router(vip, true) };
                        let err = icmp_error(from, client.0, kind, info, &quoted(&got, q))
                            .with_macs(GW_MAC, DEFAULT_DST_MAC)
                            .build();
                        let before = lab.global().get(counter::NAT_ICMP_REPLY);
                        let (action, out) = lab.run_on(&err, c_if);
                        let what = format!("{vip}: {q:?} quote from {from} to {}", client.1);
                        assert_eq!(action, XDP_TX, "{what}");
                        // The VIP's instead of the real's address; a router keeps its own.
                        let shown = if from_real { vip.addr } else { from };
                        let want = icmp_error(shown, client.0, kind, info, &quoted(&sent, q))
                            .with_macs(c_mac, neigh)
                            .with_ttl(DEFAULT_TTL - 1)
                            .build();
                        assert_frame(&what, &out, &want);
                        assert_eq!(
                            lab.global().get(counter::NAT_ICMP_REPLY),
                            before + 1,
                            "{what}"
                        );
                    }
                }
            }
        }
        // The host's, untouched: a quote of a packet to no NAT real, an error to someone
        // else than the quoted packet's sender, and one about the balancer's own connection
        // to a real (its health check).
        let vip = vips[0];
        let client = (client_of(&vip, 7), 49100);
        let (got, _, real) = client_packets(&mut lab, &vip, client);
        let stranger = frame(&vip, client, (ip("10.60.0.99"), 8080)).build();
        let own = (IpAddr::V4(Ipv4Addr::new(192, 0, 2, 254)), 49101);
        let check = frame(&vip, own, (real, 8080)).build();
        let (kind, info) = port_unreachable(&vip);
        for (what, err) in [
            (
                "no NAT real",
                icmp_error(real, client.0, kind, info, &quoted(&stranger, Quote::Min)),
            ),
            (
                "another destination",
                icmp_error(
                    real,
                    client_of(&vip, 8),
                    kind,
                    info,
                    &quoted(&got, Quote::Min),
                ),
            ),
            (
                "the balancer's own",
                icmp_error(real, own.0, kind, info, &quoted(&check, Quote::Min)),
            ),
            (
                "too short a quote",
                icmp_error(real, client.0, kind, info, &quoted(&got, Quote::Short)),
            ),
        ] {
            let err = err.build();
            let before = lab.global().get(counter::NAT_ICMP_REPLY);
            let (action, out) = lab.run_on(&err, c_if);
            assert_eq!((action, out == err), (XDP_PASS, true), "{what}");
            assert_eq!(lab.global().get(counter::NAT_ICMP_REPLY), before, "{what}");
        }
    });
}

#[test]
fn errors_to_a_client_the_balancer_cannot_route_are_translated_and_left_to_the_host() {
    require_bpf!();
    // A fresh namespace forwards nothing: the host routes (or refuses) what was translated.
    let ns = Netns::new("icmppass");
    inside(&ns, || {
        let NatLab { mut lab, vips } = nat_lab();
        for vip in &vips {
            let client = (client_of(vip, 9), 49200);
            let (got, sent, real) = client_packets(&mut lab, vip, client);
            let (kind, info) = port_unreachable(vip);
            let err = icmp_error(real, client.0, kind, info, &quoted(&got, Quote::Min)).build();
            let before = lab.global().get(counter::NAT_ICMP_REPLY);
            let (action, out) = lab.run(&err);
            assert_eq!(action, XDP_PASS, "{vip}");
            let want =
                icmp_error(vip.addr, client.0, kind, info, &quoted(&sent, Quote::Min)).build();
            assert_frame(&format!("{vip}"), &out, &want);
            assert_eq!(
                lab.global().get(counter::NAT_ICMP_REPLY),
                before + 1,
                "{vip}"
            );
        }
    });
}
