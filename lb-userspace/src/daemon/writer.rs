//! The one writer: a thread that owns the `Balancer` (and through it the maps), applies the
//! changes the request handlers and the MAC refresh send it, persists the state after each
//! commit, and publishes the new state for readers. Nothing waits for it but the request
//! whose change it is: `list`, `stats` and every other read use the published view and their
//! own counter reader, so they answer while an apply waits out a grace period or an fsync.
//!
//! Requests that arrive while a batch waits (a grace period, a busy writer) are folded into
//! one batch: each is validated on its own on top of the ones before it (a bad one is refused
//! alone), then all go in with one plan and one state write.

use std::{
    sync::{
        mpsc::{Receiver, RecvTimeoutError, Sender},
        Arc,
    },
    time::Instant,
};

use tokio::sync::{oneshot, watch};

use crate::{
    api::{ApiError, ErrorCode},
    core::{
        balancer::{
            sync::{MergeReport, SyncFlow, SyncVip},
            ApplyReport, Balancer, BalancerError, Change, Snapshot, ValidationError,
        },
        clock::Clock,
    },
    dataplane::Dataplane,
    model::VipSpec,
};

/// What readers see: the state as of the last commit.
#[derive(Clone, Debug, Default)]
pub struct View {
    pub snapshot: Snapshot,
    /// Rings written since the daemon started (`xlb_ring_rebuilds_total`).
    pub ring_rebuilds: u64,
}

/// Writes the state file after a commit; `Err` says why it could not.
pub type Persist = Box<dyn FnMut(&Snapshot) -> Result<(), String> + Send>;

pub enum Job {
    /// A request's changes, as one batch: all or nothing.
    Apply {
        changes: Vec<Change>,
        reply: oneshot::Sender<Result<ApplyReport, ApiError>>,
    },
    /// MAC refresh: each change on its own (one the balancer refuses must not hold back the
    /// other reals' updates); nobody waits for the result.
    Refresh { changes: Vec<Change> },
    /// Detach and stop (`xlb down`).
    Down {
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
    /// Route `target = "vip"` health probes (`Some`), or stop (`None`).
    Probes {
        conf: Option<lb_common::ProbeConf>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// The readiness self-test of each VIP (`Balancer::self_test`).
    SelfTest {
        vips: Vec<VipSpec>,
        reply: oneshot::Sender<Vec<(VipSpec, Result<(), String>)>>,
    },
    /// Flow sync: the live rings of these VIPs (`None`: all), for a walk.
    SyncView {
        vips: Option<Vec<VipSpec>>,
        reply: oneshot::Sender<Result<Vec<SyncVip>, String>>,
    },
    /// Flow sync: merge a peer's flows into the connection table.
    SyncMerge {
        flows: Vec<SyncFlow>,
        reply: oneshot::Sender<MergeReport>,
    },
}

/// How the request handlers talk to the writer.
#[derive(Clone)]
pub struct WriterHandle {
    tx: Sender<Job>,
}

fn gone() -> ApiError {
    ApiError {
        code: ErrorCode::Internal,
        field: None,
        message: "the daemon is stopping".into(),
    }
}

impl WriterHandle {
    /// Apply one request's changes; returns once they are live (and persisted, or not:
    /// `not_persisted`).
    pub async fn apply(&self, changes: Vec<Change>) -> Result<ApplyReport, ApiError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job::Apply { changes, reply })
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    pub fn refresh(&self, changes: Vec<Change>) {
        if !changes.is_empty() {
            let _ = self.tx.send(Job::Refresh { changes });
        }
    }

    /// Route `target = "vip"` probes through the probe namespace (`Some`), or stop (`None`).
    pub async fn probes(&self, conf: Option<lb_common::ProbeConf>) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job::Probes { conf, reply })
            .map_err(|_| "the daemon is stopping".to_string())?;
        rx.await.map_err(|_| "the daemon is stopping".to_string())?
    }

    /// Self-test `vips` through the loaded program, between two batches.
    pub async fn self_test(
        &self,
        vips: Vec<VipSpec>,
    ) -> Result<Vec<(VipSpec, Result<(), String>)>, ApiError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job::SelfTest { vips, reply })
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    }

    pub async fn sync_view(&self, vips: Option<Vec<VipSpec>>) -> Result<Vec<SyncVip>, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job::SyncView { vips, reply })
            .map_err(|_| gone().message)?;
        rx.await.map_err(|_| gone().message)?
    }

    pub async fn sync_merge(&self, flows: Vec<SyncFlow>) -> Result<MergeReport, ApiError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job::SyncMerge { flows, reply })
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    }

    pub async fn down(&self) -> Result<(), ApiError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Job::Down { reply }).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

