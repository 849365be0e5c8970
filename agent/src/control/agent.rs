//! The agent's guests and what can be done to them, independent of HTTP: create, start, pause,
//! resume, stop, destroy, inspect, console, save, restore. Every operation validates its input
//! and answers with an [`AgentError`] that maps to an HTTP status.
//!
//! Operations on one VM are serialized by its operation lock; reads (list, inspect, console)
//! never wait for a long operation such as a save.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::announce::Announcement;
use crate::checks::datastore::Datastores;
use crate::checks::disklock::{DiskLocks, LockError, LockHolder};
use crate::checks::{CheckReport, HostFacts, LinkProbe, Requirements};
use crate::migrate::dest::Host;
use crate::migrate::ownership::{Ownership, Staged};
use crate::migrate::source::{self, SourceJob};
use crate::migrate::{self as mig, MigrateOptions, MigrationHandle, MigrationRecord};
use crate::netpin::{NetPin, StatsReport};
use crate::vm::devices::ExitStats;
use crate::vm::memory::RegionLayout;
use crate::vm::snapshot::{self, SaveReport, SnapshotError};
use crate::vm::workload::{self, Heartbeat};
use crate::vm::{GuestKind, Hypervisor, Vm, VmError, VmSpec, VmStatus};

use super::config::{valid_name, Config};

/// Errors of agent operations; each knows its HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("no VM named {0:?} on this host; `ferry vm list` shows the VMs")]
    NotFound(String),
    #[error("no migration {0:?} on this host; `ferry migrations` lists them")]
    NoMigration(String),
    #[error(
        "a VM named {0:?} already exists on this host; choose another name or destroy it first"
    )]
    Exists(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("not enough memory: {0}")]
    NoRoom(String),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl AgentError {
    /// HTTP status for the API.
    pub fn status(&self) -> u16 {
        match self {
            AgentError::NotFound(_) | AgentError::NoMigration(_) => 404,
            AgentError::Exists(_) | AgentError::Conflict(_) => 409,
            AgentError::Invalid(_) | AgentError::NoRoom(_) => 400,
            AgentError::Vm(e) => vm_status(e),
            AgentError::Snapshot(SnapshotError::Vm(e)) => vm_status(e),
            AgentError::Snapshot(
                SnapshotError::NotEmpty(_)
                | SnapshotError::Manifest { .. }
                | SnapshotError::State { .. }
                | SnapshotError::MemorySize { .. },
            ) => 400,
            AgentError::Snapshot(SnapshotError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                400
            }
            AgentError::Snapshot(_) | AgentError::Internal(_) => 500,
        }
    }

    /// Short machine-readable code for the API.
    pub fn code(&self) -> &'static str {
        match self {
            AgentError::NotFound(_) | AgentError::NoMigration(_) => "not_found",
            AgentError::Exists(_) => "exists",
            AgentError::Invalid(_) => "invalid",
            AgentError::Conflict(_) => "conflict",
            AgentError::NoRoom(_) => "no_room",
            AgentError::Vm(VmError::State(..)) => "wrong_state",
            AgentError::Vm(_) => "vm",
            AgentError::Snapshot(_) => "snapshot",
            AgentError::Internal(_) => "internal",
        }
    }
}

fn vm_status(e: &VmError) -> u16 {
    match e {
        VmError::Vcpus(_)
        | VmError::MemorySize(_)
        | VmError::MemoryTooLarge(_)
        | VmError::Raw(_)
        | VmError::Workload(_)
        | VmError::Service(_)
        | VmError::Mismatch(_)
        | VmError::Spec(_) => 400,
        VmError::State(..) => 409,
        _ => 500,
    }
}

/// A vCPU's heartbeat counters, and rates derived from two heartbeat samples. The rates are
/// `None` (JSON `null`) until there are two samples at least 200 ms apart: for a guest that
/// started, or arrived by migration, less than that ago.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VcpuRates {
    pub id: u32,
    pub beats: u64,
    pub beats_per_sec: Option<f64>,
    /// "fill" or "work".
    pub phase: String,
    pub pass: u64,
    pub pages_written: u64,
    pub dirty_mib_per_sec: Option<f64>,
    pub yields_per_sec: Option<f64>,
    /// Guest TSC at its last heartbeat.
    pub tsc: u64,
}

struct Sample {
    at: Instant,
    beats: Vec<Heartbeat>,
}

/// One VM under the agent.
pub struct VmEntry {
    name: String,
    vm: Mutex<Arc<Vm>>,
    op: Arc<tokio::sync::Mutex<()>>,
    created: SystemTime,
    samples: Mutex<(Option<Sample>, Option<Sample>)>,
    /// "out m-…" or "in m-…" while the VM migrates.
    migration: Mutex<Option<String>>,
    /// Set when the guest stops running here: pending MAC announcements stop.
    announce_cancel: Mutex<Arc<std::sync::atomic::AtomicBool>>,
}

impl VmEntry {
    /// A fresh cancel flag for the announcements of a (re)start.
    fn announce_flag(&self) -> Arc<std::sync::atomic::AtomicBool> {
        let f = Arc::new(std::sync::atomic::AtomicBool::new(false));
        if let Ok(mut g) = self.announce_cancel.lock() {
            g.store(true, std::sync::atomic::Ordering::SeqCst);
            *g = f.clone();
        }
        f
    }

