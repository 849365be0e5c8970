//! The KVM guest runtime: a guest's memory, its vCPU threads, its devices, and its complete state.
//!
//! ```text
//!  Hypervisor (/dev/kvm, probed once:                 hypervisor.rs
//!    │         MSR list, CPUID, TSC)
//!    └─ Vm ── GuestMemory (regions + dirty log;       memory.rs
//!         │     anonymous, or memfds a second process maps)
//!         ├── Vcpu threads (KVM_RUN, pause, state)     vcpu.rs
//!         │     └ CPUID the guest sees (policy, masks) cpuid.rs
//!         ├── Devices (serial console, yield port)     devices.rs
//!         │     └ virtio-mmio net (tap) and blk (image) virtio/
//!         └── VmState (versioned, serializable)        state.rs
//!  guest kinds: workload (generated CPL3 program)      workload.rs
//!               raw (flat image in real mode)          raw.rs
//!               service (Rust program with virtio)     service.rs
//!  VmSpec (what a VM is, shape checks), VmStatus       spec.rs
//! ```
//!
//! Only the `service` kind gets virtio devices for its NICs and disks (the other kinds have no
//! drivers: their `--nic` is a MAC the agent announces, their `--disk` a file). Devices attach to
//! host backends given as a [`virtio::DeviceEnv`] (port group bridges, image paths) that the agent
//! resolves from its configuration.
//!
//! A [`Vm`] is always created with its vCPUs parked: [`Vm::start`] runs them. A guest is loaded
//! by its kind's loader, which writes memory and returns how each vCPU begins ([`BootVcpu`]); a
//! `linux` kind (bzImage + initrd + cmdline) fits the same shape: its loader writes the kernel,
//! the zero page and the command line and returns a 64-bit entry state.

pub mod cpuid;
pub mod devices;
mod hypervisor;
pub mod memory;
pub mod raw;
pub mod service;
pub mod snapshot;
mod spec;
pub mod state;
pub mod vcpu;
pub mod virtio;
pub mod workload;
pub mod x86;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_irqchip;

use cpuid::CpuidEntry;
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use devices::Devices;
use memory::{GuestMemory, MemoryError, RegionLayout};
use state::{VcpuState, VmState};
use vcpu::{Fault, Vcpu, VcpuError, VmShared};

pub use hypervisor::{to_entries, Hypervisor};
pub use raw::{RawMode, RawParams};
pub use service::ServiceParams;
pub use spec::{parse_mac, DiskSpec, GuestKind, NicSpec, VmSpec, VmStatus};
pub use virtio::DeviceEnv;
pub use workload::{Profile, WorkloadParams};

/// How long a pause may take before it is reported as stuck.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Most memory a VM may have: what the identity page tables map, less the hole below 4 GiB.
pub const MAX_MEMORY_MIB: u64 = (x86::MAX_MAPPED >> 20) - 1024;
/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u32 = workload::MAX_VCPUS;
/// Highest dirty rate a workload guest may ask for, MiB/s (1 TiB/s: far above any memory bus).
pub const MAX_DIRTY_RATE_MIB: u64 = 1 << 20;

