//! The kernel's log of new flows' tuples (`CT_LOG`, `CT_LOG_HEADS`: lb-common's
//! `ct::CtLogEntry`), drained into `CONNTRACK_KEYS`. The kernel writes each CPU's part in
//! turn and counts the entries in its head; userspace reads both through shared mappings and
//! files each tuple with `FlowTable::file`, which writes it only while its way still holds its
//! fingerprint. What the kernel overwrote before it was read is counted as lost: those flows
//! stay tracked and keep their real, but walks (`xlb conns`, flow sync) do not see them.

use std::{
    os::fd::BorrowedFd,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::Duration,
};

use lb_common::ct::{CtLogEntry, CT_LOG_HEAD_STRIDE, CT_LOG_SLOTS};

use super::{flowtable::FlowTable, mmap::map_shared};

const SLOTS: u64 = CT_LOG_SLOTS as u64;

/// A shared mapping, unmapped on drop.
struct Mapping(*mut libc::c_void, usize);

// SAFETY: the mapping is only read and written through atomics and volatile reads.
unsafe impl Send for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map_shared` mapped.
        unsafe { libc::munmap(self.0, self.1) };
    }
}

/// What a drain did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drained {
    /// Entries read.
    pub read: u64,
    /// Tuples written (the rest named a way that had moved on: a flow gone or replaced).
    pub filed: u64,
    /// Entries the kernel overwrote before they were read.
    pub lost: u64,
}

/// The log's memory: each CPU's entries and heads.
enum Memory {
    Mapped {
        entries: Mapping,
        heads: Mapping,
    },
    #[cfg(test)]
    Heap {
        entries: Vec<CtLogEntry>,
        heads: Vec<AtomicU64>,
    },
}

pub struct CtLog {
    memory: Memory,
    cpus: usize,
    /// Per CPU: the next entry to read.
    tails: Vec<u64>,
    buf: Vec<(u64, CtLogEntry)>,
}

impl CtLog {
    /// The kernel's log of `cpus` CPUs. Reading starts a whole log back, so that what a
    /// previous daemon had not read yet is filed (filing twice is harmless).
    pub fn mapped(
        entries: BorrowedFd<'_>,
        heads: BorrowedFd<'_>,
        cpus: usize,
    ) -> std::io::Result<CtLog> {
        let e = map_shared(entries, Self::entries_bytes(cpus))?;
        let e = Mapping(e.0, e.1);
        let h = map_shared(heads, cpus * CT_LOG_HEAD_STRIDE as usize * 8)?;
        let mut log = CtLog {
            memory: Memory::Mapped {
                entries: e,
                heads: Mapping(h.0, h.1),
            },
            cpus,
            tails: vec![0; cpus],
            buf: Vec::new(),
        };
        for cpu in 0..cpus {
            log.tails[cpu] = log.head(cpu).saturating_sub(SLOTS - 1);
        }
        Ok(log)
    }

    /// Bytes of `CT_LOG` for `cpus` CPUs.
    pub fn entries_bytes(cpus: usize) -> usize {
        cpus * CT_LOG_SLOTS as usize * std::mem::size_of::<CtLogEntry>()
    }

    fn head(&self, cpu: usize) -> u64 {
        let at = cpu * CT_LOG_HEAD_STRIDE as usize;
        match &self.memory {
            Memory::Mapped { heads, .. } => {
                // SAFETY: within the mapping (`cpus` heads); the kernel writes it as one u64.
                let p = unsafe { (heads.0 as *const AtomicU64).add(at) };
                // SAFETY: as above; aligned (the array's elements are 8 bytes).
                unsafe { (*p).load(Ordering::Acquire) }
            }
            #[cfg(test)]
            Memory::Heap { heads, .. } => heads[at].load(Ordering::Acquire),
        }
    }

    fn entry(&self, cpu: usize, index: u64) -> CtLogEntry {
        let at = cpu * CT_LOG_SLOTS as usize + (index % SLOTS) as usize;
        match &self.memory {
            Memory::Mapped { entries, .. } => {
                // SAFETY: within the mapping; a volatile read of memory the kernel writes
                // (whether it did meanwhile is checked against the head after).
                unsafe { std::ptr::read_volatile((entries.0 as *const CtLogEntry).add(at)) }
            }
            #[cfg(test)]
            Memory::Heap { entries, .. } => entries[at],
        }
    }

    /// File every entry logged since the last drain into `table`.
    pub fn drain(&mut self, table: &FlowTable) -> Drained {
        let mut d = Drained::default();
        for cpu in 0..self.cpus {
            let head = self.head(cpu);
            let mut tail = self.tails[cpu];
            if head < tail {
                // A log that started again (never with pinned maps): from its start.
                tail = head.saturating_sub(SLOTS - 1);
            }
            // The oldest entry of a full log is the one the kernel's next write reuses.
            if head - tail >= SLOTS {
                d.lost += head - tail - (SLOTS - 1);
                tail = head - (SLOTS - 1);
            }
            let mut buf = std::mem::take(&mut self.buf);
            buf.clear();
            buf.extend((tail..head).map(|i| (i, self.entry(cpu, i))));
            // Entry i is rewritten once the kernel logs entry i + SLOTS, which starts when
            // the head reaches it: what was read at or past that point may be torn.
            let after = self.head(cpu);
            for (i, e) in &buf {
                d.read += 1;
                if i + SLOTS <= after {
                    d.lost += 1;
                } else if table.file(e) {
                    d.filed += 1;
                }
            }
            self.buf = buf;
            self.tails[cpu] = head;
        }
        d
    }
}

/// A thread draining the log every millisecond (at once again while it finds entries), and
/// what it did so far; stopped on drop.
pub struct Drainer {
    log: Arc<Mutex<CtLog>>,
    table: FlowTable,
    stop: Arc<AtomicBool>,
    lost: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Drainer {
    pub fn start(log: CtLog, table: FlowTable) -> std::io::Result<Drainer> {
        let log = Arc::new(Mutex::new(log));
        let stop = Arc::new(AtomicBool::new(false));
        let lost = Arc::new(AtomicU64::new(0));
        let thread = std::thread::Builder::new()
            .name("xlb-ct-log".into())
            .spawn({
                let (log, table, stop, lost) =
                    (log.clone(), table.clone(), stop.clone(), lost.clone());
                move || {
                    let mut warned = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let d = match log.lock() {
                            Ok(mut l) => l.drain(&table),
                            Err(_) => return,
                        };
                        if d.lost > 0 {
                            let total = lost.fetch_add(d.lost, Ordering::Relaxed) + d.lost;
                            // A line per tenfold: a flood says so without flooding the log.
                            if total >= warned * 10 {
                                log::warn!(
                                "{total} new flows' tuples were overwritten in the kernel's log \
                                 before they were read: those flows are tracked, but not \
                                 listed or synced"
                            );
                                warned = total.max(1);
                            }
                        }
                        if d.read == 0 {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                }
            })?;
        Ok(Drainer {
            log,
            table,
            stop,
            lost,
            thread: Some(thread),
        })
    }

    /// Drain now, on the calling thread (before a test run, so that it sees every tuple the
    /// runs before it logged).
    pub fn drain_now(&self) -> Drained {
        match self.log.lock() {
            Ok(mut l) => {
                let d = l.drain(&self.table);
                self.lost.fetch_add(d.lost, Ordering::Relaxed);
                d
            }
            Err(_) => Drained::default(),
        }
    }

    /// Tuples lost so far.
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }
}

impl Drop for Drainer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use lb_common::{ct, FlowKey, IPPROTO_TCP};

    use super::*;
    use crate::dataplane::flowtable::Geometry;

    fn table() -> FlowTable {
        table_for(1024)
    }

    fn table_for(flows: u32) -> FlowTable {
        let g = Geometry::new(
            flows,
            0,
            1000,
            Duration::from_secs(900),
            Duration::from_secs(300),
            Duration::from_secs(10),
        );
        FlowTable::heap(g, Arc::new(|| 1 << 20))
    }

    fn key(i: u32) -> FlowKey {
        FlowKey {
            src: lb_common::v4_mapped(0xC000_0200u32.wrapping_add(i).to_be_bytes()),
            dst: lb_common::v4_mapped([10, 0, 0, 100]),
            src_port_be: 40000u16.to_be(),
            dst_port_be: 80u16.to_be(),
            proto: IPPROTO_TCP,
            _pad: [0; 3],
        }
    }

    fn heap_log(cpus: usize) -> CtLog {
        CtLog {
            memory: Memory::Heap {
                entries: vec![CtLogEntry::default(); cpus * CT_LOG_SLOTS as usize],
                heads: (0..cpus * CT_LOG_HEAD_STRIDE as usize)
                    .map(|_| AtomicU64::new(0))
                    .collect(),
            },
            cpus,
            tails: vec![0; cpus],
            buf: Vec::new(),
        }
    }

    /// What the kernel does for a new flow: the way (here through `put`, which also writes the
    /// tuple: cleared after, so that only the log can bring it back), then the entry, then
    /// the head.
    fn kernel_insert(log: &mut CtLog, table: &FlowTable, cpu: usize, k: &FlowKey) {
        assert!(table.put(k, 1, 0));
        let (bucket, way, fp) = table.way_of(k).expect("the way just put");
        table.clear_tuple(bucket, way);
        let Memory::Heap { entries, heads } = &mut log.memory else {
            unreachable!()
        };
        let h = &heads[cpu * CT_LOG_HEAD_STRIDE as usize];
        let n = h.load(Ordering::Relaxed);
        entries[cpu * CT_LOG_SLOTS as usize + (n % SLOTS) as usize] = CtLogEntry {
            tuple: ct::CtTuple::of(k),
            bucket,
            slot: CtLogEntry::slot_of(way, fp),
            _pad: 0,
        };
        h.store(n + 1, Ordering::Release);
    }

    #[test]
    fn logged_tuples_are_filed_and_walks_see_them() {
        let (table, mut log) = (table(), heap_log(2));
        for i in 0..100 {
            kernel_insert(&mut log, &table, (i % 2) as usize, &key(i));
        }
        let seen = |t: &FlowTable| {
            let mut n = 0;
            t.walk_flows(&mut |f| {
                let mut k = key(0);
                k.src = f.tuple.src;
                k.src_port_be = f.client_port().to_be();
                if t.holds(f, &k) {
                    n += 1;
                }
            });
            n
        };
        assert_eq!(seen(&table), 0, "no tuple before the drain");
        let d = log.drain(&table);
        assert_eq!((d.read, d.filed, d.lost), (100, 100, 0));
        assert_eq!(seen(&table), 100);
        assert_eq!(log.drain(&table), Drained::default(), "nothing twice");
    }

    #[test]
    fn an_entry_whose_way_moved_on_is_not_filed() {
        let (table, mut log) = (table(), heap_log(1));
        kernel_insert(&mut log, &table, 0, &key(1));
        let (bucket, way, _) = table.way_of(&key(1)).expect("way");
        table.clear();
        let d = log.drain(&table);
        assert_eq!((d.read, d.filed), (1, 0), "the way is empty now");
        assert_eq!(table.tuple_at(bucket, way), ct::CtTuple::default());
    }

    #[test]
    fn a_lapped_log_counts_what_it_lost_and_files_the_rest() {
        let (table, mut log) = (table_for(1 << 16), heap_log(1));
        // 500 more than the log holds: the oldest 500 entries are overwritten unread, and the
        // next write would reuse the oldest one left (not read either).
        let n = CT_LOG_SLOTS + 500;
        for i in 0..n {
            kernel_insert(&mut log, &table, 0, &key(i));
        }
        let d = log.drain(&table);
        assert_eq!(
            (d.read, d.filed, d.lost),
            (SLOTS - 1, SLOTS - 1, 501),
            "{d:?}"
        );
        let (b, w, _) = table.way_of(&key(0)).expect("way");
        assert_eq!(table.tuple_at(b, w), ct::CtTuple::default(), "lost");
        let (b, w, _) = table.way_of(&key(n - 1)).expect("way");
        assert_eq!(table.tuple_at(b, w), ct::CtTuple::of(&key(n - 1)), "filed");
    }
}
