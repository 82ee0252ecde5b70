//! The one part that talks to aya: loads the embedded balancer object with its limits (`load`),
//! checks and adopts pinned maps (`pins`), attaches or adopts the pinned XDP link (`link`), and
//! implements `Dataplane` over the real maps, rings through mmap (`ring`).
//!
//! It must not decide anything: what to write, and in which order, is the `Balancer`'s.

pub mod decap;
mod filter;
mod flows;
mod link;
mod load;
mod pins;
mod probe;
mod ring;
pub mod trace;

use std::{
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use aya::{
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues},
    programs::{links::PinnedLink, ProgramError, ProgramFd, TestRun, TestRunOptions},
    Ebpf, EbpfLoader, Pod,
};
use lb_common::{
    Conf, ConnValue, FlowKey, GlobalStats, Layout, ProbeConf, Real, RealStats, TunnelConf,
    VipAddrValue, VipKey, VipMeta, VipStats, IPPROTO_TCP, IPPROTO_UDP, LAYOUT_VERSION,
};
use link::program_mut;
pub use link::{is_busy, AttachMode, Attached};
pub use load::{kernel_hz, load_aux, LoadOptions, AUX_OBJECT, BALANCER_OBJECT};
use pins::check_pins;
pub use pins::{link_pin, link_pins, other_link_pin, remove_pins, LINK_PIN};
use ring::RingMmap;

