//! NAT mode (LVS-NAT): a packet to a NAT real leaves with the real's address (and port) as its
//! destination; the real's replies come back through the balancer and leave with the VIP's
//! address and port as their source. Checksums are updated incrementally (RFC 1624), a zero
//! UDP checksum over IPv4 (none computed) stays zero.
//!
//! The way back is stateless: `REVNAT` maps a NAT real's (address, port, protocol) to the one
//! VIP it serves (the daemon refuses a second), so a reply is rewritten on whichever CPU it
//! arrives, whatever the connection table holds. The connection table is only written when
//! the real closes (its FIN or RST makes the flow closing, as the client's does), found by the
//! client's tuple, which the rewritten reply names.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_fib_lookup, bpf_redirect},
    macros::map,
    maps::{PerCpuArray, ProgramArray},
    programs::XdpContext,
};
use lb_common::{
    counter, ct, flow_hash64, FlowKey, NatScratch, Real, RevNat, VipKey, FLOW_W4_FIN,
    FLOW_W4_L4_SHIFT, FLOW_W4_TUPLE, IPPROTO_TCP, IPPROTO_UDP, NAT_ICMP_TO_CLIENT, NAT_REPLY,
    NAT_TO_REAL, REAL_F_NEXT_HOP_PASS,
};
use lb_ebpf::csum::fold;

use crate::{
    forward::{global, CT_BUCKETS, HASH_SEED},
    maps::{CONF, CONNTRACK, EGRESS, NAT_FILTER, REALS, REVNAT, TX_PORTS},
    parse::{ptr_at, ptr_at_mut, Parsed},
    stats::{self, Reason},
    trace::Noted,
};

const V4_MAPPED_PREFIX: u64 = 0xFFFF_0000;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// `struct bpf_fib_lookup` (64 bytes) as bytes at the kernel's offsets.
pub const FIB_LEN: usize = 64;
const FIB_SPORT: usize = 2;
const FIB_TOT_LEN: usize = 6;
const FIB_IFINDEX: usize = 8;
const FIB_TOS: usize = 12;
const FIB_SRC: usize = 16;
const FIB_DST: usize = 32;
const FIB_SMAC: usize = 52;
const FIB_DMAC: usize = 58;
/// `BPF_FIB_LKUP_RET_NOT_FWDED`: the destination is local (or broadcast, or unroutable).
const RET_NOT_FWDED: i64 = 4;

/// Per CPU: the FIB lookup's parameters (64 bytes more on the stack would not fit).
#[map]
static NAT_FIB: PerCpuArray<[u8; FIB_LEN]> = PerCpuArray::with_max_entries(1, 0);

/// The actions `forward` returns for a packet `xlb_nat` is to rewrite, and for a reply
/// `xlb_nat_reply` is to (no XDP action has these values); and the tail call to
/// `xlb_nat_icmp` (`nat_icmp`).
pub const TAIL: u32 = 0xFF;
pub const TAIL_REPLY: u32 = 0xFE;
pub const TAIL_ICMP: u32 = 0xFD;

/// What the balancer tells `xlb_nat` about the packet it hands over (lb-common's
/// `NatScratch`).
#[map]
static NAT_SCRATCH: PerCpuArray<NatScratch> = PerCpuArray::with_max_entries(1, 0);

/// `xlb_nat` at index 0, `xlb_nat_reply` at 1, `xlb_nat_icmp` at 2 (lb-common's `NAT_PROGS`;
/// the loader puts them there).
#[map]
static NAT_PROGS: ProgramArray = ProgramArray::with_max_entries(3, 0);

/// Where the packet's headers are, from the parser's notes and the Ethernet header.
pub struct Headers {
    pub l3: usize,
    pub l4: usize,
    pub v4: bool,
}

