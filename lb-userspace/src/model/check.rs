//! Health checks as operators write them (`[vip.check]`, a real's `check = { ... }`, `xlb check
//! set`): every field optional, merged real over VIP, then resolved into a `CheckSpec` with
//! the defaults filled in and every field checked against the check's type.
//!
//! One setter (`CheckFields::set`, from a JSON value) serves the config file (its TOML values
//! are handed over as JSON) and the control API, so both refuse the same things with the same
//! words; `resolve` does the checks that need the whole check.

use std::{fmt, net::IpAddr, str::FromStr, time::Duration};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{format_duration, parse_duration, VipSpec};

// ---- the field types ------------------------------------------------------------------------

macro_rules! text_enum {
    ($(#[$doc:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub const fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            fn names() -> String {
                let names: Vec<&str> = Self::ALL.iter().map(|v| v.as_str()).collect();
                names.join(" | ")
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, String> {
                Self::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| format!("unknown value {s:?} (expected {})", Self::names()))
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

text_enum!(
    /// What a check does.
    CheckType {
        Tcp = "tcp",
        Http = "http",
        Https = "https",
        Udp = "udp",
        Dns = "dns",
        Ping = "ping",
        Exec = "exec",
        None = "none",
    }
);

text_enum!(
    /// Where a probe is sent: the real's own address, or the VIP through the real's
    /// forwarding path (a real that lost the VIP then fails).
    Target {
        Real = "real",
        Vip = "vip",
    }
);

text_enum!(
    /// The status of a newly added real before its first result.
    Initial {
        Up = "up",
        Down = "down",
    }
);

/// HTTP statuses that count as up: `200-399`, `200,204,300-399`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StatusSet(Vec<(u16, u16)>);

impl StatusSet {
    pub fn contains(&self, status: u16) -> bool {
        self.0.iter().any(|(lo, hi)| (*lo..=*hi).contains(&status))
    }
}

impl FromStr for StatusSet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |part: &str| {
            format!(
                "invalid status {part:?} in {s:?} (expected statuses 100 to 599 and ranges, as \
                 in \"200,204,300-399\")"
            )
        };
        let status = |t: &str| -> Result<u16, String> {
            let t = t.trim();
            t.parse::<u16>()
                .ok()
                .filter(|v| (100..=599).contains(v) && t.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| bad(t))
        };
        let mut ranges = Vec::new();
        for part in s.split(',') {
            let (lo, hi) = match part.split_once('-') {
                Some((lo, hi)) => (status(lo)?, status(hi)?),
                None => {
                    let v = status(part)?;
                    (v, v)
                }
            };
            if lo > hi {
                return Err(bad(part));
            }
            ranges.push((lo, hi));
        }
        Ok(StatusSet(ranges))
    }
}

impl fmt::Display for StatusSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|(lo, hi)| {
                if lo == hi {
                    lo.to_string()
                } else {
                    format!("{lo}-{hi}")
                }
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

/// A UDP payload as written: text, or `hex:` and pairs of hex digits.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Payload(String);

impl Payload {
    pub fn bytes(&self) -> Vec<u8> {
        match self.0.strip_prefix("hex:") {
            Some(hex) => (0..hex.len() / 2)
                .filter_map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
                .collect(),
            None => self.0.as_bytes().to_vec(),
        }
    }
}

impl FromStr for Payload {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(hex) = s.strip_prefix("hex:") {
            if hex.is_empty() || hex.len() % 2 != 0 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "invalid hex payload {s:?} (expected hex: and pairs of hex digits, as in \
                     \"hex:0a0b\")"
                ));
            }
        }
        if s.len() > 1400 {
            return Err("payload longer than 1400 bytes".to_string());
        }
        Ok(Payload(s.to_string()))
    }
}

impl fmt::Display for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// DNS query types a check may ask for.
const QTYPES: &[(&str, u16)] = &[
    ("A", 1),
    ("NS", 2),
    ("CNAME", 5),
    ("SOA", 6),
    ("PTR", 12),
    ("MX", 15),
    ("TXT", 16),
    ("AAAA", 28),
    ("SRV", 33),
    ("ANY", 255),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Qtype(u16);

impl Qtype {
    pub fn code(self) -> u16 {
        self.0
    }
}

impl FromStr for Qtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        QTYPES
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(s))
            .map(|(_, code)| Qtype(*code))
            .ok_or_else(|| {
                let names: Vec<&str> = QTYPES.iter().map(|(n, _)| *n).collect();
                format!("unknown query type {s:?} (expected {})", names.join(", "))
            })
    }
}

