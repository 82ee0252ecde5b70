//! The `xlb` command line: `xlb daemon` runs the daemon, every other command is a client of
//! its control socket (JSON lines, see `api`), plus `completions` and `man`, which run locally.
//!
//! Arguments are validated here before the daemon is contacted (it validates again and is
//! authoritative), so a typo is reported with the argument at fault and exit code 2.
//!
//! Exit codes: 0 success; 1 the daemon refused the request (or the daemon itself, or writing
//! output, failed); 2 usage or argument error (nothing was sent); 3 the daemon could not be
//! reached or did not answer properly; 4 the change is live but the daemon could not write
//! its state file (`not_persisted`).
//!
//! `--json` (on `list` and `stats`) prints the request's `result` object as one pretty-printed
//! JSON document with `"v": 1` (the output format version) added at its top level, next to its
//! `"kind"` (`"list"` or `"stats"`); the other fields are those of `api::ListReply` and
//! `api::StatsReply`.

mod args;
mod client;
mod decap;
mod drain;
mod exabgp;
mod render;
#[cfg(test)]
mod tests;
mod top;
mod trace;

use std::{
    ffi::OsString,
    io::{self, IsTerminal, Read, Write},
    path::Path,
    process::ExitCode,
};

pub use args::{CheckCmd, CheckSetArgs, Cli, Command, DaemonCmd, LogLevel, RealCmd, VipCmd};
use clap::{CommandFactory, Parser};
use client::read_input;
pub use client::{
    client_call, to_op, CliError, ClientError, CLIENT_TIMEOUT, EXIT_FAILED, EXIT_NOT_PERSISTED,
    EXIT_UNREACHABLE, EXIT_USAGE,
};
pub use render::{render_apply, render_json, render_list, render_stats, JSON_OUTPUT_VERSION};

use crate::{
    api::{Op, Reply},
    daemon,
};

/// Where a command reads and writes: the process's standard streams, or buffers in tests.
pub struct Io<'a> {
    pub stdin: &'a mut dyn Read,
    pub stdout: &'a mut dyn Write,
    pub stderr: &'a mut dyn Write,
    /// Whether standard input is a terminal (then `import-ipvsadm` says it is reading it).
    pub stdin_is_tty: bool,
}

fn out_error(e: io::Error) -> CliError {
    CliError::Failed(anyhow::Error::new(e).context("writing the output"))
}

fn write_out(io: &mut Io<'_>, text: &str) -> Result<(), CliError> {
    io.stdout
        .write_all(text.as_bytes())
        .and_then(|()| io.stdout.flush())
        .map_err(out_error)
}

fn init_logging(level: Option<LogLevel>) {
    let mut builder = match level {
        Some(level) => {
            let mut b = env_logger::Builder::new();
            b.filter_level(level.into());
            b
        }
        None => env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")),
    };
    builder.target(env_logger::Target::Stderr);
    // Under systemd the journal stamps every line itself.
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.format_timestamp(None);
    }
    // A second initialisation (tests) keeps the first logger.
    let _ = builder.try_init();
}

fn send_apply(
    socket: &Path,
    config: String,
    dry_run: bool,
    io: &mut Io<'_>,
) -> Result<(), CliError> {
    match client_call(socket, Op::Apply { config, dry_run })? {
        Some(Reply::Apply(reply)) => write_out(io, &render_apply(&reply)),
        other => Err(unexpected(socket, "apply", other)),
    }
}

fn import_ipvsadm(
    socket: &Path,
    dry_run: bool,
    print: bool,
    io: &mut Io<'_>,
) -> Result<(), CliError> {
    if io.stdin_is_tty {
        let _ = writeln!(
            io.stderr,
            "xlb: reading `ipvsadm -S -n` rules from standard input (end with Ctrl-D)"
        );
    }
    let text = read_input(Path::new("-"), io.stdin)?;
    let report = crate::core::config::import_ipvsadm(&text)
        .map_err(|e| CliError::Usage(format!("invalid ipvsadm rules on standard input: {e}")))?;
    for warning in &report.warnings {
        let _ = writeln!(io.stderr, "xlb: warning: {warning}");
    }
    let config = crate::core::config::render_config(&report.state);
    if print {
        return write_out(io, &config);
    }
    send_apply(socket, config, dry_run, io)
}

fn import_keepalived(
    socket: &Path,
    file: &Path,
    dry_run: bool,
    print: bool,
    io: &mut Io<'_>,
) -> Result<(), CliError> {
    use crate::core::config::keepalived;
    let report = keepalived::import_keepalived(&keepalived::FsLoader, file)
        .map_err(|e| CliError::Usage(format!("cannot import {}: {e}", file.display())))?;
    for note in &report.notes {
        let _ = writeln!(io.stderr, "xlb: note: {note}");
    }
    for warning in &report.warnings {
        let _ = writeln!(io.stderr, "xlb: warning: {warning}");
    }
    let config = crate::core::config::render_config(&report.state);
    if print {
        return write_out(io, &config);
    }
    send_apply(socket, config, dry_run, io)
}

