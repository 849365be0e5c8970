//! The destination side: accepts a migration on the control connection, builds an empty VM of
//! the same shape, applies pages per data stream, then state; resumes only on `Commit`.
//!
//! Receiver states (see the protocol diagram): `Handshake → SetUp → Receiving → Final →
//! Prepared → Committed → Running`, or `Aborted` from anywhere before `Committed`, which
//! destroys the incoming VM. A data stream that fails shuts the control connection down, so the
//! control thread wakes up and aborts too.

use std::io::BufReader;
use std::net::{IpAddr, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use super::codec::{self, PAGE};
use super::ownership::Staged;
use super::protocol::{
    self, Abort, Command, Complete, FrameReader, FrameWriter, Observed, Prepared, Ready, Resumed,
    RoundEnd, Setup, StreamHello,
};
use super::{EncodingStats, MigrateError, MigrationHandle, Phase, Summary};
use crate::transport::tcp as transport;
use crate::transport::uring::UringReader;
use crate::vm::memory::{GuestMemory, RegionLayout};
use crate::vm::state::VmState;
use crate::vm::{snapshot, Vm, VmSpec};

/// How long the source may stay silent during the handshake and the switchover.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for the data connections after `Ready`.
const STREAMS_TIMEOUT: Duration = Duration::from_secs(10);

/// What the destination needs from its agent.
pub trait Host: Send + Sync {
    /// This agent's name.
    fn name(&self) -> String;
    /// This agent's name and cluster key, for sessions.
    fn identity(&self) -> super::session::Identity;
    /// Whether this host accepts only encrypted incoming migrations.
    fn requires_encryption(&self) -> bool {
        false
    }
    /// This host's migration address, if migration is enabled here.
    fn migration_addr(&self) -> Result<IpAddr, String>;
    /// Create and register an empty VM for an incoming migration (refusing a taken name or a
    /// lack of room with a message for the source).
    fn create_incoming(
        &self,
        spec: &VmSpec,
        regions: &[RegionLayout],
        handle: &Arc<MigrationHandle>,
    ) -> Result<Arc<Vm>, String>;
    /// The incoming VM is running here now (`ok`), or the migration failed and it must go.
    fn incoming_done(&self, name: &str, ok: bool);
    /// Remember a migration for `ferry migrations`.
    fn register(&self, handle: Arc<MigrationHandle>);
    /// This host's facts for a peer's checks (with the sizes of the given disks).
    fn facts(&self, disks: &[String]) -> crate::checks::HostFacts;
    /// Announce a guest's MACs on their port groups (it now runs here).
    fn announce(&self, spec: &VmSpec) -> Vec<crate::announce::Announcement>;
    /// Ahead of the commit (when the migration starts): write the ownership record
    /// [`Host::claim`] will make current, so that the claim itself is one `link(2)` inside the
    /// guest's pause. None when there is nothing to prepare or it failed (the claim then does
    /// it all).
    fn prepare_claim(&self, vm: &str, from: &str, migration: &str) -> Option<Staged>;
    /// The commit point: make this host the owner of `vm`, taking it from `from` at
    /// `generation` (None: the source keeps no records), with the record `prepared` ahead if it
    /// fits. An error means this host must not run the guest. Returns the spent staging (its
    /// temporary file goes when it drops): drop it once the guest runs.
    fn claim(
        &self,
        vm: &str,
        from: &str,
        generation: Option<u64>,
        migration: &str,
        prepared: Option<Staged>,
    ) -> Result<Option<Staged>, String>;
    /// After the guest runs here and the source knows: tidy the ownership records (old
    /// generations).
    fn claimed(&self, vm: &str);
    /// The guest could not start after [`Host::claim`]: hand ownership back to `to`.
    fn give_back(&self, vm: &str, to: &str, migration: &str);
}

/// Destroys the incoming VM unless the migration got past the commit.
struct IncomingGuard<'a> {
    host: &'a dyn Host,
    name: String,
    armed: bool,
}

impl Drop for IncomingGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.host.incoming_done(&self.name, false);
        }
    }
}

enum StreamEvent {
    Done {
        stream: u32,
        pages: u64,
        enc: EncodingStats,
        wire: u64,
    },
    Failed {
        stream: u32,
        error: String,
    },
}

