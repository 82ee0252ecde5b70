//! What the tunnel and ICMP packet tests share: a balancer loaded with tunnel reals, and the
//! frames tunnel mode must send, built from the documentation independently of the kernel's
//! code. Included by each of those files with `#[path]`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{flow_hash, ring_slot, Counter, FlowKey, GlobalStats, TunnelConf, ENCAP_GUE};
use lb_lab::packet;
use lb_userspace::{
    core::{
        balancer::{Balancer, Change},
        maglev::{build_ring, MaglevReal},
    },
    dataplane::{
        ebpf::{EbpfDataplane, LoadOptions},
        CounterSource, Dataplane, Limits,
    },
    model::{map_addr, Mode, RealAddr, VipFlags, VipSpec},
};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const M: u32 = 65537;
/// The next hop (a router) every tunnel real is reached through.
pub const GW_MAC: [u8; 6] = [0x02, 0x99, 0, 0, 0, 0x01];
pub const SRC4: [u8; 4] = [10, 1, 0, 1];
pub const SRC6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
pub const GUE_PORT: u16 = 6080;

pub fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

pub fn v6(s: &str) -> Ipv6Addr {
    s.parse().expect("test address")
}

pub fn c4(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0xC000_0200u32 + i)
}

pub fn conf(encap: u8) -> TunnelConf {
    TunnelConf {
        src4: SRC4,
        src6: SRC6,
        gue_port_be: GUE_PORT.to_be(),
        encap,
        mtu: 1500,
        ..TunnelConf::default()
    }
}

pub struct Lab {
    pub bal: Balancer<EbpfDataplane>,
}

impl Lab {
    pub fn new(conf: TunnelConf) -> Lab {
        let opts = LoadOptions {
            limits: Limits {
                max_vips: 8,
                max_reals: 64,
                ring_size: M,
            },
            conntrack_size: 1 << 16,
            ..LoadOptions::default()
        };
        let mut dp = EbpfDataplane::load(&opts).unwrap_or_else(|e| panic!("loading: {e:#?}"));
        dp.set_tunnel(&conf).expect("TUNNEL");
        Lab {
            bal: Balancer::new(dp, std::time::Duration::from_millis(300)),
        }
    }

    pub fn vip(&mut self, spec: &str) -> VipSpec {
        let spec: VipSpec = spec.parse().expect("vip");
        self.bal
            .add_vip(spec, VipFlags::default())
            .expect("add vip");
        spec
    }

    /// A real with its mode; a tunnel real's MAC is the gateway's, a DR real's its own.
    pub fn real(&mut self, vip: VipSpec, addr: &str, mode: Mode, mac: Option<[u8; 6]>) {
        let addr = ip(addr);
        self.bal
            .apply(vec![
                Change::AddReal {
                    vip,
                    addr: addr.into(),
                    weight: 1,
                    mac,
                },
                Change::SetMode {
                    vip,
                    real: Some(addr.into()),
                    mode: Some(mode),
                },
            ])
            .unwrap_or_else(|e| panic!("add real {addr}: {e}"));
    }

    pub fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.bal
            .dataplane_mut()
            .test_run(frame)
            .unwrap_or_else(|e| panic!("test_run: {e:#?}"))
    }

    /// `run` with the frame coming in by interface `ingress` (of this thread's namespace: its
    /// routes answer the program's FIB lookups).
    pub fn run_on(&mut self, frame: &[u8], ingress: u32) -> (u32, Vec<u8>) {
        self.bal
            .dataplane_mut()
            .test_run_on(frame, Some(ingress))
            .unwrap_or_else(|e| panic!("test_run: {e:#?}"))
    }

    pub fn global(&self) -> GlobalStats {
        self.bal.dataplane().global_stats().expect("global stats")
    }

    /// The real the ring gives `frame`'s flow.
    pub fn predict(&self, vip: &VipSpec, frame: &[u8]) -> IpAddr {
        self.predict_key(vip, &flow_key(frame))
    }

    /// The real the ring gives the flow `key`.
    pub fn predict_key(&self, vip: &VipSpec, key: &FlowKey) -> IpAddr {
        self.predict_real(vip, key).ip
    }

    /// The real the ring gives the flow `key`, with its port (NAT reals).
    pub fn predict_real(&self, vip: &VipSpec, key: &FlowKey) -> RealAddr {
        let snap = self.bal.snapshot();
        let v = snap.vips.iter().find(|v| v.spec == *vip).expect("vip");
        let members: Vec<MaglevReal> = v
            .reals
            .iter()
            .filter(|r| r.in_ring)
            .map(|r| MaglevReal {
                addr: map_addr(r.addr.ip),
                port: r.addr.port,
                weight: r.weight,
                id: r.id,
            })
            .collect();
        let ring = build_ring(&members, M).expect("maglev");
        let id = ring[ring_slot(flow_hash(key, 0), M) as usize];
        v.reals.iter().find(|r| r.id == id).expect("real").addr
    }
}

