//! The command tree (clap): every command, argument and its help text.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::{api, daemon::DaemonArgs};

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
