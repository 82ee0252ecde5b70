//! The netlink wire format (include/uapi/linux/{netlink,rtnetlink,neighbour}.h) and the
//! socket: pure encoders and parsers over byte slices, and one request/answer exchange.

use super::*;

// ---------------------------------------------------------------------------------------------
// Netlink wire format (include/uapi/linux/{netlink,rtnetlink,neighbour}.h). Host byte order.

pub(super) const NLMSG_HDRLEN: usize = 16;
pub(super) const RTA_HDRLEN: usize = 4;
/// `struct ndmsg`: family u8, pad u8, pad u16, ifindex i32, state u16, flags u8, type u8.
pub(super) const NDMSG_LEN: usize = 12;
/// `struct rtmsg`: family, dst_len, src_len, tos, table, protocol, scope, type (u8), flags u32.
pub(super) const RTMSG_LEN: usize = 12;

pub(super) const NLMSG_NOOP: u16 = 1;
pub(super) const NLMSG_ERROR: u16 = 2;
pub(super) const NLMSG_DONE: u16 = 3;
pub(super) const NLMSG_OVERRUN: u16 = 4;

pub(super) const NLM_F_REQUEST: u16 = 0x1;
pub(super) const NLM_F_ACK: u16 = 0x4;
pub(super) const NLM_F_DUMP_INTR: u16 = 0x10;
pub(super) const NLM_F_DUMP: u16 = 0x100 | 0x200; // NLM_F_ROOT | NLM_F_MATCH

pub(super) const RTM_NEWLINK: u16 = 16;
pub(super) const RTM_GETLINK: u16 = 18;
pub(super) const RTM_NEWROUTE: u16 = 24;
pub(super) const RTM_GETROUTE: u16 = 26;
pub(super) const RTM_NEWNEIGH: u16 = 28;
pub(super) const RTM_GETNEIGH: u16 = 30;

pub(super) const AF_UNSPEC: u8 = 0;
pub(super) const AF_INET: u8 = 2;
pub(super) const AF_INET6: u8 = 10;

pub(super) const NDA_DST: u16 = 1;
pub(super) const NDA_LLADDR: u16 = 2;
pub(super) const NDA_IFINDEX: u16 = 8;

pub(super) const RTA_DST: u16 = 1;
pub(super) const RTA_OIF: u16 = 4;
pub(super) const RTA_GATEWAY: u16 = 5;
pub(super) const RTA_VIA: u16 = 18;
pub(super) const RTN_UNICAST: u8 = 1;

/// `struct ifinfomsg`: family u8, pad u8, type u16, index i32, flags u32, change u32.
pub(super) const IFINFOMSG_LEN: usize = 16;
pub(super) const IFLA_XDP: u16 = 43;
pub(super) const IFLA_XDP_ATTACHED: u16 = 2;
pub(super) const IFLA_XDP_FD: u16 = 1;
pub(super) const IFLA_XDP_FLAGS: u16 = 3;
pub(super) const IFLA_XDP_PROG_ID: u16 = 4;
pub(super) const NLA_F_NESTED: u16 = 0x8000;

/// Flag bits stored in `nla_type` (`NLA_F_NESTED`, `NLA_F_NET_BYTEORDER`).
pub(super) const NLA_TYPE_MASK: u16 = 0x3fff;

pub(super) const NUD_REACHABLE: u16 = 0x02;
pub(super) const NUD_STALE: u16 = 0x04;
pub(super) const NUD_DELAY: u16 = 0x08;
pub(super) const NUD_PROBE: u16 = 0x10;
pub(super) const NUD_FAILED: u16 = 0x20;
pub(super) const NUD_NOARP: u16 = 0x40;
pub(super) const NUD_PERMANENT: u16 = 0x80;
/// The states whose link-layer address can be used.
pub(super) const NUD_USABLE: u16 =
    NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE | NUD_PERMANENT | NUD_NOARP;

/// `NLMSG_ALIGN` / `NLA_ALIGN`: round up to 4 bytes (saturating: lengths come from the wire).
pub(super) fn align4(n: usize) -> usize {
    n.saturating_add(3) & !3
}

pub(super) fn take<'a>(
    buf: &'a [u8],
    offset: usize,
    need: usize,
    what: &'static str,
) -> Result<&'a [u8], ParseError> {
    let rest = buf.get(offset..).unwrap_or_default();
    rest.get(..need).ok_or(ParseError::Truncated {
        what,
        offset,
        need,
        have: rest.len(),
    })
}

pub(super) fn ne_u16(b: &[u8], at: usize) -> u16 {
    match b.get(at..at + 2) {
        Some(&[x, y]) => u16::from_ne_bytes([x, y]),
        _ => 0,
    }
}

pub(super) fn ne_u32(b: &[u8], at: usize) -> u32 {
    match b.get(at..at + 4) {
        Some(&[w, x, y, z]) => u32::from_ne_bytes([w, x, y, z]),
        _ => 0,
    }
}

/// One netlink message of a received datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Message<'a> {
    pub(super) ty: u16,
    pub(super) flags: u16,
    pub(super) seq: u32,
    pub(super) payload: &'a [u8],
}

/// The netlink messages of a datagram, in order. The last one may lack its padding.
pub(super) fn messages(buf: &[u8]) -> Result<Vec<Message<'_>>, ParseError> {
    let mut out = Vec::new();
    let mut off = 0;
    // Each round consumes at least NLMSG_HDRLEN bytes, so this ends.
    while off < buf.len() {
        let hdr = take(buf, off, NLMSG_HDRLEN, "nlmsghdr")?;
        let len = ne_u32(hdr, 0) as usize;
        if len < NLMSG_HDRLEN {
            return Err(ParseError::BadLength {
                what: "nlmsghdr",
                offset: off,
                len,
            });
        }
        let whole = take(buf, off, len, "netlink message")?;
        out.push(Message {
            ty: ne_u16(hdr, 4),
            flags: ne_u16(hdr, 6),
            seq: ne_u32(hdr, 8),
            payload: &whole[NLMSG_HDRLEN..],
        });
        off = off.saturating_add(align4(len)).min(buf.len());
    }
    Ok(out)
}

