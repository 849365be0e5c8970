//! Throughput probes between agents over the migration network: `ferry ping PEER --throughput`.
//!
//! A probe uses the migration protocol's handshake on the control connection, then a `Blast`
//! request instead of `Setup`. The destination opens a data address on its migration network as
//! for a migration; the source opens N streams from its migration address and sends for a given
//! time or byte count:
//!
//! - `tcp`: a raw TCP blast (the same buffer written again and again with write(2); the receiver
//!   reads and discards): what the link and the kernels can carry;
//! - `std`, `uring`, `zero-copy`, `zero-copy-fixed`: `Pages` frames of raw 4 KiB pages, copied
//!   out of a 64 MiB source region into the send buffers and sent through [`FrameSink`] in that
//!   mode; the receiver checks every frame and copies every page into a 64 MiB region, as a
//!   migration does. These measure Ferry's data path without compression.
//!
//! Both sides report bytes, seconds and the CPU time of their stream threads.

use std::io::{BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::protocol::{
    self, Abort, AbortCode, Command, FrameReader, FrameWriter, Framer, Ready, StreamHello,
};
use super::source::DataSink;
use super::MigrateError;
use crate::transport::tcp as transport;
use crate::transport::uring::{thread_cpu_time, FrameSink, SendMode, SendStats};

const REGION: usize = 64 << 20;
const PAGE: usize = 4096;
/// Raw page records per frame (a frame stays under 256 KiB).
const PAGES_PER_FRAME: usize = 63;

/// What to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum BlastMode {
    /// Raw TCP: write(2) of a buffer, the receiver discards.
    #[default]
    Tcp,
    /// Page frames sent with write(2).
    Std,
    /// Page frames sent with io_uring SEND.
    Uring,
    /// Page frames sent with SEND_ZC.
    ZeroCopy,
    /// Page frames sent with SEND_ZC from registered buffers.
    ZeroCopyFixed,
}

impl std::str::FromStr for BlastMode {
    type Err = super::OptionError;
    fn from_str(s: &str) -> Result<Self, super::OptionError> {
        match s {
            "tcp" => Ok(BlastMode::Tcp),
            other => Ok(other.parse::<SendMode>().map(|m| match m {
                SendMode::Std => BlastMode::Std,
                SendMode::Uring => BlastMode::Uring,
                SendMode::ZeroCopy => BlastMode::ZeroCopy,
                SendMode::ZeroCopyFixed => BlastMode::ZeroCopyFixed,
            })?),
        }
    }
}

impl BlastMode {
    fn send_mode(self) -> Option<SendMode> {
        match self {
            BlastMode::Tcp => None,
            BlastMode::Std => Some(SendMode::Std),
            BlastMode::Uring => Some(SendMode::Uring),
            BlastMode::ZeroCopy => Some(SendMode::ZeroCopy),
            BlastMode::ZeroCopyFixed => Some(SendMode::ZeroCopyFixed),
        }
    }
}

/// A probe's parameters (sent to the peer as the `Blast` message).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BlastRequest {
    pub streams: u32,
    /// Seconds to send (used when `bytes` is 0).
    pub secs: f64,
    /// Bytes to send over all streams (0: send for `secs`).
    pub bytes: u64,
    pub mode: BlastMode,
}

impl Default for BlastRequest {
    fn default() -> Self {
        BlastRequest {
            streams: 1,
            secs: 3.0,
            bytes: 0,
            mode: BlastMode::Tcp,
        }
    }
}

impl BlastRequest {
    pub fn validate(&self) -> Result<(), super::OptionError> {
        if self.streams == 0 || self.streams > 64 {
            return Err(super::OptionError::ProbeStreams(self.streams));
        }
        if self.bytes == 0 && !(self.secs > 0.0 && self.secs <= 600.0) {
            return Err(super::OptionError::ProbeSecs(self.secs));
        }
        Ok(())
    }
}

/// What the destination measured.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BlastDone {
    pub bytes: u64,
    pub secs: f64,
    pub cpu_s: f64,
}

/// The probe's result.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BlastResult {
    pub mode: BlastMode,
    pub streams: u32,
    pub local: String,
    pub remote: String,
    /// Bytes received by the destination.
    pub bytes: u64,
    pub secs: f64,
    pub gbytes_per_s: f64,
    pub gbits_per_s: f64,
    pub send_cpu_s: f64,
    pub recv_cpu_s: f64,
    pub send_cpu_s_per_gib: f64,
    pub recv_cpu_s_per_gib: f64,
    pub transport: SendStats,
}

fn region(seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; REGION];
    let mut s = seed | 1;
    for w in v.chunks_exact_mut(8) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        w.copy_from_slice(&s.to_le_bytes());
    }
    v
}

