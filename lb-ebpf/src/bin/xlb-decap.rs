//! `xlb_decap`, for the real servers of tunnel mode (`xlb decap`): a packet to one of this
//! host's addresses that carries another IP packet (IPIP, IP6IP6, 6in4, 4in6, or any of them
//! behind a GUE variant 1 UDP header) loses its outer headers, and the inner packet goes to
//! the stack as if it had arrived bare. Everything else passes untouched, the host's own
//! traffic without being counted.
//!
//! ECN is combined as RFC 6040 says (and the kernel's tunnels do): a congestion mark (CE) on
//! the outer header is copied to an ECN-capable inner packet; an inner packet that is not
//! ECN-capable under a CE mark is dropped.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::{Array, HashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    v4_mapped, DecapConf, DecapStats, DECAP_DECAPSULATED, DECAP_DROP_ECN, DECAP_MAX_ADDRS,
    DECAP_MAX_VIPS, DECAP_PASS_MALFORMED, DECAP_PASS_NOT_LOCAL, DECAP_PASS_NOT_VIP, IPPROTO_UDP,
};
use lb_ebpf::{ptr_at, ptr_at_mut};

#[map]
static DECAP_CONF: Array<DecapConf> = Array::with_max_entries(1, 0);
#[map]
static DECAP_ADDRS: HashMap<[u8; 16], u8> = HashMap::with_max_entries(DECAP_MAX_ADDRS, 0);
#[map]
static DECAP_VIPS: HashMap<[u8; 16], u8> = HashMap::with_max_entries(DECAP_MAX_VIPS, 0);
#[map]
static DECAP_STATS: PerCpuArray<DecapStats> = PerCpuArray::with_max_entries(1, 0);

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPPROTO_IPIP: u8 = 4;
const IPPROTO_IPV6: u8 = 41;
const ECN_CE: u8 = 3;

/// `Err(Some(counter))`: a tunnel packet not decapsulated; `Err(None)`: no tunnel packet.
type Outcome = Result<u32, Option<usize>>;

#[xdp]
pub fn xlb_decap(ctx: XdpContext) -> u32 {
    match try_decap(&ctx) {
        Ok(action) => action,
        Err(Some(c)) => {
            count(c);
            if c == DECAP_DROP_ECN {
                xdp_action::XDP_DROP
            } else {
                xdp_action::XDP_PASS
            }
        }
        Err(None) => xdp_action::XDP_PASS,
    }
}

#[inline(always)]
fn count(c: usize) {
    if let Some(s) = DECAP_STATS.get_ptr_mut(0) {
        // SAFETY: this CPU's value; XDP runs with preemption disabled.
        if let Some(v) = unsafe { (*s).get_mut(c) } {
            *v += 1;
        }
    }
}

/// What follows the outer header: IPv4 (`false`) or IPv6 (`true`), named by the outer
/// protocol, or for GUE by the first nibble of the inner packet.
#[inline(always)]
fn payload_kind(
    ctx: &XdpContext,
    proto: u8,
    at: usize,
    gue_port_be: u16,
) -> Result<(bool, usize), Option<usize>> {
    match proto {
        IPPROTO_IPIP => Ok((false, 0)),
        IPPROTO_IPV6 => Ok((true, 0)),
        IPPROTO_UDP => {
            let udp = ptr_at::<[u8; 9]>(ctx, at).ok_or(None)?;
            // SAFETY: bounds checked by ptr_at.
            let udp = unsafe { &*udp };
            if u16::from_ne_bytes([udp[2], udp[3]]) != gue_port_be {
                return Err(None);
            }
            // GUE variant 1 ("01" in the top bits) is the bare inner packet: its version.
            match udp[8] >> 4 {
                4 => Ok((false, 8)),
                6 => Ok((true, 8)),
                _ => Err(Some(DECAP_PASS_MALFORMED)),
            }
        }
        _ => Err(None),
    }
}

