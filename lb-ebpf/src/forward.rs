//! From a parsed flow to a real: VIP lookup, connection table, Maglev ring, then the DR
//! rewrite or the tunnel's encapsulation (`encap`).

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_get_smp_processor_id, bpf_jiffies64},
    maps::Array,
    programs::XdpContext,
};
use lb_common::{
    counter,
    ct::{self, CtBucket, CtLogEntry, CT_WAYS},
    flow_hash, flow_hash64, ring_elem_index, ring_slot,
    trace::{TRACE_HOW_STALE_REPICK, TRACE_HOW_TRACKED},
    vip_filter_bit, FlowKey, Real, VipFilter, VipKey, FLOW_W4_FIN, FLOW_W4_ICMP, FLOW_W4_SYN,
    FLOW_W4_TUPLE, IPPROTO_TCP, REAL_F_ALIVE, REAL_F_NAT, REAL_F_TUNNEL, VIP_F_NO_CONNTRACK,
    VIP_F_NO_SRC_PORT, VIP_F_QUORUM_DROP,
};

use crate::{
    maps::{
        CONF, CONNTRACK, CONNTRACK_KEYS, CT_LOG, CT_LOG_HEADS, REALS, RING, VIPS, VIP_ADDRS,
        VIP_FILTER, VIP_META,
    },
    parse::ptr_at_mut,
    stats::{self, Reason},
    trace::{self, Decision},
};

/// Maglev ring size M, set at load time.
#[no_mangle]
static RING_SIZE: u32 = lb_common::DEFAULT_RING_SIZE;
/// Cluster-wide hash seed (0: every node of every cluster hashes alike).
#[no_mangle]
pub(crate) static HASH_SEED: u32 = 0;
/// Buckets of the connection table (`ct::buckets_for(--conntrack-size)`).
#[no_mangle]
pub(crate) static CT_BUCKETS: u32 = ct::buckets_for(lb_common::DEFAULT_CONNTRACK_SIZE);
/// Jiffies >> CT_TIME_SHIFT is the table's clock (`ct::time_shift`; the default assumes HZ
/// 1000, the loader sets it from the measured HZ).
#[no_mangle]
static CT_TIME_SHIFT: u32 = 9;
/// Idle times (stamp units) after which a tracked flow is forgotten and re-picked from the
/// ring.
#[no_mangle]
static CT_TCP_IDLE: u32 = (lb_common::DEFAULT_CT_TCP_IDLE_SECS * 1000 / 512) as u32;
#[no_mangle]
static CT_UDP_IDLE: u32 = (lb_common::DEFAULT_CT_UDP_IDLE_SECS * 1000 / 512) as u32;
/// Idle time of a closing flow (its client sent a FIN or RST) and of an embryonic one.
#[no_mangle]
static CT_CLOSING_IDLE: u32 = (lb_common::DEFAULT_CT_CLOSING_IDLE_SECS * 1000 / 512) as u32;
/// One second in jiffies.
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

/// Whether some VIP may have the destination address of `key` (`VIP_FILTER`): `false` is
/// certain, `true` may be a hash collision.
#[inline(always)]
pub fn may_be_vip(key: &FlowKey) -> bool {
    let w = key.words();
    filter_has(&VIP_FILTER, w[2], w[3])
}

/// Whether `filter` has the bit of the address given as two words (`vip_filter_bit`).
#[inline(always)]
pub fn filter_has(filter: &Array<VipFilter>, w0: u64, w1: u64) -> bool {
    let bit = vip_filter_bit(w0, w1);
    filter
        .get(0)
        .and_then(|f| f.get((bit >> 6) as usize))
        .is_some_and(|word| word & (1 << (bit & 63)) != 0)
}

/// Whether some VIP has the destination address of `key`: the filter's bit, then (when it is
/// set) `VIP_ADDRS`.
#[inline(always)]
pub fn is_vip_addr(key: &FlowKey) -> bool {
    // SAFETY: presence check only.
    may_be_vip(key) && unsafe { VIP_ADDRS.get(key.dst) }.is_some()
}

