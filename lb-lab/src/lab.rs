//! A network lab of namespaces on this machine: one L2 segment (a Linux bridge in namespace
//! `sw`) joining a client, the xlb host (`lb`) and real servers `r1..rN`, wired for direct
//! routing as TOOLCHAIN.md's "veth pitfalls" require. Used by `xlb-lab demo` (`cargo xtask
//! demo`) and by the namespace tests.
//!
//! ```text
//!   client 10.222.0.2 ──┐                     VIPs 10.222.1.100, fd00:222:1::100
//!   lb     10.222.0.3 ──┤ br0 (namespace sw)  client: VIP via lb; reals: VIP on lo,
//!   r1     10.222.0.11 ─┤                     arp_ignore=1 / arp_announce=2
//!   rN     10.222.0.1N ─┘                     IPv6: fd00:222::<same suffix>/64
//! ```
//!
//! Every name carries the run's prefix `xlb-<pid>-<random>-`, so two runs never collide.
//! [`Lab::teardown`] (or dropping the lab) kills the processes it started and deletes every
//! namespace it made, also when a test panics; a process aborting on panic or interrupted by a
//! signal calls [`emergency_cleanup`] (the lab installs a panic hook for the abort case). Labs
//! of runs that died without cleaning up are removed by [`cleanup_stale`].

use std::{
    collections::BTreeMap,
    ffi::CString,
    fs::File,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::{
        fd::AsRawFd,
        unix::{net::UnixStream, process::CommandExt},
    },
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, Once, Weak,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    programs::{Xdp, XdpMode},
    Ebpf,
};
use lb_userspace::{api, dataplane::ebpf::load_aux};

/// Every lab namespace and directory name starts with this.
pub const LAB_PREFIX: &str = "xlb-";
/// The default IPv4 VIP.
pub const VIP4: Ipv4Addr = Ipv4Addr::new(10, 222, 1, 100);
/// The default IPv6 VIP.
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x222, 1, 0, 0, 0, 0, 0x100);
/// The interface name of every host's veth inside its namespace.
pub const HOST_IFACE: &str = "eth0";
/// The bridge in the `sw` namespace.
pub const BRIDGE: &str = "br0";

/// What to build.
#[derive(Clone, Debug)]
pub struct LabConfig {
    /// Number of real servers (`r1..rN`, addresses .11, .12, ...; at most 200).
    pub reals: usize,
    /// VIPs held by every real on `lo` and routed by the client via the lb.
    pub vips: Vec<IpAddr>,
    /// Port of the HTTP server on every real.
    pub tcp_port: u16,
    /// Port of the UDP echo on every real.
    pub udp_port: u16,
    /// Start `serve` on every real.
    pub serve: bool,
    /// The binary that has the `serve` and `request` subcommands (xlb-lab); default: this
    /// process's own executable.
    pub lab_bin: Option<PathBuf>,
    /// Print every command the lab runs as a shell line.
    pub verbose: bool,
}

impl Default for LabConfig {
    fn default() -> Self {
        LabConfig {
            reals: 3,
            vips: vec![IpAddr::V4(VIP4), IpAddr::V6(VIP6)],
            tcp_port: 80,
            udp_port: 53,
            serve: true,
            lab_bin: None,
            verbose: false,
        }
    }
}

/// One host of the segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    /// `client`, `lb`, `r1`, ...
    pub role: String,
    /// The namespace (`xlb-<id>-<role>`).
    pub ns: String,
    /// Its interface inside the namespace ([`HOST_IFACE`]).
    pub iface: String,
    /// The bridge port (in the `sw` namespace) its veth is paired with.
    pub port: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// Fixed MAC (`02:22:00:00:00:<last address byte>`), easy to read in `xlb list`.
    pub mac: String,
}

/// One reply of `request`: the real's name, or the failure's reason.
pub type Reply = std::result::Result<String, String>;

/// Requests counted by the name of the real that answered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Spread {
    pub counts: BTreeMap<String, usize>,
    pub failures: Vec<String>,
}

impl Spread {
    pub fn of(replies: &[Reply]) -> Spread {
        let mut s = Spread::default();
        for r in replies {
            match r {
                Ok(name) => *s.counts.entry(name.clone()).or_default() += 1,
                Err(reason) => s.failures.push(reason.clone()),
            }
        }
        s
    }

    pub fn total(&self) -> usize {
        self.counts.values().sum::<usize>() + self.failures.len()
    }

    pub fn count(&self, name: &str) -> usize {
        self.counts.get(name).copied().unwrap_or(0)
    }

