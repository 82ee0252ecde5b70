//! A real of a VIP as every command, file and report names it: its address, and for NAT reals
//! the port it serves on (`10.0.1.11:8080`, `[2001:db8::11]:8080`). Direct routing and tunnel
//! reals keep the VIP's port and are bare addresses, as before.

use std::{
    fmt,
    net::{IpAddr, Ipv6Addr},
    str::FromStr,
};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A real's address and port. Port 0 means none: packets keep the VIP's (their own) port.
/// Ordered by address, then port: reals without a port sort as their addresses did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RealAddr {
    pub ip: IpAddr,
    pub port: u16,
}

impl RealAddr {
    pub const fn new(ip: IpAddr, port: u16) -> RealAddr {
        RealAddr { ip, port }
    }

    pub fn is_ipv4(&self) -> bool {
        self.ip.is_ipv4()
    }

    pub fn is_ipv6(&self) -> bool {
        self.ip.is_ipv6()
    }

    /// A real as LVS tools write it (ipvsadm's `-r ADDR:PORT`, keepalived's `real_server ADDR
    /// PORT`): its port is its own only for a NAT real whose port differs from its VIP's
    /// (the same port, or a VIP of every port, is the VIP's: no port of its own).
    pub fn imported(ip: IpAddr, port: Option<u16>, nat: bool, vip_port: u16) -> RealAddr {
        match port {
            Some(p) if nat && vip_port != 0 && p != vip_port => RealAddr::new(ip, p),
            _ => RealAddr::from(ip),
        }
    }

    /// The port packets reach the real on: its own, else the VIP's.
    pub fn port_or(&self, vip_port: u16) -> u16 {
        if self.port == 0 {
            vip_port
        } else {
            self.port
        }
    }
}

impl From<IpAddr> for RealAddr {
    fn from(ip: IpAddr) -> RealAddr {
        RealAddr { ip, port: 0 }
    }
}

impl fmt::Display for RealAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.ip, self.port) {
            (ip, 0) => write!(f, "{ip}"),
            (IpAddr::V4(a), p) => write!(f, "{a}:{p}"),
            (IpAddr::V6(a), p) => write!(f, "[{a}]:{p}"),
        }
    }
}

/// `ADDR`, `ADDR:PORT` (IPv4), `[ADDR]:PORT` or `[ADDR]` (IPv6). The message names the input.
pub fn parse_real_addr(text: &str) -> Result<RealAddr, String> {
    let bad = |why: &str| format!("invalid real address {text:?}: {why}");
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(RealAddr::new(ip, 0));
    }
    let (ip, port) = if let Some(rest) = text.strip_prefix('[') {
        let (host, tail) = rest
            .split_once(']')
            .ok_or_else(|| bad("expected [IPv6]:PORT"))?;
        let ip: Ipv6Addr = host.parse().map_err(|_| bad("bad IPv6 address"))?;
        match tail {
            "" => return Ok(RealAddr::new(IpAddr::V6(ip), 0)),
            _ => match tail.strip_prefix(':') {
                Some(port) => (IpAddr::V6(ip), port),
                None => return Err(bad("expected [IPv6]:PORT")),
            },
        }
    } else {
        match text.rsplit_once(':') {
            Some((host, port)) if !host.contains(':') => (
                IpAddr::V4(
                    host.parse()
                        .map_err(|_| bad("expected an IPv4 or IPv6 address"))?,
                ),
                port,
            ),
            Some(_) => {
                return Err(bad(
                    "an IPv6 real with a port needs brackets, as in [2001:db8::11]:8080",
                ))
            }
            None => return Err(bad("expected an IPv4 or IPv6 address")),
        }
    };
    let port = match port.parse::<u16>() {
        Ok(0) => {
            return Err(bad(
                "port 0: leave the port out to keep the VIP's (only NAT reals take a port)",
            ))
        }
        Ok(p) => p,
        Err(_) => return Err(bad("bad port (expected 1 to 65535)")),
    };
    Ok(RealAddr::new(ip, port))
}

/// A sorry server's address: written as a real, but without a port (it takes the VIP's).
pub fn parse_sorry_server(text: &str) -> Result<IpAddr, String> {
    let real = parse_real_addr(text)?;
    if real.port != 0 {
        return Err(format!(
            "{real}: a sorry server takes the VIP's port (leave the port out)"
        ));
    }
    Ok(real.ip)
}

impl FromStr for RealAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        parse_real_addr(s)
    }
}

impl Serialize for RealAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RealAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse_real_addr(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> RealAddr {
        parse_real_addr(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn parses_and_prints_every_form() {
        for (text, port) in [
            ("10.0.1.11", 0),
            ("10.0.1.11:8080", 8080),
            ("2001:db8::11", 0),
            ("[2001:db8::11]:8080", 8080),
        ] {
            let r = ok(text);
            assert_eq!(r.port, port);
            assert_eq!(r.to_string(), text);
        }
        assert_eq!(ok("[2001:db8::11]").to_string(), "2001:db8::11");
    }

    #[test]
    fn refuses_with_the_reason() {
        for (text, why) in [
            ("10.0.1.11:0", "port 0"),
            ("10.0.1.11:70000", "bad port"),
            ("10.0.1.300", "IPv4 or IPv6"),
            ("2001:db8::11:8080:zz", "needs brackets"),
            ("[2001:db8::11", "[IPv6]:PORT"),
            ("[2001:db8::11]8080", "[IPv6]:PORT"),
            ("host:80", "IPv4 or IPv6"),
        ] {
            let e = parse_real_addr(text).unwrap_err();
            assert!(e.contains(why) && e.contains(text), "{text}: {e}");
        }
    }

    #[test]
    fn a_sorry_server_is_an_address_without_a_port() {
        assert_eq!(
            parse_sorry_server("10.0.0.9"),
            Ok("10.0.0.9".parse().unwrap())
        );
        let e = parse_sorry_server("10.0.0.9:80").unwrap_err();
        assert!(e.contains("a sorry server takes the VIP's port"), "{e}");
    }

    #[test]
    fn orders_by_address_then_port() {
        let mut v = vec![ok("10.0.0.2"), ok("10.0.0.1:9"), ok("10.0.0.1")];
        v.sort();
        assert_eq!(v, vec![ok("10.0.0.1"), ok("10.0.0.1:9"), ok("10.0.0.2")]);
    }

    #[test]
    fn serde_is_the_written_form() {
        let r = ok("[2001:db8::11]:8080");
        let j = serde_json::to_string(&r).unwrap();
        assert_eq!(j, "\"[2001:db8::11]:8080\"");
        assert_eq!(serde_json::from_str::<RealAddr>(&j).unwrap(), r);
        assert_eq!(
            serde_json::from_str::<RealAddr>("\"10.0.0.1\"").unwrap(),
            ok("10.0.0.1")
        );
    }
}
