//! The kernel's clock as userspace reads it: the connection table keeps time in jiffies
//! (shifted into stamp units, lb-common's `ct`).

/// The kernel's jiffies from the monotonic clock, anchored once with a reading of both.
#[derive(Clone, Copy, Debug)]
pub struct Jiffies {
    pub hz: u64,
    pub at_jiffies: u64,
    pub at_mono_ns: u64,
}

impl Jiffies {
    pub fn now(&self) -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes into a timespec we own.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let ns = ts.tv_sec.max(0) as u64 * 1_000_000_000 + ts.tv_nsec.max(0) as u64;
        let elapsed = ns.saturating_sub(self.at_mono_ns);
        self.at_jiffies
            .wrapping_add((u128::from(elapsed) * u128::from(self.hz) / 1_000_000_000) as u64)
    }
}
