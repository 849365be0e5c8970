//! Bytes that are not what the source sent: a flipped payload or header byte, a frame cut
//! short, garbage before a frame, on a data connection and on the control connection. Each
//! must end in a clear error, the guest running on the source and the incoming copy gone.

use super::*;
use crate::migrate::protocol::Command;
use crate::migrate::testing::proxy::{Action, Lane, Tamper};

/// Migrate `name` through a proxy that applies `t`; the migration must fail. Returns the error.
fn tampered(name: &str, t: Tamper, opts: MigrateOptions) -> String {
    let g = guest(name);
    let pair = Pair::new(opts.encrypt);
    let proxy = Proxy::start(pair.dest.addr, Some(t.clone()), None);
    let job = pair.job(&g, proxy.addr, opts);
    let f = run(&job).expect_err("a tampered migration fails");
    assert!(proxy.applied(), "the proxy never saw {t:?}");
    assert!(!f.after_commit, "{f:?}");
    assert_on_source(&g);
    let d = pair
        .host()
        .migration(&job.handle.id, Duration::from_secs(10));
    if let Some(d) = d {
        assert_eq!(d.phase, Phase::Failed, "{d:?}");
    }
    assert_discarded(pair.host(), name);
    error_of(&f)
}

fn on(lane: Lane, command: Command, nth: usize, action: Action) -> Tamper {
    Tamper {
        lane,
        command,
        nth,
        action,
    }
}

#[test]
fn a_flipped_byte_in_a_page_frame_fails_its_checksum() {
    let e = tampered(
        "flip-data",
        on(Lane::Data(1), Command::Pages, 1, Action::FlipPayload),
        options(),
    );
    assert!(e.contains("checksum"), "{e}");
    assert!(e.contains("the destination refused"), "{e}");
}

#[test]
fn a_flipped_byte_in_a_page_frame_header_fails_its_checksum() {
    let e = tampered(
        "flip-header",
        on(Lane::Data(0), Command::Pages, 0, Action::FlipHeader),
        options(),
    );
    assert!(e.contains("frame header checksum mismatch"), "{e}");
}

#[test]
fn a_page_frame_cut_short_fails_the_migration() {
    let e = tampered(
        "truncated-data",
        on(Lane::Data(0), Command::Pages, 2, Action::Truncate),
        options(),
    );
    // The destination saw its stream end in the middle of a frame and said so; or the source
    // saw its own connection reset first, and reports the destination lost. Not the source's
    // own reason echoed back as the destination's.
    assert!(
        e.contains("data stream 0: connection: the peer closed the connection")
            || e.starts_with("lost the destination b"),
        "{e}"
    );
    assert!(!e.contains("the peer aborted"), "{e}");
}

#[test]
fn garbage_on_a_data_stream_is_refused() {
    let e = tampered(
        "garbage-data",
        on(
            Lane::Data(1),
            Command::Pages,
            0,
            Action::Inject(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n----".to_vec()),
        ),
        options(),
    );
    assert!(e.contains("bad frame magic"), "{e}");
}

#[test]
fn a_sealed_page_frame_changed_in_flight_does_not_authenticate() {
    // The changed payload carries a matching checksum: only the seal can tell.
    let e = tampered(
        "forged-sealed",
        on(Lane::Data(0), Command::Pages, 1, Action::Forge),
        MigrateOptions {
            encrypt: true,
            ..options()
        },
    );
    assert!(e.contains("did not authenticate"), "{e}");
}

#[test]
fn a_corrupt_state_frame_is_refused_and_the_paused_guest_resumes() {
    let e = tampered(
        "flip-state",
        on(Lane::Control, Command::State, 0, Action::FlipPayload),
        options(),
    );
    assert!(e.contains("checksum mismatch on a State frame"), "{e}");
}

#[test]
fn a_control_frame_cut_short_loses_the_destination() {
    let e = tampered(
        "truncated-control",
        on(Lane::Control, Command::Complete, 0, Action::Truncate),
        options(),
    );
    assert!(e.contains("lost the destination b"), "{e}");
}

#[test]
fn garbage_before_setup_ends_the_session() {
    let e = tampered(
        "garbage-control",
        on(
            Lane::Control,
            Command::Setup,
            0,
            Action::Inject(vec![0xff; 48]),
        ),
        options(),
    );
    assert!(e.contains("lost the destination b"), "{e}");
}
