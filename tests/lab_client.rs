//! The lab's client namespace (`ferry-NAME-cl`, 198.18.2.200 on the switch's bridge) reaches
//! the VM network of both hosts, and the client tools see it: a port with a guest's MAC and
//! address on host a's port group (a veth into `vmbr0`, where a guest's tap would be) answers
//! the client's 10 ms ping, the switch's FDB puts the MAC behind `a-up`, and after the port
//! moves to host b (as a migrated guest's tap does) the FDB follows to `b-up`.

use std::time::Duration;

use ferry_tests::client::{fdb_port, Pinger};
use ferry_tests::{require, wait_for, Need};
use xtask::lab::{self, Lab, LabOptions, CLIENT_ADDR, PORT_GROUP, SWITCH_BRIDGE, VM_BRIDGE};

const MAC: &str = "52:54:00:00:02:0a";

/// A stand-in for a guest's tap on `host`'s port group: veth `gtap0` enslaved to the host's
/// bridge, its peer `gst0` (in the same namespace) with the guest's MAC and address.
fn plug_port(lab: &Lab, host: &str, addr: &str) {
    for args in [
        vec![
            "ip", "link", "add", "gtap0", "type", "veth", "peer", "name", "gst0",
        ],
        vec!["ip", "link", "set", "gst0", "address", MAC],
        vec!["ip", "link", "set", "gtap0", "master", VM_BRIDGE],
        vec!["ip", "addr", "add", addr, "dev", "gst0"],
        vec!["ip", "link", "set", "gtap0", "up"],
        vec!["ip", "link", "set", "gst0", "up"],
    ] {
        lab.exec(host, &args).unwrap();
    }
}

fn ping_for(lab: &Lab, secs: u64) -> ferry_tests::client::PingReport {
    let p = Pinger::start(
        lab.client_netns(),
        lab::vm_addr(10).unwrap(),
        Duration::from_millis(10),
        Duration::from_secs(secs + 10),
    )
    .expect("start ping");
    std::thread::sleep(Duration::from_secs(secs));
    p.stop().expect("ping report")
}

#[test]
fn client_namespace_reaches_the_vm_network_of_both_hosts() {
    if !require(
        "client_namespace_reaches_the_vm_network_of_both_hosts",
        &[Need::Root, Need::Netns],
    ) {
        return;
    }
    let lab = Lab::up(LabOptions::for_test("client")).expect("lab up");
    let cl = lab.client_netns().to_owned();
    assert_eq!(cl, format!("ferry-{}-cl", lab.name()));
    let addrs = lab
        .exec("cl", &["ip", "-o", "-4", "addr", "show", "dev", "eth0"])
        .unwrap();
    assert!(addrs.contains(&format!("{CLIENT_ADDR}/24")), "{addrs}");
    let ports = lab
        .exec("sw", &["ip", "-o", "link", "show", "master", SWITCH_BRIDGE])
        .unwrap();
    assert!(ports.contains("cl-up"), "{ports}");
    let st = lab::status(Some(lab.name()), lab.root()).unwrap();
    assert!(st.client_netns.exists);
    let text = st.to_string();
    assert!(
        text.contains(&format!(
            "client: namespace {cl} exists; 198.18.2.200/24 (eth0)"
        )),
        "{text}"
    );
    assert!(text.contains(PORT_GROUP), "{text}");

    // A "guest" port on host a: once it answers (a new port takes a moment to come up), 1 s of
    // 10 ms pings, every one answered.
    plug_port(&lab, "a", "198.18.2.10/24");
    let ping = ferry_tests::client::ping_bin().unwrap();
    wait_for("the port on a to answer", 10, || {
        lab.exec("cl", &[ping, "-c", "1", "-W", "1", "198.18.2.10"])
            .ok()
    });
    let r = ping_for(&lab, 1);
    assert!(r.replies.len() >= 50, "{r:?}");
    assert!(r.lost.is_empty(), "lost {:?}", r.lost);
    assert!(r.max_gap_ms < 500.0, "{r:?}");
    let sw = lab.switch_netns().to_owned();
    assert_eq!(
        fdb_port(&sw, SWITCH_BRIDGE, MAC).unwrap().as_deref(),
        Some("a-up")
    );

    // The port moves to host b. Once it has sent a packet from b (what the agent's RARP
    // announcement does for a migrated guest), the switch learns it behind b-up and the client
    // reaches it. (Whether the switch still points at a-up before that depends on what the
    // kernel sends when the port comes up, e.g. IPv6 neighbour discovery: not asserted.)
    lab.exec("a", &["ip", "link", "del", "gtap0"]).unwrap();
    plug_port(&lab, "b", "198.18.2.10/24");
    lab.exec(
        "b",
        &[
            ping,
            "-c",
            "1",
            "-W",
            "2",
            "-I",
            "gst0",
            &CLIENT_ADDR.to_string(),
        ],
    )
    .unwrap();
    let r = ping_for(&lab, 1);
    assert!(
        !r.replies.is_empty(),
        "no reply from the port on host b: {r:?}"
    );
    wait_for("the FDB to point at b-up", 5, || {
        (fdb_port(&sw, SWITCH_BRIDGE, MAC).ok()??.as_str() == "b-up").then_some(())
    });

    let (name, root) = (lab.name().to_owned(), lab.root().to_owned());
    lab.down().expect("lab down");
    let left = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&left.stdout).contains(&format!("ferry-{name}-")),
        "namespaces left behind"
    );
    assert!(!root.exists());
}
