//! A data stream's page codec, tuned from what the stream measures (see
//! [`crate::migrate::tune`] for the model): the worker calls [`Tuner::begin`]/[`Tuner::end`]
//! around each batch, [`Tuner::sample`] on sampled pages and [`Tuner::tick`] after each frame.

use std::time::{Duration, Instant};

use super::worker::DataConn;
use crate::migrate::codec::{Codec, Encoder, PAGE};
use crate::migrate::tune::{self, CodecPlan, Meter, StreamTuning};

/// A stream's page codec and the measuring behind it (see [`crate::migrate::tune`]): clock reads per
/// sampled page, per frame and per batch only.
pub(super) struct Tuner {
    pub(super) stream: u32,
    pub(super) codec: Codec,
    pub(super) meter: Meter,
    pub(super) link_mb_s: Option<f64>,
    pub(super) window_start: Instant,
    pub(super) active_since: Option<Instant>,
    pub(super) wait_mark: u64,
    pub(super) wire_mark: u64,
    pub(super) report: StreamTuning,
    /// A switch under trial: the codec before it and the non-zero MB/s it achieved.
    pub(super) trial: Option<(Codec, f64)>,
    /// Windows each codec stays left out after a failed trial.
    pub(super) blocked: [u32; 3],
}

pub(super) fn nanos(d: Duration) -> u64 {
    d.as_nanos().min(u128::from(u64::MAX)) as u64
}

impl Tuner {
    pub(super) fn new(stream: u32, plan: &CodecPlan) -> Tuner {
        Tuner {
            stream,
            codec: plan.start,
            meter: Meter::default(),
            link_mb_s: None,
            window_start: Instant::now(),
            active_since: None,
            wait_mark: 0,
            wire_mark: 0,
            trial: None,
            blocked: [0; 3],
            report: StreamTuning {
                stream,
                codec: Some(plan.start),
                mode: plan.mode.to_string(),
                ..StreamTuning::default()
            },
        }
    }

    pub(super) fn auto(plan: &CodecPlan) -> bool {
        !plan.allowed.is_empty()
    }

    /// A batch of pages starts (busy time counts from here)…
    pub(super) fn begin(&mut self, c: &DataConn) {
        if self.active_since.is_none() && self.meter.pages == 0 {
            // A fresh window: rates from here.
            self.window_start = Instant::now();
            self.wait_mark = c.out.waited_ns();
            self.wire_mark = c.out.bytes();
        }
        self.active_since = Some(Instant::now());
    }

    /// …and ends (waiting for work or acknowledgements is not busy).
    pub(super) fn end(&mut self) {
        if let Some(t) = self.active_since.take() {
            self.meter.busy_ns += nanos(t.elapsed());
        }
    }

    /// Run every allowed codec on `page` (one sampled page), timed.
    pub(super) fn sample(&mut self, enc: &mut Encoder, page: &[u8], plan: &CodecPlan) {
        let Ok(page) = <&[u8; PAGE]>::try_from(page) else {
            return;
        };
        let t0 = Instant::now();
        for &c in &plan.allowed {
            if c == Codec::None {
                self.meter.sample_out[0] += PAGE as u64;
                continue;
            }
            let t = Instant::now();
            let n = enc.compress(page, c).unwrap_or(PAGE);
            self.meter.sample_ns[c.index()] += nanos(t.elapsed());
            self.meter.sample_out[c.index()] += n as u64;
        }
        self.meter.samples += 1;
        self.meter.overhead_ns += nanos(t0.elapsed());
    }

    /// After a frame: when the window is over, re-decide from what it measured.
    pub(super) fn tick(&mut self, c: &DataConn) {
        let window = if self.report.switches == 0 && self.report.rates.is_none() {
            tune::FIRST_WINDOW
        } else {
            tune::WINDOW
        };
        let now = Instant::now();
        if now - self.window_start < window || self.meter.samples < tune::MIN_SAMPLES {
            return;
        }
        if let Some(t) = self.active_since {
            self.meter.busy_ns += nanos(now - t);
            self.active_since = Some(now);
        }
        self.meter.wait_ns = c.out.waited_ns() - self.wait_mark;
        self.meter.wire_bytes = c.out.bytes() - self.wire_mark;
        let busy = self.meter.busy_ns as f64 / 1e9;
        if busy > 0.0 {
            self.link_mb_s = tune::link_estimate(
                self.link_mb_s,
                self.meter.wire_bytes as f64 / busy / 1e6,
                self.meter.wait_ns as f64 / 1e9,
                busy,
                (now - self.window_start).as_secs_f64(),
            );
        }
        // What this window achieved: non-zero pages per busy second (zero pages cost little,
        // and their share varies along guest memory).
        let achieved = self.meter.nonzero as f64 * PAGE as f64 / busy.max(1e-9) / 1e6;
        for b in &mut self.blocked {
            *b = b.saturating_sub(1);
        }
        let mut decided = false;
        if let Some((prev, before)) = self.trial.take() {
            if tune::trial_failed(before, achieved) {
                tracing::debug!(
                    stream = self.stream,
                    from = self.codec.name(),
                    back_to = prev.name(),
                    before_mb_s = before,
                    after_mb_s = achieved,
                    "page codec switch undone: it moved less"
                );
                self.blocked[self.codec.index()] = tune::TRIAL_BLOCK_WINDOWS;
                self.codec = prev;
                self.report.switches += 1;
                self.report.reverted += 1;
                self.report.codec = Some(prev);
                decided = true;
            }
        }
        let allowed: Vec<Codec> = c
            .plan
            .allowed
            .iter()
            .copied()
            .filter(|x| *x == self.codec || self.blocked[x.index()] == 0)
            .collect();
        if let Some(r) = self
            .meter
            .rates(self.codec, self.link_mb_s)
            .filter(|_| !decided)
        {
            let ch = tune::choose(&r, &allowed, self.codec);
            if ch.codec != self.codec {
                self.trial = Some((self.codec, achieved));
                self.report.switches += 1;
                tracing::debug!(
                    stream = self.stream,
                    from = self.codec.name(),
                    to = ch.codec.name(),
                    link_mb_s = self.link_mb_s,
                    predicted_mb_s = ?ch.predicted_mb_s,
                    "page codec changed"
                );
                self.codec = ch.codec;
            }
            self.report.codec = Some(self.codec);
            self.report.rates = Some(r);
            self.report.predicted_mb_s = ch.predicted_mb_s;
        }
        let until = self.meter.until_sample;
        self.meter = Meter {
            until_sample: until,
            ..Meter::default()
        };
        self.window_start = now;
        self.wait_mark = c.out.waited_ns();
        self.wire_mark = c.out.bytes();
    }
}
