//! The `xlb` command line: `xlb daemon` runs the daemon, every other command is a client of
//! its control socket (JSON lines, see `api`), plus `completions` and `man`, which run locally.
//!
//! Arguments are validated here before the daemon is contacted (it validates again and is
//! authoritative), so a typo is reported with the argument at fault and exit code 2.
//!
//! Exit codes: 0 success; 1 the daemon refused the request (or the daemon itself, or writing
//! output, failed); 2 usage or argument error (nothing was sent); 3 the daemon could not be
//! reached or did not answer properly.
//!
//! `--json` (on `list` and `stats`) prints the request's `result` object as one pretty-printed
//! JSON document with `"v": 1` (the output format version) added at its top level, next to its
//! `"kind"` (`"list"` or `"stats"`); the other fields are those of `api::ListReply` and
//! `api::StatsReply`.

use std::{
    ffi::OsString,
    io::{self, BufRead, BufReader, IsTerminal, Read, Write},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

use crate::{
    api::{
        self, ApiError, ApplyReply, ListReply, Op, Reply, Request, Response, StatsReply,
        PROTOCOL_VERSION,
    },
    balancer::{VipFlags, VipSpec, MAX_WEIGHT},
    daemon::{self, DaemonArgs},
};

/// Exit code: the daemon refused the request, or another failure at run time.
pub const EXIT_FAILED: u8 = 1;
/// Exit code: bad usage or argument; nothing was sent to the daemon.
pub const EXIT_USAGE: u8 = 2;
/// Exit code: the daemon could not be reached or did not answer properly.
pub const EXIT_UNREACHABLE: u8 = 3;

/// How long the client waits for the daemon to answer. A mutating request returns once the
/// maps reflect it, which for a large config may take a moment.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest response line the client accepts (a `list` of every VIP and real fits easily).
const MAX_RESPONSE: u64 = 256 << 20;

/// Version of the `--json` output format (the `"v"` field at its top level).
pub const JSON_OUTPUT_VERSION: u32 = 1;

// ---- the command tree ------------------------------------------------------------------------

/// xlb: an XDP Layer-4 load balancer (direct routing, Maglev hashing, connection tracking).
///
/// `xlb daemon` owns the XDP program and its maps on one interface; every other command is a
/// client of the daemon's control socket. VIPs are written PROTO/ADDR:PORT
/// (tcp/10.0.0.100:80, udp/[2001:db8::100]:53; port 0 means every port), reals are bare
/// addresses of servers on the same L2 segment that hold the VIP on their loopback.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "xlb",
    version,
    propagate_version = true,
    after_long_help = "\
Examples:
  xlb daemon --iface eth0
  xlb vip add tcp/10.0.0.100:80
  xlb real add tcp/10.0.0.100:80 10.0.0.11 --weight 3
  xlb real weight tcp/10.0.0.100:80 10.0.0.11 0    (drain: no new flows)
  xlb list
  ipvsadm -S -n | xlb import-ipvsadm --dry-run

Exit status:
  0  success
  1  the daemon refused the request (the message says why; nothing was changed)
  2  usage or argument error (nothing was sent to the daemon)
  3  the daemon could not be reached or did not answer properly"
)]
pub struct Cli {
    /// Control socket of the daemon.
    #[arg(
        long,
        global = true,
        env = "XLB_SOCKET",
        value_name = "PATH",
        default_value = api::DEFAULT_SOCKET,
        display_order = 900
    )]
    pub socket: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Clone, Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: load (or adopt) the XDP program on an interface and serve the socket.
    ///
    /// SIGTERM and SIGINT stop the daemon and leave forwarding running; a new daemon adopts
    /// the pinned program and maps without disturbing traffic. `xlb down` removes everything.
    Daemon(DaemonCmd),
    /// Add or remove virtual services (VIPs).
    #[command(subcommand)]
    Vip(VipCmd),
    /// Add, remove or reweight the real servers of a VIP.
    #[command(subcommand)]
    Real(RealCmd),
    /// Show the VIPs and their reals: weights, MAC addresses, states.
    List {
        /// Print the result as JSON (versioned: "v": 1) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show packet, byte and new-flow counters and rates per VIP and per real.
    ///
    /// Rates are over the interval since the previous `stats` request (0 on the first).
    Stats {
        /// Print the result as JSON (versioned: "v": 1) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Make the running configuration equal to a config file, and print the changes.
    ///
    /// The file is declarative: VIPs and reals it does not name are removed. The whole file is
    /// validated first; a rejected file changes nothing.
    Apply {
        /// Config file (TOML, the format `xlb save` writes); `-` reads standard input.
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
        /// Only show the changes; apply nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print the running configuration as a config file (for `xlb apply -f`).
    Save,
    /// Convert `ipvsadm -S -n` output (read from standard input) and apply it.
    ///
    /// Like ipvsadm-restore, the converted rules replace the running configuration. What
    /// cannot be converted is reported as warnings on standard error.
    ImportIpvsadm {
        /// Only show the changes; apply nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the converted config file instead of contacting the daemon.
        #[arg(long, conflicts_with = "dry_run")]
        print: bool,
    },
    /// Stop the daemon and remove the XDP program, its pinned maps and the socket.
    ///
    /// Forwarding stops: traffic to the VIPs goes to the kernel stack again. With `--iface`,
    /// when no daemon answers (it was killed, or refused to start on pins it cannot adopt),
    /// the pins of that interface are removed directly, which detaches the program.
    Down {
        /// Interface whose pins to remove when no daemon answers.
        #[arg(long)]
        iface: Option<String>,
        /// Pin root the daemon used (with --iface).
        #[arg(long, default_value = "/sys/fs/bpf/xlb")]
        pin_root: PathBuf,
    },
    /// Print a shell completion script to standard output.
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page, or write one page per command into a directory.
    Man {
        /// Write xlb.1, xlb-vip.1, xlb-vip-add.1, ... into this directory instead.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

/// `xlb daemon` arguments: the daemon's own and logging.
#[derive(Clone, Debug, clap::Args)]
pub struct DaemonCmd {
    /// Log level; when given, RUST_LOG is ignored. Default: RUST_LOG if set, else info.
    #[arg(long, value_enum, value_name = "LEVEL")]
    pub log_level: Option<LogLevel>,

    #[command(flatten)]
    pub args: DaemonArgs,
}

/// Log levels of `xlb daemon --log-level`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    /// Nothing.
    Off,
    /// Errors only.
    Error,
    /// Errors and warnings.
    Warn,
    /// Also start-up, configuration changes and unresolved reals.
    Info,
    /// Also each request.
    Debug,
    /// Everything.
    Trace,
}

impl From<LogLevel> for log::LevelFilter {
    fn from(level: LogLevel) -> Self {
        match level {
            LogLevel::Off => log::LevelFilter::Off,
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

/// `xlb vip ...`
#[derive(Clone, Debug, Subcommand)]
pub enum VipCmd {
    /// Add a VIP (it forwards nothing until it has reals).
    Add {
        /// The VIP: tcp/10.0.0.100:80, udp/[2001:db8::100]:53, tcp/10.0.0.100:0 (every port).
        #[arg(value_name = "VIP")]
        vip: String,
        /// Hash without the source port: all connections of a client go to one real.
        #[arg(long)]
        no_src_port: bool,
        /// Do not track connections (a change of reals then moves established flows).
        #[arg(long)]
        no_conntrack: bool,
    },
    /// Remove a VIP and its reals (traffic to it goes to the kernel stack again).
    Del {
        /// The VIP, as given to `xlb vip add`.
        #[arg(value_name = "VIP")]
        vip: String,
    },
}

/// `xlb real ...`
#[derive(Clone, Debug, Subcommand)]
pub enum RealCmd {
    /// Add a real server to a VIP.
    Add {
        /// The VIP, as given to `xlb vip add`.
        #[arg(value_name = "VIP")]
        vip: String,
        /// The real's address (same family as the VIP).
        #[arg(value_name = "REAL")]
        real: String,
        /// Share of new flows, 0 to 65535 (0 = drain: no new flows).
        #[arg(long, value_name = "W", default_value_t = 1)]
        weight: u32,
    },
    /// Remove a real from a VIP (only its flows move to the other reals).
    Del {
        /// The VIP, as given to `xlb vip add`.
        #[arg(value_name = "VIP")]
        vip: String,
        /// The real's address.
        #[arg(value_name = "REAL")]
        real: String,
    },
    /// Change a real's weight; 0 drains it (tracked flows continue, no new flows).
    Weight {
        /// The VIP, as given to `xlb vip add`.
        #[arg(value_name = "VIP")]
        vip: String,
        /// The real's address.
        #[arg(value_name = "REAL")]
        real: String,
        /// The new weight, 0 to 65535.
        #[arg(value_name = "WEIGHT")]
        weight: u32,
    },
}

// ---- errors ----------------------------------------------------------------------------------

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
    match &error.field {
        Some(field) => format!("{} (field: {field})", error.message),
        None => error.message.clone(),
    }
}

impl ClientError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
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

// ---- the client ------------------------------------------------------------------------------

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

// ---- from arguments to a request -------------------------------------------------------------

fn parse_vip(vip: &str) -> Result<VipSpec, CliError> {
    vip.parse::<VipSpec>()
        .map_err(|e| CliError::Usage(e.to_string()))
}

fn parse_real(vip: &VipSpec, real: &str) -> Result<IpAddr, CliError> {
    let addr: IpAddr = real
        .parse()
        .map_err(|_| CliError::Usage(format!("invalid real {real:?}: not an IP address")))?;
    if addr.to_canonical().is_ipv4() != vip.addr.is_ipv4() {
        return Err(CliError::Usage(format!(
            "invalid real {real:?}: VIP {vip} is IPv{} (direct routing forwards the packet \
             unchanged, so a real is of the VIP's family)",
            if vip.addr.is_ipv4() { 4 } else { 6 }
        )));
    }
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

fn read_input(file: &Path, stdin: &mut dyn Read) -> Result<String, CliError> {
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
        | Command::Completions { .. }
        | Command::Man { .. } => return Ok(None),
        Command::Vip(VipCmd::Add {
            vip,
            no_src_port,
            no_conntrack,
        }) => {
            let flags = VipFlags {
                no_src_port: *no_src_port,
                no_conntrack: *no_conntrack,
            };
            Op::VipAdd {
                vip: parse_vip(vip)?.to_string(),
                flags: flags.names().into_iter().map(String::from).collect(),
            }
        }
        Command::Vip(VipCmd::Del { vip }) => Op::VipDel {
            vip: parse_vip(vip)?.to_string(),
        },
        Command::Real(RealCmd::Add { vip, real, weight }) => {
            let vip = parse_vip(vip)?;
            Op::RealAdd {
                real: parse_real(&vip, real)?.to_string(),
                vip: vip.to_string(),
                weight: check_weight(*weight)?,
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

// ---- rendering -------------------------------------------------------------------------------

/// `--json` output: the result object with `"v": 1` at its top level, pretty-printed.
pub fn render_json(reply: &Reply) -> String {
    let mut value = serde_json::to_value(reply).unwrap_or(serde_json::Value::Null);
    if let serde_json::Value::Object(map) = &mut value {
        map.insert("v".into(), JSON_OUTPUT_VERSION.into());
    }
    let mut text = serde_json::to_string_pretty(&value).unwrap_or_default();
    text.push('\n');
    text
}

/// The `xlb list` table: a line per VIP, then a line per real.
pub fn render_list(list: &ListReply) -> String {
    if list.vips.is_empty() {
        return "no VIPs\n".to_string();
    }
    let addr_width = list
        .vips
        .iter()
        .flat_map(|v| v.reals.iter().map(|r| r.addr.len()))
        .max()
        .unwrap_or(0)
        .max("REAL".len());
    let mut out = String::new();
    for (i, vip) in list.vips.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let flags = if vip.flags.is_empty() {
            "none".to_string()
        } else {
            vip.flags.join(",")
        };
        out.push_str(&format!("{}  id {}  flags {flags}\n", vip.vip, vip.id));
        if vip.reals.is_empty() {
            out.push_str("  (no reals)\n");
            continue;
        }
        out.push_str(&format!(
            "  {:<addr_width$}  {:>6}  {:<17}  STATE\n",
            "REAL", "WEIGHT", "MAC"
        ));
        for real in &vip.reals {
            out.push_str(&format!(
                "  {:<addr_width$}  {:>6}  {:<17}  {}\n",
                real.addr,
                real.weight,
                real.mac.as_deref().unwrap_or("-"),
                real.state
            ));
        }
    }
    out
}

/// A rate with an SI prefix: `950`, `12.3k`, `1.25M`.
fn si(value: f64) -> String {
    const PREFIXES: [(f64, &str); 4] = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")];
    for (scale, prefix) in PREFIXES {
        if value >= scale {
            return format!("{:.2}{prefix}", value / scale);
        }
    }
    format!("{value:.0}")
}

/// The `xlb stats` table: a line per VIP and per real, then the global counters.
pub fn render_stats(stats: &StatsReply) -> String {
    let name_width = stats
        .vips
        .iter()
        .flat_map(|v| std::iter::once(v.vip.len()).chain(v.reals.iter().map(|r| r.addr.len() + 2)))
        .max()
        .unwrap_or(0)
        .max("VIP / REAL".len());
    let mut out = String::new();
    if stats.vips.is_empty() {
        out.push_str("no VIPs\n");
    } else {
        out.push_str(&format!(
            "{:<name_width$}  {:>12}  {:>14}  {:>10}  {:>8}  {:>8}  {:>8}\n",
            "VIP / REAL", "PACKETS", "BYTES", "NEW FLOWS", "PPS", "BIT/S", "NO REAL"
        ));
        for vip in &stats.vips {
            let c = &vip.counters;
            out.push_str(&format!(
                "{:<name_width$}  {:>12}  {:>14}  {:>10}  {:>8}  {:>8}  {:>8}\n",
                vip.vip,
                c.packets,
                c.bytes,
                c.new_flows,
                si(c.packets_per_sec),
                si(c.bytes_per_sec * 8.0),
                vip.no_real
            ));
            for real in &vip.reals {
                let c = &real.counters;
                out.push_str(&format!(
                    "{:<name_width$}  {:>12}  {:>14}  {:>10}  {:>8}  {:>8}\n",
                    format!("  {}", real.addr),
                    c.packets,
                    c.bytes,
                    c.new_flows,
                    si(c.packets_per_sec),
                    si(c.bytes_per_sec * 8.0),
                ));
            }
        }
    }
    let nonzero: Vec<String> = stats
        .global
        .iter()
        .filter(|(_, &n)| n != 0)
        .map(|(name, n)| format!("{name} {n}"))
        .collect();
    if nonzero.is_empty() {
        out.push_str("global: all counters zero\n");
    } else {
        out.push_str(&format!("global: {}\n", nonzero.join(", ")));
    }
    if stats.unresolved_reals != 0 {
        out.push_str(&format!(
            "unresolved reals: {} (no MAC address: they take no new flows)\n",
            stats.unresolved_reals
        ));
    }
    out.push_str(&format!(
        "uptime {:.0}s; rates over the interval since the previous `xlb stats`\n",
        stats.uptime_secs
    ));
    out
}

/// What `xlb apply` and `xlb import-ipvsadm` print: the change lines, or `no changes`, and a
/// note when nothing was applied.
pub fn render_apply(reply: &ApplyReply) -> String {
    let mut out = String::new();
    if reply.changes.is_empty() {
        out.push_str("no changes\n");
    }
    for change in &reply.changes {
        out.push_str(change);
        out.push('\n');
    }
    if !reply.applied {
        out.push_str("dry run: nothing was applied\n");
    }
    out
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

// ---- running a command -----------------------------------------------------------------------

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
    let report = crate::config::import_ipvsadm(&text)
        .map_err(|e| CliError::Usage(format!("invalid ipvsadm rules on standard input: {e}")))?;
    for warning in &report.warnings {
        let _ = writeln!(io.stderr, "xlb: warning: {warning}");
    }
    let config = crate::config::render_config(&report.state);
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
    let result = match (client_call(socket, op), &cli.command) {
        (
            Err(ClientError::Connect { .. }),
            Command::Down {
                iface: Some(iface),
                pin_root,
            },
        ) => {
            let dir = pin_root.join(iface);
            crate::ebpf::remove_pins(&dir).map_err(|e| CliError::Failed(e.into()))?;
            return write_out(
                io,
                &format!(
                    "no daemon answered; the pins under {} are removed and the XDP program is \
                     detached\n",
                    dir.display()
                ),
            );
        }
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
        (Command::Down { .. }, _) => write_out(
            io,
            "xlb is down: the program, its maps and the socket are removed\n",
        ),
        // vip/real changes: silent on success, as ipvsadm is.
        _ => Ok(()),
    }
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

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeMap,
        os::unix::net::UnixListener,
        sync::atomic::{AtomicUsize, Ordering},
        thread::JoinHandle,
    };

    use super::*;
    use crate::api::{
        Counters, ErrorCode, RealInfo, RealStatsInfo, SaveReply, VipInfo, VipStatsInfo,
    };

    /// A directory of its own under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "xlb-cli-test-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir)
                .unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
            TempDir(dir)
        }

        fn path(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A daemon that answers one request with `answer(request)` and hands back the request
    /// line it received.
    struct FakeDaemon {
        dir: TempDir,
        socket: PathBuf,
        thread: Option<JoinHandle<String>>,
    }

    impl FakeDaemon {
        fn start(answer: impl FnOnce(&Request) -> Response + Send + 'static) -> FakeDaemon {
            Self::start_raw(move |line| {
                let request: Request = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("the client sent a bad request {line:?}: {e}"));
                let mut text = serde_json::to_string(&answer(&request)).expect("encodes");
                text.push('\n');
                Some(text)
            })
        }

        /// Answer the request line with the given raw text (`None`: close without answering).
        fn start_raw(answer: impl FnOnce(&str) -> Option<String> + Send + 'static) -> FakeDaemon {
            let dir = TempDir::new();
            let socket = dir.path("xlb.sock");
            let listener = UnixListener::bind(&socket)
                .unwrap_or_else(|e| panic!("binding {}: {e}", socket.display()));
            let thread = std::thread::spawn(move || {
                let (stream, _) = listener.accept().expect("accept");
                let mut line = String::new();
                BufReader::new(&stream)
                    .read_line(&mut line)
                    .expect("reading the request");
                if let Some(text) = answer(line.trim_end()) {
                    (&stream)
                        .write_all(text.as_bytes())
                        .expect("writing the answer");
                }
                line
            });
            FakeDaemon {
                dir,
                socket,
                thread: Some(thread),
            }
        }

        fn socket(&self) -> &str {
            self.socket.to_str().expect("utf-8 path")
        }

        /// The request line the daemon received (with its newline).
        fn received(mut self) -> String {
            let line = self
                .thread
                .take()
                .expect("joined once")
                .join()
                .expect("fake daemon thread");
            drop(self.dir);
            line
        }
    }

    struct Outcome {
        code: u8,
        stdout: String,
        stderr: String,
    }

    fn run_cli(args: &[&str], stdin: &str) -> Outcome {
        let mut input = stdin.as_bytes();
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let mut io = Io {
            stdin: &mut input,
            stdout: &mut stdout,
            stderr: &mut stderr,
            stdin_is_tty: false,
        };
        let code = run(std::iter::once("xlb").chain(args.iter().copied()), &mut io);
        Outcome {
            code,
            stdout: String::from_utf8(stdout).expect("utf-8 stdout"),
            stderr: String::from_utf8(stderr).expect("utf-8 stderr"),
        }
    }

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("xlb").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?} does not parse: {e}"))
    }

    fn op_of(args: &[&str]) -> Result<Option<Op>, CliError> {
        to_op(&parse(args).command, &mut io::empty())
    }

    fn usage_error(args: &[&str]) -> String {
        match op_of(args) {
            Err(e @ CliError::Usage(_)) => {
                assert_eq!(e.exit_code(), EXIT_USAGE);
                e.to_string()
            }
            other => panic!("{args:?}: expected a usage error, got {other:?}"),
        }
    }

    fn sample_list() -> ListReply {
        ListReply {
            vips: vec![
                VipInfo {
                    vip: "tcp/10.0.0.100:80".into(),
                    id: 0,
                    flags: vec!["no-src-port".into()],
                    reals: vec![
                        RealInfo {
                            addr: "10.0.0.11".into(),
                            id: 1,
                            weight: 3,
                            mac: Some("02:00:00:00:00:11".into()),
                            state: "active".into(),
                        },
                        RealInfo {
                            addr: "10.0.0.12".into(),
                            id: 2,
                            weight: 0,
                            mac: None,
                            state: "unresolved".into(),
                        },
                    ],
                },
                VipInfo {
                    vip: "udp/[2001:db8::100]:53".into(),
                    id: 1,
                    flags: vec![],
                    reals: vec![],
                },
            ],
        }
    }

    fn counters(packets: u64, bytes: u64, new_flows: u64, pps: f64, bps: f64) -> Counters {
        Counters {
            packets,
            bytes,
            new_flows,
            packets_per_sec: pps,
            bytes_per_sec: bps,
        }
    }

    fn sample_stats() -> StatsReply {
        StatsReply {
            uptime_secs: 42.0,
            vips: vec![VipStatsInfo {
                vip: "tcp/10.0.0.100:80".into(),
                counters: counters(1500, 900_000, 30, 12_345.0, 1_250_000.0),
                no_real: 7,
                reals: vec![RealStatsInfo {
                    addr: "10.0.0.11".into(),
                    counters: counters(1493, 899_000, 29, 950.0, 100.0),
                }],
            }],
            global: BTreeMap::from([
                ("drop_fragment".to_string(), 3),
                ("pass_truncated".to_string(), 0),
                ("pass_not_vip".to_string(), 12),
            ]),
            unresolved_reals: 1,
        }
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn documented_command_lines_become_their_ops() {
        let vip = "tcp/10.0.0.100:80";
        let cases: Vec<(Vec<&str>, Op)> = vec![
            (
                vec!["vip", "add", vip, "--no-src-port", "--no-conntrack"],
                Op::VipAdd {
                    vip: vip.into(),
                    flags: vec!["no-src-port".into(), "no-conntrack".into()],
                },
            ),
            (
                vec!["vip", "add", vip],
                Op::VipAdd {
                    vip: vip.into(),
                    flags: vec![],
                },
            ),
            (
                vec!["vip", "add", "udp/[2001:db8::100]:53"],
                Op::VipAdd {
                    vip: "udp/[2001:db8::100]:53".into(),
                    flags: vec![],
                },
            ),
            (
                vec!["vip", "add", "tcp/10.0.0.100:0"],
                Op::VipAdd {
                    vip: "tcp/10.0.0.100:0".into(),
                    flags: vec![],
                },
            ),
            (vec!["vip", "del", vip], Op::VipDel { vip: vip.into() }),
            (
                vec!["real", "add", vip, "10.0.0.11", "--weight", "3"],
                Op::RealAdd {
                    vip: vip.into(),
                    real: "10.0.0.11".into(),
                    weight: 3,
                },
            ),
            (
                vec!["real", "add", vip, "10.0.0.11"],
                Op::RealAdd {
                    vip: vip.into(),
                    real: "10.0.0.11".into(),
                    weight: 1,
                },
            ),
            (
                vec!["real", "add", "udp/[2001:db8::100]:53", "2001:db8::11"],
                Op::RealAdd {
                    vip: "udp/[2001:db8::100]:53".into(),
                    real: "2001:db8::11".into(),
                    weight: 1,
                },
            ),
            (
                vec!["real", "del", vip, "10.0.0.11"],
                Op::RealDel {
                    vip: vip.into(),
                    real: "10.0.0.11".into(),
                },
            ),
            (
                vec!["real", "weight", vip, "10.0.0.11", "0"],
                Op::RealWeight {
                    vip: vip.into(),
                    real: "10.0.0.11".into(),
                    weight: 0,
                },
            ),
            (vec!["list"], Op::List {}),
            (vec!["list", "--json"], Op::List {}),
            (vec!["stats"], Op::Stats {}),
            (vec!["stats", "--json"], Op::Stats {}),
            (vec!["save"], Op::Save {}),
            (vec!["down"], Op::Down {}),
            // Spelled canonically on the wire.
            (
                vec!["vip", "del", "TCP/10.0.0.100:80"],
                Op::VipDel { vip: vip.into() },
            ),
        ];
        for (args, expected) in cases {
            match op_of(&args) {
                Ok(Some(op)) => assert_eq!(op, expected, "{args:?}"),
                other => panic!("{args:?}: {other:?}"),
            }
        }
        for args in [
            vec!["daemon", "--iface", "eth0"],
            vec!["import-ipvsadm"],
            vec!["completions", "bash"],
            vec!["man"],
        ] {
            assert!(
                matches!(op_of(&args), Ok(None)),
                "{args:?} should run locally"
            );
        }
    }

    #[test]
    fn apply_reads_the_file_or_stdin() {
        let dir = TempDir::new();
        let file = dir.path("xlb.toml");
        std::fs::write(&file, "[[vip]]\n").expect("writing the config");
        let file = file.to_str().expect("utf-8");
        let op = to_op(
            &parse(&["apply", "-f", file, "--dry-run"]).command,
            &mut io::empty(),
        );
        assert!(
            matches!(&op, Ok(Some(Op::Apply { config, dry_run: true })) if config == "[[vip]]\n"),
            "{op:?}"
        );
        let op = to_op(
            &parse(&["apply", "--file", "-"]).command,
            &mut "from stdin".as_bytes(),
        );
        assert!(
            matches!(&op, Ok(Some(Op::Apply { config, dry_run: false })) if config == "from stdin"),
            "{op:?}"
        );
        let missing = dir.path("missing.toml");
        let error = usage_error(&["apply", "-f", missing.to_str().expect("utf-8")]);
        assert!(
            error.starts_with(&format!("cannot read {}: ", missing.display())),
            "{error}"
        );
    }

    #[test]
    fn socket_option_is_accepted_on_every_command() {
        assert_eq!(parse(&["--socket", "/a", "list"]).socket, Path::new("/a"));
        assert_eq!(parse(&["list", "--socket", "/b"]).socket, Path::new("/b"));
        assert_eq!(
            parse(&["vip", "add", "--socket", "/c", "tcp/10.0.0.100:80"]).socket,
            Path::new("/c")
        );
        assert_eq!(
            parse(&[
                "real",
                "weight",
                "tcp/10.0.0.100:80",
                "10.0.0.11",
                "2",
                "--socket",
                "/d"
            ])
            .socket,
            Path::new("/d")
        );
        // The daemon's own --socket is the same option, before or after `daemon`.
        for (args, expected) in [
            (vec!["--socket", "/e", "daemon", "--iface", "eth0"], "/e"),
            (vec!["daemon", "--iface", "eth0", "--socket", "/f"], "/f"),
        ] {
            match parse(&args).command {
                Command::Daemon(cmd) => assert_eq!(cmd.args.socket, Path::new(expected)),
                other => panic!("{args:?}: {other:?}"),
            }
        }
        if std::env::var_os("XLB_SOCKET").is_none() {
            assert_eq!(parse(&["list"]).socket, Path::new(api::DEFAULT_SOCKET));
        }
    }

    #[test]
    fn daemon_arguments_and_log_level_parse() {
        match parse(&["daemon", "--iface", "eth0", "--log-level", "debug"]).command {
            Command::Daemon(cmd) => {
                assert_eq!(cmd.args.iface, "eth0");
                assert_eq!(cmd.log_level, Some(LogLevel::Debug));
                assert_eq!(
                    log::LevelFilter::from(LogLevel::Debug),
                    log::LevelFilter::Debug
                );
            }
            other => panic!("{other:?}"),
        }
        let out = run_cli(&["daemon", "--iface", "eth0", "--log-level", "loud"], "");
        assert_eq!(out.code, EXIT_USAGE, "{}", out.stderr);
    }

    #[test]
    fn invalid_vip_is_refused_locally() {
        assert_eq!(
            usage_error(&["vip", "add", "tcp/10.0.0.300:80"]),
            r#"invalid VIP "tcp/10.0.0.300:80": bad IPv4 address"#
        );
        assert_eq!(
            usage_error(&["real", "add", "sctp/10.0.0.1:80", "10.0.0.11"]),
            r#"invalid VIP "sctp/10.0.0.1:80": unknown protocol "sctp" (expected tcp or udp)"#
        );
        // Through `run`: exit 2 and the message, and the (missing) socket is never tried.
        let out = run_cli(
            &[
                "--socket",
                "/nonexistent/xlb.sock",
                "vip",
                "del",
                "tcp/10.0.0.300:80",
            ],
            "",
        );
        assert_eq!(out.code, EXIT_USAGE);
        assert_eq!(
            out.stderr,
            "xlb: invalid VIP \"tcp/10.0.0.300:80\": bad IPv4 address\n"
        );
        assert_eq!(out.stdout, "");
    }

    #[test]
    fn invalid_real_is_refused_locally() {
        assert_eq!(
            usage_error(&["real", "add", "tcp/10.0.0.100:80", "10.0.0.x"]),
            r#"invalid real "10.0.0.x": not an IP address"#
        );
        assert_eq!(
            usage_error(&["real", "del", "tcp/10.0.0.100:80", "2001:db8::11"]),
            "invalid real \"2001:db8::11\": VIP tcp/10.0.0.100:80 is IPv4 (direct routing \
             forwards the packet unchanged, so a real is of the VIP's family)"
        );
        let out = run_cli(
            &[
                "--socket",
                "/nonexistent/xlb.sock",
                "real",
                "weight",
                "tcp/10.0.0.100:80",
                "x",
                "1",
            ],
            "",
        );
        assert_eq!(out.code, EXIT_USAGE);
        assert_eq!(out.stderr, "xlb: invalid real \"x\": not an IP address\n");
    }

    #[test]
    fn weight_above_the_maximum_is_refused_locally() {
        let vip = "tcp/10.0.0.100:80";
        assert_eq!(
            usage_error(&["real", "add", vip, "10.0.0.11", "--weight", "65536"]),
            "invalid weight 65536: above the maximum 65535"
        );
        assert_eq!(
            usage_error(&["real", "weight", vip, "10.0.0.11", "70000"]),
            "invalid weight 70000: above the maximum 65535"
        );
        assert!(matches!(
            op_of(&["real", "weight", vip, "10.0.0.11", "65535"]),
            Ok(Some(Op::RealWeight { weight: 65535, .. }))
        ));
        // Not a number at all: clap's usage error, exit 2.
        let out = run_cli(&["real", "weight", vip, "10.0.0.11", "heavy"], "");
        assert_eq!(out.code, EXIT_USAGE);
        assert!(out.stderr.contains("heavy"), "{}", out.stderr);
    }

    #[test]
    fn real_add_sends_the_documented_request_line() {
        let daemon = FakeDaemon::start(|req| Response::ok(req.id, None));
        let out = run_cli(
            &[
                "--socket",
                daemon.socket(),
                "real",
                "add",
                "tcp/10.0.0.100:80",
                "10.0.0.11",
                "--weight",
                "3",
            ],
            "",
        );
        let line = daemon.received();
        assert_eq!((out.code, out.stdout.as_str()), (0, ""), "{}", out.stderr);
        assert_eq!(
            line,
            format!(
                "{{\"v\":1,\"id\":{},\"op\":\"real_add\",\"vip\":\"tcp/10.0.0.100:80\",\
                 \"real\":\"10.0.0.11\",\"weight\":3}}\n",
                std::process::id()
            )
        );
    }

    #[test]
    fn refused_request_exits_1_with_the_message_and_field() {
        let daemon = FakeDaemon::start(|req| {
            Response::err(
                req.id,
                ApiError {
                    code: ErrorCode::NotFound,
                    field: Some("real".into()),
                    message: "real 10.0.0.11 is not in VIP tcp/10.0.0.100:80".into(),
                },
            )
        });
        let out = run_cli(
            &[
                "real",
                "del",
                "--socket",
                daemon.socket(),
                "tcp/10.0.0.100:80",
                "10.0.0.11",
            ],
            "",
        );
        assert!(daemon.received().contains(r#""op":"real_del""#));
        assert_eq!(out.code, EXIT_FAILED);
        assert_eq!(
            out.stderr,
            "xlb: real 10.0.0.11 is not in VIP tcp/10.0.0.100:80 (field: real)\n"
        );

        // Without a field, and through client_call directly.
        let daemon = FakeDaemon::start(|req| {
            Response::err(
                req.id,
                ApiError {
                    code: ErrorCode::Internal,
                    field: None,
                    message: "the maps could not be written".into(),
                },
            )
        });
        let error =
            client_call(&daemon.socket.clone(), Op::Down {}).expect_err("the daemon refused");
        drop(daemon.received());
        assert_eq!(error.to_string(), "the maps could not be written");
        assert_eq!(error.exit_code(), EXIT_FAILED);
    }

    #[test]
    fn missing_socket_cannot_reach_the_daemon() {
        let dir = TempDir::new();
        let socket = dir.path("xlb.sock");
        let out = run_cli(&["--socket", socket.to_str().expect("utf-8"), "list"], "");
        assert_eq!(out.code, EXIT_UNREACHABLE);
        assert!(
            out.stderr.starts_with(&format!(
                "xlb: cannot reach the daemon at {}: ",
                socket.display()
            )),
            "{}",
            out.stderr
        );
        assert!(
            out.stderr.ends_with(" (is `xlb daemon` running?)\n"),
            "{}",
            out.stderr
        );
        assert!(matches!(
            client_call(&socket, Op::List {}),
            Err(ClientError::Connect { .. })
        ));
    }

    #[test]
    fn daemon_without_a_proper_answer_is_exit_3() {
        let daemon = FakeDaemon::start_raw(|_| None);
        let out = run_cli(&["--socket", daemon.socket(), "save"], "");
        drop(daemon.received());
        assert_eq!(out.code, EXIT_UNREACHABLE);
        assert!(
            out.stderr
                .contains("closed the connection without answering"),
            "{}",
            out.stderr
        );

        let daemon = FakeDaemon::start_raw(|_| Some("not json\n".into()));
        let out = run_cli(&["--socket", daemon.socket(), "save"], "");
        drop(daemon.received());
        assert_eq!(out.code, EXIT_UNREACHABLE);
        assert!(out.stderr.contains("unexpected answer"), "{}", out.stderr);

        // A result of the wrong kind.
        let daemon = FakeDaemon::start(|req| {
            Response::ok(req.id, Some(Reply::List(ListReply { vips: vec![] })))
        });
        let out = run_cli(&["--socket", daemon.socket(), "stats"], "");
        drop(daemon.received());
        assert_eq!(out.code, EXIT_UNREACHABLE);
        assert!(
            out.stderr
                .contains(r#"expected a "stats" result, got a "list" result"#),
            "{}",
            out.stderr
        );
    }

    #[test]
    fn list_table_shows_vips_reals_macs_and_states() {
        let text = render_list(&sample_list());
        for expected in [
            "tcp/10.0.0.100:80  id 0  flags no-src-port\n",
            "udp/[2001:db8::100]:53  id 1  flags none\n",
            "  (no reals)\n",
            "REAL",
            "WEIGHT",
            "MAC",
            "STATE",
        ] {
            assert!(text.contains(expected), "{expected:?} missing in:\n{text}");
        }
        let line = |addr: &str| {
            text.lines()
                .find(|l| l.trim_start().starts_with(addr))
                .unwrap_or_else(|| panic!("no line for {addr} in:\n{text}"))
                .split_whitespace()
                .collect::<Vec<_>>()
        };
        assert_eq!(
            line("10.0.0.11"),
            ["10.0.0.11", "3", "02:00:00:00:00:11", "active"]
        );
        assert_eq!(line("10.0.0.12"), ["10.0.0.12", "0", "-", "unresolved"]);
        assert_eq!(render_list(&ListReply { vips: vec![] }), "no VIPs\n");
    }

    #[test]
    fn stats_table_shows_counters_rates_and_global_reasons() {
        let text = render_stats(&sample_stats());
        let vip_line: Vec<&str> = text
            .lines()
            .find(|l| l.starts_with("tcp/10.0.0.100:80"))
            .unwrap_or_else(|| panic!("no VIP line in:\n{text}"))
            .split_whitespace()
            .collect();
        // packets, bytes, new flows, pps, bit/s (bytes × 8), no real.
        assert_eq!(
            vip_line,
            [
                "tcp/10.0.0.100:80",
                "1500",
                "900000",
                "30",
                "12.35k",
                "10.00M",
                "7"
            ]
        );
        let real_line: Vec<&str> = text
            .lines()
            .find(|l| l.starts_with("  10.0.0.11"))
            .unwrap_or_else(|| panic!("no real line in:\n{text}"))
            .split_whitespace()
            .collect();
        assert_eq!(
            real_line,
            ["10.0.0.11", "1493", "899000", "29", "950", "800"]
        );
        for expected in [
            "PACKETS",
            "BYTES",
            "NEW FLOWS",
            "PPS",
            "BIT/S",
            "global: drop_fragment 3, pass_not_vip 12\n",
            "unresolved reals: 1",
            "uptime 42s",
        ] {
            assert!(text.contains(expected), "{expected:?} missing in:\n{text}");
        }
        assert!(
            !text.contains("pass_truncated"),
            "zero counter shown:\n{text}"
        );
    }

    #[test]
    fn json_output_is_the_result_with_a_version() {
        let daemon = FakeDaemon::start(|req| {
            assert_eq!(req.op, Op::List {});
            Response::ok(req.id, Some(Reply::List(sample_list())))
        });
        let out = run_cli(&["--socket", daemon.socket(), "list", "--json"], "");
        drop(daemon.received());
        assert_eq!(out.code, 0, "{}", out.stderr);
        let value: serde_json::Value =
            serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout));
        assert_eq!(value["v"], 1);
        assert_eq!(value["kind"], "list");
        assert_eq!(value["vips"][0]["vip"], "tcp/10.0.0.100:80");
        assert_eq!(value["vips"][0]["reals"][1]["mac"], serde_json::Value::Null);

        let daemon = FakeDaemon::start(|req| {
            assert_eq!(req.op, Op::Stats {});
            Response::ok(req.id, Some(Reply::Stats(sample_stats())))
        });
        let out = run_cli(&["--socket", daemon.socket(), "stats", "--json"], "");
        drop(daemon.received());
        assert_eq!(out.code, 0, "{}", out.stderr);
        let value: serde_json::Value =
            serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout));
        assert_eq!(value["v"], 1);
        assert_eq!(value["kind"], "stats");
        assert_eq!(value["vips"][0]["packets"], 1500);
        assert_eq!(value["global"]["drop_fragment"], 3);
    }

    #[test]
    fn apply_prints_the_changes_and_says_when_nothing_was_applied() {
        let dir = TempDir::new();
        let file = dir.path("xlb.toml");
        std::fs::write(&file, "# config\n").expect("writing the config");
        let daemon = FakeDaemon::start(|req| {
            assert_eq!(
                req.op,
                Op::Apply {
                    config: "# config\n".into(),
                    dry_run: true
                }
            );
            Response::ok(
                req.id,
                Some(Reply::Apply(ApplyReply {
                    changes: vec![
                        "+ vip tcp/10.0.0.100:80".into(),
                        "~ real tcp/10.0.0.100:80 10.0.0.11 weight 1 -> 2".into(),
                    ],
                    applied: false,
                })),
            )
        });
        let file = file.to_str().expect("utf-8");
        let out = run_cli(
            &[
                "--socket",
                daemon.socket(),
                "apply",
                "-f",
                file,
                "--dry-run",
            ],
            "",
        );
        drop(daemon.received());
        assert_eq!(out.code, 0, "{}", out.stderr);
        assert_eq!(
            out.stdout,
            "+ vip tcp/10.0.0.100:80\n~ real tcp/10.0.0.100:80 10.0.0.11 weight 1 -> 2\n\
             dry run: nothing was applied\n"
        );
        assert_eq!(
            render_apply(&ApplyReply {
                changes: vec![],
                applied: true
            }),
            "no changes\n"
        );
    }

    #[test]
    fn save_prints_the_config_verbatim_and_down_sends_down() {
        let config = "# xlb config\n[[vip]]\nvip = \"tcp/10.0.0.100:80\"\n";
        let daemon = FakeDaemon::start(move |req| {
            assert_eq!(req.op, Op::Save {});
            Response::ok(
                req.id,
                Some(Reply::Save(SaveReply {
                    config: config.into(),
                })),
            )
        });
        let out = run_cli(&["--socket", daemon.socket(), "save"], "");
        drop(daemon.received());
        assert_eq!(
            (out.code, out.stdout.as_str()),
            (0, config),
            "{}",
            out.stderr
        );

        let daemon = FakeDaemon::start(|req| Response::ok(req.id, None));
        let out = run_cli(&["--socket", daemon.socket(), "down"], "");
        assert!(daemon.received().contains(r#""op":"down""#));
        assert_eq!(out.code, 0, "{}", out.stderr);
    }

    const IPVSADM_RULES: &str = "\
-A -t 10.0.0.100:80 -s wlc
-a -t 10.0.0.100:80 -r 10.0.0.11:80 -g -w 3
-a -t 10.0.0.100:80 -r 10.0.0.12:80 -g -w 1
";

    #[test]
    fn import_ipvsadm_prints_the_converted_config() {
        // --print: no daemon contacted (the socket does not exist).
        let out = run_cli(
            &[
                "--socket",
                "/nonexistent/xlb.sock",
                "import-ipvsadm",
                "--print",
            ],
            IPVSADM_RULES,
        );
        assert_eq!(out.code, 0, "{}", out.stderr);
        let state = crate::config::parse_config(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", out.stdout));
        let expected = crate::config::import_ipvsadm(IPVSADM_RULES).expect("imports");
        assert_eq!(state, expected.state);
        assert!(out.stdout.contains("10.0.0.12"), "{}", out.stdout);
        // The scheduler is ignored, with a warning on stderr.
        assert!(!expected.warnings.is_empty());
        for warning in &expected.warnings {
            assert!(
                out.stderr.contains(&format!("xlb: warning: {warning}\n")),
                "{}",
                out.stderr
            );
        }

        let out = run_cli(&["import-ipvsadm", "--print"], "-A -f 1 -s wlc\n");
        assert_eq!(out.code, EXIT_USAGE);
        assert!(
            out.stderr
                .starts_with("xlb: invalid ipvsadm rules on standard input: line 1: "),
            "{}",
            out.stderr
        );
        assert_eq!(out.stdout, "");
    }

    #[test]
    fn import_ipvsadm_applies_the_converted_config() {
        let rendered = crate::config::render_config(
            &crate::config::import_ipvsadm(IPVSADM_RULES)
                .expect("imports")
                .state,
        );
        let daemon = FakeDaemon::start(move |req| {
            assert_eq!(
                req.op,
                Op::Apply {
                    config: rendered,
                    dry_run: true
                }
            );
            Response::ok(
                req.id,
                Some(Reply::Apply(ApplyReply {
                    changes: vec!["+ vip tcp/10.0.0.100:80".into()],
                    applied: false,
                })),
            )
        });
        let out = run_cli(
            &["--socket", daemon.socket(), "import-ipvsadm", "--dry-run"],
            IPVSADM_RULES,
        );
        drop(daemon.received());
        assert_eq!(out.code, 0, "{}", out.stderr);
        assert_eq!(
            out.stdout,
            "+ vip tcp/10.0.0.100:80\ndry run: nothing was applied\n"
        );
        // --print and --dry-run exclude each other.
        let out = run_cli(&["import-ipvsadm", "--print", "--dry-run"], "");
        assert_eq!(out.code, EXIT_USAGE);
    }

    #[test]
    fn completions_are_generated_for_every_shell() {
        for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
            let out = run_cli(&["completions", shell], "");
            assert_eq!(out.code, 0, "{shell}: {}", out.stderr);
            assert!(
                out.stdout.contains("import-ipvsadm"),
                "{shell}: no subcommands in the script"
            );
        }
    }

    #[test]
    fn man_pages_are_generated() {
        let out = run_cli(&["man"], "");
        assert_eq!(out.code, 0, "{}", out.stderr);
        assert!(
            out.stdout.starts_with(".ie"),
            "not roff: {}",
            &out.stdout[..40]
        );
        assert!(out.stdout.contains("import\\-ipvsadm"), "{}", out.stdout);

        let dir = TempDir::new();
        let pages = dir.path("man1");
        let out = run_cli(&["man", "--out-dir", pages.to_str().expect("utf-8")], "");
        assert_eq!(out.code, 0, "{}", out.stderr);
        for page in [
            "xlb.1",
            "xlb-vip.1",
            "xlb-vip-add.1",
            "xlb-real-weight.1",
            "xlb-daemon.1",
        ] {
            let len = std::fs::metadata(pages.join(page))
                .unwrap_or_else(|e| panic!("{page}: {e}"))
                .len();
            assert!(len > 0, "{page} is empty");
        }
    }

    #[test]
    fn help_and_version_exit_0_on_stdout() {
        let out = run_cli(&["--help"], "");
        assert_eq!(out.code, 0);
        assert!(out.stdout.contains("Exit status:"), "{}", out.stdout);
        let out = run_cli(&["--version"], "");
        assert_eq!(out.code, 0);
        assert_eq!(out.stdout, format!("xlb {}\n", env!("CARGO_PKG_VERSION")));
        let out = run_cli(&["vip"], "");
        assert_eq!(out.code, EXIT_USAGE);
    }
}
