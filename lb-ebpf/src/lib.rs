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

/// Internet checksums (RFC 1071) over headers of a constant size, for the programs that
/// write or change IP, UDP and ICMP headers.
pub mod csum {
    /// Fold a sum of 16-bit words to 16 bits. A fixed number of folds: a data-dependent loop
    /// keeps the verifier busy for seconds.
    #[inline(always)]
    pub fn fold(sum: u32) -> u16 {
        let s = (sum & 0xFFFF) + (sum >> 16);
        let s = (s & 0xFFFF) + (s >> 16);
        s as u16
    }

    /// Sum of `b` as big-endian 16-bit words (not folded).
    #[inline(always)]
    pub fn sum_be<const N: usize>(b: &[u8; N]) -> u32 {
        let mut s = 0u32;
        let mut i = 0;
        while i + 1 < N {
            s += u32::from(u16::from_be_bytes([b[i], b[i + 1]]));
            i += 2;
        }
        s
    }

    /// RFC 1624: the checksum after one 16-bit word went from `old` to `new`.
    #[inline(always)]
    pub fn replace(check: [u8; 2], old: u16, new: u16) -> [u8; 2] {
        let hc = u16::from_be_bytes(check);
        let s = u32::from(!hc) + u32::from(!old) + u32::from(new);
        (!fold(s)).to_be_bytes()
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
