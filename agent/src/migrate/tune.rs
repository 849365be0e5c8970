//! The self-tuning page codec: which whole-page codec (none, LZ4, zstd) moves the most guest
//! memory per second on one data stream, from what that stream measured. A pure function,
//! tested without a link ([`choose`]), and the small measuring state a stream worker keeps
//! ([`Meter`]).
//!
//! ## The model
//!
//! A stream is a two-stage pipeline: its thread prepares frames (copy out of guest memory,
//! encode, checksum, seal) while the kernel sends the previous one. So per page of guest memory
//!
//! ```text
//! cpu(c)  = base + nz * (encode(c) + wire_cost * wire(c))      seconds of the stream's thread
//! link(c) = (nz * wire(c) + RECORD) / link_rate                 seconds of the link
//! rate(c) = PAGE / max(cpu(c), link(c))                         guest bytes per second
//! ```
//!
//! where `nz` is the share of pages that are not zero, `encode(c)` and `wire(c)` the seconds
//! and bytes codec `c` took per non-zero page on a sample of the pages this stream actually
//! sent (every codec runs on the same sampled pages), `wire_cost` the seconds per wire byte of
//! checksum, sealing and handing to the kernel, `base` the rest (copy, zero check, record).
//! The choice is the codec with the highest `rate`; the current one is kept unless another
//! beats it by [`HYSTERESIS`].
//!
//! ## The link rate
//!
//! Not the configured `link_speed`: the stream measures it. While it waits for the kernel to
//! take its frames (link-bound) its wire rate is what the link gives it now, and that replaces
//! the estimate (a link that became shared shows up at once). While it works without waiting
//! (CPU-bound), the link gives at least the wire rate seen, and the estimate drifts up by
//! [`LINK_GROWTH`] per window, so that a stream compressing hard does not stay on its codec for
//! want of seeing the link; a mostly idle window changes nothing. Before the first link-bound
//! window the link is taken as unlimited, which picks the cheapest codec; if that one then waits
//! on the link, the next window knows the rate and compression is reconsidered.
//!
//! ## Trials
//!
//! The model can be wrong about what limits a stream: on shared cores a destination short of
//! CPU looks like a slow link, which compression does not help. So every switch is a trial
//! ([`trial_failed`]): the worker goes back if the new codec moved fewer non-zero pages per busy
//! second than the old one did, and leaves it out for [`TRIAL_BLOCK_WINDOWS`] windows.
//!
//! Known limit: on a slow link the socket buffers (megabytes) hide the link from the first
//! windows and from small late rounds, so those see more than the link gives.

use serde::{Deserialize, Serialize};

use super::codec::{Codec, PAGE};
use super::protocol::RECORD_LEN;

/// The page codec as the user asks for it (`ferry migrate --codec`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CodecChoice {
    /// Chosen per stream from measured rates, during the migration (see the module docs).
    #[default]
    Auto,
    /// Zero pages skipped, everything else raw (no deltas either): like `--no-compress`.
    None,
    Lz4,
    Zstd,
}

impl CodecChoice {
    pub fn is_auto(&self) -> bool {
        *self == CodecChoice::Auto
    }
    pub fn name(self) -> &'static str {
        match self {
            CodecChoice::Auto => "auto",
            CodecChoice::None => "none",
            CodecChoice::Lz4 => "lz4",
            CodecChoice::Zstd => "zstd",
        }
    }
}

impl std::str::FromStr for CodecChoice {
    type Err = super::OptionError;
    fn from_str(s: &str) -> Result<Self, super::OptionError> {
        match s {
            "auto" => Ok(CodecChoice::Auto),
            "none" => Ok(CodecChoice::None),
            "lz4" => Ok(CodecChoice::Lz4),
            "zstd" => Ok(CodecChoice::Zstd),
            o => Err(super::OptionError::UnknownCodec(o.to_string())),
        }
    }
}

