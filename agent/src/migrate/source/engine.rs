//! The orchestrating side of the source engine: [`prepare`] opens the migration (`Setup`,
//! `Ready`, one data connection and worker per stream), runs the pre-copy rounds
//! ([`precopy`]) and the switchover (`switchover.rs`), and on any failure tells the
//! destination and stops the workers. [`Engine`] hands a round's pages to the workers and
//! collects their reports.

use std::io::BufReader;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::sink::DataSink;
use super::switchover::{self, SwitchoverMark};
use super::worker::{self, DataConn, Report, Streams, Totals, Work, Worker};
use super::{Control, SourceJob};
use crate::migrate::codec::PAGE;
use crate::migrate::converge::{self, Decision, RoundStats};
use crate::migrate::protocol::{
    self, Command, FrameReader, FrameWriter, Ready, Setup, StreamHello,
};
use crate::migrate::tune::{self, StreamTuning};
use crate::migrate::{stream_of, EncodingStats, MigrateError, Phase, Summary};
use crate::transport::tcp as transport;
use crate::transport::uring::{FrameSink, SendStats};
use crate::vm::memory::{DirtyBitmap, GuestMemory};

/// Pages handed to a worker at a time.
const BATCH: usize = 4096;
/// Batches queued per worker (bounds memory and keeps progress honest).
const QUEUE: usize = 4;
/// Send buffers per data stream, and their size (a frame is up to 256 KiB plus one page).
const SEND_BUFFERS: u16 = 8;
const SEND_BUFFER_SIZE: usize = 512 << 10;

/// The source engine: the workers, and the totals of the rounds so far.
pub(super) struct Engine<'a> {
    pub(super) job: &'a SourceJob,
    /// The migration's data key when it is encrypted.
    pub(super) data_key: Option<[u8; 32]>,
    pub(super) mem: Arc<GuestMemory>,
    pub(super) workers: Vec<Worker>,
    pub(super) reports: Receiver<Report>,
    pub(super) n: u32,
    pub(super) rounds: Vec<RoundStats>,
    pub(super) enc: EncodingStats,
    pub(super) skipped: u64,
    pub(super) wire_bytes: u64,
    pub(super) guest_pages: u64,
    pub(super) throttle: u8,
    pub(super) max_throttle: u8,
    pub(super) send: SendStats,
    /// Per stream: its codec and why (from its latest report).
    pub(super) tuning: Vec<StreamTuning>,
}