    /// A table, one line per host (zeros included), then the failures if any.
    pub fn table(&self, reals: &[Host]) -> String {
        let total = self.total().max(1);
        let mut out = String::new();
        let mut line = |name: &str, addr: String, n: usize| {
            let pct = 100.0 * n as f64 / total as f64;
            let bar = "#".repeat((pct / 2.0).round() as usize);
            out.push_str(&format!(
                "  {name:<6} {addr:<16} {n:>5}  {pct:5.1}%  {bar}\n"
            ));
        };
        for h in reals {
            line(&h.role, h.ipv4.to_string(), self.count(&h.role));
        }
        for (name, n) in &self.counts {
            if !reals.iter().any(|h| &h.role == name) {
                line(name, "(unknown)".into(), *n);
            }
        }
        if !self.failures.is_empty() {
            line("FAILED", String::new(), self.failures.len());
            let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
            for f in &self.failures {
                *reasons.entry(f.as_str()).or_default() += 1;
            }
            for (reason, n) in reasons {
                out.push_str(&format!("    {n} × {reason}\n"));
            }
        }
        out
    }
}

/// What must be undone, shared with [`emergency_cleanup`] (a signal thread or a panic hook
/// may run it while the lab's owner is blocked elsewhere).
#[derive(Default)]
struct Shared {
    state: Mutex<SharedState>,
}

#[derive(Default)]
struct SharedState {
    /// Set once cleanup started: nothing new is created after it.
    closed: bool,
    namespaces: Vec<String>,
    /// Processes started by the lab (each leads its own process group).
    pids: Vec<u32>,
    /// The bpffs the daemon pins into.
    bpffs: Option<PathBuf>,
    dir: Option<PathBuf>,
}

static LIVE: Mutex<Vec<Weak<Shared>>> = Mutex::new(Vec::new());
static PANIC_HOOK: Once = Once::new();

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, SharedState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register_pid(&self, pid: u32) {
        self.lock().pids.push(pid);
    }

    fn unregister_pid(&self, pid: u32) {
        self.lock().pids.retain(|p| *p != pid);
    }

    /// Kill what is left, delete the namespaces, unmount and remove the directory. Returns
    /// the errors met (it goes on after each).
    fn clean(&self) -> Vec<String> {
        let st = self.lock();
        self.clean_locked(st)
    }

    /// [`Shared::clean`], giving up if the lock stays held (a panic hook must not wait for
    /// the thread that panicked while holding it).
    fn clean_within(&self, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.state.try_lock() {
                Ok(st) => return self.clean_locked(st),
                Err(std::sync::TryLockError::Poisoned(e)) => {
                    return self.clean_locked(e.into_inner())
                }
                Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(std::sync::TryLockError::WouldBlock) => {
                    return vec!["the lab is locked: left as it is (see xlb-lab cleanup)".into()]
                }
            }
        }
    }

    fn clean_locked(&self, mut st: std::sync::MutexGuard<'_, SharedState>) -> Vec<String> {
        st.closed = true;
        let mut errors = Vec::new();
        for pid in std::mem::take(&mut st.pids) {
            kill_ours(pid);
        }
        for ns in std::mem::take(&mut st.namespaces).iter().rev() {
            if let Err(e) = del_netns(ns) {
                errors.push(format!("{e:#}"));
            }
        }
        if let Some(mnt) = st.bpffs.take() {
            if let Err(e) = umount(&mnt) {
                errors.push(format!("{e:#}"));
            }
        }
        if let Some(dir) = st.dir.take() {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    errors.push(format!("removing {}: {e}", dir.display()));
                }
            }
        }
        errors
    }
}

/// Tear down every lab of this process now, without waiting for their owners: for a signal
/// handler thread (then exit) and for the panic hook when panics abort.
pub fn emergency_cleanup() -> Vec<String> {
    let labs: Vec<Arc<Shared>> = LIVE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter_map(Weak::upgrade)
        .collect();
    labs.iter()
        .flat_map(|s| s.clean_within(Duration::from_secs(5)))
        .collect()
}

fn install_panic_hook() {
    // With panic = "unwind" (tests), Drop tears the lab down; with "abort" (release
    // binaries) nothing is dropped, so the hook does it.
    if cfg!(panic = "abort") {
        PANIC_HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                previous(info);
                for e in emergency_cleanup() {
                    eprintln!("lab cleanup: {e}");
                }
            }));
        });
    }
}

/// The lab. Build it with [`Lab::new`]; it is torn down by [`Lab::teardown`] or on drop.
pub struct Lab {
    /// `<pid>-<random>`: in every name the lab gives.
    pub id: String,
    /// `xlb-<id>-`: every namespace of the lab starts with it.
    pub prefix: String,
    /// The namespace holding the bridge.
    pub sw: String,
    pub client: Host,
    pub lb: Host,
    pub reals: Vec<Host>,
    pub vips: Vec<IpAddr>,
    pub tcp_port: u16,
    pub udp_port: u16,
    /// A private directory (socket, state file, logs, the daemon's bpffs).
    pub dir: PathBuf,
    lab_bin: PathBuf,
    verbose: bool,
    shared: Arc<Shared>,
    /// Servers and other processes the lab owns, by label.
    children: Vec<(String, Child)>,
    daemon: Option<Child>,
    xlb_bin: Option<PathBuf>,
    /// The pass program on the lb's bridge port: its link lives as long as this.
    pass: Option<Ebpf>,
    next_id: AtomicU64,
    torn_down: bool,
}

