//! `xlb import-keepalived`: the `virtual_server` blocks of a keepalived.conf as a config, with
//! their checks, quorum and sorry server; what xlb cannot express is refused or warned about,
//! naming the file and line. `vrrp_*` and the other keepalived sections are skipped with a
//! note: keepalived can go on doing VRRP in front of xlb.
//!
//! keepalived's defaults are honoured where a value is absent: `delay_loop` 60 s,
//! `connect_timeout` 5 s, `retry` 1 (DNS_CHECK 3, MISC_CHECK 0), HTTP status 200-299, one
//! success brings a real up, `lb_kind` NAT (refused: direct routing and tunnel only, so far).
//!
//! How keepalived's terms map onto xlb's:
//! - a real goes down after `retry` + 1 failed checks in a row: `fall = retry + 1`, `rise = 1`;
//!   the checks run every `delay_loop` (xlb has no separate, faster retry pace:
//!   `delay_before_retry` is warned about);
//! - `alpha` (a real starts down until it passes): `initial = "down"`;
//! - `inhibit_on_failure` (weight 0 instead of removal, flows continue): `down_flows = "keep"`;
//!   without it keepalived removes the real and its flows stop: `down_flows = "move"`;
//! - `persistence_timeout`: `no-src-port` (a client's connections stay on one real as long as
//!   the reals do), warned; `lb_algo sh`: `no-src-port`; `mh`: Maglev, as xlb; others warned.

mod checker;
mod parse;

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use checker::checker;
use parse::{parse_file, Stmt};
pub use parse::{Loader, Place};

use super::{DesiredState, DesiredVip, DEFAULT_WEIGHT};
use crate::model::{
    addr_problem, check_real, mix_problem, CheckFields, DownFlows, Mode, Proto, RealAddr, VipFlags,
    VipSpec, MAX_WEIGHT,
};

/// A keepalived.conf statement xlb refuses, where it is and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}{token}: {message}", at.as_ref().map(|p| format!("{p}: ")).unwrap_or_default())]
pub struct KeepalivedError {
    pub at: Option<Place>,
    /// The statement (or token) at fault, as written.
    pub token: String,
    pub message: String,
}

impl KeepalivedError {
    fn new(at: &Place, token: &str, message: impl Into<String>) -> KeepalivedError {
        KeepalivedError {
            at: Some(at.clone()),
            token: token.to_string(),
            message: message.into(),
        }
    }
}

/// The config read from a keepalived.conf, and what of it xlb does not reproduce.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeepalivedImport {
    pub state: DesiredState,
    /// `FILE:LINE: ...`: converted, but not exactly.
    pub warnings: Vec<String>,
    /// `FILE:LINE: ...`: sections left to keepalived (VRRP, global_defs).
    pub notes: Vec<String>,
}

/// Reads the files with the file system (`include` globs through the `glob` crate).
pub struct FsLoader;

impl Loader for FsLoader {
    fn read(&self, path: &Path) -> std::io::Result<String> {
        std::fs::read_to_string(path)
    }

    fn glob(&self, pattern: &Path) -> std::io::Result<Vec<PathBuf>> {
        let text = pattern.to_string_lossy();
        let paths = glob::glob(&text)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        let mut out: Vec<PathBuf> = paths.filter_map(Result::ok).collect();
        out.sort();
        Ok(out)
    }
}

/// Converts the keepalived.conf at `path` (and what it includes).
pub fn import_keepalived(
    loader: &dyn Loader,
    path: &Path,
) -> Result<KeepalivedImport, KeepalivedError> {
    let stmts = parse_file(loader, path)?;
    let mut out = KeepalivedImport::default();
    let mut groups: BTreeMap<String, &Stmt> = BTreeMap::new();
    for s in &stmts {
        if s.keyword == "virtual_server_group" {
            let name = s
                .args
                .first()
                .ok_or_else(|| KeepalivedError::new(&s.at, &s.text(), "names no group"))?;
            groups.insert(name.clone(), s);
        }
    }
    let mut seen: BTreeMap<VipSpec, Place> = BTreeMap::new();
    for s in &stmts {
        match s.keyword.as_str() {
            "virtual_server" => {
                for (spec, vip) in virtual_server(s, &groups, &mut out)? {
                    if let Some(first) = seen.insert(spec, s.at.clone()) {
                        return Err(KeepalivedError::new(
                            &s.at,
                            &s.text(),
                            format!("VIP {spec} is also defined at {first}"),
                        ));
                    }
                    out.state.vips.insert(spec, vip);
                }
            }
            "virtual_server_group" => {}
            k if k.starts_with("vrrp_") => out.notes.push(format!(
                "{}: {} skipped: keepalived can keep doing VRRP in front of xlb",
                s.at,
                s.text()
            )),
            "global_defs"
            | "static_ipaddress"
            | "static_routes"
            | "static_rules"
            | "linkbeat_interfaces"
            | "track_file"
            | "track_process"
            | "bfd_instance"
            | "SSL"
            | "garp_group" => out.notes.push(format!(
                "{}: {} skipped: not a virtual server",
                s.at, s.keyword
            )),
            _ => out.warnings.push(format!(
                "{}: {}: unknown top-level keyword, skipped",
                s.at, s.keyword
            )),
        }
    }
    Ok(out)
}

