//! The opt-in Prometheus endpoint (`[metrics] address`, set in the lab): after one completed and
//! one refused migration, a scrape over the management network parses as Prometheus text (with
//! a third-party parser) and carries the documented series with the right values.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use ferry_tests::{ferry_bin, in_netns, require, LabFerry, Need};
use prometheus_parse::{Scrape, Value};
use xtask::lab::{Lab, LabOptions, METRICS_PORT};

fn scrape(lab: &Lab, host: &str) -> (String, String) {
    let h = lab.host(host).unwrap();
    let addr = std::net::SocketAddr::new(h.mgmt_addr.into(), METRICS_PORT);
    in_netns(&h.netns, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").expect("HTTP response");
        (head.to_string(), body.to_string())
    })
}

fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .and_then(|s| match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(*v),
            _ => None,
        })
}

#[test]
fn metrics_endpoint_serves_valid_prometheus_text() {
    let test = "metrics_endpoint_serves_valid_prometheus_text";
    if !require(test, &[Need::Root, Need::Kvm, Need::Netns]) {
        return;
    }
    let lab = Lab::up(LabOptions::for_test("metrics").with_ferry_bin(ferry_bin())).expect("lab");
    let f = LabFerry { lab: &lab };
    f.json(
        "a",
        &[
            "vm",
            "create",
            "m",
            "--memory",
            "64M",
            "--profile",
            "mixed",
            "--start",
        ],
    );
    f.wait_filled("a", "m");
    let rec = f.migrate("a", "m", "b", &[]);
    assert_eq!(rec["phase"], "completed", "{rec}");
    // A refused one: b cannot allocate.
    let _: serde_json::Value = ferry::control::client::Client::new(&lab.host("b").unwrap().socket)
        .post(
            "/v1/debug/faults",
            &serde_json::json!({"point": "dest:create", "action": "fail"}),
        )
        .unwrap();
    let rec = f.migrate("b", "m", "a", &[]);
    assert_eq!(rec["phase"], "completed", "{rec}");
    let rec = f.migrate("a", "m", "b", &[]);
    assert_eq!(rec["phase"], "failed", "{rec}");

    let (head, body) = scrape(&lab, "a");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_lowercase().contains("text/plain; version=0.0.4"),
        "{head}"
    );
    let s = Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("valid Prometheus text");
    for name in [
        "ferry_migrations_total",
        "ferry_migration_failures_total",
        "ferry_migration_duration_seconds",
        "ferry_migration_downtime_seconds",
        "ferry_migration_bytes_total",
        "ferry_guests",
        "ferry_link_bits_per_second",
    ] {
        assert!(s.docs.contains_key(name), "no HELP for {name}:\n{body}");
    }
    // a: one out completed, one out failed (refused), one in completed.
    assert_eq!(
        value(
            &s,
            "ferry_migrations_total",
            &[("direction", "out"), ("result", "completed")]
        ),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        value(
            &s,
            "ferry_migrations_total",
            &[("direction", "out"), ("result", "failed")]
        ),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        value(
            &s,
            "ferry_migrations_total",
            &[("direction", "in"), ("result", "completed")]
        ),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        value(
            &s,
            "ferry_migration_failures_total",
            &[("direction", "out"), ("reason", "refused")]
        ),
        Some(1.0),
        "{body}"
    );
    let hist = s
        .samples
        .iter()
        .find(|x| x.metric == "ferry_migration_downtime_seconds")
        .expect("downtime histogram");
    match &hist.value {
        Value::Histogram(b) => {
            assert_eq!(b.last().map(|c| c.count), Some(1.0), "{body}");
            assert!(b.windows(2).all(|w| w[0].count <= w[1].count), "{body}");
        }
        v => panic!("not a histogram: {v:?}"),
    }
    let bytes: f64 = s
        .samples
        .iter()
        .filter(|x| x.metric == "ferry_migration_bytes_total")
        .filter_map(|x| match x.value {
            Value::Counter(v) => Some(v),
            _ => None,
        })
        .sum();
    assert!(bytes > 0.0, "{body}");
    assert_eq!(
        value(&s, "ferry_guests", &[("state", "running")]),
        Some(1.0),
        "{body}"
    );
    assert!(
        value(
            &s,
            "ferry_link_bits_per_second",
            &[("interface", "mig0"), ("direction", "tx")]
        )
        .is_some(),
        "{body}"
    );
    lab.down().unwrap();
}
