//! The global counters in `STATS_GLOBAL[0]`: one per reason a packet was not forwarded, and a
//! few figures about the connection table. Each counter is one line of the table below; the
//! kernel counts by its constant (`counter::PASS_NOT_IP`), userspace sums and names every row
//! of `GLOBAL_COUNTERS`, so a new counter cannot be forgotten by one side.
//!
//! The common "IP, not for a VIP" pass is deliberately not counted: it is the host's own
//! traffic and must stay as cheap as possible.

/// What the program did with a packet counted by a counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Left to the kernel stack (`XDP_PASS`).
    Pass,
    /// Dropped (`XDP_DROP`).
    Drop,
    /// Forwarded anyway; the counter notes something that happened on the way.
    Forward,
}

impl Action {
    pub const fn as_str(self) -> &'static str {
        match self {
            Action::Pass => "pass",
            Action::Drop => "drop",
            Action::Forward => "forward",
        }
    }
}

/// One global counter: its slot in `GlobalStats::counters` and what happened to the packet.
/// Never stored in a map: the kernel only uses it as a compile-time constant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counter {
    pub index: u8,
    pub action: Action,
}

/// A counter with its name (the key in `xlb stats --json`) and its meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CounterInfo {
    pub counter: Counter,
    pub name: &'static str,
    pub help: &'static str,
}

impl CounterInfo {
    /// The name without its action prefix (`truncated` for `pass_truncated`).
    pub fn reason(&self) -> &'static str {
        let prefix = match self.counter.action {
            Action::Pass => "pass_",
            Action::Drop => "drop_",
            Action::Forward => "",
        };
        self.name.strip_prefix(prefix).unwrap_or(self.name)
    }
}

/// Slots in `GlobalStats::counters` (the map value's size is part of the layout: unused slots
/// are room for new counters without a layout change).
pub const GLOBAL_STATS_SLOTS: usize = 32;

macro_rules! global_counters {
    ($($konst:ident = $index:literal, $name:literal, $action:ident, $help:literal;)*) => {
        /// The counters, by the constant the kernel counts with.
        pub mod counter {
            use super::{Action, Counter};
            $(
                #[doc = $help]
                pub const $konst: Counter = Counter { index: $index, action: Action::$action };
            )*
        }

        /// Every counter in slot order: what userspace reads, sums and shows.
        pub const GLOBAL_COUNTERS: &[CounterInfo] = &[$(
            CounterInfo { counter: counter::$konst, name: $name, help: $help },
        )*];
    };
}

