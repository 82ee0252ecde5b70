//! The control API's health operations (`check_set`, `check_del`, `vip_set`, `real_flows`)
//! and `list`, which shows health with the rest.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use lb_common::{CT_F_CLOSING, CT_F_EMBRYONIC, CT_F_UDP};

use super::handlers::{invalid, Context};
use crate::{
    api::{
        ApiError, ErrorCode, HealthReport, ListReply, RealFlowsReply, RealInfo, SorryInfo, VipInfo,
    },
    core::balancer::{Change, RealSnapshot, VipSnapshot},
    dataplane::neigh::KernelNeighbours,
    model::{
        check_real, format_mac, parse_real_addr, parse_sorry_server, CheckFields, Mode, RealAddr,
        VipSpec,
    },
};

pub(super) fn not_found(field: &str, message: String) -> ApiError {
    ApiError {
        code: ErrorCode::NotFound,
        field: Some(field.to_string()),
        message,
    }
}

fn check_json(fields: &CheckFields) -> serde_json::Value {
    serde_json::Value::Object(
        fields
            .entries()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    )
}

impl Context {
    pub(super) fn vip_now(&self, spec: &VipSpec) -> Result<VipSnapshot, ApiError> {
        self.snapshot()
            .snapshot
            .vips
            .iter()
            .find(|v| v.spec == *spec)
            .cloned()
            .ok_or_else(|| not_found("vip", format!("VIP {spec} does not exist")))
    }

    pub(super) async fn check_set(
        &self,
        vip: &str,
        real: Option<&str>,
        check: &serde_json::Value,
    ) -> Result<(), ApiError> {
        let spec = parse_vip(vip)?;
        let real = real.map(parse_real).transpose()?;
        let fields = CheckFields::from_json(check)
            .map_err(|e| invalid(&format!("check.{}", e.key), format!("check {e}")))?;
        // The whole check, against this VIP (the balancer checks each real's merge again).
        let v = self.vip_now(&spec)?;
        let merged = match real {
            None => Some(fields.clone()),
            Some(addr) => {
                if !v.reals.iter().any(|r| r.addr == addr) {
                    return Err(not_found(
                        "real",
                        format!("real {addr} is not in VIP {spec}"),
                    ));
                }
                CheckFields::merged(v.check.as_ref(), Some(&fields))
            }
        };
        if let Some(m) = merged {
            m.resolve(&spec)
                .map_err(|e| invalid(&format!("check.{}", e.key), format!("check {e}")))?;
        }
        self.writer
            .apply(vec![Change::SetCheck {
                vip: spec,
                real,
                check: Some(Box::new(fields)),
            }])
            .await?;
        Ok(())
    }

    pub(super) async fn check_del(&self, vip: &str, real: Option<&str>) -> Result<(), ApiError> {
        let spec = parse_vip(vip)?;
        let real = real.map(parse_real).transpose()?;
        let v = self.vip_now(&spec)?;
        let had = match real {
            None => v.check.is_some(),
            Some(addr) => v.reals.iter().any(|r| r.addr == addr && r.check.is_some()),
        };
        if !had {
            let whose =
                real.map_or_else(|| format!("VIP {spec}"), |a| format!("real {a} of {spec}"));
            return Err(not_found(
                "check",
                format!("{whose} has no check of its own"),
            ));
        }
        self.writer
            .apply(vec![Change::SetCheck {
                vip: spec,
                real,
                check: None,
            }])
            .await?;
        Ok(())
    }

