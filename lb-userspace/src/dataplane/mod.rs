//! The seam between the desired state and the kernel: everything the `Balancer` (and through
//! it the daemon) writes or reads goes through `Dataplane`. `ebpf::EbpfDataplane` is the real
//! one; `fake::FakeDataplane` keeps the maps in memory so the control logic is tested without
//! root. `neigh` reads the kernel's neighbour table, for the reals' MACs.

pub mod ctlog;
pub mod ebpf;
#[cfg(test)]
pub mod fake;
pub mod flowtable;
mod mmap;
pub mod neigh;

use flowtable::TrackedFlow;
use lb_common::{
    ConnValue, FlowKey, GlobalStats, Real, RealStats, VipAddrValue, VipKey, VipMeta, VipStats,
};

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("{op} on map {map} failed: {source}")]
    Map {
        op: &'static str,
        map: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {index} is out of range (limit {limit})")]
    OutOfRange {
        what: &'static str,
        index: u32,
        limit: u32,
    },
    #[error("ring of {got} slots given, the dataplane's ring size is {want}")]
    RingSize { got: usize, want: u32 },
    /// BPF_PROG_TEST_RUN of the loaded program failed.
    #[error("running the balancer program on a test frame: {0}")]
    TestRun(String),
    /// Pins or the link could not be removed or handled (`what` names the path).
    #[error("{what}: {source}")]
    Pin {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Sizes fixed when the program was loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_vips: u32,
    pub max_reals: u32,
    pub ring_size: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_vips: lb_common::DEFAULT_MAX_VIPS,
            max_reals: lb_common::DEFAULT_MAX_REALS,
            ring_size: lb_common::DEFAULT_RING_SIZE,
        }
    }
}

impl Limits {
    /// A vip_id the maps hold.
    pub fn check_vip(&self, vip_id: u32) -> Result<(), DataplaneError> {
        check_index("vip id", vip_id, self.max_vips)
    }

    /// A real_id the maps hold.
    pub fn check_real(&self, real_id: u32) -> Result<(), DataplaneError> {
        check_index("real id", real_id, self.max_reals)
    }

    /// A ring half to write: a valid vip_id and exactly `ring_size` slots.
    pub fn check_ring(&self, vip_id: u32, ring: &[u32]) -> Result<(), DataplaneError> {
        self.check_vip(vip_id)?;
        if ring.len() != self.ring_size as usize {
            return Err(DataplaneError::RingSize {
                got: ring.len(),
                want: self.ring_size,
            });
        }
        Ok(())
    }
}

fn check_index(what: &'static str, index: u32, limit: u32) -> Result<(), DataplaneError> {
    if index >= limit {
        return Err(DataplaneError::OutOfRange { what, index, limit });
    }
    Ok(())
}

/// The counters, summed over CPUs. A `Dataplane` reads them, and hands out independent
/// readers (`Dataplane::counter_reader`) so that figures can be read while the balancer writes.
pub trait CounterSource {
    fn vip_stats(&self, vip_id: u32) -> Result<VipStats, DataplaneError>;
    fn real_stats(&self, real_id: u32) -> Result<RealStats, DataplaneError>;
    fn global_stats(&self) -> Result<GlobalStats, DataplaneError>;
    /// Failed map syscalls so far (Katran's TOTAL_FAILED_BPF_CALLS): tests expect 0.
    fn failed_calls(&self) -> u64;
}

/// How many tracked flows a real has, read by a walk of the connection table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCount {
    /// Entries naming the real, not closing, and younger than the idle time asked for.
    pub flows: u64,
    /// Entries read.
    pub scanned: u64,
    pub elapsed: std::time::Duration,
}

/// The connection table, walked on demand apart from the dataplane (another thread).
pub trait FlowSource {
    /// The flows of `real_id` whose last packet is younger than `idle` and whose client has
    /// not closed (no FIN or RST seen).
    fn real_flows(
        &self,
        real_id: u32,
        idle: std::time::Duration,
    ) -> Result<FlowCount, DataplaneError>;

    /// The live entry of the flow of `key` (its packets' flow key) and its age, if the table
    /// has one; `ours` says which reals are the flow's VIP's (a fingerprint shared with a flow
    /// of another VIP is not this flow's).
    fn get(
        &self,
        key: &FlowKey,
        ours: &dyn Fn(u32) -> bool,
    ) -> Result<Option<(ConnValue, std::time::Duration)>, DataplaneError>;
    /// Every live entry; returns how many ways were read.
    fn walk(&self, f: &mut dyn FnMut(&TrackedFlow)) -> Result<u64, DataplaneError>;
    /// Whether a walked flow's tuple, completed into the flow key of its VIP, is the flow its
    /// entry was written for (`FlowTable::holds`).
    fn holds(&self, flow: &TrackedFlow, key: &FlowKey) -> bool;
}

/// What `Dataplane::conntrack_merge` did with a flow another balancer tracks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Merge {
    /// The table had no entry for it.
    Inserted,
    /// The table's entry names the same real: its time is refreshed.
    Refreshed,
    /// The table's entry names another real: this node's own decision stands.
    KeptOwn,
    /// The flow's bucket has no free way: it stays untracked here.
    NoRoom,
}

/// Everything done to the kernel's maps. Only the `Balancer` writes through it (the daemon
/// never writes a map around the balancer); reads are for adoption, checks and figures.
pub trait Dataplane: CounterSource {
    /// A reader of the counters that lives apart from the dataplane (another thread).
    type Reader: CounterSource + Send + Sync + 'static;
    /// A walker of the connection table that lives apart from the dataplane.
    type Flows: FlowSource + Send + Sync + 'static;

