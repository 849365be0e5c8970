//! The agent as a process: its API over the unix socket and the `ferry` CLI, with real guests.

use ferry_tests::{require, wait_for, Need, TestAgent};

fn can_run(test: &str) -> bool {
    require(test, &[Need::Root, Need::Kvm])
}

fn err_of(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn hello_image() -> Vec<u8> {
    ferry::vm::raw::hello_image("hello from a raw guest\n")
}

#[test]
fn raw_image_line_shows_in_vm_console() {
    if !can_run("raw_image_line_shows_in_vm_console") {
        return;
    }
    let a = TestAgent::start("console");
    let img = a.dir.join("hello.img");
    std::fs::write(&img, hello_image()).unwrap();
    let img = img.to_str().unwrap().to_string();
    a.json(&[
        "vm", "create", "hello", "--kind", "raw", "--image", &img, "--memory", "16M", "--start",
    ]);
    let text = wait_for("console line", 30, || {
        let o = a.cli(&["vm", "console", "hello"]);
        let s = String::from_utf8_lossy(&o.stdout).into_owned();
        s.contains('\n').then_some(s)
    });
    assert_eq!(text, "hello from a raw guest\n");
    let j = a.json(&["vm", "console", "hello"]);
    assert_eq!(j["next_offset"], 23);
}

#[test]
fn bad_requests_get_clear_errors_and_the_agent_survives() {
    if !can_run("bad_requests_get_clear_errors_and_the_agent_survives") {
        return;
    }
    let a = TestAgent::start("errors");
    let c = a.client();

    // Unknown VM: 404 and exit code 1.
    let o = a.cli(&["vm", "inspect", "nope"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err_of(&o).contains("no VM named \"nope\""),
        "{}",
        err_of(&o)
    );

    // 0 vCPUs: a bad request, exit code 2.
    let o = a.cli(&["vm", "create", "z", "--vcpus", "0"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        err_of(&o).contains("1 to 32 vCPUs, not 0"),
        "{}",
        err_of(&o)
    );

    // More memory than the host can give.
    let o = a.cli(&["vm", "create", "huge", "--memory", "400G"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(err_of(&o).contains("this host can give"), "{}", err_of(&o));

    // Duplicate name.
    a.json(&["vm", "create", "dup", "--memory", "64M"]);
    let o = a.cli(&["vm", "create", "dup", "--memory", "64M"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(err_of(&o).contains("already exists"), "{}", err_of(&o));

    // A raw image larger than memory.
    let big = a.dir.join("big.img");
    std::fs::write(&big, vec![0x90u8; 5 << 20]).unwrap();
    let o = a.cli(&[
        "vm",
        "create",
        "big",
        "--kind",
        "raw",
        "--memory",
        "4M",
        "--image",
        big.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        err_of(&o).contains("only") && err_of(&o).contains("fit"),
        "{}",
        err_of(&o)
    );

    // Bad names and bad sizes.
    let o = a.cli(&["vm", "create", "bad/name"]);
    assert!(err_of(&o).contains("not valid"), "{}", err_of(&o));
    let o = a.cli(&["vm", "create", "odd", "--memory", "3M"]);
    assert!(err_of(&o).contains("multiple of 2 MiB"), "{}", err_of(&o));

    // Malformed and unexpected JSON straight at the API: 4xx with the reason.
    let (st, body) = c
        .raw(
            "POST",
            "/v1/vms",
            Some(b"{\"name\": \"x\",\n \"memory_mib\": }"),
        )
        .unwrap();
    assert_eq!(st, 400);
    let b: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(
        b["error"]["message"].as_str().unwrap().contains("line 2"),
        "{b}"
    );
    let (st, body) = c
        .raw(
            "POST",
            "/v1/vms",
            Some(
                br#"{"name":"x","memory_mib":64,"vcpus":1,"kind":{"workload":{}},"colour":"red"}"#,
            ),
        )
        .unwrap();
    assert_eq!(st, 400, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("colour"));
    let (st, _) = c.raw("POST", "/v1/vms", None).unwrap();
    assert_eq!(st, 400);
    let (st, _) = c.raw("GET", "/v1/nothing/here", None).unwrap();
    assert_eq!(st, 404);
    let (st, _) = c.raw("PUT", "/v1/vms", None).unwrap();
    assert_eq!(st, 405);
    let (st, _) = c
        .raw("GET", "/v1/vms/dup/console?offset=notanumber", None)
        .unwrap();
    assert_eq!(st, 400);
    // Wrong state: verify needs a paused workload guest.
    a.json(&["vm", "start", "dup"]);
    let o = a.cli(&["vm", "verify", "dup"]);
    assert!(err_of(&o).contains("pause it"), "{}", err_of(&o));
    let (st, _) = c.raw("GET", "/v1/vms/dup/digest", None).unwrap();
    assert_eq!(st, 409);

    // Fault injection is off unless the config turns it on: 403 with what to do.
    let (st, body) = c
        .raw(
            "POST",
            "/v1/debug/faults",
            Some(br#"{"point":"dest:commit","action":"kill"}"#),
        )
        .unwrap();
    assert_eq!(st, 403, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("[debug] faults = true"));

    // Still alive and well after all that.
    let l = a.json(&["vm", "list"]);
    assert_eq!(l.as_array().unwrap().len(), 1);
    let h = a.json(&["host"]);
    assert!(h["tsc_khz"].as_u64().unwrap() > 0);
}

#[test]
fn unreachable_agent_exits_3_and_bad_usage_exits_2() {
    let bin = ferry_tests::ferry_bin();
    let o = std::process::Command::new(&bin)
        .args(["--socket", "/nonexistent/ferry.sock", "vm", "list"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3));
    assert!(err_of(&o).contains("cannot reach the agent"));
    let o = std::process::Command::new(&bin)
        .args(["vm", "frobnicate"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn malformed_config_is_refused_with_line_and_column() {
    let dir = std::env::temp_dir().join(format!("ferry-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("agent.toml");
    std::fs::write(&cfg, "[agent]\nname = \"a\"\nsocket = 5\n").unwrap();
    let o = std::process::Command::new(ferry_tests::ferry_bin())
        .args(["agent", "--check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let e = err_of(&o);
    assert!(e.contains("agent.toml:3:10"), "{e}");
    std::fs::write(&cfg, "[agent]\nname = \"a\"\n").unwrap();
    let o = std::process::Command::new(ferry_tests::ferry_bin())
        .args(["agent", "--check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", err_of(&o));
    let o = std::process::Command::new(ferry_tests::ferry_bin())
        .args(["agent", "--config", "/nonexistent/agent.toml"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(err_of(&o).contains("cannot read config"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `vm save` / `vm restore` through files: memory identical at the pause (digest), the guest's
/// counters continue, and the memory verifies page by page afterwards; 1 and 2 vCPUs, 256 MiB and
/// 2 GiB.
#[test]
fn save_and_restore_through_files() {
    if !can_run("save_and_restore_through_files") {
        return;
    }
    let a = TestAgent::start("saverestore");
    for (name, mem, vcpus) in [
        ("s1", "256M", "1"),
        ("s2", "256M", "2"),
        ("s3", "2G", "1"),
        ("s4", "2G", "2"),
    ] {
        a.json(&[
            "vm",
            "create",
            name,
            "--memory",
            mem,
            "--vcpus",
            vcpus,
            "--dirty-rate",
            "64",
            "--start",
        ]);
        wait_for("fill", 60, || {
            let i = a.json(&["vm", "inspect", name]);
            i["heartbeats"]
                .as_array()?
                .iter()
                .all(|h| h["phase"] == "work")
                .then_some(())
        });
        a.json(&["vm", "pause", name]);
        let before = a.json(&["vm", "inspect", name]);
        let digest = a.json(&["vm", "digest", name])["digest"].clone();
        // Saves of GiBs go to tmpfs where there is one: this test is about the format, not the disk.
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            std::path::PathBuf::from("/dev/shm")
        } else {
            a.dir.clone()
        };
        let dir = base.join(format!("ferry-save-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let r = a.json(&["vm", "save", name, dir.to_str().unwrap()]);
        assert!(r["nonzero_pages"].as_u64().unwrap() > 0);
        // The memory files are plain: right size, sparse.
        let mem_file = dir.join("mem-0.raw");
        let md = std::fs::metadata(&mem_file).unwrap();
        assert!(md.len() >= 256 << 20);
        a.json(&["vm", "destroy", name]);
        let copy = format!("{name}-restored");
        a.json(&[
            "vm",
            "restore",
            dir.to_str().unwrap(),
            "--name",
            &copy,
            "--paused",
        ]);
        assert_eq!(a.json(&["vm", "digest", &copy])["digest"], digest);
        let after = a.json(&["vm", "inspect", &copy]);
        for (x, y) in before["heartbeats"]
            .as_array()
            .unwrap()
            .iter()
            .zip(after["heartbeats"].as_array().unwrap())
        {
            assert_eq!(x["beats"], y["beats"]);
            assert_eq!(x["pages_written"], y["pages_written"]);
        }
        a.json(&["vm", "resume", &copy]);
        let b0 = before["heartbeats"][0]["beats"].as_u64().unwrap();
        wait_for("restored guest runs on", 20, || {
            let i = a.json(&["vm", "inspect", &copy]);
            (i["heartbeats"][0]["beats"].as_u64()? > b0 + 100).then_some(())
        });
        a.json(&["vm", "pause", &copy]);
        let v = a.json(&["vm", "verify", &copy]);
        assert_eq!(v["ok"], true, "{v}");
        a.json(&["vm", "destroy", &copy]);
        let _ = std::fs::remove_dir_all(&dir);
        // Restoring onto an existing name or from a non-save is refused.
        let o = a.cli(&["vm", "restore", a.dir.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(2));
        assert!(err_of(&o).contains("vm.json"), "{}", err_of(&o));
    }
}

#[test]
fn lifecycle_stop_start_destroy() {
    if !can_run("lifecycle_stop_start_destroy") {
        return;
    }
    let mut a = TestAgent::start("lifecycle");
    // The API socket is not world accessible.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&a.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "socket mode {mode:o}");
    a.json(&["vm", "create", "l", "--memory", "64M", "--vcpus", "2"]);
    assert_eq!(a.json(&["vm", "inspect", "l"])["state"], "created");
    assert_eq!(a.json(&["vm", "start", "l"])["state"], "running");
    assert_eq!(a.json(&["vm", "pause", "l"])["state"], "paused");
    assert_eq!(a.json(&["vm", "resume", "l"])["state"], "running");
    assert_eq!(a.json(&["vm", "stop", "l"])["state"], "stopped");
    // A stopped VM boots afresh.
    assert_eq!(a.json(&["vm", "start", "l"])["state"], "running");
    let o = a.cli(&["vm", "resume", "l"]);
    assert!(o.status.success());
    a.json(&["vm", "destroy", "l"]);
    assert_eq!(a.json(&["vm", "list"]).as_array().unwrap().len(), 0);
    // SIGTERM: the agent stops its guests, removes its socket and exits 0.
    a.json(&["vm", "create", "m", "--memory", "64M", "--start"]);
    let st = a.stop().unwrap();
    assert!(st.success(), "{st}");
    assert!(!a.socket.exists());
}

#[test]
fn without_a_migration_nic_the_agent_runs_and_says_why_ebpf_is_off() {
    if !can_run("without_a_migration_nic_the_agent_runs_and_says_why_ebpf_is_off") {
        return;
    }
    let a = TestAgent::start("noebpf");
    let s = a.json(&["stats"]);
    assert_eq!(s["available"], false);
    assert!(s["reason"].as_str().unwrap().contains("[migration]"), "{s}");
    let o = a.cli(&["stats"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("unavailable"));
    let said = a
        .log()
        .matches("eBPF pinning and link utilization are off")
        .count();
    assert_eq!(said, 1, "said {said} times:\n{}", a.log());
}

/// The systemd unit's way of starting the agent (ExecStartPre, then ExecStart with
/// `Type=notify` and a watchdog), taken from dist/ferry-agent.service itself: the config check
/// passes, the agent says READY=1 once its API answers, sends WATCHDOG=1 heartbeats, and
/// STOPPING=1 on SIGTERM. (`systemd-analyze verify` of the unit runs in `cargo xtask test`.)
#[test]
fn agent_speaks_the_units_notify_protocol() {
    if !can_run("agent_speaks_the_units_notify_protocol") {
        return;
    }
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/ferry-agent.service"),
    )
    .unwrap();
    let line = |key: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in the unit"))
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let (pre, start) = (line("ExecStartPre="), line("ExecStart="));
    assert!(unit.contains("Type=notify") && unit.contains("WatchdogSec="));
    assert_eq!(pre[0], "/usr/bin/ferry");
    assert_eq!(start[0], "/usr/bin/ferry");

    let dir = std::env::temp_dir().join(format!("ferry-notify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&path);
    let rx = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    rx.set_read_timeout(Some(std::time::Duration::from_secs(15)))
        .unwrap();
    // The unit's arguments minus --config (TestAgent writes and passes its own).
    let strip = |v: &[String]| -> Vec<String> {
        let mut out = Vec::new();
        let mut it = v[1..].iter();
        while let Some(a) = it.next() {
            if a == "--config" {
                it.next();
            } else {
                out.push(a.clone());
            }
        }
        out
    };
    let start_args = strip(&start);
    assert_eq!(start_args[0], "agent");
    let extra: Vec<&str> = start_args[1..].iter().map(String::as_str).collect();
    let a = TestAgent::start_with(
        "notify",
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
        &extra,
    );
    // ExecStartPre: the config check, with the same config.
    let pre_args = strip(&pre);
    let o = std::process::Command::new(ferry_tests::ferry_bin())
        .args(&pre_args)
        .arg("--config")
        .arg(a.dir.join("agent.toml"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let mut buf = [0u8; 256];
    let mut seen = Vec::new();
    while !(seen.iter().any(|m| m == "READY=1") && seen.iter().any(|m| m == "WATCHDOG=1")) {
        let n = rx.recv(&mut buf).expect("a notification within 15 s");
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert_eq!(seen[0], "READY=1", "{seen:?}");
    // Ready means the API answers.
    assert!(a.json(&["host"])["tsc_khz"].as_u64().unwrap() > 0);
    let mut a = a;
    assert!(a.stop().is_some_and(|s| s.success()));
    let mut last = String::new();
    while let Ok(n) = rx.recv(&mut buf) {
        last = String::from_utf8_lossy(&buf[..n]).into_owned();
        if last == "STOPPING=1" {
            break;
        }
    }
    assert_eq!(last, "STOPPING=1");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The chosen restart behaviour (docs/operations.md): guests live in the agent, so stopping the
/// agent (SIGTERM, as systemd does) stops them, says so, and exits cleanly; a new agent starts
/// without them.
#[test]
fn stopping_the_agent_stops_its_guests_and_says_so() {
    if !can_run("stopping_the_agent_stops_its_guests_and_says_so") {
        return;
    }
    let mut a = TestAgent::start("restart");
    a.json(&["vm", "create", "g", "--memory", "64M", "--start"]);
    assert_eq!(a.json(&["vm", "inspect", "g"])["state"], "running");
    let st = a.stop().expect("agent exit status");
    assert!(st.success(), "{st}");
    let log = a.log();
    assert!(
        log.contains("agent stopping: its guests stop with it") && log.contains("vms=1"),
        "{log}"
    );
    let b = TestAgent::start("restart2");
    assert_eq!(b.json(&["vm", "list"]).as_array().unwrap().len(), 0);
}

/// Requests that cannot be right are 400s that say why, and log no ERROR: a disk path that
/// leaves its datastore, absurd dirty rates and working sets (issue 13).
#[test]
fn impossible_specs_are_400s_that_say_why() {
    if !can_run("impossible_specs") {
        return;
    }
    let a = TestAgent::start("impossible_specs");
    let c = a.client();
    let cases: [(&str, &str); 5] = [
        (
            r#"{"name":"x","memory_mib":64,"vcpus":1,"kind":{"workload":{}},"disks":[{"path":"[shared] ../../etc/passwd","size_mib":1}]}"#,
            "'..'",
        ),
        (
            r#"{"name":"x","memory_mib":64,"vcpus":1,"kind":{"workload":{}},"disks":[{"path":"[shared] /etc/passwd","size_mib":1}]}"#,
            "absolute",
        ),
        (
            r#"{"name":"x","memory_mib":64,"vcpus":1,"kind":{"workload":{"dirty_rate_mib":18446744073709551615}}}"#,
            "dirty rate",
        ),
        (
            r#"{"name":"x","memory_mib":64,"vcpus":1,"kind":{"workload":{"working_set_mib":18446744073709551615}}}"#,
            "working set",
        ),
        (
            r#"{"name":"x","memory_mib":64,"vcpus":1,"kind":{"workload":{"working_set_mib":0}}}"#,
            "working set",
        ),
    ];
    for (body, says) in cases {
        let (st, resp) = c.raw("POST", "/v1/vms", Some(body.as_bytes())).unwrap();
        let text = String::from_utf8_lossy(&resp);
        assert_eq!(st, 400, "{body}: {text}");
        assert!(
            text.contains(says),
            "{body}: the answer should say {says:?}: {text}"
        );
    }
    assert!(a.json(&["vm", "list"]).as_array().unwrap().is_empty());
    let log = a.log();
    assert!(
        !log.contains("ERROR"),
        "a bad request logged an ERROR:\n{log}"
    );
}
