//! How a real is forwarded to (`mode`) and how tunnel mode encapsulates (`encap`): per daemon
//! (`xlb daemon --mode`, `--encap`), overridable per VIP and per real (`mode` only).

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// LVS's three forwarding methods.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Direct routing (LVS-DR): the frame to the real's MAC, the IP packet unchanged. The real
    /// is on the balancer's segment and holds the VIP.
    #[default]
    Dr,
    /// Tunnel (LVS-TUN, Katran): the packet encapsulated to the real's address, to the next
    /// hop's MAC. The real is anywhere routable and decapsulates.
    Tunnel,
    /// NAT (LVS-NAT): the destination address (and port, for a real with one) rewritten to
    /// the real's; the real's replies come back through the balancer (its default gateway)
    /// and are rewritten to the VIP's. The real needs nothing of its own.
    Nat,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Dr, Mode::Tunnel, Mode::Nat];

    pub const fn as_str(self) -> &'static str {
        match self {
            Mode::Dr => "dr",
            Mode::Tunnel => "tunnel",
            Mode::Nat => "nat",
        }
    }
}

/// Why reals of modes `a` and `b` cannot serve one VIP, if they cannot: the replies of NAT
/// reals come back through the balancer and are rewritten, the others' go straight to the
/// client.
pub fn mix_problem(a: Mode, b: Mode) -> Option<String> {
    ((a == Mode::Nat) != (b == Mode::Nat)).then(|| {
        format!(
            "NAT reals cannot share a VIP with reals of another mode ({a} and {b} here): the \
             replies of NAT reals come back through the balancer and are rewritten, the others' \
             do not; give them one VIP each"
        )
    })
}

/// The interface a tunnel real's route leaves by, when it is not the balancer's own: its
/// frames are redirected there (`XDP_REDIRECT`) from its MAC, within its MTU. Valid for the
/// boot and the interface it was read from (`ifindex` and `mac` both identify it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Egress {
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub mtu: u16,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Mode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| format!("unknown mode {s:?} (expected dr | tunnel | nat)"))
    }
}

/// Tunnel mode's encapsulation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encap {
    /// IPv4-in-IPv4, IPv6-in-IPv6 and the mixed pairs (IP protocols 4 and 41).
    #[default]
    Ipip,
    /// GUE variant 1: the inner packet behind a UDP header (Katran's GUE).
    Gue,
}

impl Encap {
    pub const fn as_str(self) -> &'static str {
        match self {
            Encap::Ipip => "ipip",
            Encap::Gue => "gue",
        }
    }
}

impl fmt::Display for Encap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Encap {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ipip" => Ok(Encap::Ipip),
            "gue" => Ok(Encap::Gue),
            _ => Err(format!("unknown encapsulation {s:?} (expected ipip | gue)")),
        }
    }
}

/// Katran's GUE port.
pub const DEFAULT_GUE_PORT: u16 = 6080;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_and_encaps_round_trip_and_refuse_the_unknown() {
        for m in Mode::ALL {
            assert_eq!(m.as_str().parse::<Mode>(), Ok(m));
            assert_eq!(serde_json::to_string(&m).unwrap(), format!("\"{m}\""));
        }
        assert_eq!(
            "fullnat".parse::<Mode>().unwrap_err(),
            "unknown mode \"fullnat\" (expected dr | tunnel | nat)"
        );
        assert_eq!("gue".parse::<Encap>(), Ok(Encap::Gue));
        assert!("gre".parse::<Encap>().is_err());
    }
}
