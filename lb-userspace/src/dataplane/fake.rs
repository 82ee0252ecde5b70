//! In-memory maps with the kernel's semantics (arrays zero-filled, hashes sparse), for the
//! control logic's tests. Every write is logged (`log`, in the order done, with the fake
//! clock's time when one is attached), and writes can be made to fail: `fail_at` fails the
//! write that would become log entry n, once; `fail_after` fails every write after n more.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use lb_common::{
    ConnValue, FlowKey, GlobalStats, Real, RealStats, VipAddrValue, VipKey, VipMeta, VipStats,
    REAL_F_ALIVE,
};

use super::{
    flowtable::{FlowTable, Geometry, TrackedFlow},
    CounterSource, Dataplane, DataplaneError, FlowCount, FlowSource, Limits,
};
use crate::core::clock::ManualClock;

/// Counters, shared with the readers handed out (tests set them to see them read or reset).
#[derive(Debug, Default)]
pub struct FakeCounters {
    pub vips: HashMap<u32, VipStats>,
    pub reals: HashMap<u32, RealStats>,
    pub global: GlobalStats,
}

#[derive(Clone, Debug, Default)]
pub struct FakeReader(pub Arc<Mutex<FakeCounters>>);

impl CounterSource for FakeReader {
    fn vip_stats(&self, vip_id: u32) -> Result<VipStats, DataplaneError> {
        let c = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(c.vips.get(&vip_id).copied().unwrap_or_default())
    }

    fn real_stats(&self, real_id: u32) -> Result<RealStats, DataplaneError> {
        let c = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(c.reals.get(&real_id).copied().unwrap_or_default())
    }

    fn global_stats(&self) -> Result<GlobalStats, DataplaneError> {
        Ok(self.0.lock().unwrap_or_else(PoisonError::into_inner).global)
    }

    fn failed_calls(&self) -> u64 {
        0
    }
}

/// The connection table, shared with the flow readers handed out: lb-common's table on the
/// heap (4 096 flows), on a clock that stands still (every entry stays as fresh as written).
#[derive(Clone)]
pub struct FakeConntrack(pub FlowTable);

impl Default for FakeConntrack {
    fn default() -> Self {
        let s = Duration::from_secs;
        let g = Geometry::new(4096, 0, 1000, s(900), s(300), s(10));
        FakeConntrack(FlowTable::heap(g, Arc::new(|| 1 << 20)))
    }
}

impl std::fmt::Debug for FakeConntrack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FakeConntrack({} flows)", self.0.count())
    }
}

impl FakeConntrack {
    /// Track a flow of `key` (its packets' flow key) on `real_id`.
    pub fn insert(&self, key: &FlowKey, real_id: u32) {
        assert!(self.0.put(key, real_id, 0), "the fake's bucket is full");
    }
}

impl FlowSource for FakeConntrack {
    fn real_flows(&self, real_id: u32, idle: Duration) -> Result<FlowCount, DataplaneError> {
        self.0.real_flows(real_id, idle)
    }

    fn get(
        &self,
        key: &FlowKey,
        ours: &dyn Fn(u32) -> bool,
    ) -> Result<Option<(ConnValue, Duration)>, DataplaneError> {
        Ok(self.0.lookup(key, ours))
    }

    fn walk(&self, f: &mut dyn FnMut(&TrackedFlow)) -> Result<u64, DataplaneError> {
        Ok(self.0.walk_flows(f))
    }

    fn holds(&self, flow: &TrackedFlow, key: &FlowKey) -> bool {
        self.0.holds(flow, key)
    }
}

