//! Development tasks: install what the project needs (`deps`), run every check and test (`test`),
//! the demo (`demo`), and the guest benchmark (`bench guest`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry::control::agent::VmInfo;
use ferry::control::api::CreateRequest;
use ferry::control::client::Client;
use ferry::vm::{GuestKind, Profile, WorkloadParams};

use crate::lab::{self, Lab, LabOptions};

/// One external program that the tests, benches or xtask commands run, and the Debian package
/// that provides it.
#[derive(Debug, Clone, Copy)]
pub struct Tool {
    pub program: &'static str,
    pub package: &'static str,
    /// Who runs it (shown by `cargo xtask deps --check`).
    pub used_by: &'static str,
}

/// Every external program the test suite, the benches and the xtask commands run. `cargo xtask
/// deps` installs the packages of those that are missing; `cargo xtask deps --check` lists them
/// all and fails on a missing one; `cargo xtask test` does both first. A fresh Debian 12 machine
/// lacks several of these (even `ping`): nothing may be installed by hand.
pub const TOOLS: &[Tool] = &[
    Tool { program: "ip", package: "iproute2", used_by: "lab namespaces, veths, addresses, routes; `ip netns exec`" },
    Tool { program: "tc", package: "iproute2", used_by: "lab link shaping (tbf), qdisc checks in the fault suite and soak" },
    Tool { program: "bridge", package: "iproute2", used_by: "the switch's FDB (MAC announcement tests)" },
    Tool { program: "ss", package: "iproute2", used_by: "socket listings when debugging a lab" },
    Tool { program: "ping", package: "iputils-ping", used_by: "tests/netpin.rs (unmarked traffic on the migration NIC), guest continuity from the lab client" },
    Tool { program: "ps", package: "procps", used_by: "process listings in lab diagnostics" },
    Tool { program: "clang-19", package: "clang-19", used_by: "`cargo xtask build-ebpf [--check]`: the committed BPF object" },
    Tool { program: "cc", package: "gcc", used_by: "`cargo xtask build-guest [--check]`: links the service guest (as every Rust build links)" },
    Tool { program: "systemd-analyze", package: "systemd", used_by: "`systemd-analyze verify` of the unit (`cargo xtask test`, `cargo xtask dist`)" },
    Tool { program: "man", package: "man-db", used_by: "the unit's `Documentation=man:` links, checked by systemd-analyze" },
    Tool { program: "perf", package: "linux-perf", used_by: "xtask/perf-migration.sh (profiles a migration)" },
    Tool { program: "dpkg-deb", package: "dpkg", used_by: "`cargo xtask dist`: builds the .deb" },
    Tool { program: "dpkg-shlibdeps", package: "dpkg-dev", used_by: "`cargo xtask dist`: the package's Depends" },
    Tool { program: "strip", package: "binutils", used_by: "`cargo xtask dist`: the packaged binary" },
    Tool { program: "lintian", package: "lintian", used_by: "`cargo xtask dist` and `cargo xtask test --packaging`" },
    Tool { program: "debootstrap", package: "debootstrap", used_by: "`cargo xtask test --packaging`: a fresh Debian 12 root" },
    Tool { program: "systemd-nspawn", package: "systemd-container", used_by: "`cargo xtask test --packaging`: boots that root under systemd" },
];

/// Where the BPF program and its committed object live.
fn ebpf_dir() -> PathBuf {
    workspace_root().join("ebpf")
}

/// Compile `ebpf/netpin.bpf.c` with clang-19 into `out`. The build is reproducible: paths are
/// mapped so the object does not depend on where the checkout is, and `-fno-ident` leaves
/// clang's version string out (a Debian point release of clang-19 must not fail the check).
fn compile_ebpf(out: &Path) -> Result<()> {
    let dir = ebpf_dir();
    let mut cmd = Command::new("clang-19");
    cmd.current_dir(&dir)
        .args([
            "-O2",
            "-g",
            "-fno-ident",
            "-target",
            "bpf",
            "-I/usr/include/x86_64-linux-gnu",
        ])
        .arg(format!("-fdebug-prefix-map={}=.", dir.display()))
        .args(["-c", "netpin.bpf.c", "-o"])
        .arg(out);
    run(&mut cmd).context(
        "clang-19 could not build ebpf/netpin.bpf.c (`cargo xtask deps` installs clang-19)",
    )
}