/// Serve one incoming control connection to its end, handshake included, over blocking I/O.
/// (The agent authenticates peers on its async runtime instead, then calls [`serve_session`].)
pub fn serve(conn: TcpStream, host: Arc<dyn Host>) {
    let peer = conn
        .peer_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    let _ = conn.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let opened = (|| -> Result<_, MigrateError> {
        let mut cw = FrameWriter::new(conn.try_clone().map_err(protocol::ProtocolError::from)?);
        let mut cr = FrameReader::new(BufReader::new(
            conn.try_clone().map_err(protocol::ProtocolError::from)?,
        ));
        let (hello, _version) = super::session::accept(&mut cw, &mut cr, &host.identity())?;
        Ok((cw, cr, hello))
    })();
    match opened {
        Ok((cw, cr, hello)) => serve_session(conn, cw, cr, &hello.agent, host),
        Err(e) => {
            // Unauthenticated: nothing it said above debug level.
            tracing::debug!(peer = %peer, error = %crate::migrate::untrusted::peer_text(&crate::util::error_chain(&e), 512), "peer handshake failed");
        }
    }
}

/// Serve an authenticated control session to its end: `cw`/`cr` continue the handshake's
/// frame numbering; `agent` is the name the peer proved.
pub fn serve_session(
    conn: TcpStream,
    mut cw: FrameWriter<TcpStream>,
    mut cr: FrameReader<BufReader<TcpStream>>,
    agent: &str,
    host: Arc<dyn Host>,
) {
    let peer = conn
        .peer_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    if let Err(e) = handle(conn, &mut cw, &mut cr, host.as_ref(), &peer, agent) {
        let agent = super::untrusted::peer_str(agent);
        tracing::warn!(peer = %peer, agent = %agent, error = %crate::util::error_chain(&e), "incoming migration failed");
    }
}

fn handle(
    conn: TcpStream,
    cw: &mut FrameWriter<TcpStream>,
    cr: &mut FrameReader<BufReader<TcpStream>>,
    host: &dyn Host,
    peer: &str,
    agent: &str,
) -> Result<(), MigrateError> {
    let _ = conn.set_nodelay(true);
    let _ = transport::keepalive(&conn);
    let _ = conn.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    cr.set_timeout(Some(HANDSHAKE_TIMEOUT), "the peer's request");
    let first = cr.read_frame()?;
    if first.command == Command::Query {
        let q: super::query::Query = first.msg(Command::Query)?;
        cw.send_msg(Command::Facts, &host.facts(&q.disks))?;
        return Ok(());
    }
    if first.command == Command::Blast {
        let req: super::blast::BlastRequest = first.msg(Command::Blast)?;
        return super::blast::serve(cw, req, host.migration_addr());
    }
    let setup: Setup = first.msg(Command::Setup)?;
    let handle = Arc::new(MigrationHandle::new(
        super::untrusted::peer_str(&setup.migration_id),
        &super::untrusted::peer_str(&setup.spec.name),
        "in",
        &format!("{} ({peer})", super::untrusted::peer_str(agent)),
    ));
    host.register(handle.clone());
    let result = receive(&conn, cw, cr, host, &setup, &handle, agent);
    match &result {
        Ok(summary) => handle.complete(summary.clone()),
        Err(e) => {
            // A refusal goes back in its own words; anything else with its cause chain.
            let reason = match e {
                MigrateError::Refused(r) => r.clone(),
                other => crate::util::error_chain(other),
            };
            let _ = cw.send_msg(Command::Abort, &Abort { reason });
            handle.fail(e);
        }
    }
    result.map(|_| ())
}

fn refuse(reason: String) -> MigrateError {
    MigrateError::Refused(reason)
}

