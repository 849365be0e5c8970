//! vCPU threads: one OS thread per vCPU runs `KVM_RUN` and handles exits; the control plane
//! pauses, resumes, captures and restores it through a small mailbox.
//!
//! Pausing must not wait for the guest's next exit: the control plane sets the wanted state and
//! sends the thread a signal ([`kick_signal`]). The handler sets `immediate_exit` in the vCPU's
//! `kvm_run` page, so `KVM_RUN` returns `EINTR` whether the signal lands inside the ioctl or just
//! before it. A thread sleeping on a guest yield is woken through its condition variable.
//!
//! State capture and restore run on the vCPU's own thread while it is parked.

use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};

use super::devices::{Devices, PortAction};
use super::state::VcpuState;

mod kvm_state;

pub use kvm_state::{capture, restore};

/// What the control plane wants a vCPU to do.
const WANT_RUN: u8 = 0;
const WANT_PAUSE: u8 = 1;
const WANT_STOP: u8 = 2;

/// Errors of a vCPU operation.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {id}: {what} failed: {source}")]
    Kvm {
        id: u32,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {id}: KVM accepted only {done} of {total} MSRs (first refused: {index:#x})")]
    Msrs {
        id: u32,
        done: usize,
        total: usize,
        index: u32,
    },
    #[error("vCPU {0} did not respond within {1:?}; the guest may be stuck in the host kernel")]
    Timeout(u32, Duration),
    #[error("vCPU {0} thread is gone")]
    Gone(u32),
    #[error("vCPU {0} is running; pause the VM first")]
    NotParked(u32),
    #[error("could not start the vCPU {0} thread: {1}")]
    Spawn(u32, std::io::Error),
}

thread_local! {
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The real-time signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN() + 4
}

extern "C" fn on_kick(_sig: libc::c_int, _info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // Only async-signal-safe work: a volatile store into this thread's kvm_run page.
    let p = KVM_RUN_PTR.with(Cell::get);
    if !p.is_null() {
        // SAFETY: `p` was set by this very thread from its live VcpuFd's kvm_run mapping and is
        // cleared before that VcpuFd is dropped; the mapping is valid while the thread runs.
        unsafe { std::ptr::addr_of_mut!((*p).immediate_exit).write_volatile(1) };
    }
}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid starting value; we set a handler that only does
        // async-signal-safe work, and no SA_RESTART, so KVM_RUN returns EINTR.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(kick_signal(), &sa, std::ptr::null_mut()) != 0 {
                tracing::error!(
                    error = %std::io::Error::last_os_error(),
                    "could not install the vCPU kick signal handler; pausing will be slow"
                );
            }
        }
    });
}

enum Request {
    Capture,
    Restore(Box<VcpuState>),
}

enum Response {
    Captured(Result<Box<VcpuState>, VcpuError>),
    Restored(Result<(), VcpuError>),
}

#[derive(Default)]
struct Ctl {
    parked: bool,
    exited: bool,
    /// A device completed work for the guest since it last yielded: the next (or current)
    /// yield ends at once.
    woken: bool,
    request: Option<Request>,
    response: Option<Response>,
}

/// Why a guest stopped on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub vcpu: u32,
    pub reason: String,
}

/// Shared between the VM (control plane) and its vCPU threads.
pub struct VmShared {
    pub devices: Arc<Devices>,
    pub tsc_khz: u32,
    /// Auto-converge: percent of each [`THROTTLE_PERIOD`] the vCPUs are held back (0 = off).
    pub throttle: std::sync::atomic::AtomicU8,
    /// The first fault of any vCPU; the VM is `crashed` once set.
    pub fault: Mutex<Option<Fault>>,
    /// All vCPU handles, for the crash path to pause the siblings.
    pub vcpus: OnceLock<Vec<Arc<VcpuShared>>>,
}

/// Control block of one vCPU.
pub struct VcpuShared {
    pub id: u32,
    want: AtomicU8,
    ctl: Mutex<Ctl>,
    cv: Condvar,
    thread: OnceLock<libc::pthread_t>,
}

