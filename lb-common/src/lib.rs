//! The contract between the xlb XDP program and its userspace: every map key and value, every
//! flag, limit and map name, and the one flow-hash function. Compiled for both sides so that the
//! kernel and the daemon cannot disagree.
//!
//! Rules for everything in here: `#[repr(C)]`, fixed-width integers and byte arrays only,
//! explicit padding fields (always zeroed), and a compile-time size assert per type. No `bool`,
//! `enum`, `Option` or `usize`: a bad discriminant read from a map is undefined behaviour.
//!
//! Byte order: addresses are kept as the 16 bytes found in the packet (IPv4 as v4-mapped IPv6,
//! `::ffff:a.b.c.d`); ports are kept as the two bytes found in the packet, read as a native
//! `u16` (suffix `_be`: the value is network order). The kernel never swaps bytes.
#![cfg_attr(not(test), no_std)]

pub mod counters;
pub mod ct;
pub mod hash;
pub mod trace;

pub use counters::{
    counter, Action, Counter, CounterInfo, GlobalStats, GLOBAL_COUNTERS, GLOBAL_STATS_SLOTS,
};
pub use hash::{flow_hash, flow_hash64, hash_addr, ring_slot};

/// Bumped whenever any type, map or its meaning changes. A daemon refuses to adopt pinned maps
/// whose `LAYOUT` holds another version.
pub const LAYOUT_VERSION: u32 = 8;

// ---- map and global names (the ELF symbols in lb-ebpf) -------------------------------------
pub const MAP_VIPS: &str = "VIPS";
pub const MAP_VIP_ADDRS: &str = "VIP_ADDRS";
/// A bit per hash of every VIP address (`VipFilter`): a packet whose destination's bit is clear
/// is no VIP's, and costs no hash lookup.
pub const MAP_VIP_FILTER: &str = "VIP_FILTER";
pub const MAP_VIP_META: &str = "VIP_META";
pub const MAP_RING: &str = "RING";
pub const MAP_REALS: &str = "REALS";
pub const MAP_CONNTRACK: &str = "CONNTRACK";
/// The clients and ports of the connection table's ways (`ct`), for walks.
pub const MAP_CONNTRACK_KEYS: &str = "CONNTRACK_KEYS";
/// New flows' tuples, logged per CPU by the kernel and filed into `CONNTRACK_KEYS` by the
/// daemon (`ct::CtLogEntry`), and each CPU's count of them.
pub const MAP_CT_LOG: &str = "CT_LOG";
pub const MAP_CT_LOG_HEADS: &str = "CT_LOG_HEADS";
pub const MAP_STATS_VIP: &str = "STATS_VIP";
pub const MAP_STATS_REAL: &str = "STATS_REAL";
pub const MAP_STATS_GLOBAL: &str = "STATS_GLOBAL";
pub const MAP_LAYOUT: &str = "LAYOUT";
pub const MAP_CONF: &str = "CONF";
/// The way back of `target = "vip"` health probes (not pinned: each daemon sets its own).
pub const MAP_PROBE: &str = "PROBE";
/// How tunnel mode builds its outer headers (`TunnelConf`).
pub const MAP_TUNNEL: &str = "TUNNEL";
/// Tunnel reals reached out of another interface: its ifindex → itself (a devmap, for
/// `XDP_REDIRECT`).
pub const MAP_TX_PORTS: &str = "TX_PORTS";
/// Ifindex → that interface's MAC and MTU (`TxPort`), read only for reals with an `egress`.
pub const MAP_EGRESS: &str = "EGRESS";
/// NAT mode's way back: a real's (address, port, protocol) → the VIP it serves (`RevNat`).
pub const MAP_REVNAT: &str = "REVNAT";
/// A bit per hash of every NAT real's address (`VipFilter`, `vip_filter_bit`): a packet whose
/// source's bit is clear is no NAT real's reply, and costs no `REVNAT` lookup.
pub const MAP_NAT_FILTER: &str = "NAT_FILTER";
pub const MAP_BENCH_FRAME: &str = "BENCH_FRAME";
pub const MAP_BENCH_PROGS: &str = "BENCH_PROGS";
pub const MAP_BENCH_SINK: &str = "BENCH_SINK";
/// Every map the balancer program uses (the bench maps are separate).
/// Pinned like the maps (a program array's entries go when no user holds it): the program the
/// balancer tail-calls for NAT rewrites, and what it tells that program, shared by an old and a
/// new program while one replaces the other.
pub const MAP_NAT_SCRATCH: &str = "NAT_SCRATCH";
pub const BALANCER_MAPS: [&str; 22] = [
    MAP_VIPS,
    MAP_VIP_ADDRS,
    MAP_VIP_FILTER,
    MAP_VIP_META,
    MAP_RING,
    MAP_REALS,
    MAP_CONNTRACK,
    MAP_CONNTRACK_KEYS,
    MAP_CT_LOG,
    MAP_CT_LOG_HEADS,
    MAP_STATS_VIP,
    MAP_STATS_REAL,
    MAP_STATS_GLOBAL,
    MAP_LAYOUT,
    MAP_CONF,
    MAP_TUNNEL,
    MAP_TX_PORTS,
    MAP_EGRESS,
    MAP_REVNAT,
    MAP_NAT_FILTER,
    MAP_NAT_PROGS,
    MAP_NAT_SCRATCH,
];

