//! Pre-migration checks in the lab, each failing and then passing, and the MAC announcement.

use ferry::control::config::Config;
use ferry_tests::{ferry_bin, require, wait_for, LabFerry, Need};
use serde_json::Value;
use xtask::lab::{Lab, LabOptions};

fn lab(test: &str) -> Option<Lab> {
    if !require(test, &[Need::Root, Need::Kvm, Need::Netns]) {
        return None;
    }
    Some(Lab::up(LabOptions::for_test(test).with_ferry_bin(ferry_bin())).expect("lab up"))
}

/// Edit a host's config and restart its agent.
fn reconfigure(lab: &mut Lab, host: &str, edit: impl FnOnce(&mut Config)) {
    lab.edit_config(host, edit).unwrap();
    lab.stop_agent(host).unwrap();
    lab.start_agent(host).unwrap();
}

/// `ferry check`: (passed, the row for `what`).
fn check(f: &LabFerry, vm: &str, what: &str) -> (bool, Value) {
    let o = f.cli("a", &["--json", "check", vm, "--to", "b"]);
    let r: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    });
    assert_eq!(
        o.status.success(),
        r["passed"] == true,
        "exit code follows the result: {r}"
    );
    let row = r["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["requirement"].as_str().unwrap().starts_with(what))
        .cloned()
        .unwrap_or_else(|| panic!("no {what} row: {r}"));
    (r["passed"] == true, row)
}

/// `ferry migrate` refuses, naming `needle`; `--force` does not get past a failure either.
fn refused(f: &LabFerry, vm: &str, needle: &str) {
    for extra in [None, Some("--force")] {
        let mut args = vec!["migrate", vm, "--to", "b"];
        args.extend(extra);
        let o = f.cli("a", &args);
        assert_eq!(o.status.code(), Some(1), "{extra:?}: {o:?}");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(
            e.contains("cannot migrate") && e.contains(needle),
            "{extra:?}: {e}"
        );
    }
}

#[test]
fn cpu_check_names_the_feature_and_a_mask_fixes_it() {
    let Some(mut lab) = lab("chk-cpu") else {
        return;
    };
    // b offers one feature less (a cluster baseline hiding clwb).
    reconfigure(&mut lab, "b", |c| c.cpu.mask = vec!["clwb".to_owned()]);
    let f = LabFerry { lab: &lab };
    f.json("a", &["vm", "create", "full", "--memory", "64M", "--start"]);
    let (ok, row) = check(&f, "full", "CPU");
    assert!(!ok);
    assert_eq!(row["result"], "failure");
    assert!(row["detail"].as_str().unwrap().contains("clwb"), "{row}");
    refused(&f, "full", "clwb");
    assert!(f.vms("b").is_empty(), "nothing moved");
    // The same guest with clwb masked passes and migrates.
    f.json(
        "a",
        &[
            "vm",
            "create",
            "masked",
            "--memory",
            "64M",
            "--cpu-mask",
            "clwb",
            "--start",
        ],
    );
    let (ok, row) = check(&f, "masked", "CPU");
    assert!(ok, "{row}");
    let rec = f.migrate("a", "masked", "b", &[]);
    assert_eq!(rec["phase"], "completed", "{rec}");
    // A baseline for the cluster names clwb as the feature to mask.
    let b = f.json("a", &["cpu", "baseline", "b"]);
    assert!(
        b["mask"].as_array().unwrap().iter().any(|m| m == "clwb"),
        "{b}"
    );
    lab.down().unwrap();
}