/// Settings a checker takes from its real server, which takes them from its virtual server.
#[derive(Clone, Debug, Default)]
struct Inherited {
    delay_loop: Option<Duration>,
    connect_timeout: Option<Duration>,
    retry: Option<u32>,
    alpha: Option<bool>,
    inhibit: Option<bool>,
    virtualhost: Option<String>,
    weight: Option<u32>,
}

impl Inherited {
    fn over(&self, base: &Inherited) -> Inherited {
        Inherited {
            delay_loop: self.delay_loop.or(base.delay_loop),
            connect_timeout: self.connect_timeout.or(base.connect_timeout),
            retry: self.retry.or(base.retry),
            alpha: self.alpha.or(base.alpha),
            inhibit: self.inhibit.or(base.inhibit),
            virtualhost: self
                .virtualhost
                .clone()
                .or_else(|| base.virtualhost.clone()),
            weight: self.weight.or(base.weight),
        }
    }
}

fn arg(s: &Stmt, i: usize) -> Result<&str, KeepalivedError> {
    s.args
        .get(i)
        .map(String::as_str)
        .ok_or_else(|| KeepalivedError::new(&s.at, &s.text(), "is missing its value"))
}

/// Seconds as keepalived writes them (`6`, `1.5`).
fn seconds(s: &Stmt) -> Result<Duration, KeepalivedError> {
    let v = arg(s, 0)?;
    v.parse::<f64>()
        .ok()
        .filter(|x| x.is_finite() && *x > 0.0 && *x <= 3600.0)
        .map(|x| Duration::from_millis((x * 1000.0).round() as u64))
        .ok_or_else(|| {
            KeepalivedError::new(&s.at, &s.text(), "expected seconds (above 0, at most 3600)")
        })
}

fn number(s: &Stmt, max: u64) -> Result<u64, KeepalivedError> {
    let v = arg(s, 0)?;
    v.parse::<u64>()
        .ok()
        .filter(|n| *n <= max)
        .ok_or_else(|| KeepalivedError::new(&s.at, &s.text(), format!("expected 0 to {max}")))
}

fn addr(s: &Stmt, text: &str) -> Result<IpAddr, KeepalivedError> {
    let t = text.trim_start_matches('[').trim_end_matches(']');
    t.parse::<IpAddr>()
        .map_err(|_| KeepalivedError::new(&s.at, &s.text(), format!("{text:?} is not an address")))
}

fn port(s: &Stmt, text: &str) -> Result<u16, KeepalivedError> {
    text.parse::<u16>()
        .map_err(|_| KeepalivedError::new(&s.at, &s.text(), format!("{text:?} is not a port")))
}

/// The addresses and ports a `virtual_server` names (a group's members, ranges expanded).
fn vs_targets(
    s: &Stmt,
    groups: &BTreeMap<String, &Stmt>,
) -> Result<Vec<(IpAddr, u16)>, KeepalivedError> {
    match s.args.first().map(String::as_str) {
        Some("fwmark") => Err(KeepalivedError::new(
            &s.at,
            &s.text(),
            "fwmark services are not supported: a VIP is an address, protocol and port",
        )),
        Some("group") => {
            let name = arg(s, 1)?;
            let g = groups.get(name).ok_or_else(|| {
                KeepalivedError::new(&s.at, &s.text(), format!("no virtual_server_group {name}"))
            })?;
            let mut out = Vec::new();
            for m in g.children() {
                if m.keyword == "fwmark" {
                    return Err(KeepalivedError::new(
                        &m.at,
                        &m.text(),
                        "fwmark members are not supported: a VIP is an address, protocol and port",
                    ));
                }
                let p = port(m, arg(m, 0)?)?;
                for a in expand_range(m)? {
                    out.push((a, p));
                }
            }
            Ok(out)
        }
        Some(a) => Ok(vec![(addr(s, a)?, port(s, arg(s, 1)?)?)]),
        None => Err(KeepalivedError::new(&s.at, &s.text(), "names no address")),
    }
}

