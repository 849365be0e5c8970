//! How one page travels: zero, LZ4, zstd, LZ4 of an XOR delta, or raw.
//!
//! The encoder picks, per page, given the stream's page [`Codec`] (none, LZ4 or zstd; chosen by
//! the user or by [`super::tune`] from measured rates):
//!
//! 1. **Zero** when the page is all zero (word-wise OR-fold): no payload at all.
//! 2. **Delta** when the source cache holds the exact version the destination has and the XOR
//!    of old and new compresses to at most [`DELTA_MAX`] bytes: LZ4 of the XOR (whatever the
//!    page codec: a small delta is cheap to find and beats every whole-page codec).
//! 3. **Lz4** or **Zstd** (the stream's codec) when the page compresses to at most
//!    [`LZ4_MAX`] bytes. Zstd runs at [`ZSTD_LEVEL`], one frame per page that declares its
//!    content size; the decoder refuses any frame that does not declare exactly one page and
//!    decodes into the page itself, so a malformed frame cannot make it allocate.
//! 4. **Raw** otherwise (incompressible data costs one failed LZ4 attempt, ~1 us).
//!
//! ## The delta cache
//!
//! The source keeps the last-sent version of pages that are being re-dirtied, so it can send
//! the next version as a delta. Policy: a page enters the cache when it is sent in round 1 or
//! later (it has been dirtied again since round 0, so it is likely hot); once in, every later
//! send refreshes it. When the cache is full the CLOCK algorithm evicts a page not used since
//! the hand last passed. Capacity defaults to 5 % of guest memory, split evenly over the data
//! streams (each stream owns the pages mapped to it, so no locking). The destination needs no
//! cache: per-page order is kept, so its memory holds exactly the version the source's cache
//! holds, and it XORs the delta into its page.

use std::collections::HashMap;

use super::protocol::Encoding;
use crate::vm::memory::{is_zero, PAGE_SIZE};

pub const PAGE: usize = PAGE_SIZE as usize;
/// Largest LZ4 output worth sending instead of the raw page.
pub const LZ4_MAX: usize = PAGE * 7 / 8;
/// Largest delta worth sending (it must beat plain LZ4 too, checked separately).
pub const DELTA_MAX: usize = PAGE / 2;
/// Largest encoded payload the decoder accepts.
pub const MAX_ENCODED: usize = PAGE;

/// The zstd level of [`Encoding::Zstd`] pages: the fastest regular level (negative levels
/// compress text pages little better than LZ4).
pub const ZSTD_LEVEL: i32 = 1;

/// How a stream compresses whole pages (zero pages and deltas aside).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    /// Raw pages.
    None,
    Lz4,
    Zstd,
}

impl Codec {
    pub const ALL: [Codec; 3] = [Codec::None, Codec::Lz4, Codec::Zstd];
    pub fn index(self) -> usize {
        match self {
            Codec::None => 0,
            Codec::Lz4 => 1,
            Codec::Zstd => 2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Codec::None => "none",
            Codec::Lz4 => "lz4",
            Codec::Zstd => "zstd",
        }
    }
}

/// Errors decoding a page.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("{encoding:?} page does not decode: {why}")]
    Corrupt { encoding: Encoding, why: String },
}

/// Reusable buffers for encoding one page at a time.
pub struct Encoder {
    out: Vec<u8>,
    xor: Box<[u8; PAGE]>,
    /// Made on first use (a zstd context holds a few hundred KiB).
    zstd: Option<zstd::bulk::Compressor<'static>>,
}

impl Default for Encoder {
    fn default() -> Self {
        Encoder {
            out: vec![0; lz4_flex::block::get_maximum_output_size(PAGE)],
            xor: Box::new([0; PAGE]),
            zstd: None,
        }
    }
}

