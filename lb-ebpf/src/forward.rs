//! From a parsed flow to a real: VIP lookup, connection table, Maglev ring, then the DR
//! rewrite or the tunnel's encapsulation (`encap`).

use aya_ebpf::{
    bindings::{xdp_action, BPF_ANY},
    helpers::bpf_jiffies64,
    programs::XdpContext,
};
use lb_common::{
    counter, flow_hash, ring_elem_index, ring_slot,
    trace::{TRACE_HOW_STALE_REPICK, TRACE_HOW_TRACKED},
    ConnValue, CtKey, FlowKey, Real, VipKey, CT_F_CLOSING, CT_HASH_SHIFT, FLOW_W4_FIN,
    FLOW_W4_ICMP, FLOW_W4_SYN, FLOW_W4_TUPLE, IPPROTO_TCP, REAL_F_ALIVE, REAL_F_TUNNEL,
    VIP_F_NO_CONNTRACK, VIP_F_NO_SRC_PORT, VIP_F_QUORUM_DROP,
};

use crate::{
    maps::{CONF, CONNTRACK, REALS, RING, VIPS, VIP_META},
    parse::ptr_at_mut,
    stats::{self, Reason},
    trace::{self, Decision},
};

/// Maglev ring size M, set at load time.
#[no_mangle]
static RING_SIZE: u32 = lb_common::DEFAULT_RING_SIZE;
/// Cluster-wide hash seed (0: every node of every cluster hashes alike).
#[no_mangle]
static HASH_SEED: u32 = 0;
/// Idle time (jiffies) after which a tracked flow is forgotten and re-picked from the ring.
/// The defaults assume HZ = 1000; the loader sets them from the measured HZ.
#[no_mangle]
static CT_TCP_IDLE: u64 = lb_common::DEFAULT_CT_TCP_IDLE_SECS * 1000;
#[no_mangle]
static CT_UDP_IDLE: u64 = lb_common::DEFAULT_CT_UDP_IDLE_SECS * 1000;
/// Idle time of a closing flow (its client sent a FIN or RST).
#[no_mangle]
static CT_CLOSING_IDLE: u64 = lb_common::DEFAULT_CT_CLOSING_IDLE_SECS * 1000;
/// Refresh a tracked flow's timestamp at most this often (jiffies; one second): a write per
/// packet would bounce the entry's cache line between CPUs for nothing.
#[no_mangle]
static CT_REFRESH: u64 = 1000;

/// One second in jiffies.
#[inline(always)]
pub fn jiffies_per_sec() -> u64 {
    global(&CT_REFRESH)
}

#[inline(always)]
pub fn global<T: Copy>(v: &T) -> T {
    // SAFETY: a read-only global; volatile so the compiler does not fold the default value
    // that the loader replaces.
    unsafe { core::ptr::read_volatile(v) }
}

/// vip_id for the flow, trying the exact port first, then port 0 when such VIPs exist.
#[inline(always)]
fn lookup_vip(key: &FlowKey) -> Option<u32> {
    let w = key.words();
    // SAFETY: plain lookup of a value we copy out at once.
    if let Some(id) = unsafe { VIPS.get(VipKey::for_flow(&w, key.dst_port_be)) } {
        return Some(*id);
    }
    let conf = CONF.get(0)?;
    let port0 = if key.proto == IPPROTO_TCP {
        conf.port0_tcp
    } else {
        conf.port0_udp
    };
    if port0 == 0 {
        return None;
    }
    // SAFETY: as above.
    unsafe { VIPS.get(VipKey::for_flow(&w, 0)) }.copied()
}

/// A real usable for a flow of `vip_id`: alive and belonging to that VIP.
#[inline(always)]
fn usable_real(real_id: u32, vip_id: u32) -> Option<&'static Real> {
    let real = REALS.get(real_id)?;
    if real.flags & REAL_F_ALIVE == 0 || real.vip_id != vip_id || real_id == 0 {
        return None;
    }
    Some(real)
}