#[test]
fn datastore_and_port_group_checks() {
    let Some(mut lab) = lab("chk-ds") else { return };
    // a knows a port group b does not have.
    reconfigure(&mut lab, "a", |c| {
        c.port_groups
            .insert("lab-only".to_owned(), "vmbr0".to_owned());
    });
    let f = LabFerry { lab: &lab };
    // "local" exists on both hosts but is different storage.
    f.json(
        "a",
        &[
            "vm",
            "create",
            "loc",
            "--memory",
            "64M",
            "--disk",
            "[local] loc/d.img:8M",
            "--start",
        ],
    );
    let (ok, row) = check(&f, "loc", "Datastore");
    assert!(!ok);
    assert!(
        row["detail"]
            .as_str()
            .unwrap()
            .contains("different storage"),
        "{row}"
    );
    refused(&f, "loc", "not shared");
    // On the shared datastore it passes.
    f.json(
        "a",
        &[
            "vm",
            "create",
            "sh",
            "--memory",
            "64M",
            "--disk",
            "[shared] sh/d.img:8M",
            "--nic",
            "vm-net",
            "--start",
        ],
    );
    let (ok, row) = check(&f, "sh", "Datastore");
    assert!(ok, "{row}");
    assert_eq!(row["result"], "ok");
    // A NIC on a port group b lacks is refused by name; on vm-net it passes.
    f.json(
        "a",
        &[
            "vm", "create", "pg", "--memory", "64M", "--nic", "lab-only", "--start",
        ],
    );
    let (ok, row) = check(&f, "pg", "Port group");
    assert!(!ok);
    assert!(
        row["detail"].as_str().unwrap().contains("lab-only"),
        "{row}"
    );
    refused(&f, "pg", "lab-only");
    let rec = f.migrate("a", "sh", "b", &[]);
    assert_eq!(rec["phase"], "completed", "{rec}");
    assert!(lab.shared_datastore().join("sh/d.img").exists());
    lab.down().unwrap();
}

