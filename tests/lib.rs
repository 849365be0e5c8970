//! Helpers shared by Ferry's privileged end-to-end tests.
//!
//! Every test that needs root, /dev/kvm or network namespaces first asks [`require`]. Where the
//! capability is missing the test prints why and passes as skipped, except under CI (`CI=true`),
//! where a missing capability fails the run.

pub use xtask::client;

use std::path::Path;
use std::sync::Arc;

use ferry::vm::Hypervisor;

/// A capability a test needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Root,
    Kvm,
    Netns,
}

fn missing(need: Need) -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    match need {
        Need::Root if !root => Some("not running as root".into()),
        Need::Kvm => {
            if std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_err()
            {
                Some("/dev/kvm cannot be opened read-write".into())
            } else {
                None
            }
        }
        Need::Netns if !root => Some("network namespaces need root".into()),
        Need::Netns
            if !Path::new("/usr/sbin/ip").exists()
                && !Path::new("/sbin/ip").exists()
                && !Path::new("/usr/bin/ip").exists() =>
        {
            Some("iproute2 (`ip`) is not installed; `cargo xtask deps` installs it".into())
        }
        _ => None,
    }
}

/// Whether the test may run. Under `CI=true` a missing capability panics instead of skipping.
pub fn require(test: &str, needs: &[Need]) -> bool {
    for &n in needs {
        if let Some(why) = missing(n) {
            if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
                panic!("{test}: cannot run under CI: {why}");
            }
            eprintln!("SKIPPED {test}: {why}");
            return false;
        }
    }
    true
}

/// Open KVM for a test, or None (skipped) where the test cannot run. With
/// `FERRY_TEST_MEMORY=memfd` guest memory is memfd-backed, as in a `ferry vmm` (run the runtime
/// tests both ways).
pub fn hypervisor(test: &str) -> Option<Arc<Hypervisor>> {
    if !require(test, &[Need::Kvm]) {
        return None;
    }
    let hv = Hypervisor::open().expect("open /dev/kvm");
    if std::env::var("FERRY_TEST_MEMORY").is_ok_and(|v| v == "memfd") {
        hv.memfd_backing
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
    Some(hv)
}

/// Poll `f` every 10 ms until it returns Some, or panic after `secs` seconds saying `what`.
pub fn wait_for<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if std::time::Instant::now() > deadline {
            panic!("timed out after {secs}s waiting for {what}");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// The `ferry` binary under test (see [`xtask::lab::ferry_bin`]); `cargo xtask test` builds it.
pub fn ferry_bin() -> std::path::PathBuf {
    xtask::lab::ferry_bin().unwrap_or_else(|e| panic!("{e:#}"))
}

/// A `ferry agent` process of its own, with a config and socket in a fresh temporary directory.
/// Dropping it stops the agent (by PID) and removes the directory.
pub struct TestAgent {
    pub dir: std::path::PathBuf,
    pub socket: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl TestAgent {
    pub fn start(test: &str) -> TestAgent {
        Self::start_with(test, &[], &[])
    }

    /// Start with extra environment variables and extra agent arguments.
    pub fn start_with(test: &str, env: &[(&str, &str)], args: &[&str]) -> TestAgent {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!(
            "ferry-test-{}-{}-{n}",
            test.chars().take(24).collect::<String>(),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create test dir");
        let socket = dir.join("agent.sock");
        let config = dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "[agent]\nname = \"{test_name}\"\nsocket = \"{}\"\nstate_dir = \"{}\"\n",
                socket.display(),
                dir.join("state").display(),
                test_name = "test"
            ),
        )
        .expect("write config");
        let log = std::fs::File::create(dir.join("agent.log")).expect("log file");
        let child = std::process::Command::new(ferry_bin())
            .args(["agent", "--config"])
            .arg(&config)
            .args(args)
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn ferry agent");
        let mut a = TestAgent {
            dir,
            socket,
            child: Some(child),
        };
        let sock = a.socket.clone();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
                break;
            }
            if let Some(c) = a.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("agent exited ({st}) before listening:\n{}", a.log());
                }
            }
            if std::time::Instant::now() > deadline {
                panic!("agent did not listen within 15 s:\n{}", a.log());
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        a
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Run `ferry --socket <this agent> args...`.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(ferry_bin())
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run ferry")
    }

    /// Run the CLI with `--json`, expect success, parse stdout.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let o = self.cli(&a);
        assert!(
            o.status.success(),
            "ferry {args:?} failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
            panic!(
                "ferry {args:?}: not JSON ({e}): {}",
                String::from_utf8_lossy(&o.stdout)
            )
        })
    }

    /// The agent's API client.
    pub fn client(&self) -> ferry::control::client::Client {
        ferry::control::client::Client::new(&self.socket)
    }

    /// Stop the agent: SIGTERM, then SIGKILL after 10 s. Returns its exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        // SAFETY: kill(2) on the PID of a child we spawned and have not reaped.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            if std::time::Instant::now() > deadline {
                let _ = c.kill();
                return c.wait().ok();
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Drives `ferry --host NAME` against the agents of a lab.
pub struct LabFerry<'a> {
    pub lab: &'a xtask::lab::Lab,
}

