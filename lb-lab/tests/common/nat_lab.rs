//! What the NAT packet tests share: a balancer with NAT VIPs of both families and
//! protocols, frames between (address, port) ends, namespaces of their own for FIB lookups.

use std::{
    net::{IpAddr, Ipv6Addr},
    process::Command,
};

use lb_common::ENCAP_IPIP;
use lb_lab::packet::{self, Frame};
use lb_userspace::{
    core::balancer::Change,
    model::{Mode, RealAddr, VipSpec},
};

use crate::tunnel_lab::*;

pub const XDP_REDIRECT: u32 = 4;
pub const PAYLOAD: &[u8] = b"GET / HTTP/1.0\r\n\r\n";

pub fn client6(i: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0xee, 0, 0, 0, 0, i)
}

/// NAT VIPs of both families and protocols; each has two reals on port 8080 and one that
/// keeps the VIP's port.
pub struct NatLab {
    pub lab: Lab,
    pub vips: Vec<VipSpec>,
}

pub fn nat_real(lab: &mut Lab, vip: VipSpec, real: &str) {
    let addr: RealAddr = real.parse().expect("real");
    lab.bal
        .apply(vec![
            Change::AddReal {
                vip,
                addr,
                weight: 1,
                mac: Some(GW_MAC),
            },
            Change::SetMode {
                vip,
                real: Some(addr),
                mode: Some(Mode::Nat),
            },
        ])
        .unwrap_or_else(|e| panic!("add real {real}: {e}"));
}

pub fn nat_lab() -> NatLab {
    let mut lab = Lab::new(conf(ENCAP_IPIP));
    let mut vips = Vec::new();
    for (spec, reals) in [
        (
            "tcp/10.50.0.100:80",
            ["10.60.0.11:8080", "10.60.0.12:8080", "10.60.0.13"],
        ),
        (
            "udp/10.50.0.100:53",
            ["10.60.0.11:5353", "10.60.0.12:5353", "10.60.0.13"],
        ),
        (
            "tcp/[2001:db8:50::100]:80",
            [
                "[2001:db8:60::11]:8080",
                "[2001:db8:60::12]:8080",
                "2001:db8:60::13",
            ],
        ),
        (
            "udp/[2001:db8:50::100]:53",
            [
                "[2001:db8:60::11]:5353",
                "[2001:db8:60::12]:5353",
                "2001:db8:60::13",
            ],
        ),
    ] {
        let vip = lab.vip(spec);
        for r in reals {
            nat_real(&mut lab, vip, r);
        }
        vips.push(vip);
    }
    NatLab { lab, vips }
}

/// A frame between two (address, port) ends of the VIP's protocol and family.
pub fn frame(vip: &VipSpec, src: (IpAddr, u16), dst: (IpAddr, u16)) -> Frame {
    use lb_userspace::model::Proto;
    let f = match (src.0, dst.0, vip.proto) {
        (IpAddr::V4(s), IpAddr::V4(d), Proto::Tcp) => Frame::tcp4(s, src.1, d, dst.1),
        (IpAddr::V4(s), IpAddr::V4(d), Proto::Udp) => Frame::udp4(s, src.1, d, dst.1),
        (IpAddr::V6(s), IpAddr::V6(d), Proto::Tcp) => Frame::tcp6(s, src.1, d, dst.1),
        (IpAddr::V6(s), IpAddr::V6(d), Proto::Udp) => Frame::udp6(s, src.1, d, dst.1),
        _ => unreachable!("one family per frame"),
    };
    f.with_payload(PAYLOAD)
}

pub fn client_of(vip: &VipSpec, i: u16) -> IpAddr {
    match vip.addr {
        IpAddr::V4(_) => IpAddr::V4(c4(u32::from(i))),
        IpAddr::V6(_) => IpAddr::V6(client6(i)),
    }
}

pub fn assert_frame(what: &str, got: &[u8], want: &[u8]) {
    assert!(got == want, "{what}:\n{}", packet::hex_diff(want, got));
    packet::verify_checksums(got).unwrap_or_else(|e| panic!("{what}: {e}"));
}
/// A network namespace of the test's own, removed when dropped.
pub struct Netns(pub String);

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!("xlbnat-{tag}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        sh(&["ip", "netns", "add", &name]);
        Netns(name)
    }

    pub fn exec(&self, args: &[&str]) {
        let mut full = vec!["ip", "netns", "exec", &self.0];
        full.extend_from_slice(args);
        sh(&full);
    }

    /// A veth pair `a`-`b` in the namespace, both ends up.
    pub fn veth(&self, a: &str, b: &str) {
        self.exec(&["ip", "link", "add", a, "type", "veth", "peer", "name", b]);
        self.exec(&["ip", "link", "set", a, "up"]);
        self.exec(&["ip", "link", "set", b, "up"]);
    }

    pub fn output(&self, args: &[&str]) -> String {
        let mut full = vec!["netns", "exec", &self.0];
        full.extend_from_slice(args);
        let out = Command::new("ip").args(&full).output().expect("ip");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

pub fn sh(args: &[&str]) {
    let st = Command::new(args[0])
        .args(&args[1..])
        .status()
        .expect("run");
    assert!(st.success(), "{args:?} failed");
}

pub fn ifindex(ns: &Netns, dev: &str) -> u32 {
    let text = ns.output(&["cat", &format!("/sys/class/net/{dev}/ifindex")]);
    text.trim().parse().expect("ifindex")
}

pub fn mac_of(ns: &Netns, dev: &str) -> [u8; 6] {
    let text = ns.output(&["cat", &format!("/sys/class/net/{dev}/address")]);
    let mut mac = [0u8; 6];
    for (i, b) in text.trim().split(':').enumerate() {
        mac[i] = u8::from_str_radix(b, 16).expect("mac");
    }
    mac
}

/// Runs `f` on a thread inside `ns` (BPF_PROG_TEST_RUN's FIB lookups see its routes).
pub fn inside<T: Send + 'static>(ns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> T {
    lb_lab::lab::in_netns(&ns.0, move || Ok(f())).expect("in the test's namespace")
}
