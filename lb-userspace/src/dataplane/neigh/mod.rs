//! MAC resolution of the real servers on one interface, from the kernel's neighbour table.
//!
//! Direct routing rewrites only the destination MAC, so each real must sit on the balancer's L2
//! segment ([`KernelNeighbours::on_link`]) and the daemon must know its MAC. The kernel already
//! does ARP and ND; this module reads its neighbour table over a raw `NETLINK_ROUTE` socket
//! ([`KernelNeighbours::dump`]), asks it to resolve missing reals by sending them one empty UDP
//! datagram ([`KernelNeighbours::probe`]) and waits a bounded time for the answers
//! ([`resolve_all`]).
//!
//! The netlink encoding and parsing are pure functions over byte slices (tested with hand-made
//! messages below); only `NlSocket` and [`KernelNeighbours::probe`] make system calls. Every
//! parser returns an error on malformed input instead of panicking, and every loop is bounded by
//! the input length or by a constant.

pub mod links;
mod netlink;

use std::{
    collections::{HashMap, HashSet},
    ffi::CString,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use netlink::*;

pub use crate::model::Mac;

/// Why the neighbour table could not be read or a real could not be probed. Each variant names
/// the interface and the request or system call that failed.
#[derive(Debug, thiserror::Error)]
pub enum NeighError {
    #[error("interface {iface:?}: not a valid interface name ({reason})")]
    BadName { iface: String, reason: &'static str },
    #[error("interface {iface:?}: if_nametoindex: {source}")]
    NoInterface {
        iface: String,
        #[source]
        source: io::Error,
    },
    /// A system call on the netlink socket failed.
    #[error("interface {iface}: {request}: {call}: {source}")]
    Netlink {
        iface: String,
        request: String,
        call: &'static str,
        #[source]
        source: io::Error,
    },
    /// The kernel answered the request with an error (`NLMSG_ERROR` or an error in `NLMSG_DONE`).
    #[error("interface {iface}: {request}: the kernel answered: {source}")]
    Kernel {
        iface: String,
        request: String,
        #[source]
        source: io::Error,
    },
    /// The kernel's answer did not parse.
    #[error("interface {iface}: {request}: malformed netlink answer: {source}")]
    Malformed {
        iface: String,
        request: String,
        #[source]
        source: ParseError,
    },
    /// Sending the probe datagram failed in a way that is not a plain "unreachable".
    #[error("interface {iface}: probe of {addr}: {call}: {source}")]
    Probe {
        iface: String,
        addr: IpAddr,
        call: &'static str,
        #[source]
        source: io::Error,
    },
}

/// What is wrong with a netlink message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("{what} at byte {offset}: needs {need} bytes, {have} left")]
    Truncated {
        what: &'static str,
        offset: usize,
        need: usize,
        have: usize,
    },
    #[error("{what} at byte {offset} declares length {len}, shorter than its own header")]
    BadLength {
        what: &'static str,
        offset: usize,
        len: usize,
    },
    #[error("{attr} of {len} bytes for address family {family}")]
    BadAttribute {
        attr: &'static str,
        family: u8,
        len: usize,
    },
    #[error("the kernel reported NLMSG_OVERRUN (messages were lost)")]
    Overrun,
}

/// How an XDP program runs on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpAttached {
    Native,
    Generic,
    Offloaded,
    /// Programs in more than one mode.
    Several,
}

impl XdpAttached {
    pub fn as_str(self) -> &'static str {
        match self {
            XdpAttached::Native => "native",
            XdpAttached::Generic => "generic",
            XdpAttached::Offloaded => "offloaded",
            XdpAttached::Several => "several",
        }
    }
}

/// One dump of the neighbour table of an interface.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NeighTable {
    /// Entries with a usable link-layer address.
    pub usable: HashMap<IpAddr, Mac>,
    /// Entries the kernel failed to resolve (NUD_FAILED: the host does not answer).
    pub failed: HashSet<IpAddr>,
}

/// The neighbour table and routes of one interface, as the kernel sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelNeighbours {
    iface: String,
    ifindex: u32,
}