#[inline(always)]
fn try_decap(ctx: &XdpContext) -> Outcome {
    let eth = ptr_at::<[u8; 14]>(ctx, 0).ok_or(None)?;
    // SAFETY: bounds checked by ptr_at.
    let eth = unsafe { *eth };
    let mut ethertype = u16::from_be_bytes([eth[12], eth[13]]);
    let mut l3 = 14;
    let mut tag = [0u8; 4];
    if ethertype == 0x8100 || ethertype == 0x88A8 {
        let t = ptr_at::<[u8; 4]>(ctx, 14).ok_or(None)?;
        // SAFETY: bounds checked by ptr_at.
        tag = unsafe { *t };
        ethertype = u16::from_be_bytes([tag[2], tag[3]]);
        l3 = 18;
    }
    let gue_port_be = DECAP_CONF.get(0).map_or(0, |c| c.gue_port_be);
    let (outer_dst, outer_ecn, over, inner_v6) = if ethertype == ETH_P_IP {
        let ip = ptr_at::<[u8; 20]>(ctx, l3).ok_or(None)?;
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &*ip };
        let ihl = usize::from(ip[0] & 0x0F) * 4;
        if ip[0] >> 4 != 4 || ihl < 20 {
            return Err(None);
        }
        let (v6, extra) = payload_kind(ctx, ip[9], l3 + ihl, gue_port_be)?;
        if u16::from_be_bytes([ip[6], ip[7]]) & 0x3FFF != 0 {
            // A fragment of a tunnel packet: the stack's to reassemble.
            return Err(Some(DECAP_PASS_MALFORMED));
        }
        let dst = v4_mapped([ip[16], ip[17], ip[18], ip[19]]);
        (dst, ip[1] & 3, ihl + extra, v6)
    } else if ethertype == ETH_P_IPV6 {
        let ip = ptr_at::<[u8; 40]>(ctx, l3).ok_or(None)?;
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &*ip };
        if ip[0] >> 4 != 6 {
            return Err(None);
        }
        let (v6, extra) = payload_kind(ctx, ip[6], l3 + 40, gue_port_be)?;
        let mut dst = [0u8; 16];
        dst.copy_from_slice(&ip[24..40]);
        (dst, (ip[1] >> 4) & 3, 40 + extra, v6)
    } else {
        return Err(None);
    };
    // SAFETY: presence checks only.
    if unsafe { DECAP_ADDRS.get(outer_dst) }.is_none() {
        return Err(Some(DECAP_PASS_NOT_LOCAL));
    }
    let inner = l3 + over;
    let filter = DECAP_CONF.get(0).is_some_and(|c| c.vip_filter != 0);
    if inner_v6 {
        let ip = ptr_at_mut::<[u8; 40]>(ctx, inner).ok_or(Some(DECAP_PASS_MALFORMED))?;
        // SAFETY: bounds checked by ptr_at_mut; nothing else points into the frame.
        let ip = unsafe { &mut *ip };
        if ip[0] >> 4 != 6 {
            return Err(Some(DECAP_PASS_MALFORMED));
        }
        let mut dst = [0u8; 16];
        dst.copy_from_slice(&ip[24..40]);
        // SAFETY: presence check only.
        if filter && unsafe { DECAP_VIPS.get(dst) }.is_none() {
            return Err(Some(DECAP_PASS_NOT_VIP));
        }
        if outer_ecn == ECN_CE {
            match (ip[1] >> 4) & 3 {
                0 => return Err(Some(DECAP_DROP_ECN)),
                _ => ip[1] |= ECN_CE << 4,
            }
        }
    } else {
        let ip = ptr_at_mut::<[u8; 20]>(ctx, inner).ok_or(Some(DECAP_PASS_MALFORMED))?;
        // SAFETY: bounds checked by ptr_at_mut; nothing else points into the frame.
        let ip = unsafe { &mut *ip };
        if ip[0] >> 4 != 4 {
            return Err(Some(DECAP_PASS_MALFORMED));
        }
        let dst = v4_mapped([ip[16], ip[17], ip[18], ip[19]]);
        // SAFETY: presence check only.
        if filter && unsafe { DECAP_VIPS.get(dst) }.is_none() {
            return Err(Some(DECAP_PASS_NOT_VIP));
        }
        if outer_ecn == ECN_CE {
            match ip[1] & 3 {
                0 => return Err(Some(DECAP_DROP_ECN)),
                ECN_CE => {}
                _ => {
                    let old = u16::from_be_bytes([ip[0], ip[1]]);
                    ip[1] |= ECN_CE;
                    let new = u16::from_be_bytes([ip[0], ip[1]]);
                    let c = lb_ebpf::csum::replace([ip[10], ip[11]], old, new);
                    ip[10..12].copy_from_slice(&c);
                }
            }
        }
    }
    let inner_type = if inner_v6 { ETH_P_IPV6 } else { ETH_P_IP };
    if l3 == 18 {
        let mut l2 = [0u8; 18];
        l2[..12].copy_from_slice(&eth[..12]);
        l2[12..14].copy_from_slice(&eth[12..14]);
        l2[14..16].copy_from_slice(&tag[..2]);
        l2[16..18].copy_from_slice(&inner_type.to_be_bytes());
        let to = ptr_at_mut::<[u8; 18]>(ctx, over).ok_or(Some(DECAP_PASS_MALFORMED))?;
        // SAFETY: bounds checked by ptr_at_mut.
        unsafe { *to = l2 };
    } else {
        let mut l2 = [0u8; 14];
        l2[..12].copy_from_slice(&eth[..12]);
        l2[12..14].copy_from_slice(&inner_type.to_be_bytes());
        let to = ptr_at_mut::<[u8; 14]>(ctx, over).ok_or(Some(DECAP_PASS_MALFORMED))?;
        // SAFETY: bounds checked by ptr_at_mut.
        unsafe { *to = l2 };
    }
    // SAFETY: shrinks the frame from the front by the outer headers, which were checked above.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, over as i32) } != 0 {
        return Err(Some(DECAP_PASS_MALFORMED));
    }
    count(DECAP_DECAPSULATED);
    Ok(xdp_action::XDP_PASS)
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
