//! The benchmark's control-path rows: what the daemon's own work costs (a Maglev ring build,
//! a real's removal until its new ring is live, a large apply) and the kernel memory of every
//! map at the default limits and per limit.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use lb_userspace::{
    core::{
        balancer::{Balancer, Change},
        maglev::{build_ring, MaglevReal},
    },
    dataplane::{
        ebpf::{EbpfDataplane, LoadOptions},
        Limits,
    },
    model::{map_addr, Mac, VipFlags, VipSpec},
};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn real_addr(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0A40_0000 + i))
}

fn mac(i: u32) -> Option<Mac> {
    let b = i.to_be_bytes();
    Some([0x02, 0xcc, b[0], b[1], b[2], b[3]])
}

/// Median time of `runs` Maglev builds of M = `m` over `reals` reals of weight 1.
pub fn maglev_build(reals: u32, m: u32, runs: usize) -> Result<Duration> {
    let members: Vec<MaglevReal> = (0..reals)
        .map(|i| MaglevReal {
            addr: map_addr(real_addr(i)),
            port: 0,
            weight: 1,
            id: i + 1,
        })
        .collect();
    let mut t = Vec::new();
    for _ in 0..runs.max(1) {
        let start = Instant::now();
        let ring = build_ring(&members, m).context("building a ring")?;
        t.push(start.elapsed());
        anyhow::ensure!(ring.len() == m as usize, "a ring of {} slots", ring.len());
    }
    Ok(median(t))
}

fn balancer(max_vips: u32, max_reals: u32) -> Result<Balancer<EbpfDataplane>> {
    let opts = LoadOptions {
        limits: Limits {
            max_vips,
            max_reals,
            ring_size: lb_common::DEFAULT_RING_SIZE,
        },
        conntrack_size: 4096,
        ..LoadOptions::default()
    };
    let dp = EbpfDataplane::load(&opts).context("loading the balancer (root needed)")?;
    Ok(Balancer::new(dp, Duration::ZERO))
}

/// Time from asking the balancer to remove one of a VIP's 8 reals to the call's return, when
/// the VIP's new ring is live in the kernel's map (checked): the daemon's writer makes this
/// call for `xlb real del`, whose socket round trip comes on top. Each removal comes after
/// the previous change's grace period. Median of `runs`.
pub fn real_del(runs: usize) -> Result<Duration> {
    let mut b = balancer(4, 64)?;
    let vip: VipSpec = "tcp/10.0.0.100:80".parse()?;
    b.add_vip(vip, VipFlags::default())?;
    for i in 0..8 {
        b.add_real(vip, real_addr(i), 1, mac(i))?;
    }
    let mut t = Vec::new();
    for run in 0..runs.max(1) {
        let gone = real_addr(run as u32 % 8);
        let id = b.real_id(&vip, gone).context("the real's id")?;
        // Past the previous change's grace period (a change made sooner waits it out: the
        // ring half it would rewrite may still be read).
        std::thread::sleep(Duration::from_millis(150));
        let start = Instant::now();
        b.del_real(vip, gone)?;
        t.push(start.elapsed());
        let live = b.live_ring(&vip)?.context("a live ring")?;
        anyhow::ensure!(
            !live.contains(&id),
            "the removed real is still in the live ring"
        );
        b.add_real(vip, gone, 1, mac(run as u32 % 8))?;
    }
    Ok(median(t))
}

/// Median time of the kernel's RCU grace period as the balancer waits for it
/// (`Dataplane::quiesce`: membarrier), which a real's removal includes before the real's entry
/// is cleared (its new ring is live before that).
pub fn quiesce(runs: usize) -> Result<Duration> {
    use lb_userspace::dataplane::Dataplane;
    let mut b = balancer(2, 4)?;
    let mut t = Vec::new();
    for _ in 0..runs.max(1) {
        let start = Instant::now();
        b.dataplane_mut().quiesce()?;
        t.push(start.elapsed());
    }
    Ok(median(t))
}

/// One apply of `vips` VIPs with `reals` reals each into an empty balancer (the daemon's
/// `xlb apply` of such a file, without the file's parsing and the socket).
pub fn apply(vips: u32, reals: u32) -> Result<Duration> {
    let mut b = balancer(vips, vips * reals + 1)?;
    let mut changes = Vec::new();
    for v in 0..vips {
        let spec: VipSpec = format!("tcp/10.1.{}.{}:80", v / 250, v % 250 + 1).parse()?;
        changes.push(Change::AddVip {
            spec,
            flags: VipFlags::default(),
        });
        for r in 0..reals {
            let i = v * reals + r;
            changes.push(Change::AddReal {
                vip: spec,
                addr: real_addr(i).into(),
                weight: 1,
                mac: mac(i),
            });
        }
    }
    let start = Instant::now();
    b.apply(changes)?;
    Ok(start.elapsed())
}

/// The ids of every map loaded in the system.
fn map_ids() -> std::collections::BTreeSet<u32> {
    aya::maps::loaded_maps()
        .filter_map(|m| m.ok().map(|m| m.id()))
        .collect()
}

/// A map's kernel memory (`memlock` in its fdinfo) and name, through an fd opened by id (the
/// balancer keeps some maps by their mmap alone, without an fd).
fn map_memory(id: u32) -> Option<(String, u64)> {
    use std::os::fd::{AsFd, AsRawFd};
    let info = aya::maps::MapInfo::from_id(id).ok()?;
    let fd = info.fd().ok()?;
    let text =
        std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd())).ok()?;
    let memlock = text
        .lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())?;
    Some((info.name_as_str().unwrap_or("?").to_string(), memlock))
}

/// The balancer's maps, loaded with `opts`: their kernel memory by map name.
pub fn memory(opts: &LoadOptions) -> Result<BTreeMap<String, u64>> {
    let before = map_ids();
    let dp = EbpfDataplane::load(opts).context("loading the balancer (root needed)")?;
    let mut out = BTreeMap::new();
    for id in map_ids().difference(&before) {
        if let Some((name, bytes)) = map_memory(*id) {
            *out.entry(name).or_default() += bytes;
        }
    }
    drop(dp);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_maglev_build_is_timed_and_right_sized() {
        assert!(maglev_build(8, 65537, 1).expect("build") > Duration::ZERO);
    }
}
