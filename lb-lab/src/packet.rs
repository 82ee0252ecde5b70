//! A small, dependency-free packet builder for the `BPF_PROG_TEST_RUN` tests and the benchmark:
//! exact Ethernet frames (optional 802.1Q tag, IPv4 with options and fragment fields, IPv6 with
//! an extension-header chain, TCP, UDP, ICMP echo) with correct checksums, plus helpers to
//! inspect, mutate, verify and compare frames.
//!
//! Frames are never padded to the 60-byte Ethernet minimum: `build` returns exactly the bytes
//! the headers and payload need, so tests can truncate them byte by byte.
//!
//! Every multi-byte field is written in network byte order.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88A8;

pub const ETH_HLEN: usize = 14;
pub const VLAN_HLEN: usize = 4;
pub const IPV4_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
pub const TCP_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
pub const ICMP_HLEN: usize = 8;
pub const IPV6_FRAG_HLEN: usize = 8;

pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ROUTING: u8 = 43;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_AH: u8 = 51;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_NONE: u8 = 59;
pub const IPPROTO_DSTOPTS: u8 = 60;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// IPv4 flags+offset field: don't fragment.
pub const IPV4_DF: u16 = 0x4000;
/// IPv4 flags+offset field: more fragments.
pub const IPV4_MF: u16 = 0x2000;
/// IPv4 flags+offset field: the fragment offset, in 8-byte units.
pub const IPV4_OFFSET_MASK: u16 = 0x1fff;

pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
/// Identifier and sequence number of every echo request built here.
pub const ICMP_ECHO_ID: u16 = 0x0001;
pub const ICMP_ECHO_SEQ: u16 = 0x0001;

pub const DEFAULT_SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const DEFAULT_DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const DEFAULT_TTL: u8 = 64;
/// Sequence number of the TCP segments the constructors build.
pub const DEFAULT_TCP_SEQ: u32 = 1;
pub const TCP_WINDOW: u16 = 65535;

/// Option type used to fill hop-by-hop and destination-options headers longer than Pad1/PadN
/// may cover (Linux rejects more than 7 consecutive padding bytes): RFC 4727's experimental
/// type 0x1E, whose top bits say "skip if unknown, does not change en route".
const OPT_EXPERIMENTAL: u8 = 0x1e;

#[derive(Clone, Debug)]
pub struct Frame {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// 802.1Q tag control information (PCP, DEI, VLAN id); `None` for an untagged frame.
    pub vlan: Option<u16>,
    pub l3: L3,
    pub l4: L4,
    /// Bytes after the L4 header (after `L4::Raw`'s bytes for a raw L4).
    pub payload: Vec<u8>,
}

#[derive(Clone, Debug)]
pub enum L3 {
    V4 {
        src: Ipv4Addr,
        dst: Ipv4Addr,
        ttl: u8,
        /// Raw option bytes: a multiple of 4, at most 40 (IHL = 5 + len / 4).
        options: Vec<u8>,
        /// The 16-bit flags + fragment offset field in host order: `IPV4_DF`, `IPV4_MF`,
        /// offset in 8-byte units in the low 13 bits.
        frag: u16,
        id: u16,
    },
    V6 {
        src: Ipv6Addr,
        dst: Ipv6Addr,
        hop_limit: u8,
        /// Extension headers in wire order, between the fixed header and the L4 header.
        ext: Vec<Ext>,
    },
}

#[derive(Clone, Debug)]
pub enum Ext {
    /// Hop-by-hop options (next header 0), total bytes: a multiple of 8, 8..=2048. Filled with
    /// padding options.
    HopByHop(usize),
    /// Destination options (next header 60), total bytes as for `HopByHop`.
    DestOpts(usize),
    /// Routing header (next header 43), total bytes as for `HopByHop`: type 0 with segments
    /// left 0 (so every node ignores it), the rest zero.
    Routing(usize),
    /// Fragment header (next header 44, 8 bytes). `offset` is the 13-bit fragment offset in
    /// 8-byte units; `more` is the M flag.
    Fragment { offset: u16, more: bool, id: u32 },
    /// Authentication header (next header 51), total bytes a multiple of 8 from 16: SPI 1,
    /// sequence 1, the integrity check value zero.
    Auth(usize),
}

#[derive(Clone, Debug)]
pub enum L4 {
    /// 20-byte header, data offset 5, ack number 0, window 65535, urgent pointer 0.
    Tcp {
        sport: u16,
        dport: u16,
        /// `TCP_SYN`, `TCP_ACK`, ...
        flags: u8,
        seq: u32,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    /// Echo request: ICMP (protocol 1, type 8) over IPv4, ICMPv6 (58, type 128) over IPv6,
    /// identifier `ICMP_ECHO_ID`, sequence `ICMP_ECHO_SEQ`.
    Icmp,
    /// Any upper-layer protocol: `bytes` are written as they are (no checksum), then the
    /// payload.
    Raw {
        proto: u8,
        bytes: Vec<u8>,
    },
}

impl L3 {
    /// IPv4 with TTL 64, no options, DF set, id 0.
    pub fn v4(src: Ipv4Addr, dst: Ipv4Addr) -> L3 {
        L3::V4 {
            src,
            dst,
            ttl: DEFAULT_TTL,
            options: Vec::new(),
            frag: IPV4_DF,
            id: 0,
        }
    }

    /// IPv6 with hop limit 64 and no extension headers.
    pub fn v6(src: Ipv6Addr, dst: Ipv6Addr) -> L3 {
        L3::V6 {
            src,
            dst,
            hop_limit: DEFAULT_TTL,
            ext: Vec::new(),
        }
    }

    pub fn is_v6(&self) -> bool {
        matches!(self, L3::V6 { .. })
    }
}

impl Ext {
    /// The next-header value that announces this header.
    pub fn code(&self) -> u8 {
        match self {
            Ext::HopByHop(_) => IPPROTO_HOPOPTS,
            Ext::DestOpts(_) => IPPROTO_DSTOPTS,
            Ext::Routing(_) => IPPROTO_ROUTING,
            Ext::Fragment { .. } => IPPROTO_FRAGMENT,
            Ext::Auth(_) => IPPROTO_AH,
        }
    }

    /// Bytes on the wire.
    pub fn wire_len(&self) -> usize {
        match self {
            Ext::HopByHop(n) | Ext::DestOpts(n) | Ext::Routing(n) | Ext::Auth(n) => *n,
            Ext::Fragment { .. } => IPV6_FRAG_HLEN,
        }
    }

