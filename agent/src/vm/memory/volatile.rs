//! Copies in and out of guest memory with volatile accesses (the guest may change the bytes
//! underneath at any time), and their tests.

/// Copy `dst.len()` bytes from guest memory at `src` with volatile loads: bytes up to the first
/// 8-byte boundary, then aligned `u64`s (four per step), then the tail.
///
/// # Safety
/// `src..src + dst.len()` must be mapped and readable for the whole call, and must not overlap
/// `dst`.
#[inline]
pub(crate) unsafe fn volatile_copy_out(src: *const u8, dst: &mut [u8]) {
    let len = dst.len();
    let d = dst.as_mut_ptr();
    let head = src.align_offset(8).min(len);
    let mut i = 0;
    // Bounds for every unsafe block below: every offset read is below `len`, inside the range the caller
    // promised readable; every offset written is below `len`, inside `dst`; the u64 loads are
    // at 8-byte-aligned addresses (`src + head` is aligned and steps are 8 bytes); the stores
    // into `dst` are unaligned writes.
    while i < head {
        // SAFETY: in bounds and aligned as said at the top of this function.
        unsafe { *d.add(i) = std::ptr::read_volatile(src.add(i)) };
        i += 1;
    }
    while i + 32 <= len {
        // SAFETY: in bounds and aligned as said at the top of this function.
        unsafe {
            let s = src.add(i).cast::<u64>();
            let a = std::ptr::read_volatile(s);
            let b = std::ptr::read_volatile(s.add(1));
            let c = std::ptr::read_volatile(s.add(2));
            let e = std::ptr::read_volatile(s.add(3));
            let o = d.add(i).cast::<u64>();
            o.write_unaligned(a);
            o.add(1).write_unaligned(b);
            o.add(2).write_unaligned(c);
            o.add(3).write_unaligned(e);
        }
        i += 32;
    }
    while i + 8 <= len {
        // SAFETY: in bounds and aligned as said at the top of this function.
        unsafe {
            let v = std::ptr::read_volatile(src.add(i).cast::<u64>());
            d.add(i).cast::<u64>().write_unaligned(v);
        }
        i += 8;
    }
    while i < len {
        // SAFETY: in bounds and aligned as said at the top of this function.
        unsafe { *d.add(i) = std::ptr::read_volatile(src.add(i)) };
        i += 1;
    }
}

/// Copy `src` into guest memory at `dst` with volatile stores (aligned `u64`s where possible).
///
/// # Safety
/// `dst..dst + src.len()` must be mapped and writable for the whole call, and must not overlap
/// `src`.
#[inline]
pub(crate) unsafe fn volatile_copy_in(src: &[u8], dst: *mut u8) {
    let len = src.len();
    let s = src.as_ptr();
    let head = dst.align_offset(8).min(len);
    let mut i = 0;
    // Bounds for every unsafe block below: offsets stay below `len`, inside `src` and the writable range
    // the caller promised; the u64 stores are at 8-byte-aligned addresses; loads from `src` are
    // unaligned reads.
    while i < head {
        // SAFETY: in bounds and aligned as said at the top of this function.
        unsafe { std::ptr::write_volatile(dst.add(i), *s.add(i)) };
        i += 1;
    }
    while i + 8 <= len {
        // SAFETY: in bounds and aligned as said at the top of this function.
        unsafe {
            let v = s.add(i).cast::<u64>().read_unaligned();
            std::ptr::write_volatile(dst.add(i).cast::<u64>(), v);
        }
        i += 8;
    }
    while i < len {
        // SAFETY: in bounds and aligned as said at the top of this function.
        unsafe { std::ptr::write_volatile(dst.add(i), *s.add(i)) };
        i += 1;
    }
}

#[cfg(test)]
mod volatile_copy_tests {
    use super::{volatile_copy_in, volatile_copy_out};

    #[test]
    fn copies_every_alignment_and_length() {
        let src: Vec<u8> = (0..300u32).map(|i| (i * 7 + 3) as u8).collect();
        for start in 0..9 {
            for len in [0, 1, 7, 8, 9, 31, 32, 33, 100, 255] {
                let mut out = vec![0u8; len + 1];
                // SAFETY: start + len <= 300, inside `src`; `out` is separate.
                unsafe { volatile_copy_out(src.as_ptr().add(start), &mut out[1..]) };
                assert_eq!(&out[1..], &src[start..start + len], "out {start} {len}");
                let mut back = vec![0u8; 300];
                // SAFETY: start + len <= 300, inside `back`; `out` is separate.
                unsafe { volatile_copy_in(&out[1..], back.as_mut_ptr().add(start)) };
                assert_eq!(
                    &back[start..start + len],
                    &src[start..start + len],
                    "in {start} {len}"
                );
                assert!(back[..start].iter().all(|b| *b == 0));
                assert!(back[start + len..].iter().all(|b| *b == 0));
            }
        }
    }
}

#[cfg(test)]
mod volatile_copy_timing {
    /// `cargo test -p ferry-agent --release --lib volatile_copy_speed -- --ignored --nocapture`
    #[test]
    #[ignore = "a timing, not a check"]
    fn volatile_copy_speed() {
        let src = vec![0x5au8; 64 << 20];
        let mut dst = vec![0u8; 4096];
        for round in 0..3 {
            let t = std::time::Instant::now();
            for p in src.chunks_exact(4096) {
                // SAFETY: `p` is a 4 KiB slice of `src`; `dst` is separate.
                unsafe { super::volatile_copy_out(p.as_ptr(), &mut dst) };
                std::hint::black_box(&dst);
            }
            let v = t.elapsed();
            let t = std::time::Instant::now();
            for p in src.chunks_exact(4096) {
                dst.copy_from_slice(p);
                std::hint::black_box(&dst);
            }
            let m = t.elapsed();
            let gbs = |d: std::time::Duration| (64u64 << 20) as f64 / d.as_secs_f64() / 1e9;
            println!(
                "round {round}: volatile {:.1} GB/s, memcpy {:.1} GB/s (4 KiB pages)",
                gbs(v),
                gbs(m)
            );
        }
    }
}
