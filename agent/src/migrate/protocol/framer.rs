//! [`Framer`]: the one place a connection's frames get their header, their sequence number and
//! the protocol version they are stamped with.
//!
//! Every sender of frames goes through one: [`super::FrameWriter`] (control frames, over any
//! `Write`) and the source's data sink (`source/sink.rs`: `Pages` frames assembled in place in
//! io_uring send buffers, and the `RoundEnd`/`StreamEnd` messages between them). A connection
//! hands its `Framer` on when another writer takes over (the `StreamHello` written by a
//! `FrameWriter`, then the data sink, then forwarding on data stream 0), so the numbering
//! continues without a gap and every frame carries the version the session negotiated.

use zerocopy::IntoBytes;

use super::{Command, FrameHeader, HEADER_LEN};

/// Numbers and stamps one connection's outgoing frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Framer {
    /// The sequence number the next frame carries.
    seq: u32,
    /// The version frames are stamped with.
    version: u16,
    /// Bytes framed (headers and payloads).
    bytes: u64,
}

impl Framer {
    /// A connection's first frame (sequence 0), stamped with `version`.
    pub fn new(version: u16) -> Framer {
        Framer::with_seq(0, version)
    }

    /// A framer whose next frame carries sequence number `seq` (frames before it were framed
    /// elsewhere, e.g. by the async handshake).
    pub fn with_seq(seq: u32, version: u16) -> Framer {
        Framer {
            seq,
            version,
            bytes: 0,
        }
    }

    /// The sequence number the next frame will carry (a sealed payload's nonce uses it).
    pub fn next_seq(&self) -> u32 {
        self.seq
    }

    /// The version frames are stamped with now.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// Stamp the following frames with `version`: the oldest this build speaks for a `Hello`
    /// (so that any peer sharing a version can read it), the negotiated one afterwards.
    pub fn set_version(&mut self, version: u16) {
        self.version = version;
    }

    /// Bytes framed so far (headers and payloads).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The header of the next frame, which carries `payload`: it takes the next sequence number
    /// and counts the frame. The caller sends the header and the payload (a frame that is not
    /// sent leaves a gap the receiver refuses, so a failed send ends the connection anyway).
    pub fn header(&mut self, cmd: Command, count: u32, payload: &[u8]) -> FrameHeader {
        let h = FrameHeader::with_version(cmd, count, payload, self.seq, self.version);
        self.seq = self.seq.wrapping_add(1);
        self.bytes += (HEADER_LEN + payload.len()) as u64;
        h
    }

    /// Frame in place, without copying the payload: `buf[HEADER_LEN..end]` holds the payload
    /// and its header is written into `buf[..HEADER_LEN]`. Returns the frame's length (`end`).
    ///
    /// # Panics
    /// If `end < HEADER_LEN` or `end > buf.len()` (a bug of the caller, not bad input).
    pub fn frame_in_place(
        &mut self,
        cmd: Command,
        count: u32,
        buf: &mut [u8],
        end: usize,
    ) -> usize {
        let h = self.header(cmd, count, &buf[HEADER_LEN..end]);
        buf[..HEADER_LEN].copy_from_slice(h.as_bytes());
        end
    }

    /// A whole frame as bytes (header and a copy of `payload`): for small control frames.
    pub fn encode(&mut self, cmd: Command, count: u32, payload: &[u8]) -> Vec<u8> {
        let h = self.header(cmd, count, payload);
        let mut v = Vec::with_capacity(HEADER_LEN + payload.len());
        v.extend_from_slice(h.as_bytes());
        v.extend_from_slice(payload);
        v
    }
}
