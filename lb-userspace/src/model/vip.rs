//! VIPs: the protocol, the `proto/addr:port` spec and its parsing, the per-VIP flags, weights.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use lb_common::{
    VipKey, IPPROTO_TCP, IPPROTO_UDP, VIP_ADDR_PORT0_TCP, VIP_ADDR_PORT0_UDP, VIP_F_ALL,
    VIP_F_NO_CONNTRACK, VIP_F_NO_SRC_PORT,
};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::map_addr;

/// Largest weight of one real (ipvsadm's range). Keeps a VIP's total weight within `u32` for
/// Maglev's cumulative weights.
pub const MAX_WEIGHT: u32 = 65_535;

// ---- protocol and VIP spec ------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// The IP protocol number, as in `VipKey::proto`.
    pub const fn ip_proto(self) -> u8 {
        match self {
            Proto::Tcp => IPPROTO_TCP,
            Proto::Udp => IPPROTO_UDP,
        }
    }

    /// The protocol of an IP protocol number, if xlb balances it.
    pub const fn from_ip_proto(proto: u8) -> Option<Proto> {
        match proto {
            IPPROTO_TCP => Some(Proto::Tcp),
            IPPROTO_UDP => Some(Proto::Udp),
            _ => None,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }

    /// The `VipAddrValue::port0` bit of this protocol.
    pub const fn port0_bit(self) -> u32 {
        match self {
            Proto::Tcp => VIP_ADDR_PORT0_TCP,
            Proto::Udp => VIP_ADDR_PORT0_UDP,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Proto {
    type Err = VipParseReason;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("tcp") {
            Ok(Proto::Tcp)
        } else if s.eq_ignore_ascii_case("udp") {
            Ok(Proto::Udp)
        } else {
            Err(VipParseReason::BadProto(s.to_string()))
        }
    }
}

/// A virtual service: `tcp/10.0.0.100:80`, `udp/[2001:db8::100]:53`. Port 0 means every port of
/// the address for that protocol.
///
/// Ordered by address, then port, then protocol (the order `xlb list` shows and the order new
/// VIPs get their ids in).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VipSpec {
    pub proto: Proto,
    pub addr: IpAddr,
    pub port: u16,
}

impl VipSpec {
    pub fn new(proto: Proto, addr: IpAddr, port: u16) -> Self {
        VipSpec { proto, addr, port }
    }

    /// The `VIPS` key of this VIP.
    pub fn key(&self) -> VipKey {
        VipKey {
            addr: map_addr(self.addr),
            // The map holds the port as the two bytes of the packet.
            port_be: self.port.to_be(),
            proto: self.proto.ip_proto(),
            _pad: 0,
        }
    }
}

impl PartialOrd for VipSpec {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for VipSpec {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.addr, self.port, self.proto).cmp(&(other.addr, other.port, other.proto))
    }
}

impl fmt::Display for VipSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{}/{}:{}", self.proto, a, self.port),
            IpAddr::V6(a) => write!(f, "{}/[{}]:{}", self.proto, a, self.port),
        }
    }
}

/// Why a VIP string does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VipParseReason {
    #[error("missing protocol (expected tcp/ADDR:PORT or udp/ADDR:PORT)")]
    MissingProto,
    #[error("unknown protocol {0:?} (expected tcp or udp)")]
    BadProto(String),
    #[error("missing port (add :PORT, or :0 for every port)")]
    MissingPort,
    #[error("bad port {0:?} (expected 0 to 65535)")]
    BadPort(String),
    #[error("bad IPv4 address")]
    BadIpv4,
    #[error("bad IPv6 address")]
    BadIpv6,
    #[error("an IPv6 address needs brackets, as in tcp/[2001:db8::1]:443")]
    Ipv6NeedsBrackets,
    /// `::ffff:a.b.c.d` is how IPv4 looks inside IPv6; no IPv6 packet may carry it, and the
    /// maps keep IPv4 VIPs in that very form, so it can only mean the IPv4 VIP.
    #[error(
        "{0} is an IPv4-mapped IPv6 address, which no IPv6 packet carries: write the IPv4 VIP \
         as {1}"
    )]
    V4Mapped(Ipv6Addr, String),
}

/// `invalid VIP "tcp/10.0.0.300:80": bad IPv4 address`
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid VIP {input:?}: {reason}")]
pub struct ParseVipError {
    pub input: String,
    pub reason: VipParseReason,
}

