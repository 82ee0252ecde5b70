//! The RING array mapped into the daemon's memory: a 65 537-slot ring half is written at
//! memory speed (by single map updates it would take ~50 ms).

use std::os::fd::AsFd;

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
        let entries = elems as usize * lb_common::RING_SLOTS_PER_ELEM as usize;
        let (ptr, bytes) = crate::dataplane::mmap::map_shared(map.fd().as_fd(), entries * 4)
            .map_err(|source| EbpfError::Mmap {
                name: lb_common::MAP_RING,
                bytes: entries * 4,
                source,
            })?;
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