/// How a stream encodes, from the user's choice and what the destination speaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodecPlan {
    /// The codec at the start (the only one unless `auto`).
    pub start: Codec,
    /// Codecs the tuner may pick; empty: the user fixed the codec.
    pub allowed: Vec<Codec>,
    /// XOR deltas against the cache.
    pub delta: bool,
    /// "auto", or the user's fixed choice ("none", "lz4", "zstd", "no-compress").
    pub mode: &'static str,
}

/// The plan for `choice` (`compress` false is `--no-compress`, which wins) on a session that
/// negotiated protocol `version` (zstd pages need 2).
pub fn plan(
    choice: CodecChoice,
    compress: bool,
    version: u16,
) -> Result<CodecPlan, super::OptionError> {
    let zstd_ok = version >= super::protocol::Encoding::Zstd.since_version();
    let fixed = |start, delta, mode| CodecPlan {
        start,
        allowed: Vec::new(),
        delta,
        mode,
    };
    if !compress {
        return Ok(fixed(Codec::None, false, "no-compress"));
    }
    Ok(match choice {
        CodecChoice::Auto => CodecPlan {
            start: Codec::Lz4,
            allowed: if zstd_ok {
                Codec::ALL.to_vec()
            } else {
                vec![Codec::None, Codec::Lz4]
            },
            delta: true,
            mode: "auto",
        },
        CodecChoice::None => fixed(Codec::None, false, "none"),
        CodecChoice::Lz4 => fixed(Codec::Lz4, true, "lz4"),
        CodecChoice::Zstd if zstd_ok => fixed(Codec::Zstd, true, "zstd"),
        CodecChoice::Zstd => return Err(super::OptionError::ZstdNeedsVersion2(version)),
    })
}

/// Another codec must promise this much more memory per second to replace the current one.
pub const HYSTERESIS: f64 = 1.08;
/// A window where the stream waited on the kernel for at least this share of its busy time
/// was link-bound.
pub const LINK_BOUND_WAIT: f64 = 0.10;
/// Predicted rates this close to the best count as equal (then the cheaper codec wins).
pub const TIE: f64 = 0.02;
/// A window that never waited on the link raises the estimate by this factor (at least): a
/// stream that compresses hard is CPU-bound and cannot see how fast the link is, so the
/// estimate drifts up until a cheaper codec looks better and is tried; if the link then limits
/// it, the next window measures the link again.
pub const LINK_GROWTH: f64 = 1.25;

/// One codec on the sampled pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CodecRate {
    /// Encode throughput, MB of page per second of CPU.
    pub encode_mb_s: f64,
    /// Wire bytes per page byte (1.0 for none; pages that do not compress count raw).
    pub ratio: f64,
}

/// What one stream measured over a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamRates {
    /// Per codec (index [`Codec::index`]); None: not sampled (not allowed, or no pages yet).
    pub codecs: [Option<CodecRate>; 3],
    /// Seconds per page of everything but encoding and per-wire-byte work.
    pub base_s_per_page: f64,
    /// Seconds per wire byte (checksum, seal, send submission).
    pub wire_s_per_byte: f64,
    /// Share of pages that are not zero (0..=1).
    pub nonzero: f64,
    /// The usable link rate for this stream, MB/s (None: never seen link-bound).
    pub link_mb_s: Option<f64>,
}

/// The decision and why.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    pub codec: Codec,
    /// Predicted guest memory per second for each codec, MB/s (index [`Codec::index`]).
    pub predicted_mb_s: [Option<f64>; 3],
    /// Whether the winner is limited by the link (else by this stream's CPU).
    pub link_bound: bool,
}

/// Predicted guest MB/s for codec `c`, whether the link limits it, and the stream's CPU
/// seconds per page with it.
pub fn predict(r: &StreamRates, c: Codec) -> Option<(f64, bool, f64)> {
    let cr = r.codecs[c.index()]?;
    if cr.encode_mb_s <= 0.0 || !cr.encode_mb_s.is_finite() || !(0.0..=1.5).contains(&cr.ratio) {
        return None;
    }
    let page = PAGE as f64;
    let nz = r.nonzero.clamp(0.0, 1.0);
    let encode_s = page / (cr.encode_mb_s * 1e6);
    let wire = cr.ratio * page;
    let cpu = r.base_s_per_page.max(0.0) + nz * (encode_s + r.wire_s_per_byte.max(0.0) * wire);
    let link = match r.link_mb_s {
        Some(l) if l > 0.0 => (nz * wire + RECORD_LEN as f64) / (l * 1e6),
        _ => 0.0,
    };
    let t = cpu.max(link).max(1e-12);
    Some((page / t / 1e6, link > cpu, cpu))
}

