//! `xlb decap`: the decapsulator of tunnel mode's real servers, attached, shown or removed
//! on this host (no daemon involved).

use std::{fmt::Write as _, net::IpAddr};

use super::{args::DecapArgs, client::CliError, write_out, Io};
use crate::{
    daemon::XdpModeArg,
    dataplane::ebpf::decap::{self, DecapMode, DecapStatus},
};

pub fn run(args: &DecapArgs, io: &mut Io<'_>) -> Result<(), CliError> {
    let failed = |e: decap::DecapError| CliError::Failed(anyhow::Error::new(e));
    if args.status {
        let text = match decap::status(&args.iface).map_err(failed)? {
            Some(s) => render(&args.iface, &s),
            None => format!("not attached ({})\n", args.iface),
        };
        return write_out(io, &text);
    }
    if args.remove {
        let text = if decap::remove(&args.iface).map_err(failed)? {
            format!("xlb_decap detached from {}\n", args.iface)
        } else {
            format!("not attached ({}): nothing to remove\n", args.iface)
        };
        return write_out(io, &text);
    }
    for v in &args.vip {
        if let Some(reason) = crate::model::addr_problem(*v) {
            return Err(CliError::Usage(format!("--vip {v}: {v} is {reason}")));
        }
    }
    let mode = match args.xdp_mode {
        XdpModeArg::Auto => DecapMode::Auto,
        XdpModeArg::Native => DecapMode::Native,
        XdpModeArg::Generic => DecapMode::Generic,
    };
    let s = decap::attach(&args.iface, &args.vip, args.gue_port, mode).map_err(failed)?;
    write_out(io, &render(&args.iface, &s))
}

/// `attached  program 42  mode native  iface eth0  gue-port 6080  vips any  local-addresses 3`,
/// then one counter per line.
fn render(iface: &str, s: &DecapStatus) -> String {
    let vips = if s.vips.is_empty() {
        "any".to_string()
    } else {
        let v: Vec<String> = s.vips.iter().map(IpAddr::to_string).collect();
        v.join(",")
    };
    let mut out = format!(
        "attached  program {}  mode {}  iface {iface}  gue-port {}  vips {vips}  \
         local-addresses {}\n",
        s.id, s.mode, s.gue_port, s.local_addrs
    );
    for (name, value) in &s.counters {
        let _ = writeln!(out, "  {name:<16} {value}");
    }
    out
}