/// `build-ebpf`: rebuild `ebpf/netpin.bpf.o` (committed; the agent embeds it). With `check`,
/// build into a temporary file and fail if it differs from the committed object.
pub fn build_ebpf(check: bool) -> Result<()> {
    let committed = ebpf_dir().join("netpin.bpf.o");
    if !check {
        compile_ebpf(&committed)?;
        println!("built {}", committed.display());
        return Ok(());
    }
    let tmp = std::env::temp_dir().join(format!("ferry-netpin-{}.o", std::process::id()));
    compile_ebpf(&tmp)?;
    let fresh = std::fs::read(&tmp)?;
    let _ = std::fs::remove_file(&tmp);
    let old =
        std::fs::read(&committed).with_context(|| format!("reading {}", committed.display()))?;
    if fresh != old {
        bail!(
            "ebpf/netpin.bpf.o is stale: it does not match ebpf/netpin.bpf.c; run `cargo xtask build-ebpf` and commit the object"
        );
    }
    println!("ebpf/netpin.bpf.o matches its source");
    Ok(())
}

/// The workspace root (the directory holding the top-level Cargo.toml).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn have(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(cmd).is_file()))
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|d| Path::new(d).join(cmd).is_file())
}

pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let st = cmd
        .status()
        .with_context(|| format!("cannot run {shown}"))?;
    if !st.success() {
        bail!("{shown} failed ({st})");
    }
    Ok(())
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