    fn limits(&self) -> Limits;

    fn set_vip(&mut self, key: &VipKey, vip_id: u32) -> Result<(), DataplaneError>;
    fn del_vip(&mut self, key: &VipKey) -> Result<(), DataplaneError>;
    /// Every VIP key present in the map (for adoption and for checks).
    fn vips(&self) -> Result<Vec<(VipKey, u32)>, DataplaneError>;

    fn set_vip_addr(&mut self, addr: &[u8; 16], value: &VipAddrValue)
        -> Result<(), DataplaneError>;
    fn del_vip_addr(&mut self, addr: &[u8; 16]) -> Result<(), DataplaneError>;
    /// Every entry of `VIP_ADDRS` (for adoption).
    fn vip_addrs(&self) -> Result<Vec<([u8; 16], VipAddrValue)>, DataplaneError>;

    /// NAT mode's reverse index (`REVNAT`); the dataplane keeps `CONF.revnat` equal to its
    /// number of entries.
    fn set_revnat(
        &mut self,
        key: &lb_common::RevNatKey,
        value: &lb_common::RevNat,
    ) -> Result<(), DataplaneError>;
    fn del_revnat(&mut self, key: &lb_common::RevNatKey) -> Result<(), DataplaneError>;
    /// Every entry of `REVNAT` (for adoption).
    fn revnats(&self) -> Result<Vec<(lb_common::RevNatKey, lb_common::RevNat)>, DataplaneError>;

    fn set_vip_meta(&mut self, vip_id: u32, meta: &VipMeta) -> Result<(), DataplaneError>;
    fn vip_meta(&self, vip_id: u32) -> Result<VipMeta, DataplaneError>;

    fn set_real(&mut self, real_id: u32, real: &Real) -> Result<(), DataplaneError>;
    fn real(&self, real_id: u32) -> Result<Real, DataplaneError>;

    /// Write a whole ring half (`ring.len()` must equal `limits().ring_size`).
    fn write_ring(
        &mut self,
        vip_id: u32,
        generation: u32,
        ring: &[u32],
    ) -> Result<(), DataplaneError>;
    fn read_ring(&self, vip_id: u32, generation: u32) -> Result<Vec<u32>, DataplaneError>;

    /// Zero the counters of an id about to be given to a new VIP or real: per-CPU counters
    /// outlive the VIP or real that last had the id.
    fn reset_vip_stats(&mut self, vip_id: u32) -> Result<(), DataplaneError>;
    fn reset_real_stats(&mut self, real_id: u32) -> Result<(), DataplaneError>;
    fn counter_reader(&self) -> Result<Self::Reader, DataplaneError>;
    fn flow_reader(&self) -> Result<Self::Flows, DataplaneError>;

    /// The real a tracked flow of `vip_id` is pinned to, if the connection table has the flow
    /// live (`key`: its packets' flow key).
    fn conntrack_get(
        &self,
        key: &FlowKey,
        vip_id: u32,
    ) -> Result<Option<ConnValue>, DataplaneError>;
    /// Tracked flows in the connection table (a walk of the table: not for every request).
    fn conntrack_count(&self) -> Result<usize, DataplaneError>;
    /// Take in a flow of `vip_id` another balancer tracks (flow sync), as fresh, never
    /// overriding a live entry that names another real.
    fn conntrack_merge(
        &mut self,
        key: &FlowKey,
        vip_id: u32,
        real_id: u32,
    ) -> Result<Merge, DataplaneError>;
    /// Every real id a tracked flow names (a walk of the table, for adoption).
    fn conntrack_real_ids(&self) -> Result<std::collections::BTreeSet<u32>, DataplaneError>;

    /// Wait until every program run that may have read the maps before this call has ended (an
    /// RCU grace period of the kernel's): what was unpublished before may then be reused.
    fn quiesce(&mut self) -> Result<(), DataplaneError>;

    /// Route `target = "vip"` health probes (lb_common::ProbeConf): attach the probe program
    /// to the probe namespace's veth and start handing replies back to it.
    fn enable_probes(&mut self, conf: &lb_common::ProbeConf) -> Result<(), DataplaneError>;
    /// Stop handing probe replies to the probe namespace and detach the probe program.
    fn disable_probes(&mut self) -> Result<(), DataplaneError>;

    /// How tunnel mode builds its outer headers (`TUNNEL[0]`).
    fn set_tunnel(&mut self, conf: &lb_common::TunnelConf) -> Result<(), DataplaneError>;
    fn tunnel(&self) -> Result<lb_common::TunnelConf, DataplaneError>;

    /// An interface tunnel reals leave by (`EGRESS` and the `TX_PORTS` devmap, keyed by its
    /// ifindex); written before any `REALS` entry names it.
    fn set_egress(&mut self, port: &lb_common::TxPort) -> Result<(), DataplaneError>;
    fn del_egress(&mut self, ifindex: u32) -> Result<(), DataplaneError>;

    /// Runs the loaded program once on `frame` (BPF_PROG_TEST_RUN): its action and output
    /// frame; `None` when there is no program (the fake).
    fn run_frame(&mut self, frame: &[u8]) -> Result<Option<(u32, Vec<u8>)>, DataplaneError>;

    /// Take the program off the interface (the pinned link is removed and closed). Once this
    /// succeeds, nothing forwards any more; on failure the program is still attached.
    fn detach(&mut self) -> Result<(), DataplaneError>;
    /// Remove the maps' pins (after `detach`: their contents go with the last reference).
    fn remove_pins(&mut self) -> Result<(), DataplaneError>;
}
