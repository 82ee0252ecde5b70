//! Least privilege: before it starts any thread, the daemon keeps only the capabilities it
//! uses and drops the rest from every set (the bounding set too, so that nothing it runs, an
//! `exec` check's program included, can regain them). Capabilities are per thread in Linux:
//! dropping them before the first thread is what makes every thread hold the same few.
//!
//! Kept: CAP_BPF, CAP_PERFMON (load programs: the balancer, the clock probe, the probe
//! program of `target = "vip"` checks; BPF_PROG_TEST_RUN), CAP_NET_ADMIN (attach XDP,
//! neighbours, the probe namespace's veth), CAP_SYS_ADMIN (mount bpffs, make and enter the
//! probe namespace), CAP_NET_RAW (ARP/ND and ping probes); CAP_CHOWN only with a socket group,
//! CAP_NET_BIND_SERVICE only for a `--metrics` port below 1024.

use anyhow::{Context as _, Result};
use caps::{CapSet, Capability, CapsHashSet};

use super::DaemonArgs;

/// The capabilities a daemon started with `args` uses.
pub fn needed(args: &DaemonArgs) -> CapsHashSet {
    let mut keep: CapsHashSet = [
        Capability::CAP_BPF,
        Capability::CAP_PERFMON,
        Capability::CAP_NET_ADMIN,
        Capability::CAP_SYS_ADMIN,
        Capability::CAP_NET_RAW,
    ]
    .into_iter()
    .collect();
    if args.socket_group.is_some() || args.ro_socket_group.is_some() {
        keep.insert(Capability::CAP_CHOWN);
    }
    if args.metrics.is_some_and(|a| a.port() < 1024) {
        keep.insert(Capability::CAP_NET_BIND_SERVICE);
    }
    keep
}

/// Drop every capability but `keep` from this thread (call before any other thread starts).
/// A process that does not hold them all (not root) is left as it is: it will fail where it
/// lacks one, with the kernel's error.
pub fn drop_all_but(keep: &CapsHashSet) -> Result<()> {
    let permitted = caps::read(None, CapSet::Permitted).context("reading the capabilities")?;
    if !permitted.is_superset(keep) {
        log::warn!(
            "running without {}: loading or attaching may fail",
            keep.difference(&permitted)
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
        return Ok(());
    }
    // The bounding set first: that takes CAP_SETPCAP, which goes with the rest below.
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).unwrap_or(false) {
        for cap in caps::all().difference(keep) {
            caps::drop(None, CapSet::Bounding, *cap)
                .with_context(|| format!("dropping {cap} from the bounding set"))?;
        }
    }
    caps::clear(None, CapSet::Ambient).context("clearing the ambient capabilities")?;
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new())
        .context("clearing the inheritable capabilities")?;
    caps::set(None, CapSet::Effective, keep).context("setting the effective capabilities")?;
    caps::set(None, CapSet::Permitted, keep).context("setting the permitted capabilities")?;
    let mut names: Vec<String> = keep.iter().map(ToString::to_string).collect();
    names.sort();
    log::info!(
        "capabilities: {} (every other one dropped)",
        names.join(", ")
    );
    Ok(())
}
