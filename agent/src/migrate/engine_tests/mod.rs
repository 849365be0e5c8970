//! The migration engine end to end, without root, KVM or namespaces: a source engine and a
//! destination over loopback TCP, with fake guests (`super::testing`). These are what a
//! developer runs after every change (`cargo test -p ferry-agent --lib migrate::`); the lab suites
//! (`tests/migration.rs`, `tests/faults.rs`) run the real thing.
//!
//! - this file: rounds, convergence and the policy, switchover, commit, cancel, encryption,
//!   streams and codecs, refusals;
//! - `tamper.rs`: corrupt, truncated and stray bytes on the data and control connections;
//! - `faults.rs`: every fault point of `crate::faults` (kills in a child process).

mod faults;
mod tamper;

use std::sync::Arc;
use std::time::Duration;

use super::converge::Policy;
use super::source::Failure;
use super::testing::fake::{Dirtying, FakeGuest};
use super::testing::proxy::Proxy;
use super::testing::{
    assert_discarded, assert_moved, assert_on_source, options, run, spawn, wait_for, Pair, DEST,
};
use super::tune::CodecChoice;
use super::{MigrateError, MigrateOptions, Phase};

/// The child side of the tests that kill the destination agent (see
/// `testing::host::ChildDest`): serves only when started by one of them.
#[test]
#[ignore = "run by the engine tests in a child process"]
fn child_destination_agent() {
    super::testing::host::child_main();
}

/// Pages the test guests hold.
const MIB: u64 = 32;
const FILLED: u64 = 6000;

fn guest(name: &str) -> Arc<FakeGuest> {
    FakeGuest::running(name, MIB, FILLED, format!("state of {name}").as_bytes())
}

/// A guest that touched 1000 pages and rewrites 800 of them as fast as it can.
fn small_busy_guest(name: &str) -> Arc<FakeGuest> {
    let g = FakeGuest::running(name, MIB, 1000, format!("state of {name}").as_bytes());
    g.start_dirtying(Dirtying {
        pages_per_s: 0,
        first: 0,
        pages: 800,
    });
    g
}

/// A link of this many MB/s between the source and the destination.
const fn mb_s(n: u64) -> u64 {
    n << 20
}

/// A policy that never converges while anything is dirty (its target is below the
/// switchover's fixed cost), without auto-converge.
fn never_converges() -> Policy {
    Policy {
        downtime_target_ms: 1.0,
        auto_converge: false,
        ..Policy::default()
    }
}

fn error_of(f: &Failure) -> String {
    crate::util::error_chain(&f.error)
}

#[test]
fn an_idle_guest_moves_with_its_memory_and_state() {
    let g = guest("idle");
    let pair = Pair::new(false);
    let job = pair.job(&g, pair.dest.addr, options());
    let s = run(&job).expect("migration");
    assert_moved(&g, pair.host());
    assert!(s.verified, "{s:?}");
    // Round 0 sends exactly the pages that were ever touched; the zero ones among them are
    // skipped; nothing is dirty after it, so the switchover round is empty.
    assert_eq!(s.rounds[0].pages, FILLED, "{:?}", s.rounds);
    assert_eq!(s.skipped_pages, FILLED / 8, "{s:?}");
    assert_eq!(s.rounds.len(), 2, "{:?}", s.rounds);
    assert_eq!(s.rounds[1].pages, 0);
    assert_eq!(s.encodings.pages() + s.skipped_pages, FILLED);
    assert!(s.wire_bytes > 0 && s.wire_bytes < FILLED * 4096, "{s:?}");
    // The commit point moved the ownership record.
    let r = pair.ownership().current("idle").unwrap().unwrap();
    assert_eq!(r.owner.as_deref(), Some(DEST), "{r:?}");
    assert_eq!(r.reason, "migrated");
    let d = pair
        .host()
        .migration(&job.handle.id, Duration::from_secs(5))
        .unwrap();
    assert_eq!(d.phase, Phase::Completed, "{d:?}");
}

#[test]
fn a_guest_that_dirties_slowly_converges() {
    let g = guest("slow");
    g.start_dirtying(Dirtying {
        pages_per_s: 20_000,
        first: 0,
        pages: 4000,
    });
    let pair = Pair::new(false);
    let job = pair.job(&g, pair.dest.addr, options());
    let s = run(&job).expect("migration");
    assert!(g.written() > 0);
    assert_moved(&g, pair.host());
    assert!(s.rounds.len() >= 2, "{:?}", s.rounds);
    let last = s.rounds.last().unwrap();
    assert_eq!(last.dirty_after, 0);
    assert!(s.verified);
}

