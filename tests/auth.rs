//! Peers authenticate each other: no key, a wrong key, a replayed proof and a data connection
//! without the session's token get nothing and change nothing.

use std::io::BufReader;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use ferry::auth::{self, ClusterKey};
use ferry::control::config::{ClusterSection, EncryptPolicy};
use ferry::migrate::protocol::{self, Command, FrameReader, FrameWriter, Hello, HelloAck};
use ferry::migrate::session::{self, Auth, Identity};
use ferry_tests::{ferry_bin, in_netns, require, LabFerry, Need};
use xtask::lab::{Lab, LabOptions};

fn lab(test: &str) -> Option<Lab> {
    if !require(test, &[Need::Root, Need::Kvm, Need::Netns]) {
        return None;
    }
    Some(Lab::up(LabOptions::for_test(test).with_ferry_bin(ferry_bin())).expect("lab up"))
}

const B: &str = "198.18.0.2:7720";

fn raw_hello(
    agent: &str,
    nonce: &str,
) -> (
    FrameWriter<TcpStream>,
    FrameReader<BufReader<TcpStream>>,
    HelloAck,
) {
    let c = TcpStream::connect_timeout(&B.parse::<SocketAddr>().unwrap(), Duration::from_secs(5))
        .unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut w = FrameWriter::new(c.try_clone().unwrap());
    let mut r = FrameReader::new(BufReader::new(c));
    w.send_msg(
        Command::Hello,
        &Hello {
            min_version: protocol::MIN_VERSION,
            max_version: protocol::VERSION,
            agent: agent.into(),
            nonce: nonce.into(),
        },
    )
    .unwrap();
    let ack: HelloAck = r.read_frame().unwrap().msg(Command::HelloAck).unwrap();
    (w, r, ack)
}

/// After a refused attempt: the server answers Abort or hangs up, never a Facts/Ready.
fn refused(r: &mut FrameReader<BufReader<TcpStream>>) {
    // A hang-up (read error) is also a refusal.
    if let Ok(f) = r.read_frame() {
        assert_eq!(
            f.command,
            Command::Abort,
            "the server answered {:?}",
            f.command
        );
    }
}

