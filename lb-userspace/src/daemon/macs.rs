//! The reals' MACs, kept right: every `REFRESH_EVERY` the kernel's neighbour table is read,
//! a real whose entry changed gets its new MAC, a real whose entry failed (the host does not
//! answer ARP/ND) becomes unresolved and leaves the ring, and missing entries are probed.
//!
//! A direct-routing real's MAC is its own; a tunnel real's is its next hop's, the gateway of
//! the kernel's route to it (or its own when it is on-link), looked up again every round, so
//! a route change is followed. A tunnel real whose route leaves by another interface is
//! unresolved.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, PoisonError},
    time::Duration,
};

use super::handlers::Context;
use crate::{
    core::balancer::Change,
    dataplane::neigh::NeighTable,
    model::{format_mac, is_host_mac, Mac, Mode, VipSpec},
};

/// One MAC to keep right: of `addr` in `vip` (`None`: in every VIP that has it), found as the
/// MAC of `lookup` (the address itself, or a tunnel real's next hop; `None`: no route out of
/// the interface).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub vip: Option<VipSpec>,
    pub addr: IpAddr,
    pub lookup: Option<IpAddr>,
    pub mac: Option<Mac>,
}

/// The targets of a state: one per address, or one per VIP where the VIPs that have an
/// address reach it differently (a real in direct routing in one VIP, tunnelled through a
/// gateway in another).
pub fn targets(
    reals: &[(VipSpec, IpAddr, Mode, Option<Mac>)],
    next_hop: impl Fn(IpAddr) -> Option<IpAddr>,
) -> Vec<Target> {
    /// A VIP's use of an address: its lookup address and current MAC.
    type Use = (VipSpec, Option<IpAddr>, Option<Mac>);
    let mut by_addr: BTreeMap<IpAddr, Vec<Use>> = BTreeMap::new();
    let mut hops: HashMap<IpAddr, Option<IpAddr>> = HashMap::new();
    for (vip, addr, mode, mac) in reals {
        let lookup = match mode {
            Mode::Dr => Some(*addr),
            Mode::Tunnel => *hops.entry(*addr).or_insert_with(|| next_hop(*addr)),
        };
        by_addr.entry(*addr).or_default().push((*vip, lookup, *mac));
    }
    let mut out = Vec::new();
    for (addr, uses) in by_addr {
        let (_, lookup, mac) = uses[0];
        if uses.iter().all(|(_, l, m)| *l == lookup && *m == mac) {
            out.push(Target {
                vip: None,
                addr,
                lookup,
                mac,
            });
        } else {
            out.extend(uses.into_iter().map(|(vip, lookup, mac)| Target {
                vip: Some(vip),
                addr,
                lookup,
                mac,
            }));
        }
    }
    out
}

/// How often every real's MAC is re-read (and missing ones probed).
pub const REFRESH_EVERY: Duration = Duration::from_secs(2);

pub async fn refresher(ctx: Arc<Context>) {
    loop {
        tokio::time::sleep(REFRESH_EVERY).await;
        refresh(&ctx).await;
    }
}

/// One round: read the table, send the writer the MAC changes, probe what is missing.
pub async fn refresh(ctx: &Arc<Context>) {
    let mut reals = Vec::new();
    for v in &ctx.snapshot().snapshot.vips {
        for r in v.reals.iter().chain(&v.sorry) {
            reals.push((v.spec, r.addr, r.effective_mode, r.mac));
        }
    }
    if reals.is_empty() {
        return;
    }
    let c = ctx.clone();
    let found = tokio::task::spawn_blocking(move || {
        let targets = targets(&reals, |addr| match c.neigh.next_hop(addr) {
            Ok(hop) => hop,
            Err(e) => {
                log::warn!("looking up the next hop of {addr}: {e}");
                None
            }
        });
        c.neigh.dump_table().map(|t| (targets, t))
    })
    .await;
    let (targets, table) = match found {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            log::warn!("reading the neighbour table: {e}");
            return;
        }
        Err(e) => {
            log::warn!("reading the neighbour table: {e}");
            return;
        }
    };
    let (changes, probe) = mac_changes(&targets, &table, ctx.neigh.iface());
    for addr in probe {
        if let Err(e) = ctx.neigh.probe(addr) {
            log::debug!("probing {addr}: {e}");
        }
    }
    {
        let mut m = ctx.macs.lock().unwrap_or_else(PoisonError::into_inner);
        for t in &targets {
            let after = changes.iter().find_map(|c| match c {
                Change::SetMac { vip, addr, mac } if *addr == t.addr && *vip == t.vip => Some(*mac),
                _ => None,
            });
            let resolved = after.unwrap_or(t.mac).is_some();
            if resolved {
                if m.unresolved.remove(&t.addr) {
                    log::info!("real {} resolved", t.addr);
                }
            } else if m.unresolved.insert(t.addr) {
                m.failures += 1;
            }
        }
        m.unresolved
            .retain(|a| targets.iter().any(|t| t.addr == *a));
    }
    ctx.writer.refresh(changes);
}

