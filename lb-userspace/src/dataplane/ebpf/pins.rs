//! The pin directory (`<pin-root>/<iface>/`): which maps must be there and how they must look
//! before a daemon adopts them, and their removal.

use std::path::Path;

use aya::maps::{Array, Map, MapData, MapInfo, MapType};
use lb_common::{Layout, Real, RealStats, VipAddrValue, VipKey, VipMeta, VipStats, LAYOUT_VERSION};

use super::{EbpfError, LoadOptions};

/// Files under a pin directory: the maps and the links: `link` for the first interface,
/// `link_IFACE` for each other one the daemon attaches to.
pub const LINK_PIN: &str = "link";
const OTHER_LINK: &str = "link_";

/// The link pin of the `index`th interface named `iface`. bpffs refuses names with a dot,
/// which interface names may have (`eth0.100`): it becomes a colon, which they may not.
pub fn link_pin(index: usize, iface: &str) -> String {
    if index == 0 {
        LINK_PIN.to_string()
    } else {
        other_link_pin(iface)
    }
}

/// The link pin of `iface` when it is not the first interface.
pub fn other_link_pin(iface: &str) -> String {
    format!("{OTHER_LINK}{}", iface.replace('.', ":"))
}

/// The link pins under `dir` (the first interface's and every other's).
pub fn link_pins(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![dir.join(LINK_PIN)];
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name();
            if name.to_str().is_some_and(|n| n.starts_with(OTHER_LINK)) {
                out.push(e.path());
            }
        }
    }
    out
}

/// Remove the pins of a balancer (maps and link) under `dir`, and `dir` itself.
pub fn remove_pins(dir: &Path) -> Result<(), EbpfError> {
    let err = |path: &Path, e: std::io::Error| EbpfError::Pin {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    // The links first: the program leaves every interface before its maps go.
    let paths = link_pins(dir)
        .into_iter()
        .chain(lb_common::BALANCER_MAPS.iter().map(|name| dir.join(name)));
    for path in paths {
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

/// (name, type, key size, value size, max entries) of one map.
type MapShape = (&'static str, MapType, u32, u32, u32);

/// Entries of a per-CPU part of `CT_LOG` or `CT_LOG_HEADS` for `cpus` CPUs.
pub(super) fn ct_log_entries(cpus: u32, per_cpu: u32) -> u32 {
    cpus.saturating_mul(per_cpu)
}

pub(super) fn expected_maps(opts: &LoadOptions) -> Result<Vec<MapShape>, EbpfError> {
    use std::mem::size_of;
    let l = opts.limits;
    let sz = |n: usize| n as u32;
    let cpus = super::possible_cpus()?;
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
            lb_common::MAP_VIP_FILTER,
            MapType::Array,
            4,
            sz(size_of::<lb_common::VipFilter>()),
            1,
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
            MapType::Array,
            4,
            sz(size_of::<lb_common::ct::CtBucket>()),
            lb_common::ct::buckets_for(opts.conntrack_size),
        ),
        (
            lb_common::MAP_CONNTRACK_KEYS,
            MapType::Array,
            4,
            sz(size_of::<lb_common::ct::CtKeys>()),
            lb_common::ct::buckets_for(opts.conntrack_size),
        ),
        (
            lb_common::MAP_CT_LOG,
            MapType::Array,
            4,
            sz(size_of::<lb_common::ct::CtLogEntry>()),
            ct_log_entries(cpus, lb_common::ct::CT_LOG_SLOTS),
        ),
        (
            lb_common::MAP_CT_LOG_HEADS,
            MapType::Array,
            4,
            8,
            ct_log_entries(cpus, lb_common::ct::CT_LOG_HEAD_STRIDE),
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
            sz(size_of::<lb_common::GlobalStats>()),
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
            sz(size_of::<lb_common::Conf>()),
            1,
        ),
        (
            lb_common::MAP_TUNNEL,
            MapType::Array,
            4,
            sz(size_of::<lb_common::TunnelConf>()),
            1,
        ),
        // struct bpf_devmap_val: the ifindex and a program fd/id.
        (
            lb_common::MAP_TX_PORTS,
            MapType::DevMapHash,
            4,
            8,
            lb_common::MAX_TX_PORTS,
        ),
        (
            lb_common::MAP_EGRESS,
            MapType::Hash,
            4,
            sz(size_of::<lb_common::TxPort>()),
            lb_common::MAX_TX_PORTS,
        ),
        (
            lb_common::MAP_NAT_PROGS,
            MapType::ProgramArray,
            4,
            4,
            lb_common::NAT_PROGS.len() as u32,
        ),
        (
            lb_common::MAP_NAT_SCRATCH,
            MapType::PerCpuArray,
            4,
            sz(size_of::<lb_common::NatScratch>()),
            1,
        ),
        (
            lb_common::MAP_REVNAT,
            MapType::Hash,
            sz(size_of::<lb_common::RevNatKey>()),
            sz(size_of::<lb_common::RevNat>()),
            lb_common::revnat_entries(l.max_reals),
        ),
        (
            lb_common::MAP_NAT_FILTER,
            MapType::Array,
            4,
            sz(size_of::<lb_common::VipFilter>()),
            1,
        ),
    ])
}

/// The layout version pinned under `dir`, if a LAYOUT pin is there and readable.
fn pinned_version(dir: &Path) -> Option<u32> {
    let data = MapData::from_pin(dir.join(lb_common::MAP_LAYOUT)).ok()?;
    let layout: Array<MapData, Layout> = Array::try_from(Map::Array(data)).ok()?;
    layout.get(&0, 0).ok().map(|l| l.version)
}

/// Whether a complete, compatible set of pinned maps exists under `dir` (false: none at all).
/// aya reuses a pinned map without checking it, so this is the only guard against adopting
/// maps of another layout or size.
pub(super) fn check_pins(opts: &LoadOptions, dir: &Path) -> Result<bool, EbpfError> {
    let mismatch = |reason: String| EbpfError::PinMismatch {
        dir: dir.display().to_string(),
        reason,
    };
    let expected = expected_maps(opts)?;
    let present: Vec<bool> = expected.iter().map(|e| dir.join(e.0).exists()).collect();
    if present.iter().all(|p| !p) {
        return Ok(false);
    }
    // Another layout first: its set of maps differs too, and the version says why.
    if let Some(version) = pinned_version(dir) {
        if version != 0 && version != LAYOUT_VERSION {
            return Err(mismatch(format!(
                "the maps are of layout version {version}, this xlb uses version \
                 {LAYOUT_VERSION} (version 4 replaced the connection table, version 8 added NAT_FILTER); they cannot be \
                 adopted: `xlb down` removes them (tracked flows are lost, established \
                 connections re-pick their real from the ring)"
            )));
        }
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

#[cfg(test)]
mod tests {
    use super::{link_pin, link_pins};

    #[test]
    fn every_interface_has_a_link_pin_bpffs_accepts() {
        assert_eq!(link_pin(0, "eth0"), "link");
        assert_eq!(link_pin(1, "eth1"), "link_eth1");
        // bpffs refuses dots; interface names cannot hold colons.
        assert_eq!(link_pin(2, "eth0.100"), "link_eth0:100");
        let dir = std::env::temp_dir().join(format!("xlb-pins-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        for name in ["link", "link_eth1", "VIPS"] {
            std::fs::write(dir.join(name), b"").expect("file");
        }
        let mut found = link_pins(&dir);
        found.sort();
        assert_eq!(found, vec![dir.join("link"), dir.join("link_eth1")]);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
