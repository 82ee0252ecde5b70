//! The connection table (`CONNTRACK`): an array of 64-byte buckets of `CT_WAYS` ways, each way
//! one u64 written with a single store, so that no CPU ever reads half of one flow's way and
//! half of another's. One flow hash (`flow_hash64`) gives both the bucket (its low half) and a
//! fingerprint (bits of its high half); a lookup reads one cache line. A way holds the real,
//! the fingerprint, the time of the flow's last packet and three flags:
//!
//! ```text
//! bit 0..16   real_id (0: the way is empty)
//!    16..40   fingerprint (24 bits of the hash's high half)
//!    40..61   stamp: jiffies >> CT_TIME_SHIFT of the last refresh (21 bits, wraps)
//!    61       UDP (idles out after the UDP idle time, else TCP's)
//!    62       closing (FIN or RST seen: the closing idle time)
//!    63       embryonic (a SYN and nothing since: the closing idle time, and any insert
//!             may take the way when its bucket has no free one)
//! ```
//!
//! A way is free when empty or idle longer than its idle time; an insert takes the flow's own
//! way, else a free one, else an embryonic one, else none: the flow is forwarded by the ring
//! and counted as untracked. A live flow's way is never taken.
//!
//! `CONNTRACK_KEYS` holds, way by way, the client and ports of the flow each way was written
//! for (the VIP follows from the real): read by walks that list flows (`xlb conns`, flow
//! sync), which check it against the way by hashing it again, and by the kernel for a SYN
//! that finds its way. The kernel logs it (`CtLogEntry`) and userspace files it there.

use crate::FlowKey;

pub const CT_WAYS: usize = 8;
/// `CONNTRACK` element: one bucket, one cache line.
pub type CtBucket = [u64; CT_WAYS];
const _: () = assert!(core::mem::size_of::<CtBucket>() == 64);

/// The client side of a tracked flow: `CONNTRACK_KEYS[bucket][way]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtTuple {
    pub src: [u8; 16],
    /// `src_port_be | dst_port_be << 16`, the packet's bytes.
    pub ports: u32,
}
const _: () = assert!(core::mem::size_of::<CtTuple>() == 20);

impl CtTuple {
    /// The client side of the flow of `key` (its packets' flow key).
    #[inline(always)]
    pub fn of(key: &FlowKey) -> CtTuple {
        CtTuple {
            src: key.src,
            ports: key.words()[4] as u32,
        }
    }

    /// Whether this is the client side of the flow of `key`.
    #[inline(always)]
    pub fn is_of(&self, key: &FlowKey) -> bool {
        self.src == key.src && self.ports == key.words()[4] as u32
    }
}
/// `CONNTRACK_KEYS` element: the tuples of one bucket's ways.
pub type CtKeys = [CtTuple; CT_WAYS];
const _: () = assert!(core::mem::size_of::<CtKeys>() == 160);

/// One new flow's tuple as the kernel logs it (`CT_LOG`), for the daemon to file into
/// `CONNTRACK_KEYS`: the kernel writes a small per-CPU log that stays in cache instead of a
/// random line of an 80 MB array (a store that misses stalls every store after it; measured:
/// a new flow 267-295 ns with the tuple written in place, 111-150 with it written to a hot
/// line).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtLogEntry {
    pub tuple: CtTuple,
    pub bucket: u32,
    /// The way's index (bits 0..8) and its fingerprint (`FP_MASK` bits >> FP_SHIFT, bits
    /// 8..32): the daemon files the tuple only while that way still holds that fingerprint.
    pub slot: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<CtLogEntry>() == 32);

impl CtLogEntry {
    #[inline(always)]
    pub const fn slot_of(way: u32, fp: u64) -> u32 {
        (way & 0xFF) | (((fp & FP_MASK) >> FP_SHIFT) as u32) << 8
    }

    pub const fn way(&self) -> u32 {
        self.slot & 0xFF
    }

    /// The fingerprint, in place (as `place` gives it).
    pub const fn fp(&self) -> u64 {
        ((self.slot >> 8) as u64) << FP_SHIFT
    }
}

