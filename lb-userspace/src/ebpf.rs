//! The one module that talks to aya: loads the embedded XDP object with its limits, attaches
//! it, and implements `Dataplane` over the real maps (rings through mmap).

use std::{
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use aya::{
    maps::{Array, HashMap, Map, MapData, MapError, MapInfo, MapType, PerCpuArray, ProgramArray},
    programs::{
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
        ProgramError, TestRun, TestRunOptions, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader, Pod,
};
use lb_common::{
    BenchFrame, Conf, GlobalStats, Layout, Real, RealStats, VipAddrValue, VipKey, VipMeta,
    VipStats, IPPROTO_TCP, IPPROTO_UDP, LAYOUT_VERSION,
};

use crate::dataplane::{Dataplane, DataplaneError, Limits};

/// The XDP object built by `cargo xtask build`, embedded by build.rs.
pub static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("XLB_BPF_OBJECT"));

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
    #[error("mmap of the RING map ({bytes} bytes): {source}")]
    Mmap {
        bytes: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("attaching XDP to {iface}: {source}")]
    Attach {
        iface: String,
        #[source]
        source: ProgramError,
    },
    #[error("frame of {0} bytes does not fit the benchmark template")]
    BenchFrame(usize),
    #[error(
        "the maps pinned at {dir} do not fit this daemon: {reason}; start with the limits \
         they were made with, or remove them with `xlb down --iface IFACE [--pin-root DIR]` \
         (forwarding stops)"
    )]
    PinMismatch { dir: String, reason: String },
    #[error("pinning {path}: {reason}")]
    Pin { path: String, reason: String },
}

/// What to load: sizes and read-only globals fixed for the program's lifetime.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    pub limits: Limits,
    pub conntrack_size: u32,
    pub hash_seed: u32,
    pub ct_tcp_idle: Duration,
    pub ct_udp_idle: Duration,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            limits: Limits::default(),
            conntrack_size: lb_common::DEFAULT_CONNTRACK_SIZE,
            hash_seed: 0,
            ct_tcp_idle: Duration::from_secs(lb_common::DEFAULT_CT_TCP_IDLE_SECS),
            ct_udp_idle: Duration::from_secs(lb_common::DEFAULT_CT_UDP_IDLE_SECS),
        }
    }
}

impl LoadOptions {
    /// The conntrack map's real size: the kernel rounds a per-CPU LRU (BPF_F_NO_COMMON_LRU)
    /// up to a multiple of the possible CPUs, so pins are checked against the rounded size.
    pub fn conntrack_entries(&self) -> u32 {
        let cpus = aya::util::nr_cpus().map_or(1, |n| n.max(1)) as u32;
        self.conntrack_size.div_ceil(cpus).saturating_mul(cpus)
    }

    /// Entries of the flat RING array; refused when the kernel could not hold it.
    fn ring_entries(&self) -> Result<u32, EbpfError> {
        let l = &self.limits;
        if !crate::maglev::is_prime(l.ring_size) {
            return Err(EbpfError::Limit {
                field: "ring-size",
                reason: format!("{} is not a prime ≥ 2 (Maglev needs a prime)", l.ring_size),
            });
        }
        if l.max_vips == 0 {
            return Err(EbpfError::Limit {
                field: "max-vips",
                reason: "must be at least 1".into(),
            });
        }
        if l.max_reals < 2 {
            return Err(EbpfError::Limit {
                field: "max-reals",
                reason: "must be at least 2 (id 0 means no real)".into(),
            });
        }
        if self.conntrack_size == 0 {
            return Err(EbpfError::Limit {
                field: "conntrack-size",
                reason: "must be at least 1".into(),
            });
        }
        let elems = lb_common::ring_elems(l.max_vips, l.ring_size);
        // 8-byte elements; the kernel caps an array map well below 4 GiB.
        if elems > u64::from(u32::MAX / 8) {
            return Err(EbpfError::Limit {
                field: "max-vips",
                reason: format!(
                    "{} VIPs × 2 × ring size {} needs {elems} ring elements, more than an \
                     array map holds",
                    l.max_vips, l.ring_size
                ),
            });
        }
        Ok(elems as u32)
    }
}

