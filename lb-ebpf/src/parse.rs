//! Packet parsing: Ethernet (one 802.1Q/802.1ad tag), IPv4 (IHL honoured), IPv6 (a bounded
//! extension chain), TCP/UDP ports. Nothing else in the program touches `ctx.data()`.
//!
//! The flow key is built as five u64 words in registers and stored with five stores: it is
//! hashed and used as a map key right after, and both read it in words; building it byte by
//! byte made every one of those reads a failed store-to-load forward (measured: ~45 ns of a
//! 50 ns non-VIP pass).

use aya_ebpf::programs::XdpContext;
use lb_common::{
    counter, FlowKey, FLOW_W4_FIN_SHIFT, FLOW_W4_L4_SHIFT, FLOW_W4_SYN_SHIFT, IPPROTO_TCP,
    IPPROTO_UDP, MAX_IPV6_EXT_HEADERS,
};

use crate::stats::Reason;

const ETH_HLEN: usize = 14;
// Ethertypes as the u16 a little-endian load of the packet bytes gives.
const ETH_P_IP: u16 = 0x0800u16.to_be();
const ETH_P_IPV6: u16 = 0x86DDu16.to_be();
const ETH_P_8021Q: u16 = 0x8100u16.to_be();
const ETH_P_8021AD: u16 = 0x88A8u16.to_be();
const IPV6_HLEN: usize = 40;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;
/// IPv4 flags+offset (as loaded, network order): MF set or a non-zero offset is a fragment.
const IP_MF_OFFSET_MASK: u16 = 0x3FFFu16.to_be();
/// Bits of the TCP flags byte (offset 13).
const TCP_FLAG_FIN: u8 = 0x01;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_RST: u8 = 0x04;
const TCP_FLAG_ACK: u8 = 0x10;

/// The bytes of the L4 header the balancer reads: TCP (ports, flags) or UDP (ports); none of
/// the rest, which is passed as an unknown L4 anyway.
#[inline(always)]
fn l4_header_len(proto: u8) -> usize {
    match proto {
        IPPROTO_TCP => 20,
        IPPROTO_UDP => 8,
        _ => 0,
    }
}
/// Bytes 8..16 of a v4-mapped address before the IPv4 address: `00 00 ff ff`.
const V4_MAPPED_PREFIX: u64 = 0xFFFF_0000;

/// Pointer to a `T` at `off` bytes into the frame, or `Truncated` when the frame is shorter.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Result<*const T, Reason> {
    lb_ebpf::ptr_at(ctx, off).ok_or(counter::PASS_TRUNCATED)
}

#[inline(always)]
pub fn ptr_at_mut<T>(ctx: &XdpContext, off: usize) -> Result<*mut T, Reason> {
    lb_ebpf::ptr_at_mut(ctx, off).ok_or(counter::PASS_TRUNCATED)
}

/// Load an integer from the frame at `base + off` (checked by the caller's `ptr_at` of the
/// whole header). Deliberately a plain, possibly misaligned load: the JITs xlb runs on
/// (x86_64, arm64) have no alignment faults and the verifier allows misaligned packet access
/// there, as Katran's C relies on; the byte-wise loads of `read_unaligned` cost 4-8x the
/// instructions on the hottest path.
#[inline(always)]
pub fn load<T: Copy>(base: *const u8, off: usize) -> T {
    // SAFETY: in bounds per the caller's check; see above for alignment.
    unsafe { core::ptr::read(base.add(off) as *const T) }
}

/// Store an integer into the frame (or a map value) at `base + off`, as `load` reads: one
/// possibly misaligned store, where an array copy would be a store per byte.
#[inline(always)]
pub fn store<T: Copy>(base: *mut u8, off: usize, v: T) {
    // SAFETY: in bounds per the caller's check; see `load` for alignment.
    unsafe { core::ptr::write(base.add(off) as *mut T, v) }
}

pub enum Parsed {
    /// A TCP or UDP packet. A TCP SYN (a connection that starts: balanced again from the ring
    /// whatever the connection table says) has `FLOW_W4_SYN` set in its last word, a FIN or
    /// RST `FLOW_W4_FIN`.
    Flow(FlowKey),
    /// An IPv4/IPv6 fragment: only the addresses (words 0 to 3) are filled in.
    Fragment(FlowKey),
    /// ICMP over IPv4 or ICMPv6: the addresses are filled in; the ICMP header is at `l4`.
    Icmp { key: FlowKey, l3: usize, l4: usize },
}