/// The `rtattr`s of `buf` (`base` is `buf`'s offset in its message, for error messages), with
/// the flag bits masked off their types. The last one may lack its padding.
pub(super) fn attributes(buf: &[u8], base: usize) -> Result<Vec<(u16, &[u8])>, ParseError> {
    let mut out = Vec::new();
    let mut off = 0;
    // Each round consumes at least RTA_HDRLEN bytes, so this ends.
    while off < buf.len() {
        let hdr = take(buf, off, RTA_HDRLEN, "rtattr").map_err(|e| rebase(e, base))?;
        let len = ne_u16(hdr, 0) as usize;
        if len < RTA_HDRLEN {
            return Err(ParseError::BadLength {
                what: "rtattr",
                offset: base + off,
                len,
            });
        }
        let whole = take(buf, off, len, "rtattr").map_err(|e| rebase(e, base))?;
        out.push((ne_u16(hdr, 2) & NLA_TYPE_MASK, &whole[RTA_HDRLEN..]));
        off = off.saturating_add(align4(len)).min(buf.len());
    }
    Ok(out)
}

pub(super) fn rebase(e: ParseError, base: usize) -> ParseError {
    match e {
        ParseError::Truncated {
            what,
            offset,
            need,
            have,
        } => ParseError::Truncated {
            what,
            offset: base + offset,
            need,
            have,
        },
        e => e,
    }
}

/// An `RTM_NEWNEIGH` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct NeighEntry<'a> {
    family: u8,
    ifindex: u32,
    state: u16,
    /// `NDA_DST`, for AF_INET and AF_INET6 only.
    dst: Option<IpAddr>,
    lladdr: Option<&'a [u8]>,
}

impl NeighEntry<'_> {
    /// The address, if the entry is on `ifindex` and in NUD_FAILED.
    fn failed(&self, ifindex: u32) -> Option<IpAddr> {
        (self.ifindex == ifindex && self.state & NUD_FAILED != 0).then_some(self.dst?)
    }

    /// The address and MAC, if the entry is on `ifindex`, in a usable state and has a MAC.
    fn usable(&self, ifindex: u32) -> Option<(IpAddr, Mac)> {
        if self.ifindex != ifindex || self.state & NUD_USABLE == 0 {
            return None;
        }
        let mac: Mac = self.lladdr?.try_into().ok()?;
        Some((self.dst?, mac))
    }
}

pub(super) fn parse_neigh(payload: &[u8]) -> Result<NeighEntry<'_>, ParseError> {
    let nd = take(payload, 0, NDMSG_LEN, "ndmsg")?;
    let family = nd[0];
    let mut entry = NeighEntry {
        family,
        ifindex: ne_u32(nd, 4),
        state: ne_u16(nd, 8),
        dst: None,
        lladdr: None,
    };
    let attrs = payload.get(NDMSG_LEN..).unwrap_or_default();
    for (ty, val) in attributes(attrs, NLMSG_HDRLEN + NDMSG_LEN)? {
        match ty {
            NDA_DST => entry.dst = parse_ip(family, val, "NDA_DST")?,
            NDA_LLADDR => entry.lladdr = Some(val),
            _ => {}
        }
    }
    Ok(entry)
}

/// An address attribute: `None` for families other than AF_INET and AF_INET6.
pub(super) fn parse_ip(
    family: u8,
    val: &[u8],
    attr: &'static str,
) -> Result<Option<IpAddr>, ParseError> {
    let bad = || ParseError::BadAttribute {
        attr,
        family,
        len: val.len(),
    };
    match family {
        AF_INET => {
            let a: [u8; 4] = val.try_into().map_err(|_| bad())?;
            Ok(Some(IpAddr::V4(a.into())))
        }
        AF_INET6 => {
            let a: [u8; 16] = val.try_into().map_err(|_| bad())?;
            Ok(Some(IpAddr::V6(a.into())))
        }
        _ => Ok(None),
    }
}

/// The dump's per-message step: keep the usable entries of `ifindex`, and note the failed
/// ones (the kernel gave up resolving them).
pub(super) fn collect_neighbour(
    m: &Message<'_>,
    ifindex: u32,
    out: &mut NeighTable,
) -> Result<(), ParseError> {
    if m.ty == RTM_NEWNEIGH {
        let entry = parse_neigh(m.payload)?;
        if let Some((addr, mac)) = entry.usable(ifindex) {
            out.usable.insert(addr, mac);
        } else if let Some(addr) = entry.failed(ifindex) {
            out.failed.insert(addr);
        }
    }
    Ok(())
}

/// The parts of an `RTM_NEWROUTE` answer that decide on-link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RouteInfo {
    rtype: u8,
    oif: Option<u32>,
    gateway: bool,
    /// The gateway's address, when the kernel names one (`RTA_GATEWAY`, or an `RTA_VIA` of
    /// either family).
    gateway_addr: Option<IpAddr>,
}

impl RouteInfo {
    pub(super) fn is_on_link(&self, ifindex: u32) -> bool {
        self.rtype == RTN_UNICAST && !self.gateway && self.oif == Some(ifindex)
    }

    /// Where a packet to `dst` goes first when it leaves by `ifindex`: the gateway, or `dst`
    /// itself on-link. `None` for a route out of another interface, or of another type.
    pub(super) fn next_hop(&self, dst: IpAddr, ifindex: u32) -> Option<IpAddr> {
        if self.rtype != RTN_UNICAST || self.oif != Some(ifindex) {
            return None;
        }
        match (self.gateway, self.gateway_addr) {
            (false, _) => Some(dst),
            (true, gw) => gw,
        }
    }

