//! The declarative side of xlb: the config file (TOML, versioned), the changes that turn one
//! state into another, and the import of `ipvsadm -S -n` rules.
//!
//! Everything here is pure: text in, a `DesiredState` or a list of `Change`s out. Reading
//! files and applying the changes is the caller's job; `Balancer::apply` validates the batch
//! again as a whole (ids, limits, rings).
//!
//! The config file:
//! ```toml
//! version = 1
//! [[vip]]
//! addr = "10.0.0.100:80"        # "[2001:db8::1]:443"; port 0 = every port
//! proto = "tcp"                  # tcp | udp
//! flags = ["no-src-port"]        # "no-conntrack"; optional, default []
//! reals = [ { addr = "10.0.0.11", weight = 1 }, { addr = "10.0.0.12", weight = 2 } ]
//! ```
//! `version` is required. Unknown keys are refused, naming the key: later versions add only
//! optional fields, so an old file stays valid and a typo never silently does nothing. `reals`
//! is optional (a VIP without reals), a real's `weight` too (default 1; 0 drains).
//!
//! Every error names where (the line, and for the config file the field path such as
//! `vip[2].reals[0].weight`, indices from 0) and why:
//! `line 7: vip[1].addr: invalid VIP "10.0.0.300:80": bad IPv4 address`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::{self, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    ops::Range,
};

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use toml::Spanned;

use crate::balancer::{Change, Mac, ParseVipError, Proto, Snapshot, VipFlags, VipSpec, MAX_WEIGHT};

/// The version of the config file format this xlb reads and writes.
pub const CONFIG_VERSION: u32 = 1;

/// The weight of a real whose weight is not given.
pub const DEFAULT_WEIGHT: u32 = 1;

// ---- the model ------------------------------------------------------------------------------

/// The declarative model shared by config files, `xlb save`, `xlb apply` and ipvsadm import.
///
/// VIP specs and real addresses are normalised (v4-mapped IPv6 turned into IPv4), as the
/// `Balancer` normalises them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub vips: BTreeMap<VipSpec, DesiredVip>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredVip {
    pub flags: VipFlags,
    /// Real address → weight (0..=`MAX_WEIGHT`, 0 drains).
    pub reals: BTreeMap<IpAddr, u32>,
}

impl DesiredState {
    /// The configuration part of a running state: VIPs, flags, reals and weights (MACs and ids
    /// are the daemon's business and not part of a config).
    pub fn from_snapshot(snapshot: &Snapshot) -> DesiredState {
        let vips = snapshot
            .vips
            .iter()
            .map(|vip| {
                let reals = vip.reals.iter().map(|r| (r.addr, r.weight)).collect();
                let desired = DesiredVip {
                    flags: vip.flags,
                    reals,
                };
                (vip.spec, desired)
            })
            .collect();
        DesiredState { vips }
    }
}

// ---- errors -------------------------------------------------------------------------------

/// Why a config file or an ipvsadm dump is refused. Every variant names the line (1-based).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The text is not TOML.
    #[error("line {line}: {message}")]
    Syntax { line: usize, message: String },
    /// A field of the config file is missing, unknown, of the wrong type or invalid. `field`
    /// is its path: `version`, `vip[1].addr`, `vip[2].reals[0].weight`.
    #[error("line {line}: {field}: {message}")]
    Field {
        line: usize,
        field: String,
        message: String,
    },
    /// An ipvsadm rule that cannot be imported; `token` is the part of the line at fault
    /// (`-m`, `-t 10.0.0.300:80`).
    #[error("line {line}: {token}: {message}")]
    Ipvsadm {
        line: usize,
        token: String,
        message: String,
    },
}

impl ConfigError {
    pub fn line(&self) -> usize {
        match self {
            ConfigError::Syntax { line, .. }
            | ConfigError::Field { line, .. }
            | ConfigError::Ipvsadm { line, .. } => *line,
        }
    }

    /// The config field at fault, for the control API's `field`.
    pub fn field(&self) -> Option<&str> {
        match self {
            ConfigError::Field { field, .. } => Some(field),
            ConfigError::Syntax { .. } | ConfigError::Ipvsadm { .. } => None,
        }
    }
}

// ---- parsing: a spanned TOML tree ---------------------------------------------------------

/// A TOML value with the byte span of every value, so that each error can name its line. The
/// file is first read into this tree (any TOML is accepted), then checked field by field with
/// the path known: serde's derived structs would report an unknown key or a wrong type without
/// saying in which `[[vip]]` it is.
enum Tree {
    Str(String),
    Int(i64),
    Float,
    Bool,
    Datetime,
    Array(Vec<Spanned<Tree>>),
    /// Keys in file order (TOML itself refuses duplicates).
    Table(Vec<(String, Spanned<Tree>)>),
}

/// toml hands a date-time to `deserialize_any` as a one-entry map under this key (the private
/// marker of `toml_datetime`). Should it ever change, a date-time reads as a table: still an
/// error in every field, only named less precisely.
const TOML_DATETIME_KEY: &str = "$__toml_private_datetime";

impl Tree {
    fn kind(&self) -> &'static str {
        match self {
            Tree::Str(_) => "a string",
            Tree::Int(_) => "an integer",
            Tree::Float => "a float",
            Tree::Bool => "a boolean",
            Tree::Datetime => "a date-time",
            Tree::Array(_) => "an array",
            Tree::Table(_) => "a table",
        }
    }
}

impl<'de> Deserialize<'de> for Tree {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TreeVisitor;

        impl<'de> Visitor<'de> for TreeVisitor {
            type Value = Tree;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a TOML value")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Tree, E> {
                Ok(Tree::Str(v.to_string()))
            }

            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Tree, E> {
                Ok(Tree::Str(v))
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Tree, E> {
                Ok(Tree::Int(v))
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Tree, E> {
                Ok(Tree::Int(i64::try_from(v).unwrap_or(i64::MAX)))
            }

            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Tree, E> {
                Ok(Tree::Float)
            }

            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Tree, E> {
                Ok(Tree::Bool)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Tree, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<Spanned<Tree>>()? {
                    items.push(item);
                }
                Ok(Tree::Array(items))
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Tree, A::Error> {
                let mut entries = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    if key == TOML_DATETIME_KEY && entries.is_empty() {
                        map.next_value::<String>()?;
                        return Ok(Tree::Datetime);
                    }
                    let value = map.next_value::<Spanned<Tree>>()?;
                    entries.push((key, value));
                }
                Ok(Tree::Table(entries))
            }
        }

        deserializer.deserialize_any(TreeVisitor)
    }
}

/// 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// A key as it appears in a field path: bare when TOML allows it bare, quoted otherwise.
fn path_key(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if bare {
        key.to_string()
    } else {
        format!("{key:?}")
    }
}

/// Checks the tree of one config file; knows the text to turn spans into lines.
struct Reader<'a> {
    text: &'a str,
}