    /// The guest no longer runs here: stop announcing it.
    fn stop_announcing(&self) {
        if let Ok(g) = self.announce_cancel.lock() {
            g.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn migration(&self) -> Option<String> {
        self.migration.lock().ok().and_then(|m| m.clone())
    }

    fn set_migration(&self, m: Option<String>) {
        if let Ok(mut g) = self.migration.lock() {
            *g = m;
        }
    }

    /// Refuse operations while the VM migrates.
    fn not_migrating(&self) -> Result<(), AgentError> {
        match self.migration() {
            None => Ok(()),
            Some(m) => Err(AgentError::Conflict(format!(
                "{} is migrating ({m}); wait for it to finish{}",
                self.name,
                m.strip_prefix("out ")
                    .map(|id| format!(" or cancel it with `ferry migrate --cancel {id}`"))
                    .unwrap_or_default()
            ))),
        }
    }

    /// Take the operation lock for a user operation.
    async fn begin(&self) -> Result<tokio::sync::OwnedMutexGuard<()>, AgentError> {
        self.not_migrating()?;
        let g = self.op.clone().lock_owned().await;
        self.not_migrating()?;
        Ok(g)
    }

    fn vm(&self) -> Arc<Vm> {
        match self.vm.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn replace(&self, vm: Vm) {
        match self.vm.lock() {
            Ok(mut g) => *g = Arc::new(vm),
            Err(p) => *p.into_inner() = Arc::new(vm),
        }
    }

    /// Take a heartbeat sample (called periodically by the daemon). Not while the VM arrives
    /// by migration: its memory is not the guest's yet.
    pub fn sample(&self) {
        if self.migration().is_some_and(|m| m.starts_with("in ")) {
            if let Ok(mut s) = self.samples.lock() {
                *s = (None, None);
            }
            return;
        }
        let vm = self.vm();
        let Some(beats) = vm.heartbeats() else { return };
        if let Ok(mut s) = self.samples.lock() {
            let prev = s.1.take();
            *s = (
                prev,
                Some(Sample {
                    at: Instant::now(),
                    beats,
                }),
            );
        }
    }

    /// Counters as of `now` (read just now), with rates over the last sampling interval; where
    /// there is only one sample yet (the guest started or arrived less than a sampling interval
    /// ago), over the time since that sample once it is at least 200 ms old.
    fn rates(&self, now: &[Heartbeat], ws_pages: &[u64]) -> Vec<VcpuRates> {
        let window: Option<(f64, Vec<Heartbeat>, Vec<Heartbeat>)> =
            self.samples.lock().ok().and_then(|s| match (&s.0, &s.1) {
                (Some(o), Some(n)) => Some((
                    n.at.duration_since(o.at).as_secs_f64(),
                    o.beats.clone(),
                    n.beats.clone(),
                )),
                (None, Some(n)) => {
                    let dt = n.at.elapsed().as_secs_f64();
                    (dt >= 0.2).then(|| (dt, n.beats.clone(), now.to_vec()))
                }
                _ => None,
            });
        now.iter()
            .enumerate()
            .map(|(i, b)| {
                let per = |f: fn(&Heartbeat) -> u64| {
                    let (dt, old, new) = window.as_ref()?;
                    let (o, n) = (old.get(i)?, new.get(i)?);
                    (*dt > 0.0).then(|| f(n).saturating_sub(f(o)) as f64 / dt)
                };
                let ws = ws_pages.get(i).copied().unwrap_or(0).max(1);
                VcpuRates {
                    id: i as u32,
                    beats: b.beats,
                    beats_per_sec: per(|h| h.beats),
                    phase: if b.phase == 0 { "fill" } else { "work" }.into(),
                    pass: if b.phase == 0 { 0 } else { 1 + b.progress / ws },
                    pages_written: b.filled + b.progress,
                    dirty_mib_per_sec: per(|h| h.progress).map(|p| p * 4096.0 / (1 << 20) as f64),
                    yields_per_sec: per(|h| h.yields),
                    tsc: b.tsc,
                }
            })
            .collect()
    }
}

/// Summary of a VM for `list`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmSummary {
    pub name: String,
    pub state: VmStatus,
    /// "out m-…" / "in m-…" while migrating.
    pub migration: Option<String>,
    pub kind: String,
    pub memory_mib: u64,
    pub vcpus: u32,
}

/// Everything `inspect` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmInfo {
    pub name: String,
    pub state: VmStatus,
    /// "out m-…" / "in m-…" while migrating.
    pub migration: Option<String>,
    pub spec: VmSpec,
    /// Seconds since the Unix epoch when the VM was created on this host.
    pub created_unix: u64,
    pub fault: Option<String>,
    pub last_pause_us: u64,
    /// How long the last start/resume took until every vCPU ran again (0: never).
    #[serde(default)]
    pub last_resume_us: u64,
    pub tsc_khz: u32,
    pub exits: ExitStats,
    /// Workload guests only: per-vCPU heartbeat and rates over the last sampling interval.
    pub heartbeats: Vec<VcpuRates>,
    /// Workload guests only: requested and measured dirty rate (MiB/s, all vCPUs).
    pub dirty_rate: Option<DirtyRate>,
    /// Each disk and the guest (and host) that holds its lock.
    #[serde(default)]
    pub disk_locks: Vec<DiskLockInfo>,
    /// virtio NICs (tap, frames in and out, drops) and disks (image, requests).
    #[serde(default)]
    pub nics: Vec<crate::vm::virtio::net::NetStats>,
    #[serde(default)]
    pub disks: Vec<crate::vm::virtio::blk::BlkStats>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DirtyRate {
    pub requested_mib_per_sec: u64,
    /// `None` until it has been measured (see [`VcpuRates`]).
    pub measured_mib_per_sec: Option<f64>,
}

/// A slice of console output.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConsoleChunk {
    /// Absolute offset of `data`'s first byte.
    pub offset: u64,
    /// Offset to ask for next time.
    pub next_offset: u64,
    /// Output (UTF-8, invalid bytes replaced).
    pub data: String,
}

/// Host facts for `ferry host`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostInfo {
    pub name: String,
    pub version: String,
    pub tsc_khz: u32,
    pub tsc_settable: bool,
    pub msrs: usize,
    pub memory_total_mib: u64,
    pub memory_available_mib: u64,
    pub memory_reserve_mib: u64,
    pub memory_committed_mib: u64,
    /// Why the memory figures above are unknown (they are 0 then), e.g. /proc/meminfo unreadable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_error: Option<String>,
    pub vms: usize,
}

/// The agent: its host's hypervisor, configuration, and guests.
pub struct Agent {
    pub config: Config,
    hv: Arc<Hypervisor>,
    vms: Mutex<BTreeMap<String, Arc<VmEntry>>>,
    /// Memory promised to VMs being created (counted before they appear in `vms`).
    reserving: Mutex<u64>,
    /// Migrations, newest last (the last [`MIGRATIONS_KEPT`]).
    migrations: Mutex<std::collections::VecDeque<Arc<MigrationHandle>>>,
    /// Owned op locks of VMs arriving by migration, held until they are committed or gone.
    incoming_ops: Mutex<BTreeMap<String, tokio::sync::OwnedMutexGuard<()>>>,
    /// The eBPF programs on this host's NICs, or why there are none.
    netpin: Result<Arc<NetPin>, String>,
    datastores: Datastores,
    /// The cluster key peers must prove (and this agent proves to them).
    key: Option<Arc<mig::session::ClusterKey>>,
    /// Guest ownership records on the shared datastore (`[cluster] ownership_datastore`).
    ownership: Option<Ownership>,
    /// Disk locks on the datastores: one running guest per disk in the cluster.
    locks: DiskLocks,
}

/// A disk of a guest and who holds its lock (`ferry vm inspect`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskLockInfo {
    pub disk: String,
    /// None: nobody (the guest is not running, or the lock could not be read: see `error`).
    pub holder: Option<LockHolder>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl From<LockError> for AgentError {
    fn from(e: LockError) -> Self {
        match e {
            LockError::Locked { .. } | LockError::NotStale { .. } | LockError::NotLocked(_) => {
                AgentError::Conflict(e.to_string())
            }
            LockError::Datastore(d) => AgentError::Invalid(d.to_string()),
            LockError::Io { .. } => AgentError::Internal(e.to_string()),
        }
    }
}

/// How many finished migrations `ferry migrations` remembers.
pub const MIGRATIONS_KEPT: usize = 100;

/// /proc/meminfo values in MiB: (total, available). A file that cannot be read (e.g. no fds
/// left) or lacks a field is an error, never "0 MiB".
pub fn host_memory() -> Result<(u64, u64), String> {
    let text = std::fs::read_to_string("/proc/meminfo")
        .map_err(|e| format!("cannot read /proc/meminfo to learn how much memory is free: {e}"))?;
    parse_meminfo(&text)
}

/// (MemTotal, MemAvailable) in MiB from the text of /proc/meminfo.
pub fn parse_meminfo(text: &str) -> Result<(u64, u64), String> {
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kib| kib / 1024)
            .ok_or_else(|| format!("/proc/meminfo has no readable {name} line"))
    };
    Ok((field("MemTotal:")?, field("MemAvailable:")?))
}

impl Agent {
    pub fn new(
        config: Config,
        hv: Arc<Hypervisor>,
        netpin: Result<Arc<NetPin>, String>,
        datastores: Datastores,
        key: Option<Arc<mig::session::ClusterKey>>,
    ) -> Arc<Agent> {
        let ownership = config
            .cluster
            .ownership_datastore
            .as_ref()
            .and_then(|d| config.datastores.get(d))
            .map(|dir| Ownership::new(dir.clone()));
        if let Some(o) = &ownership {
            // Guests this host owns that do not run here were lost when the agent stopped.
            for r in o.all() {
                if r.owned_by(&config.agent.name) {
                    tracing::warn!(vm = %r.vm, generation = r.generation, "this host owns a guest that is not running here (lost when the agent stopped); `ferry destroy` releases it");
                }
            }
        }
        let locks = DiskLocks::new(
            &config.agent.name,
            std::time::Duration::from_secs(config.cluster.lock_lease_s),
        );
        locks.heartbeat(&config.datastores);
        Arc::new(Agent {
            locks,
            ownership,
            config,
            hv,
            netpin,
            datastores,
            key,
            vms: Mutex::new(BTreeMap::new()),
            reserving: Mutex::new(0),
            migrations: Mutex::new(std::collections::VecDeque::new()),
            incoming_ops: Mutex::new(BTreeMap::new()),
        })
    }

