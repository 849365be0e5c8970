//! The source side: pre-copy rounds over the dirty log, convergence, switchover and handoff.
//!
//! One orchestrating thread (this module's [`run`]) walks the dirty bitmap and hands page
//! addresses to one worker per data stream; each worker copies its pages out of guest memory,
//! encodes them ([`super::codec`]) and writes `Pages` frames. A round ends when every worker has
//! written its `RoundEnd` and reported its totals. Then [`super::converge::decide`] says what
//! next.
//!
//! Failure rule: until the `Commit` frame is written, any error sends `Abort` to the destination,
//! turns dirty logging off, lifts any throttle and resumes the guest if this engine paused it.

use std::io::BufReader;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::codec::{Adaptive, Codec, DeltaCache, Encoder, PAGE};
use super::converge::{self, Decision, RoundStats};
use super::protocol::RECORD_LEN;
use super::protocol::{
    self, Abort, Command, Complete, FrameReader, FrameWriter, Observed, Prepared, Ready, Resumed,
    RoundEnd, Setup, StreamHello,
};
use super::tune::{self, CodecPlan, Meter, StreamTuning};
use super::{
    stream_of, EncodingStats, GuestOn, MigrateError, MigrateOptions, MigrationHandle, Phase,
    Summary,
};
use crate::transport::tcp as transport;
use crate::transport::uring::{FrameSink, SendStats};
use crate::vm::memory::{is_zero, DirtyBitmap, GuestMemory, PAGE_SIZE};
use crate::vm::{snapshot, Vm, VmStatus};

/// Pages handed to a worker at a time.
const BATCH: usize = 4096;
/// Batches queued per worker (bounds memory and keeps progress honest).
const QUEUE: usize = 4;
/// Send buffers per data stream, and their size (a frame is up to 256 KiB plus one page).
const SEND_BUFFERS: u16 = 8;
const SEND_BUFFER_SIZE: usize = 512 << 10;
/// How long the destination may take to answer a control message.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the guest may stay paused waiting for `Prepared` (the destination finishing the
/// last pages, loading state, verifying) before the source gives up and resumes it.
const PREPARED_TIMEOUT: Duration = Duration::from_secs(10);
/// How long after `Commit` to wait for `Resumed` before asking the ownership record.
const RESUMED_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the source keeps trying to learn where the guest runs after losing contact past the
/// commit point; after that the copy stays paused, unresolved, until `ferry resume`.
pub const RESOLVE_WINDOW: Duration = Duration::from_secs(90);

/// Everything one outgoing migration needs.
pub struct SourceJob {
    pub handle: Arc<MigrationHandle>,
    pub vm: Arc<Vm>,
    /// The peer agent's control address.
    pub peer: SocketAddr,
    /// This host's migration address (data connections leave from it).
    pub local_migration: IpAddr,
    /// This agent's name and cluster key.
    pub identity: super::session::Identity,
    pub options: MigrateOptions,
    /// The eBPF link counters, for utilization in progress and summary.
    pub link: Option<Arc<crate::netpin::NetPin>>,
    /// The cluster's ownership records (None: the commit point is the `Commit` frame alone).
    pub ownership: Option<super::ownership::Ownership>,
}

/// How a failed migration left things.
#[derive(Debug)]
pub struct Failure {
    pub error: MigrateError,
    /// True when the failure came after the commit was sent.
    pub after_commit: bool,
    /// Where the guest runs now: the source (resumed here), the destination (contact was lost
    /// after the commit but the guest runs there: the caller destroys this copy), or unresolved
    /// (this copy stays paused).
    pub guest_on: GuestOn,
    /// How far the migration got (after the commit: everything up to `Prepared`).
    pub summary: Option<Summary>,
    /// How an after-commit failure was resolved.
    pub note: Option<String>,
}

enum Work {
    Pages {
        round: u32,
        /// The final round: no later round will want a delta.
        last: bool,
        gpas: Vec<u64>,
    },
    End {
        round: u32,
        last: bool,
    },
}

#[derive(Debug, Default, Clone)]
struct Totals {
    pages: u64,
    skipped: u64,
    wire_bytes: u64,
    enc: EncodingStats,
    send: SendStats,
    /// The stream's next frame number (after a round's end).
    next_seq: u32,
    /// The stream's codec so far (cumulative, not per round).
    tuning: StreamTuning,
}

struct Report {
    stream: u32,
    result: Result<Totals, String>,
}

struct Worker {
    tx: Option<SyncSender<Work>>,
    /// A handle on the data socket, to cut it when the migration fails.
    sock: Option<TcpStream>,
    sent: Arc<AtomicU64>,
    join: Option<JoinHandle<()>>,
    /// Page records sent over the whole migration.
    total_pages: u64,
    /// The stream's next frame number after the last round (forwarding continues from it).
    next_seq: u32,
}