/// Why the writer stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum Stopped {
    /// `xlb down`: the program is detached (the pins may or may not be gone).
    Down,
    /// Every handle was dropped.
    Closed,
}

/// Start the writer thread over `bal`; its state is published at once.
pub fn spawn<D, C>(
    bal: Balancer<D, C>,
    persist: Persist,
) -> std::io::Result<(
    WriterHandle,
    watch::Receiver<Arc<View>>,
    oneshot::Receiver<Stopped>,
)>
where
    D: Dataplane + Send + 'static,
    C: Clock + Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel();
    let (mut writer, view_rx) = Writer::new(bal, persist);
    let (stopped_tx, stopped_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("xlb-writer".into())
        .spawn(move || {
            let why = writer.run(&rx);
            let _ = stopped_tx.send(why);
        })?;
    Ok((WriterHandle { tx }, view_rx, stopped_rx))
}

pub struct Writer<D: Dataplane, C: Clock> {
    bal: Balancer<D, C>,
    persist: Persist,
    view: watch::Sender<Arc<View>>,
    /// Jobs that arrived while a batch waited and could not join it (`Down`).
    deferred: Vec<Job>,
}

/// One accepted part of a batch, and who to tell.
enum Waiter {
    Request(oneshot::Sender<Result<ApplyReport, ApiError>>),
    Refresh,
}

impl<D: Dataplane, C: Clock> Writer<D, C> {
    pub fn new(bal: Balancer<D, C>, persist: Persist) -> (Self, watch::Receiver<Arc<View>>) {
        let (view, rx) = watch::channel(Arc::new(View {
            snapshot: bal.snapshot(),
            ring_rebuilds: 0,
        }));
        let w = Writer {
            bal,
            persist,
            view,
            deferred: Vec::new(),
        };
        (w, rx)
    }

    #[cfg(test)]
    pub fn balancer(&self) -> &Balancer<D, C> {
        &self.bal
    }

