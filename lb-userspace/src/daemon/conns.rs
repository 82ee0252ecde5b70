//! `xlb conns` (the tracked flows, by VIP and real) and `xlb whereis` (where one client's
//! flow goes now, and why): reads of the connection table and the live ring, never writes.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    time::Instant,
};

use lb_common::{ring_slot, CT_F_CLOSING};

use super::{
    handlers::{invalid, Context},
    health_ops::{internal, not_found, parse_real, parse_vip},
};
use crate::{
    api::{ApiError, ConnInfo, ConnsReply, PerRealFlows, WhereisReply},
    core::balancer::sync::{packet_key, ring_hash},
    model::{unmap_addr, Proto, RealAddr, VipSpec},
};

impl Context {
    fn idle_of(&self, proto: Proto) -> std::time::Duration {
        match proto {
            Proto::Tcp => self.idle.0,
            Proto::Udp => self.idle.1,
        }
    }

    pub(super) async fn conns(
        &self,
        vip: Option<&str>,
        real: Option<&str>,
        count_only: bool,
    ) -> Result<ConnsReply, ApiError> {
        let want_vip = vip.map(parse_vip).transpose()?;
        let want_real = real.map(parse_real).transpose()?;
        let view = self.snapshot();
        if let Some(spec) = &want_vip {
            self.vip_now(spec)?;
        }
        // real id → (VIP and its name, idle time, address and its name): a million flows
        // format each VIP and real once. Real ids are per VIP.
        type Named = ((VipSpec, String), std::time::Duration, (RealAddr, String));
        let mut reals: HashMap<u32, Named> = HashMap::new();
        for v in &view.snapshot.vips {
            if want_vip.is_some_and(|w| w != v.spec) {
                continue;
            }
            for r in v.reals.iter().chain(&v.sorry) {
                reals.insert(
                    r.id,
                    (
                        (v.spec, v.spec.to_string()),
                        self.idle_of(v.spec.proto),
                        (r.addr, r.addr.to_string()),
                    ),
                );
            }
        }
        let flows = self.flows.clone();
        let start = Instant::now();
        let walked = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            let mut per_real: BTreeMap<(VipSpec, RealAddr), u64> = BTreeMap::new();
            let mut count = 0u64;
            let scanned = flows.walk(&mut |f| {
                let Some(((spec, vip_name), idle, (addr, real_name))) = reals.get(&f.value.real_id)
                else {
                    return;
                };
                let addr = *addr;
                let closing = f.value.flags & CT_F_CLOSING != 0;
                if f.age > *idle || want_real.is_some_and(|r| r != addr) {
                    return;
                }
                let client_ip = unmap_addr(f.tuple.src);
                let key = packet_key(spec, client_ip, f.client_port(), f.dst_port());
                // A tuple rewritten while the walk read it: not a flow to list.
                if !flows.holds(f, &key) {
                    return;
                }
                count += 1;
                if !closing {
                    *per_real.entry((*spec, addr)).or_default() += 1;
                }
                if !count_only {
                    out.push(ConnInfo {
                        vip: vip_name.clone(),
                        client: SocketAddr::new(client_ip, f.client_port()).to_string(),
                        real: real_name.clone(),
                        closing,
                        idle_secs: f.age.as_secs(),
                    });
                }
            })?;
            Ok::<_, crate::dataplane::DataplaneError>((out, per_real, count, scanned))
        })
        .await
        .map_err(|e| internal(e.to_string()))?
        .map_err(|e| internal(e.to_string()))?;
        let (flows, per_real, count, scanned) = walked;
        Ok(ConnsReply {
            flows,
            per_real: per_real
                .into_iter()
                .map(|((vip, real), flows)| PerRealFlows {
                    vip: vip.to_string(),
                    real: real.to_string(),
                    flows,
                })
                .collect(),
            count,
            scanned,
            scan_ms: start.elapsed().as_millis() as u64,
        })
    }

    pub(super) async fn whereis(&self, vip: &str, client: &str) -> Result<WhereisReply, ApiError> {
        let spec = parse_vip(vip)?;
        let client: SocketAddr = client.parse().map_err(|_| {
            invalid(
                "client",
                format!("{client:?} is not ADDR:PORT ([ADDR]:PORT for IPv6)"),
            )
        })?;
        let v = self.vip_now(&spec)?;
        let view = self
            .writer
            .sync_view(Some(vec![spec]))
            .await
            .map_err(internal)?;
        let ring = view
            .into_iter()
            .next()
            .ok_or_else(|| not_found("vip", format!("VIP {spec} does not exist")))?;
        let key = packet_key(&spec, client.ip(), client.port(), spec.port);
        if !v.flags.no_conntrack {
            let flows = self.flows.clone();
            let ids: std::collections::HashSet<u32> =
                v.reals.iter().chain(&v.sorry).map(|r| r.id).collect();
            let found =
                tokio::task::spawn_blocking(move || flows.get(&key, &|id| ids.contains(&id)))
                    .await
                    .map_err(|e| internal(e.to_string()))?
                    .map_err(|e| internal(e.to_string()))?;
            if let Some((entry, age)) = found {
                let idle = if entry.flags & CT_F_CLOSING != 0 {
                    std::time::Duration::from_secs(lb_common::DEFAULT_CT_CLOSING_IDLE_SECS)
                } else {
                    self.idle_of(spec.proto)
                };
                let serving = v
                    .reals
                    .iter()
                    .chain(&v.sorry)
                    .find(|r| r.id == entry.real_id)
                    .filter(|r| r.serving);
                if let (Some(r), true) = (serving, age <= idle) {
                    return Ok(WhereisReply {
                        real: Some(r.addr.to_string()),
                        reason: "tracked".into(),
                        slot: None,
                    });
                }
            }
        }
        let slot = ring_slot(
            ring_hash(&key, v.flags.no_src_port, ring.seed),
            ring.ring.len() as u32,
        );
        let real = ring
            .ring
            .get(slot as usize)
            .and_then(|id| ring.reals.get(id))
            .filter(|addr| {
                v.reals
                    .iter()
                    .chain(&v.sorry)
                    .any(|r| r.addr == **addr && r.in_ring)
            });
        Ok(WhereisReply {
            real: real.map(ToString::to_string),
            reason: "ring".into(),
            slot: Some(slot),
        })
    }
}
