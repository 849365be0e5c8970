//! virtio devices over virtio-mmio (version 2, "modern"): a network card backed by a tap on the
//! NIC's port group bridge and a block device backed by the disk image on its datastore.
//!
//! ```text
//!  vCPU thread ── MMIO exit ──> Devices::mmio_* ──> VirtioDevices (by window)
//!                                                    ├ NetDevice  mmio.rs + queue.rs + net.rs
//!                                                    │   TX on QueueNotify (vCPU thread)
//!                                                    │   RX thread: tap -> queued frames -> RX ring
//!                                                    └ BlkDevice  mmio.rs + queue.rs + blk.rs
//!                                                        worker thread: requests -> image file
//! ```
//!
//! Windows: `ferry_guest_abi::MMIO_BASE + slot * MMIO_STRIDE`, slot 0 the first NIC, slot 1 the
//! first disk (the service guest's ABI), further NICs and disks in the slots after (2, 3, ...,
//! alternating). A Linux guest finds them with `virtio_mmio.device=4K@0xd0000000:IRQ`.
//!
//! Every byte a device writes into guest memory goes through [`DeviceMemory::write`], which for
//! [`GuestMemory`] marks the pages in the agent's own dirty log: received frames, block read data,
//! status bytes and used rings are dirty pages for migration like the guest's own writes.
//!
//! Interrupts: each slot has a line, GSI `IRQ_BASE + slot` (5 for slot 0, 6 for slot 1, ...),
//! an [`Irq`]: an eventfd the VM registers with KVM as an irqfd for that GSI (KVM's default
//! routing sends GSIs 0-15 to the 8259 pin and the IOAPIC pin of that number, 16-23 to the
//! IOAPIC). A device sets InterruptStatus bit 0 after it adds to a used ring, as before, and
//! then signals the eventfd unless the driver set VRING_AVAIL_F_NO_INTERRUPT on that queue
//! ([`queue::should_interrupt`]); InterruptACK clears the bits. An irqfd injects a pulse, so
//! the line is edge-triggered (as Firecracker does it for virtio-mmio): the guest must take
//! the pins as edge-triggered, which is Linux's default for ISA IRQs 0-15 given no ACPI or MP
//! table entry. A line that is asserted (InterruptStatus not 0) is pulsed again when the
//! devices are activated after a pause or a restore: KVM injects an irqfd pulse for an
//! IOAPIC/8259 route from a work queue, so one sent just before the capture may be missing
//! from the saved irqchip state. The CPL3 service guest runs with RFLAGS.IF = 0, so a pending
//! interrupt is never delivered to it (it has no IDT and would triple-fault otherwise).
//!
//! Device state ([`VirtioState`]) is plain data in the VM's versioned state: negotiated features,
//! queue addresses and indices, interrupt status, and frames queued for the guest.

pub mod blk;
pub mod mmio;
pub mod net;
pub mod queue;
pub mod tap;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::memory::{GuestMemory, MemoryError};

pub use ferry_guest_abi::{MMIO_BASE, MMIO_STRIDE};