#[derive(Debug, Default)]
pub struct FakeDataplane {
    pub limits: Limits,
    pub vips: HashMap<VipKey, u32>,
    pub vip_addrs: HashMap<[u8; 16], VipAddrValue>,
    pub revnat: HashMap<lb_common::RevNatKey, lb_common::RevNat>,
    pub vip_meta: HashMap<u32, VipMeta>,
    pub reals: HashMap<u32, Real>,
    pub rings: HashMap<(u32, u32), Vec<u32>>,
    pub conntrack: FakeConntrack,
    pub counters: FakeReader,
    /// Number of map writes done so far (ring halves count as one).
    pub writes: u64,
    pub ring_writes: u64,
    /// Every write, in order: `VIPS+3`, `VIPS-`, `ADDRS+`, `ADDRS-`, `META2:g1`, `META2-`,
    /// `REALS5+`, `REALS5-`, `RING2:g1`, `STATS-VIP2`, `STATS-REAL5`.
    pub log: Vec<String>,
    /// When each `log` entry was made, by `clock` (empty without one).
    pub log_at: Vec<Duration>,
    /// When `quiesce` was called (the clock's time; zero without one), and before which
    /// write (its index in `log`).
    pub quiesced: Vec<(usize, Duration)>,
    pub clock: Option<ManualClock>,
    pub fail_at: Option<usize>,
    pub fail_after: Option<u64>,
    pub attached: bool,
    pub pinned: bool,
    /// Make `detach` / `remove_pins` fail (once each).
    pub fail_detach: bool,
    pub fail_remove_pins: bool,
    /// What `enable_probes` set.
    pub probe: Option<lb_common::ProbeConf>,
    /// What `set_tunnel` set.
    pub tunnel: lb_common::TunnelConf,
    /// `EGRESS` / `TX_PORTS`, by ifindex.
    pub egress: std::collections::BTreeMap<u32, lb_common::TxPort>,
}

impl FakeDataplane {
    pub fn new(limits: Limits) -> Self {
        FakeDataplane {
            limits,
            attached: true,
            pinned: true,
            ..Default::default()
        }
    }

    /// Time-stamp the log with `clock` (the balancer's, so that grace periods show).
    pub fn with_clock(mut self, clock: ManualClock) -> Self {
        self.clock = Some(clock);
        self
    }

    fn write(&mut self, map: &'static str, event: String) -> Result<(), DataplaneError> {
        let fail = |map| DataplaneError::Map {
            op: "update",
            map,
            source: std::io::Error::from_raw_os_error(libc::ENOMEM),
        };
        if self.fail_at == Some(self.log.len()) {
            self.fail_at = None;
            return Err(fail(map));
        }
        if let Some(n) = self.fail_after {
            if n == 0 {
                return Err(fail(map));
            }
            self.fail_after = Some(n - 1);
        }
        self.writes += 1;
        self.note(event);
        Ok(())
    }

    fn note(&mut self, event: String) {
        self.log.push(event);
        if let Some(c) = &self.clock {
            self.log_at.push(c.elapsed());
        }
    }

    /// The log since the last call.
    pub fn take_log(&mut self) -> Vec<String> {
        self.log_at.clear();
        self.quiesced.clear();
        std::mem::take(&mut self.log)
    }

    /// The log since the last call, with a `QUIESCE` entry where `quiesce` was called and the
    /// clock's time of each entry.
    pub fn take_timed_log(&mut self) -> Vec<(String, Duration)> {
        let mut out = Vec::new();
        let mut quiesced = std::mem::take(&mut self.quiesced).into_iter().peekable();
        let log = std::mem::take(&mut self.log);
        let at = std::mem::take(&mut self.log_at);
        for (i, event) in log.into_iter().enumerate() {
            while let Some((_, t)) = quiesced.next_if(|(before, _)| *before <= i) {
                out.push(("QUIESCE".to_string(), t));
            }
            out.push((event, at.get(i).copied().unwrap_or_default()));
        }
        out.extend(quiesced.map(|(_, t)| ("QUIESCE".to_string(), t)));
        out
    }

    /// The live ring of a VIP, as the kernel would read it.
    pub fn live_ring(&self, vip_id: u32) -> Vec<u32> {
        let generation = self.vip_meta.get(&vip_id).map_or(0, |m| m.generation);
        self.read_ring(vip_id, generation)
            .unwrap_or_else(|_| vec![0; self.limits.ring_size as usize])
    }
}

impl CounterSource for FakeDataplane {
    fn vip_stats(&self, vip_id: u32) -> Result<VipStats, DataplaneError> {
        self.limits.check_vip(vip_id)?;
        self.counters.vip_stats(vip_id)
    }

    fn real_stats(&self, real_id: u32) -> Result<RealStats, DataplaneError> {
        self.limits.check_real(real_id)?;
        self.counters.real_stats(real_id)
    }

    fn global_stats(&self) -> Result<GlobalStats, DataplaneError> {
        self.counters.global_stats()
    }

    fn failed_calls(&self) -> u64 {
        0
    }
}

impl Dataplane for FakeDataplane {
    type Reader = FakeReader;
    type Flows = FakeConntrack;

    fn limits(&self) -> Limits {
        self.limits
    }