    /// Serve jobs until `Down` succeeds or every handle is gone.
    pub fn run(&mut self, rx: &Receiver<Job>) -> Stopped {
        loop {
            let mut jobs = std::mem::take(&mut self.deferred);
            if jobs.is_empty() {
                match rx.recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => return Stopped::Closed,
                }
            }
            jobs.extend(rx.try_iter());
            if self.process(jobs, Some(rx)) {
                return Stopped::Down;
            }
        }
    }

    /// Handle jobs in order, batching the changes between two `Down`s. Returns whether a
    /// `Down` detached the program.
    pub fn process(&mut self, jobs: Vec<Job>, rx: Option<&Receiver<Job>>) -> bool {
        let mut batch = Vec::new();
        let mut jobs = jobs.into_iter();
        while let Some(job) = jobs.next() {
            match job {
                Job::Down { reply } => {
                    // Not gathering more: what came after the down waits behind it.
                    self.flush(std::mem::take(&mut batch), None);
                    if self.down(reply) {
                        let rest = jobs
                            .chain(self.deferred.drain(..))
                            .chain(rx.into_iter().flat_map(|r| r.try_iter()));
                        for job in rest.collect::<Vec<_>>() {
                            refuse(job, gone());
                        }
                        return true;
                    }
                }
                Job::Probes { conf, reply } => {
                    // Not a change of the state: done in order, between the batches.
                    self.flush(std::mem::take(&mut batch), None);
                    let dp = self.bal.dataplane_mut();
                    let result = match conf {
                        Some(c) => dp.enable_probes(&c),
                        None => dp.disable_probes(),
                    };
                    let _ = reply.send(result.map_err(|e| e.to_string()));
                }
                Job::SelfTest { vips, reply } => {
                    self.flush(std::mem::take(&mut batch), None);
                    let results = vips
                        .into_iter()
                        .map(|v| {
                            let r = self.bal.self_test(&v);
                            (v, r)
                        })
                        .collect();
                    let _ = reply.send(results);
                }
                Job::SyncView { vips, reply } => {
                    self.flush(std::mem::take(&mut batch), None);
                    let view = self.bal.sync_view(vips.as_deref());
                    let _ = reply.send(view.map_err(|e| e.to_string()));
                }
                Job::SyncMerge { flows, reply } => {
                    // Not a change of the configuration: no batch to wait for.
                    let _ = reply.send(self.bal.merge_flows(&flows));
                }
                other => batch.push(other),
            }
        }
        self.flush(batch, rx);
        false
    }

    /// Apply a batch: screen each job, plan them together, wait out the plan's grace period
    /// (taking in what arrives meanwhile), commit, persist, answer.
    fn flush(&mut self, mut jobs: Vec<Job>, rx: Option<&Receiver<Job>>) {
        let mut waited = false;
        loop {
            if jobs.is_empty() {
                return;
            }
            let (waiters, changes) = self.screen(std::mem::take(&mut jobs));
            if waiters.is_empty() {
                return;
            }
            let plan = match self.bal.plan(changes) {
                Ok(plan) => plan,
                // A limit or a ring of the batch as a whole: let each request meet it alone.
                Err(BalancerError::Invalid { change: None, .. }) if waiters.len() > 1 => {
                    self.one_by_one(waiters);
                    return;
                }
                Err(e) => {
                    let e = balancer_error(e);
                    for (w, _) in waiters {
                        answer(w, Err(e.clone()));
                    }
                    return;
                }
            };
            if let (Some(until), Some(rx), false) = (plan.not_before(), rx, waited) {
                waited = true;
                let more = self.gather(rx, until);
                if !more.is_empty() {
                    // Plan again with the late-comers; what was accepted is screened again
                    // (a no-op for it) so that the order stays the arrival order.
                    jobs = rejoin(waiters);
                    jobs.extend(more);
                    continue;
                }
            }
            let result = self.bal.commit(plan).map_err(balancer_error);
            let result = result.and_then(|report| self.persisted(report));
            for (w, _) in waiters {
                answer(w, result.clone());
            }
            return;
        }
    }

    /// Jobs arriving until `until`: changes join the batch, a `Down` waits for after it.
    fn gather(&mut self, rx: &Receiver<Job>, until: Instant) -> Vec<Job> {
        let mut more = Vec::new();
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return more;
            }
            match rx.recv_timeout(left) {
                Ok(
                    job @ (Job::Down { .. }
                    | Job::Probes { .. }
                    | Job::SelfTest { .. }
                    | Job::SyncView { .. }
                    | Job::SyncMerge { .. }),
                ) => self.deferred.push(job),
                Ok(job) if self.deferred.is_empty() => more.push(job),
                Ok(job) => self.deferred.push(job),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return more,
            }
        }
    }

    /// Each job's changes checked on top of the ones accepted before it: a request that is
    /// refused is answered now and leaves the batch; a refused refresh change is logged.
    fn screen(&mut self, jobs: Vec<Job>) -> (Vec<(Waiter, Vec<Change>)>, Vec<Change>) {
        let mut accepted: Vec<(Waiter, Vec<Change>)> = Vec::new();
        let mut changes: Vec<Change> = Vec::new();
        for job in jobs {
            match job {
                Job::Apply { changes: c, reply } => {
                    let mut all = changes.clone();
                    all.extend(c.iter().cloned());
                    match self.bal.check(&all) {
                        Ok(()) => {
                            changes = all;
                            accepted.push((Waiter::Request(reply), c));
                        }
                        Err(e) => {
                            let _ = reply.send(Err(balancer_error(e)));
                        }
                    }
                }
                Job::Refresh { changes: c } => {
                    let mut mine = Vec::new();
                    for change in c {
                        let mut all = changes.clone();
                        all.push(change.clone());
                        match self.bal.check(&all) {
                            Ok(()) => {
                                changes = all;
                                mine.push(change);
                            }
                            // A real removed meanwhile: nothing left to update.
                            Err(e) => log::info!("not applied: {}", balancer_error(e)),
                        }
                    }
                    if !mine.is_empty() {
                        accepted.push((Waiter::Refresh, mine));
                    }
                }
                job @ (Job::Down { .. }
                | Job::Probes { .. }
                | Job::SelfTest { .. }
                | Job::SyncView { .. }
                | Job::SyncMerge { .. }) => self.deferred.push(job),
            }
        }
        (accepted, changes)
    }

    fn one_by_one(&mut self, waiters: Vec<(Waiter, Vec<Change>)>) {
        for (w, changes) in waiters {
            let result = self
                .bal
                .apply(changes)
                .map_err(balancer_error)
                .and_then(|report| self.persisted(report));
            answer(w, result);
        }
    }

    /// After a commit: publish the new state and write it to disk.
    fn persisted(&mut self, report: ApplyReport) -> Result<ApplyReport, ApiError> {
        for v in &report.vips {
            if let Some(w) = &v.spread_warning {
                log::warn!("{}: {w}", v.vip);
            }
        }
        let snapshot = self.bal.snapshot();
        log_quorum(&self.view.borrow().snapshot, &snapshot);
        let saved = (self.persist)(&snapshot);
        let rewritten = report
            .vips
            .iter()
            .filter(|v| matches!(v.ring, crate::core::balancer::RingUpdate::Rewritten { .. }))
            .count() as u64;
        let ring_rebuilds = self.view.borrow().ring_rebuilds + rewritten;
        self.view.send_replace(Arc::new(View {
            snapshot,
            ring_rebuilds,
        }));
        match saved {
            Ok(()) => Ok(report),
            Err(e) => {
                log::error!("persisting the state: {e}");
                Err(ApiError {
                    code: ErrorCode::NotPersisted,
                    field: None,
                    message: format!(
                        "the change is live, but the state file could not be written ({e}): a \
                         restart would not know it"
                    ),
                })
            }
        }
    }

    /// `xlb down`: detach, then remove the pins. Ends in one of two states: still attached
    /// (and serving, saying so), or detached and stopping (saying whether pins are left).
    fn down(&mut self, reply: oneshot::Sender<Result<(), ApiError>>) -> bool {
        if let Err(e) = self.bal.detach() {
            log::error!("down: {e}");
            let _ = reply.send(Err(ApiError {
                code: ErrorCode::Internal,
                field: None,
                message: format!(
                    "the XDP program is still attached and the daemon keeps running: {e}"
                ),
            }));
            return false;
        }
        let result = match self.bal.remove_pins() {
            Ok(()) => {
                log::info!("down: XDP program detached, pins removed");
                Ok(())
            }
            Err(e) => {
                log::error!("down: detached, but {e}");
                Err(ApiError {
                    code: ErrorCode::Internal,
                    field: None,
                    message: format!(
                        "the XDP program is detached and the daemon stops, but {e}: remove \
                         what is left with `xlb down --iface IFACE`"
                    ),
                })
            }
        };
        let _ = reply.send(result);
        true
    }
}