/// vip_id for the flow, trying the exact port first, then port 0 when such VIPs exist.
#[inline(always)]
fn lookup_vip(key: &FlowKey) -> Option<u32> {
    if !may_be_vip(key) {
        return None;
    }
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

/// The idle times, in stamp units.
#[inline(always)]
fn idle() -> ct::Idle {
    ct::Idle {
        tcp: global(&CT_TCP_IDLE),
        udp: global(&CT_UDP_IDLE),
        closing: global(&CT_CLOSING_IDLE),
    }
}

/// Forward a parsed flow. `Err` carries the reason it was not forwarded (and it is counted).
#[inline(always)]
pub fn forward(ctx: &XdpContext, key: &FlowKey, pkt_len: u64) -> Result<u32, Reason> {
    // An ICMP error quoting a VIP flow (`icmp::error`): forwarded like its packets, never
    // tracked itself.
    let icmp = key.words()[4] & FLOW_W4_ICMP != 0;
    let Some(vip_id) = lookup_vip(key) else {
        if icmp {
            return Err(counter::DROP_ICMP_UNMATCHED);
        }
        if crate::nat::pend_reply(key) {
            return Ok(crate::nat::TAIL_REPLY);
        }
        return crate::probe::reply(ctx, key);
    };
    // Reserved before the decision, which then needs no room to keep the flow for it.
    let event = trace::start(key, vip_id);
    let mut d = Decision::new();
    let result = decide(ctx, key, vip_id, pkt_len, icmp, &mut d);
    if let Some(event) = event {
        // A NAT rewrite is sent by `xlb_nat` like any forwarded packet.
        let shown = result.map(|a| {
            if a == crate::nat::TAIL || a == crate::nat::TAIL_REPLY {
                xdp_action::XDP_TX
            } else {
                a
            }
        });
        trace::finish(event, &d, shown);
    }
    result
}

/// The decision about a packet to `vip_id`, noted in `d` for the trace.
///
/// Tracked flows (lb-common's `ct`): the flow's bucket is read once; a way whose fingerprint
/// matches and whose real serves this VIP is the flow's (a fingerprint shared with a flow of
/// another VIP never sends a packet there). A live way keeps the flow on its real. A TCP SYN
/// (`FLOW_W4_SYN`) is a connection starting: it takes the ring's choice and replaces the
/// flow's way (a client reusing a source port must not land on the old connection's real,
/// which may be draining), recorded as embryonic until the next packet: a SYN flood fills
/// only free ways, which any later flow may take back.
#[inline(always)]
fn decide(
    ctx: &XdpContext,
    key: &FlowKey,
    vip_id: u32,
    pkt_len: u64,
    icmp: bool,
    d: &mut Decision,
) -> Result<u32, Reason> {
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
    let w4 = key.words()[4];
    let syn = w4 & FLOW_W4_SYN != 0;
    let fin = w4 & FLOW_W4_FIN != 0;

    let mut real: Option<&Real> = None;
    let mut real_id = 0u32;
    // The flow hash's bits 32..48, for tunnel mode's per-flow outer fields.
    let mut hash16 = 0u32;
    let mut hash = 0u64;
    let mut now = 0u32;
    // The flow's bucket, its index and fingerprint, and the way that is the flow's.
    let mut place: Option<(*mut CtBucket, u32, u64)> = None;
    let mut own = CT_WAYS;
    if track {
        // SAFETY: helper without arguments (inlined by the JIT into a load of jiffies).
        now = (unsafe { bpf_jiffies64() } >> global(&CT_TIME_SHIFT)) as u32;
        hash = flow_hash64(&ct::tuple_key(key), global(&HASH_SEED));
        hash16 = (hash >> 32) as u32 & 0xFFFF;
        let (index, fp) = ct::place(hash, global(&CT_BUCKETS));
        if let Some(bucket) = CONNTRACK.get_ptr_mut(index) {
            place = Some((bucket, index, fp));
            // SAFETY: a map value, valid for this program run; other CPUs write its ways
            // with single 8-byte stores, so each read sees a whole way.
            let ways = unsafe { &mut *bucket };
            let mut found: Option<(u64, &Real)> = None;
            let mut i = 0;
            while i < CT_WAYS {
                // SAFETY: as above.
                let w = unsafe { core::ptr::read_volatile(&ways[i]) };
                if w & ct::FP_MASK == fp && w & ct::REAL_MASK != 0 {
                    if let Some(r) = REALS.get(ct::real_of(w)) {
                        if r.vip_id == vip_id {
                            own = i;
                            found = Some((w, r));
                            break;
                        }
                    }
                }
                i += 1;
            }
            // A SYN re-picks and replaces its flow's way when the way is this flow's (port
            // reuse: the tuple written with the way is the SYN's). A live flow whose
            // fingerprint the SYN happens to share keeps its way, and the SYN shares its real
            // (as every packet of a flow with a false match does). Only SYNs that found a way
            // read the tuple.
            let repick = syn && own < CT_WAYS && same_tuple(index, own, key);
            if let (Some((w, r)), false) = (found, repick) {
                let age = ct::age_of(w, now);
                if r.flags & REAL_F_ALIVE != 0 && age <= idle().of(w) {
                    real = Some(r);
                    real_id = ct::real_of(w);
                    d.how = TRACE_HOW_TRACKED;
                    if !icmp {
                        // Refreshed once per stamp unit; the first packet after the SYN
                        // makes the flow established; the client's FIN or RST makes it
                        // closing (it idles out in CT_CLOSING_IDLE and is not counted as
                        // one of its real's flows, `xlb real flows`).
                        let mut nw = ct::restamp(w, now);
                        if !syn {
                            nw &= !ct::F_EMBRYONIC;
                        }
                        if fin {
                            nw |= ct::F_CLOSING;
                        }
                        if nw != w {
                            if let Some(slot) = ways.get_mut(own) {
                                // SAFETY: as above.
                                unsafe { core::ptr::write_volatile(slot, nw) };
                            }
                        }
                    }
                } else {
                    d.how = TRACE_HOW_STALE_REPICK;
                    stats::count(counter::CT_STALE);
                }
            }
        }
    }

    let new_flow = real.is_none();
    if new_flow {
        let m = global(&RING_SIZE);
        // The ring hash covers the 5-tuple only (not the SYN bit), without the source port
        // for no-src-port VIPs; a tracked flow's table hash is that same hash otherwise.
        let ring_hash = if track && flags & VIP_F_NO_SRC_PORT == 0 {
            (hash >> 32) as u32
        } else {
            let mut w = key.words();
            w[4] &= if flags & VIP_F_NO_SRC_PORT != 0 {
                FLOW_W4_TUPLE & !0xFFFF
            } else {
                FLOW_W4_TUPLE
            };
            let h = flow_hash(&FlowKey::from_words(w), global(&HASH_SEED));
            if !track {
                hash16 = h & 0xFFFF;
            }
            h
        };
        let slot = ring_slot(ring_hash, m);
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
        if let (Some((bucket, index, fp)), false) = (place, icmp) {
            if !record(bucket, index, fp, own, key, real_id, now, syn, fin) {
                d.note(counter::CT_INSERT_FAIL);
                stats::count_vip_untracked(vip_id);
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
    if real.flags & (REAL_F_TUNNEL | REAL_F_NAT) != 0 {
        if real.flags & REAL_F_NAT != 0 {
            // (An ICMP error too: `xlb_nat` hands it to `xlb_nat_icmp`.)
            crate::nat::pend_forward(real_id)?;
            if !selftest {
                stats::count_forwarded(vip_id, real_id, pkt_len, new_flow);
            }
            return Ok(crate::nat::TAIL);
        }
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

/// Whether way `way` of bucket `index` was written for the flow of `key`.
#[inline(always)]
fn same_tuple(index: u32, way: usize, key: &FlowKey) -> bool {
    let Some(keys) = CONNTRACK_KEYS.get(index) else {
        return false;
    };
    keys.get(way).is_some_and(|t| t.is_of(key))
}

/// Record a new flow in its bucket: in its own way (`own`, when it had one), else a free one,
/// else an embryonic one. `false`: the bucket is full of live flows, and the flow goes
/// untracked. The way is written, then its tuple logged for the daemon (`log_tuple`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn record(
    bucket: *mut CtBucket,
    index: u32,
    fp: u64,
    own: usize,
    key: &FlowKey,
    real_id: u32,
    now: u32,
    syn: bool,
    fin: bool,
) -> bool {
    // SAFETY: a map value, valid for this program run (see `decide`).
    let ways = unsafe { &mut *bucket };
    let mut target = own;
    if target >= CT_WAYS {
        let idle = idle();
        let mut embryonic = CT_WAYS;
        let mut i = 0;
        while i < CT_WAYS {
            // SAFETY: as above.
            let w = unsafe { core::ptr::read_volatile(&ways[i]) };
            if idle.free(w, now) {
                target = i;
                break;
            }
            if embryonic == CT_WAYS && w & ct::F_EMBRYONIC != 0 {
                embryonic = i;
            }
            i += 1;
        }
        if target >= CT_WAYS {
            target = embryonic;
        }
    }
    if target >= CT_WAYS {
        return false;
    }
    let mut flags = ct::proto_flags(key.proto);
    if syn {
        flags |= ct::F_EMBRYONIC;
    }
    if fin {
        flags |= ct::F_CLOSING;
    }
    if let Some(w) = ways.get_mut(target) {
        // SAFETY: one aligned 8-byte store: readers see the old way or the new one.
        unsafe { core::ptr::write_volatile(w, ct::way(real_id, fp, now, flags)) };
    }
    log_tuple(index, target as u32, fp, key);
    true
}

/// Log the tuple of the flow just recorded in way `way` of bucket `index`, in this CPU's part
/// of `CT_LOG` (after the way, so that the daemon, which files it only while the way holds
/// its fingerprint, finds the way written). A full log overwrites its oldest entry: that
/// flow stays tracked, only invisible to walks.
#[inline(always)]
fn log_tuple(index: u32, way: u32, fp: u64, key: &FlowKey) {
    // SAFETY: a helper without arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let Some(head) = CT_LOG_HEADS.get_ptr_mut(cpu.wrapping_mul(ct::CT_LOG_HEAD_STRIDE)) else {
        return;
    };
    // SAFETY: a map value; only this CPU writes its head (XDP runs with preemption off).
    let h = unsafe { core::ptr::read_volatile(head) };
    let at = cpu
        .wrapping_mul(ct::CT_LOG_SLOTS)
        .wrapping_add(h as u32 & (ct::CT_LOG_SLOTS - 1));
    let Some(e) = CT_LOG.get_ptr_mut(at) else {
        return;
    };
    // Field by field from the key's words (a whole entry built first costs stack the rest
    // of the program needs).
    let w = key.words();
    // SAFETY: map values; the entry before the head that publishes it (volatile keeps the
    // order here, x86's TSO in the CPU; elsewhere the daemon's fingerprint check turns an
    // entry seen early into a dropped one, never a wrong tuple).
    unsafe {
        let p = e as *mut u32;
        core::ptr::write_volatile(p, w[0] as u32);
        core::ptr::write_volatile(p.add(1), (w[0] >> 32) as u32);
        core::ptr::write_volatile(p.add(2), w[1] as u32);
        core::ptr::write_volatile(p.add(3), (w[1] >> 32) as u32);
        core::ptr::write_volatile(p.add(4), w[4] as u32);
        core::ptr::write_volatile(p.add(5), index);
        core::ptr::write_volatile(p.add(6), CtLogEntry::slot_of(way, fp));
        core::ptr::write_volatile(head, h.wrapping_add(1));
    }
}
