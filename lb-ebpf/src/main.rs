//! `xlb`, the balancer: parse → VIP lookup → connection table / Maglev ring → rewrite →
//! counters. The only program the daemon attaches, with the maps in `maps.rs`.
#![no_std]
#![no_main]

mod encap;
mod forward;
mod icmp;
mod maps;
mod nat;
mod nat_icmp;
mod parse;
mod probe;
mod stats;
mod trace;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{counter, Action};

use crate::{parse::Parsed, stats::Reason};

#[xdp]
pub fn xlb(ctx: XdpContext) -> u32 {
    try_xlb(&ctx).unwrap_or_else(refused)
}

#[inline(always)]
fn try_xlb(ctx: &XdpContext) -> Result<u32, Reason> {
    let pkt_len = (ctx.data_end() - ctx.data()) as u64;
    let key = match parse::parse(ctx)? {
        Parsed::Flow(key) => key,
        Parsed::Icmp { key, l3, l4 } => match icmp::handle(ctx, &key, l3, l4)? {
            icmp::Icmp::Action(action) => return Ok(action),
            icmp::Icmp::Forward(flow) => flow,
            icmp::Icmp::Nat => {
                nat::pend_icmp()?;
                return Err(nat::tail_call(ctx, nat::TAIL_ICMP));
            }
        },
        Parsed::Fragment(key) => {
            // No ports to pick a real by. Fragments for a VIP are dropped (as Katran does);
            // everybody else's are the host's business.
            return if forward::is_vip_addr(&key) {
                Err(counter::DROP_FRAGMENT)
            } else if nat::from_nat_real(&key) {
                // A NAT real's fragment would reach its client with the real's address.
                Err(counter::DROP_NAT_FRAGMENT)
            } else {
                Ok(xdp_action::XDP_PASS)
            };
        }
    };
    match forward::forward(ctx, &key, pkt_len)? {
        which @ (nat::TAIL | nat::TAIL_REPLY) => Err(nat::tail_call(ctx, which)),
        action => Ok(action),
    }
}

/// The action for a packet not forwarded, counted by its reason.
#[inline(always)]
fn refused(reason: Reason) -> u32 {
    stats::count(reason);
    match reason.action {
        Action::Drop => xdp_action::XDP_DROP,
        Action::Pass | Action::Forward => xdp_action::XDP_PASS,
    }
}

/// NAT mode's rewrite of a packet to a real, tail-called by `xlb` (see `nat`).
#[xdp]
pub fn xlb_nat(ctx: XdpContext) -> u32 {
    nat::run_forward(&ctx).unwrap_or_else(refused)
}

/// NAT mode's rewrite of a real's reply, tail-called by `xlb`.
#[xdp]
pub fn xlb_nat_reply(ctx: XdpContext) -> u32 {
    nat::run_reply(&ctx).unwrap_or_else(refused)
}

/// NAT mode's translation of ICMP errors about its flows (both ways), tail-called by `xlb`
/// and `xlb_nat`.
#[xdp]
pub fn xlb_nat_icmp(ctx: XdpContext) -> u32 {
    nat_icmp::run(&ctx).unwrap_or_else(refused)
}

/// On the outer end of the daemon's probe-namespace veth: `target = "vip"` health probes out
/// to their reals (see `probe`).
#[xdp]
pub fn xlb_probe(ctx: XdpContext) -> u32 {
    probe::out(&ctx).unwrap_or(xdp_action::XDP_DROP)
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
