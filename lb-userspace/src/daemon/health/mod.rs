//! Health checks: the daemon probes every checked real (tokio tasks, bounded in concurrency,
//! spread over the interval), counts successes and failures as HAProxy does (`rise`,
//! `fall`), and tells the writer when a real goes down or comes back up; the writer's
//! balancer then rebuilds the VIP's ring (one rebuild for every transition of a moment).
//!
//! Parts: the manager here (what to probe, from the published state; streaks; transitions;
//! the table `xlb list` reads), `probe` (one probe of each type), `tls`, `dns`, `icmp`, and
//! `via` (the way to a VIP through one real, for `target = "vip"`).
//!
//! A probe is shared by every VIP that checks the same address the same way (dedup by
//! address, port and check); each VIP's real keeps its own streak and status. The status
//! itself lives in the balancer's state (persisted, so a restarted daemon starts from it):
//! the manager starts a real from there and owns it from then on.

mod dns;
mod icmp;
mod probe;
mod tls;
pub mod via;

use std::{
    collections::{BTreeSet, HashMap},
    hash::BuildHasher,
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

pub use probe::Outcome;
use probe::{Probes, Target as ProbeTarget};
use tokio::{
    sync::{mpsc, watch, Semaphore},
    task::AbortHandle,
};

use super::writer::{View, WriterHandle};
use crate::{
    core::balancer::Change,
    model::{CheckSpec, Probe, Target, VipSpec},
};

/// Transitions found within this long of the first are applied as one batch (one ring
/// rebuild per VIP).
const COALESCE: Duration = Duration::from_millis(50);

/// What `xlb list` shows of a checked real besides its status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthInfo {
    /// When the status last changed (or the real was first checked by this daemon).
    pub since: Instant,
    /// The last result: `ok`, `connect: refused`, `timeout`, ... (`pending` before the first).
    pub last: String,
    /// The current streak.
    pub successes: u32,
    pub failures: u32,
}

/// The health of every checked (VIP, real), shared with the request handlers.
#[derive(Debug, Default)]
pub struct HealthTable(Mutex<HashMap<(VipSpec, IpAddr), HealthInfo>>);

impl HealthTable {
    pub fn get(&self, vip: &VipSpec, real: IpAddr) -> Option<HealthInfo> {
        let t = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        t.get(&(*vip, real)).cloned()
    }

    fn set(&self, key: (VipSpec, IpAddr), info: HealthInfo) {
        let mut t = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        t.insert(key, info);
    }

    fn remove(&self, key: &(VipSpec, IpAddr)) {
        let mut t = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        t.remove(key);
    }
}

/// One probe as it runs: what, to where, how often.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ProbeKey {
    probe: Probe,
    target: ProbeTarget,
    interval: Duration,
    timeout: Duration,
}

impl ProbeKey {
    fn new(vip: &VipSpec, real: IpAddr, real_id: u32, check: &CheckSpec) -> ProbeKey {
        // Shared across VIPs unless the probe depends on the VIP: an exec check's environment
        // names it, and a probe through a real to a VIP is that pair's.
        let own = matches!(check.probe, Probe::Exec { .. }) || check.target == Target::Vip;
        let scope = if own { *vip } else { placeholder_vip(real) };
        ProbeKey {
            probe: check.probe.clone(),
            target: ProbeTarget {
                addr: check.probe_addr(vip, real),
                port: check.port,
                vip: scope,
                real,
                via_real_id: (check.target == Target::Vip).then_some(real_id),
            },
            interval: check.interval,
            timeout: check.timeout,
        }
    }
}

/// The VIP a shared probe names (none in particular): the same for every VIP.
fn placeholder_vip(real: IpAddr) -> VipSpec {
    VipSpec::new(crate::model::Proto::Tcp, real, 0)
}

/// A checked real of a VIP, as the manager counts it.
#[derive(Debug)]
struct Sub {
    real_id: u32,
    key: ProbeKey,
    rise: u32,
    fall: u32,
    dynamic: bool,
    down: bool,
    weight: Option<u32>,
    info: HealthInfo,
}

