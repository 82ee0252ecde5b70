//! ICMP to VIP addresses, in every mode: echo requests are answered here; errors about a VIP
//! flow (unreachable, fragmentation needed, time exceeded, packet too big) go to the flow's
//! real the way its packets do. The header they quote is the real's reply (VIP → client), so
//! the flow is looked up reversed. And tunnel mode's answers to packets that would not fit
//! once encapsulated ("fragmentation needed", "packet too big"), rate-limited per CPU.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_jiffies64, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{counter, FlowKey, FLOW_W4_ICMP, IPPROTO_TCP, IPPROTO_UDP};
use lb_ebpf::csum::{fold, replace, sum_be};

use crate::{
    forward::global,
    maps::ICMP_RATE,
    parse::{ptr_at, ptr_at_mut, IPPROTO_ICMP, IPPROTO_ICMPV6},
    stats::{self, Reason},
    trace::Noted,
};

/// Answers to too-big packets each CPU sends per second, at most.
#[no_mangle]
static ICMP_TOO_BIG_RATE: u64 = lb_common::DEFAULT_ICMP_TOO_BIG_RATE;
/// Bytes of the too-big packet an answer quotes (its IP header, any IPv6 extension headers
/// and its TCP or UDP header fit; RFC 4443 allows any amount up to the minimum MTU).
const QUOTE: usize = 128;
const V4_MAPPED_PREFIX: u64 = 0xFFFF_0000;

/// What to do with an ICMP packet.
pub enum Icmp {
    /// Done: this action.
    Action(u32),
    /// An error about this flow: forward it as the flow's packets are (one call site of
    /// `forward`, so that it is inlined once: twice would not fit the stack).
    Forward(FlowKey),
    /// An error to no VIP while NAT reals exist: for `xlb_nat_icmp`, in case it quotes a
    /// client's packet to one of them.
    Nat,
}

/// An ICMP packet to some address (`key` has the addresses): passed when it is no VIP's.
#[inline(always)]
pub fn handle(ctx: &XdpContext, key: &FlowKey, l3: usize, l4: usize) -> Result<Icmp, Reason> {
    let w = key.words();
    let v6 = !(w[2] == 0 && w[3] as u32 == V4_MAPPED_PREFIX as u32);
    if !crate::forward::is_vip_addr(key) {
        if crate::nat::configured() && is_error(ctx, l4, v6) {
            return Ok(Icmp::Nat);
        }
        return Ok(Icmp::Action(xdp_action::XDP_PASS));
    }
    let h = ptr_at::<[u8; 8]>(ctx, l4)?;
    // SAFETY: bounds checked by ptr_at.
    let ty = unsafe { (*h)[0] };
    match (v6, ty) {
        (false, 8) | (true, 128) => echo(ctx, l3, l4, v6).map(Icmp::Action),
        (false, 3) | (false, 11) | (true, 1) | (true, 2) | (true, 3) => {
            error(ctx, key, l4 + 8, v6).map(Icmp::Forward)
        }
        _ => Err(counter::PASS_ICMP),
    }
}

/// Whether the ICMP message at `l4` is an error that quotes a packet (those `handle` forwards).
#[inline(always)]
fn is_error(ctx: &XdpContext, l4: usize, v6: bool) -> bool {
    let Ok(h) = ptr_at::<[u8; 8]>(ctx, l4) else {
        return false;
    };
    // SAFETY: bounds checked by ptr_at.
    let ty = unsafe { (*h)[0] };
    matches!(
        (v6, ty),
        (false, 3) | (false, 11) | (true, 1) | (true, 2) | (true, 3)
    )
}

/// The echo reply, in place: addresses and MACs swapped, TTL 64, type and checksums updated.
#[inline(always)]
fn echo(ctx: &XdpContext, l3: usize, l4: usize, v6: bool) -> Result<u32, Reason> {
    let eth = ptr_at_mut::<[u8; 12]>(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at_mut; the pointers below do not overlap it.
    let eth = unsafe { &mut *eth };
    if eth[0] & 1 != 0 {
        return Err(counter::PASS_GROUP_MAC);
    }
    if v6 {
        let ip = ptr_at_mut::<[u8; 40]>(ctx, l3)?;
        // SAFETY: bounds checked by ptr_at_mut.
        let ip = unsafe { &mut *ip };
        let mut src = [0u8; 16];
        src.copy_from_slice(&ip[8..24]);
        ip.copy_within(24..40, 8);
        ip[24..40].copy_from_slice(&src);
        ip[7] = 64;
    } else {
        let ip = ptr_at_mut::<[u8; 20]>(ctx, l3)?;
        // SAFETY: bounds checked by ptr_at_mut.
        let ip = unsafe { &mut *ip };
        let mut src = [0u8; 4];
        src.copy_from_slice(&ip[12..16]);
        ip.copy_within(16..20, 12);
        ip[16..20].copy_from_slice(&src);
        let old = u16::from_be_bytes([ip[8], ip[9]]);
        ip[8] = 64;
        let new = u16::from_be_bytes([ip[8], ip[9]]);
        let c = replace([ip[10], ip[11]], old, new);
        ip[10..12].copy_from_slice(&c);
    }
    let icmp = ptr_at_mut::<[u8; 4]>(ctx, l4)?;
    // SAFETY: bounds checked by ptr_at_mut.
    let icmp = unsafe { &mut *icmp };
    let old = u16::from_be_bytes([icmp[0], icmp[1]]);
    icmp[0] = if v6 { 129 } else { 0 };
    let new = u16::from_be_bytes([icmp[0], icmp[1]]);
    let c = replace([icmp[2], icmp[3]], old, new);
    icmp[2..4].copy_from_slice(&c);
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&eth[..6]);
    eth.copy_within(6..12, 0);
    eth[6..12].copy_from_slice(&mac);
    stats::count(counter::ICMP_ECHO_REPLY);
    Ok(xdp_action::XDP_TX)
}

