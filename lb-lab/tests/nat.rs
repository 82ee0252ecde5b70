//! Packet tests of NAT mode through BPF_PROG_TEST_RUN: the forward rewrite (destination
//! address and port) and the reply's (source address and port) for TCP and UDP over IPv4 and
//! IPv6, each compared with the frame built from scratch by the test's packet builder (whose
//! checksums are computed over the whole packet: an independent check of the kernel's
//! incremental updates); a zero UDP checksum over IPv4; replies routed by the FIB (out of the
//! interface they came in by, or redirected to another) and left to the host where it cannot
//! route them; replies from addresses or ports that are no NAT real's; fragments; the real's
//! FIN closing the flow from another CPU than the one that tracked it.

mod common;

#[path = "common/tunnel_lab.rs"]
#[allow(dead_code)]
mod tunnel_lab;

#[path = "common/nat_lab.rs"]
#[allow(dead_code)]
mod nat_lab;

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    process::Command,
};

use lb_common::counter;
use lb_lab::{
    bench::pin_to_cpu,
    packet::{self, Frame, DEFAULT_DST_MAC, DEFAULT_TTL, TCP_ACK, TCP_FIN},
};
use lb_userspace::{
    core::balancer::Change,
    dataplane::Dataplane,
    model::{map_addr, Egress, RealAddr, VipSpec},
};
use nat_lab::*;
use tunnel_lab::*;

macro_rules! require_bpf {
    () => {
        if !common::bpf_available(module_path!()) {
            return;
        }
    };
}

#[test]
fn forward_rewrites_the_destination_to_the_real_and_its_port() {
    require_bpf!();
    let NatLab { mut lab, vips } = nat_lab();
    for vip in &vips {
        let mut hit = std::collections::BTreeSet::new();
        for i in 0..24u16 {
            let client = (client_of(vip, 7), 40000 + i);
            let input = frame(vip, client, (vip.addr, vip.port)).build();
            let real = lab.predict_real(vip, &flow_key(&input));
            hit.insert(real);
            let (action, out) = lab.run(&input);
            assert_eq!(action, XDP_TX, "{vip} from port {}", client.1);
            // Built from scratch: every checksum computed over the rewritten packet.
            let want = frame(vip, client, (real.ip, real.port_or(vip.port)))
                .with_macs(DEFAULT_DST_MAC, GW_MAC)
                .build();
            assert_frame(&format!("{vip} to {real}"), &out, &want);
        }
        assert_eq!(
            hit.len(),
            3,
            "{vip}: every real (with and without a port) is used"
        );
    }
}

#[test]
fn a_udp_datagram_without_a_checksum_over_ipv4_keeps_none() {
    require_bpf!();
    // In a namespace that forwards nothing: the reply is rewritten and passed, its MACs and
    // TTL as they came.
    let ns = Netns::new("zero");
    inside(&ns, zero_checksum);
}

fn zero_checksum() {
    let NatLab { mut lab, vips } = nat_lab();
    let vip = vips[1];
    let zero = |mut f: Vec<u8>| {
        let at = 14 + 20 + 6;
        f[at..at + 2].fill(0);
        f
    };
    for i in 0..8u16 {
        let client = (client_of(&vip, 9), 41000 + i);
        let input = zero(frame(&vip, client, (vip.addr, vip.port)).build());
        let real = lab.predict_real(&vip, &flow_key(&input));
        let (action, out) = lab.run(&input);
        assert_eq!(action, XDP_TX);
        let want = zero(
            frame(&vip, client, (real.ip, real.port_or(vip.port)))
                .with_macs(DEFAULT_DST_MAC, GW_MAC)
                .build(),
        );
        assert!(out == want, "{}", packet::hex_diff(&want, &out));
        // And the reply's stays none too.
        let reply = zero(frame(&vip, (real.ip, real.port_or(vip.port)), client).build());
        let (_, out) = lab.run(&reply);
        let want = zero(frame(&vip, (vip.addr, vip.port), client).build());
        assert!(out == want, "reply: {}", packet::hex_diff(&want, &out));
    }
}

