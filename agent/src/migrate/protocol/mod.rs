//! The migration wire protocol: framing, commands, page records, and the control messages.
//!
//! ## Connections
//!
//! One **control** connection (source → destination's management address, port 7720 by default)
//! and N **data** connections (source's migration address → destination's migration address, a
//! port the destination opens per migration). Every byte on either travels in frames.
//!
//! ## Sequence
//!
//! ```text
//! source                                   destination
//!   │── control: Hello {versions, nonce} ───▶│
//!   │◀── HelloAck {version, nonce, proof} ───│  (highest version both speak; session.rs)
//!   │── Auth {proof} ───────────────────────▶│  (mutual HMAC-SHA256 with the cluster key)
//!   │── Setup {id, spec, regions, streams} ─▶│  creates an empty VM, listens on its migration addr
//!   │◀───────────── Ready {data addr, token} ─│  (or Abort {reason}: no room, name taken, ...)
//!   │══ data i: StreamHello {id, i, token} ══▶│  × N
//!   │══ data i: Pages ... RoundEnd {k} ══════▶│  rounds 0..k, each page on stream (gpa>>21) % N
//!   │   (source pauses the guest)              │
//!   │══ data i: Pages ... StreamEnd {k} ═════▶│  last dirty pages
//!   │── State {VmState} ────────────────────▶│
//!   │── Complete {pages per stream, digest} ─▶│  waits for every StreamEnd, applies the state,
//!   │                                          │  checks counts (and the digest with --verify)
//!   │◀──────────────────────────── Prepared ──│  (or Abort {reason})
//!   │── Commit ─────────────────────────────▶│  ── the commit point ──
//!   │◀──────────────────── Resumed {times} ───│  destination guest runs
//!   │◀────────────────── Observed {pause} ────│  guest-observed pause (workload guests)
//!   │══ data 0: NetFrames ... ForwardEnd ═════▶│  frames the source's taps got after the
//!   │   (≤ 2 s; only if Ready.net_forward)     │  capture, into the guest's RX queues there
//!   │ destroys its copy                        │
//! ```
//!
//! **Forwarding** (`Ready.net_forward`, which a destination whose guest has NICs sets; older
//! peers neither send nor expect it, so the version stays 1): after `Resumed`, data stream 0
//! carries on past its `StreamEnd` with `NetFrames` frames (sealed like page frames when the
//! migration is encrypted) and ends with `ForwardEnd`. See `forward.rs`.
//!
//! Either side may send **Abort {code, reason}** (a typed [`AbortCode`], see docs/migration.md)
//! on the control connection at any time before the commit; the source then resumes its guest
//! and the destination destroys its empty copy.
//!
//! ## Destination (receiver) states
//!
//! `Handshake → SetUp → Receiving (rounds) → Final (StreamEnd on every stream) → Prepared →
//! Committed → Running`; any error or Abort before `Committed` leads to `Aborted`, which destroys
//! the incoming VM (the state machine is `dest/receiver.rs`; an `Abort` from the source is not
//! answered with one).
//!
//! ## Framing
//!
//! Every frame is a fixed 32-byte little-endian [`FrameHeader`] followed by `payload_len` bytes.
//! The header carries its own CRC-32C and the payload's, so a damaged frame is detected before
//! anything is applied. [`Command`]'s zero value is `Invalid`, so a zeroed header means nothing.
//! Control payloads are JSON (they are small and rare); `State` carries the binary
//! [`crate::vm::state::VmState`] encoding; `Pages` carries `count` page records, each a fixed
//! 16-byte [`PageRecordHeader`] and its payload (see [`super::codec`]).
//!
//! Versions: a build speaks [`MIN_VERSION`]`..=`[`VERSION`], the current version and the previous
//! one (version 1 is the first released; version 2 adds the [`Encoding::Zstd`] page encoding, so
//! today the range is 1..=2). A source sends `Zstd` records only on a session that negotiated
//! version 2 or later; a destination of either version decodes everything else alike. The `Hello` offers the range and is stamped with
//! `MIN_VERSION`, so any peer that shares a version can read it; the `HelloAck` picks the highest
//! version both speak, and every frame from then on carries it, on the control connection and
//! on the data connections alike ([`FrameWriter::set_version`]).
//!
//! Sequence numbers count a connection's frames from 0 whatever their kind; the receiver
//! refuses a gap or a repeat ([`ProtocolError::Sequence`]). One [`Framer`] per connection
//! writes the headers, numbers the frames and stamps the version; it is handed from writer to
//! writer when the connection changes hands (a data connection's `StreamHello`, its pages and
//! round ends, then forwarding on stream 0), so no writer keeps a count of its own.
//! A peer with no common version gets an `Abort` that names both ranges (lab test
//! `peers_negotiate_a_common_version_or_are_told_why`). Frames whose stamp is outside this
//! build's range are refused with [`ProtocolError::Version`].

