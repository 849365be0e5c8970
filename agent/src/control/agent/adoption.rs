//! Re-adoption (`[vmm] mode = "process"`): at start the agent finds the VMMs that outlived its
//! predecessor (`DIR/vmm/*.sock`), checks each one's identity and protocol version and the
//! guest's ownership record, and lists them unchanged.

use std::path::{Path, PathBuf};

use crate::vm::VmStatus;
use crate::vmm::client::ClientError;
use crate::vmm::remote::{RemoteError, RemoteGuest};

use super::guest::Guest;
use super::Agent;

/// The mark of an outgoing migration in flight: `DIR/vmm/N.migrating`. A VMM found paused with
/// it was paused by a switchover its agent did not live to finish.
pub(super) fn migrating_mark(state_dir: &Path, name: &str) -> PathBuf {
    crate::vmm::vmm_dir(state_dir).join(format!("{name}.migrating"))
}

impl Agent {
    /// Adopt every running VMM in the state directory.
    pub(super) fn adopt_vmms(&self) {
        let dir = crate::vmm::vmm_dir(&self.config.agent.state_dir);
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return;
        };
        let mut names: Vec<String> = rd
            .flatten()
            .filter_map(|e| {
                let p = e.path();
                (p.extension()? == "sock").then(|| p.file_stem()?.to_str().map(str::to_string))?
            })
            .collect();
        names.sort();
        for name in names {
            self.adopt_one(&name);
        }
    }

    fn adopt_one(&self, name: &str) {
        let state_dir = self.config.agent.state_dir.clone();
        let g = match RemoteGuest::adopt(&state_dir, name) {
            Ok(g) => g,
            Err(RemoteError::Client(ClientError::Connect { source, .. })) => {
                // Nobody listens: a VMM that ended without its monitor cleaning up.
                let why = crate::vmm::read_exit_record(&state_dir, name)
                    .map(|r| r.reason)
                    .unwrap_or_else(|| source.to_string());
                tracing::info!(vm = name, reason = %why, "stale VMM socket (its VMM is gone)");
                let _ = std::fs::remove_file(crate::vmm::socket_path(&state_dir, name));
                return;
            }
            Err(e) => {
                // Incompatible or misbehaving: listed in `ferry host`, never killed.
                let msg = format!("VMM of {name} not adopted: {e}");
                tracing::error!(vm = name, error = %e, "VMM not adopted; it keeps running");
                if let Ok(mut v) = self.vmm_errors.lock() {
                    v.push(msg);
                }
                return;
            }
        };
        let mark = migrating_mark(&state_dir, name);
        let marked = mark.exists();
        let _ = std::fs::remove_file(&mark);
        if g.is_incoming() && g.vmm_status().is_some_and(|s| !s.ever_resumed) {
            // An incoming migration whose agent died: the source keeps the guest.
            tracing::warn!(
                vm = name,
                "discarding the copy of an incoming migration that its agent did not finish"
            );
            g.stop();
            return;
        }
        if let Some(o) = &self.ownership {
            if let Ok(Some(r)) = o.current(name) {
                if !r.owned_by(self.me()) {
                    tracing::warn!(vm = name, owner = %r.owner_name(), generation = r.generation, "another host owns this guest now: stopping its VMM here");
                    g.stop();
                    return;
                }
            }
        }
        if marked && g.status() == VmStatus::Paused {
            // Paused by a switchover whose agent died before the commit: the guest is still
            // ours (checked above), so it runs here again.
            match g.start() {
                Ok(()) => tracing::warn!(
                    vm = name,
                    "resumed a guest paused by a migration its agent did not finish"
                ),
                Err(e) => tracing::error!(vm = name, error = %e, "could not resume the guest"),
            }
        }
        // The guest's disk locks: still on the datastores (an agent stop releases nothing), and
        // this host's lease heartbeat goes on from this agent (renewed at start and every
        // lease/3). Taken again here in case one went missing; holding it is fine. Another
        // guest holding a disk is reported and the guest left running: it already writes there.
        if !matches!(g.status(), VmStatus::Crashed | VmStatus::Stopped) {
            let owner_of = |vm: &str| self.owner_of(vm);
            for d in &g.spec().disks {
                if let Err(e) =
                    self.locks
                        .acquire(&self.datastores, &d.path, name, self.me(), &owner_of)
                {
                    tracing::error!(vm = name, disk = %d.path, error = %e, "an adopted guest's disk lock could not be taken");
                    if let Ok(mut v) = self.vmm_errors.lock() {
                        v.push(format!(
                            "VMM of {name} adopted, but its disk lock could not be taken: {e}"
                        ));
                    }
                }
            }
        }
        let pid = g.hello().pid;
        let state = g.status();
        match self.insert(Guest::Process(g)) {
            Ok(_) => tracing::info!(vm = name, pid, %state, "VMM adopted"),
            Err(e) => tracing::error!(vm = name, error = %e, "VMM not adopted"),
        }
    }
}