use crate::dataplane::{
    flowtable::{FlowTable, Geometry},
    CounterSource, Dataplane, DataplaneError, Limits,
};

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("invalid limit {field}: {reason}")]
    Limit { field: &'static str, reason: String },
    #[error("loading the XDP object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map {0} is missing from the XDP object")]
    MissingMap(&'static str),
    #[error("mmap of map {name} ({bytes} bytes): {source}")]
    Mmap {
        name: &'static str,
        bytes: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("counting the possible CPUs: {0}")]
    Cpus(#[source] std::io::Error),
    #[error("starting the thread that files new flows' tuples: {0}")]
    Thread(#[source] std::io::Error),
    #[error("attaching XDP to {iface}: {source}")]
    Attach {
        iface: String,
        #[source]
        source: ProgramError,
    },
    #[error(
        "the maps pinned at {dir} do not fit this daemon: {reason}; start with the limits \
         they were made with, or remove them with `xlb down --iface IFACE [--pin-root DIR]` \
         (forwarding stops)"
    )]
    PinMismatch { dir: String, reason: String },
    #[error("pinning {path}: {reason}")]
    Pin { path: String, reason: String },
}

/// The reader of the XDP program's log records, forwarded to the `log` crate.
pub type KernelLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// The counter maps. The dataplane holds one set (it zeroes entries of new ids); readers get
/// their own fds to the same maps (`Dataplane::counter_reader`), for another thread.
pub struct EbpfCounters {
    stats_vip: PerCpuArray<MapData, VipStats>,
    stats_real: PerCpuArray<MapData, RealStats>,
    stats_global: PerCpuArray<MapData, GlobalStats>,
    limits: Limits,
    /// Failed map syscalls since load (Katran's TOTAL_FAILED_BPF_CALLS), shared by all.
    failed_calls: Arc<AtomicU64>,
}

/// The loaded balancer: its program, its maps, the RING mapping and the pinned link.
pub struct EbpfDataplane {
    ebpf: Ebpf,
    limits: Limits,
    vips: HashMap<MapData, VipKey, u32>,
    /// `VIP_ADDRS` and `VIP_FILTER`, written together.
    vip_addrs: filter::VipAddrs,
    revnat: HashMap<MapData, lb_common::RevNatKey, lb_common::RevNat>,
    /// `NAT_FILTER`, over `revnat`'s addresses; its entry count is what `CONF.revnat` holds.
    nat_filter: filter::NatFilter,
    /// Holds `xlb_nat` for the balancer's tail calls (unpinned loads keep it alive so).
    _nat_progs: aya::maps::ProgramArray<MapData>,
    vip_meta: Array<MapData, VipMeta>,
    reals: Array<MapData, Real>,
    ring: RingMmap,
    counters: EbpfCounters,
    /// Spare fds of the counter maps (VIP, real, global), for `counter_reader`.
    counter_fds: [OwnedFd; 3],
    conf: Array<MapData, Conf>,
    /// The connection table, mmapped (readers share the mapping).
    flows: FlowTable,
    /// Files the tuples the kernel logs for new flows into the table.
    ct_log: crate::dataplane::ctlog::Drainer,
    probe: Array<MapData, ProbeConf>,
    tunnel: Array<MapData, TunnelConf>,
    tx_ports: aya::maps::DevMapHash<MapData>,
    egress: HashMap<MapData, u32, lb_common::TxPort>,
    /// The probe program's attachment to the probe namespace's veth, while there is one.
    probe_link: Option<aya::programs::xdp::XdpLinkId>,
    /// The pinned links of every interface the balancer is attached to.
    links: Vec<PinnedLink>,
    /// Where the maps (and the link, once attached) are pinned, if they are.
    pin_dir: Option<PathBuf>,
    /// Reader of the kernel side's aya-log records (rare-path errors only); the daemon polls
    /// it, tests flush it.
    logger: Option<KernelLogger>,
    tracer: Option<trace::Tracer>,
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, EbpfError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(EbpfError::MissingMap(name))?;
    T::try_from(map).map_err(|source| EbpfError::Map { name, source })
}

/// A map error as the `Dataplane` reports it, counted.
fn dp_err(
    failed: &AtomicU64,
    op: &'static str,
    map: &'static str,
    source: MapError,
) -> DataplaneError {
    failed.fetch_add(1, Ordering::Relaxed);
    let source = match source {
        MapError::SyscallError(e) => e.io_error,
        other => std::io::Error::other(other.to_string()),
    };
    DataplaneError::Map { op, map, source }
}

impl EbpfDataplane {
    /// Load the balancer with the given limits (nothing attached yet, nothing pinned).
    pub fn load(opts: &LoadOptions) -> Result<Self, EbpfError> {
        Self::load_with(opts, None)
    }

    /// Load with every balancer map pinned under `dir`: maps already pinned there are adopted
    /// (contents kept) after checking the layout version, each map's type and sizes; missing
    /// ones are created and pinned. Returns whether maps were adopted.
    pub fn load_pinned(opts: &LoadOptions, dir: &Path) -> Result<(Self, bool), EbpfError> {
        let adopted = check_pins(opts, dir)?;
        match Self::load_with(opts, Some(dir)) {
            Ok(dp) => Ok((dp, adopted)),
            Err(e) => {
                // Maps pinned by this failed attempt would block the next start.
                if !adopted {
                    let _ = remove_pins(dir);
                }
                Err(e)
            }
        }
    }

    fn load_with(opts: &LoadOptions, pin_dir: Option<&Path>) -> Result<Self, EbpfError> {
        let ring_entries = opts.ring_entries()?;
        let l = opts.limits;
        let ring_size = l.ring_size;
        let seed = opts.hash_seed;
        let hz = kernel_hz()?;
        let refresh = hz.max(1);
        let geometry = opts.geometry(hz);
        let ct_buckets = geometry.buckets;
        let ct_shift = geometry.shift;
        let (tcp_idle, udp_idle, closing_idle) =
            (geometry.idle.tcp, geometry.idle.udp, geometry.idle.closing);
        let cpus = possible_cpus()?;
        let mut loader = EbpfLoader::new();
        if let Some(dir) = pin_dir {
            for name in lb_common::BALANCER_MAPS {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let mut ebpf = loader
            .map_max_entries(lb_common::MAP_VIPS, l.max_vips)
            .map_max_entries(lb_common::MAP_VIP_ADDRS, l.max_vips)
            .map_max_entries(lb_common::MAP_VIP_META, l.max_vips)
            .map_max_entries(lb_common::MAP_STATS_VIP, l.max_vips)
            .map_max_entries(lb_common::MAP_REALS, l.max_reals)
            .map_max_entries(
                lb_common::MAP_REVNAT,
                lb_common::revnat_entries(l.max_reals),
            )
            .map_max_entries(lb_common::MAP_STATS_REAL, l.max_reals)
            .map_max_entries(lb_common::MAP_RING, ring_entries)
            .map_max_entries(lb_common::MAP_CONNTRACK, ct_buckets)
            .map_max_entries(lb_common::MAP_CONNTRACK_KEYS, ct_buckets)
            .map_max_entries(
                lb_common::MAP_CT_LOG,
                pins::ct_log_entries(cpus, lb_common::ct::CT_LOG_SLOTS),
            )
            .map_max_entries(
                lb_common::MAP_CT_LOG_HEADS,
                pins::ct_log_entries(cpus, lb_common::ct::CT_LOG_HEAD_STRIDE),
            )
            .override_global(lb_common::GLOBAL_CT_BUCKETS, &ct_buckets, true)
            .override_global(lb_common::GLOBAL_CT_TIME_SHIFT, &ct_shift, true)
            .override_global(lb_common::GLOBAL_RING_SIZE, &ring_size, true)
            .override_global(lb_common::GLOBAL_HASH_SEED, &seed, true)
            .override_global(lb_common::GLOBAL_CT_TCP_IDLE, &tcp_idle, true)
            .override_global(lb_common::GLOBAL_CT_UDP_IDLE, &udp_idle, true)
            .override_global(lb_common::GLOBAL_CT_REFRESH, &refresh, true)
            .override_global(lb_common::GLOBAL_CT_CLOSING_IDLE, &closing_idle, true)
            .load(BALANCER_OBJECT)?;
        for name in [lb_common::PROG_BALANCER]
            .into_iter()
            .chain(lb_common::NAT_PROGS)
        {
            program_mut(&mut ebpf, name)?
                .load()
                .map_err(|source| EbpfError::Program { name, source })?;
        }
        // The balancer tail-calls NAT mode's rewrites. Pinned (or held by the dataplane): a
        // program array's entries go with its last user.
        let mut nat_progs: aya::maps::ProgramArray<MapData> =
            take(&mut ebpf, lb_common::MAP_NAT_PROGS)?;
        for (index, name) in (0u32..).zip(lb_common::NAT_PROGS) {
            let fd = program_mut(&mut ebpf, name)?
                .fd()
                .and_then(|fd| fd.try_clone().map_err(ProgramError::IOError))
                .map_err(|source| EbpfError::Program { name, source })?;
            nat_progs
                .set(index, &fd, 0)
                .map_err(|source| EbpfError::Map {
                    name: lb_common::MAP_NAT_PROGS,
                    source,
                })?;
        }
        // After the program is loaded: it holds the log map, so taking it out is safe.
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                log::warn!("kernel log records will not be shown: {e}");
                None
            }
        };
        let ring_map: Map = ebpf
            .take_map(lb_common::MAP_RING)
            .ok_or(EbpfError::MissingMap(lb_common::MAP_RING))?;
        let Map::Array(ring_data) = ring_map else {
            return Err(EbpfError::Map {
                name: lb_common::MAP_RING,
                source: MapError::InvalidName {
                    name: "RING is not an array".into(),
                },
            });
        };
        let ring = RingMmap::new(&ring_data, ring_entries)?;
        // The fd stays open through the mapping; the MapData itself may go.
        drop(ring_data);

        let mut layout: Array<MapData, Layout> = take(&mut ebpf, lb_common::MAP_LAYOUT)?;
        layout
            .set(
                0,
                Layout {
                    version: LAYOUT_VERSION,
                    ring_size,
                    max_vips: l.max_vips,
                    max_reals: l.max_reals,
                },
                0,
            )
            .map_err(|source| EbpfError::Map {
                name: lb_common::MAP_LAYOUT,
                source,
            })?;
        let (stats_vip, vip_fd) = take_per_cpu(&mut ebpf, lb_common::MAP_STATS_VIP)?;
        let (stats_real, real_fd) = take_per_cpu(&mut ebpf, lb_common::MAP_STATS_REAL)?;
        let (stats_global, global_fd) = take_per_cpu(&mut ebpf, lb_common::MAP_STATS_GLOBAL)?;
        let counters = EbpfCounters {
            stats_vip,
            stats_real,
            stats_global,
            limits: l,
            failed_calls: Arc::new(AtomicU64::new(0)),
        };
        let flows = take_flows(&mut ebpf, geometry)?;
        let ct_log = take_ct_log(&mut ebpf, cpus as usize, &flows)?;
        let tracer = Some(trace::Tracer::take(&mut ebpf)?);
        let revnat: HashMap<MapData, lb_common::RevNatKey, lb_common::RevNat> =
            take(&mut ebpf, lb_common::MAP_REVNAT)?;
        // Adopted maps keep their entries: counted once here, then kept by the writes.
        let revnat_keys = revnat
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| EbpfError::Map {
                name: lb_common::MAP_REVNAT,
                source,
            })?;
        let nat_filter = filter::NatFilter::new(
            take(&mut ebpf, lb_common::MAP_NAT_FILTER)?,
            revnat_keys.iter().map(|k| k.addr),
        )
        .map_err(|f| EbpfError::Map {
            name: f.map,
            source: f.source,
        })?;
        let vip_addrs = filter::VipAddrs::new(
            take(&mut ebpf, lb_common::MAP_VIP_ADDRS)?,
            take(&mut ebpf, lb_common::MAP_VIP_FILTER)?,
        )
        .map_err(|f| EbpfError::Map {
            name: f.map,
            source: f.source,
        })?;
        Ok(EbpfDataplane {
            vips: take(&mut ebpf, lb_common::MAP_VIPS)?,
            vip_addrs,
            revnat,
            nat_filter,
            _nat_progs: nat_progs,
            vip_meta: take(&mut ebpf, lb_common::MAP_VIP_META)?,
            reals: take(&mut ebpf, lb_common::MAP_REALS)?,
            conf: take(&mut ebpf, lb_common::MAP_CONF)?,
            flows,
            ct_log,
            probe: take(&mut ebpf, lb_common::MAP_PROBE)?,
            tunnel: take(&mut ebpf, lb_common::MAP_TUNNEL)?,
            tx_ports: take(&mut ebpf, lb_common::MAP_TX_PORTS)?,
            egress: take(&mut ebpf, lb_common::MAP_EGRESS)?,
            probe_link: None,
            counters,
            counter_fds: [vip_fd, real_fd, global_fd],
            ring,
            limits: l,
            ebpf,
            links: Vec::new(),
            pin_dir: pin_dir.map(Path::to_path_buf),
            logger,
            tracer,
        })
    }

    /// The VIP a real id serves, if the id is in use (for the connection table's lookups).
    fn real_vip(&self, real_id: u32) -> Option<u32> {
        self.reals
            .get(&real_id, 0)
            .ok()
            .filter(|r| *r != Real::default())
            .map(|r| r.vip_id)
    }

    /// The connection table (tests and the benchmark fill it directly).
    pub fn flow_table(&self) -> &FlowTable {
        &self.flows
    }

    /// What the kernel's `VIP_FILTER` holds (tests).
    pub fn vip_filter(&self) -> Result<lb_common::VipFilter, DataplaneError> {
        self.vip_addrs
            .read_filter()
            .map_err(|e| self.dp_err("lookup", lb_common::MAP_VIP_FILTER, e))
    }

    /// What the kernel's `NAT_FILTER` holds (tests).
    pub fn nat_filter(&self) -> Result<lb_common::VipFilter, DataplaneError> {
        self.nat_filter
            .read()
            .map_err(|e| self.dp_err("lookup", lb_common::MAP_NAT_FILTER, e))
    }

    /// Run the balancer once on `frame` (BPF_PROG_TEST_RUN): the action and the output frame.
    pub fn test_run(&mut self, frame: &[u8]) -> Result<(u32, Vec<u8>), EbpfError> {
        self.test_run_on(frame, None)
    }

    /// File the tuples the kernel has logged so far (`ctlog`); test runs do it first, so
    /// that each sees the tuples of the runs before it.
    pub fn drain_ct_log(&self) -> crate::dataplane::ctlog::Drained {
        self.ct_log.drain_now()
    }

    /// New flows' tuples lost to a full log since load.
    pub fn ct_log_lost(&self) -> u64 {
        self.ct_log.lost()
    }

    /// `test_run` as if the frame came in on interface `ingress` (of the calling thread's
    /// network namespace): what the program's FIB lookups start from.
    pub fn test_run_on(
        &mut self,
        frame: &[u8],
        ingress: Option<u32>,
    ) -> Result<(u32, Vec<u8>), EbpfError> {
        self.ct_log.drain_now();
        let mut out = vec![0u8; frame.len() + 256];
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex.
        // The kernel wants data_end to be the frame's length.
        let mut md = [0u8; 24];
        md[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
        if let Some(ifindex) = ingress {
            md[12..16].copy_from_slice(&ifindex.to_ne_bytes());
        }
        let res = program_mut(&mut self.ebpf, lb_common::PROG_BALANCER)?
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: ingress.map(|_| &md[..]),
                ..TestRunOptions::new()
            })
            .map_err(|source| EbpfError::Program {
                name: lb_common::PROG_BALANCER,
                source,
            })?;
        out.truncate(res.data_size_out as usize);
        Ok((res.return_value, out))
    }

    /// A new fd to the balancer program (what a benchmark wrapper tail-calls).
    pub fn program_fd(&mut self) -> Result<ProgramFd, EbpfError> {
        let err = |source| EbpfError::Program {
            name: lb_common::PROG_BALANCER,
            source,
        };
        program_mut(&mut self.ebpf, lb_common::PROG_BALANCER)?
            .fd()
            .map_err(err)?
            .try_clone()
            .map_err(|e| err(ProgramError::IOError(e)))
    }

    /// The kernel log reader, for the caller to poll (readable fd) and `flush`.
    pub fn take_logger(&mut self) -> Option<KernelLogger> {
        self.logger.take()
    }

    /// The switch and ring buffer of `xlb trace`, for the daemon to serve traces from.
    pub fn take_tracer(&mut self) -> Option<trace::Tracer> {
        self.tracer.take()
    }

    fn dp_err(&self, op: &'static str, map: &'static str, source: MapError) -> DataplaneError {
        dp_err(&self.counters.failed_calls, op, map, source)
    }

    /// Keep CONF's port-0 counts equal to the port-0 VIPs in VIPS (`extra` counts a key about
    /// to be inserted, so the kernel starts trying port 0 before the VIP exists).
    fn sync_conf(&mut self, extra: Option<&VipKey>) -> Result<(), DataplaneError> {
        let mut conf = Conf {
            revnat: self.nat_filter.entries(),
            ..Conf::default()
        };
        let keys: Vec<VipKey> = self.vips.keys().filter_map(Result::ok).collect();
        for k in keys.iter().chain(extra) {
            if k.port_be == 0 {
                match k.proto {
                    IPPROTO_TCP => conf.port0_tcp += 1,
                    IPPROTO_UDP => conf.port0_udp += 1,
                    _ => {}
                }
            }
        }
        self.conf
            .set(0, conf, 0)
            .map_err(|e| self.dp_err("update", lb_common::MAP_CONF, e))
    }
}

