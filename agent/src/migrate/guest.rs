//! The guest as the migration engine sees it: two traits, one per side, and their
//! implementation for the KVM guest ([`Vm`]).
//!
//! The engine ([`super::source`], [`super::dest`]) only ever holds an `Arc<dyn SourceGuest>`
//! or an `Arc<dyn IncomingGuest>`, in the spirit of Cloud Hypervisor's `Pausable`,
//! `Snapshottable` and `Migratable`. Everything it needs is here, and nothing more: no VM file
//! descriptor and no `Arc<Vm>` crosses this boundary, because KVM refuses VM ioctls from any
//! process but the VM's creator. A guest that runs in a VMM process of its own implements the
//! same traits with requests to that process (dirty log, pause/resume, state), while its memory
//! is a mapping the agent shares ([`GuestMemory`] reads and writes pages in any mapping).
//!
//! The engine's tests implement both traits with an in-memory fake (`super::testing`).

use std::sync::Arc;

use crate::vm::memory::{DirtyBitmap, GuestMemory};
use crate::vm::state::VmState;
use crate::vm::virtio::net::Forwarding;
use crate::vm::virtio::Quiesced;
use crate::vm::workload::Heartbeat;
use crate::vm::{Vm, VmError, VmSpec, VmStatus};

/// A running guest that migrates out.
pub trait SourceGuest: Send + Sync {
    /// What the guest is (name, size, devices): the destination builds its shape from it.
    fn spec(&self) -> &VmSpec;
    /// Its memory. Pages read while the guest runs are a racy snapshot (the dirty log says
    /// which to send again); read while it is paused they are exact.
    fn memory(&self) -> Arc<GuestMemory>;
    /// Turn dirty logging on (a fresh log: every page clean until written) or off.
    fn set_dirty_logging(&self, on: bool) -> Result<(), VmError>;
    /// Fetch and clear the dirty log: every page written since the last call, by the vCPUs or
    /// by the devices and the agent. Never under-counts (a region without logging reports all).
    fn take_dirty(&self) -> Result<DirtyBitmap, VmError>;
    /// Pages ever touched: pre-copy's first round skips the rest (they read as zero).
    fn populated(&self) -> DirtyBitmap;
    /// Hold the vCPUs back `pct` % of the time (0: off).
    fn set_throttle(&self, pct: u8);
    /// Stop the vCPUs and quiesce the devices (see [`SourceGuest::last_quiesced`]).
    fn pause(&self) -> Result<(), VmError>;
    /// Run a paused guest again.
    fn resume(&self) -> Result<(), VmError>;
    fn status(&self) -> VmStatus;
    /// What the last pause did to the devices: I/O drained, disks stuck, frames queued.
    fn last_quiesced(&self) -> Quiesced;
    /// Everything but memory (vCPUs, interrupt controllers, clock, devices); paused only.
    fn capture_state(&self) -> Result<VmState, VmError>;
    /// Once the guest runs on the destination: its NICs' taps and the frames queued since the
    /// capture, to forward (`forward.rs`). Empty when it has no NIC.
    fn take_for_forwarding(&self) -> Vec<(usize, Forwarding)>;
}

/// An empty guest of a given shape that a migration fills in: its vCPUs exist but do not run
/// until the commit.
pub trait IncomingGuest: Send + Sync {
    fn spec(&self) -> &VmSpec;
    /// Its memory, written page by page by the receivers (each page by one stream only).
    fn memory(&self) -> Arc<GuestMemory>;
    /// The MAC of each NIC, in order (empty: no NIC, so nothing is forwarded to it).
    fn nic_macs(&self) -> Vec<[u8; 6]>;
    /// Queue frames forwarded by the source for NIC `nic` (the guest runs here by now).
    fn deliver_forwarded(&self, nic: usize, frames: Vec<Vec<u8>>);
    /// Load the captured state (the guest has not run).
    fn restore_state(&self, state: &VmState) -> Result<(), VmError>;
    /// Run it: the commit.
    fn resume(&self) -> Result<(), VmError>;
    /// The workload guest's heartbeats (None for other kinds), to measure the pause the guest
    /// observed.
    fn heartbeats(&self) -> Option<Vec<Heartbeat>>;
    /// The guest's TSC frequency, kHz (heartbeats count its cycles).
    fn tsc_khz(&self) -> u32;
    /// Stop it for good after a failed migration (after [`super::dest::Host::incoming_done`];
    /// nothing happens to a guest already stopped).
    fn destroy(&self);
}

impl SourceGuest for Vm {
    fn spec(&self) -> &VmSpec {
        &self.spec
    }
    fn memory(&self) -> Arc<GuestMemory> {
        Vm::memory(self).clone()
    }
    fn set_dirty_logging(&self, on: bool) -> Result<(), VmError> {
        Ok(Vm::memory(self).set_dirty_logging_all(on)?)
    }
    fn take_dirty(&self) -> Result<DirtyBitmap, VmError> {
        Ok(Vm::memory(self).take_dirty()?)
    }
    fn populated(&self) -> DirtyBitmap {
        Vm::memory(self).populated()
    }
    fn set_throttle(&self, pct: u8) {
        Vm::set_throttle(self, pct);
    }
    fn pause(&self) -> Result<(), VmError> {
        Vm::pause(self).map(|_| ())
    }
    fn resume(&self) -> Result<(), VmError> {
        Vm::resume(self)
    }
    fn status(&self) -> VmStatus {
        Vm::status(self)
    }
    fn last_quiesced(&self) -> Quiesced {
        Vm::last_quiesced(self)
    }
    fn capture_state(&self) -> Result<VmState, VmError> {
        Vm::capture_state(self)
    }
    fn take_for_forwarding(&self) -> Vec<(usize, Forwarding)> {
        self.devices().virtio.take_for_forwarding()
    }
}

impl IncomingGuest for Vm {
    fn spec(&self) -> &VmSpec {
        &self.spec
    }
    fn memory(&self) -> Arc<GuestMemory> {
        Vm::memory(self).clone()
    }
    fn nic_macs(&self) -> Vec<[u8; 6]> {
        self.devices().virtio.net.iter().map(|n| n.mac()).collect()
    }
    fn deliver_forwarded(&self, nic: usize, frames: Vec<Vec<u8>>) {
        if let Some(dev) = self.devices().virtio.net.get(nic) {
            dev.receive_forwarded(frames);
        }
    }
    fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        Vm::restore_state(self, state)
    }
    fn resume(&self) -> Result<(), VmError> {
        Vm::start(self)
    }
    fn heartbeats(&self) -> Option<Vec<Heartbeat>> {
        Vm::heartbeats(self)
    }
    fn tsc_khz(&self) -> u32 {
        Vm::tsc_khz(self)
    }
    fn destroy(&self) {
        if Vm::status(self) != VmStatus::Stopped {
            self.stop();
        }
    }
}