/// Errors of the guest runtime.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0}; run as root on a host with KVM enabled")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM: {what} failed: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("a VM needs 1 to {MAX_VCPUS} vCPUs, not {0}")]
    Vcpus(u32),
    #[error("memory must be a positive multiple of 2 MiB, not {0} MiB")]
    MemorySize(u64),
    #[error("memory of {0} MiB is more than a VM can have here (at most {MAX_MEMORY_MIB} MiB)")]
    MemoryTooLarge(u64),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Workload(#[from] workload::WorkloadError),
    #[error(transparent)]
    Raw(#[from] raw::RawError),
    #[error(transparent)]
    Service(#[from] service::ServiceError),
    #[error(transparent)]
    Virtio(#[from] virtio::VirtioError),
    #[error("VM is {0}; {1}")]
    State(VmStatus, &'static str),
    #[error("the saved state does not fit this VM: {0}")]
    Mismatch(String),
    #[error("{0}")]
    Device(String),
    /// A request that cannot be right (an API 400): the message says what to change.
    #[error("{0}")]
    Spec(String),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

impl Vm {
    /// The CPUID the guest sees (its first vCPU's).
    pub fn cpuid(&self) -> Vec<CpuidEntry> {
        self.guest_cpuid
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default()
    }
}

/// How one vCPU begins.
#[derive(Debug, Clone, Copy)]
pub enum BootVcpu {
    /// 64-bit long mode at CPL3 with the scaffolding of [`x86`].
    LongModeUser {
        rip: u64,
        rsp: u64,
        rdi: u64,
        rsi: u64,
    },
    /// 16-bit real mode at `cs:ip`.
    RealMode { cs: u16, ip: u16, sp: u16 },
    /// Not started (application processors of a guest that starts them itself).
    Waiting,
}

/// Per-vCPU heartbeat with rates, for `inspect`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VcpuReport {
    pub id: u32,
    pub heartbeat: Option<workload::Heartbeat>,
}

/// A guest on this host.
pub struct Vm {
    pub spec: VmSpec,
    // Field order matters for Drop: vCPU threads end before memory and the VM fd go.
    threads: Mutex<Vec<Vcpu>>,
    vcpus: Vec<Arc<vcpu::VcpuShared>>,
    shared: Arc<VmShared>,
    memory: Arc<GuestMemory>,
    vm_fd: Arc<VmFd>,
    status: Mutex<VmStatus>,
    last_pause_ns: AtomicU64,
    last_resume_ns: AtomicU64,
    /// What the last pause did to the devices.
    last_quiesced: Mutex<virtio::Quiesced>,
    /// The CPUID the guest sees (vCPU 0), for migration checks.
    guest_cpuid: Mutex<Vec<CpuidEntry>>,
    /// The CPUID Ferry set on each vCPU. Captured state records these rather than what
    /// KVM_GET_CPUID2 returns: on the lab's paravirtual KVM that returns the host's raw values.
    set_cpuids: Mutex<Vec<Vec<kvm_bindings::kvm_cpuid_entry2>>>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("spec", &self.spec)
            .field("status", &self.status())
            .finish()
    }
}

impl Vm {
    /// Build a VM of `spec`'s shape with empty memory, vCPUs created and parked, not loaded.
    fn build(
        hv: &Hypervisor,
        spec: VmSpec,
        regions: &[RegionLayout],
        env: &DeviceEnv,
    ) -> Result<(Vm, Vec<kvm_ioctls::VcpuFd>), VmError> {
        spec.validate()?;
        let vm_fd = Arc::new(hv.kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
        if let Err(e) = vm_fd.set_tss_address(0xfffb_d000) {
            tracing::debug!(error = %e, "KVM_SET_TSS_ADDR not needed here");
        }
        vm_fd
            .create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let backing = if hv.memfd_backing.load(Ordering::Relaxed) {
            memory::Backing::Memfd
        } else {
            memory::Backing::Anonymous
        };
        let memory = Arc::new(GuestMemory::with_backing(
            vm_fd.clone(),
            regions,
            hv.huge_pages.load(Ordering::Relaxed),
            backing,
        )?);
        // Every kind may yield on the port (a raw long-user image sleeps with `out 0xf0, eax`).
        let yield_port = Some(workload::YIELD_PORT);
        let devices = if spec.kind.has_virtio() {
            let waker = Arc::new(virtio::Waker::default());
            let macs: Vec<[u8; 6]> = spec
                .nics
                .iter()
                .map(|n| parse_mac(&n.mac).unwrap_or([0x52, 0x54, 0, 0, 0, 0]))
                .collect();
            let mem: Arc<dyn virtio::DeviceMemory> = memory.clone();
            let v = virtio::VirtioDevices::new(
                &spec.name,
                &macs,
                spec.disks.len(),
                env,
                mem,
                waker.clone(),
            )?;
            // Every VM (a fresh one, a restore's, a migration's destination) is built here,
            // so each gets its devices' irqfds; they stay registered across pauses and
            // restores into the same VM.
            for (fd, gsi) in v.irqfds() {
                vm_fd
                    .register_irqfd(fd, gsi)
                    .map_err(kvm_err("KVM_IRQFD"))?;
            }
            Devices::with_virtio(&spec.name, yield_port, v, waker)
        } else {
            Devices::new(&spec.name, yield_port)
        };
        let shared = Arc::new(VmShared {
            devices: Arc::new(devices),
            tsc_khz: hv.tsc_khz,
            throttle: std::sync::atomic::AtomicU8::new(0),
            fault: Mutex::new(None),
            vcpus: OnceLock::new(),
        });
        let mut fds = Vec::new();
        let guest_cpuid = to_entries(hv.vcpu_cpuid(0, &spec.cpu)?.as_slice());
        let mut set_cpuids = Vec::new();
        for id in 0..spec.vcpus {
            let fd = vm_fd
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let c = hv.vcpu_cpuid(id, &spec.cpu)?;
            fd.set_cpuid2(&c).map_err(kvm_err("KVM_SET_CPUID2"))?;
            set_cpuids.push(c.as_slice().to_vec());
            fds.push(fd);
        }
        Ok((
            Vm {
                spec,
                threads: Mutex::new(Vec::new()),
                vcpus: Vec::new(),
                shared,
                memory,
                vm_fd,
                status: Mutex::new(VmStatus::Created),
                last_pause_ns: AtomicU64::new(0),
                last_resume_ns: AtomicU64::new(0),
                last_quiesced: Mutex::new(virtio::Quiesced::default()),
                guest_cpuid: Mutex::new(guest_cpuid),
                set_cpuids: Mutex::new(set_cpuids),
            },
            fds,
        ))
    }

    fn spawn(&mut self, hv: &Hypervisor, fds: Vec<kvm_ioctls::VcpuFd>) -> Result<(), VmError> {
        let mut threads = Vec::new();
        for (id, fd) in fds.into_iter().enumerate() {
            threads.push(Vcpu::spawn(
                id as u32,
                fd,
                hv.msr_list.clone(),
                self.shared.clone(),
            )?);
        }
        self.vcpus = threads.iter().map(|v| v.shared.clone()).collect();
        let _ = self.shared.vcpus.set(self.vcpus.clone());
        let weak = Arc::downgrade(&self.shared);
        self.shared.devices.waker.set(Box::new(move || {
            if let Some(all) = weak.upgrade().as_ref().and_then(|s| s.vcpus.get()) {
                for v in all {
                    v.wake();
                }
            }
        }));
        if let Ok(mut t) = self.threads.lock() {
            *t = threads;
        }
        Ok(())
    }

    /// Create and load a VM from its spec; its vCPUs are parked until [`Vm::start`]. Its
    /// devices have no host backends (see [`Vm::create_in`]).
    pub fn create(hv: &Hypervisor, spec: VmSpec) -> Result<Vm, VmError> {
        Self::create_in(hv, spec, &DeviceEnv::default())
    }

    /// Create and load a VM whose devices attach to the backends of `env`.
    pub fn create_in(hv: &Hypervisor, spec: VmSpec, env: &DeviceEnv) -> Result<Vm, VmError> {
        let regions = memory::standard_layout(spec.memory_mib << 20)?;
        let (mut vm, fds) = Self::build(hv, spec, &regions, env)?;
        let boots: Vec<BootVcpu> = match &vm.spec.kind {
            GuestKind::Workload(p) => workload::load(&vm.memory, vm.spec.vcpus, p, hv.tsc_khz)?
                .into_iter()
                .map(|e| BootVcpu::LongModeUser {
                    rip: e.rip,
                    rsp: e.rsp,
                    rdi: e.rdi,
                    rsi: e.rsi,
                })
                .collect(),
            GuestKind::Raw(p) => raw::load(&vm.memory, vm.spec.vcpus, p)?,
            GuestKind::Service(p) => service::load(&vm.memory, &vm.spec, p, hv.tsc_khz)?,
        };
        for (fd, boot) in fds.iter().zip(&boots) {
            set_boot_state(fd, boot)?;
        }
        vm.spawn(hv, fds)?;
        tracing::info!(vm = %vm.spec.name, kind = vm.spec.kind.name(), memory_mib = vm.spec.memory_mib, vcpus = vm.spec.vcpus, "vm created");
        Ok(vm)
    }

    /// Create a VM of the state's shape with empty memory; fill the memory through
    /// [`Vm::memory`], then call [`Vm::restore_state`].
    pub fn create_for_restore(hv: &Hypervisor, state: &VmState) -> Result<Vm, VmError> {
        Self::create_for_restore_in(hv, state, &DeviceEnv::default())
    }

    /// [`Vm::create_for_restore`] with device backends.
    pub fn create_for_restore_in(
        hv: &Hypervisor,
        state: &VmState,
        env: &DeviceEnv,
    ) -> Result<Vm, VmError> {
        if state.vcpus.len() != state.spec.vcpus as usize {
            return Err(VmError::Mismatch(format!(
                "{} vCPU states for {} vCPUs",
                state.vcpus.len(),
                state.spec.vcpus
            )));
        }
        Self::create_empty_in(hv, state.spec.clone(), &state.regions, env)
    }

    /// Create a VM of a given shape with empty memory and parked vCPUs (an incoming
    /// migration's destination).
    pub fn create_empty(
        hv: &Hypervisor,
        spec: VmSpec,
        regions: &[RegionLayout],
    ) -> Result<Vm, VmError> {
        Self::create_empty_in(hv, spec, regions, &DeviceEnv::default())
    }

    /// [`Vm::create_empty`] with device backends (an incoming migration's destination: its
    /// taps are on the bridge and its images open before the switchover; nothing is delivered
    /// to the guest until it runs).
    pub fn create_empty_in(
        hv: &Hypervisor,
        spec: VmSpec,
        regions: &[RegionLayout],
        env: &DeviceEnv,
    ) -> Result<Vm, VmError> {
        let total: u64 = regions.iter().map(|r| r.size).sum();
        if total != spec.memory_mib << 20 {
            return Err(VmError::Mismatch(format!(
                "regions hold {total} bytes but the VM has {} MiB",
                spec.memory_mib
            )));
        }
        let (mut vm, fds) = Self::build(hv, spec, regions, env)?;
        vm.spawn(hv, fds)?;
        Ok(vm)
    }

    /// Load vCPU, interrupt controller, clock and device state into a parked VM.
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        let st = self.status();
        if st != VmStatus::Created && st != VmStatus::Paused {
            return Err(VmError::State(st, "restore needs a VM that is not running"));
        }
        if state.regions != self.memory.layout() {
            return Err(VmError::Mismatch("memory layout differs".into()));
        }
        for chip in &state.irqchips {
            self.vm_fd
                .set_irqchip(chip)
                .map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        }
        if let Some(clock) = &state.clock {
            let mut c = *clock;
            c.flags = 0;
            if let Err(e) = self.vm_fd.set_clock(&c) {
                tracing::debug!(error = %e, "KVM_SET_CLOCK refused; kvmclock starts fresh");
            }
        }
        for (v, s) in self.vcpus.iter().zip(&state.vcpus) {
            v.restore_start(Box::new(s.clone()))?;
        }
        for v in &self.vcpus {
            v.restore_wait()?;
        }
        if let (Some(v0), Ok(mut c)) = (state.vcpus.first(), self.guest_cpuid.lock()) {
            *c = to_entries(&v0.cpuid);
        }
        if let Ok(mut s) = self.set_cpuids.lock() {
            *s = state.vcpus.iter().map(|v| v.cpuid.clone()).collect();
        }
        self.shared.devices.restore(&state.devices)?;
        Ok(())
    }

    /// Capture everything but memory. The VM must be paused (or never started).
    pub fn capture_state(&self) -> Result<VmState, VmError> {
        let st = self.status();
        if st == VmStatus::Running {
            return Err(VmError::State(st, "pause it before capturing its state"));
        }
        // All vCPU threads capture at once.
        for v in &self.vcpus {
            v.capture_start()?;
        }
        let mut vcpus: Vec<VcpuState> = Vec::with_capacity(self.vcpus.len());
        for v in &self.vcpus {
            vcpus.push(*v.capture_wait()?);
        }
        if let Ok(set) = self.set_cpuids.lock() {
            for (st, c) in vcpus.iter_mut().zip(set.iter()) {
                st.cpuid = c.clone();
            }
        }
        let mut irqchips = Vec::new();
        for chip_id in 0..3 {
            let mut c = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.vm_fd
                .get_irqchip(&mut c)
                .map_err(kvm_err("KVM_GET_IRQCHIP"))?;
            irqchips.push(c);
        }
        Ok(VmState {
            spec: self.spec.clone(),
            regions: self.memory.layout(),
            vcpus,
            irqchips,
            clock: self.vm_fd.get_clock().ok(),
            devices: self.shared.devices.state(),
        })
    }

    pub fn status(&self) -> VmStatus {
        if self.fault().is_some() {
            return VmStatus::Crashed;
        }
        self.status.lock().map(|s| *s).unwrap_or(VmStatus::Crashed)
    }

    /// Why the guest crashed, if it did.
    pub fn fault(&self) -> Option<Fault> {
        self.shared.fault.lock().ok().and_then(|f| f.clone())
    }

    fn set_status(&self, s: VmStatus) {
        if let Ok(mut g) = self.status.lock() {
            *g = s;
        }
    }

    /// Run a created or paused VM.
    pub fn start(&self) -> Result<(), VmError> {
        match self.status() {
            VmStatus::Created | VmStatus::Paused => {}
            VmStatus::Running => return Ok(()),
            s => return Err(VmError::State(s, "it cannot run again; start it afresh")),
        }
        self.set_status(VmStatus::Running);
        let t = Instant::now();
        // Devices first: frames queued while paused reach the guest's buffers as it resumes.
        self.shared.devices.virtio.activate();
        for v in &self.vcpus {
            v.resume();
        }
        // Until every vCPU thread is back in KVM_RUN: what `last_resume` reports (bounded; a
        // vCPU that does not get there, say because a sibling crashed, is logged).
        let deadline = t + Duration::from_millis(100);
        for v in &self.vcpus {
            let left = deadline.saturating_duration_since(Instant::now());
            if !v.wait_unparked(left) {
                tracing::debug!(vm = %self.spec.name, "a vCPU was not running again within 100 ms of the resume");
                break;
            }
        }
        self.last_resume_ns
            .store(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Pause all vCPUs; returns how long it took.
    pub fn pause(&self) -> Result<Duration, VmError> {
        let st = self.status();
        match st {
            VmStatus::Running => {}
            VmStatus::Paused | VmStatus::Created => return Ok(Duration::ZERO),
            s => return Err(VmError::State(s, "only a running VM can be paused")),
        }
        let t = Instant::now();
        for v in &self.vcpus {
            v.pause(PAUSE_TIMEOUT)?;
        }
        // Devices stop writing guest memory: NICs stop delivering (and keep queueing), disks
        // complete every in-flight request. Only then is the state complete.
        let q = self.shared.devices.virtio.quiesce();
        if let Ok(mut l) = self.last_quiesced.lock() {
            *l = q;
        }
        let took = t.elapsed();
        self.last_pause_ns
            .store(took.as_nanos() as u64, Ordering::Relaxed);
        if self.fault().is_none() {
            self.set_status(VmStatus::Paused);
        }
        tracing::debug!(vm = %self.spec.name, took_us = took.as_micros() as u64, "vm paused");
        Ok(took)
    }

    /// Resume a paused VM.
    pub fn resume(&self) -> Result<(), VmError> {
        match self.status() {
            VmStatus::Paused => self.start(),
            VmStatus::Running => Ok(()),
            s => Err(VmError::State(s, "only a paused VM can be resumed")),
        }
    }

    /// Power off: vCPU threads end. The memory stays until the Vm is dropped.
    pub fn stop(&self) {
        for v in &self.vcpus {
            v.stop();
        }
        if let Ok(mut t) = self.threads.lock() {
            t.clear();
        }
        // The device threads end and the taps go.
        self.shared.devices.virtio.shutdown();
        if self.fault().is_none() {
            self.set_status(VmStatus::Stopped);
        }
        tracing::info!(vm = %self.spec.name, "vm stopped");
    }

    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    pub fn devices(&self) -> &Arc<Devices> {
        &self.shared.devices
    }

    /// How long the last pause took.
    pub fn last_pause(&self) -> Duration {
        Duration::from_nanos(self.last_pause_ns.load(Ordering::Relaxed))
    }

    /// What the last pause did to the devices (in-flight I/O drained, frames queued).
    pub fn last_quiesced(&self) -> virtio::Quiesced {
        self.last_quiesced.lock().map(|q| *q).unwrap_or_default()
    }

    /// How long the last start or resume took, until every vCPU thread ran guest code again.
    pub fn last_resume(&self) -> Duration {
        Duration::from_nanos(self.last_resume_ns.load(Ordering::Relaxed))
    }

    /// Auto-converge: hold the vCPUs back `pct` % of the time (0 turns it off; at most 99).
    pub fn set_throttle(&self, pct: u8) {
        let pct = pct.min(99);
        let before = self.shared.throttle.swap(pct, Ordering::SeqCst);
        if pct > 0 && before == 0 {
            // The kicker makes even a guest that never exits reach its throttle point.
            let weak = Arc::downgrade(&self.shared);
            let spawned = std::thread::Builder::new()
                .name(format!("throttle-{}", self.spec.name))
                .spawn(move || loop {
                    // Kick at half the run budget, so a guest that never exits on its own runs
                    // no longer than its share before its throttle point.
                    let pct = weak.upgrade().map_or(0, |vm| {
                        u32::from(vm.throttle.load(Ordering::SeqCst).min(99))
                    });
                    if pct == 0 {
                        return;
                    }
                    let budget = vcpu::THROTTLE_PERIOD * (100 - pct) / 100;
                    std::thread::sleep((budget / 2).max(std::time::Duration::from_micros(50)));
                    let Some(vm) = weak.upgrade() else { return };
                    vcpu::kick_all(&vm);
                });
            if let Err(e) = spawned {
                tracing::warn!(vm = %self.spec.name, error = %e, "cannot start the throttle thread; throttling only at guest exits");
            }
        }
        if pct != before {
            tracing::info!(vm = %self.spec.name, throttle_pct = pct, "vCPU throttle changed");
        }
    }

    pub fn throttle(&self) -> u8 {
        self.shared.throttle.load(Ordering::SeqCst)
    }

    /// The guest's TSC frequency as the agent paces it.
    pub fn tsc_khz(&self) -> u32 {
        self.shared.tsc_khz
    }

    /// Workload heartbeats (None for other kinds).
    pub fn heartbeats(&self) -> Option<Vec<workload::Heartbeat>> {
        match self.spec.kind {
            GuestKind::Workload(_) => workload::heartbeats(&self.memory, self.spec.vcpus).ok(),
            _ => None,
        }
    }
}

fn set_boot_state(fd: &kvm_ioctls::VcpuFd, boot: &BootVcpu) -> Result<(), VmError> {
    match *boot {
        BootVcpu::LongModeUser { rip, rsp, rdi, rsi } => {
            let sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
            fd.set_sregs(&x86::long_mode_user_sregs(sregs))
                .map_err(kvm_err("KVM_SET_SREGS"))?;
            fd.set_regs(&x86::user_regs(rip, rsp, rdi, rsi))
                .map_err(kvm_err("KVM_SET_REGS"))?;
            // Application processors would otherwise wait for INIT/SIPI.
            fd.set_mp_state(kvm_bindings::kvm_mp_state {
                mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
            })
            .map_err(kvm_err("KVM_SET_MP_STATE"))?;
        }
        BootVcpu::RealMode { cs, ip, sp } => {
            let sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
            fd.set_sregs(&x86::real_mode_sregs(sregs, cs))
                .map_err(kvm_err("KVM_SET_SREGS"))?;
            fd.set_regs(&kvm_bindings::kvm_regs {
                rip: u64::from(ip),
                rsp: u64::from(sp),
                rflags: 0x2,
                ..Default::default()
            })
            .map_err(kvm_err("KVM_SET_REGS"))?;
        }
        BootVcpu::Waiting => {}
    }
    Ok(())
}
