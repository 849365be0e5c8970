//! The guest handle the agent's table holds: the KVM guest in this process ([`Vm`], `[vmm]
//! mode = "inline"`) or a guest in a `ferry vmm` process of its own ([`RemoteGuest`], `mode =
//! "process"`). Everything the agent does to a guest goes through here.

use std::sync::Arc;
use std::time::Duration;

use crate::migrate::guest::{IncomingGuest, SourceGuest};
use crate::vm::cpuid::CpuidEntry;
use crate::vm::devices::ExitStats;
use crate::vm::memory::GuestMemory;
use crate::vm::virtio::blk::BlkStats;
use crate::vm::virtio::net::NetStats;
use crate::vm::workload::Heartbeat;
use crate::vm::{Vm, VmError, VmSpec, VmStatus};
use crate::vmm::remote::RemoteGuest;

/// A guest, wherever it runs.
#[derive(Clone)]
pub enum Guest {
    Inline(Arc<Vm>),
    Process(Arc<RemoteGuest>),
}

/// What `inspect` shows beyond the spec, read at once.
pub struct Details {
    pub state: VmStatus,
    pub fault: Option<String>,
    pub last_pause_us: u64,
    pub last_resume_us: u64,
    pub tsc_khz: u32,
    pub exits: ExitStats,
    pub nics: Vec<NetStats>,
    pub disks: Vec<BlkStats>,
}

impl Guest {
    pub fn spec(&self) -> &VmSpec {
        match self {
            Guest::Inline(v) => &v.spec,
            Guest::Process(r) => r.spec(),
        }
    }

    pub fn status(&self) -> VmStatus {
        match self {
            Guest::Inline(v) => v.status(),
            Guest::Process(r) => r.status(),
        }
    }

    /// The in-process VM, for what only it can do (save, digest).
    pub fn inline(&self) -> Option<&Arc<Vm>> {
        match self {
            Guest::Inline(v) => Some(v),
            Guest::Process(_) => None,
        }
    }

    pub fn remote(&self) -> Option<&Arc<RemoteGuest>> {
        match self {
            Guest::Inline(_) => None,
            Guest::Process(r) => Some(r),
        }
    }

    /// Run a created guest, or a paused one.
    pub fn start(&self) -> Result<(), VmError> {
        match self {
            Guest::Inline(v) => v.start(),
            Guest::Process(r) => r.start(),
        }
    }

    pub fn pause(&self) -> Result<Duration, VmError> {
        match self {
            Guest::Inline(v) => v.pause(),
            Guest::Process(r) => r.pause(),
        }
    }

    pub fn resume(&self) -> Result<(), VmError> {
        match self {
            Guest::Inline(v) => v.resume(),
            Guest::Process(r) => r.start(),
        }
    }

    /// Stop the guest (a VMM exits).
    pub fn stop(&self) {
        match self {
            Guest::Inline(v) => v.stop(),
            Guest::Process(r) => r.stop(),
        }
    }

    pub fn memory(&self) -> Arc<GuestMemory> {
        match self {
            Guest::Inline(v) => v.memory().clone(),
            Guest::Process(r) => r.memory().clone(),
        }
    }

    pub fn heartbeats(&self) -> Option<Vec<Heartbeat>> {
        match self {
            Guest::Inline(v) => v.heartbeats(),
            Guest::Process(r) => r.heartbeats(),
        }
    }

    pub fn cpuid(&self) -> Vec<CpuidEntry> {
        match self {
            Guest::Inline(v) => v.cpuid(),
            Guest::Process(r) => r.cpuid(),
        }
    }

    /// Console bytes from absolute offset `offset`: where they start, and the bytes.
    pub fn console(&self, offset: u64, max: usize) -> Result<(u64, Vec<u8>), VmError> {
        match self {
            Guest::Inline(v) => {
                let c = v
                    .devices()
                    .console
                    .lock()
                    .map_err(|_| VmError::Device("console lock poisoned".into()))?;
                Ok(c.read_from(offset, max))
            }
            Guest::Process(r) => r.console(offset, max as u32),
        }
    }

    pub fn details(&self) -> Details {
        match self {
            Guest::Inline(vm) => {
                let virtio = &vm.devices().virtio;
                Details {
                    state: vm.status(),
                    fault: vm.fault().map(|f| format!("vCPU {}: {}", f.vcpu, f.reason)),
                    last_pause_us: vm.last_pause().as_micros() as u64,
                    last_resume_us: vm.last_resume().as_micros() as u64,
                    tsc_khz: vm.tsc_khz(),
                    exits: vm.devices().counters.stats(),
                    nics: virtio.net.iter().map(|n| n.stats()).collect(),
                    disks: virtio.blk.iter().map(|b| b.stats()).collect(),
                }
            }
            Guest::Process(r) => {
                let s = r.vmm_status();
                let fault = r.fault(s.as_ref());
                match s {
                    Some(s) => Details {
                        state: s.state,
                        fault,
                        last_pause_us: s.last_pause_us,
                        last_resume_us: s.last_resume_us,
                        tsc_khz: s.tsc_khz,
                        exits: s.exits,
                        nics: s.nics,
                        disks: s.disks,
                    },
                    None => Details {
                        state: r.status(),
                        fault,
                        last_pause_us: 0,
                        last_resume_us: 0,
                        tsc_khz: 0,
                        exits: ExitStats::default(),
                        nics: vec![],
                        disks: vec![],
                    },
                }
            }
        }
    }

    pub fn source(&self) -> Arc<dyn SourceGuest> {
        match self {
            Guest::Inline(v) => v.clone(),
            Guest::Process(r) => r.clone(),
        }
    }

    pub fn incoming(&self) -> Arc<dyn IncomingGuest> {
        match self {
            Guest::Inline(v) => v.clone(),
            Guest::Process(r) => r.clone(),
        }
    }
}
