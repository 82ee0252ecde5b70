//! The balancer's desired state as it is kept in memory, and the folding of a batch of changes
//! into a draft of it, each change validated against the state the ones before it left.

use std::{collections::BTreeMap, net::IpAddr};

use lb_common::{Real, VipAddrValue, VipMeta, REAL_F_ALIVE};

use super::{BalancerError, Change, ValidationError};
use crate::{
    core::maglev::MaglevReal,
    model::{addr_problem, mac_problem, map_addr, Mac, VipFlags, VipSpec, MAX_WEIGHT},
};

/// One VIP; `I` is `u32` in the committed state and `Option<u32>` while a batch is folded (new
/// entries get their ids only once the whole batch is known, for deterministic ids).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct VipEntry<I> {
    pub(super) id: I,
    pub(super) flags: VipFlags,
    /// The live ring half (meaningful in the committed state only).
    pub(super) generation: u32,
    pub(super) reals: BTreeMap<IpAddr, RealEntry<I>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct RealEntry<I> {
    pub(super) id: I,
    pub(super) weight: u32,
    pub(super) mac: Option<Mac>,
}

pub(super) type State = BTreeMap<VipSpec, VipEntry<u32>>;
pub(super) type Draft = BTreeMap<VipSpec, VipEntry<Option<u32>>>;

impl VipEntry<u32> {
    pub(super) fn draft(&self) -> VipEntry<Option<u32>> {
        VipEntry {
            id: Some(self.id),
            flags: self.flags,
            generation: self.generation,
            reals: self
                .reals
                .iter()
                .map(|(addr, r)| {
                    let real = RealEntry {
                        id: Some(r.id),
                        weight: r.weight,
                        mac: r.mac,
                    };
                    (*addr, real)
                })
                .collect(),
        }
    }

    /// The reals that get ring slots: known MAC and weight above 0.
    pub(super) fn ring_members(&self) -> Vec<MaglevReal> {
        self.reals
            .iter()
            .filter(|(_, r)| r.mac.is_some() && r.weight > 0)
            .map(|(addr, r)| MaglevReal {
                addr: map_addr(*addr),
                weight: r.weight,
                id: r.id,
            })
            .collect()
    }

    pub(super) fn meta(&self) -> VipMeta {
        VipMeta {
            flags: self.flags.bits(),
            generation: self.generation,
            in_use: 1,
            _reserved: 0,
        }
    }
}

/// The `REALS` entries a state wants, by real id. Reals without a MAC have none (zeroed).
pub(super) fn real_entries(state: &State) -> BTreeMap<u32, Real> {
    let mut out = BTreeMap::new();
    for vip in state.values() {
        for (addr, real) in &vip.reals {
            if let Some(mac) = real.mac {
                let entry = Real {
                    addr: map_addr(*addr),
                    mac,
                    _pad: [0; 2],
                    flags: REAL_F_ALIVE,
                    vip_id: vip.id,
                };
                out.insert(real.id, entry);
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

/// Folds a batch into a draft of the current state, validating each change against the state
/// left by the ones before it.
pub(super) fn fold(current: &State, changes: Vec<Change>) -> Result<Draft, BalancerError> {
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
                generation: 0,
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
            if entry.reals.contains_key(&addr) {
                return Err(ValidationError::DuplicateReal { vip, real: addr });
            }
            check_addr("real", addr)?;
            if vip.addr.is_ipv4() != addr.is_ipv4() {
                return Err(ValidationError::FamilyMismatch { vip, real: addr });
            }
            check_weight(vip, addr, weight)?;
            if let Some(mac) = mac {
                check_mac(addr, mac)?;
            }
            let real = RealEntry {
                id: None,
                weight,
                mac,
            };
            entry.reals.insert(addr, real);
        }
        Change::DelReal { vip, addr } => {
            let (vip, entry) = find_vip(draft, vip)?;
            if entry.reals.remove(&addr).is_none() {
                return Err(ValidationError::UnknownReal {
                    vip: Some(vip),
                    real: addr,
                });
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
            match vip {
                Some(vip) => find_real(draft, vip, addr)?.1.mac = mac,
                None => {
                    let mut found = false;
                    for entry in draft.values_mut() {
                        if let Some(real) = entry.reals.get_mut(&addr) {
                            real.mac = mac;
                            found = true;
                        }
                    }
                    if !found {
                        return Err(ValidationError::UnknownReal {
                            vip: None,
                            real: addr,
                        });
                    }
                }
            }
        }
        Change::SetFlags { vip, flags } => {
            let (_, entry) = find_vip(draft, vip)?;
            entry.flags = flags;
        }
    }
    Ok(())
}

fn find_real(
    draft: &mut Draft,
    vip: VipSpec,
    addr: IpAddr,
) -> Result<(VipSpec, &mut RealEntry<Option<u32>>), ValidationError> {
    let (vip, entry) = find_vip(draft, vip)?;
    match entry.reals.get_mut(&addr) {
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

fn check_weight(vip: VipSpec, real: IpAddr, weight: u32) -> Result<(), ValidationError> {
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