impl FromStr for VipSpec {
    type Err = ParseVipError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        parse_vip(input).map_err(|reason| ParseVipError {
            input: input.to_string(),
            reason,
        })
    }
}

fn parse_vip(input: &str) -> Result<VipSpec, VipParseReason> {
    let (proto, rest) = input.split_once('/').ok_or(VipParseReason::MissingProto)?;
    let proto: Proto = proto.parse()?;
    let (addr, port) = if let Some(bracketed) = rest.strip_prefix('[') {
        let (host, tail) = bracketed.split_once(']').ok_or(VipParseReason::BadIpv6)?;
        let addr: Ipv6Addr = host.parse().map_err(|_| VipParseReason::BadIpv6)?;
        if let Some(v4) = addr.to_ipv4_mapped() {
            let port = tail.strip_prefix(':').unwrap_or("PORT");
            return Err(VipParseReason::V4Mapped(
                addr,
                format!("{proto}/{v4}:{port}"),
            ));
        }
        let port = match tail.strip_prefix(':') {
            Some(port) => port,
            None if tail.is_empty() => return Err(VipParseReason::MissingPort),
            None => return Err(VipParseReason::BadPort(tail.to_string())),
        };
        (IpAddr::V6(addr), port)
    } else {
        // An unbracketed IPv6 address would be ambiguous with the port separator.
        let (host, port) = match rest.matches(':').count() {
            0 => return Err(VipParseReason::MissingPort),
            1 => rest.split_once(':').ok_or(VipParseReason::MissingPort)?,
            _ => return Err(VipParseReason::Ipv6NeedsBrackets),
        };
        let addr: Ipv4Addr = host.parse().map_err(|_| VipParseReason::BadIpv4)?;
        (IpAddr::V4(addr), port)
    };
    if port.is_empty() {
        return Err(VipParseReason::MissingPort);
    }
    // u16::from_str accepts a leading '+', which is no port syntax anyone writes.
    if !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(VipParseReason::BadPort(port.to_string()));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| VipParseReason::BadPort(port.to_string()))?;
    Ok(VipSpec::new(proto, addr, port))
}

// ---- flags --------------------------------------------------------------------------------

/// Per-VIP options, stored as `VipMeta::flags` (`lb_common::VIP_F_*`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipFlags {
    /// Hash without the source port: all connections of a client go to one real.
    pub no_src_port: bool,
    /// Do not track connections (a ring change then moves established flows).
    pub no_conntrack: bool,
}

impl VipFlags {
    pub const NO_SRC_PORT: &'static str = "no-src-port";
    pub const NO_CONNTRACK: &'static str = "no-conntrack";

    pub fn bits(self) -> u32 {
        let mut bits = 0;
        if self.no_src_port {
            bits |= VIP_F_NO_SRC_PORT;
        }
        if self.no_conntrack {
            bits |= VIP_F_NO_CONNTRACK;
        }
        bits
    }

    /// Flags from `VipMeta::flags`; unknown bits are refused rather than dropped, so a map
    /// written by a newer layout is not silently rewritten without them.
    pub fn from_bits(bits: u32) -> Result<Self, FlagsError> {
        if bits & !VIP_F_ALL != 0 {
            return Err(FlagsError {
                given: format!("{bits:#x}"),
                reason: "unknown flag bits",
            });
        }
        Ok(VipFlags {
            no_src_port: bits & VIP_F_NO_SRC_PORT != 0,
            no_conntrack: bits & VIP_F_NO_CONNTRACK != 0,
        })
    }

    /// Flags from their names, as in the config file (`["no-src-port", "no-conntrack"]`).
    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Self, FlagsError> {
        let mut flags = VipFlags::default();
        for name in names {
            match name {
                Self::NO_SRC_PORT => flags.no_src_port = true,
                Self::NO_CONNTRACK => flags.no_conntrack = true,
                other => {
                    return Err(FlagsError {
                        given: other.to_string(),
                        reason: "unknown flag (expected no-src-port or no-conntrack)",
                    })
                }
            }
        }
        Ok(flags)
    }

    pub fn names(self) -> Vec<&'static str> {
        let mut names = Vec::new();
        if self.no_src_port {
            names.push(Self::NO_SRC_PORT);
        }
        if self.no_conntrack {
            names.push(Self::NO_CONNTRACK);
        }
        names
    }
}