    fn entry(&self, name: &str) -> Result<Arc<VmEntry>, AgentError> {
        self.vms
            .lock()
            .map_err(|_| AgentError::Internal("VM table lock poisoned".into()))?
            .get(name)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(name.to_string()))
    }

    fn entries(&self) -> Vec<Arc<VmEntry>> {
        self.vms
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    fn committed_mib(&self) -> u64 {
        let vms: u64 = self
            .entries()
            .iter()
            .map(|e| e.vm())
            .filter(|v| !matches!(v.status(), VmStatus::Stopped))
            .map(|v| v.spec.memory_mib)
            .sum();
        vms + self.reserving.lock().map(|r| *r).unwrap_or(0)
    }

    pub fn host_info(&self) -> HostInfo {
        let (total, avail, memory_error) = match host_memory() {
            Ok((t, a)) => (t, a, None),
            Err(e) => (0, 0, Some(e)),
        };
        HostInfo {
            name: self.config.agent.name.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            tsc_khz: self.hv.tsc_khz,
            tsc_settable: self.hv.tsc_settable,
            msrs: self.hv.msr_list().len(),
            memory_total_mib: total,
            memory_available_mib: avail,
            memory_reserve_mib: self.config.limits.memory_reserve_mib,
            memory_committed_mib: self.committed_mib(),
            memory_error,
            vms: self.entries().len(),
        }
    }

    /// Refuse memory the host cannot give; on success the amount is reserved until released.
    fn reserve(&self, mib: u64) -> Result<Reservation<'_>, AgentError> {
        let (total, avail) = host_memory().map_err(|e| {
            AgentError::Internal(format!("{e}; cannot tell whether the VM fits, try again"))
        })?;
        let reserve = self.config.limits.memory_reserve_mib;
        let committed = self.committed_mib();
        let can_total = total.saturating_sub(reserve).saturating_sub(committed);
        let can_now = avail.saturating_sub(reserve);
        let can = can_total.min(can_now);
        if mib > can {
            return Err(AgentError::NoRoom(format!(
                "the VM wants {mib} MiB but this host can give {can} MiB (total {total} MiB, available {avail} MiB, {committed} MiB promised to other VMs, {reserve} MiB kept for the host); use less memory or free some"
            )));
        }
        if let Ok(mut r) = self.reserving.lock() {
            *r += mib;
        }
        Ok(Reservation { agent: self, mib })
    }

    /// Disks must be on datastores of this host, NICs on its port groups.
    fn check_devices(&self, spec: &VmSpec) -> Result<(), AgentError> {
        for d in &spec.disks {
            self.datastores
                .resolve(&d.path)
                .map_err(|e| AgentError::Invalid(e.to_string()))?;
        }
        for n in &spec.nics {
            if !self.config.port_groups.contains_key(&n.port_group) {
                return Err(AgentError::Invalid(format!(
                    "NIC {}: port group {:?} is not configured on this host (add it to [port_groups])",
                    n.mac, n.port_group
                )));
            }
        }
        Ok(())
    }

    /// Where a guest's virtio devices attach here: its port groups' bridges and its disks'
    /// image files (kinds without virtio devices need none).
    pub fn device_env(&self, spec: &VmSpec) -> Result<crate::vm::DeviceEnv, AgentError> {
        if !spec.kind.has_virtio() {
            return Ok(crate::vm::DeviceEnv::default());
        }
        self.check_devices(spec)?;
        let bridges = spec
            .nics
            .iter()
            .map(|n| self.config.port_groups.get(&n.port_group).cloned())
            .collect();
        let disks = spec
            .disks
            .iter()
            .map(|d| {
                self.datastores
                    .resolve(&d.path)
                    .map(Some)
                    .map_err(|e| AgentError::Invalid(e.to_string()))
            })
            .collect::<Result<_, _>>()?;
        Ok(crate::vm::DeviceEnv { bridges, disks })
    }

    /// Announce every NIC of a guest that just started or resumed here.
    pub fn announce(&self, spec: &VmSpec) -> Vec<Announcement> {
        let cancel = match self.entry(&spec.name) {
            Ok(e) => e.announce_flag(),
            Err(_) => Arc::new(std::sync::atomic::AtomicBool::new(false)),
        };
        spec.nics
            .iter()
            .map(|n| {
                let iface = self
                    .config
                    .port_groups
                    .get(&n.port_group)
                    .cloned()
                    .unwrap_or_default();
                let a = crate::announce::announce(&n.mac, &n.port_group, &iface, cancel.clone());
                if let Some(e) = &a.error {
                    tracing::warn!(vm = %spec.name, mac = %n.mac, error = %e, "MAC announcement failed");
                }
                a
            })
            .collect()
    }

    /// This host, as a peer sees it; with the sizes of the given disk paths.
    pub fn host_facts(&self, disks: &[String]) -> HostFacts {
        let (total, avail) = host_memory().unwrap_or_else(|e| {
            // A peer's memory check then fails (room 0); say why here.
            tracing::warn!(error = %e, "telling a peer this host has no room");
            (0, 0)
        });
        let reserve = self.config.limits.memory_reserve_mib;
        let committed = self.committed_mib();
        let room = total
            .saturating_sub(reserve)
            .saturating_sub(committed)
            .min(avail.saturating_sub(reserve));
        let iface_exists = |i: &str| std::path::Path::new("/sys/class/net").join(i).exists();
        HostFacts {
            name: self.config.agent.name.clone(),
            cpuid: self.hv.offered_cpuid(),
            datastores: self.datastores.identities(),
            disks: disks
                .iter()
                .map(|d| (d.clone(), self.datastores.disk_size(d)))
                .collect(),
            port_groups: self
                .config
                .port_groups
                .iter()
                .filter(|(_, i)| iface_exists(i))
                .map(|(n, _)| n.clone())
                .collect(),
            migration_enabled: self.config.migration.as_ref().is_some_and(|m| m.enabled),
            migration_address: self
                .config
                .migration
                .as_ref()
                .map(|m| m.address.to_string()),
            migration_interface: self
                .config
                .migration
                .as_ref()
                .and_then(|m| m.interface.clone()),
            room_mib: room,
            vms: self.entries().iter().map(|e| e.name.clone()).collect(),
            running: self
                .entries()
                .iter()
                .filter(|e| e.vm().status() == VmStatus::Running)
                .map(|e| e.name.clone())
                .collect(),
        }
    }

    fn check_new_name(&self, name: &str) -> Result<(), AgentError> {
        if !valid_name(name) {
            return Err(AgentError::Invalid(format!(
                "VM name {name:?} is not valid: use 1-64 letters, digits, '.', '_' or '-', not starting with '.' or '-'"
            )));
        }
        if self.entry(name).is_ok() {
            return Err(AgentError::Exists(name.to_string()));
        }
        Ok(())
    }

    fn insert(&self, vm: Vm) -> Result<Arc<VmEntry>, AgentError> {
        let name = vm.spec.name.clone();
        let entry = Arc::new(VmEntry {
            name: name.clone(),
            vm: Mutex::new(Arc::new(vm)),
            op: Arc::new(tokio::sync::Mutex::new(())),
            created: SystemTime::now(),
            samples: Mutex::new((None, None)),
            migration: Mutex::new(None),
            announce_cancel: Mutex::new(Arc::new(std::sync::atomic::AtomicBool::new(false))),
        });
        let mut m = self
            .vms
            .lock()
            .map_err(|_| AgentError::Internal("VM table lock poisoned".into()))?;
        if m.contains_key(&name) {
            return Err(AgentError::Exists(name));
        }
        m.insert(name, entry.clone());
        Ok(entry)
    }

    /// Create a VM; with `start` it runs at once.
    pub fn create(&self, spec: VmSpec, start: bool) -> Result<VmInfo, AgentError> {
        self.check_new_name(&spec.name)?;
        spec.validate()?;
        if let GuestKind::Raw(p) = &spec.kind {
            if !p.image.is_absolute() {
                return Err(AgentError::Invalid(format!(
                    "image path {:?} must be absolute (the agent does not share your working directory)",
                    p.image.display()
                )));
            }
            crate::vm::raw::check(p, spec.memory_mib << 20).map_err(VmError::from)?;
        }
        self.check_devices(&spec)?;
        for d in &spec.disks {
            self.datastores
                .ensure_disk(d)
                .map_err(|e| AgentError::Invalid(e.to_string()))?;
        }
        let _r = self.reserve(spec.memory_mib)?;
        let env = self.device_env(&spec)?;
        let vm = Vm::create_in(&self.hv, spec, &env)?;
        self.adopt(&vm.spec.name)?;
        if start {
            self.lock_disks(&vm.spec, &self.config.agent.name)?;
            if let Err(e) = vm.start() {
                self.unlock_disks(&vm.spec);
                return Err(e.into());
            }
        }
        let e = self.insert(vm)?;
        if start {
            self.announce(&e.vm().spec);
        }
        Ok(self.info(&e))
    }

    pub fn list(&self) -> Vec<VmSummary> {
        self.entries()
            .iter()
            .map(|e| {
                let vm = e.vm();
                VmSummary {
                    name: e.name.clone(),
                    state: vm.status(),
                    migration: e.migration(),
                    kind: vm.spec.kind.name().into(),
                    memory_mib: vm.spec.memory_mib,
                    vcpus: vm.spec.vcpus,
                }
            })
            .collect()
    }

    fn info(&self, e: &VmEntry) -> VmInfo {
        let vm = e.vm();
        let (heartbeats, dirty_rate) = match &vm.spec.kind {
            GuestKind::Workload(p) => {
                let data = workload::DataLayout::new(
                    &vm.memory().layout(),
                    vm.spec.vcpus,
                    p.working_set_mib.map(|m| m << 20),
                );
                let ws: Vec<u64> = data.slices.iter().map(|s| s.2).collect();
                let rates = e.rates(&vm.heartbeats().unwrap_or_default(), &ws);
                let measured = if vm.status() == VmStatus::Running {
                    rates.iter().map(|r| r.dirty_mib_per_sec).sum()
                } else {
                    Some(0.0)
                };
                (
                    rates,
                    Some(DirtyRate {
                        requested_mib_per_sec: p.dirty_rate_mib,
                        measured_mib_per_sec: measured,
                    }),
                )
            }
            GuestKind::Raw(_) | GuestKind::Service(_) => (vec![], None),
        };
        let virtio = &vm.devices().virtio;
        VmInfo {
            name: e.name.clone(),
            state: vm.status(),
            migration: e.migration(),
            spec: vm.spec.clone(),
            created_unix: e
                .created
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            fault: vm.fault().map(|f| format!("vCPU {}: {}", f.vcpu, f.reason)),
            last_pause_us: vm.last_pause().as_micros() as u64,
            last_resume_us: vm.last_resume().as_micros() as u64,
            tsc_khz: vm.tsc_khz(),
            exits: vm.devices().counters.stats(),
            heartbeats,
            dirty_rate,
            disk_locks: self.disk_locks(&vm.spec),
            nics: virtio.net.iter().map(|n| n.stats()).collect(),
            disks: virtio.blk.iter().map(|b| b.stats()).collect(),
        }
    }

    /// Where this host's guests' ownership records say `vm` runs (None without records).
    fn owner_of(&self, vm: &str) -> Option<String> {
        self.ownership
            .as_ref()
            .and_then(|o| o.current(vm).ok().flatten())
            .and_then(|r| r.owner)
    }

    /// Who holds each of a guest's disks.
    pub fn disk_locks(&self, spec: &VmSpec) -> Vec<DiskLockInfo> {
        let owner_of = |vm: &str| self.owner_of(vm);
        spec.disks
            .iter()
            .map(
                |d| match self.locks.holder(&self.datastores, &d.path, &owner_of) {
                    Ok(holder) => DiskLockInfo {
                        disk: d.path.clone(),
                        holder,
                        error: None,
                    },
                    Err(e) => DiskLockInfo {
                        disk: d.path.clone(),
                        holder: None,
                        error: Some(e.to_string()),
                    },
                },
            )
            .collect()
    }

    /// Take the locks of every disk of `spec` for the guest, recorded as held on `host`
    /// (this host, or the source of an incoming migration until its commit). All or none.
    fn lock_disks(&self, spec: &VmSpec, host: &str) -> Result<(), AgentError> {
        let owner_of = |vm: &str| self.owner_of(vm);
        for (i, d) in spec.disks.iter().enumerate() {
            if let Err(e) =
                self.locks
                    .acquire(&self.datastores, &d.path, &spec.name, host, &owner_of)
            {
                for taken in &spec.disks[..i] {
                    let _ =
                        self.locks
                            .release(&self.datastores, &taken.path, &spec.name, &owner_of);
                }
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Release the locks of a guest that stopped or was destroyed here (nothing where the guest
    /// runs elsewhere now).
    fn unlock_disks(&self, spec: &VmSpec) {
        let owner_of = |vm: &str| self.owner_of(vm);
        for d in &spec.disks {
            if let Err(e) = self
                .locks
                .release(&self.datastores, &d.path, &spec.name, &owner_of)
            {
                tracing::warn!(vm = %spec.name, disk = %d.path, error = %e, "could not release a disk lock");
            }
        }
    }

    /// After the commit of an incoming migration: the guest's disk locks name this host.
    fn hand_over_disks(&self, vm: &str) {
        let Ok(e) = self.entry(vm) else { return };
        for d in &e.vm().spec.disks {
            if let Err(err) = self.locks.hand_over(&self.datastores, &d.path, vm) {
                tracing::warn!(vm, disk = %d.path, error = %err, "could not record this host in a disk lock (the ownership record decides)");
            }
        }
    }

    /// `ferry disk unlock DISK`: break a stale lock (its holder's host stopped renewing its
    /// lease). Refused while the holder's host is alive.
    pub fn break_disk_lock(&self, disk: &str) -> Result<LockHolder, AgentError> {
        let owner_of = |vm: &str| self.owner_of(vm);
        Ok(self.locks.break_stale(&self.datastores, disk, &owner_of)?)
    }

    /// Renew this host's disk-lock heartbeat (the daemon calls it every lease/3).
    pub fn renew_disk_leases(&self) {
        self.locks.heartbeat(&self.config.datastores);
    }

    pub fn disk_lease(&self) -> std::time::Duration {
        self.locks.lease()
    }

    pub fn inspect(&self, name: &str) -> Result<VmInfo, AgentError> {
        let e = self.entry(name)?;
        Ok(self.info(&e))
    }

    /// Start a created or paused VM; a stopped or crashed one boots afresh from its spec.
    pub async fn start(&self, name: &str) -> Result<VmInfo, AgentError> {
        let e = self.entry(name)?;
        let _op = e.begin().await?;
        let vm = e.vm();
        match vm.status() {
            VmStatus::Stopped | VmStatus::Crashed => {
                let spec = vm.spec.clone();
                self.lock_disks(&spec, self.me())?;
                vm.stop();
                drop(vm);
                let hv = self.hv.clone();
                let env = self.device_env(&spec)?;
                let fresh =
                    blocking(move || Vm::create_in(&hv, spec, &env).map_err(AgentError::from))
                        .await?;
                fresh.start()?;
                self.announce(&fresh.spec);
                e.replace(fresh);
            }
            VmStatus::Created => {
                self.lock_disks(&vm.spec, self.me())?;
                vm.start()?;
                self.announce(&vm.spec);
            }
            _ => {
                self.may_run(name).await?;
                vm.start()?
            }
        }
        Ok(self.info(&e))
    }

    pub async fn pause(&self, name: &str) -> Result<VmInfo, AgentError> {
        let e = self.entry(name)?;
        let _op = e.begin().await?;
        let vm = e.vm();
        blocking(move || vm.pause().map(|_| ()).map_err(AgentError::from)).await?;
        Ok(self.info(&e))
    }

    pub async fn resume(&self, name: &str) -> Result<VmInfo, AgentError> {
        let e = self.entry(name)?;
        let _op = e.begin().await?;
        self.may_run(name).await?;
        e.vm().resume()?;
        Ok(self.info(&e))
    }

    fn me(&self) -> &str {
        &self.config.agent.name
    }

    /// A new guest here: its ownership record names this host (refused if another owns it).
    fn adopt(&self, name: &str) -> Result<(), AgentError> {
        let Some(o) = &self.ownership else {
            return Ok(());
        };
        o.adopt(name, self.me()).map(|_| ()).map_err(|e| {
            AgentError::Conflict(format!(
                "{e}: a guest name is unique in the cluster; destroy it there or choose another name"
            ))
        })
    }

    /// Refuse to run a guest whose ownership record names another host, unless that host
    /// answers and does not have it (then ownership comes back here).
    async fn may_run(&self, name: &str) -> Result<(), AgentError> {
        let Some(o) = self.ownership.clone() else {
            return Ok(());
        };
        let me = self.me().to_string();
        let rec = match o.current(name) {
            Ok(Some(r)) => r,
            Ok(None) => {
                o.adopt(name, &me)
                    .map_err(|e| AgentError::Conflict(e.to_string()))?;
                return Ok(());
            }
            Err(e) => {
                return Err(AgentError::Conflict(format!(
                    "{e}: cannot tell who owns {name}, so it stays as it is"
                )))
            }
        };
        let Some(owner) = rec.owner.clone().filter(|o| *o != me) else {
            if rec.owner.is_none() {
                o.adopt(name, &me)
                    .map_err(|e| AgentError::Conflict(e.to_string()))?;
            }
            return Ok(());
        };
        let refuse = |why: String| {
            AgentError::Conflict(format!(
                "{name} belongs to {owner} since generation {} ({}): this copy must not run ({why})",
                rec.generation, rec.reason
            ))
        };
        let peer = self.peer_addr(&owner).map_err(|e| refuse(e.to_string()))?;
        let ident = self.identity();
        let facts = tokio::task::spawn_blocking(move || {
            mig::query::facts(peer, &ident, &mig::query::Query::default())
        })
        .await
        .map_err(|e| AgentError::Internal(e.to_string()))?
        .map_err(|e| {
            refuse(format!(
                "{owner} does not answer: {}",
                crate::control::error_chain(&e)
            ))
        })?;
        if facts.vms.iter().any(|v| v == name) {
            return Err(refuse(format!("{owner} has it")));
        }
        o.claim(
            name,
            Some(&owner),
            rec.generation,
            Some(&me),
            None,
            "reclaimed",
        )
        .map_err(|e| refuse(e.to_string()))?;
        tracing::warn!(vm = name, from = %owner, "reclaimed a guest its owner no longer has");
        Ok(())
    }

    pub async fn stop(&self, name: &str) -> Result<VmInfo, AgentError> {
        let e = self.entry(name)?;
        let _op = e.begin().await?;
        e.stop_announcing();
        let vm = e.vm();
        let spec = vm.spec.clone();
        blocking(move || {
            vm.stop();
            Ok(())
        })
        .await?;
        self.unlock_disks(&spec);
        Ok(self.info(&e))
    }

    pub async fn destroy(&self, name: &str) -> Result<(), AgentError> {
        let e = match self.entry(name) {
            Ok(e) => e,
            Err(AgentError::NotFound(n)) => {
                // A guest this host owns but lost (agent restart): release its record.
                if let Some(o) = &self.ownership {
                    if let Ok(Some(r)) = o.current(name) {
                        if r.owned_by(self.me()) {
                            let owner_of = |vm: &str| self.owner_of(vm);
                            self.locks
                                .release_all_of(&self.config.datastores, name, &owner_of);
                            o.release(name, self.me())
                                .map_err(|e| AgentError::Internal(e.to_string()))?;
                            tracing::info!(vm = name, "released the ownership of a lost guest");
                            return Ok(());
                        }
                    }
                }
                return Err(AgentError::NotFound(n));
            }
            Err(e) => return Err(e),
        };
        let _op = e.begin().await?;
        if let Ok(mut m) = self.vms.lock() {
            m.remove(name);
        }
        e.stop_announcing();
        let vm = e.vm();
        let spec = vm.spec.clone();
        blocking(move || {
            vm.stop();
            Ok(())
        })
        .await?;
        self.unlock_disks(&spec);
        if let Some(o) = &self.ownership {
            if let Err(err) = o.release(name, self.me()) {
                tracing::warn!(vm = name, error = %err, "could not release the ownership record");
            }
        }
        tracing::info!(vm = name, "vm destroyed");
        Ok(())
    }

    pub fn console(&self, name: &str, offset: u64, max: usize) -> Result<ConsoleChunk, AgentError> {
        let e = self.entry(name)?;
        let vm = e.vm();
        let c = vm
            .devices()
            .console
            .lock()
            .map_err(|_| AgentError::Internal("console lock poisoned".into()))?;
        let (from, bytes) = c.read_from(offset, max.clamp(1, 1 << 20));
        Ok(ConsoleChunk {
            offset: from,
            next_offset: from + bytes.len() as u64,
            data: String::from_utf8_lossy(&bytes).into_owned(),
        })
    }

    /// Save to `dir`: a running VM is paused for the save and resumed afterwards.
    pub async fn save(&self, name: &str, dir: PathBuf) -> Result<SaveOutcome, AgentError> {
        require_absolute(&dir)?;
        let e = self.entry(name)?;
        let _op = e.begin().await?;
        let vm = e.vm();
        blocking(move || {
            let was_running = vm.status() == VmStatus::Running;
            let t = Instant::now();
            vm.pause()?;
            let result = snapshot::save(&vm, &dir);
            if was_running {
                vm.resume()?;
            }
            let report = result?;
            Ok(SaveOutcome {
                report,
                paused_ms: if was_running {
                    t.elapsed().as_millis() as u64
                } else {
                    0
                },
            })
        })
        .await
    }

    /// Restore a saved VM (as `name` if given); it runs unless `paused`.
    pub async fn restore(
        &self,
        dir: PathBuf,
        name: Option<String>,
        paused: bool,
    ) -> Result<VmInfo, AgentError> {
        require_absolute(&dir)?;
        let (manifest, _) = snapshot::read(&dir)?;
        let name = name.unwrap_or(manifest.name);
        self.check_new_name(&name)?;
        let _r = self.reserve(manifest.spec.memory_mib)?;
        let hv = self.hv.clone();
        let env = self.device_env(&manifest.spec)?;
        let vm = blocking(move || {
            snapshot::restore(&hv, &dir, Some(&name), &env).map_err(AgentError::from)
        })
        .await?;
        self.adopt(&vm.spec.name)?;
        self.lock_disks(&vm.spec, &self.config.agent.name)?;
        if !paused {
            if let Err(e) = vm.resume() {
                self.unlock_disks(&vm.spec);
                return Err(e.into());
            }
        }
        let e = self.insert(vm)?;
        if !paused {
            self.announce(&e.vm().spec);
        }
        Ok(self.info(&e))
    }

    /// Memory digest of a paused VM.
    pub async fn digest(&self, name: &str) -> Result<String, AgentError> {
        let e = self.entry(name)?;
        let _op = e.begin().await?;
        let vm = e.vm();
        blocking(move || snapshot::memory_digest(&vm).map_err(AgentError::from)).await
    }

    /// Verify a paused workload guest's memory against its heartbeats.
    pub async fn verify(&self, name: &str) -> Result<VerifyOutcome, AgentError> {
        let e = self.entry(name)?;
        let _op = e.begin().await?;
        let vm = e.vm();
        let GuestKind::Workload(p) = vm.spec.kind.clone() else {
            return Err(AgentError::Invalid(format!(
                "{name} is not a workload guest; only workload memory can be verified"
            )));
        };
        if vm.status() == VmStatus::Running {
            return Err(VmError::State(VmStatus::Running, "pause it to verify its memory").into());
        }
        blocking(move || {
            let r = workload::verify(vm.memory(), vm.spec.vcpus, &p)
                .map_err(|e| AgentError::Vm(e.into()))?;
            Ok(VerifyOutcome {
                ok: r.ok(),
                pages_checked: r.pages_checked,
                in_flight: r.in_flight,
                bad_count: r.bad_count,
                bad_pages: r.bad_pages,
            })
        })
        .await
    }

    /// Sample heartbeats of every VM (called every second by the daemon).
    pub fn sample_all(&self) {
        for e in self.entries() {
            e.sample();
        }
    }

    /// Stop every VM (agent shutdown).
    pub fn shutdown(&self) {
        let entries = self.entries();
        if !entries.is_empty() {
            tracing::warn!(
                vms = entries.len(),
                "agent stopping: its guests stop with it"
            );
        }
        for e in entries {
            e.vm().stop();
        }
        if let Ok(mut m) = self.vms.lock() {
            m.clear();
        }
    }

    /// This agent's name and cluster key.
    pub fn identity(&self) -> mig::session::Identity {
        mig::session::Identity {
            agent: self.config.agent.name.clone(),
            key: self.key.clone(),
        }
    }

    /// Link counters and pinning (`ferry stats`).
    pub fn stats(&self) -> StatsReport {
        match &self.netpin {
            Ok(np) => np.report(),
            Err(reason) => StatsReport {
                available: false,
                reason: Some(reason.clone()),
                ..StatsReport::default()
            },
        }
    }

    /// Path helper for messages.
    pub fn socket(&self) -> &Path {
        &self.config.agent.socket
    }
}

/// Body of `POST /v1/migrations`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    pub vm: String,
    /// A name from `[peers]` or a management address (`198.18.0.2` or `198.18.0.2:7720`).
    pub to: String,
    #[serde(default)]
    pub options: MigrateOptions,
    /// Go ahead despite warnings of the pre-migration checks (never despite failures).
    #[serde(default)]
    pub force: bool,
}

impl Agent {
    fn register_migration(&self, h: Arc<MigrationHandle>) {
        if let Ok(mut m) = self.migrations.lock() {
            m.push_back(h);
            while m.len() > MIGRATIONS_KEPT {
                // Drop the oldest finished one.
                match m.iter().position(|x| x.record().phase.finished()) {
                    Some(i) => {
                        m.remove(i);
                    }
                    None => break,
                }
            }
        }
    }

    pub fn migrations(&self) -> Vec<MigrationRecord> {
        self.migrations
            .lock()
            .map(|m| m.iter().map(|h| h.record()).collect())
            .unwrap_or_default()
    }

    fn migration_handle(&self, id: &str) -> Result<Arc<MigrationHandle>, AgentError> {
        self.migrations
            .lock()
            .ok()
            .and_then(|m| m.iter().find(|h| h.id == id).cloned())
            .ok_or_else(|| AgentError::NoMigration(id.chars().take(64).collect()))
    }

    pub fn migration(&self, id: &str) -> Result<MigrationRecord, AgentError> {
        Ok(self.migration_handle(id)?.record())
    }

    /// Ask a running outgoing migration to stop; the guest stays here.
    pub fn cancel_migration(&self, id: &str) -> Result<MigrationRecord, AgentError> {
        let h = self.migration_handle(id)?;
        let r = h.record();
        if r.direction != "out" {
            return Err(AgentError::Conflict(format!(
                "{id} is an incoming migration; cancel it on the source agent"
            )));
        }
        if r.phase.finished() {
            return Err(AgentError::Conflict(format!(
                "{id} has already ended ({:?})",
                r.phase
            )));
        }
        if matches!(r.phase, mig::Phase::Committed) && r.guest_on != Some(mig::GuestOn::Unresolved)
        {
            return Err(AgentError::Conflict(format!(
                "{id} is past its commit point; it can no longer be cancelled"
            )));
        }
        // Past the commit and unresolved, cancelling only stops asking the destination: the
        // source copy stays paused.
        h.cancel();
        Ok(h.record())
    }

    /// Whether an outgoing migration is encrypted: `--encrypt` / `--no-encrypt`, else the
    /// policy (`preferred`: whenever the cluster key is configured, which an authenticated peer
    /// holds too).
    fn encrypts(
        &self,
        o: &mig::MigrateOptions,
        policy: crate::control::config::EncryptPolicy,
    ) -> Result<bool, AgentError> {
        use crate::control::config::EncryptPolicy;
        if o.encrypt && o.no_encrypt {
            return Err(AgentError::Invalid(
                "--encrypt and --no-encrypt contradict each other: give one".into(),
            ));
        }
        if o.no_encrypt {
            if policy == EncryptPolicy::Required {
                return Err(AgentError::Invalid(
                    "this host requires encrypted migrations ([migration] encrypt = \"required\"): drop --no-encrypt".into(),
                ));
            }
            return Ok(false);
        }
        if o.encrypt && self.key.is_none() {
            return Err(AgentError::Invalid(
                "--encrypt needs the cluster key to derive the data key: set [cluster] key_file on both hosts".into(),
            ));
        }
        Ok(o.encrypt || (policy != EncryptPolicy::Off && self.key.is_some()))
    }

    fn peer_addr(&self, to: &str) -> Result<std::net::SocketAddr, AgentError> {
        let port = crate::control::config::DEFAULT_MANAGEMENT_PORT;
        if to == self.config.agent.name {
            return Err(AgentError::Invalid(format!(
                "{to:?} is this host itself: migrate to another host (a peer name from [peers])"
            )));
        }
        let text = self.config.peers.get(to).map_or(to, String::as_str);
        crate::transport::tcp::parse_addr(text, port).map_err(AgentError::Invalid)
    }

    /// Start migrating a running VM to a peer; returns at once with the migration's record.
    pub async fn start_migration(
        self: &Arc<Self>,
        req: MigrateRequest,
    ) -> Result<MigrationRecord, AgentError> {
        req.options.validate().map_err(AgentError::Invalid)?;
        let mig_cfg = self.config.migration.clone().ok_or_else(|| {
            AgentError::Invalid(
                "migration is not configured on this host: add a [migration] section with its address".into(),
            )
        })?;
        if !mig_cfg.enabled {
            return Err(AgentError::Invalid(
                "migration is disabled on this host ([migration] enabled = false)".into(),
            ));
        }
        let peer = self.peer_addr(&req.to)?;
        let e = self.entry(&req.vm)?;
        e.not_migrating()?;
        if e.vm().status() == VmStatus::Running {
            let report = self.check(&req.vm, &req.to).await?;
            if let Some(why) = report.refusal(req.force) {
                return Err(AgentError::Conflict(format!(
                    "{} cannot migrate to {}: {why}",
                    req.vm, req.to
                )));
            }
        }
        let guard = e.op.clone().try_lock_owned().map_err(|_| {
            AgentError::Conflict(format!(
                "{} is busy with another operation; try again when it is done",
                req.vm
            ))
        })?;
        let vm = e.vm();
        let st = vm.status();
        if st != VmStatus::Running {
            return Err(AgentError::Conflict(format!(
                "{} is {st}; only a running VM migrates live (resume or start it first)",
                req.vm
            )));
        }
        let encrypt = self.encrypts(&req.options, mig_cfg.encrypt)?;
        let handle = Arc::new(MigrationHandle::new(
            mig::new_id().map_err(|e| AgentError::Internal(e.to_string()))?,
            &req.vm,
            "out",
            &req.to,
        ));
        self.register_migration(handle.clone());
        e.set_migration(Some(format!("out {}", handle.id)));
        let job = SourceJob {
            handle: handle.clone(),
            vm: vm.clone(),
            peer,
            local_migration: mig_cfg.address,
            identity: self.identity(),
            options: mig::MigrateOptions {
                encrypt,
                ..req.options
            },
            link: self.netpin.as_ref().ok().cloned(),
            ownership: self.ownership.clone(),
        };
        tracing::info!(vm = %req.vm, id = %handle.id, to = %req.to, peer = %peer, "migration starting");
        let agent = self.clone();
        let entry = e.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("mig-{}", handle.id))
            .spawn(move || {
                let span =
                    tracing::info_span!("migration", id = %job.handle.id, vm = %vm.spec.name);
                let _s = span.enter();
                let _guard = guard;
                match source::run(&job) {
                    Ok(summary) => {
                        // The destination runs the guest: this copy goes.
                        entry.stop_announcing();
                        vm.stop();
                        if let Ok(mut m) = agent.vms.lock() {
                            m.remove(&vm.spec.name);
                        }
                        job.handle.complete(summary);
                    }
                    Err(f) if f.guest_on == mig::GuestOn::Destination => {
                        // Contact was lost after the commit, but the guest runs there.
                        entry.stop_announcing();
                        vm.stop();
                        if let Ok(mut m) = agent.vms.lock() {
                            m.remove(&vm.spec.name);
                        }
                        job.handle.complete(f.summary.unwrap_or_default());
                        job.handle.resolved(
                            mig::GuestOn::Destination,
                            format!(
                                "{}; {}",
                                crate::control::error_chain(&f.error),
                                f.note.unwrap_or_default()
                            ),
                        );
                    }
                    Err(f) => {
                        job.handle.fail(&f.error);
                        if let Some(note) = f.note {
                            job.handle.resolved(f.guest_on, note);
                        }
                        entry.set_migration(None);
                    }
                }
                drop(job);
                drop(vm);
                crate::control::memory::give_back();
            });
        if let Err(err) = spawned {
            e.set_migration(None);
            let me = mig::MigrateError::Other(format!("cannot start the migration thread: {err}"));
            handle.fail(&me);
            return Err(AgentError::Internal(me.to_string()));
        }
        Ok(handle.record())
    }
}

/// CPU features common to a set of hosts (`ferry cpu baseline`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Baseline {
    pub hosts: Vec<String>,
    /// The highest psABI level every host offers in full.
    pub level: Option<String>,
    /// Named features every host offers.
    pub common: Vec<String>,
    /// Features some hosts offer and others do not: mask these on guests that must move
    /// between all of them.
    pub mask: Vec<String>,
}