impl VcpuShared {
    fn set_want(&self, w: u8) {
        if let Ok(_g) = self.ctl.lock() {
            self.want.store(w, Ordering::SeqCst);
            self.cv.notify_all();
        }
        self.kick();
    }

    fn kick(&self) {
        if let Some(t) = self.thread.get() {
            // SAFETY: the pthread_t belongs to a thread we spawned and have not joined (the
            // JoinHandle is held by `Vcpu` until after the last kick); signalling it is harmless.
            unsafe {
                libc::pthread_kill(*t, kick_signal());
            }
        }
    }

    /// Ask the vCPU to pause; returns once it is parked (or has exited), within `timeout`.
    pub fn pause(&self, timeout: Duration) -> Result<(), VcpuError> {
        self.set_want(WANT_PAUSE);
        let deadline = Instant::now() + timeout;
        let mut g = self.ctl.lock().map_err(|_| VcpuError::Gone(self.id))?;
        while !g.parked && !g.exited {
            let now = Instant::now();
            if now >= deadline {
                return Err(VcpuError::Timeout(self.id, timeout));
            }
            // Re-kick now and then: a signal can race with the thread's own state changes.
            let wait = (deadline - now).min(Duration::from_millis(20));
            g = self
                .cv
                .wait_timeout(g, wait)
                .map_err(|_| VcpuError::Gone(self.id))?
                .0;
            if !g.parked && !g.exited {
                self.kick();
            }
        }
        Ok(())
    }

    pub fn resume(&self) {
        self.set_want(WANT_RUN);
    }

    /// End the vCPU's current yield early (a device has work for the guest), or the next one
    /// if it is not yielding now.
    pub fn wake(&self) {
        if let Ok(mut g) = self.ctl.lock() {
            g.woken = true;
            self.cv.notify_all();
        }
    }

    /// Wait until the thread has left its parked state (it is back in `KVM_RUN`), up to
    /// `timeout`; false if it did not.
    pub fn wait_unparked(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let Ok(mut g) = self.ctl.lock() else {
            return false;
        };
        while g.parked && !g.exited {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = match self.cv.wait_timeout(g, deadline - now) {
                Ok(r) => r.0,
                Err(_) => return false,
            };
        }
        true
    }

    pub fn stop(&self) {
        self.set_want(WANT_STOP);
    }

    fn call(&self, req: Request, timeout: Duration) -> Result<Response, VcpuError> {
        self.submit(req)?;
        self.wait_response(timeout)
    }

    /// Hand a request to the parked vCPU thread (does not wait).
    fn submit(&self, req: Request) -> Result<(), VcpuError> {
        let mut g = self.ctl.lock().map_err(|_| VcpuError::Gone(self.id))?;
        // A thread that was just spawned (or just told to pause) is on its way to park: give it
        // a moment rather than refusing (a restore right after creating the VM raced here).
        let deadline = Instant::now() + Duration::from_secs(2);
        while !g.parked && !g.exited && self.want.load(Ordering::SeqCst) != WANT_RUN {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            g = self
                .cv
                .wait_timeout(g, deadline - now)
                .map_err(|_| VcpuError::Gone(self.id))?
                .0;
        }
        if g.exited {
            return Err(VcpuError::Gone(self.id));
        }
        if !g.parked {
            return Err(VcpuError::NotParked(self.id));
        }
        g.request = Some(req);
        g.response = None;
        self.cv.notify_all();
        Ok(())
    }

