//! `xlb import-ipvsadm`: the rules of `ipvsadm -S -n` as a config, and what of them xlb does
//! not reproduce.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use super::{ConfigError, DesiredState, DesiredVip, DEFAULT_WEIGHT};
use crate::model::{
    addr_problem, check_real, mix_problem, Mode, ParseVipError, Proto, RealAddr, VipFlags, VipSpec,
    MAX_WEIGHT,
};

// ---- ipvsadm import -------------------------------------------------------------------------

/// The state read from an ipvsadm dump, and what of it xlb does not reproduce.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportReport {
    pub state: DesiredState,
    /// One line each, starting with the line number it is about: `line 3: ...`.
    pub warnings: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Opt {
    AddService,
    AddServer,
    /// Another ipvsadm command (-E, -D, -C, ...): not a rule of a saved table.
    OtherCommand,
    Tcp,
    Udp,
    Fwmark,
    Sctp,
    Scheduler,
    SchedFlags,
    Persistent,
    Netmask,
    PersistenceEngine,
    OnePacket,
    Ipv6,
    RealServer,
    Gatewaying,
    Masquerading,
    Ipip,
    Tunnel,
    Weight,
    UThreshold,
    LThreshold,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Arg {
    No,
    Required,
    /// Taken when the next token is a number (`-p [timeout]`).
    OptionalNumber,
}

/// ipvsadm's options: short, long, meaning, argument.
const OPTIONS: &[(&str, &str, Opt, Arg)] = &[
    ("-A", "--add-service", Opt::AddService, Arg::No),
    ("-a", "--add-server", Opt::AddServer, Arg::No),
    ("-E", "--edit-service", Opt::OtherCommand, Arg::No),
    ("-D", "--delete-service", Opt::OtherCommand, Arg::No),
    ("-C", "--clear", Opt::OtherCommand, Arg::No),
    ("-e", "--edit-server", Opt::OtherCommand, Arg::No),
    ("-d", "--delete-server", Opt::OtherCommand, Arg::No),
    ("-Z", "--zero", Opt::OtherCommand, Arg::No),
    ("-R", "--restore", Opt::OtherCommand, Arg::No),
    ("-S", "--save", Opt::OtherCommand, Arg::No),
    ("-L", "--list", Opt::OtherCommand, Arg::No),
    ("-l", "--list", Opt::OtherCommand, Arg::No),
    ("", "--set", Opt::OtherCommand, Arg::No),
    ("-t", "--tcp-service", Opt::Tcp, Arg::Required),
    ("-u", "--udp-service", Opt::Udp, Arg::Required),
    ("-f", "--fwmark-service", Opt::Fwmark, Arg::Required),
    ("", "--sctp-service", Opt::Sctp, Arg::Required),
    ("-s", "--scheduler", Opt::Scheduler, Arg::Required),
    ("-b", "--sched-flags", Opt::SchedFlags, Arg::Required),
    ("-p", "--persistent", Opt::Persistent, Arg::OptionalNumber),
    ("-M", "--netmask", Opt::Netmask, Arg::Required),
    ("", "--pe", Opt::PersistenceEngine, Arg::Required),
    ("-o", "--ops", Opt::OnePacket, Arg::No),
    // Older ipvsadm versions save one-packet scheduling as a bare `ops`.
    ("ops", "--ops", Opt::OnePacket, Arg::No),
    ("-6", "--ipv6", Opt::Ipv6, Arg::No),
    ("-r", "--real-server", Opt::RealServer, Arg::Required),
    ("-g", "--gatewaying", Opt::Gatewaying, Arg::No),
    ("-m", "--masquerading", Opt::Masquerading, Arg::No),
    ("-i", "--ipip", Opt::Ipip, Arg::No),
    ("", "--tun-type", Opt::Tunnel, Arg::Required),
    ("", "--tun-port", Opt::Tunnel, Arg::Required),
    ("", "--tun-nocsum", Opt::Tunnel, Arg::No),
    ("", "--tun-csum", Opt::Tunnel, Arg::No),
    ("", "--tun-remcsum", Opt::Tunnel, Arg::No),
    ("-w", "--weight", Opt::Weight, Arg::Required),
    ("-x", "--u-threshold", Opt::UThreshold, Arg::Required),
    ("-y", "--l-threshold", Opt::LThreshold, Arg::Required),
];

/// One option of a rule as written (`-t 10.0.0.100:80`), to name it in errors.
struct Given {
    opt: Opt,
    text: String,
    value: Option<String>,
}

/// A service or server rule, options recognised but not yet checked.
struct Rule {
    line: usize,
    options: Vec<Given>,
}

impl Rule {
    fn error(&self, token: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Ipvsadm {
            line: self.line,
            token: token.to_string(),
            message: message.into(),
        }
    }

    fn find(&self, wanted: &[Opt]) -> Option<&Given> {
        self.options.iter().find(|g| wanted.contains(&g.opt))
    }

    fn parse(line: usize, text: &str) -> Result<Rule, ConfigError> {
        let error = |token: &str, message: String| ConfigError::Ipvsadm {
            line,
            token: token.to_string(),
            message,
        };
        let mut tokens = text.split_whitespace().peekable();
        let mut options = Vec::new();
        while let Some(token) = tokens.next() {
            // `--weight=2` as well as `--weight 2`.
            let (name, inline) = match token.split_once('=') {
                Some((name, value)) if name.starts_with("--") => (name, Some(value)),
                _ => (token, None),
            };
            let Some(&(_, _, opt, arg)) = OPTIONS
                .iter()
                .find(|(short, long, _, _)| name == *short || name == *long)
            else {
                let message = if token.starts_with('-') {
                    "unrecognised option".to_string()
                } else {
                    "unexpected token (not an ipvsadm option)".to_string()
                };
                return Err(error(token, message));
            };
            let value = match (arg, inline) {
                (Arg::No, Some(_)) => {
                    return Err(error(token, format!("{name} takes no value")));
                }
                (Arg::No, None) => None,
                (_, Some(value)) => Some(value.to_string()),
                (Arg::Required, None) => match tokens.next() {
                    Some(value) => Some(value.to_string()),
                    None => return Err(error(token, "missing its value".to_string())),
                },
                (Arg::OptionalNumber, None) => match tokens.peek() {
                    Some(next) if next.bytes().all(|b| b.is_ascii_digit()) => {
                        tokens.next().map(str::to_string)
                    }
                    _ => None,
                },
            };
            let text = match &value {
                Some(value) => format!("{name} {value}"),
                None => name.to_string(),
            };
            if options.iter().any(|g: &Given| g.opt == opt) {
                return Err(error(&text, "given twice on one line".to_string()));
            }
            options.push(Given { opt, text, value });
        }
        Ok(Rule { line, options })
    }
}

/// What the options of one line mean for xlb, in the order they are checked.
fn unsupported(opt: Opt) -> Option<&'static str> {
    match opt {
        Opt::OtherCommand => Some(
            "not a rule of a saved table: only -A (add service) and -a (add server) lines are \
             imported, as `ipvsadm -S -n` writes them",
        ),
        Opt::Fwmark => Some(
            "firewall-mark services are not supported: xlb balances by protocol, address and port",
        ),
        Opt::Sctp => Some("SCTP services are not supported: xlb balances TCP and UDP"),
        Opt::Tunnel => Some(
            "per-server tunnel types are not imported: xlb's encapsulation (IPIP or GUE) is \
             the daemon's --encap",
        ),
        _ => None,
    }
}

