//! The declarative side of xlb: the config file (TOML, versioned), the changes that turn one
//! state into another, and the import of `ipvsadm -S -n` rules.
//!
//! Everything here is pure: text in, a `DesiredState` or a list of `Change`s out. Reading
//! files and applying the changes is the caller's job; `Balancer::apply` validates the batch
//! again as a whole (ids, limits, rings).
//!
//! The config file:
//! ```toml
//! version = 1
//! [[vip]]
//! addr = "10.0.0.100:80"        # "[2001:db8::1]:443"; port 0 = every port
//! proto = "tcp"                  # tcp | udp
//! flags = ["no-src-port"]        # "no-conntrack"; optional, default []
//! reals = [ { addr = "10.0.0.11", weight = 1 }, { addr = "10.0.0.12", weight = 2 } ]
//! ```
//! `version` is required. Unknown keys are refused, naming the key: later versions add only
//! optional fields, so an old file stays valid and a typo never silently does nothing. `reals`
//! is optional (a VIP without reals), a real's `weight` too (default 1; 0 drains).
//!
//! Every error names where (the line, and for the config file the field path such as
//! `vip[2].reals[0].weight`, indices from 0) and why:
//! `line 7: vip[1].addr: invalid VIP "10.0.0.300:80": bad IPv4 address`.

mod file;
mod ipvsadm;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

pub use file::{parse_config, render_config};
pub use ipvsadm::{import_ipvsadm, ImportReport};

use crate::{
    core::balancer::{Change, Snapshot},
    model::{format_mac, VipFlags, VipSpec},
};

/// The version of the config file format this xlb reads and writes.
pub const CONFIG_VERSION: u32 = 1;

/// The weight of a real whose weight is not given.
pub const DEFAULT_WEIGHT: u32 = 1;

// ---- the model ------------------------------------------------------------------------------

/// The declarative model shared by config files, `xlb save`, `xlb apply` and ipvsadm import.
///
/// VIP specs and real addresses are as given: a v4-mapped IPv6 address is refused wherever
/// one enters, so IPv4 has one spelling.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub vips: BTreeMap<VipSpec, DesiredVip>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredVip {
    pub flags: VipFlags,
    /// Real address → weight (0..=`MAX_WEIGHT`, 0 drains).
    pub reals: BTreeMap<IpAddr, u32>,
}

impl DesiredState {
    /// The configuration part of a running state: VIPs, flags, reals and weights (MACs and ids
    /// are the daemon's business and not part of a config).
    pub fn from_snapshot(snapshot: &Snapshot) -> DesiredState {
        let vips = snapshot
            .vips
            .iter()
            .map(|vip| {
                let reals = vip.reals.iter().map(|r| (r.addr, r.weight)).collect();
                let desired = DesiredVip {
                    flags: vip.flags,
                    reals,
                };
                (vip.spec, desired)
            })
            .collect();
        DesiredState { vips }
    }
}

// ---- errors -------------------------------------------------------------------------------

/// Why a config file or an ipvsadm dump is refused. Every variant names the line (1-based).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The text is not TOML.
    #[error("line {line}: {message}")]
    Syntax { line: usize, message: String },
    /// A field of the config file is missing, unknown, of the wrong type or invalid. `field`
    /// is its path: `version`, `vip[1].addr`, `vip[2].reals[0].weight`.
    #[error("line {line}: {field}: {message}")]
    Field {
        line: usize,
        field: String,
        message: String,
    },
    /// An ipvsadm rule that cannot be imported; `token` is the part of the line at fault
    /// (`-m`, `-t 10.0.0.300:80`).
    #[error("line {line}: {token}: {message}")]
    Ipvsadm {
        line: usize,
        token: String,
        message: String,
    },
}

impl ConfigError {
    pub fn line(&self) -> usize {
        match self {
            ConfigError::Syntax { line, .. }
            | ConfigError::Field { line, .. }
            | ConfigError::Ipvsadm { line, .. } => *line,
        }
    }

    /// The config field at fault, for the control API's `field`.
    pub fn field(&self) -> Option<&str> {
        match self {
            ConfigError::Field { field, .. } => Some(field),
            ConfigError::Syntax { .. } | ConfigError::Ipvsadm { .. } => None,
        }
    }
}

// ---- diff ---------------------------------------------------------------------------------

