//! eBPF on the lab hosts' NICs: pinning migration traffic to the migration NIC, counting it, and
//! the attachments' life cycle.

use ferry::control::config::MigrationSection;
use ferry_tests::{ferry_bin, require, wait_for, LabFerry, Need};
use serde_json::Value;
use xtask::lab::{Lab, LabOptions};

fn lab(test: &str) -> Option<Lab> {
    if !require(test, &[Need::Root, Need::Kvm, Need::Netns]) {
        return None;
    }
    Some(Lab::up(LabOptions::for_test(test).with_ferry_bin(ferry_bin())).expect("lab up"))
}

/// The NIC's own transmit byte counter (the kernel's, as in /sys/class/net/IF/statistics),
/// read through the host's agent's /proc/PID/net/dev: a plain file read, so the moment of the
/// read is known to within microseconds (a command in the namespace would add its start-up).
fn sys_tx(lab: &Lab, host: &str, iface: &str) -> u64 {
    let pid = lab.host(host).unwrap().agent_pid.expect("agent pid");
    let dev = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).expect("net/dev");
    let line = dev
        .lines()
        .find_map(|l| l.trim_start().strip_prefix(&format!("{iface}:")))
        .unwrap_or_else(|| panic!("no {iface} in {dev}"));
    // Receive: bytes packets errs drop fifo frame compressed multicast; then transmit bytes.
    line.split_whitespace()
        .nth(8)
        .expect("tx bytes")
        .parse()
        .expect("a number")
}

fn iface<'a>(stats: &'a Value, name: &str) -> &'a Value {
    stats["interfaces"]
        .as_array()
        .expect("interfaces")
        .iter()
        .find(|i| i["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {stats}"))
}

fn bpf_tx(stats: &Value, name: &str) -> u64 {
    let i = iface(stats, name);
    i["tx"]["migration"]["bytes"].as_u64().unwrap() + i["tx"]["other"]["bytes"].as_u64().unwrap()
}

/// Change host `host`'s [migration] section and restart its agent.
fn reconfigure(lab: &mut Lab, host: &str, edit: impl FnOnce(&mut MigrationSection)) {
    lab.edit_config(host, |c| edit(c.migration.as_mut().expect("[migration]")))
        .unwrap();
    lab.stop_agent(host).unwrap();
    lab.start_agent(host).unwrap();
}

/// With a route on `a` that sends the peer's migration address over the management link, the
/// marked migration streams are redirected to the migration NIC; the BPF counters and the NICs'
/// own statistics agree. With pinning off the same traffic leaks, and is counted.
#[test]
fn migration_traffic_is_pinned_and_counted_or_leaks_when_off() {
    let Some(mut lab) = lab("pinning") else {
        return;
    };
    lab.exec(
        "a",
        &[
            "ip",
            "route",
            "add",
            "198.18.1.2/32",
            "via",
            "198.18.0.2",
            "dev",
            "mgmt0",
        ],
    )
    .unwrap();
    {
        let f = LabFerry { lab: &lab };
        f.json(
            "a",
            &[
                "vm",
                "create",
                "v",
                "--memory",
                "256M",
                "--profile",
                "random",
                "--start",
            ],
        );
        f.wait_filled("a", "v");
        let s0 = f.json("a", &["stats"]);
        assert_eq!(s0["available"], true, "{s0}");
        let (m0, g0) = (sys_tx(&lab, "a", "mig0"), sys_tx(&lab, "a", "mgmt0"));
        let rec = f.migrate("a", "v", "b", &[]);
        assert_eq!(rec["phase"], "completed", "{rec}");
        std::thread::sleep(std::time::Duration::from_millis(300));
        let s1 = f.json("a", &["stats"]);
        let (m1, g1) = (sys_tx(&lab, "a", "mig0"), sys_tx(&lab, "a", "mgmt0"));
        let sys_mig = m1 - m0;
        let bpf_mig = bpf_tx(&s1, "mig0") - bpf_tx(&s0, "mig0");
        let wire = rec["summary"]["wire_bytes"].as_u64().unwrap();
        assert!(
            sys_mig >= wire,
            "mig0 sent {sys_mig} bytes for {wire} on the wire"
        );
        let diff = (bpf_mig as f64 - sys_mig as f64).abs() / sys_mig as f64;
        assert!(
            diff < 0.02,
            "BPF {bpf_mig} vs NIC {sys_mig} bytes on mig0 ({:.2} %)",
            diff * 100.0
        );
        // Only the control connection used the management link.
        assert!(g1 - g0 < sys_mig / 100, "mgmt0 sent {} bytes", g1 - g0);
        let p = &s1["pinning"];
        assert!(p["redirected_packets"].as_u64().unwrap() > 0, "{p}");
        assert_eq!(p["leaked_packets"], 0, "{p}");
        // The summary reports the link's utilization during the copy.
        let link = &rec["summary"]["link"];
        assert!(link["avg_bits_per_s"].as_f64().unwrap() > 0.0, "{link}");
        assert!(
            link["peak_bits_per_s"].as_f64().unwrap() >= link["avg_bits_per_s"].as_f64().unwrap()
        );
        assert!(link["avg_percent"].as_f64().is_some(), "{link}");
        // Bring it back for the second half.
        let rec = f.migrate("b", "v", "a", &[]);
        assert_eq!(rec["phase"], "completed", "{rec}");
    }

    reconfigure(&mut lab, "a", |m| m.pin = false);
    let f = LabFerry { lab: &lab };
    let s0 = f.json("a", &["stats"]);
    assert_eq!(s0["pinning"]["enabled"], false);
    let (m0, g0) = (sys_tx(&lab, "a", "mig0"), sys_tx(&lab, "a", "mgmt0"));
    // The guest went down with the old agent on a; make a new one.
    f.json(
        "a",
        &[
            "vm",
            "create",
            "w",
            "--memory",
            "128M",
            "--profile",
            "random",
            "--start",
        ],
    );
    f.wait_filled("a", "w");
    let rec = f.migrate("a", "w", "b", &[]);
    assert_eq!(rec["phase"], "completed", "{rec}");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let s1 = f.json("a", &["stats"]);
    let (m1, g1) = (sys_tx(&lab, "a", "mig0"), sys_tx(&lab, "a", "mgmt0"));
    let p = &s1["pinning"];
    assert!(p["leaked_packets"].as_u64().unwrap() > 0, "{p}");
    assert!(
        p["leaked_bytes"].as_u64().unwrap() as f64 > 0.9 * (g1 - g0) as f64,
        "{p}"
    );
    assert!(
        g1 - g0 > 100 << 20,
        "the leak went out on mgmt0: {} bytes",
        g1 - g0
    );
    assert!(m1 - m0 < (g1 - g0) / 10, "mig0 {} bytes", m1 - m0);
    lab.down().unwrap();
}