/// Forward a parsed flow. `Err` carries the reason it was not forwarded (and it is counted).
/// A TCP SYN (`FLOW_W4_SYN` in the key's last word) is a connection starting: it takes the
/// ring's choice and replaces any entry the table has for its tuple (a client reusing a
/// source port must not land on the old connection's real, which may be draining); other
/// packets of tracked flows keep theirs.
#[inline(always)]
pub fn forward(ctx: &XdpContext, key: &FlowKey, pkt_len: u64) -> Result<u32, Reason> {
    // An ICMP error quoting a VIP flow (`icmp::error`): forwarded like its packets, never
    // tracked itself.
    let icmp = key.words()[4] & FLOW_W4_ICMP != 0;
    let Some(vip_id) = lookup_vip(key) else {
        if icmp {
            return Err(counter::DROP_ICMP_UNMATCHED);
        }
        return crate::probe::reply(ctx, key);
    };
    let ct_key = CtKey::new(key, vip_id);
    // Reserved before the decision, which then needs no room to keep the flow for it.
    let event = trace::start(&ct_key);
    let mut d = Decision::new();
    let result = decide(ctx, key, &ct_key, pkt_len, icmp, &mut d);
    if let Some(event) = event {
        trace::finish(event, &d, result);
    }
    result
}