#[inline(always)]
fn headers(ctx: &XdpContext, key: &FlowKey) -> Result<Headers, Reason> {
    let w = key.words();
    let eth = ptr_at::<[u8; 14]>(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    let tagged = matches!(
        unsafe { [(*eth)[12], (*eth)[13]] },
        [0x81, 0x00] | [0x88, 0xA8]
    );
    Ok(Headers {
        l3: if tagged { 18 } else { 14 },
        l4: ((w[4] >> FLOW_W4_L4_SHIFT) & 0xFFFF) as usize,
        v4: w[2] == 0 && w[3] as u32 == V4_MAPPED_PREFIX as u32,
    })
}

/// `check` after the 16-bit words of `old` became those of `new` (RFC 1624, eqn. 3).
#[inline(always)]
fn adjust<const N: usize>(check: u16, old: &[u8; N], new: &[u8; N]) -> u16 {
    apply(check, delta(old, new))
}

/// RFC 1624's terms for the 16-bit words of `old` becoming those of `new`: summed over several
/// changes, then applied to a checksum once.
#[inline(always)]
pub fn delta<const N: usize>(old: &[u8; N], new: &[u8; N]) -> u32 {
    let mut s = 0u32;
    let mut i = 0;
    while i + 1 < N {
        s += u32::from(!u16::from_be_bytes([old[i], old[i + 1]]));
        s += u32::from(u16::from_be_bytes([new[i], new[i + 1]]));
        i += 2;
    }
    s
}

/// `check` after the changes whose terms `delta` summed.
#[inline(always)]
pub fn apply(check: u16, delta: u32) -> u16 {
    !fold(u32::from(!check) + delta)
}

/// Replaces the address at `at` of the IP header at `l3` (12 source / 16 destination of IPv4,
/// 8 / 24 of IPv6) with `addr`, with an IPv4 header's checksum. Returns RFC 1624's terms of
/// the address's change (for the checksums whose pseudo-header holds it) and of the IPv4
/// header checksum's own change (0 over IPv6), for a checksum covering the header itself.
#[inline(always)]
pub fn readdress(
    ctx: &XdpContext,
    l3: usize,
    v4: bool,
    at: usize,
    addr: &[u8; 16],
) -> Result<(u32, u32), Reason> {
    if v4 {
        let ip = ptr_at_mut::<[u8; 20]>(ctx, l3)?;
        // SAFETY: bounds checked by ptr_at_mut.
        let ip = unsafe { &mut *ip };
        let new = [addr[12], addr[13], addr[14], addr[15]];
        let old = [ip[at], ip[at + 1], ip[at + 2], ip[at + 3]];
        let d = delta(&old, &new);
        let old_c = [ip[10], ip[11]];
        let new_c = apply(u16::from_be_bytes(old_c), d).to_be_bytes();
        ip[10..12].copy_from_slice(&new_c);
        ip[at..at + 4].copy_from_slice(&new);
        Ok((d, delta(&old_c, &new_c)))
    } else {
        let ip = ptr_at_mut::<[u8; 40]>(ctx, l3)?;
        // SAFETY: bounds checked by ptr_at_mut.
        let ip = unsafe { &mut *ip };
        let mut old = [0u8; 16];
        old.copy_from_slice(&ip[at..at + 16]);
        ip[at..at + 16].copy_from_slice(addr);
        Ok((delta(&old, addr), 0))
    }
}

/// Rewrites one address of the IP header (`at`, as `readdress` takes it) and one port of the TCP/UDP header (`port_at`: 0 source / 2 destination; `port_be` 0
/// keeps it), with the IPv4 header checksum and the L4 checksum.
#[inline(always)]
fn rewrite(
    ctx: &XdpContext,
    h: &Headers,
    proto: u8,
    at: usize,
    addr: &[u8; 16],
    port_at: usize,
    port_be: u16,
) -> Result<(), Reason> {
    let csum_at = h.l4 + if proto == IPPROTO_TCP { 16 } else { 6 };
    let c = ptr_at_mut::<[u8; 2]>(ctx, csum_at)?;
    // SAFETY: bounds checked by ptr_at_mut.
    let old_l4 = u16::from_be_bytes(unsafe { *c });
    // A zero UDP checksum over IPv4 means "none": it stays none.
    let l4_on = !(proto == IPPROTO_UDP && h.v4 && old_l4 == 0);
    let (d, _) = readdress(ctx, h.l3, h.v4, at, addr)?;
    let mut l4 = apply(old_l4, d);
    let p = ptr_at_mut::<[u8; 4]>(ctx, h.l4)?;
    // SAFETY: bounds checked by ptr_at_mut.
    let p = unsafe { &mut *p };
    if port_be != 0 {
        let new = port_be.to_ne_bytes();
        let old = [p[port_at], p[port_at + 1]];
        l4 = adjust(l4, &old, &new);
        p[port_at..port_at + 2].copy_from_slice(&new);
    }
    if l4_on {
        // A computed UDP checksum of zero is sent as all ones (zero says "none").
        if proto == IPPROTO_UDP && l4 == 0 {
            l4 = 0xFFFF;
        }
        let c = ptr_at_mut::<[u8; 2]>(ctx, csum_at)?;
        // SAFETY: bounds checked by ptr_at_mut.
        unsafe { *c = l4.to_be_bytes() };
    }
    Ok(())
}

/// The forward rewrite to a NAT real: destination address and port become the real's, and the
/// frame goes to its next hop (`mac`), out of the interface the route to it leaves by.
#[inline(always)]
pub fn dnat(ctx: &XdpContext, key: &FlowKey, real: &Real) -> Result<Noted, Reason> {
    let h = headers(ctx, key)?;
    let dst_at = if h.v4 { 16 } else { 24 };
    rewrite(ctx, &h, key.proto, dst_at, &real.addr, 2, real.port_be)?;
    to_real(ctx, h.l3, real)
}

/// A rewritten packet (or ICMP error) out to NAT real `real`'s next hop, by the interface the
/// route to it leaves by; `l3`: where its IP header starts.
#[inline(always)]
pub fn to_real(ctx: &XdpContext, l3: usize, real: &Real) -> Result<Noted, Reason> {
    let eth = ptr_at_mut::<[u8; 12]>(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at_mut.
    let eth = unsafe { &mut *eth };
    if real.flags & REAL_F_NEXT_HOP_PASS != 0 {
        // Rewritten, and left to the host to route (its neighbour is being resolved).
        stats::count(counter::PASS_NEXT_HOP);
        return Ok(Noted::new(xdp_action::XDP_PASS, counter::PASS_NEXT_HOP));
    }
    let port = real.egress;
    // SAFETY: reads a field of the context.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    if port == 0 || port == ingress {
        // Back out of the interface it came in by, from the address it was sent to.
        let (dst, src) = eth.split_at_mut(6);
        src.copy_from_slice(dst);
        dst.copy_from_slice(&real.mac);
        return Ok(Noted::action(xdp_action::XDP_TX));
    }
    // SAFETY: a lookup whose value is copied out at once.
    let out = unsafe { EGRESS.get(port) }.ok_or(counter::DROP_TX_PORT)?;
    if l3 != 14 {
        // A VLAN tag belongs to the ingress segment: another interface gets no frame of it.
        return Err(counter::DROP_TX_PORT);
    }
    eth[..6].copy_from_slice(&real.mac);
    eth[6..12].copy_from_slice(&out.mac);
    TX_PORTS
        .redirect(port, 0)
        .map(Noted::action)
        .map_err(|_| counter::DROP_TX_PORT)
}

/// The `REVNAT` entry of a packet's source, if it comes from a NAT real: its exact (address,
/// port, protocol), else the real's every-port service. Costs one lookup of the address for
/// everything else while NAT is configured, a load and a branch while it is not.
#[inline(always)]
fn reverse_of(key: &FlowKey) -> Option<RevNat> {
    if !from_nat_real(key) {
        return None;
    }
    let w = key.words();
    revnat([w[0], w[1]], key.src_port_be, (w[4] >> 32) & 0xFF)
}

/// The `REVNAT` entry of a NAT real's address (as the flow key's two words hold it), port and
/// protocol: its exact (address, port), else the real's every-port service.
#[inline(always)]
pub fn revnat(addr: [u64; 2], port_be: u16, proto: u64) -> Option<RevNat> {
    let by =
        |port_be: u16| VipKey::for_flow(&[0, 0, addr[0], addr[1], (proto & 0xFF) << 32], port_be);
    // SAFETY: lookups whose value is copied out at once.
    if let Some(v) = unsafe { REVNAT.get(by(port_be)) } {
        return Some(*v);
    }
    // SAFETY: as above.
    unsafe { REVNAT.get(by(0)) }.copied()
}

/// Whether any NAT real is configured: a load and a branch.
#[inline(always)]
pub fn configured() -> bool {
    CONF.get(0).is_some_and(|c| c.revnat != 0)
}

/// Whether the packet comes from a NAT real's address (a fragment of it is dropped: it has no
/// ports to go by). A load and a branch while no NAT real exists, one lookup otherwise.
#[inline(always)]
pub fn from_nat_real(key: &FlowKey) -> bool {
    if !configured() {
        return false;
    }
    let w = key.words();
    if !crate::forward::filter_has(&NAT_FILTER, w[0], w[1]) {
        return false;
    }
    let k = VipKey::for_flow(&[0, 0, w[0], w[1], 0], 0);
    // SAFETY: presence check only.
    unsafe { REVNAT.get(k) }.is_some()
}

/// A packet to no VIP: whether it is a NAT real's reply, to be rewritten by `xlb_nat` (its
/// VIP noted for it).
#[inline(always)]
pub fn pend_reply(key: &FlowKey) -> bool {
    let Some(rv) = reverse_of(key) else {
        return false;
    };
    let Some(s) = NAT_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's value; XDP runs with preemption disabled, and the tail call that
    // reads it follows at once.
    unsafe {
        (*s).reply = NAT_REPLY;
        (*s).rv = rv;
    }
    true
}

/// A packet to a NAT real: noted for `xlb_nat`, which rewrites it.
#[inline(always)]
pub fn pend_forward(real_id: u32) -> Result<(), Reason> {
    let s = NAT_SCRATCH.get_ptr_mut(0).ok_or(counter::DROP_NAT_TAIL)?;
    // SAFETY: as in `pend_reply`.
    unsafe {
        (*s).reply = NAT_TO_REAL;
        (*s).real_id = real_id;
    }
    Ok(())
}

/// An ICMP error to no VIP while NAT reals exist: noted for `xlb_nat_icmp`, which looks at
/// what it quotes.
#[inline(always)]
pub fn pend_icmp() -> Result<(), Reason> {
    let s = NAT_SCRATCH.get_ptr_mut(0).ok_or(counter::DROP_NAT_TAIL)?;
    // SAFETY: as in `pend_reply`.
    unsafe { (*s).reply = NAT_ICMP_TO_CLIENT };
    Ok(())
}

/// What the balancer noted for the program it tail-called.
#[inline(always)]
pub fn scratch() -> Result<&'static NatScratch, Reason> {
    NAT_SCRATCH.get(0).ok_or(counter::DROP_NAT_TAIL)
}

