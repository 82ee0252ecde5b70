//! Flow sync's messages: one UDP datagram each, authenticated with HMAC-SHA256 of the shared
//! key, numbered so that a replay is recognised.
//!
//! ```text
//! 0   "XLBS"  version(1)  kind(1)  count(2)
//! 8   sender (8): random per daemon start
//! 16  sequence (8): 1, 2, ... per sender
//! 24  time (8): Unix seconds when sent
//! 32  count × flow (56): proto(1) 0(1) vip port(2) client port(2) destination port(2)
//!                        VIP(16) client(16) real(16), addresses IPv6 or IPv4-mapped
//!                        [kind 4 only: real port(2), 58 bytes a flow]
//! ..  HMAC-SHA256 (32) of everything before it
//! ```
//! Flows whose real has a port (NAT) travel in kind 4 messages, the others in kind 3, as
//! before NAT: a node of an earlier version reads kind 3 as it always did (and refuses kind 4
//! as malformed; it has no NAT reals with ports to put such flows on).
//! All numbers big-endian. At most `MAX_FLOWS` flows, so that a message fits an IPv6
//! minimum-MTU packet unfragmented.

use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use ring::hmac;

use crate::{
    core::balancer::sync::SyncFlow,
    model::{map_addr, unmap_addr, Proto, RealAddr, VipSpec},
};

const MAGIC: &[u8; 4] = b"XLBS";
const VERSION: u8 = 1;
const HEADER: usize = 32;
const FLOW: usize = 56;
/// A flow of a kind 4 message: the real's port after it.
const FLOW_PORT: usize = FLOW + 2;
/// Kind 4 on the wire: `Kind::Flows` of reals with ports.
const KIND_FLOWS_PORTS: u8 = 4;
const TAG: usize = 32;
pub const MAX_FLOWS: usize = 20;
/// The largest message there is; anything longer is refused unread.
pub const MAX_MESSAGE: usize = HEADER + MAX_FLOWS * FLOW_PORT + TAG;
/// How far a message's time may be from ours (the nodes' clocks are kept by NTP).
pub const MAX_SKEW: Duration = Duration::from_secs(60);
/// A sender not heard from for this long is forgotten (its messages are stale long before).
const FORGET: Duration = Duration::from_secs(600);
/// Sequence numbers behind the highest seen that are still told apart (reordering).
const WINDOW: u64 = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// "I am here" (every second): keeps `last_seen`, and a peer heard again after a silence
    /// is asked for its flows.
    Hello = 1,
    /// "Send me your flows that the ring cannot reproduce."
    Request = 2,
    Flows = 3,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub kind: Kind,
    pub sender: u64,
    pub seq: u64,
    /// Unix seconds.
    pub time: u64,
    pub flows: Vec<SyncFlow>,
}

/// Why a datagram was dropped (each is counted under its name in `stats`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reject {
    /// Not from a configured peer's address.
    UnknownPeer,
    /// Longer than any message, or shorter than an empty one.
    Size,
    /// The HMAC does not match (another key, or altered).
    Auth,
    /// Authenticated, but not a message of this version.
    Malformed,
    /// Its time is more than `MAX_SKEW` from ours.
    Stale,
    /// Its sequence number was seen already.
    Replay,
    /// The peer sends more than the receive budget.
    Rate,
}

impl Reject {
    pub fn name(self) -> &'static str {
        match self {
            Reject::UnknownPeer => "unknown_peer",
            Reject::Size => "size",
            Reject::Auth => "auth",
            Reject::Malformed => "malformed",
            Reject::Stale => "stale",
            Reject::Replay => "replay",
            Reject::Rate => "rate",
        }
    }
}

pub fn key(secret: &[u8]) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, secret)
}

fn proto_byte(p: Proto) -> u8 {
    match p {
        Proto::Tcp => 6,
        Proto::Udp => 17,
    }
}

fn addr(b: &[u8]) -> IpAddr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[..16]);
    unmap_addr(a)
}