    fn write(&self, next: u8, out: &mut Vec<u8>) {
        match *self {
            Ext::HopByHop(n) | Ext::DestOpts(n) | Ext::Routing(n) => {
                assert!(
                    n >= 8 && n % 8 == 0 && n <= 2048,
                    "{self:?}: extension header length must be a multiple of 8 in 8..=2048"
                );
                out.push(next);
                out.push((n / 8 - 1) as u8);
                if let Ext::Routing(_) = self {
                    // Routing type 0, segments left 0, then reserved/addresses all zero.
                    out.resize(out.len() + n - 2, 0);
                } else {
                    fill_options(out, n - 2);
                }
            }
            Ext::Auth(n) => {
                assert!(
                    n >= 16 && n % 8 == 0 && n <= 1024,
                    "{self:?}: an IPv6 AH is a multiple of 8 bytes in 16..=1024"
                );
                // The length field counts 4-byte words, less 2.
                out.push(next);
                out.push((n / 4 - 2) as u8);
                out.extend_from_slice(&[0, 0]);
                out.extend_from_slice(&1u32.to_be_bytes());
                out.extend_from_slice(&1u32.to_be_bytes());
                out.resize(out.len() + n - 12, 0);
            }
            Ext::Fragment { offset, more, id } => {
                assert!(offset <= 0x1fff, "{self:?}: fragment offset is 13 bits");
                out.push(next);
                out.push(0);
                out.extend_from_slice(&((offset << 3) | more as u16).to_be_bytes());
                out.extend_from_slice(&id.to_be_bytes());
            }
        }
    }
}

/// Fills `r` bytes of an options header with Pad1 / PadN, or with experimental skippable
/// options when more than 7 bytes are needed.
fn fill_options(out: &mut Vec<u8>, mut r: usize) {
    while r > 0 {
        let (kind, len) = match r {
            1 => {
                out.push(0); // Pad1
                return;
            }
            2..=7 => (1, r - 2), // PadN
            _ => (OPT_EXPERIMENTAL, (r - 2).min(255)),
        };
        out.push(kind);
        out.push(len as u8);
        out.resize(out.len() + len, 0);
        r -= 2 + len;
    }
}

impl L4 {
    /// The protocol number of this L4 under IPv4 (`v6 == false`) or IPv6.
    pub fn proto(&self, v6: bool) -> u8 {
        match self {
            L4::Tcp { .. } => IPPROTO_TCP,
            L4::Udp { .. } => IPPROTO_UDP,
            L4::Icmp if v6 => IPPROTO_ICMPV6,
            L4::Icmp => IPPROTO_ICMP,
            L4::Raw { proto, .. } => *proto,
        }
    }
}

impl Frame {
    /// A frame with the default MACs (02:00:00:00:00:01 -> 02:00:00:00:00:02), no VLAN tag and
    /// no payload.
    pub fn new(l3: L3, l4: L4) -> Frame {
        Frame {
            dst_mac: DEFAULT_DST_MAC,
            src_mac: DEFAULT_SRC_MAC,
            vlan: None,
            l3,
            l4,
            payload: Vec::new(),
        }
    }

    /// TCP/IPv4, ACK set, seq 1, TTL 64, DF, id 0, no payload.
    pub fn tcp4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Frame {
        Frame::new(L3::v4(src, dst), tcp(sport, dport))
    }

    /// UDP/IPv4, TTL 64, DF, id 0, no payload.
    pub fn udp4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Frame {
        Frame::new(L3::v4(src, dst), L4::Udp { sport, dport })
    }

    /// TCP/IPv6, ACK set, seq 1, hop limit 64, no payload.
    pub fn tcp6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16) -> Frame {
        Frame::new(L3::v6(src, dst), tcp(sport, dport))
    }

    /// UDP/IPv6, hop limit 64, no payload.
    pub fn udp6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16) -> Frame {
        Frame::new(L3::v6(src, dst), L4::Udp { sport, dport })
    }

    /// ICMP echo request over IPv4.
    pub fn icmp4(src: Ipv4Addr, dst: Ipv4Addr) -> Frame {
        Frame::new(L3::v4(src, dst), L4::Icmp)
    }

    /// ICMPv6 echo request.
    pub fn icmp6(src: Ipv6Addr, dst: Ipv6Addr) -> Frame {
        Frame::new(L3::v6(src, dst), L4::Icmp)
    }

    pub fn with_payload(mut self, p: &[u8]) -> Self {
        self.payload = p.to_vec();
        self
    }

    /// Adds an 802.1Q tag with this TCI.
    pub fn with_vlan(mut self, tci: u16) -> Self {
        self.vlan = Some(tci);
        self
    }

    pub fn with_macs(mut self, src: [u8; 6], dst: [u8; 6]) -> Self {
        self.src_mac = src;
        self.dst_mac = dst;
        self
    }

    /// Sets the IPv4 TTL or the IPv6 hop limit.
    pub fn with_ttl(mut self, value: u8) -> Self {
        match &mut self.l3 {
            L3::V4 { ttl, .. } => *ttl = value,
            L3::V6 { hop_limit, .. } => *hop_limit = value,
        }
        self
    }

    /// Sets the TCP flags. Panics if the frame is not TCP.
    pub fn with_tcp_flags(mut self, value: u8) -> Self {
        match &mut self.l4 {
            L4::Tcp { flags, .. } => *flags = value,
            other => panic!("with_tcp_flags on {other:?}"),
        }
        self
    }

    /// Sets the IPv4 options (a multiple of 4, at most 40 bytes). Panics on IPv6.
    pub fn with_ipv4_options(mut self, value: &[u8]) -> Self {
        match &mut self.l3 {
            L3::V4 { options, .. } => *options = value.to_vec(),
            other => panic!("with_ipv4_options on {other:?}"),
        }
        self
    }

    /// Sets the IPv4 flags+offset field and the id. Panics on IPv6.
    pub fn with_ipv4_frag(mut self, value: u16, ident: u16) -> Self {
        match &mut self.l3 {
            L3::V4 { frag, id, .. } => {
                *frag = value;
                *id = ident;
            }
            other => panic!("with_ipv4_frag on {other:?}"),
        }
        self
    }

    /// Appends an IPv6 extension header (after those already there). Panics on IPv4.
    pub fn with_ext(mut self, e: Ext) -> Self {
        match &mut self.l3 {
            L3::V6 { ext, .. } => ext.push(e),
            other => panic!("with_ext on {other:?}"),
        }
        self
    }

    pub fn with_l4(mut self, l4: L4) -> Self {
        self.l4 = l4;
        self
    }

    /// The upper-layer protocol number (after any extension headers).
    pub fn l4_proto(&self) -> u8 {
        self.l4.proto(self.l3.is_v6())
    }

    /// The exact frame bytes, with every length and checksum filled in.
    pub fn build(&self) -> Vec<u8> {
        let v6 = self.l3.is_v6();
        let proto = self.l4_proto();

        // The L4 segment, its checksum field still zero.
        let mut seg = Vec::new();
        let csum_at = match &self.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
                seq,
            } => {
                seg.extend_from_slice(&sport.to_be_bytes());
                seg.extend_from_slice(&dport.to_be_bytes());
                seg.extend_from_slice(&seq.to_be_bytes());
                seg.extend_from_slice(&0u32.to_be_bytes()); // ack number
                seg.push(((TCP_HLEN / 4) as u8) << 4); // data offset 5
                seg.push(*flags);
                seg.extend_from_slice(&TCP_WINDOW.to_be_bytes());
                seg.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
                Some(16)
            }
            L4::Udp { sport, dport } => {
                let len = UDP_HLEN + self.payload.len();
                assert!(len <= 0xffff, "UDP datagram too long");
                seg.extend_from_slice(&sport.to_be_bytes());
                seg.extend_from_slice(&dport.to_be_bytes());
                seg.extend_from_slice(&(len as u16).to_be_bytes());
                seg.extend_from_slice(&[0, 0]);
                Some(6)
            }
            L4::Icmp => {
                seg.push(if v6 {
                    ICMPV6_ECHO_REQUEST
                } else {
                    ICMP_ECHO_REQUEST
                });
                seg.push(0); // code
                seg.extend_from_slice(&[0, 0]);
                seg.extend_from_slice(&ICMP_ECHO_ID.to_be_bytes());
                seg.extend_from_slice(&ICMP_ECHO_SEQ.to_be_bytes());
                Some(2)
            }
            L4::Raw { bytes, .. } => {
                seg.extend_from_slice(bytes);
                None
            }
        };
        seg.extend_from_slice(&self.payload);

        if let Some(at) = csum_at {
            let c = match &self.l3 {
                L3::V4 { src, dst, .. } => {
                    if proto == IPPROTO_ICMP {
                        ipv4_checksum(&seg)
                    } else {
                        ipv4_transport_checksum(*src, *dst, proto, &seg)
                    }
                }
                L3::V6 { src, dst, .. } => ipv6_transport_checksum(*src, *dst, proto, &seg),
            };
            let c = if proto == IPPROTO_UDP && c == 0 {
                0xffff
            } else {
                c
            };
            seg[at..at + 2].copy_from_slice(&c.to_be_bytes());
        }

        let mut out = Vec::with_capacity(ETH_HLEN + VLAN_HLEN + IPV6_HLEN + 64 + seg.len());
        out.extend_from_slice(&self.dst_mac);
        out.extend_from_slice(&self.src_mac);
        if let Some(tci) = self.vlan {
            out.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
            out.extend_from_slice(&tci.to_be_bytes());
        }

        match &self.l3 {
            L3::V4 {
                src,
                dst,
                ttl,
                options,
                frag,
                id,
            } => {
                assert!(
                    options.len() % 4 == 0 && options.len() <= 40,
                    "IPv4 options must be a multiple of 4 bytes, at most 40 (got {})",
                    options.len()
                );
                let hlen = IPV4_HLEN + options.len();
                let total = hlen + seg.len();
                assert!(total <= 0xffff, "IPv4 packet too long");
                out.extend_from_slice(&ETH_P_IPV4.to_be_bytes());
                let l3 = out.len();
                out.push(0x40 | (hlen / 4) as u8);
                out.push(0); // DSCP/ECN
                out.extend_from_slice(&(total as u16).to_be_bytes());
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(&frag.to_be_bytes());
                out.push(*ttl);
                out.push(proto);
                out.extend_from_slice(&[0, 0]);
                out.extend_from_slice(&src.octets());
                out.extend_from_slice(&dst.octets());
                out.extend_from_slice(options);
                let c = ipv4_checksum(&out[l3..l3 + hlen]);
                out[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
            }
            L3::V6 {
                src,
                dst,
                hop_limit,
                ext,
            } => {
                let plen = ext.iter().map(Ext::wire_len).sum::<usize>() + seg.len();
                assert!(plen <= 0xffff, "IPv6 payload too long");
                out.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
                out.extend_from_slice(&[0x60, 0, 0, 0]); // version 6, traffic class/flow 0
                out.extend_from_slice(&(plen as u16).to_be_bytes());
                out.push(ext.first().map_or(proto, Ext::code));
                out.push(*hop_limit);
                out.extend_from_slice(&src.octets());
                out.extend_from_slice(&dst.octets());
                for (i, e) in ext.iter().enumerate() {
                    e.write(ext.get(i + 1).map_or(proto, Ext::code), &mut out);
                }
            }
        }
        out.extend_from_slice(&seg);
        out
    }
}

