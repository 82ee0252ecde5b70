//! `xlb-lab`: the demo lab (`cargo xtask demo`) and the tiny servers and clients it runs in
//! its namespaces (no external tools needed).
//!
//! ```text
//! xlb-lab demo [--xlb PATH] [--requests N] [--verbose]   build a lab, run xlb in it, tear down
//! xlb-lab cleanup [--prefix xlb-]                          remove labs of dead runs
//! xlb-lab serve --name r1 --tcp 80 --udp 53                (hidden) HTTP + UDP echo server
//! xlb-lab request --url http://VIP:80/ --count N           (hidden) one line per request
//! ```

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use lb_lab::lab::{self, Lab, LabConfig, Spread};
use lb_userspace::api;

#[derive(Parser)]
#[command(name = "xlb-lab", about = "xlb's network-namespace lab and demo")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build a lab (client, xlb host, reals on one L2 segment), run the daemon, add a VIP and
    /// reals, send HTTP requests and show the spread, remove a real live, tear down.
    Demo(DemoArgs),
    /// Remove namespaces and directories left by labs whose process died.
    Cleanup {
        #[arg(long, default_value = lab::LAB_PREFIX)]
        prefix: String,
    },
    /// HTTP/1.x server (`GET` answers the name) and UDP echo (answers the name).
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long, default_value_t = 80)]
        tcp: u16,
        #[arg(long, default_value_t = 53)]
        udp: u16,
    },
    /// Send requests; print one line per request: the name that answered, or `FAIL <reason>`.
    #[command(hide = true)]
    Request(RequestArgs),
    /// Send one Ethernet frame, given in hex, out of an interface (a packet socket): what
    /// the tests use to emulate a router's ICMP error.
    #[command(hide = true)]
    Inject {
        #[arg(long)]
        iface: String,
        #[arg(long)]
        hex: String,
    },
}

#[derive(clap::Args)]
struct DemoArgs {
    /// The xlb binary (default: next to this one).
    #[arg(long)]
    xlb: Option<PathBuf>,
    /// dr: reals on the balancer's segment; tunnel: reals behind a router, running
    /// `xlb decap`, reached through IPIP.
    #[arg(long, default_value = "dr", value_parser = ["dr", "tunnel"])]
    mode: String,
    /// HTTP requests per round.
    #[arg(long, default_value_t = 300)]
    requests: usize,
    /// Extra arguments for `xlb daemon` (repeat: --daemon-arg=--ring-size --daemon-arg=4099).
    #[arg(long = "daemon-arg", allow_hyphen_values = true)]
    daemon_args: Vec<String>,
    /// Show every command that builds the lab.
    #[arg(short, long)]
    verbose: bool,
}

#[derive(clap::Args)]
struct RequestArgs {
    /// `http://HOST:PORT/PATH` (IPv6 hosts in brackets): `count` GETs.
    #[arg(long)]
    url: Option<String>,
    /// `HOST:PORT`: `count` UDP exchanges (after the HTTP ones, if both are given).
    #[arg(long)]
    udp: Option<String>,
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// Send every HTTP request over one kept-alive connection (reconnecting after a failure).
    #[arg(long)]
    keepalive: bool,
    /// Pause between requests.
    #[arg(long, default_value_t = 0)]
    interval_ms: u64,
    /// How long a kept-alive connection waits for an answer before giving up on it (a
    /// failover of the balancers in front may take a few seconds of TCP retransmissions).
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    io_timeout: u64,
    /// POST a body of this many bytes instead of a GET: the server answers with its name
    /// and the bytes it read (`r1 1048576`).
    #[arg(long, value_name = "BYTES")]
    upload: Option<usize>,
    /// GET /bytes/BYTES: the server sends its name and that many bytes; printed as the name
    /// and the bytes that came (`r1 1048576`).
    #[arg(long, value_name = "BYTES", conflicts_with = "upload")]
    download: Option<usize>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Demo(args) => return demo(args),
        Cmd::Cleanup { prefix } => lab::cleanup_stale(&prefix).map(|removed| {
            for r in &removed {
                println!("removed {r}");
            }
            if removed.is_empty() {
                println!("nothing to remove");
            }
        }),
        Cmd::Serve { name, tcp, udp } => serve(&name, tcp, udp),
        Cmd::Request(args) => request(&args),
        Cmd::Inject { iface, hex } => inject(&iface, &hex),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xlb-lab: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

// ---- serve ----------------------------------------------------------------------------------

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const IO_TIMEOUT: Duration = Duration::from_secs(5);

fn serve(name: &str, tcp: u16, udp: u16) -> Result<()> {
    // Dual stack: [::] takes IPv4 too (v4-mapped).
    let listener = TcpListener::bind((Ipv6Addr::UNSPECIFIED, tcp))
        .or_else(|_| TcpListener::bind((Ipv4Addr::UNSPECIFIED, tcp)))
        .with_context(|| format!("binding TCP port {tcp}"))?;
    // One UDP socket per local address, so each reply leaves from the address the request
    // was sent to (the VIP on lo), as a connected client requires.
    for addr in local_addrs()? {
        let sock = UdpSocket::bind(SocketAddr::new(addr, udp))
            .with_context(|| format!("binding UDP {addr} port {udp}"))?;
        let reply = name.as_bytes().to_vec();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            loop {
                match sock.recv_from(&mut buf) {
                    Ok((_, peer)) => {
                        let _ = sock.send_to(&reply, peer);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        eprintln!("serve: UDP {addr}: {e}");
                        return;
                    }
                }
            }
        });
    }
    println!("ready");
    std::io::stdout().flush()?;
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let name = name.to_string();
                std::thread::spawn(move || {
                    let _ = http_conn(stream, &name);
                });
            }
            Err(e) => eprintln!("serve: accept: {e}"),
        }
    }
    Ok(())
}

