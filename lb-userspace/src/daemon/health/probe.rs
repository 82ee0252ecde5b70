//! One probe of one check against one address: connect, ask, judge. Every probe runs under
//! its check's timeout (the caller's) and says in a few words why it failed, as `xlb list`
//! shows it: `connect: refused`, `timeout`, `status 503`, `exit 1`.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpSocket, TcpStream, UdpSocket},
};

use super::{dns, icmp, via::Via};
use crate::model::{HttpCheck, Probe, VipSpec};

/// What a probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Passed; an `exec` check with `dynamic` may report a weight.
    Up { weight: Option<u32> },
    /// Failed, and why.
    Down(String),
}

impl Outcome {
    pub fn up() -> Outcome {
        Outcome::Up { weight: None }
    }

    fn down(why: impl Into<String>) -> Outcome {
        Outcome::Down(why.into())
    }
}

/// Largest HTTP response head read.
const MAX_HEAD: usize = 16 * 1024;

/// What one probe is sent to, and on whose behalf.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    /// The address probed: the real's, or the VIP's for `target = "vip"`.
    pub addr: IpAddr,
    pub port: u16,
    /// For `exec` (its environment) and `target = "vip"` (the real whose path it takes).
    pub vip: VipSpec,
    pub real: IpAddr,
    /// `target = "vip"`: the real id whose path the probe takes.
    pub via_real_id: Option<u32>,
}

/// Everything probes share.
pub struct Probes {
    pub tls: Arc<rustls::ClientConfig>,
    /// The way to VIPs through a real, when `target = "vip"` checks exist.
    pub via: Option<Arc<Via>>,
}

impl Probes {
    pub fn new(via: Option<Arc<Via>>) -> Result<Probes, rustls::Error> {
        Ok(Probes {
            tls: Arc::new(super::tls::client_config()?),
            via,
        })
    }

    /// Runs one probe, bounded by the check's timeout (an overrun is `timeout`; an `exec`
    /// check's program is killed then).
    pub async fn run(&self, probe: &Probe, t: &Target, timeout: Duration) -> Outcome {
        if let Probe::Udp { send, expect: None } = probe {
            // No reply expected: up unless an ICMP error comes back within the timeout.
            return match self.udp(t).await {
                Ok(sock) => match tokio::time::timeout(timeout, udp(&sock, send, None)).await {
                    Ok(outcome) => outcome,
                    Err(_) => Outcome::up(),
                },
                Err(e) => Outcome::down(format!("socket: {}", brief(&e))),
            };
        }
        tokio::time::timeout(timeout, self.run_inner(probe, t))
            .await
            .unwrap_or_else(|_| Outcome::down("timeout"))
    }

    async fn run_inner(&self, probe: &Probe, t: &Target) -> Outcome {
        let addr = SocketAddr::new(t.addr, t.port);
        match probe {
            Probe::Tcp => match self.connect(t).await {
                Ok(_) => Outcome::up(),
                Err(e) => Outcome::down(connect_error(&e)),
            },
            Probe::Http(http) => match self.connect(t).await {
                Ok(stream) => http_get(stream, http, addr).await,
                Err(e) => Outcome::down(connect_error(&e)),
            },
            Probe::Https(http) => match self.connect(t).await {
                Ok(stream) => self.https_get(stream, http, addr).await,
                Err(e) => Outcome::down(connect_error(&e)),
            },
            Probe::Udp { send, expect } => match self.udp(t).await {
                Ok(sock) => udp(&sock, send, expect.as_deref()).await,
                Err(e) => Outcome::down(format!("socket: {}", brief(&e))),
            },
            Probe::Dns { name, qtype } => match self.udp(t).await {
                Ok(sock) => dns::query(&sock, name, qtype.code()).await,
                Err(e) => Outcome::down(format!("socket: {}", brief(&e))),
            },
            Probe::Ping => icmp::ping(t.addr).await,
            Probe::Exec { command, dynamic } => exec(command, *dynamic, t).await,
        }
    }

    async fn connect(&self, t: &Target) -> io::Result<TcpStream> {
        let addr = SocketAddr::new(t.addr, t.port);
        let socket = match (&self.via, t.via_real_id) {
            (Some(via), Some(id)) => via.tcp_socket(t.real, t.addr, id).await?,
            (None, Some(_)) => return Err(io::Error::other("no path to the VIP (see the log)")),
            (_, None) if addr.is_ipv4() => TcpSocket::new_v4()?,
            (_, None) => TcpSocket::new_v6()?,
        };
        let stream = socket.connect(addr).await?;
        // Closed with an RST: a check every few seconds to thousands of reals leaves no
        // TIME_WAIT behind, and a `target = "vip"` probe can reuse its port at once.
        stream.set_zero_linger()?;
        Ok(stream)
    }

    async fn udp(&self, t: &Target) -> io::Result<UdpSocket> {
        let addr = SocketAddr::new(t.addr, t.port);
        let sock = match (&self.via, t.via_real_id) {
            (Some(via), Some(id)) => via.udp_socket(t.real, t.addr, id).await?,
            (None, Some(_)) => return Err(io::Error::other("no path to the VIP (see the log)")),
            (_, None) if addr.is_ipv4() => UdpSocket::bind("0.0.0.0:0").await?,
            (_, None) => UdpSocket::bind("[::]:0").await?,
        };
        sock.connect(addr).await?;
        Ok(sock)
    }

