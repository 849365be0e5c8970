//! Outgoing migrations (start, cancel, the thread that runs the source side) and the table of
//! migrations in both directions that `ferry migrations` shows.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::migrate::source::{self, SourceJob};
use crate::migrate::{self as mig, MigrateOptions, MigrationHandle, MigrationRecord};
use crate::vm::VmStatus;

use super::{Agent, AgentError};

/// How many finished migrations `ferry migrations` remembers.
pub const MIGRATIONS_KEPT: usize = 100;

/// Body of `POST /v1/migrations`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    pub vm: String,
    /// A name from `[peers]` or a management address (`198.18.0.2` or `198.18.0.2:7720`).
    pub to: String,
    #[serde(default)]
    pub options: MigrateOptions,
    /// Go ahead despite warnings of the pre-migration checks (never despite failures).
    #[serde(default)]
    pub force: bool,
}

impl Agent {
    pub(super) fn register_migration(&self, h: Arc<MigrationHandle>) {
        if let Ok(mut m) = self.migrations.lock() {
            m.push_back(h);
            while m.len() > MIGRATIONS_KEPT {
                // Drop the oldest finished one.
                match m.iter().position(|x| x.record().phase.finished()) {
                    Some(i) => {
                        m.remove(i);
                    }
                    None => break,
                }
            }
        }
    }

    pub fn migrations(&self) -> Vec<MigrationRecord> {
        self.migrations
            .lock()
            .map(|m| m.iter().map(|h| h.record()).collect())
            .unwrap_or_default()
    }

    fn migration_handle(&self, id: &str) -> Result<Arc<MigrationHandle>, AgentError> {
        self.migrations
            .lock()
            .ok()
            .and_then(|m| m.iter().find(|h| h.id == id).cloned())
            .ok_or_else(|| AgentError::NoMigration(id.chars().take(64).collect()))
    }

    pub fn migration(&self, id: &str) -> Result<MigrationRecord, AgentError> {
        Ok(self.migration_handle(id)?.record())
    }

    /// Ask a running outgoing migration to stop; the guest stays here.
    pub fn cancel_migration(&self, id: &str) -> Result<MigrationRecord, AgentError> {
        let h = self.migration_handle(id)?;
        let r = h.record();
        if r.direction != "out" {
            return Err(AgentError::Conflict(format!(
                "{id} is an incoming migration; cancel it on the source agent"
            )));
        }
        if r.phase.finished() {
            return Err(AgentError::Conflict(format!(
                "{id} has already ended ({:?})",
                r.phase
            )));
        }
        if matches!(r.phase, mig::Phase::Committed) && r.guest_on != Some(mig::GuestOn::Unresolved)
        {
            return Err(AgentError::Conflict(format!(
                "{id} is past its commit point; it can no longer be cancelled"
            )));
        }
        // Past the commit and unresolved, cancelling only stops asking the destination: the
        // source copy stays paused.
        h.cancel();
        Ok(h.record())
    }

    /// Whether an outgoing migration is encrypted: `--encrypt` / `--no-encrypt`, else the
    /// policy (`preferred`: whenever the cluster key is configured, which an authenticated peer
    /// holds too).
    fn encrypts(
        &self,
        o: &mig::MigrateOptions,
        policy: crate::control::config::EncryptPolicy,
    ) -> Result<bool, AgentError> {
        use crate::control::config::EncryptPolicy;
        if o.encrypt && o.no_encrypt {
            return Err(AgentError::Invalid(
                "--encrypt and --no-encrypt contradict each other: give one".into(),
            ));
        }
        if o.no_encrypt {
            if policy == EncryptPolicy::Required {
                return Err(AgentError::Invalid(
                    "this host requires encrypted migrations ([migration] encrypt = \"required\"): drop --no-encrypt".into(),
                ));
            }
            return Ok(false);
        }
        if o.encrypt && self.key.is_none() {
            return Err(AgentError::Invalid(
                "--encrypt needs the cluster key to derive the data key: set [cluster] key_file on both hosts".into(),
            ));
        }
        Ok(o.encrypt || (policy != EncryptPolicy::Off && self.key.is_some()))
    }

    pub(super) fn peer_addr(&self, to: &str) -> Result<std::net::SocketAddr, AgentError> {
        let port = crate::control::config::DEFAULT_MANAGEMENT_PORT;
        if to == self.config.agent.name {
            return Err(AgentError::Invalid(format!(
                "{to:?} is this host itself: migrate to another host (a peer name from [peers])"
            )));
        }
        let text = self.config.peers.get(to).map_or(to, String::as_str);
        crate::transport::tcp::parse_addr(text, port)
            .map_err(|e| AgentError::Invalid(e.to_string()))
    }