impl Engine<'_> {
    /// Stop when the user cancelled, or when the migration's time limit passed in the middle
    /// of a round (round ends are judged by the convergence policy).
    pub(super) fn check_cancel(&self) -> Result<(), MigrateError> {
        if self.job.handle.cancelled() {
            return Err(MigrateError::Cancelled);
        }
        let limit = self.job.options.policy.max_time_s;
        if self.job.handle.age().as_secs_f64() >= limit {
            return Err(MigrateError::Policy(format!(
                "did not converge within the {limit} s limit (round {} still under way); raise --max-time, or give the migration link more bandwidth",
                self.rounds.len()
            )));
        }
        Ok(())
    }

    fn sent(&self) -> u64 {
        self.workers
            .iter()
            .map(|w| w.sent.load(Ordering::Relaxed))
            .sum()
    }

    /// Publish progress of the round that started at `started` with `start_sent` pages sent
    /// before it. The rate is this round's so far once it has run for a while (so round 0
    /// shows one too), else the last finished round's.
    fn progress(&self, round: u32, total: u64, start_sent: u64, started: Instant) {
        let done = self.sent() - start_sent;
        let left = total.saturating_sub(done);
        let secs = started.elapsed().as_secs_f64();
        let rate = if secs >= 0.25 && done > 0 {
            Some(done as f64 / secs)
        } else {
            converge::page_rate(&self.rounds)
        };
        let throttle = self.throttle;
        let link = self
            .job
            .link
            .as_ref()
            .and_then(|l| l.migration_tx_percent());
        self.job.handle.update(|r| {
            r.link_percent = link;
            r.round = round;
            r.pages_left = left;
            r.rate_mib_s = rate.map_or(0.0, |p| p * PAGE as f64 / (1 << 20) as f64);
            r.eta_s = rate.map(|p| left as f64 / p.max(1.0));
            r.throttle = throttle;
        });
    }

    /// Find a worker's error after a failed hand-off.
    fn worker_error(&self) -> MigrateError {
        while let Ok(r) = self.reports.recv_timeout(Duration::from_millis(500)) {
            if let Err(error) = r.result {
                return MigrateError::Stream {
                    stream: r.stream,
                    error: Box::new(error),
                };
            }
        }
        MigrateError::Other("a data stream worker stopped unexpectedly".into())
    }

    pub(super) fn send_round(
        &mut self,
        round: u32,
        gpas: impl Iterator<Item = u64>,
        total: u64,
        last: bool,
    ) -> Result<RoundStats, MigrateError> {
        let started = self.dispatch(round, gpas, total, last)?;
        self.collect(round, total, last, started)
    }

    /// Hand a round's pages and its end marker to the workers (returns when all is queued).
    pub(super) fn dispatch(
        &mut self,
        round: u32,
        gpas: impl Iterator<Item = u64>,
        total: u64,
        last: bool,
    ) -> Result<(Instant, u64), MigrateError> {
        let t = Instant::now();
        let start_sent = self.sent();
        let mut batches: Vec<Vec<u64>> = (0..self.n).map(|_| Vec::with_capacity(BATCH)).collect();
        let mut since_progress = Instant::now();
        for gpa in gpas {
            let s = stream_of(gpa, self.n) as usize;
            batches[s].push(gpa);
            if batches[s].len() == BATCH {
                let b = std::mem::replace(&mut batches[s], Vec::with_capacity(BATCH));
                self.hand_off(
                    s,
                    Work::Pages {
                        round,
                        last,
                        gpas: b,
                    },
                )?;
                if !last {
                    self.check_cancel()?;
                }
                if since_progress.elapsed() > Duration::from_millis(100) {
                    self.progress(round, total, start_sent, t);
                    since_progress = Instant::now();
                }
            }
        }
        for (s, b) in batches.into_iter().enumerate() {
            if !b.is_empty() {
                self.hand_off(
                    s,
                    Work::Pages {
                        round,
                        last,
                        gpas: b,
                    },
                )?;
            }
            self.hand_off(s, Work::End { round, last })?;
        }
        Ok((t, start_sent))
    }

    /// Wait for every worker to report the end of `round` (acknowledged by the destination).
    pub(super) fn collect(
        &mut self,
        round: u32,
        total: u64,
        last: bool,
        (t, start_sent): (Instant, u64),
    ) -> Result<RoundStats, MigrateError> {
        let mut totals = Totals::default();
        let mut got = 0;
        while got < self.n {
            match self.reports.recv_timeout(Duration::from_millis(100)) {
                Ok(Report {
                    stream,
                    result: Ok(tt),
                }) => {
                    got += 1;
                    self.workers[stream as usize].total_pages += tt.pages;
                    self.workers[stream as usize].framer = tt.framer;
                    totals.pages += tt.pages;
                    totals.skipped += tt.skipped;
                    totals.wire_bytes += tt.wire_bytes;
                    totals.enc.merge(&tt.enc);
                    totals.send.merge(&tt.send);
                    if let Some(slot) = self.tuning.get_mut(stream as usize) {
                        *slot = tt.tuning;
                    }
                }
                Ok(Report {
                    stream,
                    result: Err(error),
                }) => {
                    return Err(MigrateError::Stream {
                        stream,
                        error: Box::new(error),
                    })
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if !last {
                        self.check_cancel()?;
                    }
                    self.progress(round, total, start_sent, t);
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(MigrateError::Other("data stream workers are gone".into()))
                }
            }
        }
        self.enc.merge(&totals.enc);
        self.send.merge(&totals.send);
        self.skipped += totals.skipped;
        self.wire_bytes += totals.wire_bytes;
        self.guest_pages += totals.pages + totals.skipped;
        Ok(RoundStats {
            round,
            pages: totals.pages + totals.skipped,
            wire_bytes: totals.wire_bytes,
            secs: t.elapsed().as_secs_f64(),
            dirty_after: 0,
            throttle: self.throttle,
        })
    }

    fn hand_off(&self, s: usize, w: Work) -> Result<(), MigrateError> {
        let tx = self.workers[s]
            .tx
            .as_ref()
            .ok_or_else(|| self.worker_error())?;
        tx.send(w).map_err(|_| self.worker_error())
    }

    pub(super) fn set_throttle(&mut self, pct: u8) {
        self.throttle = pct;
        self.max_throttle = self.max_throttle.max(pct);
        self.job.vm.set_throttle(pct);
    }

    pub(super) fn stop_workers(&mut self) {
        worker::stop_workers(&mut self.workers);
    }
}