/// Hands the packet to `xlb_nat` (`TAIL`), `xlb_nat_reply` (`TAIL_REPLY`) or `xlb_nat_icmp`
/// (`TAIL_ICMP`): tail calls, so that the rewrites are verified apart from the rest of the
/// balancer, whose paths they would multiply, and apart from each other. Returns only when
/// that fails.
#[inline(always)]
pub fn tail_call(ctx: &XdpContext, which: u32) -> Reason {
    let index = match which {
        TAIL_REPLY => 1,
        TAIL_ICMP => 2,
        _ => 0,
    };
    // SAFETY: a tail call into a program of the same type; on success it does not return.
    unsafe { NAT_PROGS.tail_call(ctx, index) };
    counter::DROP_NAT_TAIL
}

/// The packet again, as the balancer parsed it (a TCP or UDP packet).
#[inline(always)]
fn flow(ctx: &XdpContext) -> Result<FlowKey, Reason> {
    match crate::parse::parse(ctx)? {
        Parsed::Flow(key) => Ok(key),
        _ => Err(counter::DROP_NAT_TAIL),
    }
}

/// `xlb_nat`: the packet noted by `pend_forward`, rewritten and sent to its real (an ICMP
/// error about its flow goes on to `xlb_nat_icmp`).
#[inline(always)]
pub fn run_forward(ctx: &XdpContext) -> Result<u32, Reason> {
    let key = match crate::parse::parse(ctx)? {
        Parsed::Flow(key) => key,
        Parsed::Icmp { .. } => return Err(tail_call(ctx, TAIL_ICMP)),
        Parsed::Fragment(_) => return Err(counter::DROP_NAT_TAIL),
    };
    let s = scratch()?;
    if s.reply != NAT_TO_REAL {
        return Err(counter::DROP_NAT_TAIL);
    }
    let real = REALS.get(s.real_id).ok_or(counter::DROP_NO_REAL)?;
    dnat(ctx, &key, real).map(|n| n.get())
}

