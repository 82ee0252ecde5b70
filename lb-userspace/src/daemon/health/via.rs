//! The way to a VIP through one real, for `target = "vip"` checks: probes leave from a
//! network namespace of the daemon's own, made on first use, whose only link is a veth pair
//! to the host. The namespace holds the balancer host's own source address(es) and sends
//! everything out of the veth; on the host end `xlb_probe` sends each probe to the MAC of the
//! real its source port names (`port_base + real_id`) out of the balanced interface, and the
//! balancer hands the replies (from a VIP to one of those ports) back into the veth. So a
//! probe reaches the real addressed to the VIP exactly as client traffic does (direct
//! routing: the real's MAC, the VIP as destination), also when this host owns the VIP itself,
//! and nothing on the host is configured but the veth (and, if the host's ephemeral port
//! range overlaps the probe ports, `ip_local_reserved_ports`, which is logged).
//!
//! The namespace lives as long as a thread of the daemon that stays in it: when the daemon
//! ends, the namespace and the veth go with it.

use std::{
    collections::BTreeSet,
    io,
    net::{IpAddr, SocketAddr, UdpSocket as StdUdp},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{mpsc, Arc, Mutex as StdMutex, PoisonError},
    time::{Duration, Instant},
};

use tokio::{
    net::{TcpSocket, UdpSocket},
    sync::{oneshot, Mutex},
};

use crate::{
    daemon::writer::WriterHandle,
    dataplane::{ebpf::load_aux, neigh::links},
    model::Mac,
};

/// The first source port of probes (one per real id), above Linux's default ephemeral range
/// (32768-60999).
pub const DEFAULT_PORT_BASE: u16 = 61000;
/// MACs of the veth ends (locally administered; they never leave this host).
const HOST_MAC: Mac = [0x02, 0x78, 0x6c, 0x62, 0x00, 0x01];
const PEER_MAC: Mac = [0x02, 0x78, 0x6c, 0x62, 0x00, 0x02];
/// The name of the veth end inside the namespace.
const PEER_NAME: &str = "xlbprobe";
/// How long a failed setup is remembered before it is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(30);

type Task = Box<dyn FnOnce(&mut NsState) + Send>;

/// What the namespace thread keeps alive: the pass program on its veth end.
struct NsState {
    _pass: Option<aya::Ebpf>,
}

struct Ready {
    tasks: mpsc::Sender<Task>,
    peer_index: u32,
    /// Source addresses already on the namespace's veth.
    addrs: StdMutex<BTreeSet<IpAddr>>,
}

/// The namespace once made, or why making it failed and when (it is tried again later).
type Setup = Result<Arc<Ready>, (Instant, String)>;

/// Sockets whose packets reach a VIP through a given real (see the module documentation).
pub struct Via {
    iface: String,
    writer: WriterHandle,
    port_base: u16,
    port_count: u16,
    state: Mutex<Option<Setup>>,
}

impl std::fmt::Debug for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Via").field("iface", &self.iface).finish()
    }
}

fn ctx(what: &str) -> impl Fn(io::Error) -> io::Error + '_ {
    move |e| io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn ifindex(name: &str) -> io::Result<u32> {
    let c = std::ffi::CString::new(name).map_err(io::Error::other)?;
    // SAFETY: a NUL-terminated name we own.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(ctx(name)(io::Error::last_os_error())),
        i => Ok(i),
    }
}

fn iface_mac(iface: &str) -> io::Result<Mac> {
    let text = std::fs::read_to_string(format!("/sys/class/net/{iface}/address"))
        .map_err(ctx(&format!("reading the MAC of {iface}")))?;
    crate::model::parse_mac(text.trim())
        .ok_or_else(|| io::Error::other(format!("{iface} has no Ethernet address")))
}

impl Via {
    pub fn new(iface: &str, writer: WriterHandle, port_base: u16, max_reals: u32) -> Via {
        let room = u32::from(u16::MAX) - u32::from(port_base) + 1;
        Via {
            iface: iface.to_string(),
            writer,
            port_base,
            port_count: max_reals.min(room) as u16,
            state: Mutex::new(None),
        }
    }

    pub async fn tcp_socket(
        &self,
        real: IpAddr,
        vip: IpAddr,
        real_id: u32,
    ) -> io::Result<TcpSocket> {
        let fd = self.socket(real, vip, real_id, libc::SOCK_STREAM).await?;
        let std = std::net::TcpStream::from(fd);
        Ok(TcpSocket::from_std_stream(std))
    }

    pub async fn udp_socket(
        &self,
        real: IpAddr,
        vip: IpAddr,
        real_id: u32,
    ) -> io::Result<UdpSocket> {
        let fd = self.socket(real, vip, real_id, libc::SOCK_DGRAM).await?;
        UdpSocket::from_std(StdUdp::from(fd))
    }