#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Parsed, Reason> {
    let pkt_len = ctx.data_end() - ctx.data();
    let eth = ptr_at::<[u8; ETH_HLEN]>(ctx, 0)? as *const u8;
    let mut ethertype: u16 = load(eth, 12);
    let mut l3 = ETH_HLEN;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        let tag = ptr_at::<[u8; 4]>(ctx, ETH_HLEN)? as *const u8;
        ethertype = load(tag, 2);
        l3 = ETH_HLEN + 4;
    }
    let mut w = [0u64; 5];
    let (proto, l4) = if ethertype == ETH_P_IP {
        let ip = ptr_at::<[u8; 20]>(ctx, l3)? as *const u8;
        let vihl: u8 = load(ip, 0);
        if vihl >> 4 != 4 {
            return Err(counter::DROP_BAD_HEADER);
        }
        let ihl = ((vihl & 0x0F) as usize) * 4;
        if ihl < 20 {
            return Err(counter::DROP_BAD_HEADER);
        }
        let tot_len = u16::from_be(load(ip, 2)) as usize;
        if tot_len < ihl {
            return Err(counter::DROP_BAD_HEADER);
        }
        let ip_end = l3 + tot_len;
        if ip_end > pkt_len {
            return Err(counter::PASS_TRUNCATED);
        }
        w[3] = V4_MAPPED_PREFIX | (load::<u32>(ip, 16) as u64) << 32;
        w[1] = V4_MAPPED_PREFIX | (load::<u32>(ip, 12) as u64) << 32;
        if load::<u16>(ip, 6) & IP_MF_OFFSET_MASK != 0 {
            return Ok(Parsed::Fragment(FlowKey::from_words(w)));
        }
        let proto: u8 = load(ip, 9);
        if proto == IPPROTO_ICMP {
            return Ok(Parsed::Icmp {
                key: FlowKey::from_words(w),
                l3,
                l4: l3 + ihl,
            });
        }
        // The L4 header must lie within the IP packet, not only within the frame: what
        // follows the packet (Ethernet padding) is no port. Checked here, where the lengths
        // are at hand, so that nothing more stays live to the end.
        if ihl + l4_header_len(proto) > tot_len {
            return Err(counter::PASS_TRUNCATED);
        }
        (proto, l3 + ihl)
    } else if ethertype == ETH_P_IPV6 {
        let ip = ptr_at::<[u8; IPV6_HLEN]>(ctx, l3)? as *const u8;
        if load::<u8>(ip, 0) >> 4 != 6 {
            return Err(counter::DROP_BAD_HEADER);
        }
        let ip_end = l3 + IPV6_HLEN + u16::from_be(load(ip, 4)) as usize;
        if ip_end > pkt_len {
            return Err(counter::PASS_TRUNCATED);
        }
        w[0] = load(ip, 8);
        w[1] = load(ip, 16);
        w[2] = load(ip, 24);
        w[3] = load(ip, 32);
        // ::ffff:a.b.c.d is how the maps spell IPv4: such a destination would match an IPv4
        // VIP. No IPv6 packet may carry one (RFC 4291 2.5.5.2); they are the host's to refuse.
        if w[2] == 0 && w[3] & 0xFFFF_FFFF == V4_MAPPED_PREFIX {
            return Err(counter::PASS_V4_MAPPED);
        }
        let mut nexthdr: u8 = load(ip, 6);
        let mut off = l3 + IPV6_HLEN;
        // Bounded by a constant for the verifier; a longer chain is passed, counted.
        for _ in 0..MAX_IPV6_EXT_HEADERS {
            match nexthdr {
                NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                    let h = ptr_at::<[u8; 2]>(ctx, off)? as *const u8;
                    nexthdr = load(h, 0);
                    off += (load::<u8>(h, 1) as usize + 1) * 8;
                }
                NEXTHDR_AUTH => {
                    let h = ptr_at::<[u8; 2]>(ctx, off)? as *const u8;
                    nexthdr = load(h, 0);
                    off += (load::<u8>(h, 1) as usize + 2) * 4;
                }
                NEXTHDR_FRAGMENT => return Ok(Parsed::Fragment(FlowKey::from_words(w))),
                _ => break,
            }
        }
        // A fragment header right after the last header walked is still a fragment (the
        // fragment policy holds however long the chain before it).
        if nexthdr == NEXTHDR_FRAGMENT {
            return Ok(Parsed::Fragment(FlowKey::from_words(w)));
        }
        if matches!(
            nexthdr,
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH
        ) {
            return Err(counter::PASS_IPV6_EXT);
        }
        if nexthdr == IPPROTO_ICMPV6 {
            return Ok(Parsed::Icmp {
                key: FlowKey::from_words(w),
                l3,
                l4: off,
            });
        }
        // Extension headers and the L4 header within the payload length (as for IPv4).
        if off + l4_header_len(nexthdr) > ip_end {
            return Err(counter::PASS_TRUNCATED);
        }
        (nexthdr, off)
    } else {
        return Err(counter::PASS_NOT_IP);
    };
    // Both ports in one load: src_port_be | dst_port_be << 16, the packet's byte order.
    w[4] = match proto {
        IPPROTO_TCP => {
            let tcp = ptr_at::<[u8; 20]>(ctx, l4)? as *const u8;
            // SYN without ACK: a client opening a connection (a SYN-ACK is no new flow).
            let flags = load::<u8>(tcp, 13);
            let syn = flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN;
            // FIN or RST: the client closes (the flow stops counting as its real's).
            let fin = flags & (TCP_FLAG_FIN | TCP_FLAG_RST) != 0;
            load::<u32>(tcp, 0) as u64
                | (syn as u64) << FLOW_W4_SYN_SHIFT
                | (fin as u64) << FLOW_W4_FIN_SHIFT
        }
        IPPROTO_UDP => load::<u32>(ptr_at::<[u8; 8]>(ctx, l4)? as *const u8, 0) as u64,
        _ => return Err(counter::PASS_UNKNOWN_L4),
    } | (proto as u64) << 32
        | (l4 as u64) << FLOW_W4_L4_SHIFT;
    Ok(Parsed::Flow(FlowKey::from_words(w)))
}
