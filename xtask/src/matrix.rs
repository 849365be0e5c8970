//! `cargo xtask bench matrix`: end-to-end migration benchmarks in the lab, next to the raw
//! link rate measured in the same run. Each cell is one live migration (the guest ping-pongs
//! between the hosts); output: a table on stdout, JSON lines, a markdown table and SVG plots
//! under `target/bench/`, and the key ratios against the goals.
//!
//! The link dimension shapes the migration NIC (`mig0`) of both hosts with a tc token bucket
//! per cell (`none` removes it); the raw link (TCP blast) is measured per link shape and stream
//! count. The first migration of each guest into the other host ("cold": the kernel finds and
//! zeroes fresh memory there) is reported on its own row, apart from the warmed-up cells.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

use ferry::control::client::Client;
use ferry::migrate::blast::{BlastMode, BlastResult};
use ferry::migrate::tune::CodecChoice;
use ferry::migrate::{MigrateOptions, Summary};
use ferry::transport::uring::SendMode;
use ferry::vm::workload::Profile;
use serde::Serialize;

use crate::dev::{blast, cpu_seconds, filled, migrate_and_wait, wait, workload, workspace_root};
use crate::lab::{Lab, LabOptions};

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

/// Shape (or unshape, `mbit` 0) the migration NIC of both lab hosts: a token bucket as
/// LAB.md and the tests' `slow_migration_link` do, its burst two milliseconds' worth (at
/// least 256 KiB).
fn shape(lab: &Lab, mbit: u64) -> Result<()> {
    for h in ["a", "b"] {
        if mbit == 0 {
            // No root qdisc to delete is fine: the link is unshaped either way.
            let _ = lab.exec(h, &["tc", "qdisc", "del", "dev", "mig0", "root"]);
        } else {
            let burst = format!("{}", (mbit * 1_000_000 / 8 / 500).max(256 << 10));
            lab.exec(
                h,
                &[
                    "tc",
                    "qdisc",
                    "replace",
                    "dev",
                    "mig0",
                    "root",
                    "tbf",
                    "rate",
                    &format!("{mbit}mbit"),
                    "burst",
                    &burst,
                    "latency",
                    "100ms",
                ],
            )
            .with_context(|| format!("shaping mig0 on host {h} to {mbit} Mbit/s"))?;
        }
    }
    Ok(())
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

/// Run the matrix; returns the path of the JSON lines.
pub fn run(spec: &MatrixSpec) -> Result<PathBuf> {
    let lab = Lab::up(
        LabOptions::for_test(&format!("bm-{}", spec.label)).with_ferry_bin(&spec.ferry_bin),
    )?;
    let hosts = ["a", "b"].map(|h| {
        let x = lab.host(h).expect("lab host");
        (Client::new(&x.socket), x.agent_pid.unwrap_or(0))
    });
    let out_dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    println!("ferry under test: {}", spec.ferry_bin.display());

    // The raw link, per link shape and stream count, measured now (and again at the end):
    // about two seconds' worth on a shaped link, 2 GiB on the veth.
    let blast = |mbit: u64, streams: u32| -> Result<BlastResult> {
        shape(&lab, mbit)?;
        let bytes = if mbit == 0 {
            2 << 30
        } else {
            (mbit * 1_000_000 / 8 * 2).min(2 << 30)
        };
        blast(&hosts[0].0, BlastMode::Tcp, streams, bytes)
    };
    let mut link = std::collections::BTreeMap::new();
    for &l in &spec.links {
        for &s in &spec.streams {
            let r = blast(l, s)?;
            println!(
                "raw link {} (TCP blast, {s} stream{}): {:.2} GB/s; CPU s/GiB send {:.2}, receive {:.2}",
                link_label(l),
                if s == 1 { "" } else { "s" },
                r.gbytes_per_s,
                r.send_cpu_s_per_gib,
                r.recv_cpu_s_per_gib
            );
            link.insert((l, s), r);
        }
    }
    shape(&lab, 0)?;
    println!(
        "\n{:<6} {:>6} {:>5} {:>6} {:>3} {:>5} {:>3} {:>3} {:>4} {:>9} {:>8} {:>9} {:>8} {:>6} {:>9} {:>6} {:>7} {:>11}",
        "MEM",
        "DATA",
        "DIRTY",
        "LINK",
        "STR",
        "CODEC",
        "ZC",
        "AES",
        "RUN",
        "CHOSEN",
        "TOTAL",
        "DOWNTIME",
        "PAUSE",
        "ROUNDS",
        "MEM GiB/s",
        "LINK %",
        "SRC/DST",
        "CPU s/GiB"
    );
    let mut rows = Vec::new();
    let mut jsonl = String::new();
    let mut n = 0;
    let mut record = |row: Row, rows: &mut Vec<Row>| -> Result<()> {
        let c = row.cell;
        println!(
            "{:<6} {:>6} {:>5} {:>6} {:>3} {:>5} {:>3} {:>3} {:>4} {:>9} {:>7.2}s {:>6.2}ms {:>6}ms {:>6} {:>9.2} {:>5.0}% {:>7} {:>5.2}/{:<5.2}",
            format!("{}M", c.memory_mib),
            sym(c.profile),
            c.rate_label(),
            c.link_label(),
            c.streams,
            c.codec_label(),
            if c.zero_copy { "on" } else { "off" },
            if c.encrypt { "on" } else { "off" },
            if row.cold { "cold" } else { "warm" },
            row.codecs_chosen,
            row.total_s,
            row.downtime_ms,
            row.guest_pause_ms.map_or("-".into(), |p| format!("{p:.1}")),
            row.rounds,
            row.memory_gib_s,
            100.0 * row.wire_gb_s / row.link_gb_s,
            format!("{:.1}/{:.1}", row.source_cpu_s, row.dest_cpu_s),
            row.source_cpu_s_per_gib,
            row.dest_cpu_s_per_gib,
        );
        jsonl += &serde_json::to_string(&row)?;
        jsonl.push('\n');
        rows.push(row);
        Ok(())
    };
    let make_row = |cell: Cell, cold: bool, from: usize, s: Summary, cpu: (f64, f64)| -> Row {
        let b = link.get(&(cell.link_mbit, cell.streams));
        let gib = (s.guest_bytes as f64 / (1u64 << 30) as f64).max(1e-9);
        Row {
            label: spec.label.clone(),
            cell,
            cold,
            codecs_chosen: codecs_chosen(&s),
            source_cpu_s_per_gib: cpu.0 / gib,
            dest_cpu_s_per_gib: cpu.1 / gib,
            blast_cpu_s_per_gib: b.map_or((f64::NAN, f64::NAN), |b| {
                (b.send_cpu_s_per_gib, b.recv_cpu_s_per_gib)
            }),
            from: ["a", "b"][from].into(),
            total_s: s.total_s,
            downtime_ms: s.downtime.total_ms,
            guest_pause_ms: s.guest_pause_ms,
            rounds: s.rounds.len(),
            max_throttle: s.max_throttle,
            wire_bytes: s.wire_bytes,
            guest_bytes: s.guest_bytes,
            memory_gib_s: (cell.memory_mib as f64 / 1024.0) / s.total_s,
            wire_gb_s: s.wire_bytes as f64 / s.total_s / 1e9,
            link_gb_s: b.map_or(f64::NAN, |b| b.gbytes_per_s),
            link_avg_gbit_s: s.link.as_ref().map(|k| k.avg_bits_per_s / 1e9),
            link_peak_gbit_s: s.link.as_ref().map(|k| k.peak_bits_per_s / 1e9),
            source_cpu_s: cpu.0,
            dest_cpu_s: cpu.1,
            summary: s,
        }
    };
    let cpu_of = |from: usize, to: usize| {
        (
            cpu_seconds(hosts[from].1).unwrap_or(0.0),
            cpu_seconds(hosts[to].1).unwrap_or(0.0),
        )
    };
    for group in spec
        .cells()
        .chunk_by(|a, b| a.memory_mib == b.memory_mib && a.profile == b.profile && a.rate == b.rate)
    {
        let c0 = group[0];
        n += 1;
        let name = format!("bm{n}");
        let _: ferry::control::agent::VmInfo = hosts[0].0.post(
            "/v1/vms",
            &workload(&name, c0.memory_mib, 2, c0.profile, c0.rate),
        )?;
        wait("fill", 600, || filled(&hosts[0].0, &name))?;
        // Warm-up on the unshaped link: the first migration into a host also pays for the
        // kernel finding and zeroing fresh memory (about twice the time here), so it is
        // reported on its own ("cold", with the default options); after one round trip both
        // hosts have had the memory once, and the cells compare like with like.
        shape(&lab, 0)?;
        for (from, to) in [(0usize, 1usize), (1, 0)] {
            let cpu0 = cpu_of(from, to);
            let s = migrate_and_wait(
                &hosts[from].0,
                &name,
                ["a", "b"][to],
                MigrateOptions::default(),
            )
            .context("warm-up migration")?;
            let cpu1 = cpu_of(from, to);
            if from == 0 {
                let cell = Cell {
                    streams: s.streams,
                    compress: true,
                    zero_copy: true,
                    encrypt: s.encrypted,
                    link_mbit: 0,
                    codec: CodecChoice::Auto,
                    ..c0
                };
                let row = make_row(cell, true, from, s, (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1));
                record(row, &mut rows)?;
            }
        }
        std::thread::sleep(Duration::from_secs(1));
        let mut at = 0usize;
        let mut shaped = 0;
        for &cell in group {
            let (from, to) = (at, 1 - at);
            if cell.link_mbit != shaped {
                shape(&lab, cell.link_mbit)?;
                shaped = cell.link_mbit;
            }
            let cpu0 = cpu_of(from, to);
            let s = migrate_and_wait(
                &hosts[from].0,
                &name,
                ["a", "b"][to],
                MigrateOptions {
                    streams: cell.streams,
                    compress: cell.compress,
                    codec: cell.codec,
                    encrypt: cell.encrypt,
                    no_encrypt: !cell.encrypt,
                    send_mode: if cell.zero_copy {
                        SendMode::ZeroCopyFixed
                    } else {
                        SendMode::Uring
                    },
                    ..MigrateOptions::default()
                },
            )
            .with_context(|| format!("{cell:?}"))?;
            let cpu1 = cpu_of(from, to);
            let row = make_row(cell, false, from, s, (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1));
            record(row, &mut rows)?;
            at = to;
        }
        shape(&lab, 0)?;
        hosts[at].0.delete(&format!("/v1/vms/{name}"))?;
    }
    for &l in &spec.links {
        for &s in &spec.streams {
            let r = blast(l, s)?;
            println!(
                "raw link {} again at the end ({s} stream{}): {:.2} GB/s",
                link_label(l),
                if s == 1 { "" } else { "s" },
                r.gbytes_per_s
            );
        }
    }
    shape(&lab, 0)?;
    lab.down()?;

    let base = out_dir.join(format!("matrix-{}", spec.label));
    let jsonl_path = base.with_extension("jsonl");
    std::fs::write(&jsonl_path, jsonl)?;
    std::fs::write(base.with_extension("md"), markdown(&rows))?;
    plot(&rows, &base)?;
    println!("\n{}", goals(&rows));
    println!(
        "results: {} (.md, -rate.svg, -downtime.svg next to it)",
        jsonl_path.display()
    );
    Ok(jsonl_path)
}

fn markdown(rows: &[Row]) -> String {
    let mut s = String::from(
        "| memory | content | dirty MiB/s | link | streams | codec | zero-copy | AES | run | chosen | total s | downtime ms | guest pause ms | rounds | memory GiB/s | wire GB/s | raw link GB/s | link avg/peak Gbit/s | CPU s/GiB src/dst (blast) |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let c = r.cell;
        s += &format!(
            "| {} MiB | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.2} | {:.2} | {} | {} | {:.2} | {:.2} | {:.2} | {} | {:.2}/{:.2} ({:.2}/{:.2}) |\n",
            c.memory_mib,
            sym(c.profile),
            c.rate_label(),
            c.link_label(),
            c.streams,
            c.codec_label(),
            if c.zero_copy { "on" } else { "off" },
            if c.encrypt { "on" } else { "off" },
            if r.cold { "cold" } else { "warm" },
            r.codecs_chosen,
            r.total_s,
            r.downtime_ms,
            r.guest_pause_ms.map_or("-".into(), |p| format!("{p:.1}")),
            r.rounds,
            r.memory_gib_s,
            r.wire_gb_s,
            r.link_gb_s,
            match (r.link_avg_gbit_s, r.link_peak_gbit_s) {
                (Some(a), Some(p)) => format!("{a:.2}/{p:.2}"),
                _ => "-".into(),
            },
            r.source_cpu_s_per_gib,
            r.dest_cpu_s_per_gib,
            r.blast_cpu_s_per_gib.0,
            r.blast_cpu_s_per_gib.1,
        );
    }
    s
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

/// The link a cell's rates are held against, GB/s: the shaped rate where shaped, else the
/// raw blast of the run.
fn link_gb_s(r: &Row) -> f64 {
    if r.cell.link_mbit > 0 {
        r.cell.link_mbit as f64 / 8.0 / 1000.0
    } else {
        r.link_gb_s
    }
}

/// The goals of issue 17, each met or missed, with its number (warmed-up cells only).
fn goals(rows: &[Row]) -> String {
    let mut out = String::from("goals (warmed-up cells; cold rows are reported, not judged):\n");
    let mut line = |name: &str, v: Option<(bool, String)>| {
        out += &match v {
            Some((ok, n)) => format!(
                "  {:<62} {:<6} {}\n",
                name,
                if ok { "met" } else { "MISSED" },
                n
            ),
            None => format!("  {name:<62} (no cell measures it)\n"),
        };
    };
    let warm: Vec<&Row> = rows.iter().filter(|r| !r.cold).collect();
    let gb = |r: &Row| r.memory_gib_s * (1u64 << 30) as f64 / 1e9;

    // Defaults (auto codec) against the best fixed option (codec x streams) of the same case.
    let mut worst: Option<(f64, String)> = None;
    let mut cases = 0;
    for d in warm.iter().filter(|r| r.cell.is_default()) {
        let same = |r: &&&Row| {
            let (a, b) = (r.cell, d.cell);
            a.memory_mib == b.memory_mib
                && a.profile == b.profile
                && a.rate == b.rate
                && a.link_mbit == b.link_mbit
                && a.encrypt == b.encrypt
                && a.zero_copy == b.zero_copy
                && !a.is_default()
        };
        let best = warm
            .iter()
            .filter(same)
            .map(|r| r.total_s)
            .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.min(x))));
        if let Some(best) = best {
            cases += 1;
            let ratio = d.total_s / best;
            if worst.as_ref().is_none_or(|w| ratio > w.0) {
                worst = Some((
                    ratio,
                    format!(
                        "{} {} {} link {} s{}",
                        d.cell.memory_mib,
                        sym(d.cell.profile),
                        d.cell.rate_label(),
                        d.cell.link_label(),
                        d.cell.streams
                    ),
                ));
            }
        }
    }
    line(
        "defaults within 10 % of the best fixed option, every cell",
        worst.map(|(x, at)| {
            (
                x <= 1.10,
                format!(
                    "worst {:.0} % of the best's time ({at}; {cases} cases)",
                    x * 100.0
                ),
            )
        }),
    );
    let big: Vec<&&Row> = warm
        .iter()
        .filter(|r| {
            r.cell.is_default()
                && r.cell.memory_mib == 4096
                && r.cell.profile == Profile::Mixed
                && r.cell.rate == 64
                && r.cell.link_mbit == 0
        })
        .collect();
    line(
        "4 GiB mixed 64 MiB/s unshaped: total <= 1.0 s, downtime <= 2 ms",
        big.iter()
            .map(|r| (r.total_s, r.downtime_ms))
            .reduce(|a, b| (a.0.max(b.0), a.1.max(b.1)))
            .map(|(t, d)| (t <= 1.0 && d <= 2.0, format!("{t:.2} s, {d:.2} ms (worst)"))),
    );
    for (profile, goal) in [(Profile::Mixed, 3.0), (Profile::Text, 4.0)] {
        let v: Vec<f64> = warm
            .iter()
            .filter(|r| {
                r.cell.is_default() && r.cell.link_mbit == 1000 && r.cell.profile == profile
            })
            .map(|r| gb(r) / link_gb_s(r))
            .collect();
        line(
            &format!(
                "1 Gbit/s: {} memory moved >= {goal}x the link",
                sym(profile)
            ),
            v.iter()
                .copied()
                .reduce(f64::min)
                .map(|x| (x >= goal, format!("{x:.2}x (worst of {})", v.len()))),
        );
    }
    let util: Vec<f64> = warm
        .iter()
        .filter(|r| r.cell.is_default() && r.cell.link_mbit > 0)
        .filter_map(|r| {
            r.link_avg_gbit_s
                .map(|a| a / (r.cell.link_mbit as f64 / 1000.0))
        })
        .collect();
    line(
        "shaped link: utilization during the copy >= 95 % of the rate",
        util.iter().copied().reduce(f64::min).map(|x| {
            (
                x >= 0.95,
                format!("{:.0} % (worst of {})", x * 100.0, util.len()),
            )
        }),
    );
    let cpu: Vec<(f64, f64)> = warm
        .iter()
        .filter(|r| r.cell.is_default() && r.cell.profile == Profile::Random)
        .map(|r| {
            (
                r.source_cpu_s_per_gib / r.blast_cpu_s_per_gib.0,
                r.dest_cpu_s_per_gib / r.blast_cpu_s_per_gib.1,
            )
        })
        .collect();
    line(
        "random: CPU-s per GiB each side <= 1.3x the raw blast's",
        cpu.iter()
            .copied()
            .reduce(|a, b| (a.0.max(b.0), a.1.max(b.1)))
            .map(|(s, d)| {
                (
                    s <= 1.3 && d <= 1.3,
                    format!("source {s:.2}x, destination {d:.2}x (worst)"),
                )
            }),
    );
    let quiet: Vec<f64> = warm
        .iter()
        .filter(|r| {
            r.cell.is_default()
                && r.cell.rate < FAST
                && (r.cell.rate as f64) * 1048576.0 <= link_gb_s(r) * 1e9 / 4.0
        })
        .map(|r| r.downtime_ms)
        .collect();
    line(
        "median downtime <= 2 ms at dirty rates <= link/4",
        median(quiet.clone()).map(|m| (m <= 2.0, format!("{m:.2} ms over {} cells", quiet.len()))),
    );
    let fast: Vec<&&Row> = warm.iter().filter(|r| r.cell.rate >= FAST).collect();
    line(
        "faster-than-link guest converges, guest pause <= 50 ms",
        fast.iter()
            .filter_map(|r| r.guest_pause_ms)
            .reduce(f64::max)
            .map(|x| {
                (
                    x <= 50.0,
                    format!("{x:.1} ms (worst of {} cells)", fast.len()),
                )
            }),
    );
    let cold: Vec<String> = rows
        .iter()
        .filter(|r| r.cold)
        .map(|r| {
            format!(
                "{} {} {}: {:.2} s",
                r.cell.memory_mib,
                sym(r.cell.profile),
                r.cell.rate_label(),
                r.total_s
            )
        })
        .collect();
    if !cold.is_empty() {
        out += &format!(
            "cold (first migration into the other host): {}\n",
            cold.join("; ")
        );
    }
    out
}

