//! The agent over VMM processes (`[vmm] mode = "process"`, issue 16): guests outlive a killed
//! or stopped agent, the restarted agent adopts and migrates them, a VMM that dies takes only
//! its guest.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry::vmm::client::VmmClient;
use ferry_tests::client::{CounterReader, Pinger};
use ferry_tests::{ferry_bin, require, wait_for, LabFerry, Need};
use xtask::lab::{Lab, LabOptions};

fn lab(test: &str) -> Option<Lab> {
    if !require(test, &[Need::Root, Need::Kvm, Need::Netns]) {
        return None;
    }
    // The lab writes its agents' configs from this (xtask::lab::config::lab_vmm_mode).
    std::env::set_var("FERRY_LAB_VMM", "process");
    Some(Lab::up(LabOptions::for_test(test).with_ferry_bin(ferry_bin())).expect("lab up"))
}

/// Watch a workload guest's heartbeats straight from its VMM (not through the agent) every
/// 2 ms; the longest interval between two beats, in guest time (its TSC), in ms.
fn watch_beats(
    state_dir: &std::path::Path,
    vm: &str,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<f64> {
    let sock = ferry::vmm::socket_path(state_dir, vm);
    std::thread::spawn(move || {
        let mut c = VmmClient::connect(&sock, Duration::from_secs(5)).expect("connect to the VMM");
        let khz = c.status().expect("status").tsc_khz as f64;
        let mem = c.memory().expect("map memory");
        let vcpus = c.hello().spec.vcpus;
        let mut last: Option<Vec<ferry::vm::workload::Heartbeat>> = None;
        let mut max_ms: f64 = 0.0;
        while !stop.load(Ordering::SeqCst) {
            let now = ferry::vm::workload::heartbeats(&mem, vcpus).expect("heartbeats");
            if let Some(prev) = &last {
                for (p, n) in prev.iter().zip(&now) {
                    let beats = n.beats.saturating_sub(p.beats);
                    if beats > 0 {
                        let ms = n.tsc.saturating_sub(p.tsc) as f64 / khz / beats as f64;
                        max_ms = max_ms.max(ms);
                    }
                }
            }
            last = Some(now);
            std::thread::sleep(Duration::from_millis(2));
        }
        max_ms
    })
}

fn create(f: &LabFerry, name: &str, dirty: &str) {
    f.json(
        "a",
        &[
            "vm",
            "create",
            name,
            "--memory",
            "256M",
            "--profile",
            "random",
            "--dirty-rate",
            dirty,
            "--start",
        ],
    );
}

/// The service guest (`guest/`, kind `service`) with a NIC on `vm-net` and a disk on the
/// shared datastore, on host a.
fn create_service(lab: &Lab) {
    LabFerry { lab }.start_service_guest("a", "s1", 10, "52:54:00:0f:16:0a", &[]);
}

/// A copy of the built `ferry` at `path`, a new file (inode) each time: what a package
/// upgrade does to /usr/bin/ferry.
fn install_binary(path: &Path) {
    let _ = std::fs::remove_file(path);
    std::fs::copy(ferry_bin(), path).expect("copy the ferry binary");
}

/// The binary `pid` runs, as /proc/PID/exe names it (" (deleted)" once it was replaced).
fn exe_of(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|e| format!("<{e}>"))
}

const GUESTS: [&str; 3] = ["dirty", "idle", "s1"];