struct Sent {
    cpu: Duration,
    stats: SendStats,
}

fn send_stream(
    sock: TcpStream,
    framer: Framer,
    req: &BlastRequest,
    per_stream: u64,
    deadline: Instant,
    src: &[u8],
) -> Result<Sent, MigrateError> {
    let cpu0 = thread_cpu_time();
    let done = |sent: u64| {
        if per_stream > 0 {
            sent >= per_stream
        } else {
            Instant::now() >= deadline
        }
    };
    let mut stats = SendStats::default();
    match req.mode.send_mode() {
        None => {
            let mut s = sock;
            let chunk = &src[..1 << 20];
            let mut sent = 0u64;
            while !done(sent) {
                s.write_all(chunk)
                    .map_err(|e| MigrateError::Other(format!("blast send: {e}")))?;
                sent += chunk.len() as u64;
            }
            stats.std_bytes = sent;
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
        Some(mode) => {
            let cut = sock.try_clone().ok();
            // The StreamHello's framer numbers the pages and the end like a migration's.
            let mut sink = DataSink::new(
                FrameSink::new(sock, mode, 8, 512 << 10, false),
                framer,
                None,
            );
            let mut sent = 0u64;
            let mut page = 0usize;
            while !done(sent) {
                let buf = sink.buffer()?;
                let mut pos = protocol::HEADER_LEN;
                for _ in 0..PAGES_PER_FRAME {
                    let off = (page % (REGION / PAGE)) * PAGE;
                    protocol::write_record_header(
                        &mut buf[pos..pos + protocol::RECORD_LEN],
                        off as u64,
                        protocol::Encoding::Raw,
                        PAGE,
                    );
                    pos += protocol::RECORD_LEN;
                    buf[pos..pos + PAGE].copy_from_slice(&src[off..off + PAGE]);
                    pos += PAGE;
                    page += 1;
                }
                sink.send_buffer(Command::Pages, PAGES_PER_FRAME as u32, pos, |_| {})?;
                sent += pos as u64;
            }
            sink.send_msg(Command::StreamEnd, &serde_json::json!({}))?;
            sink.flush(Duration::from_secs(10))?;
            stats = sink.stats();
            drop(sink);
            if let Some(c) = cut {
                let _ = c.shutdown(std::net::Shutdown::Write);
            }
        }
    }
    Ok(Sent {
        cpu: thread_cpu_time() - cpu0,
        stats,
    })
}

/// Run a probe from this host's migration address to the peer's.
pub fn run(
    peer: SocketAddr,
    local_migration: IpAddr,
    me: &super::session::Identity,
    req: &BlastRequest,
) -> Result<BlastResult, MigrateError> {
    req.validate()?;
    let super::session::Session {
        w: mut cw,
        r: mut cr,
        ..
    } = super::session::connect(peer, me, Duration::from_secs(30 + req.secs as u64))?;
    cw.send_msg(Command::Blast, req)?;
    let ready: Ready = match cr.read_frame()?.msg(Command::Ready) {
        Err(e @ protocol::ProtocolError::Aborted { .. }) => {
            return Err(MigrateError::from_abort(e, None))
        }
        r => r?,
    };
    let data: SocketAddr = ready
        .data_addr
        .parse()
        .map_err(|_| MigrateError::Other(format!("bad data address {}", ready.data_addr)))?;
    let src = Arc::new(region(0x5eed));
    let per_stream = req.bytes / u64::from(req.streams);
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(req.secs.max(0.0));
    let mut joins = Vec::new();
    for i in 0..req.streams {
        let s = transport::connect_from(Some(local_migration), data, Duration::from_secs(5), true)
            .map_err(|source| MigrateError::Connect {
                what: "the peer's migration address",
                addr: data.to_string(),
                source,
            })?;
        let mut w = FrameWriter::new(s.try_clone().map_err(protocol::ProtocolError::from)?);
        w.send_msg(
            Command::StreamHello,
            &StreamHello {
                migration_id: "blast".into(),
                index: i,
                token: ready.token.clone(),
            },
        )?;
        let framer = w.into_framer();
        let (r, src) = (req.clone(), src.clone());
        joins.push(
            std::thread::Builder::new()
                .name(format!("blast-tx{i}"))
                .spawn(move || send_stream(s, framer, &r, per_stream, deadline, &src))
                .map_err(|e| MigrateError::Other(e.to_string()))?,
        );
    }
    let mut cpu = Duration::ZERO;
    let mut stats = SendStats::default();
    for j in joins {
        let sent = j
            .join()
            .map_err(|_| MigrateError::Other("a blast thread panicked".into()))??;
        cpu += sent.cpu;
        stats.merge(&sent.stats);
    }
    let done: BlastDone = cr.read_frame()?.msg(Command::BlastDone)?;
    let secs = done.secs.max(1e-9);
    let gib = done.bytes as f64 / (1u64 << 30) as f64;
    Ok(BlastResult {
        mode: req.mode,
        streams: req.streams,
        local: local_migration.to_string(),
        remote: data.ip().to_string(),
        bytes: done.bytes,
        secs,
        gbytes_per_s: done.bytes as f64 / secs / 1e9,
        gbits_per_s: done.bytes as f64 * 8.0 / secs / 1e9,
        send_cpu_s: cpu.as_secs_f64(),
        recv_cpu_s: done.cpu_s,
        send_cpu_s_per_gib: cpu.as_secs_f64() / gib.max(1e-9),
        recv_cpu_s_per_gib: done.cpu_s / gib.max(1e-9),
        transport: stats,
    })
}

fn recv_stream(sock: TcpStream, mode: BlastMode) -> Result<(u64, Duration), MigrateError> {
    let cpu0 = thread_cpu_time();
    let mut bytes = 0u64;
    if mode == BlastMode::Tcp {
        let mut s = sock;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = s
                .read(&mut buf)
                .map_err(|e| MigrateError::Other(format!("blast receive: {e}")))?;
            if n == 0 {
                break;
            }
            bytes += n as u64;
        }
    } else {
        let mut dst = vec![0u8; REGION];
        let mut r = FrameReader::with_seq(BufReader::with_capacity(1 << 20, sock), 1);
        let mut payload = Vec::new();
        loop {
            let (cmd, count) = r.next_into(&mut payload)?;
            match cmd {
                Command::Pages => {
                    for rec in protocol::parse_records(&payload, count)? {
                        let off = (rec.gpa as usize) % REGION;
                        if rec.payload.len() == PAGE && off + PAGE <= REGION {
                            dst[off..off + PAGE].copy_from_slice(rec.payload);
                        }
                    }
                }
                Command::StreamEnd => break,
                other => {
                    return Err(protocol::ProtocolError::Unexpected {
                        expected: Command::Pages,
                        got: other,
                    }
                    .into())
                }
            }
        }
        bytes = r.bytes;
    }
    Ok((bytes, thread_cpu_time() - cpu0))
}