impl Agent {
    fn local_probe(&self, peer: &HostFacts) -> Result<LinkProbe, String> {
        let m = self
            .config
            .migration
            .as_ref()
            .ok_or("migration is not configured here")?;
        let std::net::IpAddr::V4(local) = m.address else {
            return Err("the migration address is not IPv4".into());
        };
        let remote: std::net::Ipv4Addr = peer
            .migration_address
            .as_deref()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| format!("{} has no IPv4 migration address", peer.name))?;
        let r = crate::checks::ping::ping(
            local,
            remote,
            m.interface.as_deref(),
            3,
            std::time::Duration::from_millis(100),
            std::time::Duration::from_millis(500),
        )
        .map_err(|e| e.to_string())?;
        Ok(LinkProbe {
            sent: r.sent,
            received: r.received,
            detail: format!(
                "{} -> {} via {}: {}/{} replies{}",
                r.local,
                r.remote,
                r.interface.as_deref().unwrap_or("any NIC"),
                r.received,
                r.sent,
                r.rtt_avg_ms
                    .map(|a| format!(", {a:.2} ms average"))
                    .unwrap_or_default()
            ),
        })
    }

    /// Every pre-migration check of `vm` against peer `to`.
    pub async fn check(&self, vm: &str, to: &str) -> Result<CheckReport, AgentError> {
        let e = self.entry(vm)?;
        let v = e.vm();
        let spec = v.spec.clone();
        let disks: std::collections::BTreeMap<String, u64> = spec
            .disks
            .iter()
            .map(|d| {
                (
                    d.path.clone(),
                    self.datastores
                        .disk_size(&d.path)
                        .unwrap_or(d.size_mib << 20),
                )
            })
            .collect();
        let req = Requirements {
            vm: spec.name.clone(),
            memory_mib: spec.memory_mib,
            cpuid: v.cpuid(),
            disks,
            port_groups: spec.nics.iter().map(|n| n.port_group.clone()).collect(),
        };
        let peer = self.peer_addr(to)?;
        let me = self.identity();
        let query = mig::query::Query {
            disks: spec.disks.iter().map(|d| d.path.clone()).collect(),
        };
        let pf = tokio::task::spawn_blocking(move || mig::query::facts(peer, &me, &query))
            .await
            .map_err(|e| AgentError::Internal(e.to_string()))?
            .map_err(|e| {
                AgentError::Conflict(format!(
                    "cannot ask {to} about itself: {}",
                    crate::control::error_chain(&e)
                ))
            })?;
        let local = self.host_facts(&[]);
        let probe = if local.migration_enabled && pf.migration_enabled {
            self.local_probe(&pf)
        } else {
            Err("migration is not enabled on both hosts".into())
        };
        let mut items =
            crate::checks::evaluate(&req, &local, &pf, probe.as_ref().map_err(Clone::clone));
        items.extend(crate::checks::disk_lock_items(vm, &self.disk_locks(&spec)));
        Ok(CheckReport::new(vm, to, items))
    }

    /// ICMP probes over the migration network to a peer (`ferry ping PEER`).
    pub async fn ping(&self, to: &str) -> Result<crate::checks::ping::PingReport, AgentError> {
        let m = self.config.migration.clone().ok_or_else(|| {
            AgentError::Invalid("migration is not configured here: add [migration]".into())
        })?;
        let std::net::IpAddr::V4(local) = m.address else {
            return Err(AgentError::Invalid(
                "the migration address is not IPv4".into(),
            ));
        };
        let peer = self.peer_addr(to)?;
        let me = self.identity();
        let pf = tokio::task::spawn_blocking(move || {
            mig::query::facts(peer, &me, &mig::query::Query::default())
        })
        .await
        .map_err(|e| AgentError::Internal(e.to_string()))?
        .map_err(|e| {
            AgentError::Conflict(format!(
                "cannot reach {to}: {}",
                crate::control::error_chain(&e)
            ))
        })?;
        let remote: std::net::Ipv4Addr = pf
            .migration_address
            .as_deref()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| AgentError::Conflict(format!("{to} has no IPv4 migration address")))?;
        blocking(move || {
            crate::checks::ping::ping(
                local,
                remote,
                m.interface.as_deref(),
                5,
                std::time::Duration::from_millis(200),
                std::time::Duration::from_secs(1),
            )
            .map_err(|e| AgentError::Internal(e.to_string()))
        })
        .await
    }

    /// The CPU baseline common to this host and `peers`.
    pub async fn cpu_baseline(&self, peers: Vec<String>) -> Result<Baseline, AgentError> {
        use crate::checks::cpu;
        let mut all = vec![self.host_facts(&[])];
        for p in peers {
            let addr = self.peer_addr(&p)?;
            let me = self.identity();
            let f = tokio::task::spawn_blocking(move || {
                mig::query::facts(addr, &me, &mig::query::Query::default())
            })
            .await
            .map_err(|e| AgentError::Internal(e.to_string()))?
            .map_err(|e| {
                AgentError::Conflict(format!(
                    "cannot ask {p}: {}",
                    crate::control::error_chain(&e)
                ))
            })?;
            all.push(f);
        }
        let sets: Vec<_> = all.iter().map(|f| cpu::features(&f.cpuid)).collect();
        let mut common = sets[0].clone();
        let mut any = sets[0].clone();
        for s in &sets[1..] {
            common = common.intersection(s).copied().collect();
            any.extend(s.iter().copied());
        }
        Ok(Baseline {
            hosts: all.iter().map(|f| f.name.clone()).collect(),
            level: cpu::level(&common).map(str::to_string),
            common: common.iter().map(|f| f.to_string()).collect(),
            mask: any.difference(&common).map(|f| f.to_string()).collect(),
        })
    }
}

