//! The reals' MACs, kept right: every `REFRESH_EVERY` the kernel's neighbour table is read,
//! a real whose entry changed gets its new MAC, a real whose entry failed (the host does not
//! answer ARP/ND) becomes unresolved and leaves the ring, and missing entries are probed.
//!
//! A direct-routing real's MAC is its own, on the balancer's interface; a tunnel real's is its
//! next hop's, the gateway of the kernel's route to it (or its own when it is on-link), looked
//! up again every round, so a route change is followed. When that route leaves by another
//! interface, the real's frames are redirected there (its `Egress`: that interface's index,
//! MAC and MTU) and the next hop's MAC is read from that interface's table.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, PoisonError},
    time::Duration,
};

use super::handlers::Context;
use crate::{
    core::balancer::Change,
    dataplane::neigh::{KernelNeighbours, NeighTable},
    model::{format_mac, is_host_mac, Egress, Mac, Mode, VipSpec},
};

/// The address whose MAC a real's frames go to, and the interface it is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Hop {
    pub addr: IpAddr,
    pub ifindex: u32,
}

/// One MAC to keep right: of `addr` in `vip` (`None`: in every VIP that has it), found as the
/// MAC of `hop` (the address itself, or a tunnel real's next hop; `None`: no usable route),
/// with the real's current MAC and egress interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub vip: Option<VipSpec>,
    pub addr: IpAddr,
    pub hop: Option<Hop>,
    pub mac: Option<Mac>,
    pub egress: Option<Egress>,
}

/// A real as the refresher sees it: VIP, address, effective mode, MAC, egress.
pub type RealUse = (VipSpec, IpAddr, Mode, Option<Mac>, Option<Egress>);

/// The targets of a state: one per address, or one per VIP where the VIPs that have an
/// address reach it differently (a real in direct routing in one VIP, tunnelled through a
/// gateway in another). Direct-routing reals are looked up as themselves on `ingress`.
pub fn targets(
    reals: &[RealUse],
    ingress: u32,
    next_hop: impl Fn(IpAddr) -> Option<Hop>,
) -> Vec<Target> {
    /// A VIP's use of an address.
    type Use = (VipSpec, Option<Hop>, Option<Mac>, Option<Egress>);
    let mut by_addr: BTreeMap<IpAddr, Vec<Use>> = BTreeMap::new();
    let mut hops: HashMap<IpAddr, Option<Hop>> = HashMap::new();
    for (vip, addr, mode, mac, egress) in reals {
        let hop = match mode {
            Mode::Dr => Some(Hop {
                addr: *addr,
                ifindex: ingress,
            }),
            Mode::Tunnel | Mode::Nat => *hops.entry(*addr).or_insert_with(|| next_hop(*addr)),
        };
        by_addr
            .entry(*addr)
            .or_default()
            .push((*vip, hop, *mac, *egress));
    }
    let mut out = Vec::new();
    for (addr, uses) in by_addr {
        let (_, hop, mac, egress) = uses[0];
        if uses
            .iter()
            .all(|(_, h, m, e)| *h == hop && *m == mac && *e == egress)
        {
            out.push(Target {
                vip: None,
                addr,
                hop,
                mac,
                egress,
            });
        } else {
            out.extend(uses.into_iter().map(|(vip, hop, mac, egress)| Target {
                vip: Some(vip),
                addr,
                hop,
                mac,
                egress,
            }));
        }
    }
    out
}

/// An interface targets are found on: its name, neighbour table, and what a real leaving by
/// it is given (`None` for the balancer's own interface).
#[derive(Clone, Debug, Default)]
pub struct Link {
    pub name: String,
    pub table: NeighTable,
    pub egress: Option<Egress>,
}

/// What a tunnel real leaving by interface `n` is given: its index, MAC and MTU (or
/// `--tunnel-mtu`). The one reading of an interface for the refresh, `real add` and the
/// restart's check of a saved egress.
pub fn egress_of(n: &KernelNeighbours, tunnel_mtu: Option<u16>) -> Result<Egress, String> {
    let mac = n.mac().map_err(|e| format!("{}: {e}", n.iface()))?;
    let mtu = match tunnel_mtu {
        Some(m) => m,
        None => {
            let m = n.mtu().map_err(|e| format!("{}: mtu: {e}", n.iface()))?;
            u16::try_from(m).unwrap_or(u16::MAX)
        }
    };
    Ok(Egress {
        ifindex: n.ifindex(),
        mac,
        mtu,
    })
}