impl Reader<'_> {
    fn err(&self, span: &Range<usize>, field: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Field {
            line: line_of(self.text, span.start),
            field: field.to_string(),
            message: message.into(),
        }
    }

    fn type_err(&self, value: &Spanned<Tree>, field: &str, expected: &str) -> ConfigError {
        let found = value.get_ref().kind();
        self.err(
            &value.span(),
            field,
            format!("expected {expected}, found {found}"),
        )
    }

    fn string<'t>(&self, value: &'t Spanned<Tree>, field: &str) -> Result<&'t str, ConfigError> {
        match value.get_ref() {
            Tree::Str(s) => Ok(s),
            _ => Err(self.type_err(value, field, "a string")),
        }
    }

    fn array<'t>(
        &self,
        value: &'t Spanned<Tree>,
        field: &str,
        expected: &str,
    ) -> Result<&'t [Spanned<Tree>], ConfigError> {
        match value.get_ref() {
            Tree::Array(items) => Ok(items),
            _ => Err(self.type_err(value, field, expected)),
        }
    }

    /// The entries of a table, each key checked against `known`.
    fn table<'t>(
        &self,
        value: &'t Spanned<Tree>,
        field: &str,
        expected: &str,
        known: &[&str],
    ) -> Result<&'t [(String, Spanned<Tree>)], ConfigError> {
        let Tree::Table(entries) = value.get_ref() else {
            return Err(self.type_err(value, field, expected));
        };
        for (key, value) in entries {
            if !known.contains(&key.as_str()) {
                let path = if field.is_empty() {
                    path_key(key)
                } else {
                    format!("{field}.{}", path_key(key))
                };
                return Err(self.err(
                    &value.span(),
                    &path,
                    format!("unknown key (expected {})", one_of(known)),
                ));
            }
        }
        Ok(entries)
    }

    fn version(&self, root: &[(String, Spanned<Tree>)]) -> Result<(), ConfigError> {
        let Some((_, value)) = root.iter().find(|(key, _)| key == "version") else {
            return Err(ConfigError::Field {
                line: 1,
                field: "version".to_string(),
                message: format!("missing: a config file starts with `version = {CONFIG_VERSION}`"),
            });
        };
        match value.get_ref() {
            Tree::Int(v) if *v == i64::from(CONFIG_VERSION) => Ok(()),
            Tree::Int(v) => Err(self.err(
                &value.span(),
                "version",
                format!("unsupported version {v}: this xlb reads version {CONFIG_VERSION}"),
            )),
            _ => Err(self.type_err(value, "version", "an integer")),
        }
    }

    fn vip(&self, value: &Spanned<Tree>, path: &str) -> Result<(VipSpec, DesiredVip), ConfigError> {
        let entries = self.table(
            value,
            path,
            "a table ([[vip]] or { addr = ..., proto = ... })",
            &["addr", "proto", "flags", "reals"],
        )?;
        let get = |key: &str| entries.iter().find(|(k, _)| k == key).map(|(_, v)| v);
        let missing = |key: &str, hint: &str| {
            self.err(
                &value.span(),
                &format!("{path}.{key}"),
                format!("missing ({hint})"),
            )
        };

        let addr_path = format!("{path}.addr");
        let addr = get("addr").ok_or_else(|| {
            missing(
                "addr",
                "\"ADDR:PORT\" such as \"10.0.0.100:80\" or \"[2001:db8::1]:443\"",
            )
        })?;
        let addr_text = self.string(addr, &addr_path)?;
        let proto_path = format!("{path}.proto");
        let proto = get("proto").ok_or_else(|| missing("proto", "tcp or udp"))?;
        let proto: Proto = self.string(proto, &proto_path)?.parse().map_err(
            |reason: crate::balancer::VipParseReason| {
                self.err(&proto.span(), &proto_path, reason.to_string())
            },
        )?;
        let spec: VipSpec =
            format!("{proto}/{addr_text}")
                .parse()
                .map_err(|e: ParseVipError| {
                    let mut message = ParseVipError {
                        input: addr_text.to_string(),
                        reason: e.reason,
                    }
                    .to_string();
                    if addr_text.contains('/') {
                        message.push_str(" (the protocol goes in `proto`)");
                    }
                    self.err(&addr.span(), &addr_path, message)
                })?;
        if let Some(reason) = unusable(spec.addr) {
            return Err(self.err(
                &addr.span(),
                &addr_path,
                format!("address {} is {reason}", spec.addr),
            ));
        }

        let mut flags = VipFlags::default();
        if let Some(value) = get("flags") {
            let flags_path = format!("{path}.flags");
            let items = self.array(value, &flags_path, "an array of flag names")?;
            for (j, item) in items.iter().enumerate() {
                let item_path = format!("{flags_path}[{j}]");
                let name = self.string(item, &item_path)?;
                let one = VipFlags::from_names([name]).map_err(|_| {
                    self.err(
                        &item.span(),
                        &item_path,
                        format!("unknown flag {name:?} (expected {})", one_of(&all_flags())),
                    )
                })?;
                flags.no_src_port |= one.no_src_port;
                flags.no_conntrack |= one.no_conntrack;
            }
        }

        let mut reals = BTreeMap::new();
        if let Some(value) = get("reals") {
            let reals_path = format!("{path}.reals");
            let items = self.array(
                value,
                &reals_path,
                "an array of tables such as [ { addr = \"10.0.0.11\", weight = 1 } ]",
            )?;
            let mut seen: BTreeMap<IpAddr, usize> = BTreeMap::new();
            for (j, item) in items.iter().enumerate() {
                let real_path = format!("{reals_path}[{j}]");
                let (addr, addr_span, weight) = self.real(item, &real_path, spec)?;
                if let Some(first) = seen.insert(addr, j) {
                    return Err(self.err(
                        &addr_span,
                        &format!("{real_path}.addr"),
                        format!("duplicate real {addr} (also {reals_path}[{first}])"),
                    ));
                }
                reals.insert(addr, weight);
            }
        }
        Ok((spec, DesiredVip { flags, reals }))
    }

    fn real(
        &self,
        value: &Spanned<Tree>,
        path: &str,
        vip: VipSpec,
    ) -> Result<(IpAddr, Range<usize>, u32), ConfigError> {
        let entries = self.table(
            value,
            path,
            "a table such as { addr = \"10.0.0.11\", weight = 1 }",
            &["addr", "weight"],
        )?;
        let get = |key: &str| entries.iter().find(|(k, _)| k == key).map(|(_, v)| v);
        let addr_path = format!("{path}.addr");
        let addr_value = get("addr").ok_or_else(|| {
            self.err(
                &value.span(),
                &addr_path,
                "missing (the real's IP address, such as \"10.0.0.11\")",
            )
        })?;
        let addr = parse_real_addr(self.string(addr_value, &addr_path)?)
            .map_err(|message| self.err(&addr_value.span(), &addr_path, message))?;
        check_real(vip, addr).map_err(|m| self.err(&addr_value.span(), &addr_path, m))?;

        let weight = match get("weight") {
            None => DEFAULT_WEIGHT,
            Some(value) => {
                let weight_path = format!("{path}.weight");
                let Tree::Int(weight) = value.get_ref() else {
                    return Err(self.type_err(value, &weight_path, "an integer"));
                };
                u32::try_from(*weight)
                    .ok()
                    .filter(|w| *w <= MAX_WEIGHT)
                    .ok_or_else(|| {
                        self.err(
                            &value.span(),
                            &weight_path,
                            format!(
                                "weight {weight} is out of range (0 to {MAX_WEIGHT}; 0 drains)"
                            ),
                        )
                    })?
            }
        };
        Ok((addr, addr_value.span(), weight))
    }
}

