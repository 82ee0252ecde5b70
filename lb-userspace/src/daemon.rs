//! `xlb daemon`: loads (or adopts) the XDP program on one interface, serves the control
//! socket, persists the state, resolves the reals' MACs.

use std::path::PathBuf;

/// How to attach.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum XdpModeArg {
    /// Native, else generic (said in the log).
    #[default]
    Auto,
    Native,
    Generic,
}

/// Forwarding mode. Only direct routing exists so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ForwardMode {
    #[default]
    Dr,
}

/// `xlb daemon` arguments (the CLI parses them with clap).
#[derive(Clone, Debug, clap::Args)]
pub struct DaemonArgs {
    /// Interface to attach to (the one VIP traffic arrives on).
    #[arg(long)]
    pub iface: String,
    #[arg(long, value_enum, default_value_t = ForwardMode::Dr)]
    pub mode: ForwardMode,
    /// State file (config, ids, MACs), written atomically and replayed at start.
    /// Default: /var/lib/xlb/<iface>.json
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Control socket.
    #[arg(long, env = "XLB_SOCKET", default_value = crate::api::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Group allowed to use the socket (mode 0660 instead of 0600).
    #[arg(long)]
    pub socket_group: Option<String>,
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_VIPS)]
    pub max_vips: u32,
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_REALS)]
    pub max_reals: u32,
    /// Maglev ring size M (a prime; ≥ 100 × reals per VIP for an even spread).
    #[arg(long, default_value_t = lb_common::DEFAULT_RING_SIZE)]
    pub ring_size: u32,
    /// Tracked flows in all (each CPU holds its share).
    #[arg(long, default_value_t = lb_common::DEFAULT_CONNTRACK_SIZE)]
    pub conntrack_size: u32,
    #[arg(long, value_enum, default_value_t = XdpModeArg::Auto)]
    pub xdp_mode: XdpModeArg,
    /// Where maps and the XDP link are pinned (a directory per interface below it).
    #[arg(long, default_value = "/sys/fs/bpf/xlb")]
    pub pin_root: PathBuf,
}

/// Run the daemon until SIGTERM/SIGINT (forwarding keeps running) or `xlb down`.
pub fn run(args: DaemonArgs) -> anyhow::Result<()> {
    anyhow::bail!("xlb daemon on {}: not implemented yet", args.iface)
}