/// An error quoting the header at `at`: the flow it names.
#[inline(always)]
fn error(ctx: &XdpContext, key: &FlowKey, at: usize, v6: bool) -> Result<FlowKey, Reason> {
    let unmatched = |_| counter::DROP_ICMP_UNMATCHED;
    let outer = key.words();
    let mut w = [0u64; 5];
    let (proto, ports) = if v6 {
        let e = ptr_at::<[u8; 40]>(ctx, at).map_err(unmatched)?;
        // SAFETY: bounds checked by ptr_at.
        let e = unsafe { &*e };
        let p = ptr_at::<[u8; 4]>(ctx, at + 40).map_err(unmatched)?;
        if e[0] >> 4 != 6 {
            return Err(counter::DROP_ICMP_UNMATCHED);
        }
        let word = |i: usize| {
            u64::from_ne_bytes([
                e[i],
                e[i + 1],
                e[i + 2],
                e[i + 3],
                e[i + 4],
                e[i + 5],
                e[i + 6],
                e[i + 7],
            ])
        };
        // The quoted packet went from the VIP to the client.
        w = [word(24), word(32), word(8), word(16), 0];
        // SAFETY: bounds checked by ptr_at.
        (e[6], unsafe { *p })
    } else {
        let e = ptr_at::<[u8; 20]>(ctx, at).map_err(unmatched)?;
        // SAFETY: bounds checked by ptr_at.
        let e = unsafe { &*e };
        if e[0] >> 4 != 4 {
            return Err(counter::DROP_ICMP_UNMATCHED);
        }
        let ihl = usize::from(e[0] & 0x0F) * 4;
        let p = ptr_at::<[u8; 4]>(ctx, at + ihl).map_err(unmatched)?;
        let a = |i: usize| u64::from(u32::from_ne_bytes([e[i], e[i + 1], e[i + 2], e[i + 3]]));
        w[1] = V4_MAPPED_PREFIX | a(16) << 32;
        w[3] = V4_MAPPED_PREFIX | a(12) << 32;
        // SAFETY: bounds checked by ptr_at.
        (e[9], unsafe { *p })
    };
    // Of a TCP or UDP packet the VIP sent: the error's own destination.
    if (proto != IPPROTO_TCP && proto != IPPROTO_UDP) || w[2] != outer[2] || w[3] != outer[3] {
        return Err(counter::DROP_ICMP_UNMATCHED);
    }
    // Reversed: the client's port is the flow's source port.
    w[4] = u64::from(u16::from_ne_bytes([ports[2], ports[3]]))
        | u64::from(u16::from_ne_bytes([ports[0], ports[1]])) << 16
        | u64::from(proto) << 32
        | FLOW_W4_ICMP;
    Ok(FlowKey::from_words(w))
}

/// The answer to a packet that would not fit the tunnel: the frame becomes "fragmentation
/// needed" (IPv4) or "packet too big" (IPv6) back to its sender, reporting `mtu`, quoting the
/// packet's first `QUOTE` bytes; counted (and noted for the trace). The packet's own bytes are moved in place, with
/// next to nothing on the stack: the encapsulation it is inlined into leaves little.
#[inline(always)]
pub fn too_big(ctx: &XdpContext, l3: usize, v6: bool, mtu: u32) -> Noted {
    match answer_too_big(ctx, l3, v6, mtu) {
        Ok(action) => Noted::new(action, counter::ICMP_TOO_BIG_SENT),
        Err(reason) => {
            stats::count(reason);
            Noted::new(xdp_action::XDP_DROP, reason)
        }
    }
}