/// Entries of each CPU's part of `CT_LOG` (a power of two): 2.7 ms of new flows at 3 M a
/// second; the daemon drains it every millisecond, and at once while it finds entries.
pub const CT_LOG_SLOTS: u32 = 8192;
/// `CT_LOG_HEADS` holds each CPU's count of logged entries at `cpu * CT_LOG_HEAD_STRIDE`
/// (a cache line each: CPUs never share one).
pub const CT_LOG_HEAD_STRIDE: u32 = 8;

/// Tracked flows per bucket at the table's nominal capacity (`--conntrack-size`): with 8 ways
/// and a Poisson load of 2, 0.015 % of flows find their bucket full.
pub const CT_FLOWS_PER_BUCKET: u32 = 2;

/// Buckets for a table sized for `flows`.
#[inline(always)]
pub const fn buckets_for(flows: u32) -> u32 {
    let b = flows.div_ceil(CT_FLOWS_PER_BUCKET);
    if b == 0 {
        1
    } else {
        b
    }
}

pub const REAL_MASK: u64 = 0xFFFF;
/// Largest real id a way holds.
pub const MAX_REAL_ID: u32 = REAL_MASK as u32;
pub const FP_SHIFT: u32 = 16;
/// A new flow shares a real with a live flow of its bucket's (a false match) once in
/// 2^24 / 8 = 2 M new flows in a full table.
pub const FP_BITS: u32 = 24;
pub const FP_MASK: u64 = ((1 << FP_BITS) - 1) << FP_SHIFT;
pub const STAMP_SHIFT: u32 = 40;
/// 12 days of 0.512 s units: a way dead that long looks live again for one idle time (900 s
/// of the 12 days), which costs room, never a flow.
pub const STAMP_BITS: u32 = 21;
/// A stamp (and an age) is kept modulo 2^21.
pub const STAMP_MASK: u32 = (1 << STAMP_BITS) - 1;
pub const F_UDP: u64 = 1 << 61;
pub const F_CLOSING: u64 = 1 << 62;
pub const F_EMBRYONIC: u64 = 1 << 63;
/// The flags that give a way the closing idle time.
pub const F_SHORT: u64 = F_CLOSING | F_EMBRYONIC;

/// Bucket index (from the hash's low half, spread over `buckets` without a division) and the
/// fingerprint, in place (`FP_MASK` bits), from the high half: disjoint bits of one hash.
#[inline(always)]
pub const fn place(hash: u64, buckets: u32) -> (u32, u64) {
    let bucket = (((hash as u32) as u64 * buckets as u64) >> 32) as u32;
    let fp = ((hash >> 32) << FP_SHIFT) & FP_MASK;
    (bucket, fp)
}

/// A way: `fp` in place (from `place`), `stamp` in units of 2^CT_TIME_SHIFT jiffies.
#[inline(always)]
pub const fn way(real_id: u32, fp: u64, stamp: u32, flags: u64) -> u64 {
    (real_id as u64 & REAL_MASK)
        | (fp & FP_MASK)
        | (((stamp & STAMP_MASK) as u64) << STAMP_SHIFT)
        | flags
}

#[inline(always)]
pub const fn real_of(way: u64) -> u32 {
    (way & REAL_MASK) as u32
}

#[inline(always)]
pub const fn stamp_of(way: u64) -> u32 {
    ((way >> STAMP_SHIFT) as u32) & STAMP_MASK
}

/// Units since the way's last refresh, at `now` (units, any width: taken modulo 2^21).
#[inline(always)]
pub const fn age_of(way: u64, now: u32) -> u32 {
    now.wrapping_sub(stamp_of(way)) & STAMP_MASK
}

/// The way with its stamp set to `now`.
#[inline(always)]
pub const fn restamp(way: u64, now: u32) -> u64 {
    (way & !((STAMP_MASK as u64) << STAMP_SHIFT)) | (((now & STAMP_MASK) as u64) << STAMP_SHIFT)
}

/// The flags a new way of a flow of protocol `proto` starts with.
#[inline(always)]
pub const fn proto_flags(proto: u8) -> u64 {
    if proto == crate::IPPROTO_TCP {
        0
    } else {
        F_UDP
    }
}

/// Idle times in stamp units, as the loader sets them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Idle {
    pub tcp: u32,
    pub udp: u32,
    pub closing: u32,
}

