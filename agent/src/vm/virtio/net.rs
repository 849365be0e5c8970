//! virtio-net (device id 1): receive queue 0, transmit queue 1, the 12-byte `virtio_net_hdr_v1`
//! (no offloads, `num_buffers` = 1), the MAC in the config space (`VIRTIO_NET_F_MAC`) and link
//! status (`VIRTIO_NET_F_STATUS`, always up).
//!
//! TX runs on the vCPU thread at QueueNotify: each frame is written to the tap. RX runs on a
//! per-NIC thread that polls the tap (and an eventfd for shutdown) with a bounded timeout, queues
//! what it reads (at most [`RX_QUEUE_MAX`] frames; beyond that frames are dropped and counted),
//! and delivers queued frames into the buffers the guest posted, then wakes the vCPUs. While the
//! VM is paused nothing is delivered (frames keep queueing); the queued frames are part of the
//! device state, so after a migration they are delivered on the destination, never on both.
//!
//! Frames that reach the source's tap after the state was captured stay queued behind the
//! captured ones (the capture remembers where it cut the queue). If the migration fails they are
//! delivered here on resume; if it succeeds, [`NetDevice::take_for_forwarding`] hands them and the
//! tap itself to the migration's forwarder (`migrate/forward.rs`), which sends what is addressed
//! to the guest to the destination for a short window; there they enter the queue through
//! [`NetDevice::receive_forwarded`], behind the frames that travelled in the state.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::mmio::{Event, Transport, TransportState, DEVICE_NET};
use super::tap::Tap;
use super::{DeviceMemory, Irq, VirtioError, Waker};

pub const F_MAC: u64 = 1 << 5;
pub const F_STATUS: u64 = 1 << 16;
/// `virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers.
pub const NET_HDR: usize = 12;
/// Frames kept for the guest while it has no buffers or is paused.
pub const RX_QUEUE_MAX: usize = 256;
/// Largest frame read from the tap.
pub const MAX_FRAME: usize = 65_536;
const RXQ: usize = 0;
const TXQ: usize = 1;
/// How long the RX thread sleeps in poll at most (it re-checks for shutdown).
const RX_POLL: Duration = Duration::from_millis(100);
/// Frames the RX thread reads from the tap per wakeup before delivering.
const RX_BATCH: usize = 64;

/// What travels with the VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub transport: TransportState,
    pub mac: [u8; 6],
    /// Frames received for the guest and not yet delivered (oldest first).
    pub rx_frames: Vec<Vec<u8>>,
}

/// Counters of one NIC.
#[derive(Debug, Default)]
pub struct NetCounters {
    pub rx_frames: AtomicU64,
    pub rx_dropped: AtomicU64,
    pub rx_truncated: AtomicU64,
    /// Frames this device's tap queued before a migrated state replaced them (copies of what
    /// the source also received).
    pub rx_replaced: AtomicU64,
    /// Frames the source forwarded after the switchover (destination side).
    pub rx_forwarded: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_dropped: AtomicU64,
    pub bad_chains: AtomicU64,
}

/// A snapshot of [`NetCounters`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetStats {
    pub tap: Option<String>,
    pub rx_frames: u64,
    pub rx_dropped: u64,
    pub rx_queued: u64,
    #[serde(default)]
    pub rx_replaced: u64,
    #[serde(default)]
    pub rx_forwarded: u64,
    pub tx_frames: u64,
    pub tx_dropped: u64,
    pub bad_chains: u64,
}

struct Inner {
    t: Transport,
    rx: VecDeque<Vec<u8>>,
    delivering: bool,
    /// How many of `rx` the last state capture took (while paused): the frames after them
    /// arrived later and are not in that state.
    captured: Option<usize>,
}

/// What a source NIC hands to the migration's forwarder after the commit: its tap (still on
/// the bridge) and the frames that arrived after the state was captured, oldest first.
#[derive(Debug)]
pub struct Forwarding {
    pub mac: [u8; 6],
    pub tap: Arc<Tap>,
    pub backlog: Vec<Vec<u8>>,
}

/// Whether `frame` is addressed to `mac` (its destination address), the only frames forwarded:
/// broadcast and multicast frames were flooded to the destination's tap as well.
pub fn addressed_to(frame: &[u8], mac: &[u8; 6]) -> bool {
    frame.len() >= 14 && frame[..6] == mac[..]
}

/// One virtio-net device.
pub struct NetDevice {
    vm: String,
    mac: [u8; 6],
    inner: Mutex<Inner>,
    mem: Arc<dyn DeviceMemory>,
    waker: Arc<Waker>,
    irq: Irq,
    tap: Mutex<Option<Arc<Tap>>>,
    event: Option<OwnedFd>,
    quit: AtomicBool,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    pub counters: NetCounters,
}

