//! What people read: tables and summaries of hosts, VMs, checks, link statistics and
//! migrations (`--json` prints the API's objects instead).

use ferry::checks::CheckReport;
use ferry::control::agent::VmInfo;
use ferry::migrate::{MigrationRecord, Phase};
use ferry::netpin::StatsReport;
use ferry::vm::GuestKind;

/// A migration's peer for the table: its name without the address ("b (198.18.0.2:46…)" → "b"),
/// at most 16 characters, never cut mid-address.
pub fn peer_name(peer: &str) -> String {
    let name = peer.split_once(" (").map_or(peer, |(n, _)| n);
    if name.chars().count() <= 16 {
        name.to_string()
    } else {
        name.chars().take(15).chain(std::iter::once('…')).collect()
    }
}

/// A rate in bits per second, in the largest unit that keeps it above 1.
pub fn bits(b: f64) -> String {
    if b >= 1e9 {
        format!("{:.2} Gbit/s", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} Mbit/s", b / 1e6)
    } else {
        format!("{:.0} kbit/s", b / 1e3)
    }
}

/// `ferry stats`: link utilization per interface and class, and the pinning counters.
pub fn human_stats(r: &StatsReport) -> String {
    if !r.available {
        return format!(
            "eBPF link statistics and pinning are unavailable: {}\n",
            r.reason.as_deref().unwrap_or("unknown reason")
        );
    }
    let mut s = format!(
        "{:<10} {:>12} {:>3} {:>15} {:>7} {:>15} {:>15} {:>7} {:>15}\n",
        "INTERFACE", "SPEED", "", "TX MIGRATION", "%", "TX OTHER", "RX MIGRATION", "%", "RX OTHER"
    );
    for i in &r.interfaces {
        let pct = |p: Option<f64>| p.map_or("-".to_string(), |p| format!("{p:.1}"));
        s += &format!(
            "{:<10} {:>12} {:>3} {:>15} {:>7} {:>15} {:>15} {:>7} {:>15}\n",
            i.name,
            i.speed_bps.map_or("?".to_string(), |b| bits(b as f64)),
            if i.migration { "mig" } else { "" },
            bits(i.tx.migration.bits_per_s),
            pct(i.tx.migration.percent),
            bits(i.tx.other.bits_per_s),
            bits(i.rx.migration.bits_per_s),
            pct(i.rx.migration.percent),
            bits(i.rx.other.bits_per_s),
        );
    }
    let p = &r.pinning;
    s += &format!(
        "pinning {} (mark {:#x}{}): {} packets redirected to the migration NIC, {} leaked, {} dropped as not migration\n",
        if p.enabled { "on" } else { "off" },
        p.mark,
        if p.dedicated { ", dedicated" } else { "" },
        p.redirected_packets,
        p.leaked_packets,
        p.dedicated_dropped_packets
    );
    s
}

/// `ferry check`: one line per requirement, then the verdict.
pub fn human_check(r: &CheckReport) -> String {
    let mut s = format!("{:<16} {:<8} {}\n", "REQUIREMENT", "RESULT", "DETAIL (FIX)");
    for i in &r.items {
        s += &format!(
            "{:<16} {:<8} {}{}\n",
            i.requirement,
            format!("{:?}", i.result).to_lowercase(),
            i.detail,
            i.fix
                .as_ref()
                .map(|f| format!(" (fix: {f})"))
                .unwrap_or_default()
        );
    }
    s += &format!(
        "{} {} migrate to {}{}\n",
        r.vm,
        if r.passed { "can" } else { "cannot" },
        r.peer,
        if r.warnings > 0 {
            format!(
                " ({} warning{}: ferry migrate needs --force)",
                r.warnings,
                if r.warnings == 1 { "" } else { "s" }
            )
        } else {
            String::new()
        }
    );
    s
}