impl Encoder {
    /// Encode `page` with LZ4 as the page codec (see [`Encoder::encode_with`]).
    pub fn encode<'a>(
        &'a mut self,
        page: &'a [u8; PAGE],
        base: Option<&[u8; PAGE]>,
    ) -> (Encoding, &'a [u8]) {
        self.encode_with(page, base, Codec::Lz4)
    }

    /// Compress `page` with `codec` alone into the encoder's output buffer: the payload length,
    /// or None when it does not fit in [`LZ4_MAX`] (the page would go raw). `Codec::None`
    /// gives None. Used for the real encoding and for sampling the other codecs.
    pub fn compress(&mut self, page: &[u8; PAGE], codec: Codec) -> Option<usize> {
        match codec {
            Codec::None => None,
            Codec::Lz4 => match lz4_flex::block::compress_into(page, &mut self.out) {
                Ok(n) if n <= LZ4_MAX => Some(n),
                _ => None,
            },
            Codec::Zstd => {
                if self.zstd.is_none() {
                    self.zstd = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
                }
                let z = self.zstd.as_mut()?;
                // Bounded by the output slice: a frame that would not pay fails to fit.
                match z.compress_to_buffer(&page[..], &mut self.out[..LZ4_MAX]) {
                    Ok(n) if n > 0 && n <= LZ4_MAX => Some(n),
                    _ => None,
                }
            }
        }
    }

    /// Encode `page`; `base` is the version the destination holds, if the cache knows it;
    /// `codec` compresses pages that are neither zero nor a delta.
    /// Returns the encoding and its payload (empty for Zero; the page itself for Raw).
    pub fn encode_with<'a>(
        &'a mut self,
        page: &'a [u8; PAGE],
        base: Option<&[u8; PAGE]>,
        codec: Codec,
    ) -> (Encoding, &'a [u8]) {
        if is_zero(page) {
            return (Encoding::Zero, &[]);
        }
        if let Some(base) = base {
            let mut differing = 0usize;
            for ((x, a), b) in self
                .xor
                .chunks_exact_mut(8)
                .zip(page.chunks_exact(8))
                .zip(base.chunks_exact(8))
            {
                let d = u64::from_ne_bytes(a.try_into().unwrap_or([0; 8]))
                    ^ u64::from_ne_bytes(b.try_into().unwrap_or([0; 8]));
                differing += usize::from(d != 0);
                x.copy_from_slice(&d.to_ne_bytes());
            }
            // Only try when under a quarter of the words changed: otherwise it will not pay.
            if differing * 4 <= PAGE / 8 {
                if let Ok(n) = lz4_flex::block::compress_into(&self.xor[..], &mut self.out) {
                    if n <= DELTA_MAX {
                        return (Encoding::Delta, &self.out[..n]);
                    }
                }
            }
        }
        let e = match codec {
            Codec::None => return (Encoding::Raw, page),
            Codec::Lz4 => Encoding::Lz4,
            Codec::Zstd => Encoding::Zstd,
        };
        match self.compress(page, codec) {
            Some(n) => (e, &self.out[..n]),
            None => (Encoding::Raw, page),
        }
    }
}

/// Learns when a stream's pages are incompressible and then tries LZ4 only on every 16th
/// page (a failed LZ4 attempt costs about as much as sending the page on this link); one
/// compressible probe turns full compression back on.
#[derive(Debug, Default, Clone)]
pub struct Adaptive {
    raw_streak: u32,
    skip_left: u32,
    /// LZ4 attempts skipped.
    pub skipped: u64,
}

/// Consecutive raw pages after which compression is only probed.
const RAW_STREAK: u32 = 32;
const PROBE_EVERY: u32 = 16;

impl Encoder {
    /// [`Encoder::encode_in_place`], skipping the codec while the stream looks incompressible.
    /// Zero detection and deltas are always tried.
    pub fn encode_adaptive(
        &mut self,
        slot: &mut [u8],
        base: Option<&[u8; PAGE]>,
        codec: Codec,
        a: &mut Adaptive,
    ) -> (Encoding, usize) {
        if base.is_none() && a.skip_left > 0 {
            if is_zero(slot) {
                return (Encoding::Zero, 0);
            }
            a.skip_left -= 1;
            a.skipped += 1;
            return (Encoding::Raw, slot.len());
        }
        let r = self.encode_in_place_with(slot, base, codec);
        match r.0 {
            Encoding::Raw => {
                a.raw_streak += 1;
                if a.raw_streak >= RAW_STREAK {
                    a.skip_left = PROBE_EVERY - 1;
                }
            }
            Encoding::Zero => {}
            _ => {
                a.raw_streak = 0;
                a.skip_left = 0;
            }
        }
        r
    }

