//! The balancer's desired state as it is kept in memory, and the folding of a batch of changes
//! into a draft of it, each change validated against the state the ones before it left.

use std::{collections::BTreeMap, net::IpAddr};

use lb_common::{
    Real, RevNat, RevNatKey, TxPort, VipAddrValue, VipMeta, REAL_F_ALIVE, REAL_F_NAT,
    REAL_F_NEXT_HOP_PASS, REAL_F_TUNNEL, REAL_F_V6, VIP_F_QUORUM_DROP,
};

use super::{BalancerError, Change, ValidationError};
use crate::{
    core::maglev::MaglevReal,
    model::{
        addr_problem, mac_problem, map_addr, CheckFieldError, CheckFields, CheckSpec, DownFlows,
        Egress, Mac, Mode, OnQuorumLost, RealAddr, Target, VipFlags, VipOptions, VipSpec,
        MAX_WEIGHT,
    },
};

/// One VIP; `I` is `u32` in the committed state and `Option<u32>` while a batch is folded (new
/// entries get their ids only once the whole batch is known, for deterministic ids).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct VipEntry<I> {
    pub(super) id: I,
    pub(super) flags: VipFlags,
    pub(super) options: VipOptions,
    /// The mode its reals take unless they name their own (`None`: the daemon's).
    pub(super) mode: Option<Mode>,
    /// The VIP's check (each real may override it).
    pub(super) check: Option<CheckFields>,
    /// The live ring half (meaningful in the committed state only).
    pub(super) generation: u32,
    /// SHA-256 of the live ring as its slots' real addresses (`ring_digest`).
    pub(super) ring_digest: [u8; 32],
    /// The reals, and the sorry server (`RealEntry::sorry`) when the VIP has one: it has an id
    /// and a `REALS` entry like a real, and ring slots only while the quorum is lost.
    pub(super) reals: BTreeMap<RealAddr, RealEntry<I>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct RealEntry<I> {
    pub(super) id: I,
    pub(super) weight: u32,
    /// Where its frames go: the real's own MAC (direct routing) or its next hop's (tunnel).
    pub(super) mac: Option<Mac>,
    /// The interface `mac` is on, when not the balancer's (tunnel reals only).
    pub(super) egress: Option<Egress>,
    /// The mode as set on the real (`None`: the VIP's, else the daemon's).
    pub(super) mode: Option<Mode>,
    /// Its effective mode (settled when a batch is folded).
    pub(super) fwd: Mode,
    /// The VIP's sorry server, not one of its reals.
    pub(super) sorry: bool,
    /// The real's own check fields, merged over the VIP's check.
    pub(super) check: Option<CheckFields>,
    /// Out of the ring because its check fails (only ever set while it has a check).
    pub(super) down: bool,
    /// The weight an `exec` check with `dynamic` reported, in place of `weight`.
    pub(super) dyn_weight: Option<u32>,
    /// Added in the batch being folded and given no health yet: it starts as its check's
    /// `initial` says (settled when the batch is folded).
    pub(super) fresh: bool,
}

pub(super) type State = BTreeMap<VipSpec, VipEntry<u32>>;
pub(super) type Draft = BTreeMap<VipSpec, VipEntry<Option<u32>>>;

impl<I: Clone> RealEntry<I> {
    pub(super) fn with_id<J>(&self, id: J) -> RealEntry<J> {
        RealEntry {
            id,
            weight: self.weight,
            mac: self.mac,
            egress: self.egress,
            mode: self.mode,
            fwd: self.fwd,
            sorry: self.sorry,
            check: self.check.clone(),
            down: self.down,
            dyn_weight: self.dyn_weight,
            fresh: false,
        }
    }

    /// Its `mac` is a next hop's and it may leave by another interface (`egress`): tunnel
    /// and NAT reals; a direct-routing real's `mac` is its own.
    pub(super) fn routed(&self) -> bool {
        self.fwd != Mode::Dr
    }

    /// The weight the ring gives the real when it is in it.
    pub(super) fn effective_weight(&self) -> u32 {
        self.dyn_weight.unwrap_or(self.weight)
    }
}

