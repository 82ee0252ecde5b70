//! `xlb trace`: the kernel traces while at least one `trace` request waits (and for a moment
//! after, so that a client asking again at once loses nothing), and only the VIP asked for
//! when every waiting request asks for the same one. One task reads the ring buffer and hands
//! each decision to every waiting request.

use std::{
    collections::HashMap,
    os::fd::{AsFd, OwnedFd},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use lb_common::{trace::*, GLOBAL_COUNTERS};
use tokio::{io::unix::AsyncFd, sync::broadcast};

use super::{
    handlers::Context,
    health_ops::{internal, parse_vip},
};
use crate::{
    api::{ApiError, ErrorCode, TraceLine, TraceReply},
    dataplane::ebpf::trace::Tracer,
    model::unmap_addr,
};

/// Most decisions one answer carries.
pub const MAX_BATCH: u32 = 1000;
/// Longest a request waits for its first decision.
const MAX_WAIT: Duration = Duration::from_secs(5);
/// Decisions queued for a slow request before it loses some.
const QUEUE: usize = 8192;
/// Tracing stays on this long after the last request ends.
const LINGER: Duration = Duration::from_secs(2);

pub struct Hub {
    tracer: Mutex<Tracer>,
    events: broadcast::Sender<TraceEvent>,
    /// The last request's id, and the waiting requests: their id → the vip_id they want
    /// (None: all).
    waiting: Mutex<(u64, HashMap<u64, Option<u32>>)>,
}

impl Hub {
    /// Start reading the ring buffer (on the runtime this is called from).
    pub fn start(tracer: Tracer) -> std::io::Result<Arc<Hub>> {
        let fd: OwnedFd = tracer.as_fd().try_clone_to_owned()?;
        // SAFETY: the AsyncFd owns the duplicate for its whole life.
        let readable = unsafe { AsyncFd::register(fd) }?;
        let (events, _) = broadcast::channel(QUEUE);
        let hub = Arc::new(Hub {
            tracer: Mutex::new(tracer),
            events,
            waiting: Mutex::new((0, HashMap::new())),
        });
        let h = hub.clone();
        tokio::spawn(async move {
            loop {
                let Ok(mut guard) = readable.readable().await else {
                    return;
                };
                h.drain();
                guard.clear_ready();
            }
        });
        Ok(hub)
    }

    fn drain(&self) {
        let mut t = self.tracer.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(e) = t.next_event() {
            // No receiver: nobody waits (a linger's decisions); dropped.
            let _ = self.events.send(e);
        }
    }

    fn lost(&self) -> u64 {
        self.tracer.lock().unwrap_or_else(|e| e.into_inner()).lost()
    }

    /// Turn the kernel's tracing to what the waiting requests want.
    fn apply(&self, waiting: &HashMap<u64, Option<u32>>) {
        let mut wants = waiting.values();
        let on = !waiting.is_empty();
        let vip = match wants.next() {
            Some(first) if wants.all(|w| w == first) => *first,
            _ => None,
        };
        let r = self
            .tracer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set(on, vip);
        if let Err(e) = r {
            log::warn!("trace: {e}");
        }
    }

    fn join(&self, vip: Option<u32>) -> u64 {
        let mut w = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        w.0 += 1;
        let id = w.0;
        w.1.insert(id, vip);
        self.apply(&w.1);
        id
    }

    fn leave(self: &Arc<Self>, id: u64) {
        let mut w = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        w.1.remove(&id);
        if !w.1.is_empty() {
            self.apply(&w.1);
            return;
        }
        // The last one: off after the linger unless a request came meanwhile (which then
        // lingers itself when it leaves).
        let last = w.0;
        let hub = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(LINGER).await;
            let w = hub.waiting.lock().unwrap_or_else(|e| e.into_inner());
            if w.0 == last {
                hub.apply(&w.1);
            }
        });
    }
}

/// Leaves the hub however the request ends (answered, or its client gone).
struct Waiting<'a>(&'a Arc<Hub>, u64);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.leave(self.1);
    }
}

