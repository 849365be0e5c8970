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
//! version both speak, and control frames from then on carry it ([`FrameWriter::set_version`]).
//! A peer with no common version gets an `Abort` that names both ranges (lab test
//! `peers_negotiate_a_common_version_or_are_told_why`). Frames whose stamp is outside this
//! build's range are refused with [`ProtocolError::Version`].

use std::io::{Read, Write};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::vm::memory::{RegionLayout, PAGE_SIZE};
use crate::vm::VmSpec;

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

/// A whole frame as bytes (header + payload).
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

/// Writes frames to one connection, numbering them.
pub struct FrameWriter<W: Write> {
    inner: W,
    seq: u32,
    /// The version frames are stamped with.
    version: u16,
    /// Bytes written (headers and payloads).
    pub bytes: u64,
}

impl<W: Write> FrameWriter<W> {
    /// The sequence number the next frame will carry.
    pub fn next_seq(&self) -> u32 {
        self.seq
    }
}

impl<W: Write> FrameWriter<W> {
    pub fn new(inner: W) -> Self {
        Self::with_seq(inner, 0)
    }

    /// A writer whose next frame carries sequence number `seq` (frames before it were written
    /// by another writer, e.g. the async handshake).
    pub fn with_seq(inner: W, seq: u32) -> Self {
        FrameWriter {
            inner,
            seq,
            version: VERSION,
            bytes: 0,
        }
    }

    /// Stamp the following frames with `version`: the oldest this build speaks for a `Hello`
    /// (so that any peer sharing a version can read it), the negotiated one afterwards.
    pub fn set_version(&mut self, version: u16) {
        self.version = version;
    }

    /// The version frames are stamped with now.
    pub fn version(&self) -> u16 {
        self.version
    }