/// Where a VIP stands with its quorum, derived from its reals' health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Quorum {
    /// Summed effective weight of the reals that are up and resolved.
    pub(super) healthy_weight: u64,
    pub(super) lost: bool,
    /// The sorry server takes the new flows (quorum lost, sorry server resolved).
    pub(super) sorry_active: bool,
    /// Every real is back in the ring, down or not (quorum lost, no usable sorry server).
    pub(super) fail_open: bool,
    /// New flows are dropped and counted as quorum drops.
    pub(super) drop: bool,
}

impl<I: Clone> VipEntry<I> {
    pub(super) fn with_id<J>(&self, id: J, reals: BTreeMap<RealAddr, RealEntry<J>>) -> VipEntry<J> {
        VipEntry {
            id,
            flags: self.flags,
            options: self.options,
            mode: self.mode,
            check: self.check.clone(),
            generation: self.generation,
            ring_digest: self.ring_digest,
            reals,
        }
    }

    /// The check a real runs (its fields over the VIP's), if any.
    pub(super) fn check_of(&self, real: &RealEntry<I>) -> Option<CheckFields> {
        CheckFields::merged(self.check.as_ref(), real.check.as_ref())
    }

    /// The resolved check of a real; `None` when it is not checked (no check, `type = "none"`,
    /// or a check that does not resolve, which `fold` never lets in).
    pub(super) fn spec_of(
        &self,
        vip: &VipSpec,
        addr: &RealAddr,
        real: &RealEntry<I>,
    ) -> Option<CheckSpec> {
        self.check_of(real)?
            .resolve(&check_scope(vip, addr))
            .ok()
            .flatten()
    }

    pub(super) fn sorry(&self) -> Option<(&RealAddr, &RealEntry<I>)> {
        self.reals.iter().find(|(_, r)| r.sorry)
    }

    pub(super) fn quorum(&self) -> Quorum {
        let healthy_weight: u64 = self
            .reals
            .values()
            .filter(|r| !r.sorry && r.mac.is_some() && !r.down)
            .map(|r| u64::from(r.effective_weight()))
            .sum();
        let lost = healthy_weight < u64::from(self.options.quorum);
        let sorry_ready = self.sorry().is_some_and(|(_, r)| r.mac.is_some());
        let fallback = lost && !sorry_ready;
        Quorum {
            healthy_weight,
            lost,
            sorry_active: lost && sorry_ready,
            fail_open: fallback && self.options.on_quorum_lost == OnQuorumLost::FailOpen,
            drop: fallback && self.options.on_quorum_lost == OnQuorumLost::Drop,
        }
    }
}

impl VipEntry<u32> {
    pub(super) fn draft(&self) -> VipEntry<Option<u32>> {
        let reals = self
            .reals
            .iter()
            .map(|(addr, r)| (*addr, r.with_id(Some(r.id))))
            .collect();
        self.with_id(Some(self.id), reals)
    }

    /// Whether a real (or the sorry server) has ring slots now.
    pub(super) fn in_ring(&self, real: &RealEntry<u32>, quorum: &Quorum) -> bool {
        if real.mac.is_none() {
            return false;
        }
        if quorum.sorry_active {
            return real.sorry;
        }
        if quorum.drop {
            return false;
        }
        !real.sorry && real.effective_weight() > 0 && (!real.down || quorum.fail_open)
    }

    /// The members of the ring: resolved reals with a weight above 0 that are up (all of them,
    /// down or not, while the quorum is lost and the VIP fails open), only the sorry server
    /// while it is active, none while the VIP drops for want of a quorum.
    pub(super) fn ring_members(&self) -> Vec<MaglevReal> {
        let quorum = self.quorum();
        self.reals
            .iter()
            .filter(|(_, r)| self.in_ring(r, &quorum))
            .map(|(addr, r)| MaglevReal {
                addr: map_addr(addr.ip),
                port: addr.port,
                weight: if r.sorry { 1 } else { r.effective_weight() },
                id: r.id,
            })
            .collect()
    }

    /// Whether the real's tracked flows are forwarded to it (its `REALS` entry is alive):
    /// it is resolved and not down with `down_flows = "move"` (unless failing open).
    pub(super) fn serves(&self, real: &RealEntry<u32>, quorum: &Quorum) -> bool {
        real.mac.is_some() && self.would_serve(real, quorum)
    }

    /// Whether the real serves its tracked flows once it is resolved.
    pub(super) fn would_serve(&self, real: &RealEntry<u32>, quorum: &Quorum) -> bool {
        real.sorry || !real.down || self.options.down_flows == DownFlows::Keep || quorum.fail_open
    }

