//! Tunnel mode: the packet, whole, inside an outer IPv4 or IPv6 header of the real's family
//! (whatever the inner one: IPIP, IP6IP6, 6in4 and 4in6), optionally behind a GUE variant 1
//! UDP header, sent to the next hop's MAC: back out of the interface it came in by
//! (`XDP_TX`), or out of another one through the `TX_PORTS` devmap (`XDP_REDIRECT`) when the
//! route to the real leaves by that one (`Real::egress`).
//!
//! Outer fields, as the kernel's own tunnels set them with `ttl inherit` and `tos inherit`:
//! TTL / hop limit and DSCP/ECN copied from the inner packet, IPv4 DF set (the balancer
//! answers "fragmentation needed" itself, so nothing on the path should fragment), IPv4 id 0.
//! Per flow, from the flow hash: the GUE source port, the IPv6 flow label, and the source
//! address bits named by `TunnelConf::src*_hash_mask`, so that routers' ECMP and the real's RSS
//! spread the flows.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{
    counter, Real, ENCAP_GUE, IPPROTO_TCP, IPPROTO_UDP, REAL_F_NEXT_HOP_PASS, REAL_F_V6,
};
use lb_ebpf::csum::{fold, sum_be};

use crate::{
    maps::{EGRESS, TUNNEL, TX_PORTS},
    parse::{load, ptr_at, ptr_at_mut, store},
    stats::{self, Reason},
    trace::Noted,
};

const IPPROTO_IPIP: u8 = 4;
const IPPROTO_IPV6: u8 = 41;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const GUE_HLEN: usize = 8;
/// GUE source ports: the dynamic range, 14 bits of the flow hash.
const GUE_SPORT_BASE: u16 = 0xC000;
const GUE_SPORT_MASK: u16 = 0x3FFF;

/// What the outer headers need from the inner packet, read before the frame grows.
struct Inner {
    /// The inner IP packet's length (header included), not the frame's: Ethernet padding
    /// stays outside the tunnel's payload.
    len: u32,
    tos: u8,
    ttl: u8,
    v4: bool,
    /// IPv4 "don't fragment".
    df: bool,
    /// Sum of the GUE payload (the inner packet) for the outer UDP checksum over IPv6, from
    /// the inner checksums (see `inner_sum`); `None` when it cannot be had that way.
    sum: Option<u32>,
}

/// The inner packet's one's complement sum without reading its payload: its IPv4 header
/// sums to zero (it carries its own checksum) and its TCP/UDP segment sums to the complement
/// of its pseudo-header (it carries the L4 checksum), so only the few fields that are in
/// neither are summed. Holds for packets with valid checksums, which are the only ones the
/// real accepts anyway. `None` for an inner UDP/IPv4 packet without a checksum and an IPv6
/// inner packet with extension headers.
#[inline(always)]
fn inner_sum_v4(ip: &[u8; 20], l4_csum: u16) -> Option<u32> {
    let proto = ip[9];
    if proto == IPPROTO_UDP && l4_csum == 0 {
        return None;
    }
    let ihl = u32::from(ip[0] & 0x0F) * 4;
    let tot = u32::from(u16::from_be_bytes([ip[2], ip[3]]));
    let pseudo = u32::from(u16::from_be_bytes([ip[12], ip[13]]))
        + u32::from(u16::from_be_bytes([ip[14], ip[15]]))
        + u32::from(u16::from_be_bytes([ip[16], ip[17]]))
        + u32::from(u16::from_be_bytes([ip[18], ip[19]]))
        + u32::from(proto)
        + (tot.wrapping_sub(ihl) & 0xFFFF);
    Some(u32::from(!fold(pseudo)))
}

