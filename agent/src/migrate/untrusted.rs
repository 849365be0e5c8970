//! Everything a peer's bytes go through, in one entry point for fuzzing: frames (header,
//! checksums, sequence), page records and their codecs, the saved vCPU/device state, and every
//! control message. [`decode_all`] must return (never panic, never allocate without bound) on
//! any input; `fuzz/` drives it with cargo-fuzz (nightly), and the unit test below with a
//! bounded mutation run on stable, in CI.

use std::fmt::Write as _;
use std::io::Cursor;

use super::codec;
use super::protocol::{self, Command, FrameReader};
use crate::vm::memory::PAGE_SIZE;

/// How many characters of a peer's name [`peer_str`] keeps.
pub const PEER_NAME_MAX: usize = 64;
/// How many characters of a peer's reason (an `Abort`) [`peer_text`] keeps by default.
pub const PEER_REASON_MAX: usize = 512;

/// A peer-supplied name made safe for a log line, an error, the API or a terminal: control
/// characters (newlines, ESC of ANSI sequences, …) escaped as `\n`, `\u{1b}`, and at most
/// [`PEER_NAME_MAX`] characters kept (then "…"). Use it on everything a peer said before it
/// reaches a human.
pub fn peer_str(s: &str) -> String {
    peer_text(s, PEER_NAME_MAX)
}

/// [`peer_str`] with a chosen bound (`max` characters of the original, escapes not counted).
pub fn peer_text(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max) + 8);
    for (n, c) in s.chars().enumerate() {
        if n == max {
            out.push('…');
            break;
        }
        if c.is_control()
            || matches!(c, '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        {
            let _ = write!(out, "{}", c.escape_default());
        } else if c == '\\' {
            out.push_str("\\\\");
        } else {
            out.push(c);
        }
    }
    out
}

/// What [`decode_all`] got through.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Decoded {
    /// Frames whose header and payload checksum held.
    pub frames: usize,
    /// Of those, frames whose content decoded too.
    pub valid: usize,
    /// Pages decoded by the codecs.
    pub pages: usize,
}

/// Decode `bytes` as a connection's stream of frames, the way the agents do, until the end or
/// the first error.
pub fn decode_all(bytes: &[u8]) -> Decoded {
    let mut out = Decoded::default();
    let mut r = FrameReader::new(Cursor::new(bytes));
    let mut page = Box::new([0u8; PAGE_SIZE as usize]);
    let mut payload = Vec::new();
    while let Ok((cmd, count)) = r.next_into(&mut payload) {
        out.frames += 1;
        if content(cmd, count, &payload, &mut page, &mut out.pages) {
            out.valid += 1;
        }
    }
    out
}

