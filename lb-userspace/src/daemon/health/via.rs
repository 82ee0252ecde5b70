//! The way to a VIP through one real, for `target = "vip"` checks.

use std::{io, net::IpAddr};

use tokio::net::{TcpSocket, UdpSocket};

/// Sockets whose packets reach a VIP through a given real.
#[derive(Debug)]
pub struct Via {}

impl Via {
    pub async fn tcp_socket(
        &self,
        _real: IpAddr,
        _vip: IpAddr,
        _real_id: u32,
    ) -> io::Result<TcpSocket> {
        Err(io::Error::other("target = \"vip\" is not available"))
    }

    pub async fn udp_socket(
        &self,
        _real: IpAddr,
        _vip: IpAddr,
        _real_id: u32,
    ) -> io::Result<UdpSocket> {
        Err(io::Error::other("target = \"vip\" is not available"))
    }
}