/// The decision about a packet to `vip_id`, noted in `d` for the trace.
#[inline(always)]
fn decide(
    ctx: &XdpContext,
    key: &FlowKey,
    ct_key: &CtKey,
    pkt_len: u64,
    icmp: bool,
    d: &mut Decision,
) -> Result<u32, Reason> {
    let vip_id = ct_key.vip_id;
    // A frame sent to a group address (broadcast, multicast) was flooded to us: forwarding
    // it would send it on with that group address as its source. Any unicast destination is
    // fine (ours, a VRRP virtual MAC, a macvlan's).
    let eth = ptr_at_mut::<[u8; 12]>(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at_mut.
    if unsafe { (*eth)[0] } & 1 != 0 {
        return Err(counter::PASS_GROUP_MAC);
    }
    let Some(meta) = VIP_META.get(vip_id).filter(|m| m.in_use != 0) else {
        // VIPS names an id whose VIP_META is not written: the daemon writes VIP_META before
        // VIPS, so this is a bug or a foreign writer. Rare by construction: logged.
        aya_log_ebpf::error!(ctx, "VIPS names vip_id {} without VIP_META", vip_id);
        return Err(counter::PASS_VIP_META_MISSING);
    };
    let flags = meta.flags;
    // A group address as the source cannot come from a host (sources are unicast): it marks
    // the daemon's self-test (`xlb ready`, through BPF_PROG_TEST_RUN), decided and rewritten
    // like any packet but neither tracked nor counted.
    // SAFETY: bounds checked by ptr_at_mut above.
    let selftest = unsafe { (*eth)[6] } & 1 != 0;
    d.selftest = selftest;
    let track = flags & VIP_F_NO_CONNTRACK == 0 && !selftest;

    let mut real: Option<&Real> = None;
    let mut real_id = 0u32;
    // The flow hash's lower half, for tunnel mode's per-flow outer fields.
    let mut hash16 = 0u32;
    let mut now = 0u64;
    if track {
        // SAFETY: helper without arguments (inlined by the JIT into a load of jiffies).
        now = unsafe { bpf_jiffies64() };
        let found = if key.words()[4] & FLOW_W4_SYN != 0 {
            None
        } else {
            CONNTRACK.get_ptr_mut(*ct_key)
        };
        if let Some(ct) = found {
            // SAFETY: a pointer into the map's value, valid for this program run.
            let ct = unsafe { &mut *ct };
            let idle = if ct.flags & CT_F_CLOSING != 0 {
                global(&CT_CLOSING_IDLE)
            } else if key.proto == IPPROTO_TCP {
                global(&CT_TCP_IDLE)
            } else {
                global(&CT_UDP_IDLE)
            };
            let age = now.wrapping_sub(ct.last_seen);
            match usable_real(ct.real_id, vip_id) {
                Some(r) if age <= idle => {
                    real = Some(r);
                    real_id = ct.real_id;
                    d.how = TRACE_HOW_TRACKED;
                    hash16 = ct.flags >> CT_HASH_SHIFT;
                    if age > global(&CT_REFRESH) {
                        ct.last_seen = now;
                    }
                    // The client closes: from now on the flow idles out in CT_CLOSING_IDLE
                    // and is not counted as one of its real's (`xlb real flows`).
                    if key.words()[4] & FLOW_W4_FIN != 0 && ct.flags & CT_F_CLOSING == 0 {
                        ct.flags |= CT_F_CLOSING;
                        ct.last_seen = now;
                    }
                }
                _ => {
                    d.how = TRACE_HOW_STALE_REPICK;
                    stats::count(counter::CT_STALE);
                }
            }
        }
    }

    let new_flow = real.is_none();
    if new_flow {
        let m = global(&RING_SIZE);
        // The hash covers the 5-tuple only (not the SYN bit), without the source port for
        // no-src-port VIPs.
        let mut w = key.words();
        w[4] &= if flags & VIP_F_NO_SRC_PORT != 0 {
            FLOW_W4_TUPLE & !0xFFFF
        } else {
            FLOW_W4_TUPLE
        };
        let hash = flow_hash(&FlowKey::from_words(w), global(&HASH_SEED));
        // The low half: the ring slot comes from the high bits, so these vary among the
        // flows of one real too.
        hash16 = hash & 0xFFFF;
        let slot = ring_slot(hash, m);
        d.slot = slot;
        let Some(pair) = RING.get(ring_elem_index(vip_id, meta.generation, slot, m)) else {
            return Err(counter::DROP_NO_REAL);
        };
        real_id = if slot & 1 == 0 { pair[0] } else { pair[1] };
        real = usable_real(real_id, vip_id);
        if real.is_none() {
            if selftest {
                return Ok(xdp_action::XDP_DROP);
            }
            if flags & VIP_F_QUORUM_DROP != 0 {
                d.note(counter::DROP_QUORUM);
                stats::count_vip_quorum_drop(vip_id);
            } else {
                d.note(counter::DROP_NO_REAL);
                stats::count_vip_no_real(vip_id);
            }
            return Ok(xdp_action::XDP_DROP);
        }
        if track && !icmp {
            let closing = key.words()[4] & FLOW_W4_FIN != 0;
            let v = ConnValue {
                real_id,
                flags: (hash16 << CT_HASH_SHIFT) | if closing { CT_F_CLOSING } else { 0 },
                last_seen: now,
            };
            if CONNTRACK.insert(*ct_key, v, BPF_ANY as u64).is_err() {
                d.note(counter::CT_INSERT_FAIL);
                stats::count(counter::CT_INSERT_FAIL);
            }
        }
    }
    let Some(real) = real else {
        return Err(counter::DROP_NO_REAL);
    };
    d.real_id = real_id;

    if icmp {
        d.note(counter::ICMP_ERROR_FORWARDED);
        stats::count(counter::ICMP_ERROR_FORWARDED);
    }
    if real.flags & REAL_F_TUNNEL != 0 {
        let noted = crate::encap::encap(ctx, real, hash16)?;
        d.reason = noted.reason();
        let action = noted.get();
        if !selftest {
            stats::count_forwarded(vip_id, real_id, pkt_len, new_flow);
        }
        return Ok(action);
    }
    // Direct routing: the IP packet is untouched; it leaves towards the real's MAC from ours
    // (the address the frame was sent to).
    // SAFETY: bounds checked by ptr_at_mut above; nothing moved the frame since.
    unsafe {
        let eth = &mut *eth;
        let (dst, src) = eth.split_at_mut(6);
        src.copy_from_slice(dst);
        dst.copy_from_slice(&real.mac);
    }
    if !selftest {
        stats::count_forwarded(vip_id, real_id, pkt_len, new_flow);
    }
    Ok(xdp_action::XDP_TX)
}