impl LabFerry<'_> {
    pub fn cli(&self, host: &str, args: &[&str]) -> std::process::Output {
        std::process::Command::new(ferry_bin())
            .env("FERRY_LAB_ROOT", self.lab.root())
            .env_remove("FERRY_SOCKET")
            .args(["--host", host])
            .args(args)
            .output()
            .expect("run ferry")
    }

    /// `ferry --host HOST --json ARGS`, expecting success; parsed stdout.
    pub fn json(&self, host: &str, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let o = self.cli(host, &a);
        assert!(
            o.status.success(),
            "ferry --host {host} {args:?} failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
            panic!(
                "ferry {args:?}: not JSON ({e}): {}",
                String::from_utf8_lossy(&o.stdout)
            )
        })
    }

    /// Migrate and wait; returns the final record (`--json` prints progress lines, then the result).
    pub fn migrate(&self, from: &str, vm: &str, to: &str, extra: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json", "migrate", vm, "--to", to];
        a.extend_from_slice(extra);
        let o = self.cli(from, &a);
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        let last = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["event"] == "result")
            .unwrap_or_else(|| {
                panic!(
                    "no result from migrate: {text}{}",
                    String::from_utf8_lossy(&o.stderr)
                )
            });
        let rec = last["migration"].clone();
        assert_eq!(
            o.status.success(),
            rec["phase"] == "completed",
            "exit status and result disagree: {rec}"
        );
        rec
    }

    /// Names of the VMs on a host.
    pub fn vms(&self, host: &str) -> Vec<String> {
        self.json(host, &["vm", "list"])
            .as_array()
            .expect("list")
            .iter()
            .map(|v| v["name"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// Sum of heartbeat counters of a workload VM.
    pub fn beats(&self, host: &str, vm: &str) -> u64 {
        self.json(host, &["vm", "inspect", vm])["heartbeats"]
            .as_array()
            .map(|a| a.iter().map(|h| h["beats"].as_u64().unwrap_or(0)).sum())
            .unwrap_or(0)
    }

    /// Heartbeat counters of a workload VM, per vCPU.
    pub fn beats_per_vcpu(&self, host: &str, vm: &str) -> Vec<u64> {
        self.json(host, &["vm", "inspect", vm])["heartbeats"]
            .as_array()
            .map(|a| a.iter().map(|h| h["beats"].as_u64().unwrap_or(0)).collect())
            .unwrap_or_default()
    }

    /// Wait until every vCPU of a workload VM beats on `host`, counted from there (not from
    /// counts that came with the guest): it runs there.
    pub fn wait_runs_on(&self, host: &str, vm: &str) {
        let start = self.beats_per_vcpu(host, vm);
        assert!(!start.is_empty(), "{vm} on {host} has no heartbeats");
        wait_for("every vCPU to beat on the host", 20, || {
            let now = self.beats_per_vcpu(host, vm);
            (now.len() == start.len() && now.iter().zip(&start).all(|(n, s)| n > s)).then_some(())
        });
    }

    /// Wait until a workload VM has filled its memory.
    pub fn wait_filled(&self, host: &str, vm: &str) {
        wait_for("workload fill", 120, || {
            let i = self.json(host, &["vm", "inspect", vm]);
            i["heartbeats"]
                .as_array()?
                .iter()
                .all(|h| h["phase"] == "work")
                .then_some(())
        });
    }

    /// Limit host `host`'s migration NIC to `rate` (tc tbf), e.g. "200mbit".
    pub fn slow_migration_link(&self, host: &str, rate: &str) {
        self.lab
            .exec(
                host,
                &[
                    "tc", "qdisc", "replace", "dev", "mig0", "root", "tbf", "rate", rate, "burst",
                    "256kb", "latency", "100ms",
                ],
            )
            .expect("tc");
    }
}

impl LabFerry<'_> {
    /// Create and start the service guest (`guest/ferry-guest.bin`, kind `service`) `name` on
    /// `host`, 128 MiB, with a NIC `mac` on `vm-net` at `xtask::lab::vm_addr(addr)`/24 and a
    /// 16 MiB disk `[shared] NAME/disk.img`, plus `extra` arguments of `ferry vm create`; wait
    /// (30 s at most) until its console says it is ready.
    pub fn start_service_guest(&self, host: &str, name: &str, addr: u8, mac: &str, extra: &[&str]) {
        let program = xtask::guest::guest_image();
        assert!(program.is_file(), "run `cargo xtask build-guest`");
        let ip = format!("{}/24", xtask::lab::vm_addr(addr).expect("guest address"));
        let nic = format!("{mac}@vm-net");
        let disk = format!("[shared] {name}/disk.img:16M");
        let mut args = vec![
            "vm", "create", name, "--kind", "service", "--memory", "128M", "--ip", &ip, "--nic",
            &nic, "--disk", &disk,
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[
            "--program",
            program.to_str().expect("UTF-8 path"),
            "--start",
        ]);
        self.json(host, &args);
        wait_for("the service guest to be ready", 30, || {
            let o = self.cli(host, &["vm", "console", name]);
            let c = String::from_utf8_lossy(&o.stdout).into_owned();
            assert!(!c.contains("PANIC"), "{c}");
            c.contains("ferry-guest: ready").then_some(())
        });
    }
}

/// Run `f` on a thread inside network namespace `netns` (e.g. a lab host's).
pub fn in_netns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{netns}");
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).expect("open netns");
        use std::os::fd::AsRawFd;
        // SAFETY: setns on this thread only, with a namespace fd we hold open.
        let r = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("netns thread")
}

/// Open file descriptors of process `pid`, and how many of them are BPF links.
pub fn fds_and_bpf_links(pid: u32) -> (usize, usize) {
    let fds: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("process fds")
        .filter_map(|e| e.ok())
        .collect();
    let links = fds
        .iter()
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().contains("bpf_link"))
        })
        .count();
    (fds.len(), links)
}
