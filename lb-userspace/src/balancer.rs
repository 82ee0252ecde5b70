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
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use lb_common::{
    v4_mapped, Real, VipAddrValue, VipKey, VipMeta, IPPROTO_TCP, IPPROTO_UDP, REAL_F_ALIVE,
    VIP_ADDR_PORT0_TCP, VIP_ADDR_PORT0_UDP, VIP_F_ALL, VIP_F_NO_CONNTRACK, VIP_F_NO_SRC_PORT,
};

use crate::{
    dataplane::{Dataplane, DataplaneError, Limits},
    maglev::{self, MaglevError, MaglevReal},
};

/// Largest weight of one real (ipvsadm's range). Keeps a VIP's total weight within `u32` for
/// Maglev's cumulative weights.
pub const MAX_WEIGHT: u32 = 65_535;

/// An Ethernet address.
pub type Mac = [u8; 6];

// ---- protocol and VIP spec ------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// The IP protocol number, as in `VipKey::proto`.
    pub const fn ip_proto(self) -> u8 {
        match self {
            Proto::Tcp => IPPROTO_TCP,
            Proto::Udp => IPPROTO_UDP,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }

    /// The `VipAddrValue::port0` bit of this protocol.
    const fn port0_bit(self) -> u32 {
        match self {
            Proto::Tcp => VIP_ADDR_PORT0_TCP,
            Proto::Udp => VIP_ADDR_PORT0_UDP,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Proto {
    type Err = VipParseReason;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("tcp") {
            Ok(Proto::Tcp)
        } else if s.eq_ignore_ascii_case("udp") {
            Ok(Proto::Udp)
        } else {
            Err(VipParseReason::BadProto(s.to_string()))
        }
    }
}

/// A virtual service: `tcp/10.0.0.100:80`, `udp/[2001:db8::100]:53`. Port 0 means every port of
/// the address for that protocol.
///
/// Ordered by address, then port, then protocol (the order `xlb list` shows and the order new
/// VIPs get their ids in).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VipSpec {
    pub proto: Proto,
    pub addr: IpAddr,
    pub port: u16,
}

impl VipSpec {
    /// A spec with its address normalised (see `normalized`).
    pub fn new(proto: Proto, addr: IpAddr, port: u16) -> Self {
        VipSpec { proto, addr, port }.normalized()
    }

    /// The same spec with a v4-mapped IPv6 address (`::ffff:a.b.c.d`) turned into IPv4: both
    /// name the same map key, so they must be the same VIP.
    pub fn normalized(self) -> Self {
        VipSpec {
            addr: self.addr.to_canonical(),
            ..self
        }
    }

    /// The `VIPS` key of this VIP.
    pub fn key(&self) -> VipKey {
        VipKey {
            addr: addr_bytes(self.addr),
            // The map holds the port as the two bytes of the packet.
            port_be: self.port.to_be(),
            proto: self.proto.ip_proto(),
            _pad: 0,
        }
    }
}

impl PartialOrd for VipSpec {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for VipSpec {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.addr, self.port, self.proto).cmp(&(other.addr, other.port, other.proto))
    }
}

impl fmt::Display for VipSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{}/{}:{}", self.proto, a, self.port),
            IpAddr::V6(a) => write!(f, "{}/[{}]:{}", self.proto, a, self.port),
        }
    }
}

/// Why a VIP string does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VipParseReason {
    #[error("missing protocol (expected tcp/ADDR:PORT or udp/ADDR:PORT)")]
    MissingProto,
    #[error("unknown protocol {0:?} (expected tcp or udp)")]
    BadProto(String),
    #[error("missing port (add :PORT, or :0 for every port)")]
    MissingPort,
    #[error("bad port {0:?} (expected 0 to 65535)")]
    BadPort(String),
    #[error("bad IPv4 address")]
    BadIpv4,
    #[error("bad IPv6 address")]
    BadIpv6,
    #[error("an IPv6 address needs brackets, as in tcp/[2001:db8::1]:443")]
    Ipv6NeedsBrackets,
}

/// `invalid VIP "tcp/10.0.0.300:80": bad IPv4 address`
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid VIP {input:?}: {reason}")]
pub struct ParseVipError {
    pub input: String,
    pub reason: VipParseReason,
}

impl FromStr for VipSpec {
    type Err = ParseVipError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        parse_vip(input).map_err(|reason| ParseVipError {
            input: input.to_string(),
            reason,
        })
    }
}

fn parse_vip(input: &str) -> Result<VipSpec, VipParseReason> {
    let (proto, rest) = input.split_once('/').ok_or(VipParseReason::MissingProto)?;
    let proto: Proto = proto.parse()?;
    let (addr, port) = if let Some(bracketed) = rest.strip_prefix('[') {
        let (host, tail) = bracketed.split_once(']').ok_or(VipParseReason::BadIpv6)?;
        let addr: Ipv6Addr = host.parse().map_err(|_| VipParseReason::BadIpv6)?;
        let port = match tail.strip_prefix(':') {
            Some(port) => port,
            None if tail.is_empty() => return Err(VipParseReason::MissingPort),
            None => return Err(VipParseReason::BadPort(tail.to_string())),
        };
        (IpAddr::V6(addr), port)
    } else {
        // An unbracketed IPv6 address would be ambiguous with the port separator.
        let (host, port) = match rest.matches(':').count() {
            0 => return Err(VipParseReason::MissingPort),
            1 => rest.split_once(':').ok_or(VipParseReason::MissingPort)?,
            _ => return Err(VipParseReason::Ipv6NeedsBrackets),
        };
        let addr: Ipv4Addr = host.parse().map_err(|_| VipParseReason::BadIpv4)?;
        (IpAddr::V4(addr), port)
    };
    if port.is_empty() {
        return Err(VipParseReason::MissingPort);
    }
    // u16::from_str accepts a leading '+', which is no port syntax anyone writes.
    if !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(VipParseReason::BadPort(port.to_string()));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| VipParseReason::BadPort(port.to_string()))?;
    Ok(VipSpec::new(proto, addr, port))
}

// ---- flags --------------------------------------------------------------------------------

/// Per-VIP options, stored as `VipMeta::flags` (`lb_common::VIP_F_*`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipFlags {
    /// Hash without the source port: all connections of a client go to one real.
    pub no_src_port: bool,
    /// Do not track connections (a ring change then moves established flows).
    pub no_conntrack: bool,
}

impl VipFlags {
    pub const NO_SRC_PORT: &'static str = "no-src-port";
    pub const NO_CONNTRACK: &'static str = "no-conntrack";

    pub fn bits(self) -> u32 {
        let mut bits = 0;
        if self.no_src_port {
            bits |= VIP_F_NO_SRC_PORT;
        }
        if self.no_conntrack {
            bits |= VIP_F_NO_CONNTRACK;
        }
        bits
    }

    /// Flags from `VipMeta::flags`; unknown bits are refused rather than dropped, so a map
    /// written by a newer layout is not silently rewritten without them.
    pub fn from_bits(bits: u32) -> Result<Self, ValidationError> {
        if bits & !VIP_F_ALL != 0 {
            return Err(ValidationError::InvalidFlags {
                given: format!("{bits:#x}"),
                reason: "unknown flag bits",
            });
        }
        Ok(VipFlags {
            no_src_port: bits & VIP_F_NO_SRC_PORT != 0,
            no_conntrack: bits & VIP_F_NO_CONNTRACK != 0,
        })
    }

    /// Flags from their names, as in the config file (`["no-src-port", "no-conntrack"]`).
    pub fn from_names<'a>(
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<Self, ValidationError> {
        let mut flags = VipFlags::default();
        for name in names {
            match name {
                Self::NO_SRC_PORT => flags.no_src_port = true,
                Self::NO_CONNTRACK => flags.no_conntrack = true,
                other => {
                    return Err(ValidationError::InvalidFlags {
                        given: other.to_string(),
                        reason: "unknown flag (expected no-src-port or no-conntrack)",
                    })
                }
            }
        }
        Ok(flags)
    }

    pub fn names(self) -> Vec<&'static str> {
        let mut names = Vec::new();
        if self.no_src_port {
            names.push(Self::NO_SRC_PORT);
        }
        if self.no_conntrack {
            names.push(Self::NO_CONNTRACK);
        }
        names
    }
}