/// Read-only globals set at load time.
pub const GLOBAL_RING_SIZE: &str = "RING_SIZE";
pub const GLOBAL_HASH_SEED: &str = "HASH_SEED";
/// Idle times of tracked flows, in stamp units (`ct`: 2^CT_TIME_SHIFT jiffies).
pub const GLOBAL_CT_TCP_IDLE: &str = "CT_TCP_IDLE";
pub const GLOBAL_CT_UDP_IDLE: &str = "CT_UDP_IDLE";
/// Idle time of a closing (FIN or RST seen) or embryonic (SYN only) flow, in stamp units.
pub const GLOBAL_CT_CLOSING_IDLE: &str = "CT_CLOSING_IDLE";
/// log2 of the jiffies in a stamp unit (`ct::time_shift`).
pub const GLOBAL_CT_TIME_SHIFT: &str = "CT_TIME_SHIFT";
/// Buckets of `CONNTRACK` (`ct::buckets_for(--conntrack-size)`).
pub const GLOBAL_CT_BUCKETS: &str = "CT_BUCKETS";
/// One second in jiffies (the ICMP answers' rate limit).
pub const GLOBAL_CT_REFRESH: &str = "CT_REFRESH";

pub const PROG_BALANCER: &str = "xlb";
/// Sends `target = "vip"` health probes from the daemon's probe namespace to their real.
pub const PROG_PROBE: &str = "xlb_probe";
pub const PROG_BENCH: &str = "xlb_bench";
pub const PROG_BENCH_BASELINE: &str = "xlb_bench_baseline";
pub const PROG_BENCH_SINK: &str = "xlb_bench_sink";
pub const PROG_PASS: &str = "xlb_pass";
/// NAT mode's rewrites, tail-called by the balancer through `NAT_PROGS` (index 0: to a real,
/// 1: a real's reply, 2: an ICMP error about a NAT flow, either way).
pub const PROG_NAT: &str = "xlb_nat";
pub const PROG_NAT_REPLY: &str = "xlb_nat_reply";
pub const PROG_NAT_ICMP: &str = "xlb_nat_icmp";
/// `NAT_PROGS`' entries: the programs above, at their index.
pub const NAT_PROGS: [&str; 3] = [PROG_NAT, PROG_NAT_REPLY, PROG_NAT_ICMP];
pub const MAP_NAT_PROGS: &str = "NAT_PROGS";
pub const PROG_CLOCK: &str = "xlb_clock";

// ---- limits -------------------------------------------------------------------------------
pub const DEFAULT_MAX_VIPS: u32 = 128;
pub const DEFAULT_MAX_REALS: u32 = 4096;
/// `REVNAT` entries for `max_reals` reals: one per NAT real, one per address at most.
#[inline(always)]
pub const fn revnat_entries(max_reals: u32) -> u32 {
    max_reals.saturating_mul(2)
}
/// Interfaces other than the balancer's own that tunnel reals can be reached by.
pub const MAX_TX_PORTS: u32 = 64;
/// Maglev ring size M: a prime, so that every skip is coprime with it.
pub const DEFAULT_RING_SIZE: u32 = 65537;
/// Flows the connection table is sized for (`ct::buckets_for`).
pub const DEFAULT_CONNTRACK_SIZE: u32 = 1 << 20;
pub const DEFAULT_CT_TCP_IDLE_SECS: u64 = 900;
pub const DEFAULT_CT_UDP_IDLE_SECS: u64 = 300;
/// How long a closing flow stays tracked after its last packet: its last segments (the
/// client's final ACK, retransmissions) still reach its real.
pub const DEFAULT_CT_CLOSING_IDLE_SECS: u64 = 10;
/// "Fragmentation needed" / "packet too big" answers each CPU sends per second, at most.
pub const DEFAULT_ICMP_TOO_BIG_RATE: u64 = 1000;
/// Two ring halves per VIP: the live one and the one being rebuilt.
pub const RING_GENERATIONS: u32 = 2;
/// Extension headers the parser walks before giving up on an IPv6 packet.
pub const MAX_IPV6_EXT_HEADERS: u32 = 4;
/// Real id 0 means "no real": an empty ring slot, an unset entry. Counted when hit.
pub const REAL_ID_UNSET: u32 = 0;