impl Lab {
    /// Build the lab (root needed). On failure everything made so far is removed.
    pub fn new(cfg: LabConfig) -> Result<Lab> {
        if cfg.reals == 0 || cfg.reals > 200 {
            bail!("a lab has 1 to 200 reals, not {}", cfg.reals);
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("the lab needs root (network namespaces, XDP)");
        }
        for (tool, pkg) in [("ip", "iproute2"), ("ethtool", "ethtool")] {
            if !have(tool) {
                bail!("`{tool}` is missing: install the Debian package {pkg} (cargo xtask setup)");
            }
        }
        install_panic_hook();
        let lab_bin = match cfg.lab_bin {
            Some(p) => p,
            None => std::env::current_exe().context("finding this executable")?,
        };
        let id = new_run_id()?;
        let prefix = format!("{LAB_PREFIX}{id}-");
        let dir = std::env::temp_dir().join(format!("{LAB_PREFIX}{id}"));
        let host = |role: &str, last: u8| Host {
            role: role.to_string(),
            ns: format!("{prefix}{role}"),
            iface: HOST_IFACE.to_string(),
            port: format!("p-{role}"),
            ipv4: Ipv4Addr::new(10, 222, 0, last),
            ipv6: Ipv6Addr::new(0xfd00, 0x222, 0, 0, 0, 0, 0, u16::from(last)),
            mac: format!("02:22:00:00:00:{last:02x}"),
        };
        let shared = Arc::new(Shared::default());
        {
            let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
            live.retain(|w| w.strong_count() > 0);
            live.push(Arc::downgrade(&shared));
        }
        let mut lab = Lab {
            sw: format!("{prefix}sw"),
            client: host("client", 2),
            lb: host("lb", 3),
            reals: (1..=cfg.reals)
                .map(|i| host(&format!("r{i}"), 10 + i as u8))
                .collect(),
            vips: cfg.vips.clone(),
            tcp_port: cfg.tcp_port,
            udp_port: cfg.udp_port,
            dir: dir.clone(),
            lab_bin,
            verbose: cfg.verbose,
            shared,
            children: Vec::new(),
            daemon: None,
            xlb_bin: None,
            pass: None,
            next_id: AtomicU64::new(1),
            torn_down: false,
            id,
            prefix,
        };
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        lab.shared.lock().dir = Some(dir);
        lab.build()?;
        if cfg.serve {
            lab.start_servers()?;
        }
        Ok(lab)
    }

    /// Every host: client, lb, reals.
    pub fn hosts(&self) -> impl Iterator<Item = &Host> {
        [&self.client, &self.lb]
            .into_iter()
            .chain(self.reals.iter())
    }

    /// Every namespace the lab made, the bridge's included.
    pub fn namespaces(&self) -> Vec<String> {
        self.shared.lock().namespaces.clone()
    }