/// `10.0.0.1-10` (the last byte ranges), `2001:db8::1-a` (the last group), or one address.
fn expand_range(m: &Stmt) -> Result<Vec<IpAddr>, KeepalivedError> {
    let text = m.keyword.as_str();
    let Some((first, last)) = text.rsplit_once('-') else {
        return Ok(vec![addr(m, text)?]);
    };
    let start = addr(m, first)?;
    let bad = || KeepalivedError::new(&m.at, &m.text(), "a range ends past its start");
    match start {
        IpAddr::V4(a) => {
            let o = a.octets();
            let end: u8 = last.parse().map_err(|_| bad())?;
            if end < o[3] {
                return Err(bad());
            }
            Ok((o[3]..=end)
                .map(|b| IpAddr::from([o[0], o[1], o[2], b]))
                .collect())
        }
        IpAddr::V6(a) => {
            let mut g = a.segments();
            let end = u16::from_str_radix(last, 16).map_err(|_| bad())?;
            if end < g[7] {
                return Err(bad());
            }
            Ok((g[7]..=end)
                .map(|x| {
                    g[7] = x;
                    IpAddr::from(g)
                })
                .collect())
        }
    }
}

fn warn(out: &mut KeepalivedImport, s: &Stmt, message: impl std::fmt::Display) {
    out.warnings
        .push(format!("{}: {}: {message}", s.at, s.text()));
}