fn receive(
    conn: &TcpStream,
    cw: &mut FrameWriter<TcpStream>,
    cr: &mut FrameReader<BufReader<TcpStream>>,
    host: &dyn Host,
    setup: &Setup,
    handle: &Arc<MigrationHandle>,
    source_agent: &str,
) -> Result<Summary, MigrateError> {
    let t0 = Instant::now();
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
    let local = host.migration_addr().map_err(refuse)?;
    let vm = host
        .create_incoming(&setup.spec, &setup.regions, handle)
        .map_err(refuse)?;
    let mut guard = IncomingGuard {
        host,
        name: setup.spec.name.clone(),
        armed: true,
    };
    // Written now, while pre-copy runs, so that the claim at the commit is one link(2).
    let prepared_claim = host.prepare_claim(&setup.spec.name, source_agent, &setup.migration_id);
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
    let net_forward = !vm.devices().virtio.net.is_empty();
    cw.send_msg(
        Command::Ready,
        &Ready {
            data_addr: data_addr.to_string(),
            token: token.clone(),
            net_forward,
        },
    )?;
    // Set once the guest runs here: forwarded frames are taken from then on.
    let resumed: Arc<OnceLock<Instant>> = Arc::new(OnceLock::new());

    // Data connections: each must name this migration, the token, and a fresh index; anything
    // else is closed and ignored while the real ones are awaited.
    let accepted = accept_streams(
        &listener,
        setup.source_addr,
        &setup.migration_id,
        &token,
        n,
        Instant::now() + STREAMS_TIMEOUT,
    )?;
    drop(listener);
    let streams: Vec<Option<FrameReader<BufReader<UringReader>>>> = accepted
        .into_iter()
        .map(|s| {
            Some(FrameReader::with_seq(
                BufReader::with_capacity(1 << 20, UringReader::new(s)),
                1,
            ))
        })
        .collect();
    handle.set_phase(Phase::Precopy);

    let (ev_tx, ev_rx) = mpsc::channel();
    let mut joins = Vec::new();
    let mut cuts = Vec::new();
    // A receiver whose stream ended keeps its io_uring ring and buffers until these senders
    // drop (after the guest runs here): their teardown stays out of the switchover pause.
    let mut holds = Vec::new();
    for (i, r) in streams.into_iter().enumerate() {
        let Some(mut r) = r else { continue };
        let (hold_tx, hold_rx) = mpsc::channel::<()>();
        holds.push(hold_tx);
        let sock = r
            .get_ref()
            .get_ref()
            .socket()
            .try_clone()
            .map_err(protocol::ProtocolError::from)?;
        cuts.push(sock.try_clone().ok());
        // Acknowledgements carry the version the session negotiated, as the source's frames do.
        let mut acks = FrameWriter::new(sock);
        acks.set_version(cw.version());
        let mem = vm.memory().clone();
        let tx = ev_tx.clone();
        let ctl = conn.try_clone().ok();
        let h = handle.clone();
        let seal = data_key.map(|k| crate::transport::seal::Sealer::new(&k, i as u32));
        // Stream 0 goes on with forwarded frames after its end (forward.rs).
        let fwd = (i == 0 && net_forward).then(|| (vm.clone(), seal.clone(), resumed.clone()));
        let j = std::thread::Builder::new()
            .name(format!("mig-rx{i}"))
            .spawn(move || -> super::forward::ForwardStats {
                if let Err(error) = receive_stream(
                    Lane {
                        i: i as u32,
                        n,
                        seal,
                    },
                    &mut r,
                    acks,
                    &mem,
                    &tx,
                    &h,
                ) {
                    let _ = tx.send(StreamEvent::Failed {
                        stream: i as u32,
                        error: error.to_string(),
                    });
                    // Wake the control thread (its read ends); it can still write, to tell
                    // the source why.
                    if let Some(c) = ctl {
                        let _ = c.shutdown(std::net::Shutdown::Read);
                    }
                } else if let Some((vm, seal, resumed)) = fwd {
                    match super::forward::receive(&vm, &r, seal, &resumed) {
                        Ok(fs) => return fs,
                        Err(e) => {
                            tracing::warn!(vm = %vm.spec.name, error = %crate::util::error_chain(&e), "forwarded frames refused; the rest from the source is dropped");
                        }
                    }
                } else {
                    let _ = hold_rx.recv_timeout(Duration::from_secs(60));
                }
                drop(r);
                super::forward::ForwardStats::default()
            })
            .map_err(|e| MigrateError::Other(format!("cannot start a receiver: {e}")))?;
        joins.push(j);
    }
    drop(ev_tx);
    let cut_streams = || {
        for s in cuts.iter().flatten() {
            crate::transport::tcp::abort(s);
        }
    };

    let result = (|| -> Result<Summary, MigrateError> {
        // Pre-copy runs on the data streams; the control connection is quiet until the
        // switchover. A source that dies closes it.
        let _ = conn.set_read_timeout(None);
        cr.set_timeout(None, "the switchover");
        let frame = match cr.read_frame() {
            Ok(f) => f,
            Err(e) => {
                // A receiver that failed woke this thread: its reason is the one to report.
                while let Ok(ev) = ev_rx.try_recv() {
                    if let StreamEvent::Failed { stream, error } = ev {
                        return Err(MigrateError::Stream { stream, error });
                    }
                }
                return Err(e.into());
            }
        };
        frame.expect(Command::State)?;
        let _ = conn.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
        cr.set_timeout(
            Some(HANDSHAKE_TIMEOUT),
            "the rest of the switchover from the source",
        );
        handle.set_phase(Phase::Switchover);
        let mut payload = frame.payload;
        if let Some(k) = &data_key {
            crate::transport::seal::Sealer::new(k, crate::transport::seal::CONTROL_LANE)
                .open(cr.last_seq(), &mut payload)?;
        }
        let state = VmState::decode(&payload)?;
        if state.spec != setup.spec || state.regions != setup.regions {
            return Err(refuse(
                "the state does not match the VM set up for it".into(),
            ));
        }
        let complete: Complete = cr.read_frame()?.msg(Command::Complete)?;
        let t_prep = Instant::now();
        // Every stream must reach its end, with the page count the source says it sent.
        let mut done = vec![None; n as usize];
        let mut enc = EncodingStats::default();
        let mut wire = 0;
        let wait_until = Instant::now() + HANDSHAKE_TIMEOUT;
        while done.iter().any(Option::is_none) {
            let left = wait_until.saturating_duration_since(Instant::now());
            match ev_rx.recv_timeout(left) {
                Ok(StreamEvent::Done {
                    stream,
                    pages,
                    enc: e,
                    wire: w,
                }) => {
                    done[stream as usize] = Some(pages);
                    enc.merge(&e);
                    wire += w;
                }
                Ok(StreamEvent::Failed { stream, error }) => {
                    return Err(MigrateError::Stream { stream, error })
                }
                Err(_) => {
                    return Err(MigrateError::Timeout {
                        what: "the data streams to finish",
                        secs: HANDSHAKE_TIMEOUT.as_secs(),
                    })
                }
            }
        }
        for (i, (got, want)) in done.iter().zip(&complete.pages_per_stream).enumerate() {
            if *got != Some(*want) {
                return Err(refuse(format!(
                    "stream {i} delivered {got:?} pages but the source sent {want}"
                )));
            }
        }
        if complete.pages_per_stream.len() != n as usize {
            return Err(refuse("page counts for the wrong number of streams".into()));
        }
        let streams_us = t_prep.elapsed().as_micros() as u64;
        vm.restore_state(&state)?;
        let restore_us = t_prep.elapsed().as_micros() as u64 - streams_us;
        tracing::debug!(vm = %setup.spec.name, streams_us, restore_us, "switchover: streams ended, state loaded");
        if crate::faults::hit("dest:memory").as_deref() == Some("corrupt") {
            // One bit of the guest's memory, in the middle of the first region, as a bad
            // apply would leave it.
            let gpa = vm.memory().layout()[0].size / 2;
            let mut b = [0u8];
            vm.memory().read(gpa, &mut b)?;
            vm.memory().write(gpa, &[b[0] ^ 1])?;
        }
        let mut verified = false;
        let t_verify = Instant::now();
        if let Some(src) = &complete.digest {
            let here = snapshot::memory_digest(&vm)?;
            if &here != src {
                return Err(refuse(format!("digest mismatch: {here}")));
            }
            verified = true;
        }
        let verify_us = t_verify.elapsed().as_micros() as u64;
        let before = vm.heartbeats();
        if crate::faults::hit("dest:before-prepared").as_deref() == Some("fail") {
            return Err(refuse("injected fault at dest:before-prepared".into()));
        }
        cw.send_msg(
            Command::Prepared,
            &Prepared {
                apply_us: t_prep.elapsed().as_micros() as u64,
                verify_us,
                verified,
            },
        )?;
        // Wait for the commit.
        let commit: protocol::Commit = cr.read_frame()?.msg(Command::Commit)?;
        let t_commit = Instant::now();
        if crate::faults::hit("dest:commit").as_deref() == Some("fail") {
            return Err(refuse("injected fault at dest:commit".into()));
        }
        let spent_claim = match host.claim(
            &setup.spec.name,
            source_agent,
            commit.generation,
            &setup.migration_id,
            prepared_claim,
        ) {
            Ok(s) => s,
            Err(why) => {
                return Err(refuse(format!(
                    "the destination cannot take ownership: {why}"
                )))
            }
        };
        let claim_us = t_commit.elapsed().as_micros() as u64;
        crate::faults::hit("dest:after-record");
        if let Err(e) = vm.start() {
            host.give_back(&setup.spec.name, source_agent, &setup.migration_id);
            return Err(refuse(format!(
                "the destination could not start the guest: {e}"
            )));
        }
        let resume_us = t_commit.elapsed().as_micros() as u64;
        let _ = resumed.set(Instant::now());
        guard.armed = false;
        host.incoming_done(&setup.spec.name, true);
        handle.set_phase(Phase::Committed);
        cw.send_msg(Command::Resumed, &Resumed { resume_us })?;
        tracing::info!(vm = %setup.spec.name, id = %setup.migration_id, resume_us, claim_us, "incoming migration committed; guest running here");
        let announcements = host.announce(&setup.spec);
        let guest_pause_us = before.and_then(|b| observed_pause(&vm, &b));
        let _ = cw.send_msg(
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
            cipher: setup.encrypt.then(|| super::CIPHER.to_string()),
            total_s: t0.elapsed().as_secs_f64(),
            guest_pause_ms: guest_pause_us.map(|u| u as f64 / 1000.0),
            wire_bytes: wire,
            encodings: enc,
            streams: n,
            verified,
            digest: complete.digest.clone(),
            guest_bytes: enc.pages() * PAGE as u64,
            announcements,
            ..Summary::default()
        })
    })();
    if result.is_err() {
        cut_streams();
    }
    drop(holds);
    let mut forwarded = super::forward::ForwardStats::default();
    for j in joins {
        if let Ok(fs) = j.join() {
            forwarded.frames += fs.frames;
            forwarded.dropped += fs.dropped;
        }
    }
    result.map(|mut s| {
        s.devices.rx_frames_forwarded = forwarded.frames;
        s.devices.rx_frames_forward_dropped = forwarded.dropped;
        s
    })
}