/// How often every real's MAC is re-read (and missing ones probed).
pub const REFRESH_EVERY: Duration = Duration::from_secs(2);

pub async fn refresher(ctx: Arc<Context>) {
    loop {
        tokio::time::sleep(REFRESH_EVERY).await;
        refresh(&ctx).await;
    }
}

/// Reads the interfaces the targets are on: the balancer's (an error there ends the round)
/// and any other a tunnel real's route leaves by (one that cannot be read is left out: its
/// reals count as unrouted this round). With `several` interfaces served, reals behind the
/// first one are given it as their egress too: their packets may come in by another.
fn read_links(
    ingress: &KernelNeighbours,
    targets: &[Target],
    tunnel_mtu: Option<u16>,
    several: bool,
) -> Result<HashMap<u32, (KernelNeighbours, Link)>, String> {
    let mut links = HashMap::new();
    let table = ingress
        .dump_table()
        .map_err(|e| format!("reading the neighbour table: {e}"))?;
    let egress = if several {
        Some(egress_of(ingress, tunnel_mtu)?)
    } else {
        None
    };
    let own = Link {
        name: ingress.iface().to_string(),
        table,
        egress,
    };
    links.insert(ingress.ifindex(), (ingress.clone(), own));
    for ifindex in targets.iter().filter_map(|t| t.hop.map(|h| h.ifindex)) {
        if links.contains_key(&ifindex) {
            continue;
        }
        let read = || -> Result<(KernelNeighbours, Link), String> {
            let n = KernelNeighbours::from_index(ifindex).map_err(|e| e.to_string())?;
            let egress = egress_of(&n, tunnel_mtu)?;
            let table = n.dump_table().map_err(|e| e.to_string())?;
            let link = Link {
                name: n.iface().to_string(),
                table,
                egress: Some(egress),
            };
            Ok((n, link))
        };
        match read() {
            Ok(l) => {
                links.insert(ifindex, l);
            }
            Err(e) => log::warn!("interface #{ifindex} (a tunnel real's route): {e}"),
        }
    }
    Ok(links)
}