/// The kernel stores array elements at 8-byte strides, so a ring of u32 values would waste
/// half its memory: each `RING` element holds two consecutive slots.
pub type RingElem = [u32; 2];
pub const RING_SLOTS_PER_ELEM: u32 = 2;

/// `RING` elements per (VIP, generation) row.
#[inline(always)]
pub const fn ring_row_elems(ring_size: u32) -> u32 {
    ring_size.div_ceil(RING_SLOTS_PER_ELEM)
}

/// `RING` elements for the given limits.
#[inline(always)]
pub const fn ring_elems(max_vips: u32, ring_size: u32) -> u64 {
    max_vips as u64 * RING_GENERATIONS as u64 * ring_row_elems(ring_size) as u64
}

/// Index of the `RING` element holding `slot` of `[vip_id][generation]`; the slot is half
/// `slot & 1` of it.
#[inline(always)]
pub const fn ring_elem_index(vip_id: u32, generation: u32, slot: u32, ring_size: u32) -> u32 {
    (vip_id * RING_GENERATIONS + (generation & 1)) * ring_row_elems(ring_size) + slot / 2
}

/// Offset, in u32 slots, of the start of the row `[vip_id][generation]` in the mmapped
/// `RING` (elements are packed, so a row is `2 * ring_row_elems` consecutive u32s).
#[inline(always)]
pub const fn ring_row_offset(vip_id: u32, generation: u32, ring_size: u32) -> u64 {
    (vip_id as u64 * RING_GENERATIONS as u64 + (generation & 1) as u64)
        * ring_row_elems(ring_size) as u64
        * RING_SLOTS_PER_ELEM as u64
}

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

// ---- flags --------------------------------------------------------------------------------
/// Hash the flow without its source port (all connections of a client go to one real).
pub const VIP_F_NO_SRC_PORT: u32 = 1 << 0;
/// Do not track connections: every packet takes the ring's choice. Cheaper, but a ring change
/// moves established flows.
pub const VIP_F_NO_CONNTRACK: u32 = 1 << 1;
/// The flags an operator sets (the rest are the daemon's).
pub const VIP_F_ALL: u32 = VIP_F_NO_SRC_PORT | VIP_F_NO_CONNTRACK;
/// Set by the daemon while the VIP's quorum is lost and it drops new flows
/// (`on_quorum_lost = "drop"`): its ring is empty, and a new flow is counted in
/// `VipStats::quorum_drops` rather than `no_real`. Costs nothing on the forwarding path: it is
/// read only when no real was found.
pub const VIP_F_QUORUM_DROP: u32 = 1 << 16;

/// The real is in service: tracked flows naming it are forwarded. Cleared when it is removed
/// (the whole entry is zeroed then) or out of service (down with `down_flows = "move"`: the
/// MAC stays, for its `target = "vip"` health probes), so tracked flows re-pick from the ring
/// instead of following it.
pub const REAL_F_ALIVE: u16 = 1 << 0;
/// Tunnel mode: the packet is encapsulated to the real's address (the outer family is the
/// real's: `REAL_F_V6`) and sent to `mac`, the next hop's MAC. Without it: direct routing,
/// the frame goes to `mac`, the real's own.
pub const REAL_F_TUNNEL: u16 = 1 << 1;
/// The real's address is IPv6.
pub const REAL_F_V6: u16 = 1 << 2;
/// A tunnel real whose next hop is unresolved (`mac` zero): packets of its tracked flows are
/// encapsulated and passed to the host's stack, which routes them (and resolves the
/// neighbour) when IP forwarding is on. It is in no ring, so it takes no new flows.
pub const REAL_F_NEXT_HOP_PASS: u16 = 1 << 3;
/// NAT mode (LVS-NAT): the destination address becomes the real's (`addr`), the destination
/// port `Real::port_be` unless that is 0, checksums updated; the frame goes to `mac`, the next
/// hop's, as in tunnel mode (with `egress`). The real's replies come back through the balancer
/// and are rewritten to the VIP's address and port (`REVNAT`). Excludes `REAL_F_TUNNEL`.
pub const REAL_F_NAT: u16 = 1 << 4;