#[test]
fn unauthenticated_wrong_key_and_replayed_peers_get_nothing() {
    let Some(lab) = lab("auth") else { return };
    let key = std::fs::read(lab.cluster_key()).unwrap();
    let ns = lab.host("a").unwrap().netns.clone();
    let right = ClusterKey::from_bytes(key.trim_ascii());
    let wrong = ClusterKey::from_bytes(&[0x42u8; 32]);
    let r2 = right.clone();
    in_netns(&ns, move || {
        // The right key works: the server proves itself and answers a Query.
        let me = Identity {
            agent: "tester".into(),
            key: Some(Arc::new(r2.clone())),
        };
        let mut s =
            session::connect(B.parse().unwrap(), &me, Duration::from_secs(5)).expect("session");
        s.w.send_msg(Command::Query, &ferry::migrate::query::Query::default())
            .unwrap();
        s.r.read_frame().unwrap().expect(Command::Facts).unwrap();

        // A client with a wrong key refuses the server (its proof does not verify)...
        let bad = Identity {
            agent: "tester".into(),
            key: Some(Arc::new(wrong.clone())),
        };
        let e = session::connect(B.parse().unwrap(), &bad, Duration::from_secs(5))
            .err()
            .expect("refused");
        assert!(e.to_string().contains("cluster key"), "{e}");
        // ...and a client without a key is told the server requires one.
        let none = Identity {
            agent: "tester".into(),
            key: None,
        };
        let e = session::connect(B.parse().unwrap(), &none, Duration::from_secs(5))
            .err()
            .expect("refused");
        assert!(e.to_string().contains("requires the cluster key"), "{e}");

        // A client that skips Auth and asks straight away gets nothing.
        let (mut w, mut r, ack) = raw_hello("intruder", &auth::nonce().unwrap());
        assert!(ack.proof.is_some());
        w.send_msg(Command::Query, &ferry::migrate::query::Query::default())
            .unwrap();
        refused(&mut r);

        // A wrong proof gets nothing.
        let nc = auth::nonce().unwrap();
        let (mut w, mut r, ack) = raw_hello("intruder", &nc);
        let proof = wrong.proof("ferry-client", &ack.nonce, &nc, "intruder");
        w.send_msg(Command::Auth, &Auth { proof }).unwrap();
        w.send_msg(Command::Query, &ferry::migrate::query::Query::default())
            .unwrap();
        refused(&mut r);

        // A replayed proof (valid for an earlier session with the same client nonce) gets nothing.
        let nc = auth::nonce().unwrap();
        let (mut w, mut r, ack) = raw_hello("tester", &nc);
        let proof = right.proof("ferry-client", &ack.nonce, &nc, "tester");
        w.send_msg(
            Command::Auth,
            &Auth {
                proof: proof.clone(),
            },
        )
        .unwrap();
        w.send_msg(Command::Query, &ferry::migrate::query::Query::default())
            .unwrap();
        r.read_frame().unwrap().expect(Command::Facts).unwrap();
        let (mut w, mut r, _ack2) = raw_hello("tester", &nc);
        w.send_msg(Command::Auth, &Auth { proof }).unwrap();
        w.send_msg(Command::Query, &ferry::migrate::query::Query::default())
            .unwrap();
        refused(&mut r);

        // A data connection without the session's token is refused: a probe's stream with a
        // made-up token makes the probe fail on the server.
        let mut s =
            session::connect(B.parse().unwrap(), &me, Duration::from_secs(5)).expect("session");
        s.w.send_msg(
            Command::Blast,
            &ferry::migrate::blast::BlastRequest {
                streams: 1,
                secs: 1.0,
                bytes: 0,
                mode: ferry::migrate::blast::BlastMode::Tcp,
            },
        )
        .unwrap();
        let ready: protocol::Ready = s.r.read_frame().unwrap().msg(Command::Ready).unwrap();
        let d = TcpStream::connect(ready.data_addr.as_str()).unwrap();
        let mut dw = FrameWriter::new(d);
        dw.send_msg(
            Command::StreamHello,
            &protocol::StreamHello {
                migration_id: "blast".into(),
                index: 0,
                token: "0123456789abcdef".into(),
            },
        )
        .unwrap();
        // The server gives up on the probe: no BlastDone ever comes.
        refused(&mut s.r);
    });
    // Nothing was created on b by any of this.
    let f = LabFerry { lab: &lab };
    assert!(f.vms("b").is_empty());
    assert!(f.json("b", &["migrations"]).as_array().unwrap().is_empty());
    // The agents themselves still migrate with the key.
    f.json("a", &["vm", "create", "v", "--memory", "64M", "--start"]);
    let rec = f.migrate("a", "v", "b", &[]);
    assert_eq!(rec["phase"], "completed", "{rec}");
    // The local API socket is for root (and its group) only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&lab.host("a").unwrap().socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o007, 0, "socket mode {mode:o}");
    lab.down().unwrap();
}