impl Context {
    pub(super) async fn trace(
        &self,
        vip: Option<&str>,
        max: Option<u32>,
        wait_ms: Option<u64>,
    ) -> Result<TraceReply, ApiError> {
        let Some(hub) = &self.trace else {
            return Err(ApiError {
                code: ErrorCode::FailedPrecondition,
                field: None,
                message: "this daemon has no kernel trace (no eBPF program loaded)".into(),
            });
        };
        let want = match vip.map(parse_vip).transpose()? {
            Some(spec) => Some(self.vip_now(&spec)?.id),
            None => None,
        };
        let max = max.unwrap_or(MAX_BATCH).clamp(1, MAX_BATCH) as usize;
        let wait = Duration::from_millis(wait_ms.unwrap_or(1000)).min(MAX_WAIT);
        let mut rx = hub.events.subscribe();
        let lost_before = hub.lost();
        let _waiting = Waiting(hub, hub.join(want));
        let mut raw = Vec::new();
        let mut skipped = 0u64;
        let deadline = tokio::time::Instant::now() + wait;
        while raw.len() < max {
            // Once something came, what is queued already goes with it, without waiting.
            let next = if raw.is_empty() {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(r) => r,
                    Err(_) => break,
                }
            } else {
                match rx.try_recv() {
                    Ok(e) => Ok(e),
                    Err(broadcast::error::TryRecvError::Lagged(n)) => {
                        Err(broadcast::error::RecvError::Lagged(n))
                    }
                    Err(_) => break,
                }
            };
            match next {
                Ok(e) if want.is_none_or(|id| id == e.flow.vip_id) => raw.push(e),
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => skipped += n,
                Err(broadcast::error::RecvError::Closed) => {
                    return Err(internal("the trace reader stopped".into()))
                }
            }
        }
        let lost = hub.lost().saturating_sub(lost_before) + skipped;
        Ok(TraceReply {
            events: self.trace_lines(&raw),
            lost,
        })
    }

    /// The decisions with their VIP's and real's names (ids the state no longer has are
    /// shown as such).
    fn trace_lines(&self, raw: &[TraceEvent]) -> Vec<TraceLine> {
        let view = self.snapshot();
        let vips: HashMap<u32, _> = view.snapshot.vips.iter().map(|v| (v.id, v)).collect();
        let (wall, mono) = (SystemTime::now(), monotonic_ns());
        raw.iter()
            .map(|e| {
                let v = vips.get(&e.flow.vip_id);
                let real = v.and_then(|v| {
                    v.reals
                        .iter()
                        .chain(&v.sorry)
                        .find(|r| r.id == e.real_id)
                        .map(|r| r.addr.to_string())
                });
                let real = match (real, e.real_id) {
                    (Some(r), _) => Some(r),
                    (None, 0) => None,
                    (None, id) => Some(format!("real#{id}")),
                };
                let sport = u16::from_be(e.flow.ports as u16);
                let dport = u16::from_be((e.flow.ports >> 16) as u16);
                let time = wall - Duration::from_nanos(mono.saturating_sub(e.time_ns));
                TraceLine {
                    time: format_time(time),
                    proto: v.map_or("?".into(), |v| v.spec.proto.to_string()),
                    src: unmap_addr(e.flow.src).to_string(),
                    sport,
                    dst: v.map_or("?".into(), |v| v.spec.addr.to_string()),
                    dport,
                    vip: v.map_or_else(|| format!("vip#{}", e.flow.vip_id), |v| v.spec.to_string()),
                    real,
                    how: match e.how {
                        TRACE_HOW_TRACKED => "tracked",
                        TRACE_HOW_STALE_REPICK => "stale_repick",
                        _ => "ring",
                    }
                    .into(),
                    action: action_name(e.action).into(),
                    reason: GLOBAL_COUNTERS
                        .get(usize::from(e.reason))
                        .map(|c| c.reason().to_string()),
                    slot: (e.slot != TRACE_NO_SLOT).then_some(e.slot),
                }
            })
            .collect()
    }
}

fn action_name(a: u8) -> &'static str {
    match a {
        0 => "aborted",
        1 => "drop",
        2 => "pass",
        3 => "tx",
        4 => "redirect",
        _ => "unknown",
    }
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn format_time(t: SystemTime) -> String {
    match jiff::Timestamp::try_from(t) {
        Ok(ts) => format!("{ts:.6}"),
        Err(_) => format!("{t:?}"),
    }
}