/// The MAC changes a neighbour table asks for, and the addresses to probe.
pub fn mac_changes(
    targets: &[Target],
    table: &NeighTable,
    iface: &str,
) -> (Vec<Change>, Vec<IpAddr>) {
    let usable: HashMap<IpAddr, Mac> = table
        .usable
        .iter()
        .filter(|(_, mac)| is_host_mac(mac))
        .map(|(a, m)| (*a, *m))
        .collect();
    let mut changes = Vec::new();
    let mut probe = Vec::new();
    for t in targets {
        let (addr, mac) = (&t.addr, &t.mac);
        let set = |mac| Change::SetMac {
            vip: t.vip,
            addr: *addr,
            mac,
        };
        let Some(lookup) = t.lookup else {
            if mac.is_some() {
                log::warn!(
                    "real {addr}: no route to it out of {iface}: unresolved, it takes no new \
                     flows"
                );
                changes.push(set(None));
            }
            continue;
        };
        let via = if lookup == *addr {
            String::new()
        } else {
            format!(" (next hop {lookup})")
        };
        match usable.get(&lookup) {
            Some(found) => {
                if *mac != Some(*found) {
                    match mac {
                        Some(_) => {
                            log::info!("real {addr} moved to MAC {}{via}", format_mac(found))
                        }
                        None => log::info!("real {addr} resolved to {}{via}", format_mac(found)),
                    }
                    changes.push(set(Some(*found)));
                }
            }
            None if table.failed.contains(&lookup) => {
                // The kernel asked and nobody answered: the host is gone (or off the segment).
                if mac.is_some() {
                    log::warn!(
                        "real {addr}{via}: its neighbour entry on {iface} failed (no answer \
                         to ARP/ND): unresolved, it takes no flows until it answers"
                    );
                    changes.push(set(None));
                }
                probe.push(lookup);
            }
            None => {
                // An entry that aged out keeps its last MAC; only a real never resolved is
                // unresolved.
                if mac.is_none() {
                    log::debug!("real {addr}{via}: no MAC on {iface} yet (ARP/ND probing)");
                }
                probe.push(lookup);
            }
        }
    }
    (changes, probe)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn a_failed_entry_unresolves_a_real_and_an_aged_out_one_keeps_its_mac() {
        let a = [2, 0, 0, 0, 0, 1];
        let b = [2, 0, 0, 0, 0, 2];
        let current = BTreeMap::from([
            (ip("10.0.0.1"), Some(a)), // stays
            (ip("10.0.0.2"), Some(a)), // moved to b
            (ip("10.0.0.3"), Some(a)), // failed
            (ip("10.0.0.4"), Some(a)), // aged out
            (ip("10.0.0.5"), None),    // never resolved, now is
            (ip("10.0.0.6"), None),    // failed and never resolved
        ]);
        let table = NeighTable {
            usable: HashMap::from([
                (ip("10.0.0.1"), a),
                (ip("10.0.0.2"), b),
                (ip("10.0.0.5"), b),
                (ip("10.0.0.9"), [0xff; 6]),
            ]),
            failed: [ip("10.0.0.3"), ip("10.0.0.6")].into_iter().collect(),
        };
        let targets: Vec<Target> = current
            .into_iter()
            .map(|(addr, mac)| Target {
                vip: None,
                addr,
                lookup: Some(addr),
                mac,
            })
            .collect();
        let (changes, probe) = mac_changes(&targets, &table, "eth0");
        let set = |addr: &str, mac: Option<Mac>| Change::SetMac {
            vip: None,
            addr: ip(addr),
            mac,
        };
        assert_eq!(
            changes,
            vec![
                set("10.0.0.2", Some(b)),
                set("10.0.0.3", None),
                set("10.0.0.5", Some(b)),
            ]
        );
        assert_eq!(probe, vec![ip("10.0.0.3"), ip("10.0.0.4"), ip("10.0.0.6")]);
    }

    #[test]
    fn tunnel_reals_take_their_next_hops_mac_and_one_address_two_ways_is_set_per_vip() {
        let vip = |s: &str| s.parse::<VipSpec>().expect("vip");
        let (a, b) = (vip("tcp/10.0.0.100:80"), vip("tcp/10.0.0.100:443"));
        let gw = [2, 0, 0, 0, 0, 0x99];
        let own = [2, 0, 0, 0, 0, 0x11];
        let hop = |addr: IpAddr| match addr.to_string().as_str() {
            "10.9.0.5" | "10.9.0.6" => Some(ip("10.0.0.1")),
            "10.0.0.11" => Some(addr),
            _ => None,
        };
        let reals = [
            (a, ip("10.9.0.5"), Mode::Tunnel, None),
            (a, ip("10.0.0.11"), Mode::Dr, None),
            (b, ip("10.0.0.11"), Mode::Tunnel, None),
            // In both modes, reached through the gateway by the tunnel only.
            (a, ip("10.9.0.6"), Mode::Dr, None),
            (b, ip("10.9.0.6"), Mode::Tunnel, None),
            (b, ip("192.0.2.7"), Mode::Tunnel, Some(gw)),
        ];
        let t = targets(&reals, hop);
        let table = NeighTable {
            usable: HashMap::from([(ip("10.0.0.1"), gw), (ip("10.0.0.11"), own)]),
            failed: Default::default(),
        };
        let (changes, probe) = mac_changes(&t, &table, "eth0");
        let set = |vip: Option<VipSpec>, addr: &str, mac: Option<Mac>| Change::SetMac {
            vip,
            addr: ip(addr),
            mac,
        };
        assert_eq!(
            changes,
            vec![
                // On-link either way: one change for every VIP.
                set(None, "10.0.0.11", Some(own)),
                set(None, "10.9.0.5", Some(gw)),
                set(Some(b), "10.9.0.6", Some(gw)),
                // No route out of eth0 any more: unresolved.
                set(None, "192.0.2.7", None),
            ]
        );
        // The direct-routing use of 10.9.0.6 is looked up as itself (it never resolves).
        assert_eq!(probe, vec![ip("10.9.0.6")]);
    }
}