/// The embedded object with every map at its smallest, for the helper programs (`xlb_pass`,
/// `xlb_clock`): aya creates every map of an object, and the balancer's defaults are a 67 MB
/// ring and a 1 M-entry table.
pub fn load_tiny() -> Result<Ebpf, EbpfError> {
    Ok(EbpfLoader::new()
        .map_max_entries(lb_common::MAP_RING, 1)
        .map_max_entries(lb_common::MAP_CONNTRACK, 64)
        .map_max_entries(lb_common::MAP_REALS, 2)
        .map_max_entries(lb_common::MAP_STATS_REAL, 2)
        .map_max_entries(lb_common::MAP_VIPS, 1)
        .map_max_entries(lb_common::MAP_VIP_ADDRS, 1)
        .map_max_entries(lb_common::MAP_VIP_META, 1)
        .map_max_entries(lb_common::MAP_STATS_VIP, 1)
        .load(BPF_OBJECT)?)
}

/// The kernel's HZ (jiffies per second), measured once per process with `xlb_clock`: two
/// readings of jiffies and the monotonic clock 50 ms apart, rounded to the HZ values Linux
/// builds with. The connection table keeps time in jiffies (see `ConnValue::last_seen`).
pub fn kernel_hz() -> Result<u64, EbpfError> {
    static HZ: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    if let Some(hz) = HZ.get() {
        return Ok(*hz);
    }
    let mut ebpf = load_tiny()?;
    let prog = program_mut(&mut ebpf, lb_common::PROG_CLOCK)?;
    prog.load().map_err(|source| EbpfError::Program {
        name: lb_common::PROG_CLOCK,
        source,
    })?;
    let read = || -> Result<(u64, u64), EbpfError> {
        let frame = [0u8; 64];
        let mut out = [0u8; 64];
        prog.test_run(TestRunOptions {
            data_in: Some(&frame),
            data_out: Some(&mut out),
            ..TestRunOptions::new()
        })
        .map_err(|source| EbpfError::Program {
            name: lb_common::PROG_CLOCK,
            source,
        })?;
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&out[i * 8..i * 8 + 8]);
            u64::from_ne_bytes(b)
        };
        Ok((word(0), word(1)))
    };
    let (j0, t0) = read()?;
    std::thread::sleep(Duration::from_millis(50));
    let (j1, t1) = read()?;
    let measured = (j1.wrapping_sub(j0)) as f64 * 1e9 / (t1.saturating_sub(t0)).max(1) as f64;
    let hz = [100u64, 250, 300, 1000]
        .into_iter()
        .min_by(|a, b| {
            (*a as f64 - measured)
                .abs()
                .total_cmp(&(*b as f64 - measured).abs())
        })
        .unwrap_or(1000);
    if (hz as f64 - measured).abs() > hz as f64 * 0.3 {
        return Err(EbpfError::Limit {
            field: "kernel HZ",
            reason: format!("measured {measured:.0} jiffies per second, not a Linux HZ"),
        });
    }
    Ok(*HZ.get_or_init(|| hz))
}

/// The RING array mapped into our memory: rings are written at memory speed.
struct RingMmap {
    ptr: *mut u32,
    entries: usize,
    bytes: usize,
}

// SAFETY: the mapping is owned by this value and only accessed through &self / &mut self.
unsafe impl Send for RingMmap {}

impl RingMmap {
    /// Map a RING of `elems` two-slot elements, seen here as `2 * elems` u32 slots.
    fn new(map: &MapData, elems: u32) -> Result<Self, EbpfError> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let entries = elems as usize * lb_common::RING_SLOTS_PER_ELEM as usize;
        let bytes = (entries * 4).div_ceil(page) * page;
        // SAFETY: a shared mapping of a BPF_F_MMAPABLE array of exactly this size.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(EbpfError::Mmap {
                bytes,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(RingMmap {
            ptr: ptr.cast(),
            entries,
            bytes,
        })
    }

    fn slice(&self) -> &[u32] {
        // SAFETY: the mapping holds `entries` u32s and lives as long as self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.entries) }
    }

    fn slice_mut(&mut self) -> &mut [u32] {
        // SAFETY: as above; &mut self gives exclusive access on our side.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.entries) }
    }
}

impl Drop for RingMmap {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.bytes) };
    }
}

