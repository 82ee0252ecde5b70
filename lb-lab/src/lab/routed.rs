//! The routed lab of tunnel mode: the reals on a subnet of their own behind a router, the
//! client on a third, so that only encapsulated packets can reach them.
//!
//! ```text
//!   client 10.224.0.2 ── br2 ──┐               ┌── br1 ── r1 10.223.0.11, r2 .12, ...
//!                     10.224.0.1               10.223.0.1      (VIPs on lo, xlb decap)
//!                          router (forwarding; VIPs via lb)
//!                              10.222.0.1 ── br0 ── lb 10.222.0.3 (xlb daemon)
//! ```
//!
//! IPv6 alike (fd00:222::/64, fd00:223::/64, fd00:224::/64). The lb's segment and the reals'
//! carry 1600-byte frames, so encapsulated 1500-byte packets fit (the usual set-up inside a
//! data centre); the client's segment has 1500.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::Result;

use super::{util::load_pass, Host, Lab, BRIDGE, HOST_IFACE};

/// The bridges of the reals' segment and of the client's.
pub const REAL_BRIDGE: &str = "br1";
pub const CLIENT_BRIDGE: &str = "br2";
/// The MTU of the lb's and the reals' segments.
pub const INNER_MTU: &str = "1600";

/// A host on segment `seg` (222: the lb's, 223: the reals', 224: the client's).
pub fn host(prefix: &str, role: &str, seg: u16, last: u8) -> Host {
    Host {
        role: role.to_string(),
        ns: format!("{prefix}{role}"),
        iface: HOST_IFACE.to_string(),
        port: format!("p-{role}"),
        ipv4: Ipv4Addr::new(10, seg as u8, 0, last),
        ipv6: Ipv6Addr::new(0xfd00, seg_hex(seg), 0, 0, 0, 0, 0, u16::from(last)),
        mac: format!("02:{seg:02}:00:00:00:{last:02x}", seg = seg % 100),
    }
}

/// `222` → 0x222: the segment's number as the hex digits of the IPv6 prefix.
fn seg_hex(seg: u16) -> u16 {
    u16::from_str_radix(&seg.to_string(), 16).unwrap_or(0)
}