impl KernelNeighbours {
    /// Look the interface up by name (`if_nametoindex`).
    pub fn new(iface: &str) -> Result<Self, NeighError> {
        let bad = |reason| NeighError::BadName {
            iface: iface.to_owned(),
            reason,
        };
        if iface.is_empty() {
            return Err(bad("empty"));
        }
        if iface.len() >= libc::IFNAMSIZ {
            return Err(bad("longer than 15 bytes"));
        }
        let c = CString::new(iface).map_err(|_| bad("contains a NUL byte"))?;
        // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
        let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
        if ifindex == 0 {
            return Err(NeighError::NoInterface {
                iface: iface.to_owned(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(KernelNeighbours {
            iface: iface.to_owned(),
            ifindex,
        })
    }

    /// The interface with index `ifindex` (`if_indextoname`).
    pub fn from_index(ifindex: u32) -> Result<Self, NeighError> {
        let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
        // SAFETY: `buf` has the IF_NAMESIZE bytes if_indextoname may write.
        let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
        if p.is_null() {
            return Err(NeighError::NoInterface {
                iface: format!("#{ifindex}"),
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: if_indextoname wrote a NUL-terminated name into `buf`.
        let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
        Ok(KernelNeighbours {
            iface: name.to_string_lossy().into_owned(),
            ifindex,
        })
    }

    pub fn iface(&self) -> &str {
        &self.iface
    }

    /// The interface's own MAC (`/sys/class/net/IFACE/address`).
    pub fn mac(&self) -> io::Result<Mac> {
        let text = std::fs::read_to_string(format!("/sys/class/net/{}/address", self.iface))?;
        crate::model::parse_mac(text.trim()).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("address {:?} is not a MAC", text.trim()),
            )
        })
    }

    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// The kernel neighbour table for this interface: one `RTM_GETNEIGH` dump over
    /// `NETLINK_ROUTE` (`AF_UNSPEC`: IPv4 ARP and IPv6 ND), keeping entries in `NUD_REACHABLE |
    /// NUD_STALE | NUD_DELAY | NUD_PROBE | NUD_PERMANENT | NUD_NOARP` with a 6-byte
    /// `NDA_LLADDR`. IPv4 addresses are returned as `IpAddr::V4`.
    ///
    /// Synchronous: the kernel answers at once, a few datagrams per thousand entries. A dump
    /// the kernel marks as interrupted (`NLM_F_DUMP_INTR`, the table changed under it) is
    /// retried twice, then returned as it is.
    pub fn dump(&self) -> Result<HashMap<IpAddr, Mac>, NeighError> {
        self.dump_table().map(|t| t.usable)
    }

    /// `dump`, with the entries the kernel failed to resolve (NUD_FAILED) as well.
    pub fn dump_table(&self) -> Result<NeighTable, NeighError> {
        let request = "RTM_GETNEIGH dump";
        let mut table = NeighTable::default();
        for attempt in 0..3 {
            table = NeighTable::default();
            let seq = next_seq();
            let msg = neigh_dump_request(seq, self.ifindex);
            let interrupted = exchange(&msg, seq, |m| {
                collect_neighbour(m, self.ifindex, &mut table)
            })
            .map_err(|e| e.into_neigh(&self.iface, request))?;
            if !interrupted {
                break;
            }
            log::debug!(
                "{}: neighbour dump interrupted by a change (attempt {})",
                self.iface,
                attempt + 1
            );
        }
        Ok(table)
    }

    /// Make the kernel resolve `addr` on this interface: one empty UDP datagram to `addr:9`
    /// (discard) from a non-blocking socket bound to the interface (`SO_BINDTODEVICE`), which
    /// makes the kernel send ARP or ND. Unreachable-type results (`ECONNREFUSED`,
    /// `EHOSTUNREACH`, `ENETUNREACH`, `EHOSTDOWN`, `EAGAIN`, `ENOBUFS`) are ignored: the
    /// point is the probe, not the datagram.
    pub fn probe(&self, addr: IpAddr) -> Result<(), NeighError> {
        let addr = addr.to_canonical();
        let err = |call, source| NeighError::Probe {
            iface: self.iface.clone(),
            addr,
            call,
            source,
        };
        let (local, dest): (SocketAddr, SocketAddr) = match addr {
            IpAddr::V4(a) => ((Ipv4Addr::UNSPECIFIED, 0).into(), (a, 9).into()),
            // The scope id matters for link-local destinations only, and is ignored otherwise.
            IpAddr::V6(a) => (
                (Ipv6Addr::UNSPECIFIED, 0).into(),
                SocketAddrV6::new(a, 9, 0, self.ifindex).into(),
            ),
        };
        let sock = UdpSocket::bind(local).map_err(|e| err("socket/bind", e))?;
        sock.set_nonblocking(true)
            .map_err(|e| err("fcntl(O_NONBLOCK)", e))?;
        let name = self.iface.as_bytes();
        // SAFETY: the option value is `name`, valid for `name.len()` bytes during the call; the
        // kernel copies at most IFNAMSIZ - 1 bytes and does not need a NUL.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_BINDTODEVICE,
                name.as_ptr().cast(),
                name.len() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(err(
                "setsockopt(SO_BINDTODEVICE)",
                io::Error::last_os_error(),
            ));
        }
        match sock.send_to(&[], dest) {
            Ok(_) => Ok(()),
            Err(e) if is_unreachable(&e) => {
                log::debug!("{}: probe of {addr}: {e} (ignored)", self.iface);
                Ok(())
            }
            Err(e) => Err(err("sendto", e)),
        }
    }

    /// How an XDP program is attached to this interface, as the kernel reports it
    /// (`IFLA_XDP_ATTACHED`), or `None` when none is.
    pub fn xdp_attached(&self) -> Result<Option<XdpAttached>, NeighError> {
        Ok(self.xdp_program()?.map(|(how, _)| how))
    }

    /// How an XDP program is attached, and its id (`IFLA_XDP_PROG_ID`; 0 when several are).
    pub fn xdp_program(&self) -> Result<Option<(XdpAttached, u32)>, NeighError> {
        let request = "RTM_GETLINK";
        let seq = next_seq();
        let mut found = (0u8, 0u32);
        exchange(&link_get_request(seq, self.ifindex), seq, |m| {
            if m.ty == RTM_NEWLINK {
                found = parse_link_xdp_prog(m.payload)?;
            }
            Ok(())
        })
        .map_err(|e| e.into_neigh(&self.iface, request))?;
        let (attached, id) = found;
        Ok(match attached {
            1 => Some(XdpAttached::Native),
            2 => Some(XdpAttached::Generic),
            3 => Some(XdpAttached::Offloaded),
            0 => None,
            _ => Some(XdpAttached::Several),
        }
        .map(|how| (how, id)))
    }

    /// Whether `addr` is on-link for this interface: the kernel's route for it (`RTM_GETROUTE`)
    /// is a unicast route out of this interface without a gateway. Direct routing only works for
    /// reals on the same L2 segment, so `Ok(false)` also when the route goes via a gateway or
    /// another interface, when `addr` is one of the host's own (or a broadcast) addresses, and
    /// when there is no usable route: the kernel answers `ENETUNREACH` (no route),
    /// `EHOSTUNREACH` (unreachable), `EACCES` (prohibit) or, for an IPv4 blackhole route,
    /// `EINVAL` (IPv6 answers a blackhole route with a route of type `RTN_BLACKHOLE`).
    pub fn on_link(&self, addr: IpAddr) -> Result<bool, NeighError> {
        Ok(self
            .route(addr)?
            .is_some_and(|r| r.is_on_link(self.ifindex)))
    }

    /// The address whose MAC a packet to `addr` is sent to when it leaves by this interface
    /// (tunnel mode's next hop): the gateway of the kernel's route, or `addr` itself when it
    /// is on-link. `Ok(None)` when the route leaves by another interface, or there is none
    /// (as for `on_link`).
    pub fn next_hop(&self, addr: IpAddr) -> Result<Option<IpAddr>, NeighError> {
        let addr = addr.to_canonical();
        Ok(self
            .route(addr)?
            .and_then(|r| r.next_hop(addr, self.ifindex)))
    }

    /// Where a packet to `addr` goes first, by whichever interface the kernel's route leaves
    /// by: the next hop (the gateway, or `addr` on-link) and that interface's index. `Ok(None)`
    /// without a usable unicast route.
    pub fn route_out(&self, addr: IpAddr) -> Result<Option<(IpAddr, u32)>, NeighError> {
        let addr = addr.to_canonical();
        Ok(self.route(addr)?.and_then(|r| r.hop(addr)))
    }

    /// The interface's addresses in the kernel's order (the primary address of each family
    /// first), without IPv6 link-local ones (`getifaddrs`).
    pub fn addresses(&self) -> io::Result<Vec<IpAddr>> {
        host_addresses(Some(&self.iface))
    }

    /// Whether the interface is up with a carrier (`operstate` up; `unknown`, which devices
    /// without carrier reporting say, counts as up).
    pub fn link_up(&self) -> io::Result<bool> {
        let text = std::fs::read_to_string(format!("/sys/class/net/{}/operstate", self.iface))?;
        Ok(matches!(text.trim(), "up" | "unknown"))
    }

    /// The interface's MTU.
    pub fn mtu(&self) -> io::Result<u32> {
        let text = std::fs::read_to_string(format!("/sys/class/net/{}/mtu", self.iface))?;
        text.trim()
            .parse()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("mtu: {e}")))
    }

    /// The kernel's route for `addr` (`RTM_GETROUTE`), `None` when it has no usable one.
    fn route(&self, addr: IpAddr) -> Result<Option<netlink::RouteInfo>, NeighError> {
        let addr = addr.to_canonical();
        let request = format!("RTM_GETROUTE for {addr}");
        // A link-local IPv6 address means nothing without an interface; anything else is looked
        // up without one, as the kernel would route a packet to it. (For IPv4, a lookup with an
        // output interface and no route "assumes on-link", so it must not carry one.)
        let oif = match addr {
            IpAddr::V6(a) if a.is_unicast_link_local() => Some(self.ifindex),
            _ => None,
        };
        let seq = next_seq();
        let msg = route_get_request(seq, addr, oif);
        let mut route = None;
        let answer = exchange(&msg, seq, |m| {
            if m.ty == RTM_NEWROUTE {
                route = Some(parse_route(m.payload)?);
            }
            Ok(())
        });
        match answer {
            Ok(_) => Ok(route),
            Err(ExchangeError::Errno(e)) if is_unrouted(e) => {
                log::debug!(
                    "{}: {request}: {} (no usable route)",
                    self.iface,
                    io::Error::from_raw_os_error(e)
                );
                Ok(None)
            }
            Err(e) => Err(e.into_neigh(&self.iface, &request)),
        }
    }
}

/// The addresses of interface `iface` (of every interface with `None`) in the kernel's order
/// (the primary address of each family first), without IPv6 link-local ones (`getifaddrs`).
pub fn host_addresses(iface: Option<&str>) -> io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned, valid until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: a NUL-terminated name owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        if iface.is_some_and(|i| name.to_bytes() != i.as_bytes()) {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr of the family it names.
        let addr = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes())
                }
                libc::AF_INET6 => {
                    let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    IpAddr::from(sin6.sin6_addr.s6_addr)
                }
                _ => continue,
            }
        };
        if let IpAddr::V6(a) = addr {
            if a.is_unicast_link_local() {
                continue;
            }
        }
        out.push(addr);
    }
    // SAFETY: the list getifaddrs allocated, freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// The daemon's view: the MAC of each of `addrs` on `n`'s interface, `None` for those the kernel