// ---- keys and values ----------------------------------------------------------------------

/// `VIPS` key. `port_be` 0 means every port of `addr` for `proto`. Aligned to 4 so the kernel
/// builds it with word stores (the map's hash reads it in words: byte stores there would stall
/// store-to-load forwarding).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipKey {
    pub addr: [u8; 16],
    pub port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<VipKey>() == 20);

impl VipKey {
    /// The key of the VIP a flow is sent to, built in words from the flow key's words.
    #[inline(always)]
    pub fn for_flow(w: &[u64; 5], port_be: u16) -> VipKey {
        let proto = (w[4] >> 32) & 0xFF;
        let words: [u32; 5] = [
            w[2] as u32,
            (w[2] >> 32) as u32,
            w[3] as u32,
            (w[3] >> 32) as u32,
            // Little-endian layout of (port_be: u16, proto: u8, _pad: u8).
            (port_be as u32) | ((proto as u32) << 16),
        ];
        // SAFETY: VipKey is repr(C), 20 bytes of plain integers with no invalid values.
        unsafe { core::mem::transmute::<[u32; 5], VipKey>(words) }
    }
}

/// Words of `VIP_FILTER[0]`: 2^15 bits, one 4 KiB page. With the default 512 VIP addresses at
/// most 1.6 % of the bits are set, so nearly every packet to no VIP stops at its bit.
pub const VIP_FILTER_WORDS: usize = 512;
pub type VipFilter = [u64; VIP_FILTER_WORDS];
const _: () = assert!(VIP_FILTER_WORDS * 64 == 1 << VIP_FILTER_SHIFT);
const VIP_FILTER_SHIFT: u32 = 15;

/// The `VIP_FILTER` bit of an address, given as the two little-endian words of its 16 bytes
/// (as `FlowKey::words` holds a destination: words 2 and 3). A multiplicative hash: the top
/// bits of the product depend on every bit of the address, IPv4's included (its 4 bytes are the
/// top half of the second word).
#[inline(always)]
pub const fn vip_filter_bit(w0: u64, w1: u64) -> u32 {
    let x = (w0 ^ w1.rotate_left(17)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> (64 - VIP_FILTER_SHIFT)) as u32
}

/// `vip_filter_bit` of a 16-byte address.
#[inline(always)]
pub fn vip_filter_bit_of(addr: &[u8; 16]) -> u32 {
    let mut lo = [0u8; 8];
    let mut hi = [0u8; 8];
    lo.copy_from_slice(&addr[..8]);
    hi.copy_from_slice(&addr[8..]);
    vip_filter_bit(u64::from_le_bytes(lo), u64::from_le_bytes(hi))
}

/// `VIP_META` value, indexed by vip_id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipMeta {
    pub flags: u32,
    /// Which half of the VIP's ring is live (0 or 1).
    pub generation: u32,
    /// Non-zero when the VIP is configured: a zeroed entry is an unused id.
    pub in_use: u32,
    pub _reserved: u32,
}
const _: () = assert!(core::mem::size_of::<VipMeta>() == 16);

/// `VIP_ADDRS` value: how many VIPs use an address. The kernel only asks whether the address is
/// a VIP's (to drop fragments sent to VIPs and pass everyone else's).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipAddrValue {
    pub vip_count: u32,
    /// Non-zero when a port-0 ("every port") VIP exists on this address, per protocol:
    /// bit 0 TCP, bit 1 UDP.
    pub port0: u32,
}
const _: () = assert!(core::mem::size_of::<VipAddrValue>() == 8);
pub const VIP_ADDR_PORT0_TCP: u32 = 1 << 0;
pub const VIP_ADDR_PORT0_UDP: u32 = 1 << 1;

/// `REALS` value, indexed by real_id. A real id names one real of one VIP (as ipvsadm's
/// destinations do), so removing a real from one VIP never touches another VIP's flows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Real {
    pub addr: [u8; 16],
    pub mac: [u8; 6],
    pub flags: u16,
    /// Tunnel reals: 0 to leave by the interface the packet came in on (`XDP_TX`), else the
    /// ifindex of the one the route to the real leaves by (`XDP_REDIRECT` through
    /// `TX_PORTS`, from the MAC in `EGRESS`; `mac` is a next hop on that interface).
    pub egress: u32,
    /// The VIP this real serves: a tracked flow is only forwarded to a real of its own VIP.
    pub vip_id: u32,
    /// NAT reals: the port the real serves on (0: the packet's own destination port).
    pub port_be: u16,
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<Real>() == 40);