/// The L2 header for the way back, from the original one `H` bytes further on: MACs
/// swapped (to where it came from, from the MAC it was sent to), a VLAN tag kept.
#[inline(always)]
fn turn_l2<const H: usize>(ctx: &XdpContext, l3: usize) -> Result<(), Reason> {
    let f = ptr_at_mut::<[u8; 66]>(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at_mut (66 >= H + 18, and the frame holds more).
    let f = unsafe { &mut *f };
    for i in 0..6 {
        f[i] = f[H + 6 + i];
        f[6 + i] = f[H + i];
    }
    f[12] = f[H + 12];
    f[13] = f[H + 13];
    if l3 == 18 {
        for i in 14..18 {
            f[i] = f[H + i];
        }
    }
    Ok(())
}

#[inline(always)]
fn answer_too_big(ctx: &XdpContext, l3: usize, v6: bool, mtu: u32) -> Result<u32, Reason> {
    if let Some(rl) = ICMP_RATE.get_ptr_mut(0) {
        // SAFETY: this CPU's value; XDP runs with preemption disabled.
        let rl = unsafe { &mut *rl };
        // SAFETY: helper without arguments.
        let now = unsafe { bpf_jiffies64() };
        if now.wrapping_sub(rl[0]) >= crate::forward::jiffies_per_sec() {
            rl[0] = now;
            rl[1] = 0;
        }
        if rl[1] >= global(&ICMP_TOO_BIG_RATE) {
            return Err(counter::DROP_TOO_BIG_RATE);
        }
        rl[1] += 1;
    }
    // The original packet must hold what is quoted.
    ptr_at::<[u8; QUOTE]>(ctx, l3)?;
    let hdr: usize = if v6 { 48 } else { 28 };
    // SAFETY: adjust_head/tail move the frame's ends; every pointer is taken again after.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(hdr as i32)) } != 0 {
        return Err(counter::DROP_ENCAP);
    }
    // Through memory: folded into `want - end + start`, the subtraction from pkt_end is
    // refused by the verifier.
    let len = ctx.data_end() - ctx.data();
    // SAFETY: a local read back.
    let len = unsafe { core::ptr::read_volatile(&len) } as i32;
    let want = (l3 + hdr + QUOTE) as i32;
    // SAFETY: as above.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, want - len) } != 0 {
        return Err(counter::DROP_ENCAP);
    }
    // Now: `hdr` new bytes, the original L2 header, the original packet's first QUOTE bytes.
    // Copied from the packet to the packet: the stack has no room to spare.
    if v6 {
        turn_l2::<48>(ctx, l3)?;
    } else {
        turn_l2::<28>(ctx, l3)?;
    }
    let quoted = ptr_at::<[u8; QUOTE]>(ctx, l3 + hdr)?;
    // SAFETY: bounds checked by ptr_at; the headers written below lie before it.
    let q = unsafe { &*quoted };
    let qsum = sum_be(q);
    if v6 {
        let h = ptr_at_mut::<[u8; 48]>(ctx, l3)?;
        // SAFETY: bounds checked by ptr_at_mut; it ends where `q` starts.
        let h = unsafe { &mut *h };
        h.fill(0);
        h[0] = 0x60;
        h[4..6].copy_from_slice(&((8 + QUOTE) as u16).to_be_bytes());
        h[6] = IPPROTO_ICMPV6;
        h[7] = 64;
        h[8..24].copy_from_slice(&q[24..40]);
        h[24..40].copy_from_slice(&q[8..24]);
        h[40] = 2; // packet too big
        h[44..48].copy_from_slice(&mtu.max(1280).to_be_bytes());
        // Pseudo-header (addresses, length, next header), then the message.
        let mut s = (8 + QUOTE) as u32 + u32::from(IPPROTO_ICMPV6) + qsum;
        let mut i = 8;
        while i < 48 {
            s += u32::from(u16::from_be_bytes([h[i], h[i + 1]]));
            i += 2;
        }
        h[42..44].copy_from_slice(&(!fold(s)).to_be_bytes());
    } else {
        let h = ptr_at_mut::<[u8; 28]>(ctx, l3)?;
        // SAFETY: bounds checked by ptr_at_mut; it ends where `q` starts.
        let h = unsafe { &mut *h };
        h.fill(0);
        h[0] = 0x45;
        h[2..4].copy_from_slice(&((28 + QUOTE) as u16).to_be_bytes());
        h[8] = 64;
        h[9] = IPPROTO_ICMP;
        h[12..16].copy_from_slice(&q[16..20]);
        h[16..20].copy_from_slice(&q[12..16]);
        let mut s = 0u32;
        let mut i = 0;
        while i < 20 {
            s += u32::from(u16::from_be_bytes([h[i], h[i + 1]]));
            i += 2;
        }
        h[10..12].copy_from_slice(&(!fold(s)).to_be_bytes());
        h[20] = 3; // destination unreachable
        h[21] = 4; // fragmentation needed
        h[26..28].copy_from_slice(&(mtu.min(0xFFFF) as u16).to_be_bytes());
        let s = qsum
            + u32::from(u16::from_be_bytes([h[20], h[21]]))
            + u32::from(u16::from_be_bytes([h[26], h[27]]));
        h[22..24].copy_from_slice(&(!fold(s)).to_be_bytes());
    }
    stats::count(counter::ICMP_TOO_BIG_SENT);
    Ok(xdp_action::XDP_TX)
}