fn one_of(names: &[&str]) -> String {
    match names {
        [] => String::new(),
        [one] => one.to_string(),
        [rest @ .., last] => format!("{} or {last}", rest.join(", ")),
    }
}

fn all_flags() -> Vec<&'static str> {
    VipFlags {
        no_src_port: true,
        no_conntrack: true,
    }
    .names()
}

/// Why no packet can be balanced to or from an address (the `Balancer` refuses the same ones;
/// checked here too so that the error names the line).
fn unusable(addr: IpAddr) -> Option<&'static str> {
    if addr.is_unspecified() {
        Some("unspecified")
    } else if addr.is_multicast() {
        Some("multicast")
    } else if addr.is_loopback() {
        Some("loopback")
    } else if addr == IpAddr::V4(Ipv4Addr::BROADCAST) {
        Some("broadcast")
    } else {
        None
    }
}

/// A real's address: a bare IPv4 or IPv6 address, normalised.
fn parse_real_addr(text: &str) -> Result<IpAddr, String> {
    match text.parse::<IpAddr>() {
        Ok(addr) => Ok(addr.to_canonical()),
        Err(_) if text.parse::<SocketAddr>().is_ok() => Err(format!(
            "invalid real address {text:?}: a real is an address without a port \
             (direct routing keeps the VIP's port)"
        )),
        Err(_) => Err(format!(
            "invalid real address {text:?}: expected an IPv4 or IPv6 address"
        )),
    }
}

/// The checks of a real against its VIP that do not depend on the other reals.
fn check_real(vip: VipSpec, addr: IpAddr) -> Result<(), String> {
    if let Some(reason) = unusable(addr) {
        return Err(format!("address {addr} is {reason}"));
    }
    if vip.addr.is_ipv4() != addr.is_ipv4() {
        let family = |a: IpAddr| if a.is_ipv4() { "IPv4" } else { "IPv6" };
        return Err(format!(
            "real {addr} is {} but VIP {vip} is {} (direct routing forwards the packet \
             unchanged: both must be of one family)",
            family(addr),
            family(vip.addr)
        ));
    }
    Ok(())
}

// ---- the config file ----------------------------------------------------------------------

/// Parses and validates a config file.
pub fn parse_config(text: &str) -> Result<DesiredState, ConfigError> {
    let root: Tree = toml::from_str(text).map_err(|e| ConfigError::Syntax {
        line: e.span().map_or(1, |span| line_of(text, span.start)),
        message: e.message().trim().replace('\n', "; "),
    })?;
    let Tree::Table(entries) = root else {
        return Err(ConfigError::Syntax {
            line: 1,
            message: "expected a TOML document".to_string(),
        });
    };
    let reader = Reader { text };
    // The version first: a file of a later version is refused for that, not for its new keys.
    reader.version(&entries)?;
    let root = Spanned::new(0..0, Tree::Table(entries));
    let entries = reader.table(&root, "", "a TOML document", &["version", "vip"])?;

    let mut state = DesiredState::default();
    let mut seen: BTreeMap<VipSpec, usize> = BTreeMap::new();
    if let Some((_, vips)) = entries.iter().find(|(key, _)| key == "vip") {
        let items = reader.array(vips, "vip", "an array of tables ([[vip]])")?;
        for (i, item) in items.iter().enumerate() {
            let path = format!("vip[{i}]");
            let (spec, vip) = reader.vip(item, &path)?;
            if let Some(first) = seen.insert(spec, i) {
                let span = match item.get_ref() {
                    Tree::Table(entries) => entries
                        .iter()
                        .find(|(key, _)| key == "addr")
                        .map_or(item.span(), |(_, v)| v.span()),
                    _ => item.span(),
                };
                return Err(reader.err(
                    &span,
                    &format!("{path}.addr"),
                    format!("duplicate VIP {spec} (also vip[{first}])"),
                ));
            }
            state.vips.insert(spec, vip);
        }
    }
    Ok(state)
}

/// The address and port of a VIP as the config file writes them: `10.0.0.100:80`,
/// `[2001:db8::1]:443`.
fn vip_addr(spec: &VipSpec) -> String {
    SocketAddr::new(spec.addr, spec.port).to_string()
}

/// A config file holding `state` (what `xlb save` writes): it parses back to the same state.
/// VIPs in `VipSpec` order, reals by address, so equal states give equal text.
pub fn render_config(state: &DesiredState) -> String {
    let mut out = String::new();
    out.push_str(
        "# xlb configuration (`xlb save`). `xlb apply -f FILE` makes the running state equal to\n\
         # it. Each [[vip]]: addr \"ADDR:PORT\" (port 0 = every port), proto tcp or udp,\n\
         # flags (no-src-port, no-conntrack), reals with a weight from 0 (drain) to 65535.\n",
    );
    // Writing into a String cannot fail.
    let _ = writeln!(out, "version = {CONFIG_VERSION}");
    for (spec, vip) in &state.vips {
        let flags: Vec<String> = vip
            .flags
            .names()
            .iter()
            .map(|name| format!("\"{name}\""))
            .collect();
        let _ = write!(
            out,
            "\n[[vip]]\naddr = \"{}\"\nproto = \"{}\"\nflags = [{}]\n",
            vip_addr(spec),
            spec.proto,
            flags.join(", ")
        );
        if vip.reals.is_empty() {
            out.push_str("reals = []\n");
        } else {
            out.push_str("reals = [\n");
            for (addr, weight) in &vip.reals {
                let _ = writeln!(out, "  {{ addr = \"{addr}\", weight = {weight} }},");
            }
            out.push_str("]\n");
        }
    }
    out
}

// ---- diff ---------------------------------------------------------------------------------

/// The changes that turn `current` into `desired`, in an order `Balancer::apply` accepts as one
/// batch. Grouped by VIP in `VipSpec` order: a removed VIP is one `DelVip`; a new one is its
/// `AddVip` then one `AddReal` per real; a kept one gets `SetFlags`, then `DelReal`s, then
/// `SetWeight`s and `AddReal`s by address. New reals get `mac: None` (the daemon resolves MACs
/// and sets them later). MACs are never part of a diff.
pub fn diff(current: &DesiredState, desired: &DesiredState) -> Vec<Change> {
    let specs: BTreeSet<VipSpec> = current
        .vips
        .keys()
        .chain(desired.vips.keys())
        .copied()
        .collect();
    let mut changes = Vec::new();
    let add_real = |vip: VipSpec, addr: IpAddr, weight: u32| Change::AddReal {
        vip,
        addr,
        weight,
        mac: None,
    };
    for spec in specs {
        match (current.vips.get(&spec), desired.vips.get(&spec)) {
            (Some(_), None) => changes.push(Change::DelVip { spec }),
            (None, Some(want)) => {
                changes.push(Change::AddVip {
                    spec,
                    flags: want.flags,
                });
                for (addr, weight) in &want.reals {
                    changes.push(add_real(spec, *addr, *weight));
                }
            }
            (Some(have), Some(want)) => {
                if have.flags != want.flags {
                    changes.push(Change::SetFlags {
                        vip: spec,
                        flags: want.flags,
                    });
                }
                for addr in have.reals.keys() {
                    if !want.reals.contains_key(addr) {
                        changes.push(Change::DelReal {
                            vip: spec,
                            addr: *addr,
                        });
                    }
                }
                for (addr, weight) in &want.reals {
                    match have.reals.get(addr) {
                        None => changes.push(add_real(spec, *addr, *weight)),
                        Some(old) if old != weight => changes.push(Change::SetWeight {
                            vip: spec,
                            addr: *addr,
                            weight: *weight,
                        }),
                        Some(_) => {}
                    }
                }
            }
            (None, None) => {}
        }
    }
    changes
}