    async fn https_get(&self, stream: TcpStream, http: &HttpCheck, addr: SocketAddr) -> Outcome {
        // SNI is the Host header's name when it is one; an address sends none.
        let name = http
            .host
            .as_deref()
            .and_then(|h| ServerName::try_from(h.to_string()).ok())
            .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()));
        let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
        match connector.connect(name, stream).await {
            Ok(tls) => http_get(tls, http, addr).await,
            Err(e) => Outcome::down(format!("tls: {e}")),
        }
    }
}

/// `connect: refused`, `connect: host unreachable`, ...
pub fn connect_error(e: &io::Error) -> String {
    format!("connect: {}", brief(e))
}

/// An I/O error in a few words.
pub fn brief(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "refused".into(),
        Some(libc::EHOSTUNREACH) => "host unreachable".into(),
        Some(libc::ENETUNREACH) => "network unreachable".into(),
        Some(libc::ECONNRESET) => "reset".into(),
        Some(libc::ETIMEDOUT) => "timed out".into(),
        _ => e.to_string(),
    }
}

async fn http_get<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    http: &HttpCheck,
    addr: SocketAddr,
) -> Outcome {
    let host = http.host.clone().unwrap_or_else(|| match addr {
        SocketAddr::V4(a) => a.to_string(),
        SocketAddr::V6(a) => a.to_string(),
    });
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: xlb-health-check\r\nAccept: */*\r\n\
         Connection: close\r\n\r\n",
        http.path
    );
    if let Err(e) = stream.write_all(request.as_bytes()).await {
        return Outcome::down(format!("send: {}", brief(&e)));
    }
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                let code = response.code.unwrap_or(0);
                return if http.expect_status.contains(code) {
                    Outcome::up()
                } else {
                    Outcome::down(format!("status {code}"))
                };
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            Ok(httparse::Status::Partial) => return Outcome::down("http: response head too long"),
            Err(e) => return Outcome::down(format!("http: {e}")),
        }
        match stream.read(&mut chunk).await {
            Ok(0) if buf.is_empty() => return Outcome::down("http: closed without a response"),
            Ok(0) => return Outcome::down("http: response cut short"),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Outcome::down(format!("receive: {}", brief(&e))),
        }
    }
}

/// Sends the payload; with `expect`, up on a reply that starts with it; without, up on any
/// reply, down on an ICMP error (seen as an error on the connected socket), and the caller
/// decides what the end of the wait means.
async fn udp(sock: &UdpSocket, send: &[u8], expect: Option<&[u8]>) -> Outcome {
    if let Err(e) = sock.send(send).await {
        return Outcome::down(format!("send: {}", brief(&e)));
    }
    let mut buf = vec![0u8; 2048];
    loop {
        match sock.recv(&mut buf).await {
            Ok(n) => match expect {
                Some(want) if buf[..n].starts_with(want) => return Outcome::up(),
                Some(_) => return Outcome::down(format!("reply does not match ({n} bytes)")),
                None => return Outcome::up(),
            },
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                return Outcome::down("icmp: port unreachable")
            }
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Outcome::down(format!("receive: {}", brief(&e))),
        }
    }
}

/// Runs the program with `XLB_VIP`, `XLB_REAL` and `XLB_PORT` set; exit 0 is up. With
/// `dynamic` (keepalived's misc_dynamic): 1 is down, 2..=255 up with weight code - 2. Killed
/// when the timeout drops it (`kill_on_drop`).
async fn exec(command: &[String], dynamic: bool, t: &Target) -> Outcome {
    let Some((program, args)) = command.split_first() else {
        return Outcome::down("exec: no program");
    };
    let child = tokio::process::Command::new(program)
        .args(args)
        .env("XLB_VIP", t.vip.to_string())
        .env("XLB_REAL", t.real.to_string())
        .env("XLB_PORT", t.port.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return Outcome::down(format!("exec {program}: {e}")),
    };
    // On a timeout (this future dropped), the program and whatever it started go.
    let group = KillGroup(child.id());
    let status = match child.wait().await {
        Ok(s) => s,
        Err(e) => return Outcome::down(format!("exec: {e}")),
    };
    std::mem::forget(group);
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), dynamic) {
        (Some(0), _) => Outcome::up(),
        (Some(code @ 2..=255), true) => Outcome::Up {
            weight: Some(code as u32 - 2),
        },
        (Some(code), _) => Outcome::down(format!("exit {code}")),
        (None, _) => Outcome::down(format!(
            "killed by signal {}",
            status.signal().unwrap_or_default()
        )),
    }
}

/// Kills a process group when dropped (an `exec` check's program leads its own).
pub(crate) struct KillGroup(pub(crate) Option<u32>);

impl Drop for KillGroup {
    fn drop(&mut self) {
        if let Some(pgid) = self.0.and_then(|p| i32::try_from(p).ok()) {
            // SAFETY: kill takes no pointers; the group is the unreaped child's own, so its
            // id cannot have been reused.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
    }
}