/// The parser's mark of a TCP SYN (without ACK) in `FlowKey::words()[4]` (the first `_pad`
/// byte): the kernel's own note, never in a map key nor in the hash.
pub const FLOW_W4_SYN_SHIFT: u32 = 40;
pub const FLOW_W4_SYN: u64 = 1 << FLOW_W4_SYN_SHIFT;
/// The parser's mark of a TCP FIN or RST (the client closes): the tracked flow becomes closing.
pub const FLOW_W4_FIN_SHIFT: u32 = 41;
pub const FLOW_W4_FIN: u64 = 1 << FLOW_W4_FIN_SHIFT;
/// The kernel's mark of a flow key built from the header an ICMP error quotes: the packet is
/// that error, forwarded to the flow's real but never tracked as a flow of its own.
pub const FLOW_W4_ICMP: u64 = 1 << 42;
/// The parser's note of where the TCP/UDP header starts in the frame (bits 48..64 of
/// `FlowKey::words()[4]`, the last two `_pad` bytes): NAT mode rewrites ports and checksums
/// there. Never in a map key nor in the hash.
pub const FLOW_W4_L4_SHIFT: u32 = 48;
/// The bits of `FlowKey::words()[4]` that are the tuple: ports and protocol.
pub const FLOW_W4_TUPLE: u64 = 0xFF_FFFF_FFFF;

/// The flow's 5-tuple as found in the packet. Aligned to 8 so the hash can read it as five
/// u64 words.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);
const _: () = assert!(core::mem::align_of::<FlowKey>() == 8);

impl FlowKey {
    /// Build a key from its five words (see `words`): the kernel fills it with five stores.
    #[inline(always)]
    pub fn from_words(w: [u64; 5]) -> FlowKey {
        // SAFETY: same size, and every bit pattern is a valid FlowKey.
        unsafe { core::mem::transmute::<[u64; 5], FlowKey>(w) }
    }

    /// The key as the five little-endian u64 words the hash consumes: src (2), dst (2), then
    /// src_port_be | dst_port_be << 16 | proto << 32.
    #[inline(always)]
    pub fn words(&self) -> [u64; 5] {
        // SAFETY: FlowKey is repr(C), 40 bytes, 8-aligned, with no implicit padding (the
        // asserts above), so it is five initialised u64 words.
        unsafe { *(self as *const FlowKey as *const [u64; 5]) }
    }
}

/// A tracked flow as userspace and the trace name it: the client side within its VIP (the VIP
/// stands for the destination address and protocol). Ports stay: a port-0 VIP serves many
/// destination ports.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub src: [u8; 16],
    /// `src_port_be | dst_port_be << 16`, the packet's bytes.
    pub ports: u32,
    pub vip_id: u32,
}
const _: () = assert!(core::mem::size_of::<CtKey>() == 24);

impl CtKey {
    #[inline(always)]
    pub fn new(flow: &FlowKey, vip_id: u32) -> CtKey {
        let w = flow.words();
        let words: [u64; 3] = [w[0], w[1], (w[4] & 0xFFFF_FFFF) | (vip_id as u64) << 32];
        // SAFETY: same size, and every bit pattern is a valid CtKey.
        unsafe { core::mem::transmute::<[u64; 3], CtKey>(words) }
    }
}

/// `ConnValue::flags`: the client sent a FIN or RST. The flow stays tracked for
/// `CT_CLOSING_IDLE` after its last packet, and no longer counts as one of its real's flows.
pub const CT_F_CLOSING: u32 = 1 << 0;
/// `ConnValue::flags`: a SYN and nothing since (`ct::F_EMBRYONIC`).
pub const CT_F_EMBRYONIC: u32 = 1 << 1;
/// `ConnValue::flags`: a UDP flow (`ct::F_UDP`).
pub const CT_F_UDP: u32 = 1 << 2;

/// A way of the connection table as userspace reads it (`ct` has the encoding).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnValue {
    pub real_id: u32,
    /// `CT_F_*`.
    pub flags: u32,
    /// Stamp units (2^CT_TIME_SHIFT jiffies) since the last refresh.
    pub age: u32,
}

