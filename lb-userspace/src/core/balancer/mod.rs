//! The desired state of the balancer (VIPs, their reals, weights, MACs, flags) and the only
//! writer of the maps derived from it.
//!
//! A `Balancer` takes a batch of `Change`s, folds them into a copy of its state, validates the
//! result as a whole (ids, limits, rings), and only then writes the maps, in an order that keeps
//! every intermediate state consistent for the XDP program reading them concurrently. If a write
//! fails, the in-memory state stays the previous one and the writes already done are undone.
//!
//! Design choices (the ones the maps alone do not dictate):
//!
//! - **A real without a MAC** is configured (it has its stable id, its weight, it is listed) but
//!   is neither in the ring nor in `REALS`: its `REALS` entry stays zeroed until the MAC is known.
//!   The kernel forwards by rewriting the destination MAC, so an "alive" entry without one could
//!   only black-hole packets; such a real has never carried a flow, so there is nothing to keep.
//!   Losing the MAC later (`SetMac` to `None`) takes the real out of the ring first and then
//!   zeroes its entry, exactly as removing it does: its tracked flows re-pick from the ring.
//! - **Weight**: 0..=`MAX_WEIGHT` (65535, ipvsadm's range). 0 drains: the real stays alive in
//!   `REALS` (tracked flows continue) and gets no ring slot. With at most 65537 reals per VIP the
//!   total stays within `u32`, which is what Maglev's cumulative weights need; `build_ring` is
//!   still run during validation, so any ring it refuses rejects the batch.
//! - **Real ids** (1..max_reals) are allocated lowest-free, skipping ids in quarantine: a freed id
//!   is not reused until `quarantine` (≥ the conntrack idle time) has passed, so no tracked flow
//!   can still name it. **VIP ids** (0..max_vips) are allocated lowest-free and may be reused by
//!   the next batch: tracked flows carry real ids (and `REALS.vip_id` is checked), not VIP ids,
//!   and a new VIP's ring half is always written (or found already equal) and its `VIP_META`
//!   written before `VIPS` points at it, so nothing of the previous owner is ever read. Ids freed
//!   by a batch are not reused within that same batch: the maps still name them until its last
//!   write.
//! - **Determinism**: new ids are handed out after the whole batch is folded, VIPs in `VipSpec`
//!   order (address, port, protocol), reals by address within their VIP, so the same
//!   configuration on a fresh `Balancer` gets the same ids whatever the order of its changes.
//!   Together with comparing every rebuilt ring against the live one before writing it, a fresh
//!   `Balancer` replaying the configuration over maps that already hold it rewrites no ring.
//!   (It assumes the maps were written by that same configuration; adopting arbitrary pinned
//!   maps, with ids recovered from `REALS`, is the daemon's job.)

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use crate::{
    core::{
        clock::{Clock, SystemClock},
        maglev,
    },
    dataplane::{Dataplane, DataplaneError, Limits},
    model::{Mac, VipFlags, VipSpec},
};

mod state;
mod steps;
#[cfg(test)]
mod tests;
mod types;

use state::{fold, Draft, RealEntry, State, VipEntry};
use steps::{plan_steps, Op, RingPlan, Step};
pub use types::{
    ApplyReport, BalancerError, Change, QuarantinedId, RealSnapshot, RingUpdate, Rollback,
    Snapshot, ValidationError, VipReport, VipSnapshot,
};

/// The desired state and the writer of the maps derived from it. See the module documentation.
pub struct Balancer<D: Dataplane, C: Clock = SystemClock> {
    dp: D,
    clock: C,
    limits: Limits,
    quarantine: Duration,
    vips: State,
    /// Freed real ids and when they were freed.
    quarantined: BTreeMap<u32, Instant>,
    /// Undo writes of a failed batch that could not be done yet (see `repair`).
    pending: Vec<Op>,
    /// Ids to give new VIPs / reals when free (restoring a saved state: a real must get back
    /// the id its tracked flows name).
    preferred_vips: BTreeMap<VipSpec, u32>,
    preferred_reals: BTreeMap<(VipSpec, IpAddr), u32>,
    /// Set while `restore` replays a saved state: a failed write is not undone.
    restoring: bool,
}

