//! `xlb trace`: each forwarding decision about a VIP packet as a `TraceEvent` in a ring
//! buffer, while the daemon has a trace to serve (lb-common's `trace`). Off, a decision costs
//! `start`'s array read and a branch.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_ktime_get_ns, maps::ring_buf::RingBufEntry};
use lb_common::{
    trace::{TraceEvent, TRACE_HOW_RING, TRACE_NO_REASON, TRACE_NO_SLOT},
    Action, CtKey, FlowKey,
};

use crate::{
    maps::{TRACE, TRACE_EVENTS, TRACE_LOST},
    stats::Reason,
};

/// What `forward` decided besides its result, for the trace.
pub struct Decision {
    pub real_id: u32,
    pub slot: u32,
    pub how: u8,
    /// A counter's slot that says what else happened, or `TRACE_NO_REASON`.
    pub reason: u8,
    /// The daemon's self-test frame: never traced.
    pub selftest: bool,
}

impl Decision {
    #[inline(always)]
    pub fn new() -> Decision {
        Decision {
            real_id: 0,
            slot: TRACE_NO_SLOT,
            how: TRACE_HOW_RING,
            reason: TRACE_NO_REASON,
            selftest: false,
        }
    }

    #[inline(always)]
    pub fn note(&mut self, reason: Reason) {
        self.reason = reason.index;
    }
}

/// An XDP action with what else happened on the way (a counter's slot, or
/// `TRACE_NO_REASON`), in one register: a value kept in memory would need stack that the
/// encapsulation path does not leave.
#[derive(Clone, Copy)]
pub struct Noted(u32);

impl Noted {
    #[inline(always)]
    pub fn new(action: u32, reason: Reason) -> Noted {
        Noted(action | u32::from(reason.index) << 8)
    }

    #[inline(always)]
    pub fn action(action: u32) -> Noted {
        Noted(action | u32::from(TRACE_NO_REASON) << 8)
    }

    #[inline(always)]
    pub fn get(self) -> u32 {
        self.0 & 0xFF
    }

    #[inline(always)]
    pub fn reason(self) -> u8 {
        (self.0 >> 8) as u8
    }
}

/// An event for a packet to `key.vip_id` while its decisions are traced (the check is all a
/// packet pays while tracing is off), with the flow filled in.
#[inline(always)]
pub fn start(key: &FlowKey, vip_id: u32) -> Option<RingBufEntry<TraceEvent>> {
    let t = TRACE.get(0)?;
    if t.on == 0 || (t.vip != 0 && t.vip != vip_id.wrapping_add(1)) {
        return None;
    }
    let Some(mut entry) = TRACE_EVENTS.reserve::<TraceEvent>(0) else {
        if let Some(lost) = TRACE_LOST.get_ptr_mut(0) {
            // SAFETY: this CPU's value; XDP runs with preemption disabled.
            unsafe { *lost += 1 };
        }
        return None;
    };
    entry.write(TraceEvent {
        // SAFETY: a helper without arguments.
        time_ns: unsafe { bpf_ktime_get_ns() },
        flow: CtKey::new(key, vip_id),
        ..TraceEvent::default()
    });
    Some(entry)
}

/// The decision into the event, which goes to the daemon (a self-test's is dropped).
#[inline(always)]
pub fn finish(mut entry: RingBufEntry<TraceEvent>, d: &Decision, result: Result<u32, Reason>) {
    if d.selftest {
        entry.discard(0);
        return;
    }
    let (action, reason) = match result {
        Ok(action) => (action as u8, d.reason),
        Err(r) => {
            let a = match r.action {
                Action::Drop => xdp_action::XDP_DROP,
                Action::Pass | Action::Forward => xdp_action::XDP_PASS,
            };
            (a as u8, r.index)
        }
    };
    // SAFETY: `start` wrote the whole event.
    let e = unsafe { entry.assume_init_mut() };
    e.real_id = d.real_id;
    e.slot = d.slot;
    e.action = action;
    e.how = d.how;
    e.reason = reason;
    entry.submit(0);
}