/// One data connection: frames out (through io_uring), acknowledgements back.
struct DataConn {
    sink: FrameSink,
    /// Frame sequence number on this connection.
    seq: u32,
    /// Bytes written (headers and payloads).
    bytes: u64,
    acks: FrameReader<BufReader<TcpStream>>,
    /// Seals page frames when the migration is encrypted.
    seal: Option<crate::transport::seal::Sealer>,
    /// How pages are encoded (fixed, or tuned from measured rates).
    plan: CodecPlan,
    /// The protocol version the session negotiated (frames are stamped with it).
    version: u16,
}

impl DataConn {
    fn send_control<T: serde::Serialize>(
        &mut self,
        cmd: Command,
        msg: &T,
    ) -> Result<(), MigrateError> {
        let frame = protocol::encode_frame_version(
            cmd,
            0,
            &serde_json::to_vec(msg).unwrap_or_default(),
            self.seq,
            self.version,
        );
        self.sink.send_bytes(&frame).map_err(stream_io)?;
        self.seq = self.seq.wrapping_add(1);
        self.bytes += frame.len() as u64;
        Ok(())
    }
}

fn stream_io(e: crate::transport::uring::UringError) -> MigrateError {
    MigrateError::Protocol(protocol::ProtocolError::Io(std::io::Error::other(
        e.to_string(),
    )))
}

/// A `Pages` frame being built in a pool buffer: header space, then records.
struct PagesFrame {
    pos: usize,
    count: u32,
}

fn finish_frame(c: &mut DataConn, f: &mut Option<PagesFrame>) -> Result<(), MigrateError> {
    let Some(fr) = f.take() else { return Ok(()) };
    if fr.count == 0 {
        return Ok(());
    }
    let buf = c.sink.buffer().map_err(stream_io)?;
    let mut end = fr.pos;
    if let Some(s) = &c.seal {
        let hl = protocol::HEADER_LEN;
        end = hl + s.seal(c.seq, &mut buf[hl..], fr.pos - hl)?;
    }
    let h = protocol::FrameHeader::with_version(
        Command::Pages,
        fr.count,
        &buf[protocol::HEADER_LEN..end],
        c.seq,
        c.version,
    );
    buf[..protocol::HEADER_LEN].copy_from_slice(zerocopy::IntoBytes::as_bytes(&h));
    if crate::faults::armed() && crate::faults::hit("source:corrupt").is_some() {
        // Test hook: one payload byte changes after the checksum was computed.
        let last = end - 1;
        buf[last] ^= 0x5a;
    }
    c.sink.send_buffer(end).map_err(stream_io)?;
    c.seq = c.seq.wrapping_add(1);
    c.bytes += end as u64;
    Ok(())
}

/// A stream's page codec and the measuring behind it (see [`super::tune`]): clock reads per
/// sampled page, per frame and per batch only.
struct Tuner {
    stream: u32,
    codec: Codec,
    meter: Meter,
    link_mb_s: Option<f64>,
    window_start: Instant,
    active_since: Option<Instant>,
    wait_mark: u64,
    wire_mark: u64,
    report: StreamTuning,
    /// A switch under trial: the codec before it and the non-zero MB/s it achieved.
    trial: Option<(Codec, f64)>,
    /// Windows each codec stays left out after a failed trial.
    blocked: [u32; 3],
}

fn nanos(d: Duration) -> u64 {
    d.as_nanos().min(u128::from(u64::MAX)) as u64
}

impl Tuner {
    fn new(stream: u32, plan: &CodecPlan) -> Tuner {
        Tuner {
            stream,
            codec: plan.start,
            meter: Meter::default(),
            link_mb_s: None,
            window_start: Instant::now(),
            active_since: None,
            wait_mark: 0,
            wire_mark: 0,
            trial: None,
            blocked: [0; 3],
            report: StreamTuning {
                stream,
                codec: Some(plan.start),
                mode: plan.mode.to_string(),
                ..StreamTuning::default()
            },
        }
    }

    fn auto(plan: &CodecPlan) -> bool {
        !plan.allowed.is_empty()
    }

    /// A batch of pages starts (busy time counts from here)…
    fn begin(&mut self, c: &DataConn) {
        if self.active_since.is_none() && self.meter.pages == 0 {
            // A fresh window: rates from here.
            self.window_start = Instant::now();
            self.wait_mark = c.sink.waited_ns;
            self.wire_mark = c.bytes;
        }
        self.active_since = Some(Instant::now());
    }

