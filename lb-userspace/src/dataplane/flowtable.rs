//! The connection table as userspace sees it: lb-common's `ct` buckets and tuples, in memory
//! the kernel writes at the same time (the mmapped `CONNTRACK` and `CONNTRACK_KEYS`; on the
//! heap for the fake dataplane). Reads are plain memory reads (a walk of a million flows is a
//! pass over 32 MB); a way is read and written as one atomic u64, as the kernel does, and
//! userspace writes only with compare-and-swap, so that a packet's concurrent write wins.

use std::{
    collections::BTreeSet,
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use lb_common::{
    ct::{self, CtTuple, CT_WAYS},
    flow_hash64, ConnValue, FlowKey,
};

use super::{mmap::map_shared, DataplaneError, FlowCount, FlowSource, Merge};

/// u32 words of one bucket's tuples (`ct::CtKeys`).
const KEY_WORDS: usize = std::mem::size_of::<ct::CtKeys>() / 4;
const TUPLE_WORDS: usize = std::mem::size_of::<CtTuple>() / 4;

/// Where the table's memory is.
enum Memory {
    /// Two shared mappings of the kernel's arrays: (address, length in bytes).
    Mapped {
        ways: (*mut libc::c_void, usize),
        keys: (*mut libc::c_void, usize),
    },
    Heap {
        _ways: Box<[AtomicU64]>,
        _keys: Box<[AtomicU32]>,
    },
}

struct Table {
    memory: Memory,
    ways: *const AtomicU64,
    keys: *const AtomicU32,
    buckets: u32,
}

// SAFETY: the table only hands out shared references to atomics, which any thread may use;
// the memory lives as long as the Table.
unsafe impl Send for Table {}
unsafe impl Sync for Table {}

impl Drop for Table {
    fn drop(&mut self) {
        if let Memory::Mapped { ways, keys } = self.memory {
            for (ptr, len) in [ways, keys] {
                // SAFETY: unmapping exactly what `Table::mapped` mapped.
                unsafe { libc::munmap(ptr, len) };
            }
        }
    }
}

impl Table {
    fn ways(&self) -> &[AtomicU64] {
        // SAFETY: `buckets * CT_WAYS` u64s, alive as long as self.
        unsafe { std::slice::from_raw_parts(self.ways, self.buckets as usize * CT_WAYS) }
    }

    fn keys(&self) -> &[AtomicU32] {
        // SAFETY: `buckets * KEY_WORDS` u32s, alive as long as self.
        unsafe { std::slice::from_raw_parts(self.keys, self.buckets as usize * KEY_WORDS) }
    }
}

/// How the table is laid out and timed; the kernel has the same from its globals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub buckets: u32,
    pub seed: u32,
    /// Idle times, in stamp units.
    pub idle: ct::Idle,
    /// A stamp unit is 2^shift jiffies.
    pub shift: u32,
    /// One stamp unit.
    pub unit: Duration,
}

impl Geometry {
    /// The table for `flows` (`--conntrack-size`) with the given idle times, on a kernel of
    /// `hz` jiffies per second. A unit is at most a second (`ct::time_shift`), and small
    /// enough that the shortest idle time is 16 of them.
    pub fn new(
        flows: u32,
        seed: u32,
        hz: u64,
        tcp: Duration,
        udp: Duration,
        closing: Duration,
    ) -> Geometry {
        let hz = hz.max(1);
        let jiffies = |d: Duration| (d.as_nanos() * u128::from(hz) / 1_000_000_000) as u64;
        let shortest = jiffies(tcp.min(udp).min(closing));
        let mut shift = ct::time_shift(hz);
        while shift > 0 && (1u64 << shift) * 16 > shortest {
            shift -= 1;
        }
        let unit = Duration::from_nanos(((1u64 << shift) * 1_000_000_000) / hz);
        let units = |d: Duration| {
            d.as_nanos()
                .div_ceil(unit.as_nanos().max(1))
                .clamp(1, u128::from(ct::STAMP_MASK / 2)) as u32
        };
        Geometry {
            buckets: ct::buckets_for(flows),
            seed,
            idle: ct::Idle {
                tcp: units(tcp),
                udp: units(udp),
                closing: units(closing),
            },
            shift,
            unit,
        }
    }