/// The loaded balancer: programs, maps, and the RING mapping.
pub struct EbpfDataplane {
    ebpf: Ebpf,
    limits: Limits,
    vips: HashMap<MapData, VipKey, u32>,
    vip_addrs: HashMap<MapData, [u8; 16], VipAddrValue>,
    vip_meta: Array<MapData, VipMeta>,
    reals: Array<MapData, Real>,
    ring: RingMmap,
    stats_vip: PerCpuArray<MapData, VipStats>,
    stats_real: PerCpuArray<MapData, RealStats>,
    stats_global: PerCpuArray<MapData, GlobalStats>,
    conf: Array<MapData, Conf>,
    conntrack: HashMap<MapData, lb_common::CtKey, lb_common::ConnValue>,
    bench_frame: Array<MapData, BenchFrame>,
    bench_progs: ProgramArray<MapData>,
    /// Failed map syscalls since load (Katran's TOTAL_FAILED_BPF_CALLS): tests expect 0.
    failed_calls: AtomicU64,
    bench_counter: u32,
    link: Option<PinnedLink>,
    /// Reader of the kernel side's aya-log records (rare-path errors only); the daemon polls
    /// it, tests flush it.
    logger: Option<KernelLogger>,
}

/// The reader of the XDP program's log records, forwarded to the `log` crate.
pub type KernelLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// What the benchmark wrapper varies between iterations (4 bytes at `off`: an IPv4 source
/// address, or the last word of an IPv6 one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vary {
    /// The same frame every time: one established flow.
    None,
    /// A value never used before: a new flow every iteration.
    NewFlows { off: u32 },
    /// Values 1..=flows in turn: `flows` established flows visited round robin.
    Cycle { off: u32, flows: u32 },
}

/// How `attach_pinned` attached the balancer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    Native,
    Generic,
    /// A pinned link from an earlier daemon now runs this program.
    Replaced,
}

/// Files under a pin directory: the maps and the link.
pub const LINK_PIN: &str = "link";

/// Remove the pins of a balancer (maps and link) under `dir`, and `dir` itself.
pub fn remove_pins(dir: &Path) -> Result<(), EbpfError> {
    let err = |path: &Path, e: std::io::Error| EbpfError::Pin {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let mut names: Vec<&str> = lb_common::BALANCER_MAPS.to_vec();
    names.push(LINK_PIN);
    for name in names {
        let path = dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(&path, e)),
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(err(dir, e)),
    }
}