    fn wait_response(&self, timeout: Duration) -> Result<Response, VcpuError> {
        let mut g = self.ctl.lock().map_err(|_| VcpuError::Gone(self.id))?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = g.response.take() {
                return Ok(r);
            }
            if g.exited {
                return Err(VcpuError::Gone(self.id));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(VcpuError::Timeout(self.id, timeout));
            }
            g = self
                .cv
                .wait_timeout(g, deadline - now)
                .map_err(|_| VcpuError::Gone(self.id))?
                .0;
        }
    }

    /// Start capturing a parked vCPU's state on its thread; finish with [`Self::capture_wait`].
    /// Lets all vCPUs of a VM capture at once.
    pub fn capture_start(&self) -> Result<(), VcpuError> {
        self.submit(Request::Capture)
    }

    pub fn capture_wait(&self) -> Result<Box<VcpuState>, VcpuError> {
        match self.wait_response(Duration::from_secs(5))? {
            Response::Captured(r) => r,
            Response::Restored(_) => Err(VcpuError::Gone(self.id)),
        }
    }

    /// Capture the full state of a parked vCPU.
    pub fn capture(&self) -> Result<Box<VcpuState>, VcpuError> {
        match self.call(Request::Capture, Duration::from_secs(5))? {
            Response::Captured(r) => r,
            Response::Restored(_) => Err(VcpuError::Gone(self.id)),
        }
    }

    /// Start loading a state into a parked vCPU; finish with [`Self::restore_wait`].
    pub fn restore_start(&self, st: Box<VcpuState>) -> Result<(), VcpuError> {
        self.submit(Request::Restore(st))
    }

    pub fn restore_wait(&self) -> Result<(), VcpuError> {
        match self.wait_response(Duration::from_secs(5))? {
            Response::Restored(r) => r,
            Response::Captured(_) => Err(VcpuError::Gone(self.id)),
        }
    }

    /// Load a full state into a parked vCPU.
    pub fn restore(&self, st: Box<VcpuState>) -> Result<(), VcpuError> {
        match self.call(Request::Restore(st), Duration::from_secs(5))? {
            Response::Restored(r) => r,
            Response::Captured(_) => Err(VcpuError::Gone(self.id)),
        }
    }
}