    /// …and ends (waiting for work or acknowledgements is not busy).
    fn end(&mut self) {
        if let Some(t) = self.active_since.take() {
            self.meter.busy_ns += nanos(t.elapsed());
        }
    }

    /// Run every allowed codec on `page` (one sampled page), timed.
    fn sample(&mut self, enc: &mut Encoder, page: &[u8], plan: &CodecPlan) {
        let Ok(page) = <&[u8; PAGE]>::try_from(page) else {
            return;
        };
        let t0 = Instant::now();
        for &c in &plan.allowed {
            if c == Codec::None {
                self.meter.sample_out[0] += PAGE as u64;
                continue;
            }
            let t = Instant::now();
            let n = enc.compress(page, c).unwrap_or(PAGE);
            self.meter.sample_ns[c.index()] += nanos(t.elapsed());
            self.meter.sample_out[c.index()] += n as u64;
        }
        self.meter.samples += 1;
        self.meter.overhead_ns += nanos(t0.elapsed());
    }

    /// After a frame: when the window is over, re-decide from what it measured.
    fn tick(&mut self, c: &DataConn) {
        let window = if self.report.switches == 0 && self.report.rates.is_none() {
            tune::FIRST_WINDOW
        } else {
            tune::WINDOW
        };
        let now = Instant::now();
        if now - self.window_start < window || self.meter.samples < tune::MIN_SAMPLES {
            return;
        }
        if let Some(t) = self.active_since {
            self.meter.busy_ns += nanos(now - t);
            self.active_since = Some(now);
        }
        self.meter.wait_ns = c.sink.waited_ns - self.wait_mark;
        self.meter.wire_bytes = c.bytes - self.wire_mark;
        let busy = self.meter.busy_ns as f64 / 1e9;
        if busy > 0.0 {
            self.link_mb_s = tune::link_estimate(
                self.link_mb_s,
                self.meter.wire_bytes as f64 / busy / 1e6,
                self.meter.wait_ns as f64 / 1e9,
                busy,
                (now - self.window_start).as_secs_f64(),
            );
        }
        // What this window achieved: non-zero pages per busy second (zero pages cost little,
        // and their share varies along guest memory).
        let achieved = self.meter.nonzero as f64 * PAGE as f64 / busy.max(1e-9) / 1e6;
        for b in &mut self.blocked {
            *b = b.saturating_sub(1);
        }
        let mut decided = false;
        if let Some((prev, before)) = self.trial.take() {
            if tune::trial_failed(before, achieved) {
                tracing::debug!(
                    stream = self.stream,
                    from = self.codec.name(),
                    back_to = prev.name(),
                    before_mb_s = before,
                    after_mb_s = achieved,
                    "page codec switch undone: it moved less"
                );
                self.blocked[self.codec.index()] = tune::TRIAL_BLOCK_WINDOWS;
                self.codec = prev;
                self.report.switches += 1;
                self.report.reverted += 1;
                self.report.codec = Some(prev);
                decided = true;
            }
        }
        let allowed: Vec<Codec> = c
            .plan
            .allowed
            .iter()
            .copied()
            .filter(|x| *x == self.codec || self.blocked[x.index()] == 0)
            .collect();
        if let Some(r) = self
            .meter
            .rates(self.codec, self.link_mb_s)
            .filter(|_| !decided)
        {
            let ch = tune::choose(&r, &allowed, self.codec);
            if ch.codec != self.codec {
                self.trial = Some((self.codec, achieved));
                self.report.switches += 1;
                tracing::debug!(
                    stream = self.stream,
                    from = self.codec.name(),
                    to = ch.codec.name(),
                    link_mb_s = self.link_mb_s,
                    predicted_mb_s = ?ch.predicted_mb_s,
                    "page codec changed"
                );
                self.codec = ch.codec;
            }
            self.report.codec = Some(self.codec);
            self.report.rates = Some(r);
            self.report.predicted_mb_s = ch.predicted_mb_s;
        }
        let until = self.meter.until_sample;
        self.meter = Meter {
            until_sample: until,
            ..Meter::default()
        };
        self.window_start = now;
        self.wait_mark = c.sink.waited_ns;
        self.wire_mark = c.bytes;
    }
}

