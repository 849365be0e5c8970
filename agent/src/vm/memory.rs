//! Guest memory: mappings owned by the agent (or a VMM process), registered with KVM as memory
//! slots.
//!
//! ## Backing
//!
//! A region is either a private anonymous mapping ([`Backing::Anonymous`], the default) or a
//! memfd mapped `MAP_SHARED` ([`Backing::Memfd`], one memfd per region, sealed against shrinking
//! and growing). A memfd-backed guest's memory can be mapped by a second process with
//! [`GuestMemory::map_shared`]: the agent reads and writes the pages of a guest that runs in a
//! `ferry vmm` process (see docs/vmm.md). Such a mapping has no KVM VM: dirty logging is a
//! request to the VMM, and [`GuestMemory::set_dirty_logging`] / [`GuestMemory::take_dirty`] fail
//! with [`MemoryError::NoVm`]. For memfd regions, [`GuestMemory::discard`] punches a hole in
//! the memfd (both processes then read zeros) and [`GuestMemory::populated`] asks the memfd
//! where it holds data (`SEEK_DATA`/`SEEK_HOLE`), which sees the pages any process touched.
//!
//! Every region can have KVM dirty logging switched on or off on its own. [`GuestMemory::take_dirty`]
//! is the one way to learn which pages changed: it fetches (and clears) KVM's dirty log *and* the
//! agent's own write log, so pages that the agent wrote itself (device emulation, loading an image,
//! restoring a snapshot) are never missed. A region whose dirty logging is off reports every page as
//! dirty: a caller can never under-count.
//!
//! Memory can also be mapped without a KVM VM ([`GuestMemory::unregistered`]): then the agent's
//! own write log is the whole dirty log. The migration engine's tests run on such memory (a
//! fake guest writes it through [`GuestMemory::write`]).
//!
//! Host-side access goes through [`GuestMemory::read`] / [`GuestMemory::write`], which copy bytes
//! and, for writes, mark the pages dirty. Guest memory may change under the agent while vCPUs run;
//! reads of a running guest are racy by nature (like a DMA engine's), and exact only while the vCPUs
//! are paused.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

mod bitmap;
mod memfd;
mod volatile;

pub use bitmap::{DirtyBitmap, RegionBitmap};
use memfd::{check_memfd, create_memfd, map_memfd, memfd_data_pages};
pub(crate) use volatile::{volatile_copy_in, volatile_copy_out};

/// Size of a guest page: the unit of dirty tracking and of migration.
pub const PAGE_SIZE: u64 = 4096;

/// Where the classic x86 "PCI hole" starts: memory above this goes above 4 GiB.
pub const LOW_MEMORY_END: u64 = 3 << 30;
/// Where memory resumes above the hole.
pub const HIGH_MEMORY_START: u64 = 4 << 30;

/// Errors of the guest memory layer.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory size {0} bytes is not a positive multiple of 2 MiB")]
    BadSize(u64),
    #[error("could not map {size} bytes of guest memory: {source}; reduce the VM's memory or free host memory")]
    Mmap {
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("KVM refused memory slot {slot} (gpa {gpa:#x}, {size} bytes): {source}")]
    SetRegion {
        slot: u32,
        gpa: u64,
        size: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("reading KVM's dirty log of slot {slot} failed: {source}")]
    DirtyLog {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("guest-physical range {gpa:#x}+{len:#x} is not inside guest memory")]
    OutOfRange { gpa: u64, len: u64 },
    #[error("region index {0} does not exist")]
    NoRegion(usize),
    #[error("could not create a memfd of {size} bytes for guest memory: {source}")]
    Memfd {
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("this guest memory is a shared mapping without a KVM VM; ask the guest's VMM for {0}")]
    NoVm(&'static str),
    #[error("shared guest memory: {0}")]
    Shared(String),
}

/// What guest memory is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backing {
    /// Private anonymous memory, visible only to this process.
    #[default]
    Anonymous,
    /// One sealed memfd per region, mapped shared: another process can map it too.
    Memfd,
}

/// The shape of one memory region, without its contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionLayout {
    /// First guest-physical address.
    pub gpa: u64,
    /// Size in bytes (a multiple of [`PAGE_SIZE`]).
    pub size: u64,
}