/// `xlb_nat_reply`: the reply noted by `pend_reply`, rewritten to its VIP and sent on.
#[inline(always)]
pub fn run_reply(ctx: &XdpContext) -> Result<u32, Reason> {
    let key = flow(ctx)?;
    let s = scratch()?;
    if s.reply != NAT_REPLY {
        return Err(counter::DROP_NAT_TAIL);
    }
    let rv = s.rv;
    reply(ctx, &key, &rv)
}

/// A NAT real's reply, rewritten to its VIP `rv` and sent on to the client. Its route is
/// looked up first: a packet to one of the balancer's own addresses (its health checks'
/// answers) is the host's and stays as it is.
#[inline(always)]
fn reply(ctx: &XdpContext, key: &FlowKey, rv: &RevNat) -> Result<u32, Reason> {
    let h = headers(ctx, key)?;
    let sport = if rv.vip_port_be != 0 {
        rv.vip_port_be
    } else {
        key.src_port_be
    };
    let route = lookup(ctx, &h, key.proto, [sport, key.dst_port_be], &rv.vip_addr);
    if route == Route::Local {
        return Ok(xdp_action::XDP_PASS);
    }
    let src_at = if h.v4 { 12 } else { 8 };
    rewrite(ctx, &h, key.proto, src_at, &rv.vip_addr, 0, rv.vip_port_be)?;
    let w = key.words();
    if key.proto == IPPROTO_TCP && w[4] & FLOW_W4_FIN != 0 {
        closing(key, rv);
    }
    let sent = match route {
        Route::Via(p) => send(ctx, &h, p),
        _ => None,
    };
    Ok(match sent {
        Some(action) => {
            stats::count(counter::NAT_REPLY);
            action
        }
        None => {
            stats::count(counter::PASS_NAT_REPLY);
            xdp_action::XDP_PASS
        }
    })
}

