//! `xlb daemon`: loads (or adopts) the XDP program on one interface, serves the control
//! socket, persists the state, resolves the reals' MACs.
//!
//! Restart and upgrade are hitless: maps and the XDP link are pinned under
//! `<pin-root>/<iface>/`; SIGTERM/SIGINT stop the daemon and leave forwarding running (as
//! IPVS's rules outlive ipvsadm); a new daemon checks the pins, adopts them, replaces the
//! program on the live link atomically and rewrites no ring that already matches. Only
//! `xlb down` removes program, pins and socket.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    os::{fd::AsRawFd, unix::fs::PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::Mutex,
};

use crate::{
    api::{
        ApiError, ApplyReply, Counters, ErrorCode, Hello, ListReply, Op, RealInfo, RealStatsInfo,
        Reply, Request, Response, SaveReply, StatsReply, VipInfo, VipStatsInfo, MAX_LINE,
        PROTOCOL_VERSION,
    },
    core::{
        balancer::{Balancer, BalancerError, Change, ValidationError},
        config,
        state::{self, SavedState},
    },
    dataplane::{
        ebpf::{AttachMode, Attached, EbpfDataplane, LoadOptions, LINK_PIN},
        neigh::{self, KernelNeighbours},
        CounterSource, Dataplane, Limits,
    },
    model::{format_mac, is_host_mac, Mac, VipFlags, VipSpec},
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

/// How long a mutating request waits for a new real's MAC before adding it unresolved.
const RESOLVE_WAIT: Duration = Duration::from_millis(1500);
/// How often every real's MAC is re-read (and missing ones probed).
const REFRESH_EVERY: Duration = Duration::from_secs(2);

/// (packets, bytes) per (vip id | 1 << 31, 0) for VIPs and (vip id, real id) for reals.
type StatsSample = HashMap<(u32, u32), (u64, u64)>;

struct Daemon {
    args: DaemonArgs,
    state_path: PathBuf,
    pin_dir: PathBuf,
    bal: Balancer<EbpfDataplane>,
    neigh: KernelNeighbours,
    xdp_mode: &'static str,
    started: Instant,
    /// Last counters sample per (vip, real) id for rates.
    last_stats: Option<(Instant, StatsSample)>,
    /// Reals seen unresolved (logged once each until resolved).
    unresolved: BTreeMap<IpAddr, u64>,
    unresolved_total: u64,
}

/// Run the daemon until SIGTERM/SIGINT (forwarding keeps running) or `xlb down`.
pub fn run(args: DaemonArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(run_async(args))
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into a zeroed struct we own; `c` is a valid C string.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type == libc::BPF_FS_MAGIC
    }
}

/// Pins must live on a bpffs. Under /sys/fs/bpf the daemon mounts it when missing (a fresh
/// machine has none); elsewhere (a lab's own bpffs) it must already be there.
fn ensure_bpffs(pin_root: &Path) -> Result<()> {
    let existing = pin_root
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if is_bpffs(existing) {
        return Ok(());
    }
    let sys = Path::new("/sys/fs/bpf");
    if !pin_root.starts_with(sys) {
        bail!(
            "--pin-root {}: not on a bpffs (mount one there: mount -t bpf bpf DIR)",
            pin_root.display()
        );
    }
    std::fs::create_dir_all(sys).context("creating /sys/fs/bpf")?;
    // SAFETY: mount(2) with static C strings.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c"/sys/fs/bpf".as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("mounting bpffs at /sys/fs/bpf");
    }
    log::info!("mounted bpffs at /sys/fs/bpf");
    Ok(())
}

/// The lock file of the daemon for `pin_dir` (public so that a lab can clean up after it).
pub fn lock_path(pin_dir: &Path) -> PathBuf {
    let name = pin_dir.display().to_string().replace('/', "_");
    Path::new("/run/xlb/locks").join(format!("{name}.lock"))
}

