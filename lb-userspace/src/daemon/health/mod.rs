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
pub(crate) mod probe;
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
    model::{CheckSpec, Probe, RealAddr, Target, VipSpec},
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
pub struct HealthTable(Mutex<HashMap<(VipSpec, RealAddr), HealthInfo>>);

impl HealthTable {
    pub fn get(&self, vip: &VipSpec, real: RealAddr) -> Option<HealthInfo> {
        let t = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        t.get(&(*vip, real)).cloned()
    }

    fn set(&self, key: (VipSpec, RealAddr), info: HealthInfo) {
        let mut t = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        t.insert(key, info);
    }

    fn remove(&self, key: &(VipSpec, RealAddr)) {
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
    running: HashMap<ProbeKey, (AbortHandle, BTreeSet<(VipSpec, RealAddr)>)>,
    subs: HashMap<(VipSpec, RealAddr), Sub>,
    pending: Vec<Change>,
    flush_at: Option<tokio::time::Instant>,
    seed: std::collections::hash_map::RandomState,
    /// Tests: keep the books but send no probe (their addresses are nobody's).
    quiet: bool,
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
        quiet: false,
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
        let gone: Vec<(VipSpec, RealAddr)> = self
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
            let key = ProbeKey::new(&vip, addr.ip, real.id, &check);
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

    fn unsubscribe(&mut self, id: &(VipSpec, RealAddr)) {
        if let Some(sub) = self.subs.remove(id) {
            self.leave(&sub.key, id);
        }
    }

    fn join(&mut self, key: ProbeKey, id: (VipSpec, RealAddr)) {
        if let Some((_, subs)) = self.running.get_mut(&key) {
            subs.insert(id);
            return;
        }
        let key_for_task = if self.quiet { None } else { Some(key.clone()) };
        let handle = tokio::spawn(probe_loop(
            key_for_task,
            self.jitter(&key),
            self.probes.clone(),
            self.limit.clone(),
            self.results.clone(),
        ))
        .abort_handle();
        self.running.insert(key, (handle, BTreeSet::from([id])));
    }

    fn leave(&mut self, key: &ProbeKey, id: &(VipSpec, RealAddr)) {
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

fn health(vip: VipSpec, addr: RealAddr, down: bool, weight: Option<u32>) -> Change {
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
    key: Option<ProbeKey>,
    offset: Duration,
    probes: Arc<Probes>,
    limit: Arc<Semaphore>,
    results: mpsc::Sender<(ProbeKey, Outcome)>,
) {
    let Some(key) = key else {
        return;
    };
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{
        core::balancer::Balancer,
        daemon::writer,
        dataplane::{fake::FakeDataplane, Limits},
        model::CheckFields,
    };

    /// A manager over a writer and a fake dataplane holding `tcp/10.0.0.100:80` with real
    /// .11 and a tcp check (rise 2, fall 3).
    fn manager() -> (
        Manager,
        mpsc::Receiver<(ProbeKey, Outcome)>,
        VipSpec,
        RealAddr,
    ) {
        let vip: VipSpec = "tcp/10.0.0.100:80".parse().expect("vip");
        let real: RealAddr = "10.0.0.11".parse().expect("ip");
        let mut bal = Balancer::new(
            FakeDataplane::new(Limits::default()),
            Duration::from_secs(1),
        );
        let check = CheckFields::from_json(&json!({"type": "tcp"})).expect("check");
        bal.apply(vec![
            Change::AddVip {
                spec: vip,
                flags: Default::default(),
            },
            Change::AddReal {
                vip,
                addr: real,
                weight: 1,
                mac: Some([2, 0, 0, 0, 0, 0x11]),
            },
            Change::SetCheck {
                vip,
                real: None,
                check: Some(Box::new(check)),
            },
        ])
        .expect("applies");
        let (writer, view, _) = writer::spawn(bal, Box::new(|_| Ok(()))).expect("writer");
        let (results, rx) = mpsc::channel(16);
        let m = Manager {
            view,
            writer,
            table: Arc::default(),
            probes: Arc::new(Probes::new(None).expect("tls")),
            limit: Arc::new(Semaphore::new(1)),
            results,
            running: HashMap::new(),
            subs: HashMap::new(),
            pending: Vec::new(),
            flush_at: None,
            seed: Default::default(),
            quiet: true,
        };
        (m, rx, vip, real)
    }

    #[tokio::test]
    async fn fall_failures_take_a_real_down_and_rise_successes_bring_it_back() {
        let (mut m, _rx, vip, real) = manager();
        m.reconcile();
        let key = m.subs[&(vip, real)].key.clone();
        let fail = || Outcome::Down("connect: refused".into());
        m.result(&key, fail());
        m.result(&key, fail());
        assert!(m.pending.is_empty(), "two failures of three");
        // A success in between restarts the count.
        m.result(&key, Outcome::up());
        m.result(&key, fail());
        m.result(&key, fail());
        assert!(m.pending.is_empty());
        m.result(&key, fail());
        assert_eq!(m.pending, vec![health(vip, real, true, None)]);
        let info = m.table.get(&vip, real).expect("listed");
        assert_eq!((info.failures, info.last.as_str()), (3, "connect: refused"));
        m.pending.clear();
        m.result(&key, Outcome::up());
        assert!(m.pending.is_empty(), "one success of two");
        m.result(&key, Outcome::up());
        assert_eq!(m.pending, vec![health(vip, real, false, None)]);
        assert!(m.flush_at.is_some(), "sent within the batch window");
        for (h, _) in m.running.values() {
            h.abort();
        }
    }

    fn spec(vip: &str, check: serde_json::Value) -> (VipSpec, CheckSpec) {
        let vip: VipSpec = vip.parse().expect("vip");
        let c = CheckFields::from_json(&check)
            .expect("check")
            .resolve(&vip)
            .expect("resolves")
            .expect("checked");
        (vip, c)
    }

    #[test]
    fn probes_are_shared_by_vips_checking_alike_unless_they_depend_on_the_vip() {
        let real: IpAddr = "10.0.0.11".parse().expect("ip");
        let (a, ca) = spec("tcp/10.0.0.100:80", json!({"type": "http", "port": 8080}));
        let (b, cb) = spec("tcp/10.0.0.101:443", json!({"type": "http", "port": 8080}));
        assert_eq!(
            ProbeKey::new(&a, real, 1, &ca),
            ProbeKey::new(&b, real, 2, &cb)
        );
        // Another rise/fall is the same probe too (each VIP's real counts its own streak).
        let (c, cc) = spec(
            "tcp/10.0.0.102:80",
            json!({"type": "http", "port": 8080, "rise": 5}),
        );
        assert_eq!(
            ProbeKey::new(&a, real, 1, &ca),
            ProbeKey::new(&c, real, 3, &cc)
        );
        // Another interval is not.
        let (d, cd) = spec(
            "tcp/10.0.0.103:80",
            json!({"type": "http", "port": 8080, "interval": "5s"}),
        );
        assert_ne!(
            ProbeKey::new(&a, real, 1, &ca),
            ProbeKey::new(&d, real, 4, &cd)
        );
        // exec names its VIP in the environment; target = vip goes through that VIP.
        let exec = json!({"type": "exec", "command": ["/bin/true"]});
        let (e1, c1) = spec("tcp/10.0.0.100:80", exec.clone());
        let (e2, c2) = spec("tcp/10.0.0.101:80", exec);
        assert_ne!(
            ProbeKey::new(&e1, real, 1, &c1),
            ProbeKey::new(&e2, real, 2, &c2)
        );
        let via = json!({"type": "tcp", "target": "vip"});
        let (v1, c1) = spec("tcp/10.0.0.100:80", via.clone());
        let k = ProbeKey::new(&v1, real, 7, &c1);
        assert_eq!(k.target.addr, v1.addr);
        assert_eq!(k.target.via_real_id, Some(7));
        let (v2, c2) = spec("tcp/10.0.0.100:81", via);
        assert_ne!(k, ProbeKey::new(&v2, real, 8, &c2));
    }
}
