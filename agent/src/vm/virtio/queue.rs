//! A split virtqueue (virtio 1.x, section 2.7) over [`DeviceMemory`]: the device side only.
//!
//! Every access to the rings and buffers is a bounds-checked copy through `DeviceMemory`; the
//! device never holds a pointer into guest memory, so nothing dangles across a pause or a
//! migration. A malformed chain (a loop, an index past the table, an indirect descriptor, which
//! this device does not offer) is reported as [`ChainError`] and never panics.

use std::sync::atomic::{fence, Ordering};

use serde::{Deserialize, Serialize};

use super::DeviceMemory;

/// Largest queue the devices offer (QueueNumMax).
pub const QUEUE_MAX: u16 = 256;
/// Largest total buffer length of one chain the devices accept (bounds host allocations).
pub const MAX_CHAIN_BYTES: u64 = 4 << 20;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;

/// VRING_AVAIL_F_NO_INTERRUPT: the driver asks not to be interrupted for used buffers.
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Whether the device sends a used-buffer notification, given the avail ring's flags.
/// VIRTIO_F_EVENT_IDX is not offered, so this is virtio 1.x section 2.7.7.2 without it: the
/// device must notify when flags is 0 and should not when VRING_AVAIL_F_NO_INTERRUPT is set
/// (other bits are reserved and ignored).
pub fn should_interrupt(avail_flags: u16) -> bool {
    avail_flags & AVAIL_F_NO_INTERRUPT == 0
}

/// What the guest set up for one queue, and the device's position in it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    pub size: u16,
    pub ready: bool,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// Next avail ring entry the device will take.
    pub next_avail: u16,
    /// Next used ring entry the device will fill (= used.idx as published).
    pub next_used: u16,
}

/// One buffer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

/// A descriptor chain taken from the avail ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub head: u16,
    pub descs: Vec<Desc>,
}

/// Why a chain could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("descriptor index {0} is outside the queue")]
    Index(u16),
    #[error("descriptor chain loops or is longer than the queue")]
    Loop,
    #[error("indirect descriptors were not negotiated")]
    Indirect,
    #[error("chain is larger than {MAX_CHAIN_BYTES} bytes")]
    TooLarge,
    #[error("guest memory: {0}")]
    Memory(String),
}

impl Chain {
    pub fn readable(&self) -> impl Iterator<Item = &Desc> {
        self.descs.iter().filter(|d| !d.write)
    }
    pub fn writable(&self) -> impl Iterator<Item = &Desc> {
        self.descs.iter().filter(|d| d.write)
    }
    pub fn writable_len(&self) -> u64 {
        self.writable().map(|d| u64::from(d.len)).sum()
    }
    /// All device-readable bytes, in order.
    pub fn read_all(&self, mem: &dyn DeviceMemory) -> Result<Vec<u8>, ChainError> {
        let total: u64 = self.readable().map(|d| u64::from(d.len)).sum();
        if total > MAX_CHAIN_BYTES {
            return Err(ChainError::TooLarge);
        }
        let mut out = vec![0u8; total as usize];
        let mut at = 0usize;
        for d in self.readable() {
            let n = d.len as usize;
            mem.read(d.addr, &mut out[at..at + n])
                .map_err(|e| ChainError::Memory(e.to_string()))?;
            at += n;
        }
        Ok(out)
    }
    /// Write `data` into the device-writable buffers starting `offset` bytes in; returns how
    /// many bytes fit.
    pub fn write_at(
        &self,
        mem: &dyn DeviceMemory,
        mut offset: u64,
        mut data: &[u8],
    ) -> Result<usize, ChainError> {
        let mut done = 0;
        for d in self.writable() {
            if data.is_empty() {
                break;
            }
            let len = u64::from(d.len);
            if offset >= len {
                offset -= len;
                continue;
            }
            let n = ((len - offset) as usize).min(data.len());
            mem.write(d.addr + offset, &data[..n])
                .map_err(|e| ChainError::Memory(e.to_string()))?;
            offset = 0;
            data = &data[n..];
            done += n;
        }
        Ok(done)
    }
}