/// A VIP as saved by the daemon, with the ids its maps use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreVip {
    pub spec: VipSpec,
    pub id: u32,
    pub flags: VipFlags,
    pub reals: Vec<RestoreReal>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestoreReal {
    pub addr: IpAddr,
    pub id: u32,
    pub weight: u32,
    pub mac: Option<Mac>,
}

impl<D: Dataplane> Balancer<D, SystemClock> {
    /// `quarantine` must be at least the conntrack idle time: a freed real id is reused only once
    /// no tracked flow can still name it.
    pub fn new(dataplane: D, quarantine: Duration) -> Self {
        Self::with_clock(dataplane, quarantine, SystemClock)
    }
}

impl<D: Dataplane, C: Clock> Balancer<D, C> {
    pub fn with_clock(dataplane: D, quarantine: Duration, clock: C) -> Self {
        Balancer {
            limits: dataplane.limits(),
            dp: dataplane,
            clock,
            quarantine,
            vips: State::new(),
            quarantined: BTreeMap::new(),
            pending: Vec::new(),
            preferred_vips: BTreeMap::new(),
            preferred_reals: BTreeMap::new(),
            restoring: false,
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn quarantine(&self) -> Duration {
        self.quarantine
    }

    pub fn dataplane(&self) -> &D {
        &self.dp
    }

    /// Direct access to the dataplane (fault injection in tests). Writes made through it are
    /// unknown to the `Balancer`.
    pub fn dataplane_mut(&mut self) -> &mut D {
        &mut self.dp
    }

    pub fn into_dataplane(self) -> D {
        self.dp
    }

    /// Whether a failed batch left undo writes that could not be done yet.
    pub fn needs_repair(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Retries the undo writes left by a failed batch whose rollback failed too; returns how
    /// many writes it did. `apply` calls it first, so the maps never diverge further.
    pub fn repair(&mut self) -> Result<usize, BalancerError> {
        let ops = std::mem::take(&mut self.pending);
        let count = ops.len();
        self.run_ops(ops)
            .map_err(|(source, pending)| BalancerError::Repair { source, pending })?;
        Ok(count)
    }

    /// Put ids in quarantine as if freed now (stale ids found in adopted maps: tracked flows may
    /// still name them, so no new real may get them before the conntrack idle time).
    pub fn quarantine_ids(&mut self, ids: &[u32]) {
        let now = self.clock.now();
        for id in ids {
            self.quarantined.insert(*id, now);
        }
    }

    /// Replays a saved state into an empty balancer, giving every VIP and real the id it had
    /// (tracked flows and live rings name those ids), and ids still in quarantine their
    /// remaining time. Rings equal to the live ones are not rewritten. An id that is out of
    /// range or used twice is refused as a whole, like any batch.
    pub fn restore(
        &mut self,
        vips: &[RestoreVip],
        quarantined: &[QuarantinedId],
    ) -> Result<ApplyReport, BalancerError> {
        let mut seen_vips = BTreeSet::new();
        let mut seen_reals = BTreeSet::new();
        for v in vips {
            let fresh = seen_vips.insert(v.id);
            if !fresh || v.id >= self.limits.max_vips {
                return Err(BalancerError::Invalid {
                    change: None,
                    source: ValidationError::TooManyVips {
                        vip: v.spec,
                        limit: self.limits.max_vips,
                    },
                });
            }
            for r in &v.reals {
                let fresh = seen_reals.insert(r.id);
                if !fresh || r.id == 0 || r.id >= self.limits.max_reals {
                    return Err(BalancerError::Invalid {
                        change: None,
                        source: ValidationError::TooManyReals {
                            vip: v.spec,
                            real: r.addr,
                            limit: self.limits.max_reals.saturating_sub(1),
                            quarantined: 0,
                        },
                    });
                }
            }
        }
        let mut changes = Vec::new();
        for v in vips {
            self.preferred_vips.insert(v.spec.normalized(), v.id);
            changes.push(Change::AddVip {
                spec: v.spec,
                flags: v.flags,
            });
            for r in &v.reals {
                self.preferred_reals
                    .insert((v.spec.normalized(), r.addr.to_canonical()), r.id);
                changes.push(Change::AddReal {
                    vip: v.spec,
                    addr: r.addr,
                    weight: r.weight,
                    mac: r.mac,
                });
            }
        }
        let now = self.clock.now();
        for q in quarantined {
            if !seen_reals.contains(&q.id) {
                let freed = now
                    .checked_sub(self.quarantine.saturating_sub(q.remaining))
                    .unwrap_or(now);
                self.quarantined.insert(q.id, freed);
            }
        }
        self.restoring = true;
        let report = self.apply(changes);
        self.restoring = false;
        self.preferred_vips.clear();
        self.preferred_reals.clear();
        report
    }

    /// Applies a batch: validated as a whole, then written with one ring rebuild per changed
    /// VIP. On a validation error nothing is written; on a write error the state stays the
    /// previous one and the writes done are undone (see `BalancerError::Write`).
    pub fn apply(&mut self, changes: Vec<Change>) -> Result<ApplyReport, BalancerError> {
        if self.needs_repair() {
            self.repair()?;
        }
        let now = self.clock.now();
        let quarantined: BTreeMap<u32, Instant> = self
            .quarantined
            .iter()
            .filter(|(_, freed)| now.saturating_duration_since(**freed) < self.quarantine)
            .map(|(id, freed)| (*id, *freed))
            .collect();

        let draft = fold(&self.vips, changes)?;
        let mut next =
            self.assign_ids(draft, &quarantined)
                .map_err(|source| BalancerError::Invalid {
                    change: None,
                    source,
                })?;
        let rings = self.plan_rings(&mut next)?;
        let vips = rings
            .iter()
            .map(|plan| VipReport {
                vip: plan.vip,
                vip_id: plan.vip_id,
                ring: match plan.write {
                    Some(_) => RingUpdate::Rewritten {
                        generation: plan.generation,
                    },
                    None => RingUpdate::AlreadyLive {
                        generation: plan.generation,
                    },
                },
                spread_warning: plan.spread_warning.clone(),
            })
            .collect();
        let steps = plan_steps(&self.vips, &next, rings);
        let map_writes = self.execute(steps)?;

        // Committed: the maps hold `next`. Ids it no longer names start their quarantine now.
        let mut quarantined = quarantined;
        let kept: BTreeSet<u32> = next
            .values()
            .flat_map(|vip| vip.reals.values().map(|r| r.id))
            .collect();
        for vip in self.vips.values() {
            for real in vip.reals.values() {
                if !kept.contains(&real.id) {
                    quarantined.insert(real.id, now);
                }
            }
        }
        self.vips = next;
        self.quarantined = quarantined;
        Ok(ApplyReport { vips, map_writes })
    }

    pub fn add_vip(
        &mut self,
        spec: VipSpec,
        flags: VipFlags,
    ) -> Result<ApplyReport, BalancerError> {
        self.apply(vec![Change::AddVip { spec, flags }])
    }

    pub fn del_vip(&mut self, spec: VipSpec) -> Result<ApplyReport, BalancerError> {
        self.apply(vec![Change::DelVip { spec }])
    }

    pub fn add_real(
        &mut self,
        vip: VipSpec,
        addr: IpAddr,
        weight: u32,
        mac: Option<Mac>,
    ) -> Result<ApplyReport, BalancerError> {
        self.apply(vec![Change::AddReal {
            vip,
            addr,
            weight,
            mac,
        }])
    }

    pub fn del_real(&mut self, vip: VipSpec, addr: IpAddr) -> Result<ApplyReport, BalancerError> {
        self.apply(vec![Change::DelReal { vip, addr }])
    }

    pub fn set_weight(
        &mut self,
        vip: VipSpec,
        addr: IpAddr,
        weight: u32,
    ) -> Result<ApplyReport, BalancerError> {
        self.apply(vec![Change::SetWeight { vip, addr, weight }])
    }

    pub fn set_mac(
        &mut self,
        vip: Option<VipSpec>,
        addr: IpAddr,
        mac: Option<Mac>,
    ) -> Result<ApplyReport, BalancerError> {
        self.apply(vec![Change::SetMac { vip, addr, mac }])
    }

    pub fn set_flags(
        &mut self,
        vip: VipSpec,
        flags: VipFlags,
    ) -> Result<ApplyReport, BalancerError> {
        self.apply(vec![Change::SetFlags { vip, flags }])
    }

    pub fn vip_id(&self, spec: &VipSpec) -> Option<u32> {
        self.vips.get(&spec.normalized()).map(|vip| vip.id)
    }

    pub fn real_id(&self, spec: &VipSpec, addr: IpAddr) -> Option<u32> {
        let vip = self.vips.get(&spec.normalized())?;
        vip.reals.get(&addr.to_canonical()).map(|real| real.id)
    }

    /// The ring the kernel reads for this VIP now (the generation named by `VIP_META` in the
    /// map); `None` for an unknown VIP.
    pub fn live_ring(&self, spec: &VipSpec) -> Result<Option<Vec<u32>>, DataplaneError> {
        let Some(id) = self.vip_id(spec) else {
            return Ok(None);
        };
        let meta = self.dp.vip_meta(id)?;
        self.dp.read_ring(id, meta.generation & 1).map(Some)
    }

    pub fn snapshot(&self) -> Snapshot {
        let now = self.clock.now();
        let vips = self
            .vips
            .iter()
            .map(|(spec, vip)| VipSnapshot {
                spec: *spec,
                id: vip.id,
                flags: vip.flags,
                generation: vip.generation,
                reals: vip
                    .reals
                    .iter()
                    .map(|(addr, r)| RealSnapshot {
                        addr: *addr,
                        id: r.id,
                        weight: r.weight,
                        mac: r.mac,
                        in_ring: r.mac.is_some() && r.weight > 0,
                    })
                    .collect(),
            })
            .collect();
        let quarantined = self
            .quarantined
            .iter()
            .filter_map(|(id, freed)| {
                let remaining = self
                    .quarantine
                    .checked_sub(now.saturating_duration_since(*freed))?;
                (!remaining.is_zero()).then_some(QuarantinedId { id: *id, remaining })
            })
            .collect();
        Snapshot { vips, quarantined }
    }

    /// Gives ids to the new VIPs and reals of a folded batch, lowest free first, in `VipSpec`
    /// then address order. Every id of the current state stays taken for the whole batch (even
    /// one the batch frees), and so do ids in quarantine.
    fn assign_ids(
        &self,
        draft: Draft,
        quarantined: &BTreeMap<u32, Instant>,
    ) -> Result<State, ValidationError> {
        let vip_taken: BTreeSet<u32> = self.vips.values().map(|vip| vip.id).collect();
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
            self.preferred_vips
                .get(spec)
                .copied()
                .filter(|id| *id < self.limits.max_vips && !vip_taken.contains(id))
        };
        let want_real = |spec: &VipSpec, addr: &IpAddr| {
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
            .filter(|id| !vip_taken.contains(id) && !reserved_vips.contains(id));
        // Real id 0 is REAL_ID_UNSET, the empty ring slot.
        let mut free_reals = (1..self.limits.max_reals).filter(|id| {
            !current_reals.contains(id)
                && !quarantined.contains_key(id)
                && !reserved_reals.contains(id)
        });

        let mut state = State::new();
        for (spec, vip) in draft {
            let id = match vip.id.or_else(|| want_vip(&spec)) {
                Some(id) => id,
                None => free_vips.next().ok_or(ValidationError::TooManyVips {
                    vip: spec,
                    limit: self.limits.max_vips,
                })?,
            };
            let mut reals = BTreeMap::new();
            for (addr, real) in vip.reals {
                let real_id = match real.id.or_else(|| want_real(&spec, &addr)) {
                    Some(id) => id,
                    None => free_reals.next().ok_or(ValidationError::TooManyReals {
                        vip: spec,
                        real: addr,
                        limit: self.limits.max_reals.saturating_sub(1),
                        quarantined: held_back,
                    })?,
                };
                let entry = RealEntry {
                    id: real_id,
                    weight: real.weight,
                    mac: real.mac,
                };
                reals.insert(addr, entry);
            }
            let entry = VipEntry {
                id,
                flags: vip.flags,
                generation: vip.generation,
                reals,
            };
            state.insert(spec, entry);
        }
        Ok(state)
    }

    /// Rebuilds the ring of every new VIP and of every VIP whose ring members changed, compares
    /// it with the live one and decides which generation will be live; sets `generation` in
    /// `next` accordingly. Reads only.
    fn plan_rings(&self, next: &mut State) -> Result<Vec<RingPlan>, BalancerError> {
        let m = self.limits.ring_size;
        let old_by_id: BTreeMap<u32, &VipEntry<u32>> =
            self.vips.values().map(|vip| (vip.id, vip)).collect();
        let mut plans = Vec::new();
        for (spec, vip) in next.iter_mut() {
            let members = vip.ring_members();
            let old = old_by_id.get(&vip.id);
            if old.is_some_and(|old| old.ring_members() == members) {
                continue;
            }
            let ring =
                maglev::build_ring(&members, m).map_err(|source| BalancerError::Invalid {
                    change: None,
                    source: ValidationError::Ring { vip: *spec, source },
                })?;
            let spread_warning = maglev::spread_warning(members.len(), m);
            let (live, prior_meta) = match old {
                Some(old) => (Some(old.generation), None),
                None => {
                    // A new VIP may find its id's VIP_META in use: a previous daemon left the
                    // same configuration in the maps. Its live half is then compared.
                    let meta = self.dp.vip_meta(vip.id).map_err(BalancerError::Read)?;
                    let live = (meta.in_use != 0).then_some(meta.generation & 1);
                    (live, Some(meta))
                }
            };
            let (generation, write) = match live {
                Some(live) => {
                    let current = self
                        .dp
                        .read_ring(vip.id, live)
                        .map_err(BalancerError::Read)?;
                    if current == ring {
                        (live, None)
                    } else {
                        (live ^ 1, Some(ring))
                    }
                }
                None => {
                    // No reader yet (VIPS does not point here): write half 0, unless it
                    // already holds this very ring.
                    let current = self.dp.read_ring(vip.id, 0).map_err(BalancerError::Read)?;
                    (0, (current != ring).then_some(ring))
                }
            };
            vip.generation = generation;
            plans.push(RingPlan {
                vip: *spec,
                vip_id: vip.id,
                write,
                generation,
                prior_meta,
                spread_warning,
            });
        }
        Ok(plans)
    }

    /// Runs the steps in order; on the first failure undoes the ones done, in reverse.
    fn execute(&mut self, steps: Vec<Step>) -> Result<usize, BalancerError> {
        let mut undo = Vec::new();
        let mut done = 0;
        for step in steps {
            if let Err(source) = step.op.run(&mut self.dp) {
                if self.restoring {
                    // Replaying over adopted maps: the undo writes would restore "nothing" (the
                    // empty state before the replay) over live entries and stop forwarding.
                    // The maps keep what they had, plus the writes done: the same config.
                    return Err(BalancerError::Write {
                        source,
                        rollback: Rollback::Restored { writes: 0 },
                    });
                }
                undo.reverse();
                let writes = undo.len();
                let rollback = match self.run_ops(undo) {
                    Ok(()) => Rollback::Restored { writes },
                    Err((error, pending)) => Rollback::Incomplete { error, pending },
                };
                return Err(BalancerError::Write { source, rollback });
            }
            done += 1;
            undo.extend(step.undo);
        }
        Ok(done)
    }

    /// Runs ops in order. On a failure, stops (later undo writes assume the earlier ones were
    /// done) and keeps the failed op and the rest in `pending`.
    fn run_ops(&mut self, ops: Vec<Op>) -> Result<(), (DataplaneError, usize)> {
        let mut ops = ops.into_iter();
        while let Some(op) = ops.next() {
            if let Err(error) = op.run(&mut self.dp) {
                self.pending = std::iter::once(op).chain(ops).collect();
                return Err((error, self.pending.len()));
            }
        }
        Ok(())
    }
}
