//! A guest's life on this host: create, start, pause, resume, stop, destroy, save, restore,
//! digest, verify, and the MAC announcements of a guest that starts running here.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::announce::Announcement;
use crate::vm::snapshot::{self, SaveReport};
use crate::vm::workload;
use crate::vm::{GuestKind, Vm, VmError, VmSpec, VmStatus};

use super::guest::Guest;
use super::{blocking, require_absolute, Agent, AgentError, VmInfo};

/// The in-process VM of a guest, for what only it supports yet (save, digest).
fn inline_only(vm: &Guest, what: &str) -> Result<Arc<Vm>, AgentError> {
    vm.inline().cloned().ok_or_else(|| {
        AgentError::Invalid(format!(
            "a guest in a VMM process cannot be {what} yet ([vmm] mode = \"process\")"
        ))
    })
}

impl Agent {
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
        let vm = self.new_guest(spec, &env)?;
        if let Err(e) = self.adopt(&vm.spec().name) {
            vm.stop();
            return Err(e);
        }
        if start {
            if let Err(e) = self.lock_disks(vm.spec(), &self.config.agent.name) {
                vm.stop();
                return Err(e);
            }
            if let Err(e) = vm.start() {
                self.unlock_disks(vm.spec());
                vm.stop();
                return Err(e.into());
            }
        }
        let e = match self.insert(vm.clone()) {
            Ok(e) => e,
            Err(err) => {
                vm.stop();
                return Err(err);
            }
        };
        if start {
            self.announce(e.vm().spec());
        }
        Ok(self.info(&e))
    }

    /// Start a created or paused VM; a stopped or crashed one boots afresh from its spec.
    pub async fn start(&self, name: &str) -> Result<VmInfo, AgentError> {
        let e = self.entry(name)?;
        let _op = e.begin().await?;
        let vm = e.vm();
        match vm.status() {
            VmStatus::Stopped | VmStatus::Crashed => {
                let spec = vm.spec().clone();
                self.lock_disks(&spec, self.me())?;
                vm.stop();
                drop(vm);
                let env = self.device_env(&spec)?;
                let fresh = self.new_guest_blocking(spec, env).await?;
                if let Err(err) = fresh.start() {
                    fresh.stop();
                    return Err(err.into());
                }
                self.announce(fresh.spec());
                e.replace(fresh);
            }
            VmStatus::Created => {
                self.lock_disks(vm.spec(), self.me())?;
                vm.start()?;
                self.announce(vm.spec());
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

    pub async fn stop(&self, name: &str) -> Result<VmInfo, AgentError> {
        let e = self.entry(name)?;
        let _op = e.begin().await?;
        e.stop_announcing();
        let vm = e.vm();
        let spec = vm.spec().clone();
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
        let spec = vm.spec().clone();
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

    /// Save to `dir`: a running VM is paused for the save and resumed afterwards.
    pub async fn save(&self, name: &str, dir: PathBuf) -> Result<SaveOutcome, AgentError> {
        require_absolute(&dir)?;
        let e = self.entry(name)?;
        let _op = e.begin().await?;
        let vm = e.vm();
        let vm = inline_only(&vm, "saved")?;
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
        if self.process_mode() {
            return Err(AgentError::Invalid(
                "restoring a saved guest is not supported with [vmm] mode = \"process\" yet".into(),
            ));
        }
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
        let e = self.insert(Guest::Inline(Arc::new(vm)))?;
        if !paused {
            self.announce(e.vm().spec());
        }
        Ok(self.info(&e))
    }

    /// Memory digest of a paused VM.
    pub async fn digest(&self, name: &str) -> Result<String, AgentError> {
        let e = self.entry(name)?;
        let _op = e.begin().await?;
        let vm = e.vm();
        let vm = inline_only(&vm, "digested")?;
        blocking(move || snapshot::memory_digest(&vm).map_err(AgentError::from)).await
    }

    /// Verify a paused workload guest's memory against its heartbeats.
    pub async fn verify(&self, name: &str) -> Result<VerifyOutcome, AgentError> {
        let e = self.entry(name)?;
        let _op = e.begin().await?;
        let vm = e.vm();
        let GuestKind::Workload(p) = vm.spec().kind.clone() else {
            return Err(AgentError::Invalid(format!(
                "{name} is not a workload guest; only workload memory can be verified"
            )));
        };
        if vm.status() == VmStatus::Running {
            return Err(VmError::State(VmStatus::Running, "pause it to verify its memory").into());
        }
        blocking(move || {
            let r = workload::verify(&vm.memory(), vm.spec().vcpus, &p)
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

    /// [`Agent::new_guest`] off the async runtime (building memory, or a VMM coming up, takes
    /// a moment).
    async fn new_guest_blocking(
        &self,
        spec: VmSpec,
        env: crate::vm::DeviceEnv,
    ) -> Result<Guest, AgentError> {
        if !self.process_mode() {
            let hv = self.hv.clone();
            return blocking(move || {
                Ok(Guest::Inline(Arc::new(
                    Vm::create_in(&hv, spec, &env).map_err(AgentError::from)?,
                )))
            })
            .await;
        }
        let launch = crate::vmm::CreateLaunch {
            spec,
            devices: env,
            host: self.host_settings(),
        };
        let dir = self.config.agent.state_dir.clone();
        blocking(move || {
            Ok(Guest::Process(crate::vmm::remote::RemoteGuest::create(
                &dir, &launch,
            )?))
        })
        .await
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
