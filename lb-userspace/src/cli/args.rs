//! The command tree (clap): every command, argument and its help text.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::{api, daemon::DaemonArgs, model::Mode};

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
  xlb import-keepalived /etc/keepalived/keepalived.conf --print
  xlb check set tcp/10.0.0.100:80 --type http --path /healthz
  xlb real drain tcp/10.0.0.100:80 10.0.0.11 --wait --timeout 15m

Exit status:
  0  success
  1  the daemon refused the request (the message says why; nothing was changed)
  2  usage or argument error (nothing was sent to the daemon)
  3  the daemon could not be reached or did not answer properly
  4  the change is live, but the daemon could not write its state file: a restart would not
     know it (fix the disk; the next change writes the whole state again)"
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
    Daemon(Box<DaemonCmd>),
    /// Add or remove virtual services (VIPs).
    #[command(subcommand)]
    Vip(VipCmd),
    /// Add, remove, reweight or drain the real servers of a VIP.
    #[command(subcommand)]
    Real(RealCmd),
    /// Set or remove the health check of a VIP or of one of its reals.
    #[command(subcommand)]
    Check(CheckCmd),
    /// Show the VIPs and their reals: weights, MAC addresses, states.
    List {
        /// Print the result as JSON (versioned: "v": 1) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Exit 0 when this node should receive traffic for VIP (for every VIP when none is
    /// named), 1 otherwise with the reasons on standard error.
    ///
    /// Ready: the program attached, quorum held (without checks: a usable real), every checked
    /// real's first result in, and a self-test packet through the program going to the real
    /// the ring predicts. States: starting, ready, draining (maintenance, stopping), down.
    Ready {
        /// `proto/addr:port`, as `xlb vip add` takes it.
        #[arg(value_name = "VIP")]
        vip: Option<String>,
        /// Print `{"ready", "vips": [{"vip", "state", "reason"}]}` (versioned: "v": 1).
        #[arg(long)]
        json: bool,
    },
    /// Maintenance on: every VIP draining (not ready, so announcements are withdrawn) while
    /// the node keeps forwarding what still arrives; off: back to their states. Kept across
    /// daemon restarts.
    Maintenance {
        #[arg(value_enum)]
        state: OnOff,
    },
    /// A live view of the VIPs and reals (rates, state, health, weight) and of the connection
    /// table, refreshed every second: `q` quits, the arrow keys select, `s` cycles the sort
    /// column.
    Top {
        /// How often it refreshes.
        #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = crate::model::parse_duration)]
        interval: std::time::Duration,
    },
    /// List the tracked flows (of a VIP, of a real): client, real, closing or not, idle time,
    /// then the flows per real.
    Conns {
        /// Only this VIP's (`proto/addr:port`).
        #[arg(long, value_name = "VIP")]
        vip: Option<String>,
        /// Only the flows of this real (by address).
        #[arg(long, value_name = "ADDR")]
        real: Option<String>,
        /// Print only the number of flows (an exact count: a walk of the table).
        #[arg(long)]
        count: bool,
        /// Print {"flows": [{"vip", "client", "real", ...}], "per_real": [{"vip", "real",
        /// "flows"}], "count"} (versioned: "v": 1).
        #[arg(long)]
        json: bool,
    },
    /// Forwarding decisions as the kernel makes them, one line each: time, flow, real, how
    /// it was chosen (tracked entry, ring slot N, stale entry), the XDP action and what else
    /// happened. The kernel traces only while this runs. Stops after --count, or at Ctrl-C.
    Trace {
        /// Only this VIP's decisions (`proto/addr:port`).
        #[arg(long, value_name = "VIP")]
        vip: Option<String>,
        /// Stop after N decisions.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        /// One JSON object a line: time, proto, src, sport, dst, dport, vip, real, how,
        /// action, reason, slot.
        #[arg(long)]
        json: bool,
    },
    /// Which real a client's flow goes to now, and why: `REAL (tracked entry)` or `REAL (ring
    /// slot N)`.
    Whereis {
        /// `proto/addr:port`, as `xlb vip add` takes it.
        #[arg(value_name = "VIP")]
        vip: String,
        /// The client's `ADDR:PORT` (`[ADDR]:PORT` for IPv6).
        #[arg(value_name = "CLIENT")]
        client: String,
        /// Print {"real", "reason", "slot"} (versioned: "v": 1).
        #[arg(long)]
        json: bool,
    },
    /// Tell a BGP speaker which VIP addresses to announce as readiness changes. `--exabgp`:
    /// run as an ExaBGP `process` (`run xlb announce --exabgp;`); prints `announce route
    /// A/32 next-hop self` and `withdraw route A/32 next-hop self` lines (`/128` for IPv6). An
    /// address is announced while one of its VIPs is ready; nothing is while the daemon does
    /// not answer.
    Announce {
        /// Speak ExaBGP's text API on standard output.
        #[arg(long, required = true)]
        exabgp: bool,
        /// How often readiness is read.
        #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = crate::model::parse_duration)]
        interval: std::time::Duration,
    },
    /// Show packet, byte and new-flow counters and rates per VIP and per real.
    ///
    /// Rates are over the last second (`--json` adds the last 10 s), sampled by the daemon every
    /// second: every client sees the same.
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
    /// Convert the virtual servers of a keepalived.conf (with their checks, quorum and sorry
    /// server) and apply them.
    ///
    /// The converted config replaces the running configuration. `include` is followed;
    /// keepalived's defaults are kept where a value is absent. What xlb cannot express is
    /// refused (naming the file and line; nothing is applied) or warned about on standard
    /// error; vrrp_* blocks are skipped with a note: keepalived can keep doing VRRP in front of
    /// xlb.
    ImportKeepalived {
        /// The keepalived.conf.
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Only show the changes; apply nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the converted config file instead of contacting the daemon.
        #[arg(long, conflicts_with = "dry_run")]
        print: bool,
    },
    /// Stop the daemon and remove the XDP program, its pinned maps and the socket.
    ///
    /// Forwarding stops: traffic to the VIPs goes to the kernel stack again, on every
    /// interface the daemon serves. With `--iface`, when no daemon answers (it was killed, or
    /// refused to start on pins it cannot adopt), the pins of that interface's daemon are
    /// removed directly (any of its interfaces names it), which detaches the program from all
    /// of them.
    Down {
        /// Interface whose pins to remove when no daemon answers.
        #[arg(long)]
        iface: Option<String>,
        /// Pin root the daemon used (with --iface).
        #[arg(long, default_value = "/sys/fs/bpf/xlb")]
        pin_root: PathBuf,
    },
    /// On a real server of tunnel mode: attach xlb_decap to an interface, which strips the
    /// outer headers (IPIP, IP6IP6, 6in4, 4in6, GUE) of packets to this host's addresses and
    /// passes the inner packet to the stack. It stays attached after the command exits (also
    /// under `ip netns exec`); run it again after adding an address. `--status` prints
    /// `attached` with the program id, XDP mode and counters, or `not attached`.
    Decap(DecapArgs),
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

/// `xlb decap` arguments.
#[derive(Clone, Debug, clap::Args)]
pub struct DecapArgs {
    /// The interface the encapsulated packets arrive on.
    #[arg(long)]
    pub iface: String,
    /// Decapsulate only packets whose inner destination is this VIP (repeatable; default:
    /// any destination).
    #[arg(long, value_name = "ADDR")]
    pub vip: Vec<std::net::IpAddr>,
    /// The UDP port of GUE packets.
    #[arg(long, value_name = "PORT", default_value_t = crate::model::DEFAULT_GUE_PORT)]
    pub gue_port: u16,
    #[arg(long, value_enum, default_value_t = crate::daemon::XdpModeArg::Auto)]
    pub xdp_mode: crate::daemon::XdpModeArg,
    /// Detach it.
    #[arg(long, conflicts_with_all = ["status", "vip"])]
    pub remove: bool,
    /// Show whether it is attached, how, and its counters (exit 0 either way).
    #[arg(long, conflicts_with = "vip")]
    pub status: bool,
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
        /// How its reals are forwarded to unless they say otherwise: dr, tunnel or nat
        /// (default: the daemon's --mode).
        #[arg(long, value_name = "MODE", value_parser = clap::builder::ValueParser::new(str::parse::<Mode>))]
        mode: Option<Mode>,
    },
    /// Remove a VIP and its reals (traffic to it goes to the kernel stack again).
    Del {
        /// The VIP, as given to `xlb vip add`.
        #[arg(value_name = "VIP")]
        vip: String,
    },
    /// Change a VIP's health options (only those given change).
    Set {
        /// The VIP, as given to `xlb vip add`.
        #[arg(value_name = "VIP")]
        vip: String,
        /// Summed weight of healthy reals below which the quorum is lost (default 1).
        #[arg(long, value_name = "N")]
        quorum: Option<u32>,
        /// The server that takes new flows while the quorum is lost, or `none`.
        #[arg(long, value_name = "ADDR|none")]
        sorry_server: Option<String>,
        /// Without a sorry server, what a lost quorum does: every real back in the ring
        /// (fail-open, the default) or drop new flows.
        #[arg(long, value_name = "fail-open|drop")]
        on_quorum_lost: Option<String>,
        /// What becomes of flows tracked to a real whose check fails: they stay (keep, the
        /// default) or re-pick a real (move).
        #[arg(long, value_name = "keep|move")]
        down_flows: Option<String>,
        /// How its reals are forwarded to unless they name their own: dr, tunnel, nat, or
        /// default (the daemon's --mode). A real whose mode changes is resolved again
        /// (its own MAC or its next hop's) before it takes new flows.
        #[arg(long, value_name = "dr|tunnel|nat|default")]
        mode: Option<String>,
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
        /// The real's address (the VIP's family in direct routing and NAT; either in tunnel
        /// mode); a NAT real may serve on another port: ADDR:PORT, [ADDR]:PORT for IPv6.
        #[arg(value_name = "REAL")]
        real: String,
        /// Share of new flows, 0 to 65535 (0 = drain: no new flows).
        #[arg(long, value_name = "W", default_value_t = 1)]
        weight: u32,
        /// dr, tunnel or nat (default: the VIP's mode).
        #[arg(long, value_name = "MODE", value_parser = clap::builder::ValueParser::new(str::parse::<Mode>))]
        mode: Option<Mode>,
    },
    /// Remove a real from a VIP (only its flows move to the other reals).
    Del {
        /// The VIP, as given to `xlb vip add`.
        #[arg(value_name = "VIP")]
        vip: String,
        /// The real, as given to `xlb real add` (ADDR, or ADDR:PORT for a NAT real with a port).
        #[arg(value_name = "REAL")]
        real: String,
    },
    /// Drain a real: weight 0 (no new flows; tracked flows continue); with --wait, return once
    /// no tracked flow names it any more, printing the count as it falls.
    Drain {
        /// The VIP, as given to `xlb vip add`.
        #[arg(value_name = "VIP")]
        vip: String,
        /// The real, as given to `xlb real add` (ADDR, or ADDR:PORT for a NAT real with a port).
        #[arg(value_name = "REAL")]
        real: String,
        /// Wait until the real has no tracked flow left.
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this long (exit status 1), as in 90s or 15m. Default: no limit.
        #[arg(long, value_name = "DURATION", requires = "wait", value_parser = crate::model::parse_duration)]
        timeout: Option<std::time::Duration>,
    },
    /// Print how many tracked flows a real has (not closing, not idle).
    Flows {
        /// The VIP, as given to `xlb vip add`.
        #[arg(value_name = "VIP")]
        vip: String,
        /// The real, as given to `xlb real add` (ADDR, or ADDR:PORT for a NAT real with a port).
        #[arg(value_name = "REAL")]
        real: String,
        /// Print {"vip", "real", "flows"} as JSON (versioned: "v": 1) instead of the number.
        #[arg(long)]
        json: bool,
    },
    /// Change a real's weight; 0 drains it (tracked flows continue, no new flows).
    Weight {
        /// The VIP, as given to `xlb vip add`.
        #[arg(value_name = "VIP")]
        vip: String,
        /// The real, as given to `xlb real add` (ADDR, or ADDR:PORT for a NAT real with a port).
        #[arg(value_name = "REAL")]
        real: String,
        /// The new weight, 0 to 65535.
        #[arg(value_name = "WEIGHT")]
        weight: u32,
    },
}

