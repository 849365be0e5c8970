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

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

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

/// Dirty pages of one region, one bit per page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionBitmap {
    pub layout: RegionLayout,
    pub bits: Vec<u64>,
}

impl RegionBitmap {
    pub fn empty(layout: RegionLayout) -> Self {
        RegionBitmap {
            layout,
            bits: vec![0; layout.pages().div_ceil(64) as usize],
        }
    }
    pub fn full(layout: RegionLayout) -> Self {
        let mut b = Self::empty(layout);
        for p in 0..layout.pages() {
            b.set(p);
        }
        b
    }
    pub fn set(&mut self, page: u64) {
        self.bits[(page / 64) as usize] |= 1 << (page % 64);
    }
    pub fn get(&self, page: u64) -> bool {
        self.bits[(page / 64) as usize] & (1 << (page % 64)) != 0
    }
    pub fn count(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }
    /// Dirty page indices (relative to the region), ascending.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.bits.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros() as u64;
                w &= w - 1;
                Some(i as u64 * 64 + b)
            })
        })
    }
}

/// Dirty pages of the whole guest, as returned by [`GuestMemory::take_dirty`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    pub regions: Vec<RegionBitmap>,
}

impl DirtyBitmap {
    pub fn count(&self) -> u64 {
        self.regions.iter().map(RegionBitmap::count).sum()
    }
    /// Guest-physical addresses of the dirty pages, ascending.
    pub fn iter_gpa(&self) -> impl Iterator<Item = u64> + '_ {
        self.regions
            .iter()
            .flat_map(|r| r.iter().map(move |p| r.layout.gpa + p * PAGE_SIZE))
    }
    /// Whether the page at `gpa` is marked.
    pub fn contains(&self, gpa: u64) -> bool {
        self.regions.iter().any(|r| {
            gpa >= r.layout.gpa && gpa < r.layout.end() && r.get((gpa - r.layout.gpa) / PAGE_SIZE)
        })
    }
    /// OR another bitmap of the same layout into this one.
    pub fn merge(&mut self, other: &DirtyBitmap) {
        for (a, b) in self.regions.iter_mut().zip(&other.regions) {
            for (x, y) in a.bits.iter_mut().zip(&b.bits) {
                *x |= *y;
            }
        }
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

fn map_memfd(fd: &OwnedFd, size: u64) -> Result<NonNull<u8>, MemoryError> {
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

/// A memfd of `size` bytes, sealed so that nobody (this process or one it is passed to) can
/// shrink or grow it, nor change the seals.
fn create_memfd(slot: usize, size: u64) -> Result<OwnedFd, MemoryError> {
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
fn check_memfd(fd: &OwnedFd, size: u64) -> Result<(), MemoryError> {
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
fn memfd_data_pages(fd: &OwnedFd, layout: RegionLayout) -> std::io::Result<RegionBitmap> {
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
mod tests {
    use super::*;

    #[test]
    fn layout_splits_above_3g() {
        assert_eq!(standard_layout(1 << 30).unwrap().len(), 1);
        let l = standard_layout(4 << 30).unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(l[1].gpa, 4 << 30);
        assert_eq!(l[0].size + l[1].size, 4 << 30);
        assert!(standard_layout(0).is_err());
        assert!(standard_layout(3 << 20).is_err());
    }

    #[test]
    fn bitmap_iter_and_merge() {
        let l = RegionLayout {
            gpa: 0x1000_0000,
            size: 200 * PAGE_SIZE,
        };
        let mut a = RegionBitmap::empty(l);
        a.set(0);
        a.set(63);
        a.set(64);
        a.set(199);
        assert_eq!(a.iter().collect::<Vec<_>>(), vec![0, 63, 64, 199]);
        let mut d = DirtyBitmap {
            regions: vec![a.clone()],
        };
        let mut b = RegionBitmap::empty(l);
        b.set(5);
        d.merge(&DirtyBitmap { regions: vec![b] });
        assert_eq!(d.count(), 5);
        assert!(d.contains(0x1000_0000 + 5 * PAGE_SIZE));
        assert!(!d.contains(0x1000_0000 + 6 * PAGE_SIZE));
        assert_eq!(RegionBitmap::full(l).count(), 200);
    }

    /// Two views of the same memfds, as the VMM and the agent have them.
    fn shared_pair(layout: &[RegionLayout]) -> (GuestMemory, GuestMemory) {
        let fds: Vec<OwnedFd> = layout
            .iter()
            .enumerate()
            .map(|(i, l)| create_memfd(i, l.size).unwrap())
            .collect();
        let dups: Vec<OwnedFd> = fds.iter().map(|f| f.try_clone().unwrap()).collect();
        (
            GuestMemory::map_shared(layout, fds).unwrap(),
            GuestMemory::map_shared(layout, dups).unwrap(),
        )
    }

    #[test]
    fn memfd_memory_is_shared_between_mappings() {
        let layout = [
            RegionLayout {
                gpa: 0,
                size: 64 * PAGE_SIZE,
            },
            RegionLayout {
                gpa: 1 << 30,
                size: 32 * PAGE_SIZE,
            },
        ];
        let (a, b) = shared_pair(&layout);
        assert_eq!(a.backing(), Backing::Memfd);
        assert_eq!(a.memfds().unwrap().len(), 2);
        assert!(!a.has_vm());
        assert_eq!(a.populated().count(), 0, "nothing touched yet");
        a.write_u64(5 * PAGE_SIZE + 8, 0xfeed).unwrap();
        a.write_u64((1 << 30) + 3 * PAGE_SIZE, 7).unwrap();
        assert_eq!(b.read_u64(5 * PAGE_SIZE + 8).unwrap(), 0xfeed);
        assert_eq!(b.read_u64((1 << 30) + 3 * PAGE_SIZE).unwrap(), 7);
        // Populated is what the memfd holds, whichever mapping wrote it.
        let p = b.populated();
        assert_eq!(p.count(), 2);
        assert!(p.contains(5 * PAGE_SIZE) && p.contains((1 << 30) + 3 * PAGE_SIZE));
        // Discard punches a hole: both views read zero and it is no longer populated.
        b.discard(5 * PAGE_SIZE, PAGE_SIZE).unwrap();
        assert_eq!(a.populated().count(), 1);
        assert_eq!(a.read_u64(5 * PAGE_SIZE + 8).unwrap(), 0);
        // (Reading a hole through a shared mapping allocates it again: readers of a memfd
        // guest skip what `populated` does not list.)
        assert_eq!(a.populated().count(), 2);
        // No KVM behind a shared view: dirty logging is the VMM's business.
        assert!(matches!(a.take_dirty(), Err(MemoryError::NoVm(_))));
        assert!(matches!(
            a.set_dirty_logging(0, true),
            Err(MemoryError::NoVm(_))
        ));
    }

    #[test]
    fn map_shared_refuses_what_could_hurt_the_mapper() {
        let l = [RegionLayout {
            gpa: 0,
            size: 16 * PAGE_SIZE,
        }];
        // Wrong count.
        assert!(GuestMemory::map_shared(&l, vec![]).is_err());
        // Wrong size.
        let small = create_memfd(0, 8 * PAGE_SIZE).unwrap();
        assert!(matches!(
            GuestMemory::map_shared(&l, vec![small]),
            Err(MemoryError::Shared(_))
        ));
        // Not sealed: its owner could shrink it under us.
        // SAFETY: memfd_create with a constant name; the result is checked and owned.
        let raw = unsafe { libc::memfd_create(c"unsealed".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: a fresh descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on our own memfd.
        let rc = unsafe { libc::ftruncate(fd.as_raw_fd(), (16 * PAGE_SIZE) as i64) };
        assert_eq!(rc, 0);
        let e = GuestMemory::map_shared(&l, vec![fd]).unwrap_err();
        assert!(e.to_string().contains("not sealed"), "{e}");
        // Not a memfd at all.
        let f = std::fs::File::open("/dev/null").unwrap();
        assert!(GuestMemory::map_shared(&l, vec![OwnedFd::from(f)]).is_err());
        // The seals hold: the memfd cannot shrink.
        let sealed = create_memfd(0, 16 * PAGE_SIZE).unwrap();
        // SAFETY: ftruncate on our own memfd (refused by the seal).
        assert_ne!(unsafe { libc::ftruncate(sealed.as_raw_fd(), 0) }, 0);
    }

    #[test]
    fn zero_scan() {
        let mut p = vec![0u8; 4096];
        assert!(is_zero(&p));
        p[4095] = 1;
        assert!(!is_zero(&p));
        p[4095] = 0;
        p[70] = 1;
        assert!(!is_zero(&p));
        assert!(is_zero(&[0u8; 3]));
    }
}

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