/// The codec among `allowed` that moves the most guest memory per second; among codecs within
/// [`TIE`] of the best, the one that costs the least CPU (on shared cores that CPU is the
/// destination's and the guest's). `current` stays unless another promises [`HYSTERESIS`] more,
/// or as much for a tenth less CPU. With nothing measured, `current` stays.
pub fn choose(r: &StreamRates, allowed: &[Codec], current: Codec) -> Choice {
    let mut predicted = [None; 3];
    let mut p: Vec<(Codec, f64, f64)> = Vec::new();
    for &c in allowed {
        if let Some((rate, _, cpu)) = predict(r, c) {
            predicted[c.index()] = Some(rate);
            p.push((c, rate, cpu));
        }
    }
    let top = p.iter().map(|x| x.1).fold(0.0, f64::max);
    let best = p
        .iter()
        .filter(|x| x.1 >= top * (1.0 - TIE))
        .min_by(|a, b| a.2.total_cmp(&b.2))
        .copied();
    let cur = p.iter().find(|x| x.0 == current).copied();
    let codec = match (best, cur) {
        (None, _) => current,
        (Some(b), None) => b.0,
        (Some(b), Some(c)) => {
            if b.1 > c.1 * HYSTERESIS || (b.1 >= c.1 * (1.0 - TIE) && b.2 < c.2 * 0.9) {
                b.0
            } else {
                current
            }
        }
    };
    Choice {
        codec,
        predicted_mb_s: predicted,
        link_bound: predict(r, codec).is_some_and(|p| p.1),
    }
}

/// A switch is a trial: if the first window with the new codec moved fewer non-zero pages per
/// busy second than the last window with the old one (by more than this share), the model was
/// wrong about what limits the stream (typically a destination short of CPU, which shows up as
/// a slow "link" that compression does not help), and the stream goes back.
pub const TRIAL_LOSS: f64 = 0.10;
/// Windows a codec that failed its trial is left out.
pub const TRIAL_BLOCK_WINDOWS: u32 = 8;

/// Whether a trial failed: `after` (MB/s of non-zero pages with the new codec) fell short of
/// `before` (with the old one).
pub fn trial_failed(before: f64, after: f64) -> bool {
    before.is_finite() && after.is_finite() && after < before * (1.0 - TRIAL_LOSS)
}

/// The link estimate after a window of `wall` seconds: `wire_mb_s` sent with `waited` of `busy`
/// seconds spent waiting on the kernel (see the module docs). The estimate drifts up only when
/// the stream was busy for most of the window (CPU-bound); a mostly idle stream (small late
/// rounds that fit in the socket buffers) says nothing about the link.
pub fn link_estimate(
    prev: Option<f64>,
    wire_mb_s: f64,
    waited: f64,
    busy: f64,
    wall: f64,
) -> Option<f64> {
    if busy <= 0.0 || !wire_mb_s.is_finite() || wire_mb_s <= 0.0 {
        return prev;
    }
    if waited / busy >= LINK_BOUND_WAIT {
        Some(wire_mb_s)
    } else if busy >= wall * 0.5 {
        prev.map(|p| (p * LINK_GROWTH).max(wire_mb_s))
    } else {
        prev.map(|p| p.max(wire_mb_s))
    }
}

/// A stream's choice as the summary reports it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct StreamTuning {
    pub stream: u32,
    /// The codec at the end of the migration.
    pub codec: Option<Codec>,
    /// How the codec was set: "auto" or the user's choice.
    pub mode: String,
    /// Codec changes during the migration.
    pub switches: u32,
    /// Pages sent with each codec in force (index [`Codec::index`]).
    pub pages_by_codec: [u64; 3],
    /// The last measurements the choice was made from.
    pub rates: Option<StreamRates>,
    /// The last prediction per codec, MB/s of guest memory.
    pub predicted_mb_s: [Option<f64>; 3],
    /// Switches undone because the new codec moved less than the old one (see
    /// [`TRIAL_LOSS`]).
    #[serde(default)]
    pub reverted: u32,
}

