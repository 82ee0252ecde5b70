//! `xlb trace`: the daemon's `trace` answers, asked for again and again, one decision a line.

use std::path::Path;

use super::{client::client_call, out_error, CliError, Io};
use crate::{
    api::{Op, Reply, TraceLine},
    model::VipSpec,
};

pub fn run(
    socket: &Path,
    vip: Option<&str>,
    count: Option<u64>,
    json: bool,
    io: &mut Io<'_>,
) -> Result<(), CliError> {
    let vip = vip
        .map(|v| {
            v.parse::<VipSpec>()
                .map_err(|e| CliError::Usage(e.to_string()))
        })
        .transpose()?
        .map(|v| v.to_string());
    let mut left = count;
    while left != Some(0) {
        let max = left.map_or(1000, |n| n.min(1000) as u32);
        let op = Op::Trace {
            vip: vip.clone(),
            max: Some(max),
            wait_ms: Some(1000),
        };
        let reply = match client_call(socket, op)? {
            Some(Reply::Trace(t)) => t,
            other => {
                return Err(CliError::Failed(anyhow::anyhow!(
                    "unexpected answer to trace: {other:?}"
                )))
            }
        };
        let mut out = String::new();
        for line in &reply.events {
            if json {
                out.push_str(&serde_json::to_string(line).map_err(|e| out_error(e.into()))?);
                out.push('\n');
            } else {
                out.push_str(&render(line));
            }
        }
        io.stdout
            .write_all(out.as_bytes())
            .and_then(|()| io.stdout.flush())
            .map_err(out_error)?;
        if reply.lost > 0 {
            let _ = writeln!(io.stderr, "xlb trace: {} decisions lost", reply.lost);
        }
        if let Some(n) = left.as_mut() {
            *n = n.saturating_sub(reply.events.len() as u64);
        }
    }
    Ok(())
}

/// `TIME PROTO SRC:SPORT > DST:DPORT -> REAL (HOW) ACTION [REASON]`.
pub fn render(l: &TraceLine) -> String {
    let addr = |a: &str, p: u16| {
        if a.contains(':') {
            format!("[{a}]:{p}")
        } else {
            format!("{a}:{p}")
        }
    };
    let how = match (l.how.as_str(), l.slot) {
        ("tracked", _) => "tracked entry".to_string(),
        ("stale_repick", Some(s)) => format!("stale entry, ring slot {s}"),
        (_, Some(s)) => format!("ring slot {s}"),
        (h, None) => h.to_string(),
    };
    let mut s = format!(
        "{} {} {} > {} -> {} ({how}) {}",
        l.time,
        l.proto,
        addr(&l.src, l.sport),
        addr(&l.dst, l.dport),
        l.real.as_deref().unwrap_or("no real"),
        l.action,
    );
    if let Some(r) = &l.reason {
        s.push(' ');
        s.push_str(r);
    }
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_names_flow_real_how_and_action() {
        let mut l = TraceLine {
            time: "2026-12-02T19:40:01.123456Z".into(),
            proto: "tcp".into(),
            src: "10.0.0.1".into(),
            sport: 40000,
            dst: "10.0.0.100".into(),
            dport: 80,
            vip: "tcp/10.0.0.100:80".into(),
            real: Some("10.0.1.11".into()),
            how: "ring".into(),
            action: "tx".into(),
            reason: None,
            slot: Some(7),
        };
        assert_eq!(
            render(&l),
            "2026-12-02T19:40:01.123456Z tcp 10.0.0.1:40000 > 10.0.0.100:80 -> 10.0.1.11 \
             (ring slot 7) tx\n"
        );
        l.src = "2001:db8::1".into();
        l.how = "tracked".into();
        l.slot = None;
        l.real = None;
        l.action = "drop".into();
        l.reason = Some("no_real".into());
        assert!(render(&l).contains("[2001:db8::1]:40000 > "));
        assert!(render(&l).ends_with("-> no real (tracked entry) drop no_real\n"));
        let json = serde_json::to_value(&l).expect("json");
        for key in [
            "time", "proto", "src", "sport", "dst", "dport", "vip", "real", "how", "action",
            "reason",
        ] {
            assert!(json.get(key).is_some(), "{key} missing");
        }
    }
}