/// The migration up to the commit point: `Setup`/`Ready`, the data streams and their workers,
/// pre-copy, switchover. On success the workers are kept (in the mark) until the guest runs on
/// the destination; on failure the destination is told (`Abort`), the data connections are cut
/// and the workers stopped.
pub(super) fn prepare(
    job: &SourceJob,
    ctl: &mut Control,
    paused_here: &mut bool,
    t0: Instant,
) -> Result<(Summary, SwitchoverMark), MigrateError> {
    let (mut eng, ready) = open(job, ctl)?;
    let mut r = precopy(&mut eng)
        .and_then(|pre| switchover::switchover(&mut eng, ctl, pre, paused_here, t0));
    if let Ok((_, mark)) = &mut r {
        if ready.net_forward {
            // Data stream 0 carries frames forwarded after the switchover (forward.rs).
            let data_key = eng.data_key;
            mark.forward = eng.workers.first_mut().and_then(|w| {
                Some(crate::migrate::forward::Lane {
                    framer: w.framer.take()?,
                    sock: w.sock.take()?,
                    seal: data_key.map(|k| crate::transport::seal::Sealer::new(&k, 0)),
                })
            });
        }
        mark.streams = Streams(std::mem::take(&mut eng.workers));
    }
    if let Err(e) = &r {
        // Tell the destination first: it closes its end, which also drops what is still queued
        // here (and so completes the zero-copy sends the teardown below waits for).
        ctl.abort(e);
        // Workers may be blocked writing to a destination that stopped reading.
        for w in &eng.workers {
            if let Some(s) = &w.sock {
                transport::abort(s);
            }
        }
    }
    eng.stop_workers();
    r
}

/// `Setup` → `Ready`, then one data connection and worker per stream.
fn open<'a>(job: &'a SourceJob, ctl: &mut Control) -> Result<(Engine<'a>, Ready), MigrateError> {
    let vm = job.vm.as_ref();
    let mem = vm.memory();
    let n = job.options.stream_count();
    let cluster_key = match (job.options.encrypt, &job.identity.key) {
        (true, None) => {
            return Err(MigrateError::Config(
                "encrypted migration needs the cluster key to derive its data key: set [cluster] key_file on both hosts".into(),
            ))
        }
        (true, Some(k)) => Some(k.clone()),
        (false, _) => None,
    };
    ctl.w.send_msg(
        Command::Setup,
        &Setup {
            migration_id: job.handle.id.clone(),
            spec: vm.spec().clone(),
            regions: mem.layout(),
            streams: n,
            encrypt: job.options.encrypt,
            source_addr: Some(job.local_migration),
        },
    )?;
    let ready: Ready = match ctl.r.read_frame()?.msg(Command::Ready) {
        Err(e @ protocol::ProtocolError::Aborted { .. }) => {
            return Err(MigrateError::from_abort(e, None))
        }
        r => r?,
    };
    let data_addr: SocketAddr = ready.data_addr.parse().map_err(|_| {
        MigrateError::Protocol(protocol::ProtocolError::Malformed {
            what: "Ready",
            why: format!("bad data address {:?}", ready.data_addr),
        })
    })?;
    let data_key =
        cluster_key.map(|k| crate::transport::seal::data_key(&k, &job.handle.id, &ready.token));

    if crate::faults::armed() {
        crate::faults::hit_in("source:before-streams", &job.handle.id);
    }
    // The page codec: fixed by the user, or tuned per stream; zstd only where the destination
    // speaks a protocol version that has it.
    let version = ctl.w.version();
    let plan = tune::plan(job.options.codec, job.options.compress, version)?;
    // Data streams and their workers.
    let cache_pages = ((mem.size() as f64 * job.options.cache_percent / 100.0) / PAGE as f64)
        as usize
        / n as usize;
    let (rep_tx, rep_rx) = mpsc::channel();
    let mut workers = Vec::new();
    for i in 0..n {
        let sock = transport::connect_from(
            Some(job.local_migration),
            data_addr,
            Duration::from_secs(5),
            true,
        )
        .map_err(|source| MigrateError::Connect {
            what: "the destination's migration address",
            addr: data_addr.to_string(),
            source,
        })?;
        let cut = sock.try_clone().ok();
        let acks = FrameReader::new(BufReader::new(
            sock.try_clone().map_err(protocol::ProtocolError::from)?,
        ));
        let mut w = FrameWriter::new(sock.try_clone().map_err(protocol::ProtocolError::from)?);
        w.set_version(version);
        w.send_msg(
            Command::StreamHello,
            &StreamHello {
                migration_id: job.handle.id.clone(),
                index: i,
                token: ready.token.clone(),
            },
        )?;
        let conn = DataConn {
            // The data path carries on the numbering and version the StreamHello began.
            out: DataSink::new(
                FrameSink::new(
                    sock,
                    job.options.send_mode,
                    SEND_BUFFERS,
                    SEND_BUFFER_SIZE,
                    job.options.poison_buffers,
                ),
                w.into_framer(),
                data_key.map(|k| crate::transport::seal::Sealer::new(&k, i)),
            ),
            acks,
            plan: plan.clone(),
            migration: job.handle.id.clone(),
        };
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let sent = Arc::new(AtomicU64::new(0));
        let (m, r, s2) = (mem.clone(), rep_tx.clone(), sent.clone());
        let join = std::thread::Builder::new()
            .name(format!("mig-tx{i}"))
            .spawn(move || worker::worker_loop(i, conn, m, cache_pages, rx, r, s2))
            .map_err(|e| MigrateError::Other(format!("cannot start a stream worker: {e}")))?;
        workers.push(Worker {
            tx: Some(tx),
            sock: cut,
            sent,
            join: Some(join),
            total_pages: 0,
            framer: None,
        });
    }
    drop(rep_tx);
    let eng = Engine {
        job,
        data_key,
        mem,
        workers,
        reports: rep_rx,
        n,
        rounds: Vec::new(),
        enc: EncodingStats::default(),
        skipped: 0,
        wire_bytes: 0,
        guest_pages: 0,
        throttle: 0,
        max_throttle: 0,
        send: SendStats::default(),
        tuning: (0..n)
            .map(|i| StreamTuning {
                stream: i,
                ..StreamTuning::default()
            })
            .collect(),
    };
    Ok((eng, ready))
}

