//! Fault injection for the fault-tolerance tests: a test arms a fault at a named point through
//! the API (`POST /v1/debug/faults`, only when `[debug] faults = true`), and the code at that
//! point acts on it once. Points:
//!
//! | point | where |
//! |---|---|
//! | `dest:round:N` | destination, when round N's end marker arrives on a stream |
//! | `dest:before-prepared` | destination, state and every page received, before `Prepared` |
//! | `dest:commit` | destination, `Commit` received, before it claims the ownership record |
//! | `dest:after-record` | destination, ownership record moved to it, before it resumes the guest |
//! | `dest:create` | destination, creating the incoming VM (e.g. cannot allocate memory) |
//! | `dest:memory` | destination, every page and the state applied, before the `--verify` digest: `corrupt` flips one bit of guest memory |
//! | `source:corrupt` | source, the next `Pages` frame gets one payload byte flipped after its checksum |
//! | `source:before-state` | source, guest paused, before its state is sent |
//! | `source:before-streams` | source, `Ready` received, before it opens the data streams (e.g. `sleep:MS` holds the destination's data port open) |
//!
//! Actions: `kill` (the agent SIGKILLs itself), `fail` (the operation fails), `sleep:MS`,
//! `corrupt` (for `source:corrupt` and `dest:memory`).
//!
//! A fault armed through the API applies to whichever migration reaches its point first. The
//! engine tests run many migrations in one process at once, so they arm faults for one
//! migration id ([`arm_for`]); the migration code names its id at every point ([`hit_in`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// An armed fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    pub point: String,
    pub action: String,
}

/// An armed fault and the migration it is for (None: any).
struct Armed {
    fault: Fault,
    scope: Option<String>,
}

static ARMED: Mutex<Vec<Armed>> = Mutex::new(Vec::new());
/// Anything armed at all (a cheap check for hot paths).
static ANY: AtomicBool = AtomicBool::new(false);

/// Errors arming a fault.
#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    #[error("unknown fault point {0:?}: one of dest:round:N, dest:before-prepared, dest:commit, dest:after-record, dest:create, dest:memory, source:corrupt, source:before-state, source:before-streams")]
    Point(String),
    #[error("unknown fault action {0:?}: one of kill, fail, sleep:MS, corrupt")]
    Action(String),
}

impl Fault {
    pub fn validate(&self) -> Result<(), FaultError> {
        let p = self.point.as_str();
        let known = matches!(
            p,
            "dest:before-prepared"
                | "dest:commit"
                | "dest:after-record"
                | "dest:create"
                | "dest:memory"
                | "source:corrupt"
                | "source:before-state"
                | "source:before-streams"
        ) || p
            .strip_prefix("dest:round:")
            .is_some_and(|n| n.parse::<u32>().is_ok());
        if !known {
            return Err(FaultError::Point(self.point.clone()));
        }
        let a = self.action.as_str();
        let ok = matches!(a, "kill" | "fail" | "corrupt")
            || a.strip_prefix("sleep:")
                .is_some_and(|m| m.parse::<u64>().is_ok_and(|m| m <= 600_000));
        if !ok {
            return Err(FaultError::Action(self.action.clone()));
        }
        Ok(())
    }
}

/// Arm a fault (it fires once).
pub fn arm(f: Fault) -> Result<(), FaultError> {
    arm_scoped(f, None)
}

/// Arm a fault for the migration `migration` only (it fires once, at that migration's point;
/// other migrations pass it by). For tests that run several migrations in one process.
pub fn arm_for(f: Fault, migration: &str) -> Result<(), FaultError> {
    arm_scoped(f, Some(migration.to_string()))
}

fn arm_scoped(fault: Fault, scope: Option<String>) -> Result<(), FaultError> {
    fault.validate()?;
    if let Ok(mut a) = ARMED.lock() {
        a.push(Armed { fault, scope });
        ANY.store(true, Ordering::SeqCst);
    }
    Ok(())
}

/// The faults armed now.
pub fn list() -> Vec<Fault> {
    ARMED
        .lock()
        .map(|a| a.iter().map(|x| x.fault.clone()).collect())
        .unwrap_or_default()
}

/// Disarm everything.
pub fn clear() {
    if let Ok(mut a) = ARMED.lock() {
        a.clear();
        ANY.store(false, Ordering::SeqCst);
    }
}

/// Whether any fault is armed.
pub fn armed() -> bool {
    ANY.load(Ordering::Relaxed)
}

/// Take the fault armed at `point` for any migration, if any, and carry out `kill` and
/// `sleep:MS` here. Returns the action for the caller to interpret (`fail`, `corrupt`).
pub fn hit(point: &str) -> Option<String> {
    take(point, None)
}

/// [`hit`] at a point that migration `migration` reached: takes a fault armed for any
/// migration or for this one.
pub fn hit_in(point: &str, migration: &str) -> Option<String> {
    take(point, Some(migration))
}

fn take(point: &str, migration: Option<&str>) -> Option<String> {
    let f = {
        let mut a = ARMED.lock().ok()?;
        let i = a.iter().position(|x| {
            x.fault.point == point
                && x.scope
                    .as_deref()
                    .is_none_or(|s| migration.is_some_and(|m| m == s))
        })?;
        let f = a.remove(i).fault;
        ANY.store(!a.is_empty(), Ordering::SeqCst);
        f
    };
    tracing::warn!(point, action = %f.action, migration, "injected fault");
    if f.action == "kill" {
        // SAFETY: kill(2) of our own process; simulates a crash (no cleanup runs).
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
    if let Some(ms) = f
        .action
        .strip_prefix("sleep:")
        .and_then(|m| m.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    Some(f.action)
}