    /// Encode the page held in `slot` (exactly one page) in place: on return the slot starts with
    /// the payload and the length is returned (0 for Zero, a page for Raw).
    pub fn encode_in_place(
        &mut self,
        slot: &mut [u8],
        base: Option<&[u8; PAGE]>,
    ) -> (Encoding, usize) {
        self.encode_in_place_with(slot, base, Codec::Lz4)
    }

    /// [`Encoder::encode_in_place`] with `codec` for whole pages.
    pub fn encode_in_place_with(
        &mut self,
        slot: &mut [u8],
        base: Option<&[u8; PAGE]>,
        codec: Codec,
    ) -> (Encoding, usize) {
        let Ok(page) = <&[u8; PAGE]>::try_from(&*slot) else {
            return (Encoding::Raw, slot.len());
        };
        let (e, n) = {
            let (e, payload) = self.encode_with(page, base, codec);
            (e, payload.len())
        };
        if matches!(e, Encoding::Lz4 | Encoding::Delta | Encoding::Zstd) {
            slot[..n].copy_from_slice(&self.out[..n]);
        }
        (e, n)
    }
}

/// The largest window a zstd page frame may declare (one page of content needs 2^12).
const ZSTD_WINDOW_LOG_MAX: u32 = 17;

thread_local! {
    /// One zstd decoding context per receiving thread (fixed size, made on first use).
    static ZSTD_DECODER: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Decode one page into `dst`, which must hold the destination's current version of the page
/// (used by Delta).
pub fn decode(encoding: Encoding, payload: &[u8], dst: &mut [u8; PAGE]) -> Result<(), CodecError> {
    let corrupt = |why: String| CodecError::Corrupt { encoding, why };
    match encoding {
        Encoding::Zero => {
            if !payload.is_empty() {
                return Err(corrupt("zero page with a payload".into()));
            }
            dst.fill(0);
        }
        Encoding::Raw => {
            if payload.len() != PAGE {
                return Err(corrupt(format!("{} bytes", payload.len())));
            }
            dst.copy_from_slice(payload);
        }
        Encoding::Lz4 => {
            let n = lz4_flex::block::decompress_into(payload, &mut dst[..])
                .map_err(|e| corrupt(e.to_string()))?;
            if n != PAGE {
                return Err(corrupt(format!("decodes to {n} bytes")));
            }
        }
        Encoding::Zstd => {
            // Exactly one frame that declares exactly one page, decoded into the page itself:
            // the output bound is the page, and no window is allocated for a flat buffer.
            match zstd::zstd_safe::get_frame_content_size(payload) {
                Ok(Some(n)) if n == PAGE as u64 => {}
                Ok(Some(n)) => return Err(corrupt(format!("frame declares {n} bytes"))),
                Ok(None) => return Err(corrupt("frame does not declare its size".into())),
                Err(_) => return Err(corrupt("not a zstd frame".into())),
            }
            match zstd::zstd_safe::find_frame_compressed_size(payload) {
                Ok(n) if n == payload.len() => {}
                _ => return Err(corrupt("not exactly one zstd frame".into())),
            }
            let n = ZSTD_DECODER.with(|d| {
                let mut d = d.borrow_mut();
                if d.is_none() {
                    let mut z = zstd::bulk::Decompressor::new()
                        .map_err(|e| corrupt(format!("no zstd decoder: {e}")))?;
                    z.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(
                        ZSTD_WINDOW_LOG_MAX,
                    ))
                    .map_err(|e| corrupt(format!("zstd decoder setup: {e}")))?;
                    *d = Some(z);
                }
                let z = d
                    .as_mut()
                    .ok_or_else(|| corrupt("no zstd decoder".into()))?;
                z.decompress_to_buffer(payload, &mut dst[..])
                    .map_err(|e| corrupt(e.to_string()))
            })?;
            if n != PAGE {
                return Err(corrupt(format!("decodes to {n} bytes")));
            }
        }
        Encoding::Delta => {
            let mut x = [0u8; PAGE];
            let n = lz4_flex::block::decompress_into(payload, &mut x[..])
                .map_err(|e| corrupt(e.to_string()))?;
            if n != PAGE {
                return Err(corrupt(format!("decodes to {n} bytes")));
            }
            for (d, x) in dst.chunks_exact_mut(8).zip(x.chunks_exact(8)) {
                let v = u64::from_ne_bytes(d[..].try_into().unwrap_or([0; 8]))
                    ^ u64::from_ne_bytes(x.try_into().unwrap_or([0; 8]));
                d.copy_from_slice(&v.to_ne_bytes());
            }
        }
    }
    Ok(())
}