    pub(super) fn meta(&self) -> VipMeta {
        let mut flags = self.flags.bits();
        if self.quorum().drop {
            flags |= VIP_F_QUORUM_DROP;
        }

        VipMeta {
            flags,
            generation: self.generation,
            in_use: 1,
            _reserved: 0,
        }
    }
}

/// The VIP a real's check resolves against: a NAT real with a port of its own is checked on
/// that port unless its check names one.
pub(crate) fn check_scope(vip: &VipSpec, addr: &RealAddr) -> VipSpec {
    VipSpec {
        port: addr.port_or(vip.port),
        ..*vip
    }
}

/// The `REALS` entries a state wants, by real id. A real without a MAC has none (zeroed); one
/// that does not serve (down, moving its flows) keeps its MAC without `REAL_F_ALIVE`: tracked
/// flows re-pick, its `target = "vip"` probes still find it.
pub(super) fn real_entries(state: &State) -> BTreeMap<u32, Real> {
    let mut out = BTreeMap::new();
    for vip in state.values() {
        let quorum = vip.quorum();
        for (addr, real) in &vip.reals {
            let mut flags = 0;
            let mut egress = 0;
            if real.routed() {
                egress = real.egress.map_or(0, |e| e.ifindex);
                flags |= if real.fwd == Mode::Nat {
                    REAL_F_NAT
                } else {
                    REAL_F_TUNNEL
                };
                if addr.is_ipv6() {
                    flags |= REAL_F_V6;
                }
            }
            let mac = match real.mac {
                Some(mac) => {
                    if vip.serves(real, &quorum) {
                        flags |= REAL_F_ALIVE;
                    }
                    mac
                }
                // A tunnel or NAT real whose next hop went unresolved keeps its tracked flows:
                // they are encapsulated (rewritten) and left to the host to route.
                None if real.routed() && vip.would_serve(real, &quorum) => {
                    flags |= REAL_F_ALIVE | REAL_F_NEXT_HOP_PASS;
                    egress = 0;
                    [0; 6]
                }
                None => continue,
            };
            let entry = Real {
                addr: map_addr(addr.ip),
                mac,
                flags,
                egress,
                vip_id: vip.id,
                port_be: if real.fwd == Mode::Nat {
                    addr.port.to_be()
                } else {
                    0
                },
                _pad: [0; 6],
            };
            out.insert(real.id, entry);
        }
    }
    out
}

/// The `EGRESS` (and `TX_PORTS`) entries a state wants: the interfaces its `REALS` entries
/// name.
pub(super) fn egress_entries(state: &State) -> BTreeMap<u32, TxPort> {
    let mut out = BTreeMap::new();
    for vip in state.values() {
        for real in vip.reals.values() {
            if let (true, Some(_), Some(e)) = (real.routed(), real.mac, real.egress) {
                out.insert(
                    e.ifindex,
                    TxPort {
                        ifindex: e.ifindex,
                        mac: e.mac,
                        mtu: e.mtu,
                    },
                );
            }
        }
    }
    out
}

/// The `VIP_ADDRS` entries a state wants.
pub(super) fn vip_addrs(state: &State) -> BTreeMap<[u8; 16], VipAddrValue> {
    let mut out: BTreeMap<[u8; 16], VipAddrValue> = BTreeMap::new();
    for spec in state.keys() {
        let value = out.entry(map_addr(spec.addr)).or_default();
        value.vip_count += 1;
        if spec.port == 0 {
            value.port0 |= spec.proto.port0_bit();
        }
    }
    out
}

/// The `REVNAT` entries a state wants: one per NAT real's (address, port, protocol), naming
/// its VIP, and one per NAT real address (protocol 0, port 0; its value names nothing). The
/// fold has made sure that no key serves two VIPs.
pub(super) fn revnat_entries(state: &State) -> BTreeMap<RevNatKey, RevNat> {
    let mut out = BTreeMap::new();
    for (spec, vip) in state {
        for (addr, real) in &vip.reals {
            if real.fwd != Mode::Nat {
                continue;
            }
            let key = |port: u16, proto: u8| RevNatKey {
                addr: map_addr(addr.ip),
                port_be: port.to_be(),
                proto,
                _pad: 0,
            };
            out.insert(
                key(addr.port_or(spec.port), spec.proto.ip_proto()),
                RevNat {
                    vip_addr: map_addr(spec.addr),
                    vip_port_be: spec.port.to_be(),
                    _pad: 0,
                    real_id: real.id,
                    vip_id: vip.id,
                },
            );
            out.insert(key(0, 0), RevNat::default());
        }
    }
    out
}