use std::io::{Read, Write};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::vm::memory::PAGE_SIZE;

/// "FRRY" little-endian.
pub const MAGIC: u32 = u32::from_le_bytes(*b"FRRY");
/// Current protocol version.
pub const VERSION: u16 = 2;
/// Oldest version this build still speaks.
pub const MIN_VERSION: u16 = 1;
/// Largest payload a frame may carry.
pub const MAX_PAYLOAD: u32 = 4 << 20;
/// Target payload size of a `Pages` frame before it is sent.
pub const PAGES_FRAME_TARGET: usize = 256 << 10;

/// Errors of the wire protocol. None of them panics; all say what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "bad frame magic {0:#010x}: the peer is not a Ferry agent or the stream is out of step"
    )]
    Magic(u32),
    #[error("frame header checksum mismatch: the stream is corrupt")]
    HeaderCrc,
    #[error("frame payload checksum mismatch on a {0:?} frame: the stream is corrupt")]
    PayloadCrc(Command),
    #[error("unsupported protocol version {found} (this agent speaks {MIN_VERSION}..={VERSION}); upgrade the older agent")]
    Version { found: u16 },
    #[error("unknown or invalid command {0}")]
    Command(u16),
    #[error("frame payload of {0} bytes exceeds the limit of {MAX_PAYLOAD}")]
    TooLarge(u32),
    #[error("malformed {what}: {why}")]
    Malformed { what: &'static str, why: String },
    #[error("expected a {expected:?} frame, got {got:?}")]
    Unexpected { expected: Command, got: Command },
    /// The peer sent `Abort`: its typed code and its reason (escaped and bounded).
    #[error("the peer aborted: {reason}")]
    Aborted {
        code: AbortCode,
        reason: String,
        /// With [`AbortCode::DigestMismatch`]: the destination's digest.
        digest: Option<String>,
    },
    #[error("frames out of order: expected sequence {expected}, got {got}")]
    Sequence { expected: u32, got: u32 },
    /// A read timeout ran out (what the kernel reports as `EAGAIN`, "os error 11").
    #[error("timed out after {secs} s waiting for {what}: the peer went silent (stalled, or the network to it failed)")]
    TimedOut { secs: u64, what: &'static str },
    #[error(
        "timed out waiting for {0}: the peer went silent (stalled, or the network to it failed)"
    )]
    TimedOutUnknown(&'static str),
}

/// What a frame is.
#[repr(u16)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Invalid = 0,
    Hello = 1,
    HelloAck = 2,
    Setup = 3,
    Ready = 4,
    StreamHello = 5,
    Pages = 6,
    RoundEnd = 7,
    StreamEnd = 8,
    State = 9,
    Complete = 10,
    Prepared = 11,
    Commit = 12,
    Resumed = 13,
    Observed = 14,
    Abort = 15,
    /// Destination → source on a data connection: every page up to this `RoundEnd` or
    /// `StreamEnd` is applied.
    RoundAck = 16,
    /// Source → destination instead of `Setup`: a throughput probe (see `blast.rs`).
    Blast = 17,
    /// Destination → source: what the probe's receivers measured.
    BlastDone = 18,
    /// Source → peer instead of `Setup`: tell me about yourself (checks).
    Query = 19,
    /// Peer → source: its host facts.
    Facts = 20,
    /// Client → server: proof of the cluster key (see `session.rs`).
    Auth = 21,
    /// Source → destination on data stream 0 after `Resumed`: guest frames the source's taps
    /// received after the state capture (binary, see `forward.rs`; `count` frames).
    NetFrames = 22,
    /// Source → destination on data stream 0: forwarding is over ([`ForwardEnd`]).
    ForwardEnd = 23,
}

