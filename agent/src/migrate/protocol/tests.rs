//! Unit tests of the framing, the records and the control messages.

use super::*;
use serde::Deserialize;

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
    let mut w = FrameWriter::with_seq(Vec::new(), 5);
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

/// A data connection's life as the source writes it: the `StreamHello` through a
/// `FrameWriter`, `Pages` framed in place and a `RoundEnd` through the data sink's framer, then
/// forwarding through a `FrameWriter` again. Returns the bytes and where each frame starts.
fn data_connection(version: u16) -> (Vec<u8>, Vec<usize>) {
    let mut starts = vec![0];
    let mut out = Vec::new();
    let mut w = FrameWriter::new(&mut out);
    w.set_version(version);
    w.send_msg(Command::StreamHello, &serde_json::json!({"index": 0}))
        .unwrap();
    let mut framer = w.into_framer();
    assert_eq!(framer.next_seq(), 1);
    for _ in 0..2 {
        starts.push(out.len());
        let mut buf = vec![0u8; HEADER_LEN + 64];
        let mut records = Vec::new();
        push_record(&mut records, 0x2000, Encoding::Zero, b"");
        buf[HEADER_LEN..HEADER_LEN + records.len()].copy_from_slice(&records);
        let len = framer.frame_in_place(Command::Pages, 1, &mut buf, HEADER_LEN + records.len());
        out.extend_from_slice(&buf[..len]);
    }
    starts.push(out.len());
    out.extend_from_slice(&framer.encode(Command::RoundEnd, 0, br#"{"round":0,"pages":2}"#));
    starts.push(out.len());
    let mut fw = FrameWriter::with_framer(out, framer);
    fw.send(Command::NetFrames, 0, b"").unwrap();
    fw.send(Command::ForwardEnd, 0, b"{}").unwrap();
    assert_eq!(
        fw.bytes(),
        fw.inner.len() as u64,
        "every byte is counted once"
    );
    (fw.inner, starts)
}

#[test]
fn sequence_continues_across_frame_kinds_and_writers() {
    let (bytes, _) = data_connection(VERSION);
    let mut r = FrameReader::new(&bytes[..]);
    let mut kinds = Vec::new();
    for seq in 0..6u32 {
        let f = r.read_frame().unwrap();
        assert_eq!(r.last_seq(), seq);
        kinds.push(f.command);
    }
    assert_eq!(
        kinds,
        [
            Command::StreamHello,
            Command::Pages,
            Command::Pages,
            Command::RoundEnd,
            Command::NetFrames,
            Command::ForwardEnd
        ]
    );
    assert!(r.read_frame().is_err(), "nothing after the last frame");
}

#[test]
fn every_frame_carries_the_negotiated_version() {
    for version in MIN_VERSION..=VERSION {
        let (bytes, starts) = data_connection(version);
        assert_eq!(starts.len(), 5);
        let mut r = FrameReader::new(&bytes[..]);
        let mut at = 0;
        for _ in 0..6 {
            let (h, _) = FrameHeader::parse(&bytes[at..at + HEADER_LEN]).unwrap();
            assert_eq!(h.version.get(), version, "frame {} at {at}", h.seq.get());
            r.read_frame().unwrap();
            at = r.bytes as usize;
        }
    }
    // A framer handed on keeps the version set before.
    let mut f = Framer::new(VERSION);
    f.set_version(MIN_VERSION);
    let w = FrameWriter::with_framer(Vec::new(), f.clone());
    assert_eq!(w.version(), MIN_VERSION);
    assert_eq!(w.into_framer(), f);
}

#[test]
fn the_receiver_rejects_a_gap_or_a_repeat() {
    let (bytes, starts) = data_connection(VERSION);
    // Drop the second `Pages` frame (seq 2): the `RoundEnd` after it is refused.
    let mut gap = bytes[..starts[2]].to_vec();
    gap.extend_from_slice(&bytes[starts[3]..]);
    let mut r = FrameReader::new(&gap[..]);
    for _ in 0..2 {
        r.read_frame().unwrap();
    }
    assert!(matches!(
        r.read_frame(),
        Err(ProtocolError::Sequence {
            expected: 2,
            got: 3
        })
    ));
    // Send the first `Pages` frame twice.
    let mut again = bytes[..starts[2]].to_vec();
    again.extend_from_slice(&bytes[starts[1]..starts[2]]);
    let mut r = FrameReader::new(&again[..]);
    for _ in 0..2 {
        r.read_frame().unwrap();
    }
    assert!(matches!(
        r.read_frame(),
        Err(ProtocolError::Sequence {
            expected: 2,
            got: 1
        })
    ));
}