    fn build(&mut self) -> Result<()> {
        let sw = self.sw.clone();
        self.add_netns(&sw)?;
        self.ip(
            &sw,
            &[
                "link",
                "add",
                BRIDGE,
                "type",
                "bridge",
                "mcast_snooping",
                "0",
            ],
        )?;
        self.ip(&sw, &["link", "set", BRIDGE, "up"])?;

        let hosts: Vec<Host> = self.hosts().cloned().collect();
        for h in &hosts {
            self.add_netns(&h.ns)?;
            // No duplicate address detection in the lab: a real answering from the VIP needs
            // a non-tentative link-local address to solicit the client's MAC, and DAD would
            // leave the first IPv6 requests unanswered for a second or two.
            self.sysctl(
                &h.ns,
                &[
                    ("net/ipv6/conf/all/accept_dad".to_string(), "0"),
                    ("net/ipv6/conf/default/accept_dad".to_string(), "0"),
                ],
            )?;
            self.ip(
                &sw,
                &[
                    "link", "add", &h.port, "type", "veth", "peer", "name", &h.iface, "address",
                    &h.mac, "netns", &h.ns,
                ],
            )?;
            self.ip(&sw, &["link", "set", &h.port, "master", BRIDGE, "up"])?;
            self.ip(&h.ns, &["link", "set", "lo", "up"])?;
            self.ip(
                &h.ns,
                &["addr", "add", &format!("{}/24", h.ipv4), "dev", &h.iface],
            )?;
            self.ip(
                &h.ns,
                &[
                    "addr",
                    "add",
                    &format!("{}/64", h.ipv6),
                    "dev",
                    &h.iface,
                    "nodad",
                ],
            )?;
            self.ip(&h.ns, &["link", "set", &h.iface, "up"])?;
        }

        // The client: TCP/UDP checksums complete (a veth leaves them to an offload nobody
        // does once XDP has forwarded the frame), every VIP via the lb.
        let client = self.client.clone();
        self.exec(&client.ns, &["ethtool", "-K", &client.iface, "tx", "off"])?;
        for vip in self.vips.clone() {
            let (via, len) = match vip {
                IpAddr::V4(_) => (IpAddr::V4(self.lb.ipv4), 32),
                IpAddr::V6(_) => (IpAddr::V6(self.lb.ipv6), 128),
            };
            let family = if vip.is_ipv4() { "-4" } else { "-6" };
            self.ip(
                &client.ns,
                &[
                    family,
                    "route",
                    "add",
                    &format!("{vip}/{len}"),
                    "via",
                    &via.to_string(),
                ],
            )?;
        }

        // The reals: every VIP on lo, never answered for in ARP.
        for r in self.reals.clone() {
            self.exec(&r.ns, &["ethtool", "-K", &r.iface, "tx", "off"])?;
            let mut knobs = Vec::new();
            for dev in ["all", "default", "lo", r.iface.as_str()] {
                knobs.push((format!("net/ipv4/conf/{dev}/arp_ignore"), "1"));
                knobs.push((format!("net/ipv4/conf/{dev}/arp_announce"), "2"));
            }
            self.sysctl(&r.ns, &knobs)?;
            for vip in self.vips.clone() {
                let len = if vip.is_ipv4() { 32 } else { 128 };
                self.ip(
                    &r.ns,
                    &["addr", "add", &format!("{vip}/{len}"), "dev", "lo"],
                )?;
            }
        }

        // Frames the lb sends with XDP_TX reach its bridge port only if that peer runs an XDP
        // program of its own.
        let port = self.lb.port.clone();
        self.show(&format!(
            "ip -n {sw} link set dev {port} xdpdrv obj <xlb.bpf.o> sec xdp/{}  # xlb_pass, via aya",
            lb_common::PROG_PASS
        ));
        self.pass = Some(load_pass(&sw, &port)?);
        Ok(())
    }

    fn add_netns(&self, ns: &str) -> Result<()> {
        // Held while creating, so that a concurrent cleanup either sees the namespace or has
        // already closed the lab.
        let mut st = self.shared.lock();
        if st.closed {
            bail!("the lab is being torn down");
        }
        self.show(&format!("ip netns add {ns}"));
        run_output(Command::new("ip").args(["netns", "add", ns]), None)?;
        st.namespaces.push(ns.to_string());
        Ok(())
    }

    fn show(&self, line: &str) {
        if self.verbose {
            println!("$ {line}");
        }
    }

    /// `ip -n <ns> <args>`.
    fn ip(&self, ns: &str, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", ns];
        full.extend_from_slice(args);
        self.host_cmd("ip", &full)
    }

