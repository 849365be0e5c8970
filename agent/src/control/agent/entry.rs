//! One VM in the agent's table: its operation lock, the mark of a migration in progress, the
//! cancel flag of its MAC announcements, and the heartbeat samples its rates come from.

use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use serde::{Deserialize, Serialize};

use super::guest::Guest;
use crate::vm::workload::Heartbeat;

use super::AgentError;

/// A vCPU's heartbeat counters, and rates derived from two heartbeat samples. The rates are
/// `None` (JSON `null`) until there are two samples at least 200 ms apart: for a guest that
/// started, or arrived by migration, less than that ago.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VcpuRates {
    pub id: u32,
    pub beats: u64,
    pub beats_per_sec: Option<f64>,
    /// "fill" or "work".
    pub phase: String,
    pub pass: u64,
    pub pages_written: u64,
    pub dirty_mib_per_sec: Option<f64>,
    pub yields_per_sec: Option<f64>,
    /// Guest TSC at its last heartbeat.
    pub tsc: u64,
}

struct Sample {
    at: Instant,
    beats: Vec<Heartbeat>,
}

/// One VM under the agent.
pub struct VmEntry {
    pub(super) name: String,
    vm: Mutex<Guest>,
    pub(super) op: Arc<tokio::sync::Mutex<()>>,
    pub(super) created: SystemTime,
    samples: Mutex<(Option<Sample>, Option<Sample>)>,
    /// "out m-…" or "in m-…" while the VM migrates.
    migration: Mutex<Option<String>>,
    /// Set when the guest stops running here: pending MAC announcements stop.
    announce_cancel: Mutex<Arc<std::sync::atomic::AtomicBool>>,
}

impl VmEntry {
    /// A VM as it enters the table: no migration, no samples yet.
    pub(super) fn new(vm: Guest) -> VmEntry {
        // An adopted VMM's guest was created when its VMM started, not now.
        let created = vm.remote().map_or_else(SystemTime::now, |r| {
            SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(r.hello().started_unix_ms)
        });
        VmEntry {
            name: vm.spec().name.clone(),
            vm: Mutex::new(vm),
            op: Arc::new(tokio::sync::Mutex::new(())),
            created,
            samples: Mutex::new((None, None)),
            migration: Mutex::new(None),
            announce_cancel: Mutex::new(Arc::new(std::sync::atomic::AtomicBool::new(false))),
        }
    }

    /// A fresh cancel flag for the announcements of a (re)start.
    pub(super) fn announce_flag(&self) -> Arc<std::sync::atomic::AtomicBool> {
        let f = Arc::new(std::sync::atomic::AtomicBool::new(false));
        if let Ok(mut g) = self.announce_cancel.lock() {
            g.store(true, std::sync::atomic::Ordering::SeqCst);
            *g = f.clone();
        }
        f
    }

    /// The guest no longer runs here: stop announcing it.
    pub(super) fn stop_announcing(&self) {
        if let Ok(g) = self.announce_cancel.lock() {
            g.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    pub(super) fn migration(&self) -> Option<String> {
        self.migration.lock().ok().and_then(|m| m.clone())
    }

    pub(super) fn set_migration(&self, m: Option<String>) {
        if let Ok(mut g) = self.migration.lock() {
            *g = m;
        }
    }

    /// Refuse operations while the VM migrates.
    pub(super) fn not_migrating(&self) -> Result<(), AgentError> {
        match self.migration() {
            None => Ok(()),
            Some(m) => Err(AgentError::Conflict(format!(
                "{} is migrating ({m}); wait for it to finish{}",
                self.name,
                m.strip_prefix("out ")
                    .map(|id| format!(" or cancel it with `ferry migrate --cancel {id}`"))
                    .unwrap_or_default()
            ))),
        }
    }

    /// Take the operation lock for a user operation.
    pub(super) async fn begin(&self) -> Result<tokio::sync::OwnedMutexGuard<()>, AgentError> {
        self.not_migrating()?;
        let g = self.op.clone().lock_owned().await;
        self.not_migrating()?;
        Ok(g)
    }

    pub(super) fn vm(&self) -> Guest {
        match self.vm.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub(super) fn replace(&self, vm: Guest) {
        match self.vm.lock() {
            Ok(mut g) => *g = vm,
            Err(p) => *p.into_inner() = vm,
        }
    }

    /// Take a heartbeat sample (called periodically by the daemon). Not while the VM arrives
    /// by migration: its memory is not the guest's yet.
    pub fn sample(&self) {
        if self.migration().is_some_and(|m| m.starts_with("in ")) {
            if let Ok(mut s) = self.samples.lock() {
                *s = (None, None);
            }
            return;
        }
        let vm = self.vm();
        if let Some(r) = vm.remote() {
            // A VMM that died is noticed here, within a sampling interval.
            r.poll();
        }
        let Some(beats) = vm.heartbeats() else { return };
        if let Ok(mut s) = self.samples.lock() {
            let prev = s.1.take();
            *s = (
                prev,
                Some(Sample {
                    at: Instant::now(),
                    beats,
                }),
            );
        }
    }

    /// Counters as of `now` (read just now), with rates over the last sampling interval; where
    /// there is only one sample yet (the guest started or arrived less than a sampling interval
    /// ago), over the time since that sample once it is at least 200 ms old.
    pub(super) fn rates(&self, now: &[Heartbeat], ws_pages: &[u64]) -> Vec<VcpuRates> {
        let window: Option<(f64, Vec<Heartbeat>, Vec<Heartbeat>)> =
            self.samples.lock().ok().and_then(|s| match (&s.0, &s.1) {
                (Some(o), Some(n)) => Some((
                    n.at.duration_since(o.at).as_secs_f64(),
                    o.beats.clone(),
                    n.beats.clone(),
                )),
                (None, Some(n)) => {
                    let dt = n.at.elapsed().as_secs_f64();
                    (dt >= 0.2).then(|| (dt, n.beats.clone(), now.to_vec()))
                }
                _ => None,
            });
        now.iter()
            .enumerate()
            .map(|(i, b)| {
                let per = |f: fn(&Heartbeat) -> u64| {
                    let (dt, old, new) = window.as_ref()?;
                    let (o, n) = (old.get(i)?, new.get(i)?);
                    (*dt > 0.0).then(|| f(n).saturating_sub(f(o)) as f64 / dt)
                };
                let ws = ws_pages.get(i).copied().unwrap_or(0).max(1);
                VcpuRates {
                    id: i as u32,
                    beats: b.beats,
                    beats_per_sec: per(|h| h.beats),
                    phase: if b.phase == 0 { "fill" } else { "work" }.into(),
                    pass: if b.phase == 0 { 0 } else { 1 + b.progress / ws },
                    pages_written: b.filled + b.progress,
                    dirty_mib_per_sec: per(|h| h.progress).map(|p| p * 4096.0 / (1 << 20) as f64),
                    yields_per_sec: per(|h| h.yields),
                    tsc: b.tsc,
                }
            })
            .collect()
    }
}
