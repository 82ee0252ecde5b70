//! What the commands print: tables for people, versioned JSON for programs.

use crate::api::{ApplyReply, ListReply, Reply, StatsReply};

/// Version of the `--json` output format (the `"v"` field at its top level).
pub const JSON_OUTPUT_VERSION: u32 = 1;

/// `--json` output: the result object with `"v": 1` at its top level, pretty-printed.
pub fn render_json(reply: &Reply) -> String {
    let mut value = serde_json::to_value(reply).unwrap_or(serde_json::Value::Null);
    if let serde_json::Value::Object(map) = &mut value {
        map.insert("v".into(), JSON_OUTPUT_VERSION.into());
    }
    let mut text = serde_json::to_string_pretty(&value).unwrap_or_default();
    text.push('\n');
    text
}

/// The `xlb list` table: a line per VIP, then a line per real.
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
        out.push_str(&format!("{}  id {}  flags {flags}\n", vip.vip, vip.id));
        if vip.reals.is_empty() {
            out.push_str("  (no reals)\n");
            continue;
        }
        out.push_str(&format!(
            "  {:<addr_width$}  {:>6}  {:<17}  STATE\n",
            "REAL", "WEIGHT", "MAC"
        ));
        for real in &vip.reals {
            out.push_str(&format!(
                "  {:<addr_width$}  {:>6}  {:<17}  {}\n",
                real.addr,
                real.weight,
                real.mac.as_deref().unwrap_or("-"),
                real.state
            ));
        }
    }
    out
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
    out.push_str(&format!(
        "uptime {:.0}s; rates over the interval since the previous `xlb stats`\n",
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
