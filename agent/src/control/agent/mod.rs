//! The agent's guests and what can be done to them, independent of HTTP: create, start, pause,
//! resume, stop, destroy, inspect, console, save, restore, migrate. Every operation validates its
//! input and answers with an [`AgentError`] that maps to an HTTP status.
//!
//! Operations on one VM are serialized by its operation lock; reads (list, inspect, console)
//! never wait for a long operation such as a save.
//!
//! One file per concern; the `impl Agent` blocks in them all extend the [`Agent`] defined here:
//!
//! - `error.rs`: [`AgentError`] and its HTTP status and code.
//! - `entry.rs`: one VM in the table ([`VmEntry`]): its operation lock, migration mark and
//!   heartbeat samples (the rates `inspect` shows).
//! - `info.rs`: what `list`, `inspect`, `console` and `ferry host` show.
//! - `resources.rs`: host memory and its reservations, devices on datastores and port groups, and
//!   this host's facts as a peer sees them.
//! - `ownership.rs`: ownership records and disk locks: who may run a guest.
//! - `lifecycle.rs`: create, start, pause, resume, stop, destroy, save, restore, digest, verify,
//!   MAC announcements.
//! - `migrations.rs`: outgoing migrations and the table of migrations.
//! - `probes.rs`: questions to peers: the pre-migration check, ping, throughput, CPU baseline.
//! - `host.rs`: the destination's side of a migration (the [`crate::migrate::dest::Host`] impl).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::checks::datastore::Datastores;
use crate::checks::disklock::DiskLocks;
use crate::migrate::ownership::Ownership;
use crate::migrate::{self as mig, MigrationHandle};
use crate::netpin::{NetPin, StatsReport};
use crate::vm::{Hypervisor, VmSpec};
use crate::vmm::remote::RemoteGuest;

use super::config::{valid_name, Config, VmmMode};
use guest::Guest;

mod adoption;
mod entry;
mod error;
mod guest;
mod host;
mod info;
mod lifecycle;
mod migrations;
mod ownership;
mod probes;
mod resources;

pub use entry::{VcpuRates, VmEntry};
pub use error::AgentError;
pub use info::{ConsoleChunk, DirtyRate, HostInfo, VmInfo, VmSummary};
pub use lifecycle::{SaveOutcome, VerifyOutcome};
pub use migrations::{MigrateRequest, MIGRATIONS_KEPT};
pub use ownership::DiskLockInfo;
pub use probes::{Baseline, PingRequest};
pub use resources::{host_memory, parse_meminfo};

/// The agent: its host's hypervisor, configuration, and guests.
pub struct Agent {
    pub config: Config,
    hv: Arc<Hypervisor>,
    vms: Mutex<BTreeMap<String, Arc<VmEntry>>>,
    /// Memory promised to VMs being created (counted before they appear in `vms`).
    reserving: Mutex<u64>,
    /// Migrations, newest last (the last [`MIGRATIONS_KEPT`]).
    migrations: Mutex<std::collections::VecDeque<Arc<MigrationHandle>>>,
    /// Owned op locks of VMs arriving by migration, held until they are committed or gone.
    incoming_ops: Mutex<BTreeMap<String, tokio::sync::OwnedMutexGuard<()>>>,
    /// The eBPF programs on this host's NICs, or why there are none.
    netpin: Result<Arc<NetPin>, crate::netpin::NetpinOff>,
    datastores: Datastores,
    /// The cluster key peers must prove (and this agent proves to them).
    key: Option<Arc<crate::auth::ClusterKey>>,
    /// Guest ownership records on the shared datastore (`[cluster] ownership_datastore`).
    ownership: Option<Ownership>,
    /// Disk locks on the datastores: one running guest per disk in the cluster.
    locks: DiskLocks,
    /// VMMs found at start that could not be adopted (incompatible protocol, ...): they keep
    /// running; `ferry host` lists them.
    vmm_errors: Mutex<Vec<String>>,
}

impl Agent {
    pub fn new(
        config: Config,
        hv: Arc<Hypervisor>,
        netpin: Result<Arc<NetPin>, crate::netpin::NetpinOff>,
        datastores: Datastores,
        key: Option<Arc<crate::auth::ClusterKey>>,
    ) -> Arc<Agent> {
        let ownership = config
            .cluster
            .ownership_datastore
            .as_ref()
            .and_then(|d| config.datastores.get(d))
            .map(|dir| Ownership::new(dir.clone()));
        let locks = DiskLocks::new(
            &config.agent.name,
            std::time::Duration::from_secs(config.cluster.lock_lease_s),
        );
        locks.heartbeat(&config.datastores);
        let agent = Arc::new(Agent {
            vmm_errors: Mutex::new(Vec::new()),
            locks,
            ownership,
            config,
            hv,
            netpin,
            datastores,
            key,
            vms: Mutex::new(BTreeMap::new()),
            reserving: Mutex::new(0),
            migrations: Mutex::new(std::collections::VecDeque::new()),
            incoming_ops: Mutex::new(BTreeMap::new()),
        });
        if agent.process_mode() {
            agent.adopt_vmms();
        }
        if let Some(o) = &agent.ownership {
            // Guests this host owns that do not run here were lost when the agent stopped.
            for r in o.all() {
                if r.owned_by(&agent.config.agent.name) && agent.entry(&r.vm).is_err() {
                    tracing::warn!(vm = %r.vm, generation = r.generation, "this host owns a guest that is not running here (lost when the agent stopped); `ferry destroy` releases it");
                }
            }
        }
        agent
    }