/// Body of `POST /v1/ping`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PingRequest {
    /// A name from `[peers]` or a management address.
    pub to: String,
    /// A throughput blast; without it, ICMP probes (RTT, loss, path MTU).
    #[serde(default)]
    pub throughput: Option<mig::blast::BlastRequest>,
}

impl Agent {
    /// A throughput probe over the migration network to a peer.
    pub async fn ping_throughput(
        &self,
        req: PingRequest,
    ) -> Result<mig::blast::BlastResult, AgentError> {
        let throughput = req
            .throughput
            .clone()
            .ok_or_else(|| AgentError::Invalid("no throughput request".into()))?;
        throughput.validate().map_err(AgentError::Invalid)?;
        let local = self.migration_addr().map_err(AgentError::Invalid)?;
        let peer = self.peer_addr(&req.to)?;
        let me = self.identity();
        blocking(move || {
            mig::blast::run(peer, local, &me, &throughput).map_err(|e| match e {
                mig::MigrateError::Config(m) => AgentError::Invalid(m),
                other => AgentError::Conflict(format!(
                    "the throughput probe failed: {}",
                    crate::control::error_chain(&other)
                )),
            })
        })
        .await
    }
}

impl Host for Agent {
    fn name(&self) -> String {
        self.config.agent.name.clone()
    }