fn flag_list(flags: VipFlags) -> String {
    format!("[{}]", flags.names().join(", "))
}

fn fmt_mac(mac: &Mac) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

/// One human line per change, as `xlb apply` prints them: `+ vip tcp/10.0.0.100:80
/// [no-src-port]`, `- vip ...`, `+ real tcp/10.0.0.100:80 10.0.0.11 weight 1`, `- real ...`.
/// A change carries only the new value, so a modification reads `~ real tcp/10.0.0.100:80
/// 10.0.0.11 weight -> 2` and `~ vip tcp/... flags -> [no-conntrack]`; `describe_from` adds
/// the old value.
pub fn describe(change: &Change) -> String {
    describe_with(change, None, None)
}

/// `describe`, with the old weight or flags of a modification taken from `current` (the state
/// the change applies to): `~ real tcp/10.0.0.100:80 10.0.0.11 weight 1 -> 2`,
/// `~ vip tcp/10.0.0.100:80 flags [] -> [no-conntrack]`.
pub fn describe_from(current: &DesiredState, change: &Change) -> String {
    match change {
        Change::SetFlags { vip, .. } => {
            let old = current.vips.get(&vip.normalized()).map(|v| v.flags);
            describe_with(change, old, None)
        }
        Change::SetWeight { vip, addr, .. } => {
            let old = current
                .vips
                .get(&vip.normalized())
                .and_then(|v| v.reals.get(&addr.to_canonical()))
                .copied();
            describe_with(change, None, old)
        }
        _ => describe(change),
    }
}