fn virtual_server(
    s: &Stmt,
    groups: &BTreeMap<String, &Stmt>,
    out: &mut KeepalivedImport,
) -> Result<Vec<(VipSpec, DesiredVip)>, KeepalivedError> {
    let targets = vs_targets(s, groups)?;
    let mut proto = Proto::Tcp;
    let mut kind: Option<&Stmt> = None;
    let mut flags = VipFlags::default();
    let mut vip = DesiredVip::default();
    let mut inherited = Inherited::default();
    let mut sorry: Option<(&Stmt, IpAddr, Option<u16>)> = None;
    let mut sorry_kind: Option<&Stmt> = None;
    let mut reals: Vec<&Stmt> = Vec::new();
    for c in s.children() {
        match c.keyword.as_str() {
            "protocol" => {
                proto = match arg(c, 0)?.to_ascii_uppercase().as_str() {
                    "TCP" => Proto::Tcp,
                    "UDP" => Proto::Udp,
                    other => {
                        return Err(KeepalivedError::new(
                            &c.at,
                            &c.text(),
                            format!("protocol {other} is not supported (TCP or UDP)"),
                        ))
                    }
                }
            }
            "lb_kind" | "lvs_method" => kind = Some(c),
            "lb_algo" | "lvs_sched" => match arg(c, 0)? {
                "mh" => {}
                "sh" => flags.no_src_port = true,
                other => warn(
                    out,
                    c,
                    format!(
                        "xlb balances by Maglev consistent hashing with weights; {other} is not \
                         reproduced"
                    ),
                ),
            },
            "persistence_timeout" => {
                flags.no_src_port = true;
                warn(
                    out,
                    c,
                    "becomes the no-src-port flag: a client's connections stay on one real as \
                     long as the reals stay the same (there is no timeout)",
                );
            }
            "persistence_granularity"
            | "persistence_engine"
            | "ha_suspend"
            | "omega"
            | "quorum_up"
            | "quorum_down"
            | "warmup"
            | "hashed"
            | "ops"
            | "flag-1"
            | "flag-2"
            | "flag-3"
            | "sh-port"
            | "sh-fallback"
            | "mh-port"
            | "mh-fallback" => warn(
                out,
                c,
                "not reproduced by xlb (quorum changes are logged; no script is run)",
            ),
            "smtp_alert" | "ip_family" | "snmp_name" | "sorry_server_inhibit" => {}
            "delay_loop" => inherited.delay_loop = Some(seconds(c)?),
            "connect_timeout" => inherited.connect_timeout = Some(seconds(c)?),
            "retry" => inherited.retry = Some(number(c, 1000)? as u32),
            "delay_before_retry" => warn(out, c, retry_pace_note()),
            "alpha" => inherited.alpha = Some(true),
            "inhibit_on_failure" => inherited.inhibit = Some(true),
            "virtualhost" => inherited.virtualhost = Some(arg(c, 0)?.to_string()),
            "weight" => inherited.weight = Some(weight(c)?),
            "quorum" => vip.options.quorum = number(c, u64::from(u32::MAX))? as u32,
            "hysteresis" => {
                if number(c, u64::from(u32::MAX))? != 0 {
                    warn(
                        out,
                        c,
                        "xlb has no quorum hysteresis: the quorum is lost below `quorum` and \
                         regained at it",
                    );
                }
            }
            "sorry_server" => {
                let a = addr(c, arg(c, 0)?)?;
                let p = c.args.get(1).map(|p| port(c, p)).transpose()?;
                sorry = Some((c, a, p));
            }
            "sorry_server_lvs_method" => sorry_kind = Some(c),
            "real_server" => reals.push(c),
            other => warn(out, c, format!("{other}: unknown keyword, skipped")),
        }
    }
    // keepalived's own default is NAT.
    let vip_mode = match kind {
        Some(k) => lvs_method(k)?,
        None => Mode::Nat,
    };
    if let Some(k) = sorry_kind {
        if lvs_method(k)? != vip_mode {
            return Err(KeepalivedError::new(
                &k.at,
                &k.text(),
                "xlb's sorry server is forwarded to in its VIP's mode (lb_kind)",
            ));
        }
    }
    vip.flags = flags;
    vip.mode = Some(vip_mode);

    let mut result = Vec::new();
    for (a, p) in targets {
        let spec = VipSpec::new(proto, a, p);
        if let Some(reason) = addr_problem(a) {
            return Err(KeepalivedError::new(
                &s.at,
                &s.text(),
                format!("address {a} is {reason}"),
            ));
        }
        let mut v = vip.clone();
        let mut inhibit = Vec::new();
        for r in &reals {
            let (addr_, w, check, inh, mode) = real_server(r, &spec, vip_mode, &inherited, out)?;
            if let Some(problem) = mix_problem(vip_mode, mode) {
                return Err(KeepalivedError::new(&r.at, &r.text(), problem));
            }
            if mode != vip_mode {
                v.real_modes.insert(addr_, mode);
            }
            if v.reals.insert(addr_, w).is_some() {
                return Err(KeepalivedError::new(
                    &r.at,
                    &r.text(),
                    format!("real {addr_} is listed twice"),
                ));
            }
            if let Some(c) = check {
                v.real_checks.insert(addr_, c);
            }
            inhibit.push(inh);
        }
        // One check for all: the VIP's, when every real has the same.
        let checks: Vec<&CheckFields> = v.real_checks.values().collect();
        if checks.len() == v.reals.len() && checks.windows(2).all(|w| w[0] == w[1]) {
            if let Some(first) = checks.first() {
                v.check = Some((*first).clone());
                v.real_checks.clear();
            }
        }
        v.options.down_flows = if inhibit.iter().any(|i| *i) {
            if !inhibit.iter().all(|i| *i) {
                warn(
                    out,
                    s,
                    "inhibit_on_failure on some reals only: down_flows = \"keep\" for all \
                     (xlb sets it per VIP)",
                );
            }
            DownFlows::Keep
        } else {
            DownFlows::Move
        };
        if let Some((c, sa, sp)) = sorry {
            check_real(&spec, sa.into(), Some(vip_mode))
                .map_err(|m| KeepalivedError::new(&c.at, &c.text(), m))?;
            if v.reals.keys().any(|r| r.ip == sa) {
                return Err(KeepalivedError::new(
                    &c.at,
                    &c.text(),
                    "the sorry server is one of the reals: xlb's sorry server is another host",
                ));
            }
            if sp.is_some_and(|sp| sp != p && sp != 0) {
                warn(
                    out,
                    c,
                    "its port is ignored: xlb's sorry server takes the VIP's port",
                );
            }
            v.options.sorry_server = Some(sa);
        }
        result.push((spec, v));
    }
    Ok(result)
}