/// Sample one non-zero page in this many for the codec comparison.
pub const SAMPLE_EVERY: u32 = 128;
/// Re-evaluate at most this often.
pub const WINDOW: std::time::Duration = std::time::Duration::from_millis(150);
/// The first decision comes sooner.
pub const FIRST_WINDOW: std::time::Duration = std::time::Duration::from_millis(40);
/// Samples needed before a decision.
pub const MIN_SAMPLES: u32 = 8;

/// Sums over one window, kept by a stream worker (no clock reads per page: the worker times
/// sampled pages and whole batches only).
#[derive(Debug, Clone, Default)]
pub struct Meter {
    /// Per codec: sampled pages' encode nanoseconds and output bytes.
    pub sample_ns: [u64; 3],
    pub sample_out: [u64; 3],
    pub samples: u32,
    /// Countdown to the next sampled page.
    pub until_sample: u32,
    /// Pages and non-zero pages processed.
    pub pages: u64,
    pub nonzero: u64,
    /// Busy nanoseconds (batches), of which waiting on the kernel, and in frame sealing/CRC.
    pub busy_ns: u64,
    pub wait_ns: u64,
    pub frame_ns: u64,
    pub wire_bytes: u64,
    /// Sampling nanoseconds (not the stream's real work; subtracted).
    pub overhead_ns: u64,
}

impl Meter {
    /// Whether this non-zero page is sampled.
    pub fn sample_now(&mut self) -> bool {
        if self.until_sample == 0 {
            self.until_sample = SAMPLE_EVERY - 1;
            true
        } else {
            self.until_sample -= 1;
            false
        }
    }

