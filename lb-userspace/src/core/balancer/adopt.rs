//! Adopting maps a previous daemon left pinned: replay the saved state with its ids, then
//! clear whatever the maps hold that the state does not name (a lost, older or edited state
//! file). Such entries would forward to reals nobody manages, hold map slots the replay
//! needs, or drop fragments to addresses that are no VIP's any more; and the ids tracked
//! flows still name are kept from new reals until those flows idle out.

use std::collections::{BTreeSet, HashSet};

use lb_common::REAL_ID_UNSET;

use super::{
    state::{revnat_entries, vip_addrs},
    ApplyReport, Balancer, BalancerError, QuarantinedId, VipRecord,
};
use crate::{
    core::clock::Clock,
    dataplane::Dataplane,
    model::{map_addr, VipSpec},
};

/// What `adopt` found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AdoptReport {
    pub restored: ApplyReport,
    /// `VIPS` keys no saved VIP has: deleted before the replay.
    pub stale_vips: usize,
    /// Alive `REALS` ids no saved real has: zeroed and put in quarantine (tracked flows may
    /// still name them).
    pub stale_reals: Vec<u32>,
    /// Real ids named by tracked flows but by no saved real and no entry: quarantined.
    pub stale_named: Vec<u32>,
    /// In-use `VIP_META` ids no saved VIP has: zeroed.
    pub stale_meta: usize,
    /// `VIP_ADDRS` entries that do not match the saved VIPs: removed or rewritten.
    pub stale_addrs: usize,
}

impl<D: Dataplane, C: Clock> Balancer<D, C> {
    /// Take over maps that may hold entries of an earlier daemon: delete `VIPS` keys the saved
    /// state does not have, replay it (`restore`), then, a grace period later, zero the
    /// `REALS` and `VIP_META` entries and fix the `VIP_ADDRS` entries it does not name.
    /// Stale real ids are quarantined like freed ones. Only for a fresh `Balancer`.
    pub fn adopt(
        &mut self,
        saved: &[VipRecord],
        quarantined: &[QuarantinedId],
    ) -> Result<AdoptReport, BalancerError> {
        let err = BalancerError::Adopt;
        let known: HashSet<lb_common::VipKey> = saved.iter().map(|v| v.vip.key()).collect();
        let mut report = AdoptReport::default();
        for (key, id) in self.dp.vips().map_err(err)? {
            if !known.contains(&key) {
                log::warn!(
                    "removing a VIP found in the pinned maps but not in the state: {} (id {id})",
                    describe_key(&key)
                );
                self.dp.del_vip(&key).map_err(err)?;
                report.stale_vips += 1;
            }
        }
        // Addresses no saved VIP has, before the replay: it may need their slots.
        let saved_addrs: HashSet<[u8; 16]> = saved.iter().map(|v| map_addr(v.vip.addr)).collect();
        for (addr, _) in self.dp.vip_addrs().map_err(err)? {
            if !saved_addrs.contains(&addr) {
                self.dp.del_vip_addr(&addr).map_err(err)?;
                report.stale_addrs += 1;
            }
        }
        let since = self.clock.now();
        report.restored = self.restore(saved, quarantined)?;

        let snap = self.snapshot();
        let known_reals: BTreeSet<u32> = snap
            .vips
            .iter()
            .flat_map(|v| v.reals.iter().map(|r| r.id))
            .collect();
        let known_vips: BTreeSet<u32> = snap.vips.iter().map(|v| v.id).collect();
        let mut stale_meta = Vec::new();
        for id in 0..self.limits.max_vips {
            if !known_vips.contains(&id) && self.dp.vip_meta(id).map_err(err)?.in_use != 0 {
                stale_meta.push(id);
            }
        }
        for id in 1..self.limits.max_reals {
            if id != REAL_ID_UNSET
                && !known_reals.contains(&id)
                && self.dp.real(id).map_err(err)? != lb_common::Real::default()
            {
                report.stale_reals.push(id);
            }
        }
        // Ids no entry holds any more but tracked flows still name (a real added and removed
        // after the saved state was written): no new real may get them before they idle out.
        let named = self.dp.conntrack_real_ids().map_err(err)?;
        report.stale_named = named
            .into_iter()
            .filter(|id| *id != REAL_ID_UNSET && *id < self.limits.max_reals)
            .filter(|id| !known_reals.contains(id) && !report.stale_reals.contains(id))
            .filter(|id| !self.quarantined.contains_key(id))
            .collect();
        let now = self.clock.now();
        for id in &report.stale_named {
            self.quarantined.insert(*id, now);
        }
        if !report.stale_reals.is_empty() || !stale_meta.is_empty() {
            // Packets that found a stale VIPS key before it went may still read these.
            self.clock.sleep_until(since + self.grace);
            self.quiesce();
            let stale_reals = report.stale_reals.clone();
            self.clear_entries(&stale_reals, &stale_meta).map_err(err)?;
            let now = self.clock.now();
            for id in &stale_reals {
                self.quarantined.insert(*id, now);
            }
        }
        report.stale_meta = stale_meta.len();

        let want = vip_addrs(&self.vips);
        for (addr, value) in self.dp.vip_addrs().map_err(err)? {
            match want.get(&addr) {
                Some(w) if *w == value => {}
                Some(w) => {
                    self.dp.set_vip_addr(&addr, w).map_err(err)?;
                    report.stale_addrs += 1;
                }
                None => {
                    self.dp.del_vip_addr(&addr).map_err(err)?;
                    report.stale_addrs += 1;
                }
            }
        }
        // Reverse-NAT entries of reals no longer in NAT mode (or gone): their replies would
        // still be rewritten to a VIP that no longer sends them anything.
        let want = revnat_entries(&self.vips);
        for (key, value) in self.dp.revnats().map_err(err)? {
            if want.get(&key) != Some(&value) {
                match want.get(&key) {
                    Some(w) => self.dp.set_revnat(&key, w).map_err(err)?,
                    None => self.dp.del_revnat(&key).map_err(err)?,
                }
                report.stale_addrs += 1;
            }
        }
        self.epoch += 1;
        Ok(report)
    }
}

/// A `VIPS` key as a VIP spec, for the log (it may hold a protocol xlb does not know).
fn describe_key(key: &lb_common::VipKey) -> String {
    let addr = std::net::Ipv6Addr::from(key.addr).to_canonical();
    let port = u16::from_be(key.port_be);
    match crate::model::Proto::from_ip_proto(key.proto) {
        Some(proto) => VipSpec::new(proto, addr, port).to_string(),
        None => format!("protocol {} {addr} port {port}", key.proto),
    }
}