/// What pre-copy leaves to the switchover.
pub(super) struct Precopied {
    /// The pages dirtied during the last round.
    pub(super) pending: DirtyBitmap,
    /// The last round's number.
    pub(super) round: u32,
    /// When copying began (the link's utilization is measured from here).
    pub(super) copy_started: Instant,
}

/// Pre-copy: round 0 sends every page that was ever touched, each later round the pages the
/// one before left dirty, until the convergence policy says stop and copy (or gives up).
fn precopy(eng: &mut Engine<'_>) -> Result<Precopied, MigrateError> {
    let job = eng.job;
    let vm = job.vm.as_ref();
    let policy = &job.options.policy;

    // Round 0: every page that was ever touched. Dirty logging starts first, so a write after
    // a page was read shows up in round 1.
    job.handle.set_phase(Phase::Precopy);
    let copy_started = Instant::now();
    vm.set_dirty_logging(true)?;
    let _ = vm.take_dirty()?;
    let populated = vm.populated();
    let total = populated.count();
    let mut stats = eng.send_round(0, populated.iter_gpa(), total, false)?;
    let mut pending: DirtyBitmap = vm.take_dirty()?;
    stats.dirty_after = pending.count();
    eng.rounds.push(stats);
    let mut round = 0u32;
    loop {
        eng.check_cancel()?;
        let d = converge::decide(&eng.rounds, policy, job.handle.age(), eng.throttle);
        tracing::debug!(vm = %vm.spec().name, round, dirty = pending.count(), decision = ?d, "round done");
        match d {
            Decision::StopAndCopy { .. } => break,
            Decision::GiveUp(why) => return Err(MigrateError::Policy(why)),
            Decision::Throttle(p) => eng.set_throttle(p),
            Decision::Continue => {}
        }
        round += 1;
        let total = pending.count();
        let mut st = eng.send_round(round, pending.iter_gpa(), total, false)?;
        pending = vm.take_dirty()?;
        st.dirty_after = pending.count();
        eng.rounds.push(st);
    }
    Ok(Precopied {
        pending,
        round,
        copy_started,
    })
}