    fn set_vip(&mut self, key: &VipKey, vip_id: u32) -> Result<(), DataplaneError> {
        self.limits.check_vip(vip_id)?;
        self.write(lb_common::MAP_VIPS, format!("VIPS+{vip_id}"))?;
        self.vips.insert(*key, vip_id);
        Ok(())
    }

    fn del_vip(&mut self, key: &VipKey) -> Result<(), DataplaneError> {
        self.write(lb_common::MAP_VIPS, "VIPS-".to_string())?;
        self.vips.remove(key);
        Ok(())
    }

    fn vips(&self) -> Result<Vec<(VipKey, u32)>, DataplaneError> {
        Ok(self.vips.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn set_vip_addr(
        &mut self,
        addr: &[u8; 16],
        value: &VipAddrValue,
    ) -> Result<(), DataplaneError> {
        if !self.vip_addrs.contains_key(addr)
            && self.vip_addrs.len() >= self.limits.max_vips as usize
        {
            // A hash map at max_entries refuses new keys, as the kernel's does.
            return Err(DataplaneError::Map {
                op: "update",
                map: lb_common::MAP_VIP_ADDRS,
                source: std::io::Error::from_raw_os_error(libc::E2BIG),
            });
        }
        self.write(lb_common::MAP_VIP_ADDRS, "ADDRS+".to_string())?;
        self.vip_addrs.insert(*addr, *value);
        Ok(())
    }

    fn del_vip_addr(&mut self, addr: &[u8; 16]) -> Result<(), DataplaneError> {
        self.write(lb_common::MAP_VIP_ADDRS, "ADDRS-".to_string())?;
        self.vip_addrs.remove(addr);
        Ok(())
    }

    fn vip_addrs(&self) -> Result<Vec<([u8; 16], VipAddrValue)>, DataplaneError> {
        Ok(self.vip_addrs.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn set_revnat(
        &mut self,
        key: &lb_common::RevNatKey,
        value: &lb_common::RevNat,
    ) -> Result<(), DataplaneError> {
        self.write(lb_common::MAP_REVNAT, "REVNAT+".to_string())?;
        self.revnat.insert(*key, *value);
        Ok(())
    }

    fn del_revnat(&mut self, key: &lb_common::RevNatKey) -> Result<(), DataplaneError> {
        self.write(lb_common::MAP_REVNAT, "REVNAT-".to_string())?;
        self.revnat.remove(key);
        Ok(())
    }

    fn revnats(&self) -> Result<Vec<(lb_common::RevNatKey, lb_common::RevNat)>, DataplaneError> {
        Ok(self.revnat.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn set_vip_meta(&mut self, vip_id: u32, meta: &VipMeta) -> Result<(), DataplaneError> {
        self.limits.check_vip(vip_id)?;
        let event = if meta.in_use == 0 {
            format!("META{vip_id}-")
        } else {
            format!("META{vip_id}:g{}", meta.generation)
        };
        self.write(lb_common::MAP_VIP_META, event)?;
        self.vip_meta.insert(vip_id, *meta);
        Ok(())
    }

    fn vip_meta(&self, vip_id: u32) -> Result<VipMeta, DataplaneError> {
        self.limits.check_vip(vip_id)?;
        Ok(self.vip_meta.get(&vip_id).copied().unwrap_or_default())
    }

    fn set_real(&mut self, real_id: u32, real: &Real) -> Result<(), DataplaneError> {
        self.limits.check_real(real_id)?;
        let sign = if real.flags & REAL_F_ALIVE != 0 {
            '+'
        } else {
            '-'
        };
        self.write(lb_common::MAP_REALS, format!("REALS{real_id}{sign}"))?;
        self.reals.insert(real_id, *real);
        Ok(())
    }

    fn real(&self, real_id: u32) -> Result<Real, DataplaneError> {
        self.limits.check_real(real_id)?;
        Ok(self.reals.get(&real_id).copied().unwrap_or_default())
    }

    fn write_ring(
        &mut self,
        vip_id: u32,
        generation: u32,
        ring: &[u32],
    ) -> Result<(), DataplaneError> {
        self.limits.check_ring(vip_id, ring)?;
        self.write(
            lb_common::MAP_RING,
            format!("RING{vip_id}:g{}", generation & 1),
        )?;
        self.ring_writes += 1;
        self.rings.insert((vip_id, generation & 1), ring.to_vec());
        Ok(())
    }

    fn read_ring(&self, vip_id: u32, generation: u32) -> Result<Vec<u32>, DataplaneError> {
        self.limits.check_vip(vip_id)?;
        Ok(self
            .rings
            .get(&(vip_id, generation & 1))
            .cloned()
            .unwrap_or_else(|| vec![0; self.limits.ring_size as usize]))
    }

    fn reset_vip_stats(&mut self, vip_id: u32) -> Result<(), DataplaneError> {
        self.limits.check_vip(vip_id)?;
        self.write(lb_common::MAP_STATS_VIP, format!("STATS-VIP{vip_id}"))?;
        let mut c = self
            .counters
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        c.vips.remove(&vip_id);
        Ok(())
    }

    fn reset_real_stats(&mut self, real_id: u32) -> Result<(), DataplaneError> {
        self.limits.check_real(real_id)?;
        self.write(lb_common::MAP_STATS_REAL, format!("STATS-REAL{real_id}"))?;
        let mut c = self
            .counters
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        c.reals.remove(&real_id);
        Ok(())
    }

    fn counter_reader(&self) -> Result<FakeReader, DataplaneError> {
        Ok(self.counters.clone())
    }

    fn flow_reader(&self) -> Result<FakeConntrack, DataplaneError> {
        Ok(self.conntrack.clone())
    }

    fn enable_probes(&mut self, conf: &lb_common::ProbeConf) -> Result<(), DataplaneError> {
        self.probe = Some(*conf);
        Ok(())
    }

    fn set_tunnel(&mut self, conf: &lb_common::TunnelConf) -> Result<(), DataplaneError> {
        self.tunnel = *conf;
        Ok(())
    }

    fn tunnel(&self) -> Result<lb_common::TunnelConf, DataplaneError> {
        Ok(self.tunnel)
    }

    fn set_egress(&mut self, port: &lb_common::TxPort) -> Result<(), DataplaneError> {
        self.write(lb_common::MAP_EGRESS, format!("EGRESS{}+", port.ifindex))?;
        self.egress.insert(port.ifindex, *port);
        Ok(())
    }

    fn run_frame(&mut self, _frame: &[u8]) -> Result<Option<(u32, Vec<u8>)>, DataplaneError> {
        Ok(None)
    }

    fn del_egress(&mut self, ifindex: u32) -> Result<(), DataplaneError> {
        self.write(lb_common::MAP_EGRESS, format!("EGRESS{ifindex}-"))?;
        self.egress.remove(&ifindex);
        Ok(())
    }

    fn disable_probes(&mut self) -> Result<(), DataplaneError> {
        self.probe = None;
        Ok(())
    }

    fn conntrack_get(
        &self,
        key: &FlowKey,
        vip_id: u32,
    ) -> Result<Option<ConnValue>, DataplaneError> {
        let ours = |id: u32| self.reals.get(&id).is_some_and(|r| r.vip_id == vip_id);
        Ok(self.conntrack.0.lookup(key, &ours).map(|(v, _)| v))
    }

    fn conntrack_merge(
        &mut self,
        key: &FlowKey,
        vip_id: u32,
        real_id: u32,
    ) -> Result<crate::dataplane::Merge, DataplaneError> {
        let ours = |id: u32| self.reals.get(&id).is_some_and(|r| r.vip_id == vip_id);
        Ok(self.conntrack.0.merge(key, real_id, &ours))
    }

    fn conntrack_count(&self) -> Result<usize, DataplaneError> {
        Ok(self.conntrack.0.count())
    }

    fn conntrack_real_ids(&self) -> Result<std::collections::BTreeSet<u32>, DataplaneError> {
        Ok(self.conntrack.0.real_ids())
    }

    fn quiesce(&mut self) -> Result<(), DataplaneError> {
        let at = self
            .clock
            .as_ref()
            .map(ManualClock::elapsed)
            .unwrap_or_default();
        self.quiesced.push((self.log.len(), at));
        Ok(())
    }

    fn detach(&mut self) -> Result<(), DataplaneError> {
        if std::mem::take(&mut self.fail_detach) {
            return Err(DataplaneError::Pin {
                what: "removing the pinned link".into(),
                source: std::io::Error::from_raw_os_error(libc::EBUSY),
            });
        }
        self.attached = false;
        Ok(())
    }

    fn remove_pins(&mut self) -> Result<(), DataplaneError> {
        if std::mem::take(&mut self.fail_remove_pins) {
            return Err(DataplaneError::Pin {
                what: "removing the map pins".into(),
                source: std::io::Error::from_raw_os_error(libc::EACCES),
            });
        }
        self.pinned = false;
        Ok(())
    }
}
