//! Soak: 50 live migrations of a dirtying guest back and forth between the lab hosts, each with
//! `--verify`; at the end both agents hold what they held after the first round trip (fds,
//! BPF links, qdiscs the same; RSS within a small allowance for the allocator).

use ferry_tests::{ferry_bin, require, LabFerry, Need};
use xtask::lab::{Lab, LabOptions};

const MIGRATIONS: usize = 50;
const GUEST_KIB: i64 = 64 << 10;
/// RSS may move by this much (allocator caches); a leaked guest or buffer pool is far larger.
const RSS_SLACK_KIB: i64 = 16 << 10;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Held {
    fds: usize,
    bpf_links: usize,
    rss_kib: i64,
    qdiscs: String,
}

fn held(lab: &Lab, host: &str) -> Held {
    let pid = lab.host(host).unwrap().agent_pid.unwrap();
    let (fds, bpf_links) = ferry_tests::fds_and_bpf_links(pid);
    // Resident memory of everything but the guest's own memory (one 64 MiB mapping), which
    // fills up as the guest touches pages.
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let kib = |l: &str, key: &str| -> Option<i64> {
        l.strip_prefix(key)
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    };
    let (mut rss_kib, mut size) = (0, 0);
    for l in smaps.lines() {
        if let Some(s) = kib(l, "Size:") {
            size = s;
        } else if let Some(r) = kib(l, "Rss:") {
            if size != GUEST_KIB {
                rss_kib += r;
            }
        }
    }
    Held {
        fds,
        bpf_links,
        rss_kib,
        qdiscs: lab.exec(host, &["tc", "qdisc", "show"]).unwrap(),
    }
}

#[test]
fn fifty_migrations_back_and_forth_leak_nothing() {
    let test = "fifty_migrations_back_and_forth_leak_nothing";
    if !require(test, &[Need::Root, Need::Kvm, Need::Netns]) {
        return;
    }
    let lab = Lab::up(LabOptions::for_test("soak").with_ferry_bin(ferry_bin())).expect("lab up");
    let f = LabFerry { lab: &lab };
    f.json(
        "a",
        &[
            "vm",
            "create",
            "s",
            "--memory",
            "64M",
            "--profile",
            "mixed",
            "--dirty-rate",
            "16",
            "--start",
        ],
    );
    f.wait_filled("a", "s");
    let mut here = "a";
    let mut base = None;
    for n in 0..MIGRATIONS {
        let there = if here == "a" { "b" } else { "a" };
        let rec = f.migrate(here, "s", there, &["--verify"]);
        assert_eq!(rec["phase"], "completed", "migration {n}: {rec}");
        assert_eq!(rec["summary"]["verified"], true, "migration {n}: {rec}");
        assert!(
            !f.vms(here).contains(&"s".to_string()),
            "migration {n}: a copy is left on {here}"
        );
        here = there;
        if n == 1 {
            // After the first round trip: the baseline.
            base = Some((held(&lab, "a"), held(&lab, "b")));
        }
    }
    assert_eq!(here, "a");
    let (base_a, base_b) = base.unwrap();
    // Idle worker threads retire, closing what they held; give them their 10 s.
    std::thread::sleep(std::time::Duration::from_secs(11));
    for (host, base) in [("a", base_a), ("b", base_b)] {
        let now = held(&lab, host);
        eprintln!(
            "{host}: after the first round trip {base:?}; after {MIGRATIONS} migrations {now:?}"
        );
        assert!(now.fds <= base.fds, "{host} leaked fds: {base:?} → {now:?}");
        assert_eq!(now.bpf_links, base.bpf_links, "{host}: BPF links changed");
        assert_eq!(now.qdiscs, base.qdiscs, "{host}: qdiscs changed");
        assert!(
            now.rss_kib - base.rss_kib <= RSS_SLACK_KIB,
            "{host}'s RSS grew: {base:?} → {now:?}"
        );
    }
    // And the guest is whole after 50 moves.
    f.json("a", &["vm", "pause", "s"]);
    let v = f.json("a", &["vm", "verify", "s"]);
    assert_eq!(v["ok"], true, "{v}");
    lab.down().unwrap();
}