/// What each balancer map must look like for given limits: (type, key size, value size,
/// max entries).
/// (name, type, key size, value size, max entries) of one map.
type MapShape = (&'static str, MapType, u32, u32, u32);

fn expected_maps(opts: &LoadOptions) -> Result<Vec<MapShape>, EbpfError> {
    use std::mem::size_of;
    let l = opts.limits;
    let sz = |n: usize| n as u32;
    Ok(vec![
        (
            lb_common::MAP_VIPS,
            MapType::Hash,
            sz(size_of::<VipKey>()),
            4,
            l.max_vips,
        ),
        (
            lb_common::MAP_VIP_ADDRS,
            MapType::Hash,
            16,
            sz(size_of::<VipAddrValue>()),
            l.max_vips,
        ),
        (
            lb_common::MAP_VIP_META,
            MapType::Array,
            4,
            sz(size_of::<VipMeta>()),
            l.max_vips,
        ),
        (
            lb_common::MAP_RING,
            MapType::Array,
            4,
            sz(size_of::<lb_common::RingElem>()),
            opts.ring_entries()?,
        ),
        (
            lb_common::MAP_REALS,
            MapType::Array,
            4,
            sz(size_of::<Real>()),
            l.max_reals,
        ),
        (
            lb_common::MAP_CONNTRACK,
            MapType::LruHash,
            sz(size_of::<lb_common::CtKey>()),
            sz(size_of::<lb_common::ConnValue>()),
            opts.conntrack_entries(),
        ),
        (
            lb_common::MAP_STATS_VIP,
            MapType::PerCpuArray,
            4,
            sz(size_of::<VipStats>()),
            l.max_vips,
        ),
        (
            lb_common::MAP_STATS_REAL,
            MapType::PerCpuArray,
            4,
            sz(size_of::<RealStats>()),
            l.max_reals,
        ),
        (
            lb_common::MAP_STATS_GLOBAL,
            MapType::PerCpuArray,
            4,
            sz(size_of::<GlobalStats>()),
            1,
        ),
        (
            lb_common::MAP_LAYOUT,
            MapType::Array,
            4,
            sz(size_of::<Layout>()),
            1,
        ),
        (
            lb_common::MAP_CONF,
            MapType::Array,
            4,
            sz(size_of::<Conf>()),
            1,
        ),
    ])
}

/// Whether a complete, compatible set of pinned maps exists under `dir` (false: none at all).
/// aya reuses a pinned map without checking it, so this is the only guard against adopting
/// maps of another layout or size.
fn check_pins(opts: &LoadOptions, dir: &Path) -> Result<bool, EbpfError> {
    let mismatch = |reason: String| EbpfError::PinMismatch {
        dir: dir.display().to_string(),
        reason,
    };
    let expected = expected_maps(opts)?;
    let present: Vec<bool> = expected.iter().map(|e| dir.join(e.0).exists()).collect();
    if present.iter().all(|p| !p) {
        return Ok(false);
    }
    if let Some(i) = present.iter().position(|p| !p) {
        return Err(mismatch(format!(
            "map {} is missing (an incomplete set)",
            expected[i].0
        )));
    }
    for (name, ty, key, value, max) in &expected {
        let info =
            MapInfo::from_pin(dir.join(name)).map_err(|e| mismatch(format!("map {name}: {e}")))?;
        let got_ty = info
            .map_type()
            .map_err(|e| mismatch(format!("map {name}: {e}")))?;
        if got_ty != *ty
            || info.key_size() != *key
            || info.value_size() != *value
            || info.max_entries() != *max
        {
            return Err(mismatch(format!(
                "map {name} is {got_ty:?} key {} value {} entries {}, expected {ty:?} key {key} \
                 value {value} entries {max}",
                info.key_size(),
                info.value_size(),
                info.max_entries()
            )));
        }
    }
    let layout_map = MapData::from_pin(dir.join(lb_common::MAP_LAYOUT))
        .map_err(|e| mismatch(format!("map LAYOUT: {e}")))?;
    let layout: Array<MapData, Layout> = Array::try_from(Map::Array(layout_map))
        .map_err(|e| mismatch(format!("map LAYOUT: {e}")))?;
    let got = layout
        .get(&0, 0)
        .map_err(|e| mismatch(format!("map LAYOUT: {e}")))?;
    let want = Layout {
        version: LAYOUT_VERSION,
        ring_size: opts.limits.ring_size,
        max_vips: opts.limits.max_vips,
        max_reals: opts.limits.max_reals,
    };
    if got == Layout::default() {
        // LAYOUT is written once the programs are loaded, before anything attaches: all zero
        // means a start that failed half-way, and no program ever used these maps.
        log::warn!(
            "maps pinned at {} were never completed (a failed start): removing them",
            dir.display()
        );
        remove_pins(dir)?;
        return Ok(false);
    }
    if got != want {
        return Err(mismatch(format!(
            "layout version {} ring size {} max VIPs {} max reals {}, expected version {} ring \
             size {} max VIPs {} max reals {}",
            got.version,
            got.ring_size,
            got.max_vips,
            got.max_reals,
            want.version,
            want.ring_size,
            want.max_vips,
            want.max_reals
        )));
    }
    Ok(true)
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, EbpfError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(EbpfError::MissingMap(name))?;
    T::try_from(map).map_err(|source| EbpfError::Map { name, source })
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
        let jiffies = |d: Duration| {
            (d.as_nanos() * u128::from(hz) / 1_000_000_000).min(u128::from(u64::MAX)) as u64
        };
        let tcp_idle = jiffies(opts.ct_tcp_idle);
        let udp_idle = jiffies(opts.ct_udp_idle);
        let refresh = jiffies(Duration::from_secs(1)).max(1);
        let pins: Vec<(&'static str, PathBuf)> = pin_dir
            .map(|d| {
                lb_common::BALANCER_MAPS
                    .iter()
                    .map(|n| (*n, d.join(n)))
                    .collect()
            })
            .unwrap_or_default();
        let mut loader = EbpfLoader::new();
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .map_max_entries(lb_common::MAP_VIPS, l.max_vips)
            .map_max_entries(lb_common::MAP_VIP_ADDRS, l.max_vips)
            .map_max_entries(lb_common::MAP_VIP_META, l.max_vips)
            .map_max_entries(lb_common::MAP_STATS_VIP, l.max_vips)
            .map_max_entries(lb_common::MAP_REALS, l.max_reals)
            .map_max_entries(lb_common::MAP_STATS_REAL, l.max_reals)
            .map_max_entries(lb_common::MAP_RING, ring_entries)
            .map_max_entries(lb_common::MAP_CONNTRACK, opts.conntrack_entries())
            .override_global(lb_common::GLOBAL_RING_SIZE, &ring_size, true)
            .override_global(lb_common::GLOBAL_HASH_SEED, &seed, true)
            .override_global(lb_common::GLOBAL_CT_TCP_IDLE, &tcp_idle, true)
            .override_global(lb_common::GLOBAL_CT_UDP_IDLE, &udp_idle, true)
            .override_global(lb_common::GLOBAL_CT_REFRESH, &refresh, true)
            .load(BPF_OBJECT)?;
        for name in [
            lb_common::PROG_BALANCER,
            lb_common::PROG_PASS,
            lb_common::PROG_BENCH,
            lb_common::PROG_BENCH_BASELINE,
        ] {
            program_mut(&mut ebpf, name)?
                .load()
                .map_err(|source| EbpfError::Program { name, source })?;
        }
        // After the programs are loaded: they hold the log map, so taking it out is safe.
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
        Ok(EbpfDataplane {
            vips: take(&mut ebpf, lb_common::MAP_VIPS)?,
            vip_addrs: take(&mut ebpf, lb_common::MAP_VIP_ADDRS)?,
            vip_meta: take(&mut ebpf, lb_common::MAP_VIP_META)?,
            reals: take(&mut ebpf, lb_common::MAP_REALS)?,
            stats_vip: take(&mut ebpf, lb_common::MAP_STATS_VIP)?,
            stats_real: take(&mut ebpf, lb_common::MAP_STATS_REAL)?,
            stats_global: take(&mut ebpf, lb_common::MAP_STATS_GLOBAL)?,
            conf: take(&mut ebpf, lb_common::MAP_CONF)?,
            conntrack: take(&mut ebpf, lb_common::MAP_CONNTRACK)?,
            bench_frame: take(&mut ebpf, lb_common::MAP_BENCH_FRAME)?,
            bench_progs: take(&mut ebpf, lb_common::MAP_BENCH_PROGS)?,
            ring,
            limits: l,
            ebpf,
            failed_calls: AtomicU64::new(0),
            bench_counter: 1,
            link: None,
            logger,
        })
    }

    /// Attach with the XDP link pinned at `pin`, so forwarding outlives this process. A link
    /// already pinned there is adopted: the new program replaces the old one on it
    /// atomically (no packet sees no program). Returns how it was attached.
    pub fn attach_pinned(
        &mut self,
        iface: &str,
        mode: AttachMode,
        pin: &Path,
    ) -> Result<Attached, EbpfError> {
        let pin_err = |reason: String| EbpfError::Pin {
            path: pin.display().to_string(),
            reason,
        };
        if pin.exists() {
            match self.adopt_link(iface, pin) {
                Ok(()) => return Ok(Attached::Replaced),
                // The interface the link was made for is gone (deleted and recreated): the
                // pinned link is dead. Forget it and attach afresh; the maps stay.
                Err(e) if has_errno(&e, libc::ENOLINK) => {
                    log::warn!(
                        "the pinned XDP link of {iface} is severed (interface recreated?): \
                         attaching anew"
                    );
                    std::fs::remove_file(pin).map_err(|e| pin_err(e.to_string()))?;
                }
                Err(e) => return Err(e),
            }
        }
        let (link_id, mode_used) =
            attach_program(&mut self.ebpf, lb_common::PROG_BALANCER, iface, mode)?;
        let prog = program_mut(&mut self.ebpf, lb_common::PROG_BALANCER)?;
        let link = prog
            .take_link(link_id)
            .map_err(|source| EbpfError::Program {
                name: lb_common::PROG_BALANCER,
                source,
            })?;
        let fd_link = FdLink::try_from(link).map_err(|e| {
            pin_err(format!(
                "{e}: the program was attached through netlink, which cannot be pinned"
            ))
        })?;
        let pinned = fd_link.pin(pin).map_err(|e| pin_err(e.to_string()))?;
        self.link = Some(pinned);
        Ok(if mode_used == XdpMode::Skb {
            Attached::Generic
        } else {
            Attached::Native
        })
    }

    /// Run this program on the link pinned at `pin`, atomically replacing the old program.
    /// The pin itself is never removed: at no moment is the link held only by this process.
    fn adopt_link(&mut self, iface: &str, pin: &Path) -> Result<(), EbpfError> {
        let pin_err = |reason: String| EbpfError::Pin {
            path: pin.display().to_string(),
            reason,
        };
        let old = PinnedLink::from_pin(pin).map_err(|e| pin_err(e.to_string()))?;
        let xdp_link = XdpLink::try_from(FdLink::from(old)).map_err(|e| pin_err(e.to_string()))?;
        let prog = program_mut(&mut self.ebpf, lb_common::PROG_BALANCER)?;
        let id = prog
            .attach_to_link(xdp_link)
            .map_err(|source| EbpfError::Attach {
                iface: iface.to_string(),
                source,
            })?;
        // Our fd to the link closes; the pin keeps it. Hold it through the pin from now on.
        drop(prog.take_link(id).map_err(|source| EbpfError::Program {
            name: lb_common::PROG_BALANCER,
            source,
        })?);
        self.link = Some(PinnedLink::from_pin(pin).map_err(|e| pin_err(e.to_string()))?);
        Ok(())
    }

    /// Detach and forget: unpin the link (the program leaves the interface once no fd holds
    /// the link) and every map pinned under `dir`.
    pub fn unpin_all(&mut self, dir: &Path) -> Result<(), EbpfError> {
        if let Some(link) = self.link.take() {
            let fd_link = link.unpin().map_err(|e| EbpfError::Pin {
                path: dir.display().to_string(),
                reason: e.to_string(),
            })?;
            drop(fd_link);
        }
        remove_pins(dir)
    }

    /// Attach the balancer to `iface`: native mode, or generic when the driver has no XDP
    /// support and `mode` allows it. Returns the mode used.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<XdpMode, EbpfError> {
        attach_program(&mut self.ebpf, lb_common::PROG_BALANCER, iface, mode).map(|(_, m)| m)
    }

    /// Attach the two-instruction pass program (veth peers that must receive XDP_TX frames).
    pub fn attach_pass(&mut self, iface: &str) -> Result<XdpMode, EbpfError> {
        attach_program(
            &mut self.ebpf,
            lb_common::PROG_PASS,
            iface,
            AttachMode::Native,
        )
        .map(|(_, m)| m)
    }

    /// Run the balancer once on `frame` (BPF_PROG_TEST_RUN): the action and the output frame.
    pub fn test_run(&mut self, frame: &[u8]) -> Result<(u32, Vec<u8>), EbpfError> {
        let mut out = vec![0u8; frame.len() + 256];
        let res = program_mut(&mut self.ebpf, lb_common::PROG_BALANCER)?
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::new()
            })
            .map_err(|source| EbpfError::Program {
                name: lb_common::PROG_BALANCER,
                source,
            })?;
        out.truncate(res.data_size_out as usize);
        Ok((res.return_value, out))
    }

    /// Benchmark: run `repeat` iterations of the wrapper, which restores `frame` each time
    /// (varying 4 bytes of it as `vary` says) and tail-calls the balancer (or, with
    /// `baseline`, a program that returns at once). Returns the action of the last iteration
    /// and the kernel's mean ns per iteration.
    pub fn bench_run(
        &mut self,
        frame: &[u8],
        vary: Vary,
        repeat: u32,
        baseline: bool,
    ) -> Result<(u32, f64), EbpfError> {
        let (vary_off, counter, vary_cycle) = match vary {
            Vary::None => (0, 0, 0),
            // Never restart the counter: a reused value would be a tracked flow again.
            Vary::NewFlows { off } => (off, self.bench_counter, 0),
            Vary::Cycle { off, flows } => (off, 1, flows),
        };
        let mut tmpl = BenchFrame {
            len: frame.len() as u32,
            vary_off,
            counter,
            vary_cycle,
            data: [0; lb_common::BENCH_FRAME_MAX],
        };
        tmpl.data
            .get_mut(..frame.len())
            .ok_or(EbpfError::BenchFrame(frame.len()))?
            .copy_from_slice(frame);
        self.bench_frame
            .set(0, tmpl, 0)
            .map_err(|source| self.map_err(lb_common::MAP_BENCH_FRAME, source))?;
        let target = if baseline {
            lb_common::PROG_BENCH_BASELINE
        } else {
            lb_common::PROG_BALANCER
        };
        let fd = program_mut(&mut self.ebpf, target)?
            .fd()
            .map_err(|source| EbpfError::Program {
                name: target,
                source,
            })?
            .try_clone()
            .map_err(|e| EbpfError::Program {
                name: target,
                source: ProgramError::IOError(e),
            })?;
        self.bench_progs
            .set(0, &fd, 0)
            .map_err(|source| self.map_err(lb_common::MAP_BENCH_PROGS, source))?;
        let mut out = vec![0u8; frame.len() + 256];
        let res = program_mut(&mut self.ebpf, lb_common::PROG_BENCH)?
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                repeat,
                ..TestRunOptions::new()
            })
            .map_err(|source| EbpfError::Program {
                name: lb_common::PROG_BENCH,
                source,
            })?;
        if matches!(vary, Vary::NewFlows { .. }) {
            self.bench_counter = self.bench_counter.wrapping_add(repeat);
        }
        // The kernel reports the mean duration per iteration.
        Ok((res.return_value, res.duration.as_nanos() as f64))
    }

    /// Tracked flows currently in the connection table (walks the map: tests and `stats`).
    pub fn conntrack_len(&self) -> usize {
        self.conntrack.keys().filter(|k| k.is_ok()).count()
    }

    /// The real a tracked flow is pinned to, if any.
    pub fn conntrack_get(&self, key: &lb_common::CtKey) -> Option<lb_common::ConnValue> {
        self.conntrack.get(key, 0).ok()
    }

    /// Zero the counters of ids just given to a new VIP or real: per-CPU counters outlive the
    /// VIP or real that last had the id, and must not be inherited.
    pub fn reset_stats(&mut self, vip_ids: &[u32], real_ids: &[u32]) -> Result<(), DataplaneError> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::Map {
            op: "count CPUs for",
            map: lb_common::MAP_STATS_VIP,
            source: e,
        })?;
        for id in vip_ids {
            let zero = aya::maps::PerCpuValues::try_from(vec![VipStats::default(); cpus]).map_err(
                |source| DataplaneError::Map {
                    op: "update",
                    map: lb_common::MAP_STATS_VIP,
                    source,
                },
            )?;
            self.stats_vip
                .set(*id, zero, 0)
                .map_err(|e| self.dp_err("update", lb_common::MAP_STATS_VIP, e))?;
        }
        for id in real_ids {
            let zero = aya::maps::PerCpuValues::try_from(vec![RealStats::default(); cpus])
                .map_err(|source| DataplaneError::Map {
                    op: "update",
                    map: lb_common::MAP_STATS_REAL,
                    source,
                })?;
            self.stats_real
                .set(*id, zero, 0)
                .map_err(|e| self.dp_err("update", lb_common::MAP_STATS_REAL, e))?;
        }
        Ok(())
    }

    /// The kernel log reader, for the caller to poll (readable fd) and `flush`.
    pub fn take_logger(&mut self) -> Option<KernelLogger> {
        self.logger.take()
    }

    pub fn failed_calls(&self) -> u64 {
        self.failed_calls.load(Ordering::Relaxed)
    }

    fn map_err(&self, map: &'static str, source: MapError) -> EbpfError {
        self.failed_calls.fetch_add(1, Ordering::Relaxed);
        EbpfError::Map { name: map, source }
    }

    fn dp_err(&self, op: &'static str, map: &'static str, source: MapError) -> DataplaneError {
        self.failed_calls.fetch_add(1, Ordering::Relaxed);
        let source = match source {
            MapError::SyscallError(e) => e.io_error,
            other => std::io::Error::other(other.to_string()),
        };
        DataplaneError::Map { op, map, source }
    }

    /// Keep CONF's port-0 counts equal to the port-0 VIPs in VIPS (`extra` counts a key about
    /// to be inserted, so the kernel starts trying port 0 before the VIP exists).
    fn sync_conf(&mut self, extra: Option<&VipKey>) -> Result<(), DataplaneError> {
        let mut conf = Conf::default();
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

/// How to attach: `Auto` tries native then generic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    Auto,
    Native,
    Generic,
}