/// `lb_kind` / `lvs_method`: DR, TUN or NAT.
fn lvs_method(k: &Stmt) -> Result<Mode, KeepalivedError> {
    match arg(k, 0)?.to_ascii_uppercase().as_str() {
        "DR" => Ok(Mode::Dr),
        "TUN" => Ok(Mode::Tunnel),
        "NAT" => Ok(Mode::Nat),
        other => Err(KeepalivedError::new(
            &k.at,
            &k.text(),
            format!("{other} is not a forwarding method (DR, TUN or NAT)"),
        )),
    }
}

fn weight(s: &Stmt) -> Result<u32, KeepalivedError> {
    Ok(number(s, u64::from(MAX_WEIGHT))? as u32)
}

fn retry_pace_note() -> &'static str {
    "xlb has no separate retry pace: a real goes down after retry + 1 failed checks, one every \
     delay_loop"
}

/// A `real_server`: its address, weight, check fields, whether it inhibits on failure, and
/// its mode (its own `lvs_method`, else the VIP's).
fn real_server(
    r: &Stmt,
    vip: &VipSpec,
    vip_mode: Mode,
    vs: &Inherited,
    out: &mut KeepalivedImport,
) -> Result<(RealAddr, u32, Option<CheckFields>, bool, Mode), KeepalivedError> {
    let ip = addr(r, arg(r, 0)?)?;
    let mut mode = vip_mode;
    for c in r.children() {
        if c.keyword == "lvs_method" {
            mode = lvs_method(c)?;
        }
    }
    let rport = r.args.get(1).map(|p| port(r, p)).transpose()?;
    let a = RealAddr::imported(ip, rport, mode == Mode::Nat, vip.port);
    check_real(vip, a, Some(mode)).map_err(|m| KeepalivedError::new(&r.at, &r.text(), m))?;
    if mode != Mode::Nat && rport.is_some_and(|rp| rp != vip.port && rp != 0 && vip.port != 0) {
        return Err(KeepalivedError::new(
            &r.at,
            &r.text(),
            format!(
                "port {} differs from the VIP's {}: direct routing keeps the VIP's port",
                rport.unwrap_or_default(),
                vip.port
            ),
        ));
    }
    let mut own = Inherited::default();
    let mut checkers: Vec<&Stmt> = Vec::new();
    for c in r.children() {
        match c.keyword.as_str() {
            "weight" => own.weight = Some(weight(c)?),
            "inhibit_on_failure" => own.inhibit = Some(true),
            "alpha" => own.alpha = Some(true),
            "retry" => own.retry = Some(number(c, 1000)? as u32),
            "connect_timeout" => own.connect_timeout = Some(seconds(c)?),
            "delay_loop" => own.delay_loop = Some(seconds(c)?),
            "virtualhost" => own.virtualhost = Some(arg(c, 0)?.to_string()),
            "delay_before_retry" => warn(out, c, retry_pace_note()),
            "lvs_method" => {}
            "notify_up" | "notify_down" | "uthreshold" | "lthreshold" | "warmup" => {
                warn(out, c, "not reproduced by xlb (transitions are logged)")
            }
            "smtp_alert" | "snmp_name" => {}
            "TCP_CHECK" | "HTTP_GET" | "SSL_GET" | "UDP_CHECK" | "DNS_CHECK" | "PING_CHECK"
            | "MISC_CHECK" => checkers.push(c),
            "SMTP_CHECK" | "BFD_CHECK" | "FILE_CHECK" => {
                return Err(KeepalivedError::new(
                    &c.at,
                    &c.keyword,
                    "this checker is not supported (tcp, http, https, udp, dns, ping and exec \
                     checks are)",
                ))
            }
            other => warn(out, c, format!("{other}: unknown keyword, skipped")),
        }
    }
    let inh = own.over(vs);
    if checkers.len() > 1 {
        return Err(KeepalivedError::new(
            &checkers[1].at,
            &checkers[1].keyword,
            format!(
                "a second checker for real {a} (the first is at {}): xlb runs one check per real",
                checkers[0].at
            ),
        ));
    }
    let check = match checkers.first() {
        Some(c) => Some(checker(c, vip, a, &inh, out)?),
        None => None,
    };
    Ok((
        a,
        inh.weight.unwrap_or(DEFAULT_WEIGHT),
        check,
        inh.inhibit.unwrap_or(false),
        mode,
    ))
}

#[cfg(test)]
mod tests;