fn tcp(sport: u16, dport: u16) -> L4 {
    L4::Tcp {
        sport,
        dport,
        flags: TCP_ACK,
        seq: DEFAULT_TCP_SEQ,
    }
}

/// An ICMP error (ICMPv6 over IPv6) from `from` to `to` of `kind` (type, code) with its 4
/// bytes of `info` (the MTU of "fragmentation needed" and "packet too big"), quoting `quote`,
/// its checksum computed.
pub fn icmp_error(from: IpAddr, to: IpAddr, kind: [u8; 2], info: u32, quote: &[u8]) -> Frame {
    let mut b = vec![kind[0], kind[1], 0, 0];
    b.extend_from_slice(&info.to_be_bytes());
    b.extend_from_slice(quote);
    match (from, to) {
        (IpAddr::V4(f), IpAddr::V4(t)) => {
            let sum = ipv4_checksum(&b);
            b[2..4].copy_from_slice(&sum.to_be_bytes());
            Frame::new(L3::v4(f, t), L4::Raw { proto: 1, bytes: b })
        }
        (IpAddr::V6(f), IpAddr::V6(t)) => {
            let sum = ipv6_transport_checksum(f, t, 58, &b);
            b[2..4].copy_from_slice(&sum.to_be_bytes());
            Frame::new(
                L3::v6(f, t),
                L4::Raw {
                    proto: 58,
                    bytes: b,
                },
            )
        }
        _ => panic!("icmp_error: {from} and {to} are of two families"),
    }
}

/// A broadcast ARP request (who-has `target`, tell `sender`), 42 bytes, no padding.
pub fn arp_request(src_mac: [u8; 6], sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut out = Vec::with_capacity(42);
    out.extend_from_slice(&[0xff; 6]);
    out.extend_from_slice(&src_mac);
    out.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes()); // hardware type: Ethernet
    out.extend_from_slice(&ETH_P_IPV4.to_be_bytes());
    out.extend_from_slice(&[6, 4]);
    out.extend_from_slice(&1u16.to_be_bytes()); // request
    out.extend_from_slice(&src_mac);
    out.extend_from_slice(&sender.octets());
    out.extend_from_slice(&[0; 6]);
    out.extend_from_slice(&target.octets());
    out
}

// ---- checksums ----------------------------------------------------------------------------