/// How long a data connection may take to present its `StreamHello`.
const UNVERIFIED_TIMEOUT: Duration = Duration::from_secs(2);
/// Unverified data connections held at once (more: the oldest is closed).
const MAX_UNVERIFIED: usize = 32;
/// Largest `StreamHello` payload (a real one is about 100 bytes).
const MAX_STREAM_HELLO: u32 = 1024;

/// Stray connections to data ports: one warning per interval.
static STRAY_WARN: crate::ratelimit::RateLimit =
    crate::ratelimit::RateLimit::new(Duration::from_secs(10));

/// A data connection that has not shown its token yet: its `StreamHello` read so far.
struct Unverified {
    s: TcpStream,
    from: std::net::SocketAddr,
    since: Instant,
    /// The frame as far as it is known: the header first, then header and payload.
    buf: Vec<u8>,
    /// Bytes of `buf` read so far.
    got: usize,
}

impl Unverified {
    /// Take `k` more bytes into account: None while more are needed, else whether the frame
    /// is a well-formed `StreamHello` (its content is checked by the caller).
    fn advance(&mut self, k: usize) -> Option<Result<(), &'static str>> {
        self.got += k;
        if self.got < self.buf.len() {
            return None;
        }
        if self.buf.len() == protocol::HEADER_LEN {
            let h = match protocol::FrameHeader::parse(&self.buf) {
                Ok((h, Command::StreamHello)) if h.seq.get() == 0 => h,
                _ => return Some(Err("not a stream hello")),
            };
            let len = h.payload_len.get();
            if len == 0 || len > MAX_STREAM_HELLO {
                return Some(Err("a hello of an impossible size"));
            }
            self.buf.resize(protocol::HEADER_LEN + len as usize, 0);
            return None;
        }
        let h = match protocol::FrameHeader::parse(&self.buf[..protocol::HEADER_LEN]) {
            Ok((h, _)) => h,
            Err(_) => return Some(Err("not a stream hello")),
        };
        if crc32c::crc32c(&self.buf[protocol::HEADER_LEN..]) != h.payload_crc.get() {
            return Some(Err("a hello with a bad checksum"));
        }
        Some(Ok(()))
    }
}