    /// `next_hop` out of whichever interface the route names.
    pub(super) fn hop(&self, dst: IpAddr) -> Option<(IpAddr, u32)> {
        let oif = self.oif?;
        self.next_hop(dst, oif).map(|hop| (hop, oif))
    }
}

fn ip_of(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes)
            .ok()
            .map(|b| std::net::Ipv6Addr::from(b).to_canonical()),
        _ => None,
    }
}

pub(super) fn parse_route(payload: &[u8]) -> Result<RouteInfo, ParseError> {
    let rt = take(payload, 0, RTMSG_LEN, "rtmsg")?;
    let mut info = RouteInfo {
        rtype: rt[7],
        oif: None,
        gateway: false,
        gateway_addr: None,
    };
    let attrs = payload.get(RTMSG_LEN..).unwrap_or_default();
    for (ty, val) in attributes(attrs, NLMSG_HDRLEN + RTMSG_LEN)? {
        match ty {
            RTA_OIF => {
                let b: [u8; 4] = val.try_into().map_err(|_| ParseError::BadAttribute {
                    attr: "RTA_OIF",
                    family: rt[0],
                    len: val.len(),
                })?;
                info.oif = Some(u32::from_ne_bytes(b));
            }
            RTA_GATEWAY => {
                info.gateway = true;
                info.gateway_addr = ip_of(val);
            }
            RTA_VIA => {
                // struct rtvia: a family (u16), then the address.
                info.gateway = true;
                info.gateway_addr = val.get(2..).and_then(ip_of);
            }
            _ => {}
        }
    }
    Ok(info)
}

/// How a datagram ended the exchange.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Walk {
    /// `NLMSG_DONE` or an ACK was seen: nothing more will come.
    done: bool,
    /// Some message carried `NLM_F_DUMP_INTR`.
    interrupted: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum WalkError {
    Malformed(ParseError),
    /// A positive errno from `NLMSG_ERROR` or `NLMSG_DONE`.
    Errno(i32),
}

impl From<ParseError> for WalkError {
    fn from(e: ParseError) -> Self {
        WalkError::Malformed(e)
    }
}

/// Go through one datagram: handle the control messages of request `seq`, hand its data
/// messages to `data`, skip other sequence numbers, stop at `NLMSG_DONE` or the ACK.
pub(super) fn walk<'a>(
    buf: &'a [u8],
    seq: u32,
    mut data: impl FnMut(&Message<'a>) -> Result<(), ParseError>,
) -> Result<Walk, WalkError> {
    let mut walk = Walk::default();
    for m in messages(buf)? {
        if m.seq != seq {
            continue;
        }
        if m.flags & NLM_F_DUMP_INTR != 0 {
            walk.interrupted = true;
        }
        match m.ty {
            NLMSG_NOOP => {}
            NLMSG_DONE => {
                // Since Linux 2.6 the payload is the dump's return value; older ones sent none.
                if m.payload.len() >= 4 {
                    let e = ne_u32(m.payload, 0) as i32;
                    if e < 0 {
                        return Err(WalkError::Errno(e.saturating_neg()));
                    }
                }
                walk.done = true;
                return Ok(walk);
            }
            NLMSG_ERROR => {
                let e = ne_u32(take(m.payload, 0, 4, "nlmsgerr")?, 0) as i32;
                if e != 0 {
                    return Err(WalkError::Errno(e.saturating_neg()));
                }
                walk.done = true;
                return Ok(walk);
            }
            NLMSG_OVERRUN => return Err(ParseError::Overrun.into()),
            _ => data(&m)?,
        }
    }
    Ok(walk)
}

