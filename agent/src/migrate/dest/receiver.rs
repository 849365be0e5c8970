//! One incoming migration, from `Setup` to the guest running here, as a state machine. Each
//! state holds what it needs, and a transition consumes it:
//!
//! ```text
//! Setup ─▶ SetUp ──data connections──▶ Receiving ──State, Complete──▶ Final
//!   (guest created,  (receivers apply     (streams end, state loads,
//!    Ready sent)      pages per stream)    memory verified) ──Prepared──▶ Prepared
//!   ──Commit: claim, resume──▶ Running
//! ```
//!
//! An error in any state before `Running` aborts: the data connections are cut, the receivers
//! end, the incoming guest is destroyed (its [`IncomingGuard`]) and the caller sends `Abort`
//! with the reason. What lives through every state (the guest, its guard, the receivers) is in
//! [`Incoming`].

use std::io::BufReader;
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use super::streams::{Receivers, StreamSetup};
use super::{refuse, Host, HANDSHAKE_TIMEOUT, STREAMS_TIMEOUT};
use crate::migrate::codec::PAGE;
use crate::migrate::guest::IncomingGuest;
use crate::migrate::ownership::Staged;
use crate::migrate::protocol::{
    self, Command, Complete, FrameReader, FrameWriter, Observed, Prepared, Ready, Resumed, Setup,
};
use crate::migrate::{EncodingStats, MigrateError, MigrationHandle, Phase, Summary};
use crate::transport::tcp as transport;
use crate::vm::state::VmState;
use crate::vm::workload::Heartbeat;

/// Receive the migration `setup` announced, to its end (the guest runs here) or to an error
/// (the incoming guest is gone; the caller tells the source).
pub(super) fn receive(
    conn: &TcpStream,
    cw: &mut FrameWriter<TcpStream>,
    cr: &mut FrameReader<BufReader<TcpStream>>,
    host: &dyn Host,
    setup: &Setup,
    handle: &Arc<MigrationHandle>,
    source_agent: &str,
) -> Result<Summary, MigrateError> {
    let mut cx = Cx {
        conn,
        cw,
        cr,
        host,
        setup,
        handle,
        source_agent,
        t0: Instant::now(),
    };
    let (mut inc, first) = set_up(&mut cx)?;
    let mut state = State::SetUp(first);
    let result = loop {
        let next = match state {
            State::SetUp(s) => s.accept(&mut cx, &mut inc).map(State::Receiving),
            State::Receiving(s) => s.switchover(&mut cx, &inc).map(State::Final),
            State::Final(s) => s.prepare(&mut cx, &inc).map(State::Prepared),
            State::Prepared(s) => s.commit(&mut cx, &mut inc).map(State::Running),
            State::Running(summary) => break Ok(summary),
        };
        state = match next {
            Ok(s) => s,
            Err(e) => break Err(e),
        };
    };
    // Aborted: reset the data connections first, so that every receiver ends.
    if result.is_err() {
        if let Some(r) = &inc.receivers {
            r.cut();
        }
    }
    let forwarded = inc
        .receivers
        .take()
        .map(Receivers::finish)
        .unwrap_or_default();
    // `inc` (its guard) goes here: a guest not running here by now is destroyed.
    drop(inc);
    result.map(|mut s| {
        s.devices.rx_frames_forwarded = forwarded.frames;
        s.devices.rx_frames_forward_dropped = forwarded.dropped;
        s
    })
}

/// The control session the migration arrived on, and what it said.
struct Cx<'a> {
    conn: &'a TcpStream,
    cw: &'a mut FrameWriter<TcpStream>,
    cr: &'a mut FrameReader<BufReader<TcpStream>>,
    host: &'a dyn Host,
    setup: &'a Setup,
    handle: &'a Arc<MigrationHandle>,
    source_agent: &'a str,
    t0: Instant,
}

impl Cx<'_> {
    /// Bound the wait for the source's next frame (None: unbounded); `what` names it.
    fn expect_within(&mut self, d: Option<Duration>, what: &'static str) {
        let _ = self.conn.set_read_timeout(d);
        self.cr.set_timeout(d, what);
    }

    /// The fault armed for this migration at `point`, if any (see `crate::faults`).
    fn fault(&self, point: &str) -> Option<String> {
        crate::faults::hit_in(point, &self.handle.id)
    }
}

