//! Live migration between the two lab hosts, with real guests, real TCP and real agents.

use ferry_tests::{ferry_bin, require, wait_for, LabFerry, Need};
use xtask::lab::{Lab, LabOptions};

fn lab(test: &str) -> Option<Lab> {
    if !require(test, &[Need::Root, Need::Kvm, Need::Netns]) {
        return None;
    }
    Some(Lab::up(LabOptions::for_test(test).with_ferry_bin(ferry_bin())).expect("lab up"))
}

fn other(h: &str) -> &'static str {
    if h == "a" {
        "b"
    } else {
        "a"
    }
}

/// The acceptance path: a 1 GiB mixed 2-vCPU guest dirtying 64 MiB/s goes a→b→a three times with
/// --verify; after each move its heartbeat continues on the new host and only one copy exists.
#[test]
fn mixed_guest_three_round_trips_with_verify() {
    let Some(lab) = lab("roundtrips") else { return };
    let f = LabFerry { lab: &lab };
    f.json(
        "a",
        &[
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
        ],
    );
    f.wait_filled("a", "vm1");
    let mut here = "a";
    for trip in 0..6 {
        let there = other(here);
        let beats_before = f.beats(here, "vm1");
        let rec = f.migrate(here, "vm1", there, &["--verify"]);
        assert_eq!(rec["phase"], "completed", "move {trip}: {rec}");
        let s = &rec["summary"];
        assert_eq!(s["verified"], true, "move {trip}: {s}");
        assert!(s["downtime"]["total_ms"].as_f64().unwrap() > 0.0);
        assert!(s["wire_bytes"].as_u64().unwrap() > 0);
        // Exactly one copy, on the destination, running and beating past where it was.
        assert!(
            !f.vms(here).contains(&"vm1".to_string()),
            "move {trip}: a copy is left on {here}"
        );
        assert_eq!(f.vms(there), vec!["vm1".to_string()]);
        assert_eq!(f.json(there, &["vm", "inspect", "vm1"])["state"], "running");
        assert!(
            f.beats(there, "vm1") >= beats_before,
            "the counters came along"
        );
        f.wait_runs_on(there, "vm1");
        here = there;
    }
    // The guest's own memory check, after six moves.
    f.json(here, &["vm", "pause", "vm1"]);
    let v = f.json(here, &["vm", "verify", "vm1"]);
    assert_eq!(v["ok"], true, "{v}");
    // Both agents list the migrations, in both directions.
    let out = f.json("a", &["migrations"]);
    assert_eq!(out.as_array().unwrap().len(), 6);
    lab.down().unwrap();
}

/// A raw image that prints a hexadecimal counter, one line every ~40 ms, yielding between:
/// 16-bit real-mode code loaded at 0x7c00 (the raw kind's default), or 64-bit CPL3 code at
/// 0x40_0000 (`--mode long-user`).
fn counter_image(real_mode: bool) -> Vec<u8> {
    use iced_x86::code_asm::*;
    let mut a = CodeAssembler::new(if real_mode { 16 } else { 64 }).unwrap();
    let mut next = a.create_label();
    let mut digit = a.create_label();
    let mut dec = a.create_label();
    a.xor(esi, esi).unwrap();
    a.set_label(&mut next).unwrap();
    a.mov(edi, 8).unwrap();
    a.mov(ebx, esi).unwrap();
    a.set_label(&mut digit).unwrap();
    a.rol(ebx, 4).unwrap();
    a.mov(eax, ebx).unwrap();
    a.and(eax, 0xf).unwrap();
    a.cmp(eax, 10).unwrap();
    a.jb(dec).unwrap();
    a.add(eax, 39).unwrap(); // 'a' - 10 - '0'
    a.set_label(&mut dec).unwrap();
    a.add(eax, 48).unwrap(); // '0'
    a.mov(dx, 0x3f8u32).unwrap();
    a.out(dx, al).unwrap();
    a.dec(edi).unwrap();
    a.jnz(digit).unwrap();
    a.mov(al, 10u32).unwrap();
    a.out(dx, al).unwrap();
    a.inc(esi).unwrap();
    a.mov(eax, 100_000_000u32).unwrap();
    a.mov(dx, 0xf0u32).unwrap();
    a.out(dx, eax).unwrap();
    a.jmp(next).unwrap();
    a.assemble(if real_mode { 0x7c00 } else { 0x40_0000 })
        .unwrap()
}