/// Folds a batch into a draft of the current state, validating each change against the state
/// left by the ones before it, then settles what depends on the whole batch (the initial
/// status of new reals, health of reals no longer checked).
pub(super) fn fold(
    current: &State,
    changes: Vec<Change>,
    default_mode: Mode,
) -> Result<Draft, BalancerError> {
    let mut draft: Draft = current
        .iter()
        .map(|(spec, vip)| (*spec, vip.draft()))
        .collect();
    for (index, change) in changes.into_iter().enumerate() {
        fold_one(&mut draft, change).map_err(|source| BalancerError::Invalid {
            change: Some(index),
            source,
        })?;
    }
    for (spec, vip) in draft.iter_mut() {
        settle_modes(spec, vip, default_mode).map_err(|source| BalancerError::Invalid {
            change: None,
            source,
        })?;
    }
    check_revnat(&draft).map_err(|source| BalancerError::Invalid {
        change: None,
        source,
    })?;
    for (spec, vip) in draft.iter_mut() {
        let mut checks: Vec<(RealAddr, Option<CheckSpec>)> = Vec::new();
        for (addr, r) in vip.reals.iter().filter(|(_, r)| !r.sorry) {
            let check = match vip.check_of(r) {
                Some(fields) => fields.resolve(&check_scope(spec, addr)).map_err(|source| {
                    BalancerError::Invalid {
                        change: None,
                        source: ValidationError::InvalidCheck {
                            vip: *spec,
                            real: r.check.as_ref().map(|_| *addr),
                            source,
                        },
                    }
                })?,
                None => None,
            };
            // Probes through the VIP leave unencapsulated for the real's MAC, which for a
            // tunnel or NAT real is its next hop's: the router would hand them back to the VIP
            // and any real could answer for this one (and a NAT real does not hold the VIP).
            if r.routed() && check.as_ref().is_some_and(|c| c.target == Target::Vip) {
                return Err(BalancerError::Invalid {
                    change: None,
                    source: ValidationError::InvalidCheck {
                        vip: *spec,
                        real: Some(*addr),
                        source: CheckFieldError {
                            key: "target".to_string(),
                            message: format!(
                                "target = \"vip\" is for direct-routing reals: a {} real is \
                                 checked on its own address (target = \"real\")",
                                r.fwd
                            ),
                        },
                    },
                });
            }
            checks.push((*addr, check));
        }
        for (addr, check) in checks {
            let Some(real) = vip.reals.get_mut(&addr) else {
                continue;
            };
            match check {
                None => {
                    real.down = false;
                    real.dyn_weight = None;
                }
                Some(check) => {
                    if real.fresh {
                        real.down = check.initial == crate::model::Initial::Down;
                    }
                    if !matches!(check.probe, crate::model::Probe::Exec { dynamic: true, .. }) {
                        real.dyn_weight = None;
                    }
                }
            }
            real.fresh = false;
        }
    }
    Ok(draft)
}