pub fn encode(key: &hmac::Key, m: &Message) -> Vec<u8> {
    let flows = &m.flows[..m.flows.len().min(MAX_FLOWS)];
    let ports = m.kind == Kind::Flows && flows.iter().any(|f| f.real.port != 0);
    let mut out = Vec::with_capacity(HEADER + flows.len() * FLOW_PORT + TAG);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(if ports {
        KIND_FLOWS_PORTS
    } else {
        m.kind as u8
    });
    out.extend_from_slice(&(flows.len() as u16).to_be_bytes());
    out.extend_from_slice(&m.sender.to_be_bytes());
    out.extend_from_slice(&m.seq.to_be_bytes());
    out.extend_from_slice(&m.time.to_be_bytes());
    for f in flows {
        out.push(proto_byte(f.vip.proto));
        out.push(0);
        out.extend_from_slice(&f.vip.port.to_be_bytes());
        out.extend_from_slice(&f.client_port.to_be_bytes());
        out.extend_from_slice(&f.dst_port.to_be_bytes());
        out.extend_from_slice(&map_addr(f.vip.addr));
        out.extend_from_slice(&map_addr(f.client));
        out.extend_from_slice(&map_addr(f.real.ip));
        if ports {
            out.extend_from_slice(&f.real.port.to_be_bytes());
        }
    }
    let tag = hmac::sign(key, &out);
    out.extend_from_slice(tag.as_ref());
    out
}

/// The message in `b`, authenticated (its time and sequence are for `ReplayGuard`).
pub fn decode(key: &hmac::Key, b: &[u8]) -> Result<Message, Reject> {
    if b.len() > MAX_MESSAGE || b.len() < HEADER + TAG {
        return Err(Reject::Size);
    }
    let (body, tag) = b.split_at(b.len() - TAG);
    hmac::verify(key, body, tag).map_err(|_| Reject::Auth)?;
    let be16 = |i: usize| u16::from_be_bytes([body[i], body[i + 1]]);
    let be64 = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&body[i..i + 8]);
        u64::from_be_bytes(w)
    };
    if &body[..4] != MAGIC || body[4] != VERSION {
        return Err(Reject::Malformed);
    }
    let (kind, size) = match body[5] {
        1 => (Kind::Hello, FLOW),
        2 => (Kind::Request, FLOW),
        3 => (Kind::Flows, FLOW),
        KIND_FLOWS_PORTS => (Kind::Flows, FLOW_PORT),
        _ => return Err(Reject::Malformed),
    };
    let count = usize::from(be16(6));
    if count > MAX_FLOWS
        || body.len() != HEADER + count * size
        || (kind != Kind::Flows && count != 0)
    {
        return Err(Reject::Malformed);
    }
    let mut flows = Vec::with_capacity(count);
    for f in body[HEADER..].chunks_exact(size) {
        let proto = match f[0] {
            6 => Proto::Tcp,
            17 => Proto::Udp,
            _ => return Err(Reject::Malformed),
        };
        let port = |i: usize| u16::from_be_bytes([f[i], f[i + 1]]);
        flows.push(SyncFlow {
            vip: VipSpec {
                proto,
                addr: addr(&f[8..24]),
                port: port(2),
            },
            client_port: port(4),
            dst_port: port(6),
            client: addr(&f[24..40]),
            real: RealAddr {
                ip: addr(&f[40..56]),
                port: if size == FLOW_PORT { port(56) } else { 0 },
            },
        });
    }
    Ok(Message {
        kind,
        sender: be64(8),
        seq: be64(16),
        time: be64(24),
        flows,
    })
}

/// Remembers, per sender, the highest sequence number seen and which of the `WINDOW` below it
/// were: a message whose number was seen, or is older than the window, is a replay.
#[derive(Default)]
pub struct ReplayGuard {
    senders: HashMap<u64, (u64, u64, Instant)>,
}

