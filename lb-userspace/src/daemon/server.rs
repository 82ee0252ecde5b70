//! The control socket: JSON lines in, JSON lines out, answered in order per connection. Bounded
//! in what it takes: at most `MAX_CONNECTIONS` connections at once (a client over the limit
//! gets an error line, then the connection is closed), a request line of at most
//! `api::MAX_LINE` bytes, and `IDLE_TIMEOUT` of silence before a connection is closed. An
//! accept that fails (out of file descriptors) is retried after a pause, not in a busy loop.

use std::{sync::Arc, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::Semaphore,
};

use super::handlers::Context;
use crate::api::{ApiError, ErrorCode, Op, Request, Response, MAX_LINE, PROTOCOL_VERSION};

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 32;
/// A connection that sends nothing for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Pause after a failed accept (EMFILE, ENFILE, ENOMEM).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(200);

fn bad_request(message: String) -> ApiError {
    ApiError {
        code: ErrorCode::BadRequest,
        field: None,
        message,
    }
}

/// What a socket's clients may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Full,
    /// `--ro-socket`: reads only (hello, list, stats, save, conns, whereis, trace, ready, real
    /// flows).
    ReadOnly,
}

/// Whether `op` only reads.
fn reads_only(op: &Op) -> bool {
    matches!(
        op,
        Op::Hello {}
            | Op::List {}
            | Op::Stats {}
            | Op::Save {}
            | Op::Conns { .. }
            | Op::Whereis { .. }
            | Op::Trace { .. }
            | Op::Ready { .. }
            | Op::RealFlows { .. }
    )
}

/// Accept connections until the task is dropped.
pub async fn serve(listener: UnixListener, ctx: Arc<Context>, access: Access) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut failures: u64 = 0;
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                failures = 0;
                match slots.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let ctx = ctx.clone();
                        tokio::spawn(async move {
                            serve_conn(stream, ctx, access).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        tokio::spawn(refuse(stream));
                    }
                }
            }
            Err(e) => {
                // Said once, then every 100th time: a full fd table would flood the log.
                if failures.is_multiple_of(100) {
                    log::warn!("accepting a control connection: {e} (retrying)");
                }
                failures += 1;
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

async fn refuse(mut stream: UnixStream) {
    let r = Response::err(
        0,
        ApiError {
            code: ErrorCode::ResourceExhausted,
            field: None,
            message: format!(
                "too many control connections ({MAX_CONNECTIONS} at once): try again when one \
                 closes"
            ),
        },
    );
    let _ = write_response(&mut stream, &r).await;
}

async fn serve_conn(stream: UnixStream, ctx: Arc<Context>, access: Access) {
    // Who is asking, for the log of every change (SO_PEERCRED).
    let peer = match stream.peer_cred() {
        Ok(c) => format!(
            "uid={} pid={}",
            c.uid(),
            c.pid().map_or_else(|| "?".to_string(), |p| p.to_string())
        ),
        Err(_) => "uid=? pid=?".to_string(),
    };
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let mut limited = (&mut reader).take(MAX_LINE as u64 + 1);
        let line = limited.read_until(b'\n', &mut buf);
        match tokio::time::timeout(IDLE_TIMEOUT, line).await {
            Err(_) | Ok(Ok(0)) => return,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                log::debug!("control connection: {e}");
                return;
            }
        }
        if buf.len() > MAX_LINE {
            let r = Response::err(
                0,
                bad_request(format!("request longer than {MAX_LINE} bytes")),
            );
            let _ = write_response(&mut write, &r).await;
            return;
        }
        let response = match serde_json::from_slice::<Request>(&buf) {
            Err(e) => Response::err(0, bad_request(e.to_string())),
            Ok(req) if req.v != PROTOCOL_VERSION => Response::err(
                req.id,
                ApiError {
                    code: ErrorCode::UnsupportedVersion,
                    field: Some("v".into()),
                    message: format!(
                        "protocol version {} is not supported (this daemon speaks {})",
                        req.v, PROTOCOL_VERSION
                    ),
                },
            ),
            Ok(req) if access == Access::ReadOnly && !reads_only(&req.op) => Response::err(
                req.id,
                ApiError {
                    code: ErrorCode::PermissionDenied,
                    field: None,
                    message: format!("{} changes the daemon: refused", op_name(&req.op)),
                },
            ),
            Ok(req) => {
                if reads_only(&req.op) {
                    log::debug!("request {} from {peer}: {}", req.id, op_name(&req.op));
                } else {
                    log::info!("request from {peer}: {}", describe(&req.op));
                }
                match ctx.handle(req.op).await {
                    Ok(result) => Response::ok(req.id, result),
                    Err(e) => Response::err(req.id, e),
                }
            }
        };
        if write_response(&mut write, &response).await.is_err() {
            return;
        }
    }
}