impl ConnValue {
    pub const fn from_way(way: u64, now: u32) -> ConnValue {
        let mut flags = 0;
        if way & ct::F_CLOSING != 0 {
            flags |= CT_F_CLOSING;
        }
        if way & ct::F_EMBRYONIC != 0 {
            flags |= CT_F_EMBRYONIC;
        }
        if way & ct::F_UDP != 0 {
            flags |= CT_F_UDP;
        }
        ConnValue {
            real_id: ct::real_of(way),
            flags,
            age: ct::age_of(way, now),
        }
    }
}

/// `STATS_VIP` value (per CPU), indexed by vip_id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipStats {
    pub packets: u64,
    pub bytes: u64,
    /// Flows that took the ring's choice (conntrack miss).
    pub new_flows: u64,
    /// Packets dropped because the VIP had no real for them.
    pub no_real: u64,
    /// New flows dropped because the VIP's quorum was lost (`on_quorum_lost = "drop"`).
    pub quorum_drops: u64,
    /// New flows whose connection table bucket had no free way: forwarded by the ring,
    /// untracked (a ring change moves them).
    pub untracked: u64,
}
const _: () = assert!(core::mem::size_of::<VipStats>() == 48);

/// `STATS_REAL` value (per CPU), indexed by real_id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RealStats {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub _reserved: u64,
}
const _: () = assert!(core::mem::size_of::<RealStats>() == 32);

/// `LAYOUT[0]` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    pub version: u32,
    pub ring_size: u32,
    pub max_vips: u32,
    pub max_reals: u32,
}
const _: () = assert!(core::mem::size_of::<Layout>() == 16);

/// `CONF[0]`: switches the daemon flips at run time.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Conf {
    /// Number of port-0 ("every port") VIPs per protocol. While both are 0, a packet whose
    /// port is not a VIP's costs one hash lookup; otherwise a second one tries port 0.
    pub port0_tcp: u32,
    pub port0_udp: u32,
    /// Entries of `REVNAT`. While 0, a packet to no VIP costs no reverse lookup.
    pub revnat: u32,
    pub _reserved: u32,
}
const _: () = assert!(core::mem::size_of::<Conf>() == 16);

/// `PROBE[0]`: how `target = "vip"` health probes travel. The daemon's probe namespace sends
/// them from source port `port_base + real_id` over a veth whose outer end (`veth_ifindex`)
/// runs `xlb_probe`, which sends each to its real's MAC (from `REALS`) out of the balanced
/// interface (`iface_ifindex`, from `iface_mac`). The balancer hands the replies (from a VIP
/// address to one of those ports) back into the veth, to `peer_mac`. `port_count` 0: off.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeConf {
    pub veth_ifindex: u32,
    pub iface_ifindex: u32,
    pub port_base: u16,
    pub port_count: u16,
    pub peer_mac: [u8; 6],
    pub iface_mac: [u8; 6],
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<ProbeConf>() == 32);

/// `TunnelConf::encap`: how tunnel mode encapsulates.
pub const ENCAP_IPIP: u8 = 0;
/// GUE variant 1 (the inner IP packet right after a UDP header to `gue_port_be`).
pub const ENCAP_GUE: u8 = 1;

/// `TUNNEL[0]`: the outer headers of tunnel mode. A family whose source is all zero has no
/// tunnel source: packets to tunnel reals of that family are dropped and counted.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TunnelConf {
    /// Outer IPv4 source.
    pub src4: [u8; 4],
    /// Bits of `src4` (as the packet's bytes read natively) replaced by those of the flow
    /// hash's low 16 bits written big-endian into the address's last bytes: a source address
    /// per flow from a prefix, so that routers' ECMP and the real's RSS spread IPIP flows.
    /// 0: one source.
    pub src4_hash_mask: u32,
    /// Outer IPv6 source.
    pub src6: [u8; 16],
    /// As `src4_hash_mask`, for the last 4 bytes of `src6`.
    pub src6_hash_mask: u32,
    pub gue_port_be: u16,
    /// `ENCAP_IPIP` or `ENCAP_GUE`.
    pub encap: u8,
    pub _pad: u8,
    /// Largest outer IP packet the egress link carries (its MTU).
    pub mtu: u16,
    pub _pad2: [u8; 2],
    pub _reserved: u32,
}
const _: () = assert!(core::mem::size_of::<TunnelConf>() == 40);

/// `EGRESS[ifindex]`: an interface tunnel reals are reached by. A real naming an interface
/// missing here is dropped and counted, never sent out with a wrong source.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxPort {
    pub ifindex: u32,
    /// The interface's MAC: the source of the frames sent out of it.
    pub mac: [u8; 6],
    /// Largest outer IP packet it carries (its MTU, or `--tunnel-mtu`).
    pub mtu: u16,
}
const _: () = assert!(core::mem::size_of::<TxPort>() == 12);

