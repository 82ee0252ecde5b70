//! The kernel side of `xlb trace` (lb-common's `trace`): the switch, the ring buffer of
//! decisions and the count of those it had no room for. Taken from the loaded program by the
//! daemon, which alone turns tracing on (while a `trace` request waits).

use aya::maps::{Array, MapData, PerCpuArray, RingBuf};
use lb_common::trace::{TraceConf, TraceEvent, MAP_TRACE, MAP_TRACE_EVENTS, MAP_TRACE_LOST};

use super::{take, EbpfError};

pub struct Tracer {
    conf: Array<MapData, TraceConf>,
    lost: PerCpuArray<MapData, u64>,
    events: RingBuf<MapData>,
}

impl Tracer {
    pub(super) fn take(ebpf: &mut aya::Ebpf) -> Result<Tracer, EbpfError> {
        Ok(Tracer {
            conf: take(ebpf, MAP_TRACE)?,
            lost: take(ebpf, MAP_TRACE_LOST)?,
            events: take(ebpf, MAP_TRACE_EVENTS)?,
        })
    }

    /// Trace every VIP (`vip` None) or the one with that id; `on` false: stop.
    pub fn set(&mut self, on: bool, vip: Option<u32>) -> std::io::Result<()> {
        let conf = TraceConf {
            on: u32::from(on),
            vip: vip.map_or(0, |id| id + 1),
        };
        self.conf
            .set(0, conf, 0)
            .map_err(|e| std::io::Error::other(format!("writing {MAP_TRACE}: {e}")))
    }

    /// Decisions the ring buffer had no room for, since the program was loaded.
    pub fn lost(&self) -> u64 {
        self.lost.get(&0, 0).map(|v| v.iter().sum()).unwrap_or(0)
    }

    /// The next event waiting, if any.
    pub fn next_event(&mut self) -> Option<TraceEvent> {
        let item = self.events.next()?;
        if item.len() < std::mem::size_of::<TraceEvent>() {
            return None;
        }
        // SAFETY: the kernel wrote a TraceEvent (lb-common's layout), at least that long; read
        // unaligned as the ring buffer only promises 8-byte alignment.
        Some(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<TraceEvent>()) })
    }
}

impl std::os::fd::AsFd for Tracer {
    /// The ring buffer's: readable when events wait.
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.events.as_fd()
    }
}