/// A VIP as ipvsadm writes it after -t/-u.
fn parse_service(proto: Proto, given: &Given, rule: &Rule) -> Result<VipSpec, ConfigError> {
    let text = given.value.as_deref().unwrap_or_default();
    let spec: VipSpec = format!("{proto}/{text}")
        .parse()
        .map_err(|e: ParseVipError| {
            let mut message = ParseVipError {
                input: text.to_string(),
                reason: e.reason,
            }
            .to_string();
            if looks_like_name(text) {
                message.push_str(" (names are not resolved: save with `ipvsadm -S -n`)");
            }
            rule.error(&given.text, message)
        })?;
    if let Some(reason) = addr_problem(spec.addr) {
        return Err(rule.error(&given.text, format!("address {} is {reason}", spec.addr)));
    }
    Ok(spec)
}

fn looks_like_name(text: &str) -> bool {
    text.chars()
        .any(|c| c.is_ascii_alphabetic() && !c.is_ascii_hexdigit())
}

/// A real server as ipvsadm writes it after -r: `10.0.0.11:80`, `[2001:db8::11]:53`, or
/// without port.
fn parse_server(text: &str) -> Result<(IpAddr, Option<u16>), String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok((addr.ip(), Some(addr.port())));
    }
    let bare = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(text);
    match bare.parse::<IpAddr>() {
        Ok(addr) => Ok((addr, None)),
        Err(_) => {
            let mut message = format!("invalid real server {text:?}: expected ADDR:PORT");
            if looks_like_name(text) {
                message.push_str(" (names are not resolved: save with `ipvsadm -S -n`)");
            }
            Err(message)
        }
    }
}