/// What lives through every state: the incoming guest, and what goes with it.
struct Incoming<'a> {
    guest: Arc<dyn IncomingGuest>,
    guard: IncomingGuard<'a>,
    /// The migration's data key when it is encrypted.
    data_key: Option<[u8; 32]>,
    /// Set once the guest runs here: forwarded frames are taken from then on.
    resumed: Arc<OnceLock<Instant>>,
    /// Once the data connections are accepted.
    receivers: Option<Receivers>,
}

/// Destroys the incoming guest unless the migration got past the commit.
struct IncomingGuard<'a> {
    host: &'a dyn Host,
    guest: Arc<dyn IncomingGuest>,
    armed: bool,
}

impl Drop for IncomingGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.host.incoming_done(&self.guest.spec().name, false);
            self.guest.destroy();
        }
    }
}

enum State {
    SetUp(SetUp),
    Receiving(Receiving),
    Final(Final),
    Prepared(PreparedState),
    Running(Summary),
}

/// The incoming guest exists and `Ready` went out: the data connections are awaited.
struct SetUp {
    listener: TcpListener,
    token: String,
    net_forward: bool,
    /// The ownership record written ahead of the commit (see [`Host::prepare_claim`]).
    claim: Option<Staged>,
}

/// Pre-copy: the receivers apply pages; the control connection is quiet until `State`.
struct Receiving {
    claim: Option<Staged>,
}

/// `State` and `Complete` arrived: the streams finish, the state loads, memory is verified.
struct Final {
    state: VmState,
    complete: Complete,
    claim: Option<Staged>,
}

/// `Prepared` went out: the guest is ready to run; `Commit` is awaited.
struct PreparedState {
    claim: Option<Staged>,
    digest: Option<String>,
    verified: bool,
    enc: EncodingStats,
    wire: u64,
    /// The guest's heartbeats before it runs here (workload guests).
    before: Option<Vec<Heartbeat>>,
}

/// Check `Setup` against this host, create the incoming guest, send `Ready`.
fn set_up<'a>(cx: &mut Cx<'a>) -> Result<(Incoming<'a>, SetUp), MigrateError> {
    let (setup, host) = (cx.setup, cx.host);
    let n = setup.streams;
    if n == 0 || n > 64 {
        return Err(refuse(format!(
            "{n} data streams requested (1 to 64 allowed)"
        )));
    }
    let cluster_key = match (setup.encrypt, host.identity().key) {
        (true, None) => return Err(refuse(
            "the source encrypts its data streams, but this host has no cluster key to derive the data key from: set [cluster] key_file".into(),
        )),
        (false, _) if host.requires_encryption() => return Err(refuse(
            "this host accepts only encrypted migrations ([migration] encrypt = \"required\"): migrate without --no-encrypt (and with --encrypt where the source says encrypt = \"off\")".into(),
        )),
        (true, Some(k)) => Some(k),
        (false, _) => None,
    };
    let local = host.migration_addr().map_err(|e| e.refusal(""))?;
    let guest = host
        .create_incoming(&setup.spec, &setup.regions, cx.handle)
        .map_err(|e| e.refusal(""))?;
    let guard = IncomingGuard {
        host,
        guest: guest.clone(),
        armed: true,
    };
    // Written now, while pre-copy runs, so that the claim at the commit is one link(2).
    let claim = host.prepare_claim(&setup.spec.name, cx.source_agent, &setup.migration_id);
    let listener = transport::listen(local).map_err(|e| {
        refuse(format!(
            "cannot listen on the migration address {local}: {e}"
        ))
    })?;
    let data_addr = listener
        .local_addr()
        .map_err(protocol::ProtocolError::from)?;
    let token = format!(
        "{:016x}{:016x}",
        crate::util::random_u64()?,
        crate::util::random_u64()?
    );
    let data_key =
        cluster_key.map(|k| crate::transport::seal::data_key(&k, &setup.migration_id, &token));
    // A guest with NICs takes the frames its source still receives after the switchover.
    let net_forward = !guest.nic_macs().is_empty();
    cx.cw.send_msg(
        Command::Ready,
        &Ready {
            data_addr: data_addr.to_string(),
            token: token.clone(),
            net_forward,
        },
    )?;
    let inc = Incoming {
        guest,
        guard,
        data_key,
        resumed: Arc::new(OnceLock::new()),
        receivers: None,
    };
    Ok((
        inc,
        SetUp {
            listener,
            token,
            net_forward,
            claim,
        },
    ))
}