/// Quorum losses and recoveries of VIPs that were there before.
fn log_quorum(before: &Snapshot, after: &Snapshot) {
    for v in &after.vips {
        // A VIP being filled or emptied by its operator says nothing worth a log line.
        let Some(old) = before
            .vips
            .iter()
            .find(|o| o.spec == v.spec && !o.reals.is_empty() && !v.reals.is_empty())
        else {
            continue;
        };
        let state = |s: &crate::core::balancer::VipSnapshot| {
            (s.quorum_lost, s.sorry_active, s.fail_open, s.dropping)
        };
        if state(old) == state(v) {
            continue;
        }
        let (spec, weight, quorum) = (v.spec, v.healthy_weight, v.options.quorum);
        if !v.quorum_lost {
            log::info!("VIP {spec}: quorum regained (healthy weight {weight} >= {quorum})");
        } else if v.sorry_active {
            let sorry = v
                .options
                .sorry_server
                .map(|a| a.to_string())
                .unwrap_or_default();
            log::warn!(
                "VIP {spec}: quorum lost (healthy weight {weight} < {quorum}): the sorry server \
                 {sorry} takes new flows"
            );
        } else if v.fail_open {
            // A checker that sees every server fail is more likely broken than every server.
            log::error!(
                "VIP {spec}: quorum lost (healthy weight {weight} < {quorum}): failing open, \
                 every real back in the ring"
            );
        } else {
            log::error!(
                "VIP {spec}: quorum lost (healthy weight {weight} < {quorum}): new flows are \
                 dropped"
            );
        }
    }
}