/// Errors of the virtio devices.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    #[error("cannot open /dev/net/tun: {0}; run as root with the tun module loaded")]
    TunOpen(#[source] std::io::Error),
    #[error("cannot create tap {name}: {source}; is another VM using this name on this host?")]
    TapCreate {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot attach tap {tap} to bridge {bridge}: {source}; check that [port_groups] names an existing bridge")]
    Bridge {
        tap: String,
        bridge: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot configure tap {tap}: {what}: {source}")]
    TapConfig {
        tap: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open disk image {path}: {source}")]
    DiskOpen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk image {path} is {len} bytes, not a positive multiple of 512")]
    DiskSize { path: PathBuf, len: u64 },
    #[error("cannot start the {what} thread: {source}")]
    Thread {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the interrupt eventfd for GSI {gsi}: {source}")]
    IrqFd {
        gsi: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("{nics} NICs and {disks} disks need virtio-mmio slots up to {slot}, whose GSI {gsi} is past the IOAPIC's last pin {IRQ_MAX}; give the VM fewer devices")]
    TooManyDevices {
        nics: usize,
        disks: usize,
        slot: u64,
        gsi: u64,
    },
    #[error("the saved device state does not fit this VM: {0}")]
    Mismatch(String),
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

/// Guest memory as a device sees it: checked copies in and out; writes are dirty-tracked.
pub trait DeviceMemory: Send + Sync {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError>;
    /// Copy into guest memory and mark the pages dirty (Ferry's own-writes log).
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError>;
}

impl DeviceMemory for GuestMemory {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        GuestMemory::read(self, gpa, buf)
    }
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        GuestMemory::write(self, gpa, data)
    }
}

/// GSI of virtio-mmio slot 0; slot `i` has GSI `IRQ_BASE + i`.
pub const IRQ_BASE: u32 = 5;
/// The last GSI with an interrupt controller pin (IOAPIC pin 23).
pub const IRQ_MAX: u32 = 23;

/// GSI of virtio-mmio slot `slot`.
pub fn slot_gsi(slot: u64) -> u64 {
    u64::from(IRQ_BASE) + slot
}

/// The interrupt line of one virtio-mmio slot: an eventfd that KVM, once the VM registered it
/// as an irqfd, turns into a pulse on GSI [`Irq::gsi`].
pub struct Irq {
    gsi: u32,
    /// None: a device without a line (unit tests).
    fd: Option<EventFd>,
    raised: AtomicU64,
}

impl std::fmt::Debug for Irq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Irq")
            .field("gsi", &self.gsi)
            .field("raised", &self.raised())
            .finish()
    }
}

impl Irq {
    /// A line for `gsi` with a fresh eventfd (registered by the VM, see [`VirtioDevices::irqfds`]).
    pub fn new(gsi: u32) -> Result<Irq, VirtioError> {
        let fd = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(|source| VirtioError::IrqFd { gsi, source })?;
        Ok(Irq {
            gsi,
            fd: Some(fd),
            raised: AtomicU64::new(0),
        })
    }

    /// A line connected to nothing (devices in unit tests); it still counts.
    pub fn detached(gsi: u32) -> Irq {
        Irq {
            gsi,
            fd: None,
            raised: AtomicU64::new(0),
        }
    }

    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    pub fn eventfd(&self) -> Option<&EventFd> {
        self.fd.as_ref()
    }

    /// Signal the line (one pulse on the GSI).
    pub fn raise(&self) {
        self.raised.fetch_add(1, Ordering::Relaxed);
        if let Some(fd) = &self.fd {
            // Only fails when the counter would overflow (2^64 - 2 pending signals), in which
            // case an interrupt is already pending: nothing is lost.
            let _ = fd.write(1);
        }
    }

    /// How many times the line was signalled.
    pub fn raised(&self) -> u64 {
        self.raised.load(Ordering::Relaxed)
    }
}

/// Wakes the guest's vCPUs from a yield when a device completed work for them.
#[derive(Default)]
pub struct Waker(OnceLock<Box<dyn Fn() + Send + Sync>>);

impl Waker {
    pub fn set(&self, f: Box<dyn Fn() + Send + Sync>) {
        let _ = self.0.set(f);
    }
    pub fn wake(&self) {
        if let Some(f) = self.0.get() {
            f();
        }
    }
}

impl std::fmt::Debug for Waker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Waker")
    }
}

/// Where a VM's devices attach on this host (resolved by the agent from its configuration; a
/// `ferry vmm` gets it in its launch file).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeviceEnv {
    /// Per NIC of the spec, the bridge (or interface) of its port group; None: a NIC with no
    /// backend (frames it sends are dropped; nothing arrives).
    pub bridges: Vec<Option<String>>,
    /// Per disk of the spec, the image file; None: every request fails with IOERR.
    pub disks: Vec<Option<PathBuf>>,
}

/// State of all virtio devices of a VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioState {
    pub net: Vec<net::NetState>,
    pub blk: Vec<blk::BlkState>,
}

impl VirtioState {
    /// Bytes of device state (what the migration summary reports).
    pub fn size(&self) -> usize {
        postcard::to_allocvec(self).map_or(0, |v| v.len())
    }
}

/// What the pause did to the devices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quiesced {
    /// Block requests that were in flight when the vCPUs stopped and were completed to the
    /// image before the state could be captured.
    pub io_drained: u64,
    /// Frames queued for the guest (they travel with the state).
    pub rx_queued: u64,
    /// Disks whose requests did not complete within the drain timeout: the state must not
    /// be moved to another host (a migration fails and the guest resumes here).
    #[serde(default)]
    pub io_stuck: u64,
}

/// Slot of NIC `i` and of disk `i`.
pub fn net_slot(i: usize) -> u64 {
    if i == 0 {
        ferry_guest_abi::NET_SLOT
    } else {
        2 * i as u64
    }
}
pub fn blk_slot(i: usize) -> u64 {
    if i == 0 {
        ferry_guest_abi::BLK_SLOT
    } else {
        2 * i as u64 + 1
    }
}

/// All virtio devices of one VM.
#[derive(Debug, Default)]
pub struct VirtioDevices {
    pub net: Vec<Arc<net::NetDevice>>,
    pub blk: Vec<Arc<blk::BlkDevice>>,
}