    fn identity(&self) -> mig::session::Identity {
        Agent::identity(self)
    }

    fn requires_encryption(&self) -> bool {
        self.config
            .migration
            .as_ref()
            .is_some_and(|m| m.encrypt == crate::control::config::EncryptPolicy::Required)
    }

    fn migration_addr(&self) -> Result<std::net::IpAddr, String> {
        match &self.config.migration {
            Some(m) if m.enabled => Ok(m.address),
            Some(_) => Err(format!(
                "migration is disabled on {} ([migration] enabled = false)",
                self.config.agent.name
            )),
            None => Err(format!(
                "migration is not configured on {} (no [migration] section)",
                self.config.agent.name
            )),
        }
    }

    fn create_incoming(
        &self,
        spec: &VmSpec,
        regions: &[RegionLayout],
        handle: &Arc<MigrationHandle>,
    ) -> Result<Arc<dyn crate::migrate::guest::IncomingGuest>, String> {
        self.check_new_name(&spec.name).map_err(|e| e.to_string())?;
        let _r = self.reserve(spec.memory_mib).map_err(|e| e.to_string())?;
        if crate::faults::hit("dest:create").as_deref() == Some("fail") {
            return Err(format!(
                "cannot allocate {} MiB of guest memory: out of memory (injected fault)",
                spec.memory_mib
            ));
        }
        // The guest's disks stay locked for it: it holds them on the source until the commit
        // moves its ownership record here (a lock the source never took is taken in its name).
        let source = handle.record().peer;
        let source = source.split_once(" (").map_or(source.as_str(), |(n, _)| n);
        self.lock_disks(spec, source).map_err(|e| e.to_string())?;
        let env = self.device_env(spec).map_err(|e| e.to_string())?;
        let vm = Vm::create_empty_in(&self.hv, spec.clone(), regions, &env)
            .map_err(|e| e.to_string())?;
        let e = self.insert(vm).map_err(|e| e.to_string())?;
        e.set_migration(Some(format!("in {}", handle.id)));
        if let (Ok(g), Ok(mut m)) = (e.op.clone().try_lock_owned(), self.incoming_ops.lock()) {
            m.insert(spec.name.clone(), g);
        }
        Ok(e.vm())
    }

