//! What a guest's users see across a migration, measured from outside it: the service guest
//! (`guest/`, kind `service`) with a virtio NIC on the port group `vm-net` and a virtio disk on
//! the shared datastore, and a client in the lab's client namespace that pings it every 10 ms
//! and reads its TCP counter stream the whole time.
//!
//! `cargo xtask bench continuity` (release build): per scenario (idle, dirtying 64 MiB/s,
//! journaling 200 records/s), three migrations a→b→a→b; per migration the pings lost, the
//! largest gap between ping replies, the largest stall of the TCP stream, next to the downtime,
//! the device state's size, the in-flight I/O drained and the frames carried in the state. A
//! table, and JSON lines in `target/bench/continuity.jsonl`. The demo uses the same pieces.

use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use ferry::control::api::CreateRequest;
use ferry::control::client::Client;
use ferry::vm::service::ServiceParams;
use ferry::vm::{DiskSpec, GuestKind, NicSpec};
use serde::Serialize;

use crate::client::{CounterReader, Pinger};
use crate::dev::{migrate_and_wait, wait, workspace_root};
use crate::lab::{self, Lab, LabOptions};

/// A service guest for the lab: `memory_mib` of memory, a NIC with `mac` on `vm-net`, a 16 MiB
/// disk on the shared datastore, address `vm_addr(n)/24`.
pub fn service_guest(
    name: &str,
    n: u8,
    mac: &str,
    memory_mib: u64,
    journal_rate: u32,
    working_set_mib: u32,
    dirty_rate_mib: u32,
) -> Result<CreateRequest> {
    let mut p = ServiceParams::new(lab::vm_addr(n)?, 24);
    p.journal_rate = journal_rate;
    p.working_set_mib = working_set_mib;
    p.dirty_rate_mib = dirty_rate_mib;
    Ok(CreateRequest {
        name: name.into(),
        memory_mib,
        vcpus: 1,
        kind: GuestKind::Service(p),
        disks: vec![DiskSpec {
            path: format!("[shared] {name}/disk.img"),
            size_mib: 16,
        }],
        nics: vec![NicSpec {
            mac: mac.into(),
            port_group: lab::PORT_GROUP.into(),
        }],
        cpu: Default::default(),
        start: true,
    })
}

/// Wait until the service guest `name` behind `c` says it is ready on its console.
pub fn wait_ready(c: &Client, name: &str) -> Result<()> {
    wait("the service guest to be ready", 30, || {
        let chunk: ferry::control::agent::ConsoleChunk =
            c.get(&format!("/v1/vms/{name}/console?offset=0&max=65536"))?;
        if chunk.data.contains("PANIC") {
            bail!("the service guest panicked: {}", chunk.data);
        }
        Ok(chunk.data.contains("ferry-guest: ready").then_some(()))
    })
}

fn epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// What the client saw during one migration.
#[derive(Debug, Clone, Serialize)]
pub struct ClientView {
    pub scenario: String,
    pub migration: String,
    pub total_s: f64,
    pub downtime_ms: f64,
    /// The workload guest's heartbeat gap; a service guest has none (null).
    pub guest_pause_ms: Option<f64>,
    pub pings_answered: usize,
    pub pings_lost: usize,
    pub max_ping_gap_ms: f64,
    pub max_stream_stall_ms: f64,
    pub device_state_bytes: Option<u64>,
    pub io_drained: Option<u64>,
    pub rx_frames_carried: Option<u64>,
    pub rx_frames_forwarded: Option<u64>,
}

/// The client: pings every 10 ms and a counter-stream reader, from the lab's client namespace.
pub struct Watcher {
    pinger: Option<Pinger>,
    counter: CounterReader,
}

impl Watcher {
    pub fn start(lab: &Lab, guest: Ipv4Addr, max: Duration) -> Result<Watcher> {
        Watcher::start_in(lab.client_netns(), guest, max)
    }

    /// [`Watcher::start`] from the client namespace `cl`.
    pub fn start_in(cl: &str, guest: Ipv4Addr, max: Duration) -> Result<Watcher> {
        let pinger = Pinger::start(cl, guest, Duration::from_millis(10), max)?;
        let counter = CounterReader::start(cl, guest, max)?;
        wait("the counter stream to flow", 20, || {
            Ok((counter.records() > 1000).then_some(()))
        })?;
        Ok(Watcher {
            pinger: Some(pinger),
            counter,
        })
    }

    /// Migrate `vm` and record what the client saw meanwhile (stall measured from the move's
    /// start until the stream flowed again after it).
    pub fn migrate(
        &mut self,
        scenario: &str,
        c: &Client,
        vm: &str,
        from: &str,
        to: &str,
    ) -> Result<(ClientView, f64, f64)> {
        self.counter.take_stall();
        let before = self.counter.records();
        let t0 = epoch();
        let s = migrate_and_wait(c, vm, to, Default::default())?;
        let t1 = epoch();
        wait("the counter stream to flow after the move", 10, || {
            Ok((self.counter.records() > before + 1000).then_some(()))
        })?;
        let stall = self.counter.take_stall();
        let devices = serde_json::to_value(&s)
            .ok()
            .map(|v| v["devices"].clone())
            .unwrap_or_default();
        Ok((
            ClientView {
                scenario: scenario.into(),
                migration: format!("{from}->{to}"),
                total_s: s.total_s,
                downtime_ms: s.downtime.total_ms,
                guest_pause_ms: s.guest_pause_ms,
                pings_answered: 0,
                pings_lost: 0,
                max_ping_gap_ms: 0.0,
                max_stream_stall_ms: stall.as_secs_f64() * 1000.0,
                device_state_bytes: devices["state_bytes"].as_u64(),
                io_drained: devices["io_drained"].as_u64(),
                rx_frames_carried: devices["rx_frames_carried"].as_u64(),
                rx_frames_forwarded: devices["rx_frames_forwarded"].as_u64(),
            },
            t0,
            t1 + 1.0,
        ))
    }