#[test]
fn agents_without_the_key_cannot_migrate_to_a_keyed_peer() {
    let Some(mut lab) = lab("auth-nokey") else {
        return;
    };
    // No [cluster] section on a: no key (and no ownership datastore).
    lab.edit_config("a", |c| c.cluster = ClusterSection::default())
        .unwrap();
    lab.stop_agent("a").unwrap();
    lab.start_agent("a").unwrap();
    let f = LabFerry { lab: &lab };
    f.json("a", &["vm", "create", "v", "--memory", "64M", "--start"]);
    let o = f.cli("a", &["migrate", "v", "--to", "b"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("requires the cluster key"),
        "{o:?}"
    );
    assert!(f.vms("b").is_empty());
    assert_eq!(f.json("a", &["vm", "inspect", "v"])["state"], "running");
    lab.down().unwrap();
}

/// Encryption by policy: with the cluster key configured (the lab) a migration is encrypted by
/// default (`preferred`) with ring's AES-256-GCM and arrives intact; `--no-encrypt` sends it in
/// the clear; a host with `encrypt = "required"` refuses a plain migration with what to do (the
/// guest stays on the source) and takes the default one; a source with `encrypt = "off"` sends
/// plain unless `--encrypt`.
#[test]
fn encrypted_migration_and_hosts_that_require_it() {
    let Some(mut lab) = lab("auth-enc") else {
        return;
    };
    {
        let f = LabFerry { lab: &lab };
        f.json(
            "a",
            &[
                "vm",
                "create",
                "e",
                "--memory",
                "128M",
                "--profile",
                "mixed",
                "--start",
            ],
        );
        f.wait_filled("a", "e");
        let rec = f.migrate("a", "e", "b", &["--verify"]);
        assert_eq!(rec["phase"], "completed", "{rec}");
        assert_eq!(rec["summary"]["encrypted"], true, "{rec}");
        assert_eq!(rec["summary"]["cipher"], "AES-256-GCM (ring)", "{rec}");
        assert_eq!(rec["summary"]["verified"], true, "{rec}");
        // The human summary says so too.
        let back = f.cli("b", &["migrate", "e", "--to", "a"]);
        let text = String::from_utf8_lossy(&back.stdout);
        assert!(text.contains("encryption    AES-256-GCM (ring)"), "{text}");
        // Unencrypted and uncompressed (zero or raw pages only), still verified.
        let plain = f.migrate(
            "a",
            "e",
            "b",
            &["--verify", "--no-compress", "--no-encrypt"],
        );
        assert_eq!(plain["summary"]["encrypted"], false, "{plain}");
        assert_eq!(plain["summary"]["verified"], true, "{plain}");
        assert_eq!(plain["summary"]["encodings"]["lz4"]["pages"], 0, "{plain}");
        let rec = f.migrate("b", "e", "a", &[]);
        assert_eq!(rec["phase"], "completed", "{rec}");
    }
    // b now requires encryption; a sends plain unless asked.
    let set = |lab: &mut Lab, host: &str, policy: EncryptPolicy| {
        lab.edit_config(host, |c| c.migration.as_mut().unwrap().encrypt = policy)
            .unwrap();
        lab.stop_agent(host).unwrap();
        lab.start_agent(host).unwrap();
    };
    set(&mut lab, "b", EncryptPolicy::Required);
    // Restarting a's agent stops its guests (docs/operations.md): a new one after it.
    set(&mut lab, "a", EncryptPolicy::Off);
    let f = LabFerry { lab: &lab };
    f.json("a", &["vm", "create", "e2", "--memory", "64M", "--start"]);
    let rec = f.migrate("a", "e2", "b", &[]);
    assert_eq!(rec["phase"], "failed", "{rec}");
    assert!(
        rec["error"]
            .as_str()
            .unwrap_or("")
            .contains("accepts only encrypted migrations"),
        "{rec}"
    );
    assert_eq!(f.json("a", &["vm", "inspect", "e2"])["state"], "running");
    let rec = f.migrate("a", "e2", "b", &["--encrypt"]);
    assert_eq!(rec["phase"], "completed", "{rec}");
    assert_eq!(rec["summary"]["encrypted"], true, "{rec}");
    // b cannot be told to send in the clear.
    let o = f.cli("b", &["migrate", "e2", "--to", "a", "--no-encrypt"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("requires encrypted migrations"),
        "{o:?}"
    );
    lab.down().unwrap();
}

/// This build speaks 1..=2. An older peer (1..=1) gets version 1, a newer one offering 1..=3
/// or 2..=3 gets 2 (the highest both speak); one that speaks only 3..=4 is told, in an Abort,
/// which versions each side speaks.
#[test]
fn peers_negotiate_a_common_version_or_are_told_why() {
    let Some(lab) = lab("versions") else { return };
    let ns = lab.host("a").unwrap().netns.clone();
    in_netns(&ns, || {
        // This build speaks 1..=2 (version 2 added zstd pages).
        for (min, max, want) in [
            (1u16, 1u16, Some(1u16)),
            (1, 3, Some(2)),
            (2, 3, Some(2)),
            (3, 4, None),
        ] {
            let c = TcpStream::connect_timeout(
                &B.parse::<SocketAddr>().unwrap(),
                Duration::from_secs(5),
            )
            .unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut w = FrameWriter::new(c.try_clone().unwrap());
            let mut r = FrameReader::new(BufReader::new(c));
            // As a peer of that range would: stamped with the oldest version it speaks.
            w.set_version(min);
            w.send_msg(
                Command::Hello,
                &Hello {
                    min_version: min,
                    max_version: max,
                    agent: "newer".into(),
                    nonce: "00".repeat(32),
                },
            )
            .unwrap();
            let f = r.read_frame().unwrap();
            match want {
                Some(v) => {
                    let ack: HelloAck = f.msg(Command::HelloAck).unwrap();
                    assert_eq!(ack.version, v);
                }
                None => {
                    let e = f.msg::<HelloAck>(Command::HelloAck).unwrap_err();
                    let text = e.to_string();
                    assert!(
                        text.contains("no common protocol version")
                            && text.contains("3..=4")
                            && text.contains("1..=2"),
                        "{text}"
                    );
                }
            }
        }
    });
    lab.down().unwrap();
}