#[test]
fn replies_are_rewritten_to_the_vip_and_left_to_the_host_when_it_cannot_route() {
    require_bpf!();
    // A fresh namespace forwards nothing: no FIB answer, every reply is the host's to route.
    let ns = Netns::new("pass");
    inside(&ns, || {
        let NatLab { mut lab, vips } = nat_lab();
        for vip in &vips {
            for i in 0..12u16 {
                let client = (client_of(vip, 7), 42000 + i);
                let input = frame(vip, client, (vip.addr, vip.port)).build();
                let real = lab.predict_real(vip, &flow_key(&input));
                assert_eq!(lab.run(&input).0, XDP_TX);
                let reply = frame(vip, (real.ip, real.port_or(vip.port)), client).build();
                let before = lab.global().get(counter::PASS_NAT_REPLY);
                let (action, out) = lab.run(&reply);
                assert_eq!(action, XDP_PASS, "{vip} reply from {real}");
                let want = frame(vip, (vip.addr, vip.port), client).build();
                assert_frame(&format!("{vip} reply from {real}"), &out, &want);
                assert_eq!(lab.global().get(counter::PASS_NAT_REPLY), before + 1);
            }
        }
    });
}

#[test]
fn replies_are_routed_by_the_fib_out_of_either_interface() {
    require_bpf!();
    let ns = Netns::new("fib");
    // Clients on two links: 192.0.2.0/24 and 2001:db8:ee::/64 on `natc` (where the replies
    // come in), 198.51.100.0/24 on `natd` (another interface: a redirect).
    ns.veth("natc", "natcp");
    ns.veth("natd", "natdp");
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
    ns.exec(&["ip", "addr", "add", "198.51.100.254/24", "dev", "natd"]);
    ns.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
    let neigh = [0x02, 0xcc, 0, 0, 0, 0x07];
    for (addr, dev) in [
        ("192.0.2.7", "natc"),
        ("2001:db8:ee::7", "natc"),
        ("198.51.100.7", "natd"),
    ] {
        ns.exec(&[
            "ip",
            "neigh",
            "replace",
            addr,
            "lladdr",
            "02:cc:00:00:00:07",
            "dev",
            dev,
            "nud",
            "permanent",
        ]);
    }
    let c_if = ifindex(&ns, "natc");
    let (c_mac, d_mac) = (mac_of(&ns, "natc"), mac_of(&ns, "natd"));
    inside(&ns, move || {
        let NatLab { mut lab, vips } = nat_lab();
        let cases = [
            (vips[0], IpAddr::V4(c4(7)), XDP_TX, c_mac),
            (vips[1], IpAddr::V4(c4(7)), XDP_TX, c_mac),
            (vips[2], IpAddr::V6(client6(7)), XDP_TX, c_mac),
            (vips[3], IpAddr::V6(client6(7)), XDP_TX, c_mac),
            (
                vips[0],
                IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7)),
                XDP_REDIRECT,
                d_mac,
            ),
        ];
        for (vip, client_ip, want_action, out_mac) in cases {
            let client = (client_ip, 43000);
            let input = frame(&vip, client, (vip.addr, vip.port)).build();
            let real = lab.predict_real(&vip, &flow_key(&input));
            assert_eq!(lab.run(&input).0, XDP_TX);
            let reply = frame(&vip, (real.ip, real.port_or(vip.port)), client)
                .with_macs(GW_MAC, DEFAULT_DST_MAC)
                .build();
            let before = lab.global().get(counter::NAT_REPLY);
            let (action, out) = lab.run_on(&reply, c_if);
            let what = format!("{vip} reply from {real} to {client_ip}");
            assert_eq!(action, want_action, "{what}");
            // Routed: to the neighbour's MAC from the outgoing interface's, one hop less.
            let want = frame(&vip, (vip.addr, vip.port), client)
                .with_macs(out_mac, neigh)
                .with_ttl(DEFAULT_TTL - 1)
                .build();
            assert_frame(&what, &out, &want);
            assert_eq!(lab.global().get(counter::NAT_REPLY), before + 1, "{what}");
        }
        // To the balancer's own address (its health check's answer): the host's, untouched.
        let vip = vips[0];
        let own = (IpAddr::V4(Ipv4Addr::new(192, 0, 2, 254)), 43002);
        let real: RealAddr = "10.60.0.11:8080".parse().expect("real");
        let answer = frame(&vip, (real.ip, 8080), own).build();
        let (action, out) = lab.run_on(&answer, c_if);
        assert_eq!(
            (action, out == answer),
            (XDP_PASS, true),
            "to the balancer itself"
        );
        // A TTL about to expire is the host's (it sends time exceeded).
        let vip = vips[0];
        let client = (IpAddr::V4(c4(7)), 43001);
        let input = frame(&vip, client, (vip.addr, vip.port)).build();
        let real = lab.predict_real(&vip, &flow_key(&input));
        lab.run(&input);
        let reply = frame(&vip, (real.ip, real.port_or(vip.port)), client)
            .with_ttl(1)
            .build();
        let (action, out) = lab.run_on(&reply, c_if);
        assert_eq!(action, XDP_PASS);
        let want = frame(&vip, (vip.addr, vip.port), client)
            .with_ttl(1)
            .build();
        assert_frame("TTL 1", &out, &want);
    });
}

