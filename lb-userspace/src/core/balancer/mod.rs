//! The desired state of the balancer (VIPs, their reals, weights, MACs, flags) and the only
//! writer of the maps derived from it.
//!
//! A `Balancer` takes a batch of `Change`s, folds them into a copy of its state, validates the
//! result as a whole (ids, limits, rings) into a `Plan`, and only then writes the maps
//! (`commit`), in an order that keeps every intermediate state consistent for the XDP program
//! reading them concurrently. If a write fails, the in-memory state stays the previous one and
//! the writes already done are undone.
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
//!   can still name it. **VIP ids** (0..max_vips) are allocated lowest-free: tracked flows carry
//!   real ids (and `REALS.vip_id` is checked), not VIP ids. An id freed by a batch is given to a
//!   new VIP of that same batch only when no other is free (a full map, a VIP replaced by
//!   another), and then only after a barrier and with the removed VIP's entries cleared first.
//! - **Grace periods**: the XDP program reads the maps concurrently, inside an RCU read section.
//!   What a write unpublishes (a ring half after its flip, a removed VIP's id and entries, a
//!   real leaving service) may still be read by a run that began before the write. So a ring
//!   half is rewritten, a freed VIP id reused, and a `REALS` or `VIP_META` entry cleared only a
//!   `grace` period later and after `Dataplane::quiesce` (an RCU grace period of the kernel's).
//!   A plan says when it may be committed (`Plan::not_before`), so that a caller with more
//!   changes queued can fold them into the same batch while it waits.
//! - **Determinism**: new ids are handed out after the whole batch is folded, VIPs in `VipSpec`
//!   order (address, port, protocol), reals by address within their VIP, so the same
//!   configuration on a fresh `Balancer` gets the same ids whatever the order of its changes.
//!   Together with comparing every rebuilt ring against the live one before writing it, a fresh
//!   `Balancer` replaying the configuration over maps that already hold it rewrites no ring.
//!   `adopt` does that over maps a previous daemon left, and clears what the replayed state
//!   does not name.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use lb_common::{Real, VipMeta};

use crate::{
    core::{
        clock::{Clock, SystemClock},
        maglev,
    },
    dataplane::{Dataplane, DataplaneError, Limits},
    model::{CheckFields, Mac, Mode, RealAddr, VipFlags, VipOptions, VipSpec},
};

mod adopt;
#[cfg(test)]
mod digest_tests;
#[cfg(test)]
mod egress_tests;
#[cfg(test)]
mod health_tests;
mod ids;
#[cfg(test)]
mod nat_tests;
pub mod selftest;
mod state;
mod steps;
pub mod sync;
#[cfg(test)]
mod tests;
mod types;

pub use adopt::AdoptReport;
use state::{fold, State, VipEntry};
use steps::{plan_steps, Layout, Op, RingPlan, Step};
pub use types::{
    ApplyReport, BalancerError, Change, QuarantinedId, RealRecord, RealSnapshot, RingUpdate,
    Rollback, Snapshot, ValidationError, VipRecord, VipReport, VipSnapshot,
};

/// How long a program run that began before a write may still be reading what it unpublished:
/// far above an XDP run (microseconds; a NAPI poll is bounded by the softirq budget of ~2 ms).
/// `Dataplane::quiesce` then waits for an RCU grace period of the kernel's on top.
pub const DEFAULT_GRACE: Duration = Duration::from_millis(20);