/// Why a data connection was turned away (our words only: nothing the connection said).
fn stray(from: std::net::SocketAddr, why: &'static str) {
    tracing::debug!(%from, why, "closed a data connection that is not one of the migration's streams");
    crate::warn_limited!(STRAY_WARN, %from, why, "ignored a stray connection to the data port");
}

/// Accept the `n` data streams of a migration on `listener` until `deadline`: only connections
/// from `expect` (the source's migration address, when it said) are considered, each must
/// present `StreamHello` with this migration's id and `token` and a free index within
/// [`UNVERIFIED_TIMEOUT`]; all others are closed and ignored, without holding up the rest (the
/// hellos are read without blocking, at most [`MAX_UNVERIFIED`] at once). The hello is read
/// exactly, so no page bytes behind it leave the socket. Returns the streams by index.
pub(super) fn accept_streams(
    listener: &std::net::TcpListener,
    expect: Option<IpAddr>,
    migration_id: &str,
    token: &str,
    n: u32,
    deadline: Instant,
) -> Result<Vec<TcpStream>, MigrateError> {
    use std::io::Read;
    listener
        .set_nonblocking(true)
        .map_err(protocol::ProtocolError::from)?;
    let mut slots: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    let mut pending: Vec<Unverified> = Vec::new();
    let mut filled = 0;
    while filled < n as usize {
        let now = Instant::now();
        if now >= deadline {
            return Err(MigrateError::Other(format!(
                "timed out after {} s waiting for the data connections: {filled} of {n} arrived",
                STREAMS_TIMEOUT.as_secs()
            )));
        }
        let mut progress = false;
        loop {
            match listener.accept() {
                Ok((s, from)) => {
                    progress = true;
                    if expect.is_some_and(|ip| ip != from.ip()) {
                        stray(from, "not from the source's migration address");
                        continue;
                    }
                    if s.set_nonblocking(true).is_err() {
                        continue;
                    }
                    if pending.len() >= MAX_UNVERIFIED {
                        let old = pending.remove(0);
                        stray(
                            old.from,
                            "crowded out by newer connections before its hello",
                        );
                    }
                    pending.push(Unverified {
                        s,
                        from,
                        since: now,
                        buf: vec![0; protocol::HEADER_LEN],
                        got: 0,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // Out of fds and the like: try again on the next turn.
                Err(_) => break,
            }
        }
        let mut i = 0;
        while i < pending.len() {
            let u = &mut pending[i];
            let got = u.s.read(&mut u.buf[u.got..]);
            let verdict: Option<Result<(), &'static str>> = match got {
                Ok(0) => Some(Err("closed before its hello")),
                Ok(k) => {
                    progress = true;
                    u.advance(k)
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if now.duration_since(u.since) > UNVERIFIED_TIMEOUT {
                        Some(Err("no hello in time"))
                    } else {
                        None
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => None,
                Err(_) => Some(Err("connection error before its hello")),
            };
            let Some(verdict) = verdict else {
                i += 1;
                continue;
            };
            let u = pending.swap_remove(i);
            let hello = verdict.and_then(|()| {
                protocol::json::<StreamHello>(&u.buf[protocol::HEADER_LEN..], "StreamHello")
                    .map_err(|_| "an unreadable hello")
            });
            let taken = hello.and_then(|h| {
                // Compared in full either way: no early exit that times the token.
                let id_ok = h.migration_id == migration_id;
                let token_ok = constant_time_eq(h.token.as_bytes(), token.as_bytes());
                if !(id_ok && token_ok) {
                    return Err("the wrong migration or token");
                }
                match slots.get(h.index as usize) {
                    None => Err("a stream index out of range"),
                    Some(Some(_)) => Err("a stream index already taken"),
                    Some(None) => Ok(h.index as usize),
                }
            });
            match taken {
                Ok(idx) => {
                    let s = u.s;
                    s.set_nonblocking(false)
                        .map_err(protocol::ProtocolError::from)?;
                    let _ = s.set_nodelay(true);
                    let _ = transport::keepalive(&s);
                    use std::os::fd::AsRawFd;
                    crate::netpin::mark_socket(s.as_raw_fd())
                        .map_err(protocol::ProtocolError::from)?;
                    slots[idx] = Some(s);
                    filled += 1;
                }
                Err(why) => stray(u.from, why),
            }
        }
        if !progress {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    Ok(slots.into_iter().flatten().collect())
}

/// Equality of two byte strings in time that depends only on their lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
/// The largest heartbeat gap across the switchover: from the last beat before the pause (read
/// from the restored memory) to the first after the resume, in guest TSC time.
fn observed_pause(vm: &Vm, before: &[crate::vm::workload::Heartbeat]) -> Option<u64> {
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

/// Which data stream a receiver serves: index `i` of `n`, and its frame opener if encrypted.
struct Lane {
    i: u32,
    n: u32,
    seal: Option<crate::transport::seal::Sealer>,
}

fn receive_stream(
    Lane { i, n, seal }: Lane,
    r: &mut FrameReader<BufReader<UringReader>>,
    mut acks: FrameWriter<TcpStream>,
    mem: &GuestMemory,
    tx: &mpsc::Sender<StreamEvent>,
    handle: &MigrationHandle,
) -> Result<(), MigrateError> {
    let mut payload = Vec::new();
    let mut pages = 0u64;
    let mut enc = EncodingStats::default();
    loop {
        let (cmd, count) = r.next_into(&mut payload)?;
        match cmd {
            Command::Pages => {
                if let Some(s) = &seal {
                    s.open(r.last_seq(), &mut payload)?;
                }
                for rec in protocol::parse_records(&payload, count)? {
                    // Each page belongs to one stream; that also keeps two receivers from ever
                    // touching the same page.
                    if super::stream_of(rec.gpa, n) != i {
                        return Err(protocol::ProtocolError::Malformed {
                            what: "page record",
                            why: format!(
                                "page {:#x} arrived on stream {i}, which does not carry it",
                                rec.gpa
                            ),
                        }
                        .into());
                    }
                    if rec.encoding == protocol::Encoding::Zero {
                        // Zero pages go back to the host instead of being written.
                        mem.discard(rec.gpa, PAGE as u64)?;
                    } else {
                        // SAFETY: the incoming VM has never run (its vCPUs are parked until
                        // the commit) and this page is only ever handled by this stream's
                        // thread (checked just above), so the reference is exclusive.
                        let dst = unsafe { mem.page_mut(rec.gpa) }?;
                        codec::decode(rec.encoding, rec.payload, dst)?;
                    }
                    enc.add(rec.encoding, rec.payload.len());
                    pages += 1;
                }
            }
            Command::RoundEnd => {
                let e: RoundEnd = protocol::json(&payload, "RoundEnd")?;
                if crate::faults::armed()
                    && crate::faults::hit(&format!("dest:round:{}", e.round)).as_deref()
                        == Some("fail")
                {
                    return Err(MigrateError::Other(format!(
                        "injected fault at dest:round:{}",
                        e.round
                    )));
                }
                handle.update(|r| r.round = r.round.max(e.round));
                acks.send_msg(Command::RoundAck, &e)?;
            }
            Command::StreamEnd => {
                let e: RoundEnd = protocol::json(&payload, "StreamEnd")?;
                acks.send_msg(Command::RoundAck, &e)?;
                let _ = tx.send(StreamEvent::Done {
                    stream: i,
                    pages,
                    enc,
                    wire: r.bytes,
                });
                return Ok(());
            }
            Command::Abort => {
                let a: Abort = serde_json::from_slice(&payload).unwrap_or(Abort {
                    reason: "(unreadable)".into(),
                });
                return Err(
                    protocol::ProtocolError::Aborted(super::untrusted::peer_text(
                        &a.reason,
                        super::untrusted::PEER_REASON_MAX,
                    ))
                    .into(),
                );
            }
            other => {
                return Err(protocol::ProtocolError::Unexpected {
                    expected: Command::Pages,
                    got: other,
                }
                .into())
            }
        }
    }
}