/// Reads `ipvsadm -S -n` (`ipvsadm-save -n`) output. Blank lines and `#` comments are skipped.
///
/// `-t` is tcp and `-u` udp. The scheduler is ignored (xlb always uses Maglev consistent
/// hashing; one warning for the whole dump); persistence (`-p`) becomes the `no-src-port`
/// flag, with a warning; thresholds (`-x`, `-y`) and other scheduling details are ignored
/// with a warning. Only direct routing (`-g`, ipvsadm's default) is supported and it needs
/// the real's port to equal the VIP's (or the VIP's port to be 0). Firewall marks, NAT,
/// tunnels, SCTP, servers of undeclared services and unrecognised tokens are errors naming
/// the line and the token.
pub fn import_ipvsadm(text: &str) -> Result<ImportReport, ConfigError> {
    let mut state = DesiredState::default();
    let mut warnings = Vec::new();
    // The one scheduler warning: where it goes among the warnings, its line, the names seen.
    let mut schedulers: Option<(usize, usize, Vec<String>)> = None;
    let mut declared: BTreeMap<VipSpec, usize> = BTreeMap::new();

    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let content = raw.trim();
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        let rule = Rule::parse(line, content)?;
        for given in &rule.options {
            if let Some(why) = unsupported(given.opt) {
                return Err(rule.error(&given.text, why));
            }
        }
        let command = rule
            .find(&[Opt::AddService, Opt::AddServer])
            .ok_or_else(|| {
                rule.error(
                    content.split_whitespace().next().unwrap_or_default(),
                    "no command: a rule starts with -A (add service) or -a (add server)",
                )
            })?;
        if let Some(other) = rule
            .options
            .iter()
            .find(|g| matches!(g.opt, Opt::AddService | Opt::AddServer) && g.opt != command.opt)
        {
            return Err(rule.error(&other.text, "a second command on one line"));
        }
        let service = rule.find(&[Opt::Tcp, Opt::Udp]).ok_or_else(|| {
            rule.error(
                &command.text,
                "no service: expected -t ADDR:PORT (tcp) or -u ADDR:PORT (udp)",
            )
        })?;
        if let Some(other) = rule
            .options
            .iter()
            .find(|g| matches!(g.opt, Opt::Tcp | Opt::Udp) && g.opt != service.opt)
        {
            return Err(rule.error(&other.text, "a second service on one line"));
        }
        let proto = if service.opt == Opt::Tcp {
            Proto::Tcp
        } else {
            Proto::Udp
        };
        let spec = parse_service(proto, service, &rule)?;

        if command.opt == Opt::AddService {
            let invalid = [
                Opt::RealServer,
                Opt::Gatewaying,
                Opt::Masquerading,
                Opt::Ipip,
                Opt::Weight,
                Opt::UThreshold,
                Opt::LThreshold,
            ];
            if let Some(given) = rule.find(&invalid) {
                return Err(rule.error(&given.text, "only valid on an -a (add server) line"));
            }
            if let Some(first) = declared.get(&spec) {
                return Err(rule.error(
                    &service.text,
                    format!("service {spec} was already added on line {first}"),
                ));
            }
            declared.insert(spec, line);
            let mut flags = VipFlags::default();
            for given in &rule.options {
                let value = given.value.as_deref().unwrap_or_default();
                match given.opt {
                    Opt::Scheduler => match &mut schedulers {
                        Some((_, _, names)) => {
                            if !names.iter().any(|n| n == value) {
                                names.push(value.to_string());
                            }
                        }
                        None => {
                            schedulers = Some((warnings.len(), line, vec![value.to_string()]));
                            // Replaced by the full text once every line is read.
                            warnings.push(String::new());
                        }
                    },
                    Opt::Persistent => {
                        flags.no_src_port = true;
                        warnings.push(format!(
                            "line {line}: {spec}: persistence ({}) imported as flag {}: every \
                             connection of a client address goes to one real for as long as \
                             the VIP's reals stay the same (there is no timeout)",
                            given.text,
                            VipFlags::NO_SRC_PORT
                        ));
                    }
                    Opt::Netmask => warnings.push(format!(
                        "line {line}: {spec}: persistence netmask ({}) ignored: {} hashes the \
                         whole client address",
                        given.text,
                        VipFlags::NO_SRC_PORT
                    )),
                    Opt::SchedFlags => warnings.push(format!(
                        "line {line}: {spec}: scheduler flags ({}) ignored: xlb always uses \
                         Maglev consistent hashing",
                        given.text
                    )),
                    Opt::PersistenceEngine => warnings.push(format!(
                        "line {line}: {spec}: persistence engine ({}) ignored",
                        given.text
                    )),
                    Opt::OnePacket => warnings.push(format!(
                        "line {line}: {spec}: one-packet scheduling ({}) ignored: xlb sends \
                         every packet of a flow to the same real",
                        given.text
                    )),
                    _ => {}
                }
            }
            state.vips.insert(
                spec,
                DesiredVip {
                    flags,
                    ..DesiredVip::default()
                },
            );
            continue;
        }

        // An -a (add server) line.
        let invalid = [
            Opt::Scheduler,
            Opt::SchedFlags,
            Opt::Persistent,
            Opt::Netmask,
            Opt::PersistenceEngine,
            Opt::OnePacket,
        ];
        if let Some(given) = rule.find(&invalid) {
            return Err(rule.error(&given.text, "only valid on an -A (add service) line"));
        }
        let real = rule
            .find(&[Opt::RealServer])
            .ok_or_else(|| rule.error(&command.text, "no real server: expected -r ADDR:PORT"))?;
        let Some(vip) = state.vips.get_mut(&spec) else {
            return Err(rule.error(
                &service.text,
                format!("service {spec} was not added by an earlier -A line"),
            ));
        };
        let (addr, port) = parse_server(real.value.as_deref().unwrap_or_default())
            .map_err(|message| rule.error(&real.text, message))?;
        // -g (the default) is direct routing, -i tunnelling, -m masquerading (NAT).
        let mode = if rule.find(&[Opt::Ipip]).is_some() {
            Mode::Tunnel
        } else if rule.find(&[Opt::Masquerading]).is_some() {
            Mode::Nat
        } else {
            Mode::Dr
        };
        let addr = RealAddr::imported(addr, port, mode == Mode::Nat, spec.port);
        check_real(&spec, addr, Some(mode)).map_err(|message| rule.error(&real.text, message))?;
        if let (Some(port), false) = (port, mode == Mode::Nat) {
            if spec.port != 0 && port != spec.port {
                return Err(rule.error(
                    &real.text,
                    format!(
                        "real port {port} differs from the service port {}: direct routing \
                         and tunnelling forward the packet unchanged, so the real must listen \
                         on the service port",
                        spec.port
                    ),
                ));
            }
        }
        if let Some(problem) = vip.real_modes.values().find_map(|m| mix_problem(*m, mode)) {
            return Err(rule.error(&real.text, problem));
        }
        if vip.reals.contains_key(&addr) {
            return Err(rule.error(
                &real.text,
                format!("real {addr} is already a server of {spec}"),
            ));
        }
        let weight = match rule.find(&[Opt::Weight]) {
            None => DEFAULT_WEIGHT,
            Some(given) => given
                .value
                .as_deref()
                .unwrap_or_default()
                .parse::<u32>()
                .ok()
                .filter(|w| *w <= MAX_WEIGHT)
                .ok_or_else(|| {
                    rule.error(
                        &given.text,
                        format!("expected a weight from 0 to {MAX_WEIGHT}"),
                    )
                })?,
        };
        if let Some(given) = rule.find(&[Opt::UThreshold, Opt::LThreshold]) {
            warnings.push(format!(
                "line {line}: {spec} real {addr}: connection thresholds ({}) ignored: xlb \
                 does not count connections per real",
                given.text
            ));
        }
        vip.reals.insert(addr, weight);
        vip.real_modes.insert(addr, mode);
    }
    // Modes written out, so that a daemon of another --mode imports the rules as they are:
    // the VIP takes the mode most of its reals have (direct routing on a tie), the reals that
    // differ their own.
    for vip in state.vips.values_mut() {
        let count = |mode: Mode| vip.real_modes.values().filter(|m| **m == mode).count();
        let (tunnels, nats) = (count(Mode::Tunnel), count(Mode::Nat));
        let most = if 2 * nats > vip.real_modes.len() {
            Mode::Nat
        } else if 2 * tunnels > vip.real_modes.len() {
            Mode::Tunnel
        } else {
            Mode::Dr
        };
        vip.mode = Some(most);
        vip.real_modes.retain(|_, m| *m != most);
    }

    if let Some((at, line, names)) = schedulers {
        warnings[at] = format!(
            "line {line}: scheduler ignored ({}): xlb always balances with Maglev consistent \
             hashing, in proportion to the reals' weights",
            names.join(", ")
        );
    }
    Ok(ImportReport { state, warnings })
}