impl fmt::Display for VipFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = self.names();
        if names.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&names.join(","))
        }
    }
}

// ---- changes, errors, reports ---------------------------------------------------------------

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
        addr: IpAddr,
        weight: u32,
        mac: Option<Mac>,
    },
    DelReal {
        vip: VipSpec,
        addr: IpAddr,
    },
    SetWeight {
        vip: VipSpec,
        addr: IpAddr,
        weight: u32,
    },
    /// `vip: None` sets the MAC of `addr` in every VIP that has it as a real (a neighbour
    /// entry is per address, not per VIP). `mac: None` forgets it: the real stops taking flows.
    SetMac {
        vip: Option<VipSpec>,
        addr: IpAddr,
        mac: Option<Mac>,
    },
    SetFlags {
        vip: VipSpec,
        flags: VipFlags,
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
    DuplicateReal { vip: VipSpec, real: IpAddr },
    #[error("real {real} is not in {}", in_vip(.vip))]
    UnknownReal { vip: Option<VipSpec>, real: IpAddr },
    #[error(
        "real {real} and VIP {vip} are of different address families \
         (direct routing forwards the packet unchanged)"
    )]
    FamilyMismatch { vip: VipSpec, real: IpAddr },
    #[error("weight {weight} of real {real} in VIP {vip} is above the maximum {MAX_WEIGHT}")]
    WeightTooLarge {
        vip: VipSpec,
        real: IpAddr,
        weight: u32,
    },
    #[error("MAC {} of real {real} is {reason}", fmt_mac(.mac))]
    InvalidMac {
        real: IpAddr,
        mac: Mac,
        reason: &'static str,
    },
    #[error("flags {given:?}: {reason}")]
    InvalidFlags { given: String, reason: &'static str },
    #[error("no free VIP id for {vip}: the dataplane holds at most {limit} VIPs")]
    TooManyVips { vip: VipSpec, limit: u32 },
    #[error(
        "no free real id for real {real} of VIP {vip}: the dataplane holds at most {limit} reals \
         and {quarantined} freed ids are still in quarantine"
    )]
    TooManyReals {
        vip: VipSpec,
        real: IpAddr,
        limit: u32,
        quarantined: usize,
    },
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
            | ValidationError::TooManyReals { .. }
            | ValidationError::Ring { .. } => "real",
            ValidationError::WeightTooLarge { .. } => "weight",
            ValidationError::InvalidMac { .. } => "mac",
            ValidationError::InvalidFlags { .. } => "flags",
        }
    }
}

fn in_vip(vip: &Option<VipSpec>) -> String {
    match vip {
        Some(vip) => format!("VIP {vip}"),
        None => "any VIP".to_string(),
    }
}

fn fmt_mac(mac: &Mac) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
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

// ---- snapshot -----------------------------------------------------------------------------

/// The desired state as plain data, for `xlb list` and for tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// In `VipSpec` order.
    pub vips: Vec<VipSnapshot>,
    /// Freed real ids not yet reusable, lowest first.
    pub quarantined: Vec<QuarantinedId>,
}

