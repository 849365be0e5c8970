//! The machine, as a CPL3 program sees it: the serial console and the yield port (port I/O,
//! allowed by IOPL = 3), the TSC, and the memory functions the compiler calls (there is no libc).

use core::arch::asm;
use core::fmt;

use crate::ferry_guest_abi::{SERIAL_PORT, YIELD_PORT};

/// Write bytes to the serial console (one I/O exit per byte; console lines only, never per
/// packet).
pub fn serial_write(bytes: &[u8]) {
    for &b in bytes {
        // SAFETY: port I/O to the console port; IOPL = 3 allows it at CPL3 and it touches no
        // memory.
        unsafe { asm!("out dx, al", in("dx") SERIAL_PORT, in("al") b, options(nomem, nostack)) };
    }
}

/// `core::fmt` onto the console.
pub struct Console;

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        serial_write(s.as_bytes());
        Ok(())
    }
}

#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::arch::Console, $($arg)*);
    }};
}

/// Sleep up to `cycles` TSC cycles; the VMM wakes the vCPU early when a device has work.
pub fn yield_cycles(cycles: u64) {
    let eax = cycles.clamp(1, u32::MAX as u64) as u32;
    // SAFETY: port I/O to the yield port (an exit to the VMM); touches no memory.
    unsafe { asm!("out dx, eax", in("dx") YIELD_PORT, in("eax") eax, options(nomem, nostack)) };
}

pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc is allowed at CPL3 (CR4.TSD clear) and only reads the counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Microseconds since boot from the TSC.
#[derive(Clone, Copy)]
pub struct Clock {
    t0: u64,
    khz: u64,
}

impl Clock {
    pub fn new(tsc_khz: u64) -> Clock {
        Clock {
            t0: rdtsc(),
            khz: tsc_khz.max(1),
        }
    }

    pub fn now_us(&self) -> u64 {
        (rdtsc().wrapping_sub(self.t0) as u128 * 1000 / self.khz as u128) as u64
    }

    pub fn us_to_cycles(&self, us: u64) -> u64 {
        (us as u128 * self.khz as u128 / 1000).min(u64::MAX as u128) as u64
    }
}

// The memory functions the compiler emits calls to. Written with `rep movsb`/`rep stosb` so
// that the compiler cannot turn them back into calls to themselves.

/// # Safety
/// As C `memcpy`: `n` bytes readable at `src`, writable at `dst`, not overlapping.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract; rep movsb copies exactly n bytes forward (DF = 0 by ABI).
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _,
             options(nostack, preserves_flags))
    };
    dst
}

/// # Safety
/// As C `memmove`: `n` bytes readable at `src`, writable at `dst`; they may overlap.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize).wrapping_add(n) {
        // SAFETY: forward copy is correct when dst is below src or the ranges are disjoint.
        return unsafe { memcpy(dst, src, n) };
    }
    if n == 0 {
        return dst;
    }
    // SAFETY: copy backwards (DF = 1) from the last byte, then restore DF = 0 as the ABI wants.
    unsafe {
        asm!("std", "rep movsb", "cld",
             inout("rcx") n => _, inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
             options(nostack))
    };
    dst
}

/// # Safety
/// As C `memset`: `n` bytes writable at `dst`.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract; rep stosb stores exactly n bytes forward.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8,
             options(nostack, preserves_flags))
    };
    dst
}

/// # Safety
/// As C `memcmp`: `n` bytes readable at `a` and at `b`.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n, within both ranges by the caller's contract.
        let (x, y) = unsafe {
            (
                core::ptr::read_volatile(a.add(i)),
                core::ptr::read_volatile(b.add(i)),
            )
        };
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

/// # Safety
/// As C `bcmp`.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}
