//! `xlb daemon`: loads (or adopts) the XDP program on one interface, serves the control
//! socket, persists the state, resolves the reals' MACs.
//!
//! Parts: `startup` (lock, bpffs, socket, load and attach, replay of the saved state),
//! `writer` (the thread that owns the balancer and the maps, and persists), `handlers` (each
//! request; `health_ops` the health ones and `list`), `server` (the socket), `macs` (the MAC
//! refresh), `health` (the checks).
//!
//! Restart and upgrade are hitless: maps and the XDP link are pinned under
//! `<pin-root>/<iface>/`; SIGTERM/SIGINT stop the daemon and leave forwarding running (as
//! IPVS's rules outlive ipvsadm); a new daemon checks the pins, adopts them, replaces the
//! program on the live link atomically and rewrites no ring that already matches. Only
//! `xlb down` removes program, pins and socket.

pub mod announce;
mod conns;
pub mod figures;
mod handlers;
mod health;
mod health_ops;
mod macs;
mod metrics;
pub mod privileges;
mod ready;
mod server;
mod startup;
pub mod sync;
mod trace;
pub mod tunnel;
mod writer;

use std::{
    path::PathBuf,
    sync::{atomic::AtomicBool, Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
pub use startup::{lock, lock_path, LockError};

use crate::{
    api::{Hello, PROTOCOL_VERSION},
    core::{
        balancer::Balancer,
        state::{self, BootClock, SavedState},
    },
    dataplane::{
        ebpf::KernelLogger, neigh::KernelNeighbours, CounterSource, Dataplane, FlowSource,
    },
    model::{parse_duration, Encap, Mode},
};

/// How to attach.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum XdpModeArg {
    /// Native, else generic (said in the log).
    #[default]
    Auto,
    Native,
    Generic,
}

/// `xlb daemon` arguments (the CLI parses them with clap).
#[derive(Clone, Debug, clap::Args)]
pub struct DaemonArgs {
    /// Interface to attach to (the one VIP traffic arrives on). Repeat it for each interface
    /// the balancer serves (two-arm NAT: the clients' and the reals'); every one runs the same
    /// program, and where a packet leaves is the kernel's routes' answer. The first names the
    /// pin directory and the state file, and its addresses and MTU are tunnel mode's defaults.
    #[arg(long, value_name = "IFACE", required = true)]
    pub iface: Vec<String>,
    /// Forwarding mode of VIPs and reals that name none: dr (direct routing: reals on this
    /// segment), tunnel (encapsulated to reals anywhere routable) or nat (destination
    /// rewritten; the reals route their replies through this host).
    #[arg(long, default_value = "dr", value_parser = clap::builder::ValueParser::new(str::parse::<Mode>))]
    pub mode: Mode,
    /// Tunnel mode's encapsulation: ipip (IPIP, IP6IP6, 6in4, 4in6) or gue (the same behind a
    /// UDP header).
    #[arg(long, default_value = "ipip", value_parser = clap::builder::ValueParser::new(str::parse::<Encap>))]
    pub encap: Encap,
    /// GUE's UDP destination port.
    #[arg(long, value_name = "PORT", default_value_t = crate::model::DEFAULT_GUE_PORT)]
    pub gue_port: u16,
    /// Outer source address of tunnel mode, one per family (default: the interface's primary
    /// address of that family).
    #[arg(long, value_name = "ADDR")]
    pub tunnel_source: Vec<std::net::IpAddr>,
    /// A source address per flow instead: the flow hash fills the host bits of PREFIX (one per
    /// family, 1 to 16 host bits), so that routers' ECMP and the reals' RSS spread IPIP flows.
    #[arg(long, value_name = "PREFIX")]
    pub tunnel_source_prefix: Vec<tunnel::SourcePrefix>,
    /// Largest outer IP packet of tunnel mode (default: the interface's MTU).
    #[arg(long, value_name = "BYTES")]
    pub tunnel_mtu: Option<u16>,
    /// On SIGTERM, first become not ready (every VIP `draining`, so that announcements are
    /// withdrawn) and wait this long before stopping: seconds, or a duration (`1500ms`).
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub withdraw_on_stop: Option<Duration>,
    /// A config file (the format of `xlb apply -f` and `xlb save`) applied after start, once
    /// the saved state is restored, and again on SIGHUP (`systemctl reload`); a file that does
    /// not parse or validate is logged and refused, and the running configuration stays.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Keep a BIRD include file of the ready VIP addresses: `bird:FILE[:RELOAD_CMD]`. FILE gets
    /// one `route A/32 blackhole;` per ready IPv4 VIP address, FILE.6 one `route A/128
    /// blackhole;` per IPv6 one, rewritten atomically on every change; then RELOAD_CMD runs
    /// (`sh -c`, 10 s timeout, default `birdc configure`). SIGTERM leaves the files as they are.
    #[arg(long, value_name = "bird:FILE[:RELOAD_CMD]", value_parser = announce::parse)]
    pub announce: Option<announce::Bird>,
    /// Serve Prometheus figures at http://ADDR:PORT/metrics.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Flow sync: where to receive peers' flows (UDP; ADDR:PORT, or an address for port 8848).
    #[arg(long, value_name = "ADDR:PORT", value_parser = sync::parse_addr)]
    pub sync_listen: Option<std::net::SocketAddr>,
    /// Flow sync: another balancer node's `--sync-listen` (repeat for each).
    #[arg(long, value_name = "ADDR:PORT", value_parser = sync::parse_addr)]
    pub sync_peer: Vec<std::net::SocketAddr>,
    /// Flow sync: the key every message is authenticated with (HMAC-SHA256), the same file on
    /// every node, at least 16 bytes (trailing whitespace is not part of it).
    #[arg(long, value_name = "FILE")]
    pub sync_key_file: Option<PathBuf>,
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
    /// A read-only control socket for monitoring agents (hello, list, stats, save, conns,
    /// whereis, ready, real flows; changes refused with `permission_denied`): mode 0666, or
    /// 0660 with --ro-socket-group.
    #[arg(long, value_name = "PATH")]
    pub ro_socket: Option<PathBuf>,
    /// Group allowed to use the read-only socket (mode 0660 instead of 0666).
    #[arg(long, value_name = "GROUP", requires = "ro_socket")]
    pub ro_socket_group: Option<String>,
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
    /// Idle time after which a tracked TCP flow is forgotten (its next packet is balanced by
    /// the ring again), as in `500ms`, `90s`, `15m`. Also `--tcp-timeout`.
    #[arg(long, visible_alias = "tcp-timeout", value_name = "DURATION", default_value = "900s", value_parser = parse_duration)]
    pub tcp_idle: Duration,
    /// Idle time after which a tracked UDP flow is forgotten. Also `--udp-timeout`.
    #[arg(long, visible_alias = "udp-timeout", value_name = "DURATION", default_value = "300s", value_parser = parse_duration)]
    pub udp_idle: Duration,
    /// Seed of the flow hash that places new flows on the ring: the same on every node of a
    /// cluster (else they place flows differently). Changing it moves the untracked flows.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub hash_seed: u32,
    #[arg(long, value_enum, default_value_t = XdpModeArg::Auto)]
    pub xdp_mode: XdpModeArg,
    /// Where maps and the XDP link are pinned (a directory per interface below it).
    #[arg(long, default_value = "/sys/fs/bpf/xlb")]
    pub pin_root: PathBuf,
    /// Health-check probes run at once, at most (the rest wait their turn).
    #[arg(long, default_value_t = 256)]
    pub check_concurrency: usize,
    /// `target = "vip"` probes leave from port BASE + real id (up to 65535) of the daemon's
    /// probe namespace; replies to those ports from a VIP address are taken for them.
    #[arg(long, value_name = "BASE", default_value_t = health::via::DEFAULT_PORT_BASE)]
    pub probe_port_base: u16,
}

/// How long a freed real id waits before another real gets it: every tracked flow that could
/// still name it must have idled out first. The longest idle timeout, plus as much again up
/// to a minute (for a packet in flight when the real went, and the table's one-second
/// refresh of its time stamps).
impl DaemonArgs {
    /// The first `--iface`: the pin directory's and the state file's name.
    pub fn primary(&self) -> &str {
        self.iface.first().map_or("", String::as_str)
    }
}

/// `--iface` names each interface once.
fn check_ifaces(ifaces: &[String]) -> Result<()> {
    for (i, a) in ifaces.iter().enumerate() {
        if a.is_empty() {
            bail!("--iface: an empty interface name");
        }
        if ifaces[..i].contains(a) {
            bail!("--iface {a}: given twice");
        }
    }
    Ok(())
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    match s.parse::<u64>() {
        Ok(secs) => Ok(Duration::from_secs(secs)),
        Err(_) => parse_duration(s),
    }
}

pub fn quarantine(args: &DaemonArgs) -> Duration {
    let idle = args.tcp_idle.max(args.udp_idle);
    idle + idle.min(Duration::from_secs(60))
}

/// Run the daemon until SIGTERM/SIGINT (forwarding keeps running) or `xlb down`.
pub fn run(args: DaemonArgs) -> Result<()> {
    // Before the first thread: capabilities are per thread.
    privileges::drop_all_but(&privileges::needed(&args))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(run_async(args))
}

async fn run_async(args: DaemonArgs) -> Result<()> {
    check_ifaces(&args.iface)?;
    let primary = args.primary().to_string();
    let pin_dir = args.pin_root.join(&primary);
    let _lock = lock(&pin_dir)?;
    startup::ensure_bpffs(&args.pin_root)?;
    std::fs::create_dir_all(&pin_dir)
        .with_context(|| format!("creating the pin directory {}", pin_dir.display()))?;
    let state_path = args
        .state
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/var/lib/xlb/{primary}.json")));
    let mut saved = state::load(&state_path)?;
    let maintenance_file = ready::maintenance_file(&state_path);
    let maintenance = maintenance_file.exists();
    if maintenance {
        log::info!(
            "maintenance is on ({} exists): every VIP draining until `xlb maintenance off`",
            maintenance_file.display()
        );
    }
    if let Some(saved) = saved.as_mut() {
        startup::drop_stale_egress(saved, |e| startup::egress_holds(e, args.tunnel_mtu));
    }
    if let Some(s) = &saved {
        if s.iface != primary {
            bail!(
                "state file {} belongs to interface {}, not {primary}",
                state_path.display(),
                s.iface,
            );
        }
    }
    let sync_key = sync_key(&args)?;
    let neigh = KernelNeighbours::new(&primary).with_context(|| format!("interface {primary}"))?;
    for other in &args.iface[1..] {
        KernelNeighbours::new(other).with_context(|| format!("interface {other}"))?;
    }
    // Before anything is loaded or attached: a start that cannot serve must change nothing.
    let listener = startup::bind_socket(&args.socket, args.socket_group.as_deref(), 0o600)?;
    let _socket = startup::SocketFile(args.socket.clone());
    let ro_listener = match &args.ro_socket {
        Some(path) => Some(startup::bind_socket(
            path,
            args.ro_socket_group.as_deref(),
            0o666,
        )?),
        None => None,
    };
    let _ro_socket = args.ro_socket.clone().map(startup::SocketFile);
    let (mut dp, _adopted, xdp_mode) = startup::load_and_attach(&args, &pin_dir, &neigh)?;
    if let Some(logger) = dp.take_logger() {
        forward_kernel_logs(logger);
    }
    let trace = match dp.take_tracer().map(trace::Hub::start).transpose() {
        Ok(t) => t,
        Err(e) => {
            log::warn!("xlb trace will not work: {e}");
            None
        }
    };

    let mut bal = Balancer::new(dp, quarantine(&args))
        .with_default_mode(args.mode)
        .with_hash_seed(args.hash_seed);
    startup::restore(&mut bal, saved.as_ref(), &BootClock::now())
        .with_context(|| format!("starting from {}", state_path.display()))?;
    let counters: Arc<dyn CounterSource + Send + Sync> = Arc::new(
        bal.dataplane()
            .counter_reader()
            .context("opening the counters")?,
    );
    let flows: Arc<dyn FlowSource + Send + Sync> = Arc::new(
        bal.dataplane()
            .flow_reader()
            .context("opening the connection table")?,
    );
    let iface = primary.clone();
    let persist_path = state_path.clone();
    let quarantine = bal.quarantine();
    let mut persist: writer::Persist = Box::new(move |snap| {
        let s = SavedState::from_snapshot(&iface, snap, quarantine, &BootClock::now());
        state::save(&persist_path, &s).map_err(|e| e.to_string())
    });
    // The replay may have changed ids or cleared stale ones: write the state as it is now.
    if let Err(e) = persist(&bal.snapshot()) {
        log::error!("persisting the state: {e}");
    }
    let (writer, view, mut stopped) =
        writer::spawn(bal, persist).context("starting the writer thread")?;
    let health_table = Arc::new(health::HealthTable::default());
    let via = Arc::new(health::via::Via::new(
        &primary,
        writer.clone(),
        args.probe_port_base,
        args.max_reals,
    ));
    let checker = health::spawn(
        view.clone(),
        writer.clone(),
        health_table.clone(),
        Some(via.clone()),
        args.check_concurrency,
    )
    .context("starting the health checks")?;
    let sync = match (sync_key, args.sync_listen) {
        (Some(key), Some(listen)) => Some(
            sync::Sync::start(
                sync::Config {
                    listen,
                    peers: args.sync_peer.clone(),
                    key,
                    idle: (args.tcp_idle, args.udp_idle),
                },
                writer.clone(),
                view.clone(),
                flows.clone(),
            )
            .await?,
        ),
        _ => None,
    };
    let figures = Arc::new(figures::Figures::default());
    let sampler = tokio::spawn(figures::run(
        figures.clone(),
        sample_keys(view.clone()),
        counters.clone(),
        flows.clone(),
    ));
    let ctx = Arc::new(handlers::Context {
        sync,
        changes: Default::default(),
        started_at: std::time::SystemTime::now(),
        announce: args.announce.as_ref().map(|b| {
            Mutex::new(crate::api::AnnounceStats {
                file: b.file.display().to_string(),
                announced: Vec::new(),
                writes: 0,
                write_failures: 0,
                reloads: 0,
                reload_failures: 0,
                last_error: None,
            })
        }),
        writer,
        view,
        counters,
        flows,
        idle: (args.tcp_idle, args.udp_idle),
        health: health_table,
        neigh,
        tunnel_mtu: args.tunnel_mtu,
        hello: Hello {
            version: env!("CARGO_PKG_VERSION").to_string(),
            protocol: PROTOCOL_VERSION,
            layout: lb_common::LAYOUT_VERSION,
            iface: primary.clone(),
            xdp_mode: xdp_mode.to_string(),
            ifaces: args.iface.clone(),
        },
        started: Instant::now(),
        figures: figures.clone(),
        conntrack_capacity: u64::from(args.conntrack_size),
        macs: Mutex::new(handlers::MacStatus::default()),
        maintenance: AtomicBool::new(maintenance),
        maintenance_file: Some(maintenance_file),
        stopping: AtomicBool::new(false),
        trace,
    });
    macs::refresh(&ctx).await;
    let refresher = tokio::spawn(macs::refresher(ctx.clone()));
    if let Some(addr) = args.metrics {
        metrics::serve(addr, ctx.clone()).await?;
    }
    let server = tokio::spawn(server::serve(listener, ctx.clone(), server::Access::Full));
    let ro_server =
        ro_listener.map(|l| tokio::spawn(server::serve(l, ctx.clone(), server::Access::ReadOnly)));
    let announcer = args
        .announce
        .clone()
        .map(|bird| tokio::spawn(announce::run(ctx.clone(), bird)));

    if let Some(path) = &args.config {
        ctx.reload_config(path, "--config").await;
    }
    // systemd (Type=notify): attached, restored, configured, and the socket answers.
    notify(&[sd_notify::NotifyState::Ready]);
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    log::info!("serving {}", args.socket.display());
    let writer_running = loop {
        tokio::select! {
            _ = term.recv() => {
                if let Some(wait) = args.withdraw_on_stop.filter(|w| !w.is_zero()) {
                    // Not ready any more, so that the speakers in front withdraw the VIPs,
                    // then the stop. Forwarding goes on meanwhile (and after: the program
                    // stays).
                    ctx.stopping.store(true, std::sync::atomic::Ordering::Relaxed);
                    log::info!(
                        "SIGTERM: not ready; stopping in {} (--withdraw-on-stop)",
                        crate::model::format_duration(wait)
                    );
                    tokio::time::sleep(wait).await;
                }
                log::info!("SIGTERM: stopping; XDP forwarding stays in place");
                notify(&[sd_notify::NotifyState::Stopping]);
                break true;
            }
            _ = hup.recv() => match &args.config {
                Some(path) => {
                    notify(&[sd_notify::NotifyState::Reloading, monotonic_now()]);
                    ctx.reload_config(path, "SIGHUP").await;
                    notify(&[sd_notify::NotifyState::Ready]);
                }
                None => log::warn!("SIGHUP: no --config to reload"),
            },
            _ = tokio::signal::ctrl_c() => {
                log::info!("SIGINT: stopping; XDP forwarding stays in place");
                break true;
            }
            why = &mut stopped => {
                log::info!("writer stopped ({why:?}): stopping");
                break false;
            }
        }
    };
    // `xlb down` waits for its answer: give the connection a moment to write it.
    tokio::time::sleep(Duration::from_millis(50)).await;
    refresher.abort();
    sampler.abort();
    server.abort();
    if let Some(ro) = ro_server {
        ro.abort();
    }
    if let Some(a) = announcer {
        // The files stay as they are: a restart must not withdraw what is announced.
        a.abort();
    }
    checker.abort();
    // The program stays (a restart adopts it): it must stop handing replies to a veth that
    // goes with this process.
    if writer_running {
        via.stop().await;
    }
    Ok(())
}

/// Tell systemd (when it started us with NOTIFY_SOCKET; a no-op otherwise).
fn notify(state: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(false, state) {
        log::warn!("telling systemd {state:?}: {e}");
    }
}

/// CLOCK_MONOTONIC now, which systemd wants with RELOADING=1.
fn monotonic_now() -> sd_notify::NotifyState<'static> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    sd_notify::NotifyState::MonotonicUsec(
        i128::from(ts.tv_sec) * 1_000_000 + i128::from(ts.tv_nsec) / 1000,
    )
}