#[test]
fn link_check_and_ping_follow_the_migration_link() {
    let Some(lab) = lab("chk-link") else { return };
    let f = LabFerry { lab: &lab };
    f.json("a", &["vm", "create", "v", "--memory", "64M", "--start"]);
    let p = f.json("a", &["ping", "b"]);
    assert_eq!(p["received"], p["sent"], "{p}");
    assert_eq!(p["interface"], "mig0");
    assert_eq!(p["mtu"][0]["ok"], true, "1500 passes: {p}");
    lab.exec("a", &["ip", "link", "set", "mig0", "down"])
        .unwrap();
    let o = f.cli("a", &["--json", "ping", "b"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let lost: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(lost["received"], 0);
    assert_eq!(lost["loss_percent"], 100.0);
    let (ok, row) = check(&f, "v", "Migration link");
    assert!(!ok);
    assert_eq!(row["result"], "failure", "{row}");
    refused(&f, "v", "Migration link");
    lab.exec("a", &["ip", "link", "set", "mig0", "up"]).unwrap();
    wait_for("the link back up", 20, || {
        check(&f, "v", "Migration link").0.then_some(())
    });
    let rec = f.migrate("a", "v", "b", &[]);
    assert_eq!(rec["phase"], "completed", "{rec}");
    lab.down().unwrap();
}

#[test]
fn room_check_refuses_before_any_memory_moves() {
    let Some(mut lab) = lab("chk-room") else {
        return;
    };
    let total = {
        let f = LabFerry { lab: &lab };
        f.json("a", &["vm", "create", "big", "--memory", "512M", "--start"]);
        // With b as configured, there is room.
        let (ok, row) = check(&f, "big", "Room");
        assert!(ok, "{row}");
        // A guest name is unique in the cluster: the shared ownership record names b, so a
        // second guest of that name cannot even be created on a (the Room check's "already
        // has a VM named" row covers clusters without ownership records).
        f.json("b", &["vm", "create", "taken", "--memory", "16M"]);
        let o = f.cli(
            "a",
            &["vm", "create", "taken", "--memory", "16M", "--start"],
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("unique in the cluster") && err.contains("b"),
            "{err}"
        );
        f.json("b", &["host"])["memory_total_mib"].as_u64().unwrap()
    };
    // b keeps all but 256 MiB of its memory for itself.
    reconfigure(&mut lab, "b", |c| c.limits.memory_reserve_mib = total - 256);
    let f = LabFerry { lab: &lab };
    let (ok, row) = check(&f, "big", "Room");
    assert!(!ok);
    assert!(
        row["detail"].as_str().unwrap().contains("needs 512 MiB"),
        "{row}"
    );
    refused(&f, "big", "needs 512 MiB");
    assert!(
        f.json("a", &["migrations"]).as_array().unwrap().is_empty(),
        "no migration started"
    );
    assert!(f.json("b", &["migrations"]).as_array().unwrap().is_empty());
    lab.down().unwrap();
}

fn fdb_port(lab: &Lab, mac: &str) -> Option<String> {
    let out = lab
        .exec("sw", &["bridge", "fdb", "show", "br", "br0"])
        .ok()?;
    out.lines()
        .find(|l| l.starts_with(mac))
        .and_then(|l| l.split_whitespace().nth(2).map(str::to_string))
}

#[test]
fn the_switch_learns_the_guest_mac_where_it_runs() {
    let Some(lab) = lab("announce") else { return };
    let f = LabFerry { lab: &lab };
    let mac = "52:54:00:0a:0b:0c";
    f.json(
        "a",
        &[
            "vm",
            "create",
            "n",
            "--memory",
            "64M",
            "--nic",
            &format!("{mac}@vm-net"),
            "--start",
        ],
    );
    wait_for("the MAC at a's port", 10, || {
        (fdb_port(&lab, mac).as_deref() == Some("a-up")).then_some(())
    });
    let rec = f.migrate("a", "n", "b", &[]);
    assert_eq!(rec["phase"], "completed", "{rec}");
    let ann = &rec["summary"]["announcements"];
    assert_eq!(ann[0]["mac"], mac, "{rec}");
    assert_eq!(ann[0]["interface"], "vmbr0");
    assert_eq!(ann[0]["rounds"], 5);
    wait_for("the MAC at b's port", 10, || {
        (fdb_port(&lab, mac).as_deref() == Some("b-up")).then_some(())
    });
    // And it stays there: a no longer announces a guest that left.
    std::thread::sleep(std::time::Duration::from_millis(1200));
    assert_eq!(fdb_port(&lab, mac).as_deref(), Some("b-up"));
    lab.down().unwrap();
}

/// `--json` on every command prints JSON that parses (one object or array; `migrate` prints
/// JSON lines), for each command of the CLI, against a lab.
#[test]
fn every_command_prints_json_that_parses() {
    let Some(lab) = lab("chk-json") else { return };
    let f = LabFerry { lab: &lab };
    let dir = lab.root().join("json-test");
    std::fs::create_dir_all(&dir).unwrap();
    let save = dir.join("j.snap");
    let save = save.to_str().unwrap();
    let runs: Vec<(&str, Vec<&str>)> = vec![
        ("a", vec!["host"]),
        ("a", vec!["vm", "create", "j", "--memory", "64M", "--start"]),
        ("a", vec!["vm", "list"]),
        ("a", vec!["vm", "inspect", "j"]),
        ("a", vec!["vm", "console", "j"]),
        ("a", vec!["vm", "pause", "j"]),
        ("a", vec!["vm", "digest", "j"]),
        ("a", vec!["vm", "verify", "j"]),
        ("a", vec!["vm", "resume", "j"]),
        ("a", vec!["check", "j", "--to", "b"]),
        ("a", vec!["cpu", "baseline", "b"]),
        ("a", vec!["ping", "b"]),
        ("a", vec!["ping", "b", "--throughput", "0.5"]),
        ("a", vec!["stats"]),
        ("a", vec!["migrate", "j", "--to", "b"]),
        ("a", vec!["migrations"]),
        ("b", vec!["vm", "pause", "j"]),
        ("b", vec!["vm", "save", "j", save]),
        ("b", vec!["vm", "destroy", "j"]),
        ("b", vec!["vm", "restore", save]),
        ("b", vec!["vm", "stop", "j"]),
        ("b", vec!["vm", "start", "j"]),
    ];
    // `digest`, `save` and `restore` are refused with `[vmm] mode = "process"` (docs/vmm.md,
    // "not supported in process mode yet"): there they are left out, with the `destroy` that
    // only makes room for the restore.
    let process = xtask::lab::lab_vmm_mode() == ferry::control::config::VmmMode::Process;
    let runs = runs.into_iter().filter(|(_, args)| {
        !(process
            && matches!(
                args[..],
                ["vm", "digest" | "save" | "restore" | "destroy", ..]
            ))
    });
    for (host, args) in runs {
        let mut a = vec!["--json"];
        a.extend_from_slice(&args);
        let o = f.cli(host, &a);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "ferry --host {host} {args:?}: {out}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let lines: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
        let whole = serde_json::from_str::<Value>(&out);
        assert!(
            whole.is_ok()
                || (!lines.is_empty()
                    && lines
                        .iter()
                        .all(|l| serde_json::from_str::<Value>(l).is_ok())),
            "ferry --host {host} --json {args:?} is not JSON: {out}"
        );
    }
    lab.down().unwrap();
}
