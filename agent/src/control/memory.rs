//! The agent's own heap, kept from growing with every migration (issue 13: an agent that had
//! migrated a few 3 GiB guests and held none kept ~496 MB, in glibc's 64 MiB per-thread
//! arenas).
//!
//! A migration's big buffers (delta caches, send pools, 1 MiB receive buffers) are allocated
//! on its stream threads. glibc serves each thread from an arena and, when they are freed,
//! keeps the pages: a non-main arena only shrinks from its top, and its dynamic mmap threshold
//! rises after the first large free, so later large buffers land in arenas too. So:
//! [`tune`] (at agent start) fixes the mmap threshold, so buffers of [`MMAP_THRESHOLD`] and
//! more are always mapped and unmapped on free, and caps the arenas at [`ARENA_MAX`];
//! [`give_back`] (after each migration, either side) returns the free pages inside every arena
//! with `malloc_trim(0)`.

/// Allocations at least this large are always their own mapping.
pub const MMAP_THRESHOLD: usize = 1 << 20;
/// At most this many malloc arenas (the default is 8 per core).
pub const ARENA_MAX: i32 = 4;

/// Set the C library's allocator up for the agent (call once, early).
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; called before the agent's
        // threads allocate much, and valid at any time anyway.
        let ok = unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int) == 1
                && libc::mallopt(libc::M_ARENA_MAX, ARENA_MAX) == 1
        };
        if !ok {
            tracing::debug!(
                "mallopt refused a setting; the agent's heap may grow after migrations"
            );
        }
    }
}

/// Return free heap pages to the system (after a migration ended and dropped its buffers).
pub fn give_back() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let t = std::time::Instant::now();
        // SAFETY: malloc_trim has no preconditions; it only releases free memory.
        let released = unsafe { libc::malloc_trim(0) } == 1;
        tracing::debug!(
            released,
            took_us = t.elapsed().as_micros() as u64,
            "returned free heap pages to the system"
        );
    }
}