/// Agent SIGKILLed, then restarted; and stopped cleanly, then restarted — each time from a
/// replaced binary (an upgrade): the workload guests keep beating (read straight from their
/// VMMs), the service guest keeps answering its client's pings and TCP stream, the VMMs still
/// run the old binary, the new agent lists all three with their disk locks held, and migrates
/// each with --verify (b's agent, whose binary was replaced too, starts the incoming VMMs).
#[test]
fn guests_outlive_a_killed_and_a_stopped_agent_then_migrate() {
    if !require(
        "guests_outlive_a_killed_and_a_stopped_agent_then_migrate",
        &[Need::Root, Need::Kvm, Need::Netns],
    ) {
        return;
    }
    let bin_dir = std::env::temp_dir().join(format!("ferry-vmmagent-bin-{}", std::process::id()));
    std::fs::create_dir_all(&bin_dir).unwrap();
    let bin = bin_dir.join("ferry");
    install_binary(&bin);
    std::env::set_var("FERRY_LAB_VMM", "process");
    let mut lab =
        Lab::up(LabOptions::for_test("vmmagent").with_ferry_bin(bin.clone())).expect("lab up");
    let state_dir = lab.host("a").unwrap().state_dir.clone();
    {
        let f = LabFerry { lab: &lab };
        create(&f, "dirty", "32");
        create(&f, "idle", "0");
        create_service(&lab);
        f.wait_filled("a", "dirty");
    }
    let vmm_pid = |vm: &str| {
        VmmClient::connect(
            &ferry::vmm::socket_path(&state_dir, vm),
            Duration::from_secs(5),
        )
        .expect("connect to the VMM")
        .hello()
        .pid
    };
    let vmm_pids: Vec<u32> = GUESTS.iter().map(|vm| vmm_pid(vm)).collect();
    let cl = lab.client_netns().to_owned();
    let guest = xtask::lab::vm_addr(10).unwrap();
    let pinger = Pinger::start(
        &cl,
        guest,
        Duration::from_millis(10),
        Duration::from_secs(300),
    )
    .expect("ping");
    let counter = CounterReader::start(&cl, guest, Duration::from_secs(300)).expect("counter");
    wait_for("the counter stream to flow", 20, || {
        (counter.records() > 1000).then_some(())
    });
    for how in ["SIGKILL", "SIGTERM"] {
        let stop = Arc::new(AtomicBool::new(false));
        let watchers: Vec<_> = ["dirty", "idle"]
            .iter()
            .map(|vm| watch_beats(&state_dir, vm, stop.clone()))
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let records_before = counter.records();
        let pid = lab.host("a").unwrap().agent_pid.unwrap();
        let t = Instant::now();
        if how == "SIGKILL" {
            // SAFETY: kill(2) on the agent process this test's lab started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        lab.stop_agent("a").unwrap();
        // The upgrade: a new binary where the agent was started from.
        install_binary(&bin);
        std::thread::sleep(Duration::from_millis(500));
        lab.start_agent("a").unwrap();
        let down = t.elapsed();
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::SeqCst);
        let gaps: Vec<f64> = watchers.into_iter().map(|w| w.join().unwrap()).collect();
        eprintln!("{how}: agent away {down:?}; longest heartbeat interval per guest: {gaps:?} ms");
        for g in &gaps {
            assert!(*g < 50.0, "{how}: a heartbeat gap of {g:.1} ms");
        }
        // The new agent runs the new binary; the VMMs it adopted still run the first one.
        let agent = exe_of(lab.host("a").unwrap().agent_pid.unwrap());
        assert_eq!(
            agent,
            bin.to_string_lossy(),
            "{how}: the new agent's binary"
        );
        for (vm, pid) in GUESTS.iter().zip(&vmm_pids) {
            assert_eq!(vmm_pid(vm), *pid, "{how}: {vm} has another VMM");
            let exe = exe_of(*pid);
            assert!(
                exe.ends_with(" (deleted)"),
                "{how}: the VMM of {vm} should run the replaced binary, runs {exe}"
            );
        }
        let f = LabFerry { lab: &lab };
        let mut vms = f.vms("a");
        vms.sort();
        assert_eq!(vms, GUESTS, "{how}");
        for vm in GUESTS {
            assert_eq!(
                f.json("a", &["vm", "inspect", vm])["state"],
                "running",
                "{how}"
            );
        }
        // The service guest's disk lock: still held by it, on a, and the lease renewed.
        let locks = &f.json("a", &["vm", "inspect", "s1"])["disk_locks"];
        let holder = &locks[0]["holder"];
        assert_eq!(holder["vm"], "s1", "{how}: {locks}");
        assert_eq!(holder["host"], "a", "{how}: {locks}");
        assert_eq!(holder["stale"], false, "{how}: {locks}");
        wait_for("the stream to flow after the restart", 10, || {
            (counter.records() > records_before + 500).then_some(())
        });
    }
    let ping = pinger.stop().expect("ping report");
    let stream = counter.stop();
    eprintln!(
        "client through both restarts: pings {} sent, {} answered, lost {:?}, largest gap {:.1} ms; counter stream {} records, largest stall {:?}",
        ping.transmitted.unwrap_or(0),
        ping.replies.len(),
        ping.lost,
        ping.max_gap_ms,
        stream.records,
        stream.max_stall
    );
    assert!(stream.clean(), "counter stream: {stream:?}");
    assert!(
        ping.replies.len() > 100,
        "pings answered: {}",
        ping.replies.len()
    );
    assert!(ping.lost.is_empty(), "pings lost: {:?}", ping.lost);
    assert_eq!(ping.duplicates, 0, "duplicate ping replies");
    let f = LabFerry { lab: &lab };
    for vm in GUESTS {
        let rec = f.migrate("a", vm, "b", &["--verify"]);
        assert_eq!(rec["phase"], "completed", "{rec}");
        assert_eq!(rec["summary"]["verified"], true, "{rec}");
        if vm == "s1" {
            assert_eq!(f.json("b", &["vm", "inspect", vm])["state"], "running");
        } else {
            f.wait_runs_on("b", vm);
        }
    }
    assert!(f.vms("a").is_empty());
    for vm in GUESTS {
        f.json("b", &["vm", "destroy", vm]);
    }
    lab.down().unwrap();
    let _ = std::fs::remove_dir_all(&bin_dir);
}