/// could not resolve within `wait`.
///
/// Dumps the table, probes the missing addresses (again every second while they stay missing,
/// in case an attempt failed), and re-dumps every 50 ms until all are found or `wait` has
/// elapsed. A failed probe is logged and leaves its address `None`; a failed dump is an error.
/// IPv4-mapped IPv6 addresses are looked up as IPv4; the map's keys are `addrs` as given.
pub async fn resolve_all(
    n: &KernelNeighbours,
    addrs: &[IpAddr],
    wait: Duration,
) -> Result<HashMap<IpAddr, Option<Mac>>, NeighError> {
    const REDUMP: Duration = Duration::from_millis(50);
    const REPROBE: Duration = Duration::from_secs(1);
    let start = tokio::time::Instant::now();
    let deadline = start.checked_add(wait);
    let mut next_probe = start;
    let mut found: HashMap<IpAddr, Option<Mac>> = addrs.iter().map(|&a| (a, None)).collect();
    loop {
        let table = n.dump()?;
        for (addr, mac) in found.iter_mut() {
            if let Some(m) = table.get(&addr.to_canonical()) {
                *mac = Some(*m);
            }
        }
        let missing: HashSet<IpAddr> = found
            .iter()
            .filter(|(_, m)| m.is_none())
            .map(|(a, _)| a.to_canonical())
            .collect();
        if missing.is_empty() {
            break;
        }
        let now = tokio::time::Instant::now();
        if now >= next_probe {
            for &addr in &missing {
                if let Err(e) = n.probe(addr) {
                    log::warn!("{e}");
                }
            }
            next_probe = now + REPROBE;
        }
        let left = match deadline {
            Some(d) if d > now => d - now,
            Some(_) => break,
            None => REDUMP,
        };
        tokio::time::sleep(left.min(REDUMP)).await;
    }
    Ok(found)
}

/// The errors of `RTM_GETROUTE` that mean "no usable route" (see `on_link`).
fn is_unrouted(errno: i32) -> bool {
    matches!(
        errno,
        libc::ENETUNREACH | libc::EHOSTUNREACH | libc::EACCES | libc::EPERM | libc::EINVAL
    )
}

fn is_unreachable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNREFUSED
                | libc::EHOSTUNREACH
                | libc::ENETUNREACH
                | libc::EHOSTDOWN
                | libc::EAGAIN
                | libc::ENOBUFS
        )
    )
}