impl Snapshot {
    /// The VIPs with their ids, in the form `Balancer::restore` takes.
    pub fn restore_vips(&self) -> Vec<RestoreVip> {
        self.vips
            .iter()
            .map(|v| RestoreVip {
                spec: v.spec,
                id: v.id,
                flags: v.flags,
                reals: v
                    .reals
                    .iter()
                    .map(|r| RestoreReal {
                        addr: r.addr,
                        id: r.id,
                        weight: r.weight,
                        mac: r.mac,
                    })
                    .collect(),
            })
            .collect()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipSnapshot {
    pub spec: VipSpec,
    pub id: u32,
    pub flags: VipFlags,
    /// The live ring half.
    pub generation: u32,
    /// In address order.
    pub reals: Vec<RealSnapshot>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RealSnapshot {
    pub addr: IpAddr,
    pub id: u32,
    pub weight: u32,
    pub mac: Option<Mac>,
    /// Whether the real has ring slots (it has a MAC and a weight above 0).
    pub in_ring: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuarantinedId {
    pub id: u32,
    pub remaining: Duration,
}

// ---- clock --------------------------------------------------------------------------------

/// Where the quarantine of freed ids takes its time from.
pub trait Clock {
    fn now(&self) -> Instant;
}

#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that only moves when told; clones share the time (keep one to advance it).
#[derive(Clone, Debug)]
pub struct ManualClock {
    base: Instant,
    offset_ns: Arc<AtomicU64>,
}

impl ManualClock {
    pub fn new() -> Self {
        ManualClock {
            base: Instant::now(),
            offset_ns: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn advance(&self, by: Duration) {
        let ns = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.offset_ns.fetch_add(ns, Ordering::Relaxed);
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.base + Duration::from_nanos(self.offset_ns.load(Ordering::Relaxed))
    }
}

// ---- state --------------------------------------------------------------------------------

/// One VIP; `I` is `u32` in the committed state and `Option<u32>` while a batch is folded (new
/// entries get their ids only once the whole batch is known, for deterministic ids).
#[derive(Clone, Debug, PartialEq, Eq)]
struct VipEntry<I> {
    id: I,
    flags: VipFlags,
    /// The live ring half (meaningful in the committed state only).
    generation: u32,
    reals: BTreeMap<IpAddr, RealEntry<I>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RealEntry<I> {
    id: I,
    weight: u32,
    mac: Option<Mac>,
}

type State = BTreeMap<VipSpec, VipEntry<u32>>;
type Draft = BTreeMap<VipSpec, VipEntry<Option<u32>>>;

impl VipEntry<u32> {
    fn draft(&self) -> VipEntry<Option<u32>> {
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
    fn ring_members(&self) -> Vec<MaglevReal> {
        self.reals
            .iter()
            .filter(|(_, r)| r.mac.is_some() && r.weight > 0)
            .map(|(addr, r)| MaglevReal {
                addr: addr_bytes(*addr),
                weight: r.weight,
                id: r.id,
            })
            .collect()
    }

    fn meta(&self) -> VipMeta {
        VipMeta {
            flags: self.flags.bits(),
            generation: self.generation,
            in_use: 1,
            _reserved: 0,
        }
    }
}

fn addr_bytes(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(a) => v4_mapped(a.octets()),
        IpAddr::V6(a) => a.octets(),
    }
}

/// The `REALS` entries a state wants, by real id. Reals without a MAC have none (zeroed).
fn real_entries(state: &State) -> BTreeMap<u32, Real> {
    let mut out = BTreeMap::new();
    for vip in state.values() {
        for (addr, real) in &vip.reals {
            if let Some(mac) = real.mac {
                let entry = Real {
                    addr: addr_bytes(*addr),
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
fn vip_addrs(state: &State) -> BTreeMap<[u8; 16], VipAddrValue> {
    let mut out: BTreeMap<[u8; 16], VipAddrValue> = BTreeMap::new();
    for spec in state.keys() {
        let value = out.entry(addr_bytes(spec.addr)).or_default();
        value.vip_count += 1;
        if spec.port == 0 {
            value.port0 |= spec.proto.port0_bit();
        }
    }
    out
}

// ---- map writes ---------------------------------------------------------------------------

/// One map write, kept as data so a failed batch can be undone.
#[derive(Clone, Debug)]
enum Op {
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
    fn run<D: Dataplane>(&self, dp: &mut D) -> Result<(), DataplaneError> {
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

    fn vip_addr(addr: [u8; 16], value: Option<VipAddrValue>) -> Op {
        match value {
            Some(value) if value.vip_count > 0 => Op::SetVipAddr(addr, value),
            _ => Op::DelVipAddr(addr),
        }
    }
}

/// A write and what undoes it. Ring writes go to the inactive half, which no reader looks at,
/// so they need no undo.
struct Step {
    op: Op,
    undo: Option<Op>,
}

/// A rebuilt ring, decided before any write.
struct RingPlan {
    vip: VipSpec,
    vip_id: u32,
    /// Some when the ring differs from the live one and must be written into `generation`.
    write: Option<Vec<u32>>,
    /// The generation live after the batch.
    generation: u32,
    /// For a new VIP: its `VIP_META` entry as found in the map (what an undo writes back).
    prior_meta: Option<VipMeta>,
    spread_warning: Option<String>,
}

// ---- the balancer -------------------------------------------------------------------------

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

/// Folds a batch into a draft of the current state, validating each change against the state
/// left by the ones before it.
fn fold(current: &State, changes: Vec<Change>) -> Result<Draft, BalancerError> {
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
            let spec = spec.normalized();
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
            let spec = spec.normalized();
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
            let addr = addr.to_canonical();
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
            let addr = addr.to_canonical();
            if entry.reals.remove(&addr).is_none() {
                return Err(ValidationError::UnknownReal {
                    vip: Some(vip),
                    real: addr,
                });
            }
        }
        Change::SetWeight { vip, addr, weight } => {
            let (vip, entry) = find_vip(draft, vip)?;
            let addr = addr.to_canonical();
            let real = entry
                .reals
                .get_mut(&addr)
                .ok_or(ValidationError::UnknownReal {
                    vip: Some(vip),
                    real: addr,
                })?;
            check_weight(vip, addr, weight)?;
            real.weight = weight;
        }
        Change::SetMac { vip, addr, mac } => {
            let addr = addr.to_canonical();
            if let Some(mac) = mac {
                check_mac(addr, mac)?;
            }
            match vip {
                Some(vip) => {
                    let (vip, entry) = find_vip(draft, vip)?;
                    let real = entry
                        .reals
                        .get_mut(&addr)
                        .ok_or(ValidationError::UnknownReal {
                            vip: Some(vip),
                            real: addr,
                        })?;
                    real.mac = mac;
                }
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

fn find_vip(
    draft: &mut Draft,
    vip: VipSpec,
) -> Result<(VipSpec, &mut VipEntry<Option<u32>>), ValidationError> {
    let vip = vip.normalized();
    match draft.get_mut(&vip) {
        Some(entry) => Ok((vip, entry)),
        None => Err(ValidationError::UnknownVip { vip }),
    }
}

/// Addresses no packet can be balanced to or from.
fn check_addr(field: &'static str, addr: IpAddr) -> Result<(), ValidationError> {
    let reason = if addr.is_unspecified() {
        "unspecified"
    } else if addr.is_multicast() {
        "multicast"
    } else if addr.is_loopback() {
        "loopback"
    } else if addr == IpAddr::V4(Ipv4Addr::BROADCAST) {
        "broadcast"
    } else {
        return Ok(());
    };
    Err(ValidationError::InvalidAddress {
        field,
        addr,
        reason,
    })
}

fn check_weight(vip: VipSpec, real: IpAddr, weight: u32) -> Result<(), ValidationError> {
    if weight > MAX_WEIGHT {
        return Err(ValidationError::WeightTooLarge { vip, real, weight });
    }
    Ok(())
}

/// Direct routing sends frames to this MAC: a group address would flood them.
fn check_mac(real: IpAddr, mac: Mac) -> Result<(), ValidationError> {
    let reason = if mac == [0; 6] {
        "all zeros"
    } else if mac[0] & 1 != 0 {
        "a group (multicast or broadcast) address, not a host's"
    } else {
        return Ok(());
    };
    Err(ValidationError::InvalidMac { real, mac, reason })
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
fn plan_steps(old: &State, next: &State, rings: Vec<RingPlan>) -> Vec<Step> {
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use lb_common::GlobalStats;

    use super::*;
    use crate::dataplane::FakeDataplane;

    const M: u32 = 1009; // prime, ≥ 100 × the reals of any test VIP
    const QUARANTINE: Duration = Duration::from_secs(900);

    fn limits() -> Limits {
        Limits {
            max_vips: 8,
            max_reals: 32,
            ring_size: M,
        }
    }

    fn vip(s: &str) -> VipSpec {
        s.parse().expect("test VIP parses")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address parses")
    }

    fn mac(n: u8) -> Mac {
        [0x02, 0, 0, 0, 0, n]
    }

    type TestBalancer<D = FakeDataplane> = Balancer<D, ManualClock>;

    fn balancer_with(limits: Limits) -> (TestBalancer, ManualClock) {
        let clock = ManualClock::new();
        let b = Balancer::with_clock(FakeDataplane::new(limits), QUARANTINE, clock.clone());
        (b, clock)
    }

    fn balancer() -> (TestBalancer, ManualClock) {
        balancer_with(limits())
    }

    fn add_real(vip: VipSpec, addr: &str, weight: u32, m: Option<Mac>) -> Change {
        Change::AddReal {
            vip,
            addr: ip(addr),
            weight,
            mac: m,
        }
    }

    /// A VIP with reals .11 (w1), .12 (w2), .13 (w1), all with MACs.
    fn three_reals(spec: VipSpec) -> Vec<Change> {
        vec![
            Change::AddVip {
                spec,
                flags: VipFlags::default(),
            },
            add_real(spec, "10.0.0.11", 1, Some(mac(11))),
            add_real(spec, "10.0.0.12", 2, Some(mac(12))),
            add_real(spec, "10.0.0.13", 1, Some(mac(13))),
        ]
    }

    fn v4(a: &str) -> [u8; 16] {
        addr_bytes(ip(a))
    }

    /// The maps as the kernel sees them: zeroed array entries are the same as absent ones,
    /// only the live ring half counts.
    #[derive(Debug, PartialEq)]
    struct Visible {
        vips: HashMap<VipKey, u32>,
        vip_addrs: HashMap<[u8; 16], VipAddrValue>,
        vip_meta: BTreeMap<u32, VipMeta>,
        reals: BTreeMap<u32, Real>,
        live_rings: BTreeMap<u32, Vec<u32>>,
    }

    fn visible(fake: &FakeDataplane) -> Visible {
        let vip_meta: BTreeMap<u32, VipMeta> = fake
            .vip_meta
            .iter()
            .filter(|(_, m)| **m != VipMeta::default())
            .map(|(id, m)| (*id, *m))
            .collect();
        Visible {
            vips: fake.vips.clone(),
            vip_addrs: fake.vip_addrs.clone(),
            live_rings: vip_meta
                .keys()
                .map(|id| (*id, fake.live_ring(*id)))
                .collect(),
            vip_meta,
            reals: fake
                .reals
                .iter()
                .filter(|(_, r)| **r != Real::default())
                .map(|(id, r)| (*id, *r))
                .collect(),
        }
    }

    fn expected_ring(reals: &[(&str, u32, u32)]) -> Vec<u32> {
        let reals: Vec<MaglevReal> = reals
            .iter()
            .map(|(addr, weight, id)| MaglevReal {
                addr: v4(addr),
                weight: *weight,
                id: *id,
            })
            .collect();
        maglev::build_ring(&reals, M).expect("test ring builds")
    }

    fn validation(err: BalancerError) -> (Option<usize>, ValidationError) {
        match err {
            BalancerError::Invalid { change, source } => (change, source),
            other => panic!("expected a validation error, got {other}"),
        }
    }

    /// Wraps the fake to log every write in order, and to fail one chosen write once (the
    /// fake's own `fail_after` keeps failing, which leaves no way to test a rollback that works).
    struct Probe {
        fake: FakeDataplane,
        log: Vec<String>,
        fail_at: Option<usize>,
    }

    impl Probe {
        fn new(limits: Limits) -> Self {
            Probe {
                fake: FakeDataplane::new(limits),
                log: Vec::new(),
                fail_at: None,
            }
        }

        fn record(&mut self, event: String) -> Result<(), DataplaneError> {
            if self.fail_at == Some(self.log.len()) {
                self.fail_at = None;
                return Err(DataplaneError::Map {
                    op: "update",
                    map: "probe",
                    source: std::io::Error::from_raw_os_error(libc::EIO),
                });
            }
            self.log.push(event);
            Ok(())
        }

        fn take_log(&mut self) -> Vec<String> {
            std::mem::take(&mut self.log)
        }
    }

    impl Dataplane for Probe {
        fn limits(&self) -> Limits {
            self.fake.limits()
        }
        fn set_vip(&mut self, key: &VipKey, vip_id: u32) -> Result<(), DataplaneError> {
            self.record(format!("VIPS+{vip_id}"))?;
            self.fake.set_vip(key, vip_id)
        }
        fn del_vip(&mut self, key: &VipKey) -> Result<(), DataplaneError> {
            self.record("VIPS-".to_string())?;
            self.fake.del_vip(key)
        }
        fn vips(&self) -> Result<Vec<(VipKey, u32)>, DataplaneError> {
            self.fake.vips()
        }
        fn set_vip_addr(
            &mut self,
            addr: &[u8; 16],
            value: &VipAddrValue,
        ) -> Result<(), DataplaneError> {
            self.record("ADDRS+".to_string())?;
            self.fake.set_vip_addr(addr, value)
        }
        fn del_vip_addr(&mut self, addr: &[u8; 16]) -> Result<(), DataplaneError> {
            self.record("ADDRS-".to_string())?;
            self.fake.del_vip_addr(addr)
        }
        fn set_vip_meta(&mut self, vip_id: u32, meta: &VipMeta) -> Result<(), DataplaneError> {
            if meta.in_use == 0 {
                self.record(format!("META{vip_id}-"))?;
            } else {
                self.record(format!("META{vip_id}:g{}", meta.generation))?;
            }
            self.fake.set_vip_meta(vip_id, meta)
        }
        fn vip_meta(&self, vip_id: u32) -> Result<VipMeta, DataplaneError> {
            self.fake.vip_meta(vip_id)
        }
        fn set_real(&mut self, real_id: u32, real: &Real) -> Result<(), DataplaneError> {
            let sign = if real.flags & REAL_F_ALIVE != 0 {
                '+'
            } else {
                '-'
            };
            self.record(format!("REALS{real_id}{sign}"))?;
            self.fake.set_real(real_id, real)
        }
        fn real(&self, real_id: u32) -> Result<Real, DataplaneError> {
            self.fake.real(real_id)
        }
        fn write_ring(
            &mut self,
            vip_id: u32,
            generation: u32,
            ring: &[u32],
        ) -> Result<(), DataplaneError> {
            self.record(format!("RING{vip_id}:g{generation}"))?;
            self.fake.write_ring(vip_id, generation, ring)
        }
        fn read_ring(&self, vip_id: u32, generation: u32) -> Result<Vec<u32>, DataplaneError> {
            self.fake.read_ring(vip_id, generation)
        }
        fn vip_stats(&self, vip_id: u32) -> Result<lb_common::VipStats, DataplaneError> {
            self.fake.vip_stats(vip_id)
        }
        fn real_stats(&self, real_id: u32) -> Result<lb_common::RealStats, DataplaneError> {
            self.fake.real_stats(real_id)
        }
        fn global_stats(&self) -> Result<GlobalStats, DataplaneError> {
            self.fake.global_stats()
        }
    }

    fn probe_balancer() -> TestBalancer<Probe> {
        Balancer::with_clock(Probe::new(limits()), QUARANTINE, ManualClock::new())
    }

    fn pos(log: &[String], event: &str) -> usize {
        log.iter()
            .position(|e| e == event)
            .unwrap_or_else(|| panic!("{event} not in {log:?}"))
    }

    // ---- parsing ----

    #[test]
    fn vip_spec_round_trips() {
        for s in [
            "tcp/10.0.0.100:80",
            "udp/[2001:db8::100]:53",
            "tcp/10.0.0.100:0",
            "udp/192.0.2.1:65535",
        ] {
            assert_eq!(vip(s).to_string(), s);
        }
        let spec = vip("udp/[2001:db8::100]:53");
        assert_eq!(spec.proto, Proto::Udp);
        assert_eq!(spec.addr, ip("2001:db8::100"));
        assert_eq!(spec.port, 53);
        // A v4-mapped address is the IPv4 VIP.
        let mapped = vip("tcp/[::ffff:10.0.0.100]:80");
        assert_eq!(mapped, vip("tcp/10.0.0.100:80"));
        assert_eq!(mapped.to_string(), "tcp/10.0.0.100:80");
        assert_eq!(vip("TCP/10.0.0.1:1").proto, Proto::Tcp);
    }

    #[test]
    fn vip_spec_parse_errors_name_input_and_reason() {
        let err = "tcp/10.0.0.300:80".parse::<VipSpec>().unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"invalid VIP "tcp/10.0.0.300:80": bad IPv4 address"#
        );
        let cases = [
            ("sctp/10.0.0.1:80", VipParseReason::BadProto("sctp".into())),
            ("10.0.0.1:80", VipParseReason::MissingProto),
            ("tcp/10.0.0.1", VipParseReason::MissingPort),
            ("tcp/10.0.0.1:", VipParseReason::MissingPort),
            ("tcp/[2001:db8::1]", VipParseReason::MissingPort),
            ("tcp/2001:db8::1:80", VipParseReason::Ipv6NeedsBrackets),
            ("tcp/[2001:db8::x]:80", VipParseReason::BadIpv6),
            (
                "tcp/10.0.0.1:65536",
                VipParseReason::BadPort("65536".into()),
            ),
            ("tcp/10.0.0.1:+80", VipParseReason::BadPort("+80".into())),
            (
                "tcp/[2001:db8::1]x80",
                VipParseReason::BadPort("x80".into()),
            ),
        ];
        for (input, reason) in cases {
            let err = input.parse::<VipSpec>().unwrap_err();
            assert_eq!(err.reason, reason, "{input}");
            assert_eq!(err.input, input);
            assert!(err.to_string().contains(input), "{err}");
        }
    }

    #[test]
    fn vip_flags_map_to_bits_and_names() {
        let both = VipFlags {
            no_src_port: true,
            no_conntrack: true,
        };
        assert_eq!(both.bits(), VIP_F_ALL);
        for bits in 0..=VIP_F_ALL {
            assert_eq!(VipFlags::from_bits(bits).expect("known bits").bits(), bits);
        }
        assert_eq!(VipFlags::from_bits(1 << 7).unwrap_err().field(), "flags");
        assert_eq!(
            VipFlags::from_names(["no-src-port"]).expect("known name"),
            VipFlags {
                no_src_port: true,
                no_conntrack: false
            }
        );
        assert!(VipFlags::from_names(["no-such-flag"]).is_err());
        assert_eq!(both.to_string(), "no-src-port,no-conntrack");
        assert_eq!(VipFlags::default().to_string(), "none");
    }

    // ---- maps ----

    #[test]
    fn add_vip_with_three_reals_writes_expected_maps() {
        let (mut b, _) = balancer();
        let spec = vip("tcp/10.0.0.100:80");
        let report = b.apply(three_reals(spec)).expect("valid");
        assert_eq!(
            report.vips,
            vec![VipReport {
                vip: spec,
                vip_id: 0,
                ring: RingUpdate::Rewritten { generation: 0 },
                spread_warning: None,
            }]
        );
        let fake = b.dataplane();
        let key = VipKey {
            addr: v4_mapped([10, 0, 0, 100]),
            port_be: 80u16.to_be(),
            proto: IPPROTO_TCP,
            _pad: 0,
        };
        assert_eq!(fake.vips, HashMap::from([(key, 0)]));
        assert_eq!(
            fake.vip_meta.get(&0),
            Some(&VipMeta {
                flags: 0,
                generation: 0,
                in_use: 1,
                _reserved: 0
            })
        );
        assert_eq!(
            fake.vip_addrs,
            HashMap::from([(
                key.addr,
                VipAddrValue {
                    vip_count: 1,
                    port0: 0
                }
            )])
        );
        let real = |addr: &str, m: u8| Real {
            addr: v4(addr),
            mac: mac(m),
            _pad: [0; 2],
            flags: REAL_F_ALIVE,
            vip_id: 0,
        };
        assert_eq!(
            fake.reals,
            HashMap::from([
                (1, real("10.0.0.11", 11)),
                (2, real("10.0.0.12", 12)),
                (3, real("10.0.0.13", 13)),
            ])
        );
        let want = expected_ring(&[
            ("10.0.0.11", 1, 1),
            ("10.0.0.12", 2, 2),
            ("10.0.0.13", 1, 3),
        ]);
        assert_eq!(fake.rings.get(&(0, 0)), Some(&want));
        assert_eq!(fake.rings.get(&(0, 1)), None);
        assert_eq!(fake.ring_writes, 1);
        // Every real has slots, the heavier one about twice as many.
        let count = |id| want.iter().filter(|s| **s == id).count();
        assert!(count(2) > count(1) * 3 / 2 && count(2) > count(3) * 3 / 2);
        assert_eq!(b.live_ring(&spec).expect("read"), Some(want));
        assert_eq!(b.vip_id(&spec), Some(0));
        assert_eq!(b.real_id(&spec, ip("10.0.0.12")), Some(2));
        assert_eq!(b.real_id(&spec, ip("::ffff:10.0.0.12")), Some(2));
    }

    #[test]
    fn writes_follow_the_safe_order() {
        let mut b = probe_balancer();
        let spec = vip("tcp/10.0.0.100:80");
        b.apply(three_reals(spec)).expect("valid");
        let log = b.dataplane_mut().take_log();
        assert_eq!(
            log,
            ["REALS1+", "REALS2+", "REALS3+", "RING0:g0", "META0:g0", "ADDRS+", "VIPS+0"]
        );

        // Removing a real: the ring without it goes live before its entry is cleared.
        b.del_real(spec, ip("10.0.0.12")).expect("valid");
        let log = b.dataplane_mut().take_log();
        assert_eq!(log, ["RING0:g1", "META0:g1", "REALS2-"]);

        // Adding a real: its entry before the ring that names it.
        b.add_real(spec, ip("10.0.0.14"), 1, Some(mac(14)))
            .expect("valid");
        let log = b.dataplane_mut().take_log();
        assert_eq!(log, ["REALS4+", "RING0:g0", "META0:g0"]);

        // Removing the VIP: VIPS first, then VIP_ADDRS, VIP_META, REALS.
        b.del_vip(spec).expect("valid");
        let log = b.dataplane_mut().take_log();
        assert!(pos(&log, "VIPS-") < pos(&log, "ADDRS-"), "{log:?}");
        assert!(pos(&log, "ADDRS-") < pos(&log, "META0-"), "{log:?}");
        for r in ["REALS1-", "REALS3-", "REALS4-"] {
            assert!(pos(&log, "META0-") < pos(&log, r), "{log:?}");
        }
        assert_eq!(log.len(), 6);
        assert!(visible(&b.dataplane().fake).vip_meta.is_empty());
        assert!(visible(&b.dataplane().fake).reals.is_empty());
    }

    #[test]
    fn five_changes_on_one_vip_rewrite_its_ring_once() {
        let (mut b, _) = balancer();
        let spec = vip("tcp/10.0.0.100:80");
        b.apply(vec![
            Change::AddVip {
                spec,
                flags: VipFlags::default(),
            },
            add_real(spec, "10.0.0.11", 1, Some(mac(11))),
            add_real(spec, "10.0.0.12", 1, Some(mac(12))),
        ])
        .expect("valid");
        let before = b.dataplane().ring_writes;
        let report = b
            .apply(vec![
                add_real(spec, "10.0.0.13", 1, Some(mac(13))),
                add_real(spec, "10.0.0.14", 1, None),
                Change::SetWeight {
                    vip: spec,
                    addr: ip("10.0.0.11"),
                    weight: 3,
                },
                Change::DelReal {
                    vip: spec,
                    addr: ip("10.0.0.12"),
                },
                Change::SetMac {
                    vip: Some(spec),
                    addr: ip("10.0.0.14"),
                    mac: Some(mac(14)),
                },
            ])
            .expect("valid");
        assert_eq!(b.dataplane().ring_writes - before, 1);
        assert_eq!(report.vips.len(), 1);
        assert_eq!(report.vips[0].ring, RingUpdate::Rewritten { generation: 1 });
        let want = expected_ring(&[
            ("10.0.0.11", 3, 1),
            ("10.0.0.13", 1, 3),
            ("10.0.0.14", 1, 4),
        ]);
        assert_eq!(b.live_ring(&spec).expect("read"), Some(want));
    }

    #[test]
    fn removing_a_real_flips_generation_and_clears_it() {
        let (mut b, _) = balancer();
        let spec = vip("tcp/10.0.0.100:80");
        b.apply(three_reals(spec)).expect("valid");
        let old = b.dataplane().live_ring(0);
        let report = b.del_real(spec, ip("10.0.0.12")).expect("valid");
        assert_eq!(report.vips[0].ring, RingUpdate::Rewritten { generation: 1 });
        let fake = b.dataplane();
        assert_eq!(fake.vip_meta[&0].generation, 1);
        // The old half is untouched: readers still on it see a whole ring.
        assert_eq!(fake.rings[&(0, 0)], old);
        let new = fake.live_ring(0);
        assert!(!new.contains(&2));
        assert_eq!(
            new,
            expected_ring(&[("10.0.0.11", 1, 1), ("10.0.0.13", 1, 3)])
        );
        // Maglev keeps most slots of the remaining reals where they were.
        let kept_before = old.iter().filter(|id| **id != 2).count();
        let kept_now = old
            .iter()
            .zip(&new)
            .filter(|(o, n)| **o != 2 && o == n)
            .count();
        assert!(
            kept_now * 10 >= kept_before * 9,
            "{kept_now} of {kept_before} slots kept"
        );
        assert_eq!(fake.reals.get(&2).map(|r| r.flags), Some(0));
        assert_eq!(fake.reals[&1].flags, REAL_F_ALIVE);
        assert_eq!(b.real_id(&spec, ip("10.0.0.12")), None);
        assert_eq!(b.snapshot().vips[0].generation, 1);
    }

    #[test]
    fn weight_zero_drains() {
        let (mut b, _) = balancer();
        let spec = vip("tcp/10.0.0.100:80");
        b.apply(three_reals(spec)).expect("valid");
        b.set_weight(spec, ip("10.0.0.12"), 0).expect("valid");
        let fake = b.dataplane();
        assert!(!fake.live_ring(0).contains(&2));
        assert_eq!(fake.reals[&2].flags, REAL_F_ALIVE);
        let real = &b.snapshot().vips[0].reals[1];
        assert_eq!((real.id, real.weight, real.in_ring), (2, 0, false));
        // All weights 0: an empty ring, reals still alive.
        b.apply(vec![
            Change::SetWeight {
                vip: spec,
                addr: ip("10.0.0.11"),
                weight: 0,
            },
            Change::SetWeight {
                vip: spec,
                addr: ip("10.0.0.13"),
                weight: 0,
            },
        ])
        .expect("valid");
        assert!(b.dataplane().live_ring(0).iter().all(|id| *id == 0));
        assert_eq!(b.dataplane().reals[&1].flags, REAL_F_ALIVE);
    }

    #[test]
    fn real_without_mac_stays_out_of_ring_and_reals() {
        let mut b = probe_balancer();
        let spec = vip("tcp/10.0.0.100:80");
        b.apply(vec![
            Change::AddVip {
                spec,
                flags: VipFlags::default(),
            },
            add_real(spec, "10.0.0.11", 1, Some(mac(11))),
            add_real(spec, "10.0.0.12", 1, None),
        ])
        .expect("valid");
        assert_eq!(b.real_id(&spec, ip("10.0.0.12")), Some(2));
        assert!(!b.dataplane().fake.reals.contains_key(&2));
        assert!(!b.dataplane().fake.live_ring(0).contains(&2));
        b.dataplane_mut().take_log();

        b.set_mac(None, ip("10.0.0.12"), Some(mac(12)))
            .expect("valid");
        assert_eq!(
            b.dataplane_mut().take_log(),
            ["REALS2+", "RING0:g1", "META0:g1"]
        );
        assert_eq!(b.dataplane().fake.reals[&2].mac, mac(12));
        assert!(b.dataplane().fake.live_ring(0).contains(&2));

        // Losing the MAC: out of the ring first, then the entry is cleared.
        b.set_mac(Some(spec), ip("10.0.0.12"), None).expect("valid");
        assert_eq!(
            b.dataplane_mut().take_log(),
            ["RING0:g0", "META0:g0", "REALS2-"]
        );
        assert_eq!(b.real_id(&spec, ip("10.0.0.12")), Some(2));
    }

    #[test]
    fn set_mac_without_vip_reaches_every_vip_with_that_real() {
        let (mut b, _) = balancer();
        let web = vip("tcp/10.0.0.100:80");
        let dns = vip("udp/10.0.0.100:53");
        b.apply(vec![
            Change::AddVip {
                spec: web,
                flags: VipFlags::default(),
            },
            Change::AddVip {
                spec: dns,
                flags: VipFlags::default(),
            },
            add_real(web, "10.0.0.11", 1, None),
            add_real(dns, "10.0.0.11", 1, None),
        ])
        .expect("valid");
        b.set_mac(None, ip("10.0.0.11"), Some(mac(11)))
            .expect("valid");
        for spec in [web, dns] {
            let id = b.real_id(&spec, ip("10.0.0.11")).expect("real");
            assert_eq!(b.dataplane().reals[&id].mac, mac(11));
        }
        let err = b.set_mac(None, ip("10.0.0.99"), Some(mac(1))).unwrap_err();
        assert!(matches!(
            validation(err).1,
            ValidationError::UnknownReal { vip: None, .. }
        ));
    }

    #[test]
    fn freed_real_id_is_quarantined_then_reused() {
        let (mut b, clock) = balancer();
        let spec = vip("tcp/10.0.0.100:80");
        b.apply(three_reals(spec)).expect("valid");
        b.del_real(spec, ip("10.0.0.12")).expect("valid");
        assert_eq!(
            b.snapshot().quarantined,
            vec![QuarantinedId {
                id: 2,
                remaining: QUARANTINE
            }]
        );
        b.add_real(spec, ip("10.0.0.14"), 1, Some(mac(14)))
            .expect("valid");
        assert_eq!(b.real_id(&spec, ip("10.0.0.14")), Some(4));
        clock.advance(QUARANTINE - Duration::from_secs(1));
        b.add_real(spec, ip("10.0.0.15"), 1, Some(mac(15)))
            .expect("valid");
        assert_eq!(b.real_id(&spec, ip("10.0.0.15")), Some(5));
        clock.advance(Duration::from_secs(1));
        b.add_real(spec, ip("10.0.0.16"), 1, Some(mac(16)))
            .expect("valid");
        assert_eq!(b.real_id(&spec, ip("10.0.0.16")), Some(2));
        assert!(b.snapshot().quarantined.is_empty());
        // Re-adding a removed address is a new real: new id, the old one quarantined.
        b.apply(vec![
            Change::DelReal {
                vip: spec,
                addr: ip("10.0.0.11"),
            },
            add_real(spec, "10.0.0.11", 1, Some(mac(11))),
        ])
        .expect("valid");
        assert_eq!(b.real_id(&spec, ip("10.0.0.11")), Some(6));
        assert_eq!(b.snapshot().quarantined[0].id, 1);
    }

    #[test]
    fn vip_ids_are_lowest_free_and_reused_by_the_next_batch() {
        let (mut b, _) = balancer();
        let a = vip("tcp/10.0.0.100:80");
        let c = vip("tcp/10.0.0.102:80");
        b.apply(vec![
            Change::AddVip {
                spec: c,
                flags: VipFlags::default(),
            },
            Change::AddVip {
                spec: a,
                flags: VipFlags::default(),
            },
        ])
        .expect("valid");
        // Ids follow VipSpec order, not the order of the changes.
        assert_eq!((b.vip_id(&a), b.vip_id(&c)), (Some(0), Some(1)));
        // Deleting and re-adding in one batch: a new id, VIPS switched in one write.
        b.apply(vec![
            Change::DelVip { spec: a },
            Change::AddVip {
                spec: a,
                flags: VipFlags::default(),
            },
        ])
        .expect("valid");
        assert_eq!(b.vip_id(&a), Some(2));
        assert_eq!(b.dataplane().vips[&a.key()], 2);
        assert_eq!(b.dataplane().vip_meta[&0], VipMeta::default());
        // Id 0 is free again for the next batch.
        let d = vip("udp/10.0.0.103:53");
        b.add_vip(d, VipFlags::default()).expect("valid");
        assert_eq!(b.vip_id(&d), Some(0));
        assert_eq!(b.dataplane().vip_meta[&0].in_use, 1);
    }

    // ---- whole-batch validation and failures ----

    #[test]
    fn rejected_apply_changes_nothing() {
        let (mut b, _) = balancer();
        let spec = vip("tcp/10.0.0.100:80");
        b.apply(three_reals(spec)).expect("valid");
        let state = b.snapshot();
        let maps = visible(b.dataplane());
        let (writes, ring_writes) = (b.dataplane().writes, b.dataplane().ring_writes);
        let other = vip("tcp/10.0.0.101:80");
        let err = b
            .apply(vec![
                add_real(spec, "10.0.0.14", 1, Some(mac(14))),
                Change::SetWeight {
                    vip: spec,
                    addr: ip("10.0.0.11"),
                    weight: 5,
                },
                Change::AddVip {
                    spec: other,
                    flags: VipFlags::default(),
                },
                add_real(vip("tcp/10.0.0.102:80"), "10.0.0.21", 1, None),
            ])
            .unwrap_err();
        let message = err.to_string();
        let (change, source) = validation(err);
        assert_eq!(change, Some(3));
        assert!(matches!(source, ValidationError::UnknownVip { .. }));
        assert_eq!(source.field(), "vip");
        assert!(message.contains("changes[3]"), "{message}");
        assert_eq!(b.snapshot(), state);
        assert_eq!(visible(b.dataplane()), maps);
        assert_eq!(b.dataplane().writes, writes);
        assert_eq!(b.dataplane().ring_writes, ring_writes);
    }

    #[test]
    fn validation_errors_name_field_and_reason() {
        let (mut b, _) = balancer();
        let v4vip = vip("tcp/10.0.0.100:80");
        let v6vip = vip("tcp/[2001:db8::100]:443");
        b.apply(vec![
            Change::AddVip {
                spec: v4vip,
                flags: VipFlags::default(),
            },
            Change::AddVip {
                spec: v6vip,
                flags: VipFlags::default(),
            },
            add_real(v4vip, "10.0.0.11", 1, Some(mac(11))),
            add_real(v6vip, "2001:db8::11", 1, Some(mac(11))),
        ])
        .expect("valid");
        assert!(b
            .live_ring(&v6vip)
            .expect("read")
            .expect("vip")
            .contains(&2));

        let reject =
            |b: &mut TestBalancer, change: Change| validation(b.apply(vec![change]).unwrap_err()).1;
        let e = reject(&mut b, add_real(v6vip, "10.0.0.12", 1, None));
        assert!(matches!(e, ValidationError::FamilyMismatch { .. }), "{e}");
        assert_eq!(e.field(), "real");
        let e = reject(&mut b, add_real(v4vip, "2001:db8::12", 1, None));
        assert!(matches!(e, ValidationError::FamilyMismatch { .. }), "{e}");
        let e = reject(&mut b, add_real(v6vip, "::ffff:10.0.0.12", 1, None));
        assert!(matches!(e, ValidationError::FamilyMismatch { .. }), "{e}");
        let e = reject(
            &mut b,
            Change::AddVip {
                spec: vip("tcp/[::ffff:10.0.0.100]:80"),
                flags: VipFlags::default(),
            },
        );
        assert!(matches!(e, ValidationError::DuplicateVip { .. }), "{e}");
        let e = reject(&mut b, add_real(v4vip, "10.0.0.11", 1, None));
        assert!(matches!(e, ValidationError::DuplicateReal { .. }), "{e}");
        let e = reject(&mut b, add_real(v4vip, "10.0.0.12", MAX_WEIGHT + 1, None));
        assert!(matches!(e, ValidationError::WeightTooLarge { .. }), "{e}");
        assert_eq!(e.field(), "weight");
        let e = reject(
            &mut b,
            Change::SetWeight {
                vip: v4vip,
                addr: ip("10.0.0.11"),
                weight: u32::MAX,
            },
        );
        assert!(matches!(e, ValidationError::WeightTooLarge { .. }), "{e}");
        assert!(b.set_weight(v4vip, ip("10.0.0.11"), MAX_WEIGHT).is_ok());
        let e = reject(&mut b, add_real(v4vip, "10.0.0.12", 1, Some([0xff; 6])));
        assert!(matches!(e, ValidationError::InvalidMac { .. }), "{e}");
        assert_eq!(e.field(), "mac");
        let e = reject(&mut b, add_real(v4vip, "10.0.0.12", 1, Some([0; 6])));
        assert!(matches!(e, ValidationError::InvalidMac { .. }), "{e}");
        let e = reject(&mut b, add_real(v4vip, "0.0.0.0", 1, None));
        assert!(
            matches!(e, ValidationError::InvalidAddress { field: "real", .. }),
            "{e}"
        );
        let e = reject(
            &mut b,
            Change::AddVip {
                spec: vip("udp/224.0.0.1:53"),
                flags: VipFlags::default(),
            },
        );
        assert!(
            matches!(e, ValidationError::InvalidAddress { field: "vip", .. }),
            "{e}"
        );
        let e = reject(
            &mut b,
            Change::DelReal {
                vip: v4vip,
                addr: ip("10.0.0.99"),
            },
        );
        assert!(matches!(e, ValidationError::UnknownReal { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            "real 10.0.0.99 is not in VIP tcp/10.0.0.100:80"
        );
        let e = reject(
            &mut b,
            Change::SetFlags {
                vip: vip("tcp/10.0.0.1:1"),
                flags: VipFlags::default(),
            },
        );
        assert!(matches!(e, ValidationError::UnknownVip { .. }), "{e}");
    }

    #[test]
    fn limits_are_enforced() {
        let (mut b, _) = balancer_with(Limits {
            max_vips: 2,
            max_reals: 4, // ids 1..=3
            ring_size: M,
        });
        let specs = [
            vip("tcp/10.0.0.100:80"),
            vip("tcp/10.0.0.101:80"),
            vip("tcp/10.0.0.102:80"),
        ];
        let add = |spec| Change::AddVip {
            spec,
            flags: VipFlags::default(),
        };
        let (change, e) = validation(
            b.apply(specs.iter().map(|s| add(*s)).collect())
                .unwrap_err(),
        );
        assert_eq!(change, None);
        assert!(
            matches!(e, ValidationError::TooManyVips { limit: 2, .. }),
            "{e}"
        );
        assert!(b.snapshot().vips.is_empty());
        assert!(b.dataplane().vips.is_empty());

        b.apply(vec![add(specs[0]), add(specs[1])]).expect("valid");
        let reals: Vec<Change> = ["10.0.0.11", "10.0.0.12", "10.0.0.13", "10.0.0.14"]
            .iter()
            .map(|a| add_real(specs[0], a, 1, Some(mac(1))))
            .collect();
        let (_, e) = validation(b.apply(reals.clone()).unwrap_err());
        assert!(
            matches!(e, ValidationError::TooManyReals { limit: 3, .. }),
            "{e}"
        );
        assert!(b.dataplane().reals.is_empty());
        b.apply(reals[..3].to_vec()).expect("valid");
        // A freed id in quarantine is not free.
        b.del_real(specs[0], ip("10.0.0.11")).expect("valid");
        let (_, e) = validation(b.apply(vec![reals[3].clone()]).unwrap_err());
        assert!(
            matches!(e, ValidationError::TooManyReals { quarantined: 1, .. }),
            "{e}"
        );
    }

    #[test]
    fn ring_larger_than_slots_is_rejected_with_maglev_reason() {
        let (mut b, _) = balancer_with(Limits {
            max_vips: 2,
            max_reals: 32,
            ring_size: 3,
        });
        let spec = vip("tcp/10.0.0.100:80");
        let mut changes = vec![Change::AddVip {
            spec,
            flags: VipFlags::default(),
        }];
        for n in 11..15u8 {
            changes.push(add_real(spec, &format!("10.0.0.{n}"), 1, Some(mac(n))));
        }
        let (_, e) = validation(b.apply(changes.clone()).unwrap_err());
        assert!(matches!(e, ValidationError::Ring { .. }), "{e}");
        assert!(b.dataplane().vips.is_empty());
        // Fewer reals than slots: accepted, with Maglev's spread warning.
        changes.truncate(3);
        let report = b.apply(changes).expect("valid");
        assert!(report.vips[0].spread_warning.is_some());
    }

    #[test]
    fn failed_write_rolls_back_at_every_point() {
        let spec = vip("tcp/10.0.0.100:80");
        let other = vip("udp/10.0.0.100:0");
        let setup = || {
            let mut b = probe_balancer();
            b.apply(three_reals(spec)).expect("valid");
            b
        };
        let batch = || {
            vec![
                Change::DelReal {
                    vip: spec,
                    addr: ip("10.0.0.12"),
                },
                add_real(spec, "10.0.0.14", 1, Some(mac(14))),
                Change::SetFlags {
                    vip: spec,
                    flags: VipFlags {
                        no_src_port: true,
                        no_conntrack: false,
                    },
                },
                Change::AddVip {
                    spec: other,
                    flags: VipFlags::default(),
                },
                add_real(other, "10.0.0.21", 1, Some(mac(21))),
            ]
        };
        let mut b = setup();
        b.dataplane_mut().take_log();
        let writes = b.apply(batch()).expect("valid").map_writes;
        assert_eq!(b.dataplane_mut().take_log().len(), writes);
        let applied = b.snapshot();
        assert!(writes >= 8);

        for fail_at in 0..writes {
            let mut b = setup();
            let state = b.snapshot();
            let maps = visible(&b.dataplane().fake);
            b.dataplane_mut().take_log();
            b.dataplane_mut().fail_at = Some(fail_at);
            let err = b.apply(batch()).unwrap_err();
            match &err {
                BalancerError::Write {
                    rollback: Rollback::Restored { writes },
                    ..
                } => assert!(*writes <= fail_at),
                other => panic!("write {fail_at}: {other}"),
            }
            assert_eq!(b.snapshot(), state, "write {fail_at}");
            assert_eq!(visible(&b.dataplane().fake), maps, "write {fail_at}");
            assert!(!b.needs_repair());
            // The same batch succeeds afterwards and gives what it gives without a failure.
            b.apply(batch()).expect("valid");
            assert_eq!(b.snapshot(), applied, "write {fail_at}");
        }
    }

    #[test]
    fn failed_write_with_failed_rollback_is_repaired() {
        let (mut b, _) = balancer();
        let spec = vip("tcp/10.0.0.100:80");
        b.apply(three_reals(spec)).expect("valid");
        let state = b.snapshot();
        let maps = visible(b.dataplane());
        // The fake keeps failing once it starts: the rollback fails too.
        b.dataplane_mut().fail_after = Some(3);
        let err = b
            .apply(vec![
                Change::DelReal {
                    vip: spec,
                    addr: ip("10.0.0.12"),
                },
                add_real(spec, "10.0.0.14", 1, Some(mac(14))),
            ])
            .unwrap_err();
        assert!(
            matches!(
                err,
                BalancerError::Write {
                    rollback: Rollback::Incomplete { pending: 2, .. },
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("repair"), "{err}");
        assert_eq!(b.snapshot(), state);
        assert!(b.needs_repair());
        assert_ne!(visible(b.dataplane()), maps);
        // Still failing: apply refuses to go further.
        assert!(matches!(
            b.add_vip(vip("tcp/10.0.0.101:80"), VipFlags::default()),
            Err(BalancerError::Repair { pending: 2, .. })
        ));
        b.dataplane_mut().fail_after = None;
        assert_eq!(b.repair().expect("repaired"), 2);
        assert_eq!(visible(b.dataplane()), maps);
        assert_eq!(b.snapshot(), state);
    }

    // ---- restart ----

    #[test]
    fn second_balancer_over_same_maps_rewrites_no_ring() {
        let clock = ManualClock::new();
        let web = vip("tcp/10.0.0.100:80");
        let dns = vip("udp/[2001:db8::100]:53");
        let mut config = three_reals(web);
        config.extend([
            Change::AddVip {
                spec: dns,
                flags: VipFlags {
                    no_src_port: false,
                    no_conntrack: true,
                },
            },
            add_real(dns, "2001:db8::11", 1, Some(mac(11))),
            add_real(dns, "2001:db8::12", 1, Some(mac(12))),
        ]);
        let mut first =
            Balancer::with_clock(FakeDataplane::new(limits()), QUARANTINE, clock.clone());
        first.apply(config.clone()).expect("valid");
        // Move dns's live ring to generation 1, so adoption must read the right half. (The
        // removed real has the highest id: a fresh Balancer numbers the rest the same way.)
        first.del_real(dns, ip("2001:db8::12")).expect("valid");
        let state = first.snapshot();
        let fake = first.into_dataplane();
        let maps = visible(&fake);
        let ring_writes = fake.ring_writes;

        // The same final configuration, changes in another order.
        let (vips, reals): (Vec<Change>, Vec<Change>) = config
            .into_iter()
            .filter(|c| !matches!(c, Change::AddReal { addr, .. } if *addr == ip("2001:db8::12")))
            .partition(|c| matches!(c, Change::AddVip { .. }));
        let replay: Vec<Change> = vips
            .into_iter()
            .rev()
            .chain(reals.into_iter().rev())
            .collect();
        let mut second = Balancer::with_clock(fake, QUARANTINE, clock);
        let report = second.apply(replay).expect("valid");
        assert_eq!(second.dataplane().ring_writes, ring_writes);
        assert!(report
            .vips
            .iter()
            .all(|v| matches!(v.ring, RingUpdate::AlreadyLive { .. })));
        assert_eq!(report.vips.len(), 2);
        assert_eq!(visible(second.dataplane()), maps);
        let mut adopted = second.snapshot();
        adopted.quarantined = state.quarantined.clone();
        assert_eq!(adopted, state);
        assert_eq!(second.snapshot().vips[1].generation, 1);
    }

    /// After removals the ids have holes a fresh numbering would not reproduce; `restore`
    /// gives every real its id back (tracked flows name it), rewrites no live ring, and keeps
    /// the quarantine of freed ids.
    #[test]
    fn restore_keeps_ids_with_holes_and_rewrites_no_ring() {
        let clock = ManualClock::new();
        let web = vip("tcp/10.0.0.100:80");
        let mut first =
            Balancer::with_clock(FakeDataplane::new(limits()), QUARANTINE, clock.clone());
        first.apply(three_reals(web)).expect("valid");
        first.del_real(web, ip("10.0.0.11")).expect("valid");
        first
            .add_real(web, ip("10.0.0.14"), 2, Some(mac(14)))
            .expect("valid");
        let state = first.snapshot();
        let ids: Vec<u32> = state.vips[0].reals.iter().map(|r| r.id).collect();
        assert_ne!(
            ids,
            vec![1, 2, 3],
            "the scenario must leave a hole: {ids:?}"
        );
        let saved = state.restore_vips();
        let fake = first.into_dataplane();
        let maps = visible(&fake);
        let ring_writes = fake.ring_writes;

        let mut second = Balancer::with_clock(fake, QUARANTINE, clock.clone());
        let report = second
            .restore(&saved, &state.quarantined)
            .expect("restores");
        assert_eq!(
            second.dataplane().ring_writes,
            ring_writes,
            "a ring was rewritten"
        );
        assert!(report
            .vips
            .iter()
            .all(|v| matches!(v.ring, RingUpdate::AlreadyLive { .. })));
        assert_eq!(visible(second.dataplane()), maps);
        assert_eq!(second.snapshot(), state);
        // The freed id stays quarantined: a new real does not get it.
        let freed = state.quarantined[0].id;
        second
            .add_real(web, ip("10.0.0.15"), 1, Some(mac(15)))
            .expect("valid");
        assert_ne!(second.real_id(&web, ip("10.0.0.15")), Some(freed));

        // Duplicate ids are refused as a whole.
        let mut dup = saved.clone();
        dup[0].reals[1].id = dup[0].reals[0].id;
        let mut third = Balancer::with_clock(FakeDataplane::new(limits()), QUARANTINE, clock);
        assert!(third.restore(&dup, &[]).is_err());
        assert!(third.snapshot().vips.is_empty());
    }

    /// A write failing during `restore` must not undo anything: the adopted maps hold the
    /// live config, and an undo computed from the empty pre-replay state would delete it.
    #[test]
    fn failed_restore_leaves_adopted_maps_forwarding() {
        let clock = ManualClock::new();
        let web = vip("tcp/10.0.0.100:80");
        let mut first = Balancer::with_clock(Probe::new(limits()), QUARANTINE, clock.clone());
        first.apply(three_reals(web)).expect("valid");
        let state = first.snapshot();
        let saved = state.restore_vips();
        let mut probe = first.into_dataplane();
        let before = visible(&probe.fake);
        probe.take_log();
        // The third write of the replay fails once; undo writes, if any, would succeed.
        probe.fail_at = Some(2);
        let mut second = Balancer::with_clock(probe, QUARANTINE, clock);
        assert!(
            second.restore(&saved, &[]).is_err(),
            "the third write fails"
        );
        let probe = second.into_dataplane();
        assert_eq!(
            visible(&probe.fake),
            before,
            "the live maps were changed by a failed replay"
        );
    }

    // ---- flags and VIP_ADDRS ----

    #[test]
    fn flags_reach_vip_meta() {
        let (mut b, _) = balancer();
        let spec = vip("tcp/10.0.0.100:80");
        let flags = VipFlags {
            no_src_port: true,
            no_conntrack: false,
        };
        b.add_vip(spec, flags).expect("valid");
        assert_eq!(b.dataplane().vip_meta[&0].flags, VIP_F_NO_SRC_PORT);
        let rings = b.dataplane().ring_writes;
        let report = b
            .set_flags(
                spec,
                VipFlags {
                    no_src_port: true,
                    no_conntrack: true,
                },
            )
            .expect("valid");
        assert_eq!(b.dataplane().vip_meta[&0].flags, VIP_F_ALL);
        assert_eq!(b.dataplane().vip_meta[&0].in_use, 1);
        assert!(report.vips.is_empty());
        assert_eq!(report.map_writes, 1);
        assert_eq!(b.dataplane().ring_writes, rings);
        assert_eq!(b.snapshot().vips[0].flags.bits(), VIP_F_ALL);
    }

    #[test]
    fn port0_vip_sets_vip_addrs_bit() {
        let (mut b, _) = balancer();
        let addr = v4("10.0.0.100");
        let value = |b: &TestBalancer| b.dataplane().vip_addrs.get(&addr).copied();
        let all_udp = vip("udp/10.0.0.100:0");
        let web = vip("tcp/10.0.0.100:80");
        let all_tcp = vip("tcp/10.0.0.100:0");
        b.add_vip(all_udp, VipFlags::default()).expect("valid");
        assert_eq!(
            value(&b),
            Some(VipAddrValue {
                vip_count: 1,
                port0: VIP_ADDR_PORT0_UDP
            })
        );
        assert_eq!(b.dataplane().vips[&all_udp.key()], 0);
        assert_eq!(all_udp.key().port_be, 0);
        b.add_vip(web, VipFlags::default()).expect("valid");
        assert_eq!(
            value(&b),
            Some(VipAddrValue {
                vip_count: 2,
                port0: VIP_ADDR_PORT0_UDP
            })
        );
        b.add_vip(all_tcp, VipFlags::default()).expect("valid");
        assert_eq!(
            value(&b),
            Some(VipAddrValue {
                vip_count: 3,
                port0: VIP_ADDR_PORT0_UDP | VIP_ADDR_PORT0_TCP
            })
        );
        b.del_vip(all_udp).expect("valid");
        assert_eq!(
            value(&b),
            Some(VipAddrValue {
                vip_count: 2,
                port0: VIP_ADDR_PORT0_TCP
            })
        );
        b.apply(vec![
            Change::DelVip { spec: web },
            Change::DelVip { spec: all_tcp },
        ])
        .expect("valid");
        assert_eq!(value(&b), None);
        assert!(b.dataplane().vips.is_empty());
    }

    #[test]
    fn snapshot_lists_the_desired_state() {
        let (mut b, _) = balancer();
        let spec = vip("tcp/10.0.0.100:80");
        b.apply(three_reals(spec)).expect("valid");
        b.add_real(spec, ip("10.0.0.14"), 0, None).expect("valid");
        let snap = b.snapshot();
        assert_eq!(snap.vips.len(), 1);
        let v = &snap.vips[0];
        assert_eq!(
            (v.spec, v.id, v.flags, v.generation),
            (spec, 0, VipFlags::default(), 0)
        );
        let reals: Vec<(IpAddr, u32, u32, Option<Mac>, bool)> = v
            .reals
            .iter()
            .map(|r| (r.addr, r.id, r.weight, r.mac, r.in_ring))
            .collect();
        assert_eq!(
            reals,
            vec![
                (ip("10.0.0.11"), 1, 1, Some(mac(11)), true),
                (ip("10.0.0.12"), 2, 2, Some(mac(12)), true),
                (ip("10.0.0.13"), 3, 1, Some(mac(13)), true),
                (ip("10.0.0.14"), 4, 0, None, false),
            ]
        );
    }
}
