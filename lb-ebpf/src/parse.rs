//! Packet parsing: Ethernet (one 802.1Q/802.1ad tag), IPv4 (IHL honoured), IPv6 (a bounded
//! extension chain), TCP/UDP ports. Nothing else in the program touches `ctx.data()`.

use aya_ebpf::programs::XdpContext;
use lb_common::{FlowKey, IPPROTO_TCP, IPPROTO_UDP, MAX_IPV6_EXT_HEADERS};

use crate::stats::Reason;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const IPV6_HLEN: usize = 40;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;
/// IPv4 flags+offset: MF set or a non-zero offset means a fragment (DF alone does not).
const IP_MF_OFFSET_MASK: u16 = 0x3FFF;

/// Pointer to a `T` at `off` bytes into the frame, or `Truncated` when the frame is shorter.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Result<*const T, Reason> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return Err(Reason::Truncated);
    }
    Ok((start + off) as *const T)
}

#[inline(always)]
pub fn ptr_at_mut<T>(ctx: &XdpContext, off: usize) -> Result<*mut T, Reason> {
    ptr_at::<T>(ctx, off).map(|p| p as *mut T)
}

pub enum Parsed {
    /// A TCP or UDP packet: the whole key is filled in.
    Flow,
    /// An IPv4/IPv6 fragment: only `key.dst` is filled in.
    Fragment,
}

#[inline(always)]
fn be16(b: &[u8], i: usize) -> u16 {
    // Indexes are constants at every call site; `get` keeps a panic unreachable.
    match (b.get(i), b.get(i + 1)) {
        (Some(h), Some(l)) => u16::from_be_bytes([*h, *l]),
        _ => 0,
    }
}

/// Fill `key` (zeroed by the caller) from the frame.
#[inline(always)]
pub fn parse(ctx: &XdpContext, key: &mut FlowKey) -> Result<Parsed, Reason> {
    let pkt_len = ctx.data_end() - ctx.data();
    // SAFETY (all derefs below): every pointer comes from ptr_at, which checked the bounds.
    let eth: &[u8; ETH_HLEN] = unsafe { &*ptr_at(ctx, 0)? };
    let mut ethertype = be16(eth, 12);
    let mut l3 = ETH_HLEN;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        let tag: &[u8; 4] = unsafe { &*ptr_at(ctx, ETH_HLEN)? };
        ethertype = be16(tag, 2);
        l3 = ETH_HLEN + 4;
    }
    let (proto, l4) = match ethertype {
        ETH_P_IP => {
            let ip: &[u8; 20] = unsafe { &*ptr_at(ctx, l3)? };
            if ip[0] >> 4 != 4 {
                return Err(Reason::BadHeader);
            }
            let ihl = ((ip[0] & 0x0F) as usize) * 4;
            if ihl < 20 {
                return Err(Reason::BadHeader);
            }
            let tot_len = be16(ip, 2) as usize;
            if tot_len < ihl {
                return Err(Reason::BadHeader);
            }
            if l3 + tot_len > pkt_len {
                return Err(Reason::Truncated);
            }
            key.dst[10] = 0xFF;
            key.dst[11] = 0xFF;
            key.dst[12..16].copy_from_slice(&ip[16..20]);
            if be16(ip, 6) & IP_MF_OFFSET_MASK != 0 {
                return Ok(Parsed::Fragment);
            }
            key.src[10] = 0xFF;
            key.src[11] = 0xFF;
            key.src[12..16].copy_from_slice(&ip[12..16]);
            (ip[9], l3 + ihl)
        }
        ETH_P_IPV6 => {
            let ip: &[u8; IPV6_HLEN] = unsafe { &*ptr_at(ctx, l3)? };
            if ip[0] >> 4 != 6 {
                return Err(Reason::BadHeader);
            }
            if l3 + IPV6_HLEN + be16(ip, 4) as usize > pkt_len {
                return Err(Reason::Truncated);
            }
            key.dst.copy_from_slice(&ip[24..40]);
            key.src.copy_from_slice(&ip[8..24]);
            let mut nexthdr = ip[6];
            let mut off = l3 + IPV6_HLEN;
            // Bounded by a constant for the verifier; a longer chain is passed, counted.
            for _ in 0..MAX_IPV6_EXT_HEADERS {
                match nexthdr {
                    NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                        let h: &[u8; 2] = unsafe { &*ptr_at(ctx, off)? };
                        nexthdr = h[0];
                        off += (h[1] as usize + 1) * 8;
                    }
                    NEXTHDR_AUTH => {
                        let h: &[u8; 2] = unsafe { &*ptr_at(ctx, off)? };
                        nexthdr = h[0];
                        off += (h[1] as usize + 2) * 4;
                    }
                    NEXTHDR_FRAGMENT => return Ok(Parsed::Fragment),
                    _ => break,
                }
            }
            if matches!(
                nexthdr,
                NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH | NEXTHDR_FRAGMENT
            ) {
                return Err(Reason::Ipv6Ext);
            }
            (nexthdr, off)
        }
        _ => return Err(Reason::NotIp),
    };
    match proto {
        IPPROTO_TCP => {
            let tcp: &[u8; 20] = unsafe { &*ptr_at(ctx, l4)? };
            key.src_port_be = u16::from_ne_bytes([tcp[0], tcp[1]]);
            key.dst_port_be = u16::from_ne_bytes([tcp[2], tcp[3]]);
        }
        IPPROTO_UDP => {
            let udp: &[u8; 8] = unsafe { &*ptr_at(ctx, l4)? };
            key.src_port_be = u16::from_ne_bytes([udp[0], udp[1]]);
            key.dst_port_be = u16::from_ne_bytes([udp[2], udp[3]]);
        }
        _ => return Err(Reason::UnknownL4),
    }
    key.proto = proto;
    Ok(Parsed::Flow)
}
