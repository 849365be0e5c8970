//! Every fault point of `crate::faults`, as the lab's fault suite (`tests/faults.rs`) injects
//! them: `fail`, `corrupt` and `sleep` armed for one migration in this process; `kill` in a
//! destination agent that runs as a child process of the test binary, so that it really dies.

use super::*;
use crate::migrate::guest::SourceGuest;
use crate::migrate::ownership::Ownership;
use crate::migrate::protocol::{AbortCode, Command};
use crate::migrate::testing::host::{ChildConfig, ChildDest, DestServer, FakeHost, TempDir};
use crate::migrate::testing::proxy::{Action, Lane, Tamper};
use crate::migrate::testing::{arm, job, SOURCE};
use crate::migrate::GuestOn;

/// Migrate with `point` armed for this migration; it must fail before the commit. Returns the
/// error and its Abort code (for a destination's fault, the code the destination's `Abort`
/// carried; for the source's, the code the source's `Abort` carries).
fn fails_at(
    name: &str,
    point: &str,
    action: &str,
    g: &Arc<FakeGuest>,
    opts: MigrateOptions,
) -> (String, AbortCode) {
    fails_at_on(name, point, action, g, opts, None)
}

/// [`fails_at`] on a link of `rate` bytes/s (a guest that dirties then has its rounds).
fn fails_at_on(
    name: &str,
    point: &str,
    action: &str,
    g: &Arc<FakeGuest>,
    opts: MigrateOptions,
    rate: Option<u64>,
) -> (String, AbortCode) {
    let pair = Pair::new(false);
    let link = rate.map(|r| Proxy::slow(pair.dest.addr, r));
    let job = pair.job(g, link.as_ref().map_or(pair.dest.addr, |l| l.addr), opts);
    arm(&job, point, action);
    let f = run(&job).expect_err("the fault fails the migration");
    assert!(!f.after_commit, "{f:?}");
    assert_eq!(f.guest_on, GuestOn::Source);
    assert_on_source(g);
    assert_discarded(pair.host(), name);
    // The record still names the source (or was never made).
    let r = pair.ownership().current(name).unwrap();
    assert!(r.as_ref().is_none_or(|r| r.owned_by(SOURCE)), "{r:?}");
    (error_of(&f), f.error.abort_code())
}

fn many_rounds() -> MigrateOptions {
    MigrateOptions {
        policy: Policy {
            max_rounds: 30,
            ..never_converges()
        },
        ..options()
    }
}

#[test]
fn source_corrupt_byte_is_caught_by_the_destination() {
    let g = guest("src-corrupt");
    let (e, code) = fails_at("src-corrupt", "source:corrupt", "corrupt", &g, options());
    assert!(e.contains("checksum"), "{e}");
    // The destination's stream found the damage and said so with its code.
    assert_eq!(code, AbortCode::Protocol, "{e}");
}

#[test]
fn source_failing_before_the_state_resumes_the_paused_guest() {
    let g = guest("src-state");
    let (e, code) = fails_at("src-state", "source:before-state", "fail", &g, options());
    assert!(e.contains("injected fault at source:before-state"), "{e}");
    assert_eq!(code, AbortCode::Internal, "{e}");
    assert_eq!((g.pauses(), g.resumes()), (1, 1));
}

#[test]
fn source_sleeping_before_the_streams_still_completes() {
    let g = guest("src-streams");
    let pair = Pair::new(false);
    let job = pair.job(&g, pair.dest.addr, options());
    arm(&job, "source:before-streams", "sleep:300");
    let s = run(&job).expect("migration");
    assert!(s.total_s >= 0.3, "{s:?}");
    assert_moved(&g, pair.host());
}

#[test]
fn destination_failing_in_round_0() {
    let g = guest("dst-r0");
    let (e, code) = fails_at("dst-r0", "dest:round:0", "fail", &g, options());
    assert!(e.contains("injected fault at dest:round:0"), "{e}");
    // A failure of the destination's own, not a refusal.
    assert_eq!(code, AbortCode::Internal, "{e}");
}

#[test]
fn destination_failing_in_a_later_round() {
    let g = small_busy_guest("dst-r2");
    let (e, code) = fails_at_on(
        "dst-r2",
        "dest:round:2",
        "fail",
        &g,
        many_rounds(),
        Some(mb_s(8)),
    );
    assert!(e.contains("injected fault at dest:round:2"), "{e}");
    assert_eq!(code, AbortCode::Internal, "{e}");
    g.stop_dirtying();
}