/// `xlb check ...`
#[derive(Clone, Debug, Subcommand)]
pub enum CheckCmd {
    /// Set the check of a VIP, or with --real a real's own check fields (merged over the VIP's
    /// check). Replaces the check that was there; what is not given takes its default.
    Set(Box<CheckSetArgs>),
    /// Remove the check of a VIP (its reals are then unchecked, unless they have their own), or
    /// with --real a real's own check fields.
    Del {
        /// The VIP, as given to `xlb vip add`.
        #[arg(value_name = "VIP")]
        vip: String,
        /// The real whose own check fields to remove.
        #[arg(long, value_name = "ADDR")]
        real: Option<String>,
    },
}

/// `xlb check set` arguments: the keys of a config file's `[vip.check]`.
#[derive(Clone, Debug, clap::Args)]
pub struct CheckSetArgs {
    /// The VIP, as given to `xlb vip add`.
    #[arg(value_name = "VIP")]
    pub vip: String,
    /// Set this real's own check fields instead of the VIP's check.
    #[arg(long, value_name = "ADDR")]
    pub real: Option<String>,
    /// tcp | http | https | udp | dns | ping | exec | none (required for a VIP's check).
    #[arg(long = "type", value_name = "T")]
    pub kind: Option<String>,
    /// Port probed (default: the VIP's; required for port-0 VIPs).
    #[arg(long, value_name = "P")]
    pub port: Option<u16>,
    /// real: the real's own address (default) | vip: the VIP, through the real's forwarding
    /// path (a real that lost the VIP fails).
    #[arg(long, value_name = "real|vip")]
    pub target: Option<String>,
    /// Time between probes (default 2s).
    #[arg(long, value_name = "D")]
    pub interval: Option<String>,
    /// Time a probe may take (default 1s).
    #[arg(long, value_name = "D")]
    pub timeout: Option<String>,
    /// Consecutive successes to come up (default 2).
    #[arg(long, value_name = "N")]
    pub rise: Option<u32>,
    /// Consecutive failures to go down (default 3).
    #[arg(long, value_name = "N")]
    pub fall: Option<u32>,
    /// Status of a newly added real before its first result: up (default) | down.
    #[arg(long, value_name = "up|down")]
    pub initial: Option<String>,
    /// http/https: the path asked for (default /).
    #[arg(long, value_name = "P")]
    pub path: Option<String>,
    /// http/https: Host header and TLS server name.
    #[arg(long, value_name = "H")]
    pub host: Option<String>,
    /// http/https: statuses that pass, as in 200,204,300-399 (default 200-399).
    #[arg(long, value_name = "S")]
    pub expect_status: Option<String>,
    /// udp: the payload sent (text, or hex:0a0b...).
    #[arg(long, value_name = "S")]
    pub send: Option<String>,
    /// udp: a reply must start with this (without: up unless an ICMP error comes back).
    #[arg(long, value_name = "S")]
    pub expect: Option<String>,
    /// dns: the name asked for.
    #[arg(long, value_name = "N")]
    pub name: Option<String>,
    /// dns: the query type (default A).
    #[arg(long, value_name = "Q")]
    pub qtype: Option<String>,
    /// exec: the program (absolute path) and its arguments, split as a shell would; it gets
    /// XLB_VIP, XLB_REAL and XLB_PORT, and exit 0 means up.
    #[arg(long, value_name = "\"PROGRAM ARGS...\"")]
    pub command: Option<String>,
    /// exec: exit 0 up, 1 down, 2..255 up with weight code - 2 (keepalived's misc_dynamic).
    #[arg(long)]
    pub dynamic: bool,
}

/// `xlb maintenance on|off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}
