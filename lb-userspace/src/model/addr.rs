//! Addresses: the form the maps hold them in, and the checks every entry point shares.

use std::net::{IpAddr, Ipv4Addr};

use lb_common::v4_mapped;

use super::{Mode, RealAddr, VipSpec};

/// An address as the maps hold it: 16 bytes, IPv4 as v4-mapped IPv6 (`::ffff:a.b.c.d`).
pub fn map_addr(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(a) => v4_mapped(a.octets()),
        IpAddr::V6(a) => a.octets(),
    }
}

/// The address of 16 bytes as the maps hold it (`map_addr`'s inverse).
pub fn unmap_addr(b: [u8; 16]) -> IpAddr {
    let a = std::net::Ipv6Addr::from(b);
    a.to_ipv4_mapped().map_or(IpAddr::V6(a), IpAddr::V4)
}

/// Why no packet can be balanced to or from `addr`, if so.
pub fn addr_problem(addr: IpAddr) -> Option<&'static str> {
    if let IpAddr::V6(a) = addr {
        // The maps hold IPv4 in this very form: an IPv6 VIP or real there would be confused
        // with the IPv4 one, and no IPv6 packet carries such an address anyway.
        if a.to_ipv4_mapped().is_some() {
            return Some("an IPv4-mapped IPv6 address (::ffff:0:0/96): write it as IPv4");
        }
    }
    if addr.is_unspecified() {
        Some("unspecified")
    } else if addr.is_multicast() {
        Some("multicast")
    } else if addr.is_loopback() {
        Some("loopback")
    } else if addr == IpAddr::V4(Ipv4Addr::BROADCAST) {
        Some("broadcast")
    } else {
        None
    }
}

/// `IPv4` or `IPv6`, for messages.
pub fn family(addr: IpAddr) -> &'static str {
    if addr.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

/// The checks of a real against its VIP that need nothing else (the config file and the
/// command line check them before asking the balancer, so that errors name the line or the
/// argument). `mode` is the real's effective mode where known: direct routing needs the VIP's
/// family and only NAT takes a port; with `None` (the daemon's default decides) the balancer
/// checks those.
pub fn check_real(vip: &VipSpec, real: RealAddr, mode: Option<Mode>) -> Result<(), String> {
    let addr = real.ip;
    if let Some(reason) = addr_problem(addr) {
        return Err(format!("address {addr} is {reason}"));
    }
    if mode == Some(Mode::Dr) && vip.addr.is_ipv4() != addr.is_ipv4() {
        return Err(format!(
            "real {addr} is {} but VIP {vip} is {}: different address families (direct \
             routing forwards the packet unchanged; tunnel mode carries either family)",
            family(addr),
            family(vip.addr)
        ));
    }
    if mode == Some(Mode::Nat) && vip.addr.is_ipv4() != addr.is_ipv4() {
        return Err(format!(
            "real {addr} is {} but VIP {vip} is {}: NAT rewrites the destination within one \
             address family",
            family(addr),
            family(vip.addr)
        ));
    }
    if real.port != 0 {
        if let Some(m @ (Mode::Dr | Mode::Tunnel)) = mode {
            return Err(format!(
                "real {real} has a port, which only NAT mode can map to ({m} keeps the VIP's \
                 port): give it --mode nat, or leave the port out"
            ));
        }
        if vip.port == 0 {
            return Err(format!(
                "real {real} has a port, but VIP {vip} serves every port: its packets keep \
                 their own port (leave the port out)"
            ));
        }
    }
    Ok(())
}