struct Manager {
    view: watch::Receiver<Arc<View>>,
    writer: WriterHandle,
    table: Arc<HealthTable>,
    probes: Arc<Probes>,
    limit: Arc<Semaphore>,
    results: mpsc::Sender<(ProbeKey, Outcome)>,
    running: HashMap<ProbeKey, (AbortHandle, BTreeSet<(VipSpec, IpAddr)>)>,
    subs: HashMap<(VipSpec, IpAddr), Sub>,
    pending: Vec<Change>,
    flush_at: Option<tokio::time::Instant>,
    seed: std::collections::hash_map::RandomState,
}

/// Starts the checker: it follows the published state until the view's sender is gone.
pub fn spawn(
    view: watch::Receiver<Arc<View>>,
    writer: WriterHandle,
    table: Arc<HealthTable>,
    via: Option<Arc<via::Via>>,
    concurrency: usize,
) -> Result<tokio::task::JoinHandle<()>, rustls::Error> {
    let probes = Arc::new(Probes::new(via)?);
    let (results, rx) = mpsc::channel(1024);
    let m = Manager {
        view,
        writer,
        table,
        probes,
        limit: Arc::new(Semaphore::new(concurrency.max(1))),
        results,
        running: HashMap::new(),
        subs: HashMap::new(),
        pending: Vec::new(),
        flush_at: None,
        seed: std::collections::hash_map::RandomState::new(),
    };
    Ok(tokio::spawn(m.run(rx)))
}

