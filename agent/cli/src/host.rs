//! Commands about the host and its peers: `ferry host`, `check`, `ping`, `stats`, `cpu
//! baseline`, `disk unlock`.

use std::time::Duration;

use ferry::checks::ping::PingReport;
use ferry::checks::CheckReport;
use ferry::control::agent::{Baseline, HostInfo, PingRequest};
use ferry::control::client::Client;
use ferry::migrate::blast::{BlastMode, BlastRequest, BlastResult};
use ferry::netpin::StatsReport;

use crate::args::{Cli, PingArgs};
use crate::human::{human_check, human_stats};
use crate::{enc, fail, out, socket_path, vm_path, Failure};

/// `ferry host`.
pub fn run_host(cli: &Cli) -> Result<(), Failure> {
    let c = Client::new(socket_path(cli));
    let h: HostInfo = c.get("/v1/host")?;
    out(cli, &h, |h| {
        format!(
            "host:       {}\nversion:    {}\nTSC:        {} kHz ({})\nMSRs saved: {}\nmemory:     {} MiB total, {} MiB available, {} MiB promised to VMs, {} MiB reserved for the host\nVMs:        {}\n",
            h.name,
            h.version,
            h.tsc_khz,
            if h.tsc_settable { "guest TSC restorable" } else { "guest TSC follows the host" },
            h.msrs,
            h.memory_total_mib,
            h.memory_available_mib,
            h.memory_committed_mib,
            h.memory_reserve_mib,
            h.vms
        )
    });
    Ok(())
}

/// `ferry check VM --to PEER`.
pub fn run_check(cli: &Cli, vm: &str, to: &str) -> Result<(), Failure> {
    let c = Client::new(socket_path(cli));
    let r: CheckReport = c.get(&vm_path(vm, &format!("/check?to={}", enc(to))))?;
    out(cli, &r, human_check);
    if r.passed {
        Ok(())
    } else {
        Err(fail(format!("{vm} cannot migrate to {to}")))
    }
}

/// `ferry disk unlock DISK`.
pub fn run_disk_unlock(cli: &Cli, disk: &str) -> Result<(), Failure> {
    let c = Client::new(socket_path(cli));
    let h: ferry::checks::disklock::LockHolder =
        c.post("/v1/disks/unlock", &serde_json::json!({ "disk": disk }))?;
    out(cli, &h, |h| {
        format!(
            "unlocked {disk}: it was held by guest {} on host {} (last heartbeat {})\n",
            h.vm,
            h.host,
            h.heartbeat_age_s
                .map_or("never".to_string(), |a| format!("{a} s ago"))
        )
    });
    Ok(())
}

/// `ferry cpu baseline PEER...`.
pub fn run_cpu_baseline(cli: &Cli, peers: &[String]) -> Result<(), Failure> {
    let c = Client::new(socket_path(cli));
    let b: Baseline = c.post("/v1/cpu/baseline", &serde_json::json!({ "peers": peers }))?;
    out(cli, &b, |b| {
        format!(
            "hosts:      {}\nlevel:      {}\ncommon:     {}\nmask these: {}\n",
            b.hosts.join(", "),
            b.level.as_deref().unwrap_or("(below x86-64-v1)"),
            b.common.join(" "),
            if b.mask.is_empty() {
                "(nothing: all hosts offer the same)".to_string()
            } else {
                b.mask.join(",")
            }
        )
    });
    Ok(())
}

/// `ferry stats [--watch]`.
pub fn run_stats(cli: &Cli, watch: bool) -> Result<(), Failure> {
    let c = Client::new(socket_path(cli));
    loop {
        let r: StatsReport = c.get("/v1/stats")?;
        if cli.json && watch {
            println!("{}", serde_json::to_string(&r).unwrap_or_default());
        } else {
            if watch && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                print!("\x1b[2J\x1b[H");
            }
            out(cli, &r, human_stats);
        }
        if !watch {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn run_icmp_ping(cli: &Cli, peer: &str) -> Result<(), Failure> {
    let c = Client::new(socket_path(cli));
    let r: PingReport = c.post("/v1/ping", &serde_json::json!({ "to": peer }))?;
    out(cli, &r, |r| {
        let mut s = format!(
            "{} -> {} via {}: {} sent, {} received, {:.0} % loss",
            r.local,
            r.remote,
            r.interface.as_deref().unwrap_or("any NIC"),
            r.sent,
            r.received,
            r.loss_percent
        );
        if let (Some(a), Some(b), Some(c)) = (r.rtt_min_ms, r.rtt_avg_ms, r.rtt_max_ms) {
            s += &format!(", rtt min/avg/max {a:.3}/{b:.3}/{c:.3} ms");
        }
        s.push('\n');
        for m in &r.mtu {
            s += &format!(
                "  {} bytes, don't fragment: {} ({})\n",
                m.size,
                if m.ok { "passes" } else { "fails" },
                m.detail
            );
        }
        s
    });
    match r.received {
        0 => Err(fail(format!(
            "no reply from {} over the migration network",
            r.remote
        ))),
        n if n < r.sent => Err(Failure {
            code: 4,
            message: format!("{} of {} probes lost", r.sent - n, r.sent),
        }),
        _ => Ok(()),
    }
}

/// `ferry ping PEER`: ICMP probes, or a throughput blast with `--throughput` / `--bytes`.
pub fn run_ping(cli: &Cli, p: &PingArgs) -> Result<(), Failure> {
    let usage = |m: String| Failure {
        code: 2,
        message: m,
    };
    let Some(secs) = p.throughput.or(p.bytes.map(|_| 0.0)) else {
        return run_icmp_ping(cli, &p.peer);
    };
    let mode: BlastMode = p
        .mode
        .parse()
        .map_err(|e: ferry::migrate::OptionError| usage(e.to_string()))?;
    let req = PingRequest {
        to: p.peer.clone(),
        throughput: Some(BlastRequest {
            streams: p.streams,
            secs,
            bytes: p.bytes.map_or(0, |m| m << 20),
            mode,
        }),
    };
    let c = Client::new(socket_path(cli));
    let r: BlastResult = c.post("/v1/ping", &req)?;
    out(cli, &r, |r| {
        format!(
            "{} -> {} ({:?}, {} stream{}): {:.2} GiB in {:.2} s = {:.2} GB/s ({:.1} Gbit/s); CPU per GiB: sender {:.2} s, receiver {:.2} s\n",
            r.local,
            r.remote,
            r.mode,
            r.streams,
            if r.streams == 1 { "" } else { "s" },
            r.bytes as f64 / (1u64 << 30) as f64,
            r.secs,
            r.gbytes_per_s,
            r.gbits_per_s,
            r.send_cpu_s_per_gib,
            r.recv_cpu_s_per_gib
        )
    });
    Ok(())
}
