//! Tunnel mode's outer headers (`TUNNEL[0]`) from `xlb daemon`'s flags and the interface: the
//! source address of each family (given, a prefix whose host bits carry the flow hash, or the
//! interface's primary address), the encapsulation, the GUE port and the MTU.

use std::net::IpAddr;

use anyhow::{bail, Result};
use lb_common::{TunnelConf, ENCAP_GUE, ENCAP_IPIP};

use super::DaemonArgs;
use crate::{dataplane::neigh::KernelNeighbours, model::Encap};

/// `ADDR/LEN` of `--tunnel-source-prefix`: at most 16 host bits, all in the address's last
/// four bytes (the flow hash has 16 bits to give).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourcePrefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl std::str::FromStr for SourcePrefix {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: expected ADDR/LEN, such as 10.9.0.0/24"))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?}: {addr:?} is no IP address"))?;
        let len: u8 = len
            .parse()
            .map_err(|_| format!("{s:?}: {len:?} is no prefix length"))?;
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        if len > bits || bits - len > 16 || len == bits {
            return Err(format!(
                "{s:?}: the prefix must leave 1 to 16 host bits for the flow hash (a /{} to \
                 /{} for {})",
                bits - 16,
                bits - 1,
                if addr.is_ipv4() { "IPv4" } else { "IPv6" }
            ));
        }
        Ok(SourcePrefix { addr, len })
    }
}

impl SourcePrefix {
    /// The host bits' mask over the last four bytes, as the kernel loads them (native order).
    fn mask(&self) -> u32 {
        let bits = if self.addr.is_ipv4() { 32 } else { 128 };
        let host = u32::from(bits - self.len);
        u32::from_ne_bytes(
            ((1u64 << host) - 1).to_be_bytes()[4..8]
                .try_into()
                .unwrap_or([0; 4]),
        )
    }
}

/// The `TUNNEL[0]` a daemon with these flags writes; the interface supplies the defaults.
pub fn conf(args: &DaemonArgs, neigh: &KernelNeighbours) -> Result<TunnelConf> {
    let mut conf = TunnelConf {
        gue_port_be: args.gue_port.to_be(),
        encap: match args.encap {
            Encap::Ipip => ENCAP_IPIP,
            Encap::Gue => ENCAP_GUE,
        },
        ..TunnelConf::default()
    };
    let mtu = match args.tunnel_mtu {
        Some(m) => u32::from(m),
        None => neigh.mtu().unwrap_or_else(|e| {
            log::warn!(
                "reading the MTU of {}: {e}; tunnel mode assumes 1500 (--tunnel-mtu sets it)",
                args.primary()
            );
            1500
        }),
    };
    conf.mtu = u16::try_from(mtu).unwrap_or(u16::MAX);
    let own = neigh.addresses().unwrap_or_else(|e| {
        log::warn!("reading the addresses of {}: {e}", args.primary());
        Vec::new()
    });
    for v6 in [false, true] {
        let family = if v6 { "IPv6" } else { "IPv4" };
        let given: Vec<&IpAddr> = args
            .tunnel_source
            .iter()
            .filter(|a| a.is_ipv6() == v6)
            .collect();
        let prefixes: Vec<&SourcePrefix> = args
            .tunnel_source_prefix
            .iter()
            .filter(|p| p.addr.is_ipv6() == v6)
            .collect();
        if given.len() + prefixes.len() > 1 {
            bail!("--tunnel-source / --tunnel-source-prefix: more than one {family} source");
        }
        let (addr, mask) = match (given.first(), prefixes.first()) {
            (Some(a), _) => (Some(**a), 0),
            (None, Some(p)) => (Some(p.addr), p.mask()),
            (None, None) => (own.iter().find(|a| a.is_ipv6() == v6).copied(), 0),
        };
        match addr {
            Some(IpAddr::V4(a)) => {
                conf.src4 = a.octets();
                conf.src4_hash_mask = mask;
            }
            Some(IpAddr::V6(a)) => {
                conf.src6 = a.octets();
                conf.src6_hash_mask = mask;
            }
            None => log::info!(
                "no {family} tunnel source ({} has no {family} address): packets to {family} \
                 tunnel reals are dropped (drop_no_tunnel_source)",
                args.primary()
            ),
        }
    }
    let show = |a: Option<IpAddr>| a.map_or_else(|| "none".to_string(), |a| a.to_string());
    log::info!(
        "tunnel mode: {}{}, sources {} / {}, MTU {}",
        args.encap,
        if args.encap == Encap::Gue {
            format!(" port {}", args.gue_port)
        } else {
            String::new()
        },
        show((conf.src4 != [0; 4]).then(|| IpAddr::from(conf.src4))),
        show((conf.src6 != [0; 16]).then(|| IpAddr::from(conf.src6))),
        conf.mtu
    );
    Ok(conf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_prefixes_leave_host_bits_for_the_hash() {
        let p: SourcePrefix = "10.9.0.0/24".parse().unwrap();
        assert_eq!(p.mask().to_ne_bytes(), [0, 0, 0, 0xff]);
        let p: SourcePrefix = "2001:db8::/112".parse().unwrap();
        assert_eq!(p.mask().to_ne_bytes(), [0, 0, 0xff, 0xff]);
        for bad in [
            "10.9.0.0/8",
            "10.9.0.1/32",
            "10.9.0.0",
            "2001:db8::/64",
            "x/24",
        ] {
            assert!(bad.parse::<SourcePrefix>().is_err(), "{bad}");
        }
    }
}
