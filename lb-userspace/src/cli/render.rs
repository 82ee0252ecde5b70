//! What the commands print: tables for people, versioned JSON for programs.

use crate::api::{ApplyReply, ListReply, RealInfo, Reply, StatsReply};

/// Version of the `--json` output format (the `"v"` field at its top level).
pub const JSON_OUTPUT_VERSION: u32 = 1;

/// `--json` output: the result object with `"v": 1` at its top level, pretty-printed.
/// `render_json` for a large reply (a million flows): written as it is serialized, without
/// the intermediate tree (the keys in the reply's own order, `v` first).
pub fn write_json(reply: &Reply, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    #[derive(serde::Serialize)]
    struct Versioned<'a> {
        v: u32,
        #[serde(flatten)]
        reply: &'a Reply,
    }
    let mut w = std::io::BufWriter::with_capacity(1 << 20, out);
    serde_json::to_writer_pretty(
        &mut w,
        &Versioned {
            v: JSON_OUTPUT_VERSION,
            reply,
        },
    )?;
    std::io::Write::write_all(&mut w, b"\n")?;
    std::io::Write::flush(&mut w)
}

pub fn render_json(reply: &Reply) -> String {
    let mut value = serde_json::to_value(reply).unwrap_or(serde_json::Value::Null);
    if let serde_json::Value::Object(map) = &mut value {
        map.insert("v".into(), JSON_OUTPUT_VERSION.into());
    }
    let mut text = serde_json::to_string_pretty(&value).unwrap_or_default();
    text.push('\n');
    text
}

/// The `xlb list` table: a line per VIP (with its quorum), its check and sorry server, then
/// a line per real with its health.
pub fn render_list(list: &ListReply) -> String {
    if list.vips.is_empty() {
        return "no VIPs\n".to_string();
    }
    let addr_width = list
        .vips
        .iter()
        .flat_map(|v| v.reals.iter().map(|r| r.addr.len()))
        .max()
        .unwrap_or(0)
        .max("REAL".len());
    let mut out = String::new();
    for (i, vip) in list.vips.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let flags = if vip.flags.is_empty() {
            "none".to_string()
        } else {
            vip.flags.join(",")
        };
        let quorum = if vip.quorum == "ok" {
            "quorum ok".to_string()
        } else {
            let what = if vip.sorry_active {
                "sorry server takes new flows".to_string()
            } else if vip.on_quorum_lost == "drop" {
                "dropping new flows".to_string()
            } else {
                "failing open".to_string()
            };
            format!(
                "quorum LOST (healthy weight {} < {}): {what}",
                vip.healthy_weight, vip.quorum_threshold
            )
        };
        out.push_str(&format!(
            "{}  id {}  mode {}  flags {flags}  {quorum}\n",
            vip.vip, vip.id, vip.mode
        ));
        if let Some(check) = &vip.check {
            out.push_str(&format!("  check {}\n", check_text(check)));
        }
        if let Some(sorry) = &vip.sorry_server {
            let role = if vip.sorry_active {
                "active"
            } else {
                "standby"
            };
            out.push_str(&format!(
                "  sorry server {}  {}  {role}\n",
                sorry.addr,
                sorry.mac.as_deref().unwrap_or("unresolved")
            ));
        }
        if vip.reals.is_empty() {
            out.push_str("  (no reals)\n");
            continue;
        }
        out.push_str(&format!(
            "  {:<addr_width$}  {:>6}  {:>9}  {:<17}  {:<10}  {:<6}  HEALTH\n",
            "REAL", "WEIGHT", "EFFECTIVE", "MAC", "STATE", "MODE"
        ));
        for real in &vip.reals {
            out.push_str(&format!(
                "  {:<addr_width$}  {:>6}  {:>9}  {:<17}  {:<10}  {:<6}  {}\n",
                real.addr,
                real.weight,
                real.effective_weight,
                real.mac.as_deref().unwrap_or("-"),
                real.state,
                real.mode,
                health_text(real)
            ));
            if let Some(check) = &real.check {
                out.push_str(&format!(
                    "  {:<addr_width$}  own check {}\n",
                    "",
                    check_text(check)
                ));
            }
            if let (Some(active), Some(inactive)) = (real.active_conns, real.inactive_conns) {
                out.push_str(&format!(
                    "  {:<addr_width$}  connections: {active} active, {inactive} inactive\n",
                    ""
                ));
            }
        }
    }
    out
}

/// `up 35s (ok)`, `down 12s (connect: refused)`, `unchecked`.
fn health_text(real: &RealInfo) -> String {
    match &real.health {
        Some(h) if h.status != "unchecked" => {
            format!("{} {}s ({})", h.status, h.since_secs, h.last)
        }
        _ => "unchecked".to_string(),
    }
}

/// `type http path /healthz interval 5s`: a check object's keys and values.
fn check_text(check: &serde_json::Value) -> String {
    let Some(obj) = check.as_object() else {
        return String::new();
    };
    // In the order a config file writes them (JSON objects come sorted by key).
    let parts: Vec<String> = crate::model::CHECK_KEYS
        .iter()
        .filter_map(|k| obj.get(*k).map(|v| (k, v)))
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => format!("{k} {s}"),
            serde_json::Value::Array(items) => {
                let items: Vec<&str> = items.iter().filter_map(|i| i.as_str()).collect();
                format!("{k} {}", items.join(" "))
            }
            other => format!("{k} {other}"),
        })
        .collect();
    parts.join(" ")
}

