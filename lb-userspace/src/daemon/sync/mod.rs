//! Flow sync between balancer nodes (`--sync-listen`, `--sync-peer`, `--sync-key-file`): the
//! LVS sync daemon reduced to what a deterministic ring leaves to do. Nodes with the same
//! config send a new flow to the same real; only a flow that started before a ring change and
//! whose slot moved lives in one node's table alone. So on every ring change a node sends its
//! peers exactly those flows (tracked, not closing, live ring elsewhere), a peer heard again
//! after a silence (a node that starts or rejoins) is asked for its set, and the set is sent
//! again every third of the shortest idle time so that a peer's copies do not idle out while
//! the flows live. A peer merges what it gets without overriding a flow it tracks itself.

pub mod wire;

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context as _, Result};
use ring::hmac;
use tokio::{
    net::UdpSocket,
    sync::{mpsc, oneshot, watch},
};

use self::wire::{Kind, Message, Reject, ReplayGuard, MAX_FLOWS, MAX_MESSAGE};
use super::writer::{View, WriterHandle};
use crate::{
    api::{SyncPeerInfo, SyncStats},
    core::balancer::sync::{differing, MergeReport},
    dataplane::FlowSource,
    model::VipSpec,
};

/// IPVS's sync daemon port.
pub const DEFAULT_PORT: u16 = 8848;
/// A peer silent this long is taken as gone; heard again, it is asked for its flows.
const LIVE: Duration = Duration::from_secs(3);
const HELLO_EVERY: Duration = Duration::from_secs(1);
/// Messages sent per `PACE_TICK`, at most (5000 a second: 100 000 flows a second per peer).
const PACE_BURST: u32 = 50;
const PACE_TICK: Duration = Duration::from_millis(10);
/// Messages taken from one peer per second, at most (and as a burst).
const RECEIVE_RATE: f64 = 20_000.0;
/// How long a mutating command waits for the sync of what it changed, at most.
const SETTLE_WAIT: Duration = Duration::from_secs(60);
const MIN_KEY: usize = 16;

/// `--sync-listen`, `--sync-peer`: ADDR:PORT, `[ADDR6]:PORT`, or an address alone (port 8848).
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let bare = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(s);
    bare.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, DEFAULT_PORT))
        .map_err(|_| format!("{s:?} is not ADDR:PORT (or an address, for port {DEFAULT_PORT})"))
}

/// The shared key: the file's bytes without trailing whitespace, at least 16 of them.
pub fn read_key(path: &Path) -> Result<Vec<u8>> {
    use std::os::unix::fs::PermissionsExt;
    let bytes = std::fs::read(path)
        .with_context(|| format!("--sync-key-file: reading {}", path.display()))?;
    let len = bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(0, |i| i + 1);
    if len < MIN_KEY {
        bail!(
            "--sync-key-file: {} holds a key of {len} bytes; at least {MIN_KEY} are needed \
             (e.g. `head -c 32 /dev/urandom | base64 > {}`)",
            path.display(),
            path.display()
        );
    }
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            log::warn!(
                "--sync-key-file: {} is readable by others than its owner: whoever reads it \
                 can plant flows (chmod 600)",
                path.display()
            );
        }
    }
    Ok(bytes[..len].to_vec())
}

/// Everything that is counted.
#[derive(Default)]
struct Figures {
    last_seen: HashMap<SocketAddr, Instant>,
    flows_sent: u64,
    flows_received: u64,
    messages_sent: u64,
    send_errors: u64,
    rejected: BTreeMap<Reject, u64>,
    merged: MergeReport,
    buckets: HashMap<IpAddr, (f64, Instant)>,
    guard: ReplayGuard,
}

struct Shared {
    socket: UdpSocket,
    key: hmac::Key,
    sender: u64,
    seq: std::sync::atomic::AtomicU64,
    peers: Vec<SocketAddr>,
    figures: Mutex<Figures>,
}

