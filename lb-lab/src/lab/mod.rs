//! A network lab of namespaces on this machine: one L2 segment (a Linux bridge in namespace
//! `sw`) joining a client, the xlb host (`lb`) and real servers `r1..rN`, wired for direct
//! routing as the veth pitfalls of docs/build.md require. Used by `xlb-lab demo` (`cargo xtask
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

mod cleanup;
mod daemon;
pub mod routed;
mod util;

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
use cleanup::*;
pub use cleanup::{cleanup_stale, emergency_cleanup, list_netns};
use lb_userspace::{api, dataplane::ebpf::load_aux};
use util::*;
pub use util::{in_netns, parse_replies};

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
    /// Build the routed lab of tunnel mode (`routed`): reals behind a router.
    pub routed: bool,
    /// In the routed lab, give the lb a second interface (`eth1`, 10.223.0.3) on the reals'
    /// segment: the routes to the reals leave by it, so tunnel packets that come in by
    /// `eth0` are redirected there.
    pub lb_on_reals: bool,
    /// A second balancer host (`lb2`, 10.222.0.4) on the segment, for pairs and ECMP.
    pub second_lb: bool,
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
            routed: false,
            lb_on_reals: false,
            second_lb: false,
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
    /// The second balancer (`LabConfig::second_lb`).
    pub lb2: Option<Host>,
    pub reals: Vec<Host>,
    /// The router of a routed lab.
    pub router: Option<Host>,
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
    /// Set in the environment of the daemons started from now on.
    daemon_env: Vec<(String, String)>,
    xlb_bin: Option<PathBuf>,
    /// The pass programs on the lb's bridge ports: their links live as long as these.
    pass: Vec<Ebpf>,
    lb_on_reals: bool,
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
        let (client, reals, router) = if cfg.routed {
            (
                routed::host(&prefix, "client", 224, 2),
                (1..=cfg.reals)
                    .map(|i| routed::host(&prefix, &format!("r{i}"), 223, 10 + i as u8))
                    .collect(),
                Some(host("router", 1)),
            )
        } else {
            (
                host("client", 2),
                (1..=cfg.reals)
                    .map(|i| host(&format!("r{i}"), 10 + i as u8))
                    .collect(),
                None,
            )
        };
        let mut lab = Lab {
            sw: format!("{prefix}sw"),
            client,
            lb: host("lb", 3),
            lb2: (cfg.second_lb && !cfg.routed).then(|| host("lb2", 4)),
            reals,
            router,
            vips: cfg.vips.clone(),
            tcp_port: cfg.tcp_port,
            udp_port: cfg.udp_port,
            dir: dir.clone(),
            lab_bin,
            verbose: cfg.verbose,
            shared,
            children: Vec::new(),
            daemon: None,
            daemon_env: Vec::new(),
            xlb_bin: None,
            pass: Vec::new(),
            lb_on_reals: cfg.lb_on_reals,
            next_id: AtomicU64::new(1),
            torn_down: false,
            id,
            prefix,
        };
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        lab.shared.lock().dir = Some(dir);
        if cfg.routed {
            lab.build_routed()?;
        } else {
            lab.build()?;
        }
        if cfg.serve {
            lab.start_servers()?;
        }
        Ok(lab)
    }

    /// Every host: client, lb, reals.
    pub fn hosts(&self) -> impl Iterator<Item = &Host> {
        [&self.client, &self.lb]
            .into_iter()
            .chain(self.lb2.iter())
            .chain(self.reals.iter())
            .chain(self.router.iter())
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
        self.pass.push(load_pass(&sw, &port)?);
        if let Some(lb2) = self.lb2.clone() {
            self.pass.push(load_pass(&sw, &lb2.port)?);
        }
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
        for r in self.reals.clone() {
            self.start_server(&r.role)?;
        }
        Ok(())
    }

    /// Start `serve` on one real (`r1`) and wait until it listens.
    pub fn start_server(&mut self, role: &str) -> Result<()> {
        let bin = self.lab_bin_str()?;
        let (tcp, udp) = (self.tcp_port.to_string(), self.udp_port.to_string());
        let r = self
            .reals
            .iter()
            .find(|r| r.role == role)
            .cloned()
            .ok_or_else(|| anyhow!("no real {role}"))?;
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
        self.own(&format!("serve {}", r.role), child);
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
        Ok(())
    }

    /// Stop the `serve` of one real (its ports then refuse connections).
    pub fn stop_server(&mut self, role: &str) -> Result<()> {
        self.stop_child(&format!("serve {role}"))
    }

    /// Make the lab own a process it started (killed at teardown, or by `stop_child`).
    pub fn own(&mut self, name: &str, child: Child) {
        self.children.push((name.to_string(), child));
    }

    /// Kill a process the lab owns, by the name it was given, and wait for it.
    pub fn stop_child(&mut self, name: &str) -> Result<()> {
        let i = self
            .children
            .iter()
            .position(|(n, _)| n == name)
            .ok_or_else(|| anyhow!("the lab runs no {name:?}"))?;
        let (_, mut child) = self.children.remove(i);
        // SAFETY: our unreaped child, leading its own process group.
        unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
        let _ = child.kill();
        child
            .wait()
            .with_context(|| format!("waiting for {name}"))?;
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
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("{e:#}");
        }
    }
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
