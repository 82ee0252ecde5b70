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
#[cfg(test)]
mod health_tests;
mod ipvsadm;
pub mod keepalived;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};

pub use file::{parse_config, render_config};
pub use ipvsadm::{import_ipvsadm, ImportReport};

use crate::{
    core::balancer::{Change, Snapshot},
    model::{format_mac, CheckFields, Mode, RealAddr, VipFlags, VipOptions, VipSpec},
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
    /// Real (address, and a NAT real's port) → weight (0..=`MAX_WEIGHT`, 0 drains).
    pub reals: BTreeMap<RealAddr, u32>,
    pub options: VipOptions,
    /// The VIP's check (`[vip.check]`).
    pub check: Option<CheckFields>,
    /// Reals' own check fields (`check = { ... }` of a real), merged over `check`.
    pub real_checks: BTreeMap<RealAddr, CheckFields>,
    /// The VIP's mode (`mode = "tunnel"`); `None`: the daemon's.
    pub mode: Option<Mode>,
    /// Reals' own modes; a real not in here takes the VIP's.
    pub real_modes: BTreeMap<RealAddr, Mode>,
}

impl DesiredState {
    /// The configuration part of a running state: VIPs, flags, options, checks, reals and
    /// weights (MACs, ids and health are the daemon's business and not part of a config).
    pub fn from_snapshot(snapshot: &Snapshot) -> DesiredState {
        let vips = snapshot
            .vips
            .iter()
            .map(|vip| {
                let reals = vip.reals.iter().map(|r| (r.addr, r.weight)).collect();
                let real_checks = vip
                    .reals
                    .iter()
                    .filter_map(|r| Some((r.addr, r.check.clone()?)))
                    .collect();
                let real_modes = vip
                    .reals
                    .iter()
                    .filter_map(|r| Some((r.addr, r.mode?)))
                    .collect();
                let desired = DesiredVip {
                    flags: vip.flags,
                    reals,
                    options: vip.options,
                    check: vip.check.clone(),
                    real_checks,
                    mode: vip.mode,
                    real_modes,
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
/// `AddVip`, its options, mode and check, then one `AddReal` (and the real's own mode and
/// check) per real; a kept one gets `SetFlags`, `SetOptions`, `SetMode` and `SetCheck` where
/// they differ, then `DelReal`s, then `SetWeight`s and `AddReal`s by address, then the reals'
/// modes and checks. New reals get
/// `mac: None` (the daemon resolves MACs and sets them later). MACs and health are never part
/// of a diff.
pub fn diff(current: &DesiredState, desired: &DesiredState) -> Vec<Change> {
    let specs: BTreeSet<VipSpec> = current
        .vips
        .keys()
        .chain(desired.vips.keys())
        .copied()
        .collect();
    let mut changes = Vec::new();
    let empty = DesiredVip::default();
    for spec in specs {
        let (have, want) = match (current.vips.get(&spec), desired.vips.get(&spec)) {
            (Some(_), None) => {
                changes.push(Change::DelVip { spec });
                continue;
            }
            (None, Some(want)) => {
                changes.push(Change::AddVip {
                    spec,
                    flags: want.flags,
                });
                (&empty, want)
            }
            (Some(have), Some(want)) => {
                if have.flags != want.flags {
                    changes.push(Change::SetFlags {
                        vip: spec,
                        flags: want.flags,
                    });
                }
                (have, want)
            }
            (None, None) => continue,
        };
        if have.options != want.options {
            changes.push(Change::SetOptions {
                vip: spec,
                options: want.options,
            });
        }
        if have.mode != want.mode {
            changes.push(Change::SetMode {
                vip: spec,
                real: None,
                mode: want.mode,
            });
        }
        if have.check != want.check {
            changes.push(Change::SetCheck {
                vip: spec,
                real: None,
                check: want.check.clone().map(Box::new),
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
                None => changes.push(Change::AddReal {
                    vip: spec,
                    addr: *addr,
                    weight: *weight,
                    mac: None,
                }),
                Some(old) if old != weight => changes.push(Change::SetWeight {
                    vip: spec,
                    addr: *addr,
                    weight: *weight,
                }),
                Some(_) => {}
            }
        }
        for addr in want.reals.keys() {
            let kept = have.reals.contains_key(addr);
            let old = have.real_modes.get(addr).filter(|_| kept);
            let new = want.real_modes.get(addr);
            if old != new {
                changes.push(Change::SetMode {
                    vip: spec,
                    real: Some(*addr),
                    mode: new.copied(),
                });
            }
            let old = have.real_checks.get(addr).filter(|_| kept);
            let new = want.real_checks.get(addr);
            if old != new {
                changes.push(Change::SetCheck {
                    vip: spec,
                    real: Some(*addr),
                    check: new.cloned().map(Box::new),
                });
            }
        }
    }
    changes
}

fn flag_list(flags: VipFlags) -> String {
    format!("[{}]", flags.names().join(", "))
}

/// One human line per change, as `xlb apply` prints them: `+ vip tcp/10.0.0.100:80
/// [no-src-port]`, `- vip ...`, `+ real tcp/10.0.0.100:80 10.0.0.11 weight 1`, `- real ...`,
/// `+ check tcp/10.0.0.100:80 type http path /healthz`. A change carries only the new value, so
/// a modification reads `~ real tcp/10.0.0.100:80 10.0.0.11 weight -> 2`; `describe_from`
/// adds the old value.
pub fn describe(change: &Change) -> String {
    describe_with(change, None)
}

/// `describe`, with the old value of a modification taken from `current` (the state the
/// change applies to): `~ real tcp/10.0.0.100:80 10.0.0.11 weight 1 -> 2`,
/// `~ vip tcp/10.0.0.100:80 flags [] -> [no-conntrack]`, `~ check tcp/10.0.0.100:80 interval
/// 2s -> 5s`, `~ vip tcp/10.0.0.100:80 quorum 1 -> 2`.
pub fn describe_from(current: &DesiredState, change: &Change) -> String {
    describe_with(change, Some(current))
}

fn describe_with(change: &Change, current: Option<&DesiredState>) -> String {
    let vip_of = |spec: &VipSpec| current.and_then(|c| c.vips.get(spec));
    match change {
        Change::AddVip { spec, flags } => {
            if flags.names().is_empty() {
                format!("+ vip {spec}")
            } else {
                format!("+ vip {spec} {}", flag_list(*flags))
            }
        }
        Change::DelVip { spec } => format!("- vip {spec}"),
        Change::SetFlags { vip, flags } => match vip_of(vip) {
            Some(old) => format!(
                "~ vip {vip} flags {} -> {}",
                flag_list(old.flags),
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
        Change::SetWeight { vip, addr, weight } => {
            match vip_of(vip).and_then(|v| v.reals.get(addr)) {
                Some(old) => format!("~ real {vip} {addr} weight {old} -> {weight}"),
                None => format!("~ real {vip} {addr} weight -> {weight}"),
            }
        }
        Change::SetMac { vip, addr, mac } => {
            let vip = vip.map_or_else(|| "*".to_string(), |v| v.to_string());
            let mac = mac.as_ref().map_or_else(|| "none".to_string(), format_mac);
            format!("~ real {vip} {addr} mac {mac}")
        }
        Change::SetEgress { vip, addr, egress } => {
            let vip = vip.map_or_else(|| "*".to_string(), |v| v.to_string());
            match egress {
                Some(e) => format!("~ real {vip} {addr} egress ifindex {}", e.ifindex),
                None => format!("~ real {vip} {addr} egress none"),
            }
        }
        Change::SetOptions { vip, options } => {
            let old = vip_of(vip).map(|v| v.options).unwrap_or_default();
            format!("~ vip {vip} {}", old.differences(options).join(", "))
        }
        Change::SetCheck { vip, real, check } => {
            let owner = match real {
                Some(addr) => format!("{vip} real {addr}"),
                None => vip.to_string(),
            };
            let old = vip_of(vip).and_then(|v| match real {
                Some(addr) => v.real_checks.get(addr),
                None => v.check.as_ref(),
            });
            match (old, check.as_deref()) {
                (_, None) => format!("- check {owner}"),
                (None, Some(new)) => format!("+ check {owner} {}", new.summary()),
                (Some(old), Some(new)) => {
                    format!("~ check {owner} {}", old.differences(new).join(", "))
                }
            }
        }
        Change::SetMode { vip, real, mode } => {
            let owner = match real {
                Some(addr) => format!("real {vip} {addr}"),
                None => format!("vip {vip}"),
            };
            let old = vip_of(vip).and_then(|v| match real {
                Some(addr) => v.real_modes.get(addr).copied(),
                None => v.mode,
            });
            let name = |m: Option<Mode>| m.map_or("default", Mode::as_str);
            match current {
                Some(_) => format!("~ {owner} mode {} -> {}", name(old), name(*mode)),
                None => format!("~ {owner} mode -> {}", name(*mode)),
            }
        }
        Change::SetHealth {
            vip,
            addr,
            down,
            weight,
        } => {
            let status = if *down { "down" } else { "up" };
            match weight {
                Some(w) => format!("~ real {vip} {addr} {status} weight {w}"),
                None => format!("~ real {vip} {addr} {status}"),
            }
        }
    }
}