pub(super) fn push_header(out: &mut Vec<u8>, ty: u16, flags: u16, seq: u32) {
    out.extend_from_slice(&0u32.to_ne_bytes()); // length, set by `finish`
    out.extend_from_slice(&ty.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
}

pub(super) fn push_attr(out: &mut Vec<u8>, ty: u16, val: &[u8]) {
    out.extend_from_slice(&((RTA_HDRLEN + val.len()) as u16).to_ne_bytes());
    out.extend_from_slice(&ty.to_ne_bytes());
    out.extend_from_slice(val);
    out.resize(align4(out.len()), 0);
}

pub(super) fn finish(mut out: Vec<u8>) -> Vec<u8> {
    let len = (out.len() as u32).to_ne_bytes();
    out[..4].copy_from_slice(&len);
    out
}

/// `RTM_GETNEIGH`, `NLM_F_DUMP`, `ndmsg{AF_UNSPEC}`, and `NDA_IFINDEX` so that kernels since
/// 4.20 filter by interface themselves (older ones ignore it; the answer is filtered anyway).
pub(super) fn neigh_dump_request(seq: u32, ifindex: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(NLMSG_HDRLEN + NDMSG_LEN + 8);
    push_header(&mut out, RTM_GETNEIGH, NLM_F_REQUEST | NLM_F_DUMP, seq);
    out.push(AF_UNSPEC);
    out.resize(NLMSG_HDRLEN + NDMSG_LEN, 0);
    push_attr(&mut out, NDA_IFINDEX, &ifindex.to_ne_bytes());
    finish(out)
}

/// `RTM_GETROUTE` for one address (`rtmsg{family, dst_len = full}`, `RTA_DST`, optionally
/// `RTA_OIF`), with `NLM_F_ACK` so that the answer ends with an ACK like a dump with DONE.
pub(super) fn route_get_request(seq: u32, addr: IpAddr, oif: Option<u32>) -> Vec<u8> {
    let mut out = Vec::with_capacity(NLMSG_HDRLEN + RTMSG_LEN + 28);
    push_header(&mut out, RTM_GETROUTE, NLM_F_REQUEST | NLM_F_ACK, seq);
    let (family, bytes): (u8, Vec<u8>) = match addr {
        IpAddr::V4(a) => (AF_INET, a.octets().to_vec()),
        IpAddr::V6(a) => (AF_INET6, a.octets().to_vec()),
    };
    out.push(family);
    out.push((bytes.len() * 8) as u8);
    out.resize(NLMSG_HDRLEN + RTMSG_LEN, 0);
    push_attr(&mut out, RTA_DST, &bytes);
    if let Some(oif) = oif {
        push_attr(&mut out, RTA_OIF, &oif.to_ne_bytes());
    }
    finish(out)
}

/// `RTM_GETLINK` for one interface.
pub(super) fn link_get_request(seq: u32, ifindex: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(NLMSG_HDRLEN + IFINFOMSG_LEN);
    push_header(&mut out, RTM_GETLINK, NLM_F_REQUEST | NLM_F_ACK, seq);
    out.push(AF_UNSPEC);
    out.resize(NLMSG_HDRLEN + 4, 0);
    out.extend_from_slice(&ifindex.to_ne_bytes());
    out.resize(NLMSG_HDRLEN + IFINFOMSG_LEN, 0);
    finish(out)
}

/// `IFLA_XDP_ATTACHED` (`XDP_ATTACHED_*`; 0 when none) and `IFLA_XDP_PROG_ID` (0 when
/// absent) of an `RTM_NEWLINK` answer.
pub(super) fn parse_link_xdp_prog(payload: &[u8]) -> Result<(u8, u32), ParseError> {
    take(payload, 0, IFINFOMSG_LEN, "ifinfomsg")?;
    let attrs = payload.get(IFINFOMSG_LEN..).unwrap_or_default();
    let mut out = (0, 0);
    for (ty, val) in attributes(attrs, NLMSG_HDRLEN + IFINFOMSG_LEN)? {
        if ty & !NLA_F_NESTED == IFLA_XDP {
            for (inner, v) in attributes(val, 0)? {
                match inner {
                    IFLA_XDP_ATTACHED => out.0 = v.first().copied().unwrap_or(0),
                    IFLA_XDP_PROG_ID => {
                        out.1 = v
                            .get(..4)
                            .and_then(|b| b.try_into().ok())
                            .map_or(0, u32::from_ne_bytes)
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// The socket.

pub(super) fn next_seq() -> u32 {
    static SEQ: AtomicU32 = AtomicU32::new(1);
    SEQ.fetch_add(1, Ordering::Relaxed)
}

/// Datagrams read for one request at most (a dump sends one per ~4–32 KiB of entries).
pub(super) const MAX_DATAGRAMS: usize = 100_000;
/// Receive buffer: larger than any datagram the kernel builds for a dump (at most 32 KiB).
pub(super) const RECV_BUF: usize = 64 * 1024;
/// How long one `recv` may wait for the kernel.
pub(super) const RECV_TIMEOUT: Duration = Duration::from_secs(2);

pub(super) enum ExchangeError {
    Io(&'static str, io::Error),
    Errno(i32),
    Malformed(ParseError),
}

impl ExchangeError {
    pub(super) fn into_neigh(self, iface: &str, request: &str) -> NeighError {
        let (iface, request) = (iface.to_owned(), request.to_owned());
        match self {
            ExchangeError::Io(call, source) => NeighError::Netlink {
                iface,
                request,
                call,
                source,
            },
            ExchangeError::Errno(e) => NeighError::Kernel {
                iface,
                request,
                source: io::Error::from_raw_os_error(e),
            },
            ExchangeError::Malformed(source) => NeighError::Malformed {
                iface,
                request,
                source,
            },
        }
    }
}

/// Send `request` (sequence number `seq`) on a new `NETLINK_ROUTE` socket and read the answer
/// until `NLMSG_DONE` or the ACK, handing its data messages to `data`. Whether the kernel
/// marked the answer as interrupted.
pub(super) fn exchange(
    request: &[u8],
    seq: u32,
    mut data: impl FnMut(&Message<'_>) -> Result<(), ParseError>,
) -> Result<bool, ExchangeError> {
    let sock = NlSocket::open().map_err(|(c, e)| ExchangeError::Io(c, e))?;
    sock.send(request)
        .map_err(|e| ExchangeError::Io("sendto", e))?;
    let mut buf = vec![0u8; RECV_BUF];
    let mut interrupted = false;
    for _ in 0..MAX_DATAGRAMS {
        let Some(len) = sock
            .recv(&mut buf)
            .map_err(|e| ExchangeError::Io("recvfrom", e))?
        else {
            continue; // not from the kernel
        };
        let w = walk(&buf[..len], seq, &mut data).map_err(|e| match e {
            WalkError::Malformed(p) => ExchangeError::Malformed(p),
            WalkError::Errno(e) => ExchangeError::Errno(e),
        })?;
        interrupted |= w.interrupted;
        if w.done {
            return Ok(interrupted);
        }
    }
    Err(ExchangeError::Io(
        "recvfrom",
        io::Error::other(format!("no end after {MAX_DATAGRAMS} datagrams")),
    ))
}

pub(super) struct NlSocket {
    fd: OwnedFd,
}

impl NlSocket {
    fn open() -> Result<NlSocket, (&'static str, io::Error)> {
        // SAFETY: plain socket(2); the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(("socket(AF_NETLINK)", io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let sock = NlSocket {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        };
        let tv = libc::timeval {
            tv_sec: RECV_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: RECV_TIMEOUT.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: the option value is a valid timeval of the given size.
        let rc = unsafe {
            libc::setsockopt(
                sock.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(("setsockopt(SO_RCVTIMEO)", io::Error::last_os_error()));
        }
        Ok(sock)
    }

    fn kernel() -> libc::sockaddr_nl {
        // SAFETY: sockaddr_nl is plain data; all-zero is valid (pid 0 = the kernel).
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        sa
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        let sa = Self::kernel();
        for _ in 0..16 {
            // SAFETY: `msg` and `sa` are valid for the given lengths during the call.
            let n = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    msg.as_ptr().cast(),
                    msg.len(),
                    0,
                    (&sa as *const libc::sockaddr_nl).cast(),
                    std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n as usize != msg.len() {
                return Err(io::Error::other(format!("sent {n} of {} bytes", msg.len())));
            }
            return Ok(());
        }
        Err(io::Error::from(io::ErrorKind::Interrupted))
    }

    /// One datagram into `buf`: its length, or `None` if it was not sent by the kernel.
    fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        for _ in 0..16 {
            let mut sa = Self::kernel();
            let mut sa_len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
            // SAFETY: `buf` and `sa` are valid for writes of the given lengths during the call.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_TRUNC,
                    (&mut sa as *mut libc::sockaddr_nl).cast(),
                    &mut sa_len,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("no answer from the kernel within {RECV_TIMEOUT:?}"),
                        ))
                    }
                    _ => return Err(e),
                }
            }
            let n = n as usize;
            if n > buf.len() {
                return Err(io::Error::other(format!(
                    "datagram of {n} bytes exceeds the {}-byte buffer",
                    buf.len()
                )));
            }
            return Ok((sa.nl_pid == 0).then_some(n));
        }
        Err(io::Error::from(io::ErrorKind::Interrupted))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message as the kernel would build it: header, fixed part, attributes.
    fn msg(ty: u16, flags: u16, seq: u32, fixed: &[u8], attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        push_header(&mut out, ty, flags, seq);
        out.extend_from_slice(fixed);
        for (t, v) in attrs {
            push_attr(&mut out, *t, v);
        }
        finish(out)
    }

    fn ndmsg(family: u8, ifindex: u32, state: u16) -> Vec<u8> {
        let mut b = vec![family, 0, 0, 0];
        b.extend_from_slice(&ifindex.to_ne_bytes());
        b.extend_from_slice(&state.to_ne_bytes());
        b.extend_from_slice(&[0, 1]); // flags, type (RTN_UNICAST)
        b
    }

    fn neigh(seq: u32, family: u8, ifindex: u32, state: u16, attrs: &[(u16, &[u8])]) -> Vec<u8> {
        msg(
            RTM_NEWNEIGH,
            0x2,
            seq,
            &ndmsg(family, ifindex, state),
            attrs,
        )
    }

    fn done(seq: u32) -> Vec<u8> {
        msg(NLMSG_DONE, 0x2, seq, &0i32.to_ne_bytes(), &[])
    }

    const NUD_INCOMPLETE: u16 = 0x01;

    const MAC_A: Mac = [0x02, 0xaa, 0, 0, 0, 0x0b];
    const MAC_B: Mac = [0x02, 0xbb, 0, 0, 0, 0x0c];

    fn dump_of(
        buf: &[u8],
        seq: u32,
        ifindex: u32,
    ) -> Result<(Walk, HashMap<IpAddr, Mac>), WalkError> {
        let mut table = NeighTable::default();
        let w = walk(buf, seq, |m| collect_neighbour(m, ifindex, &mut table))?;
        Ok((w, table.usable))
    }

    fn v4(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_v4_entry() {
        let m = neigh(
            7,
            AF_INET,
            3,
            NUD_REACHABLE,
            &[(NDA_DST, &[10, 0, 0, 2]), (NDA_LLADDR, &MAC_A)],
        );
        let e = parse_neigh(messages(&m).unwrap()[0].payload).unwrap();
        assert_eq!(e.family, AF_INET);
        assert_eq!(e.ifindex, 3);
        assert_eq!(e.usable(3), Some((v4("10.0.0.2"), MAC_A)));
        assert!(v4("10.0.0.2").is_ipv4());
        assert_eq!(e.usable(4), None, "another interface");
    }

    #[test]
    fn parses_v6_entry() {
        let a: Ipv6Addr = "fd00::2".parse().unwrap();
        let m = neigh(
            7,
            AF_INET6,
            3,
            NUD_STALE,
            &[(NDA_DST, &a.octets()), (NDA_LLADDR, &MAC_B)],
        );
        let e = parse_neigh(messages(&m).unwrap()[0].payload).unwrap();
        assert_eq!(e.usable(3), Some((IpAddr::V6(a), MAC_B)));
    }

    #[test]
    fn every_usable_state_is_kept_and_the_others_are_not() {
        for state in [
            NUD_REACHABLE,
            NUD_STALE,
            NUD_DELAY,
            NUD_PROBE,
            NUD_PERMANENT,
            NUD_NOARP,
        ] {
            let m = neigh(
                1,
                AF_INET,
                3,
                state,
                &[(NDA_DST, &[10, 0, 0, 2]), (NDA_LLADDR, &MAC_A)],
            );
            let e = parse_neigh(messages(&m).unwrap()[0].payload).unwrap();
            assert!(e.usable(3).is_some(), "state {state:#x}");
        }
        for state in [0, NUD_INCOMPLETE, NUD_FAILED] {
            let m = neigh(
                1,
                AF_INET,
                3,
                state,
                &[(NDA_DST, &[10, 0, 0, 2]), (NDA_LLADDR, &MAC_A)],
            );
            let e = parse_neigh(messages(&m).unwrap()[0].payload).unwrap();
            assert_eq!(e.usable(3), None, "state {state:#x}");
        }
    }

    #[test]
    fn entry_without_lladdr_or_with_a_short_one_is_skipped() {
        let m = neigh(1, AF_INET, 3, NUD_REACHABLE, &[(NDA_DST, &[10, 0, 0, 2])]);
        let e = parse_neigh(messages(&m).unwrap()[0].payload).unwrap();
        assert_eq!(e.lladdr, None);
        assert_eq!(e.usable(3), None);
        // An InfiniBand-sized or empty address is no Ethernet MAC.
        for ll in [&[0u8; 20][..], &[][..]] {
            let m = neigh(
                1,
                AF_INET,
                3,
                NUD_REACHABLE,
                &[(NDA_DST, &[10, 0, 0, 2]), (NDA_LLADDR, ll)],
            );
            let e = parse_neigh(messages(&m).unwrap()[0].payload).unwrap();
            assert_eq!(e.usable(3), None);
        }
    }

    #[test]
    fn failed_and_incomplete_entries_are_ignored_in_a_dump() {
        let mut buf = neigh(
            5,
            AF_INET,
            3,
            NUD_FAILED,
            &[(NDA_DST, &[10, 0, 0, 3]), (NDA_LLADDR, &MAC_B)],
        );
        buf.extend(neigh(
            5,
            AF_INET,
            3,
            NUD_INCOMPLETE,
            &[(NDA_DST, &[10, 0, 0, 4])],
        ));
        buf.extend(neigh(
            5,
            AF_INET,
            3,
            NUD_PERMANENT,
            &[(NDA_DST, &[10, 0, 0, 9]), (NDA_LLADDR, &MAC_A)],
        ));
        buf.extend(done(5));
        let (w, table) = dump_of(&buf, 5, 3).unwrap();
        assert!(w.done);
        assert_eq!(table, HashMap::from([(v4("10.0.0.9"), MAC_A)]));
        // The failed one is reported as failed; the incomplete one (still resolving) is not.
        let mut full = NeighTable::default();
        walk(&buf, 5, |m| collect_neighbour(m, 3, &mut full)).unwrap();
        assert_eq!(full.failed, HashSet::from([v4("10.0.0.3")]));
    }

    #[test]
    fn link_answer_gives_the_xdp_attach_mode() {
        let mut payload = vec![0u8; IFINFOMSG_LEN];
        let mut nested = Vec::new();
        push_attr(&mut nested, IFLA_XDP_ATTACHED, &[2]);
        push_attr(&mut nested, IFLA_XDP_PROG_ID, &42u32.to_ne_bytes());
        push_attr(&mut payload, 3, b"eth0\0"); // IFLA_IFNAME before it
        push_attr(&mut payload, IFLA_XDP | 0x8000, &nested); // NLA_F_NESTED
        assert_eq!(parse_link_xdp_prog(&payload), Ok((2, 42)));
        assert_eq!(parse_link_xdp_prog(&[0u8; IFINFOMSG_LEN]), Ok((0, 0)));
        assert!(parse_link_xdp_prog(&[0u8; 4]).is_err());
        let req = link_get_request(7, 9);
        assert_eq!(req.len(), NLMSG_HDRLEN + IFINFOMSG_LEN);
        assert_eq!(ne_u16(&req, 4), RTM_GETLINK);
        assert_eq!(ne_u32(&req, NLMSG_HDRLEN + 4), 9);
    }

    #[test]
    fn multi_message_buffer_until_done() {
        let a6: Ipv6Addr = "fd00:203::2".parse().unwrap();
        let mut first = neigh(
            9,
            AF_INET,
            3,
            NUD_REACHABLE,
            &[(NDA_DST, &[10, 0, 0, 2]), (NDA_LLADDR, &MAC_A)],
        );
        first.extend(neigh(
            9,
            AF_INET6,
            3,
            NUD_DELAY,
            &[(NDA_DST, &a6.octets()), (NDA_LLADDR, &MAC_B), (9, &[0; 16])], // + NDA_CACHEINFO-like
        ));
        // Another interface, another family (AF_BRIDGE), another request's sequence number.
        first.extend(neigh(
            9,
            AF_INET,
            4,
            NUD_REACHABLE,
            &[(NDA_DST, &[10, 0, 0, 5]), (NDA_LLADDR, &MAC_A)],
        ));
        first.extend(neigh(
            9,
            7,
            3,
            NUD_PERMANENT,
            &[(NDA_DST, &[1, 2, 3]), (NDA_LLADDR, &MAC_A)],
        ));
        first.extend(neigh(
            8,
            AF_INET,
            3,
            NUD_REACHABLE,
            &[(NDA_DST, &[10, 0, 0, 6]), (NDA_LLADDR, &MAC_A)],
        ));
        let (w, t1) = dump_of(&first, 9, 3).unwrap();
        assert!(!w.done, "no DONE yet: read on");
        let mut second = neigh(
            9,
            AF_INET,
            3,
            NUD_PROBE,
            &[(NDA_DST, &[10, 0, 0, 7]), (NDA_LLADDR, &MAC_B)],
        );
        second.extend(done(9));
        // Anything after DONE is not read.
        second.extend(neigh(
            9,
            AF_INET,
            3,
            NUD_REACHABLE,
            &[(NDA_DST, &[10, 0, 0, 8]), (NDA_LLADDR, &MAC_B)],
        ));
        let (w, t2) = dump_of(&second, 9, 3).unwrap();
        assert!(w.done);
        let mut all = t1;
        all.extend(t2);
        assert_eq!(
            all,
            HashMap::from([
                (v4("10.0.0.2"), MAC_A),
                (IpAddr::V6(a6), MAC_B),
                (v4("10.0.0.7"), MAC_B),
            ])
        );
    }

    #[test]
    fn truncated_attribute_is_an_error() {
        let m = neigh(
            1,
            AF_INET,
            3,
            NUD_REACHABLE,
            &[(NDA_DST, &[10, 0, 0, 2]), (NDA_LLADDR, &MAC_A)],
        );
        // Claim a longer LLADDR than the message holds (the message length stays right).
        let mut bad = m.clone();
        let lladdr_at = NLMSG_HDRLEN + NDMSG_LEN + 8;
        bad[lladdr_at..lladdr_at + 2].copy_from_slice(&20u16.to_ne_bytes());
        let err = parse_neigh(messages(&bad).unwrap()[0].payload).unwrap_err();
        assert!(
            matches!(err, ParseError::Truncated { what: "rtattr", .. }),
            "{err}"
        );
        // An attribute length below its header would loop forever if accepted.
        bad[lladdr_at..lladdr_at + 2].copy_from_slice(&2u16.to_ne_bytes());
        let err = parse_neigh(messages(&bad).unwrap()[0].payload).unwrap_err();
        assert!(
            matches!(err, ParseError::BadLength { what: "rtattr", .. }),
            "{err}"
        );
        // A cut message whose header is fixed up to the cut: the attribute runs past the end.
        let mut cut = m[..m.len() - 3].to_vec();
        let len = cut.len() as u32;
        cut[..4].copy_from_slice(&len.to_ne_bytes());
        let err = parse_neigh(messages(&cut).unwrap()[0].payload).unwrap_err();
        assert!(matches!(err, ParseError::Truncated { .. }), "{err}");
        // A 3-byte NDA_DST for AF_INET.
        let m = neigh(1, AF_INET, 3, NUD_REACHABLE, &[(NDA_DST, &[10, 0, 0])]);
        let err = parse_neigh(messages(&m).unwrap()[0].payload).unwrap_err();
        assert!(
            matches!(
                err,
                ParseError::BadAttribute {
                    attr: "NDA_DST",
                    ..
                }
            ),
            "{err}"
        );
        // And a dump with it is an error, not a skipped entry.
        let mut buf = m;
        buf.extend(done(1));
        assert!(matches!(dump_of(&buf, 1, 3), Err(WalkError::Malformed(_))));
    }

    #[test]
    fn malformed_headers_are_errors() {
        let good = neigh(1, AF_INET, 3, NUD_REACHABLE, &[(NDA_DST, &[10, 0, 0, 2])]);
        // Shorter than a header.
        assert!(matches!(
            messages(&good[..10]),
            Err(ParseError::Truncated {
                what: "nlmsghdr",
                ..
            })
        ));
        // Length below the header's: would not advance.
        let mut bad = good.clone();
        bad[..4].copy_from_slice(&8u32.to_ne_bytes());
        assert!(matches!(messages(&bad), Err(ParseError::BadLength { .. })));
        // Length beyond the datagram.
        bad[..4].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(matches!(
            messages(&bad),
            Err(ParseError::Truncated {
                what: "netlink message",
                ..
            })
        ));
        // ndmsg cut short.
        let m = msg(RTM_NEWNEIGH, 0, 1, &[AF_INET, 0, 0], &[]);
        assert!(matches!(
            parse_neigh(messages(&m).unwrap()[0].payload),
            Err(ParseError::Truncated { what: "ndmsg", .. })
        ));
        // NLMSG_ERROR without its errno.
        let m = msg(NLMSG_ERROR, 0, 1, &[0, 0], &[]);
        assert!(matches!(
            walk(&m, 1, |_| Ok(())),
            Err(WalkError::Malformed(_))
        ));
        let m = msg(NLMSG_OVERRUN, 0, 1, &[], &[]);
        assert_eq!(
            walk(&m, 1, |_| Ok(())),
            Err(WalkError::Malformed(ParseError::Overrun))
        );
    }

    #[test]
    fn no_prefix_or_corruption_panics() {
        let a6: Ipv6Addr = "fd00::2".parse().unwrap();
        let mut buf = neigh(
            1,
            AF_INET,
            3,
            NUD_REACHABLE,
            &[(NDA_DST, &[10, 0, 0, 2]), (NDA_LLADDR, &MAC_A)],
        );
        buf.extend(neigh(
            1,
            AF_INET6,
            3,
            NUD_STALE,
            &[(NDA_DST, &a6.octets()), (NDA_LLADDR, &MAC_B)],
        ));
        buf.extend(done(1));
        for cut in 0..=buf.len() {
            let _ = dump_of(&buf[..cut], 1, 3);
            let _ = walk(&buf[..cut], 1, |m| parse_route(m.payload).map(|_| ()));
        }
        // Deterministic byte corruption (xorshift).
        let mut x: u32 = 0x9e37_79b9;
        for _ in 0..20_000 {
            let mut b = buf.clone();
            for _ in 0..3 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let i = x as usize % b.len();
                b[i] = (x >> 24) as u8;
            }
            let _ = dump_of(&b, 1, 3);
            let _ = walk(&b, 1, |m| parse_route(m.payload).map(|_| ()));
        }
    }

    #[test]
    fn kernel_errors_are_reported() {
        let mut e = (-libc::EINVAL).to_ne_bytes().to_vec();
        e.extend(vec![0; 16]); // the echoed request header
        let m = msg(NLMSG_ERROR, 0, 4, &e, &[]);
        assert_eq!(walk(&m, 4, |_| Ok(())), Err(WalkError::Errno(libc::EINVAL)));
        // An error in DONE (a dump that failed midway).
        let m = msg(NLMSG_DONE, 0x2, 4, &(-libc::ENOBUFS).to_ne_bytes(), &[]);
        assert_eq!(
            walk(&m, 4, |_| Ok(())),
            Err(WalkError::Errno(libc::ENOBUFS))
        );
        // errno 0 is an ACK; an old-style DONE without payload is fine.
        let m = msg(NLMSG_ERROR, 0, 4, &[0; 20], &[]);
        assert!(walk(&m, 4, |_| Ok(())).unwrap().done);
        let m = msg(NLMSG_DONE, 0, 4, &[], &[]);
        assert!(walk(&m, 4, |_| Ok(())).unwrap().done);
        // Another request's error is not ours.
        let m = msg(NLMSG_ERROR, 0, 3, &e, &[]);
        assert_eq!(walk(&m, 4, |_| Ok(())), Ok(Walk::default()));
    }

    #[test]
    fn dump_interrupted_flag_is_seen() {
        let mut buf = msg(
            RTM_NEWNEIGH,
            0x2 | NLM_F_DUMP_INTR,
            2,
            &ndmsg(AF_INET, 3, NUD_REACHABLE),
            &[],
        );
        buf.extend(done(2));
        let (w, _) = dump_of(&buf, 2, 3).unwrap();
        assert!(w.done && w.interrupted);
    }

    fn rtmsg(family: u8, rtype: u8) -> Vec<u8> {
        vec![family, 32, 0, 0, 254, 0, 0, rtype, 0, 0, 0, 0]
    }

    #[test]
    fn route_answers() {
        let route = |rtype: u8, attrs: &[(u16, &[u8])]| {
            let m = msg(RTM_NEWROUTE, 0, 1, &rtmsg(AF_INET, rtype), attrs);
            parse_route(messages(&m).unwrap()[0].payload).unwrap()
        };
        let dst = (RTA_DST, &[10u8, 0, 0, 2][..]);
        let oif3 = 3u32.to_ne_bytes();
        let oif4 = 4u32.to_ne_bytes();
        let r = route(RTN_UNICAST, &[dst, (RTA_OIF, &oif3), (7, &[10, 0, 0, 1])]);
        assert_eq!(
            r,
            RouteInfo {
                gateway_addr: None,
                rtype: RTN_UNICAST,
                oif: Some(3),
                gateway: false
            }
        );
        assert!(r.is_on_link(3));
        assert!(!r.is_on_link(4), "another interface");
        let gw = route(
            RTN_UNICAST,
            &[dst, (RTA_OIF, &oif3), (RTA_GATEWAY, &[10, 0, 0, 254])],
        );
        assert!(!gw.is_on_link(3), "via a gateway");
        let via = route(
            RTN_UNICAST,
            &[
                dst,
                (RTA_OIF, &oif3),
                (
                    RTA_VIA,
                    &[10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                ),
            ],
        );
        assert!(!via.is_on_link(3), "via an IPv6 gateway");
        let local = route(2, &[dst, (RTA_OIF, &oif4)]); // RTN_LOCAL, out of lo
        assert!(!local.is_on_link(4), "one of our own addresses");
        let no_oif = route(RTN_UNICAST, &[dst]);
        assert!(!no_oif.is_on_link(3));
        let m = msg(
            RTM_NEWROUTE,
            0,
            1,
            &rtmsg(AF_INET, 1),
            &[(RTA_OIF, &[3, 0])],
        );
        assert!(matches!(
            parse_route(messages(&m).unwrap()[0].payload),
            Err(ParseError::BadAttribute {
                attr: "RTA_OIF",
                ..
            })
        ));
        let m = msg(RTM_NEWROUTE, 0, 1, &[AF_INET, 32], &[]);
        assert!(matches!(
            parse_route(messages(&m).unwrap()[0].payload),
            Err(ParseError::Truncated { what: "rtmsg", .. })
        ));
    }

    #[test]
    fn attribute_flag_bits_are_masked() {
        let m = neigh(
            1,
            AF_INET,
            3,
            NUD_REACHABLE,
            &[
                (NDA_DST | 0x8000, &[10, 0, 0, 2]),
                (NDA_LLADDR | 0x4000, &MAC_A),
            ],
        );
        let e = parse_neigh(messages(&m).unwrap()[0].payload).unwrap();
        assert_eq!(e.usable(3), Some((v4("10.0.0.2"), MAC_A)));
    }

    #[test]
    fn request_layouts() {
        let r = neigh_dump_request(0x0102_0304, 7);
        assert_eq!(r.len(), 16 + 12 + 8);
        assert_eq!(ne_u32(&r, 0) as usize, r.len());
        assert_eq!(ne_u16(&r, 4), RTM_GETNEIGH);
        assert_eq!(ne_u16(&r, 6), 0x301);
        assert_eq!(ne_u32(&r, 8), 0x0102_0304);
        assert_eq!(r[16], AF_UNSPEC);
        assert_eq!(ne_u16(&r, 28), 8);
        assert_eq!(ne_u16(&r, 30), NDA_IFINDEX);
        assert_eq!(ne_u32(&r, 32), 7);

        let r = route_get_request(5, v4("10.203.0.2"), None);
        assert_eq!(r.len(), 16 + 12 + 8);
        assert_eq!(ne_u32(&r, 0) as usize, r.len());
        assert_eq!(ne_u16(&r, 4), RTM_GETROUTE);
        assert_eq!(ne_u16(&r, 6), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(&r[16..18], &[AF_INET, 32]);
        assert_eq!(ne_u16(&r, 28), 8);
        assert_eq!(ne_u16(&r, 30), RTA_DST);
        assert_eq!(&r[32..36], &[10, 203, 0, 2]);
        let r = route_get_request(5, "fe80::1".parse().unwrap(), Some(3));
        assert_eq!(r.len(), 16 + 12 + 20 + 8);
        assert_eq!(&r[16..18], &[AF_INET6, 128]);
        assert_eq!(ne_u16(&r, 28), 20);
        assert_eq!(ne_u16(&r, 48 + 2), RTA_OIF);
        assert_eq!(ne_u32(&r, 52), 3);
    }
}
