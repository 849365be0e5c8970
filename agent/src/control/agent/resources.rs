//! What this host has to give: memory (a VM's memory is reserved while it is created, so two
//! creations cannot both take the last of it), datastores and port groups for a guest's devices,
//! and the facts a peer asks for before a migration.

use crate::checks::HostFacts;
use crate::vm::{VmSpec, VmStatus};

use super::{Agent, AgentError};

/// What keeps the agent from knowing the host's memory.
#[derive(Debug, thiserror::Error)]
pub enum MemInfoError {
    #[error("cannot read /proc/meminfo to learn how much memory is free: {0}")]
    Read(std::io::Error),
    #[error("/proc/meminfo has no readable {0} line")]
    Field(&'static str),
}

/// /proc/meminfo values in MiB: (total, available). A file that cannot be read (e.g. no fds
/// left) or lacks a field is an error, never "0 MiB".
pub fn host_memory() -> Result<(u64, u64), MemInfoError> {
    let text = std::fs::read_to_string("/proc/meminfo").map_err(MemInfoError::Read)?;
    parse_meminfo(&text)
}

/// (MemTotal, MemAvailable) in MiB from the text of /proc/meminfo.
pub fn parse_meminfo(text: &str) -> Result<(u64, u64), MemInfoError> {
    let field = |name: &'static str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kib| kib / 1024)
            .ok_or(MemInfoError::Field(name))
    };
    Ok((field("MemTotal:")?, field("MemAvailable:")?))
}

impl Agent {
    pub(super) fn committed_mib(&self) -> u64 {
        let vms: u64 = self
            .entries()
            .iter()
            .map(|e| e.vm())
            .filter(|v| !matches!(v.status(), VmStatus::Stopped))
            .map(|v| v.spec().memory_mib)
            .sum();
        vms + self.reserving.lock().map(|r| *r).unwrap_or(0)
    }

    /// Refuse memory the host cannot give; on success the amount is reserved until released.
    pub(super) fn reserve(&self, mib: u64) -> Result<Reservation<'_>, AgentError> {
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
    pub(super) fn check_devices(&self, spec: &VmSpec) -> Result<(), AgentError> {
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
}

/// Memory promised to a VM on its way in ([`Agent::reserve`]); given back when dropped, by
/// then counted with the VM itself (or no longer needed).
pub(super) struct Reservation<'a> {
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

#[cfg(test)]
mod meminfo_tests {
    use super::parse_meminfo;

    #[test]
    fn meminfo_that_cannot_be_read_is_an_error_not_zero() {
        let text = "MemTotal:       16384000 kB\nMemFree: 1 kB\nMemAvailable:    8192000 kB\n";
        assert_eq!(parse_meminfo(text).unwrap(), (16000, 8000));
        let e = parse_meminfo("").unwrap_err().to_string();
        assert!(e.contains("MemTotal"), "{e}");
        assert!(parse_meminfo("MemTotal: 5 kB\n").is_err());
        assert!(parse_meminfo("MemTotal: x kB\nMemAvailable: 1 kB\n").is_err());
    }
}