fn program_mut<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, EbpfError> {
    let prog = ebpf.program_mut(name).ok_or(EbpfError::Program {
        name,
        source: ProgramError::NotLoaded,
    })?;
    prog.try_into()
        .map_err(|source| EbpfError::Program { name, source })
}

/// Whether an error or any of its sources is an OS error `errno`.
fn has_errno(e: &EbpfError, errno: i32) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.raw_os_error() == Some(errno) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// Whether an attach failed because the interface already has an XDP program (EEXIST from
/// bpf_link_create, EBUSY from netlink).
pub fn is_busy(e: &EbpfError) -> bool {
    has_errno(e, libc::EEXIST) || has_errno(e, libc::EBUSY)
}

fn attach_program(
    ebpf: &mut Ebpf,
    name: &'static str,
    iface: &str,
    mode: AttachMode,
) -> Result<(XdpLinkId, XdpMode), EbpfError> {
    let prog = program_mut(ebpf, name)?;
    let attach = |prog: &mut Xdp, m: XdpMode| {
        prog.attach(iface, m)
            .map(|id| (id, m))
            .map_err(|source| EbpfError::Attach {
                iface: iface.to_string(),
                source,
            })
    };
    match mode {
        AttachMode::Native => attach(prog, XdpMode::Driver),
        AttachMode::Generic => attach(prog, XdpMode::Skb),
        AttachMode::Auto => match attach(prog, XdpMode::Driver) {
            Ok(done) => Ok(done),
            // Another program owns the interface: generic mode would fail the same way.
            Err(native) if is_busy(&native) => Err(native),
            Err(native) => {
                log::warn!("native XDP on {iface} failed ({native}); using generic XDP");
                attach(prog, XdpMode::Skb)
            }
        },
    }
}

