//! The switchover: the guest pauses, its last dirty pages go out on the data streams while its
//! state goes out on the control connection, `Complete` says how many pages each stream
//! carried (and the memory digest with `--verify`), and the destination answers `Prepared`.
//! Until `Commit` is sent (`commit.rs`) every failure resumes the guest here.

use std::time::{Duration, Instant};

use super::engine::{Engine, Precopied};
use super::worker::Streams;
use super::{ms, Control};
use crate::migrate::protocol::{self, Command, Complete, Prepared};
use crate::migrate::{DeviceSummary, Downtime, MigrateError, Phase, Summary, CIPHER};
use crate::vm::memory::PAGE_SIZE;
use crate::vm::{snapshot, VmError, VmStatus};

/// How long the guest may stay paused waiting for `Prepared` (the destination finishing the
/// last pages, loading state, verifying) before the source gives up and resumes it.
const PREPARED_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a successful switchover left the migration, for the commit.
pub(super) struct SwitchoverMark {
    pub(super) paused_at: Instant,
    /// The ownership record's generation, owned here, that the destination claims from.
    pub(super) generation: Option<u64>,
    /// Stopped once `Resumed` came (or on any way out).
    pub(super) streams: Streams,
    /// Where frames reaching this host's taps after the capture go once the guest runs on the
    /// destination (None: the destination does not take them).
    pub(super) forward: Option<crate::migrate::forward::Lane>,
}

/// The times of the switchover's steps, for the summary's downtime parts.
struct Steps {
    paused_at: Instant,
    bitmap: Instant,
    state_sent: Instant,
    pages_sent: Instant,
    complete_sent: Instant,
    digest: Duration,
}

/// Pause the guest, send the last pages and the state, wait for `Prepared`.
pub(super) fn switchover(
    eng: &mut Engine<'_>,
    ctl: &mut Control,
    pre: Precopied,
    paused_here: &mut bool,
    t0: Instant,
) -> Result<(Summary, SwitchoverMark), MigrateError> {
    let job = eng.job;
    let vm = job.vm.as_ref();
    let Precopied {
        mut pending,
        mut round,
        copy_started,
    } = pre;

    // The record must name this host (read before the pause, to keep the pause short); the
    // destination claims the next generation at the commit, which fails if it moved meanwhile.
    let generation = match &job.ownership {
        Some(o) => Some(
            o.adopt(&vm.spec().name, &job.identity.agent)
                .map_err(|e| {
                    MigrateError::Other(format!("the source cannot hand over ownership: {e}"))
                })?
                .generation,
        ),
        None => None,
    };

    job.handle.set_phase(Phase::Switchover);
    let paused_at = Instant::now();
    vm.pause()?;
    *paused_here = true;
    let t_paused = Instant::now();
    let last = vm.take_dirty()?;
    pending.merge(&last);
    let t_bitmap = Instant::now();
    round += 1;
    let total = pending.count();
    // The last pages go out while the vCPU and device state is captured and sent: the
    // destination loads the state into its parked vCPUs while the pages still arrive.
    let started = eng.dispatch(round, pending.iter_gpa(), total, true)?;
    let devices = send_state(eng, ctl)?;
    let t_state_sent = Instant::now();
    let mut st = eng.collect(round, total, true, started)?;
    st.dirty_after = 0;
    eng.rounds.push(st);
    let t_pages = Instant::now();
    tracing::debug!(
        pause_us = (t_paused - paused_at).as_micros() as u64,
        bitmap_us = (t_bitmap - t_paused).as_micros() as u64,
        state_us = (t_state_sent - t_bitmap).as_micros() as u64,
        pages_us = (t_pages - t_bitmap).as_micros() as u64,
        pages = total,
        "switchover: final pages sent"
    );
    let t_digest = Instant::now();
    let digest = if job.options.verify {
        if vm.status() == VmStatus::Running {
            return Err(
                VmError::State(VmStatus::Running, "pause it to take a memory digest").into(),
            );
        }
        // SAFETY: the guest is paused (just above, checked) with its devices quiesced, and
        // the engine only reads guest memory.
        Some(unsafe { snapshot::digest_paused(&eng.mem) }?)
    } else {
        None
    };
    let digest_time = t_digest.elapsed();
    ctl.w.send_msg(
        Command::Complete,
        &Complete {
            pages_per_stream: eng.workers.iter().map(|w| w.total_pages).collect(),
            digest: digest.clone(),
        },
    )?;
    let steps = Steps {
        paused_at,
        bitmap: t_bitmap,
        state_sent: t_state_sent,
        pages_sent: t_pages,
        complete_sent: Instant::now(),
        digest: digest_time,
    };
    let prepared = await_prepared(ctl, digest.as_deref(), digest_time)?;
    let summary = summary(eng, &steps, &prepared, digest, devices, copy_started, t0);
    tracing::info!(
        vm = %vm.spec().name,
        device_state_bytes = devices.state_bytes,
        io_drained = devices.io_drained,
        rx_frames_carried = devices.rx_frames_carried,
        "switchover: device state captured"
    );
    Ok((
        summary,
        SwitchoverMark {
            paused_at,
            generation,
            streams: Streams(Vec::new()),
            forward: None,
        },
    ))
}

