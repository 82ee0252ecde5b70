//! `xlb real flows`: a walk of the connection table on demand, in batches of entries per
//! syscall (BPF_MAP_LOOKUP_BATCH; aya has no batch operations), falling back to a key-by-key
//! walk on kernels without it. Ages are in jiffies, as the kernel keeps them.

use std::{
    os::fd::{AsRawFd, OwnedFd},
    time::{Duration, Instant},
};

use lb_common::{ConnValue, CtKey, CT_F_CLOSING};

use crate::dataplane::{DataplaneError, FlowCount, FlowSource};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Entries asked for per syscall; a bucket with more entries than this (ENOSPC) doubles it.
const CHUNK: usize = 4096;

/// `union bpf_attr` for the batch operations.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// The kernel's jiffies from the monotonic clock, anchored once with a reading of both.
#[derive(Clone, Copy, Debug)]
pub struct Jiffies {
    pub hz: u64,
    pub at_jiffies: u64,
    pub at_mono_ns: u64,
}

impl Jiffies {
    pub(super) fn now(&self) -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes into a timespec we own.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let ns = ts.tv_sec.max(0) as u64 * 1_000_000_000 + ts.tv_nsec.max(0) as u64;
        let elapsed = ns.saturating_sub(self.at_mono_ns);
        self.at_jiffies
            .wrapping_add((u128::from(elapsed) * u128::from(self.hz) / 1_000_000_000) as u64)
    }

    fn of(&self, d: Duration) -> u64 {
        (d.as_nanos() * u128::from(self.hz) / 1_000_000_000).min(u128::from(u64::MAX)) as u64
    }
}

/// A second handle to the connection table, walked by `real_flows`.
pub struct EbpfFlows {
    pub(super) fd: OwnedFd,
    pub(super) clock: Jiffies,
}

fn walk_err(source: std::io::Error) -> DataplaneError {
    DataplaneError::Map {
        op: "walk",
        map: lb_common::MAP_CONNTRACK,
        source,
    }
}

impl EbpfFlows {
    /// Every entry, in batches; `f` sees each. `Ok(false)`: the kernel has no batch lookup.
    fn batches(&self, f: &mut dyn FnMut(&CtKey, &ConnValue)) -> Result<bool, DataplaneError> {
        let mut chunk = CHUNK;
        let mut keys = vec![CtKey::default(); chunk];
        let mut values = vec![ConnValue::default(); chunk];
        let mut token = [0u64; 1];
        let mut first = true;
        loop {
            let mut next = [0u64; 1];
            let mut attr = BatchAttr {
                in_batch: if first { 0 } else { token.as_ptr() as u64 },
                out_batch: next.as_mut_ptr() as u64,
                keys: keys.as_mut_ptr() as u64,
                values: values.as_mut_ptr() as u64,
                count: chunk as u32,
                map_fd: self.fd.as_raw_fd() as u32,
                ..BatchAttr::default()
            };
            // SAFETY: the attribute points at buffers of `count` keys and values and at two
            // 8-byte batch tokens (the hash map's is 4 bytes), all alive for the call.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_MAP_LOOKUP_BATCH,
                    &mut attr as *mut BatchAttr,
                    std::mem::size_of::<BatchAttr>(),
                )
            };
            let err = (rc < 0).then(std::io::Error::last_os_error);
            let n = (attr.count as usize).min(chunk);
            match err.as_ref().and_then(std::io::Error::raw_os_error) {
                None | Some(libc::ENOENT) => {
                    keys[..n]
                        .iter()
                        .zip(&values[..n])
                        .for_each(|(k, v)| f(k, v));
                    if err.is_some() {
                        return Ok(true);
                    }
                    token = next;
                    first = false;
                }
                Some(libc::ENOSPC) if chunk < 1 << 20 => {
                    // A bucket holds more entries than asked for: ask for more.
                    chunk *= 2;
                    keys.resize(chunk, CtKey::default());
                    values.resize(chunk, ConnValue::default());
                }
                Some(libc::EINVAL | libc::ENOTSUP | libc::EOPNOTSUPP) if first => return Ok(false),
                _ => return Err(walk_err(err.unwrap_or_else(std::io::Error::last_os_error))),
            }
        }
    }

    /// Key by key (BPF_MAP_GET_NEXT_KEY and a lookup per entry).
    fn one_by_one(&self, f: &mut dyn FnMut(&CtKey, &ConnValue)) -> Result<(), DataplaneError> {
        let data = aya::maps::MapData::from_fd(self.fd.try_clone().map_err(walk_err)?)
            .map_err(|e| walk_err(std::io::Error::other(e.to_string())))?;
        let map: aya::maps::HashMap<_, CtKey, ConnValue> =
            aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data))
                .map_err(|e| walk_err(std::io::Error::other(e.to_string())))?;
        for entry in map.iter() {
            match entry {
                Ok((k, v)) => f(&k, &v),
                // Evicted while the walk passed it.
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(walk_err(std::io::Error::other(e.to_string()))),
            }
        }
        Ok(())
    }
}

impl EbpfFlows {
    /// Time since `v`'s last refresh, at jiffies `now`.
    fn age(&self, now: u64, v: &ConnValue) -> Duration {
        let age = now.wrapping_sub(v.last_seen);
        // A refresh after `now` was read looks like a huge age: it is fresh.
        let age = if age > u64::MAX / 2 { 0 } else { age };
        let nanos = u128::from(age) * 1_000_000_000 / u128::from(self.clock.hz.max(1));
        Duration::from_nanos(nanos.min(u128::from(u64::MAX)) as u64)
    }
}

impl FlowSource for EbpfFlows {
    fn real_flows(&self, real_id: u32, idle: Duration) -> Result<FlowCount, DataplaneError> {
        let start = Instant::now();
        let (now, idle) = (self.clock.now(), self.clock.of(idle));
        let mut count = FlowCount::default();
        let mut visit = |_: &CtKey, v: &ConnValue| {
            count.scanned += 1;
            if v.real_id == real_id
                && v.flags & CT_F_CLOSING == 0
                && now.wrapping_sub(v.last_seen) <= idle
            {
                count.flows += 1;
            }
        };
        if !self.batches(&mut visit)? {
            self.one_by_one(&mut visit)?;
        }
        count.elapsed = start.elapsed();
        Ok(count)
    }

    fn get(&self, key: &CtKey) -> Result<Option<(ConnValue, Duration)>, DataplaneError> {
        let data = aya::maps::MapData::from_fd(self.fd.try_clone().map_err(walk_err)?)
            .map_err(|e| walk_err(std::io::Error::other(e.to_string())))?;
        let map: aya::maps::HashMap<_, CtKey, ConnValue> =
            aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data))
                .map_err(|e| walk_err(std::io::Error::other(e.to_string())))?;
        match map.get(key, 0) {
            Ok(v) => Ok(Some((v, self.age(self.clock.now(), &v)))),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(walk_err(std::io::Error::other(e.to_string()))),
        }
    }

    fn walk(&self, f: &mut dyn FnMut(&CtKey, &ConnValue, Duration)) -> Result<u64, DataplaneError> {
        let now = self.clock.now();
        let mut n = 0u64;
        let mut visit = |k: &CtKey, v: &ConnValue| {
            n += 1;
            f(k, v, self.age(now, v));
        };
        if !self.batches(&mut visit)? {
            self.one_by_one(&mut visit)?;
        }
        Ok(n)
    }
}
