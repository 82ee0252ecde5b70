//! `xlb decap`: `xlb_decap` on a real server of tunnel mode. Attached the netlink way, not
//! through a bpf_link: the attachment and the maps it holds outlive the command, with no pin
//! (a private `/sys` under `ip netns exec` would lose one). Found again by the interface's
//! program id, its maps by the program's map ids.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    os::fd::{AsFd, AsRawFd},
};

use aya::{
    maps::{Array, HashMap, Map, MapData, MapInfo, PerCpuArray},
    programs::{loaded_programs, TestRun, TestRunOptions, Xdp},
    Ebpf, EbpfLoader,
};
use lb_common::{DecapConf, DecapStats, DECAP_COUNTERS};

use crate::{
    dataplane::neigh::{host_addresses, links::set_xdp, KernelNeighbours, XdpAttached},
    model::map_addr,
};

/// The decapsulator object (`xlb-decap`) built by `cargo xtask build`.
pub static DECAP_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("XLB_DECAP_OBJECT"));

const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

#[derive(Debug, thiserror::Error)]
pub enum DecapError {
    #[error(transparent)]
    Iface(#[from] crate::dataplane::neigh::NeighError),
    #[error(
        "{iface} already runs another XDP program ({name}, id {id}): detach it first \
         (`ip link set dev {iface} xdp off`)"
    )]
    Foreign {
        iface: String,
        name: String,
        id: u32,
    },
    #[error("loading xlb_decap: {0}")]
    Load(String),
    #[error("attaching xlb_decap to {iface} ({mode}): {source}")]
    Attach {
        iface: String,
        mode: &'static str,
        source: std::io::Error,
    },
    #[error("detaching xlb_decap from {iface}: {source}")]
    Detach {
        iface: String,
        source: std::io::Error,
    },
    #[error("reading xlb_decap's maps: {0}")]
    Maps(String),
}

fn load_err(e: impl std::fmt::Display) -> DecapError {
    DecapError::Load(e.to_string())
}

fn maps_err(e: impl std::fmt::Display) -> DecapError {
    DecapError::Maps(e.to_string())
}

/// How to attach: native (the driver's), generic (the stack's), or native else generic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecapMode {
    Auto,
    Native,
    Generic,
}

/// What `--status` shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecapStatus {
    pub id: u32,
    pub mode: &'static str,
    pub gue_port: u16,
    /// Empty: every inner destination.
    pub vips: Vec<IpAddr>,
    pub local_addrs: usize,
    /// `DECAP_COUNTERS` names with their values, summed over CPUs.
    pub counters: Vec<(&'static str, u64)>,
}

/// xlb_decap loaded, its maps filled, not attached: what `attach` attaches, and what tests run
/// frames through.
pub struct Decapsulator {
    ebpf: Ebpf,
}

impl Decapsulator {
    /// Packets to `local` are decapsulated, when their inner destination is in `vips` (any
    /// with `vips` empty).
    pub fn load(local: &[IpAddr], vips: &[IpAddr], gue_port: u16) -> Result<Self, DecapError> {
        let mut ebpf = EbpfLoader::new().load(DECAP_OBJECT).map_err(load_err)?;
        let mut conf: Array<_, DecapConf> = Array::try_from(
            ebpf.map_mut(lb_common::MAP_DECAP_CONF)
                .ok_or_else(|| load_err("no DECAP_CONF map"))?,
        )
        .map_err(load_err)?;
        let c = DecapConf {
            gue_port_be: gue_port.to_be(),
            vip_filter: u8::from(!vips.is_empty()),
            ..DecapConf::default()
        };
        conf.set(0, c, 0).map_err(load_err)?;
        for (map, addrs) in [
            (lb_common::MAP_DECAP_ADDRS, local),
            (lb_common::MAP_DECAP_VIPS, vips),
        ] {
            let mut m: HashMap<_, [u8; 16], u8> = HashMap::try_from(
                ebpf.map_mut(map)
                    .ok_or_else(|| load_err(format!("no {map} map")))?,
            )
            .map_err(load_err)?;
            for a in addrs {
                m.insert(map_addr(*a), 1, 0).map_err(load_err)?;
            }
        }
        let prog: &mut Xdp = ebpf
            .program_mut(lb_common::PROG_DECAP)
            .ok_or_else(|| load_err("no xlb_decap program"))?
            .try_into()
            .map_err(load_err)?;
        prog.load().map_err(load_err)?;
        Ok(Decapsulator { ebpf })
    }