/// The desired state and the writer of the maps derived from it. See the module documentation.
pub struct Balancer<D: Dataplane, C: Clock = SystemClock> {
    dp: D,
    clock: C,
    limits: Limits,
    quarantine: Duration,
    grace: Duration,
    /// The mode of reals and VIPs that name none (`xlb daemon --mode`).
    default_mode: Mode,
    vips: State,
    /// Freed real ids and when they were freed.
    quarantined: BTreeMap<u32, Instant>,
    /// When each ring half (vip id, half) stopped being the live one.
    idle_since: BTreeMap<(u32, u32), Instant>,
    /// VIP ids whose VIP was removed, and when.
    freed_vips: BTreeMap<u32, Instant>,
    /// When the last `Dataplane::quiesce` began: what was unpublished before is no longer read.
    last_quiesce: Option<Instant>,
    /// Undo writes of a failed batch that could not be done yet (see `repair`).
    pending: Vec<Op>,
    /// Ids to give new VIPs / reals when free (restoring a saved state: a real must get back
    /// the id its tracked flows name).
    preferred_vips: BTreeMap<VipSpec, u32>,
    preferred_reals: BTreeMap<(VipSpec, RealAddr), u32>,
    /// Set while `restore` replays a saved state: a failed write is not undone, and counters
    /// (the adopted VIPs' own) are not zeroed.
    restoring: bool,
    /// Bumped by every commit: a plan is only valid for the state it was made from.
    epoch: u64,
    /// The kernel's flow hash seed (`--hash-seed`), for the predictions of the self-test and
    /// flow sync.
    hash_seed: u32,
}

/// A validated batch and the writes that make it live; nothing is written until `commit`.
pub struct Plan {
    epoch: u64,
    next: State,
    steps: Vec<Step>,
    vips: Vec<VipReport>,
    /// The real quarantine as of planning, plus the ids this batch frees.
    quarantined: BTreeMap<u32, Instant>,
    not_before: Option<Instant>,
    /// Whether something the plan reuses was unpublished after the last quiesce.
    quiesce: bool,
}

impl Plan {
    /// When the plan may be written: a ring half it rewrites or a VIP id it reuses was given up
    /// less than a grace period ago. `commit` waits until then by itself.
    pub fn not_before(&self) -> Option<Instant> {
        self.not_before
    }