impl ReplayGuard {
    /// Accept `m` (sent at Unix second `m.time`) now, at Unix second `now_unix`.
    pub fn check(&mut self, m: &Message, now_unix: u64, now: Instant) -> Result<(), Reject> {
        if m.time.abs_diff(now_unix) > MAX_SKEW.as_secs() {
            return Err(Reject::Stale);
        }
        self.senders
            .retain(|_, (_, _, at)| now.duration_since(*at) < FORGET);
        let (top, bits, at) = self.senders.entry(m.sender).or_insert((0, 0, now));
        if m.seq == 0 {
            return Err(Reject::Replay);
        }
        if m.seq > *top {
            let shift = m.seq - *top;
            *bits = if shift >= WINDOW { 0 } else { *bits << shift };
            *bits |= 1;
            *top = m.seq;
        } else {
            let back = *top - m.seq;
            if back >= WINDOW || *bits & (1 << back) != 0 {
                return Err(Reject::Replay);
            }
            *bits |= 1 << back;
        }
        *at = now;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(i: u16) -> SyncFlow {
        SyncFlow {
            vip: "tcp/10.0.0.100:80".parse().expect("vip"),
            client: "192.0.2.1".parse().expect("ip"),
            client_port: 40000 + i,
            dst_port: 80,
            real: "2001:db8::7".parse().expect("real"),
        }
    }

    fn msg(seq: u64, flows: Vec<SyncFlow>) -> Message {
        Message {
            kind: if flows.is_empty() {
                Kind::Hello
            } else {
                Kind::Flows
            },
            sender: 7,
            seq,
            time: 1_000_000,
            flows,
        }
    }

    #[test]
    fn a_full_message_round_trips_and_fits_the_minimum_mtu() {
        let k = key(b"0123456789abcdef");
        let m = msg(1, (0..MAX_FLOWS as u16).map(flow).collect());
        let b = encode(&k, &m);
        assert_eq!((b[5], b.len()), (3, HEADER + MAX_FLOWS * FLOW + TAG));
        assert_eq!(decode(&k, &b), Ok(m));
        // NAT reals with ports: kind 4, the port after each flow, the largest message.
        let ported = |i: u16| SyncFlow {
            real: "[2001:db8::7]:8080".parse().expect("real"),
            ..flow(i)
        };
        let m = msg(2, (0..MAX_FLOWS as u16).map(ported).collect());
        let b = encode(&k, &m);
        assert_eq!((b[5], b.len()), (4, MAX_MESSAGE));
        assert!(b.len() + 48 <= 1280, "IPv6 + UDP headers included");
        assert_eq!(&b[32 + 56..32 + 58], &8080u16.to_be_bytes());
        assert_eq!(decode(&k, &b), Ok(m));
        // Exact bytes of one flow: proto, 0, ports, then the three mapped addresses.
        let one = encode(&k, &msg(2, vec![flow(1)]));
        assert_eq!(&one[32..40], &[6, 0, 0, 80, 0x9c, 0x41, 0, 80]);
        assert_eq!(&one[40..56], &map_addr("10.0.0.100".parse().expect("ip")));
    }

    #[test]
    fn another_key_an_altered_byte_or_a_wrong_size_is_refused() {
        let k = key(b"0123456789abcdef");
        let b = encode(&k, &msg(1, vec![flow(0)]));
        assert_eq!(decode(&key(b"fedcba9876543210"), &b), Err(Reject::Auth));
        let mut altered = b.clone();
        altered[70] ^= 1;
        assert_eq!(decode(&k, &altered), Err(Reject::Auth));
        assert_eq!(decode(&k, &b[..40]), Err(Reject::Size));
        let mut long = b.clone();
        long.resize(MAX_MESSAGE + 1, 0);
        assert_eq!(decode(&k, &long), Err(Reject::Size));
    }

    #[test]
    fn a_replayed_or_stale_message_is_refused() {
        let mut g = ReplayGuard::default();
        let now = Instant::now();
        let t = 1_000_000;
        assert_eq!(g.check(&msg(5, vec![]), t, now), Ok(()));
        assert_eq!(g.check(&msg(5, vec![]), t, now), Err(Reject::Replay));
        assert_eq!(g.check(&msg(3, vec![]), t, now), Ok(()), "late but unseen");
        assert_eq!(g.check(&msg(3, vec![]), t, now), Err(Reject::Replay));
        assert_eq!(g.check(&msg(200, vec![]), t, now), Ok(()));
        assert_eq!(
            g.check(&msg(100, vec![]), t, now),
            Err(Reject::Replay),
            "behind the window"
        );
        assert_eq!(g.check(&msg(201, vec![]), t + 61, now), Err(Reject::Stale));
        assert_eq!(g.check(&msg(201, vec![]), t + 60, now), Ok(()));
        let mut other = msg(1, vec![]);
        other.sender = 8;
        assert_eq!(g.check(&other, t, now), Ok(()), "senders are apart");
    }
}
