//! [`DataSink`]: a data connection's framed sink. The io_uring [`FrameSink`] sends its buffers
//! (zero-copy where it can); the connection's [`Framer`] numbers every frame on it, `Pages` and
//! `RoundEnd`/`StreamEnd` alike, and stamps the negotiated version; the [`Sealer`], when the
//! migration is encrypted, seals payloads with the sequence number their header carries.
//! Payloads are built in place in the send buffer: framing adds no copy.

use std::time::Duration;

use serde::Serialize;

use crate::migrate::protocol::{Command, Framer, ProtocolError, HEADER_LEN};
use crate::migrate::MigrateError;
use crate::transport::seal::{Sealer, TAG_LEN};
use crate::transport::uring::{FrameSink, SendStats, UringError};

pub(crate) struct DataSink {
    sink: FrameSink,
    framer: Framer,
    seal: Option<Sealer>,
}

impl DataSink {
    /// A sink that carries on `framer`'s numbering (the `StreamHello` before it).
    pub(crate) fn new(sink: FrameSink, framer: Framer, seal: Option<Sealer>) -> DataSink {
        DataSink { sink, framer, seal }
    }

    /// The connection's framer: what forwarding continues from once the last round is over.
    pub(crate) fn framer(&self) -> &Framer {
        &self.framer
    }

    /// Bytes framed on this connection (headers and payloads).
    pub(crate) fn bytes(&self) -> u64 {
        self.framer.bytes()
    }

    /// The buffer the next frame is built in: its payload goes at `[HEADER_LEN..]`.
    pub(crate) fn buffer(&mut self) -> Result<&mut [u8], UringError> {
        self.sink.buffer()
    }

    /// Where a frame's payload must end in [`DataSink::buffer`] so that it still fits once
    /// sealed (a sealed payload grows by its tag).
    pub(crate) fn frame_limit(&self) -> usize {
        self.sink.buffer_size() - if self.seal.is_some() { TAG_LEN } else { 0 }
    }

    /// Seal (when encrypted), frame and send the payload built at `[HEADER_LEN..end]` of the
    /// current buffer. `tamper` sees the finished frame just before it is sent (fault points).
    pub(crate) fn send_buffer(
        &mut self,
        cmd: Command,
        count: u32,
        end: usize,
        tamper: impl FnOnce(&mut [u8]),
    ) -> Result<(), MigrateError> {
        let seq = self.framer.next_seq();
        let buf = self.sink.buffer()?;
        let mut end = end;
        if let Some(s) = &self.seal {
            end = HEADER_LEN + s.seal(seq, &mut buf[HEADER_LEN..], end - HEADER_LEN)?;
        }
        let len = self.framer.frame_in_place(cmd, count, buf, end);
        tamper(&mut buf[..len]);
        self.sink.send_buffer(len)?;
        Ok(())
    }

    /// Send a control message (JSON, not sealed) between the payload frames.
    pub(crate) fn send_msg<T: Serialize>(
        &mut self,
        cmd: Command,
        msg: &T,
    ) -> Result<(), MigrateError> {
        let body = serde_json::to_vec(msg).map_err(|e| ProtocolError::Malformed {
            what: "outgoing message",
            why: e.to_string(),
        })?;
        let frame = self.framer.encode(cmd, 0, &body);
        self.sink.send_bytes(&frame)?;
        Ok(())
    }

    /// Wait until every send has completed (bounded).
    pub(crate) fn flush(&mut self, timeout: Duration) -> Result<(), MigrateError> {
        Ok(self.sink.flush(timeout)?)
    }

    /// What the sink sent, by path.
    pub(crate) fn stats(&self) -> SendStats {
        self.sink.stats
    }

    /// Nanoseconds spent waiting for the kernel to complete sends (read by the codec tuner).
    pub(crate) fn waited_ns(&self) -> u64 {
        self.sink.waited_ns
    }
}

#[cfg(test)]
mod tests {
    use std::io::BufReader;
    use std::net::{TcpListener, TcpStream};

    use super::*;
    use crate::migrate::protocol::{
        parse_records, push_record, Encoding, FrameHeader, FrameReader, FrameWriter, MIN_VERSION,
    };
    use crate::transport::uring::SendMode;

    /// Over loopback through the real sink (io_uring where the kernel allows it): one
    /// numbering from the `StreamHello` on, the negotiated version on every frame, sealed
    /// payloads that open with the sequence number their header carries.
    #[test]
    fn one_numbering_and_version_from_hello_to_stream_end() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let tx = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (rx, _) = l.accept().unwrap();
        let key = [7u8; 32];

        let mut w = FrameWriter::new(tx.try_clone().unwrap());
        w.set_version(MIN_VERSION);
        w.send_msg(Command::StreamHello, &serde_json::json!({}))
            .unwrap();
        let sink = FrameSink::new(tx, SendMode::ZeroCopyFixed, 4, 64 << 10, false);
        let mut out = DataSink::new(sink, w.into_framer(), Some(Sealer::new(&key, 3)));
        assert_eq!(out.framer().next_seq(), 1);
        assert!(out.frame_limit() < 64 << 10);
        for gpa in [0x1000u64, 0x2000] {
            let mut records = Vec::new();
            push_record(&mut records, gpa, Encoding::Zero, b"");
            let buf = out.buffer().unwrap();
            buf[HEADER_LEN..HEADER_LEN + records.len()].copy_from_slice(&records);
            let mut seen = 0;
            out.send_buffer(Command::Pages, 1, HEADER_LEN + records.len(), |f| {
                seen = f.len()
            })
            .unwrap();
            assert_eq!(seen, HEADER_LEN + records.len() + TAG_LEN);
        }
        out.send_msg(Command::StreamEnd, &serde_json::json!({"round": 0}))
            .unwrap();
        out.flush(Duration::from_secs(5)).unwrap();
        assert_eq!(out.framer().next_seq(), 4);
        let sent = out.bytes();
        drop(out);

        let mut r = FrameReader::new(BufReader::new(rx));
        let mut seen = Vec::new();
        let open = Sealer::new(&key, 3);
        for seq in 0..4u32 {
            let mut f = r.read_frame().unwrap();
            assert_eq!(r.last_seq(), seq);
            if f.command == Command::Pages {
                open.open(seq, &mut f.payload).unwrap();
                let recs = parse_records(&f.payload, f.count).unwrap();
                seen.push(recs[0].gpa);
            }
        }
        assert_eq!(seen, [0x1000, 0x2000]);
        // The framer counted every byte on the connection, the hello's included.
        assert_eq!(r.bytes, sent);
    }

    /// The version stamped is the framer's (the negotiated one), not this build's.
    #[test]
    fn pages_frames_carry_the_framers_version() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let tx = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut rx, _) = l.accept().unwrap();
        let sink = FrameSink::new(tx, SendMode::Std, 2, 4096, false);
        let mut out = DataSink::new(sink, Framer::with_seq(9, MIN_VERSION), None);
        out.send_buffer(Command::Pages, 0, HEADER_LEN, |_| {})
            .unwrap();
        out.flush(Duration::from_secs(5)).unwrap();
        let mut hb = [0u8; HEADER_LEN];
        std::io::Read::read_exact(&mut rx, &mut hb).unwrap();
        let (h, cmd) = FrameHeader::parse(&hb).unwrap();
        assert_eq!(cmd, Command::Pages);
        assert_eq!((h.seq.get(), h.version.get()), (9, MIN_VERSION));
    }
}
