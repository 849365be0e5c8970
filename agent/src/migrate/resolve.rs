//! After-commit resolution on the source: contact with the destination was lost (or it
//! refused) after `Commit` was sent, so the destination may run the guest. The source finds out
//! where the guest runs — from the ownership records ([`super::ownership`]) and by asking the
//! destination — before it resumes its own copy or gives it up. Never two running copies: see
//! `docs/fault-tolerance.md`.

use std::time::{Duration, Instant};

use super::source::{Failure, SourceJob};
use super::{GuestOn, MigrateError, Summary};

/// How long the source keeps trying to learn where the guest runs after losing contact past the
/// commit point; after that the copy stays paused, unresolved, until `ferry resume`.
pub const RESOLVE_WINDOW: Duration = Duration::from_secs(90);

/// Contact with the destination was lost (or it refused) after `Commit` was sent: find out
/// where the guest runs, within [`RESOLVE_WINDOW`]. With ownership records the source first
/// tries to claim the generation the destination would claim: if that works the destination
/// can no longer run the guest, and it resumes here. If the destination holds the record, the
/// source asks it whether it runs the guest; one that answers without it (it restarted, or
/// gave up) loses the record back to the source. Without records the source can only ask.
pub(super) fn resolve(
    job: &SourceJob,
    dest_agent: &str,
    generation: Option<u64>,
    error: MigrateError,
    summary: Summary,
) -> Box<Failure> {
    let vm = job.vm.as_ref();
    let name = vm.spec().name.as_str();
    let me = job.identity.agent.as_str();
    let why = crate::util::error_chain(&error);
    tracing::warn!(vm = name, error = %why, "lost the destination after the commit; resolving where the guest runs");
    let deadline = Instant::now() + RESOLVE_WINDOW;
    let mut last = String::new();
    let mut overdue = false;
    let outcome = loop {
        match step(job, dest_agent, generation) {
            Ok(Some(v)) => break v,
            Ok(None) => {}
            Err(e) => last = e,
        }
        if job.handle.cancelled() {
            break (
                GuestOn::Unresolved,
                format!(
                    "stopped asking {dest_agent} whether it runs the guest (cancelled; last answer: {last}); this copy stays paused: `ferry vm resume {name}` resumes it once the ownership record allows"
                ),
            );
        }
        if !overdue && Instant::now() >= deadline {
            // Say so, and keep asking (less often): the guest must not stay down for longer
            // than the destination does, nor run twice.
            overdue = true;
            let note = format!(
                "no answer within {} s whether {dest_agent} runs the guest ({last}); this copy stays paused and this agent keeps asking every 5 s (`ferry migrate --cancel {}` stops it)",
                RESOLVE_WINDOW.as_secs(),
                job.handle.id
            );
            tracing::error!(vm = name, note = %note, "after-commit failure unresolved");
            job.handle.resolved(GuestOn::Unresolved, note);
        }
        std::thread::sleep(if overdue {
            Duration::from_secs(5)
        } else {
            Duration::from_millis(500)
        });
    };
    let (guest_on, note) = outcome;
    if guest_on == GuestOn::Source {
        vm.set_throttle(0);
        let _ = vm.set_dirty_logging(false);
        if let Err(e) = vm.resume() {
            tracing::error!(vm = name, error = %e, "could not resume the guest");
        }
    }
    tracing::warn!(vm = name, me, guest_on = ?guest_on, note = %note, "after-commit failure resolved");
    Box::new(Failure {
        error,
        after_commit: true,
        guest_on,
        summary: Some(summary),
        note: Some(note),
    })
}

/// One attempt at [`resolve`]: Some(answer), None to try again, or Err(why not yet).
fn step(
    job: &SourceJob,
    dest_agent: &str,
    generation: Option<u64>,
) -> Result<Option<(GuestOn, String)>, String> {
    let name = job.vm.spec().name.as_str();
    let me = job.identity.agent.as_str();
    let ask = || {
        super::query::facts(job.peer, &job.identity, &super::query::Query::default()).map_err(|e| {
            format!(
                "{dest_agent} does not answer: {}",
                crate::util::error_chain(&e)
            )
        })
    };
    let (Some(o), Some(g)) = (&job.ownership, generation) else {
        // No records: only the destination can say.
        let f = ask()?;
        if f.running.iter().any(|v| v == name) {
            return Ok(Some((
                GuestOn::Destination,
                format!("{dest_agent} reports the guest running there"),
            )));
        }
        if f.vms.iter().any(|v| v == name) {
            return Err(format!(
                "{dest_agent} still holds the incoming guest without running it"
            ));
        }
        return Ok(Some((
            GuestOn::Source,
            format!("{dest_agent} answered without the guest; resumed here"),
        )));
    };
    use super::ownership::OwnershipError;
    match o.claim(name, Some(me), g, Some(me), Some(&job.handle.id), "fenced") {
        Ok(r) => Ok(Some((
            GuestOn::Source,
            format!("the destination never claimed ownership; this host fenced it out (generation {}) and resumed the guest", r.generation),
        ))),
        Err(OwnershipError::Changed { found, .. }) => {
            if found.owned_by(me) {
                return Ok(Some((
                    GuestOn::Source,
                    format!("{dest_agent} handed ownership back (generation {}); resumed here", found.generation),
                )));
            }
            if !found.owned_by(dest_agent) {
                return Err(format!("the record names {} (generation {})", found.owner_name(), found.generation));
            }
            // The destination owns the guest: does it run it?
            let f = ask()?;
            if f.running.iter().any(|v| v == name) {
                return Ok(Some((
                    GuestOn::Destination,
                    format!("{dest_agent} owns the guest (generation {}) and runs it", found.generation),
                )));
            }
            if f.vms.iter().any(|v| v == name) {
                return Err(format!("{dest_agent} owns the guest but has not started it yet"));
            }
            // It owns it but lost it (it restarted): take it back.
            match o.claim(name, Some(dest_agent), found.generation, Some(me), Some(&job.handle.id), "reclaimed") {
                Ok(r) => Ok(Some((
                    GuestOn::Source,
                    format!("{dest_agent} owned the guest but no longer has it; this host reclaimed it (generation {}) and resumed it", r.generation),
                ))),
                Err(e) => Err(e.to_string()),
            }
        }
        Err(e) => Err(format!("cannot read the ownership record: {e}")),
    }
}