    /// A socket in the namespace, bound to this host's address towards `real` and to the port
    /// of `real_id`, non-blocking, not connected.
    async fn socket(
        &self,
        real: IpAddr,
        vip: IpAddr,
        real_id: u32,
        ty: i32,
    ) -> io::Result<OwnedFd> {
        if real_id >= u32::from(self.port_count) {
            return Err(io::Error::other(format!(
                "real id {real_id} has no probe port (ports {} to 65535)",
                self.port_base
            )));
        }
        let ready = self.ready().await?;
        let src = source_towards(real, vip)?;
        if !ready
            .addrs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&src)
        {
            let index = ready.peer_index;
            run(&ready.tasks, move |_| links::add_address(index, src))
                .await
                .map_err(ctx(&format!("adding {src} to the probe namespace")))?;
            ready
                .addrs
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(src);
        }
        let port = self.port_base + real_id as u16;
        run(&ready.tasks, move |_| {
            bound_socket(SocketAddr::new(src, port), ty)
        })
        .await
    }

    async fn ready(&self) -> io::Result<Arc<Ready>> {
        let mut state = self.state.lock().await;
        match &*state {
            Some(Ok(r)) => return Ok(r.clone()),
            Some(Err((at, why))) if at.elapsed() < RETRY_AFTER => {
                return Err(io::Error::other(format!("no path to the VIP: {why}")))
            }
            _ => {}
        }
        match self.setup().await {
            Ok(r) => {
                let r = Arc::new(r);
                *state = Some(Ok(r.clone()));
                Ok(r)
            }
            Err(e) => {
                log::error!("target = \"vip\" checks: setting up the probe namespace: {e}");
                *state = Some(Err((Instant::now(), e.to_string())));
                Err(io::Error::other(format!("no path to the VIP: {e}")))
            }
        }
    }

    async fn setup(&self) -> io::Result<Ready> {
        let (tasks, ns_fd) = spawn_namespace()?;
        let iface_index = ifindex(&self.iface)?;
        let host = format!("xlbp{iface_index}");
        let h = host.clone();
        let fd = ns_fd.as_raw_fd();
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            // A veth of an earlier daemon of this interface would be gone with its namespace;
            // one left anyway is in the way.
            links::delete_link(&h).map_err(ctx(&format!("deleting {h}")))?;
            links::create_veth(&h, HOST_MAC, PEER_NAME, PEER_MAC, fd)
                .map_err(ctx(&format!("creating the veth {h}")))?;
            links::set_link(ifindex(&h)?, false).map_err(ctx(&format!("setting {h} up")))
        })
        .await
        .map_err(io::Error::other)??;
        drop(ns_fd);
        let peer_index = run(&tasks, |state| {
            let lo = ifindex("lo")?;
            links::set_link(lo, false).map_err(ctx("setting lo up"))?;
            let peer = ifindex(PEER_NAME)?;
            // NOARP: every destination is "on link" with the veth's own MAC, which xlb_probe
            // replaces with the real's.
            links::set_link(peer, true).map_err(ctx("setting the probe veth up"))?;
            links::add_default_route(peer, false).map_err(ctx("adding the IPv4 route"))?;
            links::add_default_route(peer, true).map_err(ctx("adding the IPv6 route"))?;
            state._pass = Some(attach_pass(peer)?);
            Ok(peer)
        })
        .await?;
        let conf = lb_common::ProbeConf {
            veth_ifindex: ifindex(&host)?,
            iface_ifindex: iface_index,
            port_base: self.port_base,
            port_count: self.port_count,
            peer_mac: PEER_MAC,
            iface_mac: iface_mac(&self.iface)?,
            _pad: [0; 6],
        };
        self.writer
            .probes(Some(conf))
            .await
            .map_err(io::Error::other)?;
        reserve_ports(self.port_base, self.port_count);
        log::info!(
            "target = \"vip\" checks: probes leave from a namespace of the daemon's through \
             {host}, from ports {} to {}",
            self.port_base,
            u32::from(self.port_base) + u32::from(self.port_count) - 1
        );
        Ok(Ready {
            tasks,
            peer_index,
            addrs: StdMutex::new(BTreeSet::new()),
        })
    }

    /// Stops routing probes (at shutdown): the namespace goes with the daemon.
    pub async fn stop(&self) {
        if matches!(&*self.state.lock().await, Some(Ok(_))) {
            if let Err(e) = self.writer.probes(None).await {
                log::warn!("stopping target = \"vip\" probes: {e}");
            }
        }
    }
}