impl Command {
    pub fn from_u16(v: u16) -> Option<Command> {
        use Command::*;
        Some(match v {
            1 => Hello,
            2 => HelloAck,
            3 => Setup,
            4 => Ready,
            5 => StreamHello,
            6 => Pages,
            7 => RoundEnd,
            8 => StreamEnd,
            9 => State,
            10 => Complete,
            11 => Prepared,
            12 => Commit,
            13 => Resumed,
            14 => Observed,
            15 => Abort,
            16 => RoundAck,
            17 => Blast,
            18 => BlastDone,
            19 => Query,
            20 => Facts,
            21 => Auth,
            22 => NetFrames,
            23 => ForwardEnd,
            _ => return None,
        })
    }
}

/// The fixed frame header.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct FrameHeader {
    pub magic: U32,
    pub version: U16,
    pub command: U16,
    pub flags: U32,
    /// Records in a `Pages` frame; 0 otherwise.
    pub count: U32,
    pub payload_len: U32,
    pub payload_crc: U32,
    /// Frame number on this connection, from 0.
    pub seq: U32,
    /// CRC-32C of the 28 bytes before it.
    pub header_crc: U32,
}

pub const HEADER_LEN: usize = std::mem::size_of::<FrameHeader>();
const _: () = assert!(HEADER_LEN == 32);

impl FrameHeader {
    pub fn new(command: Command, count: u32, payload: &[u8], seq: u32) -> FrameHeader {
        Self::with_version(command, count, payload, seq, VERSION)
    }

    /// A header stamped with protocol version `version` (see [`FrameWriter::set_version`]).
    pub fn with_version(
        command: Command,
        count: u32,
        payload: &[u8],
        seq: u32,
        version: u16,
    ) -> FrameHeader {
        let mut h = FrameHeader {
            magic: MAGIC.into(),
            version: version.into(),
            command: (command as u16).into(),
            flags: 0.into(),
            count: count.into(),
            payload_len: (payload.len() as u32).into(),
            payload_crc: crc32c::crc32c(payload).into(),
            seq: seq.into(),
            header_crc: 0.into(),
        };
        h.header_crc = crc32c::crc32c(&h.as_bytes()[..HEADER_LEN - 4]).into();
        h
    }

    /// Check a received header; returns its command.
    pub fn parse(bytes: &[u8]) -> Result<(FrameHeader, Command), ProtocolError> {
        let (h, cmd) = Self::parse_any_version(bytes)?;
        let v = h.version.get();
        if !(MIN_VERSION..=VERSION).contains(&v) {
            return Err(ProtocolError::Version { found: v });
        }
        Ok((h, cmd))
    }

    /// [`FrameHeader::parse`] without the version check: for the `Hello` of a peer whose
    /// versions may not overlap ours (it is answered with an `Abort` naming both ranges).
    pub fn parse_any_version(bytes: &[u8]) -> Result<(FrameHeader, Command), ProtocolError> {
        let h = FrameHeader::read_from_bytes(bytes).map_err(|_| ProtocolError::Malformed {
            what: "frame header",
            why: format!("{} bytes, expected {HEADER_LEN}", bytes.len()),
        })?;
        if h.magic.get() != MAGIC {
            return Err(ProtocolError::Magic(h.magic.get()));
        }
        if crc32c::crc32c(&bytes[..HEADER_LEN - 4]) != h.header_crc.get() {
            return Err(ProtocolError::HeaderCrc);
        }
        let cmd =
            Command::from_u16(h.command.get()).ok_or(ProtocolError::Command(h.command.get()))?;
        if h.payload_len.get() > MAX_PAYLOAD {
            return Err(ProtocolError::TooLarge(h.payload_len.get()));
        }
        Ok((h, cmd))
    }
}