/// Install the Debian packages of every missing tool in [`TOOLS`] (apt-get; root, Debian's
/// archive), then check that each is there.
pub fn deps() -> Result<()> {
    let mut missing: Vec<&str> = TOOLS
        .iter()
        .filter(|t| !have(t.program))
        .map(|t| t.package)
        .collect();
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        println!("deps: every tool the suite runs is installed");
        return Ok(());
    }
    println!("deps: installing {}", missing.join(" "));
    run(Command::new("apt-get")
        .arg("update")
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .context("apt-get update failed: is Debian's archive reachable, and are you root?")?;
    run(Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .context("apt-get install failed")?;
    check_deps()
}

/// `deps --check`: list every program the suite runs, with its package and whether it is
/// installed; fail naming each missing one.
pub fn check_deps() -> Result<()> {
    let mut missing = Vec::new();
    println!(
        "{:<16} {:<13} {:<8} USED BY",
        "PROGRAM", "PACKAGE", "STATUS"
    );
    for t in TOOLS {
        let ok = have(t.program);
        println!(
            "{:<16} {:<18} {:<8} {}",
            t.program,
            t.package,
            if ok { "ok" } else { "MISSING" },
            t.used_by
        );
        if !ok {
            missing.push(format!("{} (package {})", t.program, t.package));
        }
    }
    if !missing.is_empty() {
        bail!(
            "missing: {}; run `cargo xtask deps` (as root) to install them",
            missing.join(", ")
        );
    }
    Ok(())
}

/// Everything CI runs: deps (installed, then checked), formatting, clippy, build, all tests
/// (the fault suite three times). Every test binary runs (`--no-fail-fast`) and the fault suite
/// runs all three times even after a failure, so one failure never hides another; the command
/// fails at the end, naming every step that failed.
pub fn test(extra: &[String]) -> Result<()> {
    let t = Instant::now();
    deps()?;
    check_deps()?;
    run(cargo().args(["fmt", "--all", "--", "--check"]))
        .context("formatting differs: run `cargo fmt --all`")?;
    build_ebpf(true)?;
    crate::guest::build_guest(true)?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(cargo().args(["build", "-p", "ferry-cli"]))?;
    // The systemd unit, against this build and its generated man pages.
    let docs = workspace_root().join("target/unit-check");
    crate::dist::docs(&docs)?;
    crate::dist::verify_unit(&workspace_root().join("target/debug/ferry"), &docs)?;
    let mut failed = Vec::new();
    if let Err(e) = run(cargo()
        .args(["test", "--workspace", "--no-fail-fast"])
        .args(extra))
    {
        failed.push(format!("the test suite: {e:#}"));
    }
    if extra.is_empty() {
        // The fault suite must pass three times in a row: twice more after the run above.
        for round in 2..=3 {
            println!("fault suite, run {round} of 3");
            // `--workspace`, as above: the same feature set, so nothing is rebuilt.
            if let Err(e) = run(cargo().args(["test", "--workspace", "--test", "faults"])) {
                failed.push(format!("fault suite run {round}: {e:#}"));
            }
        }
    }
    if !failed.is_empty() {
        bail!(
            "{} step(s) failed after {:.0?} (each test binary's failures are listed above):\n  {}",
            failed.len(),
            t.elapsed(),
            failed.join("\n  ")
        );
    }
    println!("all checks and tests passed in {:.0?}", t.elapsed());
    Ok(())
}

pub fn build_ferry() -> Result<PathBuf> {
    run(cargo().args(["build", "-p", "ferry-cli"]))?;
    let bin = workspace_root().join("target/debug/ferry");
    if !bin.is_file() {
        bail!("{} was not built", bin.display());
    }
    Ok(bin)
}

/// The release build users deploy, for benchmarks (`cargo build --release -p ferry-cli`); says so.
pub fn build_ferry_release() -> Result<PathBuf> {
    run(cargo().args(["build", "--release", "-p", "ferry-cli"]))?;
    let bin = workspace_root().join("target/release/ferry");
    if !bin.is_file() {
        bail!("{} was not built", bin.display());
    }
    println!("bench: release build, {}", bin.display());
    Ok(bin)
}

pub(crate) fn wait<T>(
    what: &str,
    secs: u64,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {secs} s waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(crate) fn workload(
    name: &str,
    memory_mib: u64,
    vcpus: u32,
    profile: Profile,
    rate: u64,
) -> CreateRequest {
    CreateRequest {
        name: name.into(),
        memory_mib,
        vcpus,
        kind: GuestKind::Workload(WorkloadParams {
            profile,
            dirty_rate_mib: rate,
            working_set_mib: None,
        }),
        start: true,
        disks: vec![],
        nics: vec![],
        cpu: Default::default(),
    }
}

/// Migrate `vm` from the agent behind `c` to `to` and wait until it ends; its summary, or an
/// error if it did not complete.
pub(crate) fn migrate_and_wait(
    c: &Client,
    vm: &str,
    to: &str,
    options: ferry::migrate::MigrateOptions,
) -> Result<ferry::migrate::Summary> {
    use ferry::control::agent::MigrateRequest;
    use ferry::migrate::{MigrationRecord, Phase};
    let rec: MigrationRecord = c.post(
        "/v1/migrations",
        &MigrateRequest {
            vm: vm.into(),
            to: to.into(),
            options,
            force: false,
        },
    )?;
    let path = format!("/v1/migrations/{}", rec.id);
    let rec: MigrationRecord = wait("migration", 900, || {
        let r: MigrationRecord = c.get(&path)?;
        Ok(r.phase.finished().then_some(r))
    })?;
    if rec.phase != Phase::Completed {
        bail!("migration of {vm} to {to} failed: {:?}", rec.error);
    }
    rec.summary
        .context("a completed migration without a summary")
}

/// A throughput probe from the agent behind `c` to peer `b` over the migration link.
pub(crate) fn blast(
    c: &Client,
    mode: ferry::migrate::blast::BlastMode,
    streams: u32,
    bytes: u64,
) -> Result<ferry::migrate::blast::BlastResult> {
    use ferry::control::agent::PingRequest;
    use ferry::migrate::blast::BlastRequest;
    Ok(c.post(
        "/v1/ping",
        &PingRequest {
            to: "b".into(),
            throughput: Some(BlastRequest {
                streams,
                secs: 0.0,
                bytes,
                mode,
            }),
        },
    )?)
}

pub(crate) fn filled(c: &Client, name: &str) -> Result<Option<VmInfo>> {
    let i: VmInfo = c.get(&format!("/v1/vms/{name}"))?;
    Ok((!i.heartbeats.is_empty() && i.heartbeats.iter().all(|h| h.phase == "work")).then_some(i))
}

/// The demo: the lab, a 1 GiB mixed workload guest on host `a` dirtying 64 MiB/s, migrated live
/// to host `b` with progress and a summary, then shown running on `b`. The lab stays up.
pub fn demo() -> Result<()> {
    println!(
        "demo: building ferry (the first build takes a few minutes; cargo shows its progress)"
    );
    let bin = build_ferry()?;
    let root = PathBuf::from(lab::DEFAULT_ROOT);
    if lab::status(Some(lab::DEFAULT_NAME), &root)?.exists() {
        println!("demo: removing the previous lab");
        lab::down_recorded(Some(lab::DEFAULT_NAME), &root)?;
    }
    println!("demo: building the two-host lab (namespaces ferry-lab-a, -b, -sw; agents on both)");
    let lab = Lab::up(LabOptions {
        name: lab::DEFAULT_NAME.into(),
        root: root.clone(),
        ferry_bin: Some(bin.clone()),
    })?;
    let a = lab.host("a").context("lab host a")?;
    let c = Client::new(&a.socket);
    println!("demo: creating vm1 on host a: 1 GiB, 2 vCPUs, mixed memory, dirtying 64 MiB/s");
    let _: VmInfo = c.post("/v1/vms", &workload("vm1", 1024, 2, Profile::Mixed, 64))?;
    let svc_ip = lab::vm_addr(10)?;
    println!(
        "demo: creating web1 on host a: the service guest, a virtio NIC on port group vm-net \
         ({svc_ip}), a virtio disk on [shared], journaling 200 records/s"
    );
    let _: VmInfo = c.post(
        "/v1/vms",
        &crate::continuity::service_guest("web1", 10, "52:54:00:de:00:01", 256, 200, 64, 16)?,
    )?;
    crate::continuity::wait_ready(&c, "web1")?;
    let client_ns = lab.client_netns().to_owned();
    let state = lab.detach();
    state.save()?;
    wait("vm1 to fill its memory", 120, || filled(&c, "vm1"))?;
    std::thread::sleep(Duration::from_secs(2));
    let ferry = |args: &[&str]| -> Result<()> {
        println!("\n$ ferry {}", args.join(" "));
        run(Command::new(&bin).args(args))
    };
    ferry(&["--host", "a", "vm", "inspect", "vm1"])?;
    ferry(&["--host", "a", "migrate", "vm1", "--to", "b"])?;
    println!("\ndemo: letting vm1 run on b for two seconds, then its heartbeat there");
    std::thread::sleep(Duration::from_secs(2));
    ferry(&["--host", "b", "vm", "inspect", "vm1"])?;
    // The client starts only now: its TCP stream runs as fast as it can read, which would take
    // a core from vm1's migration on a small machine.
    println!(
        "\ndemo: a client in namespace {client_ns} pings web1 every 10 ms and reads its TCP \
         counter stream; now web1 moves"
    );
    let mut watcher =
        crate::continuity::Watcher::start_in(&client_ns, svc_ip, Duration::from_secs(3600))?;
    let (view, t0, t1) = watcher.migrate("demo", &c, "web1", "a", "b")?;
    std::thread::sleep(Duration::from_secs(1));
    let mut views = vec![(view, t0, t1)];
    let summary = watcher.finish(&mut views)?;
    let v = &views[0].0;
    println!(
        "web1 a->b: {:.2} s, downtime {:.1} ms; the client saw {} pings answered and {} lost, \
         the largest gap between replies {:.1} ms, the TCP stream's largest stall {:.1} ms\n{summary}",
        v.total_s,
        v.downtime_ms,
        v.pings_answered,
        v.pings_lost,
        v.max_ping_gap_ms,
        v.max_stream_stall_ms
    );
    ferry(&["--host", "b", "vm", "inspect", "web1"])?;
    ferry(&["--host", "a", "vm", "list"])?;
    ferry(&["--host", "b", "vm", "list"])?;
    println!(
        "\nThe lab stays up. Try `target/debug/ferry --host b migrate vm1 --to a`, \
         `target/debug/ferry --host a migrations`, `cargo xtask lab status`, \
         `ip netns exec {} ping {svc_ip}`; remove it with `cargo xtask lab down`.",
        lab::client_netns_name(lab::DEFAULT_NAME)
    );
    Ok(())
}

pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks as f64 / hz)
}