/// The real closes: the flow (found by the client's tuple) becomes closing, as when the client
/// closes, so it counts as inactive and idles out soon.
#[inline(always)]
fn closing(key: &FlowKey, rv: &RevNat) {
    let w = key.words();
    // SAFETY: the VIP address as the two words the flow key holds it in.
    let a = unsafe { *(rv.vip_addr.as_ptr() as *const [u64; 2]) };
    let vip_port = if rv.vip_port_be != 0 {
        u64::from(rv.vip_port_be)
    } else {
        w[4] & 0xFFFF
    };
    // The client's packets: from its address and port to the VIP's.
    let client = FlowKey::from_words([
        w[2],
        w[3],
        a[0],
        a[1],
        ((w[4] >> 16) & 0xFFFF) | vip_port << 16 | (w[4] & FLOW_W4_TUPLE & !0xFFFF_FFFF),
    ]);
    let hash = flow_hash64(&client, global(&HASH_SEED));
    let (index, fp) = ct::place(hash, global(&CT_BUCKETS));
    let Some(bucket) = CONNTRACK.get_ptr_mut(index) else {
        return;
    };
    // SAFETY: a map value, valid for this program run; ways are read and written whole.
    let ways = unsafe { &mut *bucket };
    let mut i = 0;
    while i < ct::CT_WAYS {
        // SAFETY: as above.
        let way = unsafe { core::ptr::read_volatile(&ways[i]) };
        if way & ct::FP_MASK == fp && ct::real_of(way) == rv.real_id {
            if way & ct::F_CLOSING == 0 {
                // SAFETY: one aligned 8-byte store.
                unsafe { core::ptr::write_volatile(&mut ways[i], way | ct::F_CLOSING) };
            }
            return;
        }
        i += 1;
    }
}

