//! What goes into a `Balancer` and what comes out: changes, errors, reports, snapshots.

use std::{fmt, net::IpAddr, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{
    core::maglev::MaglevError,
    dataplane::DataplaneError,
    model::{
        format_mac, CheckFieldError, CheckFields, CheckSpec, Egress, FlagsError, Mac, Mode,
        RealAddr, VipFlags, VipOptions, VipSpec, MAX_WEIGHT,
    },
};

/// One edit of the desired state. A batch of them is applied as a whole by `Balancer::apply`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    AddVip {
        spec: VipSpec,
        flags: VipFlags,
    },
    DelVip {
        spec: VipSpec,
    },
    AddReal {
        vip: VipSpec,
        addr: RealAddr,
        weight: u32,
        mac: Option<Mac>,
    },
    DelReal {
        vip: VipSpec,
        addr: RealAddr,
    },
    SetWeight {
        vip: VipSpec,
        addr: RealAddr,
        weight: u32,
    },
    /// `vip: None` sets the MAC of `addr` in every VIP that has it as a real (a neighbour
    /// entry is per address, not per VIP). `mac: None` forgets it: the real stops taking flows.
    SetMac {
        vip: Option<VipSpec>,
        addr: IpAddr,
        mac: Option<Mac>,
    },
    /// The interface a tunnel real's route leaves by, when not the balancer's (as `SetMac`
    /// for `vip`); `None`: the balancer's own. Direct-routing reals ignore it.
    SetEgress {
        vip: Option<VipSpec>,
        addr: IpAddr,
        egress: Option<Egress>,
    },
    SetFlags {
        vip: VipSpec,
        flags: VipFlags,
    },
    /// Quorum, sorry server, what quorum loss and a failing check do. A new sorry server
    /// starts unresolved (a `SetMac` for it may follow in the same batch).
    SetOptions {
        vip: VipSpec,
        options: VipOptions,
    },
    /// The VIP's check (`real: None`; it must name its `type`) or a real's own fields merged
    /// over it; `check: None` removes it. A real keeps its status.
    SetCheck {
        vip: VipSpec,
        real: Option<RealAddr>,
        check: Option<Box<CheckFields>>,
    },
    /// The VIP's mode (`real: None`) or a real's own; `mode: None` forgets it (the real takes
    /// its VIP's, the VIP the daemon's).
    SetMode {
        vip: VipSpec,
        real: Option<RealAddr>,
        mode: Option<Mode>,
    },
    /// A checked real's status as its check found it, and the weight a dynamic `exec` check
    /// reported (`None`: the configured weight).
    SetHealth {
        vip: VipSpec,
        addr: RealAddr,
        down: bool,
        weight: Option<u32>,
    },
}

/// Why a batch of changes is refused. `field()` names the input at fault, for the control API.
#[derive(Debug, thiserror::Error)]
pub enum ValidationError {
    #[error("VIP {vip} already exists")]
    DuplicateVip { vip: VipSpec },
    #[error("VIP {vip} does not exist")]
    UnknownVip { vip: VipSpec },
    #[error("{field} address {addr} is {reason}")]
    InvalidAddress {
        field: &'static str,
        addr: IpAddr,
        reason: &'static str,
    },
    #[error("real {real} is already in VIP {vip}")]
    DuplicateReal { vip: VipSpec, real: RealAddr },
    #[error("real {real} is not in {}", in_vip(.vip))]
    UnknownReal {
        vip: Option<VipSpec>,
        real: RealAddr,
    },
    #[error(
        "real {real} and VIP {vip} are of different address families \
         (direct routing forwards the packet unchanged; tunnel mode carries either family)"
    )]
    FamilyMismatch { vip: VipSpec, real: RealAddr },
    #[error("real {real} of VIP {vip}: {reason}")]
    Nat {
        vip: VipSpec,
        real: RealAddr,
        reason: String,
    },
    #[error("weight {weight} of real {real} in VIP {vip} is above the maximum {MAX_WEIGHT}")]
    WeightTooLarge {
        vip: VipSpec,
        real: RealAddr,
        weight: u32,
    },
    #[error("MAC {} of real {real} is {reason}", format_mac(.mac))]
    InvalidMac {
        real: IpAddr,
        mac: Mac,
        reason: &'static str,
    },
    #[error("egress interface of real {real}: {reason}")]
    InvalidEgress { real: IpAddr, reason: &'static str },
    #[error(transparent)]
    InvalidFlags(#[from] FlagsError),
    #[error("no free VIP id for {vip}: the dataplane holds at most {limit} VIPs (--max-vips)")]
    TooManyVips { vip: VipSpec, limit: u32 },
    #[error(
        "no free real id for real {real} of VIP {vip}: the dataplane holds at most {limit} reals \
         (--max-reals) and {quarantined} freed ids are still in quarantine (a removed real's id \
         is not reused for {}s, until no tracked flow can name it)",
        .quarantine.as_secs()
    )]
    TooManyReals {
        vip: VipSpec,
        real: RealAddr,
        limit: u32,
        quarantined: usize,
        quarantine: Duration,
    },
    #[error("{} of VIP {vip}: {source}", check_owner(.real))]
    InvalidCheck {
        vip: VipSpec,
        /// The real whose own fields are at fault; `None`: the VIP's check.
        real: Option<RealAddr>,
        #[source]
        source: CheckFieldError,
    },
    #[error("sorry server {addr} of VIP {vip} is {reason}")]
    SorryServer {
        vip: VipSpec,
        addr: IpAddr,
        reason: String,
    },
    #[error(
        "{real} is the sorry server of VIP {vip}, not one of its reals (xlb vip set {vip} \
         --sorry-server none removes it)"
    )]
    IsSorryServer { vip: VipSpec, real: RealAddr },
    #[error("real {real} of VIP {vip} has no check: its health is not set by hand")]
    NotChecked { vip: VipSpec, real: RealAddr },
    #[error("cannot build the ring of VIP {vip}: {source}")]
    Ring {
        vip: VipSpec,
        #[source]
        source: MaglevError,
    },
}

