//! The lab for real: namespaces, links and cleanup (needs root and iproute2; skipped without
//! them, except under `CI=true`, where a missing capability fails). Agents are covered by the
//! end-to-end tests in `tests/`, which have a `ferry` binary to start.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use xtask::lab::{Lab, LabOptions};

/// Whether the test can run; panics under CI when it cannot.
fn can_run(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let ip = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .iter()
        .any(|p| Path::new(p).is_file());
    let why = match (root, ip) {
        (false, _) => "not running as root",
        (_, false) => "iproute2 is not installed (`cargo xtask deps`)",
        _ => return true,
    };
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("{test}: cannot run under CI: {why}");
    }
    eprintln!("skipping {test}: {why}");
    false
}

/// Runs `f` on a thread that has joined network namespace `netns`.
fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let ns = File::open(Path::new("/run/netns").join(netns)).expect("open netns");
            // SAFETY: setns on a namespace fd we own; it changes only this thread's namespace.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {netns}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("thread in netns")
    })
}

/// A listener in `server_ns` on `addr`, a connection from `client_ns`, one byte each way.
fn tcp_roundtrip(server_ns: &str, client_ns: &str, addr: Ipv4Addr) {
    let listener = in_netns(server_ns, || TcpListener::bind((addr, 0)).expect("bind"));
    let target = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accept");
        let mut byte = [0u8];
        conn.read_exact(&mut byte).unwrap();
        conn.write_all(&byte).unwrap();
    });
    let echoed = in_netns(client_ns, || {
        let mut conn = TcpStream::connect_timeout(&target, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("connect {target} from {client_ns}: {e}"));
        conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        conn.write_all(b"x").unwrap();
        let mut byte = [0u8];
        conn.read_exact(&mut byte).unwrap();
        byte
    });
    server.join().unwrap();
    assert_eq!(&echoed, b"x");
}

fn namespaces() -> String {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn lab_links_work_and_down_removes_everything() {
    if !can_run("lab_links_work_and_down_removes_everything") {
        return;
    }
    let lab = Lab::up(LabOptions::for_test("links")).expect("lab up");
    let (a, b) = (lab.host("a").unwrap(), lab.host("b").unwrap());
    // TCP over both links, both ways (no dependency on `ping` being installed).
    for (server, client, addr) in [
        (b, a, b.mgmt_addr),
        (b, a, b.migration_addr),
        (a, b, a.mgmt_addr),
        (a, b, a.migration_addr),
    ] {
        tcp_roundtrip(&server.netns, &client.netns, addr);
    }
    let links = lab
        .exec("sw", &["ip", "-o", "link", "show", "master", "br0"])
        .unwrap();
    assert!(links.contains("a-up") && links.contains("b-up"), "{links}");
    let ports = lab
        .exec("a", &["ip", "-o", "link", "show", "master", "vmbr0"])
        .unwrap();
    assert!(ports.contains("uplink0"), "{ports}");

    let config = std::fs::read_to_string(&a.config).unwrap();
    assert!(config.contains("[peers]\nb = \"198.18.0.2\"\n"), "{config}");
    let written = ferry::control::config::Config::load(&a.config, true).unwrap();
    assert_eq!(Some(written), lab.agent_config("a"));
    assert!(lab.shared_datastore().is_dir());
    assert!(lab.root().join("lab.json").is_file());

    let (name, root) = (lab.name().to_owned(), lab.root().to_owned());
    lab.down().expect("lab down");
    assert!(!root.exists());
    assert!(!namespaces().contains(&format!("ferry-{name}-")));
}

#[test]
fn parallel_labs_do_not_collide_and_drop_cleans_up() {
    if !can_run("parallel_labs_do_not_collide_and_drop_cleans_up") {
        return;
    }
    let labs: Vec<Lab> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|_| s.spawn(|| Lab::up(LabOptions::for_test("par")).expect("lab up")))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let names: Vec<String> = labs.iter().map(|l| l.name().to_owned()).collect();
    for lab in &labs {
        let out = lab
            .exec("a", &["ip", "-br", "addr", "show", "mig0"])
            .unwrap();
        assert!(out.contains("198.18.1.1/24"), "{out}");
    }
    drop(labs);
    let list = namespaces();
    for name in names {
        assert!(!list.contains(&format!("ferry-{name}-")), "{list}");
    }
}

#[test]
fn failed_up_leaves_nothing_behind() {
    if !can_run("failed_up_leaves_nothing_behind") {
        return;
    }
    let opts = LabOptions::for_test("fail");
    let (name, root) = (opts.name.clone(), opts.root.clone());
    let first = Lab::up(opts).expect("lab up");
    // Same name again: refused before anything is touched, and the first lab survives.
    let again = LabOptions {
        root: root.with_extension("again"),
        ..LabOptions::for_test("fail")
    };
    let err = Lab::up(LabOptions {
        name: name.clone(),
        ..again
    })
    .unwrap_err();
    assert!(format!("{err:#}").contains("already exists"), "{err:#}");
    assert!(first
        .exec("b", &["ip", "-br", "link", "show", "mgmt0"])
        .is_ok());
    first.down().unwrap();

    let opts = LabOptions::for_test("fail").with_ferry_bin("/nonexistent/ferry");
    let root = opts.root.clone();
    let err = Lab::up(opts).unwrap_err();
    assert!(
        format!("{err:#}").contains("cargo build -p ferry-cli"),
        "{err:#}"
    );
    assert!(!root.exists());
    assert!(!namespaces().contains(&format!("ferry-{name}-")));
}
