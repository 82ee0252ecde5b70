//! Flow sync's part in the balancer: which tracked flows the live ring would send elsewhere
//! (those are the only ones another node cannot reproduce), and taking in such flows from a
//! peer. Flows cross nodes as addresses (VIP, client, real), never as ids: ids differ between
//! nodes, addresses do not.

use std::{collections::HashMap, net::IpAddr, time::Duration};

use lb_common::{flow_hash, ring_slot, FlowKey, CT_F_CLOSING, FLOW_W4_TUPLE, IPPROTO_TCP};

use super::Balancer;
use crate::{
    core::clock::Clock,
    dataplane::{Dataplane, DataplaneError, FlowSource, Merge},
    model::{map_addr, unmap_addr, Proto, RealAddr, VipSpec},
};

/// A tracked flow as nodes exchange it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SyncFlow {
    pub vip: VipSpec,
    pub client: IpAddr,
    pub client_port: u16,
    /// The packets' destination port (the VIP's, or any for a port-0 VIP).
    pub dst_port: u16,
    /// With its port for a NAT real that has one (reals of one address on several ports of
    /// one VIP are told apart).
    pub real: RealAddr,
}

/// What a walk needs to know of a VIP: its id here, its live ring and its reals' addresses.
#[derive(Clone, Debug)]
pub struct SyncVip {
    pub spec: VipSpec,
    pub vip_id: u32,
    pub no_src_port: bool,
    /// The flow hash's seed (`--hash-seed`).
    pub seed: u32,
    pub ring: Vec<u32>,
    pub reals: HashMap<u32, RealAddr>,
}

/// What merging a peer's flows did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MergeReport {
    pub inserted: u64,
    pub refreshed: u64,
    /// This node tracks the flow to another real: its own entry stands.
    pub kept_own: u64,
    /// The VIP or the real does not exist here (the nodes' configs differ).
    pub unknown: u64,
    /// Map writes that failed (logged).
    pub failed: u64,
}

fn proto_number(p: Proto) -> u8 {
    match p {
        Proto::Tcp => IPPROTO_TCP,
        Proto::Udp => 17,
    }
}

/// The flow key the kernel builds for this flow's packets.
pub fn packet_key(vip: &VipSpec, client: IpAddr, client_port: u16, dst_port: u16) -> FlowKey {
    FlowKey {
        src: map_addr(client),
        dst: map_addr(vip.addr),
        src_port_be: client_port.to_be(),
        dst_port_be: dst_port.to_be(),
        proto: proto_number(vip.proto),
        _pad: [0; 3],
    }
}

/// The flow hash the kernel's ring lookup uses (without the source port for no-src-port
/// VIPs), with the daemon's `--hash-seed`.
pub fn ring_hash(key: &FlowKey, no_src_port: bool, seed: u32) -> u32 {
    let mut w = key.words();
    w[4] &= if no_src_port {
        FLOW_W4_TUPLE & !0xFFFF
    } else {
        FLOW_W4_TUPLE
    };
    flow_hash(&FlowKey::from_words(w), seed)
}

/// The tracked flows of `vips` that their live ring would send to another real than the one
/// they are pinned to: not closing, younger than their protocol's idle time (`idle`: TCP,
/// UDP). One walk of the table.
pub fn differing(
    flows: &dyn FlowSource,
    vips: &[SyncVip],
    idle: (Duration, Duration),
) -> Result<Vec<SyncFlow>, DataplaneError> {
    // Real ids are per VIP: a flow's real names its VIP.
    let by_real: HashMap<u32, (&SyncVip, RealAddr)> = vips
        .iter()
        .flat_map(|v| v.reals.iter().map(move |(id, addr)| (*id, (v, *addr))))
        .collect();
    let mut out = Vec::new();
    flows.walk(&mut |f| {
        let Some(&(vip, real)) = by_real.get(&f.value.real_id) else {
            return;
        };
        let limit = if vip.spec.proto == Proto::Tcp {
            idle.0
        } else {
            idle.1
        };
        if f.value.flags & CT_F_CLOSING != 0 || f.age > limit || vip.ring.is_empty() {
            return;
        }
        let client = unmap_addr(f.tuple.src);
        let (client_port, dst_port) = (f.client_port(), f.dst_port());
        let key = packet_key(&vip.spec, client, client_port, dst_port);
        // A tuple rewritten while the walk read it is no flow to send.
        if !flows.holds(f, &key) {
            return;
        }
        let slot = ring_slot(
            ring_hash(&key, vip.no_src_port, vip.seed),
            vip.ring.len() as u32,
        );
        if vip.ring[slot as usize] != f.value.real_id {
            out.push(SyncFlow {
                vip: vip.spec,
                client,
                client_port,
                dst_port,
                real,
            });
        }
    })?;
    Ok(out)
}

