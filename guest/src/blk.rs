//! A small virtio-blk driver of our own (virtio-mmio through virtio-drivers' `Transport`): one
//! request at a time, submitted without waiting and found complete by polling the used ring in
//! memory. virtio-drivers 0.12's `VirtIOBlk` has no non-blocking flush, and a flush (the device's
//! `fdatasync`) takes 10-30 ms in the lab: waiting for it stalled the network for as long.

use core::sync::atomic::{fence, Ordering};

use virtio_drivers::transport::mmio::MmioTransport;
use virtio_drivers::transport::{DeviceStatus, Transport};

use crate::arch::Clock;
use crate::mem;

const QUEUE: u16 = 0;
const QUEUE_SIZE: u16 = 16;
const F_VERSION_1: u64 = 1 << 32;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const DESC_NEXT: u16 = 1;
const DESC_WRITE: u16 = 2;
/// Offsets in the queue's page: descriptor table, available ring, used ring, request header,
/// status byte.
const AVAIL: usize = 256;
const USED: usize = 512;
const HDR: usize = 1024;
const STATUS: usize = 1040;

#[derive(Debug)]
pub enum BlkError {
    /// The device does not offer VIRTIO_F_VERSION_1 (a legacy device).
    Legacy,
    /// The device refused the features (FEATURES_OK not kept).
    FeaturesRefused(u64),
    /// The queue is smaller than this driver's.
    QueueTooSmall(u32),
    /// A request is already in flight.
    Busy,
    /// The device answered with a status other than OK (1 = IOERR, 2 = UNSUPP).
    Status(u8),
    /// No answer within the bound.
    TimedOut,
    Config(virtio_drivers::Error),
}

impl core::fmt::Display for BlkError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            BlkError::Legacy => write!(f, "legacy device (no VIRTIO_F_VERSION_1)"),
            BlkError::FeaturesRefused(x) => write!(f, "device refused features {x:#x}"),
            BlkError::QueueTooSmall(n) => {
                write!(f, "queue of {n} entries, this driver needs {QUEUE_SIZE}")
            }
            BlkError::Busy => write!(f, "a request is already in flight"),
            BlkError::Status(1) => write!(f, "I/O error (VIRTIO_BLK_S_IOERR)"),
            BlkError::Status(2) => write!(f, "unsupported request (VIRTIO_BLK_S_UNSUPP)"),
            BlkError::Status(s) => write!(f, "device status {s}"),
            BlkError::TimedOut => write!(f, "no answer from the device within 10 s"),
            BlkError::Config(e) => write!(f, "reading the config space: {e}"),
        }
    }
}

pub struct Blk {
    transport: MmioTransport<'static>,
    /// The queue's page (identity-mapped, ours for the life of the program).
    page: *mut u8,
    avail_idx: u16,
    used_idx: u16,
    in_flight: bool,
    capacity: u64,
    features: u64,
}