    pub fn send(&mut self, cmd: Command, count: u32, payload: &[u8]) -> Result<(), ProtocolError> {
        let h = FrameHeader::with_version(cmd, count, payload, self.seq, self.version);
        self.inner.write_all(h.as_bytes())?;
        self.inner.write_all(payload)?;
        self.seq = self.seq.wrapping_add(1);
        self.bytes += (HEADER_LEN + payload.len()) as u64;
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

// ---- control messages ----

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Hello {
    pub min_version: u16,
    pub max_version: u16,
    /// The sending agent's name.
    pub agent: String,
    /// 32 random bytes (hex) for the authentication (see `session.rs`).
    pub nonce: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HelloAck {
    pub version: u16,
    pub agent: String,
    /// The server's nonce (hex).
    pub nonce: String,
    /// The server's proof that it holds the cluster key; None when it has none.
    pub proof: Option<String>,
}

/// Pick the version both sides speak, if any.
pub fn negotiate(a: (u16, u16), b: (u16, u16)) -> Option<u16> {
    let lo = a.0.max(b.0);
    let hi = a.1.min(b.1);
    (lo <= hi).then_some(hi)
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Setup {
    pub migration_id: String,
    pub spec: VmSpec,
    pub regions: Vec<RegionLayout>,
    pub streams: u32,
    /// Page frames on the data streams are sealed (AES-256-GCM, see `transport::seal`).
    #[serde(default)]
    pub encrypt: bool,
    /// The address the source's data streams come from (its migration address): the
    /// destination's data port ignores connections from anywhere else. None from older sources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_addr: Option<std::net::IpAddr>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ready {
    /// Where the data streams connect (the destination's migration address).
    pub data_addr: String,
    /// Proves a data connection belongs to this migration.
    pub token: String,
    /// The destination takes frames forwarded after the switchover on data stream 0
    /// (`NetFrames`, `ForwardEnd`). False from older destinations: nothing is forwarded.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub net_forward: bool,
}

/// The end of forwarding after a switchover.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ForwardEnd {
    /// Frames sent in `NetFrames`.
    pub frames: u64,
    /// Frames for the guest the source could not forward (over the window's frame bound).
    pub dropped: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StreamHello {
    pub migration_id: String,
    pub index: u32,
    pub token: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RoundEnd {
    pub round: u32,
    /// Page records sent on this stream in this round.
    pub pages: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Complete {
    /// Page records sent on each stream over the whole migration.
    pub pages_per_stream: Vec<u64>,
    /// CRC-32C of all guest memory at the source's pause (with --verify).
    pub digest: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Prepared {
    /// Destination time from `Complete` to `Prepared`, in microseconds.
    pub apply_us: u64,
    /// Of which computing the memory digest (with --verify).
    pub verify_us: u64,
    pub verified: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Commit {
    /// The generation of the guest's ownership record that names the source now (None: no
    /// ownership records in this cluster). The destination claims the next one.
    #[serde(default)]
    pub generation: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Resumed {
    /// Destination time from Commit to running vCPUs, in microseconds.
    pub resume_us: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Observed {
    /// The largest gap between two heartbeats of the guest around the switchover, in
    /// microseconds (None when the guest has no heartbeat).
    pub guest_pause_us: Option<u64>,
    /// The MAC announcements the destination made.
    #[serde(default)]
    pub announcements: Vec<crate::announce::Announcement>,
}

/// Why a migration stops, as a number on the wire (the `code` of [`Abort`]).
///
/// The numbers are the protocol: never renumber one, only add. A code this build does not
/// know (from a newer peer) reads as [`AbortCode::Unspecified`]; the reason text still says
/// what happened. See docs/migration.md, "Abort codes".
#[repr(u16)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(from = "u16", into = "u16")]
pub enum AbortCode {
    /// No code: an agent from before the codes (its `Abort` has only a reason), or a code
    /// this build does not know.
    #[default]
    Unspecified = 0,
    /// The user cancelled the migration.
    Cancelled = 1,
    /// The destination will not take this guest: a taken name, no room, migration disabled
    /// or unconfigured there, encryption required, the ownership record names someone else,
    /// an injected fault.
    Refused = 2,
    /// The peers share no protocol version.
    Version = 3,
    /// Authentication with the cluster key failed.
    Auth = 4,
    /// `--verify`: the destination's memory digest differs from the source's (the digest
    /// travels in [`Abort::digest`]).
    DigestMismatch = 5,
    /// A peer or a data stream went silent past its deadline.
    Timeout = 6,
    /// A frame was damaged, out of order, of the wrong kind or malformed.
    Protocol = 7,
    /// A data connection failed (reset, closed, an I/O error).
    Transport = 8,
    /// Anything else that failed on the sender's side (guest memory, state, a local error).
    Internal = 9,
    /// A source-side policy stopped it (did not converge, over its deadline).
    Policy = 10,
}

impl From<u16> for AbortCode {
    fn from(v: u16) -> Self {
        use AbortCode::*;
        match v {
            1 => Cancelled,
            2 => Refused,
            3 => Version,
            4 => Auth,
            5 => DigestMismatch,
            6 => Timeout,
            7 => Protocol,
            8 => Transport,
            9 => Internal,
            10 => Policy,
            _ => Unspecified,
        }
    }
}

impl From<AbortCode> for u16 {
    fn from(c: AbortCode) -> u16 {
        c as u16
    }
}

/// Either side stops the migration (before the commit). JSON: `{"code": 5, "reason": "...",
/// "digest": "..."}`; agents from before the codes send only `reason`, and ignore `code` and
/// `digest` (no version change: see docs/migration.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Abort {
    /// What kind of failure (for programs: metrics, retries, tests).
    #[serde(default)]
    pub code: AbortCode,
    /// What happened, for people.
    pub reason: String,
    /// With [`AbortCode::DigestMismatch`]: the destination's memory digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// What destinations before the codes put before their digest in a mismatch's reason (and
/// what this build still writes there, so that those sources recognise it).
pub const LEGACY_DIGEST_MISMATCH: &str = "digest mismatch: ";

impl Abort {
    pub fn new(code: AbortCode, reason: impl Into<String>) -> Abort {
        Abort {
            code,
            reason: reason.into(),
            digest: None,
        }
    }

    /// Decode a received `Abort` payload; never fails (an unreadable one is `Unspecified`).
    /// The reason and digest are escaped and bounded (they come from the peer).
    pub fn decode(payload: &[u8]) -> Abort {
        let mut a: Abort = serde_json::from_slice(payload)
            .unwrap_or_else(|_| Abort::new(AbortCode::Unspecified, "(unreadable reason)"));
        // A destination from before the codes says a digest mismatch only in words.
        if a.code == AbortCode::Unspecified {
            if let Some(d) = a.reason.strip_prefix(LEGACY_DIGEST_MISMATCH) {
                a.digest = Some(d.to_string());
                a.code = AbortCode::DigestMismatch;
            }
        }
        a.reason = super::untrusted::peer_text(&a.reason, super::untrusted::PEER_REASON_MAX);
        a.digest = a.digest.map(|d| super::untrusted::peer_text(&d, 128));
        a
    }

    /// The error a received `Abort` is.
    pub fn into_error(self) -> ProtocolError {
        ProtocolError::Aborted {
            code: self.code,
            reason: self.reason,
            digest: self.digest,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(cmd: Command, count: u32, payload: &[u8]) -> Vec<u8> {
        let mut w = FrameWriter::new(Vec::new());
        w.send(cmd, count, payload).unwrap();
        w.inner
    }

    #[test]
    fn header_round_trip() {
        let b = frame(Command::Pages, 3, b"abc");
        let (h, c) = FrameHeader::parse(&b[..HEADER_LEN]).unwrap();
        assert_eq!(c, Command::Pages);
        assert_eq!(h.count.get(), 3);
        let mut r = FrameReader::new(&b[..]);
        let f = r.read_frame().unwrap();
        assert_eq!(f.payload, b"abc");
    }

    #[test]
    fn zeroed_header_is_invalid() {
        assert!(FrameHeader::parse(&[0u8; HEADER_LEN]).is_err());
        let mut h = FrameHeader::new(Command::Hello, 0, b"", 0);
        h.command = 0.into();
        h.header_crc = crc32c::crc32c(&h.as_bytes()[..HEADER_LEN - 4]).into();
        assert!(matches!(
            FrameHeader::parse(h.as_bytes()),
            Err(ProtocolError::Command(0))
        ));
    }

    #[test]
    fn damage_is_detected() {
        let mut b = frame(Command::Pages, 0, b"payload");
        b[HEADER_LEN + 2] ^= 1;
        assert!(matches!(
            FrameReader::new(&b[..]).read_frame(),
            Err(ProtocolError::PayloadCrc(Command::Pages))
        ));
        let mut b = frame(Command::Pages, 0, b"payload");
        b[5] ^= 1;
        assert!(FrameReader::new(&b[..]).read_frame().is_err());
        // Out-of-order frames.
        let mut w = FrameWriter::new(Vec::new());
        w.seq = 5;
        w.send(Command::Commit, 0, b"{}").unwrap();
        assert!(matches!(
            FrameReader::new(&w.inner[..]).read_frame(),
            Err(ProtocolError::Sequence {
                expected: 0,
                got: 5
            })
        ));
    }

    #[test]
    fn abort_codes_round_trip_and_old_peers_are_understood() {
        let mut a = Abort::new(AbortCode::Timeout, "slow");
        let j = serde_json::to_vec(&a).unwrap();
        assert_eq!(j, br#"{"code":6,"reason":"slow"}"#);
        assert_eq!(Abort::decode(&j), a);
        // An agent from before the codes: only a reason.
        let old = Abort::decode(br#"{"reason":"no room"}"#);
        assert_eq!(old.code, AbortCode::Unspecified);
        assert_eq!(old.reason, "no room");
        let old = Abort::decode(br#"{"reason":"digest mismatch: 0badc0de"}"#);
        assert_eq!(old.code, AbortCode::DigestMismatch);
        assert_eq!(old.digest.as_deref(), Some("0badc0de"));
        // A code from a newer agent, and an unreadable payload.
        assert_eq!(
            Abort::decode(br#"{"code":999,"reason":"x"}"#).code,
            AbortCode::Unspecified
        );
        assert_eq!(Abort::decode(b"\xff").code, AbortCode::Unspecified);
        // What an old agent reads from this one: the reason is all it needs.
        a.digest = Some("d".into());
        #[derive(Deserialize)]
        struct OldAbort {
            reason: String,
        }
        let o: OldAbort = serde_json::from_slice(&serde_json::to_vec(&a).unwrap()).unwrap();
        assert_eq!(o.reason, "slow");
        for v in 0..=10u16 {
            assert_eq!(u16::from(AbortCode::from(v)), v);
        }
    }

    #[test]
    fn versions() {
        assert_eq!(negotiate((1, 2), (1, 1)), Some(1));
        assert_eq!(negotiate((1, 3), (2, 4)), Some(3));
        assert_eq!(negotiate((1, 1), (2, 2)), None);
        let mut h = FrameHeader::new(Command::Hello, 0, b"", 0);
        h.version = 99.into();
        h.header_crc = crc32c::crc32c(&h.as_bytes()[..HEADER_LEN - 4]).into();
        assert!(matches!(
            FrameHeader::parse(h.as_bytes()),
            Err(ProtocolError::Version { found: 99 })
        ));
    }

    #[test]
    fn records_round_trip_and_reject_lies() {
        let mut p = Vec::new();
        push_record(&mut p, 0x1000, Encoding::Zero, &[]);
        push_record(&mut p, 0x2000, Encoding::Raw, &[7u8; 4096]);
        push_record(&mut p, 0x3000, Encoding::Lz4, &[1, 2, 3]);
        let r = parse_records(&p, 3).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[1].payload.len(), 4096);
        assert_eq!(r[2].encoding, Encoding::Lz4);
        assert!(parse_records(&p, 4).is_err());
        assert!(parse_records(&p, 2).is_err());
        let mut q = Vec::new();
        push_record(&mut q, 0x1001, Encoding::Zero, &[]);
        assert!(parse_records(&q, 1).is_err());
        let mut q = Vec::new();
        push_record(&mut q, 0x1000, Encoding::Raw, &[0; 10]);
        assert!(parse_records(&q, 1).is_err());
        let mut q = Vec::new();
        push_record(&mut q, 0x1000, Encoding::Zero, &[1]);
        assert!(parse_records(&q, 1).is_err());
    }

    /// Property: arbitrary bytes, and every single-byte corruption or truncation of valid frames,
    /// decode to errors or values, never a panic (a deterministic xorshift drives the inputs).
    #[test]
    fn decoder_never_panics_on_arbitrary_bytes() {
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for _ in 0..20_000 {
            let len = (next() % 200) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let _ = FrameHeader::parse(&bytes);
            let mut r = FrameReader::new(&bytes[..]);
            let _ = r.read_frame();
            let _ = parse_records(&bytes, (next() % 8) as u32);
        }
        let mut p = Vec::new();
        push_record(&mut p, 0x2000, Encoding::Raw, &[7u8; 4096]);
        push_record(&mut p, 0x3000, Encoding::Delta, &[1, 2, 3, 4]);
        let valid = frame(Command::Pages, 2, &p);
        for i in 0..valid.len() {
            let mut b = valid.clone();
            b[i] ^= (next() as u8) | 1;
            if let Ok(f) = FrameReader::new(&b[..]).read_frame() {
                let _ = parse_records(&f.payload, f.count);
            }
            let _ = FrameReader::new(&valid[..i]).read_frame();
        }
        for _ in 0..2_000 {
            let mut b = p.clone();
            let i = (next() as usize) % b.len();
            b[i] = next() as u8;
            let _ = parse_records(&b, 2);
        }
    }
}