impl<D: Dataplane, C: Clock> Balancer<D, C> {
    /// The VIPs a flow-sync walk compares against (`None`: all).
    pub fn sync_view(&self, only: Option<&[VipSpec]>) -> Result<Vec<SyncVip>, DataplaneError> {
        let mut out = Vec::new();
        for (spec, v) in &self.vips {
            if only.is_some_and(|o| !o.contains(spec)) {
                continue;
            }
            let Some(ring) = self.live_ring(spec)? else {
                continue;
            };
            out.push(SyncVip {
                spec: *spec,
                vip_id: v.id,
                no_src_port: v.flags.no_src_port,
                seed: self.hash_seed,
                ring,
                reals: v.reals.iter().map(|(a, r)| (r.id, *a)).collect(),
            });
        }
        Ok(out)
    }

    /// Take in flows a peer tracks: each goes to its real here, unless this node tracks the
    /// flow itself to another real.
    pub fn merge_flows(&mut self, flows: &[SyncFlow]) -> MergeReport {
        let mut report = MergeReport::default();
        for f in flows {
            let Some(vip) = self.vips.get(&f.vip) else {
                report.unknown += 1;
                continue;
            };
            let Some((_, real)) = vip.reals.iter().find(|(a, _)| **a == f.real) else {
                report.unknown += 1;
                continue;
            };
            let key = packet_key(&f.vip, f.client, f.client_port, f.dst_port);
            match self.dp.conntrack_merge(&key, vip.id, real.id) {
                Ok(Merge::Inserted) => report.inserted += 1,
                Ok(Merge::Refreshed) => report.refreshed += 1,
                Ok(Merge::KeptOwn) => report.kept_own += 1,
                Ok(Merge::NoRoom) => {
                    if report.failed == 0 {
                        log::warn!("flow sync: a flow of {}: its bucket is full", f.vip);
                    }
                    report.failed += 1;
                }
                Err(e) => {
                    if report.failed == 0 {
                        log::warn!("flow sync: merging a flow of {}: {e}", f.vip);
                    }
                    report.failed += 1;
                }
            }
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::balancer::tests::{balancer, ip, mac, TestBalancer};

    fn flow(vip: &VipSpec, client: &str, port: u16, real: &str) -> SyncFlow {
        SyncFlow {
            vip: *vip,
            client: ip(client),
            client_port: port,
            dst_port: vip.port,
            real: real.parse().expect("real"),
        }
    }

    fn two_real_vip() -> (TestBalancer, VipSpec) {
        let (mut b, _clock) = balancer();
        let vip: VipSpec = "tcp/10.0.0.100:80".parse().expect("vip");
        b.add_vip(vip, Default::default()).expect("vip");
        for (i, r) in ["10.0.1.1", "10.0.1.2"].iter().enumerate() {
            b.add_real(vip, ip(r), 1, Some(mac(i as u8 + 1)))
                .expect("real");
        }
        (b, vip)
    }

    #[test]
    fn a_flow_off_its_ring_slot_is_the_only_one_sent() {
        let (mut b, vip) = two_real_vip();
        let view = b.sync_view(None).expect("view");
        let v = &view[0];
        // One client the ring gives to each real; pin one of them to the other real.
        let pick = |port: u16| {
            let key = packet_key(&vip, ip("192.0.2.7"), port, 80);
            v.ring[ring_slot(ring_hash(&key, false, 0), v.ring.len() as u32) as usize]
        };
        let (on, off) = (
            40000u16,
            (40001..).find(|p| pick(*p) != pick(40000)).expect("port"),
        );
        let ids: Vec<u32> = vec![pick(on), pick(on)];
        let addr_of = |id: u32| v.reals[&id];
        let merged = b.merge_flows(&[
            flow(&vip, "192.0.2.7", on, &addr_of(ids[0]).to_string()),
            flow(&vip, "192.0.2.7", off, &addr_of(ids[1]).to_string()),
        ]);
        assert_eq!(merged.inserted, 2);
        let flows = b.dataplane().flow_reader().expect("reader");
        let out = differing(&flows, &view, (Duration::MAX, Duration::MAX)).expect("walk");
        assert_eq!(
            out,
            vec![flow(&vip, "192.0.2.7", off, &addr_of(ids[1]).to_string())]
        );
    }

    #[test]
    fn a_merge_never_overrides_and_skips_what_it_does_not_know() {
        let (mut b, vip) = two_real_vip();
        let first = b.merge_flows(&[flow(&vip, "192.0.2.9", 5000, "10.0.1.1")]);
        assert_eq!(first.inserted, 1);
        let again = b.merge_flows(&[
            flow(&vip, "192.0.2.9", 5000, "10.0.1.2"),
            flow(&vip, "192.0.2.9", 5000, "10.0.1.1"),
            flow(&vip, "192.0.2.9", 5001, "10.0.1.3"),
            flow(
                &"tcp/10.0.0.101:80".parse().expect("vip"),
                "192.0.2.9",
                1,
                "10.0.1.1",
            ),
        ]);
        assert_eq!(
            again,
            MergeReport {
                kept_own: 1,
                refreshed: 1,
                unknown: 2,
                ..MergeReport::default()
            }
        );
        let vip_id = b.vip_id(&vip).expect("vip id");
        let key = packet_key(&vip, ip("192.0.2.9"), 5000, 80);
        let id1 = b.real_id(&vip, ip("10.0.1.1")).expect("id");
        assert_eq!(
            b.dataplane()
                .conntrack_get(&key, vip_id)
                .expect("get")
                .map(|v| v.real_id),
            Some(id1)
        );
    }

    #[test]
    fn flows_of_nat_reals_of_one_address_on_two_ports_reach_their_own_real() {
        use crate::{
            core::balancer::Change,
            model::{Mode, RealAddr},
        };
        let (mut b, _clock) = balancer();
        let vip: VipSpec = "tcp/10.0.0.100:80".parse().expect("vip");
        let mut changes = vec![
            Change::AddVip {
                spec: vip,
                flags: Default::default(),
            },
            Change::SetMode {
                vip,
                real: None,
                mode: Some(Mode::Nat),
            },
        ];
        for (i, r) in ["10.0.1.1:8080", "10.0.1.1:8081"].iter().enumerate() {
            changes.push(Change::AddReal {
                vip,
                addr: r.parse().expect("real"),
                weight: 1,
                mac: Some(mac(i as u8 + 1)),
            });
        }
        b.apply(changes).expect("apply");
        let merged = b.merge_flows(&[
            flow(&vip, "192.0.2.9", 5000, "10.0.1.1:8080"),
            flow(&vip, "192.0.2.9", 5001, "10.0.1.1:8081"),
            // The address alone names neither.
            flow(&vip, "192.0.2.9", 5002, "10.0.1.1"),
        ]);
        assert_eq!((merged.inserted, merged.unknown), (2, 1));
        let vip_id = b.vip_id(&vip).expect("vip id");
        for (port, real) in [(5000, "10.0.1.1:8080"), (5001, "10.0.1.1:8081")] {
            let real: RealAddr = real.parse().expect("real");
            let key = packet_key(&vip, ip("192.0.2.9"), port, 80);
            let got = b
                .dataplane()
                .conntrack_get(&key, vip_id)
                .expect("get")
                .map(|v| v.real_id);
            assert_eq!(got, b.real_id(&vip, real), "{real}");
        }
    }
}