    /// A command in the host's own namespace, shown when verbose; errors carry its stderr.
    fn host_cmd(&self, program: &str, args: &[&str]) -> Result<String> {
        self.show(&shell_line(program, args));
        let mut cmd = Command::new(program);
        cmd.args(args);
        let out = run_output(&mut cmd, Some(&self.shared))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Write sysctls (`net/ipv4/...` paths under /proc/sys) inside `ns`.
    fn sysctl(&self, ns: &str, knobs: &[(String, &str)]) -> Result<()> {
        if self.verbose {
            let list: Vec<String> = knobs
                .iter()
                .map(|(k, v)| format!("{}={v}", k.replace('/', ".")))
                .collect();
            self.show(&format!("ip netns exec {ns} sysctl -qw {}", list.join(" ")));
        }
        let knobs: Vec<(String, String)> = knobs
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect();
        in_netns(ns, move || {
            for (k, v) in &knobs {
                let path = Path::new("/proc/sys").join(k);
                std::fs::write(&path, v).with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(())
        })
    }

    /// `ip netns exec <ns> <args>`: its stdout; an error with its stderr if it fails.
    pub fn exec(&self, ns: &str, args: &[&str]) -> Result<String> {
        let out = self.exec_output(ns, args)?;
        if !out.status.success() {
            bail!(
                "`{}` failed ({}): {}",
                exec_line(ns, args),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ip netns exec <ns> <args>`, whatever its exit status.
    pub fn exec_output(&self, ns: &str, args: &[&str]) -> Result<Output> {
        self.show(&exec_line(ns, args));
        let mut cmd = netns_cmd(ns, args);
        run_raw(&mut cmd, Some(&self.shared))
    }

    /// Start `ip netns exec <ns> <args>` (stdin null, stdout and stderr inherited unless
    /// `cmd_hook` changes them). The caller owns the child; the lab kills it at teardown if
    /// it still runs.
    pub fn spawn(&self, ns: &str, args: &[&str]) -> Result<Child> {
        self.spawn_with(ns, args, |_| {})
    }

    /// [`Lab::spawn`] with a chance to adjust the command (stdio, environment) first.
    pub fn spawn_with(
        &self,
        ns: &str,
        args: &[&str],
        cmd_hook: impl FnOnce(&mut Command),
    ) -> Result<Child> {
        self.show(&format!("{} &", exec_line(ns, args)));
        let mut cmd = netns_cmd(ns, args);
        cmd.stdin(Stdio::null());
        cmd_hook(&mut cmd);
        let mut st = self.shared.lock();
        if st.closed {
            bail!("the lab is being torn down");
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting `{}`", exec_line(ns, args)))?;
        st.pids.push(child.id());
        Ok(child)
    }

    /// The binary with `serve` and `request`.
    pub fn lab_bin(&self) -> &Path {
        &self.lab_bin
    }

    fn lab_bin_str(&self) -> Result<String> {
        self.lab_bin
            .to_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("non-UTF-8 path {}", self.lab_bin.display()))
    }

    /// Start `serve` on every real (HTTP on `tcp_port`, UDP echo on `udp_port`), each
    /// answering with its role (`r1`), and wait until each listens.
    pub fn start_servers(&mut self) -> Result<()> {
        let bin = self.lab_bin_str()?;
        let (tcp, udp) = (self.tcp_port.to_string(), self.udp_port.to_string());
        for r in self.reals.clone() {
            let args = [
                bin.as_str(),
                "serve",
                "--name",
                &r.role,
                "--tcp",
                &tcp,
                "--udp",
                &udp,
            ];
            let mut child = self.spawn_with(&r.ns, &args, |c| {
                c.stdout(Stdio::piped());
            })?;
            let stdout = child.stdout.take().expect("stdout is piped");
            self.children.push((format!("serve {}", r.role), child));
            let mut line = String::new();
            BufReader::new(stdout)
                .read_line(&mut line)
                .with_context(|| format!("reading from the server on {}", r.role))?;
            if line.trim() != "ready" {
                bail!(
                    "the server on {} did not start (said {:?}; see its stderr)",
                    r.role,
                    line.trim()
                );
            }
        }
        Ok(())
    }

    /// Run `request` in `ns`: one reply per line.
    pub fn request(&self, ns: &str, args: &[&str]) -> Result<Vec<Reply>> {
        let bin = self.lab_bin_str()?;
        let mut full = vec![bin.as_str(), "request"];
        full.extend_from_slice(args);
        let out = self.exec(ns, &full)?;
        Ok(parse_replies(&out))
    }

    /// `count` HTTP GETs of `url` from `ns`, each on a new connection.
    pub fn http(&self, ns: &str, url: &str, count: usize) -> Result<Vec<Reply>> {
        self.request(ns, &["--url", url, "--count", &count.to_string()])
    }

    /// `count` UDP exchanges with `addr` from `ns`, each from a new socket (source port).
    pub fn udp(&self, ns: &str, addr: SocketAddr, count: usize) -> Result<Vec<Reply>> {
        self.request(
            ns,
            &["--udp", &addr.to_string(), "--count", &count.to_string()],
        )
    }

    /// `http://<addr>:<tcp_port>/` (IPv6 in brackets).
    pub fn url(&self, addr: IpAddr) -> String {
        format!("http://{}/", SocketAddr::new(addr, self.tcp_port))
    }

    // ---- the daemon -------------------------------------------------------------------

    /// The control socket the daemon serves.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("xlb.sock")
    }

    /// The daemon's state file.
    pub fn state_file(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// The daemon's stderr.
    pub fn daemon_log(&self) -> PathBuf {
        self.dir.join("daemon.log")
    }

    /// The bpffs the daemon pins into: mounted by the lab in this mount namespace (so it
    /// outlives daemon restarts: `ip netns exec` gives each process a private /sys, hence a
    /// private /sys/fs/bpf) and unmounted at teardown, which frees every pin.
    pub fn bpffs(&self) -> PathBuf {
        self.dir.join("bpffs")
    }

    /// `--pin-root` given to the daemon.
    pub fn pin_root(&self) -> PathBuf {
        self.bpffs().join("xlb")
    }

    /// The command line `start_daemon` runs (for display), without `ip netns exec`.
    pub fn daemon_args(&self, xlb: &Path, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = vec![
            xlb.display().to_string(),
            "daemon".into(),
            "--iface".into(),
            self.lb.iface.clone(),
            "--socket".into(),
            self.socket().display().to_string(),
            "--state".into(),
            self.state_file().display().to_string(),
            "--pin-root".into(),
            self.pin_root().display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// Run `xlb daemon` on the lb's interface inside the `lb` namespace (stderr appended to
    /// [`Lab::daemon_log`]) and wait until its socket answers `hello`. The lab owns the
    /// process: see [`Lab::stop_daemon`].
    pub fn start_daemon(&mut self, xlb: &Path, extra: &[&str]) -> Result<api::Hello> {
        if let Some(d) = self.daemon.as_mut() {
            if d.try_wait()?.is_none() {
                bail!("the daemon already runs (pid {})", d.id());
            }
        }
        self.mount_bpffs()?;
        std::fs::create_dir_all(self.pin_root())?;
        self.xlb_bin = Some(xlb.to_path_buf());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.daemon_log())
            .with_context(|| format!("opening {}", self.daemon_log().display()))?;
        let args = self.daemon_args(xlb, extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let lb = self.lb.ns.clone();
        let child = self.spawn_with(&lb, &args, |c| {
            c.stdout(Stdio::null()).stderr(log).env("RUST_LOG", "info");
        })?;
        self.daemon = Some(child);
        self.wait_hello(Duration::from_secs(20))
    }

    fn wait_hello(&mut self, timeout: Duration) -> Result<api::Hello> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self
                .daemon
                .as_mut()
                .and_then(|d| d.try_wait().ok().flatten())
            {
                bail!(
                    "the daemon exited ({status}) before answering; its log ({}):\n{}",
                    self.daemon_log().display(),
                    self.daemon_log_tail(20)
                );
            }
            match self.hello() {
                Ok(h) => return Ok(h),
                Err(e) if Instant::now() >= deadline => {
                    return Err(e.context(format!(
                        "the daemon did not answer within {timeout:?}; its log:\n{}",
                        self.daemon_log_tail(20)
                    )))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// The last `lines` lines of the daemon's log.
    pub fn daemon_log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.daemon_log()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The daemon process, while the lab owns one.
    pub fn daemon(&mut self) -> Option<&mut Child> {
        self.daemon.as_mut()
    }

    /// Send `signal` (e.g. `libc::SIGTERM`, `libc::SIGKILL`) to the daemon and wait for it
    /// to exit.
    pub fn stop_daemon(&mut self, signal: i32) -> Result<ExitStatus> {
        let mut d = self.daemon.take().context("no daemon runs")?;
        if d.try_wait()?.is_none() {
            // SAFETY: the pid is our unreaped child.
            unsafe { libc::kill(d.id() as i32, signal) };
        }
        let status = d.wait()?;
        self.shared.unregister_pid(d.id());
        Ok(status)
    }

    /// One request over the control socket (no CLI involved).
    pub fn api(&self, op: api::Op) -> Result<api::Response> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let req = api::Request {
            v: api::PROTOCOL_VERSION,
            id,
            op,
        };
        let mut line = serde_json::to_string(&req)?;
        line.push('\n');
        let mut stream = UnixStream::connect(self.socket())
            .with_context(|| format!("connecting to {}", self.socket().display()))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(line.as_bytes())?;
        let mut answer = String::new();
        BufReader::new(stream).read_line(&mut answer)?;
        if answer.is_empty() {
            bail!("the daemon closed the socket without answering");
        }
        let resp: api::Response = serde_json::from_str(answer.trim_end())
            .with_context(|| format!("bad answer {answer:?}"))?;
        if resp.id != id {
            bail!("answer to request {} received for request {id}", resp.id);
        }
        Ok(resp)
    }

    /// `hello` over the socket.
    pub fn hello(&self) -> Result<api::Hello> {
        let resp = self.api(api::Op::Hello {})?;
        match (resp.ok, resp.result, resp.error) {
            (true, Some(api::Reply::Hello(h)), _) => Ok(h),
            (false, _, Some(e)) => bail!("hello refused: {e}"),
            (_, other, _) => bail!("unexpected answer to hello: {other:?}"),
        }
    }

    /// Run the `xlb` command line (the binary given to `start_daemon`) against the lab's
    /// daemon (`XLB_SOCKET` set), from this namespace; whatever its exit status.
    pub fn xlb(&self, args: &[&str]) -> Result<Output> {
        let bin = self
            .xlb_bin
            .clone()
            .context("start the daemon first: it names the xlb binary")?;
        let mut cmd = Command::new(&bin);
        cmd.args(args).env("XLB_SOCKET", self.socket());
        run_raw(&mut cmd, Some(&self.shared))
    }

    /// [`Lab::xlb`], failing with its stderr unless it succeeds; its stdout.
    pub fn xlb_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.xlb(args)?;
        if !out.status.success() {
            bail!(
                "`xlb {}` failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn mount_bpffs(&self) -> Result<()> {
        let mnt = self.bpffs();
        let mut st = self.shared.lock();
        if st.closed {
            bail!("the lab is being torn down");
        }
        if st.bpffs.is_some() {
            return Ok(());
        }
        std::fs::create_dir_all(&mnt)?;
        self.show(&format!("mount -t bpf bpf {}", mnt.display()));
        let target = CString::new(mnt.as_os_str().as_encoded_bytes())?;
        // SAFETY: valid NUL-terminated strings; no data argument.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                target.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            bail!(
                "mount -t bpf bpf {}: {}",
                mnt.display(),
                std::io::Error::last_os_error()
            );
        }
        st.bpffs = Some(mnt);
        Ok(())
    }

    // ---- teardown ---------------------------------------------------------------------

    /// Kill every process the lab started, detach the pass program, delete every
    /// namespace, unmount the bpffs, remove the directory; then check that no namespace
    /// with the lab's prefix is left. Idempotent.
    pub fn teardown(&mut self) -> Result<()> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        let mut owned: Vec<Child> = self.children.drain(..).map(|(_, c)| c).collect();
        owned.extend(self.daemon.take());
        for c in &mut owned {
            if let Ok(None) = c.try_wait() {
                // SAFETY: an unreaped child leads its own process group: kill the group.
                unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
                let _ = c.kill();
            }
        }
        for mut c in owned {
            let _ = c.wait();
        }
        self.pass = None;
        let mut errors = self.shared.clean();
        match list_netns() {
            Ok(left) => {
                let left: Vec<String> = left
                    .into_iter()
                    .filter(|n| n.starts_with(&self.prefix))
                    .collect();
                if !left.is_empty() {
                    errors.push(format!("namespaces left: {}", left.join(" ")));
                }
            }
            Err(e) => errors.push(format!("{e:#}")),
        }
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("tearing down lab {}: {}", self.id, errors.join("; "))
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("{e:#}");
        }
    }
}

// ---- helpers ------------------------------------------------------------------------------

/// `<pid>-<4 hex digits>`, unused by any namespace now.
fn new_run_id() -> Result<String> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let pid = std::process::id();
    for _ in 0..64 {
        let mut b = [0u8; 2];
        File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut b))
            .context("reading /dev/urandom")?;
        let n = u16::from_le_bytes(b) ^ (COUNTER.fetch_add(1, Ordering::Relaxed) as u16);
        let id = format!("{pid}-{n:04x}");
        let taken = Path::new("/run/netns")
            .join(format!("{LAB_PREFIX}{id}-sw"))
            .exists()
            || std::env::temp_dir()
                .join(format!("{LAB_PREFIX}{id}"))
                .exists();
        if !taken {
            return Ok(id);
        }
    }
    bail!("no free lab id")
}

fn have(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|d| Path::new(d).join(program).is_file())
}

/// Quote for display where needed.
fn shell_line(program: &str, args: &[&str]) -> String {
    let mut s = program.to_string();
    for a in args {
        s.push(' ');
        if a.is_empty()
            || a.chars()
                .any(|c| !(c.is_ascii_alphanumeric() || "-_./:=,@%+[]".contains(c)))
        {
            s.push('\'');
            s.push_str(&a.replace('\'', r"'\''"));
            s.push('\'');
        } else {
            s.push_str(a);
        }
    }
    s
}

fn exec_line(ns: &str, args: &[&str]) -> String {
    let mut full = vec!["netns", "exec", ns];
    full.extend_from_slice(args);
    shell_line("ip", &full)
}

/// `ip netns exec <ns> <args>`, in a process group of its own (a terminal's Ctrl-C reaches
/// the lab's owner, which tears down in order, not every process at once).
fn netns_cmd(ns: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).args(args).process_group(0);
    cmd
}

