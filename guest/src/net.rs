//! The virtio-net device as a smoltcp `Device`: receive buffers stay posted in the receive
//! queue, transmit buffers come from a fixed pool; completions are found by polling the used
//! rings in memory (no MMIO read). A buffer handed to the device is not touched again until the
//! device has returned it.

use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::mmio::MmioTransport;

use crate::mem::{self, GuestHal};

/// Descriptors per queue, and buffers per direction. The device must offer at least this many
/// (QueueNumMax).
pub const QUEUE_SIZE: usize = 64;
/// One Ethernet frame plus the virtio-net header, rounded up.
const BUF: usize = 2048;
const NONE: u16 = u16::MAX;

type Raw = VirtIONetRaw<GuestHal, MmioTransport<'static>, QUEUE_SIZE>;

/// Counters for the console's status line and for the idle decision.
#[derive(Default, Clone, Copy)]
pub struct NetStats {
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub rx_errors: u64,
    pub tx_errors: u64,
}

pub struct NetDev {
    raw: Raw,
    rx: &'static mut [[u8; BUF]; QUEUE_SIZE],
    tx: &'static mut [[u8; BUF]; QUEUE_SIZE],
    /// Buffer index of the request a token (head descriptor) stands for.
    rx_slot: [u16; QUEUE_SIZE],
    tx_slot: [u16; QUEUE_SIZE],
    tx_len: [u16; QUEUE_SIZE],
    /// Bit i set: transmit buffer i is free.
    tx_free: u64,
    /// Receive buffer to post again (its packet was handed to smoltcp).
    repost: Option<usize>,
    pub stats: NetStats,
}

impl NetDev {
    pub fn new(raw: Raw) -> Result<NetDev, virtio_drivers::Error> {
        let mut d = NetDev {
            raw,
            rx: mem::alloc_zeroed(),
            tx: mem::alloc_zeroed(),
            rx_slot: [NONE; QUEUE_SIZE],
            tx_slot: [NONE; QUEUE_SIZE],
            tx_len: [0; QUEUE_SIZE],
            tx_free: if QUEUE_SIZE == 64 {
                u64::MAX
            } else {
                (1u64 << QUEUE_SIZE) - 1
            },
            repost: None,
            stats: NetStats::default(),
        };
        for slot in 0..QUEUE_SIZE {
            d.post_rx(slot)?;
        }
        Ok(d)
    }

    pub fn mac(&self) -> [u8; 6] {
        self.raw.mac_address()
    }

    fn post_rx(&mut self, slot: usize) -> Result<(), virtio_drivers::Error> {
        // SAFETY: rx[slot] lives for the program and is not accessed until the device returns
        // it (receive() only reads a buffer after receive_complete for its token).
        let token = unsafe { self.raw.receive_begin(&mut self.rx[slot]) }?;
        self.rx_slot[token as usize % QUEUE_SIZE] = slot as u16;
        Ok(())
    }

    /// Post back the buffer of the last packet handed out, and take back finished transmit
    /// buffers.
    pub fn housekeep(&mut self) {
        if let Some(slot) = self.repost.take() {
            if self.post_rx(slot).is_err() {
                self.stats.rx_errors += 1;
                self.repost = Some(slot);
            }
        }
        while let Some(token) = self.raw.poll_transmit() {
            let t = token as usize % QUEUE_SIZE;
            let slot = self.tx_slot[t] as usize;
            if slot >= QUEUE_SIZE {
                self.stats.tx_errors += 1;
                break;
            }
            let len = self.tx_len[slot] as usize;
            // SAFETY: the same buffer (and length) that transmit_begin was given for this token.
            match unsafe { self.raw.transmit_complete(token, &self.tx[slot][..len]) } {
                Ok(_) => {}
                Err(_) => self.stats.tx_errors += 1,
            }
            self.tx_slot[t] = NONE;
            self.tx_free |= 1 << slot;
        }
    }

    /// Whether the device still holds transmit buffers.
    pub fn tx_in_flight(&self) -> bool {
        let all = if QUEUE_SIZE == 64 {
            u64::MAX
        } else {
            (1u64 << QUEUE_SIZE) - 1
        };
        self.tx_free != all
    }
}

pub struct RxTok<'a> {
    buf: &'a [u8],
}

pub struct TxTok<'a> {
    raw: &'a mut Raw,
    tx: &'a mut [[u8; BUF]; QUEUE_SIZE],
    tx_slot: &'a mut [u16; QUEUE_SIZE],
    tx_len: &'a mut [u16; QUEUE_SIZE],
    tx_free: &'a mut u64,
    stats: &'a mut NetStats,
}

impl phy::RxToken for RxTok<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.buf)
    }
}

impl phy::TxToken for TxTok<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        // A free buffer exists: transmit()/receive() only hand out a token when one does.
        let slot = self.tx_free.trailing_zeros() as usize;
        let buf = &mut self.tx[slot];
        let hdr = self.raw.fill_buffer_header(buf).unwrap_or(12);
        let len = len.min(BUF - hdr);
        let r = f(&mut buf[hdr..hdr + len]);
        let total = hdr + len;
        // SAFETY: tx[slot] lives for the program and is not written again until
        // transmit_complete returns it (the slot stays out of tx_free until then).
        match unsafe { self.raw.transmit_begin(&buf[..total]) } {
            Ok(token) => {
                *self.tx_free &= !(1 << slot);
                self.tx_slot[token as usize % QUEUE_SIZE] = slot as u16;
                self.tx_len[slot] = total as u16;
                self.stats.tx_packets += 1;
            }
            Err(_) => self.stats.tx_errors += 1,
        }
        r
    }
}

impl phy::Device for NetDev {
    type RxToken<'a> = RxTok<'a>;
    type TxToken<'a> = TxTok<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(RxTok<'_>, TxTok<'_>)> {
        self.housekeep();
        if self.tx_free == 0 {
            // No buffer to answer with: leave the packet in the ring until one is free.
            return None;
        }
        loop {
            let token = self.raw.poll_receive()?;
            let t = token as usize % QUEUE_SIZE;
            let slot = self.rx_slot[t] as usize;
            if slot >= QUEUE_SIZE {
                self.stats.rx_errors += 1;
                return None;
            }
            self.rx_slot[t] = NONE;
            // SAFETY: the buffer receive_begin was given for this token.
            match unsafe { self.raw.receive_complete(token, &mut self.rx[slot]) } {
                Ok((hdr, len)) if hdr + len <= BUF => {
                    self.repost = Some(slot);
                    self.stats.rx_packets += 1;
                    let NetDev {
                        raw,
                        rx,
                        tx,
                        tx_slot,
                        tx_len,
                        tx_free,
                        stats,
                        ..
                    } = self;
                    return Some((
                        RxTok {
                            buf: &rx[slot][hdr..hdr + len],
                        },
                        TxTok {
                            raw,
                            tx,
                            tx_slot,
                            tx_len,
                            tx_free,
                            stats,
                        },
                    ));
                }
                _ => {
                    self.stats.rx_errors += 1;
                    if self.post_rx(slot).is_err() {
                        return None;
                    }
                }
            }
        }
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxTok<'_>> {
        self.housekeep();
        if self.tx_free == 0 {
            return None;
        }
        Some(TxTok {
            raw: &mut self.raw,
            tx: self.tx,
            tx_slot: &mut self.tx_slot,
            tx_len: &mut self.tx_len,
            tx_free: &mut self.tx_free,
            stats: &mut self.stats,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = 1514;
        caps.max_burst_size = Some(QUEUE_SIZE / 2);
        caps
    }
}
