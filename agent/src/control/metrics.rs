//! Prometheus metrics (opt-in: `[metrics] address = "ADDR:PORT"`, served as text at
//! `GET /metrics`). Counters and histograms of migrations are updated when a migration ends
//! (both directions: the daemon registers [`ended`] with [`crate::migrate::observe_endings`], so
//! the engine never calls up into the control plane); guests by state and link utilization are
//! read at scrape time.
//!
//! Series:
//! - `ferry_migrations_total{direction,result}`: ended migrations (`completed`, `failed`,
//!   `cancelled`).
//! - `ferry_migration_failures_total{direction,reason}`: failures by kind (`refused`,
//!   `timeout`, `policy`, `connect`, `stream`, `lost`, `auth`, `verify`, `cancelled`, `other`).
//! - `ferry_migration_duration_seconds` and `ferry_migration_downtime_seconds`: histograms of
//!   completed outgoing migrations.
//! - `ferry_migration_bytes_total{encoding}`: bytes on the wire by page encoding (outgoing).
//! - `ferry_guests{state}`: guests on this host by state.
//! - `ferry_link_bits_per_second{interface,direction}` and
//!   `ferry_link_utilization_ratio{interface,direction}`: the eBPF link counters, last second.

use std::fmt::Write as _;
use std::sync::Mutex;

use crate::migrate::{MigrateError, MigrationRecord, Phase};

const DURATION_BUCKETS: [f64; 10] = [0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];
const DOWNTIME_BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

#[derive(Debug, Default, Clone)]
struct Histogram {
    /// Per bucket (not cumulative); the last is +Inf.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, bounds: &[f64], v: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; bounds.len() + 1];
        }
        let i = bounds.iter().position(|b| v <= *b).unwrap_or(bounds.len());
        self.counts[i] += 1;
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str, bounds: &[f64]) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut acc = 0;
        for (i, b) in bounds.iter().enumerate() {
            acc += self.counts.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {acc}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

#[derive(Debug, Default)]
struct Registry {
    /// (direction, result) -> count
    ended: std::collections::BTreeMap<(String, String), u64>,
    /// (direction, reason) -> count
    failures: std::collections::BTreeMap<(String, String), u64>,
    duration: Histogram,
    downtime: Histogram,
    /// encoding -> bytes
    bytes: std::collections::BTreeMap<String, u64>,
}

static REGISTRY: Mutex<Option<Registry>> = Mutex::new(None);

/// The kind of a failure, for the `reason` label.
pub fn reason(e: &MigrateError) -> &'static str {
    match e {
        MigrateError::Cancelled => "cancelled",
        MigrateError::Refused { .. } => "refused",
        MigrateError::Timeout { .. } => "timeout",
        MigrateError::Policy(_) => "policy",
        MigrateError::Connect { .. } => "connect",
        MigrateError::Stream { .. } | MigrateError::Protocol(_) => "stream",
        MigrateError::Auth(_) => "auth",
        MigrateError::Lost { .. } => "lost",
        MigrateError::DigestMismatch { .. } => "verify",
        _ => "other",
    }
}

/// A migration ended (called once per migration, with its final record).
pub fn ended(rec: &MigrationRecord, failure: Option<&MigrateError>) {
    let Ok(mut g) = REGISTRY.lock() else { return };
    let r = g.get_or_insert_with(Registry::default);
    let result = match rec.phase {
        Phase::Completed => "completed",
        Phase::Cancelled => "cancelled",
        _ => "failed",
    };
    *r.ended
        .entry((rec.direction.clone(), result.into()))
        .or_default() += 1;
    if let Some(e) = failure {
        *r.failures
            .entry((rec.direction.clone(), reason(e).into()))
            .or_default() += 1;
    }
    if rec.phase == Phase::Completed && rec.direction == "out" {
        if let Some(s) = &rec.summary {
            r.duration.observe(&DURATION_BUCKETS, s.total_s);
            r.downtime
                .observe(&DOWNTIME_BUCKETS, s.downtime.total_ms / 1000.0);
            for (name, st) in [
                ("zero", s.encodings.zero),
                ("lz4", s.encodings.lz4),
                ("zstd", s.encodings.zstd),
                ("delta", s.encodings.delta),
                ("raw", s.encodings.raw),
            ] {
                *r.bytes.entry(name.into()).or_default() += st.bytes;
            }
        }
    }
}