impl RegionLayout {
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }
    pub fn end(&self) -> u64 {
        self.gpa + self.size
    }
}

/// The standard layout for `size` bytes of guest memory: everything below 3 GiB in one region,
/// the rest above 4 GiB (leaving the usual hole for MMIO).
pub fn standard_layout(size: u64) -> Result<Vec<RegionLayout>, MemoryError> {
    if size == 0 || !size.is_multiple_of(2 << 20) {
        return Err(MemoryError::BadSize(size));
    }
    if size <= LOW_MEMORY_END {
        return Ok(vec![RegionLayout { gpa: 0, size }]);
    }
    Ok(vec![
        RegionLayout {
            gpa: 0,
            size: LOW_MEMORY_END,
        },
        RegionLayout {
            gpa: HIGH_MEMORY_START,
            size: size - LOW_MEMORY_END,
        },
    ])
}

struct Region {
    layout: RegionLayout,
    slot: u32,
    host: NonNull<u8>,
    /// The memfd behind a shared mapping (None: private anonymous memory).
    memfd: Option<OwnedFd>,
    dirty_logging: AtomicBool,
    /// Pages written by the agent since the last [`GuestMemory::take_dirty`].
    agent_dirty: Box<[AtomicU64]>,
}

// SAFETY: `host` points to a mapping owned by this Region for its whole life (private anonymous,
// or a sealed memfd that cannot shrink under it); all access to it goes through raw-pointer
// copies that tolerate concurrent writers (the guest, or the other process sharing the memfd).
unsafe impl Send for Region {}
// SAFETY: as above; the Region's own mutable state is atomic.
unsafe impl Sync for Region {}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: `host`/`size` are exactly the mapping created in `GuestMemory::with_backing`
        // or `map_shared`, and the VM (holding the memory slot) is dropped before the memory
        // (see `GuestMemory`'s fields). The memfd, if any, closes after the unmap.
        unsafe {
            libc::munmap(self.host.as_ptr().cast(), self.layout.size as usize);
        }
    }
}

/// All of a guest's memory.
pub struct GuestMemory {
    regions: Vec<Region>,
    /// The KVM VM whose slots these regions are; None for a [`GuestMemory::map_shared`] view
    /// and for [`GuestMemory::unregistered`] memory.
    vm: Option<Arc<VmFd>>,
    /// No KVM VM, and the agent's own write log is the whole dirty log
    /// ([`GuestMemory::unregistered`]).
    own_log: bool,
}

impl std::fmt::Debug for GuestMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestMemory")
            .field("regions", &self.layout())
            .finish()
    }
}

impl GuestMemory {
    /// Map the given regions (private anonymous memory) and register them with KVM as slots
    /// 0, 1, ...; with `huge_pages` the memory is advised for transparent huge pages.
    pub fn new(
        vm: Arc<VmFd>,
        layout: &[RegionLayout],
        huge_pages: bool,
    ) -> Result<Self, MemoryError> {
        Self::with_backing(vm, layout, huge_pages, Backing::Anonymous)
    }

    /// [`GuestMemory::new`] with a chosen [`Backing`].
    pub fn with_backing(
        vm: Arc<VmFd>,
        layout: &[RegionLayout],
        huge_pages: bool,
        backing: Backing,
    ) -> Result<Self, MemoryError> {
        check_layout(layout)?;
        let mut regions = Vec::with_capacity(layout.len());
        for (slot, l) in layout.iter().enumerate() {
            let (host, memfd) = match backing {
                Backing::Anonymous => (map_anonymous(l.size)?, None),
                Backing::Memfd => {
                    let fd = create_memfd(slot, l.size)?;
                    (map_memfd(&fd, l.size)?, Some(fd))
                }
            };
            if huge_pages {
                // Transparent huge pages: fewer, larger first-touch faults and TLB entries.
                // KVM still tracks dirty pages at 4 KiB. Failure only costs speed (a memfd gets
                // huge pages only where /sys/kernel/mm/transparent_hugepage/shmem_enabled
                // allows them).
                // SAFETY: advice on the mapping just created, exactly its length.
                unsafe {
                    libc::madvise(host.as_ptr().cast(), l.size as usize, libc::MADV_HUGEPAGE)
                };
            }
            regions.push(Region::new(*l, slot as u32, host, memfd));
        }
        let mem = GuestMemory {
            regions,
            vm: Some(vm),
            own_log: false,
        };
        for r in &mem.regions {
            mem.register(r, false)?;
        }
        Ok(mem)
    }