impl SetUp {
    /// Accept the data connections (each must name this migration, the token and a fresh
    /// index; anything else is closed and ignored) and start a receiver on each.
    fn accept(self, cx: &mut Cx<'_>, inc: &mut Incoming<'_>) -> Result<Receiving, MigrateError> {
        let setup = cx.setup;
        let accepted = super::accept_streams(
            &self.listener,
            setup.source_addr,
            &setup.migration_id,
            &self.token,
            setup.streams,
            Instant::now() + STREAMS_TIMEOUT,
        )?;
        drop(self.listener);
        let s = StreamSetup {
            guest: inc.guest.clone(),
            ctl: cx.conn.try_clone().ok(),
            version: cx.cw.version(),
            data_key: inc.data_key,
            net_forward: self.net_forward,
            resumed: inc.resumed.clone(),
            handle: cx.handle.clone(),
        };
        let receivers = inc.receivers.insert(Receivers::new(setup.streams));
        for (i, sock) in accepted.into_iter().enumerate() {
            receivers.start(i as u32, sock, &s)?;
        }
        receivers.started();
        cx.handle.set_phase(Phase::Precopy);
        Ok(Receiving { claim: self.claim })
    }
}

impl Receiving {
    /// Wait (unbounded: a source that dies closes the connection) for the switchover's
    /// `State`, then `Complete`.
    fn switchover(self, cx: &mut Cx<'_>, inc: &Incoming<'_>) -> Result<Final, MigrateError> {
        cx.expect_within(None, "the switchover");
        let frame = match cx.cr.read_frame() {
            Ok(f) => f,
            Err(e) => {
                // A receiver that failed woke this thread: its reason is the one to report.
                if let Some(failed) = inc.receivers.as_ref().and_then(Receivers::failure) {
                    return Err(failed);
                }
                return Err(e.into());
            }
        };
        frame.expect(Command::State)?;
        cx.expect_within(
            Some(HANDSHAKE_TIMEOUT),
            "the rest of the switchover from the source",
        );
        cx.handle.set_phase(Phase::Switchover);
        let mut payload = frame.payload;
        if let Some(k) = &inc.data_key {
            crate::transport::seal::Sealer::new(k, crate::transport::seal::CONTROL_LANE)
                .open(cx.cr.last_seq(), &mut payload)?;
        }
        let state = VmState::decode(&payload)?;
        if state.spec != cx.setup.spec || state.regions != cx.setup.regions {
            return Err(refuse(
                "the state does not match the VM set up for it".into(),
            ));
        }
        let complete: Complete = cx.cr.read_frame()?.msg(Command::Complete)?;
        Ok(Final {
            state,
            complete,
            claim: self.claim,
        })
    }
}

impl Final {
    /// Every stream must reach its end with the page count the source says it sent; then the
    /// state loads, the memory digest is compared (`--verify`) and `Prepared` goes out.
    fn prepare(self, cx: &mut Cx<'_>, inc: &Incoming<'_>) -> Result<PreparedState, MigrateError> {
        let t_prep = Instant::now();
        let setup = cx.setup;
        let n = setup.streams as usize;
        let delivered = inc
            .receivers
            .as_ref()
            .ok_or_else(|| MigrateError::Other("no data streams".into()))?
            .wait_done(HANDSHAKE_TIMEOUT)?;
        for (i, (got, want)) in delivered
            .pages
            .iter()
            .zip(&self.complete.pages_per_stream)
            .enumerate()
        {
            if got != want {
                return Err(refuse(format!(
                    "stream {i} delivered {:?} pages but the source sent {want}",
                    Some(got)
                )));
            }
        }
        if self.complete.pages_per_stream.len() != n {
            return Err(refuse("page counts for the wrong number of streams".into()));
        }
        let streams_us = t_prep.elapsed().as_micros() as u64;
        let vm = inc.guest.as_ref();
        vm.restore_state(&self.state)?;
        let restore_us = t_prep.elapsed().as_micros() as u64 - streams_us;
        tracing::debug!(vm = %setup.spec.name, streams_us, restore_us, "switchover: streams ended, state loaded");
        let mem = vm.memory();
        if cx.fault("dest:memory").as_deref() == Some("corrupt") {
            // One bit of the guest's memory, in the middle of the first region, as a bad
            // apply would leave it.
            let gpa = mem.layout()[0].size / 2;
            let mut b = [0u8];
            mem.read(gpa, &mut b)?;
            mem.write(gpa, &[b[0] ^ 1])?;
        }
        let mut verified = false;
        let t_verify = Instant::now();
        if let Some(src) = &self.complete.digest {
            // SAFETY: the incoming guest has never run, every receiver has reached its
            // stream's end (nothing writes its memory any more) and the agent does not write
            // it before the commit.
            let here = unsafe { crate::vm::snapshot::digest_paused(&mem) }?;
            if &here != src {
                return Err(MigrateError::DigestMismatch {
                    source_digest: src.clone(),
                    dest_digest: here,
                });
            }
            verified = true;
        }
        let verify_us = t_verify.elapsed().as_micros() as u64;
        let before = vm.heartbeats();
        if cx.fault("dest:before-prepared").as_deref() == Some("fail") {
            return Err(refuse("injected fault at dest:before-prepared".into()));
        }
        cx.cw.send_msg(
            Command::Prepared,
            &Prepared {
                apply_us: t_prep.elapsed().as_micros() as u64,
                verify_us,
                verified,
            },
        )?;
        Ok(PreparedState {
            claim: self.claim,
            digest: self.complete.digest,
            verified,
            enc: delivered.enc,
            wire: delivered.wire,
            before,
        })
    }
}