impl std::fmt::Debug for NetDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetDevice")
            .field("vm", &self.vm)
            .field("mac", &self.mac)
            .finish()
    }
}

fn eventfd() -> std::io::Result<OwnedFd> {
    // SAFETY: eventfd(2) with valid flags; the result is checked and owned below.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl NetDevice {
    /// A NIC with `mac`; with a tap, an RX thread starts (it delivers once the VM runs).
    pub fn new(
        vm: &str,
        mac: [u8; 6],
        tap: Option<Tap>,
        mem: Arc<dyn DeviceMemory>,
        waker: Arc<Waker>,
        irq: Irq,
    ) -> Result<Arc<NetDevice>, VirtioError> {
        let event = match &tap {
            Some(_) => Some(eventfd().map_err(|source| VirtioError::Thread {
                what: "net RX (eventfd)",
                source,
            })?),
            None => None,
        };
        let tap = tap.map(Arc::new);
        let dev = Arc::new(NetDevice {
            vm: vm.to_string(),
            mac,
            inner: Mutex::new(Inner {
                t: Transport::new(DEVICE_NET, F_MAC | F_STATUS, 2),
                rx: VecDeque::new(),
                delivering: false,
                captured: None,
            }),
            mem,
            waker,
            irq,
            tap: Mutex::new(tap.clone()),
            event,
            quit: AtomicBool::new(false),
            thread: Mutex::new(None),
            counters: NetCounters::default(),
        });
        if let (Some(tap), Some(ev)) = (tap, dev.event.as_ref()) {
            let weak = Arc::downgrade(&dev);
            let ev = ev.as_raw_fd();
            let h = std::thread::Builder::new()
                .name(format!("net-rx-{}", tap.name))
                .spawn(move || rx_thread(weak, tap, ev))
                .map_err(|source| VirtioError::Thread {
                    what: "net RX",
                    source,
                })?;
            if let Ok(mut t) = dev.thread.lock() {
                *t = Some(h);
            }
        }
        Ok(dev)
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The device's interrupt line.
    pub fn irq(&self) -> &Irq {
        &self.irq
    }

    /// Buffers were added to queue `q`'s used ring: set InterruptStatus and, unless the driver
    /// suppressed it on that queue, signal the line.
    fn notify_used(&self, g: &mut Inner, q: usize) {
        g.t.signal_used();
        let mem = self.mem.as_ref();
        if g.t.queue(q).is_some_and(|q| q.needs_interrupt(mem)) {
            self.irq.raise();
        }
    }

    pub fn tap_name(&self) -> Option<String> {
        self.tap
            .lock()
            .ok()
            .and_then(|t| t.as_ref().map(|t| t.name.clone()))
    }

    fn config(&self) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&1u16.to_le_bytes()); // VIRTIO_NET_S_LINK_UP
        c[8..10].copy_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
        c
    }

    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        match self.inner.lock() {
            Ok(g) => g.t.read(offset, data, &self.config()),
            Err(_) => data.fill(0xff),
        }
    }

    pub fn mmio_write(&self, offset: u64, data: &[u8]) {
        let Ok(mut g) = self.inner.lock() else { return };
        match g.t.write(offset, data) {
            Event::Notify(q) if usize::from(q) == TXQ => self.transmit(&mut g),
            Event::Notify(_) | Event::DriverOk => {
                if self.deliver(&mut g) {
                    drop(g);
                    self.waker.wake();
                }
            }
            Event::Reset | Event::None => {}
        }
    }

    /// Send every frame the guest posted on the TX queue.
    fn transmit(&self, g: &mut Inner) {
        if !g.t.driver_ok() {
            return;
        }
        let tap = self.tap.lock().ok().and_then(|t| t.clone());
        let mem = self.mem.as_ref();
        let mut used = false;
        // At most two queues' worth per notify (the guest notifies again for more).
        for _ in 0..2 * usize::from(super::queue::QUEUE_MAX) {
            let Some(q) = g.t.queue(TXQ) else { return };
            let chain = match q.pop(mem) {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(_) => {
                    self.counters.bad_chains.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            };
            match chain.read_all(mem) {
                Ok(data) if data.len() > NET_HDR => {
                    let frame = &data[NET_HDR..];
                    let sent = tap.as_ref().is_some_and(|t| t.write_frame(frame).is_ok());
                    let c = if sent {
                        &self.counters.tx_frames
                    } else {
                        &self.counters.tx_dropped
                    };
                    c.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    self.counters.bad_chains.fetch_add(1, Ordering::Relaxed);
                }
            }
            if let Some(q) = g.t.queue(TXQ) {
                if q.add_used(mem, chain.head, 0).is_err() {
                    self.counters.bad_chains.fetch_add(1, Ordering::Relaxed);
                }
            }
            used = true;
        }
        if used {
            self.notify_used(g, TXQ);
        }
    }

    /// Move queued frames into posted RX buffers; true if any was delivered.
    fn deliver(&self, g: &mut Inner) -> bool {
        if !g.delivering || !g.t.driver_ok() || g.rx.is_empty() {
            return false;
        }
        let mem = self.mem.as_ref();
        let mut any = false;
        while !g.rx.is_empty() {
            let Some(q) = g.t.queue(RXQ) else { break };
            let chain = match q.pop(mem) {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(_) => {
                    self.counters.bad_chains.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            };
            let Some(frame) = g.rx.pop_front() else { break };
            let mut hdr = [0u8; NET_HDR];
            hdr[10..12].copy_from_slice(&1u16.to_le_bytes()); // num_buffers
            let mut written = 0u32;
            match chain.write_at(mem, 0, &hdr) {
                Ok(n) if n == NET_HDR => {
                    if let Ok(n) = chain.write_at(mem, NET_HDR as u64, &frame) {
                        if n < frame.len() {
                            self.counters.rx_truncated.fetch_add(1, Ordering::Relaxed);
                        }
                        written = (NET_HDR + n) as u32;
                    }
                }
                _ => {
                    self.counters.bad_chains.fetch_add(1, Ordering::Relaxed);
                }
            }
            if let Some(q) = g.t.queue(RXQ) {
                if q.add_used(mem, chain.head, written).is_err() {
                    self.counters.bad_chains.fetch_add(1, Ordering::Relaxed);
                }
            }
            self.counters.rx_frames.fetch_add(1, Ordering::Relaxed);
            any = true;
        }
        if any {
            self.notify_used(g, RXQ);
        }
        any
    }

    /// Frames arrived from the tap: queue them and deliver what the guest has room for.
    pub fn receive(&self, frames: impl IntoIterator<Item = Vec<u8>>) {
        let Ok(mut g) = self.inner.lock() else { return };
        for f in frames {
            if g.rx.len() >= RX_QUEUE_MAX {
                self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
            } else {
                g.rx.push_back(f);
            }
        }
        if self.deliver(&mut g) {
            drop(g);
            self.waker.wake();
        }
    }

    /// The VM paused: deliver nothing more (frames keep queueing). Returns the queue length.
    pub fn stop_delivery(&self) -> usize {
        match self.inner.lock() {
            Ok(mut g) => {
                g.delivering = false;
                g.rx.len()
            }
            Err(_) => 0,
        }
    }

    /// The VM runs: deliver what queued up.
    pub fn start_delivery(&self) {
        let Ok(mut g) = self.inner.lock() else { return };
        g.delivering = true;
        g.captured = None;
        if g.t.driver_ok() && g.t.st.interrupt_status != 0 {
            // Asserted before the pause (or in the restored state): pulse the line again in
            // case the last pulse did not make it into the irqchip state.
            self.irq.raise();
        }
        if self.deliver(&mut g) {
            drop(g);
            self.waker.wake();
        }
    }

    /// The device's state; while the VM is paused this also marks where the queue was cut, for
    /// [`NetDevice::take_for_forwarding`].
    pub fn state(&self) -> NetState {
        let Ok(mut g) = self.inner.lock() else {
            return NetState::default();
        };
        if !g.delivering {
            g.captured = Some(g.rx.len());
        }
        NetState {
            transport: g.t.st.clone(),
            mac: self.mac,
            rx_frames: g.rx.iter().cloned().collect(),
        }
    }

    /// Load saved state: the frames that came with it replace any this device queued itself
    /// (those were flooded to both hosts; the source's copy is the one that counts).
    pub fn restore(&self, st: &NetState) -> Result<(), VirtioError> {
        if st.mac != self.mac {
            return Err(VirtioError::Mismatch(format!(
                "NIC state for MAC {:02x?}, device has {:02x?}",
                st.mac, self.mac
            )));
        }
        if st.rx_frames.len() > RX_QUEUE_MAX || st.rx_frames.iter().any(|f| f.len() > MAX_FRAME) {
            return Err(VirtioError::Mismatch(
                "NIC state holds more or larger frames than a device queues".into(),
            ));
        }
        let mut g = self
            .inner
            .lock()
            .map_err(|_| VirtioError::Mismatch("NIC lock poisoned".into()))?;
        g.t.restore(&st.transport)
            .map_err(|e| VirtioError::Mismatch(e.to_string()))?;
        g.captured = None;
        let local = g.rx.len() as u64;
        if local > 0 {
            self.counters
                .rx_replaced
                .fetch_add(local, Ordering::Relaxed);
        }
        g.rx = st.rx_frames.iter().cloned().collect();
        Ok(())
    }

    /// After a successful migration (the guest runs on the destination): stop the RX thread and
    /// hand over the tap, still on the bridge, with the frames queued after the state capture.
    /// Nothing is delivered to this copy any more. None without a tap, or if the state was never
    /// captured while paused (then nothing here belongs to a destination).
    pub fn take_for_forwarding(&self) -> Option<Forwarding> {
        self.tap_name()?;
        self.stop_rx_thread();
        let tap = self.tap.lock().ok()?.take()?;
        let backlog = self.take_backlog()?;
        Some(Forwarding {
            mac: self.mac,
            tap,
            backlog,
        })
    }

    /// The frames queued after the last capture while paused (the rest, carried in the state,
    /// are dropped here); None if the state was not captured while paused.
    fn take_backlog(&self) -> Option<Vec<Vec<u8>>> {
        let mut g = self.inner.lock().ok()?;
        if g.delivering {
            return None;
        }
        let captured = g.captured.take()?;
        let at = captured.min(g.rx.len());
        let backlog = g.rx.split_off(at).into_iter().collect();
        g.rx.clear();
        Some(backlog)
    }

    /// Frames the source forwarded after the switchover: queued behind what is queued (the
    /// frames that came in the state first), delivered like any received frame.
    pub fn receive_forwarded(&self, frames: Vec<Vec<u8>>) {
        self.counters
            .rx_forwarded
            .fetch_add(frames.len() as u64, Ordering::Relaxed);
        self.receive(frames);
    }

    pub fn stats(&self) -> NetStats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NetStats {
            tap: self.tap_name(),
            rx_frames: l(&self.counters.rx_frames),
            rx_dropped: l(&self.counters.rx_dropped),
            rx_queued: self.inner.lock().map_or(0, |g| g.rx.len() as u64),
            rx_replaced: l(&self.counters.rx_replaced),
            rx_forwarded: l(&self.counters.rx_forwarded),
            tx_frames: l(&self.counters.tx_frames),
            tx_dropped: l(&self.counters.tx_dropped),
            bad_chains: l(&self.counters.bad_chains),
        }
    }

    fn signal(&self) {
        if let Some(ev) = &self.event {
            let one = 1u64.to_ne_bytes();
            // SAFETY: an 8-byte write to our own eventfd.
            unsafe { libc::write(ev.as_raw_fd(), one.as_ptr().cast(), 8) };
        }
    }

    fn stop_rx_thread(&self) {
        self.quit.store(true, Ordering::SeqCst);
        self.signal();
        let h = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(h) = h {
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }

    /// Stop the RX thread and close the tap (it disappears from the host).
    pub fn shutdown(&self) {
        self.stop_rx_thread();
        if let Ok(mut t) = self.tap.lock() {
            t.take();
        }
    }
}

impl Drop for NetDevice {
    fn drop(&mut self) {
        self.quit.store(true, Ordering::SeqCst);
        self.signal();
    }
}

fn rx_thread(dev: Weak<NetDevice>, tap: Arc<Tap>, event: i32) {
    let mut buf = vec![0u8; MAX_FRAME];
    loop {
        let mut fds = [
            libc::pollfd {
                fd: tap.raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: event,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll(2) on two pollfds we own, with a bounded timeout. The eventfd stays open
        // while the device (which owns it) lives; we re-check that below before using it again.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, RX_POLL.as_millis() as i32) };
        let Some(dev) = dev.upgrade() else { return };
        if dev.quit.load(Ordering::SeqCst) {
            return;
        }
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                tracing::warn!(vm = %dev.vm, tap = %tap.name, error = %e, "polling the tap failed; NIC receive stops");
                return;
            }
            continue;
        }
        if fds[1].revents != 0 {
            let mut b = [0u8; 8];
            // SAFETY: an 8-byte read from our own non-blocking eventfd.
            unsafe { libc::read(event, b.as_mut_ptr().cast(), 8) };
        }
        if fds[0].revents & libc::POLLIN == 0 {
            continue;
        }
        let mut frames = Vec::new();
        for _ in 0..RX_BATCH {
            match tap.read_frame(&mut buf) {
                Ok(0) => break,
                Ok(n) => frames.push(buf[..n].to_vec()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(vm = %dev.vm, tap = %tap.name, error = %e, "reading the tap failed; NIC receive stops");
                    return;
                }
            }
        }
        dev.receive(frames);
    }
}

#[cfg(test)]
mod tests;