/// Per-CPU values summed.
fn sum<V: Pod + Copy + Default>(values: &[V], add: impl Fn(&mut V, &V)) -> V {
    let mut total = V::default();
    for v in values {
        add(&mut total, v);
    }
    total
}

fn add_vip(t: &mut VipStats, s: &VipStats) {
    t.packets += s.packets;
    t.bytes += s.bytes;
    t.new_flows += s.new_flows;
    t.no_real += s.no_real;
    t.quorum_drops += s.quorum_drops;
    t.untracked += s.untracked;
}

fn add_real(t: &mut RealStats, s: &RealStats) {
    t.packets += s.packets;
    t.bytes += s.bytes;
    t.new_flows += s.new_flows;
}

/// The connection table pinned under `dir` by a balancer loaded with `opts`, mmapped: a
/// second writer beside the kernel, for tests and the benchmark to fill it.
pub fn open_pinned_flows(dir: &Path, opts: &LoadOptions) -> Result<FlowTable, EbpfError> {
    let geometry = opts.geometry(kernel_hz()?);
    let mut data = Vec::new();
    for name in [lb_common::MAP_CONNTRACK, lb_common::MAP_CONNTRACK_KEYS] {
        data.push(
            MapData::from_pin(dir.join(name)).map_err(|source| EbpfError::Map { name, source })?,
        );
    }
    flows_of(&data[0], &data[1], geometry)
}

