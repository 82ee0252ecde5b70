//! The benchmark wrapper, loaded only by `xlb-bench` (never by the daemon): BPF_PROG_TEST_RUN
//! reruns the buffer the previous iteration rewrote, so `xlb_bench` restores a template frame
//! before every iteration and tail-calls the program under test (the balancer of the `xlb`
//! object, or `xlb_bench_baseline` to measure the wrapper's own cost). `xlb_bench_sink` counts
//! and drops what the live-frames rows forward to it.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_xdp_adjust_head, bpf_xdp_store_bytes},
    macros::{map, xdp},
    maps::{Array, PerCpuArray, ProgramArray},
    programs::XdpContext,
};
use lb_common::{BenchFrame, BENCH_FRAME_MAX};

/// The frame the wrapper restores before each iteration.
#[map]
static BENCH_FRAME: Array<BenchFrame> = Array::with_max_entries(1, 0);

/// Slot 0 holds the program the wrapper tail-calls (the balancer, or the baseline).
#[map]
static BENCH_PROGS: ProgramArray = ProgramArray::with_max_entries(1, 0);

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
        let Some(p) = lb_ebpf::ptr_at_mut::<[u8; 4]>(&ctx, vary) else {
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

/// Frames the live-frames rows' receiver got (per CPU).
#[map]
static BENCH_SINK: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The receiving end of the live-frames rows (a veth peer): counts every frame and drops it,
/// so that the figure is the balancer's forwarding rate, not the stack's.
#[xdp]
pub fn xlb_bench_sink(_ctx: XdpContext) -> u32 {
    if let Some(n) = BENCH_SINK.get_ptr_mut(0) {
        // SAFETY: this CPU's value; XDP runs with preemption disabled.
        unsafe { *n += 1 };
    }
    xdp_action::XDP_DROP
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
