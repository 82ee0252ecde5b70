//! `target = "vip"` health probes: out of the daemon's probe namespace to their real
//! (`xlb_probe`, on the namespace's veth), and their replies back in (`reply`, on the
//! balancer's path for packets to no VIP). The replies are told apart by their destination
//! port (the probe namespace's own range) and their source (a VIP address).

use aya_ebpf::{bindings::xdp_action, helpers::bpf_redirect, programs::XdpContext};
use lb_common::{counter, FlowKey, IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    maps::{PROBE, REALS, VIP_ADDRS},
    parse::ptr_at_mut,
    stats::{self, Reason},
};

/// A packet to no VIP: a probe's reply goes into the probe namespace, the rest to the host.
/// Costs a load and a branch while probes are off.
#[inline(always)]
pub fn reply(ctx: &XdpContext, key: &FlowKey) -> Result<u32, Reason> {
    let Some(p) = PROBE.get(0) else {
        return Ok(xdp_action::XDP_PASS);
    };
    if p.port_count == 0 {
        return Ok(xdp_action::XDP_PASS);
    }
    let port = u16::from_be(key.dst_port_be);
    if port.wrapping_sub(p.port_base) >= p.port_count {
        return Ok(xdp_action::XDP_PASS);
    }
    // SAFETY: presence check only.
    if unsafe { VIP_ADDRS.get(key.src) }.is_none() {
        return Ok(xdp_action::XDP_PASS);
    }
    let eth = ptr_at_mut::<[u8; 6]>(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at_mut.
    unsafe { *eth = p.peer_mac };
    stats::count(counter::PROBE_REPLY);
    // SAFETY: a helper taking plain integers.
    Ok(unsafe { bpf_redirect(p.veth_ifindex, 0) } as u32)
}

/// A probe leaving the probe namespace: its source port names the real it is for. Anything
/// else the namespace sends (neighbour or router solicitations) goes nowhere.
#[inline(always)]
pub fn out(ctx: &XdpContext) -> Option<u32> {
    let p = PROBE.get(0)?;
    if p.port_count == 0 {
        return None;
    }
    let eth = lb_ebpf::ptr_at_mut::<[u8; 14]>(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at_mut.
    let ethertype = unsafe { u16::from_be_bytes([(*eth)[12], (*eth)[13]]) };
    let (proto, l4) = match ethertype {
        0x0800 => {
            let ip = lb_ebpf::ptr_at::<[u8; 20]>(ctx, 14)?;
            // SAFETY: bounds checked by ptr_at.
            let (vihl, proto) = unsafe { ((*ip)[0], (*ip)[9]) };
            (proto, 14 + usize::from(vihl & 0x0f) * 4)
        }
        0x86DD => {
            let ip = lb_ebpf::ptr_at::<[u8; 40]>(ctx, 14)?;
            // SAFETY: bounds checked by ptr_at.
            (unsafe { (*ip)[6] }, 14 + 40)
        }
        _ => return None,
    };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    let ports = lb_ebpf::ptr_at::<[u8; 2]>(ctx, l4)?;
    // SAFETY: bounds checked by ptr_at.
    let sport = unsafe { u16::from_be_bytes(*ports) };
    let real_id = sport.wrapping_sub(p.port_base);
    if real_id >= p.port_count {
        return None;
    }
    let real = REALS.get(u32::from(real_id))?;
    if real.mac == [0; 6] {
        return None;
    }
    // SAFETY: bounds checked by ptr_at_mut above.
    unsafe {
        let eth = &mut *eth;
        eth[..6].copy_from_slice(&real.mac);
        eth[6..12].copy_from_slice(&p.iface_mac);
    }
    // SAFETY: a helper taking plain integers.
    Some(unsafe { bpf_redirect(p.iface_ifindex, 0) } as u32)
}