fn fold_one(draft: &mut Draft, change: Change) -> Result<(), ValidationError> {
    match change {
        Change::AddVip { spec, flags } => {
            check_addr("vip", spec.addr)?;
            if draft.contains_key(&spec) {
                return Err(ValidationError::DuplicateVip { vip: spec });
            }
            let entry = VipEntry {
                id: None,
                flags,
                options: VipOptions::default(),
                mode: None,
                check: None,
                generation: 0,
                ring_digest: [0; 32],
                reals: BTreeMap::new(),
            };
            draft.insert(spec, entry);
        }
        Change::DelVip { spec } => {
            if draft.remove(&spec).is_none() {
                return Err(ValidationError::UnknownVip { vip: spec });
            }
        }
        Change::AddReal {
            vip,
            addr,
            weight,
            mac,
        } => {
            let (vip, entry) = find_vip(draft, vip)?;
            match entry.reals.get(&addr) {
                Some(r) if r.sorry => {
                    return Err(ValidationError::IsSorryServer { vip, real: addr })
                }
                Some(_) => return Err(ValidationError::DuplicateReal { vip, real: addr }),
                None => {}
            }
            check_addr("real", addr.ip)?;
            // Whether its family may differ from the VIP's depends on its mode, known once
            // the batch is folded.
            check_weight(vip, addr, weight)?;
            if let Some(mac) = mac {
                check_mac(addr.ip, mac)?;
            }
            let real = RealEntry {
                id: None,
                weight,
                mac,
                egress: None,
                mode: None,
                fwd: Mode::Dr,
                sorry: false,
                check: None,
                down: false,
                dyn_weight: None,
                fresh: true,
            };
            entry.reals.insert(addr, real);
        }
        Change::DelReal { vip, addr } => {
            find_real(draft, vip, addr)?;
            if let Some(entry) = draft.get_mut(&vip) {
                entry.reals.remove(&addr);
            }
        }
        Change::SetWeight { vip, addr, weight } => {
            let (vip, real) = find_real(draft, vip, addr)?;
            check_weight(vip, addr, weight)?;
            real.weight = weight;
        }
        Change::SetMac { vip, addr, mac } => {
            if let Some(mac) = mac {
                check_mac(addr, mac)?;
            }
            for_reals(draft, vip, addr, |real| real.mac = mac)?;
        }
        Change::SetEgress { vip, addr, egress } => {
            if let Some(e) = egress {
                if e.ifindex == 0 {
                    return Err(ValidationError::InvalidEgress {
                        real: addr,
                        reason: "ifindex 0 names no interface",
                    });
                }
                if mac_problem(&e.mac).is_some() {
                    return Err(ValidationError::InvalidEgress {
                        real: addr,
                        reason: "the interface's MAC is not a unicast address",
                    });
                }
            }
            for_reals(draft, vip, addr, |real| real.egress = egress)?;
        }
        Change::SetFlags { vip, flags } => {
            let (_, entry) = find_vip(draft, vip)?;
            entry.flags = flags;
        }
        Change::SetOptions { vip, options } => {
            let (vip, entry) = find_vip(draft, vip)?;
            if let Some(addr) = options.sorry_server {
                let bad = |reason: String| ValidationError::SorryServer { vip, addr, reason };
                if let Some(reason) = addr_problem(addr) {
                    return Err(bad(reason.to_string()));
                }
                if entry.reals.iter().any(|(a, r)| a.ip == addr && !r.sorry) {
                    return Err(bad(format!("already a real of VIP {vip}")));
                }
            }
            let old = entry.options.sorry_server;
            if old != options.sorry_server {
                if let Some(old) = old {
                    entry.reals.remove(&RealAddr::from(old));
                }
                if let Some(addr) = options.sorry_server {
                    let sorry = RealEntry {
                        id: None,
                        weight: 1,
                        mac: None,
                        egress: None,
                        mode: None,
                        fwd: Mode::Dr,
                        sorry: true,
                        check: None,
                        down: false,
                        dyn_weight: None,
                        // (Its mode is settled with the batch; it has no health.)
                        fresh: true,
                    };
                    entry.reals.insert(RealAddr::from(addr), sorry);
                }
            }
            entry.options = options;
        }
        Change::SetMode { vip, real, mode } => {
            let (vip, entry) = find_vip(draft, vip)?;
            match real {
                None => entry.mode = mode,
                Some(addr) => {
                    let Some(r) = entry.reals.get_mut(&addr).filter(|r| !r.sorry) else {
                        return Err(real_error(vip, addr, entry.reals.contains_key(&addr)));
                    };
                    r.mode = mode;
                }
            }
        }
        Change::SetCheck { vip, real, check } => {
            let (vip, entry) = find_vip(draft, vip)?;
            match real {
                None => {
                    if let Some(c) = &check {
                        if c.kind.is_none() {
                            return Err(ValidationError::InvalidCheck {
                                vip,
                                real: None,
                                source: CheckFieldError {
                                    key: "type".to_string(),
                                    message: "missing: a VIP's check names its type".to_string(),
                                },
                            });
                        }
                    }
                    entry.check = check.map(|c| *c);
                }
                Some(addr) => {
                    let Some(r) = entry.reals.get_mut(&addr).filter(|r| !r.sorry) else {
                        return Err(real_error(vip, addr, entry.reals.contains_key(&addr)));
                    };
                    r.check = check.map(|c| *c);
                }
            }
            // Whether every real's check resolves is checked once the batch is folded: a
            // change of type may come with changes of the reals' own fields.
        }
        Change::SetHealth {
            vip,
            addr,
            down,
            weight,
        } => {
            let (vip, entry) = find_vip(draft, vip)?;
            let Some(real) = entry.reals.get(&addr).filter(|r| !r.sorry) else {
                return Err(real_error(vip, addr, entry.reals.contains_key(&addr)));
            };
            if entry.spec_of(&vip, &addr, real).is_none() {
                return Err(ValidationError::NotChecked { vip, real: addr });
            }
            if let Some(w) = weight {
                check_weight(vip, addr, w)?;
            }
            if let Some(real) = entry.reals.get_mut(&addr) {
                real.down = down;
                real.dyn_weight = weight;
                real.fresh = false;
            }
        }
    }
    Ok(())
}

