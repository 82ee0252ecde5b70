//! Attaching the balancer: natively or generic, through an XDP link pinned next to the maps
//! so that forwarding outlives the daemon, and adopting the link a previous daemon pinned
//! (the new program replaces the old one on it atomically).

use std::path::Path;

use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
        ProgramError, Xdp, XdpMode,
    },
    Ebpf,
};

use super::{EbpfDataplane, EbpfError};

/// How `attach_pinned` attached the balancer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    Native,
    Generic,
    /// A pinned link from an earlier daemon now runs this program.
    Replaced,
}

impl EbpfDataplane {
    /// Attach with the XDP link pinned at `pin`, so forwarding outlives this process. A link
    /// already pinned there is adopted: the new program replaces the old one on it
    /// atomically (no packet sees no program). Returns how it was attached.
    pub fn attach_pinned(
        &mut self,
        iface: &str,
        mode: AttachMode,
        pin: &Path,
    ) -> Result<Attached, EbpfError> {
        let pin_err = |reason: String| EbpfError::Pin {
            path: pin.display().to_string(),
            reason,
        };
        if pin.exists() {
            match self.adopt_link(iface, pin) {
                Ok(()) => return Ok(Attached::Replaced),
                // The interface the link was made for is gone (deleted and recreated): the
                // pinned link is dead. Forget it and attach afresh; the maps stay.
                Err(e) if has_errno(&e, libc::ENOLINK) => {
                    log::warn!(
                        "the pinned XDP link of {iface} is severed (interface recreated?): \
                         attaching anew"
                    );
                    std::fs::remove_file(pin).map_err(|e| pin_err(e.to_string()))?;
                }
                Err(e) => return Err(e),
            }
        }
        let (link_id, mode_used) =
            attach_program(&mut self.ebpf, lb_common::PROG_BALANCER, iface, mode)?;
        let prog = program_mut(&mut self.ebpf, lb_common::PROG_BALANCER)?;
        let link = prog
            .take_link(link_id)
            .map_err(|source| EbpfError::Program {
                name: lb_common::PROG_BALANCER,
                source,
            })?;
        let fd_link = FdLink::try_from(link).map_err(|e| {
            pin_err(format!(
                "{e}: the program was attached through netlink, which cannot be pinned"
            ))
        })?;
        let pinned = fd_link.pin(pin).map_err(|e| pin_err(e.to_string()))?;
        self.links.push(pinned);
        Ok(if mode_used == XdpMode::Skb {
            Attached::Generic
        } else {
            Attached::Native
        })
    }

    /// Run this program on the link pinned at `pin`, atomically replacing the old program.
    /// The pin itself is never removed: at no moment is the link held only by this process.
    fn adopt_link(&mut self, iface: &str, pin: &Path) -> Result<(), EbpfError> {
        let pin_err = |reason: String| EbpfError::Pin {
            path: pin.display().to_string(),
            reason,
        };
        let old = PinnedLink::from_pin(pin).map_err(|e| pin_err(e.to_string()))?;
        let xdp_link = XdpLink::try_from(FdLink::from(old)).map_err(|e| pin_err(e.to_string()))?;
        let prog = program_mut(&mut self.ebpf, lb_common::PROG_BALANCER)?;
        let id = prog
            .attach_to_link(xdp_link)
            .map_err(|source| EbpfError::Attach {
                iface: iface.to_string(),
                source,
            })?;
        // Our fd to the link closes; the pin keeps it. Hold it through the pin from now on.
        drop(prog.take_link(id).map_err(|source| EbpfError::Program {
            name: lb_common::PROG_BALANCER,
            source,
        })?);
        self.links
            .push(PinnedLink::from_pin(pin).map_err(|e| pin_err(e.to_string()))?);
        Ok(())
    }

    /// Attach the balancer to `iface`: native mode, or generic when the driver has no XDP
    /// support and `mode` allows it. Returns the mode used.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<XdpMode, EbpfError> {
        attach_program(&mut self.ebpf, lb_common::PROG_BALANCER, iface, mode).map(|(_, m)| m)
    }
}

/// How to attach: `Auto` tries native then generic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    Auto,
    Native,
    Generic,
}

pub(super) fn program_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut Xdp, EbpfError> {
    let prog = ebpf.program_mut(name).ok_or(EbpfError::Program {
        name,
        source: ProgramError::NotLoaded,
    })?;
    prog.try_into()
        .map_err(|source| EbpfError::Program { name, source })
}

/// Whether an error or any of its sources is an OS error `errno`.
pub(super) fn has_errno(e: &EbpfError, errno: i32) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.raw_os_error() == Some(errno) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// Whether an attach failed because the interface already has an XDP program (EEXIST from
/// bpf_link_create, EBUSY from netlink).
pub fn is_busy(e: &EbpfError) -> bool {
    has_errno(e, libc::EEXIST) || has_errno(e, libc::EBUSY)
}

fn attach_program(
    ebpf: &mut Ebpf,
    name: &'static str,
    iface: &str,
    mode: AttachMode,
) -> Result<(XdpLinkId, XdpMode), EbpfError> {
    let prog = program_mut(ebpf, name)?;
    let attach = |prog: &mut Xdp, m: XdpMode| {
        prog.attach(iface, m)
            .map(|id| (id, m))
            .map_err(|source| EbpfError::Attach {
                iface: iface.to_string(),
                source,
            })
    };
    match mode {
        AttachMode::Native => attach(prog, XdpMode::Driver),
        AttachMode::Generic => attach(prog, XdpMode::Skb),
        AttachMode::Auto => match attach(prog, XdpMode::Driver) {
            Ok(done) => Ok(done),
            // Another program owns the interface: generic mode would fail the same way.
            Err(native) if is_busy(&native) => Err(native),
            Err(native) => {
                log::warn!("native XDP on {iface} failed ({native}); using generic XDP");
                attach(prog, XdpMode::Skb)
            }
        },
    }
}