fn sum<V: Pod + Copy, T: Default>(values: &[V], mut add: impl FnMut(&mut T, &V)) -> T {
    let mut total = T::default();
    for v in values {
        add(&mut total, v);
    }
    total
}

impl Dataplane for EbpfDataplane {
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
            .insert(addr, value, 0)
            .map_err(|e| self.dp_err("update", lb_common::MAP_VIP_ADDRS, e))
    }

    fn del_vip_addr(&mut self, addr: &[u8; 16]) -> Result<(), DataplaneError> {
        match self.vip_addrs.remove(addr) {
            Ok(()) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(())
            }
            Err(e) => Err(self.dp_err("delete", lb_common::MAP_VIP_ADDRS, e)),
        }
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

    fn vip_stats(&self, vip_id: u32) -> Result<VipStats, DataplaneError> {
        self.limits.check_vip(vip_id)?;
        let v = self
            .stats_vip
            .get(&vip_id, 0)
            .map_err(|e| self.dp_err("lookup", lb_common::MAP_STATS_VIP, e))?;
        Ok(sum(&v, |t: &mut VipStats, s: &VipStats| {
            t.packets += s.packets;
            t.bytes += s.bytes;
            t.new_flows += s.new_flows;
            t.no_real += s.no_real;
        }))
    }

    fn real_stats(&self, real_id: u32) -> Result<RealStats, DataplaneError> {
        self.limits.check_real(real_id)?;
        let v = self
            .stats_real
            .get(&real_id, 0)
            .map_err(|e| self.dp_err("lookup", lb_common::MAP_STATS_REAL, e))?;
        Ok(sum(&v, |t: &mut RealStats, s: &RealStats| {
            t.packets += s.packets;
            t.bytes += s.bytes;
            t.new_flows += s.new_flows;
        }))
    }

    fn global_stats(&self) -> Result<GlobalStats, DataplaneError> {
        let v = self
            .stats_global
            .get(&0, 0)
            .map_err(|e| self.dp_err("lookup", lb_common::MAP_STATS_GLOBAL, e))?;
        Ok(sum(&v, |t: &mut GlobalStats, s: &GlobalStats| {
            t.pass_not_ip += s.pass_not_ip;
            t.pass_truncated += s.pass_truncated;
            t.pass_unknown_l4 += s.pass_unknown_l4;
            t.pass_ipv6_ext += s.pass_ipv6_ext;
            t.drop_fragment += s.drop_fragment;
            t.drop_bad_header += s.drop_bad_header;
            t.drop_no_real += s.drop_no_real;
            t.ct_stale += s.ct_stale;
            t.ct_insert_fail += s.ct_insert_fail;
            t.pass_vip_meta_missing += s.pass_vip_meta_missing;
        }))
    }
}