    /// The window's rates, with `current` the codec the non-sampled pages used.
    pub fn rates(&self, current: Codec, link_mb_s: Option<f64>) -> Option<StreamRates> {
        if self.samples < MIN_SAMPLES || self.pages == 0 {
            return None;
        }
        let s = f64::from(self.samples);
        let page = PAGE as f64;
        let mut codecs = [None; 3];
        for c in Codec::ALL {
            let i = c.index();
            if self.sample_out[i] == 0 {
                continue; // not sampled (not allowed)
            }
            let ns = self.sample_ns[i] as f64 / s;
            codecs[i] = Some(CodecRate {
                encode_mb_s: if c == Codec::None {
                    f64::INFINITY.min(1e9)
                } else {
                    page / ns.max(1.0) * 1e3
                },
                ratio: (self.sample_out[i] as f64 / s / page).min(1.0),
            });
        }
        let pages = self.pages as f64;
        let nz = self.nonzero as f64;
        let wire_s_per_byte = if self.wire_bytes > 0 {
            self.frame_ns as f64 / 1e9 / self.wire_bytes as f64
        } else {
            0.0
        };
        let enc_cur = self.sample_ns[current.index()] as f64 / s / 1e9;
        let cpu = (self.busy_ns.saturating_sub(self.wait_ns + self.overhead_ns)) as f64 / 1e9;
        let base = (cpu - nz * enc_cur - self.frame_ns as f64 / 1e9).max(0.0) / pages;
        Some(StreamRates {
            codecs,
            base_s_per_page: base,
            wire_s_per_byte,
            nonzero: nz / pages,
            link_mb_s,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Codec; 3] = Codec::ALL;

    /// Rates like this machine's: copy ~0.4 us/page, LZ4 1.5 GB/s at 0.45, zstd 0.5 GB/s at
    /// 0.3, sealing ~1 GB/s.
    fn mixed(link: Option<f64>) -> StreamRates {
        StreamRates {
            codecs: [
                Some(CodecRate {
                    encode_mb_s: 1e9,
                    ratio: 1.0,
                }),
                Some(CodecRate {
                    encode_mb_s: 1500.0,
                    ratio: 0.45,
                }),
                Some(CodecRate {
                    encode_mb_s: 500.0,
                    ratio: 0.30,
                }),
            ],
            base_s_per_page: 0.4e-6,
            wire_s_per_byte: 1e-9,
            nonzero: 0.9,
            link_mb_s: link,
        }
    }

    #[test]
    fn unlimited_link_picks_the_cheapest_codec() {
        let c = choose(&mixed(None), &ALL, Codec::Lz4);
        assert_eq!(c.codec, Codec::None, "{c:?}");
        assert!(!c.link_bound);
        // A fast link (3 GB/s per stream) is still faster than the CPU: none.
        assert_eq!(
            choose(&mixed(Some(3000.0)), &ALL, Codec::Lz4).codec,
            Codec::None
        );
    }

    #[test]
    fn slow_link_buys_ratio_with_idle_cpu() {
        // 1 Gbit/s over two streams: ~60 MB/s each. zstd's ratio wins, and it is link-bound.
        let c = choose(&mixed(Some(60.0)), &ALL, Codec::None);
        assert_eq!(c.codec, Codec::Zstd, "{c:?}");
        assert!(c.link_bound);
        let p = c.predicted_mb_s;
        assert!(
            p[2].unwrap() > p[1].unwrap() && p[1].unwrap() > p[0].unwrap(),
            "{p:?}"
        );
        // In between (a ~10 Gbit/s link), LZ4 is the best compromise.
        assert_eq!(
            choose(&mixed(Some(600.0)), &ALL, Codec::None).codec,
            Codec::Lz4
        );
    }

    #[test]
    fn incompressible_pages_go_raw_on_any_link() {
        let mut r = mixed(Some(60.0));
        r.codecs[1] = Some(CodecRate {
            encode_mb_s: 4000.0,
            ratio: 1.0,
        });
        r.codecs[2] = Some(CodecRate {
            encode_mb_s: 2000.0,
            ratio: 1.0,
        });
        // Equal on the link: none costs the least CPU, so it replaces the current codec.
        let c = choose(&r, &ALL, Codec::Zstd);
        assert_eq!(c.predicted_mb_s[0], c.predicted_mb_s[2]);
        assert_eq!(c.codec, Codec::None, "{c:?}");
        assert!(c.link_bound);
        r.link_mb_s = None;
        assert_eq!(choose(&r, &ALL, Codec::Zstd).codec, Codec::None);
    }

    #[test]
    fn only_allowed_codecs_and_hysteresis() {
        let c = choose(&mixed(Some(60.0)), &[Codec::None, Codec::Lz4], Codec::None);
        assert_eq!(c.codec, Codec::Lz4);
        assert_eq!(c.predicted_mb_s[2], None);
        // Within the hysteresis the current codec stays.
        let mut r = mixed(Some(60.0));
        r.codecs[2] = Some(CodecRate {
            encode_mb_s: 500.0,
            ratio: 0.44,
        });
        assert_eq!(choose(&r, &ALL, Codec::Lz4).codec, Codec::Lz4);
        // Nothing measured: keep.
        let empty = StreamRates::default();
        assert_eq!(choose(&empty, &ALL, Codec::Zstd).codec, Codec::Zstd);
    }

    #[test]
    fn garbage_measurements_are_ignored() {
        let mut r = mixed(Some(60.0));
        r.codecs[2] = Some(CodecRate {
            encode_mb_s: f64::NAN,
            ratio: 0.1,
        });
        r.codecs[1] = Some(CodecRate {
            encode_mb_s: 100.0,
            ratio: -3.0,
        });
        let c = choose(&r, &ALL, Codec::None);
        assert_eq!(c.codec, Codec::None);
        assert_eq!(c.predicted_mb_s[1], None);
        assert_eq!(c.predicted_mb_s[2], None);
    }

    #[test]
    fn plans_follow_the_flags_and_the_peer_version() {
        let p = plan(CodecChoice::Auto, true, 2).unwrap();
        assert_eq!(
            (p.start, p.allowed.len(), p.delta, p.mode),
            (Codec::Lz4, 3, true, "auto")
        );
        assert_eq!(
            plan(CodecChoice::Auto, true, 1).unwrap().allowed,
            vec![Codec::None, Codec::Lz4]
        );
        // --no-compress overrides any codec.
        let p = plan(CodecChoice::Zstd, false, 2).unwrap();
        assert_eq!(
            (p.start, p.delta, p.allowed.is_empty()),
            (Codec::None, false, true)
        );
        assert_eq!(plan(CodecChoice::Lz4, true, 1).unwrap().start, Codec::Lz4);
        let e = plan(CodecChoice::Zstd, true, 1).unwrap_err();
        assert_eq!(e, crate::migrate::OptionError::ZstdNeedsVersion2(1));
        let e = e.to_string();
        assert!(e.contains("upgrade") && e.contains("version 2"), "{e}");
        assert_eq!("zstd".parse::<CodecChoice>(), Ok(CodecChoice::Zstd));
        assert!("gzip"
            .parse::<CodecChoice>()
            .unwrap_err()
            .to_string()
            .contains("auto"));
    }

    #[test]
    fn trials_fail_only_on_a_real_loss() {
        assert!(trial_failed(100.0, 80.0));
        assert!(!trial_failed(100.0, 95.0));
        assert!(!trial_failed(100.0, 300.0));
        assert!(!trial_failed(f64::NAN, 1.0));
    }

    #[test]
    fn link_estimate_follows_waits_and_only_rises_otherwise() {
        assert_eq!(link_estimate(None, 500.0, 0.0, 1.0, 1.0), None);
        assert_eq!(link_estimate(None, 60.0, 0.5, 1.0, 1.0), Some(60.0));
        // Link got shared: a link-bound window replaces the estimate.
        assert_eq!(link_estimate(Some(120.0), 60.0, 0.5, 1.0, 1.0), Some(60.0));
        // CPU-bound windows only raise it, and let it drift up (a hard-compressing stream
        // cannot see the link).
        assert_eq!(link_estimate(Some(60.0), 40.0, 0.0, 1.0, 1.0), Some(75.0));
        assert_eq!(link_estimate(Some(60.0), 90.0, 0.0, 1.0, 1.0), Some(90.0));
        assert_eq!(link_estimate(Some(60.0), 0.0, 0.0, 0.0, 1.0), Some(60.0));
        // A mostly idle window neither waits nor works: no drift.
        assert_eq!(link_estimate(Some(60.0), 40.0, 0.0, 0.1, 1.0), Some(60.0));
    }

    #[test]
    fn meter_turns_sums_into_rates() {
        let mut m = Meter::default();
        assert!(m.rates(Codec::Lz4, None).is_none());
        m.samples = 10;
        // Per sample: none 0 ns, lz4 2.7 us (1.5 GB/s), zstd 8.2 us (0.5 GB/s).
        m.sample_ns = [0, 27_307, 81_920];
        m.sample_out = [40960, 18432, 12288];
        m.pages = 1000;
        m.nonzero = 900;
        m.busy_ns = 5_000_000;
        m.wait_ns = 1_000_000;
        m.frame_ns = 500_000;
        m.wire_bytes = 500_000;
        let r = m.rates(Codec::Lz4, Some(60.0)).unwrap();
        let lz4 = r.codecs[1].unwrap();
        assert!((lz4.encode_mb_s - 1500.0).abs() < 5.0, "{lz4:?}");
        assert!((lz4.ratio - 0.45).abs() < 0.01);
        assert!((r.nonzero - 0.9).abs() < 1e-9);
        assert!((r.wire_s_per_byte - 1e-9).abs() < 1e-12);
        // cpu 4 ms - 900 * 2.73 us - 0.5 ms = 1.04 ms over 1000 pages.
        assert!((r.base_s_per_page - 1.04e-6).abs() < 0.02e-6, "{r:?}");
        // Sampling: every SAMPLE_EVERY-th call says yes.
        let mut m = Meter::default();
        let n = (0..SAMPLE_EVERY * 4).filter(|_| m.sample_now()).count();
        assert_eq!(n, 4);
    }
}
