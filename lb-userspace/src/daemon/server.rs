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

/// Accept connections until the task is dropped.
pub async fn serve(listener: UnixListener, ctx: Arc<Context>) {
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
                            serve_conn(stream, ctx).await;
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

async fn serve_conn(stream: UnixStream, ctx: Arc<Context>) {
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
            Ok(req) => {
                log::debug!("request {}: {:?}", req.id, op_name(&req.op));
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