#[test]
fn destination_failing_before_prepared() {
    let g = guest("dst-prep");
    let (e, code) = fails_at("dst-prep", "dest:before-prepared", "fail", &g, options());
    assert!(e.contains("injected fault at dest:before-prepared"), "{e}");
    assert_eq!(code, AbortCode::Refused, "{e}");
    assert_eq!(g.resumes(), 1);
}

#[test]
fn destination_that_cannot_allocate_refuses_before_any_page() {
    let g = guest("dst-create");
    let (e, code) = fails_at("dst-create", "dest:create", "fail", &g, options());
    assert!(e.contains("cannot allocate"), "{e}");
    assert_eq!(code, AbortCode::Refused, "{e}");
    assert_eq!(g.pauses(), 0);
}

#[test]
fn verify_catches_a_bad_apply_and_the_next_attempt_goes_through() {
    let g = guest("dst-memory");
    let pair = Pair::new(false);
    let job = pair.job(&g, pair.dest.addr, options());
    arm(&job, "dest:memory", "corrupt");
    let f = run(&job).expect_err("digests differ");
    assert!(
        matches!(f.error, MigrateError::DigestMismatch { .. }),
        "{f:?}"
    );
    assert_eq!(f.error.abort_code(), AbortCode::DigestMismatch);
    assert!(error_of(&f).contains("memory differs"), "{f:?}");
    assert_on_source(&g);
    assert_discarded(pair.host(), "dst-memory");
    let s = run(&pair.job(&g, pair.dest.addr, options())).expect("second attempt");
    assert!(s.verified);
    assert_moved(&g, pair.host());
}

#[test]
fn a_disk_that_does_not_drain_keeps_the_guest_here() {
    let g = guest("stuck-io");
    g.set_quiesced(crate::vm::virtio::Quiesced {
        io_stuck: 1,
        ..Default::default()
    });
    let pair = Pair::new(false);
    let f = run(&pair.job(&g, pair.dest.addr, options())).expect_err("stuck");
    assert!(
        error_of(&f).contains("still had requests in flight"),
        "{f:?}"
    );
    assert_on_source(&g);
}

/// `Commit` arrives but the destination refuses before it takes the record: the source fences
/// it out (the next generation, its own) and resumes.
#[test]
fn destination_failing_at_the_commit_is_fenced_out() {
    let g = guest("dst-commit");
    let pair = Pair::new(false);
    let job = pair.job(&g, pair.dest.addr, options());
    arm(&job, "dest:commit", "fail");
    let f = run(&job).expect_err("refused after the commit");
    assert!(f.after_commit, "{f:?}");
    assert_eq!(f.guest_on, GuestOn::Source, "{f:?}");
    assert!(f.note.as_deref().unwrap_or("").contains("fenced"), "{f:?}");
    assert_on_source(&g);
    let r = pair.ownership().current("dst-commit").unwrap().unwrap();
    assert_eq!(
        (r.owner.as_deref(), r.reason.as_str()),
        (Some(SOURCE), "fenced")
    );
    assert_discarded(pair.host(), "dst-commit");
}

/// The control connection goes silent after the destination took the record (it sleeps before
/// resuming, and `Resumed` is lost): the source must not resume; once it can ask, it learns the
/// guest runs there. Never two running copies.
#[test]
fn management_link_down_at_the_switchover_leaves_the_guest_on_the_destination() {
    let g = guest("mgmt-down");
    let pair = Pair::new(false);
    let proxy = Proxy::start(
        pair.dest.addr,
        Some(Tamper {
            lane: Lane::ControlBack,
            command: Command::Resumed,
            nth: 0,
            action: Action::Stall(Duration::from_millis(5500)),
        }),
        None,
    );
    let job = pair.job(&g, proxy.addr, options());
    arm(&job, "dest:after-record", "sleep:300");
    let f = run(&job).expect_err("contact lost after the commit");
    assert!(f.after_commit);
    assert_eq!(f.guest_on, GuestOn::Destination, "{f:?}");
    assert!(
        f.note.as_deref().unwrap_or("").contains("b owns the guest"),
        "{f:?}"
    );
    assert!(f.summary.as_ref().is_some_and(|s| s.verified), "{f:?}");
    assert_moved(&g, pair.host());
}

/// A destination agent in a child process, with `faults` armed, sharing `dir`'s records.
fn child(dir: &TempDir, faults: &[(&str, &str)]) -> ChildDest {
    ChildDest::spawn(&ChildConfig {
        name: DEST.into(),
        ownership: Some(dir.path().to_path_buf()),
        faults: faults
            .iter()
            .map(|(p, a)| (p.to_string(), a.to_string()))
            .collect(),
    })
}