fn counter_lines(text: &str) -> Vec<u32> {
    text.lines()
        .map(|l| u32::from_str_radix(l, 16).unwrap_or_else(|_| panic!("bad console line {l:?}")))
        .collect()
}

/// Raw guests (real mode, and CPL3 long mode) print a counter on the serial console; after the
/// move the console on b holds the history and goes on from there: 0, 1, 2, … with no gap and no
/// repeat, and lines printed on b itself (more than arrived with it).
#[test]
fn raw_guest_console_continues_without_gap_or_repeat() {
    let Some(lab) = lab("console") else { return };
    let f = LabFerry { lab: &lab };
    for (name, real_mode) in [("ctr16", true), ("ctr64", false)] {
        let img = lab.root().join(format!("{name}.img"));
        std::fs::write(&img, counter_image(real_mode)).unwrap();
        let mut args = vec![
            "vm",
            "create",
            name,
            "--kind",
            "raw",
            "--image",
            img.to_str().unwrap(),
            "--memory",
            "16M",
            "--start",
        ];
        if !real_mode {
            args.extend(["--mode", "long-user"]);
        }
        f.json("a", &args);
        let lines = |host: &str| -> Option<Vec<u32>> {
            let c = f.json(host, &["vm", "console", name]);
            let text = c["data"].as_str()?.to_string();
            Some(counter_lines(&text[..text.rfind('\n')? + 1]))
        };
        wait_for("a few lines on a", 30, || {
            lines("a").filter(|n| n.len() >= 5).map(|_| ())
        });
        let rec = f.migrate("a", name, "b", &["--verify"]);
        assert_eq!(rec["phase"], "completed", "{name}: {rec}");
        let arrived = lines("b").expect("console on b").len();
        let n = wait_for("lines printed on b", 30, || {
            lines("b").filter(|n| n.len() >= arrived + 5)
        });
        for (i, v) in n.iter().enumerate() {
            assert_eq!(*v as usize, i, "{name}: console on b: {n:?}");
        }
        assert!(!f.vms("a").contains(&name.to_string()));
    }
    lab.down().unwrap();
}

/// 8 GiB of untouched (zero) memory costs almost nothing on the wire.
#[test]
fn zero_guest_of_8g_moves_under_one_percent() {
    let Some(lab) = lab("zero8g") else { return };
    let f = LabFerry { lab: &lab };
    f.json(
        "a",
        &[
            "vm",
            "create",
            "z",
            "--memory",
            "8G",
            "--profile",
            "zero",
            "--start",
        ],
    );
    f.wait_filled("a", "z");
    let rec = f.migrate("a", "z", "b", &[]);
    assert_eq!(rec["phase"], "completed", "{rec}");
    let wire = rec["summary"]["wire_bytes"].as_u64().unwrap();
    assert!(wire <= (8u64 << 30) / 100, "{wire} bytes on the wire");
    assert_eq!(f.json("b", &["vm", "inspect", "z"])["state"], "running");
    f.wait_runs_on("b", "z");
    lab.down().unwrap();
}

