//! The destination's data streams: one receiver thread per stream applies `Pages` frames to
//! the incoming guest's memory and acknowledges each round's end; [`Receivers`] owns those
//! threads for the control thread (events, cutting the connections, teardown).
//!
//! A receiver whose stream ended keeps its io_uring ring and buffers until the guest runs here
//! (its teardown stays out of the switchover pause); stream 0 of a guest with NICs then goes on
//! receiving forwarded frames (`forward.rs`). A receiver that fails shuts the control
//! connection's read side down, so the control thread wakes up and aborts too.

use std::io::BufReader;
use std::net::TcpStream;
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::migrate::codec::{self, PAGE};
use crate::migrate::forward::{self, ForwardStats};
use crate::migrate::guest::IncomingGuest;
use crate::migrate::protocol::{self, Abort, Command, FrameReader, FrameWriter, RoundEnd};
use crate::migrate::{EncodingStats, MigrateError, MigrationHandle};
use crate::vm::memory::GuestMemory;

/// What a receiver tells the control thread.
enum StreamEvent {
    Done {
        stream: u32,
        pages: u64,
        enc: EncodingStats,
        wire: u64,
    },
    Failed {
        stream: u32,
        error: Box<MigrateError>,
    },
}

/// What the streams delivered, once all reached their end.
pub(super) struct Delivered {
    /// Page records per stream.
    pub(super) pages: Vec<u64>,
    pub(super) enc: EncodingStats,
    /// Bytes read from the data connections.
    pub(super) wire: u64,
}

/// Everything a receiver thread gets.
pub(super) struct StreamSetup {
    pub(super) guest: Arc<dyn IncomingGuest>,
    /// The control connection (a receiver that fails shuts its read side down).
    pub(super) ctl: Option<TcpStream>,
    /// The protocol version the session negotiated (acknowledgements carry it).
    pub(super) version: u16,
    pub(super) data_key: Option<[u8; 32]>,
    /// Stream 0 receives forwarded frames after its end.
    pub(super) net_forward: bool,
    /// Set once the guest runs here.
    pub(super) resumed: Arc<OnceLock<Instant>>,
    pub(super) handle: Arc<MigrationHandle>,
}

/// The receiver threads of one incoming migration.
pub(super) struct Receivers {
    n: u32,
    events: mpsc::Receiver<StreamEvent>,
    tx: Option<mpsc::Sender<StreamEvent>>,
    joins: Vec<JoinHandle<ForwardStats>>,
    /// Handles on the data sockets, to cut them when the migration fails.
    cuts: Vec<Option<TcpStream>>,
    /// A receiver whose stream ended waits until its sender here drops.
    holds: Vec<mpsc::Sender<()>>,
}

impl Receivers {
    /// Receivers for `n` streams, none started yet.
    pub(super) fn new(n: u32) -> Receivers {
        let (tx, events) = mpsc::channel();
        Receivers {
            n,
            events,
            tx: Some(tx),
            joins: Vec::new(),
            cuts: Vec::new(),
            holds: Vec::new(),
        }
    }

