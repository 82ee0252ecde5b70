//! The request handlers: each operation of the control API turned into changes for the
//! writer, or answered from the published state and the counters. No handler holds anything
//! across a wait that another request needs: MAC resolution, the writer's work and counter
//! reads each run on their own.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::{atomic::AtomicBool, Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use tokio::sync::watch;

use super::{
    health::HealthTable,
    health_ops::{parse_real, parse_vip},
    writer::{View, WriterHandle},
};
use crate::{
    api::{
        ApiError, ApplyReply, Counters, ErrorCode, Hello, Op, RealStatsInfo, Reply, SaveReply,
        StatsReply, VipStatsInfo,
    },
    core::{balancer::Change, config},
    dataplane::{
        neigh::{self, KernelNeighbours},
        CounterSource, FlowSource,
    },
    model::{check_real, is_host_mac, Egress, Mac, Mode, VipFlags},
};

/// How long a mutating request waits for a new real's MAC before adding it unresolved.
const RESOLVE_WAIT: Duration = Duration::from_millis(1500);

/// What the MAC refresh found.
#[derive(Debug, Default)]
pub struct MacStatus {
    /// Real addresses without a MAC now (they take no new flows).
    pub unresolved: BTreeSet<IpAddr>,
    /// Times a real was found without a MAC it needed (added unresolved, or its neighbour
    /// entry failed), since start.
    pub failures: u64,
    /// The balancer's link was down at the last refresh (MACs left as they were).
    pub link_down: bool,
}

/// Everything a handler needs; shared by every connection.
pub struct Context {
    /// Flow sync, when on.
    pub sync: Option<super::sync::Sync>,
    /// Change requests, applies and reloads: applied, refused (`xlb_config_changes_total`).
    pub changes: (std::sync::atomic::AtomicU64, std::sync::atomic::AtomicU64),
    /// When the daemon started (`xlb_start_time_seconds`).
    pub started_at: std::time::SystemTime,
    /// What the announcer (`--announce bird:FILE`) did, when there is one.
    pub announce: Option<Mutex<crate::api::AnnounceStats>>,
    pub writer: WriterHandle,
    pub view: watch::Receiver<Arc<View>>,
    pub counters: Arc<dyn CounterSource + Send + Sync>,
    pub flows: Arc<dyn FlowSource + Send + Sync>,
    /// The TCP and UDP idle timeouts (a flow older than its VIP's is not counted).
    pub idle: (Duration, Duration),
    pub health: Arc<HealthTable>,
    pub neigh: KernelNeighbours,
    /// `--tunnel-mtu`: the MTU of every interface tunnel reals leave by, when set.
    pub tunnel_mtu: Option<u16>,
    pub hello: Hello,
    pub started: Instant,
    /// Counters sampled every second, for the rates.
    pub figures: Arc<super::figures::Figures>,
    /// `--conntrack-size`.
    pub conntrack_capacity: u64,
    pub macs: Mutex<MacStatus>,
    /// `xlb maintenance on`: every VIP draining; kept across restarts by this file.
    pub maintenance: AtomicBool,
    pub maintenance_file: Option<std::path::PathBuf>,
    /// SIGTERM with `--withdraw-on-stop`: not ready while the daemon waits to stop.
    pub stopping: AtomicBool,
    /// `xlb trace`, when the program has its trace maps.
    pub trace: Option<Arc<super::trace::Hub>>,
}

pub fn invalid(field: &str, message: String) -> ApiError {
    ApiError {
        code: ErrorCode::InvalidArgument,
        field: Some(field.to_string()),
        message,
    }
}

fn parse_mode(s: Option<&str>) -> Result<Option<Mode>, ApiError> {
    s.map(|s| s.parse().map_err(|m| invalid("mode", m)))
        .transpose()
}

impl Context {
    pub fn snapshot(&self) -> Arc<View> {
        self.view.borrow().clone()
    }

    pub async fn handle(&self, op: Op) -> Result<Option<Reply>, ApiError> {
        let syncs = changes_rings(&op);
        let reply = self.handle_op(op).await;
        if syncs {
            self.count_change(reply.is_ok());
        }
        // A command that may have moved ring slots returns once the flows it moved off their
        // slot are with the peers (a failover right after it keeps them).
        if let (true, Ok(_), Some(sync)) = (syncs, &reply, &self.sync) {
            sync.settle().await;
        }
        reply
    }

