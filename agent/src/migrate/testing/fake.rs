//! A fake guest for the engine's tests: memory is an anonymous mapping no KVM VM uses, the
//! dirty log is the memory's own write log (every write goes through
//! [`GuestMemory::write`]), a "dirtier" thread stands in for the vCPUs, and the captured state
//! is a few bytes of its own.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::migrate::guest::{IncomingGuest, SourceGuest};
use crate::vm::devices::DeviceState;
use crate::vm::memory::{standard_layout, DirtyBitmap, GuestMemory, RegionLayout, PAGE_SIZE};
use crate::vm::state::VmState;
use crate::vm::virtio::net::Forwarding;
use crate::vm::virtio::Quiesced;
use crate::vm::workload::{Heartbeat, WorkloadParams};
use crate::vm::{GuestKind, VmError, VmSpec, VmStatus};

const PAGE: usize = PAGE_SIZE as usize;

/// How a fake guest writes its memory while it runs.
#[derive(Debug, Clone, Copy)]
pub struct Dirtying {
    /// Pages written per second (0: as fast as it can).
    pub pages_per_s: u64,
    /// The pages it cycles through: `first..first + pages`.
    pub first: u64,
    pub pages: u64,
}

/// An in-memory guest: the source of a migration (filled with content, optionally dirtying)
/// or its destination (empty, filled by the receivers).
pub struct FakeGuest {
    spec: VmSpec,
    mem: Arc<GuestMemory>,
    status: Mutex<VmStatus>,
    /// Held by the dirtier while it writes: a pause takes it, so no write is in flight after.
    gate: Mutex<()>,
    throttle: AtomicU8,
    /// The highest throttle ever set.
    max_throttle: AtomicU8,
    /// "vCPU and device state": travels in the captured `VmState` (as its console tail).
    state: Mutex<Vec<u8>>,
    /// What a pause reports about the devices (a test sets `io_stuck`).
    quiesced: Mutex<Quiesced>,
    /// Times the guest was paused and resumed.
    pauses: AtomicU64,
    resumes: AtomicU64,
    destroyed: AtomicBool,
    stop: Arc<AtomicBool>,
    dirtier: Mutex<Option<JoinHandle<()>>>,
    /// Pages the dirtier wrote.
    written: AtomicU64,
}

impl std::fmt::Debug for FakeGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeGuest")
            .field("name", &self.spec.name)
            .field("status", &self.status())
            .finish()
    }
}

/// The spec of a fake guest named `name` with `mib` MiB of memory.
pub fn spec(name: &str, mib: u64) -> VmSpec {
    VmSpec {
        name: name.into(),
        memory_mib: mib,
        vcpus: 1,
        kind: GuestKind::Workload(WorkloadParams::default()),
        disks: Vec::new(),
        nics: Vec::new(),
        cpu: Default::default(),
    }
}

/// A page's content: a mix the codecs treat differently (`page % 8`: 0–2 pseudo-random,
/// 3–5 text-like, 6 one word in zeros, 7 zero), stamped with `version` so that rewrites differ.
pub fn page_content(page: u64, version: u64, out: &mut [u8]) {
    out.fill(0);
    let mut x = page
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(version.wrapping_mul(0xbf58_476d_1ce4_e5b9))
        | 1;
    match page % 8 {
        0..=2 => {
            for w in out.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes());
            }
        }
        3..=5 => {
            let text = format!("page {page} version {version} of the fake guest; ");
            for (i, b) in out.iter_mut().enumerate() {
                *b = text.as_bytes()[i % text.len()];
            }
        }
        6 => out[(page as usize * 8) % PAGE..][..8].copy_from_slice(&x.to_le_bytes()),
        _ => {}
    }
}

impl FakeGuest {
    fn build(spec: VmSpec, layout: &[RegionLayout], status: VmStatus) -> Arc<FakeGuest> {
        let mem = GuestMemory::unregistered(layout).expect("map fake guest memory");
        Arc::new(FakeGuest {
            spec,
            mem: Arc::new(mem),
            status: Mutex::new(status),
            gate: Mutex::new(()),
            throttle: AtomicU8::new(0),
            max_throttle: AtomicU8::new(0),
            state: Mutex::new(Vec::new()),
            quiesced: Mutex::new(Quiesced::default()),
            pauses: AtomicU64::new(0),
            resumes: AtomicU64::new(0),
            destroyed: AtomicBool::new(false),
            stop: Arc::new(AtomicBool::new(false)),
            dirtier: Mutex::new(None),
            written: AtomicU64::new(0),
        })
    }

