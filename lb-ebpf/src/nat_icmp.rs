//! NAT mode's ICMP errors, translated both ways together with the packet they quote
//! (`xlb_nat_icmp`, tail-called):
//! - to the real: an error to a VIP about a NAT flow (a router's "fragmentation needed" or
//!   "packet too big" about the VIP's packet to the client) leaves with the real's address as
//!   its destination, quoting the real's own packet (source the real's address and port);
//! - to the client: an error about a client's packet to a NAT real (the real's "port
//!   unreachable", a router's on the real's side) leaves quoting the client's packet to the
//!   VIP's address and port, from the VIP's address when the real sent it, and is routed to
//!   the client like the real's replies.
//!
//! The quoted IPv4 header checksum and the quoted TCP or UDP checksum (when it is quoted) are
//! updated with the addresses and ports, so that each end reads back exactly the header it
//! sent; then the ICMP checksum with everything it covers.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{counter, FlowKey, IPPROTO_TCP, IPPROTO_UDP, NAT_ICMP_TO_CLIENT, NAT_TO_REAL};

use crate::{
    maps::REALS,
    nat::{self, apply, delta, Headers, Route},
    parse::{ptr_at, ptr_at_mut, Parsed, IPPROTO_ICMP, IPPROTO_ICMPV6},
    stats::{self, Reason},
};

const V4_MAPPED_PREFIX: u64 = 0xFFFF_0000;

/// `xlb_nat_icmp`: the error `xlb_nat` (to a real) or the balancer (to no VIP) handed over.
#[inline(always)]
pub fn run(ctx: &XdpContext) -> Result<u32, Reason> {
    let Parsed::Icmp { key, l3, l4 } = crate::parse::parse(ctx)? else {
        return Err(counter::DROP_NAT_TAIL);
    };
    let w = key.words();
    let v4 = w[2] == 0 && w[3] as u32 == V4_MAPPED_PREFIX as u32;
    let h = Headers { l3, l4, v4 };
    let end = ip_end(ctx, &h)?;
    let s = nat::scratch()?;
    match s.reply {
        NAT_TO_REAL => {
            let real_id = s.real_id;
            to_real(ctx, &h, end, real_id)
        }
        NAT_ICMP_TO_CLIENT => to_client(ctx, &h, end, &key),
        _ => Err(counter::DROP_NAT_TAIL),
    }
}

/// Where the IP packet ends (the frame may be padded past it).
#[inline(always)]
fn ip_end(ctx: &XdpContext, h: &Headers) -> Result<usize, Reason> {
    let len = ptr_at::<[u8; 2]>(ctx, h.l3 + if h.v4 { 2 } else { 4 })?;
    // SAFETY: bounds checked by ptr_at.
    let len = usize::from(u16::from_be_bytes(unsafe { *len }));
    Ok(h.l3 + if h.v4 { len } else { 40 + len })
}

/// The packet an error quotes: where its IP and TCP/UDP headers are, of which protocol, its
/// addresses (the flow key's two words each) and its ports (network order), read as they are
/// bounds-checked (read again later, the verifier could lose the check).
struct Quote {
    ip: usize,
    l4: usize,
    proto: u8,
    src: [u64; 2],
    dst: [u64; 2],
    ports: [u16; 2],
}

/// The quoted packet, if it is TCP or UDP with (as RFC 792 requires) at least 8 bytes of it.
#[inline(always)]
fn quote(ctx: &XdpContext, h: &Headers, end: usize) -> Option<Quote> {
    let ip = h.l4 + 8;
    let (l4, proto, src, dst) = if h.v4 {
        let e = ptr_at::<[u8; 20]>(ctx, ip).ok()?;
        // SAFETY: bounds checked by ptr_at.
        let e = unsafe { &*e };
        let ihl = usize::from(e[0] & 0x0F) * 4;
        if e[0] >> 4 != 4 || ihl < 20 {
            return None;
        }
        let a = |i: usize| {
            let a = u64::from(u32::from_ne_bytes([e[i], e[i + 1], e[i + 2], e[i + 3]]));
            [0, V4_MAPPED_PREFIX | a << 32]
        };
        (ip + ihl, e[9], a(12), a(16))
    } else {
        let e = ptr_at::<[u8; 40]>(ctx, ip).ok()?;
        // SAFETY: bounds checked by ptr_at.
        let e = unsafe { &*e };
        if e[0] >> 4 != 6 {
            return None;
        }
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&e[i..i + 8]);
            u64::from_ne_bytes(b)
        };
        (ip + 40, e[6], [word(8), word(16)], [word(24), word(32)])
    };
    if (proto != IPPROTO_TCP && proto != IPPROTO_UDP) || l4 + 8 > end {
        return None;
    }
    let p = ptr_at::<[u8; 8]>(ctx, l4).ok()?;
    // SAFETY: bounds checked by ptr_at.
    let p = unsafe { &*p };
    Some(Quote {
        ip,
        l4,
        proto,
        src,
        dst,
        ports: [
            u16::from_ne_bytes([p[0], p[1]]),
            u16::from_ne_bytes([p[2], p[3]]),
        ],
    })
}

