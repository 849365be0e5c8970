//! `ferry vmm`: one guest per process, driven over its socket by the agent-side client.
//!
//! Each test starts VMM processes from the built `ferry` binary (root and /dev/kvm needed),
//! talks to them with [`VmmClient`], and ends only the processes it started, by PID. Every wait
//! is bounded.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry::vm::memory::{GuestMemory, PAGE_SIZE};
use ferry::vm::workload::{self, WorkloadParams};
use ferry::vm::{GuestKind, Profile, VmSpec, VmStatus};
use ferry::vmm::client::{ClientError, VmmClient};
use ferry::vmm::protocol::{self, ErrorKind, Mode, Reply, Request};
use ferry::vmm::{CreateLaunch, ExitRecord, IncomingLaunch};
use ferry_tests::{ferry_bin, require, wait_for, Need};

const TIMEOUT: Duration = Duration::from_secs(20);

fn workload_spec(name: &str, memory_mib: u64, vcpus: u32, rate: u64) -> VmSpec {
    VmSpec {
        name: name.into(),
        memory_mib,
        vcpus,
        kind: GuestKind::Workload(WorkloadParams {
            profile: Profile::Mixed,
            dirty_rate_mib: rate,
            working_set_mib: None,
        }),
        disks: vec![],
        nics: vec![],
        cpu: Default::default(),
    }
}

fn params(spec: &VmSpec) -> WorkloadParams {
    match &spec.kind {
        GuestKind::Workload(p) => p.clone(),
        other => panic!("not a workload guest: {other:?}"),
    }
}

/// A temporary state directory, removed on drop.
struct StateDir(PathBuf);