/// The changes that turn `current` into `desired`, in an order `Balancer::apply` accepts as one
/// batch. Grouped by VIP in `VipSpec` order: a removed VIP is one `DelVip`; a new one is its
/// `AddVip` then one `AddReal` per real; a kept one gets `SetFlags`, then `DelReal`s, then
/// `SetWeight`s and `AddReal`s by address. New reals get `mac: None` (the daemon resolves MACs
/// and sets them later). MACs are never part of a diff.
pub fn diff(current: &DesiredState, desired: &DesiredState) -> Vec<Change> {
    let specs: BTreeSet<VipSpec> = current
        .vips
        .keys()
        .chain(desired.vips.keys())
        .copied()
        .collect();
    let mut changes = Vec::new();
    let add_real = |vip: VipSpec, addr: IpAddr, weight: u32| Change::AddReal {
        vip,
        addr,
        weight,
        mac: None,
    };
    for spec in specs {
        match (current.vips.get(&spec), desired.vips.get(&spec)) {
            (Some(_), None) => changes.push(Change::DelVip { spec }),
            (None, Some(want)) => {
                changes.push(Change::AddVip {
                    spec,
                    flags: want.flags,
                });
                for (addr, weight) in &want.reals {
                    changes.push(add_real(spec, *addr, *weight));
                }
            }
            (Some(have), Some(want)) => {
                if have.flags != want.flags {
                    changes.push(Change::SetFlags {
                        vip: spec,
                        flags: want.flags,
                    });
                }
                for addr in have.reals.keys() {
                    if !want.reals.contains_key(addr) {
                        changes.push(Change::DelReal {
                            vip: spec,
                            addr: *addr,
                        });
                    }
                }
                for (addr, weight) in &want.reals {
                    match have.reals.get(addr) {
                        None => changes.push(add_real(spec, *addr, *weight)),
                        Some(old) if old != weight => changes.push(Change::SetWeight {
                            vip: spec,
                            addr: *addr,
                            weight: *weight,
                        }),
                        Some(_) => {}
                    }
                }
            }
            (None, None) => {}
        }
    }
    changes
}

fn flag_list(flags: VipFlags) -> String {
    format!("[{}]", flags.names().join(", "))
}

/// One human line per change, as `xlb apply` prints them: `+ vip tcp/10.0.0.100:80
/// [no-src-port]`, `- vip ...`, `+ real tcp/10.0.0.100:80 10.0.0.11 weight 1`, `- real ...`.
/// A change carries only the new value, so a modification reads `~ real tcp/10.0.0.100:80
/// 10.0.0.11 weight -> 2` and `~ vip tcp/... flags -> [no-conntrack]`; `describe_from` adds
/// the old value.
pub fn describe(change: &Change) -> String {
    describe_with(change, None, None)
}

/// `describe`, with the old weight or flags of a modification taken from `current` (the state
/// the change applies to): `~ real tcp/10.0.0.100:80 10.0.0.11 weight 1 -> 2`,
/// `~ vip tcp/10.0.0.100:80 flags [] -> [no-conntrack]`.
pub fn describe_from(current: &DesiredState, change: &Change) -> String {
    match change {
        Change::SetFlags { vip, .. } => {
            let old = current.vips.get(vip).map(|v| v.flags);
            describe_with(change, old, None)
        }
        Change::SetWeight { vip, addr, .. } => {
            let old = current
                .vips
                .get(vip)
                .and_then(|v| v.reals.get(addr))
                .copied();
            describe_with(change, None, old)
        }
        _ => describe(change),
    }
}

fn describe_with(change: &Change, old_flags: Option<VipFlags>, old_weight: Option<u32>) -> String {
    match change {
        Change::AddVip { spec, flags } => {
            if flags.names().is_empty() {
                format!("+ vip {spec}")
            } else {
                format!("+ vip {spec} {}", flag_list(*flags))
            }
        }
        Change::DelVip { spec } => format!("- vip {spec}"),
        Change::SetFlags { vip, flags } => match old_flags {
            Some(old) => format!(
                "~ vip {vip} flags {} -> {}",
                flag_list(old),
                flag_list(*flags)
            ),
            None => format!("~ vip {vip} flags -> {}", flag_list(*flags)),
        },
        Change::AddReal {
            vip,
            addr,
            weight,
            mac,
        } => match mac {
            Some(mac) => format!(
                "+ real {vip} {addr} weight {weight} mac {}",
                format_mac(mac)
            ),
            None => format!("+ real {vip} {addr} weight {weight}"),
        },
        Change::DelReal { vip, addr } => format!("- real {vip} {addr}"),
        Change::SetWeight { vip, addr, weight } => match old_weight {
            Some(old) => format!("~ real {vip} {addr} weight {old} -> {weight}"),
            None => format!("~ real {vip} {addr} weight -> {weight}"),
        },
        Change::SetMac { vip, addr, mac } => {
            let vip = vip.map_or_else(|| "*".to_string(), |v| v.to_string());
            let mac = mac.as_ref().map_or_else(|| "none".to_string(), format_mac);
            format!("~ real {vip} {addr} mac {mac}")
        }
    }
}
