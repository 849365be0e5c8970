//! The commit: `Commit` goes out (the commit point: from here the destination may run the
//! guest), `Resumed` comes back, frames that still reach this host for the guest are forwarded,
//! and `Observed` brings the pause the guest saw. Contact lost after `Commit` is resolved by
//! [`crate::migrate::resolve`].

use std::time::{Duration, Instant};

use super::switchover::SwitchoverMark;
use super::{bring_back, ms, Control, Failure, SourceJob};
use crate::migrate::protocol::{self, Command, Observed, Resumed};
use crate::migrate::{MigrateError, Phase, Summary};

/// How long after `Commit` to wait for `Resumed` before asking the ownership record.
const RESUMED_TIMEOUT: Duration = Duration::from_secs(5);

/// Send `Commit` and see the guest run on the destination.
pub(super) fn commit(
    job: &SourceJob,
    ctl: &mut Control,
    mut summary: Summary,
    mark: SwitchoverMark,
    t0: Instant,
) -> Result<Summary, Box<Failure>> {
    let vm = job.vm.as_ref();
    let t_commit = Instant::now();
    let generation = mark.generation;
    if let Err(e) = ctl
        .w
        .send_msg(Command::Commit, &protocol::Commit { generation })
    {
        // The frame did not leave: the destination cannot have resumed.
        bring_back(vm, true);
        return Err(Failure::before_commit(e.into()));
    }
    let t_commit_sent = Instant::now();
    tracing::debug!(
        paused_to_commit_point_us = (t_commit - mark.paused_at).as_micros() as u64,
        adopt_and_send_us = (t_commit_sent - t_commit).as_micros() as u64,
        "switchover: commit sent"
    );
    job.handle.set_phase(Phase::Committed);
    ctl.expect_within(RESUMED_TIMEOUT, "Resumed");
    let resumed: Resumed = match ctl.r.read_frame().and_then(|f| f.msg(Command::Resumed)) {
        Ok(r) => r,
        Err(e) => {
            let error = match e {
                e @ protocol::ProtocolError::Aborted { .. } => MigrateError::from_abort(e, None),
                protocol::ProtocolError::TimedOut { .. }
                | protocol::ProtocolError::TimedOutUnknown(_) => MigrateError::Timeout {
                    what: "`Resumed` from the destination after the commit",
                    secs: RESUMED_TIMEOUT.as_secs(),
                },
                e => e.into(),
            };
            let _ = ctl.conn.shutdown(std::net::Shutdown::Both);
            // Resolving can take minutes: the streams' buffers and caches are not needed for it.
            drop(mark.streams);
            return Err(crate::migrate::resolve::resolve(
                job,
                &ctl.peer_agent,
                generation,
                error,
                summary,
            ));
        }
    };
    let t_resumed = Instant::now();
    // The guest runs there: frames for it that still reach this host's taps go there too.
    let forwarder = mark
        .forward
        .and_then(|lane| crate::migrate::forward::start(vm, lane));
    // Downtime ends when the destination's vCPUs run: `Commit` left here, plus its way there
    // (half of what the round trip took beyond the destination's own work), plus the
    // destination's Commit → running time.
    summary.downtime.resume_ms = resumed.resume_us as f64 / 1000.0;
    let transit =
        (t_resumed - t_commit_sent).saturating_sub(Duration::from_micros(resumed.resume_us));
    summary.downtime.total_ms =
        ms(t_commit_sent - mark.paused_at) + ms(transit) / 2.0 + summary.downtime.resume_ms;
    // The guest runs there: now the streams may take their time to wind down.
    drop(mark.streams);
    ctl.expect_within(Duration::from_secs(3), "Observed");
    if let Ok(o) = ctl
        .r
        .read_frame()
        .and_then(|f| f.msg::<Observed>(Command::Observed))
    {
        summary.guest_pause_ms = o.guest_pause_us.map(|us| us as f64 / 1000.0);
        summary.announcements = o.announcements;
    }
    summary.total_s = t0.elapsed().as_secs_f64();
    // The forwarding window (at most forward::WINDOW) is not part of the migration's time:
    // the guest runs on the destination meanwhile.
    if let Some(f) = forwarder {
        let fs = f.finish();
        summary.devices.rx_frames_forwarded = fs.frames;
        summary.devices.rx_frames_forward_dropped = fs.dropped;
        summary.devices.forward_window_ms = fs.window_ms;
    }
    tracing::info!(
        vm = %vm.spec().name,
        id = %job.handle.id,
        total_s = summary.total_s,
        downtime_ms = summary.downtime.total_ms,
        commit_to_resumed_ms = ms(t_resumed - t_commit),
        rounds = summary.rounds.len(),
        wire_bytes = summary.wire_bytes,
        "migration completed"
    );
    Ok(summary)
}