impl fmt::Display for VipFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = self.names();
        if names.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&names.join(","))
        }
    }
}

// The state file and the API write VIPs and flags as their text forms.
impl Serialize for VipSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for VipSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for VipFlags {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.names())
    }
}

impl<'de> Deserialize<'de> for VipFlags {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let names = Vec::<String>::deserialize(d)?;
        VipFlags::from_names(names.iter().map(String::as_str)).map_err(serde::de::Error::custom)
    }
}

/// A flag name or bit pattern that is not one of ours.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("flags {given:?}: {reason}")]
pub struct FlagsError {
    pub given: String,
    pub reason: &'static str,
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    fn vip(s: &str) -> VipSpec {
        s.parse().expect("test VIP parses")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address parses")
    }

    #[test]
    fn vip_spec_round_trips() {
        for s in [
            "tcp/10.0.0.100:80",
            "udp/[2001:db8::100]:53",
            "tcp/10.0.0.100:0",
            "udp/192.0.2.1:65535",
        ] {
            assert_eq!(vip(s).to_string(), s);
        }
        let spec = vip("udp/[2001:db8::100]:53");
        assert_eq!(spec.proto, Proto::Udp);
        assert_eq!(spec.addr, ip("2001:db8::100"));
        assert_eq!(spec.port, 53);
        // A v4-mapped address is refused, naming the IPv4 VIP it stands for.
        let err = "tcp/[::ffff:10.50.0.100]:80"
            .parse::<VipSpec>()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid VIP \"tcp/[::ffff:10.50.0.100]:80\": ::ffff:10.50.0.100 is an IPv4-mapped \
             IPv6 address, which no IPv6 packet carries: write the IPv4 VIP as tcp/10.50.0.100:80"
        );
        assert_eq!(vip("TCP/10.0.0.1:1").proto, Proto::Tcp);
    }

    #[test]
    fn vip_spec_parse_errors_name_input_and_reason() {
        let err = "tcp/10.0.0.300:80".parse::<VipSpec>().unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"invalid VIP "tcp/10.0.0.300:80": bad IPv4 address"#
        );
        let cases = [
            ("sctp/10.0.0.1:80", VipParseReason::BadProto("sctp".into())),
            ("10.0.0.1:80", VipParseReason::MissingProto),
            ("tcp/10.0.0.1", VipParseReason::MissingPort),
            ("tcp/10.0.0.1:", VipParseReason::MissingPort),
            ("tcp/[2001:db8::1]", VipParseReason::MissingPort),
            ("tcp/2001:db8::1:80", VipParseReason::Ipv6NeedsBrackets),
            ("tcp/[2001:db8::x]:80", VipParseReason::BadIpv6),
            (
                "tcp/10.0.0.1:65536",
                VipParseReason::BadPort("65536".into()),
            ),
            ("tcp/10.0.0.1:+80", VipParseReason::BadPort("+80".into())),
            (
                "tcp/[2001:db8::1]x80",
                VipParseReason::BadPort("x80".into()),
            ),
        ];
        for (input, reason) in cases {
            let err = input.parse::<VipSpec>().unwrap_err();
            assert_eq!(err.reason, reason, "{input}");
            assert_eq!(err.input, input);
            assert!(err.to_string().contains(input), "{err}");
        }
    }

    #[test]
    fn vip_flags_map_to_bits_and_names() {
        let both = VipFlags {
            no_src_port: true,
            no_conntrack: true,
        };
        assert_eq!(both.bits(), VIP_F_ALL);
        for bits in 0..=VIP_F_ALL {
            assert_eq!(VipFlags::from_bits(bits).expect("known bits").bits(), bits);
        }
        assert_eq!(
            VipFlags::from_bits(1 << 7).unwrap_err().to_string(),
            r#"flags "0x80": unknown flag bits"#
        );
        assert_eq!(
            VipFlags::from_names(["no-src-port"]).expect("known name"),
            VipFlags {
                no_src_port: true,
                no_conntrack: false
            }
        );
        assert!(VipFlags::from_names(["no-such-flag"]).is_err());
        assert_eq!(both.to_string(), "no-src-port,no-conntrack");
        assert_eq!(VipFlags::default().to_string(), "none");
    }
}