impl VirtioDevices {
    /// Build the devices of `spec` (NICs and disks) with the host backends of `env`.
    pub fn new(
        vm_name: &str,
        nics: &[[u8; 6]],
        disks: usize,
        env: &DeviceEnv,
        mem: Arc<dyn DeviceMemory>,
        waker: Arc<Waker>,
    ) -> Result<VirtioDevices, VirtioError> {
        let last_slot = (0..nics.len())
            .map(net_slot)
            .chain((0..disks).map(blk_slot))
            .max()
            .unwrap_or(0);
        if slot_gsi(last_slot) > u64::from(IRQ_MAX) {
            return Err(VirtioError::TooManyDevices {
                nics: nics.len(),
                disks,
                slot: last_slot,
                gsi: slot_gsi(last_slot),
            });
        }
        // In range: checked just above.
        let irq = |slot: u64| Irq::new(slot_gsi(slot) as u32);
        let mut out = VirtioDevices::default();
        for (i, mac) in nics.iter().enumerate() {
            let bridge = env.bridges.get(i).cloned().flatten();
            let tap = match bridge {
                Some(b) => Some(tap::Tap::create(&tap::tap_name(vm_name, i), &b, mac)?),
                None => None,
            };
            out.net.push(net::NetDevice::new(
                vm_name,
                *mac,
                tap,
                mem.clone(),
                waker.clone(),
                irq(net_slot(i))?,
            )?);
        }
        for i in 0..disks {
            let path = env.disks.get(i).cloned().flatten();
            out.blk.push(blk::BlkDevice::new(
                vm_name,
                i,
                path.as_deref(),
                mem.clone(),
                waker.clone(),
                irq(blk_slot(i))?,
            )?);
        }
        Ok(out)
    }

    fn find(&self, addr: u64) -> Option<(Dev<'_>, u64)> {
        let off = addr.checked_sub(MMIO_BASE)?;
        let slot = off / MMIO_STRIDE;
        let within = off % MMIO_STRIDE;
        for (i, n) in self.net.iter().enumerate() {
            if net_slot(i) == slot {
                return Some((Dev::Net(n), within));
            }
        }
        for (i, b) in self.blk.iter().enumerate() {
            if blk_slot(i) == slot {
                return Some((Dev::Blk(b), within));
            }
        }
        None
    }

    /// Every device's interrupt eventfd and its GSI, for the VM to register as irqfds.
    pub fn irqfds(&self) -> Vec<(&EventFd, u32)> {
        let lines = self
            .net
            .iter()
            .map(|n| n.irq())
            .chain(self.blk.iter().map(|b| b.irq()));
        lines
            .filter_map(|l| l.eventfd().map(|fd| (fd, l.gsi())))
            .collect()
    }

    /// An MMIO read; false if no device owns `addr`.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((Dev::Net(n), off)) => n.mmio_read(off, data),
            Some((Dev::Blk(b), off)) => b.mmio_read(off, data),
            None => return false,
        }
        true
    }

    /// An MMIO write; false if no device owns `addr`.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((Dev::Net(n), off)) => n.mmio_write(off, data),
            Some((Dev::Blk(b), off)) => b.mmio_write(off, data),
            None => return false,
        }
        true
    }

    /// The vCPUs stopped: no more deliveries, every in-flight block request completed.
    pub fn quiesce(&self) -> Quiesced {
        let mut q = Quiesced::default();
        for n in &self.net {
            q.rx_queued += n.stop_delivery() as u64;
        }
        for b in &self.blk {
            let (drained, stuck) = b.drain();
            q.io_drained += drained;
            q.io_stuck += u64::from(stuck);
        }
        q
    }

    /// The vCPUs run again: deliver what queued up, serve what the guest posted meanwhile.
    pub fn activate(&self) {
        for n in &self.net {
            n.start_delivery();
        }
        for b in &self.blk {
            b.activate();
        }
    }

    pub fn state(&self) -> VirtioState {
        VirtioState {
            net: self.net.iter().map(|n| n.state()).collect(),
            blk: self.blk.iter().map(|b| b.state()).collect(),
        }
    }

    pub fn restore(&self, st: &VirtioState) -> Result<(), VirtioError> {
        if st.net.len() != self.net.len() || st.blk.len() != self.blk.len() {
            return Err(VirtioError::Mismatch(format!(
                "state has {} NICs and {} disks, this VM {} and {}",
                st.net.len(),
                st.blk.len(),
                self.net.len(),
                self.blk.len()
            )));
        }
        for (n, s) in self.net.iter().zip(&st.net) {
            n.restore(s)?;
        }
        for (b, s) in self.blk.iter().zip(&st.blk) {
            b.restore(s)?;
        }
        Ok(())
    }

    /// After a successful migration: every NIC's tap and the frames it queued after the state
    /// capture, by NIC index, for the forwarder (see [`net::NetDevice::take_for_forwarding`]).
    pub fn take_for_forwarding(&self) -> Vec<(usize, net::Forwarding)> {
        self.net
            .iter()
            .enumerate()
            .filter_map(|(i, n)| n.take_for_forwarding().map(|f| (i, f)))
            .collect()
    }

    /// Stop device threads and close backends (the taps disappear).
    pub fn shutdown(&self) {
        for n in &self.net {
            n.shutdown();
        }
        for b in &self.blk {
            b.shutdown();
        }
    }
}

