//! Helper programs without maps: `xlb_clock` (the daemon measures the kernel's HZ with it) and
//! `xlb_pass` (veth peers that must receive XDP_TX frames run it).
#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

/// Lets a veth peer receive frames its partner sends with XDP_TX: a veth delivers such frames
/// only to a peer that runs an XDP program of its own (docs/build.md, veth pitfalls).
#[xdp]
pub fn xlb_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Clock probe for userspace (BPF_PROG_TEST_RUN only): writes bpf_jiffies64() and
/// bpf_ktime_get_ns() into the first 16 bytes of the frame, so the loader can measure HZ.
#[xdp]
pub fn xlb_clock(ctx: XdpContext) -> u32 {
    let Some(p) = lb_ebpf::ptr_at_mut::<[u64; 2]>(&ctx, 0) else {
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

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
