//! What a run reports besides its table on stdout: the markdown table, the goals met or missed,
//! and the A/B comparison of two runs.

use std::path::Path;

use anyhow::{Context, Result};

use ferry::vm::workload::Profile;

use super::{link_label, sym, Row, FAST};

pub(super) fn markdown(rows: &[Row]) -> String {
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
pub(super) fn goals(rows: &[Row]) -> String {
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