fn content(
    cmd: Command,
    count: u32,
    payload: &[u8],
    page: &mut [u8; PAGE_SIZE as usize],
    pages: &mut usize,
) -> bool {
    use protocol::*;
    fn msg<T: serde::de::DeserializeOwned>(p: &[u8]) -> bool {
        json::<T>(p, "fuzzed message").is_ok()
    }
    match cmd {
        Command::Pages => match parse_records(payload, count) {
            Ok(records) => {
                for rec in records {
                    if codec::decode(rec.encoding, rec.payload, page).is_err() {
                        return false;
                    }
                    *pages += 1;
                }
                true
            }
            Err(_) => false,
        },
        Command::State => crate::vm::state::VmState::decode(payload).is_ok(),
        Command::Hello => msg::<Hello>(payload),
        Command::HelloAck => msg::<HelloAck>(payload),
        Command::Setup => msg::<Setup>(payload),
        Command::Ready => msg::<Ready>(payload),
        Command::StreamHello => msg::<StreamHello>(payload),
        Command::RoundEnd | Command::StreamEnd | Command::RoundAck => msg::<RoundEnd>(payload),
        Command::Complete => msg::<Complete>(payload),
        Command::Prepared => msg::<Prepared>(payload),
        Command::Commit => msg::<Commit>(payload),
        Command::Resumed => msg::<Resumed>(payload),
        Command::Observed => msg::<Observed>(payload),
        Command::Abort => msg::<Abort>(payload),
        Command::NetFrames => super::forward::parse_records(payload, count).is_ok(),
        Command::ForwardEnd => msg::<ForwardEnd>(payload),
        Command::Blast | Command::BlastDone | Command::Query | Command::Facts | Command::Auth => {
            serde_json::from_slice::<serde_json::Value>(payload).is_ok()
        }
        Command::Invalid => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_strings_are_escaped_and_bounded() {
        let forged =
            "b\n2026-11-30T00:00:00Z  INFO ferry: \x1b[32mincoming migration committed\x1b[0m";
        let s = peer_str(forged);
        assert!(!s.chars().any(char::is_control), "{s:?}");
        assert!(s.starts_with("b\\n2026"), "{s:?}");
        assert!(s.contains("\\u{1b}[32m"), "{s:?}");
        assert!(s.ends_with('…'));
        let big = "x".repeat(3 << 20);
        let s = peer_str(&big);
        assert_eq!(s.chars().count(), PEER_NAME_MAX + 1);
        assert_eq!(peer_str("agent-b"), "agent-b");
        assert_eq!(peer_str(""), "");
        assert_eq!(peer_str("é€ name"), "é€ name");
        assert_eq!(
            peer_str("a\\nb"),
            "a\\\\nb",
            "a literal backslash-n differs from an escaped newline"
        );
        assert_eq!(peer_str("rtl\u{202e}x"), "rtl\\u{202e}x");
        assert_eq!(peer_text("abcdef", 3), "abc…");
        assert_eq!(peer_text("abc", 3), "abc");
        assert_eq!(peer_str("tab\there\r\0"), "tab\\there\\r\\u{0}");
    }
    use crate::migrate::protocol::{encode_frame, push_record, Encoding};
    use std::time::{Duration, Instant};

    /// xorshift64*: deterministic, so a failure reproduces from its iteration number.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    /// Valid frames of every kind the wire carries.
    fn corpus() -> Vec<(Command, u32, Vec<u8>)> {
        let mut pages = Vec::new();
        let mut text = Box::new([0u8; PAGE_SIZE as usize]);
        for (i, b) in text.iter_mut().enumerate() {
            *b = (i % 61) as u8;
        }
        let mut enc = codec::Encoder::default();
        push_record(&mut pages, 0, Encoding::Zero, &[]);
        push_record(&mut pages, 4096, Encoding::Raw, &text[..]);
        let (e, lz) = enc.encode(&text, None);
        assert_eq!(e, Encoding::Lz4);
        let lz = lz.to_vec();
        push_record(&mut pages, 8192, Encoding::Lz4, &lz);
        push_record(&mut pages, 12288, Encoding::Delta, &lz);
        let (e, zs) = enc.encode_with(&text, None, codec::Codec::Zstd);
        assert_eq!(e, Encoding::Zstd);
        let zs = zs.to_vec();
        push_record(&mut pages, 16384, Encoding::Zstd, &zs);
        // zstd pages alone, so that mutations hit the frame decoder often.
        let mut zpages = Vec::new();
        push_record(&mut zpages, 0, Encoding::Zstd, &zs);
        push_record(&mut zpages, 4096, Encoding::Zstd, &zs);
        let j = |v: serde_json::Value| serde_json::to_vec(&v).unwrap();
        vec![
            (Command::Pages, 5, pages),
            (Command::Pages, 2, zpages),
            (
                Command::Hello,
                0,
                j(serde_json::json!({"min_version":1,"max_version":2,"agent":"a","nonce":"00"})),
            ),
            (
                Command::RoundEnd,
                0,
                j(serde_json::json!({"round":1,"pages":4})),
            ),
            (Command::Commit, 0, j(serde_json::json!({"generation":3}))),
            (Command::Abort, 0, j(serde_json::json!({"reason":"x"}))),
            (
                Command::State,
                0,
                b"FERRYST\0\x02\0\0\0\x10\0\0\0abcdefgh".to_vec(),
            ),
        ]
    }

    fn mutate(rng: &mut Rng, b: &mut Vec<u8>) {
        for _ in 0..1 + rng.below(4) {
            if b.is_empty() {
                b.push(rng.next() as u8);
                continue;
            }
            let i = rng.below(b.len());
            match rng.below(6) {
                0 => b[i] ^= 1 << rng.below(8),
                1 => b[i] = [0, 0xff, 0x7f, 0x80, 1][rng.below(5)],
                2 => b.truncate(i),
                3 => {
                    let at = rng.below(b.len().saturating_sub(3));
                    let v = [0u32, u32::MAX, 4096, 4097, 1 << 31][rng.below(5)];
                    if at + 4 <= b.len() {
                        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
                    }
                }
                4 => {
                    let chunk: Vec<u8> = b[i..b.len().min(i + 64)].to_vec();
                    b.splice(i..i, chunk);
                }
                _ => b.insert(i, rng.next() as u8),
            }
        }
    }

    /// A bounded fuzz run (seconds, on the CI machine): raw mutations of whole streams (which
    /// mostly stop at the checksums), and mutations of payloads re-framed with valid checksums
    /// (which reach the record parser, the codecs, the state decoder and the JSON messages).
    #[test]
    fn fuzzed_wire_input_never_panics() {
        let corpus = corpus();
        let valid: Vec<u8> = corpus
            .iter()
            .enumerate()
            .flat_map(|(seq, (c, n, p))| encode_frame(*c, *n, p, seq as u32))
            .collect();
        let d = decode_all(&valid);
        assert_eq!(d.frames, corpus.len(), "{d:?}");
        assert_eq!(d.pages, 7, "{d:?}");
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let started = Instant::now();
        let mut n = 0u64;
        while n < 1_000_000 && started.elapsed() < Duration::from_secs(20) {
            n += 1;
            if n.is_multiple_of(2) {
                let mut b = valid.clone();
                mutate(&mut rng, &mut b);
                decode_all(&b);
            } else {
                let (c, count, p) = &corpus[rng.below(corpus.len())];
                let mut p = p.clone();
                mutate(&mut rng, &mut p);
                let count = if rng.below(4) == 0 {
                    rng.next() as u32
                } else {
                    *count
                };
                let d = decode_all(&encode_frame(*c, count, &p, 0));
                assert_eq!(d.frames, 1, "iteration {n}: a checksummed frame must parse");
            }
        }
        assert!(n >= 1000, "only {n} iterations");
        eprintln!("{n} fuzz iterations in {:?}", started.elapsed());
    }
}
