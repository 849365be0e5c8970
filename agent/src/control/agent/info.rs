//! What the agent shows about its guests and itself: `list`, `inspect`, `console`, `ferry host`.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::vm::devices::ExitStats;
use crate::vm::workload;
use crate::vm::{GuestKind, VmSpec, VmStatus};

use super::entry::VmEntry;
use super::ownership::DiskLockInfo;
use super::resources::host_memory;
use super::{Agent, AgentError, VcpuRates};

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
    /// VMMs found at start that this agent could not adopt (they keep running), and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vmm_errors: Vec<String>,
}

impl Agent {
    pub fn host_info(&self) -> HostInfo {
        let (total, avail, memory_error) = match host_memory() {
            Ok((t, a)) => (t, a, None),
            Err(e) => (0, 0, Some(e.to_string())),
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
            vmm_errors: self
                .vmm_errors
                .lock()
                .map(|v| v.clone())
                .unwrap_or_default(),
        }
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
                    kind: vm.spec().kind.name().into(),
                    memory_mib: vm.spec().memory_mib,
                    vcpus: vm.spec().vcpus,
                }
            })
            .collect()
    }

    pub(super) fn info(&self, e: &VmEntry) -> VmInfo {
        let vm = e.vm();
        let d = vm.details();
        let (heartbeats, dirty_rate) = match &vm.spec().kind {
            GuestKind::Workload(p) => {
                let data = workload::DataLayout::new(
                    &vm.memory().layout(),
                    vm.spec().vcpus,
                    p.working_set_mib.map(|m| m << 20),
                );
                let ws: Vec<u64> = data.slices.iter().map(|s| s.2).collect();
                let rates = e.rates(&vm.heartbeats().unwrap_or_default(), &ws);
                let measured = if d.state == VmStatus::Running {
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
        VmInfo {
            name: e.name.clone(),
            state: d.state,
            migration: e.migration(),
            spec: vm.spec().clone(),
            created_unix: e
                .created
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            fault: d.fault,
            last_pause_us: d.last_pause_us,
            last_resume_us: d.last_resume_us,
            tsc_khz: d.tsc_khz,
            exits: d.exits,
            heartbeats,
            dirty_rate,
            disk_locks: self.disk_locks(vm.spec()),
            nics: d.nics,
            disks: d.disks,
        }
    }

    pub fn inspect(&self, name: &str) -> Result<VmInfo, AgentError> {
        let e = self.entry(name)?;
        Ok(self.info(&e))
    }

    pub fn console(&self, name: &str, offset: u64, max: usize) -> Result<ConsoleChunk, AgentError> {
        let e = self.entry(name)?;
        let (from, bytes) = e.vm().console(offset, max.clamp(1, 1 << 20))?;
        Ok(ConsoleChunk {
            offset: from,
            next_offset: from + bytes.len() as u64,
            data: String::from_utf8_lossy(&bytes).into_owned(),
        })
    }
}
