//! The destination's side of a migration: the agent as the [`Host`] the receiver asks to create
//! the incoming guest, register the migration, and take over (or give back) its ownership.

use std::sync::Arc;

use crate::announce::Announcement;
use crate::checks::HostFacts;
use crate::migrate::dest::{Host, HostError};
use crate::migrate::ownership::Staged;
use crate::migrate::{self as mig, MigrationHandle};
use crate::vm::memory::RegionLayout;
use crate::vm::{Vm, VmSpec};

use super::guest::Guest;
use super::Agent;
use crate::vmm::remote::RemoteGuest;

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

    fn migration_addr(&self) -> Result<std::net::IpAddr, HostError> {
        match &self.config.migration {
            Some(m) if m.enabled => Ok(m.address),
            Some(_) => Err(HostError::Disabled(format!(
                "migration is disabled on {} ([migration] enabled = false)",
                self.config.agent.name
            ))),
            None => Err(HostError::Disabled(format!(
                "migration is not configured on {} (no [migration] section)",
                self.config.agent.name
            ))),
        }
    }

    fn create_incoming(
        &self,
        spec: &VmSpec,
        regions: &[RegionLayout],
        handle: &Arc<MigrationHandle>,
    ) -> Result<Arc<dyn crate::migrate::guest::IncomingGuest>, HostError> {
        self.check_new_name(&spec.name)
            .map_err(|e| HostError::NameTaken(e.to_string()))?;
        let _r = self
            .reserve(spec.memory_mib)
            .map_err(|e| HostError::NoRoom(e.to_string()))?;
        if crate::faults::hit("dest:create").as_deref() == Some("fail") {
            return Err(HostError::NoRoom(format!(
                "cannot allocate {} MiB of guest memory: out of memory (injected fault)",
                spec.memory_mib
            )));
        }
        // The guest's disks stay locked for it: it holds them on the source until the commit
        // moves its ownership record here (a lock the source never took is taken in its name).
        let source = handle.record().peer;
        let source = source.split_once(" (").map_or(source.as_str(), |(n, _)| n);
        self.lock_disks(spec, source)
            .map_err(|e| HostError::Ownership(e.to_string()))?;
        let env = self
            .device_env(spec)
            .map_err(|e| HostError::Failed(e.to_string()))?;
        let vm = if self.process_mode() {
            let launch = crate::vmm::IncomingLaunch {
                spec: spec.clone(),
                regions: regions.to_vec(),
                devices: env,
                host: self.host_settings(),
            };
            Guest::Process(
                RemoteGuest::incoming(&self.config.agent.state_dir, &launch)
                    .map_err(|e| HostError::Failed(e.to_string()))?,
            )
        } else {
            Guest::Inline(Arc::new(
                Vm::create_empty_in(&self.hv, spec.clone(), regions, &env)
                    .map_err(|e| HostError::Failed(e.to_string()))?,
            ))
        };
        let e = match self.insert(vm.clone()) {
            Ok(e) => e,
            Err(err) => {
                vm.stop();
                return Err(HostError::NameTaken(err.to_string()));
            }
        };
        e.set_migration(Some(format!("in {}", handle.id)));
        if let (Ok(g), Ok(mut m)) = (e.op.clone().try_lock_owned(), self.incoming_ops.lock()) {
            m.insert(spec.name.clone(), g);
        }
        Ok(e.vm().incoming())
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
    ) -> Result<Option<Staged>, HostError> {
        let Some(o) = &self.ownership else {
            // Without ownership records the lock file is the only word: it moves now.
            self.hand_over_disks(vm);
            return Ok(None);
        };
        let (staged, r) = o
            .take_over(vm, from, generation, self.me(), migration, prepared)
            .map_err(|e| HostError::Ownership(e.to_string()))?;
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
