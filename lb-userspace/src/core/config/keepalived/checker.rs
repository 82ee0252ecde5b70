//! A keepalived checker block (TCP_CHECK, HTTP_GET, SSL_GET, UDP_CHECK, DNS_CHECK,
//! PING_CHECK, MISC_CHECK) as xlb's check fields, with keepalived's defaults made explicit.

use std::{collections::BTreeMap, time::Duration};

use serde_json::Value;

use super::{
    addr, arg, number, port, retry_pace_note, seconds, warn, Inherited, KeepalivedError,
    KeepalivedImport, Stmt,
};
use crate::model::{format_duration, CheckFields, RealAddr, VipSpec};

fn text(v: impl Into<String>) -> Value {
    Value::String(v.into())
}

/// One checker block as xlb's check fields, keepalived's defaults made explicit.
pub(super) fn checker(
    c: &Stmt,
    vip: &VipSpec,
    real: RealAddr,
    rs: &Inherited,
    out: &mut KeepalivedImport,
) -> Result<CheckFields, KeepalivedError> {
    let kind = match c.keyword.as_str() {
        "TCP_CHECK" => "tcp",
        "HTTP_GET" => "http",
        "SSL_GET" => "https",
        "UDP_CHECK" => "udp",
        "DNS_CHECK" => "dns",
        "PING_CHECK" => "ping",
        _ => "exec",
    };
    let mut own = Inherited::default();
    let mut f: BTreeMap<&str, Value> = BTreeMap::new();
    let mut urls: Vec<&Stmt> = Vec::new();
    let mut misc_timeout: Option<Duration> = None;
    for k in c.children() {
        match k.keyword.as_str() {
            "connect_port" => {
                let p = port(k, arg(k, 0)?)?;
                // A NAT real with a port of its own is checked there by default.
                if p != real.port_or(vip.port) {
                    f.insert("port", Value::from(p));
                }
            }
            "connect_ip" => {
                if addr(k, arg(k, 0)?)? != real.ip {
                    return Err(KeepalivedError::new(
                        &k.at,
                        &k.text(),
                        "xlb checks the real's own address (or the VIP through it: target = \
                         \"vip\")",
                    ));
                }
            }
            "connect_timeout" => own.connect_timeout = Some(seconds(k)?),
            "retry" | "nb_get_retry" => own.retry = Some(number(k, 1000)? as u32),
            "delay_loop" => own.delay_loop = Some(seconds(k)?),
            "alpha" => own.alpha = Some(true),
            "virtualhost" => own.virtualhost = Some(arg(k, 0)?.to_string()),
            "delay_before_retry" => warn(out, k, retry_pace_note()),
            "url" => urls.push(k),
            "payload" => {
                f.insert("send", text(format!("hex:{}", hex(k, arg(k, 0)?)?)));
            }
            "require_reply" => {
                let want = match k.args.first() {
                    Some(h) => format!("hex:{}", hex(k, h)?),
                    None => String::new(),
                };
                f.insert("expect", text(want));
            }
            "type" => {
                f.insert("qtype", text(arg(k, 0)?.to_ascii_uppercase()));
            }
            "name" => {
                f.insert("name", text(arg(k, 0)?));
            }
            "misc_path" => {
                let argv = shell_words::split(arg(k, 0)?)
                    .map_err(|e| KeepalivedError::new(&k.at, &k.text(), e.to_string()))?;
                f.insert(
                    "command",
                    Value::Array(argv.into_iter().map(text).collect()),
                );
            }
            "misc_timeout" => misc_timeout = Some(seconds(k)?),
            "misc_dynamic" => {
                f.insert("dynamic", Value::Bool(true));
            }
            "user" => warn(out, k, "the program runs as the daemon's user"),
            "bindto" | "bind_port" | "bind_if" | "fwmark" | "warmup" | "min_reply_length"
            | "max_reply_length" | "fast_recovery" | "enable_sni" | "sni_name"
            | "http_protocol" | "tls_compliant" => warn(out, k, "not reproduced by xlb"),
            "log_all_failures" => {}
            other => warn(out, k, format!("{other}: unknown keyword, skipped")),
        }
    }
    let all = own.over(rs);
    let default_retry = match kind {
        "dns" => 3,
        "exec" => 0,
        _ => 1,
    };
    let interval = all.delay_loop.unwrap_or(Duration::from_secs(60));
    let timeout = if kind == "exec" {
        misc_timeout.unwrap_or(interval)
    } else {
        all.connect_timeout.unwrap_or(Duration::from_secs(5))
    };
    f.insert("type", text(kind));
    f.insert("interval", text(format_duration(interval)));
    f.insert("timeout", text(format_duration(timeout)));
    f.insert("rise", Value::from(1));
    f.insert("fall", Value::from(all.retry.unwrap_or(default_retry) + 1));
    if all.alpha == Some(true) {
        f.insert("initial", text("down"));
    }
    if vip.port == 0 && !f.contains_key("port") && !matches!(kind, "ping" | "exec") {
        return Err(KeepalivedError::new(
            &c.at,
            &c.keyword,
            "the VIP serves every port: give the checker a connect_port",
        ));
    }
    if kind == "dns" && !f.contains_key("name") {
        f.insert("name", text("."));
    }
    if kind == "dns" && !f.contains_key("qtype") {
        f.insert("qtype", text("SOA"));
    }
    if matches!(kind, "http" | "https") {
        let first = urls
            .first()
            .ok_or_else(|| KeepalivedError::new(&c.at, &c.keyword, "has no url { path ... }"))?;
        let mut host = all.virtualhost.clone();
        let mut status = "200-299".to_string();
        for u in first.children() {
            match u.keyword.as_str() {
                "path" => {
                    f.insert("path", text(arg(u, 0)?));
                }
                "status_code" => status = u.args.join(","),
                "virtualhost" => host = Some(arg(u, 0)?.to_string()),
                "digest" => {}
                _ => warn(out, u, "not reproduced by xlb"),
            }
        }
        for u in urls.iter().flat_map(|u| u.children()) {
            if u.keyword == "digest" {
                warn(
                    out,
                    u,
                    "xlb checks the status, not an MD5 digest of the body",
                );
            }
        }
        f.insert("expect_status", text(status));
        if let Some(h) = host {
            f.insert("host", text(h));
        }
        for u in &urls[1..] {
            warn(
                out,
                u,
                format!(
                    "xlb checks one url per real: the one at {} is checked, this one is not",
                    first.at
                ),
            );
        }
    }
    let mut fields = CheckFields::default();
    for (key, value) in &f {
        fields
            .set(key, value)
            .map_err(|e| KeepalivedError::new(&c.at, &c.keyword, e.to_string()))?;
    }
    fields
        .resolve(vip)
        .map_err(|e| KeepalivedError::new(&c.at, &c.keyword, e.to_string()))?;
    Ok(fields)
}

/// A payload as keepalived writes it: hex digits, optionally `0x`-prefixed.
fn hex(s: &Stmt, v: &str) -> Result<String, KeepalivedError> {
    let h = v.trim_start_matches("0x").to_ascii_lowercase();
    if h.is_empty() || !h.len().is_multiple_of(2) || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(KeepalivedError::new(
            &s.at,
            &s.text(),
            "expected hex digits, in pairs",
        ));
    }
    Ok(h)
}
