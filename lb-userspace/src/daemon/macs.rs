//! The reals' MACs, kept right: every `REFRESH_EVERY` the kernel's neighbour table is read,
//! a real whose entry changed gets its new MAC, a real whose entry failed (the host does not
//! answer ARP/ND) becomes unresolved and leaves the ring, and missing entries are probed.

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
    model::{format_mac, is_host_mac, Mac},
};

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
    let mut current: BTreeMap<IpAddr, Option<Mac>> = BTreeMap::new();
    for v in &ctx.snapshot().snapshot.vips {
        for r in v.reals.iter().chain(&v.sorry) {
            current.insert(r.addr, r.mac);
        }
    }
    if current.is_empty() {
        return;
    }
    let c = ctx.clone();
    let table = match tokio::task::spawn_blocking(move || c.neigh.dump_table()).await {
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
    let (changes, probe) = mac_changes(&current, &table, ctx.neigh.iface());
    for addr in probe {
        if let Err(e) = ctx.neigh.probe(addr) {
            log::debug!("probing {addr}: {e}");
        }
    }
    {
        let mut m = ctx.macs.lock().unwrap_or_else(PoisonError::into_inner);
        for (addr, mac) in &current {
            let after = changes.iter().find_map(|c| match c {
                Change::SetMac { addr: a, mac, .. } if a == addr => Some(*mac),
                _ => None,
            });
            let resolved = after.unwrap_or(*mac).is_some();
            if resolved {
                if m.unresolved.remove(addr) {
                    log::info!("real {addr} resolved");
                }
            } else if m.unresolved.insert(*addr) {
                m.failures += 1;
            }
        }
        m.unresolved.retain(|a| current.contains_key(a));
    }
    ctx.writer.refresh(changes);
}

/// The MAC changes a neighbour table asks for, and the addresses to probe.
pub fn mac_changes(
    current: &BTreeMap<IpAddr, Option<Mac>>,
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
    for (addr, mac) in current {
        match usable.get(addr) {
            Some(found) => {
                if *mac != Some(*found) {
                    match mac {
                        Some(_) => log::info!("real {addr} moved to MAC {}", format_mac(found)),
                        None => log::info!("real {addr} resolved to {}", format_mac(found)),
                    }
                    changes.push(Change::SetMac {
                        vip: None,
                        addr: *addr,
                        mac: Some(*found),
                    });
                }
            }
            None if table.failed.contains(addr) => {
                // The kernel asked and nobody answered: the host is gone (or off the segment).
                if mac.is_some() {
                    log::warn!(
                        "real {addr}: its neighbour entry on {iface} failed (no answer to \
                         ARP/ND): unresolved, it takes no flows until it answers"
                    );
                    changes.push(Change::SetMac {
                        vip: None,
                        addr: *addr,
                        mac: None,
                    });
                }
                probe.push(*addr);
            }
            None => {
                // An entry that aged out keeps its last MAC; only a real never resolved is
                // unresolved.
                if mac.is_none() {
                    log::debug!("real {addr}: no MAC on {iface} yet (ARP/ND probing)");
                }
                probe.push(*addr);
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
        let (changes, probe) = mac_changes(&current, &table, "eth0");
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
}
