//! `xlb real drain`: after the weight is 0, say how many tracked flows are left and, with
//! `--wait`, follow the count down to 0.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use super::{client_call, CliError, ClientError, Io};
use crate::{
    api::{ErrorCode, Op, Reply},
    model::format_duration,
};

/// How often the count is read while waiting.
const POLL: Duration = Duration::from_secs(1);

fn flows(socket: &Path, vip: &str, real: &str) -> Result<u64, ClientError> {
    let op = Op::RealFlows {
        vip: vip.to_string(),
        real: real.to_string(),
    };
    match client_call(socket, op)? {
        Some(Reply::RealFlows(f)) => Ok(f.flows),
        _ => Err(ClientError::Protocol {
            socket: socket.to_path_buf(),
            detail: "expected a \"real_flows\" result".into(),
        }),
    }
}

pub fn after_weight_zero(
    socket: &Path,
    vip: &str,
    real: &str,
    wait: bool,
    timeout: Option<Duration>,
    io: &mut Io<'_>,
) -> Result<(), CliError> {
    let start = Instant::now();
    let mut count = match flows(socket, vip, real) {
        Ok(n) => n,
        Err(ClientError::Refused(e)) if e.code == ErrorCode::FailedPrecondition => {
            // A VIP without connection tracking: its flows left the real with its weight.
            let _ = writeln!(io.stderr, "xlb: note: {}", e.message);
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let line = |io: &mut Io<'_>, n: u64| {
        let text = match n {
            0 => "0 tracked flows: drained\n".to_string(),
            1 => "1 tracked flow\n".to_string(),
            n => format!("{n} tracked flows\n"),
        };
        io.stdout
            .write_all(text.as_bytes())
            .and_then(|()| io.stdout.flush())
            .map_err(|e| CliError::Failed(anyhow::Error::new(e).context("writing the output")))
    };
    line(io, count)?;
    if !wait || count == 0 {
        return Ok(());
    }
    loop {
        if let Some(limit) = timeout {
            if start.elapsed() >= limit {
                return Err(CliError::Failed(anyhow::anyhow!(
                    "timed out after {} with {count} tracked flows left on {real} (its weight \
                     stays 0)",
                    format_duration(limit)
                )));
            }
        }
        std::thread::sleep(POLL);
        let now = flows(socket, vip, real)?;
        if now != count {
            count = now;
            line(io, count)?;
        }
        if count == 0 {
            return Ok(());
        }
    }
}