/// A change request as the log shows it: its op and arguments (a config's text cut short).
fn describe(op: &Op) -> String {
    let mut text = serde_json::to_string(op).unwrap_or_default();
    if text.len() > 300 {
        let mut end = 300;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

fn op_name(op: &Op) -> String {
    serde_json::to_value(op)
        .ok()
        .and_then(|v| v.get("op").and_then(|o| o.as_str()).map(String::from))
        .unwrap_or_default()
}

async fn write_response<W: AsyncWriteExt + Unpin>(w: &mut W, r: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(r).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await
}

#[cfg(test)]
pub(super) mod tests {
    use std::{
        io::{BufRead, BufReader, Write},
        sync::Mutex,
        time::{Duration, Instant},
    };

    use super::*;
    use crate::{
        api::Hello,
        core::balancer::Balancer,
        daemon::{handlers::MacStatus, writer},
        dataplane::{fake::FakeDataplane, neigh::KernelNeighbours, Dataplane, Limits},
    };

    pub(crate) fn context() -> Arc<Context> {
        let dp = FakeDataplane::new(Limits::default());
        let counters = Arc::new(dp.counter_reader().expect("reader"));
        let flows = Arc::new(dp.flow_reader().expect("reader"));
        let bal = Balancer::new(dp, Duration::from_secs(900));
        let (writer, view, _stopped) =
            writer::spawn(bal, Box::new(|_| Ok(()))).expect("writer thread");
        Arc::new(Context {
            sync: None,
            changes: Default::default(),
            started_at: std::time::SystemTime::now(),
            announce: None,
            writer,
            view,
            counters,
            flows,
            idle: (Duration::from_secs(900), Duration::from_secs(300)),
            health: Arc::default(),
            neigh: KernelNeighbours::new("lo").expect("lo"),
            tunnel_mtu: None,
            hello: Hello {
                version: "test".into(),
                protocol: PROTOCOL_VERSION,
                layout: lb_common::LAYOUT_VERSION,
                iface: "lo".into(),
                ifaces: vec!["lo".into()],
                xdp_mode: "native".into(),
            },
            started: Instant::now(),
            figures: Default::default(),
            conntrack_capacity: 0,
            macs: Mutex::new(MacStatus::default()),
            maintenance: Default::default(),
            maintenance_file: None,
            stopping: Default::default(),
            trace: None,
        })
    }

    fn ask(stream: &std::os::unix::net::UnixStream, line: &str) -> Response {
        let mut w = stream;
        w.write_all(line.as_bytes()).expect("write");
        let mut answer = String::new();
        BufReader::new(stream).read_line(&mut answer).expect("read");
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
    }

    #[test]
    fn connections_over_the_limit_are_told_so_and_the_others_served() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let path =
            std::env::temp_dir().join(format!("xlb-server-test-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = {
            let _g = rt.enter();
            UnixListener::bind(&path).expect("bind")
        };
        rt.spawn(serve(listener, context(), Access::Full));
        let hello = "{\"id\":1,\"op\":\"hello\"}\n";
        let conns: Vec<_> = (0..MAX_CONNECTIONS)
            .map(|_| {
                let c = std::os::unix::net::UnixStream::connect(&path).expect("connect");
                c.set_read_timeout(Some(Duration::from_secs(5)))
                    .expect("timeout");
                assert!(ask(&c, hello).ok, "a connection within the limit is served");
                c
            })
            .collect();
        let over = std::os::unix::net::UnixStream::connect(&path).expect("connect");
        over.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut answer = String::new();
        BufReader::new(&over)
            .read_line(&mut answer)
            .expect("an answer");
        let r: Response = serde_json::from_str(&answer).expect("a response line");
        let e = r.error.expect("refused");
        assert_eq!(e.code, ErrorCode::ResourceExhausted);
        assert!(
            e.message.contains("too many control connections"),
            "{}",
            e.message
        );
        // Closing one frees its slot.
        drop(conns);
        std::thread::sleep(Duration::from_millis(100));
        let c = std::os::unix::net::UnixStream::connect(&path).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        assert!(ask(&c, hello).ok);
        // A line over the limit is refused, and the connection closed.
        let long = format!(
            "{{\"id\":2,\"op\":\"hello\",\"x\":\"{}\"}}\n",
            "a".repeat(MAX_LINE)
        );
        let r = ask(&c, &long);
        assert!(r.error.expect("refused").message.contains("longer than"));
        let _ = std::fs::remove_file(&path);
    }
}