/// Adds `data` as big-endian 16-bit words (an odd last byte padded with zero) to `acc`.
fn sum_words(data: &[u8], mut acc: u64) -> u64 {
    let mut chunks = data.chunks_exact(2);
    for w in &mut chunks {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// Folds the carries of a ones' complement sum into 16 bits.
fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// RFC 1071 Internet checksum of `header` (any bytes, really: also the ICMPv4 checksum).
/// With the checksum field zeroed it returns the value to store; over a header whose checksum
/// is right it returns 0.
pub fn ipv4_checksum(header: &[u8]) -> u16 {
    !fold(sum_words(header, 0))
}

fn pseudo_v4(src: [u8; 4], dst: [u8; 4], proto: u8, len: usize) -> u64 {
    let acc = sum_words(&src, 0);
    let acc = sum_words(&dst, acc);
    acc + u64::from(proto) + len as u64
}

fn pseudo_v6(src: [u8; 16], dst: [u8; 16], proto: u8, len: usize) -> u64 {
    let acc = sum_words(&src, 0);
    let acc = sum_words(&dst, acc);
    acc + u64::from(proto) + len as u64
}

/// TCP/UDP checksum over the IPv4 pseudo-header and `segment` (its checksum field zeroed).
/// Returns the raw value: a UDP sender replaces 0 with 0xffff.
pub fn ipv4_transport_checksum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, segment: &[u8]) -> u16 {
    let acc = pseudo_v4(src.octets(), dst.octets(), proto, segment.len());
    !fold(sum_words(segment, acc))
}

/// TCP/UDP/ICMPv6 checksum over the IPv6 pseudo-header and `segment` (checksum field zeroed).
/// Returns the raw value: a UDP sender replaces 0 with 0xffff.
pub fn ipv6_transport_checksum(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, segment: &[u8]) -> u16 {
    let acc = pseudo_v6(src.octets(), dst.octets(), proto, segment.len());
    !fold(sum_words(segment, acc))
}

// ---- inspecting frames --------------------------------------------------------------------

/// Offset of the L3 header (14, or 18 with a VLAN tag).
pub fn l3_offset(frame: &[u8]) -> usize {
    let tpid = |f: &[u8]| u16::from_be_bytes([f[12], f[13]]);
    if frame.len() >= ETH_HLEN && matches!(tpid(frame), ETH_P_8021Q | ETH_P_8021AD) {
        ETH_HLEN + VLAN_HLEN
    } else {
        ETH_HLEN
    }
}

/// The destination MAC (panics on a frame shorter than 6 bytes).
pub fn dst_mac(frame: &[u8]) -> [u8; 6] {
    frame[0..6].try_into().unwrap()
}

/// The source MAC (panics on a frame shorter than 12 bytes).
pub fn src_mac(frame: &[u8]) -> [u8; 6] {
    frame[6..12].try_into().unwrap()
}

pub fn set_dst_mac(frame: &mut [u8], mac: [u8; 6]) {
    frame[0..6].copy_from_slice(&mac);
}

pub fn set_src_mac(frame: &mut [u8], mac: [u8; 6]) {
    frame[6..12].copy_from_slice(&mac);
}

/// Where the headers of an IP frame are, as found by [`parse`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The 802.1Q TCI, if tagged.
    pub vlan: Option<u16>,
    /// `ETH_P_IPV4` or `ETH_P_IPV6`.
    pub ethertype: u16,
    pub l3_offset: usize,
    /// IPv4 header length (with options) or 40.
    pub l3_header_len: usize,
    /// End of the IP packet (from its length field); bytes after it are link padding.
    pub l3_end: usize,
    /// Start of the upper-layer header (after any IPv6 extension headers).
    pub l4_offset: usize,
    /// Upper-layer protocol (after any IPv6 extension headers).
    pub proto: u8,
    /// A fragment: IPv4 MF or offset, or an IPv6 fragment header.
    pub fragment: bool,
    /// A fragment with a non-zero offset: no L4 header at `l4_offset`.
    pub non_first_fragment: bool,
}

impl Layout {
    /// The L4 segment (header and payload) of `frame`.
    pub fn l4<'a>(&self, frame: &'a [u8]) -> &'a [u8] {
        &frame[self.l4_offset..self.l3_end]
    }

    /// Source and destination ports, when TCP or UDP and present in the frame.
    pub fn ports(&self, frame: &[u8]) -> Option<(u16, u16)> {
        let s = self.l4(frame);
        if self.non_first_fragment
            || !matches!(self.proto, IPPROTO_TCP | IPPROTO_UDP)
            || s.len() < 4
        {
            return None;
        }
        Some((
            u16::from_be_bytes([s[0], s[1]]),
            u16::from_be_bytes([s[2], s[3]]),
        ))
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Finds the headers of an IPv4 or IPv6 frame (optionally 802.1Q-tagged), checking every
/// length against the frame. Never panics; any other ethertype or a truncated header is an
/// `Err`. Checksums are not looked at (see [`verify_checksums`]).
pub fn parse(frame: &[u8]) -> Result<Layout, String> {
    if frame.len() < ETH_HLEN {
        return Err(format!("Ethernet header truncated: {} bytes", frame.len()));
    }
    let mut vlan = None;
    let mut ethertype = be16(frame, 12);
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        if frame.len() < ETH_HLEN + VLAN_HLEN {
            return Err(format!("802.1Q tag truncated: {} bytes", frame.len()));
        }
        vlan = Some(be16(frame, 14));
        ethertype = be16(frame, 16);
    }
    let l3 = l3_offset(frame);
    match ethertype {
        ETH_P_IPV4 => {
            if frame.len() < l3 + IPV4_HLEN {
                return Err(format!("IPv4 header truncated: {} bytes", frame.len() - l3));
            }
            if frame[l3] >> 4 != 4 {
                return Err(format!("IPv4 version is {}", frame[l3] >> 4));
            }
            let hlen = usize::from(frame[l3] & 0xf) * 4;
            if hlen < IPV4_HLEN {
                return Err(format!("IPv4 IHL {} is below 5", hlen / 4));
            }
            if frame.len() < l3 + hlen {
                return Err(format!(
                    "IPv4 header with options truncated: IHL says {hlen}, frame has {}",
                    frame.len() - l3
                ));
            }
            let total = usize::from(be16(frame, l3 + 2));
            if total < hlen || frame.len() < l3 + total {
                return Err(format!(
                    "IPv4 total length {total} does not fit: header {hlen}, frame has {}",
                    frame.len() - l3
                ));
            }
            let frag = be16(frame, l3 + 6);
            Ok(Layout {
                vlan,
                ethertype,
                l3_offset: l3,
                l3_header_len: hlen,
                l3_end: l3 + total,
                l4_offset: l3 + hlen,
                proto: frame[l3 + 9],
                fragment: frag & (IPV4_MF | IPV4_OFFSET_MASK) != 0,
                non_first_fragment: frag & IPV4_OFFSET_MASK != 0,
            })
        }
        ETH_P_IPV6 => {
            if frame.len() < l3 + IPV6_HLEN {
                return Err(format!("IPv6 header truncated: {} bytes", frame.len() - l3));
            }
            if frame[l3] >> 4 != 6 {
                return Err(format!("IPv6 version is {}", frame[l3] >> 4));
            }
            let end = l3 + IPV6_HLEN + usize::from(be16(frame, l3 + 4));
            if frame.len() < end {
                return Err(format!(
                    "IPv6 payload length {} does not fit: frame has {} after the header",
                    end - l3 - IPV6_HLEN,
                    frame.len() - l3 - IPV6_HLEN
                ));
            }
            let mut proto = frame[l3 + 6];
            let mut at = l3 + IPV6_HLEN;
            let (mut fragment, mut non_first_fragment) = (false, false);
            loop {
                let len = match proto {
                    IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS if at + 2 <= end => {
                        (usize::from(frame[at + 1]) + 1) * 8
                    }
                    IPPROTO_AH if at + 2 <= end => (usize::from(frame[at + 1]) + 2) * 4,
                    IPPROTO_FRAGMENT => IPV6_FRAG_HLEN,
                    IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH => {
                        return Err(format!("IPv6 extension header {proto} truncated at {at}"))
                    }
                    _ => break,
                };
                if at + len > end {
                    return Err(format!(
                        "IPv6 extension header {proto} at {at} ({len} bytes) runs past the \
                         payload end {end}"
                    ));
                }
                if proto == IPPROTO_FRAGMENT {
                    fragment = true;
                    non_first_fragment |= be16(frame, at + 2) >> 3 != 0;
                }
                proto = frame[at];
                at += len;
            }
            Ok(Layout {
                vlan,
                ethertype,
                l3_offset: l3,
                l3_header_len: IPV6_HLEN,
                l3_end: end,
                l4_offset: at,
                proto,
                fragment,
                non_first_fragment,
            })
        }
        other => Err(format!("not IP: ethertype 0x{other:04x}")),
    }
}