/// `bench guest`: in the lab, a 1 GiB mixed 2-vCPU workload guest at several dirty rates:
/// requested vs measured dirty rate, heartbeat rate, agent CPU use, and pause latency.
pub fn bench_guest(secs: u64) -> Result<()> {
    let bin = build_ferry_release()?;
    let lab = Lab::up(LabOptions::for_test("bench-guest").with_ferry_bin(bin))?;
    let a = lab.host("a").context("lab host a")?;
    let pid = a.agent_pid.context("agent pid")?;
    let c = Client::new(&a.socket);
    let out_dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    let mut jsonl = String::new();
    println!(
        "{:>10} {:>10} {:>12} {:>14} {:>10} {:>12} {:>12}",
        "REQUESTED", "MEASURED", "PAGES/S", "BEATS/S", "AGENT CPU", "PAUSE p50", "RESUME p50"
    );
    // u64::MAX/2^20 would overflow the pacing math's purpose; 1 TiB/s means "unpaced".
    for rate in [0u64, 64, 256, 1 << 20] {
        let name = format!("g{rate}");
        let _: VmInfo = c.post("/v1/vms", &workload(&name, 1024, 2, Profile::Mixed, rate))?;
        wait("fill", 120, || filled(&c, &name))?;
        std::thread::sleep(Duration::from_millis(1500));
        let i0: VmInfo = c.get(&format!("/v1/vms/{name}"))?;
        let (t0, cpu0) = (Instant::now(), cpu_seconds(pid).unwrap_or(0.0));
        std::thread::sleep(Duration::from_secs(secs));
        let i1: VmInfo = c.get(&format!("/v1/vms/{name}"))?;
        let dt = t0.elapsed().as_secs_f64();
        let cpu = (cpu_seconds(pid).unwrap_or(0.0) - cpu0) / dt;
        let sum = |i: &VmInfo, f: fn(&ferry::control::agent::VcpuRates) -> u64| -> u64 {
            i.heartbeats.iter().map(f).sum()
        };
        let pages = (sum(&i1, |h| h.pages_written) - sum(&i0, |h| h.pages_written)) as f64 / dt;
        let beats = (sum(&i1, |h| h.beats) - sum(&i0, |h| h.beats)) as f64 / dt;
        let measured = pages * 4096.0 / (1 << 20) as f64;
        let (mut pauses, mut resumes) = (Vec::new(), Vec::new());
        for _ in 0..20 {
            let p: VmInfo = c.post_empty(&format!("/v1/vms/{name}/pause"))?;
            pauses.push(p.last_pause_us);
            let r: VmInfo = c.post_empty(&format!("/v1/vms/{name}/resume"))?;
            resumes.push(r.last_resume_us);
            std::thread::sleep(Duration::from_millis(20));
        }
        pauses.sort_unstable();
        resumes.sort_unstable();
        let p50 = pauses[pauses.len() / 2];
        let r50 = resumes[resumes.len() / 2];
        let requested = if rate >= 1 << 20 {
            "unpaced".to_string()
        } else {
            rate.to_string()
        };
        println!(
            "{:>10} {:>10.1} {:>12.0} {:>14.0} {:>9.0}% {:>9} us {:>9} us",
            requested,
            measured,
            pages,
            beats,
            cpu * 100.0,
            p50,
            r50
        );
        jsonl += &serde_json::json!({
            "bench": "guest",
            "memory_mib": 1024, "vcpus": 2, "profile": "mixed",
            "requested_mib_s": if rate >= 1 << 20 { None } else { Some(rate) },
            "measured_mib_s": measured,
            "pages_per_s": pages,
            "beats_per_s": beats,
            "agent_cpu_fraction": cpu,
            "pause_p50_us": p50,
            "pause_max_us": pauses.last().copied().unwrap_or(0),
            "resume_p50_us": r50,
            "resume_max_us": resumes.last().copied().unwrap_or(0),
        })
        .to_string();
        jsonl.push('\n');
        c.delete(&format!("/v1/vms/{name}"))?;
    }
    let path = out_dir.join("guest.jsonl");
    std::fs::write(&path, jsonl)?;
    println!("results: {}", path.display());
    lab.down()
}