/// How a page travels.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// All zero; no payload.
    Zero = 1,
    /// The 4 KiB as they are.
    Raw = 2,
    /// LZ4 block of the page.
    Lz4 = 3,
    /// LZ4 block of (page XOR the version the destination holds).
    Delta = 4,
    /// One zstd frame of the page (a low level; its header must declare exactly one page of
    /// content). Protocol version 2 and later.
    Zstd = 5,
}

impl Encoding {
    pub const ALL: [Encoding; 5] = [
        Encoding::Zero,
        Encoding::Raw,
        Encoding::Lz4,
        Encoding::Delta,
        Encoding::Zstd,
    ];
    /// The oldest protocol version that carries this encoding.
    pub fn since_version(self) -> u16 {
        match self {
            Encoding::Zstd => 2,
            _ => 1,
        }
    }
    pub fn from_u8(v: u8) -> Option<Encoding> {
        match v {
            1 => Some(Encoding::Zero),
            2 => Some(Encoding::Raw),
            3 => Some(Encoding::Lz4),
            4 => Some(Encoding::Delta),
            5 => Some(Encoding::Zstd),
            _ => None,
        }
    }
    pub fn index(self) -> usize {
        self as usize - 1
    }
}

/// Header of one page inside a `Pages` frame.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct PageRecordHeader {
    /// Guest-physical address (page-aligned).
    pub gpa: U64,
    pub encoding: u8,
    pub reserved: [u8; 3],
    /// Payload bytes following this header.
    pub len: U32,
}

pub const RECORD_LEN: usize = std::mem::size_of::<PageRecordHeader>();
const _: () = assert!(RECORD_LEN == 16);

/// One page record of a received `Pages` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRecord<'a> {
    pub gpa: u64,
    pub encoding: Encoding,
    pub payload: &'a [u8],
}

/// Append a page record to a `Pages` payload.
pub fn push_record(buf: &mut Vec<u8>, gpa: u64, encoding: Encoding, payload: &[u8]) {
    let h = PageRecordHeader {
        gpa: gpa.into(),
        encoding: encoding as u8,
        reserved: [0; 3],
        len: (payload.len() as u32).into(),
    };
    buf.extend_from_slice(h.as_bytes());
    buf.extend_from_slice(payload);
}

/// Write a record header into `dst` (exactly [`RECORD_LEN`] bytes).
pub fn write_record_header(dst: &mut [u8], gpa: u64, encoding: Encoding, len: usize) {
    let h = PageRecordHeader {
        gpa: gpa.into(),
        encoding: encoding as u8,
        reserved: [0; 3],
        len: (len as u32).into(),
    };
    dst.copy_from_slice(h.as_bytes());
}

/// A whole frame as bytes (header + payload) with a sequence number of the caller's: for tests
/// and tools that forge or re-frame frames. Senders number their frames with a [`Framer`].
pub fn encode_frame(cmd: Command, count: u32, payload: &[u8], seq: u32) -> Vec<u8> {
    encode_frame_version(cmd, count, payload, seq, VERSION)
}

/// [`encode_frame`] stamped with the session's negotiated `version`.
pub fn encode_frame_version(
    cmd: Command,
    count: u32,
    payload: &[u8],
    seq: u32,
    version: u16,
) -> Vec<u8> {
    let h = FrameHeader::with_version(cmd, count, payload, seq, version);
    let mut v = Vec::with_capacity(HEADER_LEN + payload.len());
    v.extend_from_slice(h.as_bytes());
    v.extend_from_slice(payload);
    v
}