/// `ferry migrations`: one line per migration.
pub fn human_migrations(l: &[MigrationRecord]) -> String {
    let mut s = format!(
        "{:<12} {:<4} {:<16} {:<16} {:<10} {:>8} {:>10} {:>6}  {}\n",
        "ID", "DIR", "VM", "PEER", "PHASE", "TIME", "DOWNTIME", "ROUND", "RESULT"
    );
    for r in l {
        let down = r
            .summary
            .as_ref()
            .filter(|_| r.direction == "out")
            .map(|s| format!("{:.1} ms", s.downtime.total_ms))
            .unwrap_or_else(|| "-".into());
        s += &format!(
            "{:<12} {:<4} {:<16} {:<16} {:<10} {:>7.1}s {:>10} {:>6}  {}\n",
            r.id,
            r.direction,
            r.vm,
            peer_name(&r.peer),
            format!("{:?}", r.phase).to_lowercase(),
            r.elapsed_s,
            down,
            r.summary
                .as_ref()
                .map_or(r.round, |s| s.rounds.len() as u32),
            r.error
                .as_deref()
                .unwrap_or(if r.phase == Phase::Completed {
                    "ok"
                } else {
                    ""
                })
        );
    }
    s
}

/// Per stream: the page codec in force, how it was set, and the rates it was chosen from.
pub fn tuning_text(t: &[ferry::migrate::tune::StreamTuning]) -> String {
    use ferry::migrate::codec::Codec;
    let mut s = String::new();
    for st in t {
        let Some(codec) = st.codec else { continue };
        s += &format!(
            "  codec s{:<2}     {} ({}{})",
            st.stream,
            codec.name(),
            st.mode,
            if st.switches > 0 {
                format!(
                    ", {} change{}",
                    st.switches,
                    if st.switches == 1 { "" } else { "s" }
                )
            } else {
                String::new()
            }
        );
        if let Some(r) = &st.rates {
            s += &format!(
                "; link {}",
                r.link_mb_s
                    .map_or("not limiting".into(), |l| format!("{l:.0} MB/s"))
            );
            for c in Codec::ALL {
                if let (Some(cr), Some(p)) = (r.codecs[c.index()], st.predicted_mb_s[c.index()]) {
                    if c == Codec::None {
                        s += &format!("; none -> {p:.0} MB/s");
                    } else {
                        s += &format!(
                            "; {} {:.0} MB/s x{:.2} -> {p:.0} MB/s",
                            c.name(),
                            cr.encode_mb_s,
                            cr.ratio
                        );
                    }
                }
            }
        }
        s.push('\n');
    }
    s
}

/// Pages, share and compression ratio per encoding, one line each.
pub fn encodings_text(e: &ferry::migrate::EncodingStats) -> String {
    let all = e.pages().max(1);
    let mut s = String::new();
    for (i, (name, c)) in [
        ("zero", &e.zero),
        ("lz4", &e.lz4),
        ("zstd", &e.zstd),
        ("delta", &e.delta),
        ("raw", &e.raw),
    ]
    .into_iter()
    .enumerate()
    {
        let lead = if i == 0 {
            "  encodings     "
        } else {
            "                "
        };
        let share = c.pages as f64 * 100.0 / all as f64;
        let guest = c.pages * ferry::migrate::codec::PAGE as u64;
        let what = if name == "zero" {
            "no payload".to_string()
        } else if c.pages == 0 {
            String::new()
        } else {
            format!(
                "{:>10} -> {:>10} on the wire ({:.1}x)",
                mib(guest),
                mib(c.bytes),
                guest as f64 / c.bytes.max(1) as f64
            )
        };
        s += &format!(
            "{lead}{name:<6}{:>9} pages ({share:>5.1} %)  {what}\n",
            c.pages
        );
    }
    s
}

