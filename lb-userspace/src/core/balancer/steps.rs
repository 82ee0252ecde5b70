//! The map writes of an apply, kept as data (so a failed batch can be undone) and ordered so
//! that every prefix is a state the XDP program handles correctly.

use std::collections::{BTreeMap, BTreeSet};

use lb_common::{Real, VipAddrValue, VipKey, VipMeta, REAL_F_ALIVE};

use super::state::{real_entries, vip_addrs, State, VipEntry};
use crate::{
    dataplane::{Dataplane, DataplaneError},
    model::VipSpec,
};

/// One map write, kept as data so a failed batch can be undone.
#[derive(Clone, Debug)]
pub(super) enum Op {
    SetVip(VipKey, u32),
    DelVip(VipKey),
    SetVipAddr([u8; 16], VipAddrValue),
    DelVipAddr([u8; 16]),
    SetMeta(u32, VipMeta),
    SetReal(u32, Real),
    WriteRing {
        vip_id: u32,
        generation: u32,
        ring: Vec<u32>,
    },
}

impl Op {
    pub(super) fn run<D: Dataplane>(&self, dp: &mut D) -> Result<(), DataplaneError> {
        match self {
            Op::SetVip(key, id) => dp.set_vip(key, *id),
            Op::DelVip(key) => dp.del_vip(key),
            Op::SetVipAddr(addr, value) => dp.set_vip_addr(addr, value),
            Op::DelVipAddr(addr) => dp.del_vip_addr(addr),
            Op::SetMeta(id, meta) => dp.set_vip_meta(*id, meta),
            Op::SetReal(id, real) => dp.set_real(*id, real),
            Op::WriteRing {
                vip_id,
                generation,
                ring,
            } => dp.write_ring(*vip_id, *generation, ring),
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
/// so they need no undo.
pub(super) struct Step {
    pub(super) op: Op,
    pub(super) undo: Option<Op>,
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

/// The map writes taking the kernel from `old` to `next`, in an order where every prefix is a
/// state the XDP program handles correctly:
///
/// 1. `VIPS` deletions of removed VIPs (nothing new finds them), unless the key is re-added with
///    a new id in step 5, which then replaces it in one write;
/// 2. `REALS` entries that become or stay alive (before any ring names them);
/// 3. rings into the inactive half, then `VIP_META` (flip, flags, in_use for new VIPs);
/// 4. `VIP_ADDRS` (a superset of what `VIPS` holds whenever that matters);
/// 5. `VIPS` insertions (the new VIP is complete behind them);
/// 6. `VIP_META` zeroed for removed VIPs;
/// 7. `REALS` entries zeroed (after no live ring names them; tracked flows then re-pick).
pub(super) fn plan_steps(old: &State, next: &State, rings: Vec<RingPlan>) -> Vec<Step> {
    let next_ids: BTreeSet<u32> = next.values().map(|vip| vip.id).collect();
    let old_by_id: BTreeMap<u32, &VipEntry<u32>> = old.values().map(|v| (v.id, v)).collect();
    let mut rings: BTreeMap<u32, RingPlan> = rings.into_iter().map(|p| (p.vip_id, p)).collect();
    let mut steps = Vec::new();

    // 1.
    for (spec, vip) in old {
        if !next_ids.contains(&vip.id) && !next.contains_key(spec) {
            steps.push(Step {
                op: Op::DelVip(spec.key()),
                undo: Some(Op::SetVip(spec.key(), vip.id)),
            });
        }
    }

    // 2. and 7.
    let old_reals = real_entries(old);
    let next_reals = real_entries(next);
    let real_ids: BTreeSet<u32> = old_reals.keys().chain(next_reals.keys()).copied().collect();
    let mut late = Vec::new();
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
            steps.push(step);
        } else {
            late.push(step);
        }
    }

    // 3.
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

    // 4.
    let old_addrs = vip_addrs(old);
    let next_addrs = vip_addrs(next);
    let addrs: BTreeSet<[u8; 16]> = old_addrs.keys().chain(next_addrs.keys()).copied().collect();
    for addr in addrs {
        let before = old_addrs.get(&addr).copied();
        let after = next_addrs.get(&addr).copied();
        if before != after {
            steps.push(Step {
                op: Op::vip_addr(addr, after),
                undo: Some(Op::vip_addr(addr, before)),
            });
        }
    }

    // 5.
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

    // 6.
    for vip in old.values() {
        if !next_ids.contains(&vip.id) {
            steps.push(Step {
                op: Op::SetMeta(vip.id, VipMeta::default()),
                undo: Some(Op::SetMeta(vip.id, vip.meta())),
            });
        }
    }

    // 7.
    steps.extend(late);
    steps
}
