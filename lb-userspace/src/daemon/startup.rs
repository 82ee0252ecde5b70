//! Start-up: the per-interface lock, bpffs, the control socket, loading (or adopting) the
//! program and its maps, attaching, and replaying the saved state over them. Each step is
//! ordered so that a start that fails changes nothing a running system relies on.

use std::{
    os::{
        fd::AsRawFd,
        unix::fs::{FileTypeExt, PermissionsExt},
    },
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use tokio::net::UnixListener;

use super::DaemonArgs;
use crate::{
    core::{
        balancer::{AdoptReport, Balancer},
        clock::Clock,
        state::{BootClock, SavedState},
    },
    dataplane::{
        ebpf::{
            is_busy, link_pin, link_pins, remove_pins, AttachMode, Attached, EbpfDataplane,
            LoadOptions,
        },
        neigh::KernelNeighbours,
        Dataplane, Limits,
    },
    model::Egress,
};

/// Where the lock of the daemon for `pin_dir` lives.
pub fn lock_path(pin_dir: &Path) -> PathBuf {
    let name = pin_dir.display().to_string().replace('/', "_");
    Path::new("/run/xlb/locks").join(format!("{name}.lock"))
}

/// Why the per-interface lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another xlb daemon already runs for {pin_dir} (lock {lock} is held)")]
    Held { pin_dir: String, lock: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// One daemon per pin directory (interface): an flock held for the daemon's life. The lock
/// file is never removed: a file unlinked while locked lets two daemons lock two files.
pub fn lock(pin_dir: &Path) -> Result<std::fs::File, LockError> {
    let path = lock_path(pin_dir);
    let io = |source| LockError::Io {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io)?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(LockError::Held {
                pin_dir: pin_dir.display().to_string(),
                lock: path.display().to_string(),
            });
        }
        return Err(io(e));
    }
    Ok(f)
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
pub fn ensure_bpffs(pin_root: &Path) -> Result<()> {
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

/// Removes the socket file when the daemon stops, however it stops.
pub struct SocketFile(pub PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Bind the control socket. Only a stale socket is removed first: a socket nobody answers on
/// (the lock proves no daemon of this interface runs; another interface's daemon would
/// answer). Any other file at the path is refused, not removed.
pub fn bind_socket(path: &Path, group: Option<&str>, mode: u32) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!(
                    "{} is in use by another running xlb daemon: give this one --socket",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing the stale socket {}", path.display()))?;
        }
        Ok(_) => bail!(
            "{}: a file that is not a socket is there; not removing it (choose another \
             path or remove it yourself)",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("--socket {}", path.display())),
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    let mode = if let Some(group) = group {
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
        mode
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

/// Load the balancer with its maps pinned under `pin_dir` (adopting those already there) and
/// attach it through the pinned link. Returns the dataplane, whether maps were adopted, and
/// how the program runs (`native` or `generic`, also when an adopted link was taken over).
pub fn load_and_attach(
    args: &DaemonArgs,
    pin_dir: &Path,
    neigh: &KernelNeighbours,
) -> Result<(EbpfDataplane, bool, &'static str)> {
    let opts = LoadOptions {
        limits: Limits {
            max_vips: args.max_vips,
            max_reals: args.max_reals,
            ring_size: args.ring_size,
        },
        conntrack_size: args.conntrack_size,
        hash_seed: args.hash_seed,
        ct_tcp_idle: args.tcp_idle,
        ct_udp_idle: args.udp_idle,
        ct_closing_idle: args.tcp_idle.min(std::time::Duration::from_secs(
            lb_common::DEFAULT_CT_CLOSING_IDLE_SECS,
        )),
    };
    let primary = args.primary();
    let (mut dp, adopted) = EbpfDataplane::load_pinned(&opts, pin_dir)
        .with_context(|| format!("loading the XDP program for {primary}"))?;
    // Before the program is attached: tunnelled packets of an adopted state need it at once.
    let tunnel = super::tunnel::conf(args, neigh);
    if let Err(e) = tunnel.and_then(|t| dp.set_tunnel(&t).map_err(anyhow::Error::new)) {
        if !adopted {
            let _ = remove_pins(pin_dir);
        }
        return Err(e.context("setting up tunnel mode"));
    }
    let mode = match args.xdp_mode {
        super::XdpModeArg::Auto => AttachMode::Auto,
        super::XdpModeArg::Native => AttachMode::Native,
        super::XdpModeArg::Generic => AttachMode::Generic,
    };
    let mut first_mode = "unknown";
    // The links this start made (not taken over from the daemon before).
    let mut made: Vec<std::path::PathBuf> = Vec::new();
    for (index, iface) in args.iface.iter().enumerate() {
        let pin = pin_dir.join(link_pin(index, iface));
        let attached = match dp.attach_pinned(iface, mode, &pin) {
            Ok(a) => a,
            Err(e) => {
                // A start that cannot serve changes nothing: pins made by this attempt would
                // be adopted by the next start, and an interface attached by it would run on
                // with no daemon. The links go with their pins and with `dp`; those of the
                // daemon before stay as they were.
                if adopted {
                    for p in &made {
                        let _ = std::fs::remove_file(p);
                    }
                } else {
                    let _ = remove_pins(pin_dir);
                }
                if is_busy(&e) {
                    bail!(
                        "{iface} already has an XDP program attached (another xlb daemon with \
                         another --pin-root, or another tool): detach it first ({e})"
                    );
                }
                return Err(anyhow::Error::new(e).context(format!("attaching XDP to {iface}")));
            }
        };
        let xdp_mode = match attached {
            Attached::Native => "native",
            Attached::Generic => "generic",
            // The link an earlier daemon made: the kernel knows how it runs.
            // (The first interface's is `neigh`; another is opened for the question.)
            Attached::Replaced => match if index == 0 {
                neigh.xdp_attached()
            } else {
                KernelNeighbours::new(iface).and_then(|n| n.xdp_attached())
            } {
                Ok(Some(a)) => a.as_str(),
                Ok(None) => "unknown",
                Err(e) => {
                    log::warn!("asking the kernel how XDP runs on {iface}: {e}");
                    "unknown"
                }
            },
        };
        if attached != Attached::Replaced {
            made.push(pin.clone());
        }
        if index == 0 {
            first_mode = xdp_mode;
        }
        log::info!(
            "XDP program on {iface} ({xdp_mode}{}); maps {} under {}",
            if attached == Attached::Replaced {
                ", replaced on the pinned link"
            } else {
                ""
            },
            if adopted { "adopted" } else { "created" },
            pin_dir.display()
        );
        if xdp_mode == "generic" {
            log::warn!(
                "{iface} runs generic (skb) XDP: correct but slower; its driver has no native XDP"
            );
        }
    }
    drop_stale_links(pin_dir, &args.iface);
    Ok((dp, adopted, first_mode))
}

/// Detaches the interfaces an earlier daemon served that this one is not told to (a
/// `--iface` dropped from the command line): their pinned links go.
fn drop_stale_links(pin_dir: &Path, ifaces: &[String]) {
    let wanted: Vec<std::path::PathBuf> = ifaces
        .iter()
        .enumerate()
        .map(|(i, iface)| pin_dir.join(link_pin(i, iface)))
        .collect();
    for path in link_pins(pin_dir) {
        if wanted.contains(&path) || !path.exists() {
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => log::info!(
                "{}: no --iface names its interface any more; the program is detached from it",
                path.display()
            ),
            Err(e) => log::warn!("removing the stale XDP link {}: {e}", path.display()),
        }
    }
}

/// Replay the saved state (if any) over the maps and clear what it does not name; with no
/// state file at all, everything found in adopted maps goes.
/// Forgets the saved egress interfaces (and the MACs found on them) that no longer are what
/// they were: another boot, or an interface deleted or renumbered since. Those reals start
/// unresolved and the first MAC refresh finds their way again.
pub fn drop_stale_egress(saved: &mut SavedState, still: impl Fn(&Egress) -> bool) {
    for v in &mut saved.vips {
        for r in v.reals.iter_mut().chain(v.sorry.iter_mut()) {
            if let Some(e) = r.egress {
                if !still(&e) {
                    log::info!(
                        "real {} of {}: its interface #{} is gone or changed since the state \
                         was saved; unresolved until found again",
                        r.addr,
                        v.vip,
                        e.ifindex
                    );
                    r.egress = None;
                    r.mac = None;
                }
            }
        }
    }
}

/// Whether `e` still describes the interface of its index (its MAC and MTU as saved, unless
/// `--tunnel-mtu` says the MTU).
pub fn egress_holds(e: &Egress, tunnel_mtu: Option<u16>) -> bool {
    KernelNeighbours::from_index(e.ifindex)
        .is_ok_and(|n| super::macs::egress_of(&n, tunnel_mtu) == Ok(*e))
}

pub fn restore<D: Dataplane, C: Clock>(
    bal: &mut Balancer<D, C>,
    saved: Option<&SavedState>,
    boot: &BootClock,
) -> Result<AdoptReport> {
    let (vips, quarantined) = match saved {
        Some(s) => (s.vips.clone(), s.quarantine_left(boot, bal.quarantine())),
        None => (Vec::new(), Vec::new()),
    };
    let report = bal
        .adopt(&vips, &quarantined)
        .context("replaying the saved state over the maps")?;
    let rewritten = report
        .restored
        .vips
        .iter()
        .filter(|v| matches!(v.ring, crate::core::balancer::RingUpdate::Rewritten { .. }))
        .count();
    if saved.is_some() {
        log::info!(
            "restored {} VIPs ({} rings rewritten, {} already live)",
            vips.len(),
            rewritten,
            report.restored.vips.len() - rewritten
        );
    }
    let stale = report.stale_vips
        + report.stale_reals.len()
        + report.stale_named.len()
        + report.stale_meta
        + report.stale_addrs;
    if stale > 0 {
        log::warn!(
            "the pinned maps held entries the state does not name (a lost, older or edited \
             state file): {} VIPs, {} reals (their ids quarantined), {} VIP entries, {} VIP \
             addresses cleared; {} more real ids named by tracked flows quarantined",
            report.stale_vips,
            report.stale_reals.len(),
            report.stale_meta,
            report.stale_addrs,
            report.stale_named.len()
        );
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        core::{balancer::Change, clock::ManualClock},
        dataplane::fake::FakeDataplane,
        model::VipFlags,
    };

    const QUARANTINE: Duration = Duration::from_secs(960);

    fn limits() -> Limits {
        Limits {
            max_vips: 4,
            max_reals: 16,
            ring_size: 1009,
        }
    }

    fn add_real(n: u8) -> Change {
        Change::AddReal {
            vip: "tcp/10.0.0.100:80".parse().expect("vip"),
            addr: format!("10.0.0.{n}").parse().expect("ip"),
            weight: 1,
            mac: Some([2, 0, 0, 0, 0, n]),
        }
    }

    fn boot(mono: u64) -> BootClock {
        BootClock {
            boot_id: "boot-1".into(),
            monotonic: Duration::from_secs(mono),
            unix: Duration::from_secs(1_700_000_000),
        }
    }

    /// A daemon that wrote its state after each of two changes, then died: its maps, the
    /// state file of the first change (an older one) and of the second (the current one).
    fn earlier_daemon() -> (FakeDataplane, SavedState, SavedState, ManualClock) {
        let clock = ManualClock::new();
        let mut bal = Balancer::with_clock(FakeDataplane::new(limits()), QUARANTINE, clock.clone());
        bal.apply(vec![
            Change::AddVip {
                spec: "tcp/10.0.0.100:80".parse().expect("vip"),
                flags: VipFlags::default(),
            },
            add_real(11),
            add_real(12),
            add_real(13),
        ])
        .expect("valid");
        let older = SavedState::from_snapshot("eth0", &bal.snapshot(), QUARANTINE, &boot(100));
        bal.apply(vec![
            Change::DelReal {
                vip: "tcp/10.0.0.100:80".parse().expect("vip"),
                addr: "10.0.0.13".parse().expect("ip"),
            },
            add_real(14),
        ])
        .expect("valid");
        let current = SavedState::from_snapshot("eth0", &bal.snapshot(), QUARANTINE, &boot(100));
        (bal.into_dataplane(), older, current, clock)
    }

    #[test]
    fn the_current_state_file_restores_ids_and_its_quarantine() {
        let (fake, _, current, clock) = earlier_daemon();
        assert_eq!(current.quarantined.len(), 1, "real 3 was freed");
        let mut bal = Balancer::with_clock(fake, QUARANTINE, clock);
        let report = restore(&mut bal, Some(&current), &boot(160)).expect("restores");
        assert!(report.stale_reals.is_empty() && report.stale_vips == 0);
        let snap = bal.snapshot();
        let ids: Vec<u32> = snap.vips[0].reals.iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![1, 2, 4]);
        // Id 3 is still in quarantine, with the file's remaining time less the minute since.
        assert_eq!(snap.quarantined.len(), 1);
        assert_eq!(snap.quarantined[0].id, 3);
        let left = snap.quarantined[0].remaining.as_secs();
        assert!((895..=901).contains(&left), "{left}");
    }

    #[test]
    fn an_older_state_file_clears_and_quarantines_what_came_after_it() {
        let (fake, older, _, clock) = earlier_daemon();
        let mut bal = Balancer::with_clock(fake, QUARANTINE, clock);
        let report = restore(&mut bal, Some(&older), &boot(160)).expect("restores");
        // Real 4 (.14) came after: its entry is cleared and its id quarantined; .13 is back
        // with id 3 (the older file names it).
        assert_eq!(report.stale_reals, vec![4]);
        let snap = bal.snapshot();
        let ids: Vec<u32> = snap.vips[0].reals.iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![1, 2, 3]);
        assert_eq!(
            bal.dataplane().real(4).expect("read"),
            lb_common::Real::default()
        );
        assert!(snap.quarantined.iter().any(|q| q.id == 4));
    }

    #[test]
    fn no_state_file_clears_everything_and_a_reboot_ends_quarantines() {
        let (fake, _, current, clock) = earlier_daemon();
        let mut bal = Balancer::with_clock(fake, QUARANTINE, clock.clone());
        let report = restore(&mut bal, None, &boot(160)).expect("restores");
        assert_eq!(report.stale_vips, 1);
        assert_eq!(report.stale_reals, vec![1, 2, 4]);
        assert!(bal.dataplane().vips.is_empty() && bal.dataplane().vip_addrs.is_empty());

        // The state file of another boot: its quarantine no longer holds (its flows are gone).
        let mut bal = Balancer::with_clock(FakeDataplane::new(limits()), QUARANTINE, clock);
        let other_boot = BootClock {
            boot_id: "boot-2".into(),
            ..boot(5)
        };
        restore(&mut bal, Some(&current), &other_boot).expect("restores");
        assert!(bal.snapshot().quarantined.is_empty());
    }
}

#[cfg(test)]
mod socket_tests {
    use super::*;

    #[test]
    fn only_a_stale_socket_is_removed() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let _guard = rt.enter();
        let dir = std::env::temp_dir().join(format!("xlb-sock-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        // A regular file at the path is somebody's: refused, left as it is.
        let file = dir.join("not-a-socket");
        std::fs::write(&file, "precious").expect("write");
        let err = bind_socket(&file, None, 0o600)
            .expect_err("refused")
            .to_string();
        assert!(err.contains("not a socket"), "{err}");
        assert_eq!(
            std::fs::read_to_string(&file).expect("still there"),
            "precious"
        );
        // A socket nobody answers on is left over from a killed daemon: replaced.
        let stale = dir.join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
        assert!(stale.exists());
        let listener = bind_socket(&stale, None, 0o600).expect("stale socket replaced");
        // One somebody answers on is in use: refused.
        let err = bind_socket(&stale, None, 0o600)
            .expect_err("in use")
            .to_string();
        assert!(err.contains("in use"), "{err}");
        drop(listener);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