    fn incoming_done(&self, name: &str, ok: bool) {
        if let Ok(mut m) = self.incoming_ops.lock() {
            m.remove(name);
        }
        let Ok(e) = self.entry(name) else { return };
        e.set_migration(None);
        if !ok {
            if let Ok(mut m) = self.vms.lock() {
                m.remove(name);
            }
            e.vm().stop();
            tracing::info!(vm = name, "incoming VM removed after a failed migration");
        }
    }

    fn register(&self, handle: Arc<MigrationHandle>) {
        self.register_migration(handle);
    }

    fn facts(&self, disks: &[String]) -> HostFacts {
        self.host_facts(disks)
    }

    fn announce(&self, spec: &VmSpec) -> Vec<Announcement> {
        Agent::announce(self, spec)
    }

    fn prepare_claim(&self, vm: &str, from: &str, migration: &str) -> Option<Staged> {
        let o = self.ownership.as_ref()?;
        let (expect, g) = match o.current(vm).ok()? {
            Some(r) if r.owned_by(from) => (Some(from), r.generation),
            None => (None, 0),
            Some(_) => return None,
        };
        o.stage(vm, expect, g, Some(self.me()), Some(migration), "migrated")
            .map_err(|e| tracing::warn!(vm, error = %e, "could not prepare the ownership claim; the commit will write it"))
            .ok()
    }