/// Run a parsed command line.
pub fn execute(cli: Cli, io: &mut Io<'_>) -> Result<(), CliError> {
    let socket = cli.socket.as_path();
    let Some(op) = to_op(&cli.command, io.stdin)? else {
        return match cli.command {
            Command::Daemon(cmd) => {
                init_logging(cmd.log_level);
                daemon::run(cmd.args).map_err(CliError::Failed)
            }
            Command::ImportIpvsadm { dry_run, print } => import_ipvsadm(socket, dry_run, print, io),
            Command::Decap(args) => decap::run(&args, io),
            Command::Announce { interval, .. } => exabgp::run(socket, interval, io),
            Command::Top { interval } => top::run(socket, interval),
            Command::Trace { vip, count, json } => {
                trace::run(socket, vip.as_deref(), count, json, io)
            }
            Command::ImportKeepalived {
                file,
                dry_run,
                print,
            } => import_keepalived(socket, &file, dry_run, print, io),
            Command::Completions { shell } => {
                let mut out = Vec::new();
                clap_complete::generate(shell, &mut Cli::command(), "xlb", &mut out);
                io.stdout.write_all(&out).map_err(out_error)
            }
            Command::Man { out_dir: None } => {
                let mut out = Vec::new();
                clap_mangen::Man::new(Cli::command())
                    .render(&mut out)
                    .map_err(out_error)?;
                io.stdout.write_all(&out).map_err(out_error)
            }
            Command::Man { out_dir: Some(dir) } => std::fs::create_dir_all(&dir)
                .and_then(|()| clap_mangen::generate_to(Cli::command(), &dir))
                .map_err(|e| {
                    CliError::Failed(
                        anyhow::Error::new(e)
                            .context(format!("writing man pages into {}", dir.display())),
                    )
                }),
            _ => unreachable!("to_op returns an op for every client command"),
        };
    };
    if let Command::Ready { json, .. } = &cli.command {
        return ready(client_call(socket, op), *json, io);
    }
    let result = match (client_call(socket, op), &cli.command) {
        (
            Err(ClientError::Connect { .. }),
            Command::Down {
                iface: Some(iface),
                pin_root,
            },
        ) => return down_without_daemon(socket, &pin_dir_of(pin_root, iface), io),
        (r, _) => r?,
    };
    match (&cli.command, result) {
        (Command::List { json }, Some(reply @ Reply::List(_))) if *json => {
            write_out(io, &render_json(&reply))
        }
        (Command::List { .. }, Some(Reply::List(list))) => write_out(io, &render_list(&list)),
        (Command::List { .. }, other) => Err(unexpected(socket, "list", other)),
        (Command::Stats { json }, Some(reply @ Reply::Stats(_))) if *json => {
            write_out(io, &render_json(&reply))
        }
        (Command::Stats { .. }, Some(Reply::Stats(stats))) => write_out(io, &render_stats(&stats)),
        (Command::Stats { .. }, other) => Err(unexpected(socket, "stats", other)),
        (Command::Apply { .. }, Some(Reply::Apply(reply))) => write_out(io, &render_apply(&reply)),
        (Command::Apply { .. }, other) => Err(unexpected(socket, "apply", other)),
        // Verbatim: the daemon's text is the config file.
        (Command::Save, Some(Reply::Save(save))) => write_out(io, &save.config),
        (Command::Save, other) => Err(unexpected(socket, "save", other)),
        (Command::Real(RealCmd::Flows { json, .. }), Some(reply @ Reply::RealFlows(_)))
            if *json =>
        {
            write_out(io, &render_json(&reply))
        }
        (Command::Real(RealCmd::Flows { .. }), Some(Reply::RealFlows(f))) => {
            write_out(io, &format!("{}\n", f.flows))
        }
        (Command::Real(RealCmd::Flows { .. }), other) => {
            Err(unexpected(socket, "real_flows", other))
        }
        (
            Command::Real(RealCmd::Drain {
                vip,
                real,
                wait,
                timeout,
            }),
            _,
        ) => drain::after_weight_zero(socket, vip, real, *wait, *timeout, io),
        (Command::Conns { json: true, .. }, Some(reply @ Reply::Conns(_))) => {
            render::write_json(&reply, &mut *io.stdout).map_err(out_error)
        }
        (Command::Conns { count: true, .. }, Some(Reply::Conns(c))) => {
            write_out(io, &format!("{}\n", c.count))
        }
        (Command::Conns { .. }, Some(Reply::Conns(c))) => write_out(io, &render::render_conns(&c)),
        (Command::Conns { .. }, other) => Err(unexpected(socket, "conns", other)),
        (Command::Whereis { json: true, .. }, Some(reply @ Reply::Whereis(_))) => {
            write_out(io, &render_json(&reply))
        }
        (Command::Whereis { .. }, Some(Reply::Whereis(w))) => {
            write_out(io, &render::render_whereis(&w))
        }
        (Command::Whereis { .. }, other) => Err(unexpected(socket, "whereis", other)),
        (Command::Down { .. }, _) => write_out(
            io,
            "xlb is down: the program, its maps and the socket are removed\n",
        ),
        // vip/real changes: silent on success, as ipvsadm is.
        _ => Ok(()),
    }
}