/// Split a `Pages` payload into exactly `count` records, checking every length and address.
/// Never panics on arbitrary bytes.
pub fn parse_records(payload: &[u8], count: u32) -> Result<Vec<PageRecord<'_>>, ProtocolError> {
    let bad = |why: String| ProtocolError::Malformed {
        what: "page record",
        why,
    };
    let mut out = Vec::with_capacity((count as usize).min(payload.len() / RECORD_LEN + 1));
    let mut rest = payload;
    for i in 0..count {
        let (h, tail) = PageRecordHeader::read_from_prefix(rest)
            .map_err(|_| bad(format!("record {i} header truncated")))?;
        let gpa = h.gpa.get();
        if gpa % PAGE_SIZE != 0 {
            return Err(bad(format!(
                "record {i}: address {gpa:#x} is not page-aligned"
            )));
        }
        let encoding = Encoding::from_u8(h.encoding)
            .ok_or_else(|| bad(format!("record {i}: unknown encoding {}", h.encoding)))?;
        let len = h.len.get() as usize;
        let ok_len = match encoding {
            Encoding::Zero => len == 0,
            Encoding::Raw => len == PAGE_SIZE as usize,
            Encoding::Lz4 | Encoding::Delta | Encoding::Zstd => {
                len > 0 && len <= super::codec::MAX_ENCODED
            }
        };
        if !ok_len {
            return Err(bad(format!(
                "record {i}: {encoding:?} page with a {len}-byte payload"
            )));
        }
        if tail.len() < len {
            return Err(bad(format!("record {i}: payload truncated")));
        }
        out.push(PageRecord {
            gpa,
            encoding,
            payload: &tail[..len],
        });
        rest = &tail[len..];
    }
    if !rest.is_empty() {
        return Err(bad(format!("{} bytes after the last record", rest.len())));
    }
    Ok(out)
}

/// Writes frames to one connection; its [`Framer`] numbers and stamps them.
pub struct FrameWriter<W: Write> {
    inner: W,
    framer: Framer,
}

impl<W: Write> FrameWriter<W> {
    /// A connection's first writer: sequence 0, stamped with this build's [`VERSION`] until
    /// [`FrameWriter::set_version`].
    pub fn new(inner: W) -> Self {
        Self::with_seq(inner, 0)
    }

    /// A writer whose next frame carries sequence number `seq` (frames before it were written
    /// by another writer, e.g. the async handshake).
    pub fn with_seq(inner: W, seq: u32) -> Self {
        Self::with_framer(inner, Framer::with_seq(seq, VERSION))
    }

    /// A writer that carries on the numbering and version of a connection's `framer` (handed
    /// on by the writer before it).
    pub fn with_framer(inner: W, framer: Framer) -> Self {
        FrameWriter { inner, framer }
    }

    /// The connection's framer, to hand on to the next writer of this connection.
    pub fn into_framer(self) -> Framer {
        self.framer
    }

    /// The sequence number the next frame will carry.
    pub fn next_seq(&self) -> u32 {
        self.framer.next_seq()
    }

    /// Stamp the following frames with `version`: the oldest this build speaks for a `Hello`
    /// (so that any peer sharing a version can read it), the negotiated one afterwards.
    pub fn set_version(&mut self, version: u16) {
        self.framer.set_version(version);
    }

    /// The version frames are stamped with now.
    pub fn version(&self) -> u16 {
        self.framer.version()
    }

    /// Bytes written (headers and payloads).
    pub fn bytes(&self) -> u64 {
        self.framer.bytes()
    }

    pub fn send(&mut self, cmd: Command, count: u32, payload: &[u8]) -> Result<(), ProtocolError> {
        let h = self.framer.header(cmd, count, payload);
        self.inner.write_all(h.as_bytes())?;
        self.inner.write_all(payload)?;
        Ok(())
    }

    /// Send a control message as JSON.
    pub fn send_msg<T: Serialize>(&mut self, cmd: Command, msg: &T) -> Result<(), ProtocolError> {
        let body = serde_json::to_vec(msg).map_err(|e| ProtocolError::Malformed {
            what: "outgoing message",
            why: e.to_string(),
        })?;
        self.send(cmd, 0, &body)?;
        self.flush()
    }

    pub fn flush(&mut self) -> Result<(), ProtocolError> {
        self.inner.flush()?;
        Ok(())
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }
}

/// A received frame.
#[derive(Debug)]
pub struct Frame {
    pub command: Command,
    pub count: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// Check the command; an `Abort` frame becomes [`ProtocolError::Aborted`] with its reason.
    pub fn expect(&self, expected: Command) -> Result<(), ProtocolError> {
        if self.command == expected {
            return Ok(());
        }
        if self.command == Command::Abort {
            return Err(Abort::decode(&self.payload).into_error());
        }
        Err(ProtocolError::Unexpected {
            expected,
            got: self.command,
        })
    }

