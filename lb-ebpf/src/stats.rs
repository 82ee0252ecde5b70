//! Counters. Every packet the balancer does not forward has a reason, and every reason a
//! counter in STATS_GLOBAL[0] (except "IP, not for a VIP": the host's own traffic stays free).

use lb_common::GlobalStats;

use crate::maps::{STATS_GLOBAL, STATS_REAL, STATS_VIP};

#[derive(Clone, Copy)]
pub enum Reason {
    NotIp,
    Truncated,
    UnknownL4,
    Ipv6Ext,
    BadHeader,
    Fragment,
    NoReal,
    VipMetaMissing,
}

#[inline(always)]
pub fn count(reason: Reason) {
    let Some(g) = STATS_GLOBAL.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: a per-CPU value of this CPU; XDP runs with preemption disabled.
    let g: &mut GlobalStats = unsafe { &mut *g };
    match reason {
        Reason::NotIp => g.pass_not_ip += 1,
        Reason::Truncated => g.pass_truncated += 1,
        Reason::UnknownL4 => g.pass_unknown_l4 += 1,
        Reason::Ipv6Ext => g.pass_ipv6_ext += 1,
        Reason::BadHeader => g.drop_bad_header += 1,
        Reason::Fragment => g.drop_fragment += 1,
        Reason::NoReal => g.drop_no_real += 1,
        Reason::VipMetaMissing => g.pass_vip_meta_missing += 1,
    }
}

#[inline(always)]
pub fn count_ct_stale() {
    if let Some(g) = STATS_GLOBAL.get_ptr_mut(0) {
        // SAFETY: as in `count`.
        unsafe { (*g).ct_stale += 1 };
    }
}

#[inline(always)]
pub fn count_ct_insert_fail() {
    if let Some(g) = STATS_GLOBAL.get_ptr_mut(0) {
        // SAFETY: as in `count`.
        unsafe { (*g).ct_insert_fail += 1 };
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
    count(Reason::NoReal);
}