/// Rewrites the quoted packet's address at `at` (12 source / 16 destination of IPv4, 8 / 24 of
/// IPv6) to `addr` and its port at `port_at` (0 source / 2 destination; `port_be` 0 keeps it),
/// with its IPv4 header checksum and its TCP/UDP checksum when that is quoted. Returns the
/// terms of the change to the ICMP checksum, which covers all of it.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn requote(
    ctx: &XdpContext,
    h: &Headers,
    end: usize,
    q: &Quote,
    at: usize,
    addr: &[u8; 16],
    port_at: usize,
    port_be: u16,
) -> Result<u32, Reason> {
    // The quoted IPv4 header checksum's change is covered by the ICMP checksum too.
    let (mut l4, hc) = nat::readdress(ctx, q.ip, h.v4, at, addr)?;
    let mut icmp = l4 + hc;
    let p = ptr_at_mut::<[u8; 8]>(ctx, q.l4)?;
    // SAFETY: bounds checked by ptr_at_mut.
    let p = unsafe { &mut *p };
    if port_be != 0 {
        let new = port_be.to_ne_bytes();
        let old = [p[port_at], p[port_at + 1]];
        p[port_at..port_at + 2].copy_from_slice(&new);
        let d = delta(&old, &new);
        l4 += d;
        icmp += d;
    }
    // UDP's checksum is in the 8 bytes every error quotes, TCP's only in a longer quote.
    let csum_at = q.l4 + if q.proto == IPPROTO_UDP { 6 } else { 16 };
    if csum_at + 2 > end {
        return Ok(icmp);
    }
    let Ok(c) = ptr_at_mut::<[u8; 2]>(ctx, csum_at) else {
        return Ok(icmp);
    };
    // SAFETY: bounds checked by ptr_at_mut.
    let c = unsafe { &mut *c };
    let old = *c;
    let was = u16::from_be_bytes(old);
    // A zero UDP checksum over IPv4 means "none": it stays none.
    if q.proto == IPPROTO_UDP && h.v4 && was == 0 {
        return Ok(icmp);
    }
    let mut now = apply(was, l4);
    if q.proto == IPPROTO_UDP && now == 0 {
        now = 0xFFFF;
    }
    *c = now.to_be_bytes();
    Ok(icmp + delta(&old, &*c))
}

/// Rewrites the error's own address at `at` (as in `requote`) to `addr`, with the IPv4 header
/// checksum. Returns the terms of the change to the ICMPv6 checksum, whose pseudo-header holds
/// the addresses (ICMP's over IPv4 does not).
#[inline(always)]
fn readdress(ctx: &XdpContext, h: &Headers, at: usize, addr: &[u8; 16]) -> Result<u32, Reason> {
    let (d, _) = nat::readdress(ctx, h.l3, h.v4, at, addr)?;
    Ok(if h.v4 { 0 } else { d })
}

/// The ICMP checksum after changes whose terms are `d`.
#[inline(always)]
fn icmp_checksum(ctx: &XdpContext, h: &Headers, d: u32) -> Result<(), Reason> {
    let c = ptr_at_mut::<[u8; 2]>(ctx, h.l4 + 2)?;
    // SAFETY: bounds checked by ptr_at_mut.
    unsafe { *c = apply(u16::from_be_bytes(*c), d).to_be_bytes() };
    Ok(())
}

/// An error about the VIP's packet to a client of NAT real `real_id` (the balancer checked
/// that it quotes a VIP flow's reply and found its real): to the real, about its own packet.
#[inline(always)]
fn to_real(ctx: &XdpContext, h: &Headers, end: usize, real_id: u32) -> Result<u32, Reason> {
    let real = REALS.get(real_id).ok_or(counter::DROP_NO_REAL)?;
    let q = quote(ctx, h, end).ok_or(counter::DROP_ICMP_NAT)?;
    let (src_at, dst_at) = if h.v4 { (12, 16) } else { (8, 24) };
    let d = requote(ctx, h, end, &q, src_at, &real.addr, 0, real.port_be)?;
    let d = d + readdress(ctx, h, dst_at, &real.addr)?;
    icmp_checksum(ctx, h, d)?;
    nat::to_real(ctx, h.l3, real).map(|n| n.get())
}

/// An error to no VIP: if it quotes a client's packet to a NAT real, to the client about its
/// packet to the VIP; anything else is the host's, untouched.
#[inline(always)]
fn to_client(ctx: &XdpContext, h: &Headers, end: usize, key: &FlowKey) -> Result<u32, Reason> {
    let pass = Ok(xdp_action::XDP_PASS);
    let Some(q) = quote(ctx, h, end) else {
        return pass;
    };
    let (src_at, dst_at) = if h.v4 { (12, 16) } else { (8, 24) };
    let Some(rv) = nat::revnat(q.dst, q.ports[1], u64::from(q.proto)) else {
        return pass;
    };
    let w = key.words();
    // Sent back to the quoted packet's sender, or it is no error about that packet.
    if [w[2], w[3]] != q.src {
        return pass;
    }
    let from_real = [w[0], w[1]] == q.dst;
    let proto = if h.v4 { IPPROTO_ICMP } else { IPPROTO_ICMPV6 };
    // Looked up from the source it will leave with (the VIP's, or the router's own).
    let mut sender = [0u8; 16];
    sender[..8].copy_from_slice(&w[0].to_ne_bytes());
    sender[8..].copy_from_slice(&w[1].to_ne_bytes());
    let src = if from_real { &rv.vip_addr } else { &sender };
    // The balancer's own connections (its health checks) are the host's.
    let route = nat::lookup(ctx, h, proto, [0, 0], src);
    if route == Route::Local {
        return pass;
    }
    let mut d = requote(ctx, h, end, &q, dst_at, &rv.vip_addr, 2, rv.vip_port_be)?;
    if from_real {
        d += readdress(ctx, h, src_at, &rv.vip_addr)?;
    }
    icmp_checksum(ctx, h, d)?;
    stats::count(counter::NAT_ICMP_REPLY);
    Ok(match route {
        Route::Via(p) => nat::send(ctx, h, p).unwrap_or(xdp_action::XDP_PASS),
        _ => xdp_action::XDP_PASS,
    })
}