/// Bytes in MiB, or GiB from 1 GiB on.
pub fn mib(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

/// One migration: the full summary of a completed outgoing one, else its state and reason.
pub fn human_record(r: &MigrationRecord) -> String {
    let mut s = String::new();
    let phase = format!("{:?}", r.phase).to_lowercase();
    match (&r.summary, r.phase) {
        (Some(sm), Phase::Completed) if r.direction == "out" => {
            let d = &sm.downtime;
            s += &format!(
                "migrated {} to {} in {:.2} s ({})\n",
                r.vm, r.peer, sm.total_s, r.id
            );
            s += &format!(
                "  downtime      {:.2} ms (final pages {:.2}, state {:.2}, prepare {:.2}, resume {:.2}{})\n",
                d.total_ms,
                d.final_pages_ms,
                d.state_ms,
                d.prepare_ms,
                d.resume_ms,
                if d.verify_ms > 0.0 {
                    format!("; of which --verify digests {:.2}", d.verify_ms)
                } else {
                    String::new()
                }
            );
            if let Some(p) = sm.guest_pause_ms {
                s += &format!("  guest pause   {p:.2} ms (largest heartbeat gap the guest saw)\n");
            }
            let pages: Vec<String> = sm.rounds.iter().map(|x| x.pages.to_string()).collect();
            s += &format!(
                "  rounds        {} (pages: {})\n",
                sm.rounds.len(),
                pages.join(", ")
            );
            let ratio = if sm.wire_bytes > 0 {
                sm.guest_bytes as f64 / sm.wire_bytes as f64
            } else {
                0.0
            };
            let skipped = sm.skipped_pages * ferry::migrate::codec::PAGE as u64;
            s += &format!(
                "  memory        {} of guest pages over {} round{}: {} never touched or zero (skipped), {} sent as {} on the wire (ratio {:.1}x overall)\n",
                mib(sm.guest_bytes),
                sm.rounds.len(),
                if sm.rounds.len() == 1 { "" } else { "s" },
                mib(skipped),
                mib(sm.guest_bytes.saturating_sub(skipped)),
                mib(sm.wire_bytes),
                ratio,
            );
            s += &encodings_text(&sm.encodings);
            s += &format!(
                "  streams       {}, max throttle {} %\n",
                sm.streams, sm.max_throttle
            );
            s += &tuning_text(&sm.tuning);
            let t = &sm.transport;
            s += &format!(
                "  transport     {:?}: {} zero-copy, {} copied by the kernel, {} plain io_uring send, {} write(2){}\n",
                sm.send_mode,
                mib(t.zero_copy_bytes),
                mib(t.zc_copied_bytes),
                mib(t.uring_bytes),
                mib(t.std_bytes),
                if t.fell_back { " (the kernel copied zero-copy sends, so streams fell back to plain send)" } else { "" }
            );
            if let Some(l) = &sm.link {
                s += &format!(
                    "  link          migration NIC {} average, {} peak{}\n",
                    bits(l.avg_bits_per_s),
                    bits(l.peak_bits_per_s),
                    match (l.avg_percent, l.peak_percent, l.interface_speed_bps) {
                        (Some(a), Some(p), Some(sp)) =>
                            format!(" ({a:.0} % / {p:.0} % of {})", bits(sp as f64)),
                        _ => String::new(),
                    }
                );
            }
            if sm.devices != Default::default() {
                s += &format!(
                    "  devices       {} of virtio state; {} block request{} drained at the pause; {} frame{} for the guest carried, {} forwarded after the capture ({} dropped, {} ms window)\n",
                    if sm.devices.state_bytes < 1 << 20 {
                        format!("{} bytes", sm.devices.state_bytes)
                    } else {
                        mib(sm.devices.state_bytes)
                    },
                    sm.devices.io_drained,
                    if sm.devices.io_drained == 1 { "" } else { "s" },
                    sm.devices.rx_frames_carried,
                    if sm.devices.rx_frames_carried == 1 { "" } else { "s" },
                    sm.devices.rx_frames_forwarded,
                    sm.devices.rx_frames_forward_dropped,
                    sm.devices.forward_window_ms,
                );
            }
            s += &format!(
                "  encryption    {}\n",
                match (&sm.cipher, sm.encrypted) {
                    (Some(c), true) => format!("{c}: page streams and vCPU/device state"),
                    (None, true) => "AES-256-GCM: page streams and vCPU/device state".into(),
                    _ => "off: sent in the clear (no cluster key, --no-encrypt, or encrypt = \"off\")".into(),
                }
            );
            if sm.verified {
                s += &format!(
                    "  verified      memory digest equal ({})\n",
                    sm.digest.as_deref().unwrap_or("")
                );
            }
        }
        _ => {
            s += &format!(
                "{} {} {} {} {}: {} after {:.1} s, round {}\n",
                r.id,
                r.direction,
                r.vm,
                if r.direction == "out" { "to" } else { "from" },
                r.peer,
                phase,
                r.elapsed_s,
                r.round
            );
            if let Some(e) = &r.error {
                s += &format!("  reason: {e}\n");
            }
        }
    }
    s
}

/// `ferry vm inspect`.
pub fn human_info(i: &VmInfo) -> String {
    let mut s = format!(
        "name:        {}\nstate:       {}\nkind:        {}\nmemory:      {} MiB\nvCPUs:       {}\n",
        i.name,
        i.state,
        i.spec.kind.name(),
        i.spec.memory_mib,
        i.spec.vcpus
    );
    match &i.spec.kind {
        GuestKind::Workload(p) => {
            s += &format!(
                "profile:     {:?}\nworking set: {}\n",
                p.profile,
                p.working_set_mib
                    .map_or("all memory".to_string(), |m| format!("{m} MiB"))
            );
        }
        GuestKind::Raw(p) => {
            s += &format!(
                "image:       {}\nmode:        {:?}\n",
                p.image.display(),
                p.mode
            );
        }
        GuestKind::Service(p) => {
            s += &format!(
                "address:     {}/{}\njournal:     {} records/s\nworking set: {} MiB at {} MiB/s\n",
                p.ip, p.prefix_len, p.journal_rate, p.working_set_mib, p.dirty_rate_mib
            );
        }
    }
    for n in &i.nics {
        s += &format!(
            "nic:         tap {} rx {} (dropped {}, queued {}) tx {} (dropped {})\n",
            n.tap.as_deref().unwrap_or("-"),
            n.rx_frames,
            n.rx_dropped,
            n.rx_queued,
            n.tx_frames,
            n.tx_dropped
        );
    }
    for d in &i.disks {
        s += &format!(
            "disk:        {} reads {} writes {} flushes {} errors {}\n",
            d.path
                .as_ref()
                .map_or("-".into(), |p| p.display().to_string()),
            d.reads,
            d.writes,
            d.flushes,
            d.errors
        );
    }
    if let Some(f) = &i.fault {
        s += &format!("fault:       {f}\n");
    }
    for l in &i.disk_locks {
        let holder = match (&l.holder, &l.error) {
            (_, Some(e)) => format!("lock unreadable: {e}"),
            (None, None) => "not locked".to_string(),
            (Some(h), None) => format!(
                "locked by {} on {}{}",
                h.vm,
                h.host,
                if h.stale {
                    " (STALE: its host stopped renewing the lease)"
                } else {
                    ""
                }
            ),
        };
        s += &format!("disk lock:   {} ({holder})\n", l.disk);
    }
    if let Some(d) = &i.dirty_rate {
        let measured = d.measured_mib_per_sec.map_or_else(
            || "not measured yet (the guest started or arrived just now)".to_string(),
            |m| format!("{m:.1} MiB/s measured"),
        );
        s += &format!(
            "dirty rate:  {measured}, {} MiB/s requested\n",
            d.requested_mib_per_sec
        );
    }
    if i.last_pause_us > 0 {
        s += &format!("last pause:  {} us\n", i.last_pause_us);
    }
    if i.last_resume_us > 0 {
        s += &format!("last resume: {} us\n", i.last_resume_us);
    }
    let e = &i.exits;
    s += &format!(
        "exits:       {} out, {} in, {} mmio, {} yields, {} unknown port, {} interrupted\n",
        e.io_out,
        e.io_in,
        e.mmio_read + e.mmio_write,
        e.yields,
        e.unknown_port,
        e.interrupted
    );
    if !i.heartbeats.is_empty() {
        s += &format!(
            "\n{:<5} {:<5} {:>14} {:>14} {:>6} {:>12} {:>10} {:>10}\n",
            "VCPU", "PHASE", "BEATS", "BEATS/S", "PASS", "PAGES", "DIRTY MiB/s", "YIELDS/S"
        );
        let rate = |r: Option<f64>, decimals: usize| {
            r.map_or_else(|| "-".to_string(), |r| format!("{r:.decimals$}"))
        };
        for h in &i.heartbeats {
            s += &format!(
                "{:<5} {:<5} {:>14} {:>14} {:>6} {:>12} {:>10} {:>10}\n",
                h.id,
                h.phase,
                h.beats,
                rate(h.beats_per_sec, 0),
                h.pass,
                h.pages_written,
                rate(h.dirty_mib_per_sec, 1),
                rate(h.yields_per_sec, 0)
            );
        }
    }
    s
}
