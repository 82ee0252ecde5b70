//! Ids for the new VIPs and reals of a batch: lowest free first, deterministic, never an id a
//! reader may still follow.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Instant,
};

use super::{
    state::{Draft, State},
    Balancer, ValidationError,
};
use crate::{
    core::clock::Clock,
    dataplane::Dataplane,
    model::{RealAddr, VipSpec},
};

/// A folded batch with every id given.
pub(super) struct Assigned {
    pub(super) state: State,
    /// When the latest of the VIP ids given (earlier batches' ids) was freed.
    pub(super) freed_at: Option<Instant>,
    /// Ids the batch frees and gives to a new VIP of its own (the map was full).
    pub(super) reused_vip_ids: BTreeSet<u32>,
}

impl<D: Dataplane, C: Clock> Balancer<D, C> {
    /// Gives ids to the new VIPs and reals of a folded batch, lowest free first, in `VipSpec`
    /// then address order. Real ids of the current state stay taken for the whole batch (a
    /// freed one goes into quarantine), and so do ids in quarantine. VIP ids the batch frees
    /// are given out last, when no other is free (see `Layout::reused_vip_ids`).
    pub(super) fn assign_ids(
        &self,
        draft: Draft,
        quarantined: &BTreeMap<u32, Instant>,
    ) -> Result<Assigned, ValidationError> {
        let kept_vips: BTreeSet<u32> = draft.values().filter_map(|vip| vip.id).collect();
        let batch_freed: BTreeSet<u32> = self
            .vips
            .values()
            .map(|vip| vip.id)
            .filter(|id| !kept_vips.contains(id))
            .collect();
        let current_reals: BTreeSet<u32> = self
            .vips
            .values()
            .flat_map(|vip| vip.reals.values().map(|r| r.id))
            .collect();
        let kept_reals: BTreeSet<u32> = draft
            .values()
            .flat_map(|vip| vip.reals.values().filter_map(|r| r.id))
            .collect();
        // For the error message: ids unavailable only because they were freed recently.
        let held_back = quarantined.len() + current_reals.difference(&kept_reals).count();

        // Preferred ids (restore) of new entries, when free: taken out of the free lists.
        let want_vip = |spec: &VipSpec| {
            self.preferred_vips.get(spec).copied().filter(|id| {
                *id < self.limits.max_vips && !kept_vips.contains(id) && !batch_freed.contains(id)
            })
        };
        let want_real = |spec: &VipSpec, addr: &RealAddr| {
            self.preferred_reals
                .get(&(*spec, *addr))
                .copied()
                .filter(|id| {
                    *id != 0
                        && *id < self.limits.max_reals
                        && !current_reals.contains(id)
                        && !quarantined.contains_key(id)
                })
        };
        let mut reserved_vips = BTreeSet::new();
        let mut reserved_reals = BTreeSet::new();
        for (spec, vip) in &draft {
            if vip.id.is_none() {
                reserved_vips.extend(want_vip(spec));
            }
            for (addr, real) in &vip.reals {
                if real.id.is_none() {
                    reserved_reals.extend(want_real(spec, addr));
                }
            }
        }
        let mut free_vips = (0..self.limits.max_vips)
            .filter(|id| {
                !kept_vips.contains(id) && !batch_freed.contains(id) && !reserved_vips.contains(id)
            })
            .chain(batch_freed.iter().copied());
        // Real id 0 is REAL_ID_UNSET, the empty ring slot.
        let mut free_reals = (1..self.limits.max_reals).filter(|id| {
            !current_reals.contains(id)
                && !quarantined.contains_key(id)
                && !reserved_reals.contains(id)
        });

        let mut out = Assigned {
            state: State::new(),
            freed_at: None,
            reused_vip_ids: BTreeSet::new(),
        };
        for (spec, vip) in draft {
            let id = match vip.id.or_else(|| want_vip(&spec)) {
                Some(id) => id,
                None => {
                    let id = free_vips.next().ok_or(ValidationError::TooManyVips {
                        vip: spec,
                        limit: self.limits.max_vips,
                    })?;
                    if batch_freed.contains(&id) {
                        out.reused_vip_ids.insert(id);
                    } else if let Some(freed) = self.freed_vips.get(&id) {
                        out.freed_at = out.freed_at.max(Some(*freed));
                    }
                    id
                }
            };
            let mut reals = BTreeMap::new();
            for (addr, real) in &vip.reals {
                let addr = *addr;
                let real_id = match real.id.or_else(|| want_real(&spec, &addr)) {
                    Some(id) => id,
                    None => free_reals.next().ok_or(ValidationError::TooManyReals {
                        vip: spec,
                        real: addr,
                        limit: self.limits.max_reals.saturating_sub(1),
                        quarantined: held_back,
                        quarantine: self.quarantine,
                    })?,
                };
                reals.insert(addr, real.with_id(real_id));
            }
            out.state.insert(spec, vip.with_id(id, reals));
        }
        Ok(out)
    }
}