    /// A running guest of `mib` MiB whose first `filled` pages hold [`page_content`] (the rest
    /// was never touched), with `state` as its captured state.
    pub fn running(name: &str, mib: u64, filled: u64, state: &[u8]) -> Arc<FakeGuest> {
        let layout = standard_layout(mib << 20).expect("layout");
        let g = Self::build(spec(name, mib), &layout, VmStatus::Running);
        let mut page = vec![0u8; PAGE];
        for p in 0..filled.min(g.pages()) {
            page_content(p, 0, &mut page);
            g.mem.write(p * PAGE_SIZE, &page).expect("fill");
        }
        *g.state.lock().unwrap() = state.to_vec();
        g
    }

    /// An empty incoming guest of the given shape (not running).
    pub fn incoming(spec: &VmSpec, regions: &[RegionLayout]) -> Arc<FakeGuest> {
        Self::build(spec.clone(), regions, VmStatus::Created)
    }

    pub fn pages(&self) -> u64 {
        self.mem.size() / PAGE_SIZE
    }

    pub fn mem(&self) -> &Arc<GuestMemory> {
        &self.mem
    }

    /// Start writing pages as `d` says, from a thread, while the guest runs (it stops writing
    /// while paused, and slows down by the throttle). Returns once it has begun.
    pub fn start_dirtying(self: &Arc<Self>, d: Dirtying) {
        let g = Arc::downgrade(self);
        let stop = self.stop.clone();
        let before = self.written();
        let join = std::thread::Builder::new()
            .name("fake-dirtier".into())
            .spawn(move || dirty_loop(g, stop, d))
            .expect("spawn dirtier");
        *self.dirtier.lock().unwrap() = Some(join);
        let until = Instant::now() + Duration::from_secs(10);
        while self.written() == before && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Stop the dirtier (and wait for it).
    pub fn stop_dirtying(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(j) = self.dirtier.lock().unwrap().take() {
            let _ = j.join();
        }
    }

    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// The throttle in force now.
    pub fn throttle(&self) -> u8 {
        self.throttle.load(Ordering::Relaxed)
    }

    pub fn max_throttle(&self) -> u8 {
        self.max_throttle.load(Ordering::Relaxed)
    }

    pub fn pauses(&self) -> u64 {
        self.pauses.load(Ordering::Relaxed)
    }

    pub fn resumes(&self) -> u64 {
        self.resumes.load(Ordering::Relaxed)
    }

    pub fn destroyed(&self) -> bool {
        self.destroyed.load(Ordering::SeqCst)
    }

    /// The state it holds (captured on the source, restored on the destination).
    pub fn state_bytes(&self) -> Vec<u8> {
        self.state.lock().unwrap().clone()
    }

    pub fn set_quiesced(&self, q: Quiesced) {
        *self.quiesced.lock().unwrap() = q;
    }

    fn set_status(&self, s: VmStatus) {
        *self.status.lock().unwrap() = s;
    }
}

impl Drop for FakeGuest {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn dirty_loop(g: std::sync::Weak<FakeGuest>, stop: Arc<AtomicBool>, d: Dirtying) {
    // Cheap rewrites: one image per kind of page, stamped with the page and a version.
    let images: Vec<Vec<u8>> = (0..8)
        .map(|k| {
            let mut p = vec![0u8; PAGE];
            page_content(k, 1, &mut p);
            p
        })
        .collect();
    let mut page = vec![0u8; PAGE];
    let mut next = 0u64;
    let mut version = 1u64;
    let mut due = Instant::now();
    const BATCH: u64 = 16;
    while !stop.load(Ordering::SeqCst) {
        let Some(g) = g.upgrade() else { return };
        let t = Instant::now();
        {
            let gate = g.gate.lock().unwrap();
            if g.status() != VmStatus::Running {
                drop(gate);
                drop(g);
                std::thread::sleep(Duration::from_millis(1));
                due = Instant::now();
                continue;
            }
            for _ in 0..BATCH {
                let p = d.first + next % d.pages.max(1);
                next += 1;
                if next.is_multiple_of(d.pages.max(1)) {
                    version += 1;
                }
                page.copy_from_slice(&images[(p % 8) as usize]);
                page[8..16].copy_from_slice(&(p << 32 | version).to_le_bytes());
                if g.mem.write(p * PAGE_SIZE, &page).is_err() {
                    return;
                }
            }
            g.written.fetch_add(BATCH, Ordering::Relaxed);
        }
        // Throttled, it is held back that share of the time, as the vCPUs would be.
        let pct = u64::from(g.throttle.load(Ordering::Relaxed).min(99));
        drop(g);
        if d.pages_per_s > 0 {
            let rate = (d.pages_per_s * (100 - pct) / 100).max(1);
            due += Duration::from_secs_f64(BATCH as f64 / rate as f64);
            let now = Instant::now();
            match due.checked_duration_since(now) {
                Some(ahead) => std::thread::sleep(ahead),
                // Far behind (starved): no burst to catch up.
                None if now - due > Duration::from_millis(20) => due = now,
                None => {}
            }
        } else if pct > 0 {
            let busy = t.elapsed().max(Duration::from_micros(20));
            std::thread::sleep(busy * pct as u32 / (100 - pct as u32));
        }
    }
}

impl SourceGuest for FakeGuest {
    fn spec(&self) -> &VmSpec {
        &self.spec
    }
    fn memory(&self) -> Arc<GuestMemory> {
        self.mem.clone()
    }
    fn set_dirty_logging(&self, on: bool) -> Result<(), VmError> {
        Ok(self.mem.set_dirty_logging_all(on)?)
    }
    fn take_dirty(&self) -> Result<DirtyBitmap, VmError> {
        Ok(self.mem.take_dirty()?)
    }
    fn populated(&self) -> DirtyBitmap {
        self.mem.populated()
    }
    fn set_throttle(&self, pct: u8) {
        self.throttle.store(pct, Ordering::Relaxed);
        self.max_throttle.fetch_max(pct, Ordering::Relaxed);
    }
    fn pause(&self) -> Result<(), VmError> {
        match self.status() {
            VmStatus::Running => {}
            VmStatus::Paused | VmStatus::Created => return Ok(()),
            s => return Err(VmError::State(s, "only a running VM can be paused")),
        }
        self.set_status(VmStatus::Paused);
        // Wait for a write in flight.
        drop(self.gate.lock().unwrap());
        self.pauses.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn resume(&self) -> Result<(), VmError> {
        match self.status() {
            VmStatus::Paused | VmStatus::Created => {
                self.set_status(VmStatus::Running);
                self.resumes.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            VmStatus::Running => Ok(()),
            s => Err(VmError::State(s, "only a paused VM can be resumed")),
        }
    }
    fn status(&self) -> VmStatus {
        *self.status.lock().unwrap()
    }
    fn last_quiesced(&self) -> Quiesced {
        *self.quiesced.lock().unwrap()
    }
    fn capture_state(&self) -> Result<VmState, VmError> {
        let st = self.status();
        if st == VmStatus::Running {
            return Err(VmError::State(st, "pause it before capturing its state"));
        }
        Ok(VmState {
            spec: self.spec.clone(),
            regions: self.mem.layout(),
            vcpus: Vec::new(),
            irqchips: Vec::new(),
            clock: None,
            devices: DeviceState {
                console_tail: self.state_bytes(),
                ..DeviceState::default()
            },
        })
    }
    fn take_for_forwarding(&self) -> Vec<(usize, Forwarding)> {
        Vec::new()
    }
}

impl IncomingGuest for FakeGuest {
    fn spec(&self) -> &VmSpec {
        &self.spec
    }
    fn memory(&self) -> Arc<GuestMemory> {
        self.mem.clone()
    }
    fn nic_macs(&self) -> Vec<[u8; 6]> {
        Vec::new()
    }
    fn deliver_forwarded(&self, _nic: usize, _frames: Vec<Vec<u8>>) {}
    fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        if state.regions != self.mem.layout() {
            return Err(VmError::Mismatch("memory layout differs".into()));
        }
        *self.state.lock().unwrap() = state.devices.console_tail.clone();
        Ok(())
    }
    fn resume(&self) -> Result<(), VmError> {
        SourceGuest::resume(self)
    }
    fn heartbeats(&self) -> Option<Vec<Heartbeat>> {
        None
    }
    fn tsc_khz(&self) -> u32 {
        1_000_000
    }
    fn destroy(&self) {
        self.stop_dirtying();
        self.set_status(VmStatus::Stopped);
        self.destroyed.store(true, Ordering::SeqCst);
    }
}

/// The first page (index) where two guests' memories differ, if any.
pub fn first_difference(a: &GuestMemory, b: &GuestMemory) -> Option<u64> {
    assert_eq!(a.layout(), b.layout(), "the layouts differ");
    let (mut x, mut y) = (vec![0u8; PAGE], vec![0u8; PAGE]);
    for r in a.layout() {
        for p in 0..r.pages() {
            let gpa = r.gpa + p * PAGE_SIZE;
            a.read(gpa, &mut x).expect("read a");
            b.read(gpa, &mut y).expect("read b");
            if x != y {
                return Some(gpa / PAGE_SIZE);
            }
        }
    }
    None
}
