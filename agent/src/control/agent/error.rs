//! [`AgentError`]: what an agent operation answers when it fails, with its HTTP status and
//! machine-readable code.

use crate::checks::disklock::LockError;
use crate::vm::snapshot::SnapshotError;
use crate::vm::VmError;

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
    /// A guest's VMM process could not be started or reached (`[vmm] mode = "process"`).
    #[error(transparent)]
    Vmm(#[from] crate::vmm::remote::RemoteError),
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
            AgentError::Snapshot(_) | AgentError::Vmm(_) | AgentError::Internal(_) => 500,
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
            AgentError::Vmm(_) => "vmm",
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