    /// Start migrating a running VM to a peer; returns at once with the migration's record.
    pub async fn start_migration(
        self: &Arc<Self>,
        req: MigrateRequest,
    ) -> Result<MigrationRecord, AgentError> {
        req.options
            .validate()
            .map_err(|e| AgentError::Invalid(e.to_string()))?;
        let mig_cfg = self.config.migration.clone().ok_or_else(|| {
            AgentError::Invalid(
                "migration is not configured on this host: add a [migration] section with its address".into(),
            )
        })?;
        if !mig_cfg.enabled {
            return Err(AgentError::Invalid(
                "migration is disabled on this host ([migration] enabled = false)".into(),
            ));
        }
        let peer = self.peer_addr(&req.to)?;
        let e = self.entry(&req.vm)?;
        e.not_migrating()?;
        if e.vm().status() == VmStatus::Running {
            let report = self.check(&req.vm, &req.to).await?;
            if let Some(why) = report.refusal(req.force) {
                return Err(AgentError::Conflict(format!(
                    "{} cannot migrate to {}: {why}",
                    req.vm, req.to
                )));
            }
        }
        let guard = e.op.clone().try_lock_owned().map_err(|_| {
            AgentError::Conflict(format!(
                "{} is busy with another operation; try again when it is done",
                req.vm
            ))
        })?;
        let vm = e.vm();
        let st = vm.status();
        if st != VmStatus::Running {
            return Err(AgentError::Conflict(format!(
                "{} is {st}; only a running VM migrates live (resume or start it first)",
                req.vm
            )));
        }
        let encrypt = self.encrypts(&req.options, mig_cfg.encrypt)?;
        let handle = Arc::new(MigrationHandle::new(
            mig::new_id().map_err(|e| AgentError::Internal(e.to_string()))?,
            &req.vm,
            "out",
            &req.to,
        ));
        self.register_migration(handle.clone());
        e.set_migration(Some(format!("out {}", handle.id)));
        let job = SourceJob {
            handle: handle.clone(),
            vm: vm.source(),
            peer,
            local_migration: mig_cfg.address,
            identity: self.identity(),
            options: mig::MigrateOptions {
                encrypt,
                ..req.options
            },
            link: self.netpin.as_ref().ok().cloned(),
            ownership: self.ownership.clone(),
        };
        tracing::info!(vm = %req.vm, id = %handle.id, to = %req.to, peer = %peer, "migration starting");
        let agent = self.clone();
        let entry = e.clone();
        // A VMM outlives this agent: if the agent dies mid-switchover, the next one finds the
        // guest paused with this mark and resolves it (adoption.rs).
        let mark = vm
            .remote()
            .map(|_| super::adoption::migrating_mark(&self.config.agent.state_dir, &req.vm));
        if let Some(m) = &mark {
            if let Err(err) = std::fs::write(m, handle.id.as_bytes()) {
                tracing::warn!(vm = %req.vm, error = %err, "cannot write the migration mark");
            }
        }
        let spawned = std::thread::Builder::new()
            .name(format!("mig-{}", handle.id))
            .spawn(move || {
                let span =
                    tracing::info_span!("migration", id = %job.handle.id, vm = %vm.spec().name);
                let _s = span.enter();
                let _guard = guard;
                match source::run(&job) {
                    Ok(summary) => {
                        // The destination runs the guest: this copy goes.
                        entry.stop_announcing();
                        vm.stop();
                        if let Ok(mut m) = agent.vms.lock() {
                            m.remove(&vm.spec().name);
                        }
                        job.handle.complete(summary);
                    }
                    Err(f) if f.guest_on == mig::GuestOn::Destination => {
                        // Contact was lost after the commit, but the guest runs there.
                        entry.stop_announcing();
                        vm.stop();
                        if let Ok(mut m) = agent.vms.lock() {
                            m.remove(&vm.spec().name);
                        }
                        job.handle.complete(f.summary.unwrap_or_default());
                        job.handle.resolved(
                            mig::GuestOn::Destination,
                            format!(
                                "{}; {}",
                                crate::util::error_chain(&f.error),
                                f.note.unwrap_or_default()
                            ),
                        );
                    }
                    Err(f) => {
                        job.handle.fail(&f.error);
                        if let Some(note) = f.note {
                            job.handle.resolved(f.guest_on, note);
                        }
                        entry.set_migration(None);
                    }
                }
                if let Some(m) = &mark {
                    let _ = std::fs::remove_file(m);
                }
                drop(job);
                drop(vm);
                crate::control::memory::give_back();
            });
        if let Err(err) = spawned {
            e.set_migration(None);
            let me = mig::MigrateError::Other(format!("cannot start the migration thread: {err}"));
            handle.fail(&me);
            return Err(AgentError::Internal(me.to_string()));
        }
        Ok(handle.record())
    }
}
