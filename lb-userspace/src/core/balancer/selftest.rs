//! The readiness self-test (`xlb ready`): a canned packet for a VIP run through the loaded
//! program (BPF_PROG_TEST_RUN) must leave for the real the userspace ring predicts, rewritten
//! as its mode says. Its source MAC is a group address, which the kernel takes as the mark of
//! a self-test: decided like any packet, neither tracked nor counted.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{flow_hash, ring_slot, FlowKey, IPPROTO_TCP};

use super::Balancer;
use crate::{
    core::clock::Clock,
    dataplane::Dataplane,
    model::{format_mac, map_addr, Mode, Proto, VipSpec},
};

/// The self-test's client: benchmarking addresses (RFC 2544, RFC 5180), never a real client.
const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
const CLIENT_PORT: u16 = 40000;
const SELFTEST_SRC_MAC: [u8; 6] = [0xff; 6];
const TO_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

/// The self-test frame for `spec`: a TCP SYN or a UDP datagram from the test client.
pub fn frame(spec: &VipSpec) -> Vec<u8> {
    let port = if spec.port == 0 { 80 } else { spec.port };
    let tcp = spec.proto == Proto::Tcp;
    let mut l4 = Vec::new();
    l4.extend_from_slice(&CLIENT_PORT.to_be_bytes());
    l4.extend_from_slice(&port.to_be_bytes());
    if tcp {
        // seq, ack, data offset 5, SYN, window, checksum, urgent.
        l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    } else {
        l4.extend_from_slice(&[0, 12, 0, 0]);
        l4.extend_from_slice(b"xlb?");
    }
    let proto = if tcp { 6 } else { 17 };
    let mut out = Vec::with_capacity(80);
    out.extend_from_slice(&TO_MAC);
    out.extend_from_slice(&SELFTEST_SRC_MAC);
    match spec.addr {
        IpAddr::V4(vip) => {
            out.extend_from_slice(&[0x08, 0x00]);
            let len = (20 + l4.len()) as u16;
            let mut ip = vec![0x45, 0];
            ip.extend_from_slice(&len.to_be_bytes());
            ip.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
            ip.extend_from_slice(&CLIENT4.octets());
            ip.extend_from_slice(&vip.octets());
            let sum = checksum(&ip);
            ip[10..12].copy_from_slice(&sum.to_be_bytes());
            out.extend_from_slice(&ip);
        }
        IpAddr::V6(vip) => {
            out.extend_from_slice(&[0x86, 0xdd]);
            out.extend_from_slice(&[0x60, 0, 0, 0]);
            out.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            out.extend_from_slice(&[proto, 64]);
            out.extend_from_slice(&CLIENT6.octets());
            out.extend_from_slice(&vip.octets());
        }
    }
    out.extend_from_slice(&l4);
    out
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The flow key the kernel builds from `frame(spec)`, as the ring hashes it.
fn hashed_key(spec: &VipSpec, no_src_port: bool) -> FlowKey {
    let client = match spec.addr {
        IpAddr::V4(_) => IpAddr::V4(CLIENT4),
        IpAddr::V6(_) => IpAddr::V6(CLIENT6),
    };
    let port = if spec.port == 0 { 80 } else { spec.port };
    FlowKey {
        src: map_addr(client),
        dst: map_addr(spec.addr),
        src_port_be: if no_src_port { 0 } else { CLIENT_PORT.to_be() },
        dst_port_be: port.to_be(),
        proto: if spec.proto == Proto::Tcp {
            IPPROTO_TCP
        } else {
            17
        },
        _pad: [0; 3],
    }
}

impl<D: Dataplane, C: Clock> Balancer<D, C> {
    /// Runs the self-test of `spec`: `Ok(())` when the packet left for the predicted real (or
    /// when the dataplane has no program to run it through), else what went wrong. A VIP whose
    /// ring has no real is not tested (there is nothing to predict).
    pub fn self_test(&mut self, spec: &VipSpec) -> Result<(), String> {
        let snap = self.snapshot();
        let vip = snap
            .vips
            .iter()
            .find(|v| v.spec == *spec)
            .ok_or_else(|| format!("VIP {spec} does not exist"))?;
        let ring = self
            .live_ring(spec)
            .map_err(|e| format!("reading the live ring: {e}"))?
            .ok_or_else(|| format!("VIP {spec} does not exist"))?;
        let m = ring.len() as u32;
        let key = hashed_key(spec, vip.flags.no_src_port);
        let id = ring[ring_slot(flow_hash(&key, self.hash_seed), m) as usize];
        let Some(real) = vip.reals.iter().chain(&vip.sorry).find(|r| r.id == id) else {
            return Ok(());
        };
        let frame = frame(spec);
        let Some((action, out)) = self
            .dataplane_mut()
            .run_frame(&frame)
            .map_err(|e| format!("running the program: {e}"))?
        else {
            return Ok(());
        };
        if action != XDP_TX && action != XDP_REDIRECT {
            return Err(format!(
                "the program answered action {action} for a packet the ring gives to real {} \
                 (expected XDP_TX or XDP_REDIRECT)",
                real.addr
            ));
        }
        let to = out.get(..6).unwrap_or_default();
        let mac = real.mac.unwrap_or_default();
        if to != mac {
            return Err(format!(
                "the packet went to MAC {}, the ring's real {} is at {}",
                out.get(..6)
                    .and_then(|b| <[u8; 6]>::try_from(b).ok())
                    .map_or_else(|| "?".into(), |b| format_mac(&b)),
                real.addr,
                format_mac(&mac)
            ));
        }
        let sent_to = match real.effective_mode {
            // Direct routing leaves the IP packet as it was.
            Mode::Dr => (out.get(12..) == frame.get(12..)).then_some(real.addr.ip),
            Mode::Tunnel | Mode::Nat => outer_dst(&out),
        };
        if sent_to != Some(real.addr.ip) {
            return Err(format!(
                "the packet left for {}, the ring predicts real {}",
                sent_to.map_or_else(|| "an unparsable header".into(), |a| a.to_string()),
                real.addr
            ));
        }
        Ok(())
    }
}

/// The destination of an encapsulated frame's outer header.
fn outer_dst(out: &[u8]) -> Option<IpAddr> {
    match out.get(12..14)? {
        [0x08, 0x00] => <[u8; 4]>::try_from(out.get(30..34)?).ok().map(IpAddr::from),
        [0x86, 0xdd] => <[u8; 16]>::try_from(out.get(38..54)?)
            .ok()
            .map(IpAddr::from),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frames_headers_are_well_formed() {
        let f = frame(&"tcp/10.0.0.100:443".parse().expect("vip"));
        assert_eq!(f.len(), 14 + 20 + 20);
        assert_eq!(checksum(&f[14..34]), 0, "IPv4 header checksum");
        assert_eq!(&f[6..12], &[0xff; 6]);
        assert_eq!(&f[36..38], &443u16.to_be_bytes());
        let f = frame(&"udp/[2001:db8::1]:0".parse().expect("vip"));
        assert_eq!(f.len(), 14 + 40 + 12);
        assert_eq!(&f[56..58], &80u16.to_be_bytes());
        assert_eq!(outer_dst(&f), Some("2001:db8::1".parse().expect("ip")));
    }
}