/// Name, checksum field offset within the segment and minimum header length of an L4 whose
/// checksum we know, for `ethertype`.
fn l4_checksum_info(ethertype: u16, proto: u8) -> Option<(&'static str, usize, usize)> {
    match (ethertype, proto) {
        (_, IPPROTO_TCP) => Some(("TCP", 16, TCP_HLEN)),
        (_, IPPROTO_UDP) => Some(("UDP", 6, UDP_HLEN)),
        (ETH_P_IPV4, IPPROTO_ICMP) => Some(("ICMP", 2, ICMP_HLEN)),
        (ETH_P_IPV6, IPPROTO_ICMPV6) => Some(("ICMPv6", 2, ICMP_HLEN)),
        _ => None,
    }
}

/// The checksum `segment` should carry (its own checksum field ignored).
fn l4_checksum_for(frame: &[u8], lay: &Layout, at: usize) -> u16 {
    let mut seg = lay.l4(frame).to_vec();
    seg[at..at + 2].fill(0);
    let l3 = lay.l3_offset;
    let c = if lay.ethertype == ETH_P_IPV4 {
        if lay.proto == IPPROTO_ICMP {
            ipv4_checksum(&seg)
        } else {
            let src: [u8; 4] = frame[l3 + 12..l3 + 16].try_into().unwrap();
            let dst: [u8; 4] = frame[l3 + 16..l3 + 20].try_into().unwrap();
            ipv4_transport_checksum(src.into(), dst.into(), lay.proto, &seg)
        }
    } else {
        let src: [u8; 16] = frame[l3 + 8..l3 + 24].try_into().unwrap();
        let dst: [u8; 16] = frame[l3 + 24..l3 + 40].try_into().unwrap();
        ipv6_transport_checksum(src.into(), dst.into(), lay.proto, &seg)
    };
    if lay.proto == IPPROTO_UDP && c == 0 {
        0xffff
    } else {
        c
    }
}

/// Verify every checksum in a frame built by this module (IPv4 header, TCP/UDP/ICMP/ICMPv6):
/// returns `Err(text)` naming the bad one. Structural errors (truncated headers, lengths that
/// do not fit, a UDP length that disagrees with the IP length) are errors too. ARP frames have
/// nothing to verify and pass; other non-IP ethertypes are errors. The L4 of a non-first
/// fragment is not checked (there is no L4 header); a first fragment's L4 checksum is checked
/// over the bytes present, as `Frame::build` computes it. A zero UDP checksum is an error even
/// over IPv4, where it would mean "none": this module never sends one.
pub fn verify_checksums(frame: &[u8]) -> Result<(), String> {
    if frame.len() >= ETH_HLEN {
        let l3 = l3_offset(frame);
        if frame.len() >= l3 && be16(frame, l3 - 2) == ETH_P_ARP {
            return Ok(());
        }
    }
    let lay = parse(frame)?;
    let l3 = lay.l3_offset;
    if lay.ethertype == ETH_P_IPV4 {
        let header = &frame[l3..l3 + lay.l3_header_len];
        if ipv4_checksum(header) != 0 {
            let mut h = header.to_vec();
            h[10..12].fill(0);
            return Err(format!(
                "IPv4 header checksum bad: 0x{:04x} in frame, 0x{:04x} computed",
                be16(header, 10),
                ipv4_checksum(&h)
            ));
        }
    }
    if lay.non_first_fragment {
        return Ok(());
    }
    let Some((name, at, min)) = l4_checksum_info(lay.ethertype, lay.proto) else {
        return Ok(());
    };
    let family = if lay.ethertype == ETH_P_IPV4 {
        "IPv4"
    } else {
        "IPv6"
    };
    let seg = lay.l4(frame);
    if seg.len() < min {
        return Err(format!(
            "{name} header truncated ({family}): {} bytes",
            seg.len()
        ));
    }
    if lay.proto == IPPROTO_UDP && usize::from(be16(seg, 4)) != seg.len() {
        return Err(format!(
            "UDP length bad ({family}): {} in header, {} in the IP packet",
            be16(seg, 4),
            seg.len()
        ));
    }
    let got = be16(seg, at);
    let want = l4_checksum_for(frame, &lay, at);
    if got != want {
        return Err(format!(
            "{name} checksum bad ({family}): 0x{got:04x} in frame, 0x{want:04x} computed"
        ));
    }
    Ok(())
}