    /// One frame through the program (BPF_PROG_TEST_RUN): its action and the frame after.
    pub fn test_run(&mut self, frame: &[u8]) -> Result<(u32, Vec<u8>), DecapError> {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(lb_common::PROG_DECAP)
            .ok_or_else(|| load_err("no xlb_decap program"))?
            .try_into()
            .map_err(load_err)?;
        let mut out = vec![0u8; frame.len() + 64];
        let res = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::new()
            })
            .map_err(load_err)?;
        out.truncate(res.data_size_out as usize);
        Ok((res.return_value, out))
    }

    /// The counters, summed over CPUs, in `DECAP_COUNTERS` order.
    pub fn counters(&self) -> Result<Vec<(&'static str, u64)>, DecapError> {
        let stats: PerCpuArray<_, DecapStats> = PerCpuArray::try_from(
            self.ebpf
                .map(lb_common::MAP_DECAP_STATS)
                .ok_or_else(|| maps_err("no DECAP_STATS map"))?,
        )
        .map_err(maps_err)?;
        let per_cpu = stats.get(&0, 0).map_err(maps_err)?;
        Ok(sum(&per_cpu))
    }
}

fn sum(per_cpu: &[DecapStats]) -> Vec<(&'static str, u64)> {
    DECAP_COUNTERS
        .iter()
        .enumerate()
        .map(|(i, (name, _))| (*name, per_cpu.iter().map(|v| v[i]).sum()))
        .collect()
}

/// The program attached to `iface` if it is xlb_decap (`Ok(None)`: none is attached);
/// another program is an error.
fn attached(n: &KernelNeighbours) -> Result<Option<(u32, XdpAttached)>, DecapError> {
    let Some((how, id)) = n.xdp_program()? else {
        return Ok(None);
    };
    let name = loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .and_then(|p| p.name_as_str().map(str::to_string))
        .unwrap_or_else(|| "unknown".to_string());
    if name != lb_common::PROG_DECAP {
        return Err(DecapError::Foreign {
            iface: n.iface().to_string(),
            name,
            id,
        });
    }
    Ok(Some((id, how)))
}