/// What the scrape adds from the agent's current state.
#[derive(Debug, Default)]
pub struct Live {
    /// state -> guests
    pub guests: std::collections::BTreeMap<String, u64>,
    /// (interface, direction, bits per second, utilization ratio if the speed is known)
    pub links: Vec<(String, &'static str, f64, Option<f64>)>,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The Prometheus text exposition.
pub fn render(live: &Live) -> String {
    let mut out = String::new();
    let g = REGISTRY.lock().ok();
    let empty = Registry::default();
    let r = g.as_ref().and_then(|g| g.as_ref()).unwrap_or(&empty);
    out += "# HELP ferry_migrations_total Migrations that ended, by direction and result.\n# TYPE ferry_migrations_total counter\n";
    for ((d, res), n) in &r.ended {
        let _ = writeln!(
            out,
            "ferry_migrations_total{{direction=\"{}\",result=\"{}\"}} {n}",
            escape(d),
            escape(res)
        );
    }
    out += "# HELP ferry_migration_failures_total Failed or cancelled migrations, by kind.\n# TYPE ferry_migration_failures_total counter\n";
    for ((d, why), n) in &r.failures {
        let _ = writeln!(
            out,
            "ferry_migration_failures_total{{direction=\"{}\",reason=\"{}\"}} {n}",
            escape(d),
            escape(why)
        );
    }
    r.duration.render(
        &mut out,
        "ferry_migration_duration_seconds",
        "Total time of completed outgoing migrations.",
        &DURATION_BUCKETS,
    );
    r.downtime.render(
        &mut out,
        "ferry_migration_downtime_seconds",
        "Downtime (source pause to destination running) of completed outgoing migrations.",
        &DOWNTIME_BUCKETS,
    );
    out += "# HELP ferry_migration_bytes_total Bytes on the wire of outgoing migrations, by page encoding.\n# TYPE ferry_migration_bytes_total counter\n";
    for (e, n) in &r.bytes {
        let _ = writeln!(
            out,
            "ferry_migration_bytes_total{{encoding=\"{}\"}} {n}",
            escape(e)
        );
    }
    out += "# HELP ferry_guests Guests on this host, by state.\n# TYPE ferry_guests gauge\n";
    for (s, n) in &live.guests {
        let _ = writeln!(out, "ferry_guests{{state=\"{}\"}} {n}", escape(s));
    }
    out += "# HELP ferry_link_bits_per_second Traffic per interface and direction over the last second (eBPF counters).\n# TYPE ferry_link_bits_per_second gauge\n";
    for (i, d, bps, _) in &live.links {
        let _ = writeln!(
            out,
            "ferry_link_bits_per_second{{interface=\"{}\",direction=\"{d}\"}} {bps}",
            escape(i)
        );
    }
    out += "# HELP ferry_link_utilization_ratio Traffic over the interface's speed, last second.\n# TYPE ferry_link_utilization_ratio gauge\n";
    for (i, d, _, u) in &live.links {
        if let Some(u) = u {
            let _ = writeln!(
                out,
                "ferry_link_utilization_ratio{{interface=\"{}\",direction=\"{d}\"}} {u}",
                escape(i)
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_end_in_the_count() {
        let mut h = Histogram::default();
        for v in [0.1, 0.3, 3.0, 400.0] {
            h.observe(&DURATION_BUCKETS, v);
        }
        let mut s = String::new();
        h.render(&mut s, "x", "help", &DURATION_BUCKETS);
        assert!(s.contains("x_bucket{le=\"0.25\"} 1\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"0.5\"} 2\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"5\"} 3\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"300\"} 3\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"+Inf\"} 4\n"), "{s}");
        assert!(s.contains("x_count 4\n"), "{s}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