impl fmt::Display for Qtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = QTYPES.iter().find(|(_, c)| *c == self.0).map(|(n, _)| *n);
        f.write_str(name.unwrap_or("A"))
    }
}

// Serialised as their text forms (state file, API).
macro_rules! text_serde {
    ($($t:ty),+) => {$(
        impl Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
            }
        }
    )+};
}
text_serde!(StatusSet, Payload, Qtype);

mod duration_serde {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&super::format_duration(*d)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|t| super::parse_duration(&t).map_err(serde::de::Error::custom))
            .transpose()
    }
}

// ---- a check as written ---------------------------------------------------------------------

pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_RISE: u32 = 2;
pub const DEFAULT_FALL: u32 = 3;
pub const DEFAULT_PATH: &str = "/";
const MIN_INTERVAL: Duration = Duration::from_millis(100);
const MAX_TIME: Duration = Duration::from_secs(3600);
const MAX_STREAK: u32 = 1000;

/// A check as written: each field optional. A VIP's check needs `type`; a real's is merged
/// over its VIP's (`merged`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckFields {
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<CheckType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Target>,
    #[serde(
        default,
        with = "duration_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub interval: Option<Duration>,
    #[serde(
        default,
        with = "duration_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rise: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fall: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial: Option<Initial>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_status: Option<StatusSet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send: Option<Payload>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect: Option<Payload>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qtype: Option<Qtype>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dynamic: Option<bool>,
}

/// Every key a check may have, in the order `xlb save` writes them.
pub const CHECK_KEYS: &[&str] = &[
    "type",
    "port",
    "target",
    "interval",
    "timeout",
    "rise",
    "fall",
    "initial",
    "path",
    "host",
    "expect_status",
    "send",
    "expect",
    "name",
    "qtype",
    "command",
    "dynamic",
];

/// Keys that belong to every check type (a real that changes the type keeps these from its
/// VIP's check, and only these).
const COMMON_KEYS: &[&str] = &[
    "port", "target", "interval", "timeout", "rise", "fall", "initial",
];

/// A check field refused, and why; `key` is the check's key (`interval`, `path`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct CheckFieldError {
    pub key: String,
    pub message: String,
}

fn field_err(key: &str, message: impl Into<String>) -> CheckFieldError {
    CheckFieldError {
        key: key.to_string(),
        message: message.into(),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a float",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "a table",
    }
}

fn as_str<'v>(key: &str, v: &'v Value) -> Result<&'v str, CheckFieldError> {
    v.as_str()
        .ok_or_else(|| field_err(key, format!("expected a string, found {}", kind_of(v))))
}

fn as_int(key: &str, v: &Value, lo: u64, hi: u64) -> Result<u64, CheckFieldError> {
    let n = v
        .as_i64()
        .ok_or_else(|| field_err(key, format!("expected an integer, found {}", kind_of(v))))?;
    u64::try_from(n)
        .ok()
        .filter(|n| (lo..=hi).contains(n))
        .ok_or_else(|| field_err(key, format!("{n} is out of range ({lo} to {hi})")))
}

fn as_duration(key: &str, v: &Value, min: Duration) -> Result<Duration, CheckFieldError> {
    let d = parse_duration(as_str(key, v)?).map_err(|m| field_err(key, m))?;
    if d < min || d > MAX_TIME {
        return Err(field_err(
            key,
            format!(
                "{} is out of range ({} to 1h)",
                format_duration(d),
                format_duration(min)
            ),
        ));
    }
    Ok(d)
}

fn parsed<T: FromStr<Err = String>>(key: &str, v: &Value) -> Result<T, CheckFieldError> {
    as_str(key, v)?.parse().map_err(|m| field_err(key, m))
}