/// `bench migrate`: in a fresh lab, a mixed workload guest of `memory_mib` with 2 vCPUs is
/// migrated a→b once per dirty rate; prints total time, downtime and its parts, guest-observed
/// pause, rounds and bytes (table, and JSON lines in target/bench/migrate.jsonl).
pub fn bench_migrate(memory_mib: u64, rates: &[u64], repeat: u32, encrypt: bool) -> Result<()> {
    use ferry::migrate::MigrateOptions;
    let bin = build_ferry_release()?;
    let lab = Lab::up(LabOptions::for_test("bench-mig").with_ferry_bin(bin))?;
    let a = Client::new(&lab.host("a").context("lab host a")?.socket);
    let b = Client::new(&lab.host("b").context("lab host b")?.socket);
    let out_dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    let mut jsonl = String::new();
    println!(
        "{:>7} {:>4} {:>4} {:>9} {:>8} {:>10} {:>10} {:>9} {:>7} {:>11} {:>11} {:>7}",
        "MEMORY",
        "RUN",
        "ENC",
        "DIRTY",
        "TOTAL",
        "DOWNTIME",
        "GUEST",
        "PAGES",
        "ROUNDS",
        "GUEST MiB",
        "WIRE MiB",
        "RATIO"
    );
    let modes: &[bool] = if encrypt { &[false, true] } else { &[false] };
    // The first migration into host b pays for the kernel finding and zeroing fresh memory
    // there: "cold", reported as such; the rest are warm.
    let mut cold = true;
    for &rate in rates {
        for (run, &enc) in (0..repeat.max(1)).flat_map(|r| modes.iter().map(move |m| (r, m))) {
            let name = format!("m{rate}r{run}{}", if enc { "e" } else { "" });
            let _: VmInfo = a.post(
                "/v1/vms",
                &workload(&name, memory_mib, 2, Profile::Mixed, rate),
            )?;
            wait("fill", 300, || filled(&a, &name))?;
            std::thread::sleep(Duration::from_secs(2));
            let s = migrate_and_wait(
                &a,
                &name,
                "b",
                MigrateOptions {
                    encrypt: enc,
                    no_encrypt: !enc,
                    ..MigrateOptions::default()
                },
            )?;
            let d = &s.downtime;
            println!(
                "{:>5} M {:>4} {:>4} {:>5} M/s {:>7.2}s {:>7.2} ms {:>7.2} ms {:>9} {:>7} {:>11.1} {:>11.1} {:>6.2}x",
                memory_mib,
                if cold { "cold" } else { "warm" },
                if enc { "yes" } else { "no" },
                rate,
                s.total_s,
                d.total_ms,
                s.guest_pause_ms.unwrap_or(f64::NAN),
                s.rounds.last().map_or(0, |r| r.pages),
                s.rounds.len(),
                s.guest_bytes as f64 / (1 << 20) as f64,
                s.wire_bytes as f64 / (1 << 20) as f64,
                s.guest_bytes as f64 / s.wire_bytes.max(1) as f64
            );
            jsonl += &serde_json::json!({
                "bench": "migrate",
                "memory_mib": memory_mib, "vcpus": 2, "profile": "mixed", "dirty_rate_mib_s": rate,
                "run": run,
                "cold": cold,
                "encrypted": enc,
                "summary": s,
            })
            .to_string();
            jsonl.push('\n');
            cold = false;
            b.delete(&format!("/v1/vms/{name}"))?;
        }
    }
    let path = out_dir.join("migrate.jsonl");
    std::fs::write(&path, jsonl)?;
    println!(
        "(PAGES = pages in the final, paused round) results: {}",
        path.display()
    );
    lab.down()
}

