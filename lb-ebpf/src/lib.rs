//! What xlb's XDP objects share: bounds-checked access to the frame. Each object is a binary
//! of this crate, so that a program only carries the maps it uses:
//! - `xlb` (`src/main.rs`): the balancer and its maps, the only object the daemon attaches;
//! - `xlb-aux` (`src/bin/xlb-aux.rs`): helper programs without maps (the clock probe the
//!   daemon measures HZ with, the pass program veth peers need);
//! - `xlb-decap` (`src/bin/xlb-decap.rs`): `xlb_decap` and its maps, which `xlb decap`
//!   attaches on real servers of tunnel mode;
//! - `xlb-bench` (`src/bin/xlb-bench.rs`): the benchmark wrapper and its maps, loaded only by
//!   `xlb-bench`.
#![no_std]

use aya_ebpf::programs::XdpContext;

/// Pointer to a `T` at `off` bytes into the frame, or `None` when the frame is shorter. The
/// only way any program of xlb touches `ctx.data()`.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *const T)
}

#[inline(always)]
pub fn ptr_at_mut<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    ptr_at::<T>(ctx, off).map(|p| p as *mut T)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
