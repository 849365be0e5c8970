//! virtio-blk (device id 2) backed by a disk image file: IN, OUT, FLUSH (`VIRTIO_BLK_F_FLUSH`:
//! `fdatasync` before the status byte is written, so a request the guest saw completed as
//! flushed is durable in the file) and GET_ID; capacity in 512-byte sectors in the config space.
//! A request past the end of the disk, or a malformed one, completes with IOERR.
//!
//! Requests run on a per-disk worker thread: QueueNotify only wakes it, so a slow fsync never
//! stalls the vCPU. At the pause, [`BlkDevice::drain`] wakes the worker and waits until every
//! request the guest made available has completed in the file, then holds the worker until the
//! VM runs again: the captured state has no request in flight, and the destination (which opens
//! the same file on the shared datastore) never applies one twice.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::mmio::{Event, Transport, TransportState, DEVICE_BLK};
use super::queue::Chain;
use super::{DeviceMemory, Irq, VirtioError, Waker};

pub const F_FLUSH: u64 = 1 << 9;
pub const SECTOR: u64 = 512;
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
/// Length of the GET_ID answer.
pub const ID_LEN: usize = 20;
/// How long a pause waits for in-flight requests before it gives up (and reports it).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What travels with the VM (the image itself is on the shared datastore).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlkState {
    pub transport: TransportState,
    pub capacity_sectors: u64,
}

#[derive(Default)]
struct Worker {
    /// Work was signalled since the worker last looked.
    kicked: bool,
    /// The worker is processing requests.
    busy: bool,
    /// The VM is paused: the worker must not touch the queue.
    held: bool,
    quit: bool,
}

/// Counters of one disk.
#[derive(Debug, Default, Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct BlkStats {
    pub path: Option<PathBuf>,
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub errors: u64,
    pub completed: u64,
}

/// One virtio-blk device.
pub struct BlkDevice {
    vm: String,
    index: usize,
    path: Option<PathBuf>,
    file: Option<File>,
    capacity: u64,
    t: Mutex<Transport>,
    mem: Arc<dyn DeviceMemory>,
    waker: Arc<Waker>,
    irq: Irq,
    worker: Mutex<Worker>,
    cv: Condvar,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    errors: AtomicU64,
    completed: AtomicU64,
}

impl std::fmt::Debug for BlkDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkDevice")
            .field("vm", &self.vm)
            .field("path", &self.path)
            .finish()
    }
}