impl ValidationError {
    /// The input field at fault, as the control API reports it.
    pub fn field(&self) -> &'static str {
        match self {
            ValidationError::DuplicateVip { .. }
            | ValidationError::UnknownVip { .. }
            | ValidationError::TooManyVips { .. } => "vip",
            ValidationError::InvalidAddress { field, .. } => field,
            ValidationError::DuplicateReal { .. }
            | ValidationError::UnknownReal { .. }
            | ValidationError::FamilyMismatch { .. }
            | ValidationError::Nat { .. }
            | ValidationError::TooManyReals { .. }
            | ValidationError::Ring { .. } => "real",
            ValidationError::WeightTooLarge { .. } => "weight",
            ValidationError::InvalidMac { .. } => "mac",
            ValidationError::InvalidEgress { .. } => "egress",
            ValidationError::InvalidFlags(_) => "flags",
            ValidationError::InvalidCheck { .. } => "check",
            ValidationError::SorryServer { .. } => "sorry_server",
            ValidationError::IsSorryServer { .. } | ValidationError::NotChecked { .. } => "real",
        }
    }
}

fn check_owner(real: &Option<RealAddr>) -> String {
    match real {
        Some(real) => format!("check of real {real}"),
        None => "check".to_string(),
    }
}

fn in_vip(vip: &Option<VipSpec>) -> String {
    match vip {
        Some(vip) => format!("VIP {vip}"),
        None => "any VIP".to_string(),
    }
}

/// What became of the writes already done when a map write failed.
#[derive(Debug)]
pub enum Rollback {
    /// Every write done was undone: the maps hold the previous state again.
    Restored { writes: usize },
    /// Undoing failed too; the maps are mixed. The remaining undo writes are kept and retried by
    /// `Balancer::repair` (and before the next `apply`).
    Incomplete {
        error: DataplaneError,
        pending: usize,
    },
}

impl fmt::Display for Rollback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rollback::Restored { writes } => {
                write!(
                    f,
                    "the previous state was written back ({writes} writes undone)"
                )
            }
            Rollback::Incomplete { error, pending } => write!(
                f,
                "writing the previous state back failed too ({error}); {pending} writes are left \
                 for Balancer::repair"
            ),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BalancerError {
    /// The batch was refused before any map write; nothing changed.
    #[error("{}rejected: {source}", at_change(.change))]
    Invalid {
        /// Index of the offending change in the batch; `None` when the batch as a whole is at
        /// fault (out of ids, a ring that cannot be built).
        change: Option<usize>,
        #[source]
        source: ValidationError,
    },
    /// Reading the maps (to compare rings) failed before any write; nothing changed.
    #[error("reading the maps failed, nothing was written: {0}")]
    Read(#[source] DataplaneError),
    /// A map write failed: the state stays the previous one, and `rollback` says whether the
    /// maps do too.
    #[error("map write failed, the change was not applied: {source}; {rollback}")]
    Write {
        #[source]
        source: DataplaneError,
        rollback: Rollback,
    },
    /// The undo writes left by an earlier failure could not all be done.
    #[error(
        "maps still hold part of a failed change and writing it back failed again: {source} \
         ({pending} writes left)"
    )]
    Repair {
        #[source]
        source: DataplaneError,
        pending: usize,
    },
    /// A plan made before another commit (a caller's mistake): nothing was written.
    #[error("the plan was made from a state that has changed since; plan again")]
    StalePlan,
    /// Clearing entries of adopted maps that no state names failed.
    #[error("clearing stale entries of the adopted maps: {0}")]
    Adopt(#[source] DataplaneError),
}