fn flows_of(ways: &MapData, keys: &MapData, geometry: Geometry) -> Result<FlowTable, EbpfError> {
    let jiffies = load::jiffies_anchor()?;
    let shift = geometry.shift;
    let clock = std::sync::Arc::new(move || (jiffies.now() >> shift) as u32);
    // The mappings keep the maps alive; the fds may close.
    FlowTable::mapped(ways.fd().as_fd(), keys.fd().as_fd(), geometry, clock).map_err(|source| {
        EbpfError::Mmap {
            name: lb_common::MAP_CONNTRACK,
            bytes: geometry.bytes() as usize,
            source,
        }
    })
}

/// Two arrays taken out of the object (to be mmapped: their fds are all that is needed).
fn take_arrays(ebpf: &mut Ebpf, names: [&'static str; 2]) -> Result<[MapData; 2], EbpfError> {
    let mut take = |name| match ebpf.take_map(name) {
        Some(Map::Array(d)) => Ok(d),
        _ => Err(EbpfError::MissingMap(name)),
    };
    Ok([take(names[0])?, take(names[1])?])
}

/// The connection table's two arrays, mmapped, on the kernel's clock.
fn take_flows(ebpf: &mut Ebpf, geometry: Geometry) -> Result<FlowTable, EbpfError> {
    let [ways, keys] = take_arrays(
        ebpf,
        [lb_common::MAP_CONNTRACK, lb_common::MAP_CONNTRACK_KEYS],
    )?;
    flows_of(&ways, &keys, geometry)
}

/// The possible CPUs (what per-CPU parts of maps are sized for).
pub(super) fn possible_cpus() -> Result<u32, EbpfError> {
    aya::util::nr_cpus()
        .map(|n| n as u32)
        .map_err(|(_, source)| EbpfError::Cpus(source))
}

/// The kernel's log of new flows' tuples, mmapped, with the thread that files them.
fn take_ct_log(
    ebpf: &mut Ebpf,
    cpus: usize,
    flows: &FlowTable,
) -> Result<crate::dataplane::ctlog::Drainer, EbpfError> {
    use crate::dataplane::ctlog::CtLog;
    let [entries, heads] = take_arrays(ebpf, [lb_common::MAP_CT_LOG, lb_common::MAP_CT_LOG_HEADS])?;
    let log = CtLog::mapped(entries.fd().as_fd(), heads.fd().as_fd(), cpus).map_err(|source| {
        EbpfError::Mmap {
            name: lb_common::MAP_CT_LOG,
            bytes: CtLog::entries_bytes(cpus),
            source,
        }
    })?;
    crate::dataplane::ctlog::Drainer::start(log, flows.clone()).map_err(EbpfError::Thread)
}

/// A per-CPU array taken out of the object, with a spare fd to open it again for a reader.
fn take_per_cpu<V: Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<(PerCpuArray<MapData, V>, OwnedFd), EbpfError> {
    let map = ebpf.take_map(name).ok_or(EbpfError::MissingMap(name))?;
    let Map::PerCpuArray(data) = &map else {
        return Err(EbpfError::MissingMap(name));
    };
    let fd = data
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| EbpfError::Map {
            name,
            source: MapError::IoError(e),
        })?;
    let array = PerCpuArray::try_from(map).map_err(|source| EbpfError::Map { name, source })?;
    Ok((array, fd))
}