/// `REVNAT` key: a NAT real's source as its replies carry it. `proto` 0 and `port_be` 0 is the
/// entry of the address itself (present while any NAT real has that address; its value names
/// no VIP): fragments from it are dropped, since they carry no ports to translate by.
/// Same layout as `VipKey`, built the same way.
pub type RevNatKey = VipKey;

/// `REVNAT` value: what a reply from the real is rewritten to. Each (real address, port,
/// protocol) serves one VIP (the daemon refuses a second), so the reply alone names it, on
/// whichever CPU it arrives.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevNat {
    /// The VIP's address and port: the reply's new source.
    pub vip_addr: [u8; 16],
    pub vip_port_be: u16,
    pub _pad: u16,
    /// The real (for its counters) and its VIP (to find the flow in the connection table).
    pub real_id: u32,
    pub vip_id: u32,
}
const _: () = assert!(core::mem::size_of::<RevNat>() == 28);

/// `NAT_SCRATCH[0]` (per CPU): what the balancer tells `xlb_nat`, which it tail-calls at once.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatScratch {
    /// `NAT_TO_REAL`: a packet to real `real_id` (or an ICMP error about its flow);
    /// `NAT_REPLY`: a real's reply, to be rewritten to `rv`; `NAT_ICMP_TO_CLIENT`: an ICMP error
    /// to no VIP, which may quote a client's packet to a NAT real.
    pub reply: u32,
    pub real_id: u32,
    pub rv: RevNat,
}
const _: () = assert!(core::mem::size_of::<NatScratch>() == 36);
pub const NAT_TO_REAL: u32 = 0;
pub const NAT_REPLY: u32 = 1;
pub const NAT_ICMP_TO_CLIENT: u32 = 2;

// ---- xlb_decap (real servers in tunnel mode; its own object, maps and counters) ------------

pub const PROG_DECAP: &str = "xlb_decap";
pub const MAP_DECAP_CONF: &str = "DECAP_CONF";
/// This host's addresses: only packets to them are decapsulated.
pub const MAP_DECAP_ADDRS: &str = "DECAP_ADDRS";
/// With `DecapConf::vip_filter`, the inner destinations that are decapsulated.
pub const MAP_DECAP_VIPS: &str = "DECAP_VIPS";
pub const MAP_DECAP_STATS: &str = "DECAP_STATS";
pub const DECAP_MAX_ADDRS: u32 = 1024;
pub const DECAP_MAX_VIPS: u32 = 1024;

/// `DECAP_CONF[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecapConf {
    pub gue_port_be: u16,
    /// Non-zero: only packets whose inner destination is in `DECAP_VIPS`.
    pub vip_filter: u8,
    pub _pad: u8,
    pub _reserved: u32,
}
const _: () = assert!(core::mem::size_of::<DecapConf>() == 8);

/// `DECAP_STATS[0]` (per CPU): slot i counts `DECAP_COUNTERS[i]`. Traffic that is no tunnel
/// packet is not counted (it stays free).
pub const DECAP_COUNTERS: [(&str, &str); 5] = [
    ("decapsulated", "inner packet passed to the stack"),
    (
        "pass_not_local",
        "tunnel packet to an address that is not this host's: passed untouched",
    ),
    (
        "pass_not_vip",
        "inner destination is not a listed --vip: passed untouched",
    ),
    (
        "pass_malformed",
        "truncated or impossible outer or inner header, an outer fragment, a GUE header that is not variant 1: passed untouched",
    ),
    (
        "drop_ecn",
        "outer ECN says congestion (CE) but the inner packet is not ECN-capable: dropped (RFC 6040)",
    ),
];
pub const DECAP_DECAPSULATED: usize = 0;
pub const DECAP_PASS_NOT_LOCAL: usize = 1;
pub const DECAP_PASS_NOT_VIP: usize = 2;
pub const DECAP_PASS_MALFORMED: usize = 3;
pub const DECAP_DROP_ECN: usize = 4;
pub type DecapStats = [u64; 8];

/// Largest frame the benchmark wrapper restores.
pub const BENCH_FRAME_MAX: usize = 256;