impl Idle {
    /// The idle time of the flow a way holds.
    #[inline(always)]
    pub const fn of(&self, way: u64) -> u32 {
        if way & F_SHORT != 0 {
            self.closing
        } else if way & F_UDP != 0 {
            self.udp
        } else {
            self.tcp
        }
    }

    /// Whether the way holds no live flow: empty, or idle longer than its idle time.
    #[inline(always)]
    pub const fn free(&self, way: u64, now: u32) -> bool {
        way & REAL_MASK == 0 || age_of(way, now) > self.of(way)
    }
}

/// The flow key the table hashes: the packet's 5-tuple without the kernel's marks.
#[inline(always)]
pub fn tuple_key(key: &FlowKey) -> FlowKey {
    let mut w = key.words();
    w[4] &= crate::FLOW_W4_TUPLE;
    FlowKey::from_words(w)
}

/// The shift that turns jiffies into stamp units: the largest 2^s not above HZ, so that a
/// unit is at most a second (0.512 s at HZ 1000 and 250, 0.64 s at 100, 0.853 s at 300) and
/// a stamp wraps after 7 weeks or more.
pub const fn time_shift(hz: u64) -> u32 {
    let mut s = 0;
    while s < 20 && (1u64 << (s + 1)) <= hz {
        s += 1;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn way_fields_round_trip_and_stay_apart() {
        let (b, fp) = place(0xDEAD_BEEF_1234_5678, 1000);
        assert!(b < 1000);
        let w = way(65535, fp, STAMP_MASK, F_UDP | F_CLOSING | F_EMBRYONIC);
        assert_eq!(real_of(w), 65535);
        assert_eq!(w & FP_MASK, fp);
        assert_eq!(stamp_of(w), STAMP_MASK);
        assert_eq!(w & F_SHORT, F_SHORT);
        assert_eq!(stamp_of(restamp(w, 5)), 5);
        assert_eq!(
            restamp(w, 5) & !(u64::from(STAMP_MASK) << STAMP_SHIFT),
            w & !(u64::from(STAMP_MASK) << STAMP_SHIFT)
        );
        // Every bit belongs to exactly one field.
        let fields = [
            REAL_MASK,
            FP_MASK,
            u64::from(STAMP_MASK) << STAMP_SHIFT,
            F_UDP,
            F_CLOSING,
            F_EMBRYONIC,
        ];
        assert_eq!(
            fields.iter().fold(0u64, |a, f| {
                assert_eq!(a & f, 0);
                a | f
            }),
            u64::MAX
        );
    }

    #[test]
    fn ages_wrap_and_idle_follows_the_flags() {
        let idle = Idle {
            tcp: 100,
            udp: 50,
            closing: 10,
        };
        let w = way(7, 0, STAMP_MASK - 1, 0);
        assert_eq!(age_of(w, STAMP_MASK + 4), 5, "the stamp wrapped");
        assert!(!idle.free(w, STAMP_MASK + 98));
        assert!(idle.free(w, STAMP_MASK + 100));
        assert!(idle.free(way(7, 0, 0, F_UDP), 51));
        assert!(!idle.free(way(7, 0, 0, F_UDP), 50));
        assert!(idle.free(way(7, 0, 0, F_EMBRYONIC), 11));
        assert!(idle.free(0, 0), "an empty way is free");
    }

    #[test]
    fn buckets_and_time_units() {
        assert_eq!(buckets_for(1 << 20), 1 << 19);
        assert_eq!(buckets_for(1), 1);
        assert_eq!(buckets_for(0), 1);
        assert_eq!(time_shift(1000), 9);
        assert_eq!(time_shift(250), 7);
        assert_eq!(time_shift(100), 6);
        assert_eq!(time_shift(300), 8);
    }

    #[test]
    fn buckets_spread_evenly() {
        let buckets = 1000u32;
        let mut n = vec![0u32; buckets as usize];
        for i in 0..100_000u64 {
            let h = crate::hash::fmix(i);
            n[place(h, buckets).0 as usize] += 1;
        }
        assert!(n.iter().all(|c| (60..=140).contains(c)), "{:?}", &n[..20]);
    }
}
