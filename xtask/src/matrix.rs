//! `cargo xtask bench matrix`: end-to-end migration benchmarks in the lab, next to the raw
//! link rate measured in the same run. Each cell is one live migration (the guest ping-pongs
//! between the hosts); output: a table on stdout, JSON lines, a markdown table and SVG plots
//! under `target/bench/`, and the key ratios against the goals.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

use ferry::control::client::Client;
use ferry::migrate::blast::BlastMode;
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
                                    v.push(Cell {
                                        memory_mib,
                                        profile,
                                        rate,
                                        streams,
                                        compress,
                                        zero_copy,
                                        encrypt,
                                    });
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
}

impl Cell {
    fn rate_label(&self) -> String {
        if self.rate >= FAST {
            "fast".into()
        } else {
            self.rate.to_string()
        }
    }
}

/// One cell's measurements.
#[derive(Debug, Clone, Serialize)]
struct Row {
    label: String,
    cell: Cell,
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

    // The raw link, per stream count, measured now (and again at the end).
    let blast = |streams: u32| blast(&hosts[0].0, BlastMode::Tcp, streams, 2 << 30);
    let mut link = std::collections::BTreeMap::new();
    for &s in &spec.streams {
        let r = blast(s)?;
        println!(
            "raw link (TCP blast, {s} stream{}): {:.2} GB/s",
            if s == 1 { "" } else { "s" },
            r.gbytes_per_s
        );
        link.insert(s, r.gbytes_per_s);
    }
    println!(
        "\n{:<6} {:>6} {:>7} {:>4} {:>4} {:>3} {:>3} {:>8} {:>9} {:>9} {:>6} {:>9} {:>9} {:>8} {:>7} {:>7}",
        "MEM",
        "DATA",
        "DIRTY",
        "STR",
        "LZ4",
        "ZC",
        "AES",
        "TOTAL",
        "DOWNTIME",
        "PAUSE",
        "ROUNDS",
        "MEM GiB/s",
        "WIRE GB/s",
        "LINK %",
        "SRC CPU",
        "DST CPU"
    );
    let mut rows = Vec::new();
    let mut jsonl = String::new();
    let mut n = 0;
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
        // Warm-up, not measured: the first migration into a host also pays for the kernel
        // finding and zeroing fresh huge pages (about twice the time here); after one round
        // trip both hosts have had the memory once, and the cells compare like with like.
        for (from, to) in [(0usize, "b"), (1, "a")] {
            migrate_and_wait(&hosts[from].0, &name, to, MigrateOptions::default())
                .context("warm-up migration")?;
        }
        std::thread::sleep(Duration::from_secs(1));
        let mut at = 0usize;
        for &cell in group {
            let (from, to) = (at, 1 - at);
            let cpu0 = (cpu_seconds(hosts[from].1), cpu_seconds(hosts[to].1));
            let s = migrate_and_wait(
                &hosts[from].0,
                &name,
                ["a", "b"][to],
                MigrateOptions {
                    streams: cell.streams,
                    compress: cell.compress,
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
            let cpu1 = (cpu_seconds(hosts[from].1), cpu_seconds(hosts[to].1));
            let l = link.get(&cell.streams).copied().unwrap_or(f64::NAN);
            let row = Row {
                label: spec.label.clone(),
                cell,
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
                link_gb_s: l,
                link_avg_gbit_s: s.link.as_ref().map(|k| k.avg_bits_per_s / 1e9),
                link_peak_gbit_s: s.link.as_ref().map(|k| k.peak_bits_per_s / 1e9),
                source_cpu_s: cpu1.0.unwrap_or(0.0) - cpu0.0.unwrap_or(0.0),
                dest_cpu_s: cpu1.1.unwrap_or(0.0) - cpu0.1.unwrap_or(0.0),
                summary: s,
            };
            println!(
                "{:<6} {:>6} {:>7} {:>4} {:>4} {:>3} {:>3} {:>7.2}s {:>6.2} ms {:>6} ms {:>6} {:>9.2} {:>9.2} {:>7.0}% {:>6.2}s {:>6.2}s",
                format!("{}M", cell.memory_mib),
                sym(cell.profile),
                cell.rate_label(),
                cell.streams,
                if cell.compress { "on" } else { "off" },
                if cell.zero_copy { "on" } else { "off" },
                if cell.encrypt { "on" } else { "off" },
                row.total_s,
                row.downtime_ms,
                row.guest_pause_ms
                    .map_or("-".into(), |p| format!("{p:.1}")),
                row.rounds,
                row.memory_gib_s,
                row.wire_gb_s,
                100.0 * row.wire_gb_s / l,
                row.source_cpu_s,
                row.dest_cpu_s,
            );
            jsonl += &serde_json::to_string(&row)?;
            jsonl.push('\n');
            rows.push(row);
            at = to;
        }
        hosts[at].0.delete(&format!("/v1/vms/{name}"))?;
    }
    for &s in &spec.streams {
        let r = blast(s)?;
        println!(
            "raw link again at the end ({s} stream{}): {:.2} GB/s",
            if s == 1 { "" } else { "s" },
            r.gbytes_per_s
        );
    }
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
        "| memory | content | dirty MiB/s | streams | LZ4 | zero-copy | AES | total s | downtime ms | guest pause ms | rounds | memory GiB/s | wire GB/s | raw link GB/s | link avg/peak Gbit/s | CPU s src/dst |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let c = r.cell;
        s += &format!(
            "| {} MiB | {} | {} | {} | {} | {} | {} | {:.2} | {:.2} | {} | {} | {:.2} | {:.2} | {:.2} | {} | {:.2}/{:.2} |\n",
            c.memory_mib,
            sym(c.profile),
            c.rate_label(),
            c.streams,
            if c.compress { "on" } else { "off" },
            if c.zero_copy { "on" } else { "off" },
            if c.encrypt { "on" } else { "off" },
            r.total_s,
            r.downtime_ms,
            r.guest_pause_ms.map_or("-".into(), |p| format!("{p:.1}")),
            r.rounds,
            r.memory_gib_s,
            r.wire_gb_s,
            r.link_gb_s,
            match (r.link_avg_gbit_s, r.link_peak_gbit_s) {
                (Some(a), Some(p)) => format!("{a:.1}/{p:.1}"),
                _ => "-".into(),
            },
            r.source_cpu_s,
            r.dest_cpu_s,
        );
    }
    s
}