/// A second handle to the per-CPU array behind `fd`.
fn reopen<V: Pod>(
    fd: &OwnedFd,
    name: &'static str,
) -> Result<PerCpuArray<MapData, V>, DataplaneError> {
    let io = |source| DataplaneError::Map {
        op: "reopen",
        map: name,
        source,
    };
    let data = MapData::from_fd(fd.try_clone().map_err(io)?)
        .map_err(|e| io(std::io::Error::other(e.to_string())))?;
    PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(|e| io(std::io::Error::other(e)))
}

impl CounterSource for EbpfCounters {
    fn vip_stats(&self, vip_id: u32) -> Result<VipStats, DataplaneError> {
        self.limits.check_vip(vip_id)?;
        let v = self
            .stats_vip
            .get(&vip_id, 0)
            .map_err(|e| dp_err(&self.failed_calls, "lookup", lb_common::MAP_STATS_VIP, e))?;
        Ok(sum(&v, add_vip))
    }

    fn real_stats(&self, real_id: u32) -> Result<RealStats, DataplaneError> {
        self.limits.check_real(real_id)?;
        let v = self
            .stats_real
            .get(&real_id, 0)
            .map_err(|e| dp_err(&self.failed_calls, "lookup", lb_common::MAP_STATS_REAL, e))?;
        Ok(sum(&v, add_real))
    }