    /// Start the receiver of stream `i` on `sock` (its `StreamHello` already read).
    pub(super) fn start(
        &mut self,
        i: u32,
        sock: TcpStream,
        s: &StreamSetup,
    ) -> Result<(), MigrateError> {
        let n = self.n;
        let tx = self
            .tx
            .clone()
            .ok_or_else(|| MigrateError::Other("the receivers are closed".into()))?;
        let mut r = FrameReader::with_seq(BufReader::with_capacity(1 << 20, sock), 1);
        let (hold_tx, hold_rx) = mpsc::channel::<()>();
        self.holds.push(hold_tx);
        let sock = r
            .get_ref()
            .get_ref()
            .try_clone()
            .map_err(protocol::ProtocolError::from)?;
        self.cuts.push(sock.try_clone().ok());
        // Acknowledgements carry the version the session negotiated, as the source's frames do.
        let mut acks = FrameWriter::new(sock);
        acks.set_version(s.version);
        let mem = s.guest.memory();
        let ctl = s.ctl.as_ref().and_then(|c| c.try_clone().ok());
        let h = s.handle.clone();
        let seal = s
            .data_key
            .map(|k| crate::transport::seal::Sealer::new(&k, i));
        // Stream 0 goes on with forwarded frames after its end (forward.rs).
        let fwd =
            (i == 0 && s.net_forward).then(|| (s.guest.clone(), seal.clone(), s.resumed.clone()));
        let j = std::thread::Builder::new()
            .name(format!("mig-rx{i}"))
            .spawn(move || -> ForwardStats {
                if let Err(error) = receive_stream(Lane { i, n, seal }, &mut r, acks, &mem, &tx, &h)
                {
                    let _ = tx.send(StreamEvent::Failed {
                        stream: i,
                        error: Box::new(error),
                    });
                    // Wake the control thread (its read ends); it can still write, to tell
                    // the source why.
                    if let Some(c) = ctl {
                        let _ = c.shutdown(std::net::Shutdown::Read);
                    }
                } else if let Some((vm, seal, resumed)) = fwd {
                    match forward::receive(vm.as_ref(), &r, seal, &resumed) {
                        Ok(fs) => return fs,
                        Err(e) => {
                            tracing::warn!(vm = %vm.spec().name, error = %crate::util::error_chain(&e), "forwarded frames refused; the rest from the source is dropped");
                        }
                    }
                } else {
                    let _ = hold_rx.recv_timeout(Duration::from_secs(60));
                }
                drop(r);
                ForwardStats::default()
            })
            .map_err(|e| MigrateError::Other(format!("cannot start a receiver: {e}")))?;
        self.joins.push(j);
        Ok(())
    }

    /// Every receiver is started: the events end when they all have.
    pub(super) fn started(&mut self) {
        self.tx = None;
    }

    /// The error of a receiver that failed, if one did (the others' events are dropped).
    pub(super) fn failure(&self) -> Option<MigrateError> {
        while let Ok(ev) = self.events.try_recv() {
            if let StreamEvent::Failed { stream, error } = ev {
                return Some(MigrateError::Stream { stream, error });
            }
        }
        None
    }

    /// Wait up to `wait` for every stream to reach its end.
    pub(super) fn wait_done(&self, wait: Duration) -> Result<Delivered, MigrateError> {
        let mut done = vec![None; self.n as usize];
        let mut enc = EncodingStats::default();
        let mut wire = 0;
        let until = Instant::now() + wait;
        while done.iter().any(Option::is_none) {
            let left = until.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(StreamEvent::Done {
                    stream,
                    pages,
                    enc: e,
                    wire: w,
                }) => {
                    if let Some(slot) = done.get_mut(stream as usize) {
                        *slot = Some(pages);
                    }
                    enc.merge(&e);
                    wire += w;
                }
                Ok(StreamEvent::Failed { stream, error }) => {
                    return Err(MigrateError::Stream { stream, error })
                }
                Err(_) => {
                    return Err(MigrateError::Timeout {
                        what: "the data streams to finish",
                        secs: wait.as_secs(),
                    })
                }
            }
        }
        Ok(Delivered {
            pages: done.into_iter().flatten().collect(),
            enc,
            wire,
        })
    }

    /// Reset every data connection (the migration failed).
    pub(super) fn cut(&self) {
        for s in self.cuts.iter().flatten() {
            crate::transport::tcp::abort(s);
        }
    }

    /// Let the receivers end and wait for them: what stream 0 forwarded, if it did.
    pub(super) fn finish(mut self) -> ForwardStats {
        self.holds.clear();
        self.tx = None;
        let mut forwarded = ForwardStats::default();
        for j in self.joins.drain(..) {
            if let Ok(fs) = j.join() {
                forwarded.frames += fs.frames;
                forwarded.dropped += fs.dropped;
            }
        }
        forwarded
    }
}

/// Which data stream a receiver serves: index `i` of `n`, and its frame opener if encrypted.
struct Lane {
    i: u32,
    n: u32,
    seal: Option<crate::transport::seal::Sealer>,
}

fn receive_stream(
    Lane { i, n, seal }: Lane,
    r: &mut FrameReader<BufReader<TcpStream>>,
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
                    if crate::migrate::stream_of(rec.gpa, n) != i {
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
                    && crate::faults::hit_in(&format!("dest:round:{}", e.round), &handle.id)
                        .as_deref()
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
                return Err(Abort::decode(&payload).into_error().into());
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