/// A flow shaped to a known rate with tc (400 Mbit/s, a queue deep enough to keep the link
/// busy) is measured within 5 % by `ferry stats`, against the rate the NIC's own counters show
/// over the same second.
#[test]
fn a_shaped_flow_is_measured_within_five_percent() {
    let Some(lab) = lab("rate") else { return };
    let f = LabFerry { lab: &lab };
    lab.exec(
        "a",
        &[
            "tc", "qdisc", "replace", "dev", "mig0", "root", "tbf", "rate", "400mbit", "burst",
            "1mb", "latency", "500ms",
        ],
    )
    .unwrap();
    let root = lab.root().to_path_buf();
    let blast = std::thread::spawn(move || {
        std::process::Command::new(ferry_bin())
            .env("FERRY_LAB_ROOT", &root)
            .args(["--host", "a", "ping", "b", "--throughput", "6"])
            .output()
            .expect("ping")
    });
    std::thread::sleep(std::time::Duration::from_millis(2000));
    let mut seen = Vec::new();
    for _ in 0..3 {
        let n0 = sys_tx(&lab, "a", "mig0");
        let t0 = std::time::Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(1000));
        let n1 = sys_tx(&lab, "a", "mig0");
        let nic = (n1 - n0) as f64 * 8.0 / t0.elapsed().as_secs_f64();
        let s = f.json("a", &["stats"]);
        let bpf = iface(&s, "mig0")["tx"]["migration"]["bits_per_s"]
            .as_f64()
            .unwrap();
        seen.push((nic, bpf));
    }
    let o = blast.join().unwrap();
    assert!(o.status.success(), "{o:?}");
    for (nic, bpf) in &seen {
        assert!(
            (nic - 400e6).abs() / 400e6 < 0.10,
            "the shaping did not hold: {seen:?}"
        );
        let err = (bpf - nic).abs() / nic;
        assert!(
            err < 0.05,
            "ferry stats {bpf} bit/s vs the NIC's {nic}: {seen:?}"
        );
    }
    lab.down().unwrap();
}

fn ferry_programs(stats: &Value) -> Vec<(String, String, usize)> {
    stats["attached"]
        .as_array()
        .expect("attached")
        .iter()
        .map(|a| {
            let n = a["programs"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| p.as_str().is_some_and(|s| s.starts_with("ferry_")))
                .count();
            (
                a["interface"].as_str().unwrap().to_string(),
                a["hook"].as_str().unwrap().to_string(),
                n,
            )
        })
        .collect()
}

