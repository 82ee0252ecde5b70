//! The RING array mapped into the daemon's memory: a 65 537-slot ring half is written at
//! memory speed (by single map updates it would take ~50 ms).

use std::os::fd::{AsFd, AsRawFd};

use aya::maps::MapData;

use super::EbpfError;

/// The RING array mapped into our memory: rings are written at memory speed.
pub(super) struct RingMmap {
    ptr: *mut u32,
    entries: usize,
    bytes: usize,
}

// SAFETY: the mapping is owned by this value and only accessed through &self / &mut self.
unsafe impl Send for RingMmap {}

impl RingMmap {
    /// Map a RING of `elems` two-slot elements, seen here as `2 * elems` u32 slots.
    pub(super) fn new(map: &MapData, elems: u32) -> Result<Self, EbpfError> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let entries = elems as usize * lb_common::RING_SLOTS_PER_ELEM as usize;
        let bytes = (entries * 4).div_ceil(page) * page;
        // SAFETY: a shared mapping of a BPF_F_MMAPABLE array of exactly this size.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(EbpfError::Mmap {
                bytes,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(RingMmap {
            ptr: ptr.cast(),
            entries,
            bytes,
        })
    }

    pub(super) fn slice(&self) -> &[u32] {
        // SAFETY: the mapping holds `entries` u32s and lives as long as self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.entries) }
    }

    pub(super) fn slice_mut(&mut self) -> &mut [u32] {
        // SAFETY: as above; &mut self gives exclusive access on our side.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.entries) }
    }
}

impl Drop for RingMmap {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.bytes) };
    }
}
