//! The agent over VMM processes (`[vmm] mode = "process"`, issue 16): guests outlive a killed
//! or stopped agent, the restarted agent adopts and migrates them, a VMM that dies takes only
//! its guest.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry::vmm::client::VmmClient;
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

/// Agent SIGKILLed, then restarted; and stopped cleanly, then restarted: the guests keep
/// beating through both, the new agent lists them and migrates each with --verify.
#[test]
fn guests_outlive_a_killed_and_a_stopped_agent_then_migrate() {
    let Some(mut lab) = lab("vmmagent") else {
        return;
    };
    let state_dir = lab.host("a").unwrap().state_dir.clone();
    {
        let f = LabFerry { lab: &lab };
        create(&f, "dirty", "32");
        create(&f, "idle", "0");
        f.wait_filled("a", "dirty");
    }
    for how in ["SIGKILL", "SIGTERM"] {
        let stop = Arc::new(AtomicBool::new(false));
        let watchers: Vec<_> = ["dirty", "idle"]
            .iter()
            .map(|vm| watch_beats(&state_dir, vm, stop.clone()))
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let pid = lab.host("a").unwrap().agent_pid.unwrap();
        let t = Instant::now();
        if how == "SIGKILL" {
            // SAFETY: kill(2) on the agent process this test's lab started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        lab.stop_agent("a").unwrap();
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
        let f = LabFerry { lab: &lab };
        let mut vms = f.vms("a");
        vms.sort();
        assert_eq!(vms, vec!["dirty".to_string(), "idle".to_string()], "{how}");
        for vm in ["dirty", "idle"] {
            assert_eq!(
                f.json("a", &["vm", "inspect", vm])["state"],
                "running",
                "{how}"
            );
        }
    }
    let f = LabFerry { lab: &lab };
    for vm in ["dirty", "idle"] {
        let rec = f.migrate("a", vm, "b", &["--verify"]);
        assert_eq!(rec["phase"], "completed", "{rec}");
        assert_eq!(rec["summary"]["verified"], true, "{rec}");
        f.wait_runs_on("b", vm);
    }
    assert!(f.vms("a").is_empty());
    for vm in ["dirty", "idle"] {
        f.json("b", &["vm", "destroy", vm]);
    }
    lab.down().unwrap();
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