/// Each real's effective mode: its own, else its VIP's, else the daemon's (the sorry server
/// takes its VIP's). Direct routing forwards the packet unchanged and NAT rewrites it within
/// its family: their reals are of the VIP's family; a tunnel carries any family in any other.
/// Only NAT maps a port, and NAT reals do not share a VIP with reals of another mode.
fn settle_modes(
    spec: &VipSpec,
    vip: &mut VipEntry<Option<u32>>,
    default_mode: Mode,
) -> Result<(), ValidationError> {
    let vip_mode = vip.mode.unwrap_or(default_mode);
    let mut first: Option<(RealAddr, Mode)> = None;
    for (addr, r) in vip.reals.iter_mut() {
        let mode = r.mode.unwrap_or(vip_mode);
        if mode != Mode::Tunnel && spec.addr.is_ipv4() != addr.is_ipv4() {
            if r.sorry {
                return Err(ValidationError::SorryServer {
                    vip: *spec,
                    addr: addr.ip,
                    reason: format!(
                        "of another address family than VIP {spec} ({mode} keeps the \
                         packet's family; tunnel mode carries either family)"
                    ),
                });
            }
            if mode == Mode::Nat {
                return Err(ValidationError::Nat {
                    vip: *spec,
                    real: *addr,
                    reason: format!(
                        "NAT rewrites the destination within one address family, and the \
                         VIP is {}",
                        crate::model::family(spec.addr)
                    ),
                });
            }
            return Err(ValidationError::FamilyMismatch {
                vip: *spec,
                real: *addr,
            });
        }
        if addr.port != 0 && mode != Mode::Nat {
            return Err(ValidationError::Nat {
                vip: *spec,
                real: *addr,
                reason: format!(
                    "only a NAT real has a port of its own ({mode} keeps the VIP's port): \
                     give it mode nat, or leave the port out"
                ),
            });
        }
        if addr.port != 0 && spec.port == 0 {
            return Err(ValidationError::Nat {
                vip: *spec,
                real: *addr,
                reason: "the VIP serves every port (port 0), so its packets keep their own \
                         port: leave the real's port out"
                    .to_string(),
            });
        }
        match first {
            Some((other, m)) => {
                if let Some(problem) = crate::model::mix_problem(m, mode) {
                    return Err(ValidationError::Nat {
                        vip: *spec,
                        real: if mode == Mode::Nat { *addr } else { other },
                        reason: format!("{other} is {m}, {addr} is {mode}: {problem}"),
                    });
                }
            }
            None => first = Some((*addr, mode)),
        }
        // Its MAC meant another thing (its own, or a next hop's): forgotten until the MAC
        // refresh finds the right one, so that no frame goes where the old mode sent it. A
        // real added in this batch came with the MAC of its mode.
        if r.routed() != (mode != Mode::Dr) && !r.fresh {
            r.mac = None;
            r.egress = None;
        }
        r.fwd = mode;
        if r.sorry {
            r.fresh = false;
        }
    }
    Ok(())
}

/// NAT replies are told apart by their source alone: every (real address, port, protocol) of
/// a NAT real serves one VIP in the whole state.
fn check_revnat(draft: &Draft) -> Result<(), ValidationError> {
    let mut seen: BTreeMap<(IpAddr, u16, u8), VipSpec> = BTreeMap::new();
    for (spec, vip) in draft {
        for (addr, r) in &vip.reals {
            if r.fwd != Mode::Nat {
                continue;
            }
            let port = addr.port_or(spec.port);
            let key = (addr.ip, port, spec.proto.ip_proto());
            if let Some(other) = seen.insert(key, *spec) {
                let shown = RealAddr::new(addr.ip, port);
                return Err(ValidationError::Nat {
                    vip: *spec,
                    real: *addr,
                    reason: format!(
                        "{} {shown} already serves VIP {other} in NAT mode: its replies \
                         could not be told apart (each real address, port and protocol \
                         serves one NAT VIP)",
                        spec.proto
                    ),
                });
            }
        }
    }
    Ok(())
}