fn describe_with(change: &Change, old_flags: Option<VipFlags>, old_weight: Option<u32>) -> String {
    match change {
        Change::AddVip { spec, flags } => {
            if flags.names().is_empty() {
                format!("+ vip {spec}")
            } else {
                format!("+ vip {spec} {}", flag_list(*flags))
            }
        }
        Change::DelVip { spec } => format!("- vip {spec}"),
        Change::SetFlags { vip, flags } => match old_flags {
            Some(old) => format!(
                "~ vip {vip} flags {} -> {}",
                flag_list(old),
                flag_list(*flags)
            ),
            None => format!("~ vip {vip} flags -> {}", flag_list(*flags)),
        },
        Change::AddReal {
            vip,
            addr,
            weight,
            mac,
        } => match mac {
            Some(mac) => format!("+ real {vip} {addr} weight {weight} mac {}", fmt_mac(mac)),
            None => format!("+ real {vip} {addr} weight {weight}"),
        },
        Change::DelReal { vip, addr } => format!("- real {vip} {addr}"),
        Change::SetWeight { vip, addr, weight } => match old_weight {
            Some(old) => format!("~ real {vip} {addr} weight {old} -> {weight}"),
            None => format!("~ real {vip} {addr} weight -> {weight}"),
        },
        Change::SetMac { vip, addr, mac } => {
            let vip = vip.map_or_else(|| "*".to_string(), |v| v.to_string());
            let mac = mac.as_ref().map_or_else(|| "none".to_string(), fmt_mac);
            format!("~ real {vip} {addr} mac {mac}")
        }
    }
}

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
        Opt::Masquerading => {
            Some("masquerading (NAT) is not supported: xlb forwards by direct routing only (-g)")
        }
        Opt::Ipip | Opt::Tunnel => {
            Some("tunnelling (IPIP) is not supported: xlb forwards by direct routing only (-g)")
        }
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
    if let Some(reason) = unusable(spec.addr) {
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
        return Ok((addr.ip().to_canonical(), Some(addr.port())));
    }
    let bare = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(text);
    match bare.parse::<IpAddr>() {
        Ok(addr) => Ok((addr.to_canonical(), None)),
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
                    reals: BTreeMap::new(),
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
        check_real(spec, addr).map_err(|message| rule.error(&real.text, message))?;
        if let Some(port) = port {
            if spec.port != 0 && port != spec.port {
                return Err(rule.error(
                    &real.text,
                    format!(
                        "real port {port} differs from the service port {}: direct routing \
                         forwards the packet unchanged, so the real must listen on the \
                         service port",
                        spec.port
                    ),
                ));
            }
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        balancer::Balancer,
        dataplane::{FakeDataplane, Limits},
    };

    fn vip(s: &str) -> VipSpec {
        s.parse().expect("test VIP parses")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address parses")
    }

    const NO_SRC_PORT: VipFlags = VipFlags {
        no_src_port: true,
        no_conntrack: false,
    };
    const NO_CONNTRACK: VipFlags = VipFlags {
        no_src_port: false,
        no_conntrack: true,
    };

    fn desired(flags: VipFlags, reals: &[(&str, u32)]) -> DesiredVip {
        DesiredVip {
            flags,
            reals: reals.iter().map(|(a, w)| (ip(a), *w)).collect(),
        }
    }

    fn state(vips: Vec<(&str, DesiredVip)>) -> DesiredState {
        DesiredState {
            vips: vips.into_iter().map(|(s, v)| (vip(s), v)).collect(),
        }
    }

    /// IPv4, IPv6, port-0 VIPs, every flag combination, weights 0..=MAX, a VIP without reals.
    fn sample() -> DesiredState {
        state(vec![
            (
                "tcp/10.0.0.100:80",
                desired(NO_SRC_PORT, &[("10.0.0.11", 1), ("10.0.0.12", 2)]),
            ),
            (
                "udp/10.0.0.100:0",
                desired(
                    VipFlags {
                        no_src_port: true,
                        no_conntrack: true,
                    },
                    &[("10.0.0.13", 0), ("10.0.0.14", MAX_WEIGHT)],
                ),
            ),
            (
                "udp/[2001:db8::100]:53",
                desired(NO_CONNTRACK, &[("2001:db8::11", 3), ("2001:db8::12", 1)]),
            ),
            ("tcp/[2001:db8::1]:443", desired(VipFlags::default(), &[])),
        ])
    }

    fn parse_err(text: &str) -> String {
        match parse_config(text) {
            Ok(state) => panic!("accepted {text:?} as {state:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn assert_contains(message: &str, parts: &[&str]) {
        for part in parts {
            assert!(message.contains(part), "{message:?} lacks {part:?}");
        }
    }

    // ---- config file ----

    #[test]
    fn render_then_parse_round_trips() {
        let s = sample();
        let text = render_config(&s);
        assert!(text.starts_with("# xlb configuration"), "{text}");
        assert!(text.contains("addr = \"[2001:db8::100]:53\""), "{text}");
        assert!(text.contains("addr = \"10.0.0.100:0\""), "{text}");
        assert_eq!(parse_config(&text).expect("rendered config parses"), s);
        // Stable: the same state renders to the same text, in VipSpec order.
        assert_eq!(render_config(&parse_config(&text).expect("parses")), text);
        // VipSpec order: address, then port, then protocol.
        let order: Vec<usize> = [
            "10.0.0.100:0",
            "10.0.0.100:80",
            "[2001:db8::1]:443",
            "[2001:db8::100]:53",
        ]
        .iter()
        .map(|a| text.find(&format!("\"{a}\"")).expect("rendered"))
        .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{text}");
        // The empty state too.
        let empty = render_config(&DesiredState::default());
        assert_eq!(
            parse_config(&empty).expect("parses"),
            DesiredState::default()
        );
    }

    #[test]
    fn design_example_parses_to_the_expected_state() {
        let text = r#"version = 1
[[vip]]
addr = "10.0.0.100:80"        # "[2001:db8::1]:443"; port 0 = every port
proto = "tcp"
flags = ["no-src-port"]        # "no-conntrack", ...
reals = [ { addr = "10.0.0.11", weight = 1 }, { addr = "10.0.0.12", weight = 2 } ]
"#;
        let expected = state(vec![(
            "tcp/10.0.0.100:80",
            desired(NO_SRC_PORT, &[("10.0.0.11", 1), ("10.0.0.12", 2)]),
        )]);
        assert_eq!(parse_config(text).expect("parses"), expected);
    }

    #[test]
    fn optional_fields_default_and_other_toml_forms_are_accepted() {
        let text = r#"
version = 1
vip = [ { addr = "[2001:db8::1]:443", proto = "UDP" } ]

[[vip]]
addr = "10.0.0.100:0"
proto = "tcp"

[[vip.reals]]
addr = "10.0.0.11"

[[vip.reals]]
addr = "::ffff:10.0.0.12"
weight = 0
"#;
        // `vip = [...]` and `[[vip]]` cannot be mixed in TOML: parse the two halves apart.
        let (inline, tables) = text.split_at(text.find("\n[[vip]]").expect("split"));
        assert_eq!(
            parse_config(inline).expect("parses"),
            state(vec![("udp/[2001:db8::1]:443", DesiredVip::default())])
        );
        assert_eq!(
            parse_config(&format!("version = 1\n{tables}")).expect("parses"),
            state(vec![(
                "tcp/10.0.0.100:0",
                desired(VipFlags::default(), &[("10.0.0.11", 1), ("10.0.0.12", 0)])
            )])
        );
        assert_eq!(
            parse_config("version = 1\n").expect("parses"),
            DesiredState::default()
        );
    }

    #[test]
    fn every_validation_error_names_line_and_field() {
        let cases: &[(&str, &[&str])] = &[
            (
                // The example of the module documentation, verbatim.
                "version = 1\n[[vip]]\naddr = \"10.0.0.1:80\"\nproto = \"tcp\"\n\n[[vip]]\n\
                 addr = \"10.0.0.300:80\"\nproto = \"tcp\"\n",
                &["line 7: vip[1].addr: invalid VIP \"10.0.0.300:80\": bad IPv4 address"],
            ),
            (
                "version = 1\n[[vip]]\naddr = \"10.0.0.1:80\"\nproto = \"tcp\"\n\
                 reals = [{ addr = \"10.0.0.11\", weight = 70000 }]\n",
                &[
                    "line 5: ",
                    "vip[0].reals[0].weight",
                    "70000",
                    "out of range",
                ],
            ),
            (
                "version = 1\n[[vip]]\naddr = \"10.0.0.1:80\"\nproto = \"tcp\"\n[[vip]]\n\
                 addr = \"10.0.0.2:80\"\nproto = \"tcp\"\nreals = [\n  { addr = \"10.0.0.11\" },\n\
                 \x20 { addr = \"10.0.0.12\", weight = -1 },\n]\n",
                &["line 10: ", "vip[1].reals[1].weight", "-1"],
            ),
            (
                "version = 1\n[[vip]]\naddr = \"10.0.0.1:80\"\nproto = \"tcp\"\n[[vip]]\n\
                 addr = \"10.0.0.1:80\"\nproto = \"udp\"\n[[vip]]\naddr = \"10.0.0.1:80\"\n\
                 proto = \"tcp\"\n",
                &[
                    "line 9: ",
                    "vip[2].addr",
                    "duplicate VIP tcp/10.0.0.1:80",
                    "vip[0]",
                ],
            ),
            (
                "version = 1\n[[vip]]\naddr = \"10.0.0.1:80\"\nproto = \"tcp\"\nreals = [\n\
                 { addr = \"10.0.0.11\" },\n{ addr = \"10.0.0.11\", weight = 2 },\n]\n",
                &[
                    "line 7: ",
                    "vip[0].reals[1].addr",
                    "duplicate real 10.0.0.11",
                ],
            ),
            (
                "version = 1\n[[vip]]\naddr = \"10.0.0.1:80\"\nproto = \"tcp\"\n\
                 reals = [{ addr = \"2001:db8::11\" }]\n",
                &["line 5: ", "vip[0].reals[0].addr", "IPv6", "IPv4"],
            ),
            (
                "version = 1\n[[vip]]\naddr = \"[2001:db8::1]:443\"\nproto = \"tcp\"\n\
                 reals = [{ addr = \"10.0.0.11\" }]\n",
                &["line 5: ", "vip[0].reals[0].addr", "IPv4"],
            ),
            (
                "version = 1\n[[vip]]\naddr = \"10.0.0.1:80\"\nproto = \"tcp\"\n\
                 reals = [{ addr = \"10.0.0.11:80\" }]\n",
                &["line 5: ", "vip[0].reals[0].addr", "without a port"],
            ),
            (
                "version = 1\n[[vip]]\naddr = \"10.0.0.1:80\"\nproto = \"tcp\"\n\
                 reals = [{ addr = \"10.0.0\" }]\n",
                &[
                    "line 5: ",
                    "vip[0].reals[0].addr",
                    "invalid real address \"10.0.0\"",
                ],
            ),
            (
                "version = 1\n[[vip]]\naddr = \"10.0.0.1:80\"\nproto = \"tcp\"\n\
                 reals = [{ addr = \"127.0.0.1\" }]\n",
                &["line 5: ", "vip[0].reals[0].addr", "loopback"],
            ),
            (
                "version = 1\n[[vip]]\naddr = \"0.0.0.0:80\"\nproto = \"tcp\"\n",
                &["line 3: ", "vip[0].addr", "unspecified"],
            ),
            (
                "version = 1\n[[vip]]\naddr = \"2001:db8::1:80\"\nproto = \"tcp\"\n",
                &["line 3: ", "vip[0].addr", "needs brackets"],
            ),
            (
                "version = 1\n[[vip]]\naddr = \"tcp/10.0.0.1:80\"\nproto = \"tcp\"\n",
                &["line 3: ", "vip[0].addr", "goes in `proto`"],
            ),
            (
                "version = 1\n[[vip]]\naddr = \"10.0.0.1:80\"\nproto = \"tcp\"\n\
                 flags = [\"no-src-port\", \"sticky\"]\n",
                &[
                    "line 5: ",
                    "vip[0].flags[1]",
                    "unknown flag \"sticky\"",
                    "no-conntrack",
                ],
            ),
            (
                "version = 1\n[[vip]]\naddr = \"10.0.0.1:80\"\nproto = \"sctp\"\n",
                &["line 4: ", "vip[0].proto", "unknown protocol \"sctp\""],
            ),
            (
                "version = 1\n\n[[vip]]\nproto = \"tcp\"\n",
                &["line 3: ", "vip[0].addr", "missing"],
            ),
            (
                "version = 1\n[[vip]]\naddr = \"10.0.0.1:80\"\n",
                &["line 2: ", "vip[0].proto", "missing", "tcp or udp"],
            ),
            (
                "version = 1\n[[vip]]\naddr = \"10.0.0.1:80\"\nproto = \"tcp\"\n\
                 reals = [{ weight = 1 }]\n",
                &["line 5: ", "vip[0].reals[0].addr", "missing"],
            ),
            (
                "version = 1\n[[vip]]\naddr = \"10.0.0.1:80\"\nproto = \"tcp\"\n\
                 reals = [{ addr = \"10.0.0.11\", weight = \"2\" }]\n",
                &[
                    "line 5: ",
                    "vip[0].reals[0].weight",
                    "expected an integer, found a string",
                ],
            ),
            (
                "version = 1\n[[vip]]\naddr = \"10.0.0.1:80\"\nproto = \"tcp\"\n\
                 reals = [\"10.0.0.11\"]\n",
                &[
                    "line 5: ",
                    "vip[0].reals[0]",
                    "expected a table",
                    "found a string",
                ],
            ),
            (
                "version = 1\n[[vip]]\naddr = 1979-05-27T07:32:00Z\nproto = \"tcp\"\n",
                &["line 3: ", "vip[0].addr", "found a date-time"],
            ),
            (
                "version = 1\n[vip]\naddr = \"10.0.0.1:80\"\nproto = \"tcp\"\n",
                &[
                    "line 2: ",
                    "vip: expected an array of tables",
                    "found a table",
                ],
            ),
        ];
        for (text, parts) in cases {
            let message = parse_err(text);
            assert_contains(&message, parts);
        }
        // The structured form carries the same.
        let e = parse_config(cases[1].0).unwrap_err();
        assert_eq!(e.line(), 5);
        assert_eq!(e.field(), Some("vip[0].reals[0].weight"));
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let cases: &[(&str, &[&str])] = &[
            (
                "version = 1\nvips = []\n",
                &["line 2: vips: unknown key (expected version or vip)"],
            ),
            (
                "version = 1\n[[vip]]\naddr = \"10.0.0.1:80\"\nproto = \"tcp\"\nmode = \"dr\"\n",
                &[
                    "line 5: vip[0].mode: unknown key",
                    "addr, proto, flags or reals",
                ],
            ),
            (
                "version = 1\n[[vip]]\naddr = \"10.0.0.1:80\"\nproto = \"tcp\"\n\
                 reals = [{ addr = \"10.0.0.11\", wieght = 2 }]\n",
                &["line 5: vip[0].reals[0].wieght: unknown key (expected addr or weight)"],
            ),
            (
                "version = 1\n\"odd key\" = 1\n",
                &["line 2: \"odd key\": unknown key"],
            ),
        ];
        for (text, parts) in cases {
            assert_contains(&parse_err(text), parts);
        }
    }

    #[test]
    fn version_is_required_and_must_be_1() {
        assert_contains(
            &parse_err("[[vip]]\naddr = \"10.0.0.1:80\"\nproto = \"tcp\"\n"),
            &["line 1: version: missing", "version = 1"],
        );
        assert_contains(&parse_err(""), &["version: missing"]);
        assert_contains(
            &parse_err("# a later file\n\nversion = 2\n[[vip]]\nhealth = \"tcp\"\n"),
            &["line 3: version: unsupported version 2", "reads version 1"],
        );
        assert_contains(
            &parse_err("version = \"1\"\n"),
            &["line 1: version: expected an integer, found a string"],
        );
        assert_contains(&parse_err("version = 0\n"), &["unsupported version 0"]);
    }

    #[test]
    fn toml_syntax_errors_name_the_line() {
        let e = parse_config("version = 1\n[[vip]]\naddr = \"10.0.0.1:80\nproto = \"tcp\"\n")
            .unwrap_err();
        assert!(matches!(e, ConfigError::Syntax { line: 3, .. }), "{e}");
        assert!(e.to_string().starts_with("line 3: "), "{e}");
        let e = parse_config("version = 1\nversion = 1\n").unwrap_err();
        assert_contains(&e.to_string(), &["line 2: ", "duplicate key"]);
        assert!(!e.to_string().contains('\n'), "{e}");
    }

    // ---- diff and describe ----

    #[test]
    fn diff_from_empty_adds_each_vip_then_its_reals() {
        let want = state(vec![
            (
                "tcp/10.0.0.100:80",
                desired(NO_SRC_PORT, &[("10.0.0.12", 2), ("10.0.0.11", 1)]),
            ),
            (
                "udp/[2001:db8::100]:53",
                desired(NO_CONNTRACK, &[("2001:db8::11", 1)]),
            ),
        ]);
        let web = vip("tcp/10.0.0.100:80");
        let dns = vip("udp/[2001:db8::100]:53");
        assert_eq!(
            diff(&DesiredState::default(), &want),
            vec![
                Change::AddVip {
                    spec: web,
                    flags: NO_SRC_PORT
                },
                Change::AddReal {
                    vip: web,
                    addr: ip("10.0.0.11"),
                    weight: 1,
                    mac: None
                },
                Change::AddReal {
                    vip: web,
                    addr: ip("10.0.0.12"),
                    weight: 2,
                    mac: None
                },
                Change::AddVip {
                    spec: dns,
                    flags: NO_CONNTRACK
                },
                Change::AddReal {
                    vip: dns,
                    addr: ip("2001:db8::11"),
                    weight: 1,
                    mac: None
                },
            ]
        );
    }

    #[test]
    fn diff_to_empty_removes_every_vip() {
        let changes = diff(&sample(), &DesiredState::default());
        let expected: Vec<Change> = sample()
            .vips
            .keys()
            .map(|spec| Change::DelVip { spec: *spec })
            .collect();
        assert_eq!(changes, expected);
        assert_eq!(changes.len(), 4);
    }

    #[test]
    fn diff_weight_change_is_set_weight() {
        let have = state(vec![(
            "tcp/10.0.0.100:80",
            desired(NO_SRC_PORT, &[("10.0.0.11", 1), ("10.0.0.12", 2)]),
        )]);
        let want = state(vec![(
            "tcp/10.0.0.100:80",
            desired(NO_SRC_PORT, &[("10.0.0.11", 0), ("10.0.0.12", 2)]),
        )]);
        assert_eq!(
            diff(&have, &want),
            vec![Change::SetWeight {
                vip: vip("tcp/10.0.0.100:80"),
                addr: ip("10.0.0.11"),
                weight: 0
            }]
        );
    }

    #[test]
    fn diff_flag_change_is_set_flags() {
        let have = state(vec![(
            "tcp/10.0.0.100:80",
            desired(NO_SRC_PORT, &[("10.0.0.11", 1)]),
        )]);
        let want = state(vec![(
            "tcp/10.0.0.100:80",
            desired(NO_CONNTRACK, &[("10.0.0.11", 1)]),
        )]);
        assert_eq!(
            diff(&have, &want),
            vec![Change::SetFlags {
                vip: vip("tcp/10.0.0.100:80"),
                flags: NO_CONNTRACK
            }]
        );
    }

    #[test]
    fn diff_replaces_a_real_within_a_vip() {
        let have = state(vec![(
            "tcp/10.0.0.100:80",
            desired(VipFlags::default(), &[("10.0.0.11", 1), ("10.0.0.12", 1)]),
        )]);
        let want = state(vec![(
            "tcp/10.0.0.100:80",
            desired(VipFlags::default(), &[("10.0.0.10", 3), ("10.0.0.12", 1)]),
        )]);
        let spec = vip("tcp/10.0.0.100:80");
        assert_eq!(
            diff(&have, &want),
            vec![
                Change::DelReal {
                    vip: spec,
                    addr: ip("10.0.0.11")
                },
                Change::AddReal {
                    vip: spec,
                    addr: ip("10.0.0.10"),
                    weight: 3,
                    mac: None
                },
            ]
        );
    }

    #[test]
    fn diff_of_equal_states_is_empty() {
        assert_eq!(diff(&sample(), &sample()), vec![]);
        assert_eq!(
            diff(&DesiredState::default(), &DesiredState::default()),
            vec![]
        );
    }

    #[test]
    fn applied_diffs_reach_the_desired_state_on_a_balancer() {
        let mut b = Balancer::new(
            FakeDataplane::new(Limits::default()),
            Duration::from_secs(900),
        );
        let mut other = sample();
        other.vips.remove(&vip("udp/10.0.0.100:0"));
        if let Some(web) = other.vips.get_mut(&vip("tcp/10.0.0.100:80")) {
            web.flags = NO_CONNTRACK;
            web.reals.remove(&ip("10.0.0.11"));
            web.reals.insert(ip("10.0.0.12"), 5);
            web.reals.insert(ip("10.0.0.15"), 1);
        }
        other.vips.insert(
            vip("udp/10.0.0.200:53"),
            desired(VipFlags::default(), &[("10.0.0.21", 1)]),
        );
        for want in [sample(), other, sample(), DesiredState::default()] {
            let have = DesiredState::from_snapshot(&b.snapshot());
            let changes = diff(&have, &want);
            b.apply(changes.clone())
                .unwrap_or_else(|e| panic!("diff refused: {e}\n{changes:#?}"));
            let snapshot = b.snapshot();
            assert_eq!(DesiredState::from_snapshot(&snapshot), want);
            // Reals from a diff have no MAC yet: configured, but not in the ring.
            assert!(snapshot
                .vips
                .iter()
                .flat_map(|v| &v.reals)
                .all(|r| r.mac.is_none() && !r.in_ring));
            assert_eq!(diff(&DesiredState::from_snapshot(&snapshot), &want), vec![]);
        }
    }

    #[test]
    fn describe_prints_one_line_per_change() {
        let spec = vip("tcp/10.0.0.100:80");
        let v6 = vip("udp/[2001:db8::100]:53");
        let cases = [
            (
                Change::AddVip {
                    spec,
                    flags: NO_SRC_PORT,
                },
                "+ vip tcp/10.0.0.100:80 [no-src-port]",
            ),
            (
                Change::AddVip {
                    spec: v6,
                    flags: VipFlags::default(),
                },
                "+ vip udp/[2001:db8::100]:53",
            ),
            (Change::DelVip { spec }, "- vip tcp/10.0.0.100:80"),
            (
                Change::SetFlags {
                    vip: spec,
                    flags: NO_CONNTRACK,
                },
                "~ vip tcp/10.0.0.100:80 flags -> [no-conntrack]",
            ),
            (
                Change::AddReal {
                    vip: spec,
                    addr: ip("10.0.0.11"),
                    weight: 1,
                    mac: None,
                },
                "+ real tcp/10.0.0.100:80 10.0.0.11 weight 1",
            ),
            (
                Change::DelReal {
                    vip: v6,
                    addr: ip("2001:db8::11"),
                },
                "- real udp/[2001:db8::100]:53 2001:db8::11",
            ),
            (
                Change::SetWeight {
                    vip: spec,
                    addr: ip("10.0.0.11"),
                    weight: 2,
                },
                "~ real tcp/10.0.0.100:80 10.0.0.11 weight -> 2",
            ),
            (
                Change::SetMac {
                    vip: None,
                    addr: ip("10.0.0.11"),
                    mac: Some([0x02, 0, 0, 0, 0, 0x0b]),
                },
                "~ real * 10.0.0.11 mac 02:00:00:00:00:0b",
            ),
        ];
        for (change, line) in cases {
            assert_eq!(describe(&change), line);
        }
        // With the state the changes apply to, modifications show the old value.
        let have = state(vec![(
            "tcp/10.0.0.100:80",
            desired(VipFlags::default(), &[("10.0.0.11", 1)]),
        )]);
        let want = state(vec![(
            "tcp/10.0.0.100:80",
            desired(NO_CONNTRACK, &[("10.0.0.11", 2), ("10.0.0.12", 1)]),
        )]);
        let lines: Vec<String> = diff(&have, &want)
            .iter()
            .map(|c| describe_from(&have, c))
            .collect();
        assert_eq!(
            lines,
            vec![
                "~ vip tcp/10.0.0.100:80 flags [] -> [no-conntrack]",
                "~ real tcp/10.0.0.100:80 10.0.0.11 weight 1 -> 2",
                "+ real tcp/10.0.0.100:80 10.0.0.12 weight 1",
            ]
        );
    }

    // ---- ipvsadm ----

    /// As `ipvsadm -S -n` prints it (ipvsadm 1.31), plus a comment and a blank line.
    const DUMP: &str = "\
# ipvsadm-save -n on lb1
-A -t 10.0.0.100:80 -s wlc
-a -t 10.0.0.100:80 -r 10.0.0.11:80 -g -w 1
-a -t 10.0.0.100:80 -r 10.0.0.12:80 -g -w 3
-a -t 10.0.0.100:80 -r 10.0.0.13:80 -g -w 0

-A -t 10.0.0.100:443 -s sh -p 300
-a -t 10.0.0.100:443 -r 10.0.0.11:443 -g -w 1 -x 100 -y 10
-A -u 10.0.0.53:53 -s rr
-a -u 10.0.0.53:53 -r 10.0.0.21:53 -g -w 1
-a -u 10.0.0.53:53 -r 10.0.0.22:53 -g -w 1
-A -u [2001:db8::100]:53 -s rr -p 300 -M 64
-a -u [2001:db8::100]:53 -r [2001:db8::11]:53 -g -w 2
-A -t 10.0.0.101:0 -s wlc
-a -t 10.0.0.101:0 -r 10.0.0.31:0 -g -w 1
";

    fn import_err(text: &str) -> String {
        match import_ipvsadm(text) {
            Ok(report) => panic!("accepted {text:?} as {report:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn ipvsadm_dump_imports_with_warnings() {
        let report = import_ipvsadm(DUMP).expect("imports");
        let expected = state(vec![
            (
                "tcp/10.0.0.100:80",
                desired(
                    VipFlags::default(),
                    &[("10.0.0.11", 1), ("10.0.0.12", 3), ("10.0.0.13", 0)],
                ),
            ),
            (
                "tcp/10.0.0.100:443",
                desired(NO_SRC_PORT, &[("10.0.0.11", 1)]),
            ),
            (
                "udp/10.0.0.53:53",
                desired(VipFlags::default(), &[("10.0.0.21", 1), ("10.0.0.22", 1)]),
            ),
            (
                "udp/[2001:db8::100]:53",
                desired(NO_SRC_PORT, &[("2001:db8::11", 2)]),
            ),
            (
                "tcp/10.0.0.101:0",
                desired(VipFlags::default(), &[("10.0.0.31", 1)]),
            ),
        ]);
        assert_eq!(report.state, expected);
        let scheduler: Vec<&String> = report
            .warnings
            .iter()
            .filter(|w| w.contains("scheduler ignored"))
            .collect();
        assert_eq!(scheduler.len(), 1, "{:#?}", report.warnings);
        assert_contains(scheduler[0], &["line 2: ", "wlc, sh, rr", "Maglev"]);
        assert_eq!(report.warnings[0], *scheduler[0]);
        let persistence: Vec<&String> = report
            .warnings
            .iter()
            .filter(|w| w.contains("persistence (-p 300) imported as flag no-src-port"))
            .collect();
        assert_eq!(persistence.len(), 2, "{:#?}", report.warnings);
        assert!(persistence[0].starts_with("line 7: tcp/10.0.0.100:443"));
        assert!(report
            .warnings
            .iter()
            .any(|w| w.starts_with("line 8: ") && w.contains("thresholds (-x 100)")));
        assert!(report
            .warnings
            .iter()
            .any(|w| w.starts_with("line 12: ") && w.contains("netmask (-M 64)")));
        assert_eq!(report.warnings.len(), 5, "{:#?}", report.warnings);
        // The imported state is a config like any other.
        assert_eq!(
            parse_config(&render_config(&report.state)).expect("parses"),
            expected
        );
    }

    #[test]
    fn ipvsadm_long_options_are_read() {
        let text = "--add-service --tcp-service 10.0.0.100:80 --scheduler wlc --persistent\n\
                    --add-server --tcp-service 10.0.0.100:80 --real-server 10.0.0.11:80 \
                    --gatewaying --weight 4\n\
                    --add-server --tcp-service=10.0.0.100:80 --real-server=10.0.0.12 --weight=0\n";
        let report = import_ipvsadm(text).expect("imports");
        assert_eq!(
            report.state,
            state(vec![(
                "tcp/10.0.0.100:80",
                desired(NO_SRC_PORT, &[("10.0.0.11", 4), ("10.0.0.12", 0)]),
            )])
        );
    }

    #[test]
    fn ipvsadm_unsupported_lines_are_errors_naming_line_and_token() {
        // Each case: the dump with one line appended (line 16), and what the error says.
        let cases: &[(&str, &[&str])] = &[
            (
                "-a -t 10.0.0.100:80 -r 10.0.0.14:80 -m -w 1",
                &["line 16: -m: masquerading (NAT) is not supported", "(-g)"],
            ),
            (
                "-a -t 10.0.0.100:80 -r 10.0.0.14:80 -i -w 1",
                &["line 16: -i: tunnelling"],
            ),
            ("-A -f 1 -s rr", &["line 16: -f 1: firewall-mark"]),
            (
                "-a -t 10.0.0.100:80 -r 10.0.0.14:8080 -g -w 1",
                &["line 16: -r 10.0.0.14:8080: real port 8080 differs from the service port 80"],
            ),
            (
                "-a -t 10.0.0.102:80 -r 10.0.0.14:80 -g -w 1",
                &["line 16: -t 10.0.0.102:80: service tcp/10.0.0.102:80 was not added"],
            ),
            (
                "-a -t 10.0.0.100:80 -r 10.0.0.14:80 -g -w 1 --frobnicate",
                &["line 16: --frobnicate: unrecognised option"],
            ),
            (
                "-a -t 10.0.0.100:80 -r 10.0.0.14:80 -g -w 1 banana",
                &["line 16: banana: unexpected token"],
            ),
            (
                "-A -t 10.0.0.100:80 -s wlc",
                &["line 16: -t 10.0.0.100:80: service tcp/10.0.0.100:80 was already added on line 2"],
            ),
            (
                "-a -t 10.0.0.100:80 -r 10.0.0.11:80 -g -w 1",
                &["line 16: -r 10.0.0.11:80: real 10.0.0.11 is already a server"],
            ),
            (
                "-a -t 10.0.0.100:80 -r 10.0.0.14:80 -g -w 70000",
                &["line 16: -w 70000: expected a weight from 0 to 65535"],
            ),
            (
                "-a -u [2001:db8::100]:53 -r 10.0.0.14:53 -g -w 1",
                &["line 16: -r 10.0.0.14:53: ", "IPv4", "IPv6"],
            ),
            (
                "-A -t www.example.com:http -s wlc",
                &["line 16: -t www.example.com:http: invalid VIP", "ipvsadm -S -n"],
            ),
            ("-D -t 10.0.0.100:80", &["line 16: -D: not a rule of a saved table"]),
            (
                "-a -t 10.0.0.100:80 -r 10.0.0.14:80 -w",
                &["line 16: -w: missing its value"],
            ),
            ("-A -s rr", &["line 16: -A: no service"]),
            ("-a -t 10.0.0.100:80 -g -w 1", &["line 16: -a: no real server"]),
        ];
        for (line, parts) in cases {
            let text = format!("{DUMP}{line}\n");
            assert_eq!(text.lines().count(), 16);
            assert_contains(&import_err(&text), parts);
        }
        let e = import_ipvsadm("-A -t 10.0.0.100:80 -s wlc\n-a -f 1 -r 10.0.0.11:0 -g -w 1\n")
            .unwrap_err();
        assert!(
            matches!(&e, ConfigError::Ipvsadm { line: 2, token, .. } if token == "-f 1"),
            "{e}"
        );
    }
}
