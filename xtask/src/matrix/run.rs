//! A matrix run in the lab: the raw link per shape and stream count, then per guest a warm-up
//! round trip (the cold row) and its cells, ping-ponging between the hosts.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};

use ferry::control::client::Client;
use ferry::migrate::blast::{BlastMode, BlastResult};
use ferry::migrate::tune::CodecChoice;
use ferry::migrate::{MigrateOptions, Summary};
use ferry::transport::uring::SendMode;

use super::plot::plot;
use super::report::{goals, markdown};
use super::{codecs_chosen, link_label, sym, Cell, MatrixSpec, Row};
use crate::dev::{blast, cpu_seconds, filled, migrate_and_wait, wait, workload, workspace_root};
use crate::lab::{Lab, LabOptions};

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