/// A guest that dirties faster than the (throttled) link: with auto-converge it gets through by
/// being slowed down; without, the policy gives up and the guest stays where it was.
#[test]
fn faster_than_the_link_converges_or_fails_by_policy() {
    let Some(lab) = lab("fastdirty") else { return };
    let f = LabFerry { lab: &lab };
    f.slow_migration_link("a", "400mbit");
    f.json(
        "a",
        &[
            "vm",
            "create",
            "hot",
            "--memory",
            "64M",
            "--profile",
            "random",
            "--dirty-rate",
            "128",
            "--working-set",
            "32M",
            "--start",
        ],
    );
    f.wait_filled("a", "hot");

    // Without auto-converge: refused by policy after the time limit; the guest runs on a.
    let rec = f.migrate("a", "hot", "b", &["--no-auto-converge", "--max-time", "4"]);
    assert_eq!(rec["phase"], "failed", "{rec}");
    assert!(
        rec["error"].as_str().unwrap().contains("did not converge"),
        "{rec}"
    );
    assert!(f.vms("b").is_empty());
    let i = f.json("a", &["vm", "inspect", "hot"]);
    assert_eq!(i["state"], "running");
    assert_eq!(i["migration"], serde_json::Value::Null);
    f.wait_runs_on("a", "hot");

    // With auto-converge: throttled until it converges.
    let rec = f.migrate("a", "hot", "b", &["--verify"]);
    assert_eq!(rec["phase"], "completed", "{rec}");
    assert!(
        rec["summary"]["max_throttle"].as_u64().unwrap() > 0,
        "{rec}"
    );
    assert_eq!(f.vms("b"), vec!["hot".to_string()]);
    assert!(f.vms("a").is_empty());
    f.wait_runs_on("b", "hot");
    // The throttle does not follow the guest: on b it dirties at (near) its own pace again, not
    // at the few percent it was throttled to.
    wait_for("the guest's own pace on b", 20, || {
        let i = f.json("b", &["vm", "inspect", "hot"]);
        (i["dirty_rate"]["measured_mib_per_sec"].as_f64()? > 64.0).then_some(())
    });
    lab.down().unwrap();
}