    /// Map the given regions (private anonymous memory) without registering them with any KVM
    /// VM: dirty logging then tracks only what is written through [`GuestMemory::write`] (and
    /// the other writers here). The migration engine's tests build their fake guests on it.
    pub fn unregistered(layout: &[RegionLayout]) -> Result<Self, MemoryError> {
        check_layout(layout)?;
        let mut regions = Vec::with_capacity(layout.len());
        for (slot, l) in layout.iter().enumerate() {
            regions.push(Region::new(*l, slot as u32, map_anonymous(l.size)?, None));
        }
        Ok(GuestMemory {
            regions,
            vm: None,
            own_log: true,
        })
    }

    /// Map another process's memfd-backed guest memory (one memfd per region, as
    /// [`GuestMemory::memfds`] gives them) into this process, without KVM. Each memfd must be
    /// exactly its region's size and sealed against shrinking (otherwise the owner could cut
    /// the mapping under this process, which would then fault on access).
    pub fn map_shared(layout: &[RegionLayout], fds: Vec<OwnedFd>) -> Result<Self, MemoryError> {
        check_layout(layout)?;
        if fds.len() != layout.len() {
            return Err(MemoryError::Shared(format!(
                "{} memfds for {} regions",
                fds.len(),
                layout.len()
            )));
        }
        let mut regions = Vec::with_capacity(layout.len());
        for (slot, (l, fd)) in layout.iter().zip(fds).enumerate() {
            check_memfd(&fd, l.size)?;
            let host = map_memfd(&fd, l.size)?;
            regions.push(Region::new(*l, slot as u32, host, Some(fd)));
        }
        Ok(GuestMemory {
            regions,
            vm: None,
            own_log: false,
        })
    }