    fn claimed(&self, vm: &str) {
        if let Some(o) = &self.ownership {
            o.prune(vm);
        }
    }

    fn claim(
        &self,
        vm: &str,
        from: &str,
        generation: Option<u64>,
        migration: &str,
        prepared: Option<Staged>,
    ) -> Result<Option<Staged>, String> {
        let Some(o) = &self.ownership else {
            // Without ownership records the lock file is the only word: it moves now.
            self.hand_over_disks(vm);
            return Ok(None);
        };
        let g = match generation {
            Some(g) => g,
            // The source keeps no records (configurations differ): take it from the source.
            None => match o.current(vm).map_err(|e| e.to_string())? {
                Some(r) if r.owned_by(from) => r.generation,
                Some(r) => {
                    return Err(format!(
                        "the record names {} (generation {}), not {from}",
                        r.owner_name(),
                        r.generation
                    ))
                }
                None => 0,
            },
        };
        let expect = if generation.is_none() && g == 0 {
            None
        } else {
            Some(from)
        };
        let staged = match prepared {
            Some(s) if s.record().generation == g + 1 && s.expects() == expect => s,
            _ => o
                .stage(vm, expect, g, Some(self.me()), Some(migration), "migrated")
                .map_err(|e| e.to_string())?,
        };
        let r = o.publish(&staged).map_err(|e| e.to_string())?;
        tracing::info!(
            vm,
            generation = r.generation,
            "ownership taken over at the commit point"
        );
        self.hand_over_disks(vm);
        Ok(Some(staged))
    }

    fn give_back(&self, vm: &str, to: &str, migration: &str) {
        let Some(o) = &self.ownership else { return };
        let res = o.current(vm).and_then(|cur| match cur {
            Some(r) if r.owned_by(self.me()) => o
                .claim(
                    vm,
                    Some(self.me()),
                    r.generation,
                    Some(to),
                    Some(migration),
                    "returned",
                )
                .map(|_| ()),
            _ => Ok(()),
        });
        if let Err(e) = res {
            tracing::error!(vm, error = %e, "could not hand ownership back to the source");
        }
    }
}

/// Result of a save.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SaveOutcome {
    #[serde(flatten)]
    pub report: SaveReport,
    /// How long a running guest was paused for the save.
    pub paused_ms: u64,
}

/// Result of a memory verification.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VerifyOutcome {
    pub ok: bool,
    pub pages_checked: u64,
    pub in_flight: u64,
    pub bad_count: u64,
    pub bad_pages: Vec<u64>,
}

struct Reservation<'a> {
    agent: &'a Agent,
    mib: u64,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if let Ok(mut r) = self.agent.reserving.lock() {
            *r = r.saturating_sub(self.mib);
        }
    }
}

fn require_absolute(dir: &Path) -> Result<(), AgentError> {
    if dir.is_absolute() {
        return Ok(());
    }
    Err(AgentError::Invalid(format!(
        "save directory {:?} must be an absolute path",
        dir.display()
    )))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AgentError> + Send + 'static,
) -> Result<T, AgentError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::Internal(format!("worker failed: {e}")))?
}

/// How long to wait between heartbeat samples.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

#[cfg(test)]
mod meminfo_tests {
    use super::parse_meminfo;

    #[test]
    fn meminfo_that_cannot_be_read_is_an_error_not_zero() {
        let text = "MemTotal:       16384000 kB\nMemFree: 1 kB\nMemAvailable:    8192000 kB\n";
        assert_eq!(parse_meminfo(text), Ok((16000, 8000)));
        let e = parse_meminfo("").unwrap_err();
        assert!(e.contains("MemTotal"), "{e}");
        assert!(parse_meminfo("MemTotal: 5 kB\n").is_err());
        assert!(parse_meminfo("MemTotal: x kB\nMemAvailable: 1 kB\n").is_err());
    }
}