impl Blk {
    pub fn new(mut t: MmioTransport<'static>) -> Result<Blk, BlkError> {
        t.set_status(DeviceStatus::empty());
        t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
        let offered = t.read_device_features();
        if offered & F_VERSION_1 == 0 {
            return Err(BlkError::Legacy);
        }
        let features = offered & (F_VERSION_1 | F_RO | F_FLUSH);
        t.write_driver_features(features);
        t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK);
        if !t.get_status().contains(DeviceStatus::FEATURES_OK) {
            return Err(BlkError::FeaturesRefused(features));
        }
        let max = t.max_queue_size(QUEUE);
        if max < QUEUE_SIZE as u32 {
            return Err(BlkError::QueueTooSmall(max));
        }
        let page = mem::alloc_bytes(mem::PAGE as usize, mem::PAGE).as_mut_ptr();
        let pa = page as u64;
        t.queue_set(
            QUEUE,
            QUEUE_SIZE as u32,
            pa,
            pa + AVAIL as u64,
            pa + USED as u64,
        );
        let capacity = t
            .read_consistent(|| {
                let lo: u32 = t.read_config_space(0)?;
                let hi: u32 = t.read_config_space(4)?;
                Ok((hi as u64) << 32 | lo as u64)
            })
            .map_err(BlkError::Config)?;
        t.finish_init();
        Ok(Blk {
            transport: t,
            page,
            avail_idx: 0,
            used_idx: 0,
            in_flight: false,
            capacity,
            features,
        })
    }

    /// Size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn readonly(&self) -> bool {
        self.features & F_RO != 0
    }

    /// Whether the device has VIRTIO_BLK_F_FLUSH (without it, a completed write is durable).
    pub fn has_flush(&self) -> bool {
        self.features & F_FLUSH != 0
    }

    fn put<T>(&mut self, offset: usize, v: T) {
        // SAFETY: offset + size_of::<T>() lies in the queue's page (the constants above) and
        // the offsets are aligned for T; volatile because the device reads it.
        unsafe { core::ptr::write_volatile(self.page.add(offset) as *mut T, v) }
    }

    fn get<T: Copy>(&self, offset: usize) -> T {
        // SAFETY: as in put; volatile because the device writes it.
        unsafe { core::ptr::read_volatile(self.page.add(offset) as *const T) }
    }

    fn desc(&mut self, i: usize, addr: u64, len: u32, flags: u16, next: u16) {
        let at = i * 16;
        self.put(at, addr);
        self.put(at + 8, len);
        self.put(at + 12, flags);
        self.put(at + 14, next);
    }

    /// Submit a request; `data` is (address, length, the device writes it).
    ///
    /// # Safety
    /// The data buffer must stay valid and untouched until [`poll`](Self::poll) reports the
    /// request complete.
    unsafe fn submit(
        &mut self,
        kind: u32,
        sector: u64,
        data: Option<(u64, u32, bool)>,
    ) -> Result<(), BlkError> {
        if self.in_flight {
            return Err(BlkError::Busy);
        }
        self.put(HDR, kind);
        self.put(HDR + 4, 0u32);
        self.put(HDR + 8, sector);
        self.put(STATUS, 0xffu8);
        let hdr = self.page as u64 + HDR as u64;
        let status = self.page as u64 + STATUS as u64;
        match data {
            Some((addr, len, device_writes)) => {
                self.desc(0, hdr, 16, DESC_NEXT, 1);
                let w = if device_writes { DESC_WRITE } else { 0 };
                self.desc(1, addr, len, DESC_NEXT | w, 2);
            }
            None => self.desc(0, hdr, 16, DESC_NEXT, 2),
        }
        self.desc(2, status, 1, DESC_WRITE, 0);
        let slot = AVAIL + 4 + 2 * (self.avail_idx % QUEUE_SIZE) as usize;
        self.put(slot, 0u16);
        fence(Ordering::Release);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.put(AVAIL + 2, self.avail_idx);
        fence(Ordering::SeqCst);
        self.transport.notify(QUEUE);
        self.in_flight = true;
        Ok(())
    }

    /// Start writing `buf` (whole sectors) at `sector`.
    ///
    /// # Safety
    /// `buf` must stay valid and unchanged until [`poll`](Self::poll) reports completion.
    pub unsafe fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), BlkError> {
        // SAFETY: the caller keeps buf alive and unchanged until completion.
        unsafe {
            self.submit(
                T_OUT,
                sector,
                Some((buf.as_ptr() as u64, buf.len() as u32, false)),
            )
        }
    }

    /// Start a flush (a no-op request when the device has no flush is not sent: see
    /// [`has_flush`](Self::has_flush)).
    pub fn flush(&mut self) -> Result<(), BlkError> {
        // SAFETY: a flush has no data buffer.
        unsafe { self.submit(T_FLUSH, 0, None) }
    }

    /// The request in flight has completed: Some(its result); None while it runs (or when
    /// nothing is in flight).
    pub fn poll(&mut self) -> Option<Result<(), BlkError>> {
        if !self.in_flight {
            return None;
        }
        let used: u16 = self.get(USED + 2);
        if used == self.used_idx {
            return None;
        }
        fence(Ordering::Acquire);
        self.used_idx = used;
        self.in_flight = false;
        match self.get::<u8>(STATUS) {
            0 => Some(Ok(())),
            s => Some(Err(BlkError::Status(s))),
        }
    }

    pub fn busy(&self) -> bool {
        self.in_flight
    }

    /// Read whole sectors at `sector` into `buf`, waiting (at boot only) at most 10 s.
    pub fn read_blocking(
        &mut self,
        sector: u64,
        buf: &mut [u8],
        clock: &Clock,
    ) -> Result<(), BlkError> {
        // SAFETY: buf is borrowed mutably for this whole call, which returns only after the
        // request completed, or after the timeout, when the device is reset below so that it no
        // longer owns the buffer.
        unsafe {
            self.submit(
                T_IN,
                sector,
                Some((buf.as_mut_ptr() as u64, buf.len() as u32, true)),
            )?
        };
        let deadline = clock.now_us() + 10_000_000;
        loop {
            if let Some(r) = self.poll() {
                return r;
            }
            if clock.now_us() > deadline {
                // Reset the device: it must not write into buf after we return.
                self.transport.set_status(DeviceStatus::empty());
                return Err(BlkError::TimedOut);
            }
            core::hint::spin_loop();
        }
    }
}
