//! What a VM is: its spec (guest kind, disks, NICs, CPU policy), the shape checks that need no
//! host, and its lifecycle status.

use serde::{Deserialize, Serialize};

use super::cpuid::CpuPolicy;
use super::{RawParams, ServiceParams, VmError, WorkloadParams};
use super::{MAX_DIRTY_RATE_MIB, MAX_MEMORY_MIB, MAX_VCPUS};

/// Which program the guest runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestKind {
    /// The built-in CPL3 workload generator.
    Workload(WorkloadParams),
    /// A flat binary started in 16-bit real mode.
    Raw(RawParams),
    /// The Rust service guest with a virtio NIC and disk (added last: older states still decode).
    Service(ServiceParams),
}

impl GuestKind {
    pub fn name(&self) -> &'static str {
        match self {
            GuestKind::Workload(_) => "workload",
            GuestKind::Raw(_) => "raw",
            GuestKind::Service(_) => "service",
        }
    }

    /// Whether the guest's NICs and disks are virtio devices.
    pub fn has_virtio(&self) -> bool {
        matches!(self, GuestKind::Service(_))
    }
}

/// What a VM is: enough to build it from scratch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub name: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub kind: GuestKind,
    /// Files the guest owns, by datastore path (`[shared] vm1/disk0.img`).
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    /// Network interfaces: a MAC on a port group.
    #[serde(default)]
    pub nics: Vec<NicSpec>,
    /// What CPU the guest sees.
    #[serde(default)]
    pub cpu: CpuPolicy,
}

/// A disk: a file on a datastore, vSphere style (`[datastore] relative/path`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    pub path: String,
    pub size_mib: u64,
}

impl DiskSpec {
    /// Why a disk path is not acceptable, or None when it is.
    pub fn path_problem(path: &str) -> Option<&'static str> {
        let Some(rest) = path.trim().strip_prefix('[') else {
            return Some("must look like \"[datastore] dir/file.img\"");
        };
        let Some((store, rel)) = rest.split_once(']') else {
            return Some("must look like \"[datastore] dir/file.img\" (no closing ']')");
        };
        let rel = rel.trim();
        if store.trim().is_empty() {
            return Some("names no datastore; write \"[datastore] dir/file.img\"");
        }
        if rel.is_empty() {
            return Some("names no file after the datastore");
        }
        if rel.starts_with('/') {
            return Some("is absolute after the datastore; give a path relative to the datastore");
        }
        if rel.split('/').any(|c| c == "..") {
            return Some("uses '..', which would leave the datastore; give a path inside it");
        }
        if rel.split('/').any(str::is_empty) {
            return Some("has an empty component ('//' or a trailing '/')");
        }
        None
    }

    /// Split `[store] rel/path` into the datastore name and the relative path.
    pub fn parse_path(path: &str) -> Option<(&str, &str)> {
        let rest = path.trim().strip_prefix('[')?;
        let (store, rel) = rest.split_once(']')?;
        let rel = rel.trim();
        let ok = !store.is_empty()
            && !rel.is_empty()
            && !rel.starts_with('/')
            && !rel.split('/').any(|c| c == ".." || c.is_empty());
        ok.then_some((store.trim(), rel))
    }
}

/// A NIC: its MAC address on a port group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    pub mac: String,
    pub port_group: String,
}

/// Parse "52:54:00:12:34:56".
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut m = [0u8; 6];
    for (o, p) in m.iter_mut().zip(parts) {
        if p.len() != 2 {
            return None;
        }
        *o = u8::from_str_radix(p, 16).ok()?;
    }
    // Unicast only.
    (m[0] & 1 == 0).then_some(m)
}

impl VmSpec {
    /// Shape checks that need no host: vCPU count and memory size.
    pub fn validate(&self) -> Result<(), VmError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(VmError::Vcpus(self.vcpus));
        }
        if self.memory_mib == 0 || !self.memory_mib.is_multiple_of(2) {
            return Err(VmError::MemorySize(self.memory_mib));
        }
        if self.memory_mib > MAX_MEMORY_MIB {
            return Err(VmError::MemoryTooLarge(self.memory_mib));
        }
        if let GuestKind::Workload(p) = &self.kind {
            if p.dirty_rate_mib > MAX_DIRTY_RATE_MIB {
                return Err(VmError::Spec(format!(
                    "dirty rate of {} MiB/s is more than any host can write (at most {MAX_DIRTY_RATE_MIB} MiB/s; 0 = idle)",
                    p.dirty_rate_mib
                )));
            }
            if let Some(ws) = p.working_set_mib {
                if ws == 0 || ws > self.memory_mib {
                    return Err(VmError::Spec(format!(
                        "working set of {ws} MiB must be between 1 MiB and the VM's memory ({} MiB); leave it out for all of memory",
                        self.memory_mib
                    )));
                }
            }
        }
        for d in &self.disks {
            if let Some(why) = DiskSpec::path_problem(&d.path) {
                return Err(VmError::Spec(format!("disk path {:?}: {why}", d.path)));
            }
        }
        for n in &self.nics {
            if parse_mac(&n.mac).is_none() {
                return Err(VmError::Spec(format!(
                    "NIC MAC {:?} is not a unicast MAC like 52:54:00:12:34:56",
                    n.mac
                )));
            }
        }
        self.cpu
            .hidden()
            .map_err(|e| VmError::Spec(e.to_string()))?;
        if let GuestKind::Service(p) = &self.kind {
            p.validate(self)?;
        }
        Ok(())
    }
}

/// Lifecycle state of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmStatus {
    /// Built, never run.
    Created,
    Running,
    Paused,
    /// Powered off by request.
    Stopped,
    /// Stopped on its own (triple fault, KVM error).
    Crashed,
}

impl std::fmt::Display for VmStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmStatus::Created => "created",
            VmStatus::Running => "running",
            VmStatus::Paused => "paused",
            VmStatus::Stopped => "stopped",
            VmStatus::Crashed => "crashed",
        })
    }
}