/// Attach xlb_decap to `iface` (replacing an xlb_decap already there, whose counters start
/// again), decapsulating packets to this host's addresses now (re-run after adding one),
/// with inner destinations limited to `vips` unless empty.
pub fn attach(
    iface: &str,
    vips: &[IpAddr],
    gue_port: u16,
    mode: DecapMode,
) -> Result<DecapStatus, DecapError> {
    let n = KernelNeighbours::new(iface)?;
    let existing = attached(&n)?;
    let addrs = host_addresses(None).map_err(load_err)?;
    let mut d = Decapsulator::load(&addrs, vips, gue_port)?;
    let ebpf = &mut d.ebpf;
    let prog: &mut Xdp = ebpf
        .program_mut(lb_common::PROG_DECAP)
        .ok_or_else(|| load_err("no xlb_decap program"))?
        .try_into()
        .map_err(load_err)?;
    let fd = prog.fd().map_err(load_err)?.as_fd().as_raw_fd();
    // Replacing keeps the mode of the one replaced (the kernel refuses a switch in place).
    let tries: &[(u32, &'static str)] = match (existing.map(|(_, how)| how), mode) {
        (Some(XdpAttached::Generic), _) | (None, DecapMode::Generic) => {
            &[(XDP_FLAGS_SKB_MODE, "generic")]
        }
        (Some(_), _) | (None, DecapMode::Native) => &[(XDP_FLAGS_DRV_MODE, "native")],
        (None, DecapMode::Auto) => &[
            (XDP_FLAGS_DRV_MODE, "native"),
            (XDP_FLAGS_SKB_MODE, "generic"),
        ],
    };
    let mut last = None;
    for (flags, name) in tries {
        match set_xdp(n.ifindex(), fd, *flags) {
            Ok(()) => {
                last = None;
                break;
            }
            Err(e) => last = Some((*name, e)),
        }
    }
    if let Some((mode, source)) = last {
        return Err(DecapError::Attach {
            iface: iface.to_string(),
            mode,
            source,
        });
    }
    // Dropping it closes this process's fds; the attachment holds the program and maps.
    drop(d);
    status(iface)?.ok_or_else(|| load_err("attached, then gone"))
}

/// Detach xlb_decap from `iface`; `Ok(false)` when none was attached.
pub fn remove(iface: &str) -> Result<bool, DecapError> {
    let n = KernelNeighbours::new(iface)?;
    let Some((_, how)) = attached(&n)? else {
        return Ok(false);
    };
    let flags = match how {
        XdpAttached::Generic => XDP_FLAGS_SKB_MODE,
        _ => XDP_FLAGS_DRV_MODE,
    };
    set_xdp(n.ifindex(), -1, flags).map_err(|source| DecapError::Detach {
        iface: iface.to_string(),
        source,
    })?;
    Ok(true)
}

/// xlb_decap on `iface` with its settings and counters, `None` when it is not attached.
pub fn status(iface: &str) -> Result<Option<DecapStatus>, DecapError> {
    let n = KernelNeighbours::new(iface)?;
    let Some((id, how)) = attached(&n)? else {
        return Ok(None);
    };
    let info = loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .ok_or_else(|| maps_err(format!("program {id} is gone")))?;
    let mut maps: BTreeMap<String, u32> = BTreeMap::new();
    for m in info.map_ids().map_err(maps_err)?.unwrap_or_default() {
        if let Some(name) = MapInfo::from_id(m)
            .ok()
            .and_then(|i| i.name_as_str().map(str::to_string))
        {
            maps.insert(name, m);
        }
    }
    let open = |name: &str| -> Result<Map, DecapError> {
        let id = maps
            .get(name)
            .ok_or_else(|| maps_err(format!("program {id} has no map {name}")))?;
        let data = MapData::from_id(*id).map_err(maps_err)?;
        Map::from_map_data(data).map_err(maps_err)
    };
    let conf: Array<MapData, DecapConf> =
        Array::try_from(open(lb_common::MAP_DECAP_CONF)?).map_err(maps_err)?;
    let c = conf.get(&0, 0).map_err(maps_err)?;
    let vips: HashMap<MapData, [u8; 16], u8> =
        HashMap::try_from(open(lb_common::MAP_DECAP_VIPS)?).map_err(maps_err)?;
    let mut vip_list: Vec<IpAddr> = vips
        .keys()
        .filter_map(Result::ok)
        .map(|k| std::net::Ipv6Addr::from(k).to_canonical())
        .collect();
    vip_list.sort();
    let local: HashMap<MapData, [u8; 16], u8> =
        HashMap::try_from(open(lb_common::MAP_DECAP_ADDRS)?).map_err(maps_err)?;
    let stats: PerCpuArray<MapData, DecapStats> =
        PerCpuArray::try_from(open(lb_common::MAP_DECAP_STATS)?).map_err(maps_err)?;
    let per_cpu = stats.get(&0, 0).map_err(maps_err)?;
    let counters = sum(&per_cpu);
    Ok(Some(DecapStatus {
        id,
        mode: how.as_str(),
        gue_port: u16::from_be(c.gue_port_be),
        vips: vip_list,
        local_addrs: local.keys().count(),
        counters,
    }))
}