/// Run to completion with output captured, registering the process for cleanup meanwhile.
fn run_raw(cmd: &mut Command, shared: Option<&Shared>) -> Result<Output> {
    let shown = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let child = cmd.spawn().with_context(|| format!("starting {shown}"))?;
    let pid = child.id();
    if let Some(s) = shared {
        s.register_pid(pid);
    }
    let out = child.wait_with_output();
    if let Some(s) = shared {
        s.unregister_pid(pid);
    }
    out.with_context(|| format!("waiting for {shown}"))
}

/// [`run_raw`], failing with the stderr unless the command succeeds.
fn run_output(cmd: &mut Command, shared: Option<&Shared>) -> Result<Output> {
    let out = run_raw(cmd, shared)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            command_line(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

fn command_line(cmd: &Command) -> String {
    let args: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    shell_line(&cmd.get_program().to_string_lossy(), &args)
}

/// Kill a process the lab started (and its process group), if it is still our child: a pid
/// already reaped by its owner may name another process by now.
fn kill_ours(pid: u32) {
    let ours = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // pid (comm) state ppid ...: comm may hold spaces and parentheses.
            let rest = &s[s.rfind(')')? + 1..];
            rest.split_whitespace().nth(1)?.parse::<u32>().ok()
        })
        == Some(std::process::id());
    if ours {
        // SAFETY: kill has no memory-safety preconditions; the target is our child and the
        // process group it leads.
        unsafe {
            libc::kill(-(pid as i32), libc::SIGKILL);
            libc::kill(pid as i32, libc::SIGKILL);
        }
    }
}