/// Every address of every interface, IPv6 link-local ones excepted (they need a scope).
fn local_addrs() -> Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        bail!("getifaddrs: {}", std::io::Error::last_os_error());
    }
    let mut addrs = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned; the sockaddr is read as the type
        // its family says.
        unsafe {
            let sa = (*cur).ifa_addr;
            if !sa.is_null() {
                match i32::from((*sa).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(sa as *const libc::sockaddr_in);
                        addrs.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                            sin.sin_addr.s_addr,
                        ))));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(sa as *const libc::sockaddr_in6);
                        let a = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                        if a.segments()[0] & 0xffc0 != 0xfe80 {
                            addrs.push(IpAddr::V6(a));
                        }
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
    }
    // SAFETY: the list getifaddrs returned, freed once.
    unsafe { libc::freeifaddrs(head) };
    addrs.sort();
    addrs.dedup();
    Ok(addrs)
}

/// Serve one connection: HTTP/1.0 closes after the answer unless `Connection: keep-alive`,
/// HTTP/1.1 keeps it open unless `Connection: close`.
fn http_conn(stream: TcpStream, name: &str) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let request_line = request_line.trim_end().to_string();
        let mut keep_alive = request_line.ends_with("HTTP/1.1");
        let mut length = 0usize;
        for _ in 0..100 {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 {
                return Ok(());
            }
            let h = h.trim_end().to_ascii_lowercase();
            if h.is_empty() {
                break;
            }
            if let Some(v) = h.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
            if let Some(v) = h.strip_prefix("connection:") {
                match v.trim() {
                    "close" => keep_alive = false,
                    "keep-alive" => keep_alive = true,
                    _ => {}
                }
            }
        }
        // `GET /bytes/N`: the name, then N bytes (a download of a known size).
        let download = request_line
            .strip_prefix("GET /bytes/")
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| *n <= 64 << 20);
        let (status, body) = if let Some(n) = download {
            let mut body = format!("{name}\n");
            body.extend(std::iter::repeat_n('x', n));
            ("200 OK", body)
        } else if request_line.starts_with("GET ") {
            ("200 OK", format!("{name}\n"))
        } else if request_line.starts_with("POST ") {
            let read = std::io::copy(&mut (&mut reader).take(length as u64), &mut std::io::sink())?;
            ("200 OK", format!("{name} {read}\n"))
        } else {
            ("405 Method Not Allowed", "only GET\n".to_string())
        };
        let version = if request_line.ends_with("HTTP/1.1") {
            "HTTP/1.1"
        } else {
            "HTTP/1.0"
        };
        let conn = if keep_alive { "keep-alive" } else { "close" };
        write!(
            out,
            "{version} {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
             Connection: {conn}\r\n\r\n{body}",
            body.len()
        )?;
        out.flush()?;
        if !keep_alive {
            return Ok(());
        }
    }
}

// ---- inject ---------------------------------------------------------------------------------

