//! Links, addresses and routes over netlink, in the network namespace of the calling thread:
//! what the probe namespace of `target = "vip"` health checks is built with (a veth pair, its
//! flags, an address per source the probes use, default routes).

use std::{io, net::IpAddr, os::fd::RawFd};

use super::{netlink::*, Mac};

const RTM_DELLINK: u16 = 17;
const RTM_NEWADDR: u16 = 20;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_REPLACE: u16 = 0x100;
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_NET_NS_FD: u16 = 28;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_F_NODAD: u8 = 0x02;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_LINK: u8 = 253;
const IFF_UP: u32 = 0x1;
const IFF_NOARP: u32 = 0x80;

/// Sends one request and waits for its ACK; the kernel's error as the `io::Error` of its
/// errno (the caller says what it was doing).
fn request(msg: Vec<u8>, seq: u32) -> io::Result<()> {
    match exchange(&msg, seq, |_| Ok(())) {
        Ok(_) => Ok(()),
        Err(ExchangeError::Errno(e)) => Err(io::Error::from_raw_os_error(e)),
        Err(ExchangeError::Io(_, e)) => Err(e),
        Err(ExchangeError::Malformed(e)) => Err(io::Error::other(e.to_string())),
    }
}

/// `struct ifinfomsg` for `index` with `flags` (those in `change`).
fn ifinfo(out: &mut Vec<u8>, index: u32, flags: u32, change: u32) {
    out.push(AF_UNSPEC);
    out.push(0);
    out.extend_from_slice(&0u16.to_ne_bytes());
    out.extend_from_slice(&index.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&change.to_ne_bytes());
}

fn name_attr(name: &str) -> Vec<u8> {
    let mut v = name.as_bytes().to_vec();
    v.push(0);
    v
}

/// A veth pair: `host` here, `peer` in the namespace `peer_ns` (an open namespace fd).
pub fn create_veth(
    host: &str,
    host_mac: Mac,
    peer: &str,
    peer_mac: Mac,
    peer_ns: RawFd,
) -> io::Result<()> {
    let seq = next_seq();
    let mut peer_msg = Vec::new();
    ifinfo(&mut peer_msg, 0, 0, 0);
    push_attr(&mut peer_msg, IFLA_IFNAME, &name_attr(peer));
    push_attr(&mut peer_msg, IFLA_ADDRESS, &peer_mac);
    push_attr(
        &mut peer_msg,
        IFLA_NET_NS_FD,
        &(peer_ns as u32).to_ne_bytes(),
    );
    let mut data = Vec::new();
    push_attr(&mut data, VETH_INFO_PEER, &peer_msg);
    let mut info = Vec::new();
    push_attr(&mut info, IFLA_INFO_KIND, b"veth\0");
    push_attr(&mut info, IFLA_INFO_DATA, &data);
    let mut out = Vec::new();
    push_header(
        &mut out,
        RTM_NEWLINK,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        seq,
    );
    ifinfo(&mut out, 0, 0, 0);
    push_attr(&mut out, IFLA_IFNAME, &name_attr(host));
    push_attr(&mut out, IFLA_ADDRESS, &host_mac);
    push_attr(&mut out, IFLA_LINKINFO, &info);
    request(finish(out), seq)
}

/// Deletes a link by name; one that does not exist is no error.
pub fn delete_link(name: &str) -> io::Result<()> {
    let seq = next_seq();
    let mut out = Vec::new();
    push_header(&mut out, RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK, seq);
    ifinfo(&mut out, 0, 0, 0);
    push_attr(&mut out, IFLA_IFNAME, &name_attr(name));
    match request(finish(out), seq) {
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(()),
        other => other,
    }
}

/// Attaches the XDP program `fd` to link `index` the netlink way (no bpf_link: it stays
/// attached when this process exits), or detaches with `fd` -1. `flags`: `XDP_FLAGS_*`.
pub fn set_xdp(index: u32, fd: RawFd, flags: u32) -> io::Result<()> {
    let seq = next_seq();
    let mut out = Vec::new();
    push_header(&mut out, RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, seq);
    ifinfo(&mut out, index, 0, 0);
    let mut nested = Vec::new();
    push_attr(&mut nested, IFLA_XDP_FD, &fd.to_ne_bytes());
    push_attr(&mut nested, IFLA_XDP_FLAGS, &flags.to_ne_bytes());
    push_attr(&mut out, IFLA_XDP | NLA_F_NESTED, &nested);
    request(finish(out), seq)
}

/// Brings a link up, and sets or clears its NOARP flag.
pub fn set_link(index: u32, noarp: bool) -> io::Result<()> {
    let seq = next_seq();
    let mut out = Vec::new();
    push_header(&mut out, RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, seq);
    let flags = IFF_UP | if noarp { IFF_NOARP } else { 0 };
    ifinfo(&mut out, index, flags, IFF_UP | IFF_NOARP);
    request(finish(out), seq)
}

/// Adds `addr` as a host address (/32, /128; no duplicate detection) to link `index`; an
/// address already there is no error.
pub fn add_address(index: u32, addr: IpAddr) -> io::Result<()> {
    let seq = next_seq();
    let (family, bytes): (u8, Vec<u8>) = match addr {
        IpAddr::V4(a) => (AF_INET, a.octets().to_vec()),
        IpAddr::V6(a) => (AF_INET6, a.octets().to_vec()),
    };
    let mut out = Vec::new();
    push_header(
        &mut out,
        RTM_NEWADDR,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        seq,
    );
    out.push(family);
    out.push((bytes.len() * 8) as u8);
    out.push(IFA_F_NODAD);
    out.push(0);
    out.extend_from_slice(&index.to_ne_bytes());
    push_attr(&mut out, IFA_LOCAL, &bytes);
    push_attr(&mut out, IFA_ADDRESS, &bytes);
    request(finish(out), seq)
}

/// A default route (IPv4 or IPv6) straight out of link `index`.
pub fn add_default_route(index: u32, v6: bool) -> io::Result<()> {
    let seq = next_seq();
    let mut out = Vec::new();
    push_header(
        &mut out,
        RTM_NEWROUTE,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        seq,
    );
    out.push(if v6 { AF_INET6 } else { AF_INET });
    out.push(0); // dst_len: the default route
    out.push(0); // src_len
    out.push(0); // tos
    out.push(RT_TABLE_MAIN);
    out.push(RTPROT_BOOT);
    out.push(RT_SCOPE_LINK);
    out.push(RTN_UNICAST);
    out.extend_from_slice(&0u32.to_ne_bytes());
    push_attr(&mut out, RTA_OIF, &index.to_ne_bytes());
    request(finish(out), seq)
}
