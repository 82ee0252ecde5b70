//! The map writes of an apply, kept as data (so a failed batch can be undone) and ordered so
//! that every prefix is a state the XDP program handles correctly, with a grace period
//! (`Op::Barrier`) wherever a program run that started before a write may still be reading
//! what the next write reuses or clears.

use std::collections::{BTreeMap, BTreeSet};

use lb_common::{Real, RevNat, RevNatKey, TxPort, VipAddrValue, VipKey, VipMeta, REAL_F_ALIVE};

use super::state::{egress_entries, real_entries, revnat_entries, vip_addrs, State, VipEntry};
use crate::{
    dataplane::{Dataplane, DataplaneError},
    model::VipSpec,
};

/// One map write (or wait), kept as data so a failed batch can be undone.
#[derive(Clone, Debug)]
pub(super) enum Op {
    SetVip(VipKey, u32),
    DelVip(VipKey),
    SetVipAddr([u8; 16], VipAddrValue),
    DelVipAddr([u8; 16]),
    /// NAT mode's reverse index (`REVNAT`).
    SetRevNat(RevNatKey, RevNat),
    DelRevNat(RevNatKey),
    SetMeta(u32, VipMeta),
    SetReal(u32, Real),
    /// `EGRESS` and `TX_PORTS` for an interface tunnel reals leave by.
    SetEgress(TxPort),
    DelEgress(u32),
    WriteRing {
        vip_id: u32,
        generation: u32,
        ring: Vec<u32>,
    },
    ResetVipStats(u32),
    ResetRealStats(u32),
    /// Wait until no program run that began before this point is still running (the
    /// `Balancer` runs it: a grace period, then `Dataplane::quiesce`).
    Barrier,
}

impl Op {
    /// Runs a map write; `Barrier` is the caller's.
    pub(super) fn run<D: Dataplane>(&self, dp: &mut D) -> Result<(), DataplaneError> {
        match self {
            Op::SetVip(key, id) => dp.set_vip(key, *id),
            Op::DelVip(key) => dp.del_vip(key),
            Op::SetVipAddr(addr, value) => dp.set_vip_addr(addr, value),
            Op::DelVipAddr(addr) => dp.del_vip_addr(addr),
            Op::SetRevNat(key, value) => dp.set_revnat(key, value),
            Op::DelRevNat(key) => dp.del_revnat(key),
            Op::SetMeta(id, meta) => dp.set_vip_meta(*id, meta),
            Op::SetReal(id, real) => dp.set_real(*id, real),
            Op::SetEgress(port) => dp.set_egress(port),
            Op::DelEgress(ifindex) => dp.del_egress(*ifindex),
            Op::WriteRing {
                vip_id,
                generation,
                ring,
            } => dp.write_ring(*vip_id, *generation, ring),
            Op::ResetVipStats(id) => dp.reset_vip_stats(*id),
            Op::ResetRealStats(id) => dp.reset_real_stats(*id),
            Op::Barrier => Ok(()),
        }
    }

    pub(super) fn vip_addr(addr: [u8; 16], value: Option<VipAddrValue>) -> Op {
        match value {
            Some(value) if value.vip_count > 0 => Op::SetVipAddr(addr, value),
            _ => Op::DelVipAddr(addr),
        }
    }
}

/// A write and what undoes it. Ring writes go to the inactive half, which no reader looks at,
/// and counter resets concern ids nothing counts into yet: they need no undo.
pub(super) struct Step {
    pub(super) op: Op,
    pub(super) undo: Option<Op>,
}

impl Step {
    fn barrier() -> Step {
        Step {
            op: Op::Barrier,
            undo: None,
        }
    }
}

/// A rebuilt ring, decided before any write.
pub(super) struct RingPlan {
    pub(super) vip: VipSpec,
    pub(super) vip_id: u32,
    /// Some when the ring differs from the live one and must be written into `generation`.
    pub(super) write: Option<Vec<u32>>,
    /// The generation live after the batch.
    pub(super) generation: u32,
    /// For a new VIP: its `VIP_META` entry as found in the map (what an undo writes back).
    pub(super) prior_meta: Option<VipMeta>,
    pub(super) spread_warning: Option<String>,
}