fn inject(iface: &str, hex: &str) -> Result<()> {
    let frame = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("zz"), 16))
        .collect::<std::result::Result<Vec<u8>, _>>()
        .context("--hex: an even number of hex digits")?;
    let name = std::ffi::CString::new(iface).context("--iface")?;
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        bail!("no interface {iface}");
    }
    // SAFETY: plain socket calls on a socket we own and close; `addr` outlives the send.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        if fd < 0 {
            bail!("socket(AF_PACKET): {}", std::io::Error::last_os_error());
        }
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = index as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6.min(frame.len())]);
        let sent = libc::sendto(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if sent < 0 {
            bail!("sendto: {err}");
        }
    }
    Ok(())
}

// ---- request --------------------------------------------------------------------------------

fn request(args: &RequestArgs) -> Result<()> {
    if args.url.is_none() && args.udp.is_none() {
        bail!("give --url and/or --udp");
    }
    let pause = || {
        if args.interval_ms > 0 {
            std::thread::sleep(Duration::from_millis(args.interval_ms));
        }
    };
    let print = |r: std::result::Result<String, String>| match r {
        Ok(name) => println!("{name}"),
        Err(reason) => println!("FAIL {}", reason.replace('\n', " ")),
    };
    if let Some(url) = &args.url {
        let (addr, host, path) = parse_url(url)?;
        if args.keepalive {
            let mut conn: Option<(TcpStream, BufReader<TcpStream>)> = None;
            for i in 0..args.count {
                if i > 0 {
                    pause();
                }
                let io = Duration::from_secs(args.io_timeout.max(1));
                let r = keepalive_get(&mut conn, addr, &host, &path, io);
                if r.is_err() {
                    conn = None;
                }
                print(r);
            }
        } else {
            for i in 0..args.count {
                if i > 0 {
                    pause();
                }
                match (args.upload, args.download) {
                    (Some(n), _) => print(http_post(addr, &host, &path, n)),
                    (None, Some(n)) => {
                        print(http_get(addr, &host, &format!("/bytes/{n}")).map(|body| {
                            match body.split_once('\n') {
                                Some((name, rest)) => format!("{name} {}", rest.len()),
                                None => format!("{body} 0"),
                            }
                        }))
                    }
                    (None, None) => print(http_get(addr, &host, &path)),
                }
            }
        }
    }
    if let Some(target) = &args.udp {
        let addr: SocketAddr = target
            .parse()
            .with_context(|| format!("bad --udp {target:?}: want HOST:PORT"))?;
        for i in 0..args.count {
            if i > 0 {
                pause();
            }
            print(udp_exchange(addr));
        }
    }
    Ok(())
}

/// `http://HOST[:PORT][/PATH]` → (address, Host header, path).
fn parse_url(url: &str) -> Result<(SocketAddr, String, String)> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("bad URL {url:?}: want http://HOST:PORT/"))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = host
        .parse::<SocketAddr>()
        .or_else(|_| {
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .map(|ip| SocketAddr::new(ip, 80))
        })
        .with_context(|| format!("bad URL {url:?}: the host must be an IP address"))?;
    Ok((addr, host.to_string(), path.to_string()))
}

fn http_get(addr: SocketAddr, host: &str, path: &str) -> std::result::Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").map_err(|e| format!("send: {e}"))?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)
        .map_err(|e| format!("receive: {e}"))?;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("malformed answer ({} bytes)", answer.len()))?;
    let status = head.lines().next().unwrap_or("");
    if !status.contains(" 200 ") {
        return Err(format!("status {status:?}"));
    }
    Ok(body.trim().to_string())
}

/// POST `size` bytes; the answer's body (`r1 1048576`).
fn http_post(
    addr: SocketAddr,
    host: &str,
    path: &str,
    size: usize,
) -> std::result::Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "POST {path} HTTP/1.0\r\nHost: {host}\r\nContent-Length: {size}\r\n\r\n"
    )
    .map_err(|e| format!("send: {e}"))?;
    s.write_all(&vec![b'x'; size])
        .map_err(|e| format!("send the body: {e}"))?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)
        .map_err(|e| format!("receive: {e}"))?;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("malformed answer ({} bytes)", answer.len()))?;
    let status = head.lines().next().unwrap_or("");
    if !status.contains(" 200 ") {
        return Err(format!("status {status:?}"));
    }
    Ok(body.trim().to_string())
}