impl QueueState {
    /// Whether the driver finished setting the queue up.
    pub fn usable(&self) -> bool {
        self.ready && self.size > 0
    }

    fn read_u16(mem: &dyn DeviceMemory, gpa: u64) -> Result<u16, ChainError> {
        let mut b = [0u8; 2];
        mem.read(gpa, &mut b)
            .map_err(|e| ChainError::Memory(e.to_string()))?;
        Ok(u16::from_le_bytes(b))
    }

    /// avail.idx as the driver last published it.
    pub fn avail_idx(&self, mem: &dyn DeviceMemory) -> Result<u16, ChainError> {
        let idx = Self::read_u16(mem, self.avail + 2)?;
        // Read the ring entries only after the index (the driver wrote them before it).
        fence(Ordering::Acquire);
        Ok(idx)
    }

    /// Whether the driver made chains available that the device has not taken.
    pub fn has_avail(&self, mem: &dyn DeviceMemory) -> Result<bool, ChainError> {
        Ok(self.usable() && self.avail_idx(mem)? != self.next_avail)
    }

    /// Take the next available chain, if any.
    pub fn pop(&mut self, mem: &dyn DeviceMemory) -> Result<Option<Chain>, ChainError> {
        if !self.usable() {
            return Ok(None);
        }
        if self.avail_idx(mem)? == self.next_avail {
            return Ok(None);
        }
        let slot = u64::from(self.next_avail % self.size);
        let head = Self::read_u16(mem, self.avail + 4 + 2 * slot)?;
        self.next_avail = self.next_avail.wrapping_add(1);
        let descs = self.walk(mem, head)?;
        Ok(Some(Chain { head, descs }))
    }

    fn walk(&self, mem: &dyn DeviceMemory, head: u16) -> Result<Vec<Desc>, ChainError> {
        let mut out = Vec::new();
        let mut i = head;
        let mut total = 0u64;
        loop {
            if i >= self.size {
                return Err(ChainError::Index(i));
            }
            if out.len() >= usize::from(self.size) {
                return Err(ChainError::Loop);
            }
            let mut raw = [0u8; 16];
            mem.read(self.desc + 16 * u64::from(i), &mut raw)
                .map_err(|e| ChainError::Memory(e.to_string()))?;
            let addr = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
            let len = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default());
            let flags = u16::from_le_bytes([raw[12], raw[13]]);
            let next = u16::from_le_bytes([raw[14], raw[15]]);
            if flags & DESC_F_INDIRECT != 0 {
                return Err(ChainError::Indirect);
            }
            total += u64::from(len);
            if total > MAX_CHAIN_BYTES {
                return Err(ChainError::TooLarge);
            }
            out.push(Desc {
                addr,
                len,
                write: flags & DESC_F_WRITE != 0,
            });
            if flags & DESC_F_NEXT == 0 {
                return Ok(out);
            }
            i = next;
        }
    }

    /// Return chain `head` to the driver with `len` bytes written, and publish used.idx.
    pub fn add_used(
        &mut self,
        mem: &dyn DeviceMemory,
        head: u16,
        len: u32,
    ) -> Result<(), ChainError> {
        if self.size == 0 {
            return Ok(());
        }
        let slot = u64::from(self.next_used % self.size);
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write(self.used + 4 + 8 * slot, &elem)
            .map_err(|e| ChainError::Memory(e.to_string()))?;
        self.next_used = self.next_used.wrapping_add(1);
        // The element must be visible before the index that publishes it.
        fence(Ordering::Release);
        mem.write(self.used + 2, &self.next_used.to_le_bytes())
            .map_err(|e| ChainError::Memory(e.to_string()))?;
        Ok(())
    }

    /// After [`QueueState::add_used`]: whether the driver wants an interrupt for it (the avail
    /// ring's flags, see [`should_interrupt`]). Unreadable flags count as "wants one": a
    /// spurious interrupt is harmless, a missing one hangs a driver.
    pub fn needs_interrupt(&self, mem: &dyn DeviceMemory) -> bool {
        if !self.usable() {
            return false;
        }
        // The used index store must be visible before the flags are read (a driver that
        // clears NO_INTERRUPT then re-checks used.idx must not miss both; spec 2.7.7.2).
        fence(Ordering::SeqCst);
        Self::read_u16(mem, self.avail).map_or(true, should_interrupt)
    }
}