impl Manager {
    async fn run(mut self, mut rx: mpsc::Receiver<(ProbeKey, Outcome)>) {
        self.reconcile();
        loop {
            let flush = async {
                match self.flush_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = self.view.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    self.reconcile();
                }
                Some((key, outcome)) = rx.recv() => self.result(&key, outcome),
                () = flush => self.flush(),
            }
        }
        for (handle, _) in self.running.values() {
            handle.abort();
        }
    }

    /// Brings the probes in line with the published state: new checked reals start from the
    /// status the state holds, removed ones stop, a changed check restarts the streaks.
    fn reconcile(&mut self) {
        let view = self.view.borrow_and_update().clone();
        let mut wanted = HashMap::new();
        for v in &view.snapshot.vips {
            for r in &v.reals {
                if let Some(check) = &r.effective_check {
                    wanted.insert((v.spec, r.addr), (r, check.clone()));
                }
            }
        }
        let gone: Vec<(VipSpec, IpAddr)> = self
            .subs
            .keys()
            .filter(|k| !wanted.contains_key(*k))
            .copied()
            .collect();
        for k in gone {
            self.unsubscribe(&k);
            self.table.remove(&k);
        }
        let now = Instant::now();
        for ((vip, addr), (real, check)) in wanted {
            let key = ProbeKey::new(&vip, addr, real.id, &check);
            let dynamic = matches!(check.probe, Probe::Exec { dynamic: true, .. });
            let id = (vip, addr);
            match self.subs.get_mut(&id) {
                Some(sub) if sub.real_id == real.id => {
                    sub.rise = check.rise;
                    sub.fall = check.fall;
                    sub.dynamic = dynamic;
                    if sub.key != key {
                        // Another check: the status stays, the streaks start again.
                        sub.info.successes = 0;
                        sub.info.failures = 0;
                        sub.info.last = "pending".to_string();
                        let old = std::mem::replace(&mut sub.key, key.clone());
                        self.table.set(id, sub.info.clone());
                        self.leave(&old, &id);
                        self.join(key, id);
                    }
                }
                _ => {
                    // New, or the same address re-added as another real: from the state.
                    self.unsubscribe(&id);
                    let info = HealthInfo {
                        since: now,
                        last: "pending".to_string(),
                        successes: 0,
                        failures: 0,
                    };
                    self.table.set(id, info.clone());
                    let sub = Sub {
                        real_id: real.id,
                        key: key.clone(),
                        rise: check.rise,
                        fall: check.fall,
                        dynamic,
                        down: real.down,
                        weight: real.dyn_weight,
                        info,
                    };
                    self.subs.insert(id, sub);
                    self.join(key, id);
                }
            }
        }
    }

    fn unsubscribe(&mut self, id: &(VipSpec, IpAddr)) {
        if let Some(sub) = self.subs.remove(id) {
            self.leave(&sub.key, id);
        }
    }

    fn join(&mut self, key: ProbeKey, id: (VipSpec, IpAddr)) {
        if let Some((_, subs)) = self.running.get_mut(&key) {
            subs.insert(id);
            return;
        }
        let handle = tokio::spawn(probe_loop(
            key.clone(),
            self.jitter(&key),
            self.probes.clone(),
            self.limit.clone(),
            self.results.clone(),
        ))
        .abort_handle();
        self.running.insert(key, (handle, BTreeSet::from([id])));
    }

    fn leave(&mut self, key: &ProbeKey, id: &(VipSpec, IpAddr)) {
        let empty = match self.running.get_mut(key) {
            Some((_, subs)) => {
                subs.remove(id);
                subs.is_empty()
            }
            None => false,
        };
        if empty {
            if let Some((handle, _)) = self.running.remove(key) {
                handle.abort();
            }
        }
    }

    /// Where in its interval a probe runs: spread, so that a thousand reals are not probed in
    /// the same millisecond.
    fn jitter(&self, key: &ProbeKey) -> Duration {
        let ms = key.interval.as_millis().max(1) as u64;
        Duration::from_millis(self.seed.hash_one(key) % ms)
    }

    fn result(&mut self, key: &ProbeKey, outcome: Outcome) {
        let Some((_, ids)) = self.running.get(key) else {
            return;
        };
        let now = Instant::now();
        for id in ids.clone() {
            let Some(sub) = self.subs.get_mut(&id) else {
                continue;
            };
            let (vip, addr) = id;
            match &outcome {
                Outcome::Up { weight } => {
                    let weight = if sub.dynamic { *weight } else { None };
                    sub.info.successes = sub.info.successes.saturating_add(1);
                    sub.info.failures = 0;
                    sub.info.last = "ok".to_string();
                    if sub.down && sub.info.successes >= sub.rise {
                        sub.down = false;
                        sub.weight = weight;
                        sub.info.since = now;
                        log::info!("real {addr} of {vip}: down -> up (ok)");
                        self.pending.push(health(vip, addr, false, weight));
                    } else if !sub.down && sub.weight != weight {
                        sub.weight = weight;
                        let shown = weight.map_or_else(|| "its own".to_string(), |w| w.to_string());
                        log::info!("real {addr} of {vip}: weight {shown} (dynamic check)");
                        self.pending.push(health(vip, addr, false, weight));
                    }
                }
                Outcome::Down(why) => {
                    sub.info.failures = sub.info.failures.saturating_add(1);
                    sub.info.successes = 0;
                    sub.info.last.clone_from(why);
                    if !sub.down && sub.info.failures >= sub.fall {
                        sub.down = true;
                        sub.info.since = now;
                        log::warn!("real {addr} of {vip}: up -> down ({why})");
                        self.pending.push(health(vip, addr, true, sub.weight));
                    }
                }
            }
            self.table.set(id, sub.info.clone());
        }
        if !self.pending.is_empty() && self.flush_at.is_none() {
            self.flush_at = Some(tokio::time::Instant::now() + COALESCE);
        }
    }

    fn flush(&mut self) {
        self.flush_at = None;
        self.writer.refresh(std::mem::take(&mut self.pending));
    }
}

fn health(vip: VipSpec, addr: IpAddr, down: bool, weight: Option<u32>) -> Change {
    Change::SetHealth {
        vip,
        addr,
        down,
        weight,
    }
}

/// Probes one target every `interval` (from the start of one probe to the next; a probe
/// that overruns delays the next), first after `offset`.
async fn probe_loop(
    key: ProbeKey,
    offset: Duration,
    probes: Arc<Probes>,
    limit: Arc<Semaphore>,
    results: mpsc::Sender<(ProbeKey, Outcome)>,
) {
    tokio::time::sleep(offset).await;
    loop {
        let start = tokio::time::Instant::now();
        let outcome = {
            let Ok(_permit) = limit.acquire().await else {
                return;
            };
            probes.run(&key.probe, &key.target, key.timeout).await
        };
        if results.send((key.clone(), outcome)).await.is_err() {
            return;
        }
        tokio::time::sleep_until(start + key.interval).await;
    }
}
