//! Talking to the daemon: one request line out, one response line back; the errors of that
//! exchange and the exit codes they map to; and the request each command sends, with its
//! arguments checked first.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use super::args::{CheckCmd, CheckSetArgs, Command, OnOff, RealCmd, VipCmd};
use crate::{
    api::{ApiError, ErrorCode, Op, Reply, Request, Response, PROTOCOL_VERSION},
    model::{check_real, parse_real_addr, CheckFields, RealAddr, VipFlags, VipSpec, MAX_WEIGHT},
};

/// Exit code: the daemon refused the request, or another failure at run time.
pub const EXIT_FAILED: u8 = 1;
/// Exit code: bad usage or argument; nothing was sent to the daemon.
pub const EXIT_USAGE: u8 = 2;
/// Exit code: the daemon could not be reached or did not answer properly.
pub const EXIT_UNREACHABLE: u8 = 3;
/// Exit code: the change is live, but the daemon could not write its state file (a restart
/// would not know the change).
pub const EXIT_NOT_PERSISTED: u8 = 4;

/// How long the client waits for the daemon to answer. A mutating request returns once the
/// maps reflect it, which for a large config may take a moment.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest response line the client accepts (a `list` of every VIP and real fits easily).
const MAX_RESPONSE: u64 = 256 << 20;

/// A failed exchange with the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the daemon at {}: {source} (is `xlb daemon` running?)", .socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "no answer from the daemon at {} within {}s (the request may still take effect)",
        .socket.display(),
        CLIENT_TIMEOUT.as_secs()
    )]
    Timeout { socket: PathBuf },
    #[error("lost the connection to the daemon at {}: {source}", .socket.display())]
    Io {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the daemon at {} closed the connection without answering", .socket.display())]
    Closed { socket: PathBuf },
    #[error("unexpected answer from the daemon at {}: {detail}", .socket.display())]
    Protocol { socket: PathBuf, detail: String },
    /// The daemon answered `ok: false`: it refused the request and changed nothing.
    #[error("{}", refusal(.0))]
    Refused(ApiError),
}

fn refusal(error: &ApiError) -> String {
    if error.code == ErrorCode::PermissionDenied {
        return format!(
            "{} (this socket is read-only: changes go through the daemon's main --socket)",
            error.message
        );
    }
    match &error.field {
        Some(field) => format!("{} (field: {field})", error.message),
        None => error.message.clone(),
    }
}

impl ClientError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Refused(e) if e.code == ErrorCode::NotPersisted => EXIT_NOT_PERSISTED,
            ClientError::Refused(_) => EXIT_FAILED,
            _ => EXIT_UNREACHABLE,
        }
    }
}

/// Why a command failed; `Display` is the message after `xlb: `.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A bad argument or input, found before contacting the daemon.
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A local failure at run time (the daemon, writing files).
    #[error("{0:#}")]
    Failed(anyhow::Error),
}

impl CliError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => EXIT_USAGE,
            CliError::Client(e) => e.exit_code(),
            CliError::Failed(_) => EXIT_FAILED,
        }
    }
}

/// Send one request to the daemon at `socket` and wait for its answer.
///
/// Returns the response's `result` (`None` for operations that have none); an `ok: false`
/// answer is `ClientError::Refused`.
pub fn client_call(socket: &Path, op: Op) -> Result<Option<Reply>, ClientError> {
    let id = u64::from(std::process::id());
    let stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        socket: socket.to_path_buf(),
        source,
    })?;
    let io_error = |source: io::Error| {
        if matches!(
            source.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            ClientError::Timeout {
                socket: socket.to_path_buf(),
            }
        } else {
            ClientError::Io {
                socket: socket.to_path_buf(),
                source,
            }
        }
    };
    stream
        .set_read_timeout(Some(CLIENT_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(CLIENT_TIMEOUT)))
        .map_err(io_error)?;

    let request = Request {
        v: PROTOCOL_VERSION,
        id,
        op,
    };
    let mut line = serde_json::to_string(&request).map_err(|e| ClientError::Protocol {
        socket: socket.to_path_buf(),
        detail: format!("cannot encode the request: {e}"),
    })?;
    line.push('\n');
    (&stream).write_all(line.as_bytes()).map_err(io_error)?;

    let mut answer = String::new();
    let read = BufReader::new(&stream)
        .take(MAX_RESPONSE)
        .read_line(&mut answer)
        .map_err(io_error)?;
    if read == 0 {
        return Err(ClientError::Closed {
            socket: socket.to_path_buf(),
        });
    }
    let protocol = |detail: String| ClientError::Protocol {
        socket: socket.to_path_buf(),
        detail,
    };
    let response: Response =
        serde_json::from_str(answer.trim_end()).map_err(|e| protocol(format!("{e}")))?;
    if response.v != PROTOCOL_VERSION {
        return Err(protocol(format!(
            "protocol version {} (this xlb speaks {PROTOCOL_VERSION})",
            response.v
        )));
    }
    if !response.ok {
        return Err(match response.error {
            Some(error) => ClientError::Refused(error),
            None => protocol("ok=false without an error".into()),
        });
    }
    if response.id != id {
        return Err(protocol(format!(
            "answer to request {} (sent {id})",
            response.id
        )));
    }
    Ok(response.result)
}