/// `BENCH_FRAME[0]`: the frame the benchmark wrapper writes back before every iteration.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BenchFrame {
    pub len: u32,
    /// When non-zero: offset of 4 bytes (an IPv4 source address, or the last word of an IPv6
    /// one) that the wrapper overwrites with `counter` and then increments, so that every
    /// iteration is a new flow.
    pub vary_off: u32,
    pub counter: u32,
    /// When non-zero, `counter` cycles through 1..=vary_cycle: the same set of flows again
    /// and again (established flows over a large working set).
    pub vary_cycle: u32,
    pub data: [u8; BENCH_FRAME_MAX],
}
const _: () = assert!(core::mem::size_of::<BenchFrame>() == 16 + BENCH_FRAME_MAX);

/// IPv4 address as v4-mapped IPv6 (`::ffff:a.b.c.d`), the only form addresses take in maps.
#[inline(always)]
pub const fn v4_mapped(a: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C) plain data with explicit padding and no invalid bit
    // patterns.
    unsafe impl aya::Pod for super::VipKey {}
    unsafe impl aya::Pod for super::VipMeta {}
    unsafe impl aya::Pod for super::VipAddrValue {}
    unsafe impl aya::Pod for super::Real {}
    unsafe impl aya::Pod for super::TxPort {}
    unsafe impl aya::Pod for super::RevNat {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::CtKey {}
    unsafe impl aya::Pod for super::ct::CtTuple {}
    unsafe impl aya::Pod for super::ct::CtLogEntry {}
    unsafe impl aya::Pod for super::VipStats {}
    unsafe impl aya::Pod for super::RealStats {}
    unsafe impl aya::Pod for super::GlobalStats {}
    unsafe impl aya::Pod for super::Layout {}
    unsafe impl aya::Pod for super::Conf {}
    unsafe impl aya::Pod for super::ProbeConf {}
    unsafe impl aya::Pod for super::TunnelConf {}
    unsafe impl aya::Pod for super::DecapConf {}
    unsafe impl aya::Pod for super::BenchFrame {}
    unsafe impl aya::Pod for super::trace::TraceConf {}
    unsafe impl aya::Pod for super::trace::TraceEvent {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> FlowKey {
        FlowKey {
            src: v4_mapped([192, 0, 2, 1]),
            dst: [
                0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0x00,
            ],
            src_port_be: 40000u16.to_be(),
            dst_port_be: 443u16.to_be(),
            proto: IPPROTO_TCP,
            _pad: [0; 3],
        }
    }

    #[test]
    fn flow_key_words_round_trip_and_layout() {
        let k = sample();
        let w = k.words();
        assert_eq!(FlowKey::from_words(w), k);
        // Byte order is the packet's: the words are the key's bytes read little-endian.
        assert_eq!(w[1], u64::from_le_bytes(k.src[8..16].try_into().unwrap()));
        assert_eq!(
            w[4],
            u64::from(k.src_port_be) | u64::from(k.dst_port_be) << 16 | u64::from(k.proto) << 32
        );
    }

    #[test]
    fn ct_key_takes_source_ports_and_vip() {
        let k = sample();
        let ct = CtKey::new(&k, 7);
        assert_eq!(ct.src, k.src);
        assert_eq!(ct.vip_id, 7);
        assert_eq!(
            ct.ports,
            u32::from(k.src_port_be) | u32::from(k.dst_port_be) << 16
        );
    }

    #[test]
    fn vip_key_for_flow_equals_the_field_by_field_key() {
        let k = sample();
        let want = VipKey {
            addr: k.dst,
            port_be: k.dst_port_be,
            proto: k.proto,
            _pad: 0,
        };
        assert_eq!(VipKey::for_flow(&k.words(), k.dst_port_be), want);
        let port0 = VipKey { port_be: 0, ..want };
        assert_eq!(VipKey::for_flow(&k.words(), 0), port0);
    }

    #[test]
    fn ring_rows_are_packed_pairs() {
        let m = 65537;
        assert_eq!(ring_row_elems(m), 32769);
        assert_eq!(ring_elem_index(0, 0, 0, m), 0);
        assert_eq!(ring_elem_index(0, 0, 65536, m), 32768);
        assert_eq!(ring_elem_index(0, 1, 0, m), 32769);
        assert_eq!(ring_elem_index(3, 1, 5, m), 7 * 32769 + 2);
        // Userspace's u32 view: element e holds slots 2e and 2e+1.
        assert_eq!(
            ring_row_offset(3, 1, m),
            u64::from(ring_elem_index(3, 1, 0, m)) * 2
        );
        assert_eq!(ring_elems(128, m), 128 * 2 * 32769);
    }
}