/// A VMM killed with SIGKILL: only its guest is crashed, with the reason; the other guest and
/// the agent carry on.
#[test]
fn a_killed_vmm_crashes_only_its_guest() {
    let Some(lab) = lab("vmmcrash") else { return };
    let state_dir = lab.host("a").unwrap().state_dir.clone();
    let f = LabFerry { lab: &lab };
    create(&f, "victim", "0");
    create(&f, "bystander", "0");
    let pid = {
        let c = VmmClient::connect(
            &ferry::vmm::socket_path(&state_dir, "victim"),
            Duration::from_secs(5),
        )
        .expect("connect");
        c.hello().pid
    };
    // SAFETY: kill(2) on the VMM process this test's agent started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let i = wait_for("the victim to be crashed", 10, || {
        let i = f.json("a", &["vm", "inspect", "victim"]);
        (i["state"] == "crashed").then_some(i)
    });
    assert!(
        i["fault"].as_str().is_some_and(|s| s.contains("SIGKILL")),
        "{i}"
    );
    assert_eq!(
        f.json("a", &["vm", "inspect", "bystander"])["state"],
        "running"
    );
    f.wait_runs_on("a", "bystander");
    // The crashed guest starts afresh in a new VMM.
    f.json("a", &["vm", "start", "victim"]);
    f.wait_runs_on("a", "victim");
    f.json("a", &["vm", "destroy", "victim"]);
    // The bystander is left running: `Lab::down` stops the VMMs its agents leave behind.
    let bystander = VmmClient::connect(
        &ferry::vmm::socket_path(&state_dir, "bystander"),
        Duration::from_secs(5),
    )
    .expect("connect")
    .hello()
    .pid;
    lab.down().unwrap();
    assert!(
        !std::path::Path::new(&format!("/proc/{bystander}")).exists(),
        "Lab::down left the bystander's VMM (pid {bystander}) running"
    );
}