/// Where a reply goes, by the kernel's routes and neighbours (a FIB lookup).
#[derive(PartialEq, Eq)]
pub enum Route {
    /// To the balancer itself (or nowhere it would forward to): not a reply to rewrite.
    Local,
    /// To the next hop in these FIB results.
    Via(&'static [u8; FIB_LEN]),
    /// For the host to route: no neighbour entry yet, IP forwarding off, a TTL about to
    /// expire, a tagged frame leaving by another interface.
    Host,
}

/// The reply's route as it will leave: from `src` (the VIP) to its destination, of `proto`
/// between `ports` (network order).
#[inline(always)]
pub fn lookup(ctx: &XdpContext, h: &Headers, proto: u8, ports: [u16; 2], src: &[u8; 16]) -> Route {
    let Some(p) = NAT_FIB.get_ptr_mut(0) else {
        return Route::Host;
    };
    // SAFETY: this CPU's value; XDP runs with preemption disabled.
    let p = unsafe { &mut *p };
    p.fill(0);
    // SAFETY: reads a field of the context.
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    p[0] = if h.v4 { AF_INET } else { AF_INET6 };
    p[1] = proto;
    p[FIB_IFINDEX..FIB_IFINDEX + 4].copy_from_slice(&ifindex.to_ne_bytes());
    p[FIB_SPORT..FIB_SPORT + 2].copy_from_slice(&ports[0].to_ne_bytes());
    p[FIB_SPORT + 2..FIB_SPORT + 4].copy_from_slice(&ports[1].to_ne_bytes());
    let ttl = if h.v4 {
        let Ok(ip) = ptr_at::<[u8; 20]>(ctx, h.l3) else {
            return Route::Host;
        };
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &*ip };
        p[FIB_TOT_LEN..FIB_TOT_LEN + 2]
            .copy_from_slice(&u16::from_be_bytes([ip[2], ip[3]]).to_ne_bytes());
        p[FIB_TOS] = ip[1];
        p[FIB_SRC..FIB_SRC + 4].copy_from_slice(&src[12..16]);
        p[FIB_DST..FIB_DST + 4].copy_from_slice(&ip[16..20]);
        ip[8]
    } else {
        let Ok(ip) = ptr_at::<[u8; 40]>(ctx, h.l3) else {
            return Route::Host;
        };
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &*ip };
        p[FIB_TOS..FIB_TOS + 4].copy_from_slice(&ip[0..4]);
        p[FIB_TOS] &= 0x0F;
        p[FIB_SRC..FIB_SRC + 16].copy_from_slice(src);
        p[FIB_DST..FIB_DST + 16].copy_from_slice(&ip[24..40]);
        ip[7]
    };
    // SAFETY: the helper reads and writes the 64 bytes of this map value.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut _,
            p.as_mut_ptr() as *mut _,
            FIB_LEN as i32,
            0,
        )
    };
    match rc {
        0 if ttl > 1 => {
            let out = u32::from_ne_bytes([
                p[FIB_IFINDEX],
                p[FIB_IFINDEX + 1],
                p[FIB_IFINDEX + 2],
                p[FIB_IFINDEX + 3],
            ]);
            // Another interface gets the frame untagged: a tagged one is the host's.
            if out != ifindex && h.l3 != 14 {
                return Route::Host;
            }
            // SAFETY: a per-CPU map value lives as long as the map (the program's).
            Route::Via(unsafe { &*(p as *const [u8; FIB_LEN]) })
        }
        RET_NOT_FWDED => Route::Local,
        _ => Route::Host,
    }
}

/// The rewritten reply out to the next hop in `p`: TTL (hop limit) one less, MACs,
/// `XDP_TX` back out of the interface it came in by or `XDP_REDIRECT` to another. (The
/// interface is read from `p` again rather than carried from `lookup`: a value carried across
/// the rewrite doubled the states the verifier explores, past its budget.)
#[inline(always)]
pub fn send(ctx: &XdpContext, h: &Headers, p: &[u8; FIB_LEN]) -> Option<u32> {
    // SAFETY: reads a field of the context.
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    let out = u32::from_ne_bytes([
        p[FIB_IFINDEX],
        p[FIB_IFINDEX + 1],
        p[FIB_IFINDEX + 2],
        p[FIB_IFINDEX + 3],
    ]);
    if h.v4 {
        let ip = ptr_at_mut::<[u8; 20]>(ctx, h.l3).ok()?;
        // SAFETY: bounds checked by ptr_at_mut.
        let ip = unsafe { &mut *ip };
        let old = [ip[8], ip[9]];
        ip[8] -= 1;
        let hc = adjust(u16::from_be_bytes([ip[10], ip[11]]), &old, &[ip[8], ip[9]]);
        ip[10..12].copy_from_slice(&hc.to_be_bytes());
    } else {
        let t = ptr_at_mut::<u8>(ctx, h.l3 + 7).ok()?;
        // SAFETY: bounds checked by ptr_at_mut.
        unsafe { *t -= 1 };
    }
    let eth = ptr_at_mut::<[u8; 12]>(ctx, 0).ok()?;
    // SAFETY: bounds checked by ptr_at_mut.
    let eth = unsafe { &mut *eth };
    eth[..6].copy_from_slice(&p[FIB_DMAC..FIB_DMAC + 6]);
    eth[6..12].copy_from_slice(&p[FIB_SMAC..FIB_SMAC + 6]);
    if out == ifindex {
        return Some(xdp_action::XDP_TX);
    }
    // SAFETY: a helper taking plain integers.
    Some(unsafe { bpf_redirect(out, 0) } as u32)
}