/// The address this host sends from to reach `real` (the one the real answers to), found by
/// the routing table without sending anything.
fn source_towards(real: IpAddr, vip: IpAddr) -> io::Result<IpAddr> {
    let any: SocketAddr = if real.is_ipv4() {
        "0.0.0.0:0".parse().map_err(io::Error::other)?
    } else {
        "[::]:0".parse().map_err(io::Error::other)?
    };
    let sock = StdUdp::bind(any)?;
    sock.connect(SocketAddr::new(real, 9))
        .map_err(ctx(&format!("no route to real {real}")))?;
    let src = sock.local_addr()?.ip();
    if src == vip {
        return Err(io::Error::other(format!(
            "this host reaches {real} from the VIP {vip} itself: a probe could not tell its \
             reply from the VIP's traffic"
        )));
    }
    Ok(src)
}

/// A socket of type `ty` bound to `addr` (run in the namespace).
fn bound_socket(addr: SocketAddr, ty: i32) -> io::Result<OwnedFd> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let sock = socket2::Socket::new(domain, socket2::Type::from(ty), None)?;
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())
        .map_err(ctx(&format!("binding {addr} in the probe namespace")))?;
    Ok(sock.into())
}

/// xlb_pass on the namespace's veth end: a veth takes frames redirected into it (the
/// balancer's replies) only when its peer runs an XDP program.
fn attach_pass(index: u32) -> io::Result<aya::Ebpf> {
    let err =
        |e: &dyn std::fmt::Display| io::Error::other(format!("xlb_pass on the probe veth: {e}"));
    let mut ebpf = load_aux().map_err(|e| err(&e))?;
    let prog: &mut aya::programs::Xdp = ebpf
        .program_mut(lb_common::PROG_PASS)
        .ok_or_else(|| err(&"missing"))?
        .try_into()
        .map_err(|e| err(&e))?;
    prog.load().map_err(|e| err(&e))?;
    prog.attach_to_if_index(index, aya::programs::XdpMode::Driver)
        .or_else(|_| prog.attach_to_if_index(index, aya::programs::XdpMode::Skb))
        .map_err(|e| err(&e))?;
    Ok(ebpf)
}

/// A thread in a new network namespace, running tasks; and an fd of that namespace.
fn spawn_namespace() -> io::Result<(mpsc::Sender<Task>, OwnedFd)> {
    let (tx, rx) = mpsc::channel::<Task>();
    let (fd_tx, fd_rx) = mpsc::channel::<io::Result<OwnedFd>>();
    std::thread::Builder::new()
        .name("xlb-probe-ns".into())
        .spawn(move || {
            // SAFETY: unshare affects this thread only (its network namespace).
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                let _ = fd_tx.send(Err(
                    ctx("unshare(CLONE_NEWNET)")(io::Error::last_os_error()),
                ));
                return;
            }
            let path = c"/proc/thread-self/ns/net";
            // SAFETY: open(2) of a constant path; the fd is owned at once.
            let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
            if fd < 0 {
                let _ = fd_tx.send(Err(io::Error::last_os_error()));
                return;
            }
            // SAFETY: a fresh fd that nothing else owns.
            let _ = fd_tx.send(Ok(unsafe { OwnedFd::from_raw_fd(fd) }));
            let mut state = NsState { _pass: None };
            for task in rx {
                task(&mut state);
            }
        })?;
    let fd = fd_rx
        .recv()
        .map_err(|_| io::Error::other("the probe namespace thread ended"))??;
    Ok((tx, fd))
}

/// Runs `f` on the namespace thread and waits for its result.
async fn run<T: Send + 'static>(
    tasks: &mpsc::Sender<Task>,
    f: impl FnOnce(&mut NsState) -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let (tx, rx) = oneshot::channel();
    tasks
        .send(Box::new(move |state| {
            let _ = tx.send(f(state));
        }))
        .map_err(|_| io::Error::other("the probe namespace thread ended"))?;
    rx.await
        .map_err(|_| io::Error::other("the probe namespace thread ended"))?
}

/// Keeps the host's own connections off the probe ports, if its ephemeral range reaches them.
fn reserve_ports(base: u16, count: u16) {
    let range =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut it = range
        .split_whitespace()
        .filter_map(|t| t.parse::<u32>().ok());
    let (Some(lo), Some(hi)) = (it.next(), it.next()) else {
        return;
    };
    let (first, last) = (u32::from(base), u32::from(base) + u32::from(count) - 1);
    if hi < first || lo > last {
        return;
    }
    let path = "/proc/sys/net/ipv4/ip_local_reserved_ports";
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let new = if old.trim().is_empty() {
        format!("{first}-{last}")
    } else {
        format!("{},{first}-{last}", old.trim())
    };
    match std::fs::write(path, &new) {
        Ok(()) => log::info!(
            "net.ipv4.ip_local_reserved_ports = {new}: the ephemeral range {lo}-{hi} overlaps \
             the health probes' ports"
        ),
        Err(e) => log::warn!(
            "the ephemeral port range {lo}-{hi} overlaps the health probes' ports {first}-{last} \
             and reserving them failed ({e}): a connection of this host from one of them to a \
             VIP address could be taken for a probe's"
        ),
    }
}
