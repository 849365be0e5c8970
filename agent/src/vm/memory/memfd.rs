//! memfd backing: creating sealed memfds, checking one handed to us, mapping it shared, and
//! asking it which pages hold data.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

use super::{mapped, MemoryError, RegionBitmap, RegionLayout, PAGE_SIZE};

/// A memfd of `size` bytes, sealed so that nobody (this process or one it is passed to) can
/// shrink or grow it, nor change the seals.
pub(super) fn create_memfd(slot: usize, size: u64) -> Result<OwnedFd, MemoryError> {
    let err = |source| MemoryError::Memfd { size, source };
    let name = std::ffi::CString::new(format!("ferry-guest-{slot}"))
        .map_err(|_| err(std::io::Error::other("memfd name")))?;
    // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked and owned.
    let raw =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if raw < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ftruncate on our own fresh memfd.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) } != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on our own memfd, created with MFD_ALLOW_SEALING.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(fd)
}

/// A memfd handed to us must be a sealed memfd of exactly `size` bytes.
pub(super) fn check_memfd(fd: &OwnedFd, size: u64) -> Result<(), MemoryError> {
    // SAFETY: fcntl(F_GET_SEALS) only reads the descriptor's seals.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 {
        return Err(MemoryError::Shared(format!(
            "the descriptor is not a sealable memfd: {}",
            std::io::Error::last_os_error()
        )));
    }
    if seals & libc::F_SEAL_SHRINK == 0 {
        return Err(MemoryError::Shared(
            "the memfd is not sealed against shrinking; refusing to map it".into(),
        ));
    }
    // SAFETY: fstat into a zeroed stat buffer we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above: `st` is a valid, writable stat.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(MemoryError::Shared(format!(
            "fstat of a memfd: {}",
            std::io::Error::last_os_error()
        )));
    }
    if st.st_size as u64 != size {
        return Err(MemoryError::Shared(format!(
            "a memfd of {} bytes for a region of {size} bytes",
            st.st_size
        )));
    }
    Ok(())
}

/// Pages of a memfd that hold data (`SEEK_DATA` / `SEEK_HOLE`).
pub(super) fn memfd_data_pages(
    fd: &OwnedFd,
    layout: RegionLayout,
) -> std::io::Result<RegionBitmap> {
    let mut bm = RegionBitmap::empty(layout);
    let size = layout.size as i64;
    let mut pos: i64 = 0;
    // Each step finds one data extent; an extent is at least a page, so this ends.
    while pos < size {
        // SAFETY: lseek on our own memfd; the result is checked.
        let data = unsafe { libc::lseek(fd.as_raw_fd(), pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after `pos`
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (first, end) = (
            data as u64 / PAGE_SIZE,
            (hole.min(size) as u64).div_ceil(PAGE_SIZE),
        );
        for p in first..end {
            bm.set(p);
        }
        if hole <= pos {
            break;
        }
        pos = hole;
    }
    Ok(bm)
}

pub(super) fn map_memfd(fd: &OwnedFd, size: u64) -> Result<NonNull<u8>, MemoryError> {
    // SAFETY: a fresh shared mapping of a memfd we hold, of exactly its size (checked or set by
    // the caller); no existing memory is affected. Checked against MAP_FAILED below.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
            fd.as_raw_fd(),
            0,
        )
    };
    mapped(ptr, size)
}