/// `bench transport`: in a fresh lab, 4 GiB of raw page frames from host a to host b with each
/// send mode and 1 and 2 streams, next to the raw TCP blast; then a 2 GiB `random` guest
/// migrated a→b, compared with the blast measured in the same run.
pub fn bench_transport(gib: u64) -> Result<()> {
    use ferry::migrate::blast::BlastMode;
    use ferry::migrate::MigrateOptions;
    let bin = build_ferry_release()?;
    let lab = Lab::up(LabOptions::for_test("bench-tr").with_ferry_bin(bin))?;
    let a = Client::new(&lab.host("a").context("lab host a")?.socket);
    let out_dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    let mut jsonl = String::new();
    let blast = |mode: BlastMode, streams: u32, bytes: u64| blast(&a, mode, streams, bytes);
    println!(
        "{:<16} {:>7} {:>9} {:>8} {:>14} {:>14}",
        "MODE", "STREAMS", "GB/s", "Gbit/s", "SEND CPU s/GiB", "RECV CPU s/GiB"
    );
    for mode in [
        BlastMode::Tcp,
        BlastMode::Std,
        BlastMode::Uring,
        BlastMode::ZeroCopy,
        BlastMode::ZeroCopyFixed,
    ] {
        for streams in [1, 2] {
            let r = blast(mode, streams, gib << 30)?;
            println!(
                "{:<16} {:>7} {:>9.2} {:>8.1} {:>14.2} {:>14.2}",
                format!("{mode:?}"),
                streams,
                r.gbytes_per_s,
                r.gbits_per_s,
                r.send_cpu_s_per_gib,
                r.recv_cpu_s_per_gib
            );
            jsonl += &serde_json::json!({ "bench": "transport", "result": r }).to_string();
            jsonl.push('\n');
        }
    }
    // The migration goal, in the same run: a 2 GiB incompressible guest vs the raw blast.
    let before = blast(BlastMode::Tcp, 2, 4 << 30)?;
    let _: VmInfo = a.post("/v1/vms", &workload("rnd", 2048, 2, Profile::Random, 0))?;
    wait("fill", 300, || filled(&a, "rnd"))?;
    std::thread::sleep(Duration::from_secs(1));
    let s = migrate_and_wait(&a, "rnd", "b", MigrateOptions::default())?;
    let after = blast(BlastMode::Tcp, 2, 4 << 30)?;
    let link = (before.gbytes_per_s + after.gbytes_per_s) / 2.0;
    let mig = (2u64 << 30) as f64 / s.total_s / 1e9;
    let wire = s.wire_bytes as f64 / s.total_s / 1e9;
    println!(
        "\n2 GiB random guest: {:.2} s, {:.2} GB/s of guest memory ({:.2} GB/s on the wire); raw TCP blast (2 streams) {:.2} GB/s before, {:.2} after: migration at {:.0} % of the link",
        s.total_s, mig, wire, before.gbytes_per_s, after.gbytes_per_s, 100.0 * mig / link
    );
    jsonl += &serde_json::json!({
        "bench": "transport-migration",
        "guest_mib": 2048, "profile": "random",
        "total_s": s.total_s,
        "guest_gbytes_per_s": mig,
        "wire_gbytes_per_s": wire,
        "blast_before_gbytes_per_s": before.gbytes_per_s,
        "blast_after_gbytes_per_s": after.gbytes_per_s,
        "ratio": mig / link,
        "summary": s,
    })
    .to_string();
    jsonl.push('\n');
    let path = out_dir.join("transport.jsonl");
    std::fs::write(&path, jsonl)?;
    println!("results: {}", path.display());
    lab.down()
}