    /// The bytes of both arrays.
    pub fn bytes(&self) -> u64 {
        u64::from(self.buckets) * (64 + std::mem::size_of::<ct::CtKeys>() as u64)
    }
}

/// The table's clock: stamp units now.
pub type Clock = Arc<dyn Fn() -> u32 + Send + Sync>;

/// Units of clock difference between userspace and the kernel that a stamp may be ahead of
/// userspace's `now` by (the anchor's error, a refresh after `now` was read): fresh, not
/// 2^21 units old.
const SKEW: u32 = 64;

/// Age of a way in units, seen from userspace.
fn age(w: u64, now: u32) -> u32 {
    let a = ct::age_of(w, now);
    if a > ct::STAMP_MASK - SKEW {
        0
    } else {
        a
    }
}

/// Whether a way holds no live flow, seen from userspace (`ct::Idle::free`, with `SKEW`).
fn free(idle: &ct::Idle, w: u64, now: u32) -> bool {
    w & ct::REAL_MASK == 0 || age(w, now) > idle.of(w)
}

fn value(w: u64, now: u32) -> ConnValue {
    ConnValue {
        age: age(w, now),
        ..ConnValue::from_way(w, now)
    }
}

/// A tracked flow found by a walk. The tuple is the one last written for its way: check it
/// with `FlowTable::holds` before trusting it.
#[derive(Clone, Copy, Debug)]
pub struct TrackedFlow {
    pub tuple: CtTuple,
    pub value: ConnValue,
    pub age: Duration,
    way: usize,
    fp: u64,
}

impl TrackedFlow {
    pub fn client_port(&self) -> u16 {
        u16::from_be(self.tuple.ports as u16)
    }

    pub fn dst_port(&self) -> u16 {
        u16::from_be((self.tuple.ports >> 16) as u16)
    }
}

/// A handle to the connection table; clones share it.
#[derive(Clone)]
pub struct FlowTable {
    table: Arc<Table>,
    geometry: Geometry,
    clock: Clock,
}

impl FlowTable {
    /// The kernel's table: `ways` and `keys` are the fds of `CONNTRACK` and `CONNTRACK_KEYS`.
    pub fn mapped(
        ways: std::os::fd::BorrowedFd<'_>,
        keys: std::os::fd::BorrowedFd<'_>,
        geometry: Geometry,
        clock: Clock,
    ) -> std::io::Result<FlowTable> {
        let n = geometry.buckets as usize;
        let w = map_shared(ways, n * 64)?;
        let k = match map_shared(keys, n * KEY_WORDS * 4) {
            Ok(k) => k,
            Err(e) => {
                // SAFETY: unmapping what was just mapped.
                unsafe { libc::munmap(w.0, w.1) };
                return Err(e);
            }
        };
        let table = Table {
            memory: Memory::Mapped { ways: w, keys: k },
            ways: w.0 as *const AtomicU64,
            keys: k.0 as *const AtomicU32,
            buckets: geometry.buckets,
        };
        Ok(FlowTable {
            table: Arc::new(table),
            geometry,
            clock,
        })
    }