/// One daemon per pin directory (interface): an flock held for the daemon's life.
fn lock(pin_dir: &Path) -> Result<std::fs::File> {
    let path = lock_path(pin_dir);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!(
            "another xlb daemon already runs for {} (lock {} is held)",
            pin_dir.display(),
            path.display()
        );
    }
    Ok(f)
}

async fn run_async(args: DaemonArgs) -> Result<()> {
    let pin_dir = args.pin_root.join(&args.iface);
    let _lock = lock(&pin_dir)?;
    ensure_bpffs(&args.pin_root)?;
    std::fs::create_dir_all(&pin_dir)
        .with_context(|| format!("creating the pin directory {}", pin_dir.display()))?;
    let state_path = args
        .state
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/var/lib/xlb/{}.json", args.iface)));
    let saved = state::load(&state_path)?;
    if let Some(s) = &saved {
        if s.iface != args.iface {
            bail!(
                "state file {} belongs to interface {}, not {}",
                state_path.display(),
                s.iface,
                args.iface
            );
        }
    }
    let neigh =
        KernelNeighbours::new(&args.iface).with_context(|| format!("interface {}", args.iface))?;
    // Before anything is loaded or attached: a start that cannot serve must change nothing.
    let listener = bind_socket(&args)?;
    let _socket = SocketFile(args.socket.clone());

    let opts = LoadOptions {
        limits: Limits {
            max_vips: args.max_vips,
            max_reals: args.max_reals,
            ring_size: args.ring_size,
        },
        conntrack_size: args.conntrack_size,
        ..LoadOptions::default()
    };
    let (mut dp, adopted) = EbpfDataplane::load_pinned(&opts, &pin_dir)
        .with_context(|| format!("loading the XDP program for {}", args.iface))?;
    let mode = match args.xdp_mode {
        XdpModeArg::Auto => AttachMode::Auto,
        XdpModeArg::Native => AttachMode::Native,
        XdpModeArg::Generic => AttachMode::Generic,
    };
    let attached = match dp.attach_pinned(&args.iface, mode, &pin_dir.join(LINK_PIN)) {
        Ok(a) => a,
        Err(e) => {
            // Pins made by this attempt would be adopted by the next start: leave none.
            if !adopted {
                let _ = crate::dataplane::ebpf::remove_pins(&pin_dir);
            }
            if crate::dataplane::ebpf::is_busy(&e) {
                bail!(
                    "{} already has an XDP program attached (another xlb daemon with another \
                     --pin-root, or another tool): detach it first ({e})",
                    args.iface
                );
            }
            return Err(anyhow::Error::new(e).context(format!("attaching XDP to {}", args.iface)));
        }
    };
    let xdp_mode = match attached {
        Attached::Native => "native",
        Attached::Generic => "generic",
        Attached::Replaced => "adopted",
    };
    log::info!(
        "XDP program on {} ({xdp_mode}); maps {} under {}",
        args.iface,
        if adopted { "adopted" } else { "created" },
        pin_dir.display()
    );
    if attached == Attached::Generic {
        log::warn!(
            "{} runs generic (skb) XDP: correct but slower; its driver has no native XDP",
            args.iface
        );
    }

    if let Some(logger) = dp.take_logger() {
        // SAFETY: the logger owns its ring buffer's fd for its whole life, and the AsyncFd
        // owns the logger.
        match unsafe { tokio::io::unix::AsyncFd::register(logger) } {
            Ok(fd) => {
                tokio::spawn(kernel_logs(fd));
            }
            Err(e) => log::warn!("kernel log records will not be shown: {e}"),
        }
    }
    let ct_idle = opts.ct_tcp_idle.max(opts.ct_udp_idle);
    // A freed real id waits out every tracked flow that could still name it.
    let mut bal = Balancer::new(dp, ct_idle + Duration::from_secs(60));
    let restore = match &saved {
        Some(s) => Some(s.to_restore(&state_path)?),
        None => None,
    };
    // VIPs in adopted maps that the state does not name go first: they would forward to
    // reals nobody manages, and they hold VIPS slots the replay may need.
    let known: Vec<lb_common::VipKey> = restore
        .as_ref()
        .map(|(vips, _)| vips.iter().map(|v| v.spec.key()).collect())
        .unwrap_or_default();
    remove_unknown_vips(&mut bal, &known)?;
    if let Some((vips, quarantined)) = &restore {
        let report = bal
            .restore(vips, quarantined)
            .map_err(|e| anyhow::anyhow!("replaying {}: {e}", state_path.display()))?;
        let rewritten = report
            .vips
            .iter()
            .filter(|v| matches!(v.ring, crate::core::balancer::RingUpdate::Rewritten { .. }))
            .count();
        log::info!(
            "restored {} VIPs from {} ({} rings rewritten, {} already live)",
            vips.len(),
            state_path.display(),
            rewritten,
            report.vips.len() - rewritten
        );
    }
    forget_stale_ids(&mut bal)?;

    let daemon = Arc::new(Mutex::new(Daemon {
        state_path,
        pin_dir,
        bal,
        neigh,
        xdp_mode,
        started: Instant::now(),
        last_stats: None,
        unresolved: BTreeMap::new(),
        unresolved_total: 0,
        args,
    }));
    {
        let mut d = daemon.lock().await;
        d.refresh_macs().await;
        let _ = d.persist();
    }
    let (down_tx, mut down_rx) = tokio::sync::mpsc::channel::<()>(1);
    tokio::spawn(refresher(daemon.clone()));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let socket_path = daemon.lock().await.args.socket.clone();
    log::info!("serving {}", socket_path.display());
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(serve_conn(stream, daemon.clone(), down_tx.clone()));
                }
                Err(e) => log::warn!("accept on {}: {e}", socket_path.display()),
            },
            _ = term.recv() => {
                log::info!("SIGTERM: stopping; XDP forwarding stays in place");
                break;
            }
            _ = tokio::signal::ctrl_c() => {
                log::info!("SIGINT: stopping; XDP forwarding stays in place");
                break;
            }
            _ = down_rx.recv() => {
                let d = daemon.lock().await;
                let _ = std::fs::remove_file(lock_path(&d.pin_dir));
                break;
            }
        }
    }
    Ok(())
}