    /// Stop; fill in each view's ping figures from its time window. Fails if the stream saw a
    /// reset, a gap or a repeat.
    pub fn finish(mut self, views: &mut [(ClientView, f64, f64)]) -> Result<String> {
        let ping = self
            .pinger
            .take()
            .context("the pinger was already stopped")?
            .stop()?;
        let stream = self.counter.stop();
        // A move's window ends where the next one starts, so no lost ping counts twice.
        for i in 1..views.len() {
            let next = views[i].1;
            views[i - 1].2 = views[i - 1].2.min(next);
        }
        for (v, t0, t1) in views.iter_mut() {
            let (answered, lost, gap) = ping.window(*t0, *t1);
            v.pings_answered = answered;
            v.pings_lost = lost.len();
            v.max_ping_gap_ms = gap;
        }
        let summary = format!(
            "client: {} pings answered, {} lost overall, largest gap {:.1} ms; TCP counter stream {} records, largest stall {:?}, {}",
            ping.replies.len(),
            ping.lost.len(),
            ping.max_gap_ms,
            stream.records,
            stream.max_stall,
            if stream.clean() {
                "no reset, no gap, no repeat".to_string()
            } else {
                format!("NOT CLEAN: {stream:?}")
            }
        );
        if !stream.clean() {
            bail!("{summary}");
        }
        Ok(summary)
    }
}

/// `bench continuity`.
pub fn bench(moves: u32) -> Result<()> {
    let bin = crate::dev::build_ferry_release()?;
    let out_dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    let lab = Lab::up(LabOptions::for_test("bench-cont").with_ferry_bin(bin))?;
    let hosts = [
        Client::new(&lab.host("a").context("host a")?.socket),
        Client::new(&lab.host("b").context("host b")?.socket),
    ];
    println!(
        "{:<10} {:<5} {:>7} {:>9} {:>6} {:>5} {:>10} {:>10} {:>8} {:>6} {:>6} {:>6}",
        "SCENARIO",
        "MOVE",
        "TOTAL",
        "DOWNTIME",
        "PINGS",
        "LOST",
        "PING GAP",
        "TCP STALL",
        "DEV STATE",
        "IO DRN",
        "RX CAR",
        "RX FWD"
    );
    let mut jsonl = String::new();
    let scenarios: [(&str, u32, u32, u32); 3] = [
        ("idle", 0, 0, 0),
        ("dirty64", 0, 128, 64),
        ("journal", 200, 0, 0),
    ];
    for (i, (name, journal, ws, rate)) in scenarios.into_iter().enumerate() {
        let vm = format!("c{name}");
        let n = 20 + i as u8;
        let mac = format!("52:54:00:0c:00:{n:02x}");
        let _: ferry::control::agent::VmInfo = hosts[0].post(
            "/v1/vms",
            &service_guest(&vm, n, &mac, 256, journal, ws, rate)?,
        )?;
        wait_ready(&hosts[0], &vm)?;
        std::thread::sleep(Duration::from_secs(1));
        let mut w = Watcher::start(&lab, lab::vm_addr(n)?, Duration::from_secs(600))?;
        let mut views = Vec::new();
        let mut at = 0usize;
        for _ in 0..moves {
            std::thread::sleep(Duration::from_millis(500));
            let to = 1 - at;
            views.push(w.migrate(name, &hosts[at], &vm, ["a", "b"][at], ["a", "b"][to])?);
            at = to;
        }
        std::thread::sleep(Duration::from_millis(500));
        let summary = w.finish(&mut views)?;
        for (v, _, _) in &views {
            let opt = |x: Option<u64>| x.map_or("-".to_string(), |x| x.to_string());
            println!(
                "{:<10} {:<5} {:>6.2}s {:>6.2} ms {:>6} {:>5} {:>7.1} ms {:>7.1} ms {:>8} {:>6} {:>6} {:>6}",
                v.scenario,
                v.migration,
                v.total_s,
                v.downtime_ms,
                v.pings_answered,
                v.pings_lost,
                v.max_ping_gap_ms,
                v.max_stream_stall_ms,
                opt(v.device_state_bytes),
                opt(v.io_drained),
                opt(v.rx_frames_carried),
                opt(v.rx_frames_forwarded),
            );
            jsonl += &serde_json::to_string(v)?;
            jsonl.push('\n');
        }
        println!("{name}: {summary}");
        hosts[at].delete(&format!("/v1/vms/{vm}"))?;
    }
    lab.down()?;
    let path = out_dir.join("continuity.jsonl");
    std::fs::write(&path, jsonl)?;
    println!("results: {} (release build)", path.display());
    Ok(())
}