/// One round: read the tables, send the writer the MAC changes, probe what is missing.
pub async fn refresh(ctx: &Arc<Context>) {
    let mut reals = Vec::new();
    for v in &ctx.snapshot().snapshot.vips {
        for r in v.reals.iter().chain(&v.sorry) {
            reals.push((v.spec, r.addr.ip, r.effective_mode, r.mac, r.egress));
        }
    }
    if reals.is_empty() {
        return;
    }
    // While the balancer's own link is down its neighbour entries fail, which says nothing of
    // the reals: taking them out then would re-pick every tracked flow when the link returns
    // (a link flap under a VRRP pair). The MACs stay as they are until it is up again.
    let down = !ctx.neigh.link_up().unwrap_or(true);
    {
        let mut m = ctx.macs.lock().unwrap_or_else(PoisonError::into_inner);
        if down != m.link_down {
            m.link_down = down;
            if down {
                log::warn!(
                    "{} is down: the reals' MACs stay as they are until it is up",
                    ctx.neigh.iface()
                );
            } else {
                log::info!(
                    "{} is up: the reals' MACs are followed again",
                    ctx.neigh.iface()
                );
            }
        }
    }
    if down {
        return;
    }
    let c = ctx.clone();
    let found = tokio::task::spawn_blocking(move || {
        let targets = targets(&reals, c.neigh.ifindex(), |addr| {
            match c.neigh.route_out(addr) {
                Ok(hop) => hop.map(|(addr, ifindex)| Hop { addr, ifindex }),
                Err(e) => {
                    log::warn!("looking up the next hop of {addr}: {e}");
                    None
                }
            }
        });
        read_links(&c.neigh, &targets, c.tunnel_mtu, c.several_ifaces()).map(|l| (targets, l))
    })
    .await;
    let (targets, links) = match found {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            log::warn!("{e}");
            return;
        }
        Err(e) => {
            log::warn!("reading the neighbour table: {e}");
            return;
        }
    };
    let tables: HashMap<u32, Link> = links.iter().map(|(i, (_, l))| (*i, l.clone())).collect();
    let (changes, probe) = mac_changes(&targets, &tables);
    for hop in probe {
        if let Some((n, _)) = links.get(&hop.ifindex) {
            if let Err(e) = n.probe(hop.addr) {
                log::debug!("probing {}: {e}", hop.addr);
            }
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

/// The MAC and egress changes the interfaces' neighbour tables ask for, and the next hops to
/// probe.
pub fn mac_changes(targets: &[Target], links: &HashMap<u32, Link>) -> (Vec<Change>, Vec<Hop>) {
    let mut changes = Vec::new();
    let mut probe = Vec::new();
    for t in targets {
        let (addr, mac) = (&t.addr, &t.mac);
        let set = |mac| Change::SetMac {
            vip: t.vip,
            addr: *addr,
            mac,
        };
        let Some((hop, link)) = t.hop.and_then(|h| links.get(&h.ifindex).map(|l| (h, l))) else {
            if mac.is_some() {
                log::warn!("real {addr}: no usable route to it: unresolved, it takes no new flows");
                changes.push(set(None));
            }
            continue;
        };
        let iface = &link.name;
        let via = if hop.addr == *addr {
            format!(" (on {iface})")
        } else {
            format!(" (next hop {} on {iface})", hop.addr)
        };
        let found = link.table.usable.get(&hop.addr).filter(|m| is_host_mac(m));
        let moved = t.egress != link.egress;
        if moved && (found.is_some() || mac.is_some()) {
            changes.push(Change::SetEgress {
                vip: t.vip,
                addr: *addr,
                egress: link.egress,
            });
        }
        match found {
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
            None if link.table.failed.contains(&hop.addr) => {
                // The kernel asked and nobody answered: the host is gone (or off the segment).
                if mac.is_some() {
                    log::warn!(
                        "real {addr}{via}: its neighbour entry failed (no answer to ARP/ND): \
                         unresolved, it takes no flows until it answers"
                    );
                    changes.push(set(None));
                }
                probe.push(hop);
            }
            None => {
                if moved && mac.is_some() {
                    // Its MAC was a neighbour on another interface: meaningless on this one.
                    log::info!("real {addr}{via}: route moved; unresolved until its next hop is");
                    changes.push(set(None));
                } else if mac.is_none() {
                    // An entry that aged out keeps its last MAC; only a real never resolved is
                    // unresolved.
                    log::debug!("real {addr}{via}: no MAC yet (ARP/ND probing)");
                }
                probe.push(hop);
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

    const ETH0: u32 = 2;
    const ETH1: u32 = 3;

    fn own(table: NeighTable) -> HashMap<u32, Link> {
        HashMap::from([(
            ETH0,
            Link {
                name: "eth0".into(),
                table,
                egress: None,
            },
        )])
    }

    fn hop(addr: IpAddr, ifindex: u32) -> Option<Hop> {
        Some(Hop { addr, ifindex })
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
                hop: hop(addr, ETH0),
                mac,
                egress: None,
            })
            .collect();
        let (changes, probe) = mac_changes(&targets, &own(table));
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
        let probed: Vec<IpAddr> = probe.iter().map(|h| h.addr).collect();
        assert_eq!(probed, vec![ip("10.0.0.3"), ip("10.0.0.4"), ip("10.0.0.6")]);
    }

    #[test]
    fn tunnel_reals_take_their_next_hops_mac_and_one_address_two_ways_is_set_per_vip() {
        let vip = |s: &str| s.parse::<VipSpec>().expect("vip");
        let (a, b) = (vip("tcp/10.0.0.100:80"), vip("tcp/10.0.0.100:443"));
        let gw = [2, 0, 0, 0, 0, 0x99];
        let mine = [2, 0, 0, 0, 0, 0x11];
        let route = |addr: IpAddr| match addr.to_string().as_str() {
            "10.9.0.5" | "10.9.0.6" => hop(ip("10.0.0.1"), ETH0),
            "10.0.0.11" => hop(addr, ETH0),
            _ => None,
        };
        let reals = [
            (a, ip("10.9.0.5"), Mode::Tunnel, None, None),
            (a, ip("10.0.0.11"), Mode::Dr, None, None),
            (b, ip("10.0.0.11"), Mode::Tunnel, None, None),
            // In both modes, reached through the gateway by the tunnel only.
            (a, ip("10.9.0.6"), Mode::Dr, None, None),
            (b, ip("10.9.0.6"), Mode::Tunnel, None, None),
            (b, ip("192.0.2.7"), Mode::Tunnel, Some(gw), None),
        ];
        let t = targets(&reals, ETH0, route);
        let table = NeighTable {
            usable: HashMap::from([(ip("10.0.0.1"), gw), (ip("10.0.0.11"), mine)]),
            failed: Default::default(),
        };
        let (changes, probe) = mac_changes(&t, &own(table));
        let set = |vip: Option<VipSpec>, addr: &str, mac: Option<Mac>| Change::SetMac {
            vip,
            addr: ip(addr),
            mac,
        };
        assert_eq!(
            changes,
            vec![
                // On-link either way: one change for every VIP.
                set(None, "10.0.0.11", Some(mine)),
                set(None, "10.9.0.5", Some(gw)),
                set(Some(b), "10.9.0.6", Some(gw)),
                // No route any more: unresolved.
                set(None, "192.0.2.7", None),
            ]
        );
        // The direct-routing use of 10.9.0.6 is looked up as itself (it never resolves).
        assert_eq!(
            probe,
            vec![Hop {
                addr: ip("10.9.0.6"),
                ifindex: ETH0
            }]
        );
    }

    #[test]
    fn a_route_out_of_another_interface_gives_the_real_that_egress_and_that_tables_mac() {
        let vip: VipSpec = "tcp/10.0.0.100:80".parse().expect("vip");
        let gw1 = [2, 0, 0, 0, 1, 0x01];
        let gw0 = [2, 0, 0, 0, 0, 0x01];
        let eth1 = Egress {
            ifindex: ETH1,
            mac: [2, 0, 0, 0, 1, 0xfe],
            mtu: 1500,
        };
        let mut links = own(NeighTable {
            usable: HashMap::from([(ip("10.0.0.1"), gw0)]),
            failed: Default::default(),
        });
        links.insert(
            ETH1,
            Link {
                name: "eth1".into(),
                table: NeighTable {
                    usable: HashMap::from([(ip("10.1.0.1"), gw1)]),
                    failed: Default::default(),
                },
                egress: Some(eth1),
            },
        );
        let route = |addr: IpAddr| match addr.to_string().as_str() {
            "10.9.0.5" | "10.9.0.6" | "10.9.0.7" => hop(ip("10.1.0.1"), ETH1),
            "10.9.0.8" => hop(ip("10.1.0.2"), ETH1),
            _ => hop(ip("10.0.0.1"), ETH0),
        };
        let reals = [
            // New: resolved out of eth1.
            (vip, ip("10.9.0.5"), Mode::Tunnel, None, None),
            // Already right: nothing to do.
            (vip, ip("10.9.0.6"), Mode::Tunnel, Some(gw1), Some(eth1)),
            // Its route moved from eth0 to eth1: the MAC of eth1's next hop, with the egress.
            (vip, ip("10.9.0.7"), Mode::Tunnel, Some(gw0), None),
            // Moved to eth1 where its next hop is not known yet: unresolved, probed there.
            (vip, ip("10.9.0.8"), Mode::Tunnel, Some(gw0), None),
            // Back on eth0: the egress is dropped.
            (vip, ip("10.9.0.9"), Mode::Tunnel, Some(gw1), Some(eth1)),
        ];
        let (changes, probe) = mac_changes(&targets(&reals, ETH0, route), &links);
        let mac = |addr: &str, mac: Option<Mac>| Change::SetMac {
            vip: None,
            addr: ip(addr),
            mac,
        };
        let egress = |addr: &str, egress: Option<Egress>| Change::SetEgress {
            vip: None,
            addr: ip(addr),
            egress,
        };
        assert_eq!(
            changes,
            vec![
                egress("10.9.0.5", Some(eth1)),
                mac("10.9.0.5", Some(gw1)),
                egress("10.9.0.7", Some(eth1)),
                mac("10.9.0.7", Some(gw1)),
                egress("10.9.0.8", Some(eth1)),
                mac("10.9.0.8", None),
                egress("10.9.0.9", None),
                mac("10.9.0.9", Some(gw0)),
            ]
        );
        assert_eq!(
            probe,
            vec![Hop {
                addr: ip("10.1.0.2"),
                ifindex: ETH1
            }]
        );
    }
}