impl PreparedState {
    /// On `Commit`: take ownership (the commit point), run the guest, say `Resumed`, then
    /// `Observed` (the pause the guest saw, the MAC announcements).
    fn commit(self, cx: &mut Cx<'_>, inc: &mut Incoming<'_>) -> Result<Summary, MigrateError> {
        let (setup, host) = (cx.setup, cx.host);
        let commit: protocol::Commit = cx.cr.read_frame()?.msg(Command::Commit)?;
        let t_commit = Instant::now();
        if cx.fault("dest:commit").as_deref() == Some("fail") {
            return Err(refuse("injected fault at dest:commit".into()));
        }
        let spent_claim = host
            .claim(
                &setup.spec.name,
                cx.source_agent,
                commit.generation,
                &setup.migration_id,
                self.claim,
            )
            .map_err(|e| e.refusal("the destination cannot take ownership: "))?;
        let claim_us = t_commit.elapsed().as_micros() as u64;
        cx.fault("dest:after-record");
        let vm = inc.guest.as_ref();
        if let Err(e) = vm.resume() {
            host.give_back(&setup.spec.name, cx.source_agent, &setup.migration_id);
            return Err(refuse(format!(
                "the destination could not start the guest: {e}"
            )));
        }
        let resume_us = t_commit.elapsed().as_micros() as u64;
        let _ = inc.resumed.set(Instant::now());
        inc.guard.armed = false;
        host.incoming_done(&setup.spec.name, true);
        cx.handle.set_phase(Phase::Committed);
        cx.cw.send_msg(Command::Resumed, &Resumed { resume_us })?;
        tracing::info!(vm = %setup.spec.name, id = %setup.migration_id, resume_us, claim_us, "incoming migration committed; guest running here");
        let announcements = host.announce(&setup.spec);
        let guest_pause_us = self.before.and_then(|b| observed_pause(vm, &b));
        let _ = cx.cw.send_msg(
            Command::Observed,
            &Observed {
                guest_pause_us,
                announcements: announcements.clone(),
            },
        );
        // Tidying the records (the staged file's name, old generations) waits until now.
        drop(spent_claim);
        host.claimed(&setup.spec.name);
        Ok(Summary {
            encrypted: setup.encrypt,
            cipher: setup.encrypt.then(|| crate::migrate::CIPHER.to_string()),
            total_s: cx.t0.elapsed().as_secs_f64(),
            guest_pause_ms: guest_pause_us.map(|u| u as f64 / 1000.0),
            wire_bytes: self.wire,
            encodings: self.enc,
            streams: setup.streams,
            verified: self.verified,
            digest: self.digest,
            guest_bytes: self.enc.pages() * PAGE as u64,
            announcements,
            ..Summary::default()
        })
    }
}

/// The largest heartbeat gap across the switchover: from the last beat before the pause (read
/// from the restored memory) to the first after the resume, in guest TSC time.
fn observed_pause(vm: &dyn IncomingGuest, before: &[Heartbeat]) -> Option<u64> {
    let last_before = before.iter().map(|h| h.tsc).max()?;
    let beats_before: Vec<u64> = before.iter().map(|h| h.beats).collect();
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        let now = vm.heartbeats()?;
        // The first vCPU to beat again ends the pause as the guest sees it.
        if let Some(h) = now
            .iter()
            .zip(&beats_before)
            .filter(|(h, b)| h.beats > **b)
            .map(|(h, _)| h.tsc)
            .min()
        {
            let cycles = h.saturating_sub(last_before);
            return Some(cycles * 1000 / u64::from(vm.tsc_khz().max(1)));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    None
}