    fn global_stats(&self) -> Result<GlobalStats, DataplaneError> {
        let v = self
            .stats_global
            .get(&0, 0)
            .map_err(|e| dp_err(&self.failed_calls, "lookup", lb_common::MAP_STATS_GLOBAL, e))?;
        Ok(sum(&v, GlobalStats::add))
    }

    fn failed_calls(&self) -> u64 {
        self.failed_calls.load(Ordering::Relaxed)
    }
}

impl CounterSource for EbpfDataplane {
    fn vip_stats(&self, vip_id: u32) -> Result<VipStats, DataplaneError> {
        self.counters.vip_stats(vip_id)
    }

    fn real_stats(&self, real_id: u32) -> Result<RealStats, DataplaneError> {
        self.counters.real_stats(real_id)
    }

    fn global_stats(&self) -> Result<GlobalStats, DataplaneError> {
        self.counters.global_stats()
    }

    fn failed_calls(&self) -> u64 {
        self.counters.failed_calls()
    }
}

/// Zeroes for every possible CPU.
fn zeroes<V: Pod + Default + Clone>(map: &'static str) -> Result<PerCpuValues<V>, DataplaneError> {
    let err = |source| DataplaneError::Map {
        op: "update",
        map,
        source,
    };
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| err(e))?;
    PerCpuValues::try_from(vec![V::default(); cpus]).map_err(err)
}

impl Dataplane for EbpfDataplane {
    type Reader = EbpfCounters;
    type Flows = FlowTable;

    fn limits(&self) -> Limits {
        self.limits
    }

    fn set_vip(&mut self, key: &VipKey, vip_id: u32) -> Result<(), DataplaneError> {
        self.limits.check_vip(vip_id)?;
        if key.port_be == 0 {
            self.sync_conf(Some(key))?;
        }
        self.vips
            .insert(key, vip_id, 0)
            .map_err(|e| self.dp_err("update", lb_common::MAP_VIPS, e))
    }

    fn del_vip(&mut self, key: &VipKey) -> Result<(), DataplaneError> {
        match self.vips.remove(key) {
            Ok(()) => {}
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(self.dp_err("delete", lb_common::MAP_VIPS, e)),
        }
        if key.port_be == 0 {
            self.sync_conf(None)?;
        }
        Ok(())
    }