fn plot(rows: &[Row], base: &Path) -> Result<()> {
    use plotters::prelude::*;
    let labels: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{} {} {} s{} {}{}{}{}",
                sym(r.cell.profile),
                r.cell.rate_label(),
                r.cell.link_label(),
                r.cell.streams,
                r.cell.codec_label(),
                if r.cold { " cold" } else { "" },
                if r.cell.zero_copy { "" } else { " nozc" },
                if r.cell.encrypt { "" } else { " plain" }
            )
        })
        .collect();
    let bars =
        |file: PathBuf, title: &str, values: Vec<f64>, reference: Option<f64>| -> Result<()> {
            let max = values
                .iter()
                .copied()
                .chain(reference)
                .fold(0.0f64, f64::max)
                .max(1e-9)
                * 1.15;
            let root =
                SVGBackend::new(&file, (160 + 70 * values.len() as u32, 480)).into_drawing_area();
            root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
            let mut chart = ChartBuilder::on(&root)
                .caption(title, ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(120)
                .y_label_area_size(60)
                .build_cartesian_2d(0..values.len(), 0.0..max)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_labels(values.len())
                .x_label_formatter(&|i| labels.get(*i).cloned().unwrap_or_default())
                .x_label_style(
                    ("sans-serif", 11)
                        .into_font()
                        .transform(FontTransform::Rotate90),
                )
                .draw()
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            chart
                .draw_series(
                    values.iter().enumerate().map(|(i, v)| {
                        Rectangle::new([(i, 0.0), (i + 1, *v)], BLUE.mix(0.6).filled())
                    }),
                )
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            if let Some(r) = reference {
                chart
                    .draw_series(LineSeries::new(
                        [(0, r), (values.len(), r)],
                        RED.stroke_width(2),
                    ))
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .label("raw link")
                    .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], RED));
                chart
                    .configure_series_labels()
                    .border_style(BLACK)
                    .draw()
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok(())
        };
    let link = rows.iter().map(|r| r.link_gb_s).fold(0.0, f64::max);
    bars(
        PathBuf::from(format!("{}-rate.svg", base.display())),
        "guest memory moved per second (GB/s) vs the raw link",
        rows.iter()
            .map(|r| r.memory_gib_s * (1u64 << 30) as f64 / 1e9)
            .collect(),
        Some(link),
    )?;
    bars(
        PathBuf::from(format!("{}-downtime.svg", base.display())),
        "downtime (ms)",
        rows.iter().map(|r| r.downtime_ms).collect(),
        None,
    )?;
    Ok(())
}

