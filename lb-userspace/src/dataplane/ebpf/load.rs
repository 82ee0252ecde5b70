//! What the balancer is loaded with (sizes, read-only globals), the objects build.rs embeds,
//! and the kernel's HZ, measured once with the clock probe of the map-less `xlb-aux` object.

use std::time::Duration;

use aya::{
    programs::{TestRun, TestRunOptions},
    Ebpf, EbpfLoader,
};

use super::{program_mut, EbpfError};
use crate::{core::maglev, dataplane::Limits};

/// The balancer object (`xlb`: the program and its maps) built by `cargo xtask build`.
pub static BALANCER_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("XLB_BPF_OBJECT"));
/// The helper object (`xlb-aux`: the clock probe and the pass program, no maps).
pub static AUX_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("XLB_AUX_OBJECT"));

/// The helper object, loaded (its programs not yet): it has no maps, so loading it creates
/// nothing in the kernel until a program is loaded.
pub fn load_aux() -> Result<Ebpf, EbpfError> {
    Ok(EbpfLoader::new().load(AUX_OBJECT)?)
}

/// Flows a connection table may be sized for: 2^28 flows take 28 GiB, more than any
/// balancer host here would give it.
pub const MAX_CONNTRACK_SIZE: u32 = 1 << 28;

/// What to load: sizes and read-only globals fixed for the program's lifetime.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    pub limits: Limits,
    pub conntrack_size: u32,
    pub hash_seed: u32,
    pub ct_tcp_idle: Duration,
    pub ct_udp_idle: Duration,
    /// How long a flow whose client sent a FIN or RST stays tracked after its last packet.
    pub ct_closing_idle: Duration,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            limits: Limits::default(),
            conntrack_size: lb_common::DEFAULT_CONNTRACK_SIZE,
            hash_seed: 0,
            ct_tcp_idle: Duration::from_secs(lb_common::DEFAULT_CT_TCP_IDLE_SECS),
            ct_udp_idle: Duration::from_secs(lb_common::DEFAULT_CT_UDP_IDLE_SECS),
            ct_closing_idle: Duration::from_secs(lb_common::DEFAULT_CT_CLOSING_IDLE_SECS),
        }
    }
}

impl LoadOptions {
    /// The connection table's layout and clock on a kernel of `hz`.
    pub fn geometry(&self, hz: u64) -> crate::dataplane::flowtable::Geometry {
        crate::dataplane::flowtable::Geometry::new(
            self.conntrack_size,
            self.hash_seed,
            hz,
            self.ct_tcp_idle,
            self.ct_udp_idle,
            self.ct_closing_idle,
        )
    }

    /// Entries of the flat RING array; refused when the kernel could not hold it.
    pub(super) fn ring_entries(&self) -> Result<u32, EbpfError> {
        let l = &self.limits;
        if !maglev::is_prime(l.ring_size) {
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
        if l.max_reals > lb_common::ct::MAX_REAL_ID + 1 {
            return Err(EbpfError::Limit {
                field: "max-reals",
                reason: format!(
                    "{} is more than the connection table holds (real ids up to {})",
                    l.max_reals,
                    lb_common::ct::MAX_REAL_ID
                ),
            });
        }
        if self.conntrack_size == 0 {
            return Err(EbpfError::Limit {
                field: "conntrack-size",
                reason: "must be at least 1".into(),
            });
        }
        if self.conntrack_size > MAX_CONNTRACK_SIZE {
            return Err(EbpfError::Limit {
                field: "conntrack-size",
                reason: format!(
                    "{} flows is more than {MAX_CONNTRACK_SIZE} ({} GiB of table)",
                    self.conntrack_size,
                    self.geometry(1000).bytes() >> 30
                ),
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

/// The kernel's HZ (jiffies per second), measured once per process with `xlb_clock`: two
/// readings of jiffies and the monotonic clock 50 ms apart, rounded to the HZ values Linux
/// builds with. The connection table keeps time in jiffies (see `ConnValue::last_seen`).
pub fn kernel_hz() -> Result<u64, EbpfError> {
    static HZ: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    if let Some(hz) = HZ.get() {
        return Ok(*hz);
    }
    let mut clock = ClockProbe::load()?;
    let (j0, t0) = clock.read()?;
    std::thread::sleep(Duration::from_millis(50));
    let (j1, t1) = clock.read()?;
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

/// Jiffies now and the monotonic clock at that moment, with the kernel's HZ: what userspace
/// needs to tell the age of a tracked flow.
pub fn jiffies_anchor() -> Result<super::flows::Jiffies, EbpfError> {
    let hz = kernel_hz()?;
    let (at_jiffies, at_mono_ns) = ClockProbe::load()?.read()?;
    Ok(super::flows::Jiffies {
        hz,
        at_jiffies,
        at_mono_ns,
    })
}

/// `xlb_clock`, loaded: each run reads jiffies and the monotonic clock in the kernel.
struct ClockProbe {
    ebpf: Ebpf,
}

impl ClockProbe {
    fn load() -> Result<ClockProbe, EbpfError> {
        let mut ebpf = load_aux()?;
        program_mut(&mut ebpf, lb_common::PROG_CLOCK)?
            .load()
            .map_err(|source| EbpfError::Program {
                name: lb_common::PROG_CLOCK,
                source,
            })?;
        Ok(ClockProbe { ebpf })
    }

    fn read(&mut self) -> Result<(u64, u64), EbpfError> {
        let prog = program_mut(&mut self.ebpf, lb_common::PROG_CLOCK)?;
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
    }
}