    /// Decode a JSON control payload of the expected command.
    pub fn msg<T: DeserializeOwned>(&self, expected: Command) -> Result<T, ProtocolError> {
        self.expect(expected)?;
        json(&self.payload, "control message")
    }
}

/// Decode a JSON payload; `what` names it in the error.
pub fn json<T: DeserializeOwned>(payload: &[u8], what: &'static str) -> Result<T, ProtocolError> {
    // serde's message may quote the peer's bytes: escaped and bounded.
    serde_json::from_slice(payload).map_err(|e| ProtocolError::Malformed {
        what,
        why: super::untrusted::peer_text(&e.to_string(), 200),
    })
}

/// An end of stream in the middle of a conversation says so in words.
fn hung_up(e: std::io::Error) -> ProtocolError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        ProtocolError::Io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the peer closed the connection",
        ))
    } else {
        ProtocolError::Io(e)
    }
}

/// Reads and checks frames from one connection.
pub struct FrameReader<R: Read> {
    inner: R,
    seq: u32,
    /// Accept a `Hello` of any version (the server's first frame; see `session::accept`).
    hello_any_version: bool,
    /// The connection's read timeout and what the next frame is, for the error when it runs out.
    timeout: (Option<Duration>, &'static str),
    pub bytes: u64,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        Self::with_seq(inner, 0)
    }

    /// A reader whose next frame must carry sequence number `seq` (frames before it were read
    /// by another reader).
    pub fn with_seq(inner: R, seq: u32) -> Self {
        FrameReader {
            inner,
            seq,
            hello_any_version: false,
            timeout: (None, "the peer's next message"),
            bytes: 0,
        }
    }

    /// Say what the read timeout set on the connection underneath is and what the next frame
    /// is, so that a timeout reads "timed out after 30 s waiting for Prepared" rather than
    /// "Resource temporarily unavailable (os error 11)". It does not set the timeout.
    pub fn set_timeout(&mut self, timeout: Option<Duration>, what: &'static str) {
        self.timeout = (timeout, what);
    }

    fn io_error(&self, e: std::io::Error) -> ProtocolError {
        match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => match self.timeout {
                (Some(d), what) => ProtocolError::TimedOut {
                    secs: d.as_secs_f64().round() as u64,
                    what,
                },
                (None, what) => ProtocolError::TimedOutUnknown(what),
            },
            _ => hung_up(e),
        }
    }

    /// Let the next frames through whatever their version if they are a `Hello`.
    pub fn accept_any_hello_version(&mut self, on: bool) {
        self.hello_any_version = on;
    }

    /// The sequence number of the frame read last.
    pub fn last_seq(&self) -> u32 {
        self.seq.wrapping_sub(1)
    }

    /// Read the next frame into `payload` (reused between calls).
    pub fn next_into(&mut self, payload: &mut Vec<u8>) -> Result<(Command, u32), ProtocolError> {
        let mut hb = [0u8; HEADER_LEN];
        self.inner
            .read_exact(&mut hb)
            .map_err(|e| self.io_error(e))?;
        let (h, cmd) = match FrameHeader::parse_any_version(&hb)? {
            (h, Command::Hello) if self.hello_any_version => (h, Command::Hello),
            _ => FrameHeader::parse(&hb)?,
        };
        if h.seq.get() != self.seq {
            return Err(ProtocolError::Sequence {
                expected: self.seq,
                got: h.seq.get(),
            });
        }
        let len = h.payload_len.get() as usize;
        payload.clear();
        payload.resize(len, 0);
        self.inner
            .read_exact(payload)
            .map_err(|e| self.io_error(e))?;
        if crc32c::crc32c(payload) != h.payload_crc.get() {
            return Err(ProtocolError::PayloadCrc(cmd));
        }
        self.seq = self.seq.wrapping_add(1);
        self.bytes += (HEADER_LEN + len) as u64;
        Ok((cmd, h.count.get()))
    }

    pub fn read_frame(&mut self) -> Result<Frame, ProtocolError> {
        let mut payload = Vec::new();
        let (command, count) = self.next_into(&mut payload)?;
        Ok(Frame {
            command,
            count,
            payload,
        })
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }
}

mod framer;
mod messages;
pub use framer::Framer;
pub use messages::*;

#[cfg(test)]
mod tests;