/// Exactly one set of programs per hook, after a restart, after a SIGKILL and a restart.
#[test]
fn attachments_are_idempotent_and_survive_sigkill() {
    let Some(mut lab) = lab("attach") else { return };
    let check = |lab: &Lab, when: &str| {
        let f = LabFerry { lab };
        let s = f.json("a", &["stats"]);
        let progs = ferry_programs(&s);
        assert!(progs.len() >= 8, "{when}: {progs:?}");
        for (i, hook, n) in &progs {
            assert_eq!(*n, 1, "{when}: {i} {hook} has {n} Ferry programs: {s}");
        }
    };
    check(&lab, "first start");
    lab.stop_agent("a").unwrap();
    lab.start_agent("a").unwrap();
    check(&lab, "after a clean restart");
    let pid = lab.host("a").unwrap().agent_pid.unwrap();
    // SAFETY: kill(2) on the agent this test's lab started.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
    wait_for("the agent to die", 10, || {
        (!lab.agent_alive("a").unwrap_or(true)).then_some(())
    });
    lab.start_agent("a").unwrap();
    check(&lab, "after SIGKILL and restart");
    lab.down().unwrap();
}

/// `dedicated = true` keeps other IPv4 traffic off the migration NIC (dropped and counted), while
/// migrations both ways and `ferry ping` still use it. Without it the same traffic passes.
#[test]
fn dedicated_keeps_other_traffic_off_the_migration_nic() {
    let Some(mut lab) = lab("dedicated") else {
        return;
    };
    // Unmarked traffic through the migration NIC: a plain ping from the management address to
    // the peer's migration address (the route to 198.18.1.0/24 is mig0's).
    let other_ping = |lab: &Lab| {
        lab.exec(
            "a",
            &[
                "ping",
                "-c",
                "3",
                "-W",
                "1",
                "-i",
                "0.2",
                "-I",
                "198.18.0.1",
                "198.18.1.2",
            ],
        )
    };
    let dropped = |f: &LabFerry| {
        let p = f.json("a", &["stats"])["pinning"].clone();
        p["dedicated_dropped_packets"].as_u64().expect("a count")
    };
    {
        let f = LabFerry { lab: &lab };
        other_ping(&lab).expect("without dedicated, other traffic passes");
        assert_eq!(dropped(&f), 0);
    }
    reconfigure(&mut lab, "a", |m| m.dedicated = true);
    let f = LabFerry { lab: &lab };
    assert_eq!(f.json("a", &["stats"])["pinning"]["dedicated"], true);
    let e = other_ping(&lab).expect_err("with dedicated, other traffic is dropped");
    // A packet dropped on egress reaches the sender as ENOBUFS. Only ping's own failure counts:
    // a missing `ping` (Lab::exec says "not installed") must fail this test, not satisfy it.
    let e = format!("{e:#}");
    assert!(!e.contains("not installed"), "{e}");
    assert!(
        e.contains("No buffer space") || e.contains("100% packet loss"),
        "{e}"
    );
    let n = dropped(&f);
    assert!(n >= 3, "{n} packets counted as dropped");
    // Migration traffic is not: ping over the migration link, and migrations both ways.
    let p = f.json("a", &["ping", "b"]);
    assert_eq!(p["received"], p["sent"], "{p}");
    f.json(
        "a",
        &[
            "vm",
            "create",
            "d",
            "--memory",
            "128M",
            "--profile",
            "mixed",
            "--start",
        ],
    );
    f.wait_filled("a", "d");
    for (from, to) in [("a", "b"), ("b", "a")] {
        let rec = f.migrate(from, "d", to, &["--verify"]);
        assert_eq!(rec["phase"], "completed", "{from}→{to}: {rec}");
        assert_eq!(rec["summary"]["verified"], true, "{rec}");
    }
    assert_eq!(dropped(&f), n, "migration traffic was dropped");
    lab.down().unwrap();
}

/// Where the programs cannot be attached (here: the configured migration NIC does not exist)
/// the agent still runs guests, says so once in its log, and reports pinning and utilization as
/// unavailable with the reason.
#[test]
fn where_ebpf_cannot_attach_the_agent_runs_and_says_so_once() {
    let Some(mut lab) = lab("nobpf") else { return };
    lab.edit_config("a", |c| {
        let m = c.migration.as_mut().expect("[migration]");
        assert_eq!(m.interface.as_deref(), Some("mig0"));
        m.interface = Some("nosuch0".to_owned());
    })
    .unwrap();
    lab.stop_agent("a").unwrap();
    let log_path = lab.host("a").unwrap().log.clone();
    let before = std::fs::read_to_string(&log_path).unwrap_or_default().len();
    lab.start_agent("a").unwrap();
    let f = LabFerry { lab: &lab };
    f.json("a", &["vm", "create", "v", "--memory", "64M", "--start"]);
    f.wait_runs_on("a", "v");
    let s = f.json("a", &["stats"]);
    assert_eq!(s["available"], false, "{s}");
    let reason = s["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("nosuch0") && reason.contains("not pinned"),
        "{s}"
    );
    // This agent's part of the log (the lab's agents append to it).
    let all = std::fs::read_to_string(&log_path).unwrap();
    let log = all.get(before..).unwrap_or(&all);
    let said = log
        .matches("eBPF pinning and link utilization are off")
        .count();
    assert_eq!(said, 1, "said {said} times:\n{log}");
    lab.down().unwrap();
}