pub fn flow_key(frame: &[u8]) -> FlowKey {
    let l = packet::parse(frame).expect("frame parses");
    let (sport, dport) = l.ports(frame).expect("ports");
    let o = l.l3_offset;
    let (src, dst) = if l.ethertype == packet::ETH_P_IPV6 {
        (
            frame[o + 8..o + 24].try_into().unwrap(),
            frame[o + 24..o + 40].try_into().unwrap(),
        )
    } else {
        (
            lb_common::v4_mapped(frame[o + 12..o + 16].try_into().unwrap()),
            lb_common::v4_mapped(frame[o + 16..o + 20].try_into().unwrap()),
        )
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

/// The frame the balancer must send: `frame`'s IP packet whole (padding stays after the
/// outer packet) behind the outer headers, built field by field from the documentation.
pub fn encapsulated(frame: &[u8], real: IpAddr, c: &TunnelConf, to: [u8; 6]) -> Vec<u8> {
    let hash16 = (flow_hash(&flow_key(frame), 0) & 0xFFFF) as u16;
    encapsulated_with(frame, real, c, to, hash16)
}

/// `encapsulated`, with the flow hash's low half given (an ICMP error takes its flow's).
pub fn encapsulated_with(
    frame: &[u8],
    real: IpAddr,
    c: &TunnelConf,
    to: [u8; 6],
    hash16: u16,
) -> Vec<u8> {
    let l = packet::parse(frame).expect("frame parses");
    let inner = &frame[l.l3_offset..l.l3_end];
    let padding = &frame[l.l3_end..];
    let inner_v4 = l.ethertype == packet::ETH_P_IPV4;
    let (tos, ttl) = if inner_v4 {
        (inner[1], inner[8])
    } else {
        ((inner[0] << 4) | (inner[1] >> 4), inner[7])
    };
    let gue = c.encap == ENCAP_GUE;
    let mut udp = Vec::new();
    if gue {
        let sport = 0xC000 | (hash16 & 0x3FFF);
        udp.extend_from_slice(&sport.to_be_bytes());
        udp.extend_from_slice(&GUE_PORT.to_be_bytes());
        udp.extend_from_slice(&((8 + inner.len()) as u16).to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
    }
    let proto = if gue {
        17
    } else if inner_v4 {
        4
    } else {
        41
    };
    let mut out = Vec::new();
    out.extend_from_slice(&to);
    out.extend_from_slice(&packet::dst_mac(frame));
    if let Some(tci) = l.vlan {
        out.extend_from_slice(&frame[12..14]);
        out.extend_from_slice(&tci.to_be_bytes());
    }
    match real {
        IpAddr::V4(dst) => {
            out.extend_from_slice(&packet::ETH_P_IPV4.to_be_bytes());
            let mut h = vec![0x45, tos];
            h.extend_from_slice(&((20 + udp.len() + inner.len()) as u16).to_be_bytes());
            h.extend_from_slice(&[0, 0, 0x40, 0, ttl, proto, 0, 0]);
            h.extend_from_slice(&c.src4);
            h.extend_from_slice(&dst.octets());
            let sum = packet::ipv4_checksum(&h);
            h[10..12].copy_from_slice(&sum.to_be_bytes());
            out.extend_from_slice(&h);
            out.extend_from_slice(&udp);
        }
        IpAddr::V6(dst) => {
            out.extend_from_slice(&packet::ETH_P_IPV6.to_be_bytes());
            let mut h = vec![0x60 | (tos >> 4), tos << 4];
            h.extend_from_slice(&hash16.to_be_bytes());
            h.extend_from_slice(&((udp.len() + inner.len()) as u16).to_be_bytes());
            h.extend_from_slice(&[proto, ttl]);
            h.extend_from_slice(&c.src6);
            h.extend_from_slice(&dst.octets());
            out.extend_from_slice(&h);
            if gue {
                let mut seg = udp.clone();
                seg.extend_from_slice(inner);
                let sum =
                    match packet::ipv6_transport_checksum(Ipv6Addr::from(c.src6), dst, 17, &seg) {
                        0 => 0xFFFF,
                        s => s,
                    };
                udp[6..8].copy_from_slice(&sum.to_be_bytes());
            }
            out.extend_from_slice(&udp);
        }
    }
    out.extend_from_slice(inner);
    out.extend_from_slice(padding);
    out
}

/// Send `frame` to `vip`: it must leave encapsulated to the real the ring names, byte for byte,
/// and the counters must say so.
pub fn expect_encap(lab: &mut Lab, name: &str, vip: &VipSpec, frame: &[u8], c: &TunnelConf) {
    let real = lab.predict(vip, frame);
    let real_id = lab.bal.real_id(vip, real).expect("real id");
    let before = lab
        .bal
        .dataplane()
        .real_stats(real_id)
        .expect("stats")
        .packets;
    let (action, out) = lab.run(frame);
    assert_eq!(action, XDP_TX, "{name}: action");
    let want = encapsulated(frame, real, c, GW_MAC);
    assert!(
        out == want,
        "{name}: to {real}:\n{}",
        packet::hex_diff(&want, &out)
    );
    let after = lab
        .bal
        .dataplane()
        .real_stats(real_id)
        .expect("stats")
        .packets;
    assert_eq!(after, before + 1, "{name}: the real's packet counter");
}

/// Set the inner DSCP/ECN byte of an IPv4 frame (its header checksum fixed) or the traffic
/// class of an IPv6 one.
pub fn with_tos(mut frame: Vec<u8>, tos: u8) -> Vec<u8> {
    let o = packet::l3_offset(&frame);
    if frame[o] >> 4 == 4 {
        frame[o + 1] = tos;
        frame[o + 10..o + 12].fill(0);
        let ihl = usize::from(frame[o] & 0x0f) * 4;
        let sum = packet::ipv4_checksum(&frame[o..o + ihl]);
        frame[o + 10..o + 12].copy_from_slice(&sum.to_be_bytes());
    } else {
        frame[o] = 0x60 | (tos >> 4);
        frame[o + 1] = (tos << 4) | (frame[o + 1] & 0x0f);
    }
    frame
}

/// `frame` must be dropped as it came, and counted once by `reason`.
pub fn expect_drop(lab: &mut Lab, name: &str, frame: &[u8], reason: Counter) {
    let before = lab.global().get(reason);
    let (action, out) = lab.run(frame);
    assert_eq!((action, out.as_slice()), (XDP_DROP, frame), "{name}");
    assert_eq!(lab.global().get(reason), before + 1, "{name}: {reason:?}");
}