    fn vips(&self) -> Result<Vec<(VipKey, u32)>, DataplaneError> {
        self.vips
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.dp_err("iterate", lb_common::MAP_VIPS, e))
    }

    fn set_vip_addr(
        &mut self,
        addr: &[u8; 16],
        value: &VipAddrValue,
    ) -> Result<(), DataplaneError> {
        self.vip_addrs
            .set(addr, value)
            .map_err(|f| self.dp_err("update", f.map, f.source))
    }

    fn del_vip_addr(&mut self, addr: &[u8; 16]) -> Result<(), DataplaneError> {
        self.vip_addrs
            .del(addr)
            .map_err(|f| self.dp_err("delete", f.map, f.source))
    }

    fn vip_addrs(&self) -> Result<Vec<([u8; 16], VipAddrValue)>, DataplaneError> {
        self.vip_addrs
            .map
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.dp_err("iterate", lb_common::MAP_VIP_ADDRS, e))
    }

    fn set_revnat(
        &mut self,
        key: &lb_common::RevNatKey,
        value: &lb_common::RevNat,
    ) -> Result<(), DataplaneError> {
        let name = lb_common::MAP_REVNAT;
        let fresh = match self.revnat.get(key, 0) {
            Ok(_) => false,
            Err(MapError::KeyNotFound) => true,
            Err(e) => return Err(self.dp_err("lookup", name, e)),
        };
        if fresh {
            // Counted and filtered before the entry exists: the kernel looks only while the
            // count is set and the address's bit is.
            self.nat_filter
                .add(&key.addr)
                .map_err(|f| self.dp_err("update", f.map, f.source))?;
            if let Err(e) = self.sync_conf(None) {
                let _ = self.nat_filter.remove(&key.addr);
                return Err(e);
            }
        }
        if let Err(e) = self.revnat.insert(key, value, 0) {
            let err = self.dp_err("update", name, e);
            if fresh {
                let _ = self.nat_filter.remove(&key.addr);
                let _ = self.sync_conf(None);
            }
            return Err(err);
        }
        Ok(())
    }

    fn del_revnat(&mut self, key: &lb_common::RevNatKey) -> Result<(), DataplaneError> {
        match self.revnat.remove(key) {
            Ok(()) => {
                let filtered = self.nat_filter.remove(&key.addr);
                self.sync_conf(None)?;
                filtered.map_err(|f| self.dp_err("update", f.map, f.source))
            }
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(())
            }
            Err(e) => Err(self.dp_err("delete", lb_common::MAP_REVNAT, e)),
        }
    }

    fn revnats(&self) -> Result<Vec<(lb_common::RevNatKey, lb_common::RevNat)>, DataplaneError> {
        self.revnat
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.dp_err("iterate", lb_common::MAP_REVNAT, e))
    }

    fn set_vip_meta(&mut self, vip_id: u32, meta: &VipMeta) -> Result<(), DataplaneError> {
        self.limits.check_vip(vip_id)?;
        self.vip_meta
            .set(vip_id, meta, 0)
            .map_err(|e| self.dp_err("update", lb_common::MAP_VIP_META, e))
    }

    fn vip_meta(&self, vip_id: u32) -> Result<VipMeta, DataplaneError> {
        self.limits.check_vip(vip_id)?;
        self.vip_meta
            .get(&vip_id, 0)
            .map_err(|e| self.dp_err("lookup", lb_common::MAP_VIP_META, e))
    }

    fn set_real(&mut self, real_id: u32, real: &Real) -> Result<(), DataplaneError> {
        self.limits.check_real(real_id)?;
        self.reals
            .set(real_id, real, 0)
            .map_err(|e| self.dp_err("update", lb_common::MAP_REALS, e))
    }

    fn real(&self, real_id: u32) -> Result<Real, DataplaneError> {
        self.limits.check_real(real_id)?;
        self.reals
            .get(&real_id, 0)
            .map_err(|e| self.dp_err("lookup", lb_common::MAP_REALS, e))
    }

    fn write_ring(
        &mut self,
        vip_id: u32,
        generation: u32,
        ring: &[u32],
    ) -> Result<(), DataplaneError> {
        self.limits.check_ring(vip_id, ring)?;
        let m = self.limits.ring_size;
        let start = lb_common::ring_row_offset(vip_id, generation, m) as usize;
        self.ring.slice_mut()[start..start + ring.len()].copy_from_slice(ring);
        // The generation flip that publishes this ring is a bpf() syscall, which orders these
        // stores before it.
        std::sync::atomic::fence(Ordering::SeqCst);
        Ok(())
    }

    fn read_ring(&self, vip_id: u32, generation: u32) -> Result<Vec<u32>, DataplaneError> {
        self.limits.check_vip(vip_id)?;
        let m = self.limits.ring_size;
        let start = lb_common::ring_row_offset(vip_id, generation, m) as usize;
        Ok(self.ring.slice()[start..start + m as usize].to_vec())
    }

    fn reset_vip_stats(&mut self, vip_id: u32) -> Result<(), DataplaneError> {
        self.limits.check_vip(vip_id)?;
        let zero = zeroes::<VipStats>(lb_common::MAP_STATS_VIP)?;
        let failed = self.counters.failed_calls.clone();
        self.counters
            .stats_vip
            .set(vip_id, zero, 0)
            .map_err(|e| dp_err(&failed, "update", lb_common::MAP_STATS_VIP, e))
    }

    fn reset_real_stats(&mut self, real_id: u32) -> Result<(), DataplaneError> {
        self.limits.check_real(real_id)?;
        let zero = zeroes::<RealStats>(lb_common::MAP_STATS_REAL)?;
        let failed = self.counters.failed_calls.clone();
        self.counters
            .stats_real
            .set(real_id, zero, 0)
            .map_err(|e| dp_err(&failed, "update", lb_common::MAP_STATS_REAL, e))
    }

    fn flow_reader(&self) -> Result<FlowTable, DataplaneError> {
        Ok(self.flows.clone())
    }

    fn counter_reader(&self) -> Result<EbpfCounters, DataplaneError> {
        let c = &self.counters;
        let [vip, real, global] = &self.counter_fds;
        Ok(EbpfCounters {
            stats_vip: reopen(vip, lb_common::MAP_STATS_VIP)?,
            stats_real: reopen(real, lb_common::MAP_STATS_REAL)?,
            stats_global: reopen(global, lb_common::MAP_STATS_GLOBAL)?,
            limits: c.limits,
            failed_calls: c.failed_calls.clone(),
        })
    }

    fn conntrack_get(
        &self,
        key: &FlowKey,
        vip_id: u32,
    ) -> Result<Option<ConnValue>, DataplaneError> {
        let ours = |id: u32| self.real_vip(id) == Some(vip_id);
        Ok(self.flows.lookup(key, &ours).map(|(v, _)| v))
    }

    fn conntrack_merge(
        &mut self,
        key: &FlowKey,
        vip_id: u32,
        real_id: u32,
    ) -> Result<crate::dataplane::Merge, DataplaneError> {
        self.limits.check_real(real_id)?;
        let ours = |id: u32| self.real_vip(id) == Some(vip_id);
        Ok(self.flows.merge(key, real_id, &ours))
    }

    fn conntrack_count(&self) -> Result<usize, DataplaneError> {
        Ok(self.flows.count())
    }

    fn conntrack_real_ids(&self) -> Result<std::collections::BTreeSet<u32>, DataplaneError> {
        Ok(self.flows.real_ids())
    }

    fn quiesce(&mut self) -> Result<(), DataplaneError> {
        // MEMBARRIER_CMD_GLOBAL returns after synchronize_rcu(): every XDP run (they run in
        // RCU read sections) that began before the call has ended. Kernels that refuse it
        // (nohz_full) leave the caller's time-based grace period as the only wait.
        const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
        // SAFETY: membarrier takes no pointers.
        let rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
        if rc != 0 {
            log::debug!(
                "membarrier(MEMBARRIER_CMD_GLOBAL): {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    fn detach(&mut self) -> Result<(), DataplaneError> {
        let Some(dir) = self.pin_dir.clone() else {
            // Attached without a pin (tests): closing our link fds detaches.
            self.links.clear();
            return Ok(());
        };
        for path in pins::link_pins(&dir) {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(DataplaneError::Pin {
                        what: format!(
                            "removing the pinned XDP link {} (the program stays attached)",
                            path.display()
                        ),
                        source,
                    })
                }
            }
        }
        // The pins are gone: closing our fds, the last references, takes the program off.
        self.links.clear();
        Ok(())
    }

    fn enable_probes(&mut self, conf: &ProbeConf) -> Result<(), DataplaneError> {
        self.enable_probes_impl(conf)
    }

    fn disable_probes(&mut self) -> Result<(), DataplaneError> {
        self.disable_probes_impl()
    }

    fn set_tunnel(&mut self, conf: &TunnelConf) -> Result<(), DataplaneError> {
        self.tunnel
            .set(0, *conf, 0)
            .map_err(|e| self.dp_err("update", lb_common::MAP_TUNNEL, e))
    }

    fn tunnel(&self) -> Result<TunnelConf, DataplaneError> {
        self.tunnel
            .get(&0, 0)
            .map_err(|e| self.dp_err("lookup", lb_common::MAP_TUNNEL, e))
    }

    fn set_egress(&mut self, port: &lb_common::TxPort) -> Result<(), DataplaneError> {
        // The devmap first: the kernel reads EGRESS before it redirects.
        if let Err(e) = self.tx_ports.insert(port.ifindex, port.ifindex, None, 0) {
            let e = match e {
                aya::maps::xdp::XdpMapError::MapError(e) => e,
                other => MapError::IoError(std::io::Error::other(other.to_string())),
            };
            return Err(self.dp_err("update", lb_common::MAP_TX_PORTS, e));
        }
        self.egress
            .insert(port.ifindex, *port, 0)
            .map_err(|e| self.dp_err("update", lb_common::MAP_EGRESS, e))
    }

    fn run_frame(&mut self, frame: &[u8]) -> Result<Option<(u32, Vec<u8>)>, DataplaneError> {
        self.test_run(frame)
            .map(Some)
            .map_err(|e| DataplaneError::TestRun(e.to_string()))
    }

    fn del_egress(&mut self, ifindex: u32) -> Result<(), DataplaneError> {
        let gone = |e: &MapError| {
            matches!(e, MapError::KeyNotFound)
                || matches!(e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::ENOENT))
        };
        match self.egress.remove(&ifindex) {
            Err(e) if !gone(&e) => return Err(self.dp_err("delete", lb_common::MAP_EGRESS, e)),
            _ => {}
        }
        match self.tx_ports.remove(ifindex) {
            Err(e) if !gone(&e) => Err(self.dp_err("delete", lb_common::MAP_TX_PORTS, e)),
            _ => Ok(()),
        }
    }

    fn remove_pins(&mut self) -> Result<(), DataplaneError> {
        let Some(dir) = self.pin_dir.clone() else {
            return Ok(());
        };
        remove_pins(&dir).map_err(|e| DataplaneError::Pin {
            what: format!("removing the pins under {}", dir.display()),
            source: std::io::Error::other(e.to_string()),
        })
    }
}