    /// A table of its own on the heap (the fake dataplane's).
    pub fn heap(geometry: Geometry, clock: Clock) -> FlowTable {
        let n = geometry.buckets as usize;
        let ways: Box<[AtomicU64]> = (0..n * CT_WAYS).map(|_| AtomicU64::new(0)).collect();
        let keys: Box<[AtomicU32]> = (0..n * KEY_WORDS).map(|_| AtomicU32::new(0)).collect();
        let table = Table {
            ways: ways.as_ptr(),
            keys: keys.as_ptr(),
            memory: Memory::Heap {
                _ways: ways,
                _keys: keys,
            },
            buckets: geometry.buckets,
        };
        FlowTable {
            table: Arc::new(table),
            geometry,
            clock,
        }
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    fn now(&self) -> u32 {
        (self.clock)()
    }

    fn age(&self, units: u32) -> Duration {
        self.geometry.unit * units
    }

    /// Bucket and fingerprint of the flow of `key` (the kernel's flow key of its packets).
    fn place(&self, key: &FlowKey) -> (usize, u64) {
        let h = flow_hash64(&ct::tuple_key(key), self.geometry.seed);
        let (b, fp) = ct::place(h, self.geometry.buckets);
        (b as usize, fp)
    }

    /// The way of `key`'s flow whose real `ours` accepts (a real of the flow's VIP), live or
    /// not, with its value.
    fn find(&self, key: &FlowKey, ours: &dyn Fn(u32) -> bool) -> Option<(usize, u64)> {
        let (b, fp) = self.place(key);
        let ways = &self.table.ways()[b * CT_WAYS..(b + 1) * CT_WAYS];
        ways.iter().enumerate().find_map(|(i, w)| {
            let w = w.load(Ordering::Relaxed);
            (w & ct::FP_MASK == fp && w & ct::REAL_MASK != 0 && ours(ct::real_of(w)))
                .then_some((b * CT_WAYS + i, w))
        })
    }

    /// The live entry of `key`'s flow, if the table has one.
    pub fn lookup(
        &self,
        key: &FlowKey,
        ours: &dyn Fn(u32) -> bool,
    ) -> Option<(ConnValue, Duration)> {
        let now = self.now();
        let (_, w) = self.find(key, ours)?;
        if free(&self.geometry.idle, w, now) {
            return None;
        }
        let v = value(w, now);
        Some((v, self.age(v.age)))
    }

    /// Record `key`'s flow on `real_id` as fresh (flow sync), unless the table tracks it live
    /// to another real.
    pub fn merge(&self, key: &FlowKey, real_id: u32, ours: &dyn Fn(u32) -> bool) -> Merge {
        let now = self.now();
        let idle = self.geometry.idle;
        let (b, fp) = self.place(key);
        let fresh = ct::way(real_id, fp, now, ct::proto_flags(key.proto));
        let ways = self.table.ways();
        if let Some((i, w)) = self.find(key, ours) {
            let live = !free(&idle, w, now);
            if live && ct::real_of(w) != real_id {
                return Merge::KeptOwn;
            }
            // Live on this real: refreshed; else the way is the flow's but dead: written anew.
            let new = if live { ct::restamp(w, now) } else { fresh };
            // Lost to a packet's write: the packet's decision stands.
            if ways[i]
                .compare_exchange(w, new, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
            {
                return Merge::KeptOwn;
            }
            if !live {
                self.write_tuple(i, key);
            }
            return if live {
                Merge::Refreshed
            } else {
                Merge::Inserted
            };
        }
        let bucket = b * CT_WAYS..(b + 1) * CT_WAYS;
        let target = bucket
            .clone()
            .find(|&i| free(&idle, ways[i].load(Ordering::Relaxed), now))
            .or_else(|| {
                bucket
                    .clone()
                    .find(|&i| ways[i].load(Ordering::Relaxed) & ct::F_EMBRYONIC != 0)
            });
        let Some(i) = target else {
            return Merge::NoRoom;
        };
        let old = ways[i].load(Ordering::Relaxed);
        self.write_tuple(i, key);
        if ways[i]
            .compare_exchange(old, fresh, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return Merge::NoRoom;
        }
        Merge::Inserted
    }

    /// File a tuple the kernel logged (`ctlog`): written while its way still holds the
    /// fingerprint the kernel wrote with it; `false` when the way has moved on.
    pub fn file(&self, e: &ct::CtLogEntry) -> bool {
        let (b, way) = (e.bucket as usize, e.way() as usize);
        if b >= self.table.buckets as usize || way >= CT_WAYS {
            return false;
        }
        let i = b * CT_WAYS + way;
        let w = self.table.ways()[i].load(Ordering::Acquire);
        if w & ct::REAL_MASK == 0 || w & ct::FP_MASK != e.fp() {
            return false;
        }
        self.write_tuple_words(i, tuple_words(&e.tuple));
        true
    }

    /// Bucket, way and fingerprint of `key`'s way, if it has one (tests).
    #[cfg(test)]
    pub(crate) fn way_of(&self, key: &FlowKey) -> Option<(u32, u32, u64)> {
        let (i, w) = self.find(key, &|_| true)?;
        Some(((i / CT_WAYS) as u32, (i % CT_WAYS) as u32, w & ct::FP_MASK))
    }

    /// The tuple last written for a way (tests).
    #[cfg(test)]
    pub(crate) fn tuple_at(&self, bucket: u32, way: u32) -> CtTuple {
        self.read_tuple(bucket as usize * CT_WAYS + way as usize)
    }

    /// Zero a way's tuple (tests).
    #[cfg(test)]
    pub(crate) fn clear_tuple(&self, bucket: u32, way: u32) {
        let i = bucket as usize * CT_WAYS + way as usize;
        self.write_tuple_words(i, [0; TUPLE_WORDS]);
    }

    /// Write the tuple of way `i` (before the way: walks check it against the way).
    fn write_tuple(&self, i: usize, key: &FlowKey) {
        self.write_tuple_words(i, tuple_words(&CtTuple::of(key)));
    }

    fn write_tuple_words(&self, i: usize, words: [u32; TUPLE_WORDS]) {
        let at = (i / CT_WAYS) * KEY_WORDS + (i % CT_WAYS) * TUPLE_WORDS;
        let keys = self.table.keys();
        for (k, w) in keys[at..at + TUPLE_WORDS].iter().zip(words) {
            k.store(w, Ordering::Relaxed);
        }
    }

    fn read_tuple(&self, i: usize) -> CtTuple {
        let at = (i / CT_WAYS) * KEY_WORDS + (i % CT_WAYS) * TUPLE_WORDS;
        let keys = self.table.keys();
        let mut words = [0u32; TUPLE_WORDS];
        for (w, k) in words.iter_mut().zip(&keys[at..at + TUPLE_WORDS]) {
            *w = k.load(Ordering::Relaxed);
        }
        // SAFETY: CtTuple is 20 bytes of plain integers, any bit pattern valid.
        unsafe { std::mem::transmute::<[u32; TUPLE_WORDS], CtTuple>(words) }
    }

    /// Every live way, with its tuple; returns how many ways were read.
    pub fn walk_flows(&self, f: &mut dyn FnMut(&TrackedFlow)) -> u64 {
        let now = self.now();
        let idle = self.geometry.idle;
        let ways = self.table.ways();
        for (i, w) in ways.iter().enumerate() {
            let w = w.load(Ordering::Relaxed);
            if free(&idle, w, now) {
                continue;
            }
            let value = value(w, now);
            f(&TrackedFlow {
                tuple: self.read_tuple(i),
                value,
                age: self.age(value.age),
                way: i,
                fp: w & ct::FP_MASK,
            });
        }
        ways.len() as u64
    }

    /// Whether a walked flow's tuple, completed into `key` (the VIP's address, protocol), is
    /// the one its way was written for: a tuple rewritten while the walk read it fails.
    pub fn holds(&self, flow: &TrackedFlow, key: &FlowKey) -> bool {
        let (b, fp) = self.place(key);
        b == flow.way / CT_WAYS && fp == flow.fp
    }

    /// Live ways (tracked flows).
    pub fn count(&self) -> usize {
        let now = self.now();
        let idle = self.geometry.idle;
        self.table
            .ways()
            .iter()
            .filter(|w| !free(&idle, w.load(Ordering::Relaxed), now))
            .count()
    }

    /// Every real id a live way names.
    pub fn real_ids(&self) -> BTreeSet<u32> {
        let now = self.now();
        let idle = self.geometry.idle;
        self.table
            .ways()
            .iter()
            .map(|w| w.load(Ordering::Relaxed))
            .filter(|w| !free(&idle, *w, now))
            .map(ct::real_of)
            .collect()
    }

    /// Empty every way (the benchmark starts each case on an empty table).
    pub fn clear(&self) {
        self.table
            .ways()
            .iter()
            .for_each(|w| w.store(0, Ordering::Relaxed));
    }

    /// Write a way directly (tests and the benchmark fill tables this way).
    pub fn put(&self, key: &FlowKey, real_id: u32, age_units: u32) -> bool {
        let now = self.now();
        let (b, fp) = self.place(key);
        let flags = ct::proto_flags(key.proto);
        let ways = self.table.ways();
        let Some(i) =
            (b * CT_WAYS..(b + 1) * CT_WAYS).find(|&i| ways[i].load(Ordering::Relaxed) == 0)
        else {
            return false;
        };
        self.write_tuple(i, key);
        ways[i].store(
            ct::way(real_id, fp, now.wrapping_sub(age_units), flags),
            Ordering::Release,
        );
        true
    }
}

fn tuple_words(t: &CtTuple) -> [u32; TUPLE_WORDS] {
    // SAFETY: CtTuple is 20 bytes of plain integers without padding.
    unsafe { std::mem::transmute::<CtTuple, [u32; TUPLE_WORDS]>(*t) }
}

impl FlowSource for FlowTable {
    fn real_flows(&self, real_id: u32, idle: Duration) -> Result<FlowCount, DataplaneError> {
        let start = Instant::now();
        let now = self.now();
        let limit = self.geometry.idle;
        let mut count = FlowCount::default();
        for w in self.table.ways() {
            let w = w.load(Ordering::Relaxed);
            count.scanned += 1;
            if ct::real_of(w) != real_id || free(&limit, w, now) || w & ct::F_SHORT != 0 {
                continue;
            }
            if self.age(age(w, now)) <= idle {
                count.flows += 1;
            }
        }
        count.elapsed = start.elapsed();
        Ok(count)
    }

    fn get(
        &self,
        key: &FlowKey,
        ours: &dyn Fn(u32) -> bool,
    ) -> Result<Option<(ConnValue, Duration)>, DataplaneError> {
        Ok(self.lookup(key, ours))
    }

    fn walk(&self, f: &mut dyn FnMut(&TrackedFlow)) -> Result<u64, DataplaneError> {
        Ok(self.walk_flows(f))
    }

    fn holds(&self, flow: &TrackedFlow, key: &FlowKey) -> bool {
        FlowTable::holds(self, flow, key)
    }
}

#[cfg(test)]
mod tests {
    use lb_common::{v4_mapped, IPPROTO_TCP};

    use super::*;

    fn key(port: u16) -> FlowKey {
        FlowKey {
            src: v4_mapped([192, 0, 2, 1]),
            dst: v4_mapped([10, 0, 0, 100]),
            src_port_be: port.to_be(),
            dst_port_be: 80u16.to_be(),
            proto: IPPROTO_TCP,
            _pad: [0; 3],
        }
    }

    fn table(now: Arc<AtomicU32>) -> FlowTable {
        let g = Geometry::new(
            64,
            0,
            1000,
            Duration::from_secs(900),
            Duration::from_secs(300),
            Duration::from_secs(10),
        );
        FlowTable::heap(g, Arc::new(move || now.load(Ordering::Relaxed)))
    }

    #[test]
    fn merge_inserts_refreshes_and_keeps_a_live_flow_of_another_real() {
        let now = Arc::new(AtomicU32::new(1000));
        let t = table(now.clone());
        let all = |_: u32| true;
        assert_eq!(t.merge(&key(1), 5, &all), Merge::Inserted);
        assert_eq!(t.lookup(&key(1), &all).map(|v| v.0.real_id), Some(5));
        now.store(1010, Ordering::Relaxed);
        assert_eq!(t.merge(&key(1), 5, &all), Merge::Refreshed);
        assert_eq!(t.lookup(&key(1), &all).map(|v| v.0.age), Some(0));
        assert_eq!(t.merge(&key(1), 6, &all), Merge::KeptOwn);
        // Not ours (the real serves another VIP): a flow of its own.
        assert_eq!(t.merge(&key(1), 7, &|id| id == 7), Merge::Inserted);
        assert_eq!(t.count(), 2);
        // Idle past TCP's idle time: free again, and the merge takes the way.
        now.store(1010 + t.geometry().idle.tcp + 1, Ordering::Relaxed);
        assert_eq!(t.lookup(&key(1), &all), None);
        assert_eq!(t.merge(&key(1), 6, &|id| id != 7), Merge::Inserted);
        assert_eq!(
            t.lookup(&key(1), &|id| id != 7).map(|v| v.0.real_id),
            Some(6)
        );
    }

    #[test]
    fn a_walk_reads_tuples_back_and_holds_checks_them() {
        let t = table(Arc::new(AtomicU32::new(7)));
        let all = |_: u32| true;
        for p in 0..40 {
            assert_eq!(t.merge(&key(p), 3, &all), Merge::Inserted, "port {p}");
        }
        let mut seen = Vec::new();
        let scanned = t.walk_flows(&mut |f| {
            let mut k = key(f.client_port());
            k.dst_port_be = f.dst_port().to_be();
            assert!(t.holds(f, &k));
            assert!(!t.holds(f, &key(f.client_port() + 1000)));
            seen.push(f.client_port());
        });
        seen.sort();
        assert_eq!(seen, (0..40).collect::<Vec<_>>());
        assert_eq!(scanned, 32 * 8);
        assert_eq!(t.real_ids(), BTreeSet::from([3]));
        let c = t.real_flows(3, Duration::MAX).expect("count");
        assert_eq!((c.flows, c.scanned), (40, 256));
    }

    #[test]
    fn units_are_at_most_a_second_and_fine_enough_for_short_idle_times() {
        let s = Duration::from_secs;
        let g = Geometry::new(1 << 20, 0, 1000, s(900), s(300), s(10));
        assert_eq!((g.shift, g.unit), (9, Duration::from_millis(512)));
        assert_eq!((g.idle.tcp, g.idle.udp, g.idle.closing), (1758, 586, 20));
        assert_eq!(g.buckets, 1 << 19);
        let g = Geometry::new(64, 0, 250, s(900), s(300), Duration::from_millis(200));
        assert_eq!((g.shift, g.unit), (1, Duration::from_millis(8)));
        assert_eq!(g.idle.closing, 25);
        let g = Geometry::new(64, 0, 1000, Duration::from_millis(1), s(300), s(10));
        assert_eq!((g.shift, g.idle.tcp), (0, 1));
    }

    #[test]
    fn a_full_bucket_has_no_room() {
        let t = table(Arc::new(AtomicU32::new(7)));
        let all = |_: u32| true;
        let (b0, _) = t.place(&key(0));
        let same: Vec<u16> = (1..u16::MAX)
            .filter(|p| t.place(&key(*p)).0 == b0)
            .take(9)
            .collect();
        for p in &same[..8] {
            assert_eq!(t.merge(&key(*p), 3, &all), Merge::Inserted);
        }
        assert_eq!(t.merge(&key(same[8]), 3, &all), Merge::NoRoom);
    }
}