/// A/B: the same cells from two runs side by side, with B's change against A.
pub fn compare(a: &Path, b: &Path) -> Result<()> {
    let load = |p: &Path| -> Result<Vec<serde_json::Value>> {
        std::fs::read_to_string(p)
            .with_context(|| format!("cannot read {}", p.display()))?
            .lines()
            .map(|l| Ok(serde_json::from_str(l)?))
            .collect()
    };
    let (ra, rb) = (load(a)?, load(b)?);
    println!(
        "\nA/B: A = {}, B = {}\n{:<56} {:>10} {:>10} {:>7} {:>11} {:>11} {:>7}",
        a.display(),
        b.display(),
        "CELL",
        "A total s",
        "B total s",
        "B/A",
        "A down ms",
        "B down ms",
        "B/A"
    );
    for (x, y) in ra.iter().zip(&rb) {
        let c = &x["cell"];
        let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:<56} {:>10.2} {:>10.2} {:>7.2} {:>11.2} {:>11.2} {:>7.2}",
            format!(
                "{}M {} {} {} s{} {} zc {} aes {}{}",
                c["memory_mib"],
                c["profile"],
                c["rate"],
                link_label(c["link_mbit"].as_u64().unwrap_or(0)),
                c["streams"],
                if c["compress"].as_bool() == Some(false) {
                    "off".to_string()
                } else {
                    c["codec"].as_str().unwrap_or("auto").to_string()
                },
                c["zero_copy"],
                c["encrypt"],
                if x["cold"].as_bool() == Some(true) {
                    " cold"
                } else {
                    ""
                }
            ),
            f(x, "total_s"),
            f(y, "total_s"),
            f(y, "total_s") / f(x, "total_s"),
            f(x, "downtime_ms"),
            f(y, "downtime_ms"),
            f(y, "downtime_ms") / f(x, "downtime_ms"),
        );
    }
    Ok(())
}