    fn entry(&self, name: &str) -> Result<Arc<VmEntry>, AgentError> {
        self.vms
            .lock()
            .map_err(|_| AgentError::Internal("VM table lock poisoned".into()))?
            .get(name)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(name.to_string()))
    }

    fn entries(&self) -> Vec<Arc<VmEntry>> {
        self.vms
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    fn check_new_name(&self, name: &str) -> Result<(), AgentError> {
        if !valid_name(name) {
            return Err(AgentError::Invalid(format!(
                "VM name {name:?} is not valid: use 1-64 letters, digits, '.', '_' or '-', not starting with '.' or '-'"
            )));
        }
        if self.entry(name).is_ok() {
            return Err(AgentError::Exists(name.to_string()));
        }
        Ok(())
    }

    fn insert(&self, vm: Guest) -> Result<Arc<VmEntry>, AgentError> {
        let name = vm.spec().name.clone();
        let entry = Arc::new(VmEntry::new(vm));
        let mut m = self
            .vms
            .lock()
            .map_err(|_| AgentError::Internal("VM table lock poisoned".into()))?;
        if m.contains_key(&name) {
            return Err(AgentError::Exists(name));
        }
        m.insert(name, entry.clone());
        Ok(entry)
    }

    fn me(&self) -> &str {
        &self.config.agent.name
    }

    /// Sample heartbeats of every VM (called every second by the daemon).
    pub fn sample_all(&self) {
        for e in self.entries() {
            e.sample();
        }
    }

    /// Whether guests run in VMM processes of their own (`[vmm] mode = "process"`).
    pub fn process_mode(&self) -> bool {
        self.config.vmm.mode == VmmMode::Process
    }

    /// Build a new guest of `spec` (not running yet): in this process, or in a VMM of its own.
    fn new_guest(&self, spec: VmSpec, env: &crate::vm::DeviceEnv) -> Result<Guest, AgentError> {
        if !self.process_mode() {
            return Ok(Guest::Inline(Arc::new(crate::vm::Vm::create_in(
                &self.hv, spec, env,
            )?)));
        }
        let launch = crate::vmm::CreateLaunch {
            spec,
            devices: env.clone(),
            host: self.host_settings(),
        };
        Ok(Guest::Process(RemoteGuest::create(
            &self.config.agent.state_dir,
            &launch,
        )?))
    }

    /// The host settings a VMM's hypervisor must share with this agent's.
    fn host_settings(&self) -> crate::vmm::HostSettings {
        crate::vmm::HostSettings {
            huge_pages: self.config.limits.huge_pages,
            cpu_mask: self
                .config
                .cpu
                .mask
                .iter()
                .filter_map(|f| crate::vm::cpuid::parse_feature(f).ok())
                .collect(),
        }
    }

    /// Agent shutdown: stop every inline VM; VMM processes keep running (a restarted agent
    /// adopts them), the agent only lets go of them.
    pub fn shutdown(&self) {
        if self.process_mode() {
            let entries = self.entries();
            tracing::info!(
                vms = entries.len(),
                "agent stopping: guests in VMM processes keep running"
            );
            if let Ok(mut m) = self.vms.lock() {
                m.clear();
            }
            return;
        }
        let entries = self.entries();
        if !entries.is_empty() {
            tracing::warn!(
                vms = entries.len(),
                "agent stopping: its guests stop with it"
            );
        }
        for e in entries {
            e.vm().stop();
        }
        if let Ok(mut m) = self.vms.lock() {
            m.clear();
        }
    }

    /// This agent's name and cluster key.
    pub fn identity(&self) -> mig::session::Identity {
        mig::session::Identity {
            agent: self.config.agent.name.clone(),
            key: self.key.clone(),
        }
    }

    /// Link counters and pinning (`ferry stats`).
    pub fn stats(&self) -> StatsReport {
        match &self.netpin {
            Ok(np) => np.report(),
            Err(reason) => StatsReport {
                available: false,
                reason: Some(reason.to_string()),
                ..StatsReport::default()
            },
        }
    }

    /// Path helper for messages.
    pub fn socket(&self) -> &Path {
        &self.config.agent.socket
    }
}

fn require_absolute(dir: &Path) -> Result<(), AgentError> {
    if dir.is_absolute() {
        return Ok(());
    }
    Err(AgentError::Invalid(format!(
        "save directory {:?} must be an absolute path",
        dir.display()
    )))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AgentError> + Send + 'static,
) -> Result<T, AgentError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::Internal(format!("worker failed: {e}")))?
}

/// How long to wait between heartbeat samples.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
