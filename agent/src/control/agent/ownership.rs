//! Who may run a guest: its ownership record on the shared datastore (`[cluster]
//! ownership_datastore`: a guest runs on one host in the cluster) and its disks' locks (one
//! running guest per disk).

pub use crate::checks::disklock::DiskLockInfo;
use crate::checks::disklock::LockHolder;
use crate::migrate as mig;
use crate::vm::VmSpec;

use super::{Agent, AgentError};

impl Agent {
    /// Where this host's guests' ownership records say `vm` runs (None without records).
    pub(super) fn owner_of(&self, vm: &str) -> Option<String> {
        self.ownership
            .as_ref()
            .and_then(|o| o.current(vm).ok().flatten())
            .and_then(|r| r.owner)
    }

    /// A new guest here: its ownership record names this host (refused if another owns it).
    pub(super) fn adopt(&self, name: &str) -> Result<(), AgentError> {
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
    pub(super) async fn may_run(&self, name: &str) -> Result<(), AgentError> {
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
                crate::util::error_chain(&e)
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
    pub(super) fn lock_disks(&self, spec: &VmSpec, host: &str) -> Result<(), AgentError> {
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
    pub(super) fn unlock_disks(&self, spec: &VmSpec) {
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
    pub(super) fn hand_over_disks(&self, vm: &str) {
        let Ok(e) = self.entry(vm) else { return };
        for d in &e.vm().spec().disks {
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
}
