//! Readiness (`xlb ready`) and maintenance (`xlb maintenance on|off`): whether this node
//! should receive traffic for a VIP, for the announcement speakers and load balancers in front
//! of it. A VIP is `ready` when the program is attached, its quorum holds (without checks: a
//! real is in its ring), every checked real has had its first result, and its self-test
//! packet leaves for the real the ring predicts; `draining` in maintenance or while the daemon
//! withdraws before stopping (it still forwards whatever arrives); `starting` until the
//! first check results; `down` otherwise, with the reason.

use std::{path::PathBuf, sync::atomic::Ordering};

use super::handlers::{invalid, Context};
use crate::{
    api::{ApiError, ErrorCode, ReadyReply, VipReady},
    core::balancer::VipSnapshot,
    model::VipSpec,
};

/// The file whose presence keeps maintenance on across restarts: the state file's path with
/// `.maintenance` appended.
pub fn maintenance_file(state: &std::path::Path) -> PathBuf {
    let mut p = state.as_os_str().to_owned();
    p.push(".maintenance");
    PathBuf::from(p)
}

fn state(state: &str, reason: impl Into<String>) -> (String, String) {
    (state.to_string(), reason.into())
}

impl Context {
    /// The states of `vip` (of every VIP when `None`).
    pub async fn ready(&self, vip: Option<&str>) -> Result<ReadyReply, ApiError> {
        let view = self.snapshot();
        let wanted: Vec<&VipSnapshot> = match vip {
            Some(s) => {
                let spec: VipSpec = s.parse().map_err(|e| invalid("vip", format!("{e}")))?;
                match view.snapshot.vips.iter().find(|v| v.spec == spec) {
                    Some(v) => vec![v],
                    None => {
                        return Ok(ReadyReply {
                            ready: false,
                            vips: Vec::new(),
                            reason: Some(format!("VIP {spec} does not exist")),
                        })
                    }
                }
            }
            None => view.snapshot.vips.iter().collect(),
        };
        if wanted.is_empty() {
            return Ok(ReadyReply {
                ready: false,
                vips: Vec::new(),
                reason: Some("no VIP is configured".into()),
            });
        }
        let attached = match self.neigh.xdp_program() {
            Ok(Some(_)) => None,
            Ok(None) => Some(format!(
                "no XDP program is attached to {}",
                self.neigh.iface()
            )),
            Err(e) => Some(format!(
                "reading the XDP program of {}: {e}",
                self.neigh.iface()
            )),
        };
        let draining = if self.stopping.load(Ordering::Relaxed) {
            Some("stopping")
        } else if self.maintenance.load(Ordering::Relaxed) {
            Some("maintenance")
        } else {
            None
        };
        let mut states: Vec<(VipSpec, Option<(String, String)>)> = Vec::new();
        for v in &wanted {
            let s = if let Some(why) = draining {
                Some(state("draining", why))
            } else if let Some(why) = &attached {
                Some(state("down", why.clone()))
            } else {
                self.vip_state(v)
            };
            states.push((v.spec, s));
        }
        // The VIPs nothing else holds back: their packets through the program.
        let test: Vec<VipSpec> = states
            .iter()
            .filter(|(_, s)| s.is_none())
            .map(|(v, _)| *v)
            .collect();
        if !test.is_empty() {
            for (spec, result) in self.writer.self_test(test).await? {
                if let Some(slot) = states.iter_mut().find(|(v, _)| *v == spec) {
                    slot.1 = Some(match result {
                        Ok(()) => state("ready", ""),
                        Err(e) => state("down", format!("self-test: {e}")),
                    });
                }
            }
        }
        let vips: Vec<VipReady> = states
            .into_iter()
            .map(|(spec, s)| {
                let (state, reason) = s.unwrap_or_else(|| state("ready", ""));
                VipReady {
                    vip: spec.to_string(),
                    state,
                    reason,
                }
            })
            .collect();
        Ok(ReadyReply {
            ready: vips.iter().all(|v| v.state == "ready"),
            vips,
            reason: None,
        })
    }

    /// What holds a VIP back apart from the self-test (`None`: nothing).
    fn vip_state(&self, v: &VipSnapshot) -> Option<(String, String)> {
        if let Some(r) = v
            .reals
            .iter()
            .find(|r| r.effective_check.is_some() && self.health.get(&v.spec, r.addr).is_none())
        {
            return Some(state(
                "starting",
                format!("waiting for the first check of real {}", r.addr),
            ));
        }
        if v.quorum_lost {
            let how = if v.sorry_active {
                "the sorry server takes the new flows"
            } else if v.fail_open {
                "failing open"
            } else {
                "dropping new flows"
            };
            let none = if v.healthy_weight == 0 {
                "no usable real; "
            } else {
                ""
            };
            return Some(state(
                "down",
                format!(
                    "{none}quorum lost ({how}): healthy weight {} below quorum {}",
                    v.healthy_weight, v.options.quorum
                ),
            ));
        }
        if !v.reals.iter().any(|r| r.in_ring) {
            return Some(state(
                "down",
                "no usable real (none resolved, up and weighted above 0)",
            ));
        }
        None
    }

    /// Maintenance on or off, kept across restarts by `maintenance_file`.
    pub fn set_maintenance(&self, on: bool) -> Result<(), ApiError> {
        if let Some(path) = &self.maintenance_file {
            let done = if on {
                std::fs::write(path, b"xlb maintenance on\n")
            } else {
                match std::fs::remove_file(path) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    other => other,
                }
            };
            done.map_err(|e| ApiError {
                code: ErrorCode::Internal,
                field: None,
                message: format!("{}: {e}", path.display()),
            })?;
        }
        let was = self.maintenance.swap(on, Ordering::Relaxed);
        if was != on {
            log::info!(
                "maintenance {}: every VIP {}",
                if on { "on" } else { "off" },
                if on {
                    "draining (not ready)"
                } else {
                    "as its state says"
                }
            );
        }
        Ok(())
    }
}
