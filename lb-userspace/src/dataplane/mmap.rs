//! Shared mappings of the kernel's `BPF_F_MMAPABLE` arrays (the ring, the connection table):
//! read and written at memory speed, where a map update is a syscall per element.

use std::os::fd::{AsRawFd, BorrowedFd};

/// Map `len` bytes of the mmapable array behind `fd`, rounded up to whole pages as the kernel
/// maps it: the address and the mapped length (for `munmap`).
pub fn map_shared(fd: BorrowedFd<'_>, len: usize) -> std::io::Result<(*mut libc::c_void, usize)> {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    let bytes = len.div_ceil(page) * page;
    // SAFETY: a shared mapping of an mmapable array of at least this size.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok((ptr, bytes))
}
