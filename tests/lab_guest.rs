//! In the two-host lab: a 1 GiB mixed workload guest with 2 vCPUs runs on host `a`, driven
//! through the `ferry --host a` CLI against the agent inside host `a`'s namespace.

use ferry_tests::{ferry_bin, require, wait_for, Need};
use xtask::lab::{Lab, LabOptions};

#[test]
fn workload_guest_runs_on_lab_host_a() {
    if !require(
        "workload_guest_runs_on_lab_host_a",
        &[Need::Root, Need::Kvm, Need::Netns],
    ) {
        return;
    }
    let lab = Lab::up(LabOptions::for_test("guest").with_ferry_bin(ferry_bin())).expect("lab up");
    // `--host a` finds the lab's agent under FERRY_LAB_ROOT.
    let ferry = |args: &[&str]| {
        let o = std::process::Command::new(ferry_bin())
            .env("FERRY_LAB_ROOT", lab.root())
            .args(["--host", "a", "--json"])
            .args(args)
            .output()
            .expect("run ferry");
        assert!(
            o.status.success(),
            "ferry {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&o.stdout).expect("json")
    };
    let h = ferry(&["host"]);
    assert_eq!(h["name"], "a");
    ferry(&[
        "vm",
        "create",
        "vm1",
        "--memory",
        "1G",
        "--vcpus",
        "2",
        "--profile",
        "mixed",
        "--dirty-rate",
        "64",
        "--start",
    ]);
    wait_for("fill", 120, || {
        let i = ferry(&["vm", "inspect", "vm1"]);
        i["heartbeats"]
            .as_array()?
            .iter()
            .all(|h| h["phase"] == "work")
            .then_some(())
    });
    let first = ferry(&["vm", "inspect", "vm1"]);
    let beats = |i: &serde_json::Value, v: usize| i["heartbeats"][v]["beats"].as_u64().unwrap();
    wait_for("both vCPUs beat on", 30, || {
        let i = ferry(&["vm", "inspect", "vm1"]);
        (beats(&i, 0) > beats(&first, 0) && beats(&i, 1) > beats(&first, 1)).then_some(())
    });
    assert_eq!(first["state"], "running");
    assert_eq!(first["dirty_rate"]["requested_mib_per_sec"], 64);
    // The guest is on host a only.
    let b = std::process::Command::new(ferry_bin())
        .env("FERRY_LAB_ROOT", lab.root())
        .args(["--host", "b", "--json", "vm", "list"])
        .output()
        .unwrap();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&b.stdout).unwrap(),
        serde_json::json!([])
    );
    ferry(&["vm", "pause", "vm1"]);
    let v = ferry(&["vm", "verify", "vm1"]);
    assert_eq!(v["ok"], true, "{v}");
    lab.down().expect("lab down");
}