    /// The memfds behind the regions, in region order; None unless every region is a memfd.
    pub fn memfds(&self) -> Option<Vec<BorrowedFd<'_>>> {
        self.regions
            .iter()
            .map(|r| r.memfd.as_ref().map(|f| f.as_fd()))
            .collect()
    }

    /// How the memory is backed.
    pub fn backing(&self) -> Backing {
        if self.regions.iter().all(|r| r.memfd.is_some()) && !self.regions.is_empty() {
            Backing::Memfd
        } else {
            Backing::Anonymous
        }
    }

    /// Whether this memory is a KVM VM's (false for a [`GuestMemory::map_shared`] view).
    pub fn has_vm(&self) -> bool {
        self.vm.is_some()
    }

    fn register(&self, r: &Region, log_dirty: bool) -> Result<(), MemoryError> {
        if self.own_log {
            return Ok(());
        }
        let vm = self.vm.as_ref().ok_or(MemoryError::NoVm("dirty logging"))?;
        let region = kvm_userspace_memory_region {
            slot: r.slot,
            flags: if log_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: r.layout.gpa,
            memory_size: r.layout.size,
            userspace_addr: r.host.as_ptr() as u64,
        };
        // SAFETY: the host range is a live mapping owned by `self` of exactly `memory_size`
        // bytes, and it outlives the VM's use of it (the slot is dropped with the VM fd, which
        // `Vm` drops before this memory).
        unsafe { vm.set_user_memory_region(region) }.map_err(|source| MemoryError::SetRegion {
            slot: r.slot,
            gpa: r.layout.gpa,
            size: r.layout.size,
            source,
        })
    }

    /// The regions' shapes.
    pub fn layout(&self) -> Vec<RegionLayout> {
        self.regions.iter().map(|r| r.layout).collect()
    }

    /// Total guest memory in bytes.
    pub fn size(&self) -> u64 {
        self.regions.iter().map(|r| r.layout.size).sum()
    }

    /// Switch KVM dirty logging for one region. Turning it on starts a fresh log: every page
    /// counts as clean until written. Turning it off makes that region report all pages dirty.
    pub fn set_dirty_logging(&self, region: usize, on: bool) -> Result<(), MemoryError> {
        let r = self
            .regions
            .get(region)
            .ok_or(MemoryError::NoRegion(region))?;
        self.register(r, on)?;
        r.dirty_logging.store(on, Ordering::SeqCst);
        if on {
            for w in r.agent_dirty.iter() {
                w.store(0, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Switch dirty logging for every region.
    pub fn set_dirty_logging_all(&self, on: bool) -> Result<(), MemoryError> {
        for i in 0..self.regions.len() {
            self.set_dirty_logging(i, on)?;
        }
        Ok(())
    }

    pub fn dirty_logging(&self, region: usize) -> bool {
        self.regions
            .get(region)
            .is_some_and(|r| r.dirty_logging.load(Ordering::SeqCst))
    }

    /// Fetch and clear the dirty pages of every region: KVM's log OR the agent's own writes.
    /// Regions without dirty logging report all pages.
    pub fn take_dirty(&self) -> Result<DirtyBitmap, MemoryError> {
        let vm = match (&self.vm, self.own_log) {
            (Some(vm), _) => Some(vm),
            (None, true) => None,
            (None, false) => return Err(MemoryError::NoVm("the dirty log")),
        };
        let mut out = Vec::with_capacity(self.regions.len());
        for r in &self.regions {
            let mut bm = match (vm, r.dirty_logging.load(Ordering::SeqCst)) {
                (Some(vm), true) => {
                    let bits =
                        vm.get_dirty_log(r.slot, r.layout.size as usize)
                            .map_err(|source| MemoryError::DirtyLog {
                                slot: r.slot,
                                source,
                            })?;
                    RegionBitmap {
                        layout: r.layout,
                        bits,
                    }
                }
                // Not KVM's memory: the agent's write log below is all there is.
                (None, true) => RegionBitmap::empty(r.layout),
                (_, false) => RegionBitmap::full(r.layout),
            };
            for (w, a) in bm.bits.iter_mut().zip(r.agent_dirty.iter()) {
                *w |= a.swap(0, Ordering::AcqRel);
            }
            out.push(bm);
        }
        Ok(DirtyBitmap { regions: out })
    }

    /// Put pages back into the dirty set (e.g. after a failed send): they will be reported by the
    /// next [`GuestMemory::take_dirty`]. Dirty state is never dropped.
    pub fn mark_dirty(&self, bitmap: &DirtyBitmap) {
        for (r, b) in self.regions.iter().zip(&bitmap.regions) {
            for (a, w) in r.agent_dirty.iter().zip(&b.bits) {
                if *w != 0 {
                    a.fetch_or(*w, Ordering::AcqRel);
                }
            }
        }
    }

    /// Pages that have ever been touched (present or swapped out), from /proc/self/pagemap
    /// (anonymous memory) or from the memfd's data ranges (`SEEK_DATA`; memfd memory, whoever
    /// touched it). Pages never touched read as zero and need not be copied. Where this cannot
    /// be read, every page is reported.
    pub fn populated(&self) -> DirtyBitmap {
        let pagemap = if self.regions.iter().any(|r| r.memfd.is_none()) {
            std::fs::File::open("/proc/self/pagemap").ok()
        } else {
            None
        };
        let mut out = Vec::with_capacity(self.regions.len());
        for r in &self.regions {
            if let Some(fd) = &r.memfd {
                out.push(
                    memfd_data_pages(fd, r.layout).unwrap_or_else(|_| RegionBitmap::full(r.layout)),
                );
                continue;
            }
            let mut bm = RegionBitmap::empty(r.layout);
            let pages = r.layout.pages();
            let base = r.host.as_ptr() as u64 / PAGE_SIZE;
            let ok = pagemap.as_ref().is_some_and(|f| {
                use std::os::unix::fs::FileExt;
                const CHUNK: u64 = 4096;
                let mut buf = vec![0u8; (CHUNK * 8) as usize];
                let mut p = 0;
                while p < pages {
                    let n = CHUNK.min(pages - p);
                    let bytes = &mut buf[..(n * 8) as usize];
                    if f.read_exact_at(bytes, (base + p) * 8).is_err() {
                        return false;
                    }
                    for (k, e) in bytes.chunks_exact(8).enumerate() {
                        let v = u64::from_le_bytes(e.try_into().unwrap_or([0; 8]));
                        // bit 63: present, bit 62: swapped.
                        if v & (3 << 62) != 0 {
                            bm.set(p + k as u64);
                        }
                    }
                    p += n;
                }
                true
            });
            out.push(if ok { bm } else { RegionBitmap::full(r.layout) });
        }
        DirtyBitmap { regions: out }
    }

    fn find(&self, gpa: u64, len: u64) -> Result<(&Region, u64), MemoryError> {
        for r in &self.regions {
            if gpa >= r.layout.gpa
                && gpa
                    .checked_add(len)
                    .is_some_and(|end| end <= r.layout.end())
            {
                return Ok((r, gpa - r.layout.gpa));
            }
        }
        Err(MemoryError::OutOfRange { gpa, len })
    }

    fn mark_range(r: &Region, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = off / PAGE_SIZE;
        let last = (off + len - 1) / PAGE_SIZE;
        for p in first..=last {
            r.agent_dirty[(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::AcqRel);
        }
    }

    /// Copy bytes out of guest memory. The range must lie inside one region.
    ///
    /// Running vCPUs may write the same bytes meanwhile, so the copy is made of volatile reads
    /// (as vm-memory's `copy_from_volatile_slice`): a plain `copy_nonoverlapping` of memory
    /// another thread writes is a data race in Rust's memory model, which lets the compiler
    /// assume the bytes do not change under it. Racing writes then give some mix of old and new
    /// bytes, which callers accept (they pause the guest for exact copies; migration re-sends
    /// pages the dirty log reports). Aligned 8-byte volatile loads keep it fast (see
    /// docs/vm-runtime.md, "Memory and dirty tracking").
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let (r, off) = self.find(gpa, buf.len() as u64)?;
        // SAFETY: `find` checked that [off, off+len) lies inside the region's mapping, which
        // stays mapped while `self` lives; `buf` is a distinct host buffer.
        unsafe { volatile_copy_out(r.host.as_ptr().add(off as usize), buf) };
        Ok(())
    }

    /// Copy bytes into guest memory and mark the pages dirty. The range must lie inside one
    /// region. Volatile stores, for the same reason as [`GuestMemory::read`]: vCPUs may read or
    /// write these bytes meanwhile.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        let (r, off) = self.find(gpa, data.len() as u64)?;
        // SAFETY: bounds checked by `find`; `data` cannot overlap guest memory handed out by us
        // except through the `unsafe` views `region_slice` and `page_mut`, whose callers promise
        // no such aliasing.
        unsafe { volatile_copy_in(data, r.host.as_ptr().add(off as usize)) };
        Self::mark_range(r, off, data.len() as u64);
        Ok(())
    }

    /// A mutable view of one guest page, for decoding straight into guest memory. Marks it dirty.
    ///
    /// # Safety
    /// The vCPUs must not run, and no other reference to this page may exist while the returned
    /// one lives (an incoming migration gives each page to exactly one stream).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn page_mut(&self, gpa: u64) -> Result<&mut [u8; PAGE_SIZE as usize], MemoryError> {
        if !gpa.is_multiple_of(PAGE_SIZE) {
            return Err(MemoryError::OutOfRange {
                gpa,
                len: PAGE_SIZE,
            });
        }
        let (r, off) = self.find(gpa, PAGE_SIZE)?;
        Self::mark_range(r, off, PAGE_SIZE);
        // SAFETY: bounds and alignment checked above; exclusivity is the caller's promise.
        Ok(unsafe {
            &mut *r
                .host
                .as_ptr()
                .add(off as usize)
                .cast::<[u8; PAGE_SIZE as usize]>()
        })
    }

    /// Make a page-aligned range zero by giving its memory back to the host
    /// (`MADV_DONTNEED` on anonymous memory; a hole punched in the memfd, which every process
    /// mapping it sees): it reads as zero and is no longer populated. Marks it dirty.
    pub fn discard(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        if !gpa.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
            return Err(MemoryError::OutOfRange { gpa, len });
        }
        let (r, off) = self.find(gpa, len)?;
        let rc = match &r.memfd {
            // SAFETY: fallocate on our own memfd, inside its size (bounds checked by `find`);
            // PUNCH_HOLE|KEEP_SIZE frees the range, which then reads as zero everywhere.
            Some(fd) => unsafe {
                libc::fallocate(
                    fd.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    off as libc::off_t,
                    len as libc::off_t,
                )
            },
            // SAFETY: the range was bounds-checked by `find` and is page-aligned; MADV_DONTNEED
            // on a private anonymous mapping only replaces its pages with zero-fill-on-demand
            // ones.
            None => unsafe {
                libc::madvise(
                    r.host.as_ptr().add(off as usize).cast(),
                    len as usize,
                    libc::MADV_DONTNEED,
                )
            },
        };
        if rc != 0 {
            // Fall back to writing zeros.
            let zeros = vec![0u8; len as usize];
            return self.write(gpa, &zeros);
        }
        Self::mark_range(r, off, len);
        Ok(())
    }

    pub fn read_u64(&self, gpa: u64) -> Result<u64, MemoryError> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    pub fn write_u64(&self, gpa: u64, v: u64) -> Result<(), MemoryError> {
        self.write(gpa, &v.to_le_bytes())
    }

    /// A view of a whole region's bytes.
    ///
    /// # Safety
    /// The caller must make sure nothing writes the region while the slice lives: the vCPUs are
    /// paused and the agent does not call [`GuestMemory::write`] on it.
    pub unsafe fn region_slice(&self, region: usize) -> Result<&[u8], MemoryError> {
        let r = self
            .regions
            .get(region)
            .ok_or(MemoryError::NoRegion(region))?;
        // SAFETY: the mapping is live for `self`'s lifetime and exactly `size` bytes long; the
        // absence of writers is the caller's promise (see `# Safety`).
        Ok(unsafe { std::slice::from_raw_parts(r.host.as_ptr(), r.layout.size as usize) })
    }
}