/// Every VIP and real of the published state, for the sampler.
fn sample_keys(view: tokio::sync::watch::Receiver<Arc<writer::View>>) -> figures::Keys {
    Box::new(move || {
        let v = view.borrow().clone();
        let mut keys = Vec::new();
        for vip in &v.snapshot.vips {
            keys.push(((vip.spec, None), figures::Target::Vip(vip.id)));
            for r in vip.reals.iter().chain(&vip.sorry) {
                keys.push(((vip.spec, Some(r.addr)), figures::Target::Real(r.id)));
            }
        }
        keys
    })
}

/// The flow sync key, when the three sync flags are given (all or none of them).
fn sync_key(args: &DaemonArgs) -> Result<Option<Vec<u8>>> {
    match (
        &args.sync_listen,
        args.sync_peer.is_empty(),
        &args.sync_key_file,
    ) {
        (None, true, None) => Ok(None),
        (Some(_), false, Some(file)) => sync::read_key(file).map(Some),
        (None, _, _) => bail!(
            "--sync-listen: missing (flow sync needs it with --sync-peer and --sync-key-file)"
        ),
        (_, true, _) => bail!("--sync-peer: missing (flow sync needs at least one peer)"),
        (_, _, None) => {
            bail!("--sync-key-file: missing (every sync message is authenticated with it)")
        }
    }
}

/// Forward the XDP program's aya-log records to our log (they say `xlb` as their target).
fn forward_kernel_logs(logger: KernelLogger) {
    // SAFETY: the logger owns its ring buffer's fd for its whole life, and the AsyncFd owns
    // the logger.
    match unsafe { tokio::io::unix::AsyncFd::register(logger) } {
        Ok(mut fd) => {
            tokio::spawn(async move {
                loop {
                    let Ok(mut guard) = fd.readable_mut().await else {
                        return;
                    };
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
            });
        }
        Err(e) => log::warn!("kernel log records will not be shown: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::check_ifaces;

    #[test]
    fn each_interface_is_named_once() {
        let v = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(check_ifaces(&v(&["eth0", "eth1"])).is_ok());
        let e = check_ifaces(&v(&["eth0", "eth1", "eth0"])).unwrap_err();
        assert_eq!(e.to_string(), "--iface eth0: given twice");
        assert!(check_ifaces(&v(&[""])).is_err());
    }
}
