//! Counters. Every packet the balancer does not forward has a reason, and every reason a
//! counter in STATS_GLOBAL[0] (lb-common's table; "IP, not for a VIP" is not counted: the
//! host's own traffic stays free).

use lb_common::counter;

use crate::maps::{STATS_GLOBAL, STATS_REAL, STATS_VIP};

/// Why a packet was not forwarded (or what happened on the way): a row of lb-common's table.
pub type Reason = lb_common::Counter;

#[inline(always)]
pub fn count(reason: Reason) {
    let Some(g) = STATS_GLOBAL.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: a per-CPU value of this CPU; XDP runs with preemption disabled.
    let g = unsafe { &mut *g };
    if let Some(c) = g.counters.get_mut(reason.index as usize) {
        *c += 1;
    }
}

#[inline(always)]
pub fn count_forwarded(vip_id: u32, real_id: u32, bytes: u64, new_flow: bool) {
    let new = new_flow as u64;
    if let Some(v) = STATS_VIP.get_ptr_mut(vip_id) {
        // SAFETY: as in `count`.
        unsafe {
            (*v).packets += 1;
            (*v).bytes += bytes;
            (*v).new_flows += new;
        }
    }
    if let Some(r) = STATS_REAL.get_ptr_mut(real_id) {
        // SAFETY: as in `count`.
        unsafe {
            (*r).packets += 1;
            (*r).bytes += bytes;
            (*r).new_flows += new;
        }
    }
}

#[inline(always)]
pub fn count_vip_no_real(vip_id: u32) {
    if let Some(v) = STATS_VIP.get_ptr_mut(vip_id) {
        // SAFETY: as in `count`.
        unsafe { (*v).no_real += 1 };
    }
    count(counter::DROP_NO_REAL);
}

#[inline(always)]
pub fn count_vip_quorum_drop(vip_id: u32) {
    if let Some(v) = STATS_VIP.get_ptr_mut(vip_id) {
        // SAFETY: as in `count`.
        unsafe { (*v).quorum_drops += 1 };
    }
    count(counter::DROP_QUORUM);
}

/// A new flow its bucket had no room for (forwarded by the ring all the same).
#[inline(always)]
pub fn count_vip_untracked(vip_id: u32) {
    if let Some(v) = STATS_VIP.get_ptr_mut(vip_id) {
        // SAFETY: as in `count`.
        unsafe { (*v).untracked += 1 };
    }
    count(counter::CT_INSERT_FAIL);
}
