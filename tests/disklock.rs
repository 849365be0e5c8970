//! Disk locks in the two-host lab: a disk image on the shared datastore belongs to one running
//! guest in the whole cluster; the lock moves with the guest at the commit point, stays with the
//! source when a migration fails, is reported stale when its host dies and is taken over only by
//! `ferry disk unlock`; racing creates on two hosts leave exactly one winner.

use ferry_tests::{ferry_bin, require, wait_for, LabFerry, Need};
use serde_json::{json, Value};
use xtask::lab::{Lab, LabOptions};

const DISK: &str = "[shared] dk/dk.img:64M";
const DISK_PATH: &str = "[shared] dk/dk.img";

fn lab(test: &str) -> Option<Lab> {
    if !require(test, &[Need::Root, Need::Kvm, Need::Netns]) {
        return None;
    }
    Some(Lab::up(LabOptions::for_test(test).with_ferry_bin(ferry_bin())).expect("lab up"))
}

fn create(f: &LabFerry, host: &str, vm: &str) -> std::process::Output {
    f.cli(
        host,
        &[
            "vm", "create", vm, "--memory", "64M", "--disk", DISK, "--start",
        ],
    )
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The lock of the guest's disk as `vm inspect` shows it.
fn lock_of(f: &LabFerry, host: &str, vm: &str) -> Value {
    let i = f.json(host, &["vm", "inspect", vm]);
    let l = &i["disk_locks"][0];
    assert_eq!(l["disk"], DISK_PATH, "{i}");
    l["holder"].clone()
}

fn assert_refused(o: &std::process::Output, holder: &str, host: &str) {
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let e = stderr(o);
    assert!(
        e.contains(&format!("in use by guest \"{holder}\" on host {host}")),
        "{e}"
    );
}

/// The case (dk2 on a, dk4 on a, dk3 on b, one disk), then a migration moves the lock,
/// a cancelled one leaves it, and stopping releases it.
#[test]
fn one_running_guest_per_disk_and_the_lock_moves_with_it() {
    let Some(lab) = lab("disklock") else { return };
    let f = LabFerry { lab: &lab };
    assert!(create(&f, "a", "dk2").status.success());
    assert_eq!(
        lock_of(&f, "a", "dk2"),
        json!({"vm": "dk2", "host": "a", "stale": false, "heartbeat_age_s": lock_of(&f, "a", "dk2")["heartbeat_age_s"]})
    );
    assert_refused(&create(&f, "a", "dk4"), "dk2", "a");
    assert_refused(&create(&f, "b", "dk3"), "dk2", "a");
    // Refused guests are not left behind half-made.
    assert_eq!(f.vms("a"), vec!["dk2"]);
    assert!(f.vms("b").is_empty());

    // `ferry check` shows the holder and passes for the guest itself.
    let c = f.json("a", &["check", "dk2", "--to", "b"]);
    let row = c["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["requirement"] == "disk lock")
        .cloned()
        .unwrap_or_else(|| panic!("no disk lock row: {c}"));
    assert_eq!(row["result"], "ok", "{row}");

    // a → b: the lock is b's now; a guest on a naming the disk is refused, naming b.
    let rec = f.migrate("a", "dk2", "b", &["--verify"]);
    assert_eq!(rec["phase"], "completed", "{rec}");
    assert_eq!(lock_of(&f, "b", "dk2")["host"], "b");
    assert_refused(&create(&f, "a", "dk4"), "dk2", "b");

    // A cancelled migration b → a leaves the lock with b.
    f.slow_migration_link("b", "20mbit");
    let o = f.cli("b", &["--json", "migrate", "dk2", "--to", "a", "--detach"]);
    assert!(o.status.success(), "{o:?}");
    let id = serde_json::from_slice::<Value>(&o.stdout).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    f.json("b", &["migrate", "--cancel", &id]);
    wait_for("the cancelled migration to end", 30, || {
        let r = f.json("b", &["migrations", &id]);
        (r["phase"] == "cancelled").then_some(())
    });
    wait_for("a to discard its copy", 20, || {
        f.vms("a").is_empty().then_some(())
    });
    assert_eq!(f.json("b", &["vm", "inspect", "dk2"])["state"], "running");
    assert_eq!(lock_of(&f, "b", "dk2")["host"], "b");
    assert_refused(&create(&f, "a", "dk4"), "dk2", "b");

    // Stopping the guest releases the disk: now another guest may take it.
    f.json("b", &["vm", "stop", "dk2"]);
    assert!(lock_of(&f, "b", "dk2").is_null());
    assert!(create(&f, "a", "dk4").status.success());
    // And dk2 cannot start again while dk4 holds it.
    let o = f.cli("b", &["vm", "start", "dk2"]);
    assert_refused(&o, "dk4", "a");
    lab.down().unwrap();
}

/// A host that dies keeps its locks, reported stale once its lease runs out; only `ferry disk
/// unlock` takes them over, and it refuses while the holder is alive.
#[test]
fn a_dead_hosts_lock_is_stale_and_taken_over_only_on_purpose() {
    let Some(mut lab) = lab("diskstale") else {
        return;
    };
    // A short lease (3 s) so the test does not wait 30.
    for host in ["a", "b"] {
        lab.edit_config(host, |c| c.cluster.lock_lease_s = 3)
            .unwrap();
        lab.stop_agent(host).unwrap();
        lab.start_agent(host).unwrap();
    }
    let f = LabFerry { lab: &lab };
    assert!(create(&f, "a", "dk2").status.success());
    let o = f.cli("b", &["disk", "unlock", DISK_PATH]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(stderr(&o).contains("which is alive"), "{}", stderr(&o));

    // SIGKILL a's agent (its guest dies with it today).
    let pid = lab.host("a").unwrap().agent_pid.expect("a's agent runs");
    // SAFETY: kill(2) on the pid of the agent this lab started; no memory involved.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
    wait_for("a's agent to die", 10, || {
        (!lab.agent_alive("a").unwrap_or(true)).then_some(())
    });
    // Within the lease the lock is not stale yet; after it, it is, and still refuses.
    let f = LabFerry { lab: &lab };
    let o = create(&f, "b", "dk3");
    assert_refused(&o, "dk2", "a");
    std::thread::sleep(std::time::Duration::from_secs(4));
    let o = create(&f, "b", "dk3");
    assert_refused(&o, "dk2", "a");
    assert!(
        stderr(&o).contains("stopped renewing its lease"),
        "{}",
        stderr(&o)
    );
    assert!(f.vms("b").is_empty());
    // The deliberate step.
    let h = f.json("b", &["disk", "unlock", DISK_PATH]);
    assert_eq!(
        (h["vm"].as_str(), h["host"].as_str()),
        (Some("dk2"), Some("a"))
    );
    assert!(create(&f, "b", "dk3").status.success());
    assert_eq!(lock_of(&f, "b", "dk3")["host"], "b");
    // a comes back: its lost guest cannot take the disk back; destroying it releases nothing
    // of dk3's.
    lab.start_agent("a").unwrap();
    let f = LabFerry { lab: &lab };
    f.json("a", &["vm", "destroy", "dk2"]);
    assert_eq!(lock_of(&f, "b", "dk3")["vm"], "dk3");
    lab.down().unwrap();
}

/// Creates on a and b race for one disk: exactly one wins, every time.
#[test]
fn racing_creates_on_two_hosts_have_exactly_one_winner() {
    let Some(lab) = lab("diskrace") else { return };
    let f = LabFerry { lab: &lab };
    for round in 0..20 {
        let (va, vb) = (format!("ra{round}"), format!("rb{round}"));
        let (oa, ob) = std::thread::scope(|s| {
            let ha = s.spawn(|| create(&f, "a", &va));
            let hb = s.spawn(|| create(&f, "b", &vb));
            (ha.join().unwrap(), hb.join().unwrap())
        });
        let won: Vec<(&str, &str)> = [("a", va.as_str(), &oa), ("b", vb.as_str(), &ob)]
            .into_iter()
            .filter(|(_, _, o)| o.status.success())
            .map(|(h, v, _)| (h, v))
            .collect();
        assert_eq!(won.len(), 1, "round {round}: {oa:?} {ob:?}");
        let (host, vm) = won[0];
        let loser = if host == "a" { &ob } else { &oa };
        assert!(stderr(loser).contains("in use by guest"), "{loser:?}");
        f.json(host, &["vm", "destroy", vm]);
    }
    assert!(f.vms("a").is_empty() && f.vms("b").is_empty());
    lab.down().unwrap();
}