/// Entries in adopted maps that no saved state names (the state file was lost or edited):
/// they would forward to reals nobody manages, so they go.
fn remove_unknown_vips(
    bal: &mut Balancer<EbpfDataplane>,
    known: &[lb_common::VipKey],
) -> Result<()> {
    let stale: Vec<lb_common::VipKey> = bal
        .dataplane()
        .vips()?
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| !known.contains(k))
        .collect();
    for k in stale {
        log::warn!("removing a VIP found in the pinned maps but not in the state file: {k:?}");
        bal.dataplane_mut().del_vip(&k)?;
    }
    Ok(())
}

/// Real and VIP ids alive in adopted maps but unknown to the restored state (a lost or older
/// state file): tracked flows may name those real ids, so they are cleared (the flows
/// re-pick from the ring instead of following an entry nobody manages) and quarantined (no
/// new real gets an id a tracked flow still names).
fn forget_stale_ids(bal: &mut Balancer<EbpfDataplane>) -> Result<()> {
    let snap = bal.snapshot();
    let known_reals: std::collections::BTreeSet<u32> = snap
        .vips
        .iter()
        .flat_map(|v| v.reals.iter().map(|r| r.id))
        .collect();
    let known_vips: std::collections::BTreeSet<u32> = snap.vips.iter().map(|v| v.id).collect();
    let limits = bal.limits();
    let mut stale = Vec::new();
    for id in 1..limits.max_reals {
        if known_reals.contains(&id) {
            continue;
        }
        let real = bal.dataplane().real(id)?;
        if real != lb_common::Real::default() {
            bal.dataplane_mut()
                .set_real(id, &lb_common::Real::default())?;
            stale.push(id);
        }
    }
    for id in 0..limits.max_vips {
        if !known_vips.contains(&id) && bal.dataplane().vip_meta(id)?.in_use != 0 {
            bal.dataplane_mut()
                .set_vip_meta(id, &lb_common::VipMeta::default())?;
        }
    }
    if !stale.is_empty() {
        log::warn!(
            "{} real ids in the pinned maps are not in the state file: cleared and quarantined",
            stale.len()
        );
        bal.quarantine_ids(&stale);
    }
    Ok(())
}