/// A refused job's answer when it was never tried.
fn refuse(job: Job, e: ApiError) {
    match job {
        Job::Apply { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Job::Down { reply } => {
            let _ = reply.send(Err(e));
        }
        Job::Probes { reply, .. } => {
            let _ = reply.send(Err(e.message));
        }
        Job::SelfTest { vips, reply } => {
            let _ = reply.send(
                vips.into_iter()
                    .map(|v| (v, Err(e.message.clone())))
                    .collect(),
            );
        }
        Job::SyncView { reply, .. } => {
            let _ = reply.send(Err(e.message));
        }
        // Dropping the reply tells the sync the daemon is stopping.
        Job::Refresh { .. } | Job::SyncMerge { .. } => {}
    }
}

fn answer(w: Waiter, result: Result<ApplyReport, ApiError>) {
    match (w, result) {
        (Waiter::Request(reply), result) => {
            let _ = reply.send(result);
        }
        (Waiter::Refresh, Err(e)) => log::error!("applying MAC or health changes: {e}"),
        (Waiter::Refresh, Ok(_)) => {}
    }
}

/// Accepted parts back into jobs, to be screened again with late-comers.
fn rejoin(waiters: Vec<(Waiter, Vec<Change>)>) -> Vec<Job> {
    waiters
        .into_iter()
        .map(|(w, changes)| match w {
            Waiter::Request(reply) => Job::Apply { changes, reply },
            Waiter::Refresh => Job::Refresh { changes },
        })
        .collect()
}

/// A balancer error as the control API reports it.
pub fn balancer_error(e: BalancerError) -> ApiError {
    if let Some(v) = e.validation() {
        let code = match v {
            ValidationError::DuplicateVip { .. } | ValidationError::DuplicateReal { .. } => {
                ErrorCode::AlreadyExists
            }
            ValidationError::UnknownVip { .. } | ValidationError::UnknownReal { .. } => {
                ErrorCode::NotFound
            }
            ValidationError::TooManyVips { .. } | ValidationError::TooManyReals { .. } => {
                ErrorCode::ResourceExhausted
            }
            _ => ErrorCode::InvalidArgument,
        };
        return ApiError {
            code,
            field: Some(v.field().to_string()),
            message: v.to_string(),
        };
    }
    ApiError {
        code: ErrorCode::Internal,
        field: None,
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            atomic::{AtomicBool, AtomicUsize, Ordering},
            Arc,
        },
        time::Duration,
    };

    use super::*;
    use crate::{
        core::clock::SystemClock,
        dataplane::{fake::FakeDataplane, Limits},
        model::{VipFlags, VipSpec},
    };

    fn limits() -> Limits {
        Limits {
            max_vips: 4,
            max_reals: 16,
            ring_size: 1009,
        }
    }

    fn vip() -> VipSpec {
        "tcp/10.0.0.100:80".parse().expect("vip")
    }

    fn real(n: u8) -> Change {
        Change::AddReal {
            vip: vip(),
            addr: format!("10.0.0.{n}").parse().expect("ip"),
            weight: 1,
            mac: Some([2, 0, 0, 0, 0, n]),
        }
    }

    type TestWriter = (
        Writer<FakeDataplane, SystemClock>,
        watch::Receiver<Arc<View>>,
        Arc<AtomicUsize>,
        Arc<AtomicBool>,
    );

    /// A writer whose persist can be made to fail, counting the state writes.
    fn writer() -> TestWriter {
        let bal = Balancer::new(FakeDataplane::new(limits()), Duration::from_secs(900));
        let saves = Arc::new(AtomicUsize::new(0));
        let fail = Arc::new(AtomicBool::new(false));
        let (s, f) = (saves.clone(), fail.clone());
        let persist: Persist = Box::new(move |_| {
            if f.load(Ordering::Relaxed) {
                return Err("No space left on device (os error 28)".into());
            }
            s.fetch_add(1, Ordering::Relaxed);
            Ok(())
        });
        let (w, view) = Writer::new(bal, persist);
        (w, view, saves, fail)
    }

    fn apply(changes: Vec<Change>) -> (Job, oneshot::Receiver<Result<ApplyReport, ApiError>>) {
        let (reply, rx) = oneshot::channel();
        (Job::Apply { changes, reply }, rx)
    }

    fn add_vip() -> Vec<Change> {
        vec![Change::AddVip {
            spec: vip(),
            flags: VipFlags::default(),
        }]
    }

    #[test]
    fn a_change_that_cannot_be_persisted_is_live_and_says_so() {
        let (mut w, view, saves, fail) = writer();
        fail.store(true, Ordering::Relaxed);
        let (job, mut rx) = apply(add_vip());
        assert!(!w.process(vec![job], None));
        let e = rx.try_recv().expect("answered").expect_err("not persisted");
        assert_eq!(e.code, ErrorCode::NotPersisted);
        assert!(e.message.contains("the change is live"), "{}", e.message);
        assert!(e.message.contains("No space left"), "{}", e.message);
        // Live in the maps and in what readers see.
        assert_eq!(w.balancer().vip_id(&vip()), Some(0));
        assert_eq!(view.borrow().snapshot.vips.len(), 1);
        assert_eq!(saves.load(Ordering::Relaxed), 0);
        // Once the disk is back, the next change writes the whole state again.
        fail.store(false, Ordering::Relaxed);
        let (job, mut rx) = apply(vec![real(11)]);
        w.process(vec![job], None);
        rx.try_recv().expect("answered").expect("applied");
        assert_eq!(saves.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_bad_request_in_a_batch_is_refused_alone() {
        let (mut w, _view, saves, _) = writer();
        let (first, mut r1) = apply(add_vip());
        let (dup, mut r2) = apply(add_vip());
        let (third, mut r3) = apply(vec![real(11), real(12)]);
        w.process(vec![first, dup, third], None);
        r1.try_recv().expect("answered").expect("applied");
        let e = r2.try_recv().expect("answered").expect_err("duplicate");
        assert_eq!(e.code, ErrorCode::AlreadyExists);
        r3.try_recv().expect("answered").expect("applied");
        // One plan, one commit, one state write for the two good ones.
        assert_eq!(saves.load(Ordering::Relaxed), 1);
        assert_eq!(w.balancer().snapshot().vips[0].reals.len(), 2);
    }

    #[test]
    fn changes_arriving_during_a_grace_period_join_the_waiting_batch() {
        let (mut w, _view, saves, _) = writer();
        let (job, _r) = apply([add_vip(), vec![real(11), real(12)]].concat());
        w.process(vec![job], None);
        // The ring just flipped (no barrier: nothing was cleared): the next change to it
        // waits a grace period...
        let (job, _r) = apply(vec![Change::SetWeight {
            vip: vip(),
            addr: "10.0.0.12".parse().expect("ip"),
            weight: 3,
        }]);
        w.process(vec![job], None);
        let before = saves.load(Ordering::Relaxed);
        let ring_writes = w.balancer().dataplane().ring_writes;
        let (tx, rx) = std::sync::mpsc::channel();
        let (first, mut r1) = apply(vec![real(13)]);
        let sender = std::thread::spawn(move || {
            // ...during which two more requests come in.
            std::thread::sleep(Duration::from_millis(5));
            let (a, ra) = apply(vec![real(14)]);
            let (b, rb) = apply(vec![real(15)]);
            tx.send(a).expect("send");
            tx.send(b).expect("send");
            (ra, rb)
        });
        w.process(vec![first], Some(&rx));
        let (mut ra, mut rb) = sender.join().expect("sender");
        for r in [&mut r1, &mut ra, &mut rb] {
            r.try_recv().expect("answered").expect("applied");
        }
        assert_eq!(
            saves.load(Ordering::Relaxed),
            before + 1,
            "one commit for three"
        );
        assert_eq!(w.balancer().dataplane().ring_writes, ring_writes + 1);
        assert_eq!(w.balancer().snapshot().vips[0].reals.len(), 5);
    }

    #[test]
    fn down_ends_detached_and_stopped_or_attached_and_serving() {
        let (mut w, _view, _, _) = writer();
        w.bal.dataplane_mut().fail_detach = true;
        let (reply, mut rx) = oneshot::channel();
        assert!(!w.process(vec![Job::Down { reply }], None), "still serving");
        let e = rx.try_recv().expect("answered").expect_err("failed");
        assert!(e.message.contains("still attached"), "{}", e.message);
        assert!(w.balancer().dataplane().attached);
        // Detached, but the pins cannot be removed: it stops, and says what is left.
        w.bal.dataplane_mut().fail_remove_pins = true;
        let (reply, mut rx) = oneshot::channel();
        let (later, mut later_rx) = apply(add_vip());
        assert!(w.process(vec![Job::Down { reply }, later], None), "stops");
        let e = rx.try_recv().expect("answered").expect_err("pins left");
        assert!(
            e.message.contains("detached and the daemon stops"),
            "{}",
            e.message
        );
        assert!(!w.balancer().dataplane().attached);
        assert!(w.balancer().dataplane().pinned);
        // What came after the down is refused, not applied.
        assert!(later_rx.try_recv().expect("answered").is_err());
        assert_eq!(w.balancer().vip_id(&vip()), None);
    }

    #[test]
    fn nothing_sent_after_a_down_is_applied_before_it() {
        let (mut w, _view, _, _) = writer();
        let (job, _r) = apply([add_vip(), vec![real(11)]].concat());
        w.process(vec![job], None);
        // A change that must wait a grace period, then a down, then another change; a third
        // one arrives while the first waits.
        let (first, mut r1) = apply(vec![real(12)]);
        let (reply, mut down) = oneshot::channel();
        let (after, mut r_after) = apply(vec![real(13)]);
        let (tx, rx) = std::sync::mpsc::channel();
        let (late, mut r_late) = apply(vec![real(14)]);
        tx.send(late).expect("send");
        assert!(w.process(vec![first, Job::Down { reply }, after], Some(&rx)));
        r1.try_recv()
            .expect("answered")
            .expect("applied before the down");
        down.try_recv().expect("answered").expect("down");
        for r in [&mut r_after, &mut r_late] {
            assert!(
                r.try_recv().expect("answered").is_err(),
                "applied after the down"
            );
        }
        assert_eq!(w.balancer().snapshot().vips[0].reals.len(), 2);
    }
}