/// The goals of the benchmark issue, each met or missed, with its number.
fn goals(rows: &[Row]) -> String {
    let mut out = String::from("goals:\n");
    let mut line = |name: &str, v: Option<(bool, String)>| {
        out += &match v {
            Some((ok, n)) => format!(
                "  {:<58} {:<6} {}\n",
                name,
                if ok { "met" } else { "MISSED" },
                n
            ),
            None => format!("  {name:<58} (no cell measures it)\n"),
        };
    };
    let random: Vec<&Row> = rows
        .iter()
        .filter(|r| r.cell.profile == Profile::Random && r.cell.rate == 0)
        .collect();
    line(
        "random goodput >= 90 % of the raw link",
        random
            .iter()
            .map(|r| r.wire_gb_s / r.link_gb_s)
            .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))))
            .map(|x| (x >= 0.9, format!("{:.0} % (best cell)", x * 100.0))),
    );
    let mixed: Vec<&Row> = rows
        .iter()
        .filter(|r| r.cell.profile == Profile::Mixed && r.cell.rate == 0 && r.cell.compress)
        .collect();
    line(
        "mixed: memory rate >= 2x the raw link",
        mixed
            .iter()
            .map(|r| r.memory_gib_s * (1u64 << 30) as f64 / 1e9 / r.link_gb_s)
            .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))))
            .map(|x| (x >= 2.0, format!("{x:.2}x (best cell)"))),
    );
    let mut quiet: Vec<f64> = rows
        .iter()
        .filter(|r| {
            r.cell.rate < FAST && (r.cell.rate as f64) * 1048576.0 <= r.link_gb_s * 1e9 / 4.0
        })
        .map(|r| r.downtime_ms)
        .collect();
    quiet.sort_by(f64::total_cmp);
    line(
        "median downtime <= 5 ms at dirty rates <= link/4",
        quiet
            .get(quiet.len() / 2)
            .map(|m| (*m <= 5.0, format!("{m:.2} ms over {} cells", quiet.len()))),
    );
    let fast: Vec<&Row> = rows.iter().filter(|r| r.cell.rate >= FAST).collect();
    line(
        "faster-than-link guest converges, guest pause <= 50 ms",
        fast.iter()
            .filter_map(|r| r.guest_pause_ms)
            .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))))
            .map(|x| {
                (
                    x <= 50.0,
                    format!("{x:.1} ms (worst of {} cells)", fast.len()),
                )
            }),
    );
    out
}

fn plot(rows: &[Row], base: &Path) -> Result<()> {
    use plotters::prelude::*;
    let labels: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{} {} s{}{}{}{}",
                sym(r.cell.profile),
                r.cell.rate_label(),
                r.cell.streams,
                if r.cell.compress { "" } else { " raw" },
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
        "\nA/B: A = {}, B = {}\n{:<40} {:>10} {:>10} {:>7} {:>11} {:>11} {:>7}",
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
            "{:<40} {:>10.2} {:>10.2} {:>7.2} {:>11.2} {:>11.2} {:>7.2}",
            format!(
                "{}M {} {} s{} lz4 {} zc {} aes {}",
                c["memory_mib"],
                c["profile"],
                c["rate"],
                c["streams"],
                c["compress"],
                c["zero_copy"],
                c["encrypt"]
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
