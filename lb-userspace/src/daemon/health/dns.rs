//! `dns` checks: one query over UDP, up on a reply with the query's id, NOERROR and at least
//! one answer (hickory-proto builds and reads the messages).

use hickory_proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{Name, RecordType},
};
use tokio::net::UdpSocket;

use super::probe::{brief, Outcome};

/// Query ids, spread over the 16 bits; not secret (the socket is connected to the real).
fn next_id() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0x5a17);
    NEXT.fetch_add(0x9e37, Ordering::Relaxed)
}

pub async fn query(sock: &UdpSocket, name: &str, qtype: u16) -> Outcome {
    let name = match Name::from_ascii(name) {
        Ok(n) => n,
        Err(e) => return Outcome::Down(format!("dns: name {name:?}: {e}")),
    };
    let id = next_id();
    let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(name, RecordType::from(qtype)));
    let bytes = match msg.to_vec() {
        Ok(b) => b,
        Err(e) => return Outcome::Down(format!("dns: {e}")),
    };
    if let Err(e) = sock.send(&bytes).await {
        return Outcome::Down(format!("send: {}", brief(&e)));
    }
    let mut buf = vec![0u8; 4096];
    loop {
        let n = match sock.recv(&mut buf).await {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                return Outcome::Down("icmp: port unreachable".into())
            }
            Err(e) => return Outcome::Down(format!("receive: {}", brief(&e))),
        };
        let reply = match Message::from_vec(&buf[..n]) {
            Ok(m) => m,
            Err(e) => return Outcome::Down(format!("dns: bad reply: {e}")),
        };
        // A late reply to an earlier query of this socket's port is not this one's.
        if reply.metadata.id != id || reply.metadata.message_type != MessageType::Response {
            continue;
        }
        return match reply.metadata.response_code {
            ResponseCode::NoError if !reply.answers.is_empty() => Outcome::up(),
            ResponseCode::NoError => Outcome::Down("dns: no answer".into()),
            code => Outcome::Down(format!("dns: {code}")),
        };
    }
}