/// Recomputes the IPv4 header checksum and the TCP/UDP/ICMP checksum of `frame` in place,
/// after a test edited it.
pub fn recompute_checksums(frame: &mut [u8]) -> Result<(), String> {
    let lay = parse(frame)?;
    let l3 = lay.l3_offset;
    if lay.ethertype == ETH_P_IPV4 {
        frame[l3 + 10..l3 + 12].fill(0);
        let c = ipv4_checksum(&frame[l3..l3 + lay.l3_header_len]);
        frame[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
    }
    if lay.non_first_fragment {
        return Ok(());
    }
    if let Some((name, at, min)) = l4_checksum_info(lay.ethertype, lay.proto) {
        if lay.l4(frame).len() < min {
            return Err(format!("{name} header truncated"));
        }
        let c = l4_checksum_for(frame, &lay, at);
        let at = lay.l4_offset + at;
        frame[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }
    Ok(())
}

/// Hex dump diff of two byte strings for test failure messages: the lengths, the offsets where
/// they differ, then every 16-byte line holding a difference, `want` above `got`, with `^^`
/// under each differing byte (`--` where one side has no byte).
pub fn hex_diff(want: &[u8], got: &[u8]) -> String {
    let n = want.len().max(got.len());
    let differs = |i: usize| want.get(i) != got.get(i);
    let diffs: Vec<usize> = (0..n).filter(|&i| differs(i)).collect();
    let mut out = String::new();
    if diffs.is_empty() {
        let _ = write!(out, "identical ({} bytes)", want.len());
        return out;
    }
    let _ = writeln!(
        out,
        "want {} bytes, got {} bytes, {} differ at offsets {}",
        want.len(),
        got.len(),
        diffs.len(),
        ranges(&diffs)
    );
    let byte = |b: Option<&u8>| b.map_or_else(|| "--".to_string(), |b| format!("{b:02x}"));
    for line in (0..n).step_by(16) {
        let end = (line + 16).min(n);
        if !(line..end).any(differs) {
            continue;
        }
        let (mut w, mut g, mut m) = (String::new(), String::new(), String::new());
        for i in line..end {
            let sep = if i == line {
                ""
            } else if (i - line) % 8 == 0 {
                "  "
            } else {
                " "
            };
            w.push_str(sep);
            g.push_str(sep);
            m.push_str(sep);
            w.push_str(&byte(want.get(i)));
            g.push_str(&byte(got.get(i)));
            m.push_str(if differs(i) { "^^" } else { "  " });
        }
        let _ = writeln!(out, "{line:04x} want {w}");
        let _ = writeln!(out, "     got  {g}");
        let _ = writeln!(out, "          {}", m.trim_end());
    }
    out
}

/// `[1, 2, 3, 7]` -> `"0x0001-0x0003, 0x0007"`.
fn ranges(sorted: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i;
        while j + 1 < sorted.len() && sorted[j + 1] == sorted[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            format!("0x{:04x}", sorted[i])
        } else {
            format!("0x{:04x}-0x{:04x}", sorted[i], sorted[j])
        });
        i = j + 1;
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const C4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const V4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    const C6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
    const V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn assert_bytes(want: &[u8], got: &[u8]) {
        assert!(want == got, "frame differs:\n{}", hex_diff(want, got));
    }

    /// Every kind of frame the builder makes.
    fn all_kinds() -> Vec<(&'static str, Frame)> {
        let p = b"hello, xlb";
        vec![
            ("tcp4", Frame::tcp4(C4, 40000, V4, 80)),
            (
                "tcp4 payload",
                Frame::tcp4(C4, 40000, V4, 80).with_payload(p),
            ),
            (
                "tcp4 syn odd payload",
                Frame::tcp4(C4, 1, V4, 443)
                    .with_tcp_flags(TCP_SYN)
                    .with_payload(b"abc"),
            ),
            ("udp4", Frame::udp4(C4, 5353, V4, 53).with_payload(p)),
            ("udp4 empty", Frame::udp4(C4, 5353, V4, 53)),
            ("icmp4", Frame::icmp4(C4, V4).with_payload(p)),
            (
                "tcp4 vlan",
                Frame::tcp4(C4, 40000, V4, 80).with_vlan(0x2064),
            ),
            (
                "udp4 options",
                Frame::udp4(C4, 5353, V4, 53)
                    .with_ipv4_options(&[0x94, 0x04, 0, 0, 1, 1, 1, 0])
                    .with_payload(p),
            ),
            (
                "tcp4 40 bytes options vlan",
                Frame::tcp4(C4, 40000, V4, 80)
                    .with_ipv4_options(&[1; 40])
                    .with_vlan(7)
                    .with_payload(p),
            ),
            (
                "udp4 first fragment",
                Frame::udp4(C4, 5353, V4, 53)
                    .with_ipv4_frag(IPV4_MF, 77)
                    .with_payload(p),
            ),
            ("tcp6", Frame::tcp6(C6, 40000, V6, 80).with_payload(p)),
            ("udp6", Frame::udp6(C6, 5353, V6, 53).with_payload(p)),
            ("udp6 empty", Frame::udp6(C6, 5353, V6, 53)),
            ("icmp6", Frame::icmp6(C6, V6).with_payload(p)),
            (
                "tcp6 vlan",
                Frame::tcp6(C6, 40000, V6, 80)
                    .with_vlan(0xe00a)
                    .with_payload(p),
            ),
            (
                "udp6 ext chain",
                Frame::udp6(C6, 5353, V6, 53)
                    .with_ext(Ext::HopByHop(8))
                    .with_ext(Ext::Routing(24))
                    .with_ext(Ext::Fragment {
                        offset: 0,
                        more: true,
                        id: 0xdead_beef,
                    })
                    .with_ext(Ext::DestOpts(16))
                    .with_payload(p),
            ),
            (
                "tcp6 big hop-by-hop vlan",
                Frame::tcp6(C6, 40000, V6, 80)
                    .with_ext(Ext::HopByHop(272))
                    .with_vlan(1)
                    .with_payload(p),
            ),
            (
                "icmp6 dest opts",
                Frame::icmp6(C6, V6)
                    .with_ext(Ext::DestOpts(8))
                    .with_payload(p),
            ),
        ]
    }

    /// TCP/IPv4, 10.0.0.1:12345 -> 10.0.0.2:80, ACK, seq 1, no payload. Checksums by hand:
    ///
    /// IPv4 header words (checksum 0): 4500 0028 0000 4000 4006 0a00 0001 0a00 0002
    ///   sum = 0xd931 (no carry), checksum = !0xd931 = 0x26ce.
    /// TCP pseudo-header: 0a00 0001 0a00 0002 0006 0014 -> 0x141d.
    /// TCP header words: 3039 0050 0000 0001 0000 0000 5010 ffff 0000 0000
    ///   sum = 0x18099 -> fold 0x809a; + 0x141d = 0x94b7; checksum = !0x94b7 = 0x6b48.
    /// (Cross-checked once against scapy 2.8.0's `Ether/IP(flags="DF")/TCP(seq=1,
    /// flags="A", window=65535)`.)
    #[test]
    fn tcp4_matches_hand_checked_bytes() {
        let want = hex("020000000002 020000000001 0800
             4500 0028 0000 4000 4006 26ce 0a000001 0a000002
             3039 0050 00000001 00000000 5010 ffff 6b48 0000");
        let got = Frame::tcp4(C4, 12345, V4, 80).build();
        assert_bytes(&want, &got);
        assert_eq!(got.len(), 54);
        verify_checksums(&got).unwrap();
    }

    /// UDP/IPv6, [2001:db8::1]:40000 -> [2001:db8::2]:53, payload "ping". Checksum by hand:
    ///
    /// Pseudo-header: src 2001+0db8+0001, dst 2001+0db8+0002, length 000c, next header 0011
    ///   -> 0x4002 + 0x1b70 + 0x0003 + 0x000c + 0x0011 = 0x5b92.
    /// UDP words: 9c40 0035 000c 0000 7069 6e67 -> 0x17b51.
    /// Total 0x17b51 + 0x5b92 = 0x1d6e3 -> fold 0xd6e4; checksum = !0xd6e4 = 0x291b.
    /// (Cross-checked once against scapy 2.8.0's `Ether/IPv6(hlim=64)/UDP/"ping"`.)
    #[test]
    fn udp6_matches_hand_checked_bytes() {
        let want = hex("020000000002 020000000001 86dd
             60000000 000c 11 40
             20010db8000000000000000000000001
             20010db8000000000000000000000002
             9c40 0035 000c 291b 70696e67");
        let got = Frame::udp6(C6, 40000, V6, 53).with_payload(b"ping").build();
        assert_bytes(&want, &got);
        verify_checksums(&got).unwrap();
    }

    /// The worked example of RFC 1071 section 3: 0001 f203 f4f5 f6f7 sums to 0xddf2.
    #[test]
    fn ipv4_checksum_rfc1071_example() {
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(ipv4_checksum(&data), !0xddf2);
        // Odd length: the last byte is padded with zero.
        assert_eq!(ipv4_checksum(&[0x01]), !0x0100);
        // A header with its checksum in place sums to zero.
        let f = Frame::udp4(C4, 1, V4, 2).build();
        assert_eq!(ipv4_checksum(&f[14..34]), 0);
    }

    #[test]
    fn verify_accepts_every_kind() {
        for (name, f) in all_kinds() {
            let b = f.build();
            verify_checksums(&b).unwrap_or_else(|e| panic!("{name}: {e}"));
            let lay = parse(&b).unwrap();
            assert_eq!(lay.l3_end, b.len(), "{name}: no padding, nothing missing");
            assert_eq!(lay.proto, f.l4_proto(), "{name}");
            assert_eq!(lay.l4(&b).len(), l4_len(&f), "{name}");
            assert_eq!(l3_offset(&b), if f.vlan.is_some() { 18 } else { 14 });
        }
        let arp = arp_request(DEFAULT_SRC_MAC, C4, V4);
        verify_checksums(&arp).unwrap();
    }

    fn l4_len(f: &Frame) -> usize {
        f.payload.len()
            + match &f.l4 {
                L4::Tcp { .. } => TCP_HLEN,
                L4::Udp { .. } => UDP_HLEN,
                L4::Icmp => ICMP_HLEN,
                L4::Raw { bytes, .. } => bytes.len(),
            }
    }

    /// Flips one byte (three ways) at every offset of every checksum-covered region of every
    /// kind of frame, and expects the verifier to name the right checksum.
    #[test]
    fn verify_rejects_flipped_byte_in_each_covered_region() {
        for (name, f) in all_kinds() {
            let good = f.build();
            let lay = parse(&good).unwrap();
            let l3 = lay.l3_offset;
            let l4name = match lay.proto {
                IPPROTO_TCP => "TCP",
                IPPROTO_UDP => "UDP",
                IPPROTO_ICMP => "ICMP",
                IPPROTO_ICMPV6 => "ICMPv6",
                p => panic!("{name}: proto {p}"),
            };
            // (region, offsets, text the error must hold; None: any error)
            let mut regions: Vec<(&str, Vec<usize>, Option<&str>)> = Vec::new();
            if lay.ethertype == ETH_P_IPV4 {
                // Every byte of the header, options included; byte 0 (version/IHL) and the
                // total length change the layout, so any error will do there.
                let (fixed, moving): (Vec<usize>, Vec<usize>) = (l3..l3 + lay.l3_header_len)
                    .partition(|&i| i != l3 && i != l3 + 2 && i != l3 + 3);
                regions.push(("IPv4 header", fixed, Some("IPv4 header checksum")));
                regions.push(("IPv4 layout", moving, None));
                // The addresses are also in the pseudo-header, but the header checksum is
                // checked (and named) first.
            } else {
                // The addresses, covered by the pseudo-header.
                regions.push(("IPv6 addresses", (l3 + 8..l3 + 40).collect(), Some(l4name)));
            }
            regions.push((
                "L4 header and payload",
                (lay.l4_offset..good.len()).collect(),
                Some(l4name),
            ));
            for (region, offsets, text) in regions {
                assert!(!offsets.is_empty(), "{name}: {region} empty");
                for i in offsets {
                    for mask in [0x01u8, 0x80, 0xff] {
                        let mut bad = good.clone();
                        bad[i] ^= mask;
                        match verify_checksums(&bad) {
                            Ok(()) => panic!(
                                "{name}: {region}: byte {i} ^ {mask:#04x} not detected\n{}",
                                hex_diff(&good, &bad)
                            ),
                            Err(e) => {
                                if let Some(text) = text {
                                    assert!(
                                        e.contains(text),
                                        "{name}: {region}: byte {i}: error {e:?} should name \
                                         {text}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn ext_chain_next_headers_and_payload_length() {
        let f = Frame::udp6(C6, 5353, V6, 53)
            .with_ext(Ext::HopByHop(8))
            .with_ext(Ext::Routing(24))
            .with_ext(Ext::Fragment {
                offset: 0x1abc,
                more: true,
                id: 0x0102_0304,
            })
            .with_ext(Ext::DestOpts(16))
            .with_payload(b"12345");
        let b = f.build();
        let l3 = 14;
        assert_eq!(be16(&b, 12), ETH_P_IPV6);
        let plen = 8 + 24 + 8 + 16 + UDP_HLEN + 5;
        assert_eq!(usize::from(be16(&b, l3 + 4)), plen);
        assert_eq!(b.len(), l3 + IPV6_HLEN + plen);
        assert_eq!(b[l3 + 6], IPPROTO_HOPOPTS);

        // Hop-by-hop: next header routing, length 0 (8 bytes), PadN of 4.
        let hbh = l3 + 40;
        assert_eq!(&b[hbh..hbh + 8], &[43, 0, 1, 4, 0, 0, 0, 0]);
        // Routing: next header fragment, length 2 (24 bytes), type 0, segments left 0.
        let rt = hbh + 8;
        assert_eq!(&b[rt..rt + 4], &[44, 2, 0, 0]);
        assert!(b[rt + 4..rt + 24].iter().all(|&x| x == 0));
        // Fragment: next header destination options, offset << 3 | M, id.
        let fr = rt + 24;
        assert_eq!(&b[fr..fr + 8], &[60, 0, 0xd5, 0xe1, 0x01, 0x02, 0x03, 0x04]);
        assert_eq!(be16(&b, fr + 2) >> 3, 0x1abc);
        // Destination options: next header UDP, length 1 (16 bytes), filled with one option.
        let dst = fr + 8;
        assert_eq!(&b[dst..dst + 4], &[IPPROTO_UDP, 1, OPT_EXPERIMENTAL, 12]);
        let udp = dst + 16;
        assert_eq!(be16(&b, udp + 2), 53);
        assert_eq!(usize::from(be16(&b, udp + 4)), UDP_HLEN + 5);

        let lay = parse(&b).unwrap();
        assert_eq!(lay.l4_offset, udp);
        assert_eq!(lay.proto, IPPROTO_UDP);
        assert!(lay.fragment);
        assert!(lay.non_first_fragment);
        assert_eq!(lay.ports(&b), None);

        // Each kind of header alone, straight into TCP.
        for (e, code) in [
            (Ext::HopByHop(16), 0),
            (Ext::Routing(8), 43),
            (
                Ext::Fragment {
                    offset: 0,
                    more: false,
                    id: 1,
                },
                44,
            ),
            (Ext::DestOpts(2048), 60),
        ] {
            let len = e.wire_len();
            let b = Frame::tcp6(C6, 1, V6, 2).with_ext(e).build();
            assert_eq!(b[l3 + 6], code);
            assert_eq!(b[l3 + 40], IPPROTO_TCP);
            if code != 44 {
                assert_eq!((usize::from(b[l3 + 41]) + 1) * 8, len);
            }
            assert_eq!(usize::from(be16(&b, l3 + 4)), len + TCP_HLEN);
            let lay = parse(&b).unwrap();
            assert_eq!(lay.l4_offset, l3 + 40 + len);
            assert_eq!(lay.ports(&b), Some((1, 2)));
            verify_checksums(&b).unwrap();
        }
    }

    #[test]
    fn options_fill_is_well_formed() {
        // Walk the TLVs of options headers of every size: they must tile the header exactly,
        // with no padding run longer than 7 bytes (Linux's limit).
        for n in (8..=2048).step_by(8) {
            let mut out = Vec::new();
            Ext::DestOpts(n).write(IPPROTO_NONE, &mut out);
            assert_eq!(out.len(), n);
            let mut at = 2;
            while at < n {
                match out[at] {
                    0 => at += 1,
                    1 => {
                        assert!(out[at + 1] <= 5, "n {n}: PadN of {}", out[at + 1]);
                        at += 2 + usize::from(out[at + 1]);
                    }
                    OPT_EXPERIMENTAL => at += 2 + usize::from(out[at + 1]),
                    t => panic!("n {n}: option type {t}"),
                }
            }
            assert_eq!(at, n, "n {n}: options overrun");
        }
    }

    #[test]
    fn ipv4_options_set_ihl_and_lengths() {
        let opts = [0x94, 0x04, 0x00, 0x00, 0x01, 0x01, 0x01, 0x00];
        let b = Frame::tcp4(C4, 1000, V4, 80)
            .with_ipv4_options(&opts)
            .with_payload(b"xy")
            .build();
        assert_eq!(b[14], 0x47);
        assert_eq!(be16(&b, 16), 28 + 20 + 2);
        assert_eq!(&b[34..42], &opts);
        assert_eq!(be16(&b, 42), 1000);
        assert_eq!(b.len(), 14 + 28 + 20 + 2);
        let lay = parse(&b).unwrap();
        assert_eq!(lay.l4_offset, 42);
        assert_eq!(lay.ports(&b), Some((1000, 80)));
        verify_checksums(&b).unwrap();
    }

    #[test]
    #[should_panic(expected = "multiple of 4")]
    fn ipv4_options_must_be_words() {
        Frame::tcp4(C4, 1, V4, 2).with_ipv4_options(&[1, 1]).build();
    }

    #[test]
    fn vlan_tag_layout() {
        let plain = Frame::udp4(C4, 1, V4, 2).with_payload(b"z").build();
        let tagged = Frame::udp4(C4, 1, V4, 2)
            .with_payload(b"z")
            .with_vlan(0xa123)
            .build();
        assert_eq!(tagged.len(), plain.len() + 4);
        assert_eq!(&tagged[12..18], &[0x81, 0x00, 0xa1, 0x23, 0x08, 0x00]);
        assert_eq!(&tagged[18..], &plain[14..]);
        assert_eq!(l3_offset(&tagged), 18);
        assert_eq!(l3_offset(&plain), 14);
        assert_eq!(parse(&tagged).unwrap().vlan, Some(0xa123));
        assert_eq!(parse(&plain).unwrap().vlan, None);
    }

    #[test]
    fn icmp_echo_requests() {
        let b4 = Frame::icmp4(C4, V4).build();
        assert_eq!(b4[14 + 9], IPPROTO_ICMP);
        assert_eq!(&b4[34..36], &[ICMP_ECHO_REQUEST, 0]);
        assert_eq!(&b4[38..42], &[0, 1, 0, 1]);
        assert_eq!(b4.len(), 14 + 20 + 8);
        let b6 = Frame::icmp6(C6, V6).build();
        assert_eq!(b6[14 + 6], IPPROTO_ICMPV6);
        assert_eq!(&b6[54..56], &[ICMPV6_ECHO_REQUEST, 0]);
        verify_checksums(&b4).unwrap();
        verify_checksums(&b6).unwrap();
    }

    /// Pick the payload so the computed UDP checksum is 0: it must go out as 0xffff, and a
    /// zero must be refused by the verifier.
    #[test]
    fn udp_zero_checksum_becomes_ffff() {
        for f in [Frame::udp4(C4, 7, V4, 9), Frame::udp6(C6, 7, V6, 9)] {
            let b = f.clone().with_payload(&[0, 0]).build();
            let at = l3_offset(&b) + if f.l3.is_v6() { 40 } else { 20 } + 6;
            // With a zero payload word the checksum is !S; a payload word of !S makes the
            // sum 0xffff, so the checksum computes to 0.
            let c = [b[at], b[at + 1]];
            let mut b = f.with_payload(&c).build();
            assert_eq!(&b[at..at + 2], &[0xff, 0xff]);
            verify_checksums(&b).unwrap();
            b[at..at + 2].fill(0);
            assert!(verify_checksums(&b).unwrap_err().contains("UDP checksum"));
        }
    }

    #[test]
    fn truncated_frames_are_errors_not_panics() {
        for (name, f) in all_kinds() {
            let b = f.build();
            for n in 0..b.len() {
                assert!(
                    verify_checksums(&b[..n]).is_err(),
                    "{name}: truncated to {n} passes"
                );
                assert!(parse(&b[..n]).is_err(), "{name}: truncated to {n} parses");
            }
            // Link padding after the IP packet is ignored.
            let mut padded = b.clone();
            padded.resize(b.len().max(60) + 4, 0);
            verify_checksums(&padded).unwrap_or_else(|e| panic!("{name} padded: {e}"));
        }
    }

    #[test]
    fn raw_l4_and_fragments() {
        let b = Frame::new(
            L3::v4(C4, V4),
            L4::Raw {
                proto: 47,
                bytes: vec![0, 0, 0x08, 0x00],
            },
        )
        .with_payload(b"inner")
        .build();
        assert_eq!(b[23], 47);
        assert_eq!(&b[34..], b"\x00\x00\x08\x00inner");
        verify_checksums(&b).unwrap();

        // A non-first IPv4 fragment: header checksum checked, L4 not.
        let b = Frame::udp4(C4, 1, V4, 2)
            .with_ipv4_frag(IPV4_MF | 3, 9)
            .with_payload(b"data")
            .build();
        assert_eq!(be16(&b, 20), 0x2003);
        let lay = parse(&b).unwrap();
        assert!(lay.fragment && lay.non_first_fragment);
        let mut bad = b.clone();
        bad[40] ^= 1;
        verify_checksums(&bad).unwrap();
        bad[22] ^= 1; // TTL
        assert!(verify_checksums(&bad).is_err());
    }

    #[test]
    fn recompute_after_mutation() {
        for (name, f) in all_kinds() {
            let mut b = f.build();
            let lay = parse(&b).unwrap();
            // Rewrite the destination address (as a NAT would) and the MACs.
            let at = lay.l3_offset + if lay.ethertype == ETH_P_IPV4 { 19 } else { 39 };
            b[at] ^= 0x5a;
            set_dst_mac(&mut b, [2, 9, 9, 9, 9, 9]);
            set_src_mac(&mut b, [2, 8, 8, 8, 8, 8]);
            assert!(verify_checksums(&b).is_err(), "{name}");
            recompute_checksums(&mut b).unwrap();
            verify_checksums(&b).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(dst_mac(&b), [2, 9, 9, 9, 9, 9]);
            assert_eq!(src_mac(&b), [2, 8, 8, 8, 8, 8]);
        }
    }

    #[test]
    fn arp_request_layout() {
        let b = arp_request(DEFAULT_SRC_MAC, C4, V4);
        assert_eq!(b.len(), 42);
        assert_eq!(be16(&b, 12), ETH_P_ARP);
        assert_eq!(&b[0..6], &[0xff; 6]);
        assert_eq!(&b[28..32], &C4.octets());
        assert_eq!(&b[38..42], &V4.octets());
        assert!(parse(&b).unwrap_err().contains("0x0806"));
    }

    #[test]
    fn hex_diff_marks_differences() {
        let want: Vec<u8> = (0..40).collect();
        assert_eq!(hex_diff(&want, &want), "identical (40 bytes)");

        let mut got = want.clone();
        got[17] = 0xaa;
        got[18] = 0xbb;
        got.truncate(38);
        let d = hex_diff(&want, &got);
        assert!(
            d.starts_with(
                "want 40 bytes, got 38 bytes, 4 differ at offsets 0x0011-0x0012, 0x0026-0x0027"
            ),
            "{d}"
        );
        // Line 0x0000 is identical and left out; 0x0010 and 0x0020 are shown.
        assert!(!d.contains("\n0000 "), "{d}");
        assert!(d.contains("0010 want 10 11 12 13"), "{d}");
        assert!(d.contains("     got  10 aa bb 13"), "{d}");
        assert!(d.contains("           ^^ ^^\n"), "{d}");
        assert!(d.contains("0020 want 20 21 22 23 24 25 26 27"), "{d}");
        assert!(d.contains("     got  20 21 22 23 24 25 -- --"), "{d}");
    }
}