/// Last-sent versions of hot pages (see the module docs for the policy).
pub struct DeltaCache {
    capacity: usize,
    index: HashMap<u64, usize>,
    slots: Vec<Slot>,
    /// The pages, slot by slot, in one allocation reserved for `capacity` pages on first use:
    /// large enough that the C library maps it on its own and unmaps it when the cache
    /// drops, instead of leaving thousands of 4 KiB blocks in a stream thread's arena that it
    /// never returns to the system (issue 13: ~450 MB kept after a few 3 GiB guests).
    data: Vec<[u8; PAGE]>,
    hand: usize,
    pub hits: u64,
    pub evictions: u64,
}

struct Slot {
    gpa: u64,
    referenced: bool,
}

impl DeltaCache {
    /// A cache of at most `capacity` pages.
    pub fn new(capacity: usize) -> Self {
        DeltaCache {
            capacity,
            index: HashMap::new(),
            slots: Vec::new(),
            data: Vec::new(),
            hand: 0,
            hits: 0,
            evictions: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The version last sent for `gpa`, if cached.
    pub fn get(&mut self, gpa: u64) -> Option<&[u8; PAGE]> {
        let i = *self.index.get(&gpa)?;
        self.slots[i].referenced = true;
        self.hits += 1;
        Some(&self.data[i])
    }

    /// Whether `gpa` is cached (no reference bit change).
    pub fn contains(&self, gpa: u64) -> bool {
        self.index.contains_key(&gpa)
    }

    /// Record `page` as the version sent for `gpa`.
    pub fn put(&mut self, gpa: u64, page: &[u8; PAGE]) {
        if self.capacity == 0 {
            return;
        }
        if let Some(&i) = self.index.get(&gpa) {
            self.data[i].copy_from_slice(page);
            self.slots[i].referenced = true;
            return;
        }
        if self.slots.len() < self.capacity {
            if self.data.capacity() == 0 {
                // Reserved, not touched: pages become resident as slots fill.
                self.data.reserve_exact(self.capacity);
            }
            self.index.insert(gpa, self.slots.len());
            self.slots.push(Slot {
                gpa,
                referenced: true,
            });
            self.data.push(*page);
            return;
        }
        // CLOCK: skip (and clear) referenced slots; bounded by two sweeps.
        for _ in 0..2 * self.slots.len() {
            let i = self.hand;
            self.hand = (self.hand + 1) % self.slots.len();
            let s = &mut self.slots[i];
            if s.referenced {
                s.referenced = false;
                continue;
            }
            self.index.remove(&s.gpa);
            s.gpa = gpa;
            s.referenced = true;
            self.data[i].copy_from_slice(page);
            self.index.insert(gpa, i);
            self.evictions += 1;
            return;
        }
    }

    /// Forget `gpa` (its destination version is no longer what the cache holds).
    pub fn remove(&mut self, gpa: u64) {
        // Leave the slot in place but unreachable; it is reused by CLOCK.
        if let Some(i) = self.index.remove(&gpa) {
            self.slots[i].gpa = u64::MAX;
            self.slots[i].referenced = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::workload::{page_content, Profile};

    fn page(profile: Profile, i: u64, pass: u64) -> [u8; PAGE] {
        let mut p = [0u8; PAGE];
        page_content(profile, i, pass, &mut p);
        p
    }

    fn round_trip(p: &[u8; PAGE], base: Option<&[u8; PAGE]>) -> Encoding {
        let mut e = Encoder::default();
        let (enc, payload) = e.encode(p, base);
        let payload = payload.to_vec();
        let mut dst = base.copied().unwrap_or([0xAA; PAGE]);
        decode(enc, &payload, &mut dst).unwrap();
        assert_eq!(&dst, p, "{enc:?} round trip");
        enc
    }

    #[test]
    fn each_encoding_round_trips() {
        assert_eq!(round_trip(&[0; PAGE], None), Encoding::Zero);
        assert_eq!(
            round_trip(&page(Profile::Random, 3, 1), None),
            Encoding::Raw
        );
        assert_eq!(round_trip(&page(Profile::Text, 3, 1), None), Encoding::Lz4);
        let old = page(Profile::Random, 9, 1);
        let mut new = old;
        new[100..140].copy_from_slice(&[0x55; 40]);
        assert_eq!(round_trip(&new, Some(&old)), Encoding::Delta);
        // A delta that does not pay falls back to plain encodings.
        assert_eq!(
            round_trip(&page(Profile::Random, 9, 2), Some(&old)),
            Encoding::Raw
        );
        assert_eq!(
            round_trip(&page(Profile::Text, 9, 2), Some(&old)),
            Encoding::Lz4
        );
    }

    /// Property: for many pages of every profile, mutated partially against many bases, encode
    /// then decode gives the page back, whatever encoding was chosen.
    #[test]
    fn round_trip_property() {
        let mut s = 0x1234_5678_9abc_def1u64;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let profiles = [
            Profile::Zero,
            Profile::Random,
            Profile::Text,
            Profile::Mixed,
        ];
        for i in 0..400 {
            let p = profiles[(next() % 4) as usize];
            let base = page(p, i, next() % 5);
            let mut new = base;
            for _ in 0..(next() % 64) {
                let at = (next() as usize) % PAGE;
                new[at] = next() as u8;
            }
            round_trip(&new, Some(&base));
            round_trip(&new, None);
        }
    }

    #[test]
    fn adaptive_skips_lz4_on_incompressible_streams_and_recovers() {
        let mut e = Encoder::default();
        let mut a = Adaptive::default();
        for i in 0..200 {
            let mut slot = page(Profile::Random, i, 1);
            assert_eq!(
                e.encode_adaptive(&mut slot, None, Codec::Lz4, &mut a).0,
                Encoding::Raw
            );
        }
        assert!(a.skipped > 100, "{a:?}");
        // Compressible pages come back: within one probe interval they compress again.
        let mut lz4 = 0;
        for i in 0..40 {
            let mut slot = page(Profile::Text, i, 1);
            if e.encode_adaptive(&mut slot, None, Codec::Lz4, &mut a).0 == Encoding::Lz4 {
                lz4 += 1;
            }
        }
        assert!(lz4 >= 40 - PROBE_EVERY as usize, "{lz4}");
        let mut z = [0u8; PAGE];
        assert_eq!(
            e.encode_adaptive(&mut z, None, Codec::Lz4, &mut a).0,
            Encoding::Zero
        );
    }

    #[test]
    fn zstd_pages_round_trip_and_beat_lz4_on_text() {
        let mut e = Encoder::default();
        let (mut lz4, mut zstd) = (0, 0);
        for i in 0..64 {
            for p in [
                page(Profile::Text, i, 1),
                page(Profile::Mixed, i, 2),
                page(Profile::Random, i, 1),
                [0u8; PAGE],
            ] {
                for codec in Codec::ALL {
                    let mut slot = p;
                    let (enc, n) = e.encode_in_place_with(&mut slot, None, codec);
                    let mut dst = [0x11u8; PAGE];
                    decode(enc, &slot[..n], &mut dst).unwrap();
                    assert_eq!(dst, p, "{codec:?} as {enc:?}");
                    match (codec, enc) {
                        (Codec::Lz4, Encoding::Lz4) => lz4 += n,
                        (Codec::Zstd, Encoding::Zstd) => zstd += n,
                        (Codec::None, e) => assert!(matches!(e, Encoding::Zero | Encoding::Raw)),
                        _ => {}
                    }
                }
            }
            // Deltas keep their place under every codec.
            let old = page(Profile::Random, i, 1);
            let mut new = old;
            new[8..40].copy_from_slice(&[7; 32]);
            let (enc, _) = e.encode_with(&new, Some(&old), Codec::Zstd);
            assert_eq!(enc, Encoding::Delta);
        }
        assert!(zstd > 0 && zstd < lz4, "zstd {zstd} lz4 {lz4}");
    }

    #[test]
    fn zstd_decoder_is_bounded() {
        let mut dst = [0u8; PAGE];
        // A valid frame of the wrong size (too small, and far too large) is refused before
        // decoding: the declared size is checked first.
        for n in [100usize, 2 * PAGE, 64 << 20] {
            let big = vec![b'a'; n.min(1 << 20)];
            let mut f = zstd::bulk::compress(&big, ZSTD_LEVEL).unwrap();
            if n > (1 << 20) {
                // Claim 64 MiB of content in the header of a small frame.
                f = zstd::bulk::compress(&[b'a'; 64], ZSTD_LEVEL).unwrap();
                // Frame header: magic (4), descriptor (1): set an 8-byte content size field.
                f.truncate(4);
                f.extend_from_slice(&[0xE0, 0, 0, 0, 4, 0, 0, 0, 0]);
            }
            assert!(decode(Encoding::Zstd, &f, &mut dst).is_err(), "{n}");
        }
        // Two frames back to back, and a frame without its size, are refused.
        let one = zstd::bulk::compress(&[1u8; PAGE], ZSTD_LEVEL).unwrap();
        let mut two = one.clone();
        two.extend_from_slice(&one);
        assert!(decode(Encoding::Zstd, &two, &mut dst).is_err());
        assert!(decode(Encoding::Zstd, &one, &mut dst).is_ok());
        let mut z = zstd::bulk::Compressor::new(ZSTD_LEVEL).unwrap();
        z.set_parameter(zstd::zstd_safe::CParameter::ContentSizeFlag(false))
            .unwrap();
        let sizeless = z.compress(&[1u8; PAGE]).unwrap();
        assert!(decode(Encoding::Zstd, &sizeless, &mut dst).is_err());
        // Garbage and truncations never panic.
        let mut s = 11u64;
        for len in 0..300 {
            let mut junk: Vec<u8> = (0..len)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    s as u8
                })
                .collect();
            if len >= 4 {
                junk[..4].copy_from_slice(&one[..4]);
            }
            let _ = decode(Encoding::Zstd, &junk, &mut dst);
            let _ = decode(Encoding::Zstd, &one[..len.min(one.len())], &mut dst);
        }
    }

    #[test]
    fn in_place_encoding_matches() {
        let mut e = Encoder::default();
        for p in [
            page(Profile::Text, 1, 1),
            page(Profile::Random, 1, 1),
            [0u8; PAGE],
        ] {
            let mut slot = p;
            let (enc, n) = e.encode_in_place(&mut slot, None);
            let mut dst = [0x11u8; PAGE];
            decode(enc, &slot[..n], &mut dst).unwrap();
            assert_eq!(dst, p);
        }
    }

    #[test]
    fn decoder_rejects_garbage_without_panicking() {
        let mut dst = [0u8; PAGE];
        assert!(decode(Encoding::Raw, &[1, 2], &mut dst).is_err());
        assert!(decode(Encoding::Zero, &[1], &mut dst).is_err());
        let mut s = 7u64;
        for len in 0..300 {
            let junk: Vec<u8> = (0..len)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    s as u8
                })
                .collect();
            let _ = decode(Encoding::Lz4, &junk, &mut dst);
            let _ = decode(Encoding::Delta, &junk, &mut dst);
        }
        // A valid LZ4 block of the wrong size is refused.
        let short = lz4_flex::block::compress(&[1u8; 100]);
        assert!(decode(Encoding::Lz4, &short, &mut dst).is_err());
    }

    #[test]
    fn cache_is_bounded_and_clock_keeps_hot_pages() {
        let mut c = DeltaCache::new(3);
        let p = [1u8; PAGE];
        c.put(0x1000, &p);
        c.put(0x2000, &p);
        c.put(0x3000, &p);
        assert_eq!(c.len(), 3);
        // First sweep clears all reference bits, then evicts 0x1000.
        c.put(0x4000, &p);
        assert_eq!(c.len(), 3);
        assert!(!c.contains(0x1000));
        // 0x2000 is used again; the next eviction skips it.
        assert!(c.get(0x2000).is_some());
        c.put(0x5000, &p);
        assert!(c.contains(0x2000));
        assert!(!c.contains(0x3000));
        c.remove(0x2000);
        assert!(c.get(0x2000).is_none());
        assert_eq!(DeltaCache::new(0).len(), 0);
        let mut z = DeltaCache::new(0);
        z.put(1 << 12, &p);
        assert!(z.is_empty());
    }
}