    /// Whether committing would write nothing.
    pub fn is_noop(&self) -> bool {
        self.steps.is_empty()
    }
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
            grace: DEFAULT_GRACE,
            default_mode: Mode::Dr,
            vips: State::new(),
            quarantined: BTreeMap::new(),
            idle_since: BTreeMap::new(),
            freed_vips: BTreeMap::new(),
            last_quiesce: None,
            pending: Vec::new(),
            preferred_vips: BTreeMap::new(),
            preferred_reals: BTreeMap::new(),
            restoring: false,
            epoch: 0,
            hash_seed: 0,
        }
    }

    /// The grace period (see the module documentation); `DEFAULT_GRACE` unless set.
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// The mode of reals whose VIP and themselves name none (direct routing unless set).
    /// The seed the loaded program hashes flows with.
    pub fn with_hash_seed(mut self, seed: u32) -> Self {
        self.hash_seed = seed;
        self
    }

    pub fn with_default_mode(mut self, mode: Mode) -> Self {
        self.default_mode = mode;
        self
    }

    pub fn default_mode(&self) -> Mode {
        self.default_mode
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

    /// Direct access to the dataplane, for what is not a map write (a test run of the program,
    /// fault injection in tests). Writes made through it are unknown to the `Balancer`.
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
    /// many writes it did. `plan` calls it first, so the maps never diverge further.
    pub fn repair(&mut self) -> Result<usize, BalancerError> {
        let ops = std::mem::take(&mut self.pending);
        let count = ops.len();
        self.run_ops(ops)
            .map_err(|(source, pending)| BalancerError::Repair { source, pending })?;
        Ok(count)
    }

    /// Replays a saved state into an empty balancer, giving every VIP and real the id it had
    /// (tracked flows and live rings name those ids), and ids still in quarantine their
    /// remaining time. Rings equal to the live ones are not rewritten. An id that is out of
    /// range or used twice is refused as a whole, like any batch.
    pub fn restore(
        &mut self,
        vips: &[VipRecord],
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
                        vip: v.vip,
                        limit: self.limits.max_vips,
                    },
                });
            }
            for r in v.reals.iter().chain(&v.sorry) {
                let fresh = seen_reals.insert(r.id);
                if !fresh || r.id == 0 || r.id >= self.limits.max_reals {
                    return Err(BalancerError::Invalid {
                        change: None,
                        source: ValidationError::TooManyReals {
                            vip: v.vip,
                            real: r.addr,
                            limit: self.limits.max_reals.saturating_sub(1),
                            quarantined: 0,
                            quarantine: self.quarantine,
                        },
                    });
                }
            }
        }
        let mut changes = Vec::new();
        for v in vips {
            self.preferred_vips.insert(v.vip, v.id);
            changes.push(Change::AddVip {
                spec: v.vip,
                flags: v.flags,
            });
            if v.options != VipOptions::default() {
                changes.push(Change::SetOptions {
                    vip: v.vip,
                    options: v.options,
                });
            }
            if v.mode.is_some() {
                changes.push(Change::SetMode {
                    vip: v.vip,
                    real: None,
                    mode: v.mode,
                });
            }
            if let Some(sorry) = v
                .sorry
                .as_ref()
                .filter(|_| v.options.sorry_server.is_some())
            {
                if let Some(addr) = v.options.sorry_server {
                    self.preferred_reals.insert((v.vip, addr.into()), sorry.id);
                    if sorry.mac.is_some() {
                        changes.push(Change::SetMac {
                            vip: Some(v.vip),
                            addr,
                            mac: sorry.mac,
                        });
                    }
                    if sorry.egress.is_some() {
                        changes.push(Change::SetEgress {
                            vip: Some(v.vip),
                            addr,
                            egress: sorry.egress,
                        });
                    }
                }
            }
            if v.check.is_some() {
                changes.push(Change::SetCheck {
                    vip: v.vip,
                    real: None,
                    check: v.check.clone().map(Box::new),
                });
            }
            for r in &v.reals {
                self.preferred_reals.insert((v.vip, r.addr), r.id);
                changes.push(Change::AddReal {
                    vip: v.vip,
                    addr: r.addr,
                    weight: r.weight,
                    mac: r.mac,
                });
                if r.egress.is_some() {
                    changes.push(Change::SetEgress {
                        vip: Some(v.vip),
                        addr: r.addr.ip,
                        egress: r.egress,
                    });
                }
                if r.mode.is_some() {
                    changes.push(Change::SetMode {
                        vip: v.vip,
                        real: Some(r.addr),
                        mode: r.mode,
                    });
                }
                if r.check.is_some() {
                    changes.push(Change::SetCheck {
                        vip: v.vip,
                        real: Some(r.addr),
                        check: r.check.clone().map(Box::new),
                    });
                }
                // The saved status, not the check's `initial`: a restart moves no real.
                let checked = CheckFields::merged(v.check.as_ref(), r.check.as_ref())
                    .and_then(|c| {
                        c.resolve(&state::check_scope(&v.vip, &r.addr))
                            .ok()
                            .flatten()
                    })
                    .is_some();
                if checked {
                    changes.push(Change::SetHealth {
                        vip: v.vip,
                        addr: r.addr,
                        down: r.down,
                        weight: r.dyn_weight,
                    });
                }
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

    /// Whether `plan` would accept the changes themselves, folded in order and each checked
    /// against the state the ones before it left (ids, limits and rings are `plan`'s).
    pub fn check(&self, changes: &[Change]) -> Result<(), BalancerError> {
        fold(&self.vips, changes.to_vec(), self.default_mode).map(|_| ())
    }

    /// Take the program off the interface (`Dataplane::detach`).
    pub fn detach(&mut self) -> Result<(), DataplaneError> {
        self.dp.detach()
    }

    /// Remove the maps' pins (`Dataplane::remove_pins`).
    pub fn remove_pins(&mut self) -> Result<(), DataplaneError> {
        self.dp.remove_pins()
    }

    /// Applies a batch: `plan` then `commit` (which waits out a grace period if the plan
    /// needs one).
    pub fn apply(&mut self, changes: Vec<Change>) -> Result<ApplyReport, BalancerError> {
        let plan = self.plan(changes)?;
        self.commit(plan)
    }

    /// Validates a batch as a whole and works out its writes, one ring rebuild per changed
    /// VIP. Nothing is written (undo writes left by an earlier failure aside: they are retried
    /// first). On a validation error the batch is refused naming the change at fault.
    pub fn plan(&mut self, changes: Vec<Change>) -> Result<Plan, BalancerError> {
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

        let draft = fold(&self.vips, changes, self.default_mode)?;
        let assigned =
            self.assign_ids(draft, &quarantined)
                .map_err(|source| BalancerError::Invalid {
                    change: None,
                    source,
                })?;
        let mut next = assigned.state;
        let rings = self.plan_rings(&mut next)?;
        // The latest unpublishing of what this plan reuses: a ring half it rewrites, a VIP
        // id freed by an earlier batch.
        let mut unpublished = assigned.freed_at;
        for plan in &rings {
            if plan.write.is_some() {
                let idle = self.idle_since.get(&(plan.vip_id, plan.generation & 1));
                unpublished = unpublished.max(idle.copied());
            }
        }
        let not_before = unpublished.map(|t| t + self.grace).filter(|t| *t > now);
        let quiesce = unpublished.is_some_and(|t| self.last_quiesce.is_none_or(|q| q <= t));
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
        let layout = Layout {
            reused_vip_ids: assigned.reused_vip_ids,
            reset_counters: !self.restoring,
        };
        let steps = plan_steps(&self.vips, &next, rings, &layout);
        Ok(Plan {
            epoch: self.epoch,
            next,
            steps,
            vips,
            quarantined,
            not_before,
            quiesce,
        })
    }

    /// Writes a plan made from the current state (waiting until `not_before` first). On a
    /// write error the state stays the previous one and the writes done are undone (see
    /// `BalancerError::Write`).
    pub fn commit(&mut self, plan: Plan) -> Result<ApplyReport, BalancerError> {
        if plan.epoch != self.epoch {
            return Err(BalancerError::StalePlan);
        }
        if let Some(t) = plan.not_before {
            self.clock.sleep_until(t);
        }
        if plan.quiesce {
            self.quiesce();
        }
        let (done, failed) = self.execute(plan.steps);
        if let Some(e) = failed {
            self.after_failure(&done);
            return Err(e);
        }

        // Committed: the maps hold `next`. Ids it no longer names start their quarantine now;
        // ring halves and VIP ids it gave up start their grace period from the write that
        // gave them up (a barrier later in the batch then covers them).
        let now = self.clock.now();
        let written =
            |f: &dyn Fn(&Op) -> bool| done.iter().find(|(op, _)| f(op)).map_or(now, |(_, at)| *at);
        let next = plan.next;
        let mut quarantined = plan.quarantined;
        let kept: BTreeSet<u32> = next
            .values()
            .flat_map(|vip| vip.reals.values().map(|r| r.id))
            .collect();
        let next_vips: BTreeMap<u32, &VipEntry<u32>> = next.values().map(|v| (v.id, v)).collect();
        for (spec, vip) in &self.vips {
            for real in vip.reals.values() {
                if !kept.contains(&real.id) {
                    quarantined.insert(real.id, now);
                }
            }
            match next.get(spec).filter(|n| n.id == vip.id) {
                Some(n) if n.generation != vip.generation => {
                    let flip = written(&|op| matches!(op, Op::SetMeta(id, _) if *id == vip.id));
                    self.idle_since.insert((vip.id, vip.generation & 1), flip);
                }
                Some(_) => {}
                None => {
                    let key = spec.key();
                    let gone =
                        written(&|op| matches!(op, Op::DelVip(k) | Op::SetVip(k, _) if *k == key));
                    self.idle_since.insert((vip.id, 0), gone);
                    self.idle_since.insert((vip.id, 1), gone);
                    if !next_vips.contains_key(&vip.id) {
                        self.freed_vips.insert(vip.id, gone);
                    }
                }
            }
        }
        for id in next_vips.keys() {
            self.freed_vips.remove(id);
        }
        self.forget_covered(now);
        self.vips = next;
        self.quarantined = quarantined;
        self.epoch += 1;
        Ok(ApplyReport {
            vips: plan.vips,
            map_writes: done.len(),
        })
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
        addr: impl Into<RealAddr>,
        weight: u32,
        mac: Option<Mac>,
    ) -> Result<ApplyReport, BalancerError> {
        self.apply(vec![Change::AddReal {
            vip,
            addr: addr.into(),
            weight,
            mac,
        }])
    }

    pub fn del_real(
        &mut self,
        vip: VipSpec,
        addr: impl Into<RealAddr>,
    ) -> Result<ApplyReport, BalancerError> {
        self.apply(vec![Change::DelReal {
            vip,
            addr: addr.into(),
        }])
    }

    pub fn set_weight(
        &mut self,
        vip: VipSpec,
        addr: impl Into<RealAddr>,
        weight: u32,
    ) -> Result<ApplyReport, BalancerError> {
        self.apply(vec![Change::SetWeight {
            vip,
            addr: addr.into(),
            weight,
        }])
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
        self.vips.get(spec).map(|vip| vip.id)
    }

    pub fn real_id(&self, spec: &VipSpec, addr: impl Into<RealAddr>) -> Option<u32> {
        let vip = self.vips.get(spec)?;
        vip.reals.get(&addr.into()).map(|real| real.id)
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
            .map(|(spec, vip)| {
                let quorum = vip.quorum();
                let real = |addr: &RealAddr, r: &state::RealEntry<u32>| {
                    let in_ring = vip.in_ring(r, &quorum);
                    RealSnapshot {
                        addr: *addr,
                        id: r.id,
                        weight: r.weight,
                        mac: r.mac,
                        egress: r.egress,
                        mode: r.mode,
                        effective_mode: r.fwd,
                        in_ring,
                        serving: vip.serves(r, &quorum),
                        effective_weight: if in_ring { r.effective_weight() } else { 0 },
                        check: r.check.clone(),
                        effective_check: if r.sorry {
                            None
                        } else {
                            vip.spec_of(spec, addr, r)
                        },
                        down: r.down,
                        dyn_weight: r.dyn_weight,
                    }
                };
                VipSnapshot {
                    spec: *spec,
                    id: vip.id,
                    flags: vip.flags,
                    options: vip.options,
                    mode: vip.mode,
                    effective_mode: vip.mode.unwrap_or(self.default_mode),
                    check: vip.check.clone(),
                    generation: vip.generation,
                    ring_digest: vip.ring_digest.iter().map(|b| format!("{b:02x}")).collect(),
                    reals: vip
                        .reals
                        .iter()
                        .filter(|(_, r)| !r.sorry)
                        .map(|(a, r)| real(a, r))
                        .collect(),
                    sorry: vip.sorry().map(|(a, r)| real(a, r)),
                    healthy_weight: quorum.healthy_weight,
                    quorum_lost: quorum.lost,
                    sorry_active: quorum.sorry_active,
                    fail_open: quorum.fail_open,
                    dropping: quorum.drop,
                }
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

    /// Rebuilds the ring of every new VIP and of every VIP whose ring members changed, compares
    /// it with the live one and decides which generation will be live; sets `generation` in
    /// `next` accordingly. Reads only.
    fn plan_rings(&self, next: &mut State) -> Result<Vec<RingPlan>, BalancerError> {
        let m = self.limits.ring_size;
        let mut plans = Vec::new();
        for (spec, vip) in next.iter_mut() {
            let members = vip.ring_members();
            // The same VIP with the same id: a VIP that got a freed id is new.
            let old = self.vips.get(spec).filter(|old| old.id == vip.id);
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
                    // same configuration in the maps, or the id was another VIP's. Its live
                    // half is then compared, and the idle one written.
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
                    vip.ring_digest = state::ring_digest(&ring, &vip.reals);
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
                    vip.ring_digest = state::ring_digest(&ring, &vip.reals);
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

    /// The kernel's own RCU grace period: every program run that began before it has ended.
    fn quiesce(&mut self) {
        let started = self.clock.now();
        match self.dp.quiesce() {
            Ok(()) => self.last_quiesce = Some(started),
            Err(e) => log::warn!("waiting for the XDP program's readers: {e}"),
        }
    }

    /// A barrier: a grace period on the clock, then `quiesce`.
    fn barrier(&mut self) {
        let until = self.clock.now() + self.grace;
        self.clock.sleep_until(until);
        self.quiesce();
    }

    /// Drop the unpublishing times no longer needed: past their grace period and before the
    /// last quiesce.
    fn forget_covered(&mut self, now: Instant) {
        let (grace, last) = (self.grace, self.last_quiesce);
        let keep =
            |t: &Instant| now.saturating_duration_since(*t) < grace || last.is_none_or(|q| q <= *t);
        self.idle_since.retain(|_, t| keep(t));
        self.freed_vips.retain(|_, t| keep(t));
    }

    /// After a failed (and undone) batch: what it made visible for a moment may have been read
    /// and is treated as unpublished now: the ring halves it wrote, the VIP ids it published,
    /// and the real ids it made alive (tracked flows may name them: quarantined).
    fn after_failure(&mut self, done: &[(Op, Instant)]) {
        let now = self.clock.now();
        let vip_ids: BTreeSet<u32> = self.vips.values().map(|v| v.id).collect();
        let real_ids: BTreeSet<u32> = self
            .vips
            .values()
            .flat_map(|v| v.reals.values().map(|r| r.id))
            .collect();
        for (op, _) in done {
            match op {
                Op::WriteRing {
                    vip_id, generation, ..
                } => {
                    self.idle_since.insert((*vip_id, generation & 1), now);
                }
                Op::SetVip(_, id) if !vip_ids.contains(id) => {
                    self.freed_vips.insert(*id, now);
                }
                Op::SetReal(id, real)
                    if real.flags & lb_common::REAL_F_ALIVE != 0 && !real_ids.contains(id) =>
                {
                    self.quarantined.insert(*id, now);
                }
                _ => {}
            }
        }
        self.epoch += 1;
    }

    /// Runs the steps in order: the writes done and when each was done, and the error that
    /// stopped them, after which they were undone in reverse (with a barrier wherever the
    /// steps had one).
    fn execute(&mut self, steps: Vec<Step>) -> (Vec<(Op, Instant)>, Option<BalancerError>) {
        let mut undo = Vec::new();
        let mut done = Vec::new();
        for step in steps {
            if matches!(step.op, Op::Barrier) {
                self.barrier();
                undo.push(Op::Barrier);
                continue;
            }
            if let Err(source) = step.op.run(&mut self.dp) {
                if self.restoring {
                    // Replaying over adopted maps: the undo writes would restore "nothing" (the
                    // empty state before the replay) over live entries and stop forwarding.
                    // The maps keep what they had, plus the writes done: the same config.
                    let rollback = Rollback::Restored { writes: 0 };
                    return (done, Some(BalancerError::Write { source, rollback }));
                }
                undo.reverse();
                let writes = undo.iter().filter(|op| !matches!(op, Op::Barrier)).count();
                let rollback = match self.run_ops(undo) {
                    Ok(()) => Rollback::Restored { writes },
                    Err((error, pending)) => Rollback::Incomplete { error, pending },
                };
                return (done, Some(BalancerError::Write { source, rollback }));
            }
            undo.extend(step.undo);
            done.push((step.op, self.clock.now()));
        }
        (done, None)
    }

    /// Runs ops in order (a `Barrier` waits). On a failure, stops (later undo writes assume the
    /// earlier ones were done) and keeps the failed op and the rest in `pending`.
    fn run_ops(&mut self, ops: Vec<Op>) -> Result<(), (DataplaneError, usize)> {
        let mut ops = ops.into_iter();
        while let Some(op) = ops.next() {
            if matches!(op, Op::Barrier) {
                self.barrier();
                continue;
            }
            if let Err(error) = op.run(&mut self.dp) {
                self.pending = std::iter::once(op).chain(ops).collect();
                return Err((error, self.pending.len()));
            }
        }
        Ok(())
    }

    /// Zero a `REALS` entry and a `VIP_META` entry found alive but unknown (adoption).
    fn clear_entries(&mut self, reals: &[u32], metas: &[u32]) -> Result<(), DataplaneError> {
        for id in reals {
            self.dp.set_real(*id, &Real::default())?;
        }
        for id in metas {
            self.dp.set_vip_meta(*id, &VipMeta::default())?;
        }
        Ok(())
    }
}