/// Capture the paused guest's state and send it (sealed when encrypted) on the control
/// connection. Refused while a disk still has requests in flight.
fn send_state(eng: &Engine<'_>, ctl: &mut Control) -> Result<DeviceSummary, MigrateError> {
    let job = eng.job;
    let vm = job.vm.as_ref();
    if crate::faults::hit_in("source:before-state", &job.handle.id).as_deref() == Some("fail") {
        return Err(MigrateError::Other(
            "injected fault at source:before-state".into(),
        ));
    }
    let quiesced = vm.last_quiesced();
    if quiesced.io_stuck > 0 {
        return Err(MigrateError::Other(format!(
            "{} disk(s) still had requests in flight {} s after the pause; the guest stays here (check the datastore)",
            quiesced.io_stuck,
            crate::vm::virtio::blk::DRAIN_TIMEOUT.as_secs()
        )));
    }
    let state = vm.capture_state()?;
    let devices = DeviceSummary {
        state_bytes: state.devices.virtio.size() as u64,
        io_drained: quiesced.io_drained,
        rx_frames_carried: state
            .devices
            .virtio
            .net
            .iter()
            .map(|n| n.rx_frames.len() as u64)
            .sum(),
        ..Default::default()
    };
    let mut blob = state.encode()?;
    if let Some(k) = &eng.data_key {
        // The vCPU state (registers may hold secrets) is sealed like the pages, on the control
        // connection's lane.
        let len = blob.len();
        blob.resize(len + crate::transport::seal::TAG_LEN, 0);
        crate::transport::seal::Sealer::new(k, crate::transport::seal::CONTROL_LANE).seal(
            ctl.w.next_seq(),
            &mut blob,
            len,
        )?;
    }
    ctl.w.send(Command::State, 0, &blob)?;
    Ok(devices)
}

/// Wait (bounded: the guest is paused) for the destination's `Prepared`. A refusal because
/// the digests differ becomes [`MigrateError::DigestMismatch`].
fn await_prepared(
    ctl: &mut Control,
    digest: Option<&str>,
    digest_time: Duration,
) -> Result<Prepared, MigrateError> {
    let limit = PREPARED_TIMEOUT + digest_time;
    ctl.expect_within(limit, "Prepared");
    let frame = ctl.r.read_frame().map_err(|e| match e {
        protocol::ProtocolError::TimedOut { .. } | protocol::ProtocolError::TimedOutUnknown(_) => {
            MigrateError::Timeout {
                what: "the destination to prepare (the guest is paused)",
                secs: limit.as_secs(),
            }
        }
        e => e.into(),
    })?;
    match frame.msg(Command::Prepared) {
        Err(e @ protocol::ProtocolError::Aborted { .. }) => {
            Err(MigrateError::from_abort(e, digest))
        }
        r => Ok(r?),
    }
}

/// The migration's summary as of `Prepared` (the commit adds the resume and the total).
fn summary(
    eng: &Engine<'_>,
    s: &Steps,
    prepared: &Prepared,
    digest: Option<String>,
    devices: DeviceSummary,
    copy_started: Instant,
    t0: Instant,
) -> Summary {
    let job = eng.job;
    let t_prepared = Instant::now();
    Summary {
        total_s: t0.elapsed().as_secs_f64(),
        encrypted: job.options.encrypt,
        cipher: job.options.encrypt.then(|| CIPHER.to_string()),
        downtime: Downtime {
            total_ms: 0.0,
            final_pages_ms: ms(s.pages_sent - s.paused_at),
            state_ms: ms(s.state_sent - s.bitmap),
            prepare_ms: ms(t_prepared - s.complete_sent),
            resume_ms: 0.0,
            verify_ms: if job.options.verify {
                ms(s.digest) + prepared.verify_us as f64 / 1000.0
            } else {
                0.0
            },
        },
        guest_pause_ms: None,
        rounds: eng.rounds.clone(),
        guest_bytes: eng.guest_pages * PAGE_SIZE,
        wire_bytes: eng.wire_bytes,
        skipped_pages: eng.skipped,
        encodings: eng.enc,
        streams: eng.n,
        max_throttle: eng.max_throttle,
        verified: prepared.verified,
        digest,
        send_mode: job.options.send_mode,
        transport: eng.send,
        link: job
            .link
            .as_ref()
            .and_then(|l| l.migration_tx_between(copy_started, s.pages_sent)),
        announcements: Vec::new(),
        devices,
        tuning: eng.tuning.clone(),
    }
}
