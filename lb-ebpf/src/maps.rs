//! Every map of the balancer. Types, names and limits come from lb-common; the sizes declared
//! here are the defaults and the loader overrides them (`EbpfLoader::map_max_entries`).

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, DevMapHash, HashMap, PerCpuArray, RingBuf},
};
use lb_common::{
    ct::{self, CtBucket, CtKeys, CtLogEntry},
    revnat_entries, ring_elems,
    trace::{TraceConf, TRACE_EVENTS_BYTES},
    Conf, GlobalStats, Layout, ProbeConf, Real, RealStats, RevNat, RevNatKey, RingElem, TunnelConf,
    TxPort, VipAddrValue, VipFilter, VipKey, VipMeta, VipStats, DEFAULT_CONNTRACK_SIZE,
    DEFAULT_MAX_REALS, DEFAULT_MAX_VIPS, DEFAULT_RING_SIZE, MAX_TX_PORTS,
};

/// (VIP address, port, protocol) → vip_id: the one lookup every TCP/UDP packet pays.
#[map]
pub static VIPS: HashMap<VipKey, u32> = HashMap::with_max_entries(DEFAULT_MAX_VIPS, 0);

/// VIP address → how many VIPs use it: only asked for fragments, to drop those sent to a VIP
/// and pass the host's own.
#[map]
pub static VIP_ADDRS: HashMap<[u8; 16], VipAddrValue> =
    HashMap::with_max_entries(DEFAULT_MAX_VIPS, 0);

/// A bit per VIP address hash (lb-common's `vip_filter_bit`), set by the daemon before the
/// address's first VIP and cleared after its last: a clear bit answers "no VIP" for the
/// host's own traffic without a hash lookup.
#[map]
pub static VIP_FILTER: Array<VipFilter> = Array::with_max_entries(1, 0);

/// vip_id → flags and the live ring generation.
#[map]
pub static VIP_META: Array<VipMeta> = Array::with_max_entries(DEFAULT_MAX_VIPS, 0);

/// [vip_id][generation][slot] → real_id, two slots per element. Mmapable: the daemon writes
/// whole rings at memory speed into the idle generation, then flips VIP_META.generation.
#[map]
pub static RING: Array<RingElem> = Array::with_max_entries(
    ring_elems(DEFAULT_MAX_VIPS, DEFAULT_RING_SIZE) as u32,
    BPF_F_MMAPABLE,
);

/// real_id → where to send (MAC for direct routing), alive flag and owning VIP.
#[map]
pub static REALS: Array<Real> = Array::with_max_entries(DEFAULT_MAX_REALS, 0);

/// Buckets of tracked flows (lb-common's `ct`): keeps established flows on their real when the
/// ring changes. One table for all CPUs (a flow's packets may come in on any), mmapped by the
/// daemon, which walks it at memory speed.
#[map]
pub static CONNTRACK: Array<CtBucket> =
    Array::with_max_entries(ct::buckets_for(DEFAULT_CONNTRACK_SIZE), BPF_F_MMAPABLE);

/// The client side of each way's flow, written with the way, read only by the daemon.
#[map]
pub static CONNTRACK_KEYS: Array<CtKeys> =
    Array::with_max_entries(ct::buckets_for(DEFAULT_CONNTRACK_SIZE), BPF_F_MMAPABLE);

/// New flows' tuples, `ct::CT_LOG_SLOTS` per CPU (sized for the possible CPUs at load), for
/// the daemon to file into `CONNTRACK_KEYS`.
#[map]
pub static CT_LOG: Array<CtLogEntry> = Array::with_max_entries(ct::CT_LOG_SLOTS, BPF_F_MMAPABLE);

/// Entries each CPU has logged, at `cpu * ct::CT_LOG_HEAD_STRIDE`.
#[map]
pub static CT_LOG_HEADS: Array<u64> =
    Array::with_max_entries(ct::CT_LOG_HEAD_STRIDE, BPF_F_MMAPABLE);

/// NAT mode's way back: a NAT real's (address, port, protocol) → its VIP's address and port
/// (lb-common's `RevNat`), and each NAT real address (protocol 0). Looked up only while
/// `CONF.revnat` is non-zero.
#[map]
pub static REVNAT: HashMap<RevNatKey, RevNat> =
    HashMap::with_max_entries(revnat_entries(DEFAULT_MAX_REALS), 0);

/// A bit per NAT real address hash (lb-common's `vip_filter_bit`), set by the daemon before the
/// address's first `REVNAT` entry and cleared after its last: a clear bit answers "no NAT real"
/// for every other packet to no VIP without a `REVNAT` lookup.
#[map]
pub static NAT_FILTER: Array<VipFilter> = Array::with_max_entries(1, 0);

/// Per-VIP counters, one per-CPU value per vip_id.
#[map]
pub static STATS_VIP: PerCpuArray<VipStats> = PerCpuArray::with_max_entries(DEFAULT_MAX_VIPS, 0);

/// Per-real counters, one per-CPU value per real_id.
#[map]
pub static STATS_REAL: PerCpuArray<RealStats> = PerCpuArray::with_max_entries(DEFAULT_MAX_REALS, 0);

/// Why packets were not forwarded, all reasons in the one value at index 0.
#[map]
pub static STATS_GLOBAL: PerCpuArray<GlobalStats> = PerCpuArray::with_max_entries(1, 0);

/// The layout version and sizes the maps were created with; checked before adopting pins.
#[map]
pub static LAYOUT: Array<Layout> = Array::with_max_entries(1, 0);

/// Run-time switches (port-0 VIP counts).
#[map]
pub static CONF: Array<Conf> = Array::with_max_entries(1, 0);

/// How `target = "vip"` health probes go out and their replies come back (lb-common).
#[map]
pub static PROBE: Array<ProbeConf> = Array::with_max_entries(1, 0);

/// Per CPU: the start (jiffies) of the current second and the too-big answers sent in it.
/// Not pinned: a new program starts its count afresh.
#[map]
pub static ICMP_RATE: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// Tunnel mode's outer headers: sources, encapsulation, MTU (lb-common).
#[map]
pub static TUNNEL: Array<TunnelConf> = Array::with_max_entries(1, 0);

/// Ifindex → interface, for tunnel reals whose route leaves by another interface than the
/// balancer's (`Real::egress`; written before a real names it).
#[map]
pub static TX_PORTS: DevMapHash = DevMapHash::with_max_entries(MAX_TX_PORTS, 0);

/// Ifindex → that interface's MAC and MTU.
#[map]
pub static EGRESS: HashMap<u32, TxPort> = HashMap::with_max_entries(MAX_TX_PORTS, 0);

/// Whether `xlb trace` runs, and for which VIP (lb-common's `trace`). Not pinned.
#[map]
pub static TRACE: Array<TraceConf> = Array::with_max_entries(1, 0);

/// The traced decisions, read by the daemon.
#[map]
pub static TRACE_EVENTS: RingBuf = RingBuf::with_byte_size(TRACE_EVENTS_BYTES, 0);

/// Per CPU: decisions the full ring buffer had no room for.
#[map]
pub static TRACE_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
