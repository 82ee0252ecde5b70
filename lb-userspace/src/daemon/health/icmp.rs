//! `ping` checks: one ICMP (or ICMPv6) echo request on a raw socket connected to the real,
//! up on the matching echo reply. Raw sockets need CAP_NET_RAW, which the daemon has; the
//! unprivileged ping sockets depend on `net.ipv4.ping_group_range`, which is off by default.

use std::{
    io::{self, Read},
    net::{IpAddr, SocketAddr},
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::io::{unix::AsyncFd, Interest};

use super::probe::{brief, Outcome};

const ECHO_REQUEST_V4: u8 = 8;
const ECHO_REPLY_V4: u8 = 0;
const ECHO_REQUEST_V6: u8 = 128;
const ECHO_REPLY_V6: u8 = 129;
const PAYLOAD: &[u8; 16] = b"xlb-health-check";

fn next_id() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0x3c1d);
    NEXT.fetch_add(0x9e37, Ordering::Relaxed)
}

/// The internet checksum (RFC 1071) of an ICMPv4 message.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An echo request; the kernel fills in the ICMPv6 checksum itself.
fn echo_request(v6: bool, id: u16, seq: u16) -> Vec<u8> {
    let kind = if v6 { ECHO_REQUEST_V6 } else { ECHO_REQUEST_V4 };
    let mut pkt = vec![kind, 0, 0, 0];
    pkt.extend_from_slice(&id.to_be_bytes());
    pkt.extend_from_slice(&seq.to_be_bytes());
    pkt.extend_from_slice(PAYLOAD);
    if !v6 {
        let c = checksum(&pkt);
        pkt[2..4].copy_from_slice(&c.to_be_bytes());
    }
    pkt
}

/// Whether a received packet (IPv4: with its IP header) is our echo reply.
fn is_reply(v6: bool, packet: &[u8], id: u16, seq: u16) -> bool {
    let icmp = if v6 {
        packet
    } else {
        let ihl = usize::from(packet.first().map_or(0, |b| b & 0x0f)) * 4;
        packet.get(ihl..).unwrap_or_default()
    };
    let kind = if v6 { ECHO_REPLY_V6 } else { ECHO_REPLY_V4 };
    icmp.len() >= 8
        && icmp[0] == kind
        && icmp[4..6] == id.to_be_bytes()
        && icmp[6..8] == seq.to_be_bytes()
}

pub async fn ping(addr: IpAddr) -> Outcome {
    match echo(addr).await {
        Ok(()) => Outcome::up(),
        Err(e) => Outcome::Down(format!("icmp: {}", brief(&e))),
    }
}

async fn echo(addr: IpAddr) -> io::Result<()> {
    let v6 = addr.is_ipv6();
    let (domain, proto) = if v6 {
        (Domain::IPV6, Protocol::ICMPV6)
    } else {
        (Domain::IPV4, Protocol::ICMPV4)
    };
    let sock = Socket::new(domain, Type::RAW, Some(proto))?;
    sock.set_nonblocking(true)?;
    // Connected: the kernel hands this socket only what comes from `addr`.
    sock.connect(&SockAddr::from(SocketAddr::new(addr, 0)))?;
    // SAFETY: the socket owns its fd, which stays open (and the same) until the AsyncFd
    // that owns the socket is dropped.
    let fd = unsafe { AsyncFd::register(sock) }.map_err(io::Error::from)?;
    let (id, seq) = (next_id(), 1);
    let request = echo_request(v6, id, seq);
    fd.async_io(Interest::WRITABLE, |s| s.send(&request))
        .await?;
    let mut buf = [0u8; 1500];
    loop {
        let n = fd
            .async_io(Interest::READABLE, |mut s| s.read(&mut buf))
            .await?;
        if is_reply(v6, &buf[..n], id, seq) {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_requests_carry_their_id_and_a_valid_checksum() {
        let pkt = echo_request(false, 0x1234, 1);
        assert_eq!(&pkt[..8], &[8, 0, pkt[2], pkt[3], 0x12, 0x34, 0, 1]);
        assert_eq!(checksum(&pkt), 0, "a packet with its checksum sums to zero");
        let mut reply = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        reply.extend_from_slice(&pkt);
        reply[20] = ECHO_REPLY_V4;
        assert!(is_reply(false, &reply, 0x1234, 1));
        assert!(!is_reply(false, &reply, 0x1235, 1));
        let v6 = echo_request(true, 7, 1);
        assert_eq!(v6[0], ECHO_REQUEST_V6);
        let mut r6 = v6.clone();
        r6[0] = ECHO_REPLY_V6;
        assert!(is_reply(true, &r6, 7, 1));
        assert!(!is_reply(true, &v6, 7, 1));
    }
}