#[test]
fn packets_from_others_than_nat_reals_are_passed_untouched() {
    require_bpf!();
    let NatLab { mut lab, vips } = nat_lab();
    let vip = vips[0];
    let client = (IpAddr::V4(c4(7)), 44000);
    for (src, why) in [
        (
            (IpAddr::V4(Ipv4Addr::new(10, 60, 0, 99)), 8080),
            "an address that is no real's",
        ),
        (
            (IpAddr::V4(Ipv4Addr::new(10, 60, 0, 11)), 9999),
            "a port the real serves nothing on",
        ),
        (
            (IpAddr::V4(Ipv4Addr::new(10, 60, 0, 11)), 80),
            "the VIP's port, not the real's",
        ),
    ] {
        let f = frame(&vip, src, client).build();
        let before = lab.global();
        let (action, out) = lab.run(&f);
        assert_eq!(action, XDP_PASS, "{why}");
        assert!(out == f, "{why}: changed\n{}", packet::hex_diff(&f, &out));
        let after = lab.global();
        for c in [counter::NAT_REPLY, counter::PASS_NAT_REPLY] {
            assert_eq!(after.get(c), before.get(c), "{why}");
        }
    }
    // UDP from a real that serves TCP on that port: another service.
    let f = Frame::udp4(Ipv4Addr::new(10, 60, 0, 11), 8080, c4(7), 44000).build();
    let (action, out) = lab.run(&f);
    assert_eq!(
        (action, out == f),
        (XDP_PASS, true),
        "UDP from a TCP service's port"
    );
}

#[test]
fn fragments_from_a_nat_real_are_dropped_and_others_passed() {
    require_bpf!();
    let NatLab { mut lab, .. } = nat_lab();
    let frag = |src: Ipv4Addr| {
        Frame::udp4(src, 5353, c4(7), 45000)
            .with_payload(&[0x11; 64])
            .with_ipv4_frag(packet::IPV4_MF, 7)
            .build()
    };
    let before = lab.global().get(counter::DROP_NAT_FRAGMENT);
    assert_eq!(lab.run(&frag(Ipv4Addr::new(10, 60, 0, 12))).0, XDP_DROP);
    assert_eq!(lab.global().get(counter::DROP_NAT_FRAGMENT), before + 1);
    let other = frag(Ipv4Addr::new(10, 60, 0, 99));
    let (action, out) = lab.run(&other);
    assert_eq!((action, out == other), (XDP_PASS, true));
    let f6 = Frame::udp6(v6("2001:db8:60::11"), 5353, client6(7), 45000)
        .with_payload(&[0x11; 64])
        .with_ext(packet::Ext::Fragment {
            offset: 0,
            more: true,
            id: 9,
        })
        .build();
    assert_eq!(lab.run(&f6).0, XDP_DROP);
    assert_eq!(lab.global().get(counter::DROP_NAT_FRAGMENT), before + 2);
}

#[test]
fn the_real_s_fin_closes_the_flow_from_another_cpu() {
    require_bpf!();
    let cpus = aya::util::online_cpus().expect("/sys/devices/system/cpu/online");
    let (first, last) = (cpus[0] as usize, *cpus.last().expect("a CPU") as usize);
    let NatLab { mut lab, vips } = nat_lab();
    for vip in [vips[0], vips[2]] {
        let client = (client_of(&vip, 8), 46000);
        let vip_id = lab.bal.vip_id(&vip).expect("vip id");
        pin_to_cpu(first).expect("pin");
        let syn = frame(&vip, client, (vip.addr, vip.port))
            .with_tcp_flags(packet::TCP_SYN)
            .build();
        let key = flow_key(&syn);
        let real = lab.predict_real(&vip, &key);
        assert_eq!(lab.run(&syn).0, XDP_TX);
        let ack = frame(&vip, client, (vip.addr, vip.port))
            .with_tcp_flags(TCP_ACK)
            .build();
        assert_eq!(lab.run(&ack).0, XDP_TX);
        let tracked = |lab: &Lab| {
            lab.bal
                .dataplane()
                .conntrack_get(&key, vip_id)
                .expect("lookup")
                .expect("tracked")
        };
        assert_eq!(
            tracked(&lab).flags & lb_common::CT_F_CLOSING,
            0,
            "{vip}: established"
        );
        pin_to_cpu(last).expect("pin");
        let fin = frame(&vip, (real.ip, real.port_or(vip.port)), client)
            .with_tcp_flags(TCP_FIN | TCP_ACK)
            .build();
        lab.run(&fin);
        let v = tracked(&lab);
        assert_ne!(
            v.flags & lb_common::CT_F_CLOSING,
            0,
            "{vip}: the real's FIN closes it"
        );
        assert_eq!(
            lab.bal.real_id(&vip, real),
            Some(v.real_id),
            "{vip}: the flow's own real"
        );
    }
}

