//! `cargo xtask bench matrix`: end-to-end migration benchmarks in the lab, next to the raw
//! link rate measured in the same run. Each cell is one live migration (the guest ping-pongs
//! between the hosts); output: a table on stdout, JSON lines, a markdown table and SVG plots
//! under `target/bench/`, and the key ratios against the goals.
//!
//! The link dimension shapes the migration NIC (`mig0`) of both hosts with a tc token bucket
//! per cell (`none` removes it); the raw link (TCP blast) is measured per link shape and stream
//! count. The first migration of each guest into the other host ("cold": the kernel finds and
//! zeroes fresh memory there) is reported on its own row, apart from the warmed-up cells.
//!
//! - this file: the spec, its cells, link labels and the row each cell gives;
//! - `run`: the run in the lab (shaping the link, warm-up, the cells, the raw link);
//! - `report`: the markdown table, the goals and the A/B comparison;
//! - `plot`: the SVG plots.

use std::path::PathBuf;

use anyhow::Result;

use ferry::migrate::tune::CodecChoice;
use ferry::migrate::Summary;
use ferry::vm::workload::Profile;
use serde::Serialize;

mod plot;
mod report;
mod run;

pub use report::compare;
pub use run::run;

/// "Faster than the link": the guest dirties memory unpaced (GiB/s on this machine).
pub const FAST: u64 = 1 << 20;

/// What to run.
#[derive(Debug, Clone)]
pub struct MatrixSpec {
    pub memory_mib: Vec<u64>,
    pub profiles: Vec<Profile>,
    /// MiB/s; [`FAST`] = unpaced.
    pub rates: Vec<u64>,
    pub streams: Vec<u32>,
    pub compress: Vec<bool>,
    pub zero_copy: Vec<bool>,
    /// Encrypted (the default wherever the cluster key is configured, as in the lab) or plain.
    pub encrypt: Vec<bool>,
    /// Migration link shapes, Mbit/s (0 = unshaped veth).
    pub links: Vec<u64>,
    /// Page codecs (`--codec`; auto is the default).
    pub codecs: Vec<CodecChoice>,
    /// Shaped links only for the mixed guest at 64 MiB/s (the quick subset).
    pub shaped_mixed_only: bool,
    /// A label for the JSON and file names (A/B comparisons).
    pub label: String,
    pub ferry_bin: PathBuf,
}

impl MatrixSpec {
    /// Under two minutes on the 2-core lab machine: the cells behind the key ratios.
    pub fn quick(ferry_bin: PathBuf, label: String) -> MatrixSpec {
        MatrixSpec {
            memory_mib: vec![512],
            profiles: vec![Profile::Random, Profile::Mixed],
            rates: vec![0, 64, FAST],
            streams: vec![2],
            compress: vec![true],
            zero_copy: vec![true],
            encrypt: vec![true],
            links: vec![0, 1000],
            codecs: vec![CodecChoice::Auto],
            shaped_mixed_only: true,
            label,
            ferry_bin,
        }
    }