#[inline(always)]
fn inner_sum_v6(ip: &[u8; 40]) -> Option<u32> {
    let nh = ip[6];
    if nh != IPPROTO_TCP && nh != IPPROTO_UDP {
        return None;
    }
    // Addresses are in both the header and the pseudo-header: they cancel. Left: the first
    // four bytes, the payload length and next header/hop limit word, minus the pseudo-
    // header's length and next header.
    let plen = u32::from(u16::from_be_bytes([ip[4], ip[5]]));
    let head = u32::from(u16::from_be_bytes([ip[0], ip[1]]))
        + u32::from(u16::from_be_bytes([ip[2], ip[3]]))
        + plen
        + u32::from(u16::from_be_bytes([ip[6], ip[7]]));
    // x - y in one's complement is x + !y.
    Some(head + u32::from(!fold(plen + u32::from(nh))))
}

#[inline(always)]
fn read_inner(ctx: &XdpContext, l3: usize, v4: bool, want_sum: bool) -> Result<Inner, Reason> {
    if v4 {
        let ip = ptr_at::<[u8; 20]>(ctx, l3)?;
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &*ip };
        let mut sum = None;
        if want_sum {
            let ihl = usize::from(ip[0] & 0x0F) * 4;
            let off = if ip[9] == IPPROTO_TCP { 16 } else { 6 };
            let c = ptr_at::<[u8; 2]>(ctx, l3 + ihl + off)?;
            // SAFETY: bounds checked by ptr_at.
            sum = inner_sum_v4(ip, u16::from_be_bytes(unsafe { *c }));
        }
        Ok(Inner {
            len: u32::from(u16::from_be_bytes([ip[2], ip[3]])),
            tos: ip[1],
            ttl: ip[8],
            v4: true,
            df: ip[6] & 0x40 != 0,
            sum,
        })
    } else {
        let ip = ptr_at::<[u8; 40]>(ctx, l3)?;
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &*ip };
        Ok(Inner {
            len: u32::from(u16::from_be_bytes([ip[4], ip[5]])) + 40,
            tos: (ip[0] << 4) | (ip[1] >> 4),
            ttl: ip[7],
            v4: false,
            df: true,
            sum: if want_sum { inner_sum_v6(ip) } else { None },
        })
    }
}

