//! Memory of the guest's own: a bump arena over HEAP_START..STACK_BOTTOM (buffers, socket
//! storage, virtqueues; allocated once at start, never freed), and the virtio-drivers HAL over
//! it. Guest memory is identity-mapped, so a physical address is its virtual address.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::ferry_guest_abi::{HEAP_START, STACK_BOTTOM};
use virtio_drivers::{BufferDirection, Hal, PhysAddr};

static NEXT: AtomicU64 = AtomicU64::new(HEAP_START);

pub const PAGE: u64 = 4096;

/// Bytes left in the arena.
pub fn left() -> u64 {
    STACK_BOTTOM - NEXT.load(Ordering::Relaxed)
}

/// `len` zeroed bytes aligned to `align` (a power of two), for the life of the program.
pub fn alloc_bytes(len: usize, align: u64) -> &'static mut [u8] {
    let start = NEXT.load(Ordering::Relaxed).next_multiple_of(align);
    let end = start + len as u64;
    if end > STACK_BOTTOM {
        panic!(
            "guest heap exhausted: {len} bytes wanted, {} left below the stack",
            STACK_BOTTOM.saturating_sub(start)
        );
    }
    NEXT.store(end, Ordering::Relaxed);
    let p = start as *mut u8;
    // SAFETY: [start, end) lies in the heap region of the memory map, identity-mapped and
    // writable, below the stack, and handed out once (NEXT only grows; one thread).
    unsafe {
        core::ptr::write_bytes(p, 0, len);
        core::slice::from_raw_parts_mut(p, len)
    }
}

/// A zeroed `T` in the arena, for the life of the program. `T` must be valid when all zeros.
pub fn alloc_zeroed<T>() -> &'static mut T {
    let b = alloc_bytes(
        core::mem::size_of::<T>(),
        core::mem::align_of::<T>().max(8) as u64,
    );
    // SAFETY: the bytes are zeroed, aligned for T and exclusively ours; callers only use types
    // for which all-zeros is a valid value (byte arrays, integers).
    unsafe { &mut *(b.as_mut_ptr() as *mut T) }
}

/// virtio-drivers' HAL: DMA pages from the arena, identity mapping.
pub struct GuestHal;

// SAFETY: dma_alloc returns zeroed, page-aligned, never-reused memory; addresses are identity
// mapped so sharing is the identity and nothing needs copying back.
unsafe impl Hal for GuestHal {
    fn dma_alloc(pages: usize, _dir: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let b = alloc_bytes(pages * PAGE as usize, PAGE);
        let p = b.as_mut_ptr();
        (
            p as u64 as PhysAddr,
            NonNull::new(p).expect("heap is not at 0"),
        )
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, _vaddr: NonNull<u8>, _pages: usize) -> i32 {
        // Devices live as long as the program; the arena never frees.
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as usize as *mut u8).expect("MMIO at 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _dir: BufferDirection) -> PhysAddr {
        buffer.as_ptr() as *mut u8 as usize as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _dir: BufferDirection) {}
}