/// SIGKILL the destination agent in the middle: the guest keeps running on the source.
#[test]
fn killing_the_destination_agent_leaves_the_guest_on_the_source() {
    let Some(mut lab) = lab("killdest") else {
        return;
    };
    let f = LabFerry { lab: &lab };
    f.slow_migration_link("a", "200mbit");
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
            "--dirty-rate",
            "16",
            "--start",
        ],
    );
    f.wait_filled("a", "v");
    let started = f.json("a", &["migrate", "v", "--to", "b", "--detach"]);
    let id = started["id"].as_str().unwrap().to_string();
    wait_for("pre-copy under way", 20, || {
        let r = f.json("a", &["migrations", &id]);
        (r["phase"] == "precopy").then_some(())
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    let pid = lab.host("b").unwrap().agent_pid.unwrap();
    // SAFETY: kill(2) on the agent process this test's lab started.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
    let rec = wait_for("the migration to fail", 60, || {
        let r = f.json("a", &["migrations", &id]);
        (r["phase"] == "failed").then_some(r)
    });
    assert!(rec["error"].as_str().is_some(), "{rec}");
    let i = f.json("a", &["vm", "inspect", "v"]);
    assert_eq!(i["state"], "running");
    f.wait_runs_on("a", "v");
    // Restart b's agent (reaping the killed one first): nothing of the guest is there.
    lab.stop_agent("b").unwrap();
    lab.start_agent("b").unwrap();
    let f = LabFerry { lab: &lab };
    assert!(f.vms("b").is_empty());
    // And the guest can still move once b is back.
    let rec = f.migrate("a", "v", "b", &["--verify"]);
    assert_eq!(rec["phase"], "completed", "{rec}");
    lab.down().unwrap();
}

#[test]
fn cancel_and_refusals_leave_the_guest_on_the_source() {
    let Some(lab) = lab("cancel") else { return };
    let f = LabFerry { lab: &lab };
    f.slow_migration_link("a", "100mbit");
    f.json(
        "a",
        &[
            "vm",
            "create",
            "c",
            "--memory",
            "256M",
            "--profile",
            "random",
            "--start",
        ],
    );
    f.wait_filled("a", "c");

    // User cancel.
    let started = f.json("a", &["migrate", "c", "--to", "b", "--detach"]);
    let id = started["id"].as_str().unwrap().to_string();
    wait_for("pre-copy", 20, || {
        (f.json("a", &["migrations", &id])["phase"] == "precopy").then_some(())
    });
    // While it migrates, other operations are refused.
    let o = f.cli("a", &["vm", "pause", "c"]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("is migrating"),
        "{o:?}"
    );
    f.json("a", &["migrate", "--cancel", &id]);
    let rec = wait_for("cancel", 30, || {
        let r = f.json("a", &["migrations", &id]);
        (r["phase"] == "cancelled").then_some(r)
    });
    assert!(rec["error"].as_str().unwrap().contains("cancelled"));
    assert_eq!(f.json("a", &["vm", "inspect", "c"])["state"], "running");
    wait_for("b cleaned up", 20, || f.vms("b").is_empty().then_some(()));

    // The name belongs to a (ownership record on the shared datastore): b refuses a second
    // guest of that name, and a's guest is untouched.
    lab.exec("a", &["tc", "qdisc", "del", "dev", "mig0", "root"])
        .unwrap();
    let o = f.cli("b", &["vm", "create", "c", "--memory", "64M"]);
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("unique in the cluster"),
        "{o:?}"
    );
    assert_eq!(f.json("a", &["vm", "inspect", "c"])["state"], "running");

    // Unknown peers and stopped VMs are refused before anything moves.
    // Bad input exits 2 (README: "bad command line or request") and says what is wrong.
    let o = f.cli("a", &["migrate", "c", "--to", "nowhere"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("[peers]"),
        "{o:?}"
    );
    let o = f.cli("a", &["migrate", "c", "--to", "a"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("is this host itself"),
        "{o:?}"
    );
    let o = f.cli("a", &["migrate", "c", "--to", "b", "--streams", "0"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--streams"),
        "{o:?}"
    );
    for args in [
        vec!["migrations", "m-deadbeef"],
        vec!["migrate", "--cancel", "m-deadbeef"],
    ] {
        let o = f.cli("a", &args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {o:?}");
        assert!(
            err.contains("no migration \"m-deadbeef\"") && !err.contains("no VM named"),
            "{args:?}: {err}"
        );
    }
    // The table names the peer (not a cut address) and the rounds the summary counts.
    let table = String::from_utf8_lossy(&f.cli("a", &["migrations"]).stdout).into_owned();
    assert!(!table.contains("198.18."), "{table}");
    f.json("a", &["vm", "pause", "c"]);
    let o = f.cli("a", &["migrate", "c", "--to", "b"]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("only a running VM"),
        "{o:?}"
    );
    lab.down().unwrap();
}

/// Every send mode carries a migration intact, with released buffers poisoned: a buffer reused
/// before the kernel is done with it would put poison on the wire, which the frame checksums and
/// the memory digest would catch.
#[test]
fn every_send_mode_with_poisoned_buffers_migrates_intact() {
    let Some(lab) = lab("sendmodes") else { return };
    let f = LabFerry { lab: &lab };
    f.json(
        "a",
        &[
            "vm",
            "create",
            "p",
            "--memory",
            "256M",
            "--vcpus",
            "2",
            "--profile",
            "mixed",
            "--dirty-rate",
            "32",
            "--start",
        ],
    );
    f.wait_filled("a", "p");
    let mut here = "a";
    for mode in ["zero-copy-fixed", "zero-copy", "uring", "std"] {
        let there = other(here);
        let rec = f.migrate(
            here,
            "p",
            there,
            &["--verify", "--poison-buffers", "--send-mode", mode],
        );
        assert_eq!(rec["phase"], "completed", "{mode}: {rec}");
        let s = &rec["summary"];
        assert_eq!(s["verified"], true, "{mode}: {s}");
        let t = &s["transport"];
        let total: u64 = [
            "zero_copy_bytes",
            "zc_copied_bytes",
            "uring_bytes",
            "std_bytes",
        ]
        .iter()
        .map(|k| t[k].as_u64().unwrap())
        .sum();
        assert!(total > 0, "{mode}: {t}");
        if mode == "std" {
            assert_eq!(t["std_bytes"].as_u64().unwrap(), total, "{t}");
        } else {
            assert_eq!(t["std_bytes"].as_u64().unwrap(), 0, "{mode}: {t}");
        }
        here = there;
    }
    f.json(here, &["vm", "pause", "p"]);
    assert_eq!(f.json(here, &["vm", "verify", "p"])["ok"], true);
    lab.down().unwrap();
}

/// Every page codec carries a migration intact (`--verify`), each fixed choice is what the
/// streams use, and `auto` picks zstd for text pages on a slow link, saying why in the summary.
#[test]
fn every_codec_migrates_intact_and_auto_buys_ratio_on_a_slow_link() {
    let Some(lab) = lab("codecs") else { return };
    let f = LabFerry { lab: &lab };
    f.json(
        "a",
        &[
            "vm",
            "create",
            "t",
            "--memory",
            "256M",
            "--vcpus",
            "2",
            "--profile",
            "text",
            "--dirty-rate",
            "16",
            "--start",
        ],
    );
    f.wait_filled("a", "t");
    let mut here = "a";
    let pages = |s: &serde_json::Value, e: &str| s["encodings"][e]["pages"].as_u64().unwrap();
    for codec in ["zstd", "lz4", "none", "auto"] {
        let there = other(here);
        let rec = f.migrate(here, "t", there, &["--verify", "--codec", codec]);
        assert_eq!(rec["phase"], "completed", "{codec}: {rec}");
        let s = &rec["summary"];
        assert_eq!(s["verified"], true, "{codec}: {s}");
        let tuning = s["tuning"].as_array().unwrap();
        assert_eq!(tuning.len() as u64, s["streams"].as_u64().unwrap(), "{s}");
        for t in tuning {
            assert_eq!(t["mode"], codec, "{t}");
            if codec != "auto" {
                assert_eq!(t["codec"], codec, "{t}");
                assert_eq!(t["switches"], 0, "{t}");
            }
        }
        match codec {
            "zstd" => assert!(pages(s, "zstd") > 1000 && pages(s, "lz4") == 0, "{s}"),
            "lz4" => assert!(pages(s, "lz4") > 1000 && pages(s, "zstd") == 0, "{s}"),
            "none" => assert_eq!(pages(s, "lz4") + pages(s, "zstd") + pages(s, "delta"), 0),
            _ => {}
        }
        here = there;
    }
    // A slow link: text pages compress several times better with zstd, and the CPU is idle.
    f.slow_migration_link(here, "100mbit");
    let there = other(here);
    let rec = f.migrate(here, "t", there, &["--verify"]);
    assert_eq!(rec["phase"], "completed", "{rec}");
    let s = &rec["summary"];
    assert_eq!(s["verified"], true, "{s}");
    let (mut zstd, mut all) = (0, 0);
    for t in s["tuning"].as_array().unwrap() {
        assert_eq!(t["mode"], "auto", "{t}");
        let by = |i: usize| t["pages_by_codec"][i].as_u64().unwrap();
        zstd += by(2);
        all += by(0) + by(1) + by(2);
        let r = &t["rates"];
        // Measured while link-bound, then it drifts up in windows that never wait (small late
        // rounds fit in the socket buffers): only its presence is certain.
        let link = r["link_mb_s"].as_f64().expect("a measured link rate");
        assert!(link > 1.0, "100 Mbit/s measured as {link} MB/s: {t}");
        assert!(
            r["codecs"][2]["ratio"].as_f64().unwrap() < r["codecs"][1]["ratio"].as_f64().unwrap(),
            "{t}"
        );
    }
    // A large share of the pages went as zstd. (Not all: on a slow link the socket buffers
    // hide the link from short windows, and a switch can be undone as a failed trial.)
    assert!(
        zstd * 3 > all,
        "auto on 100 Mbit/s: {zstd} of {all} pages with zstd: {s}"
    );
    assert!(pages(s, "zstd") > 0, "{s}");
    f.json(there, &["vm", "pause", "t"]);
    assert_eq!(f.json(there, &["vm", "verify", "t"])["ok"], true);
    lab.down().unwrap();
}