impl CheckFields {
    /// Sets one field from its written value (a TOML value handed over as JSON, or the API's
    /// JSON), checking the value on its own. Unknown keys are refused.
    pub fn set(&mut self, key: &str, v: &Value) -> Result<(), CheckFieldError> {
        match key {
            "type" => self.kind = Some(parsed(key, v)?),
            "port" => self.port = Some(as_int(key, v, 1, 65535)? as u16),
            "target" => self.target = Some(parsed(key, v)?),
            "interval" => self.interval = Some(as_duration(key, v, MIN_INTERVAL)?),
            "timeout" => self.timeout = Some(as_duration(key, v, Duration::from_millis(1))?),
            "rise" => self.rise = Some(as_int(key, v, 1, MAX_STREAK.into())? as u32),
            "fall" => self.fall = Some(as_int(key, v, 1, MAX_STREAK.into())? as u32),
            "initial" => self.initial = Some(parsed(key, v)?),
            "path" => {
                let path = as_str(key, v)?;
                if !path.starts_with('/') || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
                    return Err(field_err(
                        key,
                        format!("invalid path {path:?} (it starts with / and has no spaces or control characters)"),
                    ));
                }
                self.path = Some(path.to_string());
            }
            "host" => {
                let host = as_str(key, v)?;
                if host.is_empty() || host.bytes().any(|b| b <= b' ' || b == 0x7f) {
                    return Err(field_err(key, format!("invalid host {host:?}")));
                }
                self.host = Some(host.to_string());
            }
            "expect_status" => self.expect_status = Some(parsed(key, v)?),
            "send" => self.send = Some(parsed(key, v)?),
            "expect" => self.expect = Some(parsed(key, v)?),
            "name" => {
                let name = as_str(key, v)?;
                // `.` is the root (keepalived's DNS_CHECK default).
                let ok = name == "."
                    || !name.is_empty()
                        && name.len() <= 253
                        && name
                            .trim_end_matches('.')
                            .split('.')
                            .all(|l| !l.is_empty() && l.len() <= 63 && l.is_ascii());
                if !ok {
                    return Err(field_err(key, format!("invalid DNS name {name:?}")));
                }
                self.name = Some(name.to_string());
            }
            "qtype" => self.qtype = Some(parsed(key, v)?),
            "command" => {
                let items = v.as_array().ok_or_else(|| {
                    field_err(
                        key,
                        format!(
                            "expected an array of strings (program and arguments), found {}",
                            kind_of(v)
                        ),
                    )
                })?;
                let mut argv = Vec::new();
                for item in items {
                    argv.push(as_str(key, item)?.to_string());
                }
                match argv.first() {
                    Some(program) if program.starts_with('/') => {}
                    Some(program) => {
                        return Err(field_err(
                            key,
                            format!("{program:?}: the program is given by its absolute path"),
                        ))
                    }
                    None => return Err(field_err(key, "empty: name the program to run")),
                }
                self.command = Some(argv);
            }
            "dynamic" => {
                self.dynamic = Some(v.as_bool().ok_or_else(|| {
                    field_err(key, format!("expected a boolean, found {}", kind_of(v)))
                })?)
            }
            other => {
                return Err(field_err(
                    other,
                    format!("unknown key (expected one of {})", CHECK_KEYS.join(", ")),
                ))
            }
        }
        Ok(())
    }

    /// A check from a JSON object (the API), each key through `set`.
    pub fn from_json(v: &Value) -> Result<CheckFields, CheckFieldError> {
        let obj = v.as_object().ok_or_else(|| {
            field_err("check", format!("expected an object, found {}", kind_of(v)))
        })?;
        let mut out = CheckFields::default();
        for (key, value) in obj {
            out.set(key, value)?;
        }
        Ok(out)
    }

    /// The keys that are set, in `CHECK_KEYS` order, with their written values.
    pub fn entries(&self) -> Vec<(&'static str, Value)> {
        let s = |v: &dyn fmt::Display| Value::String(v.to_string());
        let mut out = Vec::new();
        let mut push = |key: &'static str, v: Option<Value>| {
            if let Some(v) = v {
                out.push((key, v));
            }
        };
        push("type", self.kind.map(|k| s(&k)));
        push("port", self.port.map(Value::from));
        push("target", self.target.map(|t| s(&t)));
        push("interval", self.interval.map(|d| s(&format_duration(d))));
        push("timeout", self.timeout.map(|d| s(&format_duration(d))));
        push("rise", self.rise.map(Value::from));
        push("fall", self.fall.map(Value::from));
        push("initial", self.initial.map(|i| s(&i)));
        push("path", self.path.as_ref().map(|p| s(p)));
        push("host", self.host.as_ref().map(|h| s(h)));
        push("expect_status", self.expect_status.as_ref().map(|e| s(e)));
        push("send", self.send.as_ref().map(|p| s(p)));
        push("expect", self.expect.as_ref().map(|p| s(p)));
        push("name", self.name.as_ref().map(|n| s(n)));
        push("qtype", self.qtype.map(|q| s(&q)));
        push(
            "command",
            self.command
                .as_ref()
                .map(|c| Value::Array(c.iter().map(|a| Value::String(a.clone())).collect())),
        );
        push("dynamic", self.dynamic.map(Value::Bool));
        out
    }

    fn has(&self, key: &str) -> bool {
        self.entries().iter().any(|(k, _)| *k == key)
    }

    /// The check a real runs: its own fields over its VIP's. A real that names its own `type`
    /// keeps only the fields common to every type (port, target, timing) from the VIP's.
    pub fn merged(vip: Option<&CheckFields>, real: Option<&CheckFields>) -> Option<CheckFields> {
        let (base, over) = match (vip, real) {
            (None, None) => return None,
            (Some(v), None) => return Some(v.clone()),
            (None, Some(r)) => return Some(r.clone()),
            (Some(v), Some(r)) => (v, r),
        };
        let mut out = CheckFields::default();
        for (key, value) in base.entries() {
            if over.kind.is_none() || COMMON_KEYS.contains(&key) {
                // Values that came out of `entries` are valid by construction.
                let _ = out.set(key, &value);
            }
        }
        for (key, value) in over.entries() {
            let _ = out.set(key, &value);
        }
        Some(out)
    }

    /// The whole check, validated and with its defaults: `None` for `type = "none"` (the real
    /// is not checked). `vip` supplies the default port.
    pub fn resolve(&self, vip: &VipSpec) -> Result<Option<CheckSpec>, CheckFieldError> {
        let kind = self.kind.ok_or_else(|| {
            field_err("type", format!("missing (expected {})", CheckType::names()))
        })?;
        let allowed: &[&str] = match kind {
            CheckType::Http | CheckType::Https => &["path", "host", "expect_status"],
            CheckType::Udp => &["send", "expect"],
            CheckType::Dns => &["name", "qtype"],
            CheckType::Exec => &["command", "dynamic"],
            CheckType::Tcp | CheckType::Ping | CheckType::None => &[],
        };
        for (key, _) in self.entries() {
            if key != "type" && !COMMON_KEYS.contains(&key) && !allowed.contains(&key) {
                return Err(field_err(key, format!("does not apply to a {kind} check")));
            }
        }
        let target = self.target.unwrap_or(Target::Real);
        if target == Target::Vip && matches!(kind, CheckType::Ping | CheckType::Exec) {
            return Err(field_err(
                "target",
                format!(
                    "\"vip\" does not apply to a {kind} check (it sends TCP or UDP to the VIP \
                     through the real)"
                ),
            ));
        }
        let port = match (self.port, kind) {
            (Some(p), _) => p,
            (None, CheckType::Ping | CheckType::Exec | CheckType::None) => vip.port,
            (None, _) if vip.port == 0 => {
                return Err(field_err(
                    "port",
                    format!(
                    "missing: VIP {vip} serves every port, so the check names the one it probes"
                ),
                ))
            }
            (None, _) => vip.port,
        };
        let http = || HttpCheck {
            path: self
                .path
                .clone()
                .unwrap_or_else(|| DEFAULT_PATH.to_string()),
            host: self.host.clone(),
            expect_status: self
                .expect_status
                .clone()
                .unwrap_or_else(|| StatusSet(vec![(200, 399)])),
        };
        let probe = match kind {
            CheckType::None => return Ok(None),
            CheckType::Tcp => Probe::Tcp,
            CheckType::Http => Probe::Http(http()),
            CheckType::Https => Probe::Https(http()),
            CheckType::Udp => Probe::Udp {
                send: self.send.as_ref().map(Payload::bytes).unwrap_or_default(),
                expect: self.expect.as_ref().map(Payload::bytes),
            },
            CheckType::Dns => Probe::Dns {
                name: self
                    .name
                    .clone()
                    .ok_or_else(|| field_err("name", "missing: the name a dns check asks for"))?,
                qtype: self.qtype.unwrap_or(Qtype(1)),
            },
            CheckType::Ping => Probe::Ping,
            CheckType::Exec => Probe::Exec {
                command: self.command.clone().ok_or_else(|| {
                    field_err("command", "missing: the program an exec check runs")
                })?,
                dynamic: self.dynamic.unwrap_or(false),
            },
        };
        Ok(Some(CheckSpec {
            probe,
            port,
            target,
            interval: self.interval.unwrap_or(DEFAULT_INTERVAL),
            timeout: self.timeout.unwrap_or(DEFAULT_TIMEOUT),
            rise: self.rise.unwrap_or(DEFAULT_RISE),
            fall: self.fall.unwrap_or(DEFAULT_FALL),
            initial: self.initial.unwrap_or(Initial::Up),
        }))
    }

    /// The value `describe` shows for a key: the written one, else the default where one
    /// exists for every type, else `-`.
    pub fn shown(&self, key: &str) -> String {
        if let Some((_, v)) = self.entries().into_iter().find(|(k, _)| *k == key) {
            return match v {
                Value::String(s) => s,
                Value::Array(items) => items
                    .iter()
                    .map(|i| i.as_str().unwrap_or_default().to_string())
                    .collect::<Vec<_>>()
                    .join(" "),
                other => other.to_string(),
            };
        }
        match key {
            "interval" => format_duration(DEFAULT_INTERVAL),
            "timeout" => format_duration(DEFAULT_TIMEOUT),
            "rise" => DEFAULT_RISE.to_string(),
            "fall" => DEFAULT_FALL.to_string(),
            "initial" => "up".to_string(),
            "target" => "real".to_string(),
            _ => "-".to_string(),
        }
    }

    /// `key old -> new` for every key that differs (`describe` of a changed check).
    pub fn differences(&self, new: &CheckFields) -> Vec<String> {
        CHECK_KEYS
            .iter()
            .filter(|k| self.has(k) || new.has(k))
            .filter(|k| self.shown(k) != new.shown(k))
            .map(|k| format!("{k} {} -> {}", self.shown(k), new.shown(k)))
            .collect()
    }

    /// `type http port 8080 path /healthz`: the keys that are set.
    pub fn summary(&self) -> String {
        let parts: Vec<String> = self
            .entries()
            .iter()
            .map(|(k, _)| format!("{k} {}", self.shown(k)))
            .collect();
        parts.join(" ")
    }
}