/// A running vCPU thread.
pub struct Vcpu {
    pub shared: Arc<VcpuShared>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Vcpu {
    /// Start the thread for `fd`, parked (it runs once resumed).
    pub fn spawn(
        id: u32,
        fd: VcpuFd,
        msr_list: Arc<Vec<u32>>,
        vm: Arc<VmShared>,
    ) -> Result<Vcpu, VcpuError> {
        install_kick_handler();
        let shared = Arc::new(VcpuShared {
            id,
            want: AtomicU8::new(WANT_PAUSE),
            ctl: Mutex::new(Ctl::default()),
            cv: Condvar::new(),
            thread: OnceLock::new(),
        });
        let s2 = shared.clone();
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || run_thread(fd, s2, msr_list, vm))
            .map_err(|e| VcpuError::Spawn(id, e))?;
        {
            use std::os::unix::thread::JoinHandleExt;
            let _ = shared.thread.set(handle.as_pthread_t());
        }
        Ok(Vcpu {
            shared,
            handle: Some(handle),
        })
    }
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        self.shared.stop();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn run_thread(mut fd: VcpuFd, me: Arc<VcpuShared>, msr_list: Arc<Vec<u32>>, vm: Arc<VmShared>) {
    let run_ptr: *mut kvm_run = fd.get_kvm_run();
    KVM_RUN_PTR.with(|p| p.set(run_ptr));
    let span = tracing::debug_span!("vcpu", vm = %vm.devices.vm_name, id = me.id);
    let _e = span.enter();
    let mut ran_since = Instant::now();
    // After a port or MMIO exit, KVM finishes the instruction only on the next KVM_RUN; the
    // state is not consistent (nor complete for a capture) until then.
    let mut pending_io = false;
    loop {
        throttle_point(&me, &vm, &mut ran_since);
        match me.want.load(Ordering::SeqCst) {
            WANT_RUN => {}
            WANT_STOP => break,
            _ => {
                if pending_io && vm.fault.lock().map(|f| f.is_none()).unwrap_or(false) {
                    complete_pending_io(&mut fd, &me, &vm);
                }
                pending_io = false;
                if !park(&mut fd, &me, &msr_list) {
                    break;
                }
                continue;
            }
        }
        match fd.run() {
            Ok(exit) => {
                pending_io = matches!(
                    exit,
                    VcpuExit::IoIn(..)
                        | VcpuExit::IoOut(..)
                        | VcpuExit::MmioRead(..)
                        | VcpuExit::MmioWrite(..)
                );
                if let Err(reason) = handle_exit(exit, &me, &vm) {
                    fault(&me, &vm, reason);
                }
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // KVM completed any pending I/O before it saw the signal.
                pending_io = false;
                fd.set_kvm_immediate_exit(0);
                vm.devices
                    .counters
                    .interrupted
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Err(e) => fault(&me, &vm, format!("KVM_RUN failed: {e}")),
        }
    }
    KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
    if let Ok(mut g) = me.ctl.lock() {
        g.exited = true;
        g.parked = false;
        me.cv.notify_all();
    }
}

/// Re-enter KVM_RUN with `immediate_exit` set: KVM completes the I/O instruction userspace just
/// handled and returns without running guest code (the KVM API's rule before saving state).
fn complete_pending_io(fd: &mut VcpuFd, me: &VcpuShared, vm: &VmShared) {
    for _ in 0..4 {
        fd.set_kvm_immediate_exit(1);
        let r = fd.run();
        let again = match r {
            Err(_) => false,
            Ok(exit) => {
                let io = matches!(
                    exit,
                    VcpuExit::IoIn(..)
                        | VcpuExit::IoOut(..)
                        | VcpuExit::MmioRead(..)
                        | VcpuExit::MmioWrite(..)
                );
                if let Err(reason) = handle_exit(exit, me, vm) {
                    fault(me, vm, reason);
                    false
                } else {
                    io
                }
            }
        };
        fd.set_kvm_immediate_exit(0);
        if !again {
            return;
        }
    }
}

fn fault(me: &VcpuShared, vm: &VmShared, reason: String) {
    if let Ok(mut f) = vm.fault.lock() {
        if f.is_none() {
            tracing::warn!(vm = %vm.devices.vm_name, vcpu = me.id, %reason, "guest crashed; its vCPUs are stopped");
            *f = Some(Fault {
                vcpu: me.id,
                reason,
            });
        }
    }
    // Stop every vCPU of the VM where it is (this one included): a crashed guest does not run.
    if let Some(all) = vm.vcpus.get() {
        for v in all {
            if v.id != me.id {
                v.want.store(WANT_PAUSE, Ordering::SeqCst);
                v.kick();
                if let Ok(_g) = v.ctl.lock() {
                    v.cv.notify_all();
                }
            }
        }
    }
    me.want.store(WANT_PAUSE, Ordering::SeqCst);
}

/// Wait while paused, serving capture/restore requests. Returns false when told to stop.
fn park(fd: &mut VcpuFd, me: &VcpuShared, msr_list: &[u32]) -> bool {
    let Ok(mut g) = me.ctl.lock() else {
        return false;
    };
    g.parked = true;
    me.cv.notify_all();
    loop {
        if let Some(req) = g.request.take() {
            let resp = match req {
                Request::Capture => Response::Captured(capture(fd, me.id, msr_list).map(Box::new)),
                Request::Restore(st) => Response::Restored(restore(fd, me.id, &st)),
            };
            g.response = Some(resp);
            me.cv.notify_all();
            continue;
        }
        match me.want.load(Ordering::SeqCst) {
            WANT_RUN => {
                g.parked = false;
                me.cv.notify_all();
                // A kick that arrived while parked must not cut the next run short.
                fd.set_kvm_immediate_exit(0);
                return true;
            }
            WANT_STOP => return false,
            _ => {}
        }
        g = match me.cv.wait(g) {
            Ok(g) => g,
            Err(_) => return false,
        };
    }
}

fn handle_exit(exit: VcpuExit<'_>, me: &VcpuShared, vm: &VmShared) -> Result<(), String> {
    let dev = &vm.devices;
    match exit {
        VcpuExit::IoOut(port, data) => {
            if let PortAction::Yield(cycles) = dev.io_out(port, data) {
                guest_yield(me, cycles, vm.tsc_khz);
            }
            Ok(())
        }
        VcpuExit::IoIn(port, data) => {
            dev.io_in(port, data);
            Ok(())
        }
        VcpuExit::MmioRead(addr, data) => {
            dev.mmio_read(addr, data);
            Ok(())
        }
        VcpuExit::MmioWrite(addr, data) => {
            dev.mmio_write(addr, data);
            Ok(())
        }
        VcpuExit::Shutdown => Err("triple fault (KVM_EXIT_SHUTDOWN)".into()),
        VcpuExit::Hlt => Err("halted with no way to wake (KVM_EXIT_HLT)".into()),
        VcpuExit::FailEntry(reason, cpu) => Err(format!(
            "KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})"
        )),
        VcpuExit::InternalError => Err("KVM internal error (emulation failure)".into()),
        VcpuExit::SystemEvent(kind, _) => Err(format!("guest system event {kind}")),
        VcpuExit::Intr | VcpuExit::IrqWindowOpen => {
            dev.counters.other.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        other => {
            dev.counters.other.fetch_add(1, Ordering::Relaxed);
            Err(format!("unexpected exit {other:?}"))
        }
    }
}

/// Shortest sleep on a guest yield. A paced guest that asks for less falls a little behind and
/// catches up in a burst (its pacing forgives up to 5 ms of debt), so its average rate holds
/// while the host sees at most ~500 yields per second per vCPU instead of one per page. (Each
/// yield costs ~100 us of host CPU on this lab's paravirtual KVM, an exit alone ~22 us.)
pub const YIELD_QUANTUM_US: u64 = 2_000;
/// Longest sleep on a guest yield (an idle guest yields "forever").
pub const YIELD_MAX_US: u64 = 20_000;

/// The period auto-converge throttling works in: a vCPU throttled by p % runs (100 - p) % of
/// each period and sleeps the rest. 50 ms rather than QEMU's 10 ms: a guest that catches up on
/// lost time after each sleep (as the paced workload does, up to 5 ms of debt) would otherwise
/// keep most of its dirty rate whatever the percentage. A kicker thread ([`kick_all`]) forces exits from guests
/// that never exit on their own.
pub const THROTTLE_PERIOD: Duration = Duration::from_millis(50);

fn throttle_point(me: &VcpuShared, vm: &VmShared, ran_since: &mut Instant) {
    let pct = u32::from(vm.throttle.load(Ordering::Relaxed).min(99));
    if pct == 0 {
        *ran_since = Instant::now();
        return;
    }
    if ran_since.elapsed() < THROTTLE_PERIOD * (100 - pct) / 100 {
        return;
    }
    sleep_interruptible(me, THROTTLE_PERIOD * pct / 100, false);
    *ran_since = Instant::now();
}

/// Kick every vCPU of a VM out of KVM_RUN (they go straight back in unless told otherwise).
pub fn kick_all(vm: &VmShared) {
    if let Some(all) = vm.vcpus.get() {
        for v in all {
            v.kick();
        }
    }
}

/// The guest asked to wait `cycles` TSC cycles: sleep, but wake at once for a pause or stop.
fn guest_yield(me: &VcpuShared, cycles: u32, tsc_khz: u32) {
    let us = u64::from(cycles) * 1000 / u64::from(tsc_khz.max(1));
    sleep_interruptible(
        me,
        Duration::from_micros(us.clamp(YIELD_QUANTUM_US, YIELD_MAX_US)),
        true,
    );
}

/// Sleep up to `d` on the vCPU's condition variable; a pause or stop request ends it early, and
/// with `wakeable` so does a device's [`VcpuShared::wake`].
fn sleep_interruptible(me: &VcpuShared, d: Duration, wakeable: bool) {
    let deadline = Instant::now() + d;
    let Ok(mut g) = me.ctl.lock() else { return };
    while me.want.load(Ordering::SeqCst) == WANT_RUN {
        if wakeable && g.woken {
            g.woken = false;
            break;
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        g = match me.cv.wait_timeout(g, deadline - now) {
            Ok((g, _)) => g,
            Err(_) => return,
        };
    }
}