fn keepalive_get(
    conn: &mut Option<(TcpStream, BufReader<TcpStream>)>,
    addr: SocketAddr,
    host: &str,
    path: &str,
    io_timeout: Duration,
) -> std::result::Result<String, String> {
    if conn.is_none() {
        let s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_read_timeout(Some(io_timeout))
            .map_err(|e| e.to_string())?;
        s.set_write_timeout(Some(io_timeout))
            .map_err(|e| e.to_string())?;
        let r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
        *conn = Some((s, r));
    }
    let (s, r) = conn.as_mut().expect("connected above");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").map_err(|e| format!("send: {e}"))?;
    let mut status = String::new();
    if r.read_line(&mut status)
        .map_err(|e| format!("receive: {e}"))?
        == 0
    {
        return Err("connection closed".into());
    }
    if !status.contains(" 200 ") {
        return Err(format!("status {:?}", status.trim_end()));
    }
    let mut len = None;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).map_err(|e| format!("receive: {e}"))? == 0 {
            return Err("connection closed in the headers".into());
        }
        let h = h.trim_end().to_ascii_lowercase();
        if h.is_empty() {
            break;
        }
        if let Some(v) = h.strip_prefix("content-length:") {
            len = v.trim().parse::<usize>().ok();
        }
    }
    let len = len.ok_or("no Content-Length")?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)
        .map_err(|e| format!("receive: {e}"))?;
    Ok(String::from_utf8_lossy(&body).trim().to_string())
}

fn udp_exchange(addr: SocketAddr) -> std::result::Result<String, String> {
    let local: SocketAddr = if addr.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = UdpSocket::bind(local).map_err(|e| format!("bind: {e}"))?;
    s.connect(addr)
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(CONNECT_TIMEOUT))
        .map_err(|e| e.to_string())?;
    s.send(b"ping").map_err(|e| format!("send: {e}"))?;
    let mut buf = [0u8; 2048];
    let n = s.recv(&mut buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            format!("no answer from {addr} within {CONNECT_TIMEOUT:?}")
        }
        _ => format!("receive: {e}"),
    })?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
}