enum Dev<'a> {
    Net(&'a Arc<net::NetDevice>),
    Blk(&'a Arc<blk::BlkDevice>),
}

#[cfg(test)]
pub(crate) mod fake {
    //! A plain-memory fake of guest memory that records which pages were written.
    use super::*;
    use std::collections::BTreeSet;
    use std::sync::Mutex;

    pub struct FakeMem {
        pub bytes: Mutex<Vec<u8>>,
        pub dirty: Mutex<BTreeSet<u64>>,
    }

    impl FakeMem {
        pub fn new(size: usize) -> Arc<FakeMem> {
            Arc::new(FakeMem {
                bytes: Mutex::new(vec![0; size]),
                dirty: Mutex::new(BTreeSet::new()),
            })
        }
        /// Write without marking dirty (what the guest's own stores are to KVM).
        pub fn guest_write(&self, gpa: u64, data: &[u8]) {
            let mut b = self.bytes.lock().unwrap();
            b[gpa as usize..gpa as usize + data.len()].copy_from_slice(data);
        }
        pub fn guest_read(&self, gpa: u64, len: usize) -> Vec<u8> {
            self.bytes.lock().unwrap()[gpa as usize..gpa as usize + len].to_vec()
        }
        pub fn snapshot(&self) -> Vec<u8> {
            self.bytes.lock().unwrap().clone()
        }
        /// Every page whose bytes differ from `before` must have been marked dirty.
        pub fn assert_changes_dirty(&self, before: &[u8]) {
            let now = self.snapshot();
            let dirty = self.dirty.lock().unwrap();
            for (p, (a, b)) in before.chunks(4096).zip(now.chunks(4096)).enumerate() {
                if a != b {
                    assert!(
                        dirty.contains(&(p as u64)),
                        "page {p} changed by a device but is not marked dirty"
                    );
                }
            }
        }
    }

    impl DeviceMemory for FakeMem {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
            let b = self.bytes.lock().unwrap();
            let end = gpa
                .checked_add(buf.len() as u64)
                .filter(|&e| e <= b.len() as u64)
                .ok_or(MemoryError::OutOfRange {
                    gpa,
                    len: buf.len() as u64,
                })?;
            buf.copy_from_slice(&b[gpa as usize..end as usize]);
            Ok(())
        }
        fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
            let mut b = self.bytes.lock().unwrap();
            let end = gpa
                .checked_add(data.len() as u64)
                .filter(|&e| e <= b.len() as u64)
                .ok_or(MemoryError::OutOfRange {
                    gpa,
                    len: data.len() as u64,
                })?;
            b[gpa as usize..end as usize].copy_from_slice(data);
            if !data.is_empty() {
                let mut d = self.dirty.lock().unwrap();
                for p in gpa / 4096..=(end - 1) / 4096 {
                    d.insert(p);
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_map_to_gsis_and_too_many_devices_are_refused() {
        assert_eq!(slot_gsi(net_slot(0)), 5);
        assert_eq!(slot_gsi(blk_slot(0)), 6);
        assert_eq!(slot_gsi(net_slot(1)), 7);
        assert_eq!(slot_gsi(blk_slot(1)), 8);
        let mem: Arc<dyn DeviceMemory> = fake::FakeMem::new(4096);
        let waker = Arc::new(Waker::default());
        // Nine NICs and nine disks: slots 0-17, GSIs 5-22, one eventfd each.
        let v = VirtioDevices::new(
            "t",
            &[[0x52, 0x54, 0, 0, 0, 1]; 9],
            9,
            &DeviceEnv::default(),
            mem.clone(),
            waker.clone(),
        )
        .unwrap();
        let mut gsis: Vec<u32> = v.irqfds().iter().map(|(_, g)| *g).collect();
        gsis.sort_unstable();
        assert_eq!(gsis, (5..=22).collect::<Vec<_>>());
        v.shutdown();
        // Ten NICs and ten disks would need GSI 24: refused, saying why.
        let e = VirtioDevices::new(
            "t",
            &[[0x52, 0x54, 0, 0, 0, 1]; 10],
            10,
            &DeviceEnv::default(),
            mem,
            waker,
        )
        .unwrap_err();
        assert!(
            matches!(e, VirtioError::TooManyDevices { gsi: 24, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("fewer devices"), "{e}");
    }
}