global_counters! {
    PASS_NOT_IP = 0, "pass_not_ip", Pass,
        "Ethertype neither IPv4 nor IPv6 after at most one VLAN tag (ARP, LLDP, QinQ): passed.";
    PASS_TRUNCATED = 1, "pass_truncated", Pass,
        "Frame or IP packet ends before the headers it announces: passed for the kernel to judge.";
    PASS_UNKNOWN_L4 = 2, "pass_unknown_l4", Pass,
        "IP protocol other than TCP or UDP: passed.";
    PASS_IPV6_EXT = 3, "pass_ipv6_ext", Pass,
        "IPv6 extension chain longer than MAX_IPV6_EXT_HEADERS: passed.";
    DROP_FRAGMENT = 4, "drop_fragment", Drop,
        "IPv4 or IPv6 fragment sent to a VIP address (no ports to pick a real by): dropped.";
    DROP_BAD_HEADER = 5, "drop_bad_header", Drop,
        "Impossible IP header (version, IHL, total length below the header): dropped.";
    DROP_NO_REAL = 6, "drop_no_real", Drop,
        "VIP found but no real to send to (empty ring slot, dead real): dropped.";
    CT_STALE = 7, "ct_stale", Forward,
        "Tracked flow whose real was gone or idle too long: re-picked from the ring.";
    CT_INSERT_FAIL = 8, "ct_insert_fail", Forward,
        "New flow whose connection table bucket had no free way: forwarded by the ring, untracked.";
    PASS_VIP_META_MISSING = 9, "pass_vip_meta_missing", Pass,
        "VIPS names a vip_id whose VIP_META is not in use (never written by the daemon): passed.";
    PASS_GROUP_MAC = 10, "pass_group_mac", Pass,
        "Frame to a VIP with a broadcast or multicast destination MAC: passed, never forwarded.";
    PASS_V4_MAPPED = 11, "pass_v4_mapped", Pass,
        "IPv6 packet to a v4-mapped address (::ffff:0:0/96), which no IPv6 VIP can have: passed.";
    DROP_QUORUM = 12, "drop_quorum", Drop,
        "New flow to a VIP whose quorum is lost and whose on_quorum_lost is drop: dropped.";
    PROBE_REPLY = 13, "probe_reply", Forward,
        "Reply to a target = \"vip\" health probe, handed to the daemon's probe namespace.";
    PASS_NEXT_HOP = 14, "pass_next_hop", Pass,
        "Packet of a tracked flow to a tunnel real whose next hop is unresolved: encapsulated and passed to the host, which forwards it when IP forwarding is on.";
    DROP_TOO_BIG = 15, "drop_too_big", Drop,
        "Packet to a tunnel real that would exceed the MTU once encapsulated and that may be fragmented (IPv4 without DF), which XDP cannot do: dropped.";
    DROP_NO_TUNNEL_SOURCE = 16, "drop_no_tunnel_source", Drop,
        "Packet to a tunnel real of a family without a tunnel source address: dropped.";
    DROP_ENCAP = 17, "drop_encap", Drop,
        "The frame could not grow by the encapsulation's headers (no headroom): dropped.";
    ICMP_ECHO_REPLY = 18, "icmp_echo_reply", Forward,
        "ICMP or ICMPv6 echo request to a VIP address: answered by the balancer.";
    ICMP_ERROR_FORWARDED = 19, "icmp_error_forwarded", Forward,
        "ICMP error (unreachable, fragmentation needed, time exceeded, packet too big) about a VIP flow: sent to the flow's real.";
    DROP_ICMP_UNMATCHED = 20, "drop_icmp_unmatched", Drop,
        "ICMP error to a VIP address whose quoted header is truncated, not TCP/UDP or of no VIP: dropped.";
    PASS_ICMP = 21, "pass_icmp", Pass,
        "Other ICMP to a VIP address (neighbour discovery, other types): passed.";
    ICMP_TOO_BIG_SENT = 22, "icmp_too_big_sent", Forward,
        "Packet to a tunnel real too big for the MTU once encapsulated: answered with fragmentation needed (IPv4 with DF) or packet too big (IPv6).";
    DROP_TOO_BIG_RATE = 23, "drop_too_big_rate", Drop,
        "Packet too big for the tunnel whose answer the rate limit held back (per CPU): dropped.";
    DROP_TX_PORT = 24, "drop_tx_port", Drop,
        "Packet to a tunnel real reached out of another interface that is not (or no longer) set up in EGRESS and TX_PORTS, or that the redirect refused: dropped.";
    NAT_REPLY = 25, "nat_reply", Forward,
        "Reply from a NAT real, rewritten to its VIP's address and port and sent to the client's next hop (from the kernel's routes and neighbours).";
    PASS_NAT_REPLY = 26, "pass_nat_reply", Pass,
        "Reply from a NAT real, rewritten to its VIP's address and port and passed to the host to route (no route or neighbour known yet, TTL about to expire, IP forwarding off).";
    DROP_NAT_FRAGMENT = 27, "drop_nat_fragment", Drop,
        "IPv4 or IPv6 fragment from a NAT real's address (no ports to rewrite it by): dropped.";
    DROP_ICMP_NAT = 28, "drop_icmp_nat", Drop,
        "ICMP error to a VIP about a flow of a NAT real whose quoted header is too short to translate (under 8 bytes of TCP or UDP header): dropped (the balancer counted it in icmp_error_forwarded already, before handing it to xlb_nat_icmp).";
    DROP_NAT_TAIL = 29, "drop_nat_tail", Drop,
        "Packet for the NAT rewrite whose program could not be reached (the tail call failed; a bug): dropped.";
    NAT_ICMP_REPLY = 30, "nat_icmp_reply", Forward,
        "ICMP error about a client's packet to a NAT real (its port unreachable, a router's fragmentation needed), translated to the VIP's address and port (the outer source too when the real sent it) and sent to the client, or passed to the host to route.";
}

// Slot i holds row i: slots are unique, in order, and within the map value.
const _: () = {
    let mut i = 0;
    while i < GLOBAL_COUNTERS.len() {
        assert!(GLOBAL_COUNTERS[i].counter.index as usize == i);
        i += 1;
    }
    assert!(GLOBAL_COUNTERS.len() <= GLOBAL_STATS_SLOTS);
};

/// `STATS_GLOBAL[0]` value (per CPU): slot `counter.index` of each counter.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalStats {
    pub counters: [u64; GLOBAL_STATS_SLOTS],
}
const _: () = assert!(core::mem::size_of::<GlobalStats>() == 256);

impl GlobalStats {
    #[inline(always)]
    pub fn get(&self, c: Counter) -> u64 {
        self.counters.get(c.index as usize).copied().unwrap_or(0)
    }

    /// Add another CPU's values (userspace sums the per-CPU values).
    pub fn add(&mut self, other: &GlobalStats) {
        for (a, b) in self.counters.iter_mut().zip(other.counters.iter()) {
            *a = a.wrapping_add(*b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_reasons_drop_the_action_prefix() {
        for (i, a) in GLOBAL_COUNTERS.iter().enumerate() {
            for b in &GLOBAL_COUNTERS[i + 1..] {
                assert_ne!(a.name, b.name);
            }
            let prefix = a.counter.action.as_str();
            if a.counter.action != Action::Forward {
                assert!(a.name.starts_with(prefix), "{} is not {prefix}_...", a.name);
            }
        }
        let truncated = GLOBAL_COUNTERS[counter::PASS_TRUNCATED.index as usize];
        assert_eq!(truncated.reason(), "truncated");
        assert_eq!(GLOBAL_COUNTERS[7].reason(), "ct_stale");
    }

    #[test]
    fn add_sums_slot_by_slot() {
        let mut a = GlobalStats::default();
        let mut b = GlobalStats::default();
        b.counters[counter::DROP_NO_REAL.index as usize] = 3;
        a.add(&b);
        a.add(&b);
        assert_eq!(a.get(counter::DROP_NO_REAL), 6);
        assert_eq!(a.get(counter::PASS_NOT_IP), 0);
    }
}