impl Region {
    fn new(layout: RegionLayout, slot: u32, host: NonNull<u8>, memfd: Option<OwnedFd>) -> Region {
        let words = layout.pages().div_ceil(64) as usize;
        Region {
            layout,
            slot,
            host,
            memfd,
            dirty_logging: AtomicBool::new(false),
            agent_dirty: (0..words).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

fn check_layout(layout: &[RegionLayout]) -> Result<(), MemoryError> {
    for l in layout {
        if l.size == 0
            || !l.size.is_multiple_of(PAGE_SIZE)
            || !l.gpa.is_multiple_of(PAGE_SIZE)
            || l.gpa
                .checked_add(l.size)
                .is_none_or(|end| end > super::x86::MAX_MAPPED)
        {
            return Err(MemoryError::BadSize(l.size));
        }
    }
    Ok(())
}

fn map_anonymous(size: u64) -> Result<NonNull<u8>, MemoryError> {
    // SAFETY: a fresh private anonymous mapping; no existing memory is affected. The result is
    // checked against MAP_FAILED below.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    mapped(ptr, size)
}

fn mapped(ptr: *mut libc::c_void, size: u64) -> Result<NonNull<u8>, MemoryError> {
    if ptr == libc::MAP_FAILED {
        return Err(MemoryError::Mmap {
            size,
            source: std::io::Error::last_os_error(),
        });
    }
    NonNull::new(ptr.cast::<u8>()).ok_or(MemoryError::Mmap {
        size,
        source: std::io::Error::other("mmap returned null"),
    })
}

/// Whether a buffer is all zero bytes, scanning 64 bytes at a time with an OR-fold.
pub fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(64);
    for c in &mut chunks {
        let mut acc = 0u64;
        for w in c.chunks_exact(8) {
            acc |= u64::from_ne_bytes(w.try_into().unwrap_or([0; 8]));
        }
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests;