/// `xlb ready`: 0 when ready; 1 when not (also when no daemon answers: a node nobody runs
/// should receive nothing), each reason on standard error.
fn ready(
    result: Result<Option<Reply>, ClientError>,
    json: bool,
    io: &mut Io<'_>,
) -> Result<(), CliError> {
    let reply = match result {
        Ok(Some(Reply::Ready(r))) => r,
        Ok(other) => {
            return Err(CliError::Failed(anyhow::anyhow!(
                "not ready: unexpected answer {other:?}"
            )))
        }
        Err(e) => return Err(CliError::Failed(anyhow::anyhow!("not ready: {e}"))),
    };
    if json {
        write_out(io, &render_json(&Reply::Ready(reply.clone())))?;
    }
    if reply.ready {
        return Ok(());
    }
    if let Some(reason) = &reply.reason {
        return Err(CliError::Failed(anyhow::anyhow!("not ready: {reason}")));
    }
    let why: Vec<String> = reply
        .vips
        .iter()
        .filter(|v| v.state != "ready")
        .map(|v| format!("{} {}: {}", v.vip, v.state, v.reason))
        .collect();
    Err(CliError::Failed(anyhow::anyhow!(
        "not ready: {}",
        why.join("; ")
    )))
}

/// The pin directory of the daemon that served `iface`: its own (the first `--iface`'s), or
/// the one holding its link when it was another `--iface` of that daemon.
fn pin_dir_of(pin_root: &Path, iface: &str) -> std::path::PathBuf {
    let own = pin_root.join(iface);
    if own.exists() {
        return own;
    }
    let link = crate::dataplane::ebpf::other_link_pin(iface);
    std::fs::read_dir(pin_root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .find(|dir| dir.join(&link).exists())
        .unwrap_or(own)
}

/// `xlb down --iface` when no daemon answers on the socket: the pins are removed directly,
/// unless a daemon of that interface runs after all (it holds the lock: a wrong `--socket`),
/// whose pins are not ours to take. The lock is held while the pins go, so no daemon starts
/// on them meanwhile.
fn down_without_daemon(socket: &Path, dir: &Path, io: &mut Io<'_>) -> Result<(), CliError> {
    let _lock = match daemon::lock(dir) {
        Ok(lock) => lock,
        Err(daemon::LockError::Held { lock, .. }) => {
            return Err(CliError::Failed(anyhow::anyhow!(
                "a daemon runs for {} (it holds {lock}) but does not answer on {}: nothing \
                 was removed; give --socket the socket that daemon serves",
                dir.display(),
                socket.display()
            )))
        }
        Err(e) => return Err(CliError::Failed(e.into())),
    };
    crate::dataplane::ebpf::remove_pins(dir).map_err(|e| CliError::Failed(e.into()))?;
    write_out(
        io,
        &format!(
            "no daemon answered; the pins under {} are removed and the XDP program is \
             detached\n",
            dir.display()
        ),
    )
}

/// Parse `args` (with the program name first), run the command, report errors on `stderr`;
/// returns the exit code.
pub fn run<I, T>(args: I, io: &mut Io<'_>) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version are "errors" printed to stdout with success.
            let mut text = e.render().to_string();
            if !text.ends_with('\n') {
                text.push('\n');
            }
            if e.use_stderr() {
                let _ = io.stderr.write_all(text.as_bytes());
                return EXIT_USAGE;
            }
            let _ = io.stdout.write_all(text.as_bytes());
            return 0;
        }
    };
    match execute(cli, io) {
        Ok(()) => 0,
        // A closed pipe (`xlb list | head`) is not a failure of the command.
        Err(CliError::Failed(e))
            if e.downcast_ref::<io::Error>()
                .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe) =>
        {
            0
        }
        Err(e) => {
            let _ = writeln!(io.stderr, "xlb: {e}");
            e.exit_code()
        }
    }
}

/// The `xlb` binary's entry point.
pub fn main() -> ExitCode {
    // Unlocked handles: the daemon's threads log to stderr while this one waits.
    let mut stdin = io::stdin();
    let stdin_is_tty = stdin.is_terminal();
    let mut io = Io {
        stdin: &mut stdin,
        stdout: &mut io::stdout(),
        stderr: &mut io::stderr(),
        stdin_is_tty,
    };
    ExitCode::from(run(std::env::args_os(), &mut io))
}

fn unexpected(socket: &Path, wanted: &str, got: Option<Reply>) -> CliError {
    let got = match got {
        None => "no result".to_string(),
        Some(reply) => serde_json::to_value(&reply)
            .ok()
            .and_then(|v| v.get("kind").and_then(|k| k.as_str()).map(String::from))
            .map_or_else(|| "another result".into(), |k| format!("a {k:?} result")),
    };
    CliError::Client(ClientError::Protocol {
        socket: socket.to_path_buf(),
        detail: format!("expected a {wanted:?} result, got {got}"),
    })
}