    pub(super) async fn vip_set(
        &self,
        vip: &str,
        quorum: Option<u32>,
        sorry_server: Option<&str>,
        on_quorum_lost: Option<&str>,
        down_flows: Option<&str>,
        mode: Option<&str>,
    ) -> Result<(), ApiError> {
        let spec = parse_vip(vip)?;
        let v = self.vip_now(&spec)?;
        let mut options = v.options;
        if let Some(q) = quorum {
            options.quorum = q;
        }
        if let Some(s) = on_quorum_lost {
            options.on_quorum_lost = s
                .parse()
                .map_err(|m: String| invalid("on_quorum_lost", format!("on_quorum_lost: {m}")))?;
        }
        if let Some(s) = down_flows {
            options.down_flows = s
                .parse()
                .map_err(|m: String| invalid("down_flows", format!("down_flows: {m}")))?;
        }
        let mut changes = Vec::new();
        let mut mac_for = None;
        if let Some(s) = sorry_server {
            options.sorry_server = if s == "none" {
                None
            } else {
                let addr = parse_sorry_server(s).map_err(|m| invalid("sorry_server", m))?;
                check_real(&spec, addr.into(), Some(v.effective_mode))
                    .map_err(|m| invalid("sorry_server", format!("sorry server: {m}")))?;
                if v.reals.iter().any(|r| r.addr.ip == addr) {
                    return Err(invalid(
                        "sorry_server",
                        format!("{addr} is a real of VIP {spec}: a sorry server is another host"),
                    ));
                }
                if v.sorry.as_ref().map(|s| s.addr.ip) != Some(addr) {
                    mac_for = Some(addr);
                }
                Some(addr)
            };
        }
        changes.push(Change::SetOptions { vip: spec, options });
        if let Some(m) = mode {
            let mode = match m {
                "default" => None,
                m => Some(m.parse().map_err(|e: String| invalid("mode", e))?),
            };
            changes.push(Change::SetMode {
                vip: spec,
                real: None,
                mode,
            });
        }
        if let Some(addr) = mac_for {
            let mac = match self.known_mac(addr) {
                Some(m) => Some(m),
                None => self.resolve(&[addr]).await.remove(&addr).flatten(),
            };
            match mac {
                Some(mac) => changes.push(Change::SetMac {
                    vip: Some(spec),
                    addr,
                    mac: Some(mac),
                }),
                None => {
                    log::warn!(
                        "sorry server {addr}: MAC unresolved; it takes no flows until it is"
                    );
                    self.note_unresolved(addr);
                }
            }
        }
        self.writer.apply(changes).await?;
        Ok(())
    }

    pub(super) async fn real_flows(
        &self,
        vip: &str,
        real: &str,
    ) -> Result<RealFlowsReply, ApiError> {
        let spec = parse_vip(vip)?;
        let addr = parse_real(real)?;
        let v = self.vip_now(&spec)?;
        if v.flags.no_conntrack {
            return Err(ApiError {
                code: ErrorCode::FailedPrecondition,
                field: Some("vip".to_string()),
                message: format!(
                    "VIP {spec} does not track connections (no-conntrack): its flows follow the \
                     ring, so a drained real keeps none and there is nothing to count"
                ),
            });
        }
        let r = v
            .reals
            .iter()
            .find(|r| r.addr == addr)
            .ok_or_else(|| not_found("real", format!("real {addr} is not in VIP {spec}")))?;
        let idle = match spec.proto {
            crate::model::Proto::Tcp => self.idle.0,
            crate::model::Proto::Udp => self.idle.1,
        };
        let flows = self.flows.clone();
        let id = r.id;
        let count = tokio::task::spawn_blocking(move || flows.real_flows(id, idle))
            .await
            .map_err(|e| internal(e.to_string()))?
            .map_err(|e| internal(e.to_string()))?;
        Ok(RealFlowsReply {
            vip: spec.to_string(),
            real: addr.to_string(),
            flows: count.flows,
            scanned: count.scanned,
            scan_ms: count.elapsed.as_millis() as u64,
        })
    }

    /// ipvsadm's ActiveConn / InActConn of each NAT real, by real id, from one walk of the
    /// connection table (only while NAT reals exist): active are TCP flows from their
    /// handshake until a FIN or RST from either side; inactive are the rest still tracked
    /// (a SYN without its answer, closing flows until they idle out, UDP flows).
    fn nat_conns(&self, vips: &[VipSnapshot]) -> HashMap<u32, (u64, u64)> {
        let mut counts: HashMap<u32, (u64, u64)> = vips
            .iter()
            .flat_map(|v| v.reals.iter())
            .filter(|r| r.effective_mode == Mode::Nat)
            .map(|r| (r.id, (0, 0)))
            .collect();
        if counts.is_empty() {
            return counts;
        }
        let (tcp, udp) = self.idle;
        let closing = tcp.min(Duration::from_secs(lb_common::DEFAULT_CT_CLOSING_IDLE_SECS));
        let walked = self.flows.walk(&mut |f| {
            let Some(c) = counts.get_mut(&f.value.real_id) else {
                return;
            };
            let flags = f.value.flags;
            if flags & CT_F_UDP != 0 {
                if f.age <= udp {
                    c.1 += 1;
                }
            } else if flags & (CT_F_CLOSING | CT_F_EMBRYONIC) != 0 {
                if f.age <= closing {
                    c.1 += 1;
                }
            } else if f.age <= tcp {
                c.0 += 1;
            }
        });
        if let Err(e) = walked {
            log::warn!("counting the NAT reals' connections: {e}");
        }
        counts
    }