// ---- demo -----------------------------------------------------------------------------------

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Block SIGINT/SIGTERM in every thread (call before any thread starts; children get a clean
/// mask from std) and take them on a thread of their own: it tears every lab down and exits
/// with 130, whatever the main thread is waiting for.
fn handle_signals() -> Result<()> {
    // SAFETY: plain sigset manipulation on a local set; default dispositions first (an
    // ignored signal inherited from a parent would otherwise never be seen).
    let set = unsafe {
        libc::signal(libc::SIGINT, libc::SIG_DFL);
        libc::signal(libc::SIGTERM, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            bail!("pthread_sigmask: {}", std::io::Error::from_raw_os_error(rc));
        }
        set
    };
    std::thread::spawn(move || {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is a valid, initialised signal set.
        while unsafe { libc::sigwait(&set, &mut sig) } != 0 {}
        INTERRUPTED.store(true, Ordering::SeqCst);
        // Held until exit: the main thread, failing as the lab vanishes, stays silent.
        let _out = std::io::stdout().lock();
        let _err = std::io::stderr().lock();
        let name = if sig == libc::SIGINT {
            "SIGINT"
        } else {
            "SIGTERM"
        };
        println!("\n== interrupted ({name}): tearing the lab down");
        let errors = lab::emergency_cleanup();
        for e in &errors {
            eprintln!("xlb-lab: cleanup: {e}");
        }
        if errors.is_empty() {
            println!("== lab removed");
        }
        std::process::exit(130);
    });
    Ok(())
}

fn demo(args: DemoArgs) -> ExitCode {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "xlb-lab demo: needs root (network namespaces, XDP): run `sudo -E cargo xtask demo`"
        );
        return ExitCode::FAILURE;
    }
    if let Err(e) = handle_signals() {
        eprintln!("xlb-lab demo: {e:#}");
        return ExitCode::FAILURE;
    }
    let result = run_demo(&args);
    if INTERRUPTED.load(Ordering::SeqCst) {
        // The signal thread is tearing down and will exit with 130.
        loop {
            std::thread::park();
        }
    }
    match result {
        Ok(()) => {
            println!("\n== demo finished: OK");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("\n== demo FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn step(title: &str) {
    println!("\n== {title}");
}

fn shown(line: &str) {
    println!("$ {line}");
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect::<String>()
}

fn run_demo(args: &DemoArgs) -> Result<()> {
    let exe = std::env::current_exe().context("finding this executable")?;
    let xlb = match &args.xlb {
        Some(p) => p.clone(),
        None => exe.with_file_name("xlb"),
    };
    if !xlb.is_file() {
        bail!(
            "{} is missing: build it (cargo xtask build) or pass --xlb",
            xlb.display()
        );
    }
    let stale = lab::cleanup_stale(lab::LAB_PREFIX)?;
    if !stale.is_empty() {
        println!("removed what earlier labs left: {}", stale.join(", "));
    }

    let tunnel = args.mode == "tunnel";
    if tunnel {
        step(
            "building the lab: client, router, xlb host (lb) and reals r1..r3 on three subnets \
             around the router",
        );
    } else {
        step("building the lab: client, xlb host (lb), reals r1..r3 on one L2 segment");
    }
    let mut lab = Lab::new(LabConfig {
        reals: 3,
        vips: vec![IpAddr::V4(lab::VIP4)],
        verbose: args.verbose,
        lab_bin: Some(exe),
        routed: tunnel,
        ..LabConfig::default()
    })?;
    let result = demo_steps(&mut lab, &xlb, args);
    let log_shown = matches!(&result, Err(e) if format!("{e:#}").contains("its log"));
    if result.is_err() && !log_shown && lab.daemon().is_some() {
        let tail = lab.daemon_log_tail(15);
        if !tail.is_empty() {
            println!("\nlast lines of the daemon's log:\n{}", indent(&tail));
        }
    }
    step("tearing the lab down");
    let torn = lab.teardown();
    if torn.is_ok() {
        println!(
            "  namespaces, processes, pins and files of lab {} removed",
            lab.id
        );
    }
    result.and(torn)
}

fn demo_steps(lab: &mut Lab, xlb: &Path, args: &DemoArgs) -> Result<()> {
    println!("  lab {} (namespaces {}*)", lab.id, lab.prefix);
    println!("  {:<7} {:<16} {:<18} namespace", "host", "address", "MAC");
    for h in lab.hosts() {
        println!("  {:<7} {:<16} {:<18} {}", h.role, h.ipv4, h.mac, h.ns);
    }
    let vip = lab::VIP4;
    let tunnel = args.mode == "tunnel";
    if tunnel {
        println!(
            "  VIP {vip}: the router routes it to lb ({}); the reals, on their own subnet \
             behind the router, hold it on lo and see only what lb encapsulates",
            lab.lb.ipv4
        );
    } else {
        println!(
            "  VIP {vip}: the client routes it via lb ({}); every real holds it on lo \
             (arp_ignore=1, arp_announce=2)",
            lab.lb.ipv4
        );
    }
    println!(
        "  each real runs a small HTTP server on port {} answering its name",
        lab.tcp_port
    );

    step("starting the daemon in the lb namespace");
    let mut extra: Vec<&str> = args.daemon_args.iter().map(String::as_str).collect();
    if tunnel {
        extra.extend(["--mode", "tunnel"]);
    }
    let dargs = lab.daemon_args(xlb, &extra);
    if !args.verbose {
        // (--verbose shows the lab's own commands, this one included)
        shown(&format!(
            "ip netns exec {} {} 2>>{} &",
            lab.lb.ns,
            dargs.join(" "),
            lab.daemon_log().display()
        ));
    }
    let hello = lab.start_daemon(xlb, &extra)?;
    println!(
        "  daemon ready: xlb {}, protocol {}, XDP {} on {}",
        hello.version, hello.protocol, hello.xdp_mode, hello.iface
    );
    println!("  the CLI talks to it through the socket:");
    shown(&format!("export XLB_SOCKET={}", lab.socket().display()));

    let vip_spec = format!("tcp/{vip}:{}", lab.tcp_port);
    step(&format!("adding VIP {vip_spec}"));
    xlb_step(lab, &["vip", "add", &vip_spec])?;

    let reals = lab.reals.clone();
    if tunnel {
        step("each real strips the tunnel's outer header: xlb decap");
        let bin = xlb.display().to_string();
        for r in &reals {
            shown(&format!(
                "ip netns exec {} xlb decap --iface {}",
                r.ns, r.iface
            ));
            let out = lab.exec(&r.ns, &[&bin, "decap", "--iface", &r.iface])?;
            print!("{}", indent(out.lines().next().unwrap_or_default()));
            println!();
        }
    }
    step("adding the reals");
    for r in &reals {
        xlb_step(lab, &["real", "add", &vip_spec, &r.ipv4.to_string()])?;
    }
    wait_active(lab, &vip_spec, reals.len())?;

    let url = lab.url(IpAddr::V4(vip));
    step(&format!(
        "{} HTTP requests from the client to {url}",
        args.requests
    ));
    let spread = requests(lab, &url, args.requests, args.verbose)?;
    if !spread.failures.is_empty() {
        bail!(
            "{} of {} requests failed",
            spread.failures.len(),
            args.requests
        );
    }
    if let Some(idle) = reals.iter().find(|r| spread.count(&r.role) == 0) {
        bail!("{} ({}) got no request", idle.role, idle.ipv4);
    }

    step("xlb list");
    xlb_step(lab, &["list"])?;
    step("xlb stats");
    xlb_step(lab, &["stats"])?;

    let gone = &reals[1];
    step(&format!("removing real {} ({}) live", gone.role, gone.ipv4));
    xlb_step(lab, &["real", "del", &vip_spec, &gone.ipv4.to_string()])?;

    step(&format!(
        "{} HTTP requests again: {} must get none, and none may fail",
        args.requests, gone.role
    ));
    let spread = requests(lab, &url, args.requests, args.verbose)?;
    if !spread.failures.is_empty() {
        bail!(
            "{} of {} requests failed after removing {}",
            spread.failures.len(),
            args.requests,
            gone.role
        );
    }
    if spread.count(&gone.role) != 0 {
        bail!(
            "{} got {} requests after its removal",
            gone.role,
            spread.count(&gone.role)
        );
    }
    println!("  OK: {} got no request, no request failed", gone.role);

    step("xlb stats");
    xlb_step(lab, &["stats"])?;
    if tunnel {
        let r = &reals[0];
        step(&format!("the decapsulator on {}", r.role));
        shown(&format!(
            "ip netns exec {} xlb decap --iface {} --status",
            r.ns, r.iface
        ));
        let out = lab.exec(
            &r.ns,
            &[
                &xlb.display().to_string(),
                "decap",
                "--iface",
                &r.iface,
                "--status",
            ],
        )?;
        print!("{}", indent(&out));
    }
    Ok(())
}

/// Show, run and print an `xlb` command; fail with its error output.
fn xlb_step(lab: &Lab, args: &[&str]) -> Result<()> {
    shown(&format!("xlb {}", args.join(" ")));
    let out = lab.xlb_checked(args)?;
    print!("{}", indent(&String::from_utf8_lossy(&out.stdout)));
    let err = String::from_utf8_lossy(&out.stderr);
    if !err.trim().is_empty() {
        print!("{}", indent(&err));
    }
    Ok(())
}

/// Wait until every real of `vip` is `active` (its MAC resolved): an unresolved real takes
/// no new flows.
fn wait_active(lab: &Lab, vip: &str, reals: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let resp = lab.api(api::Op::List {})?;
        let list = match resp.result {
            Some(api::Reply::List(l)) if resp.ok => l,
            _ => bail!("unexpected answer to list: {resp:?}"),
        };
        let info = list.vips.iter().find(|v| v.vip == vip);
        let states: Vec<(String, String, Option<String>)> = info
            .map(|v| {
                v.reals
                    .iter()
                    .map(|r| (r.addr.clone(), r.state.clone(), r.mac.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let active = states.iter().filter(|(_, s, _)| s == "active").count();
        if active == reals {
            for (addr, _, mac) in &states {
                println!("  {addr}: active, MAC {}", mac.as_deref().unwrap_or("?"));
            }
            return Ok(());
        }
        if Instant::now() >= deadline {
            let detail: Vec<String> = states.iter().map(|(a, s, _)| format!("{a} {s}")).collect();
            bail!(
                "the reals of {vip} are not all active after 10 s: {}",
                detail.join(", ")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn requests(lab: &Lab, url: &str, count: usize, verbose: bool) -> Result<Spread> {
    if !verbose {
        shown(&format!(
            "ip netns exec {} xlb-lab request --url {url} --count {count}",
            lab.client.ns
        ));
    }
    let started = Instant::now();
    let replies = lab.http(&lab.client.ns, url, count)?;
    let spread = Spread::of(&replies);
    println!(
        "  {} requests in {:.2} s, answered by:",
        replies.len(),
        started.elapsed().as_secs_f64()
    );
    print!("{}", spread.table(&lab.reals));
    Ok(spread)
}