#[cfg(test)]
pub(crate) mod driver {
    //! A test driver: lays out a split queue in fake memory and posts chains, as a guest would.
    use super::super::fake::FakeMem;
    use super::*;

    pub struct TestQueue {
        pub size: u16,
        pub desc: u64,
        pub avail: u64,
        pub used: u64,
        pub next_desc: u16,
        pub avail_idx: u16,
        pub used_seen: u16,
    }

    impl TestQueue {
        /// Queue structures at `base` (needs 16*size + 6+2*size + 6+8*size bytes).
        pub fn new(base: u64, size: u16) -> TestQueue {
            let desc = base;
            let avail = desc + 16 * u64::from(size);
            let used = (avail + 6 + 2 * u64::from(size)).next_multiple_of(4);
            TestQueue {
                size,
                desc,
                avail,
                used,
                next_desc: 0,
                avail_idx: 0,
                used_seen: 0,
            }
        }

        /// Post a chain of (addr, len, device-writable) buffers; returns its head.
        pub fn post(&mut self, mem: &FakeMem, bufs: &[(u64, u32, bool)]) -> u16 {
            let head = self.next_desc;
            for (k, &(addr, len, w)) in bufs.iter().enumerate() {
                let i = (self.next_desc + k as u16) % self.size;
                let mut raw = [0u8; 16];
                raw[..8].copy_from_slice(&addr.to_le_bytes());
                raw[8..12].copy_from_slice(&len.to_le_bytes());
                let mut flags = if w { DESC_F_WRITE } else { 0 };
                if k + 1 < bufs.len() {
                    flags |= DESC_F_NEXT;
                }
                raw[12..14].copy_from_slice(&flags.to_le_bytes());
                raw[14..16].copy_from_slice(&((i + 1) % self.size).to_le_bytes());
                mem.guest_write(self.desc + 16 * u64::from(i), &raw);
            }
            self.next_desc = (self.next_desc + bufs.len() as u16) % self.size;
            let slot = u64::from(self.avail_idx % self.size);
            mem.guest_write(self.avail + 4 + 2 * slot, &head.to_le_bytes());
            self.avail_idx = self.avail_idx.wrapping_add(1);
            mem.guest_write(self.avail + 2, &self.avail_idx.to_le_bytes());
            head
        }

        /// Set the avail ring's flags (VRING_AVAIL_F_NO_INTERRUPT is bit 0).
        pub fn set_avail_flags(&self, mem: &FakeMem, flags: u16) {
            mem.guest_write(self.avail, &flags.to_le_bytes());
        }

        /// Used elements the device returned since the last call: (head, len).
        pub fn take_used(&mut self, mem: &FakeMem) -> Vec<(u16, u32)> {
            let idx = u16::from_le_bytes(mem.guest_read(self.used + 2, 2).try_into().unwrap());
            let mut out = Vec::new();
            while self.used_seen != idx {
                let slot = u64::from(self.used_seen % self.size);
                let e = mem.guest_read(self.used + 4 + 8 * slot, 8);
                out.push((
                    u16::from_le_bytes([e[0], e[1]]),
                    u32::from_le_bytes(e[4..8].try_into().unwrap()),
                ));
                self.used_seen = self.used_seen.wrapping_add(1);
            }
            out
        }