fn parse_vip(vip: &str) -> Result<VipSpec, CliError> {
    vip.parse::<VipSpec>()
        .map_err(|e| CliError::Usage(e.to_string()))
}

fn parse_real(vip: &VipSpec, real: &str) -> Result<RealAddr, CliError> {
    let addr = parse_real_addr(real).map_err(CliError::Usage)?;
    // The family against the VIP's is the daemon's to check: it depends on the mode.
    check_real(vip, addr, None)
        .map_err(|reason| CliError::Usage(format!("invalid real {real:?}: {reason}")))?;
    Ok(addr)
}

fn check_weight(weight: u32) -> Result<u32, CliError> {
    if weight > MAX_WEIGHT {
        return Err(CliError::Usage(format!(
            "invalid weight {weight}: above the maximum {MAX_WEIGHT}"
        )));
    }
    Ok(weight)
}

pub(super) fn read_input(file: &Path, stdin: &mut dyn Read) -> Result<String, CliError> {
    let mut text = String::new();
    if file == Path::new("-") {
        stdin
            .read_to_string(&mut text)
            .map_err(|e| CliError::Usage(format!("cannot read standard input: {e}")))?;
    } else {
        text = std::fs::read_to_string(file)
            .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", file.display())))?;
    }
    Ok(text)
}

/// The request a command sends, validated; `None` for the commands that run locally
/// (`daemon`, `import-ipvsadm`, `completions`, `man`). `stdin` is read by `apply -f -`.
pub fn to_op(command: &Command, stdin: &mut dyn Read) -> Result<Option<Op>, CliError> {
    let op = match command {
        Command::Daemon(_)
        | Command::ImportIpvsadm { .. }
        | Command::ImportKeepalived { .. }
        | Command::Decap(_)
        | Command::Announce { .. }
        | Command::Top { .. }
        | Command::Trace { .. }
        | Command::Completions { .. }
        | Command::Man { .. } => return Ok(None),
        Command::Vip(VipCmd::Add {
            vip,
            no_src_port,
            no_conntrack,
            mode,
        }) => {
            let flags = VipFlags {
                no_src_port: *no_src_port,
                no_conntrack: *no_conntrack,
            };
            Op::VipAdd {
                vip: parse_vip(vip)?.to_string(),
                flags: flags.names().into_iter().map(String::from).collect(),
                mode: mode.map(|m| m.to_string()),
            }
        }
        Command::Vip(VipCmd::Del { vip }) => Op::VipDel {
            vip: parse_vip(vip)?.to_string(),
        },
        Command::Real(RealCmd::Add {
            vip,
            real,
            weight,
            mode,
        }) => {
            let vip = parse_vip(vip)?;
            Op::RealAdd {
                real: parse_real(&vip, real)?.to_string(),
                vip: vip.to_string(),
                weight: check_weight(*weight)?,
                mode: mode.map(|m| m.to_string()),
            }
        }
        Command::Real(RealCmd::Del { vip, real }) => {
            let vip = parse_vip(vip)?;
            Op::RealDel {
                real: parse_real(&vip, real)?.to_string(),
                vip: vip.to_string(),
            }
        }
        Command::Real(RealCmd::Weight { vip, real, weight }) => {
            let vip = parse_vip(vip)?;
            Op::RealWeight {
                real: parse_real(&vip, real)?.to_string(),
                vip: vip.to_string(),
                weight: check_weight(*weight)?,
            }
        }
        Command::Vip(VipCmd::Set {
            vip,
            quorum,
            sorry_server,
            on_quorum_lost,
            down_flows,
            mode,
        }) => {
            let spec = parse_vip(vip)?;
            if let Some(s) = sorry_server.as_deref().filter(|s| *s != "none") {
                parse_real(&spec, s).map_err(|e| {
                    CliError::Usage(format!("--sorry-server: {e} (or `none` to remove it)"))
                })?;
            }
            if let Some(s) = on_quorum_lost {
                s.parse::<crate::model::OnQuorumLost>()
                    .map_err(|m| CliError::Usage(format!("--on-quorum-lost: {m}")))?;
            }
            if let Some(s) = down_flows {
                s.parse::<crate::model::DownFlows>()
                    .map_err(|m| CliError::Usage(format!("--down-flows: {m}")))?;
            }
            if let Some(m) = mode.as_deref().filter(|m| *m != "default") {
                m.parse::<crate::model::Mode>()
                    .map_err(|e| CliError::Usage(format!("--mode: {e} (or default)")))?;
            }
            if quorum.is_none()
                && sorry_server.is_none()
                && on_quorum_lost.is_none()
                && down_flows.is_none()
                && mode.is_none()
            {
                return Err(CliError::Usage(
                    "nothing to set: give --quorum, --sorry-server, --on-quorum-lost, \
                     --down-flows or --mode"
                        .into(),
                ));
            }
            Op::VipSet {
                vip: spec.to_string(),
                quorum: *quorum,
                sorry_server: sorry_server.clone(),
                on_quorum_lost: on_quorum_lost.clone(),
                down_flows: down_flows.clone(),
                mode: mode.clone(),
            }
        }
        Command::Check(CheckCmd::Set(args)) => check_set(args)?,
        Command::Check(CheckCmd::Del { vip, real }) => {
            let spec = parse_vip(vip)?;
            Op::CheckDel {
                vip: spec.to_string(),
                real: real
                    .as_deref()
                    .map(|r| parse_real(&spec, r).map(|a| a.to_string()))
                    .transpose()?,
            }
        }
        Command::Real(RealCmd::Drain { vip, real, .. }) => {
            let vip = parse_vip(vip)?;
            Op::RealWeight {
                real: parse_real(&vip, real)?.to_string(),
                vip: vip.to_string(),
                weight: 0,
            }
        }
        Command::Real(RealCmd::Flows { vip, real, .. }) => {
            let vip = parse_vip(vip)?;
            Op::RealFlows {
                real: parse_real(&vip, real)?.to_string(),
                vip: vip.to_string(),
            }
        }
        Command::Conns {
            vip, real, count, ..
        } => Op::Conns {
            vip: vip
                .as_deref()
                .map(parse_vip)
                .transpose()?
                .map(|v| v.to_string()),
            real: real
                .as_deref()
                .map(|r| parse_real_addr(r).map_err(CliError::Usage))
                .transpose()?
                .map(|a| a.to_string()),
            count: *count,
        },
        Command::Whereis { vip, client, .. } => {
            let spec = parse_vip(vip)?;
            let addr: std::net::SocketAddr = client.parse().map_err(|_| {
                CliError::Usage(format!(
                    "invalid client {client:?}: expected ADDR:PORT ([ADDR]:PORT for IPv6)"
                ))
            })?;
            Op::Whereis {
                vip: spec.to_string(),
                client: addr.to_string(),
            }
        }
        Command::Ready { vip, .. } => Op::Ready {
            vip: vip
                .as_deref()
                .map(parse_vip)
                .transpose()?
                .map(|v| v.to_string()),
        },
        Command::Maintenance { state } => Op::Maintenance {
            on: *state == OnOff::On,
        },
        Command::List { .. } => Op::List {},
        Command::Stats { .. } => Op::Stats {},
        Command::Apply { file, dry_run } => Op::Apply {
            config: read_input(file, stdin)?,
            dry_run: *dry_run,
        },
        Command::Save => Op::Save {},
        Command::Down { .. } => Op::Down {},
    };
    Ok(Some(op))
}