impl BlkDevice {
    /// Disk `index` of `vm`, backed by `path` (None: every request fails with IOERR).
    pub fn new(
        vm: &str,
        index: usize,
        path: Option<&Path>,
        mem: Arc<dyn DeviceMemory>,
        waker: Arc<Waker>,
        irq: Irq,
    ) -> Result<Arc<BlkDevice>, VirtioError> {
        let (file, capacity) = match path {
            Some(p) => {
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(p)
                    .map_err(|source| VirtioError::DiskOpen {
                        path: p.to_path_buf(),
                        source,
                    })?;
                let len = f
                    .metadata()
                    .map_err(|source| VirtioError::DiskOpen {
                        path: p.to_path_buf(),
                        source,
                    })?
                    .len();
                if len == 0 || !len.is_multiple_of(SECTOR) {
                    return Err(VirtioError::DiskSize {
                        path: p.to_path_buf(),
                        len,
                    });
                }
                (Some(f), len / SECTOR)
            }
            None => (None, 0),
        };
        let dev = Arc::new(BlkDevice {
            vm: vm.to_string(),
            index,
            path: path.map(Path::to_path_buf),
            file,
            capacity,
            t: Mutex::new(Transport::new(DEVICE_BLK, F_FLUSH, 1)),
            mem,
            waker,
            irq,
            worker: Mutex::new(Worker {
                held: true,
                ..Default::default()
            }),
            cv: Condvar::new(),
            thread: Mutex::new(None),
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            completed: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&dev);
        let h = std::thread::Builder::new()
            .name(format!("blk{index}-{vm}"))
            .spawn(move || worker_thread(weak))
            .map_err(|source| VirtioError::Thread {
                what: "block worker",
                source,
            })?;
        if let Ok(mut t) = dev.thread.lock() {
            *t = Some(h);
        }
        if let Some(p) = path {
            tracing::info!(vm, disk = index, path = %p.display(), sectors = capacity, "disk image opened");
        }
        Ok(dev)
    }

    /// The device's interrupt line.
    pub fn irq(&self) -> &Irq {
        &self.irq
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    fn config(&self) -> [u8; 8] {
        self.capacity.to_le_bytes()
    }

    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        match self.t.lock() {
            Ok(t) => t.read(offset, data, &self.config()),
            Err(_) => data.fill(0xff),
        }
    }

    pub fn mmio_write(&self, offset: u64, data: &[u8]) {
        let ev = match self.t.lock() {
            Ok(mut t) => t.write(offset, data),
            Err(_) => return,
        };
        if let Event::Notify(_) | Event::DriverOk = ev {
            self.kick();
        }
    }

    fn kick(&self) {
        if let Ok(mut w) = self.worker.lock() {
            w.kicked = true;
            self.cv.notify_all();
        }
    }

    /// Process every available request (on the worker thread, or inline in tests).
    fn process(&self) -> usize {
        let mem = self.mem.as_ref();
        let mut done = 0;
        loop {
            let chain = {
                let Ok(mut t) = self.t.lock() else {
                    return done;
                };
                if !t.driver_ok() {
                    return done;
                }
                let Some(q) = t.queue(0) else { return done };
                match q.pop(mem) {
                    Ok(Some(c)) => c,
                    Ok(None) => return done,
                    Err(_) => {
                        // A chain we cannot even walk: nothing to answer to.
                        self.errors.fetch_add(1, Ordering::Relaxed);
                        return done;
                    }
                }
            };
            // The I/O runs without the transport lock: the vCPU keeps its MMIO access.
            let len = self.execute(&chain);
            let Ok(mut t) = self.t.lock() else {
                return done;
            };
            if let Some(q) = t.queue(0) {
                if q.add_used(mem, chain.head, len).is_err() {
                    self.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            t.signal_used();
            let interrupt = t.queue(0).is_some_and(|q| q.needs_interrupt(mem));
            drop(t);
            if interrupt {
                self.irq.raise();
            }
            self.completed.fetch_add(1, Ordering::Relaxed);
            self.waker.wake();
            done += 1;
        }
    }

    /// Run one request; returns the bytes written into the chain (data and status).
    fn execute(&self, chain: &Chain) -> u32 {
        let mem = self.mem.as_ref();
        let writable = chain.writable_len();
        if writable == 0 {
            // No room for the status byte: the request cannot be answered.
            self.errors.fetch_add(1, Ordering::Relaxed);
            return 0;
        }
        let data_in = writable - 1;
        let (status, written) = match self.run(chain, data_in) {
            Ok(n) => (S_OK, n),
            Err(s) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                (s, 0)
            }
        };
        if chain.write_at(mem, data_in, &[status]).is_err() {
            self.errors.fetch_add(1, Ordering::Relaxed);
            return written as u32;
        }
        (written + 1) as u32
    }

    /// Returns the bytes of data written into the chain, or the status to report.
    fn run(&self, chain: &Chain, data_in: u64) -> Result<u64, u8> {
        let mem = self.mem.as_ref();
        let readable = chain.read_all(mem).map_err(|_| S_IOERR)?;
        if readable.len() < 16 {
            return Err(S_IOERR);
        }
        let kind = u32::from_le_bytes(readable[0..4].try_into().map_err(|_| S_IOERR)?);
        let sector = u64::from_le_bytes(readable[8..16].try_into().map_err(|_| S_IOERR)?);
        let in_range = |len: u64| {
            len.is_multiple_of(SECTOR)
                && sector
                    .checked_mul(SECTOR)
                    .and_then(|o| o.checked_add(len))
                    .is_some_and(|end| end <= self.capacity * SECTOR)
        };
        match kind {
            T_IN => {
                let file = self.file.as_ref().ok_or(S_IOERR)?;
                if !in_range(data_in) {
                    return Err(S_IOERR);
                }
                let mut buf = vec![0u8; data_in as usize];
                file.read_exact_at(&mut buf, sector * SECTOR)
                    .map_err(|_| S_IOERR)?;
                chain.write_at(mem, 0, &buf).map_err(|_| S_IOERR)?;
                self.reads.fetch_add(1, Ordering::Relaxed);
                Ok(data_in)
            }
            T_OUT => {
                let file = self.file.as_ref().ok_or(S_IOERR)?;
                let data = &readable[16..];
                if !in_range(data.len() as u64) {
                    return Err(S_IOERR);
                }
                file.write_all_at(data, sector * SECTOR)
                    .map_err(|_| S_IOERR)?;
                self.writes.fetch_add(1, Ordering::Relaxed);
                Ok(0)
            }
            T_FLUSH => {
                let file = self.file.as_ref().ok_or(S_IOERR)?;
                file.sync_data().map_err(|_| S_IOERR)?;
                self.flushes.fetch_add(1, Ordering::Relaxed);
                Ok(0)
            }
            T_GET_ID => {
                let mut id = [0u8; ID_LEN];
                let s = format!("ferry-{}-{}", self.vm, self.index);
                let n = s.len().min(ID_LEN);
                id[..n].copy_from_slice(&s.as_bytes()[..n]);
                let n = (ID_LEN as u64).min(data_in) as usize;
                chain.write_at(mem, 0, &id[..n]).map_err(|_| S_IOERR)?;
                Ok(n as u64)
            }
            _ => Err(S_UNSUPP),
        }
    }

    /// The vCPUs stopped: complete every request the guest made available, then hold the
    /// worker. Returns how many requests completed in the drain ("in-flight I/O drained"), and
    /// whether requests were still in flight when [`DRAIN_TIMEOUT`] ran out (the state must
    /// then not be moved: the request would be lost there and finished here).
    pub fn drain(&self) -> (u64, bool) {
        let before = self.completed.load(Ordering::SeqCst);
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        let Ok(mut w) = self.worker.lock() else {
            return (0, true);
        };
        let mut stuck = false;
        // Whatever is available now is in flight: let the worker run once more over it, even
        // if it was held (a drain of a never-started VM finds nothing).
        w.held = false;
        w.kicked = true;
        self.cv.notify_all();
        while w.kicked || w.busy {
            let now = Instant::now();
            if now >= deadline {
                tracing::warn!(vm = %self.vm, disk = self.index, "block requests still in flight after {DRAIN_TIMEOUT:?}; the guest's state must not move");
                stuck = true;
                break;
            }
            w = match self.cv.wait_timeout(w, deadline - now) {
                Ok((g, _)) => g,
                Err(_) => return (0, true),
            };
        }
        w.held = true;
        drop(w);
        (self.completed.load(Ordering::SeqCst) - before, stuck)
    }

    /// The VM runs again: the worker may go on, and looks at the queue once (requests the
    /// guest posted before a migration are served here).
    pub fn activate(&self) {
        if let Ok(t) = self.t.lock() {
            if t.driver_ok() && t.st.interrupt_status != 0 {
                // Asserted before the pause (or in the restored state): pulse the line again
                // in case the last pulse did not make it into the irqchip state.
                self.irq.raise();
            }
        }
        if let Ok(mut w) = self.worker.lock() {
            w.held = false;
            w.kicked = true;
            self.cv.notify_all();
        }
    }

    pub fn state(&self) -> BlkState {
        BlkState {
            transport: self.t.lock().map(|t| t.st.clone()).unwrap_or_default(),
            capacity_sectors: self.capacity,
        }
    }

    pub fn restore(&self, st: &BlkState) -> Result<(), VirtioError> {
        if self.file.is_some() && st.capacity_sectors != self.capacity {
            return Err(VirtioError::Mismatch(format!(
                "disk {} had {} sectors on the source, the image here has {}",
                self.index, st.capacity_sectors, self.capacity
            )));
        }
        let mut t = self
            .t
            .lock()
            .map_err(|_| VirtioError::Mismatch("disk lock poisoned".into()))?;
        t.restore(&st.transport)
            .map_err(|e| VirtioError::Mismatch(e.to_string()))
    }

    pub fn stats(&self) -> BlkStats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        BlkStats {
            path: self.path.clone(),
            reads: l(&self.reads),
            writes: l(&self.writes),
            flushes: l(&self.flushes),
            errors: l(&self.errors),
            completed: l(&self.completed),
        }
    }

    /// Stop the worker (after finishing the request it is on).
    pub fn shutdown(&self) {
        if let Ok(mut w) = self.worker.lock() {
            w.quit = true;
            self.cv.notify_all();
        }
        let h = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(h) = h {
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }
}

impl Drop for BlkDevice {
    fn drop(&mut self) {
        if let Ok(mut w) = self.worker.lock() {
            w.quit = true;
            self.cv.notify_all();
        }
    }
}

fn worker_thread(dev: Weak<BlkDevice>) {
    loop {
        let Some(d) = dev.upgrade() else { return };
        {
            let Ok(mut w) = d.worker.lock() else { return };
            loop {
                if w.quit {
                    return;
                }
                if w.kicked && !w.held {
                    break;
                }
                // Bounded wait: re-check that the device still exists now and then.
                w = match d.cv.wait_timeout(w, Duration::from_millis(500)) {
                    Ok((g, _)) => g,
                    Err(_) => return,
                };
                if w.quit {
                    return;
                }
                if (!w.kicked || w.held) && Arc::strong_count(&d) == 1 {
                    return;
                }
            }
            w.kicked = false;
            w.busy = true;
        }
        d.process();
        if let Ok(mut w) = d.worker.lock() {
            w.busy = false;
            d.cv.notify_all();
        };
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake::FakeMem;
    use super::super::mmio::tests::bring_up;
    use super::super::mmio::{F_VERSION_1, REG_QUEUE_NOTIFY, STATUS_DRIVER_OK};
    use super::super::queue::driver::TestQueue;
    use super::*;

    struct Rig {
        mem: Arc<FakeMem>,
        dev: Arc<BlkDevice>,
        q: TestQueue,
        _dir: TempDir,
        path: PathBuf,
    }

    struct TempDir(PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn rig(sectors: u64) -> Rig {
        let dir = std::env::temp_dir().join(format!(
            "ferry-blk-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("disk.img");
        let f = File::create(&path).unwrap();
        f.set_len(sectors * SECTOR).unwrap();
        let mem = FakeMem::new(1 << 20);
        let dev = BlkDevice::new(
            "t",
            0,
            Some(&path),
            mem.clone(),
            Arc::new(Waker::default()),
            Irq::detached(6),
        )
        .unwrap();
        let q = TestQueue::new(0x1000, 16);
        let st = bring_up(
            &mut dev.t.lock().unwrap(),
            F_VERSION_1 | F_FLUSH,
            &[q.state()],
        );
        assert_ne!(st & STATUS_DRIVER_OK, 0);
        dev.activate();
        Rig {
            mem,
            dev,
            q,
            _dir: TempDir(dir),
            path,
        }
    }

    fn header(kind: u32, sector: u64) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        h
    }

    impl Rig {
        /// Post a request (header at 0x20000, data at 0x30000, status at 0x40000) and wait
        /// for its completion; returns (used len, status).
        fn request(&mut self, kind: u32, sector: u64, data: Option<(&[u8], bool)>) -> (u32, u8) {
            self.mem.guest_write(0x20000, &header(kind, sector));
            self.mem.guest_write(0x40000, &[0xff]);
            let mut bufs = vec![(0x20000, 16, false)];
            if let Some((d, write)) = data {
                if !write {
                    self.mem.guest_write(0x30000, d);
                }
                bufs.push((0x30000, d.len() as u32, write));
            }
            bufs.push((0x40000, 1, true));
            self.q.post(&self.mem, &bufs);
            // Everything the device changes from here on must be marked dirty.
            let before = self.mem.snapshot();
            self.dev.mmio_write(REG_QUEUE_NOTIFY, &0u32.to_le_bytes());
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let u = self.q.take_used(&self.mem);
                if let Some(&(_, len)) = u.first() {
                    self.mem.assert_changes_dirty(&before);
                    return (len, self.mem.guest_read(0x40000, 1)[0]);
                }
                assert!(Instant::now() < deadline, "request not completed");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    #[test]
    fn write_flush_read_back_and_dirty_marking() {
        let mut r = rig(64);
        let data: Vec<u8> = (0..1024).map(|i| i as u8).collect();
        assert_eq!(r.request(T_OUT, 3, Some((&data, false))), (1, S_OK));
        assert_eq!(r.request(T_FLUSH, 0, None), (1, S_OK));
        // It is in the file.
        let f = std::fs::read(&r.path).unwrap();
        assert_eq!(&f[3 * 512..3 * 512 + 1024], &data[..]);
        // Read it back into guest memory: data and status pages are dirty (request() checks
        // that every page the device changed is marked).
        r.mem.dirty.lock().unwrap().clear();
        assert_eq!(r.request(T_IN, 3, Some((&[0u8; 1024], true))), (1025, S_OK));
        assert_eq!(r.mem.guest_read(0x30000, 1024), data);
        let dirty = r.mem.dirty.lock().unwrap().clone();
        for page in [0x30000 / 4096, 0x40000 / 4096, r.q.used / 4096] {
            assert!(dirty.contains(&page), "page {page:#x} not dirty");
        }
        let s = r.dev.stats();
        assert_eq!((s.reads, s.writes, s.flushes, s.errors), (1, 1, 1, 0));
    }

    #[test]
    fn bad_requests_get_errors_not_panics() {
        let mut r = rig(8);
        // Past the end.
        assert_eq!(r.request(T_IN, 8, Some((&[0u8; 512], true))).1, S_IOERR);
        assert_eq!(r.request(T_OUT, 7, Some((&[0u8; 1024], false))).1, S_IOERR);
        assert_eq!(
            r.request(T_IN, u64::MAX / 2, Some((&[0u8; 512], true))).1,
            S_IOERR
        );
        // Not a whole sector.
        assert_eq!(r.request(T_OUT, 0, Some((&[0u8; 100], false))).1, S_IOERR);
        // Unknown type.
        assert_eq!(r.request(99, 0, None).1, S_UNSUPP);
        // GET_ID.
        assert_eq!(r.request(T_GET_ID, 0, Some((&[0u8; 20], true))), (21, S_OK));
        assert!(r.mem.guest_read(0x30000, 20).starts_with(b"ferry-t-0"));
        // A header that is too short.
        r.mem.guest_write(0x40000, &[0xff]);
        r.q.post(&r.mem, &[(0x20000, 8, false), (0x40000, 1, true)]);
        r.dev.mmio_write(REG_QUEUE_NOTIFY, &0u32.to_le_bytes());
        std::thread::sleep(Duration::from_millis(50));
        r.dev.drain();
        assert_eq!(r.mem.guest_read(0x40000, 1)[0], S_IOERR);
        // Nothing went wrong with the file.
        assert_eq!(std::fs::read(&r.path).unwrap(), vec![0u8; 8 * 512]);
    }

    #[test]
    fn drain_completes_in_flight_requests_and_holds_the_worker() {
        let mut r = rig(64);
        // Hold the worker (as a pause does), then post without it running.
        assert_eq!(r.dev.drain(), (0, false));
        r.mem.guest_write(0x20000, &header(T_OUT, 1));
        r.mem.guest_write(0x30000, &[7u8; 512]);
        r.q.post(
            &r.mem,
            &[
                (0x20000, 16, false),
                (0x30000, 512, false),
                (0x40000, 1, true),
            ],
        );
        r.dev.mmio_write(REG_QUEUE_NOTIFY, &0u32.to_le_bytes());
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            r.q.take_used(&r.mem).is_empty(),
            "a held worker must not run"
        );
        // The drain completes it, into the file.
        assert_eq!(r.dev.drain(), (1, false));
        assert_eq!(r.q.take_used(&r.mem).len(), 1);
        assert_eq!(&std::fs::read(&r.path).unwrap()[512..1024], &[7u8; 512]);
        // State round trip on a second device over the same image.
        let st = r.dev.state();
        let d2 = BlkDevice::new(
            "t",
            0,
            Some(&r.path),
            r.mem.clone(),
            Arc::new(Waker::default()),
            Irq::detached(6),
        )
        .unwrap();
        d2.restore(&st).unwrap();
        assert_eq!(d2.state(), st);
        let mut wrong = st.clone();
        wrong.capacity_sectors += 1;
        assert!(d2.restore(&wrong).is_err());
        d2.shutdown();
        r.dev.shutdown();
    }
}
