//! Where the balancer takes its time from (id quarantine, grace periods): the system's
//! monotonic clock, or in tests a clock that only moves when told.
//!
//! Monotonic on purpose: what the time protects is the age of tracked flows, which the kernel
//! keeps in jiffies, and jiffies neither step with the wall clock nor run during a suspend.

#[cfg(test)]
use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};
#[cfg(test)]
use std::time::Duration;
use std::time::Instant;

pub trait Clock {
    fn now(&self) -> Instant;
    /// Block the calling thread until `deadline` (a grace period; never long).
    fn sleep_until(&self, deadline: Instant);
}

#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn sleep_until(&self, deadline: Instant) {
        let left = deadline.saturating_duration_since(Instant::now());
        if !left.is_zero() {
            std::thread::sleep(left);
        }
    }
}

/// A clock that only moves when told (or slept on: sleeping moves it to the deadline at
/// once); clones share the time (keep one to advance it).
#[cfg(test)]
#[derive(Clone, Debug)]
pub struct ManualClock {
    base: Instant,
    offset_ns: Arc<AtomicU64>,
}

#[cfg(test)]
impl ManualClock {
    pub fn new() -> Self {
        ManualClock {
            base: Instant::now(),
            offset_ns: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn advance(&self, by: Duration) {
        let ns = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.offset_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Time since the clock was made.
    pub fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.offset_ns.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.base + self.elapsed()
    }

    fn sleep_until(&self, deadline: Instant) {
        let left = deadline.saturating_duration_since(self.now());
        self.advance(left);
    }
}