impl Lab {
    pub(super) fn build_routed(&mut self) -> Result<()> {
        let sw = self.sw.clone();
        self.add_netns(&sw)?;
        for br in [BRIDGE, REAL_BRIDGE, CLIENT_BRIDGE] {
            self.ip(
                &sw,
                &["link", "add", br, "type", "bridge", "mcast_snooping", "0"],
            )?;
            self.ip(&sw, &["link", "set", br, "up"])?;
        }
        let router = self.router.clone().expect("a routed lab has a router");
        let mut wires: Vec<(Host, &str, bool)> = vec![
            (self.client.clone(), CLIENT_BRIDGE, false),
            (self.lb.clone(), BRIDGE, true),
            (router.clone(), BRIDGE, true),
        ];
        for r in self.reals.clone() {
            wires.push((r, REAL_BRIDGE, true));
        }
        // The router's legs on the other two segments.
        let leg = |seg: u16, iface: &str| Host {
            iface: iface.to_string(),
            port: format!("p-router-{seg}"),
            ..host(&self.prefix, "router", seg, 1)
        };
        let mut router_legs = vec![
            (leg(223, "eth1"), REAL_BRIDGE, true),
            (leg(224, "eth2"), CLIENT_BRIDGE, false),
        ];
        let lb_leg = Host {
            iface: "eth1".to_string(),
            port: "p-lb-223".to_string(),
            ..host(&self.prefix, "lb", 223, 3)
        };
        if self.lb_on_reals {
            router_legs.push((lb_leg.clone(), REAL_BRIDGE, true));
        }
        for (h, _, _) in &wires {
            self.add_netns(&h.ns)?;
            self.sysctl(
                &h.ns,
                &[
                    ("net/ipv6/conf/all/accept_dad".to_string(), "0"),
                    ("net/ipv6/conf/default/accept_dad".to_string(), "0"),
                ],
            )?;
            self.ip(&h.ns, &["link", "set", "lo", "up"])?;
        }
        for (h, br, jumbo) in wires.iter().chain(router_legs.iter()) {
            self.ip(
                &sw,
                &[
                    "link", "add", &h.port, "type", "veth", "peer", "name", &h.iface, "address",
                    &h.mac, "netns", &h.ns,
                ],
            )?;
            if *jumbo {
                self.ip(&sw, &["link", "set", &h.port, "mtu", INNER_MTU])?;
                self.ip(&h.ns, &["link", "set", &h.iface, "mtu", INNER_MTU])?;
            }
            self.ip(&sw, &["link", "set", &h.port, "master", br, "up"])?;
            self.ip(
                &h.ns,
                &["addr", "add", &format!("{}/24", h.ipv4), "dev", &h.iface],
            )?;
            self.ip(
                &h.ns,
                &[
                    "addr",
                    "add",
                    &format!("{}/64", h.ipv6),
                    "dev",
                    &h.iface,
                    "nodad",
                ],
            )?;
            self.ip(&h.ns, &["link", "set", &h.iface, "up"])?;
        }

        // The router forwards, and sends the VIPs to the lb.
        let mut knobs = vec![
            ("net/ipv4/ip_forward".to_string(), "1"),
            ("net/ipv6/conf/all/forwarding".to_string(), "1"),
        ];
        for dev in ["all", "default", "eth0", "eth1", "eth2"] {
            knobs.push((format!("net/ipv4/conf/{dev}/rp_filter"), "0"));
        }
        self.sysctl(&router.ns, &knobs)?;
        for vip in self.vips.clone() {
            let (via, len) = match vip {
                IpAddr::V4(_) => (IpAddr::V4(self.lb.ipv4), 32),
                IpAddr::V6(_) => (IpAddr::V6(self.lb.ipv6), 128),
            };
            self.route(&router.ns, &format!("{vip}/{len}"), via)?;
        }
        // Everybody else: the router is the way out.
        let gw = |seg: u16| {
            let h = host(&self.prefix, "router", seg, 1);
            (IpAddr::V4(h.ipv4), IpAddr::V6(h.ipv6))
        };
        let lb = self.lb.clone();
        let client = self.client.clone();
        for (ns, seg) in [(lb.ns.as_str(), 222), (client.ns.as_str(), 224)] {
            let (v4, v6) = gw(seg);
            self.route(ns, "default", v4)?;
            self.route(ns, "default", v6)?;
        }
        // The lb forwards what the host must route (a tunnel real whose next hop is not
        // resolved yet: its packets are passed to the stack).
        self.sysctl(
            &lb.ns,
            &[
                ("net/ipv4/ip_forward".to_string(), "1"),
                ("net/ipv6/conf/all/forwarding".to_string(), "1"),
            ],
        )?;
        self.exec(&client.ns, &["ethtool", "-K", &client.iface, "tx", "off"])?;
        for r in self.reals.clone() {
            self.exec(&r.ns, &["ethtool", "-K", &r.iface, "tx", "off"])?;
            let (v4, v6) = gw(223);
            self.route(&r.ns, "default", v4)?;
            self.route(&r.ns, "default", v6)?;
            let mut knobs = Vec::new();
            for dev in ["all", "default", "lo", r.iface.as_str()] {
                knobs.push((format!("net/ipv4/conf/{dev}/rp_filter"), "0"));
            }
            self.sysctl(&r.ns, &knobs)?;
            for vip in self.vips.clone() {
                let len = if vip.is_ipv4() { 32 } else { 128 };
                self.ip(
                    &r.ns,
                    &["addr", "add", &format!("{vip}/{len}"), "dev", "lo"],
                )?;
            }
        }
        let port = self.lb.port.clone();
        self.pass.push(load_pass(&sw, &port)?);
        if self.lb_on_reals {
            // Frames redirected out of the lb's eth1 arrive on this port.
            self.pass.push(load_pass(&sw, &lb_leg.port)?);
        }
        Ok(())
    }

    fn route(&self, ns: &str, dst: &str, via: IpAddr) -> Result<()> {
        let family = if via.is_ipv4() { "-4" } else { "-6" };
        self.ip(ns, &[family, "route", "add", dst, "via", &via.to_string()])?;
        Ok(())
    }
}