    fn cells(&self) -> Vec<Cell> {
        let mut v = Vec::new();
        for &memory_mib in &self.memory_mib {
            for &profile in &self.profiles {
                for &rate in &self.rates {
                    for &streams in &self.streams {
                        for &compress in &self.compress {
                            for &zero_copy in &self.zero_copy {
                                for &encrypt in &self.encrypt {
                                    for &link_mbit in &self.links {
                                        for &codec in &self.codecs {
                                            if !compress && codec != self.codecs[0] {
                                                // --no-compress overrides the codec.
                                                continue;
                                            }
                                            if self.shaped_mixed_only
                                                && link_mbit > 0
                                                && !(profile == Profile::Mixed && rate == 64)
                                            {
                                                continue;
                                            }
                                            v.push(Cell {
                                                memory_mib,
                                                profile,
                                                rate,
                                                streams,
                                                compress,
                                                zero_copy,
                                                encrypt,
                                                link_mbit,
                                                codec,
                                            });
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        v
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
struct Cell {
    memory_mib: u64,
    profile: Profile,
    rate: u64,
    streams: u32,
    compress: bool,
    zero_copy: bool,
    #[serde(default)]
    encrypt: bool,
    /// The migration NIC's shaped rate, Mbit/s (0: unshaped).
    #[serde(default)]
    link_mbit: u64,
    #[serde(default)]
    codec: CodecChoice,
}

impl Cell {
    fn link_label(&self) -> String {
        link_label(self.link_mbit)
    }

    fn codec_label(&self) -> &'static str {
        if self.compress {
            self.codec.name()
        } else {
            "off"
        }
    }

    /// The options a user gets without flags (streams: one per core, two here).
    fn is_default(&self) -> bool {
        self.compress && self.codec == CodecChoice::Auto
    }

    fn rate_label(&self) -> String {
        if self.rate >= FAST {
            "fast".into()
        } else {
            self.rate.to_string()
        }
    }
}

/// "none", "1gbit", "10gbit", "500mbit".
pub fn link_label(mbit: u64) -> String {
    match mbit {
        0 => "none".into(),
        m if m % 1000 == 0 => format!("{}gbit", m / 1000),
        m => format!("{m}mbit"),
    }
}

/// Parse a `--link` value: none, Ngbit, Nmbit.
pub fn parse_link(s: &str) -> Result<u64> {
    let bad = || {
        anyhow::anyhow!("--link: {s:?} is not none, a rate in gbit (10gbit) or in mbit (500mbit)")
    };
    if s == "none" {
        return Ok(0);
    }
    let (n, mul) = if let Some(n) = s.strip_suffix("gbit") {
        (n, 1000)
    } else if let Some(n) = s.strip_suffix("mbit") {
        (n, 1)
    } else {
        return Err(bad());
    };
    let n: u64 = n.parse().map_err(|_| bad())?;
    if n == 0 || n * mul > 400_000 {
        return Err(bad());
    }
    Ok(n * mul)
}

/// One cell's measurements.
#[derive(Debug, Clone, Serialize)]
struct Row {
    label: String,
    cell: Cell,
    /// The first migration of this guest into the other host (not a warmed-up cell).
    cold: bool,
    /// The codec each stream ended with ("zstd/zstd"), and whether auto chose it.
    codecs_chosen: String,
    /// Guest GiB per CPU-second on each side, as CPU-seconds per GiB moved.
    source_cpu_s_per_gib: f64,
    dest_cpu_s_per_gib: f64,
    /// The raw blast's CPU-seconds per GiB on each side (same link, same streams).
    blast_cpu_s_per_gib: (f64, f64),
    from: String,
    total_s: f64,
    downtime_ms: f64,
    guest_pause_ms: Option<f64>,
    rounds: usize,
    max_throttle: u8,
    wire_bytes: u64,
    guest_bytes: u64,
    /// Guest memory moved per second of migration (GiB/s).
    memory_gib_s: f64,
    /// Bytes on the wire per second of migration (GB/s).
    wire_gb_s: f64,
    /// The raw link rate (TCP blast, same stream count) measured in this run (GB/s).
    link_gb_s: f64,
    link_avg_gbit_s: Option<f64>,
    link_peak_gbit_s: Option<f64>,
    source_cpu_s: f64,
    dest_cpu_s: f64,
    summary: Summary,
}

fn sym(profile: Profile) -> &'static str {
    match profile {
        Profile::Zero => "zero",
        Profile::Random => "random",
        Profile::Text => "text",
        Profile::Mixed => "mixed",
    }
}

/// Per-stream codecs at the end ("zstd/zstd"), from the summary.
fn codecs_chosen(s: &Summary) -> String {
    let v: Vec<&str> = s
        .tuning
        .iter()
        .map(|t| t.codec.map_or("?", |c| c.name()))
        .collect();
    if v.is_empty() {
        "-".into()
    } else {
        v.join("/")
    }
}