    /// Count a change request, apply or reload by its result.
    pub fn count_change(&self, applied: bool) {
        let c = if applied {
            &self.changes.0
        } else {
            &self.changes.1
        };
        c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    async fn handle_op(&self, op: Op) -> Result<Option<Reply>, ApiError> {
        match op {
            Op::Hello {} => Ok(Some(Reply::Hello(self.hello.clone()))),
            Op::VipAdd { vip, flags, mode } => {
                let spec = parse_vip(&vip)?;
                let flags = VipFlags::from_names(flags.iter().map(String::as_str))
                    .map_err(|e| invalid("flags", e.to_string()))?;
                let mode = parse_mode(mode.as_deref())?;
                let mut changes = vec![Change::AddVip { spec, flags }];
                if mode.is_some() {
                    changes.push(Change::SetMode {
                        vip: spec,
                        real: None,
                        mode,
                    });
                }
                self.writer.apply(changes).await?;
                Ok(None)
            }
            Op::VipDel { vip } => {
                let spec = parse_vip(&vip)?;
                self.writer.apply(vec![Change::DelVip { spec }]).await?;
                Ok(None)
            }
            Op::RealAdd {
                vip,
                real,
                weight,
                mode,
            } => {
                let spec = parse_vip(&vip)?;
                let real = parse_real(&real)?;
                let addr = real.ip;
                let mode = parse_mode(mode.as_deref())?;
                // Checked before waiting on ARP: a bad request answers at once.
                let Some(vip_mode) = self
                    .snapshot()
                    .snapshot
                    .vips
                    .iter()
                    .find(|v| v.spec == spec)
                    .map(|v| v.effective_mode)
                else {
                    return Err(ApiError {
                        code: ErrorCode::NotFound,
                        field: Some("vip".into()),
                        message: format!("VIP {spec} does not exist"),
                    });
                };
                check_real(&spec, real, Some(mode.unwrap_or(vip_mode)))
                    .map_err(|m| invalid("real", m))?;
                let (mac, egress) = match mode.unwrap_or(vip_mode) {
                    Mode::Dr => match self.known_mac(addr) {
                        Some(m) => (Some(m), None),
                        None => (self.resolve(&[addr]).await.remove(&addr).flatten(), None),
                    },
                    // The next hop's MAC, the refresher's way.
                    Mode::Tunnel | Mode::Nat => self.resolve_next_hop(addr).await,
                };
                if mac.is_none() {
                    log::warn!("real {real}: MAC unresolved; added without new flows until it is");
                    self.note_unresolved(addr);
                }
                let mut changes = vec![Change::AddReal {
                    vip: spec,
                    addr: real,
                    weight,
                    mac,
                }];
                if egress.is_some() {
                    changes.push(Change::SetEgress {
                        vip: Some(spec),
                        addr,
                        egress,
                    });
                }
                if mode.is_some() {
                    changes.push(Change::SetMode {
                        vip: spec,
                        real: Some(real),
                        mode,
                    });
                }
                self.writer.apply(changes).await?;
                Ok(None)
            }
            Op::RealDel { vip, real } => {
                let spec = parse_vip(&vip)?;
                let addr = parse_real(&real)?;
                self.writer
                    .apply(vec![Change::DelReal { vip: spec, addr }])
                    .await?;
                Ok(None)
            }
            Op::RealWeight { vip, real, weight } => {
                let spec = parse_vip(&vip)?;
                let addr = parse_real(&real)?;
                self.writer
                    .apply(vec![Change::SetWeight {
                        vip: spec,
                        addr,
                        weight,
                    }])
                    .await?;
                Ok(None)
            }
            Op::CheckSet { vip, real, check } => {
                self.check_set(&vip, real.as_deref(), &check).await?;
                Ok(None)
            }
            Op::CheckDel { vip, real } => {
                self.check_del(&vip, real.as_deref()).await?;
                Ok(None)
            }
            Op::VipSet {
                vip,
                quorum,
                sorry_server,
                on_quorum_lost,
                down_flows,
                mode,
            } => {
                self.vip_set(
                    &vip,
                    quorum,
                    sorry_server.as_deref(),
                    on_quorum_lost.as_deref(),
                    down_flows.as_deref(),
                    mode.as_deref(),
                )
                .await?;
                Ok(None)
            }
            Op::RealFlows { vip, real } => self
                .real_flows(&vip, &real)
                .await
                .map(|r| Some(Reply::RealFlows(r))),
            Op::Conns { vip, real, count } => self
                .conns(vip.as_deref(), real.as_deref(), count)
                .await
                .map(|r| Some(Reply::Conns(r))),
            Op::Whereis { vip, client } => self
                .whereis(&vip, &client)
                .await
                .map(|r| Some(Reply::Whereis(r))),
            Op::Trace { vip, max, wait_ms } => self
                .trace(vip.as_deref(), max, wait_ms)
                .await
                .map(|r| Some(Reply::Trace(r))),
            Op::Ready { vip } => self
                .ready(vip.as_deref())
                .await
                .map(|r| Some(Reply::Ready(r))),
            Op::Maintenance { on } => self.set_maintenance(on).map(|()| None),
            Op::List {} => Ok(Some(Reply::List(self.list()))),
            Op::Stats {} => self.stats().map(|s| Some(Reply::Stats(s))),
            Op::Apply { config, dry_run } => self.apply_config(&config, dry_run).await,
            Op::Save {} => {
                let desired = config::DesiredState::from_snapshot(&self.snapshot().snapshot);
                Ok(Some(Reply::Save(SaveReply {
                    config: config::render_config(&desired),
                })))
            }
            // Done before answering: `xlb down` returns once the program is gone.
            Op::Down {} => self.writer.down().await.map(|()| None),
        }
    }

    /// A MAC already known for this address (the same real in another VIP).
    pub(super) fn known_mac(&self, addr: IpAddr) -> Option<Mac> {
        self.snapshot()
            .snapshot
            .vips
            .iter()
            .flat_map(|v| v.reals.iter())
            .find(|r| r.addr.ip == addr)
            .and_then(|r| r.mac)
    }

    /// MACs of `addrs`, probing the missing ones and waiting a bounded time.
    pub async fn resolve(&self, addrs: &[IpAddr]) -> HashMap<IpAddr, Option<Mac>> {
        match neigh::resolve_all(&self.neigh, addrs, RESOLVE_WAIT).await {
            Ok(m) => m
                .into_iter()
                .map(|(a, mac)| (a, mac.filter(is_host_mac)))
                .collect(),
            Err(e) => {
                log::warn!("resolving MACs: {e}");
                addrs.iter().map(|a| (*a, None)).collect()
            }
        }
    }

    /// A tunnel real's next hop's MAC, out of whichever interface the route to it leaves
    /// by, and that interface when it is not the balancer's (as the MAC refresh finds them).
    async fn resolve_next_hop(&self, addr: IpAddr) -> (Option<Mac>, Option<Egress>) {
        let (hop, ifindex) = match self.neigh.route_out(addr) {
            Ok(Some(route)) => route,
            Ok(None) => return (None, None),
            Err(e) => {
                log::warn!("looking up the next hop of {addr}: {e}");
                return (None, None);
            }
        };
        // Serving one interface, a real behind it is sent back out of the one its packets
        // came in by; serving several, it is named (they may come in by another).
        if ifindex == self.neigh.ifindex() && !self.several_ifaces() {
            return (self.resolve(&[hop]).await.remove(&hop).flatten(), None);
        }
        let other = match KernelNeighbours::from_index(ifindex) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("real {addr}: the interface its route leaves by: {e}");
                return (None, None);
            }
        };
        let egress = match super::macs::egress_of(&other, self.tunnel_mtu) {
            Ok(e) => e,
            Err(e) => {
                log::warn!("real {addr}: interface {e}");
                return (None, None);
            }
        };
        let mac = match neigh::resolve_all(&other, &[hop], RESOLVE_WAIT).await {
            Ok(mut m) => m.remove(&hop).flatten().filter(is_host_mac),
            Err(e) => {
                log::warn!("resolving {hop} on {}: {e}", other.iface());
                None
            }
        };
        (mac, mac.map(|_| egress))
    }

    /// Whether the balancer runs on more than one interface (`--iface` repeated).
    pub fn several_ifaces(&self) -> bool {
        self.hello.ifaces.len() > 1
    }

    /// A real found without a MAC: counted once until it resolves.
    pub fn note_unresolved(&self, addr: IpAddr) {
        let mut m = self.macs.lock().unwrap_or_else(PoisonError::into_inner);
        if m.unresolved.insert(addr) {
            m.failures += 1;
        }
    }

    /// `--config FILE`, at start and on SIGHUP: applied as `xlb apply -f` does; a file that
    /// cannot be read, parsed or applied is logged and changes nothing.
    pub async fn reload_config(&self, path: &std::path::Path, why: &str) {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                self.count_change(false);
                log::error!(
                    "{why}: reading {}: {e}; the running configuration stays",
                    path.display()
                );
                return;
            }
        };
        let result = self.apply_config(&text, false).await;
        self.count_change(result.is_ok());
        match result {
            Ok(Some(Reply::Apply(r))) if r.changes.is_empty() => {
                log::info!("{why}: {} applied: no changes", path.display())
            }
            Ok(Some(Reply::Apply(r))) => log::info!(
                "{why}: {} applied: {}",
                path.display(),
                r.changes.join("; ")
            ),
            Ok(_) => log::info!("{why}: {} applied", path.display()),
            Err(e) => log::error!(
                "{why}: {} refused ({}): {}; the running configuration stays",
                path.display(),
                e.field.as_deref().unwrap_or("config"),
                e.message
            ),
        }
        if let Some(sync) = &self.sync {
            sync.settle().await;
        }
    }

    async fn apply_config(&self, text: &str, dry_run: bool) -> Result<Option<Reply>, ApiError> {
        let desired = config::parse_config(text).map_err(|e| {
            let field = e
                .field()
                .map_or_else(|| "config".to_string(), |f| format!("config.{f}"));
            invalid(&field, format!("config {e}"))
        })?;
        let current = config::DesiredState::from_snapshot(&self.snapshot().snapshot);
        let mut changes = config::diff(&current, &desired);
        let lines: Vec<String> = changes
            .iter()
            .map(|c| config::describe_from(&current, c))
            .collect();
        if dry_run || changes.is_empty() {
            // `applied` says whether this was a real apply, not whether anything changed: an
            // apply of the running config is a successful no-op, not a dry run.
            return Ok(Some(Reply::Apply(ApplyReply {
                changes: lines,
                applied: !dry_run,
            })));
        }
        // New reals: resolve their MACs first, so they take flows as soon as the apply lands.
        let mut macs: HashMap<IpAddr, Option<Mac>> = HashMap::new();
        let mut missing = Vec::new();
        for c in &changes {
            if let Change::AddReal {
                addr, mac: None, ..
            } = c
            {
                match self.known_mac(addr.ip) {
                    Some(m) => {
                        macs.insert(addr.ip, Some(m));
                    }
                    None => missing.push(addr.ip),
                }
            }
        }
        if !missing.is_empty() {
            macs.extend(self.resolve(&missing).await);
        }
        for c in &mut changes {
            if let Change::AddReal { addr, mac, .. } = c {
                if mac.is_none() {
                    *mac = macs.get(&addr.ip).copied().flatten();
                    if mac.is_none() {
                        self.note_unresolved(addr.ip);
                    }
                }
            }
        }
        self.writer.apply(changes).await?;
        Ok(Some(Reply::Apply(ApplyReply {
            changes: lines,
            applied: true,
        })))
    }

    fn stats(&self) -> Result<StatsReply, ApiError> {
        let internal = |e: crate::dataplane::DataplaneError| ApiError {
            code: ErrorCode::Internal,
            field: None,
            message: e.to_string(),
        };
        let view = self.snapshot();
        let dp = &self.counters;
        let mut vips = Vec::new();
        let mut unresolved_now = BTreeSet::new();
        for v in &view.snapshot.vips {
            let s = dp.vip_stats(v.id).map_err(internal)?;
            let vrates = self.figures.rates(&(v.spec, None));
            let mut reals = Vec::new();
            for r in &v.reals {
                if r.mac.is_none() {
                    unresolved_now.insert(r.addr.ip);
                }
                let rs = dp.real_stats(r.id).map_err(internal)?;
                let rates = self.figures.rates(&(v.spec, Some(r.addr)));
                reals.push(RealStatsInfo {
                    addr: r.addr.to_string(),
                    counters: Counters::new(rs.packets, rs.bytes, rs.new_flows, &rates),
                });
            }
            vips.push(VipStatsInfo {
                vip: v.spec.to_string(),
                counters: Counters::new(s.packets, s.bytes, s.new_flows, &vrates),
                no_real: s.no_real,
                quorum_drops: s.quorum_drops,
                untracked: s.untracked,
                reals,
            });
        }
        let g = dp.global_stats().map_err(internal)?;
        let mut global: BTreeMap<String, u64> = lb_common::GLOBAL_COUNTERS
            .iter()
            .map(|c| (c.name.to_string(), g.get(c.counter)))
            .collect();
        global.insert("failed_bpf_calls".to_string(), dp.failed_calls());
        let conntrack = crate::api::ConntrackStats {
            capacity: self.conntrack_capacity,
            entries_estimate: self.figures.entries_estimate(),
            insert_failures: g.get(lb_common::counter::CT_INSERT_FAIL),
            stale_repicks: g.get(lb_common::counter::CT_STALE),
        };
        let failures = self
            .macs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .failures;
        Ok(StatsReply {
            uptime_secs: self.started.elapsed().as_secs_f64(),
            vips,
            global,
            unresolved_reals: unresolved_now.len() as u64,
            mac_resolution_failures: failures,
            conntrack: Some(conntrack),
            sync: self.sync.as_ref().map(|s| Box::new(s.stats())),
            announce: self
                .announce
                .as_ref()
                .map(|f| Box::new(f.lock().unwrap_or_else(PoisonError::into_inner).clone())),
        })
    }
}

/// Whether `op` changes the configuration (and so, maybe, rings).
fn changes_rings(op: &Op) -> bool {
    match op {
        Op::VipAdd { .. }
        | Op::VipDel { .. }
        | Op::RealAdd { .. }
        | Op::RealDel { .. }
        | Op::RealWeight { .. }
        | Op::CheckSet { .. }
        | Op::CheckDel { .. }
        | Op::VipSet { .. } => true,
        Op::Apply { dry_run, .. } => !dry_run,
        _ => false,
    }
}