impl BalancerError {
    /// The validation error, if the batch was refused as invalid.
    pub fn validation(&self) -> Option<&ValidationError> {
        match self {
            BalancerError::Invalid { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn at_change(change: &Option<usize>) -> String {
    match change {
        Some(index) => format!("changes[{index}] "),
        None => String::new(),
    }
}

/// What happened to one VIP's ring in an apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingUpdate {
    /// The new ring was written into this generation, which is now live.
    Rewritten { generation: u32 },
    /// The rebuilt ring equals the one already live: nothing written.
    AlreadyLive { generation: u32 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipReport {
    pub vip: VipSpec,
    pub vip_id: u32,
    pub ring: RingUpdate,
    /// Maglev's uneven-spread warning (ring too small for the VIP's reals), if any.
    pub spread_warning: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// One entry per VIP whose ring was rebuilt (added VIPs, VIPs whose ring members changed).
    pub vips: Vec<VipReport>,
    /// Map writes done (a ring half counts as one).
    pub map_writes: usize,
}

/// The desired state as plain data, for `xlb list` and for tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// In `VipSpec` order.
    pub vips: Vec<VipSnapshot>,
    /// Freed real ids not yet reusable, lowest first.
    pub quarantined: Vec<QuarantinedId>,
}

impl Snapshot {
    /// The VIPs with their ids: what the state file keeps and `Balancer::restore` takes.
    pub fn records(&self) -> Vec<VipRecord> {
        let record = |r: &RealSnapshot| RealRecord {
            addr: r.addr,
            id: r.id,
            weight: r.weight,
            mac: r.mac,
            egress: r.egress,
            mode: r.mode,
            check: r.check.clone(),
            down: r.down,
            dyn_weight: r.dyn_weight,
        };
        self.vips
            .iter()
            .map(|v| VipRecord {
                vip: v.spec,
                id: v.id,
                flags: v.flags,
                options: v.options,
                mode: v.mode,
                check: v.check.clone(),
                reals: v.reals.iter().map(record).collect(),
                sorry: v.sorry.as_ref().map(record),
            })
            .collect()
    }
}

/// A VIP with the ids its maps use, as the daemon persists it and replays it at start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipRecord {
    pub vip: VipSpec,
    pub id: u32,
    #[serde(default)]
    pub flags: VipFlags,
    #[serde(default)]
    pub options: VipOptions,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckFields>,
    pub reals: Vec<RealRecord>,
    /// The sorry server (its address is `options.sorry_server`), with its id and MAC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sorry: Option<RealRecord>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RealRecord {
    pub addr: RealAddr,
    pub id: u32,
    pub weight: u32,
    /// The last MAC resolved: a restarted daemon keeps the real in service at once.
    #[serde(with = "crate::model::mac_serde")]
    pub mac: Option<Mac>,
    /// The interface `mac` is on, when not the balancer's (tunnel reals).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Egress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckFields>,
    /// Down by its check: a restarted daemon keeps it out until it passes `rise` checks.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub down: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dyn_weight: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipSnapshot {
    pub spec: VipSpec,
    pub id: u32,
    pub flags: VipFlags,
    pub options: VipOptions,
    /// The mode as set on the VIP, and the one its reals take unless they name their own.
    pub mode: Option<Mode>,
    pub effective_mode: Mode,
    pub check: Option<CheckFields>,
    /// The live ring half.
    pub generation: u32,
    /// Hex SHA-256 of the live ring as its slots' real addresses (equal on nodes that send
    /// every flow alike).
    pub ring_digest: String,
    /// In address order; the sorry server is not among them.
    pub reals: Vec<RealSnapshot>,
    pub sorry: Option<RealSnapshot>,
    /// Summed effective weight of the reals that are up and resolved.
    pub healthy_weight: u64,
    /// `healthy_weight` is below `options.quorum`.
    pub quorum_lost: bool,
    /// The sorry server takes the new flows.
    pub sorry_active: bool,
    /// Quorum lost without a usable sorry server, `fail-open`: every real is in the ring.
    pub fail_open: bool,
    /// Quorum lost without a usable sorry server, `drop`: new flows are dropped.
    pub dropping: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RealSnapshot {
    pub addr: RealAddr,
    pub id: u32,
    pub weight: u32,
    /// Its own MAC (direct routing) or its next hop's (tunnel).
    pub mac: Option<Mac>,
    /// The interface its next hop is on, when not the balancer's.
    pub egress: Option<Egress>,
    /// The mode as set on the real, and the one it is forwarded by.
    pub mode: Option<Mode>,
    pub effective_mode: Mode,
    /// Whether the real has ring slots now.
    pub in_ring: bool,
    /// Whether tracked flows are forwarded to it (its `REALS` entry is alive).
    pub serving: bool,
    /// The weight its ring slots are counted with (0 when out of the ring).
    pub effective_weight: u32,
    /// The real's own check fields.
    pub check: Option<CheckFields>,
    /// The check it runs (its own fields over the VIP's), resolved; `None`: not checked.
    pub effective_check: Option<CheckSpec>,
    pub down: bool,
    pub dyn_weight: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuarantinedId {
    pub id: u32,
    pub remaining: Duration,
}