impl StateDir {
    fn new(test: &str) -> StateDir {
        let d = std::env::temp_dir().join(format!(
            "ferry-vmm-{}-{}",
            test.chars().take(24).collect::<String>(),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("state dir");
        StateDir(d)
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `ferry vmm` this test started: the monitor is our child; the VMM is its child, whose PID
/// the Hello tells. Dropping it kills both (by PID) if they still run.
struct TestVmm {
    name: String,
    state_dir: PathBuf,
    monitor: Child,
    vmm_pid: Option<u32>,
}

enum Launch {
    Create(CreateLaunch),
    Incoming(IncomingLaunch),
}

impl TestVmm {
    fn start(dir: &StateDir, launch: Launch, test_requests: bool) -> TestVmm {
        let (name, flag, json) = match &launch {
            Launch::Create(c) => (
                c.spec.name.clone(),
                "--create",
                serde_json::to_vec(c).unwrap(),
            ),
            Launch::Incoming(i) => (
                i.spec.name.clone(),
                "--incoming",
                serde_json::to_vec(i).unwrap(),
            ),
        };
        let file = dir.0.join(format!("{name}.launch.json"));
        std::fs::write(&file, json).unwrap();
        let log = std::fs::File::create(dir.0.join(format!("{name}.log"))).unwrap();
        let mut cmd = Command::new(ferry_bin());
        cmd.args(["vmm", "--name", &name, "--state-dir"])
            .arg(&dir.0)
            .arg(flag)
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if test_requests {
            cmd.arg("--test-requests");
        }
        let monitor = cmd.spawn().expect("spawn ferry vmm");
        TestVmm {
            name,
            state_dir: dir.0.clone(),
            monitor,
            vmm_pid: None,
        }
    }

    fn socket(&self) -> PathBuf {
        ferry::vmm::socket_path(&self.state_dir, &self.name)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.state_dir.join(format!("{}.log", self.name)))
            .unwrap_or_default()
    }

    fn connect(&mut self) -> VmmClient {
        let c = VmmClient::connect_wait(&self.socket(), TIMEOUT)
            .unwrap_or_else(|e| panic!("connect to {}: {e}\n{}", self.name, self.log()));
        self.vmm_pid = Some(c.hello().pid);
        c
    }

    /// Wait for the monitor to end (bounded) and read the exit record.
    fn wait_exit(&mut self, secs: u64) -> ExitRecord {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(_st) = self.monitor.try_wait().unwrap() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not end within {secs}s\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        ferry::vmm::read_exit_record(&self.state_dir, &self.name)
            .unwrap_or_else(|| panic!("no exit record for {}\n{}", self.name, self.log()))
    }
}

impl Drop for TestVmm {
    fn drop(&mut self) {
        if let Some(pid) = self.vmm_pid {
            // Only our monitor's child: check its parent before the kill.
            let ours = proc_field(pid, "PPid").is_some_and(|p| p == self.monitor.id().to_string());
            if ours {
                // SAFETY: kill(2) of a PID we started (checked above), with SIGKILL.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.monitor.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.monitor.kill();
        let _ = self.monitor.wait();
    }
}

/// A field of /proc/PID/status.
fn proc_field(pid: u32, field: &str) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_string())
}

fn can_run(test: &str) -> bool {
    require(test, &[Need::Root, Need::Kvm])
}

fn create(spec: VmSpec) -> Launch {
    Launch::Create(CreateLaunch {
        spec,
        devices: Default::default(),
        host: Default::default(),
    })
}

fn wait_beats_past(c: &mut VmmClient, beats: u64, what: &str) -> Vec<workload::Heartbeat> {
    wait_for(what, 20, || {
        let hb = c.heartbeats().unwrap()?;
        hb.iter().all(|h| h.beats > beats).then_some(hb)
    })
}

fn wait_filled(c: &mut VmmClient) {
    wait_for("workload fill", 60, || {
        let hb = c.heartbeats().unwrap()?;
        hb.iter().all(|h| h.phase == 1).then_some(())
    });
}

#[test]
fn vmm_runs_a_guest_shares_its_memory_and_survives_its_client() {
    let test = "vmm_runs_a_guest";
    if !can_run(test) {
        return;
    }
    let dir = StateDir::new(test);
    let spec = workload_spec("w1", 64, 2, 64);
    let mut vmm = TestVmm::start(&dir, create(spec.clone()), false);
    let mut c = vmm.connect();
    let h = c.hello().clone();
    assert_eq!(h.name, "w1");
    assert_eq!(h.mode, Mode::Create);
    assert_eq!(h.spec, spec);
    assert_eq!(h.state, VmStatus::Created);
    assert_eq!(h.protocol_version, protocol::PROTOCOL_VERSION);
    assert_eq!(h.monitor_pid, vmm.monitor.id());
    assert_ne!(h.pid, h.monitor_pid);
    assert!(!h.test_requests);

    // The socket is the owner's only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(vmm.socket())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");

    // Jailed: seccomp filter, no capabilities, no_new_privs, unprivileged, own mount
    // namespace, own session; in every thread.
    let pid = h.pid;
    assert_eq!(proc_field(pid, "Seccomp").as_deref(), Some("2"));
    assert_eq!(proc_field(pid, "NoNewPrivs").as_deref(), Some("1"));
    assert_eq!(
        proc_field(pid, "CapEff").as_deref(),
        Some("0000000000000000")
    );
    assert_eq!(
        proc_field(pid, "CapPrm").as_deref(),
        Some("0000000000000000")
    );
    assert_eq!(
        proc_field(pid, "CapBnd").as_deref(),
        Some("0000000000000000")
    );
    let uid = proc_field(pid, "Uid").unwrap();
    assert!(uid.split_whitespace().all(|u| u == "65534"), "Uid: {uid}");
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .collect();
    assert!(
        tasks.len() >= 3,
        "vCPU threads and the server: {}",
        tasks.len()
    );
    for t in &tasks {
        let s = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        assert!(s.contains("Seccomp:\t2"), "thread {:?}:\n{s}", t.path());
        assert!(
            s.contains("CapEff:\t0000000000000000"),
            "thread {:?}:\n{s}",
            t.path()
        );
    }
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/mnt")).unwrap();
    assert_ne!(ns(&pid.to_string()), ns("self"), "own mount namespace");
    let sid = |p: &str| {
        let s = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap();
        let after = &s[s.rfind(')').unwrap() + 2..];
        after.split_whitespace().nth(3).unwrap().to_string()
    };
    assert_ne!(sid(&pid.to_string()), sid("self"), "own session");

    // The guest's memory, mapped here from the VMM's memfds.
    let mem: Arc<GuestMemory> = c.memory().unwrap();
    assert_eq!(mem.layout(), h.regions);
    assert!(!mem.has_vm());
    assert!(mem.set_dirty_logging_all(true).is_err(), "no KVM here");
    c.resume().unwrap();
    assert_eq!(c.status().unwrap().state, VmStatus::Running);
    wait_filled(&mut c);
    // Heartbeats read through the shared mapping move like the VMM's own.
    let a = workload::heartbeats(&mem, 2).unwrap();
    let b = wait_beats_past(&mut c, a[0].beats.max(a[1].beats), "heartbeats");
    let direct = workload::heartbeats(&mem, 2).unwrap();
    assert!(direct[0].beats >= b[0].beats, "{direct:?} vs {b:?}");

    // Dirty logging: a running guest dirties pages; a paused one none.
    c.set_dirty_logging(true).unwrap();
    assert!(c.status().unwrap().dirty_logging);
    let _ = c.fetch_dirty().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let d = c.fetch_dirty().unwrap();
    assert!(
        d.count() > 10,
        "a guest writing 64 MiB/s dirtied {} pages",
        d.count()
    );
    // Put pages back: they come again with the next fetch.
    c.mark_dirty(&d).unwrap();

    let (took, _q) = c.pause().unwrap();
    assert!(took < Duration::from_secs(2));
    let again = c.fetch_dirty().unwrap();
    assert!(again.count() >= d.count(), "marked pages come back");
    let quiet = c.fetch_dirty().unwrap();
    assert_eq!(quiet.count(), 0, "a paused guest dirties nothing");
    c.set_dirty_logging(false).unwrap();

    // Paused means paused, and its memory verifies through the mapping.
    let p1 = workload::heartbeats(&mem, 2).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(p1, workload::heartbeats(&mem, 2).unwrap());
    let rep = workload::verify(&mem, 2, &params(&spec)).unwrap();
    assert!(rep.ok(), "bad pages: {rep:?}");
    assert!(rep.pages_checked > 1000);
    assert!(
        mem.populated().count() > 1000,
        "memfd pages the guest touched"
    );

    // State.
    let st = c.capture_state_decoded().unwrap();
    assert_eq!(st.spec, spec);
    assert_eq!(st.vcpus.len(), 2);
    assert_eq!(st.regions, h.regions);
    let s = c.status().unwrap();
    assert_eq!(s.state, VmStatus::Paused);
    assert_eq!(s.clients, 1);
    assert!(s.ever_resumed);
    assert!(!c.cpuid().unwrap().is_empty());
    c.throttle(30).unwrap();
    assert_eq!(c.status().unwrap().throttle_pct, 30);
    c.throttle(0).unwrap();
    c.resume().unwrap();
    let after = wait_beats_past(&mut c, p1[0].beats.max(p1[1].beats), "beats after resume");

    // The client goes away (as an agent that dies); the guest keeps running and a new client
    // adopts the same VMM.
    drop(c);
    std::thread::sleep(Duration::from_millis(300));
    let mut c2 = vmm.connect();
    assert_eq!(c2.hello().instance_id, h.instance_id);
    assert_eq!(c2.hello().pid, h.pid);
    assert_eq!(c2.hello().state, VmStatus::Running);
    let later = wait_beats_past(&mut c2, after[0].beats, "beats after the reconnect");
    assert!(later[0].beats > after[0].beats);
    assert_eq!(c2.status().unwrap().clients, 1);

    // Stop: the VMM ends cleanly, says why, and takes its socket with it.
    c2.stop().unwrap();
    let rec = vmm.wait_exit(20);
    assert!(rec.clean, "{rec:?}");
    assert_eq!(rec.code, Some(0));
    assert_eq!(rec.reason, "stopped by request");
    assert_eq!(rec.instance_id, h.instance_id);
    assert_eq!(rec.pid, h.pid);
    assert!(!vmm.socket().exists());
    // The mapping here stays valid after the VMM is gone.
    let _ = workload::heartbeats(&mem, 2).unwrap();
}

#[test]
fn raw_guest_console_through_the_vmm() {
    let test = "raw_guest_console";
    if !can_run(test) {
        return;
    }
    let dir = StateDir::new(test);
    let img = dir.0.join("hello.img");
    std::fs::write(&img, ferry::vm::raw::hello_image("hello from a VMM\n")).unwrap();
    let spec = VmSpec {
        name: "raw1".into(),
        memory_mib: 16,
        vcpus: 1,
        kind: GuestKind::Raw(ferry::vm::RawParams::new(img)),
        disks: vec![],
        nics: vec![],
        cpu: Default::default(),
    };
    let mut vmm = TestVmm::start(&dir, create(spec), false);
    let mut c = vmm.connect();
    c.resume().unwrap();
    let text = wait_for("console output", 20, || {
        let (off, bytes) = c.console(0, 4096).unwrap();
        assert_eq!(off, 0);
        bytes
            .ends_with(b"\n")
            .then(|| String::from_utf8_lossy(&bytes).into_owned())
    });
    assert_eq!(text, "hello from a VMM\n");
    let (off, rest) = c.console(5, 4096).unwrap();
    assert_eq!((off, rest.as_slice()), (5, &b" from a VMM\n"[..]));
    assert_eq!(c.heartbeats().unwrap(), None);
    c.pause().unwrap();
    c.stop().unwrap();
    assert!(vmm.wait_exit(20).clean);
}

#[test]
fn service_guest_with_virtio_devices_runs_jailed() {
    let test = "service_guest_jailed";
    if !can_run(test) {
        return;
    }
    let dir = StateDir::new(test);
    let disk = dir.0.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let mut p = ferry::vm::ServiceParams::new("198.18.2.10".parse().unwrap(), 24);
    p.journal_rate = 100;
    let spec = VmSpec {
        name: "svc1".into(),
        memory_mib: 128,
        vcpus: 1,
        kind: GuestKind::Service(p),
        disks: vec![ferry::vm::DiskSpec {
            path: "[shared] svc1/disk.img".into(),
            size_mib: 1,
        }],
        nics: vec![ferry::vm::NicSpec {
            mac: "52:54:00:0a:0b:0c".into(),
            port_group: "vm-net".into(),
        }],
        cpu: Default::default(),
    };
    let launch = Launch::Create(CreateLaunch {
        spec,
        // The NIC has no backend (no bridge in this test); the disk is a file.
        devices: ferry::vm::DeviceEnv {
            bridges: vec![None],
            disks: vec![Some(disk)],
        },
        host: Default::default(),
    });
    let mut vmm = TestVmm::start(&dir, launch, false);
    let mut c = vmm.connect();
    c.resume().unwrap();
    wait_for("the service guest is ready", 30, || {
        let (_, text) = c.console(0, 1 << 16).unwrap();
        String::from_utf8_lossy(&text)
            .contains("ferry-guest: ready")
            .then_some(())
    });
    // The journal goes to the disk through the jailed device threads (writes and flushes).
    let written = wait_for("journal writes", 20, || {
        let s = c.status().unwrap();
        let d = &s.disks[0];
        (d.writes > 5 && d.flushes > 5).then_some(d.writes)
    });
    let (_took, q) = c.pause().unwrap();
    assert_eq!(q.io_stuck, 0);
    let st = c.capture_state_decoded().unwrap();
    assert_eq!(st.devices.virtio.blk.len(), 1);
    assert_eq!(st.devices.virtio.net.len(), 1);
    c.resume().unwrap();
    wait_for("more journal writes after the resume", 20, || {
        (c.status().unwrap().disks[0].writes > written).then_some(())
    });
    let s = c.status().unwrap();
    assert_eq!(s.state, VmStatus::Running, "{:?}", s.fault);
    assert_eq!(s.nics.len(), 1);
    c.stop().unwrap();
    let rec = vmm.wait_exit(20);
    assert!(rec.clean, "{rec:?}");
}

/// Copy every populated page of `from` into `to` (whole memory), or only the pages of `dirty`.
fn copy_pages(from: &GuestMemory, to: &GuestMemory, pages: impl Iterator<Item = u64>) -> u64 {
    let mut buf = [0u8; PAGE_SIZE as usize];
    let mut n = 0;
    for gpa in pages {
        from.read(gpa, &mut buf).unwrap();
        to.write(gpa, &buf).unwrap();
        n += 1;
    }
    n
}

#[test]
fn migration_between_two_vmms_through_their_memfds() {
    let test = "migration_between_two_vmms";
    if !can_run(test) {
        return;
    }
    let dir = StateDir::new(test);
    let spec = workload_spec("m1", 64, 2, 32);
    let mut src = TestVmm::start(&dir, create(spec.clone()), false);
    let mut s = src.connect();
    let smem = s.memory().unwrap();
    s.resume().unwrap();
    wait_filled(&mut s);

    // The destination: an empty guest of the source's shape, in its own VMM (another name on
    // one host; across hosts it would be the same name).
    let mut dspec = spec.clone();
    dspec.name = "m1-in".into();
    let mut dst = TestVmm::start(
        &dir,
        Launch::Incoming(IncomingLaunch {
            spec: dspec.clone(),
            regions: s.hello().regions.clone(),
            devices: Default::default(),
            host: Default::default(),
        }),
        false,
    );
    let mut d = dst.connect();
    assert_eq!(d.hello().mode, Mode::Incoming);
    let dmem = d.memory().unwrap();

    // Pre-copy: round 0 while the guest runs, then the pages it dirtied meanwhile.
    s.set_dirty_logging(true).unwrap();
    let _ = s.fetch_dirty().unwrap();
    let populated = smem.populated();
    let sent0 = copy_pages(&smem, &dmem, populated.iter_gpa());
    assert!(sent0 > 1000, "round 0 sent {sent0} pages");
    let round1 = s.fetch_dirty().unwrap();
    copy_pages(&smem, &dmem, round1.iter_gpa());
    // Stop and copy.
    s.pause().unwrap();
    let last = s.fetch_dirty().unwrap();
    copy_pages(&smem, &dmem, last.iter_gpa());
    let beats_at_pause = workload::heartbeats(&smem, 2).unwrap();
    let state = s.capture_state_decoded().unwrap();
    // The state names its guest; here the destination has another name.
    let mut state = state;
    state.spec.name = dspec.name.clone();
    d.restore_state(&state.encode().unwrap()).unwrap();

    // Byte for byte what the source held at pause, and consistent for the workload's checker.
    let rep = workload::verify(&dmem, 2, &params(&spec)).unwrap();
    assert!(rep.ok(), "destination memory: {rep:?}");
    for l in smem.layout() {
        let (mut a, mut b) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
        let mut off = 0;
        while off < l.size {
            smem.read(l.gpa + off, &mut a).unwrap();
            dmem.read(l.gpa + off, &mut b).unwrap();
            assert!(a == b, "memory differs in the MiB at {:#x}", l.gpa + off);
            off += 1 << 20;
        }
    }

    // The destination runs on from where the source stopped.
    d.resume().unwrap();
    let top = beats_at_pause.iter().map(|h| h.beats).max().unwrap();
    let moved = wait_beats_past(&mut d, top, "the destination's heartbeats");
    assert!(moved.iter().all(|h| h.phase == 1));
    assert_eq!(d.status().unwrap().state, VmStatus::Running);
    // The source's copy is destroyed; the destination no longer depends on its agent staying.
    s.stop().unwrap();
    assert!(src.wait_exit(20).clean);
    drop(d);
    std::thread::sleep(Duration::from_millis(200));
    let mut d2 = dst.connect();
    assert_eq!(
        d2.status().unwrap().state,
        VmStatus::Running,
        "a resumed incoming VMM stays"
    );
    d2.stop().unwrap();
    assert!(dst.wait_exit(20).clean);
}

#[test]
fn incoming_vmm_exits_when_its_agent_leaves_before_resume() {
    let test = "incoming_abandoned";
    if !can_run(test) {
        return;
    }
    let dir = StateDir::new(test);
    let spec = workload_spec("in1", 32, 1, 0);
    let regions = ferry::vm::memory::standard_layout(32 << 20).unwrap();
    let mut vmm = TestVmm::start(
        &dir,
        Launch::Incoming(IncomingLaunch {
            spec,
            regions,
            devices: Default::default(),
            host: Default::default(),
        }),
        false,
    );
    // A probe that never says Hello does not end it.
    let probe = std::os::unix::net::UnixStream::connect(vmm.socket());
    let c = vmm.connect();
    drop(probe);
    assert_eq!(c.hello().state, VmStatus::Created);
    drop(c);
    let rec = vmm.wait_exit(20);
    assert!(rec.clean, "{rec:?}");
    assert!(rec.reason.contains("abandoned"), "{}", rec.reason);
    assert!(!vmm.socket().exists());
}

#[test]
fn a_vmm_that_fails_to_set_up_says_why() {
    let test = "setup_failure";
    if !can_run(test) {
        return;
    }
    let dir = StateDir::new(test);
    let missing = dir.0.join("no-such-image.img");
    let spec = VmSpec {
        name: "broken".into(),
        memory_mib: 16,
        vcpus: 1,
        kind: GuestKind::Raw(ferry::vm::RawParams::new(missing)),
        disks: vec![],
        nics: vec![],
        cpu: Default::default(),
    };
    let mut vmm = TestVmm::start(&dir, create(spec), false);
    // The client sees the connection end instead of a Hello.
    let r = VmmClient::connect_wait(&vmm.socket(), TIMEOUT);
    assert!(r.is_err(), "a VMM whose guest cannot load answered Hello");
    let rec = vmm.wait_exit(20);
    assert!(!rec.clean);
    assert_eq!(rec.code, Some(2), "{rec:?}");
    assert!(rec.reason.contains("no-such-image.img"), "{}", rec.reason);
    assert!(!vmm.socket().exists());
}

#[test]
fn a_forbidden_syscall_kills_only_that_vmm() {
    let test = "forbidden_syscall";
    if !can_run(test) {
        return;
    }
    let dir = StateDir::new(test);
    let mut victim = TestVmm::start(&dir, create(workload_spec("bad", 32, 1, 0)), true);
    let mut other = TestVmm::start(&dir, create(workload_spec("good", 32, 1, 8)), false);
    let mut v = victim.connect();
    assert!(v.hello().test_requests);
    let mut o = other.connect();
    o.resume().unwrap();
    let before = wait_beats_past(&mut o, 0, "the other guest's heartbeats");
    // A VMM without --test-requests refuses the request.
    let refused = o.test_forbidden_syscall().unwrap_err();
    assert_eq!(refused.remote_kind(), Some(ErrorKind::Refused), "{refused}");
    // The victim dies on the call: the connection closes without a reply.
    let err = v.test_forbidden_syscall().unwrap_err();
    assert!(
        matches!(err, ClientError::Protocol(_)),
        "expected the connection to drop: {err}"
    );
    let rec = victim.wait_exit(20);
    assert_eq!(rec.signal, Some(libc::SIGSYS), "{rec:?}");
    assert!(!rec.clean);
    assert!(rec.reason.contains("seccomp"), "{}", rec.reason);
    assert!(
        !victim.socket().exists(),
        "the monitor removed the dead VMM's socket"
    );
    // Nothing else died: the other VMM serves and its guest runs on.
    let after = wait_beats_past(&mut o, before[0].beats, "the other guest after the kill");
    assert!(after[0].beats > before[0].beats);
    assert_eq!(o.status().unwrap().state, VmStatus::Running);
    o.stop().unwrap();
    assert!(other.wait_exit(20).clean);
}

/// Send raw bytes and read one reply frame.
fn raw_exchange(sock: &std::os::unix::net::UnixStream, bytes: &[u8]) -> Option<Reply> {
    use std::io::Write;
    (&*sock).write_all(bytes).ok()?;
    let f = protocol::read_frame(sock, || {}).ok()?;
    match protocol::decode_reply(&f.body).ok()? {
        protocol::DecodedReply::Reply(r) => Some(r),
        protocol::DecodedReply::OtherHello(_) => None,
    }
}

fn error_kind(r: Option<Reply>) -> Option<ErrorKind> {
    match r {
        Some(Reply::Error(e)) => Some(e.kind),
        _ => None,
    }
}

fn connect_raw(path: &Path) -> std::os::unix::net::UnixStream {
    let s = std::os::unix::net::UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s
}

#[test]
fn malformed_frames_get_errors_and_the_vmm_keeps_serving() {
    let test = "malformed_frames";
    if !can_run(test) {
        return;
    }
    let dir = StateDir::new(test);
    let mut vmm = TestVmm::start(&dir, create(workload_spec("mf", 32, 1, 0)), false);
    let mut c = vmm.connect();
    let path = vmm.socket();

    // A request before Hello.
    let s = connect_raw(&path);
    let status = protocol::encode(&Request::Status, "req").unwrap();
    assert_eq!(
        error_kind(raw_exchange(&s, &status)),
        Some(ErrorKind::Protocol)
    );
    // A body that decodes as nothing: an error, and the connection stays usable.
    let mut junk = protocol::MAGIC.to_vec();
    junk.extend_from_slice(&5u32.to_le_bytes());
    junk.extend_from_slice(&[0xee, 1, 2, 3, 4]);
    assert_eq!(
        error_kind(raw_exchange(&s, &junk)),
        Some(ErrorKind::Protocol)
    );
    let hello = protocol::encode(
        &Request::Hello(protocol::HelloRequest {
            protocol_version: protocol::PROTOCOL_VERSION,
            binary_version: "test".into(),
        }),
        "req",
    )
    .unwrap();
    assert!(matches!(raw_exchange(&s, &hello), Some(Reply::Hello(_))));
    assert!(matches!(raw_exchange(&s, &status), Some(Reply::Status(_))));
    // Descriptors nobody asked for are refused (and closed); the connection stays usable.
    let devnull = std::fs::File::open("/dev/null").unwrap();
    protocol::write_frame(&s, &status, &[std::os::fd::AsFd::as_fd(&devnull)]).unwrap();
    let f = protocol::read_frame(&s, || {}).unwrap();
    assert!(matches!(
        protocol::decode_reply(&f.body).unwrap(),
        protocol::DecodedReply::Reply(Reply::Error(e)) if e.kind == ErrorKind::Protocol
    ));
    assert!(matches!(raw_exchange(&s, &status), Some(Reply::Status(_))));
    drop(s);

    // A wrong magic: an error reply, then the VMM closes that connection.
    let s = connect_raw(&path);
    assert_eq!(
        error_kind(raw_exchange(&s, b"GET / HTTP/1.1\r\n\r\n")),
        Some(ErrorKind::Protocol)
    );
    assert!(
        protocol::read_frame(&s, || {}).is_err(),
        "closed after a bad magic"
    );
    // An oversized frame: refused without reading it.
    let s = connect_raw(&path);
    let mut big = protocol::MAGIC.to_vec();
    big.extend_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(
        error_kind(raw_exchange(&s, &big)),
        Some(ErrorKind::Protocol)
    );
    // Half a frame, then the client goes away.
    let s = connect_raw(&path);
    use std::io::Write;
    (&s).write_all(&status[..5]).unwrap();
    drop(s);
    // A Hello of an unknown protocol version: refused, naming both versions.
    let s = connect_raw(&path);
    let future = protocol::encode(
        &Request::Hello(protocol::HelloRequest {
            protocol_version: 99,
            binary_version: "99.0.0".into(),
        }),
        "req",
    )
    .unwrap();
    match raw_exchange(&s, &future) {
        Some(Reply::Error(e)) => {
            assert_eq!(e.kind, ErrorKind::Version);
            assert!(
                e.message.contains("protocol 99 (ferry 99.0.0)"),
                "{}",
                e.message
            );
            assert!(
                e.message
                    .contains(&format!("protocol {}", protocol::PROTOCOL_VERSION)),
                "{}",
                e.message
            );
        }
        other => panic!("expected a version error, got {other:?}"),
    }

    // Still serving, the old client too.
    assert_eq!(c.status().unwrap().state, VmStatus::Created);
    let mut c2 = vmm.connect();
    assert_eq!(c2.hello().pid, c.hello().pid);
    // Bad arguments are typed refusals, not crashes.
    let e = c2.deliver_frames(7, vec![vec![0; 64]]).unwrap_err();
    assert_eq!(e.remote_kind(), Some(ErrorKind::Invalid), "{e}");
    let e = c2.restore_state(b"not a state").unwrap_err();
    assert_eq!(e.remote_kind(), Some(ErrorKind::Invalid), "{e}");
    let e = c2
        .mark_dirty(&ferry::vm::memory::DirtyBitmap { regions: vec![] })
        .unwrap_err();
    assert_eq!(e.remote_kind(), Some(ErrorKind::Invalid), "{e}");
    c2.resume().unwrap();
    let e = c2.capture_state().unwrap_err();
    assert_eq!(e.remote_kind(), Some(ErrorKind::State), "{e}");
    // A second VMM of the same name is refused while this one serves.
    let mut dup = TestVmm::start(&dir, create(workload_spec("mf", 32, 1, 0)), false);
    let deadline = Instant::now() + TIMEOUT;
    let st = loop {
        if let Some(st) = dup.monitor.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "the duplicate did not give up");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!st.success());
    assert!(dup.log().contains("already serving"), "{}", dup.log());
    assert!(
        path.exists(),
        "the duplicate left the first VMM's socket alone"
    );
    assert_eq!(c.status().unwrap().state, VmStatus::Running);
    c.stop().unwrap();
    assert!(vmm.wait_exit(20).clean);
}