// ---- a resolved check -----------------------------------------------------------------------

/// A check with every default filled in, as the checker runs it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CheckSpec {
    pub probe: Probe,
    /// The port probed (the VIP's unless given; for ping and exec, only what `XLB_PORT` says).
    pub port: u16,
    pub target: Target,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    pub initial: Initial,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Probe {
    Tcp,
    Http(HttpCheck),
    Https(HttpCheck),
    Udp {
        send: Vec<u8>,
        expect: Option<Vec<u8>>,
    },
    Dns {
        name: String,
        qtype: Qtype,
    },
    Ping,
    Exec {
        command: Vec<String>,
        dynamic: bool,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HttpCheck {
    pub path: String,
    pub host: Option<String>,
    pub expect_status: StatusSet,
}

impl CheckSpec {
    /// The address a probe of `real` is sent to.
    pub fn probe_addr(&self, vip: &VipSpec, real: IpAddr) -> IpAddr {
        match self.target {
            Target::Real => real,
            Target::Vip => vip.addr,
        }
    }
}

// ---- VIP options ----------------------------------------------------------------------------

text_enum!(
    /// What a VIP does with new flows while its quorum is lost and it has no sorry server.
    OnQuorumLost {
        FailOpen = "fail-open",
        Drop = "drop",
    }
);

text_enum!(
    /// What becomes of flows tracked to a real whose check fails.
    DownFlows {
        Keep = "keep",
        Move = "move",
    }
);

pub const DEFAULT_QUORUM: u32 = 1;

/// A VIP's health options (keepalived's quorum and sorry_server, GLB's fail-open).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipOptions {
    /// Summed effective weight of healthy reals below which the quorum is lost.
    #[serde(default = "default_quorum")]
    pub quorum: u32,
    /// Takes the new flows while the quorum is lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sorry_server: Option<IpAddr>,
    #[serde(default = "default_on_quorum_lost")]
    pub on_quorum_lost: OnQuorumLost,
    #[serde(default = "default_down_flows")]
    pub down_flows: DownFlows,
}

fn default_quorum() -> u32 {
    DEFAULT_QUORUM
}

fn default_on_quorum_lost() -> OnQuorumLost {
    OnQuorumLost::FailOpen
}

fn default_down_flows() -> DownFlows {
    DownFlows::Keep
}

impl Default for VipOptions {
    fn default() -> Self {
        VipOptions {
            quorum: DEFAULT_QUORUM,
            sorry_server: None,
            on_quorum_lost: OnQuorumLost::FailOpen,
            down_flows: DownFlows::Keep,
        }
    }
}

impl VipOptions {
    /// `key old -> new` for each option that differs.
    pub fn differences(&self, new: &VipOptions) -> Vec<String> {
        let sorry = |s: &Option<IpAddr>| s.map_or_else(|| "none".to_string(), |a| a.to_string());
        let mut out = Vec::new();
        if self.quorum != new.quorum {
            out.push(format!("quorum {} -> {}", self.quorum, new.quorum));
        }
        if self.sorry_server != new.sorry_server {
            out.push(format!(
                "sorry_server {} -> {}",
                sorry(&self.sorry_server),
                sorry(&new.sorry_server)
            ));
        }
        if self.on_quorum_lost != new.on_quorum_lost {
            out.push(format!(
                "on_quorum_lost {} -> {}",
                self.on_quorum_lost, new.on_quorum_lost
            ));
        }
        if self.down_flows != new.down_flows {
            out.push(format!(
                "down_flows {} -> {}",
                self.down_flows, new.down_flows
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn vip(s: &str) -> VipSpec {
        s.parse().expect("test VIP")
    }

    fn fields(v: Value) -> CheckFields {
        CheckFields::from_json(&v).expect("valid check")
    }

    #[test]
    fn defaults_fill_in_and_the_vip_port_is_the_default_port() {
        let spec = fields(json!({"type": "http"}))
            .resolve(&vip("tcp/10.0.0.100:80"))
            .expect("resolves")
            .expect("checked");
        assert_eq!(spec.port, 80);
        assert_eq!(spec.interval, Duration::from_secs(2));
        assert_eq!(spec.timeout, Duration::from_secs(1));
        assert_eq!((spec.rise, spec.fall), (2, 3));
        assert_eq!(spec.initial, Initial::Up);
        assert_eq!(spec.target, Target::Real);
        let Probe::Http(http) = spec.probe else {
            panic!("an http probe")
        };
        assert_eq!(http.path, "/");
        assert!(http.expect_status.contains(200) && http.expect_status.contains(399));
        assert!(!http.expect_status.contains(400));
        assert_eq!(
            fields(json!({"type": "none"})).resolve(&vip("tcp/10.0.0.100:80")),
            Ok(None)
        );
    }

    #[test]
    fn each_field_is_checked_on_its_own() {
        let cases = [
            (json!({"type": "smtp"}), "type", "unknown value \"smtp\""),
            (json!({"port": 0}), "port", "out of range"),
            (
                json!({"port": "80"}),
                "port",
                "expected an integer, found a string",
            ),
            (json!({"interval": "2"}), "interval", "invalid duration"),
            (
                json!({"interval": "10ms"}),
                "interval",
                "out of range (100ms to 1h)",
            ),
            (json!({"rise": 0}), "rise", "out of range"),
            (json!({"path": "healthz"}), "path", "starts with /"),
            (
                json!({"expect_status": "200-"}),
                "expect_status",
                "invalid status",
            ),
            (
                json!({"expect_status": "399-200"}),
                "expect_status",
                "invalid status",
            ),
            (json!({"send": "hex:0g"}), "send", "invalid hex payload"),
            (json!({"qtype": "AXFR"}), "qtype", "unknown query type"),
            (json!({"command": "check"}), "command", "expected an array"),
            (json!({"command": ["check"]}), "command", "absolute path"),
            (json!({"dynamic": 1}), "dynamic", "expected a boolean"),
            (json!({"intervall": "2s"}), "intervall", "unknown key"),
        ];
        for (input, key, words) in cases {
            let e = CheckFields::from_json(&input).unwrap_err();
            assert_eq!(e.key, key, "{input}");
            assert!(e.message.contains(words), "{input}: {e}");
        }
    }

    #[test]
    fn the_whole_check_is_checked_against_its_type() {
        let v = vip("tcp/10.0.0.100:80");
        let cases = [
            (json!({"port": 80}), "type", "missing"),
            (
                json!({"type": "tcp", "path": "/"}),
                "path",
                "does not apply to a tcp check",
            ),
            (
                json!({"type": "http", "send": "x"}),
                "send",
                "does not apply to a http check",
            ),
            (json!({"type": "dns"}), "name", "missing"),
            (json!({"type": "exec"}), "command", "missing"),
            (
                json!({"type": "ping", "target": "vip"}),
                "target",
                "does not apply",
            ),
        ];
        for (input, key, words) in cases {
            let e = fields(input.clone()).resolve(&v).unwrap_err();
            assert_eq!(e.key, key, "{input}");
            assert!(e.message.contains(words), "{input}: {e}");
        }
        let e = fields(json!({"type": "tcp"}))
            .resolve(&vip("tcp/10.0.0.100:0"))
            .unwrap_err();
        assert_eq!(e.key, "port");
        assert!(fields(json!({"type": "ping"}))
            .resolve(&vip("tcp/10.0.0.100:0"))
            .is_ok());
    }

    #[test]
    fn a_real_merges_over_its_vip_and_a_new_type_keeps_only_common_fields() {
        let v = fields(json!({"type": "http", "path": "/healthz", "interval": "5s"}));
        let port = fields(json!({"port": 8080}));
        let merged = CheckFields::merged(Some(&v), Some(&port)).expect("a check");
        assert_eq!(merged.port, Some(8080));
        assert_eq!(merged.path.as_deref(), Some("/healthz"));
        let tcp = fields(json!({"type": "tcp"}));
        let merged = CheckFields::merged(Some(&v), Some(&tcp)).expect("a check");
        assert_eq!(merged.kind, Some(CheckType::Tcp));
        assert_eq!(merged.path, None);
        assert_eq!(merged.interval, Some(Duration::from_secs(5)));
        assert!(merged.resolve(&vip("tcp/10.0.0.100:80")).is_ok());
        assert_eq!(CheckFields::merged(None, None), None);
    }

    #[test]
    fn differences_show_defaults_and_round_trip_through_json() {
        let a = fields(json!({"type": "http"}));
        let b = fields(json!({"type": "http", "interval": "5s"}));
        assert_eq!(a.differences(&b), vec!["interval 2s -> 5s".to_string()]);
        let full = fields(json!({
            "type": "exec", "port": 8080, "interval": "500ms", "timeout": "1m", "rise": 1,
            "fall": 2, "initial": "down", "command": ["/bin/check", "--port", "8080"],
            "dynamic": true
        }));
        let text = serde_json::to_string(&full).expect("json");
        let back: CheckFields = serde_json::from_str(&text).expect("parses");
        assert_eq!(back, full);
        assert_eq!(
            full.summary(),
            "type exec port 8080 interval 500ms timeout 1m rise 1 fall 2 initial down \
             command /bin/check --port 8080 dynamic true"
        );
        let p: Payload = "hex:0a0B".parse().expect("hex");
        assert_eq!(p.bytes(), vec![0x0a, 0x0b]);
        let s: StatusSet = "200,204, 300-399".parse().expect("statuses");
        assert_eq!(s.to_string(), "200,204,300-399");
    }
}