/// How the steps of one batch are laid out.
pub(super) struct Layout {
    /// VIP ids freed by this batch and given to a new VIP in it (the maps were full).
    pub(super) reused_vip_ids: BTreeSet<u32>,
    /// Zero the counters of new VIPs and reals (not when replaying a saved state over adopted
    /// maps: those counters are the VIPs' own).
    pub(super) reset_counters: bool,
}

/// The map writes taking the kernel from `old` to `next`, in an order where every prefix is a
/// state the XDP program handles correctly:
///
/// 1. `VIPS` deletions of removed VIPs (nothing new finds them); a key re-added with another
///    id is replaced by its step-5 write instead;
/// 2. when a removed VIP's id is reused by a new VIP of this batch: a barrier, then the
///    removed VIPs' `REALS` and `VIP_META` entries zeroed, before anything names the id again;
/// 3. counters of new VIPs and reals zeroed, `EGRESS`/`TX_PORTS` entries of interfaces
///    tunnel and NAT reals now leave by, `REVNAT` entries of NAT reals (their replies are
///    rewritten before any packet reaches them), then `REALS` entries that become or stay
///    alive (before any ring names them);
/// 4. rings into the inactive half, then `VIP_META` (flip, flags, in_use for new VIPs);
/// 5. `VIP_ADDRS` deletions, then updates (a superset of what `VIPS` holds whenever that
///    matters; deletions first so that a full map has room);
/// 6. `VIPS` insertions (the new VIP is complete behind them);
/// 7. a barrier (packets that read the old ring half or a removed VIP's entry are done), then
///    `VIP_META` zeroed for removed VIPs and `REALS` entries zeroed (tracked flows re-pick),
///    then interfaces no real leaves by any more, and `REVNAT` entries no NAT real has any
///    more (the replies of its last flows are still rewritten until the barrier).
pub(super) fn plan_steps(
    old: &State,
    next: &State,
    rings: Vec<RingPlan>,
    layout: &Layout,
) -> Vec<Step> {
    let next_ids: BTreeSet<u32> = next.values().map(|vip| vip.id).collect();
    let old_by_id: BTreeMap<u32, &VipEntry<u32>> = old.values().map(|v| (v.id, v)).collect();
    let mut rings: BTreeMap<u32, RingPlan> = rings.into_iter().map(|p| (p.vip_id, p)).collect();
    let mut steps = Vec::new();

    // 1.
    for (spec, vip) in old {
        if !next.contains_key(spec) {
            steps.push(Step {
                op: Op::DelVip(spec.key()),
                undo: Some(Op::SetVip(spec.key(), vip.id)),
            });
        }
    }

    // Zeroing of VIP_META (removed VIPs) and REALS (reals leaving service); in step 2 for what
    // belonged to removed VIPs when an id is reused, else in step 7.
    let removed_vip_ids: BTreeSet<u32> = old
        .iter()
        .filter(|(spec, _)| !next.contains_key(*spec))
        .map(|(_, vip)| vip.id)
        .collect();
    let mut early = Vec::new();
    let mut late = Vec::new();
    for vip in old.values() {
        if !next_ids.contains(&vip.id) {
            late.push(Step {
                op: Op::SetMeta(vip.id, VipMeta::default()),
                undo: Some(Op::SetMeta(vip.id, vip.meta())),
            });
        }
    }
    let old_reals = real_entries(old);
    let next_reals = real_entries(next);
    let real_ids: BTreeSet<u32> = old_reals.keys().chain(next_reals.keys()).copied().collect();
    let mut alive = Vec::new();
    for id in real_ids {
        let before = old_reals.get(&id).copied().unwrap_or_default();
        let after = next_reals.get(&id).copied().unwrap_or_default();
        if before == after {
            continue;
        }
        let step = Step {
            op: Op::SetReal(id, after),
            undo: Some(Op::SetReal(id, before)),
        };
        if after.flags & REAL_F_ALIVE != 0 {
            alive.push(step);
        } else if !layout.reused_vip_ids.is_empty() && removed_vip_ids.contains(&before.vip_id) {
            early.push(step);
        } else {
            late.push(step);
        }
    }

    // 2.
    if !layout.reused_vip_ids.is_empty() {
        steps.push(Step::barrier());
        steps.extend(early);
    }

    // 3.
    if layout.reset_counters {
        for (spec, vip) in next {
            if old.get(spec).map(|o| o.id) != Some(vip.id) {
                steps.push(Step {
                    op: Op::ResetVipStats(vip.id),
                    undo: None,
                });
            }
        }
        let old_real_ids: BTreeSet<u32> = old
            .values()
            .flat_map(|v| v.reals.values().map(|r| r.id))
            .collect();
        for vip in next.values() {
            for real in vip.reals.values() {
                if !old_real_ids.contains(&real.id) {
                    steps.push(Step {
                        op: Op::ResetRealStats(real.id),
                        undo: None,
                    });
                }
            }
        }
    }
    let (egress_set, egress_gone) = entry_steps(
        &egress_entries(old),
        &egress_entries(next),
        |_, port| Op::SetEgress(*port),
        |ifindex| Op::DelEgress(*ifindex),
    );
    let (revnat_set, revnat_gone) = entry_steps(
        &revnat_entries(old),
        &revnat_entries(next),
        |key, value| Op::SetRevNat(*key, *value),
        |key| Op::DelRevNat(*key),
    );
    steps.extend(egress_set);
    steps.extend(revnat_set);
    steps.extend(alive);

    // 4.
    for vip in next.values() {
        let plan = rings.remove(&vip.id);
        let before = match old_by_id.get(&vip.id) {
            Some(old) => Some(old.meta()),
            None => plan.as_ref().and_then(|p| p.prior_meta),
        };
        if let Some(ring) = plan.and_then(|p| p.write) {
            steps.push(Step {
                op: Op::WriteRing {
                    vip_id: vip.id,
                    generation: vip.generation,
                    ring,
                },
                undo: None,
            });
        }
        let meta = vip.meta();
        if before != Some(meta) {
            steps.push(Step {
                op: Op::SetMeta(vip.id, meta),
                undo: Some(Op::SetMeta(vip.id, before.unwrap_or_default())),
            });
        }
    }

    // 5.
    let old_addrs = vip_addrs(old);
    let next_addrs = vip_addrs(next);
    let addrs: BTreeSet<[u8; 16]> = old_addrs.keys().chain(next_addrs.keys()).copied().collect();
    let mut updates = Vec::new();
    for addr in addrs {
        let before = old_addrs.get(&addr).copied();
        let after = next_addrs.get(&addr).copied();
        if before != after {
            let step = Step {
                op: Op::vip_addr(addr, after),
                undo: Some(Op::vip_addr(addr, before)),
            };
            if after.is_some() {
                updates.push(step);
            } else {
                steps.push(step);
            }
        }
    }
    steps.extend(updates);

    // 6.
    for (spec, vip) in next {
        let undo = match old.get(spec) {
            Some(old) if old.id == vip.id => continue,
            Some(old) => Op::SetVip(spec.key(), old.id),
            None => Op::DelVip(spec.key()),
        };
        steps.push(Step {
            op: Op::SetVip(spec.key(), vip.id),
            undo: Some(undo),
        });
    }

    // 7.
    late.extend(egress_gone);
    late.extend(revnat_gone);
    if !late.is_empty() {
        steps.push(Step::barrier());
        steps.extend(late);
    }
    steps
}

/// The writes taking a map from `old` to `next` entries: the sets of new and changed entries,
/// and the deletions of entries `next` no longer has (each with its undo).
fn entry_steps<K: Ord, V: PartialEq>(
    old: &BTreeMap<K, V>,
    next: &BTreeMap<K, V>,
    set: impl Fn(&K, &V) -> Op,
    del: impl Fn(&K) -> Op,
) -> (Vec<Step>, Vec<Step>) {
    let sets = next
        .iter()
        .filter(|(k, v)| old.get(*k) != Some(*v))
        .map(|(k, v)| Step {
            op: set(k, v),
            undo: Some(old.get(k).map_or_else(|| del(k), |b| set(k, b))),
        })
        .collect();
    let dels = old
        .iter()
        .filter(|(k, _)| !next.contains_key(*k))
        .map(|(k, v)| Step {
            op: del(k),
            undo: Some(set(k, v)),
        })
        .collect();
    (sets, dels)
}