fn worker_loop(
    stream: u32,
    mut c: DataConn,
    mem: Arc<GuestMemory>,
    cache_pages: usize,
    rx: Receiver<Work>,
    reports: mpsc::Sender<Report>,
    sent: Arc<AtomicU64>,
) {
    let mut enc = Encoder::default();
    let mut adaptive = Adaptive::default();
    let mut cache = DeltaCache::new(cache_pages);
    let mut scratch = Box::new([0u8; PAGE]);
    let mut frame: Option<PagesFrame> = None;
    let mut t = Totals::default();
    let mut wire_mark = c.bytes;
    let mut stats_mark = c.sink.stats;
    let mut tuner = Tuner::new(stream, &c.plan);
    let auto = Tuner::auto(&c.plan);
    // A sealed frame grows by its tag.
    let cap = c.sink.buffer_size()
        - if c.seal.is_some() {
            crate::transport::seal::TAG_LEN
        } else {
            0
        };
    let result = (|| -> Result<(), MigrateError> {
        for work in rx {
            match work {
                Work::Pages { round, last, gpas } => {
                    tuner.begin(&c);
                    for gpa in gpas {
                        if frame.as_ref().is_some_and(|f| {
                            f.pos + RECORD_LEN + PAGE > cap || f.pos >= protocol::PAGES_FRAME_TARGET
                        }) {
                            if auto {
                                let (t0, w0) = (Instant::now(), c.sink.waited_ns);
                                finish_frame(&mut c, &mut frame)?;
                                let waited = c.sink.waited_ns - w0;
                                tuner.meter.frame_ns += nanos(t0.elapsed()).saturating_sub(waited);
                                tuner.tick(&c);
                            } else {
                                finish_frame(&mut c, &mut frame)?;
                            }
                        }
                        let fr = frame.get_or_insert(PagesFrame {
                            pos: protocol::HEADER_LEN,
                            count: 0,
                        });
                        let buf = c.sink.buffer().map_err(stream_io)?;
                        let slot = &mut buf[fr.pos + RECORD_LEN..fr.pos + RECORD_LEN + PAGE];
                        // One copy out of guest memory: the snapshot that is checked,
                        // compressed, checksummed and (if raw) sent as it is.
                        mem.read(gpa, slot)?;
                        tuner.meter.pages += 1;
                        if round == 0 && is_zero(slot) {
                            // The destination's fresh memory is zero already.
                            t.skipped += 1;
                            sent.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        let codec = tuner.codec;
                        let (e, n) = if !c.plan.delta && codec == Codec::None {
                            // Zero or raw (the page is in place already); no delta cache.
                            if is_zero(slot) {
                                (protocol::Encoding::Zero, 0)
                            } else {
                                tuner.meter.nonzero += 1;
                                (protocol::Encoding::Raw, PAGE)
                            }
                        } else {
                            if auto && !is_zero(slot) {
                                tuner.meter.nonzero += 1;
                                if tuner.meter.sample_now() {
                                    tuner.sample(&mut enc, slot, &c.plan);
                                }
                            }
                            let cached = c.plan.delta && cache.contains(gpa);
                            // The cache must always hold what the destination holds.
                            let keep = c.plan.delta && (cached || (round >= 1 && !last));
                            if keep {
                                scratch.copy_from_slice(slot);
                            }
                            let r = {
                                let base = if cached { cache.get(gpa) } else { None };
                                enc.encode_adaptive(slot, base, codec, &mut adaptive)
                            };
                            if keep {
                                cache.put(gpa, &scratch);
                            }
                            r
                        };
                        tuner.report.pages_by_codec[codec.index()] += 1;
                        protocol::write_record_header(
                            &mut buf[fr.pos..fr.pos + RECORD_LEN],
                            gpa,
                            e,
                            n,
                        );
                        fr.pos += RECORD_LEN + n;
                        fr.count += 1;
                        t.enc.add(e, n);
                        t.pages += 1;
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    tuner.end();
                }
                Work::End { round, last } => {
                    finish_frame(&mut c, &mut frame)?;
                    let cmd = if last {
                        Command::StreamEnd
                    } else {
                        Command::RoundEnd
                    };
                    c.send_control(
                        cmd,
                        &RoundEnd {
                            round,
                            pages: t.pages,
                        },
                    )?;
                    // Wait until the destination has applied the round: its rate is what the
                    // round really achieved, and nothing is in flight at the switchover.
                    let ack: RoundEnd = c.acks.read_frame()?.msg(Command::RoundAck)?;
                    if ack.round != round {
                        return Err(protocol::ProtocolError::Malformed {
                            what: "RoundAck",
                            why: format!("for round {}, expected {round}", ack.round),
                        }
                        .into());
                    }
                    if last {
                        c.sink.flush(Duration::from_secs(10)).map_err(stream_io)?;
                    }
                    t.wire_bytes = c.bytes - wire_mark;
                    wire_mark = c.bytes;
                    let now = c.sink.stats;
                    t.send = SendStats {
                        zero_copy_bytes: now.zero_copy_bytes - stats_mark.zero_copy_bytes,
                        zc_copied_bytes: now.zc_copied_bytes - stats_mark.zc_copied_bytes,
                        uring_bytes: now.uring_bytes - stats_mark.uring_bytes,
                        std_bytes: now.std_bytes - stats_mark.std_bytes,
                        fell_back: now.fell_back,
                    };
                    stats_mark = now;
                    t.next_seq = c.seq;
                    t.tuning = tuner.report.clone();
                    let _ = reports.send(Report {
                        stream,
                        result: Ok(std::mem::take(&mut t)),
                    });
                    if last {
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = reports.send(Report {
            stream,
            result: Err(e.to_string()),
        });
    }
}

struct Engine<'a> {
    job: &'a SourceJob,
    /// The migration's data key when it is encrypted.
    data_key: Option<[u8; 32]>,
    mem: Arc<GuestMemory>,
    workers: Vec<Worker>,
    reports: Receiver<Report>,
    n: u32,
    rounds: Vec<RoundStats>,
    enc: EncodingStats,
    skipped: u64,
    wire_bytes: u64,
    guest_pages: u64,
    throttle: u8,
    max_throttle: u8,
    send: SendStats,
    /// Per stream: its codec and why (from its latest report).
    tuning: Vec<StreamTuning>,
}

impl Engine<'_> {
    /// Stop when the user cancelled, or when the migration's time limit passed in the middle
    /// of a round (round ends are judged by the convergence policy).
    fn check_cancel(&self) -> Result<(), MigrateError> {
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
                    error,
                };
            }
        }
        MigrateError::Other("a data stream worker stopped unexpectedly".into())
    }

    fn send_round(
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
    fn dispatch(
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
    fn collect(
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
                    self.workers[stream as usize].next_seq = tt.next_seq;
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
                }) => return Err(MigrateError::Stream { stream, error }),
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

    fn set_throttle(&mut self, pct: u8) {
        self.throttle = pct;
        self.max_throttle = self.max_throttle.max(pct);
        self.job.vm.set_throttle(pct);
    }

    fn stop_workers(&mut self) {
        stop_workers(&mut self.workers);
    }
}

/// Close the workers' queues and join their threads (which tears down their io_uring rings,
/// send buffers and delta caches: tens of ms for a large guest).
fn stop_workers(workers: &mut [Worker]) {
    for w in workers.iter_mut() {
        w.tx = None;
    }
    for w in workers.iter_mut() {
        if let Some(j) = w.join.take() {
            let _ = j.join();
        }
    }
}

/// A successful switchover's stream workers, kept until the guest runs on the destination so
/// that their teardown is not part of the pause. Dropping it stops them.
struct Streams(Vec<Worker>);

impl Drop for Streams {
    fn drop(&mut self) {
        stop_workers(&mut self.0);
    }
}

/// Run an outgoing migration to completion. On success the destination runs the guest and the
/// caller destroys the source copy; on failure before the commit the guest runs here again.
pub fn run(job: &SourceJob) -> Result<Summary, Box<Failure>> {
    let t0 = Instant::now();
    let before = |error: MigrateError| {
        Box::new(Failure {
            error,
            after_commit: false,
            guest_on: GuestOn::Source,
            summary: None,
            note: None,
        })
    };
    let session =
        super::session::connect(job.peer, &job.identity, CONTROL_TIMEOUT).map_err(before)?;
    tracing::debug!(peer = %session.peer_agent, version = session.version, "session open");
    let super::session::Session {
        w: mut cw,
        r: mut cr,
        conn: ctl,
        peer_agent,
        ..
    } = session;
    let _ = crate::transport::tcp::keepalive(&ctl);

    let mut paused_here = false;
    let vm = &job.vm;
    let result = precopy_and_prepare(job, &mut cw, &mut cr, &mut paused_here, t0);
    let (mut summary, state_done) = match result {
        Ok(v) => v,
        Err(e) => {
            // A data stream that broke may be the destination hanging up on purpose: its
            // reason (say, a checksum that did not match) is waiting on the control connection.
            let e = match e {
                MigrateError::Stream { .. } | MigrateError::Protocol(_) => {
                    let _ = ctl.set_read_timeout(Some(Duration::from_secs(1)));
                    cr.set_timeout(Some(Duration::from_secs(1)), "the destination's reason");
                    match cr.read_frame().and_then(|f| f.expect(Command::Ready)) {
                        Err(protocol::ProtocolError::Aborted(reason)) => {
                            MigrateError::Refused(reason)
                        }
                        // No reason given: the destination went away (stopped, crashed, or
                        // the network between us failed).
                        _ => MigrateError::Lost {
                            peer: peer_agent.clone(),
                            cause: crate::util::error_chain(&e),
                        },
                    }
                }
                e => e,
            };
            // Before the commit: tell the destination, bring the guest back here.
            let _ = cw.send_msg(
                Command::Abort,
                &Abort {
                    reason: crate::util::error_chain(&e),
                },
            );
            let _ = ctl.shutdown(std::net::Shutdown::Both);
            vm.set_throttle(0);
            let _ = vm.memory().set_dirty_logging_all(false);
            if paused_here && vm.status() == VmStatus::Paused {
                if let Err(re) = vm.resume() {
                    tracing::error!(vm = %vm.spec.name, error = %re, "could not resume the guest after a failed migration");
                }
            }
            tracing::warn!(vm = %vm.spec.name, id = %job.handle.id, error = %crate::util::error_chain(&e), "migration failed; the guest runs on the source");
            return Err(before(e));
        }
    };

    // ---- the commit point ----
    let t_commit = Instant::now();
    let resume_here = |e: MigrateError| {
        vm.set_throttle(0);
        let _ = vm.memory().set_dirty_logging_all(false);
        if let Err(re) = vm.resume() {
            tracing::error!(vm = %vm.spec.name, error = %re, "could not resume the guest after a failed migration");
        }
        before(e)
    };
    let generation = state_done.generation;
    if let Err(e) = cw.send_msg(Command::Commit, &protocol::Commit { generation }) {
        // The frame did not leave: the destination cannot have resumed.
        return Err(resume_here(e.into()));
    }
    let t_commit_sent = Instant::now();
    tracing::debug!(
        paused_to_commit_point_us = (t_commit - state_done.paused_at).as_micros() as u64,
        adopt_and_send_us = (t_commit_sent - t_commit).as_micros() as u64,
        "switchover: commit sent"
    );
    job.handle.set_phase(Phase::Committed);
    let _ = ctl.set_read_timeout(Some(RESUMED_TIMEOUT));
    cr.set_timeout(Some(RESUMED_TIMEOUT), "Resumed");
    let resumed: Resumed = match cr.read_frame().and_then(|f| f.msg(Command::Resumed)) {
        Ok(r) => r,
        Err(e) => {
            let error = match e {
                protocol::ProtocolError::Aborted(reason) => MigrateError::Refused(reason),
                protocol::ProtocolError::TimedOut { .. }
                | protocol::ProtocolError::TimedOutUnknown(_) => MigrateError::Timeout {
                    what: "`Resumed` from the destination after the commit",
                    secs: RESUMED_TIMEOUT.as_secs(),
                },
                e => e.into(),
            };
            let _ = ctl.shutdown(std::net::Shutdown::Both);
            // Resolving can take minutes: the streams' buffers and caches are not needed for it.
            drop(state_done.streams);
            return Err(resolve(job, &peer_agent, generation, error, summary));
        }
    };
    let t_resumed = Instant::now();
    // The guest runs there: frames for it that still reach this host's taps go there too.
    let forwarder = state_done
        .forward
        .and_then(|lane| super::forward::start(vm, lane));
    // Downtime ends when the destination's vCPUs run: `Commit` left here, plus its way there
    // (half of what the round trip took beyond the destination's own work), plus the
    // destination's Commit → running time.
    summary.downtime.resume_ms = resumed.resume_us as f64 / 1000.0;
    let transit =
        (t_resumed - t_commit_sent).saturating_sub(Duration::from_micros(resumed.resume_us));
    summary.downtime.total_ms =
        ms(t_commit_sent - state_done.paused_at) + ms(transit) / 2.0 + summary.downtime.resume_ms;
    // The guest runs there: now the streams may take their time to wind down.
    drop(state_done.streams);
    let _ = ctl.set_read_timeout(Some(Duration::from_secs(3)));
    cr.set_timeout(Some(Duration::from_secs(3)), "Observed");
    if let Ok(o) = cr
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
        vm = %vm.spec.name,
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

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct SwitchoverMark {
    paused_at: Instant,
    /// The ownership record's generation, owned here, that the destination claims from.
    generation: Option<u64>,
    /// Stopped once `Resumed` came (or on any way out).
    streams: Streams,
    /// Where frames reaching this host's taps after the capture go once the guest runs on the
    /// destination (None: the destination does not take them).
    forward: Option<super::forward::Lane>,
}

fn precopy_and_prepare(
    job: &SourceJob,
    cw: &mut FrameWriter<TcpStream>,
    cr: &mut FrameReader<BufReader<TcpStream>>,
    paused_here: &mut bool,
    t0: Instant,
) -> Result<(Summary, SwitchoverMark), MigrateError> {
    let vm = &job.vm;
    let mem = vm.memory().clone();
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
    cw.send_msg(
        Command::Setup,
        &Setup {
            migration_id: job.handle.id.clone(),
            spec: vm.spec.clone(),
            regions: mem.layout(),
            streams: n,
            encrypt: job.options.encrypt,
            source_addr: Some(job.local_migration),
        },
    )?;
    let ready: Ready = match cr.read_frame()?.msg(Command::Ready) {
        Err(protocol::ProtocolError::Aborted(reason)) => return Err(MigrateError::Refused(reason)),
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
        crate::faults::hit("source:before-streams");
    }
    // The page codec: fixed by the user, or tuned per stream; zstd only where the destination
    // speaks a protocol version that has it.
    let version = cw.version();
    let plan = tune::plan(job.options.codec, job.options.compress, version)
        .map_err(MigrateError::Config)?;
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
            sink: FrameSink::new(
                sock,
                job.options.send_mode,
                SEND_BUFFERS,
                SEND_BUFFER_SIZE,
                job.options.poison_buffers,
            ),
            seq: 1,
            bytes: w.bytes,
            acks,
            seal: data_key.map(|k| crate::transport::seal::Sealer::new(&k, i)),
            plan: plan.clone(),
            version,
        };
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let sent = Arc::new(AtomicU64::new(0));
        let (m, r, s2) = (mem.clone(), rep_tx.clone(), sent.clone());
        let join = std::thread::Builder::new()
            .name(format!("mig-tx{i}"))
            .spawn(move || worker_loop(i, conn, m, cache_pages, rx, r, s2))
            .map_err(|e| MigrateError::Other(format!("cannot start a stream worker: {e}")))?;
        workers.push(Worker {
            tx: Some(tx),
            sock: cut,
            sent,
            join: Some(join),
            total_pages: 0,
            next_seq: 0,
        });
    }
    drop(rep_tx);
    let mut eng = Engine {
        job,
        data_key,
        mem: mem.clone(),
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
    let mut r = eng_run(&mut eng, cw, cr, paused_here, t0);
    if let Ok((_, mark)) = &mut r {
        if ready.net_forward {
            // Data stream 0 carries frames forwarded after the switchover (forward.rs).
            mark.forward = eng.workers.first_mut().and_then(|w| {
                Some(super::forward::Lane {
                    sock: w.sock.take()?,
                    seq: w.next_seq,
                    seal: data_key.map(|k| crate::transport::seal::Sealer::new(&k, 0)),
                })
            });
        }
        mark.streams = Streams(std::mem::take(&mut eng.workers));
    }
    if let Err(e) = &r {
        // Tell the destination first: it closes its end, which also drops what is still queued
        // here (and so completes the zero-copy sends the teardown below waits for).
        let _ = cw.send_msg(
            Command::Abort,
            &Abort {
                reason: crate::util::error_chain(e),
            },
        );
        // Workers may be blocked writing to a destination that stopped reading.
        for w in &eng.workers {
            if let Some(s) = &w.sock {
                crate::transport::tcp::abort(s);
            }
        }
    }
    eng.stop_workers();
    r
}

fn eng_run(
    eng: &mut Engine<'_>,
    cw: &mut FrameWriter<TcpStream>,
    cr: &mut FrameReader<BufReader<TcpStream>>,
    paused_here: &mut bool,
    t0: Instant,
) -> Result<(Summary, SwitchoverMark), MigrateError> {
    let job = eng.job;
    let vm = &job.vm;
    let mem = eng.mem.clone();
    let policy = &job.options.policy;

    // Round 0: every page that was ever touched. Dirty logging starts first, so a write after
    // a page was read shows up in round 1.
    job.handle.set_phase(Phase::Precopy);
    let copy_started = Instant::now();
    mem.set_dirty_logging_all(true)?;
    let _ = mem.take_dirty()?;
    let populated = mem.populated();
    let total = populated.count();
    let mut stats = eng.send_round(0, populated.iter_gpa(), total, false)?;
    let mut pending: DirtyBitmap = mem.take_dirty()?;
    stats.dirty_after = pending.count();
    eng.rounds.push(stats);
    let mut round = 0u32;
    loop {
        eng.check_cancel()?;
        let d = converge::decide(&eng.rounds, policy, job.handle.age(), eng.throttle);
        tracing::debug!(vm = %vm.spec.name, round, dirty = pending.count(), decision = ?d, "round done");
        match d {
            Decision::StopAndCopy { .. } => break,
            Decision::GiveUp(why) => return Err(MigrateError::Policy(why)),
            Decision::Throttle(p) => eng.set_throttle(p),
            Decision::Continue => {}
        }
        round += 1;
        let total = pending.count();
        let mut st = eng.send_round(round, pending.iter_gpa(), total, false)?;
        pending = mem.take_dirty()?;
        st.dirty_after = pending.count();
        eng.rounds.push(st);
    }

    // The record must name this host (read before the pause, to keep the pause short); the
    // destination claims the next generation at the commit, which fails if it moved meanwhile.
    let generation = match &job.ownership {
        Some(o) => Some(
            o.adopt(&vm.spec.name, &job.identity.agent)
                .map_err(|e| {
                    MigrateError::Other(format!("the source cannot hand over ownership: {e}"))
                })?
                .generation,
        ),
        None => None,
    };

    // Switchover: pause, last pages, state.
    job.handle.set_phase(Phase::Switchover);
    let paused_at = Instant::now();
    vm.pause()?;
    *paused_here = true;
    let t_paused = Instant::now();
    let last = mem.take_dirty()?;
    pending.merge(&last);
    let t_bitmap = Instant::now();
    round += 1;
    let total = pending.count();
    // The last pages go out while the vCPU and device state is captured and sent: the
    // destination loads the state into its parked vCPUs while the pages still arrive.
    let started = eng.dispatch(round, pending.iter_gpa(), total, true)?;
    if crate::faults::hit("source:before-state").as_deref() == Some("fail") {
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
    let devices = super::DeviceSummary {
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
            cw.next_seq(),
            &mut blob,
            len,
        )?;
    }
    cw.send(Command::State, 0, &blob)?;
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
        Some(snapshot::memory_digest(vm)?)
    } else {
        None
    };
    let digest_time = t_digest.elapsed();
    cw.send_msg(
        Command::Complete,
        &Complete {
            pages_per_stream: eng.workers.iter().map(|w| w.total_pages).collect(),
            digest: digest.clone(),
        },
    )?;
    let t_state = Instant::now();
    // The guest is paused: do not wait for the destination forever.
    let _ = cr
        .get_ref()
        .get_ref()
        .set_read_timeout(Some(PREPARED_TIMEOUT + digest_time));
    cr.set_timeout(Some(PREPARED_TIMEOUT + digest_time), "Prepared");
    let prepared: Prepared = match cr
        .read_frame()
        .map_err(|e| match e {
            protocol::ProtocolError::TimedOut { .. }
            | protocol::ProtocolError::TimedOutUnknown(_) => MigrateError::Timeout {
                what: "the destination to prepare (the guest is paused)",
                secs: (PREPARED_TIMEOUT + digest_time).as_secs(),
            },
            e => e.into(),
        })?
        .msg(Command::Prepared)
    {
        Err(protocol::ProtocolError::Aborted(reason)) => {
            if let Some(rest) = reason.strip_prefix("digest mismatch: ") {
                return Err(MigrateError::DigestMismatch {
                    source_digest: digest.unwrap_or_default(),
                    dest_digest: rest.to_string(),
                });
            }
            return Err(MigrateError::Refused(reason));
        }
        r => r?,
    };
    let t_prepared = Instant::now();
    let summary = Summary {
        total_s: t0.elapsed().as_secs_f64(),
        encrypted: job.options.encrypt,
        cipher: job.options.encrypt.then(|| super::CIPHER.to_string()),
        downtime: super::Downtime {
            total_ms: 0.0,
            final_pages_ms: ms(t_pages - paused_at),
            state_ms: ms(t_state_sent - t_bitmap),
            prepare_ms: ms(t_prepared - t_state),
            resume_ms: 0.0,
            verify_ms: if job.options.verify {
                ms(digest_time) + prepared.verify_us as f64 / 1000.0
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
        send_mode: eng.job.options.send_mode,
        transport: eng.send,
        link: job
            .link
            .as_ref()
            .and_then(|l| l.migration_tx_between(copy_started, t_pages)),
        announcements: Vec::new(),
        devices,
        tuning: eng.tuning.clone(),
    };
    tracing::info!(
        vm = %vm.spec.name,
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

/// Contact with the destination was lost (or it refused) after `Commit` was sent: find out
/// where the guest runs, within [`RESOLVE_WINDOW`]. With ownership records the source first
/// tries to claim the generation the destination would claim: if that works the destination
/// can no longer run the guest, and it resumes here. If the destination holds the record, the
/// source asks it whether it runs the guest; one that answers without it (it restarted, or
/// gave up) loses the record back to the source. Without records the source can only ask.
fn resolve(
    job: &SourceJob,
    dest_agent: &str,
    generation: Option<u64>,
    error: MigrateError,
    summary: Summary,
) -> Box<Failure> {
    let vm = &job.vm;
    let name = vm.spec.name.as_str();
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
        let _ = vm.memory().set_dirty_logging_all(false);
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
    let name = job.vm.spec.name.as_str();
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