        pub fn state(&self) -> QueueState {
            QueueState {
                size: self.size,
                ready: true,
                desc: self.desc,
                avail: self.avail,
                used: self.used,
                next_avail: 0,
                next_used: 0,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake::FakeMem;
    use super::driver::TestQueue;
    use super::*;

    #[test]
    fn pop_and_use_a_chain_marks_the_used_ring_dirty() {
        let mem = FakeMem::new(1 << 20);
        let mut d = TestQueue::new(0x1000, 8);
        let mut q = d.state();
        assert_eq!(q.pop(mem.as_ref()).unwrap(), None);
        d.post(&mem, &[(0x10000, 100, false), (0x20000, 50, true)]);
        let before = mem.snapshot();
        let c = q.pop(mem.as_ref()).unwrap().unwrap();
        assert_eq!(c.descs.len(), 2);
        assert_eq!(c.writable_len(), 50);
        assert_eq!(c.write_at(mem.as_ref(), 10, &[7u8; 60]).unwrap(), 40);
        q.add_used(mem.as_ref(), c.head, 50).unwrap();
        assert_eq!(d.take_used(&mem), vec![(c.head, 50)]);
        mem.assert_changes_dirty(&before);
        assert!(mem.dirty.lock().unwrap().contains(&(d.used / 4096)));
        assert_eq!(mem.guest_read(0x20000 + 10, 40), vec![7u8; 40]);
    }

    #[test]
    fn no_interrupt_flag_suppresses_used_buffer_notifications() {
        // The decision alone: only bit 0 matters (without VIRTIO_F_EVENT_IDX).
        assert!(should_interrupt(0));
        assert!(!should_interrupt(AVAIL_F_NO_INTERRUPT));
        assert!(!should_interrupt(0xffff));
        assert!(should_interrupt(0xfffe));
        // Read from the ring as the driver set it.
        let mem = FakeMem::new(1 << 20);
        let d = TestQueue::new(0x1000, 8);
        let q = d.state();
        assert!(q.needs_interrupt(mem.as_ref()));
        d.set_avail_flags(&mem, AVAIL_F_NO_INTERRUPT);
        assert!(!q.needs_interrupt(mem.as_ref()));
        d.set_avail_flags(&mem, 0);
        assert!(q.needs_interrupt(mem.as_ref()));
        // A queue the driver has not made ready never interrupts; one whose ring lies outside
        // guest memory does (a spurious interrupt rather than a lost one).
        assert!(!QueueState::default().needs_interrupt(mem.as_ref()));
        let far = QueueState {
            avail: 1 << 40,
            ..q
        };
        assert!(far.needs_interrupt(mem.as_ref()));
    }

    #[test]
    fn malformed_chains_are_errors() {
        let mem = FakeMem::new(1 << 20);
        let mut d = TestQueue::new(0x1000, 4);
        let mut q = d.state();
        // A chain that loops: 4 descriptors, the last pointing back to the first.
        d.post(
            &mem,
            &[
                (0x10000, 1, false),
                (0x10000, 1, false),
                (0x10000, 1, false),
                (0x10000, 1, false),
            ],
        );
        let mut raw = mem.guest_read(d.desc + 48, 16);
        raw[12] |= DESC_F_NEXT as u8;
        raw[14] = 0;
        mem.guest_write(d.desc + 48, &raw);
        assert_eq!(q.pop(mem.as_ref()), Err(ChainError::Loop));
        // A head past the table.
        d.post(&mem, &[(0x10000, 1, false)]);
        mem.guest_write(d.avail + 4 + 2, &9u16.to_le_bytes());
        assert_eq!(q.pop(mem.as_ref()), Err(ChainError::Index(9)));
        // A buffer outside memory reads as an error.
        d.post(&mem, &[(u64::MAX - 4, 64, false)]);
        let c = q.pop(mem.as_ref()).unwrap().unwrap();
        assert!(matches!(
            c.read_all(mem.as_ref()),
            Err(ChainError::Memory(_))
        ));
    }
}