/// The destination agent dies (SIGKILL) at `point`, before the commit: the source resumes.
fn killed_before_the_commit(
    name: &str,
    point: &str,
    g: &Arc<FakeGuest>,
    opts: MigrateOptions,
    rate: Option<u64>,
) {
    let dir = TempDir::new("kill");
    let mut b = child(&dir, &[(point, "kill")]);
    let link = rate.map(|r| Proxy::slow(b.addr, r));
    let peer = link.as_ref().map_or(b.addr, |l| l.addr);
    let job = job(
        g,
        peer,
        opts,
        None,
        Some(Ownership::new(dir.path().to_path_buf())),
    );
    let f = run(&job).expect_err("the destination died");
    assert!(b.died_within(Duration::from_secs(5)), "it died at {point}");
    assert!(error_of(&f).contains("lost the destination b"), "{f:?}");
    assert!(!f.after_commit);
    assert_eq!(f.guest_on, GuestOn::Source);
    assert_on_source(g);
    let r = Ownership::new(dir.path().to_path_buf())
        .current(name)
        .unwrap();
    assert!(r.as_ref().is_none_or(|r| r.owned_by(SOURCE)), "{r:?}");
}

#[test]
fn destination_killed_in_round_0() {
    let g = guest("kill-r0");
    killed_before_the_commit("kill-r0", "dest:round:0", &g, options(), None);
}

#[test]
fn destination_killed_in_a_later_round() {
    let g = small_busy_guest("kill-r2");
    killed_before_the_commit("kill-r2", "dest:round:2", &g, many_rounds(), Some(mb_s(8)));
    g.stop_dirtying();
}

#[test]
fn destination_killed_during_the_switchover_before_the_commit() {
    let g = guest("kill-prep");
    killed_before_the_commit("kill-prep", "dest:before-prepared", &g, options(), None);
    assert_eq!((g.pauses(), g.resumes()), (1, 1));
}

/// Killed after `Commit` arrived, before it took the record: the source fences it out.
#[test]
fn destination_killed_at_the_commit_is_fenced_out() {
    let g = guest("kill-commit");
    let dir = TempDir::new("kill-commit");
    let mut b = child(&dir, &[("dest:commit", "kill")]);
    let own = Ownership::new(dir.path().to_path_buf());
    let job = job(&g, b.addr, options(), None, Some(own.clone()));
    let f = run(&job).expect_err("the destination died");
    assert!(b.died_within(Duration::from_secs(5)));
    assert!(f.after_commit);
    assert_eq!(f.guest_on, GuestOn::Source, "{f:?}");
    assert!(f.note.as_deref().unwrap_or("").contains("fenced"), "{f:?}");
    assert_on_source(&g);
    let r = own.current("kill-commit").unwrap().unwrap();
    assert_eq!(
        (r.owner.as_deref(), r.reason.as_str()),
        (Some(SOURCE), "fenced")
    );
}

/// Killed right after it took the record: only it may run the guest now, so the source waits
/// (paused) until the destination's agent is back; that one has no such guest, so the record
/// returns to the source, which resumes.
#[test]
fn destination_killed_right_after_the_commit_is_waited_for() {
    let g = guest("kill-rec");
    let dir = TempDir::new("kill-rec");
    let mut b = child(&dir, &[("dest:after-record", "kill")]);
    let own = Ownership::new(dir.path().to_path_buf());
    let job = job(&g, b.addr, options(), None, Some(own.clone()));
    let t = spawn(job);
    assert!(b.died_within(Duration::from_secs(10)));
    // While b is down, the source must not resume: b owns the guest.
    std::thread::sleep(Duration::from_millis(1200));
    assert!(!t.is_finished(), "the source gave up waiting for b");
    assert_eq!(g.status(), crate::vm::VmStatus::Paused);
    let r = own.current("kill-rec").unwrap().unwrap();
    assert_eq!(r.owner.as_deref(), Some(DEST), "{r:?}");
    // b's agent comes back (same address, same records), without the guest.
    let restarted = DestServer::start_on(
        Arc::new(FakeHost::new(DEST, None, Some(dir.path()))),
        b.addr,
    );
    let (_, r) = t.join().unwrap();
    let f = r.expect_err("resolved to the source");
    assert_eq!(f.guest_on, GuestOn::Source, "{f:?}");
    assert!(
        f.note.as_deref().unwrap_or("").contains("no longer has it"),
        "{f:?}"
    );
    assert_on_source(&g);
    let r = own.current("kill-rec").unwrap().unwrap();
    assert_eq!(
        (r.owner.as_deref(), r.reason.as_str()),
        (Some(SOURCE), "reclaimed")
    );
    drop(restarted);
}