/// Scapy recomputes every checksum of the rewritten frames (IPv4 header, TCP, UDP over both
/// families) and must find the ones the kernel left.
#[test]
fn the_rewritten_checksums_agree_with_scapy() {
    require_bpf!();
    let ns = Netns::new("scapy");
    let frames = inside(&ns, || {
        let NatLab { mut lab, vips } = nat_lab();
        let mut out = Vec::new();
        for vip in &vips {
            let client = (client_of(vip, 5), 47000);
            let input = frame(vip, client, (vip.addr, vip.port)).build();
            let real = lab.predict_real(vip, &flow_key(&input));
            let (_, fwd) = lab.run(&input);
            let reply = frame(vip, (real.ip, real.port_or(vip.port)), client).build();
            let (_, back) = lab.run(&reply);
            out.push(fwd);
            out.push(back);
        }
        out
    });
    let script = r#"
import sys
from scapy.all import Ether, IP, TCP, UDP, IPv6
bad = []
lines = sys.stdin.read().split()
for line in lines:
    p = Ether(bytes.fromhex(line))
    q = p.copy()
    for layer in (IP, TCP, UDP):
        if q.haslayer(layer):
            del q[layer].chksum
    q = Ether(bytes(q))
    for layer in (IP, TCP, UDP):
        if p.haslayer(layer) and p[layer].chksum != q[layer].chksum:
            bad.append("%s %s: %#x, scapy %#x" % (line[:40], layer.__name__, p[layer].chksum, q[layer].chksum))
print("\n".join(bad) if bad else "ok %d" % len(lines))
"#;
    let hex: Vec<String> = frames
        .iter()
        .map(|f| f.iter().map(|b| format!("{b:02x}")).collect())
        .collect();
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 with scapy (Debian python3-scapy)");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(hex.join("\n").as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("scapy");
    let text = String::from_utf8_lossy(&out.stdout);
    let want = format!("ok {}", frames.len());
    assert!(out.status.success() && text.trim() == want, "scapy: {text}");
}

/// A daemon serving several interfaces names each NAT real's interface, the one VIP traffic
/// comes in by too: a packet that came in by the real's interface goes back out of it
/// (`XDP_TX`), one that came in by another is redirected there, whichever `--iface` came first.
#[test]
fn a_real_behind_the_interface_a_packet_came_in_by_is_sent_back_out_of_it() {
    require_bpf!();
    let ns = Netns::new("egress");
    ns.veth("nate", "natep");
    let (e_if, e_mac) = (ifindex(&ns, "nate"), mac_of(&ns, "nate"));
    inside(&ns, move || {
        let NatLab { mut lab, vips } = nat_lab();
        let vip = vips[0];
        for r in ["10.60.0.11", "10.60.0.12", "10.60.0.13"] {
            lab.bal
                .apply(vec![Change::SetEgress {
                    vip: None,
                    addr: ip(r),
                    egress: Some(Egress {
                        ifindex: e_if,
                        mac: e_mac,
                        mtu: 1500,
                    }),
                }])
                .expect("egress");
        }
        for i in 0..6u16 {
            let client = (client_of(&vip, 7), 45000 + i);
            let input = frame(&vip, client, (vip.addr, vip.port)).build();
            let real = lab.predict_real(&vip, &flow_key(&input));
            let to_real = frame(&vip, client, (real.ip, real.port_or(vip.port)));
            let (action, out) = lab.run_on(&input, e_if);
            assert_eq!(action, XDP_TX, "in by the real's interface");
            let want = to_real.clone().with_macs(DEFAULT_DST_MAC, GW_MAC).build();
            assert_frame("back out of it", &out, &want);
            // In by the loopback: out of the real's interface, from its MAC.
            let (action, out) = lab.run_on(&input, 1);
            assert_eq!(action, XDP_REDIRECT, "in by another interface");
            assert_frame(
                "redirected",
                &out,
                &to_real.with_macs(e_mac, GW_MAC).build(),
            );
        }
    });
}

