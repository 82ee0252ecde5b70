//! xlb's XDP programs: `xlb` (the balancer), `xlb_pass` (for veth peers that must receive
//! XDP_TX frames) and the benchmark wrapper pair `xlb_bench` / `xlb_bench_baseline`.
#![no_std]
#![no_main]

mod forward;
mod maps;
mod parse;
mod stats;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_xdp_adjust_head, bpf_xdp_store_bytes},
    macros::xdp,
    programs::XdpContext,
};
use lb_common::BENCH_FRAME_MAX;

use crate::{
    maps::{BENCH_FRAME, BENCH_PROGS, VIP_ADDRS},
    parse::Parsed,
    stats::Reason,
};

#[xdp]
pub fn xlb(ctx: XdpContext) -> u32 {
    match try_xlb(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            stats::count(reason);
            match reason {
                Reason::BadHeader | Reason::Fragment | Reason::NoReal => xdp_action::XDP_DROP,
                _ => xdp_action::XDP_PASS,
            }
        }
    }
}

#[inline(always)]
fn try_xlb(ctx: &XdpContext) -> Result<u32, Reason> {
    let pkt_len = (ctx.data_end() - ctx.data()) as u64;
    match parse::parse(ctx)? {
        Parsed::Flow(key) => forward::forward(ctx, &key, pkt_len),
        Parsed::Fragment(key) => {
            // No ports to pick a real by. Fragments for a VIP are dropped (as Katran does);
            // everybody else's are the host's business.
            // SAFETY: presence check only.
            if unsafe { VIP_ADDRS.get(&key.dst) }.is_some() {
                Err(Reason::Fragment)
            } else {
                Ok(xdp_action::XDP_PASS)
            }
        }
    }
}

/// Lets a veth peer receive frames its partner sends with XDP_TX (see TOOLCHAIN.md).
#[xdp]
pub fn xlb_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Clock probe for userspace (BPF_PROG_TEST_RUN only): writes bpf_jiffies64() and
/// bpf_ktime_get_ns() into the first 16 bytes of the frame, so the loader can measure HZ.
#[xdp]
pub fn xlb_clock(ctx: XdpContext) -> u32 {
    let Ok(p) = parse::ptr_at_mut::<[u64; 2]>(&ctx, 0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: helpers without arguments; `p` was bounds-checked.
    unsafe {
        let j = aya_ebpf::helpers::bpf_jiffies64();
        let t = aya_ebpf::helpers::bpf_ktime_get_ns();
        core::ptr::write_unaligned(p, [j, t]);
    }
    xdp_action::XDP_PASS
}

/// Benchmark wrapper: BPF_PROG_TEST_RUN reruns the buffer the previous iteration rewrote, so
/// restore the template frame, then tail-call the program under test (BENCH_PROGS[0]).
#[xdp]
pub fn xlb_bench(ctx: XdpContext) -> u32 {
    let Some(tmpl) = BENCH_FRAME.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let len = tmpl.len as usize;
    if len == 0 || len > BENCH_FRAME_MAX {
        return xdp_action::XDP_ABORTED;
    }
    let cur = ctx.data_end() - ctx.data();
    if cur != len {
        // SAFETY: the helper checks its own bounds.
        if unsafe { bpf_xdp_adjust_head(ctx.ctx, cur as i32 - len as i32) } != 0 {
            return xdp_action::XDP_ABORTED;
        }
    }
    // SAFETY: `len` is within the template's buffer; the helper checks the frame's bounds.
    let rc = unsafe {
        bpf_xdp_store_bytes(
            ctx.ctx,
            0,
            tmpl.data.as_ptr() as *mut core::ffi::c_void,
            len as u32,
        )
    };
    if rc != 0 {
        return xdp_action::XDP_ABORTED;
    }
    // Masked for the verifier: a variable packet offset needs a known maximum (a compare is
    // not enough once LLVM rewrites it).
    let vary = (tmpl.vary_off & 0xFF) as usize;
    if vary != 0 {
        let Some(t) = BENCH_FRAME.get_ptr_mut(0) else {
            return xdp_action::XDP_ABORTED;
        };
        let Ok(p) = parse::ptr_at_mut::<[u8; 4]>(&ctx, vary) else {
            return xdp_action::XDP_ABORTED;
        };
        // SAFETY: `t` points at the map value, `p` was bounds-checked.
        unsafe {
            *p = (*t).counter.to_be_bytes();
            let next = (*t).counter.wrapping_add(1);
            let cycle = (*t).vary_cycle;
            (*t).counter = if cycle != 0 && next > cycle { 1 } else { next };
        }
    }
    // SAFETY: on success control never returns here.
    unsafe { BENCH_PROGS.tail_call(&ctx, 0) };
    xdp_action::XDP_ABORTED
}

/// What the wrapper costs on its own: the tail-call target when measuring the baseline.
#[xdp]
pub fn xlb_bench_baseline(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_TX
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