/// Removes the socket file when the daemon stops, however it stops.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn bind_socket(args: &DaemonArgs) -> Result<UnixListener> {
    let path = &args.socket;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        // A socket nobody answers on is left over from a killed daemon (the lock proves no
        // other daemon of this interface runs; another interface's daemon would answer).
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "{} is in use by another running xlb daemon: give this one --socket",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    let mode = if let Some(group) = &args.socket_group {
        let gid = group_id(group)?;
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .context("socket path contains NUL")?;
        // SAFETY: chown of a path we just created; -1 keeps the owner.
        if unsafe { libc::chown(c.as_ptr(), u32::MAX, gid) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("chgrp {group} {}", path.display()));
        }
        0o660
    } else {
        0o600
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))?;
    Ok(listener)
}

fn group_id(name: &str) -> Result<u32> {
    let text = std::fs::read_to_string("/etc/group").context("reading /etc/group")?;
    for line in text.lines() {
        let mut f = line.split(':');
        if f.next() == Some(name) {
            if let Some(gid) = f.nth(1).and_then(|g| g.parse().ok()) {
                return Ok(gid);
            }
        }
    }
    name.parse()
        .with_context(|| format!("--socket-group {name:?}: no such group"))
}

/// Forward the XDP program's aya-log records to our log (they say `xlb` as their target).
async fn kernel_logs(mut fd: tokio::io::unix::AsyncFd<crate::dataplane::ebpf::KernelLogger>) {
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

async fn refresher(daemon: Arc<Mutex<Daemon>>) {
    loop {
        tokio::time::sleep(REFRESH_EVERY).await;
        let mut d = daemon.lock().await;
        if d.refresh_macs().await {
            let _ = d.persist();
        }
    }
}

async fn serve_conn(
    stream: UnixStream,
    daemon: Arc<Mutex<Daemon>>,
    down: tokio::sync::mpsc::Sender<()>,
) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)
            .await
        {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => {
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
        let (response, is_down) = match serde_json::from_slice::<Request>(&buf) {
            Err(e) => (Response::err(0, bad_request(e.to_string())), false),
            Ok(req) if req.v != PROTOCOL_VERSION => (
                Response::err(
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
                false,
            ),
            Ok(req) => {
                let is_down = matches!(req.op, Op::Down {});
                let mut d = daemon.lock().await;
                let r = match d.handle(req.op).await {
                    Ok(result) => Response::ok(req.id, result),
                    Err(e) => Response::err(req.id, e),
                };
                (r, is_down)
            }
        };
        if write_response(&mut write, &response).await.is_err() {
            return;
        }
        if is_down && response.ok {
            let _ = down.send(()).await;
            return;
        }
    }
}

async fn write_response(
    w: &mut tokio::net::unix::OwnedWriteHalf,
    r: &Response,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(r).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await
}

fn bad_request(message: String) -> ApiError {
    ApiError {
        code: ErrorCode::BadRequest,
        field: None,
        message,
    }
}

fn invalid(field: &str, message: String) -> ApiError {
    ApiError {
        code: ErrorCode::InvalidArgument,
        field: Some(field.to_string()),
        message,
    }
}

fn parse_vip(s: &str) -> Result<VipSpec, ApiError> {
    s.parse::<VipSpec>()
        .map_err(|e| invalid("vip", e.to_string()))
}

fn parse_real(s: &str) -> Result<IpAddr, ApiError> {
    s.parse::<IpAddr>()
        .map_err(|_| invalid("real", format!("invalid real {s:?}: not an IP address")))
}

fn balancer_error(e: BalancerError) -> ApiError {
    if let Some(v) = e.validation() {
        let code = match v {
            ValidationError::DuplicateVip { .. } | ValidationError::DuplicateReal { .. } => {
                ErrorCode::AlreadyExists
            }
            ValidationError::UnknownVip { .. } | ValidationError::UnknownReal { .. } => {
                ErrorCode::NotFound
            }
            ValidationError::TooManyVips { .. } | ValidationError::TooManyReals { .. } => {
                ErrorCode::ResourceExhausted
            }
            _ => ErrorCode::InvalidArgument,
        };
        return ApiError {
            code,
            field: Some(v.field().to_string()),
            message: v.to_string(),
        };
    }
    ApiError {
        code: ErrorCode::Internal,
        field: None,
        message: e.to_string(),
    }
}

impl Daemon {
    fn persist(&self) -> Result<(), String> {
        let s = SavedState::from_snapshot(&self.args.iface, &self.bal.snapshot());
        state::save(&self.state_path, &s).map_err(|e| {
            log::error!("persisting the state: {e}");
            e.to_string()
        })
    }

    /// Apply changes and persist them.
    fn commit(&mut self, changes: Vec<Change>) -> Result<(), ApiError> {
        let before = self.bal.snapshot();
        let report = self.bal.apply(changes).map_err(balancer_error)?;
        self.reset_new_counters(&before);
        for v in &report.vips {
            if let Some(w) = &v.spread_warning {
                log::warn!("{}: {w}", v.vip);
            }
        }
        // The change is live but a restart would not know it: the operator must hear that.
        self.persist().map_err(|e| ApiError {
            code: ErrorCode::Internal,
            field: None,
            message: format!(
                "the change is live but the state file could not be written ({e}); a restart \
                 would lose it"
            ),
        })
    }

    /// Zero the counters of VIPs and reals that got their id in the last apply.
    fn reset_new_counters(&mut self, before: &crate::core::balancer::Snapshot) {
        let old_vips: std::collections::BTreeSet<(VipSpec, u32)> =
            before.vips.iter().map(|v| (v.spec, v.id)).collect();
        let old_reals: std::collections::BTreeSet<(VipSpec, IpAddr, u32)> = before
            .vips
            .iter()
            .flat_map(|v| v.reals.iter().map(move |r| (v.spec, r.addr, r.id)))
            .collect();
        let after = self.bal.snapshot();
        let vips: Vec<u32> = after
            .vips
            .iter()
            .filter(|v| !old_vips.contains(&(v.spec, v.id)))
            .map(|v| v.id)
            .collect();
        let reals: Vec<u32> = after
            .vips
            .iter()
            .flat_map(|v| {
                v.reals
                    .iter()
                    .filter(|r| !old_reals.contains(&(v.spec, r.addr, r.id)))
                    .map(|r| r.id)
                    .collect::<Vec<_>>()
            })
            .collect();
        let dp = self.bal.dataplane_mut();
        let reset = vips
            .iter()
            .try_for_each(|id| dp.reset_vip_stats(*id))
            .and_then(|()| reals.iter().try_for_each(|id| dp.reset_real_stats(*id)));
        if let Err(e) = reset {
            log::warn!("zeroing the counters of new VIPs/reals: {e}");
        }
    }

    /// MACs of `addrs`, probing the missing ones and waiting a bounded time.
    async fn resolve(&mut self, addrs: &[IpAddr]) -> HashMap<IpAddr, Option<Mac>> {
        match neigh::resolve_all(&self.neigh, addrs, RESOLVE_WAIT).await {
            Ok(m) => m
                .into_iter()
                .map(|(a, mac)| (a, mac.filter(is_host_mac)))
                .collect(),
            Err(e) => {
                log::warn!("resolving MACs: {e}");
                addrs.iter().map(|a| (*a, None)).collect()
            }
        }
    }

    /// Re-read every real's MAC from the kernel's neighbour table; returns whether anything
    /// changed in the maps.
    async fn refresh_macs(&mut self) -> bool {
        let snap = self.bal.snapshot();
        let mut current: BTreeMap<IpAddr, Option<Mac>> = BTreeMap::new();
        for v in &snap.vips {
            for r in &v.reals {
                current.insert(r.addr, r.mac);
            }
        }
        if current.is_empty() {
            return false;
        }
        let table = match self.neigh.dump() {
            Ok(t) => t
                .into_iter()
                .filter(|(_, mac)| is_host_mac(mac))
                .collect::<HashMap<_, _>>(),
            Err(e) => {
                log::warn!("reading the neighbour table: {e}");
                return false;
            }
        };
        let mut changes = Vec::new();
        for (addr, mac) in &current {
            match table.get(addr) {
                Some(found) => {
                    if self.unresolved.remove(addr).is_some() {
                        log::info!("real {addr} resolved to {}", format_mac(found));
                    }
                    if *mac != Some(*found) {
                        if mac.is_some() {
                            log::info!("real {addr} moved to MAC {}", format_mac(found));
                        }
                        changes.push(Change::SetMac {
                            vip: None,
                            addr: *addr,
                            mac: Some(*found),
                        });
                    }
                }
                None => {
                    if let Err(e) = self.neigh.probe(*addr) {
                        log::debug!("probing {addr}: {e}");
                    }
                    // An entry that aged out keeps its last MAC; only a real never resolved
                    // is unresolved (it takes no new flows).
                    if mac.is_none() {
                        let n = self.unresolved.entry(*addr).or_insert(0);
                        if *n == 0 {
                            log::warn!(
                                "real {addr}: no MAC on {} yet (ARP/ND probing); it takes no \
                                 new flows until resolved",
                                self.args.iface
                            );
                            self.unresolved_total += 1;
                        }
                        *n += 1;
                    }
                }
            }
        }
        // One at a time: a neighbour entry the balancer refuses (a static multicast MAC, say)
        // must not hold back the other reals' updates.
        let mut changed = false;
        for c in changes {
            match self.bal.apply(vec![c]) {
                Ok(_) => changed = true,
                Err(e) => log::error!("updating a MAC: {e}"),
            }
        }
        changed
    }

    async fn handle(&mut self, op: Op) -> Result<Option<Reply>, ApiError> {
        match op {
            Op::Hello {} => Ok(Some(Reply::Hello(Hello {
                version: env!("CARGO_PKG_VERSION").to_string(),
                protocol: PROTOCOL_VERSION,
                layout: lb_common::LAYOUT_VERSION,
                iface: self.args.iface.clone(),
                xdp_mode: self.xdp_mode.to_string(),
            }))),
            Op::VipAdd { vip, flags } => {
                let spec = parse_vip(&vip)?;
                let flags = VipFlags::from_names(flags.iter().map(String::as_str))
                    .map_err(|e| invalid("flags", e.to_string()))?;
                self.commit(vec![Change::AddVip { spec, flags }])?;
                Ok(None)
            }
            Op::VipDel { vip } => {
                let spec = parse_vip(&vip)?;
                self.commit(vec![Change::DelVip { spec }])?;
                Ok(None)
            }
            Op::RealAdd { vip, real, weight } => {
                let spec = parse_vip(&vip)?;
                let addr = parse_real(&real)?;
                // Validate before waiting on ARP: a bad request answers at once.
                if self.bal.vip_id(&spec).is_none() {
                    return Err(ApiError {
                        code: ErrorCode::NotFound,
                        field: Some("vip".into()),
                        message: format!("VIP {spec} does not exist"),
                    });
                }
                let mac = self.known_mac(addr);
                let mac = match mac {
                    Some(m) => Some(m),
                    None => self.resolve(&[addr]).await.remove(&addr).flatten(),
                };
                if mac.is_none() {
                    log::warn!("real {addr}: MAC unresolved; added without new flows until it is");
                }
                self.commit(vec![Change::AddReal {
                    vip: spec,
                    addr,
                    weight,
                    mac,
                }])?;
                Ok(None)
            }
            Op::RealDel { vip, real } => {
                let spec = parse_vip(&vip)?;
                let addr = parse_real(&real)?;
                self.commit(vec![Change::DelReal { vip: spec, addr }])?;
                Ok(None)
            }
            Op::RealWeight { vip, real, weight } => {
                let spec = parse_vip(&vip)?;
                let addr = parse_real(&real)?;
                self.commit(vec![Change::SetWeight {
                    vip: spec,
                    addr,
                    weight,
                }])?;
                Ok(None)
            }
            Op::List {} => Ok(Some(Reply::List(self.list()))),
            Op::Stats {} => self.stats().map(|s| Some(Reply::Stats(s))),
            Op::Apply { config, dry_run } => self.apply_config(&config, dry_run).await,
            Op::Save {} => {
                let desired = config::DesiredState::from_snapshot(&self.bal.snapshot());
                Ok(Some(Reply::Save(SaveReply {
                    config: config::render_config(&desired),
                })))
            }
            Op::Down {} => {
                // Done before answering: `xlb down` returns once the program is gone.
                let dir = self.pin_dir.clone();
                let dp = self.bal.dataplane_mut();
                dp.detach()
                    .and_then(|()| dp.remove_pins())
                    .map_err(|e| ApiError {
                        code: ErrorCode::Internal,
                        field: None,
                        message: format!("removing the pins under {}: {e}", dir.display()),
                    })?;
                log::info!(
                    "down: XDP program detached, pins under {} removed",
                    dir.display()
                );
                Ok(None)
            }
        }
    }

    /// A MAC already known for this address (the same real in another VIP).
    fn known_mac(&self, addr: IpAddr) -> Option<Mac> {
        self.bal
            .snapshot()
            .vips
            .iter()
            .flat_map(|v| v.reals.iter())
            .find(|r| r.addr == addr)
            .and_then(|r| r.mac)
    }

    async fn apply_config(&mut self, text: &str, dry_run: bool) -> Result<Option<Reply>, ApiError> {
        let desired = config::parse_config(text).map_err(|e| {
            let field = e
                .field()
                .map_or_else(|| "config".to_string(), |f| format!("config.{f}"));
            invalid(&field, format!("config {e}"))
        })?;
        let current = config::DesiredState::from_snapshot(&self.bal.snapshot());
        let mut changes = config::diff(&current, &desired);
        let lines: Vec<String> = changes
            .iter()
            .map(|c| config::describe_from(&current, c))
            .collect();
        if dry_run || changes.is_empty() {
            // `applied` says whether this was a real apply, not whether anything changed: an
            // apply of the running config is a successful no-op, not a dry run.
            return Ok(Some(Reply::Apply(ApplyReply {
                changes: lines,
                applied: !dry_run,
            })));
        }
        // New reals: resolve their MACs first, so they take flows as soon as the apply lands.
        let new_reals: Vec<IpAddr> = changes
            .iter()
            .filter_map(|c| match c {
                Change::AddReal {
                    addr, mac: None, ..
                } => Some(*addr),
                _ => None,
            })
            .collect();
        let mut macs: HashMap<IpAddr, Option<Mac>> = HashMap::new();
        let missing: Vec<IpAddr> = new_reals
            .iter()
            .copied()
            .filter(|a| match self.known_mac(*a) {
                Some(m) => {
                    macs.insert(*a, Some(m));
                    false
                }
                None => true,
            })
            .collect();
        if !missing.is_empty() {
            macs.extend(self.resolve(&missing).await);
        }
        for c in &mut changes {
            if let Change::AddReal { addr, mac, .. } = c {
                if mac.is_none() {
                    *mac = macs.get(addr).copied().flatten();
                }
            }
        }
        self.commit(changes)?;
        Ok(Some(Reply::Apply(ApplyReply {
            changes: lines,
            applied: true,
        })))
    }

    fn list(&self) -> ListReply {
        ListReply {
            vips: self
                .bal
                .snapshot()
                .vips
                .iter()
                .map(|v| VipInfo {
                    vip: v.spec.to_string(),
                    id: v.id,
                    flags: v.flags.names().iter().map(|s| s.to_string()).collect(),
                    reals: v
                        .reals
                        .iter()
                        .map(|r| RealInfo {
                            addr: r.addr.to_string(),
                            id: r.id,
                            weight: r.weight,
                            mac: r.mac.as_ref().map(format_mac),
                            state: if r.mac.is_none() {
                                "unresolved"
                            } else if r.weight == 0 {
                                "draining"
                            } else {
                                "active"
                            }
                            .to_string(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    fn stats(&mut self) -> Result<StatsReply, ApiError> {
        let internal = |e: crate::dataplane::DataplaneError| ApiError {
            code: ErrorCode::Internal,
            field: None,
            message: e.to_string(),
        };
        let now = Instant::now();
        let prev = self.last_stats.take();
        let mut sample = HashMap::new();
        let rate = |key: (u32, u32), packets: u64, bytes: u64| -> (f64, f64) {
            match &prev {
                Some((at, m)) => match m.get(&key) {
                    Some((p0, b0)) => {
                        let dt = now.duration_since(*at).as_secs_f64().max(1e-3);
                        (
                            packets.saturating_sub(*p0) as f64 / dt,
                            bytes.saturating_sub(*b0) as f64 / dt,
                        )
                    }
                    None => (0.0, 0.0),
                },
                None => (0.0, 0.0),
            }
        };
        let dp = self.bal.dataplane();
        let mut vips = Vec::new();
        for v in self.bal.snapshot().vips {
            let s = dp.vip_stats(v.id).map_err(internal)?;
            // Key (vip id + 1 << 31, 0) cannot collide with a real's (vip id, real id).
            let vkey = (v.id | 1 << 31, 0);
            let (pps, bps) = rate(vkey, s.packets, s.bytes);
            sample.insert(vkey, (s.packets, s.bytes));
            let mut reals = Vec::new();
            for r in &v.reals {
                let rs = dp.real_stats(r.id).map_err(internal)?;
                let rkey = (v.id, r.id);
                let (pps, bps) = rate(rkey, rs.packets, rs.bytes);
                sample.insert(rkey, (rs.packets, rs.bytes));
                reals.push(RealStatsInfo {
                    addr: r.addr.to_string(),
                    counters: Counters {
                        packets: rs.packets,
                        bytes: rs.bytes,
                        new_flows: rs.new_flows,
                        packets_per_sec: pps,
                        bytes_per_sec: bps,
                    },
                });
            }
            vips.push(VipStatsInfo {
                vip: v.spec.to_string(),
                counters: Counters {
                    packets: s.packets,
                    bytes: s.bytes,
                    new_flows: s.new_flows,
                    packets_per_sec: pps,
                    bytes_per_sec: bps,
                },
                no_real: s.no_real,
                reals,
            });
        }
        let g = dp.global_stats().map_err(internal)?;
        let mut global: std::collections::BTreeMap<String, u64> = lb_common::GLOBAL_COUNTERS
            .iter()
            .map(|c| (c.name.to_string(), g.get(c.counter)))
            .collect();
        global.insert("failed_bpf_calls".to_string(), dp.failed_calls());
        self.last_stats = Some((now, sample));
        Ok(StatsReply {
            uptime_secs: self.started.elapsed().as_secs_f64(),
            vips,
            global,
            unresolved_reals: self.unresolved_total,
        })
    }
}