/// The bits set in the kernel's `NAT_FILTER`.
fn nat_filter_bits(lab: &Lab) -> BTreeSet<u32> {
    common::filter_bits(&lab.bal.dataplane().nat_filter().expect("read NAT_FILTER"))
}

fn bits_of(addrs: &[&str]) -> BTreeSet<u32> {
    addrs
        .iter()
        .map(|a| lb_common::vip_filter_bit_of(&map_addr(ip(a))))
        .collect()
}

/// Whether a reply from `real` to a client of `vip` is rewritten to come from the VIP (else it
/// must pass untouched and uncounted).
fn reply_rewritten(lab: &mut Lab, vip: &VipSpec, real: (&str, u16)) -> bool {
    let client = (client_of(vip, 3), 47000);
    let reply = frame(vip, (ip(real.0), real.1), client).build();
    let before = lab.global();
    let (action, out) = lab.run(&reply);
    assert_eq!(action, XDP_PASS, "reply from {real:?}");
    if out == reply {
        assert_eq!(
            lab.global(),
            before,
            "an untouched reply from {real:?} counted"
        );
        return false;
    }
    let want = frame(vip, (vip.addr, vip.port), client).build();
    assert_frame(&format!("{vip} reply from {real:?}"), &out, &want);
    true
}

#[test]
fn the_nat_filter_holds_every_nat_real_address_through_adds_and_deletes() {
    require_bpf!();
    // A namespace that forwards nothing: rewritten replies are passed to its host.
    let ns = Netns::new("filter");
    inside(&ns, || {
        let NatLab { mut lab, vips } = nat_lab();
        let (tcp4, udp4, tcp6) = (vips[0], vips[1], vips[2]);
        let all = [
            "10.60.0.11",
            "10.60.0.12",
            "10.60.0.13",
            "2001:db8:60::11",
            "2001:db8:60::12",
            "2001:db8:60::13",
        ];
        assert_eq!(nat_filter_bits(&lab), bits_of(&all));
        assert!(reply_rewritten(&mut lab, &tcp4, ("10.60.0.11", 8080)));
        assert!(reply_rewritten(&mut lab, &tcp6, ("2001:db8:60::12", 8080)));

        // An address sharing 10.60.0.12's bit: removing its real must not hide .12's replies.
        let bit12 = lb_common::vip_filter_bit_of(&map_addr(ip("10.60.0.12")));
        let twin = (1..=u32::MAX)
            .map(|i| Ipv4Addr::from(0x0A3D_0000u32 + i))
            .find(|x| lb_common::vip_filter_bit_of(&map_addr(IpAddr::V4(*x))) == bit12)
            .expect("a colliding address");
        let twin_real = format!("{twin}:8080");
        nat_real(&mut lab, tcp4, &twin_real);
        assert_eq!(nat_filter_bits(&lab), bits_of(&all), "{twin} adds no bit");
        let del = |lab: &mut Lab, vip: VipSpec, real: &str| {
            lab.bal
                .apply(vec![Change::DelReal {
                    vip,
                    addr: real.parse().expect("real"),
                }])
                .unwrap_or_else(|e| panic!("del {real}: {e}"));
        };
        del(&mut lab, tcp4, &twin_real);
        assert_eq!(
            nat_filter_bits(&lab),
            bits_of(&all),
            ".12 still has its bit"
        );
        assert!(reply_rewritten(&mut lab, &tcp4, ("10.60.0.12", 8080)));

        // 10.60.0.11 serves both IPv4 VIPs: its bit goes with the last of them.
        del(&mut lab, tcp4, "10.60.0.11:8080");
        assert_eq!(nat_filter_bits(&lab), bits_of(&all), "UDP still uses .11");
        assert!(!reply_rewritten(&mut lab, &tcp4, ("10.60.0.11", 8080)));
        assert!(reply_rewritten(&mut lab, &udp4, ("10.60.0.11", 5353)));
        del(&mut lab, udp4, "10.60.0.11:5353");
        assert_eq!(nat_filter_bits(&lab), bits_of(&all[1..]));
        assert!(!reply_rewritten(&mut lab, &udp4, ("10.60.0.11", 5353)));
        assert!(reply_rewritten(&mut lab, &udp4, ("10.60.0.12", 5353)));

        for vip in vips {
            lab.bal.del_vip(vip).expect("del vip");
        }
        assert!(nat_filter_bits(&lab).is_empty(), "no NAT real, no bit");
        assert!(!reply_rewritten(&mut lab, &udp4, ("10.60.0.12", 5353)));
    });
}