/// A rate with an SI prefix: `950`, `12.3k`, `1.25M`.
fn si(value: f64) -> String {
    const PREFIXES: [(f64, &str); 4] = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")];
    for (scale, prefix) in PREFIXES {
        if value >= scale {
            return format!("{:.2}{prefix}", value / scale);
        }
    }
    format!("{value:.0}")
}

/// The `xlb stats` table: a line per VIP and per real, then the global counters.
pub fn render_stats(stats: &StatsReply) -> String {
    let name_width = stats
        .vips
        .iter()
        .flat_map(|v| std::iter::once(v.vip.len()).chain(v.reals.iter().map(|r| r.addr.len() + 2)))
        .max()
        .unwrap_or(0)
        .max("VIP / REAL".len());
    let mut out = String::new();
    if stats.vips.is_empty() {
        out.push_str("no VIPs\n");
    } else {
        out.push_str(&format!(
            "{:<name_width$}  {:>12}  {:>14}  {:>10}  {:>8}  {:>8}  {:>8}\n",
            "VIP / REAL", "PACKETS", "BYTES", "NEW FLOWS", "PPS", "BIT/S", "NO REAL"
        ));
        for vip in &stats.vips {
            let c = &vip.counters;
            out.push_str(&format!(
                "{:<name_width$}  {:>12}  {:>14}  {:>10}  {:>8}  {:>8}  {:>8}\n",
                vip.vip,
                c.packets,
                c.bytes,
                c.new_flows,
                si(c.packets_per_sec),
                si(c.bytes_per_sec * 8.0),
                vip.no_real
            ));
            if vip.quorum_drops != 0 {
                out.push_str(&format!(
                    "  quorum drops {} (new flows dropped while the quorum was lost)\n",
                    vip.quorum_drops
                ));
            }
            if vip.untracked != 0 {
                out.push_str(&format!(
                    "  untracked {} (new flows the connection table had no room for)\n",
                    vip.untracked
                ));
            }
            for real in &vip.reals {
                let c = &real.counters;
                out.push_str(&format!(
                    "{:<name_width$}  {:>12}  {:>14}  {:>10}  {:>8}  {:>8}\n",
                    format!("  {}", real.addr),
                    c.packets,
                    c.bytes,
                    c.new_flows,
                    si(c.packets_per_sec),
                    si(c.bytes_per_sec * 8.0),
                ));
            }
        }
    }
    let nonzero: Vec<String> = stats
        .global
        .iter()
        .filter(|(_, &n)| n != 0)
        .map(|(name, n)| format!("{name} {n}"))
        .collect();
    if nonzero.is_empty() {
        out.push_str("global: all counters zero\n");
    } else {
        out.push_str(&format!("global: {}\n", nonzero.join(", ")));
    }
    if stats.unresolved_reals != 0 || stats.mac_resolution_failures != 0 {
        out.push_str(&format!(
            "unresolved reals: {} now (no MAC address: they take no new flows); {} resolution \
             failures since start\n",
            stats.unresolved_reals, stats.mac_resolution_failures
        ));
    }
    if let Some(sync) = &stats.sync {
        let peers: Vec<String> = sync
            .peers
            .iter()
            .map(|p| match p.last_seen_secs {
                Some(s) => format!("{} (seen {s:.1}s ago)", p.addr),
                None => format!("{} (never seen)", p.addr),
            })
            .collect();
        out.push_str(&format!(
            "sync: peers {}; flows sent {}, received {}, rejected {}\n",
            peers.join(", "),
            sync.flows_sent,
            sync.flows_received,
            sync.rejected
        ));
    }
    out.push_str(&format!(
        "uptime {:.0}s; rates over the last second\n",
        stats.uptime_secs
    ));
    out
}

/// What `xlb apply` and `xlb import-ipvsadm` print: the change lines, or `no changes`, and a
/// note when nothing was applied.
pub fn render_apply(reply: &ApplyReply) -> String {
    let mut out = String::new();
    if reply.changes.is_empty() {
        out.push_str("no changes\n");
    }
    for change in &reply.changes {
        out.push_str(change);
        out.push('\n');
    }
    if !reply.applied {
        out.push_str("dry run: nothing was applied\n");
    }
    out
}

/// `xlb conns`: a line per flow, then the flows per real.
pub fn render_conns(c: &crate::api::ConnsReply) -> String {
    let mut out = String::new();
    if !c.flows.is_empty() {
        out.push_str(&format!(
            "{:<28} {:<46} {:<40} {:<8} {:>6}\n",
            "VIP", "CLIENT", "REAL", "STATE", "IDLE"
        ));
    }
    for f in &c.flows {
        out.push_str(&format!(
            "{:<28} {:<46} {:<40} {:<8} {:>5}s\n",
            f.vip,
            f.client,
            f.real,
            if f.closing { "closing" } else { "open" },
            f.idle_secs
        ));
    }
    for p in &c.per_real {
        out.push_str(&format!("{} {}: {} flows\n", p.vip, p.real, p.flows));
    }
    out.push_str(&format!(
        "{} flows ({} entries read in {} ms)\n",
        c.count, c.scanned, c.scan_ms
    ));
    out
}

/// `xlb whereis`: `REAL (tracked entry)` or `REAL (ring slot N)`.
pub fn render_whereis(w: &crate::api::WhereisReply) -> String {
    match (&w.real, w.slot) {
        (Some(r), None) => format!("{r} (tracked entry)\n"),
        (Some(r), Some(slot)) => format!("{r} (ring slot {slot})\n"),
        (None, Some(slot)) => format!("no real (ring slot {slot} is empty: dropped)\n"),
        (None, None) => "no real\n".to_string(),
    }
}