/// Runs `f` on the reals of address `addr` (whatever their ports) in `vip`, or in every VIP
/// that has one (`None`); the sorry server is found like a real.
fn for_reals(
    draft: &mut Draft,
    vip: Option<VipSpec>,
    addr: IpAddr,
    mut f: impl FnMut(&mut RealEntry<Option<u32>>),
) -> Result<(), ValidationError> {
    let mut found = false;
    let entries: Vec<&mut VipEntry<Option<u32>>> = match vip {
        Some(vip) => vec![find_vip(draft, vip)?.1],
        None => draft.values_mut().collect(),
    };
    for entry in entries {
        for (_, real) in entry.reals.iter_mut().filter(|(a, _)| a.ip == addr) {
            f(real);
            found = true;
        }
    }
    if !found {
        return Err(ValidationError::UnknownReal {
            vip,
            real: addr.into(),
        });
    }
    Ok(())
}

fn real_error(vip: VipSpec, addr: RealAddr, is_sorry: bool) -> ValidationError {
    if is_sorry {
        ValidationError::IsSorryServer { vip, real: addr }
    } else {
        ValidationError::UnknownReal {
            vip: Some(vip),
            real: addr,
        }
    }
}

fn find_real(
    draft: &mut Draft,
    vip: VipSpec,
    addr: RealAddr,
) -> Result<(VipSpec, &mut RealEntry<Option<u32>>), ValidationError> {
    let (vip, entry) = find_vip(draft, vip)?;
    match entry.reals.get_mut(&addr) {
        Some(real) if real.sorry => Err(ValidationError::IsSorryServer { vip, real: addr }),
        Some(real) => Ok((vip, real)),
        None => Err(ValidationError::UnknownReal {
            vip: Some(vip),
            real: addr,
        }),
    }
}

fn find_vip(
    draft: &mut Draft,
    vip: VipSpec,
) -> Result<(VipSpec, &mut VipEntry<Option<u32>>), ValidationError> {
    match draft.get_mut(&vip) {
        Some(entry) => Ok((vip, entry)),
        None => Err(ValidationError::UnknownVip { vip }),
    }
}

/// Addresses no packet can be balanced to or from.
fn check_addr(field: &'static str, addr: IpAddr) -> Result<(), ValidationError> {
    match addr_problem(addr) {
        Some(reason) => Err(ValidationError::InvalidAddress {
            field,
            addr,
            reason,
        }),
        None => Ok(()),
    }
}

fn check_weight(vip: VipSpec, real: RealAddr, weight: u32) -> Result<(), ValidationError> {
    if weight > MAX_WEIGHT {
        return Err(ValidationError::WeightTooLarge { vip, real, weight });
    }
    Ok(())
}

/// Direct routing sends frames to this MAC: a group address would flood them.
fn check_mac(real: IpAddr, mac: Mac) -> Result<(), ValidationError> {
    match mac_problem(&mac) {
        Some(reason) => Err(ValidationError::InvalidMac { real, mac, reason }),
        None => Ok(()),
    }
}

/// The digest two nodes compare to know that they send every flow alike: SHA-256 over the
/// ring's slots in order, each written as its real's address in text (`10.0.0.11`,
/// `2001:db8::11`, a NAT real with a port `10.0.1.11:8080`) and a newline, a slot without a
/// real as `-` and a newline. Addresses, not ids: ids differ between nodes.
pub(super) fn ring_digest(ring: &[u32], reals: &BTreeMap<RealAddr, RealEntry<u32>>) -> [u8; 32] {
    let by_id: BTreeMap<u32, String> = reals
        .iter()
        .map(|(addr, r)| (r.id, addr.to_string()))
        .collect();
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for id in ring {
        ctx.update(by_id.get(id).map_or("-", String::as_str).as_bytes());
        ctx.update(b"\n");
    }
    let mut out = [0; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}