/// Encapsulate the frame's packet to `real` (a tunnel real) and send it. `hash16` is the
/// flow hash's lower half.
///
/// Headers are written as whole words, from values held in registers (an array built on the
/// stack and copied is a store per byte, and each of its later word reads a failed
/// store-to-load forward). Words are the packet's bytes read natively, so one's complement
/// sums of them are the byte-swapped sums of the big-endian words: the IPv4 checksum, summed
/// and stored natively, comes out right (RFC 1071, 2.(B)).
#[inline(always)]
pub fn encap(ctx: &XdpContext, real: &Real, hash16: u32) -> Result<Noted, Reason> {
    let conf = TUNNEL.get(0).ok_or(counter::DROP_NO_TUNNEL_SOURCE)?;
    let eth = ptr_at::<[u8; 14]>(ctx, 0)? as *const u8;
    // The frame's destination (our MAC) and source, in words.
    let (to_lo, to_hi): (u32, u16) = (load(eth, 0), load(eth, 4));
    let (from_lo, from_hi): (u32, u16) = (load(eth, 6), load(eth, 10));
    let tpid: u16 = load(eth, 12);
    // Leaving by the ingress interface, the frame's source is the address it was sent to.
    let port = real.egress;
    let (mut mac_lo, mut mac_hi) = (to_lo, to_hi);
    let mut mtu = conf.mtu;
    if port != 0 {
        // SAFETY: a lookup whose value is copied out at once.
        let out = unsafe { EGRESS.get(port) }.ok_or(counter::DROP_TX_PORT)?;
        let m = out.mac.as_ptr();
        (mac_lo, mac_hi) = (load(m, 0), load(m, 4));
        mtu = out.mtu;
    }
    let mut ethertype = tpid;
    let mut l3 = 14;
    let mut tci = 0u16;
    if tpid == ETH_P_8021Q.to_be() || tpid == ETH_P_8021AD.to_be() {
        let t = ptr_at::<[u8; 4]>(ctx, 14)? as *const u8;
        tci = load(t, 0);
        ethertype = load(t, 2);
        l3 = 18;
    }
    let outer_v6 = real.flags & REAL_F_V6 != 0;
    let gue = conf.encap == ENCAP_GUE;
    let inner = read_inner(ctx, l3, ethertype == ETH_P_IP.to_be(), gue && outer_v6)?;
    let outer_hlen: usize = if outer_v6 { 40 } else { 20 };
    let over = outer_hlen + if gue { GUE_HLEN } else { 0 };
    if inner.len + over as u32 > u32::from(mtu) {
        // XDP cannot fragment: what may not be fragmented gets the answer the path's next
        // router would give, with the MTU left inside the tunnel.
        if !inner.df {
            return Err(counter::DROP_TOO_BIG);
        }
        return Ok(crate::icmp::too_big(
            ctx,
            l3,
            !inner.v4,
            u32::from(mtu) - over as u32,
        ));
    }
    // The hash as the last bytes of an address, big-endian: a prefix's host bits are the
    // hash's low bits.
    let h32 = hash16.to_be();
    let inner_proto = if inner.v4 { IPPROTO_IPIP } else { IPPROTO_IPV6 };
    let proto = if gue { IPPROTO_UDP } else { inner_proto };
    let payload_len = inner.len + if gue { GUE_HLEN as u32 } else { 0 };
    let sport = GUE_SPORT_BASE | (hash16 as u16 & GUE_SPORT_MASK);

    // A VLAN tag belongs to the ingress interface's segment: out of another one the frame
    // leaves untagged (the outer header moves up by the tag's 4 bytes).
    let out_l3 = if port != 0 { 14 } else { l3 };
    // SAFETY: adjust_head moves the frame's start; every pointer is taken again after it.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, (l3 - out_l3) as i32 - over as i32) } != 0 {
        return Err(counter::DROP_ENCAP);
    }
    let pass = real.flags & REAL_F_NEXT_HOP_PASS != 0;
    // To the host's own stack (`pass`), the frame stays addressed to us.
    let (dst_lo, dst_hi, src_lo, src_hi) = if pass {
        (to_lo, to_hi, from_lo, from_hi)
    } else {
        let m = real.mac.as_ptr();
        (load::<u32>(m, 0), load::<u16>(m, 4), mac_lo, mac_hi)
    };
    let outer_type = if outer_v6 {
        ETH_P_IPV6.to_be()
    } else {
        ETH_P_IP.to_be()
    };
    let l2 = if out_l3 == 18 {
        ptr_at_mut::<[u8; 18]>(ctx, 0)? as *mut u8
    } else {
        ptr_at_mut::<[u8; 14]>(ctx, 0)? as *mut u8
    };
    store(l2, 0, dst_lo);
    store(l2, 4, dst_hi);
    store(l2, 6, src_lo);
    store(l2, 10, src_hi);
    if out_l3 == 18 {
        store(l2, 12, tpid);
        store(l2, 14, tci);
        store(l2, 16, outer_type);
    } else {
        store(l2, 12, outer_type);
    }

    if outer_v6 {
        let src = conf.src6.as_ptr();
        let (s0, s1, s2): (u64, u32, u32) = (load(src, 0), load(src, 8), load(src, 12));
        if s0 == 0 && s1 == 0 && s2 == 0 {
            return Err(counter::DROP_NO_TUNNEL_SOURCE);
        }
        let mask = conf.src6_hash_mask;
        let last_out = (s2 & !mask) | (h32 & mask);
        // Flow label: the hash's 16 bits (the top 4 of the 20 stay 0).
        let w0 = u32::from(0x60 | (inner.tos >> 4))
            | u32::from(inner.tos << 4) << 8
            | u32::from((hash16 as u16).to_be()) << 16;
        let w1 = u32::from((payload_len as u16).to_be())
            | u32::from(proto) << 16
            | u32::from(inner.ttl) << 24;
        let d = real.addr.as_ptr();
        let ip = ptr_at_mut::<[u8; 40]>(ctx, out_l3)? as *mut u8;
        store(ip, 0, w0);
        store(ip, 4, w1);
        store(ip, 8, s0);
        store(ip, 16, s1);
        store(ip, 20, last_out);
        store::<u64>(ip, 24, load(d, 0));
        store::<u64>(ip, 32, load(d, 8));
        if gue {
            // The UDP checksum is mandatory over IPv6: pseudo-header, UDP header, payload,
            // summed as big-endian words.
            let csum = match inner.sum {
                Some(payload) => {
                    let last = s2.to_ne_bytes();
                    let s = sum_be(&conf.src6) - sum_be(&last)
                        + sum_be(&last_out.to_ne_bytes())
                        + sum_be(&real.addr)
                        + payload_len
                        + u32::from(IPPROTO_UDP)
                        + u32::from(sport)
                        + u32::from(u16::from_be(conf.gue_port_be))
                        + (payload_len & 0xFFFF)
                        + u32::from(fold(payload));
                    match !fold(s) {
                        0 => 0xFFFF,
                        c => c,
                    }
                }
                // RFC 6935's zero checksum for tunnels (xlb decap accepts it).
                None => 0,
            };
            write_gue(ctx, out_l3 + 40, sport, conf.gue_port_be, payload_len, csum)?;
        }
    } else {
        let src = u32::from_ne_bytes(conf.src4);
        if src == 0 {
            return Err(counter::DROP_NO_TUNNEL_SOURCE);
        }
        let mask = conf.src4_hash_mask;
        let w0 =
            0x45 | u32::from(inner.tos) << 8 | u32::from(((payload_len + 20) as u16).to_be()) << 16;
        // Id 0, DF.
        let w1 = 0x40u32 << 16;
        let w2 = u32::from(inner.ttl) | u32::from(proto) << 8;
        let w3 = (src & !mask) | (h32 & mask);
        let w4: u32 = load(real.addr.as_ptr(), 12);
        let half = |w: u32| (w & 0xFFFF) + (w >> 16);
        let c = !fold(half(w0) + half(w1) + half(w2) + half(w3) + half(w4));
        let ip = ptr_at_mut::<[u8; 20]>(ctx, out_l3)? as *mut u8;
        store(ip, 0, w0);
        store(ip, 4, w1);
        store(ip, 8, w2 | u32::from(c) << 16);
        store(ip, 12, w3);
        store(ip, 16, w4);
        // Over IPv4 the GUE UDP checksum stays 0 (as the kernel's fou sends it by default).
        if gue {
            write_gue(ctx, out_l3 + 20, sport, conf.gue_port_be, payload_len, 0)?;
        }
    }
    if pass {
        stats::count(counter::PASS_NEXT_HOP);
        return Ok(Noted::new(xdp_action::XDP_PASS, counter::PASS_NEXT_HOP));
    }
    if port != 0 {
        return TX_PORTS
            .redirect(port, 0)
            .map(Noted::action)
            .map_err(|_| counter::DROP_TX_PORT);
    }
    Ok(Noted::action(xdp_action::XDP_TX))
}

/// The GUE (variant 1) UDP header at `off`; `csum` as a number.
#[inline(always)]
fn write_gue(
    ctx: &XdpContext,
    off: usize,
    sport: u16,
    dport_be: u16,
    len: u32,
    csum: u16,
) -> Result<(), Reason> {
    let u = ptr_at_mut::<[u8; GUE_HLEN]>(ctx, off)? as *mut u8;
    store(u, 0, u32::from(sport.to_be()) | u32::from(dport_be) << 16);
    store(
        u,
        4,
        u32::from((len as u16).to_be()) | u32::from(csum.to_be()) << 16,
    );
    Ok(())
}