/// The destination side of a probe (called by [`super::dest`] after the handshake).
pub fn serve(
    cw: &mut FrameWriter<TcpStream>,
    req: BlastRequest,
    local: Result<IpAddr, super::dest::HostError>,
) -> Result<(), MigrateError> {
    let refuse = |cw: &mut FrameWriter<TcpStream>, reason: String| {
        let _ = cw.send_msg(
            Command::Abort,
            &Abort::new(AbortCode::Refused, reason.clone()),
        );
        MigrateError::refused(reason)
    };
    if let Err(e) = req.validate() {
        return Err(refuse(cw, e.to_string()));
    }
    let local = match local {
        Ok(a) => a,
        Err(e) => return Err(refuse(cw, e.to_string())),
    };
    let listener: TcpListener = transport::listen(local).map_err(|e| refuse(cw, e.to_string()))?;
    let token = match crate::util::random_u64() {
        Ok(t) => format!("{t:016x}"),
        Err(e) => return Err(refuse(cw, e.to_string())),
    };
    cw.send_msg(
        Command::Ready,
        &Ready {
            data_addr: listener
                .local_addr()
                .map_err(protocol::ProtocolError::from)?
                .to_string(),
            token: token.clone(),
            net_forward: false,
        },
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    // As a migration's data port: strays and wrong tokens are closed and ignored (dest/accept.rs).
    let socks =
        super::dest::accept_streams(&listener, None, "blast", &token, req.streams, deadline)?;
    for s in &socks {
        let _ = s.set_read_timeout(Some(Duration::from_secs(30 + req.secs as u64)));
    }
    let t0 = Instant::now();
    let joins: Vec<_> = socks
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let mode = req.mode;
            std::thread::Builder::new()
                .name(format!("blast-rx{i}"))
                .spawn(move || recv_stream(s, mode))
        })
        .collect();
    let mut bytes = 0;
    let mut cpu = Duration::ZERO;
    for j in joins {
        let j = j.map_err(|e| MigrateError::Other(e.to_string()))?;
        let (b, c) = j
            .join()
            .map_err(|_| MigrateError::Other("a blast receiver panicked".into()))??;
        bytes += b;
        cpu += c;
    }
    cw.send_msg(
        Command::BlastDone,
        &BlastDone {
            bytes,
            secs: t0.elapsed().as_secs_f64(),
            cpu_s: cpu.as_secs_f64(),
        },
    )?;
    Ok(())
}