/// `xlb check set`: the flags as the check object of the `check_set` request, each checked as
/// the daemon will (an error names the flag).
fn check_set(a: &CheckSetArgs) -> Result<Op, CliError> {
    use serde_json::Value;
    let spec = parse_vip(&a.vip)?;
    let real = a
        .real
        .as_deref()
        .map(|r| parse_real(&spec, r))
        .transpose()?;
    let mut check = serde_json::Map::new();
    let mut put = |key: &str, v: Option<Value>| {
        if let Some(v) = v {
            check.insert(key.to_string(), v);
        }
    };
    put("type", a.kind.clone().map(Value::String));
    put("port", a.port.map(Value::from));
    put("target", a.target.clone().map(Value::String));
    put("interval", a.interval.clone().map(Value::String));
    put("timeout", a.timeout.clone().map(Value::String));
    put("rise", a.rise.map(Value::from));
    put("fall", a.fall.map(Value::from));
    put("initial", a.initial.clone().map(Value::String));
    put("path", a.path.clone().map(Value::String));
    put("host", a.host.clone().map(Value::String));
    put("expect_status", a.expect_status.clone().map(Value::String));
    put("send", a.send.clone().map(Value::String));
    put("expect", a.expect.clone().map(Value::String));
    put("name", a.name.clone().map(Value::String));
    put("qtype", a.qtype.clone().map(Value::String));
    if let Some(command) = &a.command {
        let argv = shell_words::split(command)
            .map_err(|e| CliError::Usage(format!("--command {command:?}: {e}")))?;
        put(
            "command",
            Some(Value::Array(argv.into_iter().map(Value::String).collect())),
        );
    }
    put("dynamic", a.dynamic.then_some(Value::Bool(true)));
    let flag = |key: &str| format!("--{}", key.replace('_', "-"));
    let check = Value::Object(check);
    let fields = CheckFields::from_json(&check)
        .map_err(|e| CliError::Usage(format!("{}: {}", flag(&e.key), e.message)))?;
    if real.is_none() {
        fields
            .resolve(&spec)
            .map_err(|e| CliError::Usage(format!("{}: {}", flag(&e.key), e.message)))?;
    }
    Ok(Op::CheckSet {
        vip: spec.to_string(),
        real: real.map(|r| r.to_string()),
        check,
    })
}