impl Shared {
    fn figures(&self) -> std::sync::MutexGuard<'_, Figures> {
        self.figures.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn send(
        &self,
        to: SocketAddr,
        kind: Kind,
        flows: &[crate::core::balancer::sync::SyncFlow],
    ) {
        let m = Message {
            kind,
            sender: self.sender,
            seq: self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            time: unix_now(),
            flows: flows.to_vec(),
        };
        let bytes = wire::encode(&self.key, &m);
        let sent = self.socket.send_to(&bytes, to).await;
        let mut f = self.figures();
        match sent {
            Ok(_) => {
                f.messages_sent += 1;
                f.flows_sent += flows.len() as u64;
            }
            Err(e) => {
                if f.send_errors == 0 {
                    log::warn!("flow sync: sending to {to}: {e}");
                }
                f.send_errors += 1;
            }
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What the share task is asked to do.
enum Job {
    /// A peer asked for the whole set.
    Requested(SocketAddr),
    /// A mutating command waits for the sync of what it changed.
    Settle(oneshot::Sender<()>),
}

/// The running sync: its figures, and `settle` for the commands.
pub struct Sync {
    shared: Arc<Shared>,
    jobs: mpsc::UnboundedSender<Job>,
}

pub struct Config {
    pub listen: SocketAddr,
    pub peers: Vec<SocketAddr>,
    pub key: Vec<u8>,
    /// TCP and UDP idle timeouts.
    pub idle: (Duration, Duration),
}

impl Sync {
    /// Bind the socket and start the tasks.
    pub async fn start(
        conf: Config,
        writer: WriterHandle,
        view: watch::Receiver<Arc<View>>,
        flows: Arc<dyn FlowSource + Send + std::marker::Sync>,
    ) -> Result<Sync> {
        let socket = UdpSocket::bind(conf.listen)
            .await
            .with_context(|| format!("--sync-listen {}", conf.listen))?;
        let mut seed = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
            .map_err(|_| anyhow::anyhow!("no random numbers for the sync sender id"))?;
        let shared = Arc::new(Shared {
            socket,
            key: wire::key(&conf.key),
            sender: u64::from_be_bytes(seed),
            seq: std::sync::atomic::AtomicU64::new(1),
            peers: conf.peers,
            figures: Mutex::default(),
        });
        let (jobs, jobs_rx) = mpsc::unbounded_channel();
        let (merge_tx, merge_rx) = mpsc::channel(64);
        tokio::spawn(receive(shared.clone(), jobs.clone(), merge_tx));
        tokio::spawn(merge(shared.clone(), writer.clone(), merge_rx));
        tokio::spawn(hello(shared.clone()));
        let sharer = Sharer {
            shared: shared.clone(),
            writer,
            flows,
            idle: conf.idle,
        };
        tokio::spawn(sharer.run(view, jobs_rx));
        log::info!(
            "flow sync: listening on {}, peers {}",
            conf.listen,
            shared
                .peers
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(Sync { shared, jobs })
    }

    /// Returns once the flows of every ring change made so far have been sent.
    pub async fn settle(&self) {
        let (tx, rx) = oneshot::channel();
        if self.jobs.send(Job::Settle(tx)).is_err() {
            return;
        }
        if tokio::time::timeout(SETTLE_WAIT, rx).await.is_err() {
            log::warn!("flow sync: the sync of a change took over {SETTLE_WAIT:?}; answering");
        }
    }

    pub fn stats(&self) -> SyncStats {
        let f = self.shared.figures();
        let now = Instant::now();
        SyncStats {
            peers: self
                .shared
                .peers
                .iter()
                .map(|p| SyncPeerInfo {
                    addr: p.to_string(),
                    last_seen_secs: f
                        .last_seen
                        .get(p)
                        .map(|t| now.duration_since(*t).as_secs_f64()),
                })
                .collect(),
            flows_sent: f.flows_sent,
            flows_received: f.flows_received,
            rejected: f.rejected.values().sum(),
            rejected_by: f
                .rejected
                .iter()
                .map(|(r, n)| (r.name().to_string(), *n))
                .collect(),
            flows_inserted: f.merged.inserted,
            flows_refreshed: f.merged.refreshed,
            flows_kept_own: f.merged.kept_own,
            flows_unknown: f.merged.unknown,
            messages_sent: f.messages_sent,
            send_errors: f.send_errors,
        }
    }
}

/// Take a datagram in: from a peer, within its budget, authenticated, not replayed.
fn accept(
    shared: &Shared,
    from: SocketAddr,
    bytes: &[u8],
) -> Result<(SocketAddr, Message, bool), Reject> {
    let peer = *shared
        .peers
        .iter()
        .find(|p| p.ip() == from.ip())
        .ok_or(Reject::UnknownPeer)?;
    let now = Instant::now();
    {
        let mut f = shared.figures();
        let (tokens, at) = f.buckets.entry(from.ip()).or_insert((RECEIVE_RATE, now));
        *tokens =
            (*tokens + now.duration_since(*at).as_secs_f64() * RECEIVE_RATE).min(RECEIVE_RATE);
        *at = now;
        if *tokens < 1.0 {
            return Err(Reject::Rate);
        }
        *tokens -= 1.0;
    }
    let m = wire::decode(&shared.key, bytes)?;
    let mut f = shared.figures();
    f.guard.check(&m, unix_now(), now)?;
    let was_live = f
        .last_seen
        .insert(peer, now)
        .is_some_and(|t| now.duration_since(t) < LIVE);
    Ok((peer, m, !was_live))
}

async fn receive(
    shared: Arc<Shared>,
    jobs: mpsc::UnboundedSender<Job>,
    merges: mpsc::Sender<Vec<crate::core::balancer::sync::SyncFlow>>,
) {
    let mut buf = vec![0u8; MAX_MESSAGE + 1];
    loop {
        let (n, from) = match shared.socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                log::warn!("flow sync: receiving: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (peer, m, rejoined) = match accept(&shared, from, &buf[..n]) {
            Ok(r) => r,
            Err(why) => {
                let mut f = shared.figures();
                let count = f.rejected.entry(why).or_insert(0);
                if *count == 0 {
                    log::warn!("flow sync: dropped a message from {from}: {}", why.name());
                }
                *count += 1;
                continue;
            }
        };
        if rejoined {
            log::info!("flow sync: peer {peer} is up; asking for its flows");
            shared.send(peer, Kind::Request, &[]).await;
        }
        match m.kind {
            Kind::Hello => {}
            Kind::Request => {
                let _ = jobs.send(Job::Requested(peer));
            }
            Kind::Flows => {
                shared.figures().flows_received += m.flows.len() as u64;
                // Bounded: when the writer falls behind, the receive budget drops the rest.
                if merges.try_send(m.flows).is_err() {
                    *shared.figures().rejected.entry(Reject::Rate).or_insert(0) += 1;
                }
            }
        }
    }
}

async fn merge(
    shared: Arc<Shared>,
    writer: WriterHandle,
    mut rx: mpsc::Receiver<Vec<crate::core::balancer::sync::SyncFlow>>,
) {
    while let Some(mut flows) = rx.recv().await {
        while let Ok(more) = rx.try_recv() {
            flows.extend(more);
        }
        let Ok(r) = writer.sync_merge(flows).await else {
            return;
        };
        let mut f = shared.figures();
        f.merged.inserted += r.inserted;
        f.merged.refreshed += r.refreshed;
        f.merged.kept_own += r.kept_own;
        f.merged.unknown += r.unknown;
        f.merged.failed += r.failed;
    }
}

async fn hello(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(HELLO_EVERY);
    loop {
        tick.tick().await;
        for p in shared.peers.clone() {
            shared.send(p, Kind::Hello, &[]).await;
        }
    }
}

/// Sends the flows the ring cannot reproduce: after ring changes, on request, and again
/// every third of the shortest idle time.
struct Sharer {
    shared: Arc<Shared>,
    writer: WriterHandle,
    flows: Arc<dyn FlowSource + Send + std::marker::Sync>,
    idle: (Duration, Duration),
}

fn digests(view: &View) -> HashMap<VipSpec, String> {
    view.snapshot
        .vips
        .iter()
        .map(|v| (v.spec, v.ring_digest.clone()))
        .collect()
}

impl Sharer {
    async fn run(
        self,
        mut view: watch::Receiver<Arc<View>>,
        mut jobs: mpsc::UnboundedReceiver<Job>,
    ) {
        let mut known = digests(&view.borrow_and_update());
        let again = (self.idle.0.min(self.idle.1) / 3).max(Duration::from_secs(1));
        let mut resend = tokio::time::interval_at(tokio::time::Instant::now() + again, again);
        loop {
            let mut settled = Vec::new();
            let mut requested = Vec::new();
            tokio::select! {
                changed = view.changed() => if changed.is_err() { return },
                job = jobs.recv() => match job {
                    Some(Job::Settle(tx)) => settled.push(tx),
                    Some(Job::Requested(p)) => requested.push(p),
                    None => return,
                },
                _ = resend.tick() => {
                    let peers = self.shared.peers.clone();
                    self.share(None, &peers).await;
                    continue;
                }
            }
            while let Ok(job) = jobs.try_recv() {
                match job {
                    Job::Settle(tx) => settled.push(tx),
                    Job::Requested(p) => requested.push(p),
                }
            }
            let now = digests(&view.borrow_and_update());
            let changed: Vec<VipSpec> = now
                .iter()
                .filter(|(spec, d)| known.get(spec) != Some(d))
                .map(|(spec, _)| *spec)
                .collect();
            known = now;
            if !changed.is_empty() {
                let peers = self.shared.peers.clone();
                self.share(Some(changed), &peers).await;
            }
            requested.sort();
            requested.dedup();
            if !requested.is_empty() {
                self.share(None, &requested).await;
            }
            for tx in settled {
                let _ = tx.send(());
            }
        }
    }

    /// Send `to` the tracked flows of `vips` (`None`: all) that their live ring would send
    /// elsewhere.
    async fn share(&self, vips: Option<Vec<VipSpec>>, to: &[SocketAddr]) {
        let views = match self.writer.sync_view(vips).await {
            Ok(v) => v,
            Err(e) => {
                log::warn!("flow sync: reading the rings: {e}");
                return;
            }
        };
        if views.is_empty() {
            return;
        }
        let (source, idle) = (self.flows.clone(), self.idle);
        let walked = tokio::task::spawn_blocking(move || differing(&*source, &views, idle)).await;
        let flows = match walked {
            Ok(Ok(f)) => f,
            Ok(Err(e)) => {
                log::warn!("flow sync: walking the connection table: {e}");
                return;
            }
            Err(e) => {
                log::warn!("flow sync: the walk of the connection table failed: {e}");
                return;
            }
        };
        let mut sent = 0u32;
        // Flows of reals with ports (NAT) in messages of their own (kind 4 on the wire): a
        // node of an earlier version still reads every other flow.
        let (ported, plain): (Vec<_>, Vec<_>) = flows.iter().partition(|f| f.real.port != 0);
        for chunk in plain.chunks(MAX_FLOWS).chain(ported.chunks(MAX_FLOWS)) {
            for p in to {
                self.shared.send(*p, Kind::Flows, chunk).await;
                sent += 1;
                if sent.is_multiple_of(PACE_BURST) {
                    tokio::time::sleep(PACE_TICK).await;
                }
            }
        }
        if !flows.is_empty() {
            log::info!(
                "flow sync: sent {} flows off their ring slot to {}",
                flows.len(),
                to.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
}
