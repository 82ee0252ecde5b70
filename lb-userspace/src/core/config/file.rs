//! The config file: TOML read into a spanned tree, then checked field by field so that every
//! error names its line and field path; and its rendering (what `xlb save` writes).

use std::{
    collections::BTreeMap,
    fmt::{self, Write as _},
    net::SocketAddr,
    ops::Range,
};

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use toml::Spanned;

use super::{ConfigError, DesiredState, DesiredVip, CONFIG_VERSION, DEFAULT_WEIGHT};
use crate::model::{
    addr_problem, check_real, parse_real_addr, parse_sorry_server, CheckFields, Mode,
    ParseVipError, Proto, RealAddr, VipFlags, VipOptions, VipSpec, CHECK_KEYS, MAX_WEIGHT,
};

// ---- parsing: a spanned TOML tree ---------------------------------------------------------

/// A TOML value with the byte span of every value, so that each error can name its line. The
/// file is first read into this tree (any TOML is accepted), then checked field by field with
/// the path known: serde's derived structs would report an unknown key or a wrong type without
/// saying in which `[[vip]]` it is.
enum Tree {
    Str(String),
    Int(i64),
    Float,
    Bool(bool),
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
            Tree::Bool(_) => "a boolean",
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

            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Tree, E> {
                Ok(Tree::Bool(v))
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
pub(super) fn line_of(text: &str, offset: usize) -> usize {
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
            VIP_KEYS,
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
            |reason: crate::model::VipParseReason| {
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
        if let Some(reason) = addr_problem(spec.addr) {
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

        let mode = self.mode(get("mode"), &format!("{path}.mode"))?;
        let options = self.options(&get, path, spec, mode)?;
        let check = match get("check") {
            Some(value) => {
                let check_path = format!("{path}.check");
                let (fields, spans) = self.check(value, &check_path)?;
                fields.resolve(&spec).map_err(|e| {
                    let span = spans.get(&e.key).cloned().unwrap_or(value.span());
                    self.err(&span, &format!("{check_path}.{}", e.key), e.message)
                })?;
                Some(fields)
            }
            None => None,
        };

        let mut reals = BTreeMap::new();
        let mut real_checks = BTreeMap::new();
        let mut real_modes = BTreeMap::new();
        if let Some(value) = get("reals") {
            let reals_path = format!("{path}.reals");
            let items = self.array(
                value,
                &reals_path,
                "an array of tables such as [ { addr = \"10.0.0.11\", weight = 1 } ]",
            )?;
            let mut seen: BTreeMap<RealAddr, usize> = BTreeMap::new();
            for (j, item) in items.iter().enumerate() {
                let real_path = format!("{reals_path}[{j}]");
                let (addr, addr_span, weight, real_mode) =
                    self.real(item, &real_path, spec, mode)?;
                if let Some(m) = real_mode {
                    real_modes.insert(addr, m);
                }
                if let Some(fields) = self.real_check(item, &real_path, spec, check.as_ref())? {
                    real_checks.insert(addr, fields);
                }
                if options.sorry_server == Some(addr.ip) && addr.port == 0 {
                    return Err(self.err(
                        &addr_span,
                        &format!("{real_path}.addr"),
                        format!("{addr} is also the VIP's sorry_server"),
                    ));
                }
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
        Ok((
            spec,
            DesiredVip {
                flags,
                reals,
                options,
                check,
                real_checks,
                mode,
                real_modes,
            },
        ))
    }

    /// A `mode` key: `dr` or `tunnel`.
    fn mode(
        &self,
        value: Option<&Spanned<Tree>>,
        field: &str,
    ) -> Result<Option<Mode>, ConfigError> {
        let Some(value) = value else {
            return Ok(None);
        };
        let mode = self
            .string(value, field)?
            .parse()
            .map_err(|m: String| self.err(&value.span(), field, m))?;
        Ok(Some(mode))
    }

    fn real(
        &self,
        value: &Spanned<Tree>,
        path: &str,
        vip: VipSpec,
        vip_mode: Option<Mode>,
    ) -> Result<(RealAddr, Range<usize>, u32, Option<Mode>), ConfigError> {
        let entries = self.table(
            value,
            path,
            "a table such as { addr = \"10.0.0.11\", weight = 1 }",
            &["addr", "port", "weight", "mode", "check"],
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
        let mut addr = parse_real_addr(self.string(addr_value, &addr_path)?)
            .map_err(|message| self.err(&addr_value.span(), &addr_path, message))?;
        if let Some(value) = get("port") {
            let port_path = format!("{path}.port");
            let Tree::Int(port) = value.get_ref() else {
                return Err(self.type_err(value, &port_path, "an integer"));
            };
            if addr.port != 0 {
                return Err(self.err(
                    &value.span(),
                    &port_path,
                    format!("the addr {addr} already names a port: give it once"),
                ));
            }
            addr.port = u16::try_from(*port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| {
                    self.err(
                        &value.span(),
                        &port_path,
                        format!(
                            "port {port} is out of range (1 to 65535; leave it out to keep the \
                             VIP's)"
                        ),
                    )
                })?;
        }
        let mode = self.mode(get("mode"), &format!("{path}.mode"))?;
        check_real(&vip, addr, mode.or(vip_mode))
            .map_err(|m| self.err(&addr_value.span(), &addr_path, m))?;

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
        Ok((addr, addr_value.span(), weight, mode))
    }
}

const VIP_KEYS: &[&str] = &[
    "addr",
    "proto",
    "flags",
    "mode",
    "quorum",
    "sorry_server",
    "on_quorum_lost",
    "down_flows",
    "reals",
    "check",
];

type Get<'t> = dyn Fn(&str) -> Option<&'t Spanned<Tree>> + 't;

impl Reader<'_> {
    /// A VIP's quorum, sorry server and what quorum loss and failing checks do.
    fn options(
        &self,
        get: &Get<'_>,
        path: &str,
        spec: VipSpec,
        mode: Option<Mode>,
    ) -> Result<VipOptions, ConfigError> {
        let mut options = VipOptions::default();
        if let Some(value) = get("quorum") {
            let field = format!("{path}.quorum");
            options.quorum = match value.get_ref() {
                Tree::Int(n) => u32::try_from(*n).map_err(|_| {
                    self.err(
                        &value.span(),
                        &field,
                        format!("{n} is out of range (0 to {})", u32::MAX),
                    )
                })?,
                _ => return Err(self.type_err(value, &field, "an integer")),
            };
        }
        if let Some(value) = get("sorry_server") {
            let field = format!("{path}.sorry_server");
            let addr = parse_sorry_server(self.string(value, &field)?)
                .map_err(|m| self.err(&value.span(), &field, m))?;
            check_real(&spec, addr.into(), mode).map_err(|m| self.err(&value.span(), &field, m))?;
            options.sorry_server = Some(addr);
        }
        if let Some(value) = get("on_quorum_lost") {
            let field = format!("{path}.on_quorum_lost");
            options.on_quorum_lost = self
                .string(value, &field)?
                .parse()
                .map_err(|m: String| self.err(&value.span(), &field, m))?;
        }
        if let Some(value) = get("down_flows") {
            let field = format!("{path}.down_flows");
            options.down_flows = self
                .string(value, &field)?
                .parse()
                .map_err(|m: String| self.err(&value.span(), &field, m))?;
        }
        Ok(options)
    }

    /// A check table, each key set through `CheckFields::set`; with the span of each key's
    /// value, for errors found once the whole check is known.
    fn check(
        &self,
        value: &Spanned<Tree>,
        path: &str,
    ) -> Result<(CheckFields, BTreeMap<String, Range<usize>>), ConfigError> {
        let entries = self.table(
            value,
            path,
            "a table such as { type = \"tcp\" }",
            CHECK_KEYS,
        )?;
        let mut fields = CheckFields::default();
        let mut spans = BTreeMap::new();
        for (key, v) in entries {
            let field = format!("{path}.{}", path_key(key));
            let json = self.json(v, &field)?;
            fields
                .set(key, &json)
                .map_err(|e| self.err(&v.span(), &field, e.message))?;
            spans.insert(key.clone(), v.span());
        }
        Ok((fields, spans))
    }

    /// A real's own check fields, checked merged over its VIP's check.
    fn real_check(
        &self,
        value: &Spanned<Tree>,
        path: &str,
        spec: VipSpec,
        vip_check: Option<&CheckFields>,
    ) -> Result<Option<CheckFields>, ConfigError> {
        let Tree::Table(entries) = value.get_ref() else {
            return Ok(None);
        };
        let Some((_, check)) = entries.iter().find(|(k, _)| k == "check") else {
            return Ok(None);
        };
        let check_path = format!("{path}.check");
        let (fields, spans) = self.check(check, &check_path)?;
        if let Some(merged) = CheckFields::merged(vip_check, Some(&fields)) {
            merged.resolve(&spec).map_err(|e| {
                let span = spans.get(&e.key).cloned().unwrap_or(check.span());
                let why = if fields.kind.is_none() && vip_check.is_none() {
                    format!(
                        "{} (the VIP has no check for this one to change)",
                        e.message
                    )
                } else {
                    e.message
                };
                self.err(&span, &format!("{check_path}.{}", e.key), why)
            })?;
        }
        Ok(Some(fields))
    }

    /// A scalar or an array of scalars, as JSON (what `CheckFields::set` reads).
    fn json(&self, value: &Spanned<Tree>, field: &str) -> Result<serde_json::Value, ConfigError> {
        Ok(match value.get_ref() {
            Tree::Str(s) => serde_json::Value::String(s.clone()),
            Tree::Int(n) => serde_json::Value::from(*n),
            Tree::Bool(b) => serde_json::Value::Bool(*b),
            Tree::Float => serde_json::Value::from(0.5),
            Tree::Array(items) => serde_json::Value::Array(
                items
                    .iter()
                    .map(|i| self.json(i, field))
                    .collect::<Result<_, _>>()?,
            ),
            Tree::Datetime | Tree::Table(_) => {
                return Err(self.type_err(value, field, "a string, an integer or a boolean"))
            }
        })
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
         # flags (no-src-port, no-conntrack), mode (dr, tunnel, nat; else the daemon's), reals\n\
         # with a weight from 0 (drain) to 65535, an optional mode and (NAT) port, quorum,\n\
         # sorry_server, on_quorum_lost, down_flows and a [vip.check] (README).\n",
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
        if let Some(mode) = vip.mode {
            let _ = writeln!(out, "mode = \"{mode}\"");
        }
        let defaults = VipOptions::default();
        let o = &vip.options;
        if o.quorum != defaults.quorum {
            let _ = writeln!(out, "quorum = {}", o.quorum);
        }
        if let Some(addr) = o.sorry_server {
            let _ = writeln!(out, "sorry_server = \"{addr}\"");
        }
        if o.on_quorum_lost != defaults.on_quorum_lost {
            let _ = writeln!(out, "on_quorum_lost = \"{}\"", o.on_quorum_lost);
        }
        if o.down_flows != defaults.down_flows {
            let _ = writeln!(out, "down_flows = \"{}\"", o.down_flows);
        }
        if vip.reals.is_empty() {
            out.push_str("reals = []\n");
        } else {
            out.push_str("reals = [\n");
            for (addr, weight) in &vip.reals {
                let mut pairs = vec![format!("addr = \"{}\"", addr.ip)];
                if addr.port != 0 {
                    pairs.push(format!("port = {}", addr.port));
                }
                pairs.push(format!("weight = {weight}"));
                if let Some(mode) = vip.real_modes.get(addr) {
                    pairs.push(format!("mode = \"{mode}\""));
                }
                if let Some(check) = vip.real_checks.get(addr) {
                    pairs.push(format!("check = {{ {} }}", toml_pairs(check).join(", ")));
                }
                let _ = writeln!(out, "  {{ {} }},", pairs.join(", "));
            }
            out.push_str("]\n");
        }
        if let Some(check) = &vip.check {
            out.push_str("[vip.check]\n");
            for pair in toml_pairs(check) {
                let _ = writeln!(out, "{pair}");
            }
        }
    }
    out
}

/// `key = value` for each field of a check that is set, in TOML.
fn toml_pairs(check: &CheckFields) -> Vec<String> {
    check
        .entries()
        .into_iter()
        .map(|(key, value)| format!("{key} = {}", toml_value(&value)))
        .collect()
}

fn toml_value(value: &serde_json::Value) -> String {
    match value {
        // TOML basic strings escape like JSON strings do (quotes, backslashes, control
        // characters as \uXXXX).
        serde_json::Value::String(s) => serde_json::Value::String(s.clone()).to_string(),
        serde_json::Value::Array(items) => {
            let items: Vec<String> = items.iter().map(toml_value).collect();
            format!("[{}]", items.join(", "))
        }
        other => other.to_string(),
    }
}
