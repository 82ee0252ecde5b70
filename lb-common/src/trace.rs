//! `xlb trace`: the balancer's forwarding decisions, as events in a BPF ring buffer. Off unless
//! the daemon has a `trace` request to serve; while off, a VIP packet pays one array read and a
//! branch. Neither map is pinned: a new program starts with tracing off.

use crate::CtKey;

/// `TraceConf`, one element.
pub const MAP_TRACE: &str = "TRACE";
/// The ring buffer of `TraceEvent`s.
pub const MAP_TRACE_EVENTS: &str = "TRACE_EVENTS";
/// Per CPU: events the full ring buffer had no room for.
pub const MAP_TRACE_LOST: &str = "TRACE_LOST";
/// Bytes of the ring buffer (a power of two, a multiple of the page size): about 4 600
/// events with their 8-byte headers, many seconds of what a person reads.
pub const TRACE_EVENTS_BYTES: u32 = 256 * 1024;

/// `TRACE[0]`: whether to trace, and which VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceConf {
    /// 0: off.
    pub on: u32,
    /// vip_id + 1 of the one VIP to trace; 0: every VIP.
    pub vip: u32,
}
const _: () = assert!(core::mem::size_of::<TraceConf>() == 8);

/// `TraceEvent::how`: the flow's tracked entry chose the real.
pub const TRACE_HOW_TRACKED: u8 = 0;
/// The ring chose (a new flow, a TCP SYN, an untracked VIP).
pub const TRACE_HOW_RING: u8 = 1;
/// The tracked entry named a real that is gone or had idled out: the ring chose again.
pub const TRACE_HOW_STALE_REPICK: u8 = 2;

/// `TraceEvent::reason` when nothing but the forwarding itself happened.
pub const TRACE_NO_REASON: u8 = 0xFF;
/// `TraceEvent::slot` when no ring slot was read.
pub const TRACE_NO_SLOT: u32 = u32::MAX;

/// One decision about a packet to a VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceEvent {
    /// CLOCK_MONOTONIC, nanoseconds (bpf_ktime_get_ns).
    pub time_ns: u64,
    /// The packet's flow within its VIP (for an ICMP error: the flow it quotes): the VIP
    /// stands for the destination address and the protocol.
    pub flow: CtKey,
    /// 0: none chosen.
    pub real_id: u32,
    /// The ring slot read, or `TRACE_NO_SLOT`.
    pub slot: u32,
    /// The XDP action returned.
    pub action: u8,
    /// `TRACE_HOW_*`.
    pub how: u8,
    /// Slot of the global counter that says what else happened (`counter::*.index`), or
    /// `TRACE_NO_REASON`.
    pub reason: u8,
    pub _pad: [u8; 5],
}
const _: () = assert!(core::mem::size_of::<TraceEvent>() == 48);