    pub(super) fn list(&self) -> ListReply {
        let now = Instant::now();
        let view = self.snapshot();
        let conns = self.nat_conns(&view.snapshot.vips);
        let vips = view
            .snapshot
            .vips
            .iter()
            .map(|v| VipInfo {
                vip: v.spec.to_string(),
                id: v.id,
                flags: v.flags.names().iter().map(|s| s.to_string()).collect(),
                mode: v.effective_mode.to_string(),
                ring_digest: v.ring_digest.clone(),
                reals: v
                    .reals
                    .iter()
                    .map(|r| {
                        let mut info = self.real_info(v, r, now);
                        if let Some((active, inactive)) = conns.get(&r.id) {
                            info.active_conns = Some(*active);
                            info.inactive_conns = Some(*inactive);
                        }
                        info
                    })
                    .collect(),
                quorum: if v.quorum_lost { "lost" } else { "ok" }.to_string(),
                sorry_active: v.sorry_active,
                quorum_threshold: v.options.quorum,
                healthy_weight: v.healthy_weight,
                on_quorum_lost: v.options.on_quorum_lost.to_string(),
                down_flows: v.options.down_flows.to_string(),
                sorry_server: v.sorry.as_ref().map(|s| SorryInfo {
                    addr: s.addr.to_string(),
                    id: s.id,
                    mac: s.mac.as_ref().map(format_mac),
                }),
                check: v.check.as_ref().map(check_json),
            })
            .collect();
        ListReply { vips }
    }

    fn real_info(&self, v: &VipSnapshot, r: &RealSnapshot, now: Instant) -> RealInfo {
        let health = match &r.effective_check {
            None => HealthReport {
                status: "unchecked".to_string(),
                since_secs: 0,
                last: String::new(),
                successes: 0,
                failures: 0,
            },
            Some(_) => {
                let info = self.health.get(&v.spec, r.addr);
                HealthReport {
                    status: if r.down { "down" } else { "up" }.to_string(),
                    since_secs: info
                        .as_ref()
                        .map_or(0, |i| now.saturating_duration_since(i.since).as_secs()),
                    last: info
                        .as_ref()
                        .map_or_else(|| "pending".to_string(), |i| i.last.clone()),
                    successes: info.as_ref().map_or(0, |i| i.successes),
                    failures: info.as_ref().map_or(0, |i| i.failures),
                }
            }
        };
        let state = if r.mac.is_none() {
            "unresolved"
        } else if r.down && !r.in_ring {
            "down"
        } else if r.dyn_weight.unwrap_or(r.weight) == 0 {
            "draining"
        } else {
            "active"
        };
        RealInfo {
            mode: r.effective_mode.to_string(),
            addr: r.addr.to_string(),
            port: (r.addr.port != 0).then_some(r.addr.port),
            id: r.id,
            weight: r.weight,
            mac: r.mac.as_ref().map(format_mac),
            egress: r.egress.map(|e| {
                KernelNeighbours::from_index(e.ifindex)
                    .map_or_else(|_| format!("#{}", e.ifindex), |n| n.iface().to_string())
            }),
            state: state.to_string(),
            effective_weight: r.effective_weight,
            health: Some(health),
            check: r.check.as_ref().map(check_json),
            active_conns: None,
            inactive_conns: None,
        }
    }
}

pub(super) fn internal(message: String) -> ApiError {
    ApiError {
        code: ErrorCode::Internal,
        field: None,
        message,
    }
}

pub(super) fn parse_vip(s: &str) -> Result<VipSpec, ApiError> {
    s.parse::<VipSpec>()
        .map_err(|e| invalid("vip", e.to_string()))
}

pub(super) fn parse_real(s: &str) -> Result<RealAddr, ApiError> {
    parse_real_addr(s).map_err(|e| invalid("real", e))
}
