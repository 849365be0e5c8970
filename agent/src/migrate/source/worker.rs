//! One worker thread per data stream: it takes batches of page addresses from the engine,
//! copies each page out of guest memory into a send buffer, encodes it (zero, raw, LZ4, zstd or
//! a delta against the stream's cache), seals the frame when the migration is encrypted, and
//! sends it through io_uring. At a round's end it writes `RoundEnd` (or `StreamEnd` after the
//! last round), waits for the destination's `RoundAck` and reports its totals.

use std::io::BufReader;
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::sink::DataSink;
use super::tuner::{nanos, Tuner};
use crate::migrate::codec::{Adaptive, Codec, DeltaCache, Encoder, PAGE};
use crate::migrate::protocol::{self, Command, FrameReader, Framer, RoundEnd, RECORD_LEN};
use crate::migrate::tune::{CodecPlan, StreamTuning};
use crate::migrate::{EncodingStats, MigrateError};
use crate::transport::uring::SendStats;
use crate::vm::memory::{is_zero, GuestMemory};

pub(super) enum Work {
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
pub(super) struct Totals {
    pub(super) pages: u64,
    pub(super) skipped: u64,
    pub(super) wire_bytes: u64,
    pub(super) enc: EncodingStats,
    pub(super) send: SendStats,
    /// The stream's framer after a round's end (forwarding continues from it).
    pub(super) framer: Option<Framer>,
    /// The stream's codec so far (cumulative, not per round).
    pub(super) tuning: StreamTuning,
}

pub(super) struct Report {
    pub stream: u32,
    pub result: Result<Totals, MigrateError>,
}

pub(super) struct Worker {
    pub(super) tx: Option<SyncSender<Work>>,
    /// A handle on the data socket, to cut it when the migration fails.
    pub(super) sock: Option<TcpStream>,
    pub(super) sent: Arc<AtomicU64>,
    pub(super) join: Option<JoinHandle<()>>,
    /// Page records sent over the whole migration.
    pub(super) total_pages: u64,
    /// The stream's framer after the last round (forwarding continues from it).
    pub(super) framer: Option<Framer>,
}

/// One data connection: frames out (through io_uring), acknowledgements back.
pub(super) struct DataConn {
    /// Frames out: numbered, stamped and (when encrypted) sealed.
    pub(super) out: DataSink,
    pub(super) acks: FrameReader<BufReader<TcpStream>>,
    /// How pages are encoded (fixed, or tuned from measured rates).
    pub(super) plan: CodecPlan,
    /// The migration's id (fault points name it).
    pub(super) migration: String,
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
    let migration = &c.migration;
    c.out
        .send_buffer(Command::Pages, fr.count, fr.pos, |frame| {
            if crate::faults::armed()
                && crate::faults::hit_in("source:corrupt", migration).is_some()
            {
                // Test hook: one payload byte changes after the checksum was computed.
                if let Some(last) = frame.last_mut() {
                    *last ^= 0x5a;
                }
            }
        })
}

pub(super) fn worker_loop(
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
    let mut wire_mark = c.out.bytes();
    let mut stats_mark = c.out.stats();
    let mut tuner = Tuner::new(stream, &c.plan);
    let auto = Tuner::auto(&c.plan);
    // A sealed frame grows by its tag.
    let cap = c.out.frame_limit();
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
                                let (t0, w0) = (Instant::now(), c.out.waited_ns());
                                finish_frame(&mut c, &mut frame)?;
                                let waited = c.out.waited_ns() - w0;
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
                        let buf = c.out.buffer()?;
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
                    c.out.send_msg(
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
                        c.out.flush(Duration::from_secs(10))?;
                    }
                    t.wire_bytes = c.out.bytes() - wire_mark;
                    wire_mark = c.out.bytes();
                    let now = c.out.stats();
                    t.send = SendStats {
                        zero_copy_bytes: now.zero_copy_bytes - stats_mark.zero_copy_bytes,
                        zc_copied_bytes: now.zc_copied_bytes - stats_mark.zc_copied_bytes,
                        uring_bytes: now.uring_bytes - stats_mark.uring_bytes,
                        std_bytes: now.std_bytes - stats_mark.std_bytes,
                        fell_back: now.fell_back,
                    };
                    stats_mark = now;
                    t.framer = Some(c.out.framer().clone());
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
            result: Err(e),
        });
    }
}

/// Close the workers' queues and join their threads (which tears down their io_uring rings,
/// send buffers and delta caches: tens of ms for a large guest).
pub(super) fn stop_workers(workers: &mut [Worker]) {
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
pub(super) struct Streams(pub Vec<Worker>);

impl Drop for Streams {
    fn drop(&mut self) {
        stop_workers(&mut self.0);
    }
}