#[test]
fn a_guest_dirtying_faster_than_the_link_gives_up_after_max_rounds() {
    let g = small_busy_guest("fast");
    let pair = Pair::new(false);
    let link = Proxy::slow(pair.dest.addr, mb_s(16));
    let job = pair.job(
        &g,
        link.addr,
        MigrateOptions {
            policy: Policy {
                max_rounds: 4,
                ..never_converges()
            },
            ..options()
        },
    );
    let f = run(&job).expect_err("it cannot converge");
    assert!(matches!(f.error, MigrateError::Policy(_)), "{f:?}");
    assert!(
        error_of(&f).contains("did not converge in 4 rounds"),
        "{f:?}"
    );
    assert!(!f.after_commit);
    assert_eq!(g.pauses(), 0, "never paused");
    assert_on_source(&g);
    assert_discarded(pair.host(), "fast");
    g.stop_dirtying();
}

#[test]
fn a_link_too_slow_for_the_deadline_fails_at_the_time_limit() {
    let g = guest("deadline");
    let pair = Pair::new(false);
    // Round 0 alone needs seconds on this link.
    let link = Proxy::slow(pair.dest.addr, mb_s(4));
    let job = pair.job(
        &g,
        link.addr,
        MigrateOptions {
            policy: Policy {
                max_time_s: 0.5,
                ..Policy::default()
            },
            ..options()
        },
    );
    let t = std::time::Instant::now();
    let f = run(&job).expect_err("it cannot converge");
    assert!(
        error_of(&f).contains("did not converge within the 0.5 s limit"),
        "{f:?}"
    );
    assert!(error_of(&f).contains("round 0 still under way"), "{f:?}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_on_source(&g);
    assert_discarded(pair.host(), "deadline");
}

#[test]
fn auto_converge_throttles_a_busy_guest_until_it_converges() {
    // 40,000 pages/s (160 MB/s) over 800 pages: far more than the link carries, until the
    // throttle holds it back enough.
    let g = FakeGuest::running("throttled", MIB, 1000, b"state");
    g.start_dirtying(Dirtying {
        pages_per_s: 40_000,
        first: 0,
        pages: 800,
    });
    let pair = Pair::new(false);
    let link = Proxy::slow(pair.dest.addr, mb_s(16));
    let job = pair.job(
        &g,
        link.addr,
        MigrateOptions {
            policy: Policy {
                stall_rounds: 1,
                throttle_initial: 50,
                throttle_step: 20,
                ..Policy::default()
            },
            ..options()
        },
    );
    let s = run(&job).expect("migration");
    assert!(s.max_throttle >= 50, "{s:?}");
    assert_eq!(g.max_throttle(), s.max_throttle);
    assert!(s.rounds.iter().any(|r| r.throttle > 0), "{:?}", s.rounds);
    assert_moved(&g, pair.host());
    g.stop_dirtying();
}

#[test]
fn cancel_during_precopy_resumes_the_guest_here() {
    let g = guest("cancelled");
    let pair = Pair::new(false);
    let link = Proxy::slow(pair.dest.addr, mb_s(8));
    let job = pair.job(&g, link.addr, options());
    let handle = job.handle.clone();
    let t = spawn(job);
    wait_for("pre-copy", 20, || handle.record().phase == Phase::Precopy);
    std::thread::sleep(Duration::from_millis(300));
    handle.cancel();
    let (job, r) = t.join().unwrap();
    let f = r.expect_err("cancelled");
    assert!(matches!(f.error, MigrateError::Cancelled), "{f:?}");
    assert_eq!(
        f.error.to_abort().code,
        crate::migrate::protocol::AbortCode::Cancelled
    );
    assert_on_source(&g);
    let d = pair
        .host()
        .migration(&job.handle.id, Duration::from_secs(5))
        .unwrap();
    assert_eq!(d.phase, Phase::Failed, "{d:?}");
    assert!(d.error.unwrap_or_default().contains("cancelled"));
    assert_discarded(pair.host(), "cancelled");
}

/// With raw pages (no codec), the guest's text crosses the data connections in the clear
/// unless the migration is encrypted.
#[test]
fn encryption_hides_the_pages_and_the_state() {
    let marker = b"of the fake guest; ".to_vec();
    for encrypt in [false, true] {
        let g = guest("sealed");
        let pair = Pair::new(true);
        let proxy = Proxy::start(pair.dest.addr, None, Some(marker.clone()));
        let job = pair.job(
            &g,
            proxy.addr,
            MigrateOptions {
                encrypt,
                compress: false,
                ..options()
            },
        );
        let s = run(&job).expect("migration");
        assert_eq!(s.encrypted, encrypt);
        assert_moved(&g, pair.host());
        if encrypt {
            assert_eq!(proxy.marker_hits(), 0, "plaintext crossed");
        } else {
            assert!(proxy.marker_hits() > 1000, "{}", proxy.marker_hits());
        }
    }
}

#[test]
fn an_encrypted_migration_needs_the_cluster_key() {
    let g = guest("keyless");
    let pair = Pair::new(false);
    let job = pair.job(
        &g,
        pair.dest.addr,
        MigrateOptions {
            encrypt: true,
            ..options()
        },
    );
    let f = run(&job).expect_err("no key");
    assert!(error_of(&f).contains("needs the cluster key"), "{f:?}");
    assert_on_source(&g);
    assert_discarded(pair.host(), "keyless");
}

#[test]
fn a_destination_that_requires_encryption_refuses_a_plain_migration() {
    let g = guest("plain");
    let pair = Pair::with_host(true, |h| h.requires_encryption = true);
    let job = pair.job(&g, pair.dest.addr, options());
    let f = run(&job).expect_err("refused");
    assert!(
        matches!(
            f.error,
            MigrateError::Refused {
                code: crate::migrate::protocol::AbortCode::Refused,
                ..
            }
        ),
        "{f:?}"
    );
    assert!(error_of(&f).contains("accepts only encrypted"), "{f:?}");
    assert_on_source(&g);
    assert!(pair.host().last_created().is_none(), "nothing was created");
}

#[test]
fn streams_and_codecs() {
    for (streams, codec, compress) in [
        (1, CodecChoice::Lz4, true),
        (4, CodecChoice::Zstd, true),
        (3, CodecChoice::None, true),
        (2, CodecChoice::Auto, false),
        (5, CodecChoice::Auto, true),
    ] {
        let g = guest("codecs");
        g.start_dirtying(Dirtying {
            pages_per_s: 20_000,
            first: 1000,
            pages: 3000,
        });
        let pair = Pair::new(false);
        let job = pair.job(
            &g,
            pair.dest.addr,
            MigrateOptions {
                streams,
                codec,
                compress,
                cache_percent: 50.0,
                ..options()
            },
        );
        let s = run(&job).unwrap_or_else(|f| panic!("{streams} streams, {codec:?}: {f:?}"));
        assert_eq!(s.streams, streams);
        assert_eq!(s.tuning.len(), streams as usize);
        assert_moved(&g, pair.host());
        let e = s.encodings;
        match (codec, compress) {
            (CodecChoice::Lz4, _) => assert!(e.lz4.pages > 0, "{e:?}"),
            (CodecChoice::Zstd, _) => assert!(e.zstd.pages > 0, "{e:?}"),
            (CodecChoice::None, _) | (_, false) => {
                assert_eq!(e.lz4.pages + e.zstd.pages + e.delta.pages, 0, "{e:?}")
            }
            _ => {}
        }
        g.stop_dirtying();
    }
}

#[test]
fn a_name_taken_on_the_destination_is_refused_before_any_page_moves() {
    let pair = Pair::new(false);
    // The first migration puts "twice" on the destination.
    let first = guest("twice");
    run(&pair.job(&first, pair.dest.addr, options())).expect("first");
    let second = guest("twice");
    let f = run(&pair.job(&second, pair.dest.addr, options())).expect_err("taken");
    assert!(
        error_of(&f).contains("already has a VM named twice"),
        "{f:?}"
    );
    assert_on_source(&second);
    // The first copy there is untouched.
    assert_moved(&first, pair.host());
    let r = pair.ownership().current("twice").unwrap().unwrap();
    assert_eq!(r.owner.as_deref(), Some(DEST), "{r:?}");
}