fn del_netns(ns: &str) -> Result<()> {
    let out = Command::new("ip")
        .args(["netns", "del", ns])
        .output()
        .context("running ip netns del")?;
    if !out.status.success() && Path::new("/run/netns").join(ns).exists() {
        bail!(
            "ip netns del {ns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Every named network namespace (`ip netns list`).
pub fn list_netns() -> Result<Vec<String>> {
    let out = run_output(Command::new("ip").args(["netns", "list"]), None)?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

fn is_mounted(path: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    text.lines()
        .any(|l| l.split_whitespace().nth(4) == Some(want.as_ref()))
}

fn umount(path: &Path) -> Result<()> {
    if !is_mounted(path) {
        return Ok(());
    }
    let target = CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
        bail!(
            "umount {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// The pid a lab name (`xlb-<pid>-<rand>...`) was made by.
fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(LAB_PREFIX)?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// Remove what labs of dead runs left behind: namespaces whose name starts with `prefix`
/// (e.g. [`LAB_PREFIX`]) and whose creating process no longer runs, with the processes still
/// inside them, and their directories under the temp dir (bpffs unmounted). Labs of live
/// processes are left alone, whatever the prefix. Returns what was removed.
pub fn cleanup_stale(prefix: &str) -> Result<Vec<String>> {
    let dead = |name: &str| match owner_pid(name) {
        Some(pid) => !Path::new(&format!("/proc/{pid}")).exists(),
        None => false,
    };
    let mut removed = Vec::new();
    for ns in list_netns()? {
        if !ns.starts_with(prefix) || !dead(&ns) {
            continue;
        }
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &ns]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    // SAFETY: kill has no memory-safety preconditions.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        del_netns(&ns)?;
        removed.push(format!("namespace {ns}"));
    }
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with(prefix) || !dead(&name) || !e.path().is_dir() {
                continue;
            }
            umount(&e.path().join("bpffs"))?;
            std::fs::remove_dir_all(e.path())
                .with_context(|| format!("removing {}", e.path().display()))?;
            removed.push(format!("directory {}", e.path().display()));
        }
    }
    Ok(removed)
}

/// Run `f` on a thread that entered the network namespace `ns` (the namespace is per
/// thread: the caller's is untouched).
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let path = Path::new("/run/netns").join(ns);
    std::thread::spawn(move || {
        let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: setns on a valid namespace fd, for this thread only.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!(
                "setns({}): {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        f()
    })
    .join()
    .map_err(|_| anyhow!("the thread in namespace {ns} panicked"))?
}

/// Load `xlb_pass` from the map-less helper object and attach it natively to `iface` in `ns`.
fn load_pass(ns: &str, iface: &str) -> Result<Ebpf> {
    let iface = iface.to_string();
    let ns_name = ns.to_string();
    in_netns(ns, move || {
        let mut ebpf = load_aux().context("loading the XDP object for the pass program")?;
        let prog: &mut Xdp = ebpf
            .program_mut(lb_common::PROG_PASS)
            .with_context(|| format!("program {} missing", lb_common::PROG_PASS))?
            .try_into()
            .context("xlb_pass is not an XDP program")?;
        prog.load().context("loading xlb_pass")?;
        prog.attach(&iface, XdpMode::Driver)
            .with_context(|| format!("attaching xlb_pass to {iface} in {ns_name}"))?;
        Ok(ebpf)
    })
}

/// Parse `request`'s output: a name per line, or `FAIL <reason>`.
pub fn parse_replies(out: &str) -> Vec<Reply> {
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| match l.strip_prefix("FAIL") {
            Some(reason) => Err(reason.trim().to_string()),
            None => Ok(l.trim().to_string()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_replies() {
        assert_eq!(owner_pid("xlb-1234-a3f1-client"), Some(1234));
        assert_eq!(owner_pid("xlb-1234-a3f1"), Some(1234));
        assert_eq!(owner_pid("xlbt-attach-1"), None);
        assert_eq!(owner_pid("other"), None);
        let r = parse_replies("r1\nr2\nFAIL connect: timed out\n\nr1\n");
        assert_eq!(r.len(), 4);
        let s = Spread::of(&r);
        assert_eq!(s.count("r1"), 2);
        assert_eq!(s.count("r3"), 0);
        assert_eq!(s.failures, vec!["connect: timed out".to_string()]);
        assert_eq!(s.total(), 4);
        assert_eq!(
            shell_line("ip", &["-n", "a b", "x'y"]),
            r"ip -n 'a b' 'x'\''y'"
        );
        assert_eq!(VIP6.to_string(), "fd00:222:1::100");
    }
}
