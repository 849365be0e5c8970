//! The two-host lab: two "hosts" and a "switch" made of network namespaces on this machine.
//!
//! A lab named `NAME` with root directory `ROOT` consists of
//!
//! ```text
//!   ferry-NAME-a                          ferry-NAME-b
//!   mgmt0 198.18.0.1/24  <── veth ──>     mgmt0 198.18.0.2/24     management (control traffic)
//!   mig0  198.18.1.1/24  <── veth ──>     mig0  198.18.1.2/24     dedicated migration link
//!   vmbr0 (bridge, port group "vm-net")   vmbr0 (bridge, port group "vm-net")
//!    └ uplink0 ─ veth ─┐            ┌─ veth ─ uplink0 ┘
//!                      a-up ─ br0 ─ b-up
//!                       ferry-NAME-sw (the switch)
//!                              └ cl-up ─ veth ─ eth0 198.18.2.200/24
//!                                        ferry-NAME-cl (a client of the guests)
//! ```
//!
//! The VM network (port group `vm-net`) is 198.18.2.0/24: guests' addresses come from it
//! ([`vm_addr`]) and the client namespace, attached to the switch's bridge like a user's
//! machine, has [`CLIENT_ADDR`] on it.
//!
//! and the directories `ROOT/datastores/{shared,local-a,local-b}` and `ROOT/{a,b}/` with each
//! agent's `agent.toml`, `agent.sock`, `agent.log` and `state/`. Interfaces are created directly
//! inside their namespaces, so their names never collide between labs running in parallel; only
//! the namespace names carry the lab's name.
//!
//! [`Lab::up`] builds a lab (and, given a `ferry` binary, starts one agent per host), [`Lab`]'s
//! `Drop` tears it down again; integration tests use [`LabOptions::for_test`] for a unique name.
//! `cargo xtask lab up` keeps a lab running with [`Lab::detach`] and records it in
//! `ROOT/lab.json` ([`LabState`]) so that [`down_recorded`] in a later process can remove it.
//!
//! Every external command goes through one bounded runner, and every wait has a deadline.
//! Only addresses from 198.18.0.0/15 are used, and only inside the lab's own namespaces.

use std::collections::BTreeSet;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Name of the lab `cargo xtask lab` manages unless told otherwise.
pub const DEFAULT_NAME: &str = "lab";
/// Root directory of the lab `cargo xtask lab` manages unless told otherwise.
pub const DEFAULT_ROOT: &str = "/run/ferry/lab";
/// File under the lab root that records a running lab (see [`LabState`]).
pub const STATE_FILE: &str = "lab.json";
/// Management interface in each host namespace.
/// The speed the lab's agents assume for the veth migration link (veth reports none): about
/// what two streams of a raw TCP blast reach on the lab machines (~34 Gbit/s).
pub const LAB_LINK_SPEED: &str = "40gbit";
pub const MGMT_IFACE: &str = "mgmt0";
/// Each lab agent serves Prometheus metrics on its management address at this port.
pub const METRICS_PORT: u16 = 9720;
/// Dedicated migration interface in each host namespace.
pub const MIGRATION_IFACE: &str = "mig0";
/// The VM-network bridge in each host namespace (the port group [`PORT_GROUP`]).
pub const VM_BRIDGE: &str = "vmbr0";
/// The port group name the agents' configs map to [`VM_BRIDGE`].
pub const PORT_GROUP: &str = "vm-net";
/// Each host's veth into the switch, enslaved to [`VM_BRIDGE`].
pub const UPLINK_IFACE: &str = "uplink0";
/// The bridge in the switch namespace; its ports are `a-up` and `b-up`.
pub const SWITCH_BRIDGE: &str = "br0";

/// Prefix length of both lab subnets.
const PREFIX_LEN: u8 = 24;
/// The VM network on port group [`PORT_GROUP`]: guests and the client live in 198.18.2.0/24
/// (198.18.0.0/24 is management, 198.18.1.0/24 migration).
pub const VM_NET_PREFIX_LEN: u8 = 24;
/// The client namespace's address on the VM network.
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 200);
/// The client's interface (in its namespace) and its port on the switch's bridge.
pub const CLIENT_IFACE: &str = "eth0";
pub const CLIENT_SWITCH_PORT: &str = "cl-up";

/// Address number `n` (1..=199) on the VM network, for a guest: 198.18.2.n. Numbers from 200
/// up are the lab's own (the client).
pub fn vm_addr(n: u8) -> Result<Ipv4Addr> {
    if !(1..200).contains(&n) {
        bail!(
            "guest address number {n} is outside 1..=199 (198.18.2.200 and up belong to the lab)"
        );
    }
    Ok(Ipv4Addr::new(198, 18, 2, n))
}
/// Longest lab name accepted (namespace names are `ferry-NAME-sw` and so on).
const MAX_NAME_LEN: usize = 32;
/// `sizeof(sockaddr_un.sun_path)` minus the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;
/// Bound for one `ip` invocation.
const IP_TIMEOUT: Duration = Duration::from_secs(10);
/// Default bound for [`Lab::exec`].
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(30);
/// How long interfaces may take to report operstate UP.
const LINK_UP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an agent may take until its socket accepts connections.
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(15);
/// Poll interval while waiting for an agent's socket.
const AGENT_READY_POLL: Duration = Duration::from_millis(20);
/// How long an agent may take to exit after SIGTERM before it gets SIGKILL.
const AGENT_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a process may take to disappear after SIGKILL.
const KILL_TIMEOUT: Duration = Duration::from_secs(2);
/// Lines of `agent.log` quoted in errors.
const LOG_TAIL_LINES: usize = 20;

/// One host of the lab, as a constant table: the topology is fixed.
struct HostSpec {
    name: &'static str,
    mgmt: Ipv4Addr,
    migration: Ipv4Addr,
}

const HOSTS: [HostSpec; 2] = [
    HostSpec {
        name: "a",
        mgmt: Ipv4Addr::new(198, 18, 0, 1),
        migration: Ipv4Addr::new(198, 18, 1, 1),
    },
    HostSpec {
        name: "b",
        mgmt: Ipv4Addr::new(198, 18, 0, 2),
        migration: Ipv4Addr::new(198, 18, 1, 2),
    },
];

// ---------------------------------------------------------------------------------------------
// Options and names
// ---------------------------------------------------------------------------------------------

/// What lab to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabOptions {
    /// Lab name: lowercase letters, digits and `-`, at most 32 characters. Namespaces are
    /// `ferry-NAME-a`, `ferry-NAME-b` and `ferry-NAME-sw`.
    pub name: String,
    /// Absolute directory for datastores, configs, sockets and logs. It must not exist yet or
    /// be empty; [`Lab::down`] removes it.
    pub root: PathBuf,
    /// The `ferry` binary to start one agent per host with; `None` builds the network only.
    pub ferry_bin: Option<PathBuf>,
}

static TEST_LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

impl LabOptions {
    /// A unique name and root (under [`std::env::temp_dir`]) for a test's lab, without agents.
    ///
    /// The name is up to four letters of the last `::` segment of `test`, the process id and a
    /// per-process counter (both base 36), e.g. `idle-k3f-0`: at most 15 characters for any
    /// Linux pid, so it also fits where interface names would. Names whose namespaces or root
    /// are still present (leftovers of a killed test run with a recycled pid) are skipped.
    /// Add a binary with [`LabOptions::with_ferry_bin`].
    pub fn for_test(test: &str) -> LabOptions {
        let pid = std::process::id();
        let mut candidate = None;
        // Bounded: the counter only grows, so a free name turns up unless the machine is
        // littered with a thousand leaked labs of this pid, in which case `up` reports it.
        for _ in 0..1000 {
            let n = TEST_LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
            let name = test_lab_name(test, pid, n);
            let root = std::env::temp_dir().join(format!("ferry-lab-{name}"));
            let taken = root.exists()
                || namespace_names(&name)
                    .iter()
                    .any(|ns| Path::new("/run/netns").join(ns).exists());
            let opts = LabOptions {
                name,
                root,
                ferry_bin: None,
            };
            if !taken {
                return opts;
            }
            candidate = Some(opts);
        }
        candidate.unwrap_or_else(|| LabOptions {
            name: test_lab_name(test, pid, 0),
            root: std::env::temp_dir().join("ferry-lab-unnamed"),
            ferry_bin: None,
        })
    }

    /// The same options with agents started from `bin`.
    pub fn with_ferry_bin(mut self, bin: impl Into<PathBuf>) -> LabOptions {
        self.ferry_bin = Some(bin.into());
        self
    }

    /// Checks the name and the root without touching the system.
    pub fn validate(&self) -> Result<()> {
        validate_name(&self.name)?;
        if !self.root.is_absolute() {
            bail!(
                "lab root {} is not an absolute path: pass an absolute --root",
                self.root.display()
            );
        }
        if self.root.parent().is_none() {
            bail!("lab root must not be `/`: pass a dedicated directory as --root");
        }
        for host in HOSTS {
            let socket = self.root.join(host.name).join("agent.sock");
            let len = socket.as_os_str().len();
            if len > MAX_SOCKET_PATH {
                bail!(
                    "agent socket path {} is {len} bytes, more than a unix socket address holds \
                     ({MAX_SOCKET_PATH}): choose a shorter --root",
                    socket.display()
                );
            }
        }
        Ok(())
    }
}

/// The test lab name: `PREFIX-PID-N`, prefix from `test`, pid and counter in base 36.
fn test_lab_name(test: &str, pid: u32, counter: u32) -> String {
    let last = test.rsplit("::").find(|s| !s.is_empty()).unwrap_or(test);
    let mut prefix: String = last
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .take(4)
        .collect();
    if prefix.is_empty() {
        prefix.push('t');
    }
    // Three base-36 digits keep the name within 15 characters; wrapping after 46,656 labs in
    // one process is harmless because `for_test` skips names still in use.
    let counter = counter % 36u32.pow(3);
    format!(
        "{prefix}-{}-{}",
        base36(u64::from(pid)),
        base36(u64::from(counter))
    )
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        // The index is < 36, so the cast cannot truncate.
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    out.into_iter().map(char::from).collect()
}

/// Checks a lab name: 1..=32 of `[a-z0-9-]`, starting and ending with a letter or digit.
fn validate_name(name: &str) -> Result<()> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let ok_ends = name
        .bytes()
        .next()
        .zip(name.bytes().last())
        .is_some_and(|(f, l)| f != b'-' && l != b'-');
    if name.is_empty() || name.len() > MAX_NAME_LEN || !ok_chars || !ok_ends {
        bail!(
            "invalid lab name {name:?}: use 1 to {MAX_NAME_LEN} lowercase letters, digits and \
             `-`, starting and ending with a letter or digit"
        );
    }
    Ok(())
}

fn host_netns(lab: &str, host: &str) -> String {
    format!("ferry-{lab}-{host}")
}

fn switch_netns_name(lab: &str) -> String {
    format!("ferry-{lab}-sw")
}

/// The namespace of the lab's client of the guests.
pub fn client_netns_name(lab: &str) -> String {
    format!("ferry-{lab}-cl")
}

/// All namespaces of a lab, hosts first, then the client, switch last.
fn namespace_names(lab: &str) -> Vec<String> {
    HOSTS
        .iter()
        .map(|h| host_netns(lab, h.name))
        .chain([client_netns_name(lab), switch_netns_name(lab)])
        .collect()
}

/// Whether `netns` is one of lab `lab`'s namespaces: `ferry-LAB-X` where `X` is one segment
/// without `-`. So lab `lab` never claims `ferry-lab-x-a`, which belongs to lab `lab-x`.
fn belongs_to_lab(netns: &str, lab: &str) -> bool {
    netns
        .strip_prefix("ferry-")
        .and_then(|rest| rest.strip_prefix(lab))
        .and_then(|rest| rest.strip_prefix('-'))
        .is_some_and(|seg| {
            !seg.is_empty()
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
}

/// The switch port (in the switch namespace) of a host's uplink.
fn switch_port(host: &str) -> String {
    format!("{host}-up")
}

// ---------------------------------------------------------------------------------------------
// The lab
// ---------------------------------------------------------------------------------------------

/// One host of a lab.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabHost {
    /// `"a"` or `"b"`.
    pub name: String,
    /// Its network namespace, `ferry-NAME-a`.
    pub netns: String,
    /// The agent's unix socket, `ROOT/a/agent.sock` (created by the agent).
    pub socket: PathBuf,
    /// The agent's config, `ROOT/a/agent.toml`.
    pub config: PathBuf,
    /// The agent's stdout and stderr, appended, `ROOT/a/agent.log`.
    pub log: PathBuf,
    /// The agent's state directory, `ROOT/a/state`.
    pub state_dir: PathBuf,
    /// Address on [`MGMT_IFACE`].
    pub mgmt_addr: Ipv4Addr,
    /// Address on [`MIGRATION_IFACE`].
    pub migration_addr: Ipv4Addr,
    /// The pid of the agent the lab started, until it is stopped (it may have exited on its
    /// own since: see [`Lab::agent_alive`]).
    pub agent_pid: Option<u32>,
}

impl LabHost {
    fn planned(lab: &str, root: &Path, spec: &HostSpec) -> LabHost {
        let dir = root.join(spec.name);
        LabHost {
            name: spec.name.to_owned(),
            netns: host_netns(lab, spec.name),
            socket: dir.join("agent.sock"),
            config: dir.join("agent.toml"),
            log: dir.join("agent.log"),
            state_dir: dir.join("state"),
            mgmt_addr: spec.mgmt,
            migration_addr: spec.migration,
            agent_pid: None,
        }
    }
}

/// An agent this process started: the child handle (so it is reaped) and its start time.
#[derive(Debug)]
struct Agent {
    child: Child,
    start_time: Option<u64>,
}

/// A running lab. Dropping it tears it down (best effort); [`Lab::down`] does the same and
/// reports failures; [`Lab::detach`] leaves it running.
#[derive(Debug)]
pub struct Lab {
    name: String,
    root: PathBuf,
    switch_netns: String,
    client_netns: String,
    hosts: Vec<LabHost>,
    /// Parallel to `hosts`.
    agents: Vec<Option<Agent>>,
    ferry_bin: Option<PathBuf>,
    ip: Ip,
    /// Namespaces this process created, in creation order; only these are deleted.
    created_netns: Vec<String>,
    /// Whether `root` is ours to remove.
    owns_root: bool,
    /// False once torn down or detached: `Drop` then does nothing.
    active: bool,
}

impl Lab {
    /// Builds the lab and, if `opts.ferry_bin` is set, starts and waits for both agents.
    ///
    /// Needs root and iproute2. Fails without touching anything if a namespace of this lab
    /// already exists or the root is a non-empty directory. On any later failure, everything
    /// created so far is removed before the error is returned.
    pub fn up(opts: LabOptions) -> Result<Lab> {
        opts.validate()?;
        require_root()?;
        let ip = Ip::find()?;
        let ferry_bin = match &opts.ferry_bin {
            Some(bin) => Some(resolve_ferry_bin(bin)?),
            None => None,
        };

        let existing = ip.netns_list()?;
        let ours: Vec<&String> = existing
            .iter()
            .filter(|ns| belongs_to_lab(ns, &opts.name))
            .collect();
        if !ours.is_empty() {
            bail!(
                "lab `{}` already exists (namespaces {}): it is running or was left behind by a \
                 killed process; remove it with `cargo xtask lab down --name {}` (plus `--root` \
                 of that lab to remove its directory too) or pick another name",
                opts.name,
                join_names(ours.iter().map(|s| s.as_str())),
                opts.name,
            );
        }
        if dir_has_entries(&opts.root)? {
            bail!(
                "lab root {} exists and is not empty: remove it (`cargo xtask lab down --root {}` \
                 if it holds an old lab) or choose another root",
                opts.root.display(),
                opts.root.display()
            );
        }

        let hosts: Vec<LabHost> = HOSTS
            .iter()
            .map(|spec| LabHost::planned(&opts.name, &opts.root, spec))
            .collect();
        let mut lab = Lab {
            switch_netns: switch_netns_name(&opts.name),
            client_netns: client_netns_name(&opts.name),
            agents: hosts.iter().map(|_| None).collect(),
            hosts,
            name: opts.name,
            root: opts.root,
            ferry_bin,
            ip,
            created_netns: Vec::new(),
            owns_root: false,
            active: true,
        };
        if let Err(err) = lab.build() {
            let context = match lab.teardown() {
                Ok(()) => format!(
                    "cannot bring up lab `{}` (what it had created has been removed again)",
                    lab.name
                ),
                Err(cleanup) => format!(
                    "cannot bring up lab `{}`, and removing what it had created failed too \
                     ({cleanup:#}): run `cargo xtask lab down --name {} --root {}`",
                    lab.name,
                    lab.name,
                    lab.root.display()
                ),
            };
            return Err(err.context(context));
        }
        Ok(lab)
    }

    /// The host named `name` (`"a"` or `"b"`).
    pub fn host(&self, name: &str) -> Option<&LabHost> {
        self.hosts.iter().find(|h| h.name == name)
    }

    /// Both hosts, `a` first.
    pub fn hosts(&self) -> &[LabHost] {
        &self.hosts
    }

    /// The lab's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The lab's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The switch namespace, holding bridge [`SWITCH_BRIDGE`] with ports `a-up` and `b-up`.
    pub fn switch_netns(&self) -> &str {
        &self.switch_netns
    }

    /// The client namespace: interface [`CLIENT_IFACE`] with [`CLIENT_ADDR`] on the VM network,
    /// attached to the switch's bridge (port [`CLIENT_SWITCH_PORT`]).
    pub fn client_netns(&self) -> &str {
        &self.client_netns
    }

    /// The datastore directory both hosts share.
    pub fn shared_datastore(&self) -> PathBuf {
        self.root.join("datastores").join("shared")
    }

    /// The local datastore directory of host `host`, if there is such a host.
    pub fn local_datastore(&self, host: &str) -> Option<PathBuf> {
        self.host(host)
            .map(|h| local_datastore(&self.root, &h.name))
    }

    /// The binary agents are started from, if any.
    pub fn ferry_bin(&self) -> Option<&Path> {
        self.ferry_bin.as_deref()
    }

    /// Runs `args` inside the namespace of host `host` (`"a"`, `"b"`, `"cl"` for the client, or `"sw"` for the
    /// switch) and returns its stdout; fails on a non-zero exit (quoting stderr) or after
    /// [`EXEC_TIMEOUT`], when the command's process group is killed.
    pub fn exec(&self, host: &str, args: &[&str]) -> Result<String> {
        self.exec_timeout(host, args, EXEC_TIMEOUT)
    }

    /// [`Lab::exec`] with an explicit bound.
    pub fn exec_timeout(&self, host: &str, args: &[&str], timeout: Duration) -> Result<String> {
        let netns = self.netns_of(host)?;
        if args.is_empty() {
            bail!("no command given to run in host {host}'s namespace {netns}");
        }
        require_program(args[0])?;
        let mut cmd = Command::new(&self.ip.bin);
        cmd.args(["netns", "exec", netns]).args(args);
        let out = run_bounded(cmd, timeout)
            .with_context(|| format!("running `{}` in namespace {netns}", args.join(" ")))?;
        if !out.status.success() {
            bail!(
                "`{}` in namespace {netns} failed ({}){}",
                args.join(" "),
                out.status,
                quote_output(&out.stderr, &out.stdout)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Stops host `host`'s agent: SIGTERM, up to 5 s to exit, then SIGKILL. By pid only.
    /// Does nothing if no agent runs there.
    pub fn stop_agent(&mut self, host: &str) -> Result<()> {
        let idx = self.index_of(host)?;
        let result = self.stop_agent_at(idx);
        self.save_state()?;
        result
    }

    /// Whether host `host`'s agent is running: `false` if none was started, it was stopped,
    /// or it exited on its own.
    pub fn agent_alive(&mut self, host: &str) -> Result<bool> {
        let idx = self.index_of(host)?;
        Ok(self.agents[idx].is_some() && self.agent_exit_status(host)?.is_none())
    }

    /// The exit status of host `host`'s agent if it exited on its own; `None` while it runs,
    /// or if none was started or it was stopped.
    pub fn agent_exit_status(&mut self, host: &str) -> Result<Option<ExitStatus>> {
        let idx = self.index_of(host)?;
        let Some(agent) = self.agents[idx].as_mut() else {
            return Ok(None);
        };
        agent
            .child
            .try_wait()
            .with_context(|| format!("cannot check whether the agent of host {host} runs"))
    }

    /// Starts host `host`'s agent from the lab's `ferry` binary and waits (up to 15 s) until
    /// its socket accepts connections. Fails if one already runs there or the lab has no binary.
    pub fn start_agent(&mut self, host: &str) -> Result<()> {
        let idx = self.index_of(host)?;
        if let Some(agent) = &mut self.agents[idx] {
            // A killed agent whose last threads are still leaving the kernel is a zombie that
            // cannot be reaped yet: wait for it (it is dying, not running).
            let pid = agent.child.id();
            let dying = fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
                s.lines()
                    .any(|l| l.starts_with("State:") && l.contains("zombie"))
            });
            if dying {
                let _ = agent.child.wait();
            }
            if agent.child.try_wait().ok().flatten().is_none() {
                bail!(
                    "the agent of host {host} is already running (pid {}): stop it first",
                    agent.child.id()
                );
            }
            // It exited on its own; forget it.
            self.agents[idx] = None;
            self.hosts[idx].agent_pid = None;
        }
        self.spawn_agent(idx)?;
        let deadline = Instant::now() + AGENT_READY_TIMEOUT;
        if let Err(err) = self.wait_agent_ready(idx, deadline) {
            let _ = self.stop_agent_at(idx);
            let _ = self.save_state();
            return Err(err);
        }
        self.save_state()
    }

    /// Stops the agents (and any other process still inside the lab's namespaces, such as a
    /// daemon started through [`Lab::exec`]), deletes the namespaces and removes the root
    /// directory, reporting every step that failed (it carries on past failures).
    pub fn down(mut self) -> Result<()> {
        self.teardown()
    }

    /// Leaves the lab running (agents keep running in their own sessions) and returns what
    /// [`down_recorded`] needs to remove it later. Agents that exit are reaped by init, not by
    /// this process.
    pub fn detach(mut self) -> LabState {
        self.active = false;
        self.state()
    }

    /// The record of this lab, as written to `ROOT/lab.json`.
    pub fn state(&self) -> LabState {
        LabState {
            name: self.name.clone(),
            root: self.root.clone(),
            switch_netns: self.switch_netns.clone(),
            namespaces: namespace_names(&self.name),
            ferry_bin: self.ferry_bin.clone(),
            hosts: self
                .hosts
                .iter()
                .zip(&self.agents)
                .map(|(h, agent)| HostRecord {
                    name: h.name.clone(),
                    netns: h.netns.clone(),
                    socket: h.socket.clone(),
                    config: h.config.clone(),
                    log: h.log.clone(),
                    state_dir: h.state_dir.clone(),
                    mgmt_addr: h.mgmt_addr,
                    migration_addr: h.migration_addr,
                    agent_pid: agent.as_ref().map(|a| a.child.id()),
                    agent_start_time: agent.as_ref().and_then(|a| a.start_time),
                })
                .collect(),
        }
    }

    fn index_of(&self, host: &str) -> Result<usize> {
        self.hosts
            .iter()
            .position(|h| h.name == host)
            .ok_or_else(|| {
                anyhow!(
                    "lab `{}` has no host {host:?}: use \"a\" or \"b\"",
                    self.name
                )
            })
    }

    fn netns_of(&self, host: &str) -> Result<&str> {
        if host == "sw" || host == "switch" {
            return Ok(&self.switch_netns);
        }
        if host == "cl" || host == "client" {
            return Ok(&self.client_netns);
        }
        let idx = self.index_of(host).map_err(|_| {
            anyhow!(
                "lab `{}` has no host {host:?}: use \"a\", \"b\", \"sw\" or \"cl\"",
                self.name
            )
        })?;
        Ok(&self.hosts[idx].netns)
    }

    /// Everything `up` does after the checks; on error, `teardown` removes the pieces.
    fn build(&mut self) -> Result<()> {
        self.make_dirs()?;
        self.make_namespaces()?;
        self.make_links()?;
        self.wait_links_up()?;
        self.write_configs()?;
        if self.ferry_bin.is_some() {
            for idx in 0..self.hosts.len() {
                self.spawn_agent(idx)?;
            }
            let deadline = Instant::now() + AGENT_READY_TIMEOUT;
            for idx in 0..self.hosts.len() {
                self.wait_agent_ready(idx, deadline)?;
            }
        }
        self.save_state()
    }

    fn make_dirs(&mut self) -> Result<()> {
        fs::create_dir_all(&self.root).with_context(|| {
            format!(
                "cannot create lab root {}: check permissions or choose another --root",
                self.root.display()
            )
        })?;
        self.owns_root = true;
        let mut dirs = vec![self.shared_datastore()];
        for h in &self.hosts {
            dirs.push(local_datastore(&self.root, &h.name));
            dirs.push(h.state_dir.clone());
        }
        for dir in dirs {
            fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create directory {}", dir.display()))?;
        }
        Ok(())
    }

    fn make_namespaces(&mut self) -> Result<()> {
        for ns in namespace_names(&self.name) {
            {
                let _lock = NetnsAddLock::acquire()?;
                self.ip.run(&["netns", "add", &ns]).with_context(|| {
                    format!("cannot create network namespace {ns} (is this kernel built with network namespaces?)")
                })?;
            }
            self.created_netns.push(ns.clone());
            self.ip.run(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    fn make_links(&self) -> Result<()> {
        let (a, b) = (&self.hosts[0], &self.hosts[1]);
        let sw = self.switch_netns.as_str();
        let ip = &self.ip;
        for iface in [MGMT_IFACE, MIGRATION_IFACE] {
            ip.run(&[
                "-n", &a.netns, "link", "add", iface, "type", "veth", "peer", "name", iface,
                "netns", &b.netns,
            ])
            .context("cannot create a veth pair: is the `veth` kernel module available?")?;
        }
        ip.run(&["-n", sw, "link", "add", SWITCH_BRIDGE, "type", "bridge"])
            .context("cannot create a bridge: is the `bridge` kernel module available?")?;
        for h in &self.hosts {
            let port = switch_port(&h.name);
            ip.run(&["-n", &h.netns, "link", "add", VM_BRIDGE, "type", "bridge"])?;
            ip.run(&[
                "-n",
                &h.netns,
                "link",
                "add",
                UPLINK_IFACE,
                "type",
                "veth",
                "peer",
                "name",
                &port,
                "netns",
                sw,
            ])?;
            ip.run(&[
                "-n",
                &h.netns,
                "link",
                "set",
                UPLINK_IFACE,
                "master",
                VM_BRIDGE,
            ])?;
            ip.run(&["-n", sw, "link", "set", &port, "master", SWITCH_BRIDGE])?;
            for (iface, addr) in [
                (MGMT_IFACE, h.mgmt_addr),
                (MIGRATION_IFACE, h.migration_addr),
            ] {
                let cidr = format!("{addr}/{PREFIX_LEN}");
                ip.run(&["-n", &h.netns, "addr", "add", &cidr, "dev", iface])?;
            }
            for iface in [MGMT_IFACE, MIGRATION_IFACE, UPLINK_IFACE, VM_BRIDGE] {
                ip.run(&["-n", &h.netns, "link", "set", iface, "up"])?;
            }
            ip.run(&["-n", sw, "link", "set", &port, "up"])?;
        }
        // The client of the guests: a machine on the VM network, plugged into the switch.
        let cl = self.client_netns.as_str();
        ip.run(&[
            "-n",
            cl,
            "link",
            "add",
            CLIENT_IFACE,
            "type",
            "veth",
            "peer",
            "name",
            CLIENT_SWITCH_PORT,
            "netns",
            sw,
        ])?;
        ip.run(&[
            "-n",
            sw,
            "link",
            "set",
            CLIENT_SWITCH_PORT,
            "master",
            SWITCH_BRIDGE,
        ])?;
        let cidr = format!("{CLIENT_ADDR}/{VM_NET_PREFIX_LEN}");
        ip.run(&["-n", cl, "addr", "add", &cidr, "dev", CLIENT_IFACE])?;
        ip.run(&["-n", cl, "link", "set", CLIENT_IFACE, "up"])?;
        ip.run(&["-n", sw, "link", "set", CLIENT_SWITCH_PORT, "up"])?;
        ip.run(&["-n", sw, "link", "set", SWITCH_BRIDGE, "up"])?;
        Ok(())
    }

    /// Waits until every lab interface reports operstate UP, so that callers can send traffic
    /// as soon as `up` returns.
    fn wait_links_up(&self) -> Result<()> {
        let mut want: Vec<(&str, Vec<String>)> = self
            .hosts
            .iter()
            .map(|h| {
                let ifaces = [MGMT_IFACE, MIGRATION_IFACE, UPLINK_IFACE, VM_BRIDGE];
                (h.netns.as_str(), ifaces.map(str::to_owned).to_vec())
            })
            .collect();
        let mut sw_ifaces: Vec<String> = self.hosts.iter().map(|h| switch_port(&h.name)).collect();
        sw_ifaces.push(SWITCH_BRIDGE.to_owned());
        sw_ifaces.push(CLIENT_SWITCH_PORT.to_owned());
        want.push((self.switch_netns.as_str(), sw_ifaces));
        want.push((self.client_netns.as_str(), vec![CLIENT_IFACE.to_owned()]));

        let deadline = Instant::now() + LINK_UP_TIMEOUT;
        loop {
            let mut down = Vec::new();
            for (ns, ifaces) in &want {
                let json = self.ip.run(&["-n", ns, "-j", "link", "show"])?;
                let states = parse_operstates(&json)
                    .with_context(|| format!("cannot parse `ip -j link show` in {ns}"))?;
                for iface in ifaces {
                    let up = states
                        .iter()
                        .any(|(name, state)| name == iface && state == "UP");
                    if !up {
                        down.push(format!("{ns}/{iface}"));
                    }
                }
            }
            if down.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "interfaces did not come up within {LINK_UP_TIMEOUT:?}: {}",
                    down.join(", ")
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The cluster key both lab agents share (created once per lab, mode 0600).
    pub fn cluster_key(&self) -> PathBuf {
        self.root.join("cluster.key")
    }

    fn write_configs(&self) -> Result<()> {
        let key = self.cluster_key();
        if !key.exists() {
            let mut bytes = [0u8; 32];
            fs::File::open("/dev/urandom")
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
                .context("cannot read /dev/urandom for the lab's cluster key")?;
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&key)
                .with_context(|| format!("cannot create {}", key.display()))?;
            std::io::Write::write_all(&mut f, hex.as_bytes())?;
        }
        for h in &self.hosts {
            let peers: Vec<(&str, Ipv4Addr)> = self
                .hosts
                .iter()
                .filter(|p| p.name != h.name)
                .map(|p| (p.name.as_str(), p.mgmt_addr))
                .collect();
            let text = render_agent_config(
                h,
                &self.shared_datastore(),
                &local_datastore(&self.root, &h.name),
                &peers,
            )? + &format!(
                "\n[cluster]\nkey_file = {}\nownership_datastore = \"shared\"\n\n\
                 [metrics]\naddress = \"{}:{METRICS_PORT}\"\n\n\
                 # The lab is a test bench: it accepts fault injection.\n[debug]\nfaults = true\n",
                toml_path(&key)?,
                h.mgmt_addr
            );
            fs::write(&h.config, text)
                .with_context(|| format!("cannot write agent config {}", h.config.display()))?;
        }
        Ok(())
    }

    /// Starts host `idx`'s agent in its own session; does not wait for it.
    fn spawn_agent(&mut self, idx: usize) -> Result<()> {
        let Some(bin) = self.ferry_bin.clone() else {
            bail!(
                "lab `{}` was brought up without a ferry binary, so it cannot start agents: \
                 set LabOptions::ferry_bin (or drop --no-agents)",
                self.name
            );
        };
        let host = &self.hosts[idx];
        match fs::remove_file(&host.socket) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("cannot remove stale agent socket {}", host.socket.display())
                })
            }
        }
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&host.log)
            .with_context(|| format!("cannot open agent log {}", host.log.display()))?;
        let stderr = log
            .try_clone()
            .with_context(|| format!("cannot duplicate the handle of {}", host.log.display()))?;
        let _ = writeln!(
            log,
            "=== xtask lab: starting `{} netns exec {} {} agent --config {}` at unix time {} ===",
            self.ip.bin.display(),
            host.netns,
            bin.display(),
            host.config.display(),
            unix_time()
        );

        let mut cmd = Command::new(&self.ip.bin);
        cmd.args(["netns", "exec", &host.netns])
            .arg(&bin)
            .arg("agent")
            .arg("--config")
            .arg(&host.config)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr);
        // SAFETY: the closure runs in the forked child before exec and only calls setsid(2),
        // which is async-signal-safe and touches no memory shared with the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| {
            format!(
                "cannot start the agent of host {} from {}",
                host.name,
                bin.display()
            )
        })?;
        let pid = child.id();
        self.hosts[idx].agent_pid = Some(pid);
        self.agents[idx] = Some(Agent {
            child,
            start_time: proc_start_time(pid),
        });
        Ok(())
    }

    /// Polls every 20 ms until host `idx`'s socket accepts a connection while its agent is
    /// alive; fails with the log's tail if the agent exits or `deadline` passes.
    fn wait_agent_ready(&mut self, idx: usize, deadline: Instant) -> Result<()> {
        let host = &self.hosts[idx];
        let Some(agent) = self.agents[idx].as_mut() else {
            bail!("no agent was started on host {}", host.name);
        };
        loop {
            match agent.child.try_wait() {
                Ok(Some(status)) => bail!(
                    "the agent of host {} (pid {}) exited with {status} before its socket {} \
                     accepted connections{}",
                    host.name,
                    agent.child.id(),
                    host.socket.display(),
                    log_tail_note(&host.log)
                ),
                Ok(None) => {}
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("cannot check whether the agent of host {} runs", host.name)
                    })
                }
            }
            if host.socket.exists() && UnixStream::connect(&host.socket).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the agent of host {} (pid {}) did not accept connections on {} within \
                     {AGENT_READY_TIMEOUT:?}{}",
                    host.name,
                    agent.child.id(),
                    host.socket.display(),
                    log_tail_note(&host.log)
                );
            }
            thread::sleep(AGENT_READY_POLL);
        }
    }

    fn stop_agent_at(&mut self, idx: usize) -> Result<()> {
        self.stop_agents(&[idx])
    }

    /// Stops the agents of hosts `indices` together (see [`stop_processes`]).
    fn stop_agents(&mut self, indices: &[usize]) -> Result<()> {
        let mut stopping = Vec::new();
        for &idx in indices {
            if let Some(agent) = self.agents[idx].take() {
                self.hosts[idx].agent_pid = None;
                stopping.push((idx, agent.child));
            }
        }
        let (which, mut children): (Vec<usize>, Vec<Child>) = stopping.into_iter().unzip();
        let errors = stop_children(&mut children)
            .into_iter()
            .zip(which)
            .filter_map(|(result, idx)| {
                result.err().map(|e| {
                    e.context(format!(
                        "cannot stop the agent of host {}",
                        self.hosts[idx].name
                    ))
                })
            })
            .collect();
        combine_errors(errors)
    }

    fn save_state(&self) -> Result<()> {
        if self.root.exists() {
            self.state().save()?;
        }
        Ok(())
    }

    /// Removes what this lab created, carrying on past failures; idempotent.
    fn teardown(&mut self) -> Result<()> {
        let mut errors = Vec::new();
        let all: Vec<usize> = (0..self.agents.len()).collect();
        if let Err(e) = self.stop_agents(&all) {
            errors.push(e);
        }
        if let Err(e) = stop_processes_in(&self.created_netns) {
            errors.push(e);
        }
        while let Some(ns) = self.created_netns.pop() {
            if let Err(e) = self.ip.delete_netns(&ns) {
                errors.push(e);
            }
        }
        if self.owns_root {
            match fs::remove_dir_all(&self.root) {
                Ok(()) => self.owns_root = false,
                Err(e) if e.kind() == io::ErrorKind::NotFound => self.owns_root = false,
                Err(e) => errors.push(
                    anyhow!(e).context(format!("cannot remove lab root {}", self.root.display())),
                ),
            }
        }
        self.active = false;
        combine_errors(errors)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.active {
            return;
        }
        if let Err(e) = self.teardown() {
            // Never panic in drop: ignore a failing stderr.
            let _ = writeln!(
                io::stderr(),
                "warning: tearing down lab `{}` failed: {e:#}; run `cargo xtask lab down \
                 --name {} --root {}`",
                self.name,
                self.name,
                self.root.display()
            );
        }
    }
}

fn local_datastore(root: &Path, host: &str) -> PathBuf {
    root.join("datastores").join(format!("local-{host}"))
}

// ---------------------------------------------------------------------------------------------
// Agent config
// ---------------------------------------------------------------------------------------------

/// Renders `ROOT/<host>/agent.toml` in the exact format the agent accepts.
fn render_agent_config(
    host: &LabHost,
    shared: &Path,
    local: &Path,
    peers: &[(&str, Ipv4Addr)],
) -> Result<String> {
    let mut peer_lines = String::new();
    for (name, addr) in peers {
        peer_lines.push_str(&format!("{} = \"{addr}\"\n", toml_key(name)?));
    }
    Ok(format!(
        "[agent]\n\
         name = {name}\n\
         socket = {socket}\n\
         state_dir = {state_dir}\n\
         \n\
         [management]\n\
         address = \"{mgmt}\"\n\
         \n\
         [migration]\n\
         interface = \"{MIGRATION_IFACE}\"\n\
         address = \"{migration}\"\n\
         link_speed = \"{LAB_LINK_SPEED}\"\n\
         \n\
         [datastores]\n\
         shared = {shared}\n\
         local = {local}\n\
         \n\
         [port_groups]\n\
         {PORT_GROUP} = \"{VM_BRIDGE}\"\n\
         \n\
         [peers]\n\
         {peer_lines}",
        name = toml_string(&host.name),
        socket = toml_path(&host.socket)?,
        state_dir = toml_path(&host.state_dir)?,
        mgmt = host.mgmt_addr,
        migration = host.migration_addr,
        shared = toml_path(shared)?,
        local = toml_path(local)?,
    ))
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn toml_path(p: &Path) -> Result<String> {
    let s = p.to_str().ok_or_else(|| {
        anyhow!(
            "path {} is not valid UTF-8, which the agent config cannot hold: choose another --root",
            p.display()
        )
    })?;
    Ok(toml_string(s))
}

/// A bare TOML key (the host names are fixed, so this only guards against misuse).
fn toml_key(k: &str) -> Result<&str> {
    if !k.is_empty()
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        Ok(k)
    } else {
        bail!("{k:?} cannot be a bare TOML key")
    }
}

// ---------------------------------------------------------------------------------------------
// The ferry binary
// ---------------------------------------------------------------------------------------------

/// The `ferry` binary: `$FERRY_BIN` if set, else `ferry` in the cargo profile directory of the
/// current executable (`target/<profile>/`, also from test binaries in `target/<profile>/deps/`).
pub fn ferry_bin() -> Result<PathBuf> {
    if let Some(value) = std::env::var_os("FERRY_BIN").filter(|v| !v.is_empty()) {
        let bin = PathBuf::from(value);
        if !bin.is_file() {
            bail!(
                "FERRY_BIN={} is not a file: build the agent with `cargo build -p ferry-cli` and point \
                 FERRY_BIN at target/<profile>/ferry, or unset FERRY_BIN",
                bin.display()
            );
        }
        return Ok(bin);
    }
    let exe = std::env::current_exe().context(
        "cannot locate the current executable to find `ferry` next to it: set FERRY_BIN",
    )?;
    let dir = profile_dir(&exe).ok_or_else(|| {
        anyhow!(
            "cannot tell the cargo profile directory of {}: set FERRY_BIN",
            exe.display()
        )
    })?;
    let bin = dir.join("ferry");
    if !bin.is_file() {
        bail!(
            "the ferry binary {} does not exist: run `cargo build -p ferry-cli` (same profile and \
             CARGO_TARGET_DIR as this build) or set FERRY_BIN",
            bin.display()
        );
    }
    Ok(bin)
}

/// `target/<profile>` for an executable in it or in its `deps/` or `examples/`.
fn profile_dir(exe: &Path) -> Option<PathBuf> {
    let dir = exe.parent()?;
    match dir.file_name().and_then(|n| n.to_str()) {
        Some("deps" | "examples") => dir.parent().map(Path::to_path_buf),
        _ => Some(dir.to_path_buf()),
    }
}

fn resolve_ferry_bin(bin: &Path) -> Result<PathBuf> {
    let abs = fs::canonicalize(bin).with_context(|| {
        format!(
            "ferry binary {} not found: run `cargo build -p ferry-cli` or pass the right path",
            bin.display()
        )
    })?;
    if !abs.is_file() {
        bail!(
            "ferry binary {} is not a file: pass the path of the built `ferry` executable",
            abs.display()
        );
    }
    Ok(abs)
}

// ---------------------------------------------------------------------------------------------
// The record of a detached lab, and cleanup / status from it
// ---------------------------------------------------------------------------------------------

/// What `ROOT/lab.json` records about a lab, enough to inspect and remove it from another
/// process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabState {
    pub name: String,
    pub root: PathBuf,
    pub switch_netns: String,
    /// All the lab's namespaces (hosts, then switch).
    pub namespaces: Vec<String>,
    pub ferry_bin: Option<PathBuf>,
    pub hosts: Vec<HostRecord>,
}

/// One host in a [`LabState`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub name: String,
    pub netns: String,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    pub state_dir: PathBuf,
    pub mgmt_addr: Ipv4Addr,
    pub migration_addr: Ipv4Addr,
    pub agent_pid: Option<u32>,
    /// The agent's start time (clock ticks since boot, `/proc/PID/stat` field 22), so that a
    /// recycled pid is never signalled.
    pub agent_start_time: Option<u64>,
}

impl LabState {
    /// Where the record of the lab at `root` lives.
    pub fn path(root: &Path) -> PathBuf {
        root.join(STATE_FILE)
    }

    /// What a lab named `name` at `root` would look like, with no agents: used where no
    /// record exists.
    pub fn expected(name: &str, root: &Path) -> LabState {
        LabState {
            name: name.to_owned(),
            root: root.to_path_buf(),
            switch_netns: switch_netns_name(name),
            namespaces: namespace_names(name),
            ferry_bin: None,
            hosts: HOSTS
                .iter()
                .map(|spec| {
                    let h = LabHost::planned(name, root, spec);
                    HostRecord {
                        name: h.name,
                        netns: h.netns,
                        socket: h.socket,
                        config: h.config,
                        log: h.log,
                        state_dir: h.state_dir,
                        mgmt_addr: h.mgmt_addr,
                        migration_addr: h.migration_addr,
                        agent_pid: None,
                        agent_start_time: None,
                    }
                })
                .collect(),
        }
    }

    /// Reads `ROOT/lab.json`; `Ok(None)` if there is none.
    pub fn load(root: &Path) -> Result<Option<LabState>> {
        let path = LabState::path(root);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read lab record {}", path.display()))
            }
        };
        let state = serde_json::from_str(&text)
            .with_context(|| format!("lab record {} is not valid", path.display()))?;
        Ok(Some(state))
    }

    /// Writes `ROOT/lab.json` atomically (temporary file, then rename).
    pub fn save(&self) -> Result<()> {
        let path = LabState::path(&self.root);
        let tmp = self.root.join(format!("{STATE_FILE}.tmp"));
        let text = serde_json::to_string_pretty(self).context("cannot serialize the lab record")?;
        fs::write(&tmp, text + "\n")
            .with_context(|| format!("cannot write lab record {}", tmp.display()))?;
        fs::rename(&tmp, &path)
            .with_context(|| format!("cannot move lab record into place at {}", path.display()))
    }
}

/// What [`down_recorded`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DownReport {
    pub name: String,
    pub root: PathBuf,
    /// `(host, pid)` of each agent stopped.
    pub stopped_agents: Vec<(String, u32)>,
    /// `(namespace, pid)` of other processes that were still running inside the lab.
    pub stopped_processes: Vec<(String, u32)>,
    pub deleted_namespaces: Vec<String>,
    pub removed_root: bool,
    /// Things worth knowing that were not errors (a recycled pid, a root left alone).
    pub notes: Vec<String>,
}

impl DownReport {
    /// Whether there was nothing to remove.
    pub fn nothing_found(&self) -> bool {
        self.stopped_agents.is_empty()
            && self.stopped_processes.is_empty()
            && self.deleted_namespaces.is_empty()
            && !self.removed_root
    }
}

/// Removes the lab recorded at `root` (or, without a record, the lab named `name`, default
/// [`DEFAULT_NAME`]): stops its agents by recorded pid (checking the pid's start time first),
/// stops any other process still inside its namespaces, deletes the namespaces (recorded ones
/// and any `ferry-NAME-X` still listed by `ip netns list`) and removes `root` if it holds a
/// record or looks like a lab directory.
/// Carries on past failures and reports them all at the end.
pub fn down_recorded(name: Option<&str>, root: &Path) -> Result<DownReport> {
    require_root()?;
    let ip = Ip::find()?;
    let Resolved {
        recorded,
        state,
        warning,
    } = resolve_state(name, root)?;
    let mut report = DownReport {
        name: state.name.clone(),
        root: root.to_path_buf(),
        notes: warning.into_iter().collect(),
        ..DownReport::default()
    };
    let mut errors = Vec::new();

    // Only agents that are still the recorded process are signalled.
    let (running, gone): (Vec<&HostRecord>, Vec<&HostRecord>) = state
        .hosts
        .iter()
        .filter(|h| h.agent_pid.is_some())
        .partition(|h| {
            h.agent_pid
                .is_some_and(|pid| same_process_alive(pid, h.agent_start_time, &h.config))
        });
    for h in gone {
        report.notes.push(format!(
            "the agent of host {} (pid {}) was no longer running",
            h.name,
            h.agent_pid.unwrap_or_default()
        ));
    }
    let pids: Vec<u32> = running.iter().filter_map(|h| h.agent_pid).collect();
    let results = stop_processes(&pids, |i| {
        !same_process_alive(pids[i], running[i].agent_start_time, &running[i].config)
    });
    for ((h, pid), result) in running.iter().zip(&pids).zip(results) {
        match result {
            Ok(()) => report.stopped_agents.push((h.name.clone(), *pid)),
            Err(e) => errors.push(e.context(format!("cannot stop the agent of host {}", h.name))),
        }
    }

    match ip.netns_list() {
        Ok(existing) => {
            let wanted: BTreeSet<&str> = state.namespaces.iter().map(String::as_str).collect();
            let ours: Vec<String> = existing
                .into_iter()
                .filter(|ns| wanted.contains(ns.as_str()) || belongs_to_lab(ns, &state.name))
                .collect();
            match stop_processes_in(&ours) {
                Ok(strays) => report
                    .stopped_processes
                    .extend(strays.into_iter().map(|p| (p.netns, p.pid))),
                Err(e) => errors.push(e),
            }
            for ns in &ours {
                match ip.delete_netns(ns) {
                    Ok(()) => report.deleted_namespaces.push(ns.clone()),
                    Err(e) => errors.push(e),
                }
            }
        }
        Err(e) => errors.push(e),
    }

    if root.exists() {
        if recorded || looks_like_lab_root(root) {
            match fs::remove_dir_all(root) {
                Ok(()) => report.removed_root = true,
                Err(e) => errors
                    .push(anyhow!(e).context(format!("cannot remove lab root {}", root.display()))),
            }
        } else {
            report.notes.push(format!(
                "left {} alone: it holds no {STATE_FILE} and does not look like a lab directory",
                root.display()
            ));
        }
    }
    combine_errors(errors).map(|()| report)
}

/// The record at `root` (if any) and the state to act on: the record, or the expected layout.
/// The lab to act on at `root`: its record if there is a readable one, else the expected
/// layout of lab `name` (default [`DEFAULT_NAME`]).
struct Resolved {
    /// Whether a valid `lab.json` was found.
    recorded: bool,
    state: LabState,
    /// Why an existing record was not used.
    warning: Option<String>,
}

fn resolve_state(name: Option<&str>, root: &Path) -> Result<Resolved> {
    if let Some(name) = name {
        validate_name(name)?;
    }
    let expected = || LabState::expected(name.unwrap_or(DEFAULT_NAME), root);
    match LabState::load(root) {
        Ok(Some(rec)) => match name {
            Some(name) if rec.name != name => bail!(
                "{} records lab `{}`, not `{name}`: pass --name {} or another --root",
                LabState::path(root).display(),
                rec.name,
                rec.name
            ),
            _ => Ok(Resolved {
                recorded: true,
                state: rec,
                warning: None,
            }),
        },
        Ok(None) => Ok(Resolved {
            recorded: false,
            state: expected(),
            warning: None,
        }),
        // A damaged record must not block cleanup: fall back to the names.
        Err(e) => Ok(Resolved {
            recorded: false,
            state: expected(),
            warning: Some(format!("{e:#}; using the lab's expected layout instead")),
        }),
    }
}

/// Whether `root` only holds entries a lab creates.
fn looks_like_lab_root(root: &Path) -> bool {
    let allowed = ["a", "b", "datastores", STATE_FILE, "lab.json.tmp"];
    match fs::read_dir(root) {
        Ok(entries) => entries.into_iter().all(|e| {
            e.ok()
                .and_then(|e| e.file_name().to_str().map(|n| allowed.contains(&n)))
                .unwrap_or(false)
        }),
        Err(_) => false,
    }
}

/// The state of a lab, for `cargo xtask lab status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LabStatus {
    pub name: String,
    pub root: PathBuf,
    /// Whether `ROOT/lab.json` exists and is valid.
    pub recorded: bool,
    /// Why an existing `lab.json` could not be used.
    pub warning: Option<String>,
    /// Whether the root directory exists and has entries.
    pub root_in_use: bool,
    pub switch_netns: NetnsStatus,
    /// The client namespace on the VM network, with its address.
    pub client_netns: NetnsStatus,
    pub client_addr: Ipv4Addr,
    pub hosts: Vec<HostStatus>,
    /// Namespaces named like this lab's that are not part of its layout.
    pub stray_namespaces: Vec<String>,
}

/// Whether one namespace exists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetnsStatus {
    pub name: String,
    pub exists: bool,
}

/// The state of one host of a lab.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostStatus {
    pub name: String,
    pub netns: NetnsStatus,
    pub mgmt_addr: Ipv4Addr,
    pub migration_addr: Ipv4Addr,
    pub agent_pid: Option<u32>,
    pub agent_alive: bool,
    pub socket: PathBuf,
    pub socket_accepts: bool,
    pub log: PathBuf,
}

impl LabStatus {
    /// Whether anything of the lab is present (record, root contents or a namespace).
    pub fn exists(&self) -> bool {
        self.recorded
            || self.root_in_use
            || self.switch_netns.exists
            || self.client_netns.exists
            || self.hosts.iter().any(|h| h.netns.exists)
            || !self.stray_namespaces.is_empty()
    }
}

impl fmt::Display for LabStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let yes_no = |b: bool| if b { "exists" } else { "missing" };
        writeln!(
            f,
            "lab `{}` at {} ({})",
            self.name,
            self.root.display(),
            if self.recorded {
                "recorded in lab.json"
            } else if self.exists() {
                "no lab.json record"
            } else {
                "not running"
            }
        )?;
        if let Some(warning) = &self.warning {
            writeln!(f, "  warning: {warning}")?;
        }
        for h in &self.hosts {
            writeln!(
                f,
                "  host {}: namespace {} {}; mgmt {} ({MGMT_IFACE}), migration {} ({MIGRATION_IFACE})",
                h.name,
                h.netns.name,
                yes_no(h.netns.exists),
                h.mgmt_addr,
                h.migration_addr
            )?;
            let agent = match h.agent_pid {
                Some(pid) if h.agent_alive => format!("pid {pid} alive"),
                Some(pid) => format!("pid {pid} not running"),
                None if self.recorded => "not started".to_owned(),
                None => "unknown (no lab.json record)".to_owned(),
            };
            writeln!(
                f,
                "    agent: {agent}; socket {} {}; log {}",
                h.socket.display(),
                if h.socket_accepts {
                    "accepts connections"
                } else {
                    "not accepting"
                },
                h.log.display()
            )?;
        }
        writeln!(
            f,
            "  switch: namespace {} {} (bridge {SWITCH_BRIDGE})",
            self.switch_netns.name,
            yes_no(self.switch_netns.exists)
        )?;
        writeln!(
            f,
            "  client: namespace {} {}; {}/{VM_NET_PREFIX_LEN} ({CLIENT_IFACE}) on the switch's bridge (port group {PORT_GROUP}, guests 198.18.2.1-199)",
            self.client_netns.name,
            yes_no(self.client_netns.exists),
            self.client_addr
        )?;
        if !self.stray_namespaces.is_empty() {
            writeln!(
                f,
                "  other namespaces of this lab: {}",
                self.stray_namespaces.join(", ")
            )?;
        }
        Ok(())
    }
}

/// Inspects the lab recorded at `root` (or named `name` without a record). Needs `ip`, not root.
pub fn status(name: Option<&str>, root: &Path) -> Result<LabStatus> {
    let ip = Ip::find()?;
    let Resolved {
        recorded,
        state,
        warning,
    } = resolve_state(name, root)?;
    let existing: BTreeSet<String> = ip.netns_list()?.into_iter().collect();
    let ns_status = |ns: &str| NetnsStatus {
        name: ns.to_owned(),
        exists: existing.contains(ns),
    };
    let hosts = state
        .hosts
        .iter()
        .map(|h| HostStatus {
            name: h.name.clone(),
            netns: ns_status(&h.netns),
            mgmt_addr: h.mgmt_addr,
            migration_addr: h.migration_addr,
            agent_pid: h.agent_pid,
            agent_alive: h
                .agent_pid
                .is_some_and(|pid| same_process_alive(pid, h.agent_start_time, &h.config)),
            socket: h.socket.clone(),
            socket_accepts: UnixStream::connect(&h.socket).is_ok(),
            log: h.log.clone(),
        })
        .collect();
    let stray_namespaces = existing
        .iter()
        .filter(|ns| belongs_to_lab(ns, &state.name) && !state.namespaces.contains(ns))
        .cloned()
        .collect();
    Ok(LabStatus {
        name: state.name.clone(),
        root: root.to_path_buf(),
        recorded,
        warning,
        root_in_use: dir_has_entries(root).unwrap_or(true),
        switch_netns: ns_status(&state.switch_netns),
        client_netns: ns_status(&client_netns_name(&state.name)),
        client_addr: CLIENT_ADDR,
        hosts,
        stray_namespaces,
    })
}

// ---------------------------------------------------------------------------------------------
// iproute2
// ---------------------------------------------------------------------------------------------

/// The `ip` tool: every lab change goes through [`Ip::run`].
#[derive(Debug, Clone)]
struct Ip {
    bin: PathBuf,
}

impl Ip {
    /// Finds `ip` on `PATH` or in the usual sbin directories (which `sudo` may drop from PATH).
    fn find() -> Result<Ip> {
        let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect())
            .unwrap_or_default();
        dirs.extend(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
        dirs.into_iter()
            .map(|d| d.join("ip"))
            .find(|p| p.is_file())
            .map(|bin| Ip { bin })
            .ok_or_else(|| {
                anyhow!(
                    "iproute2 is not installed: run `cargo xtask deps` (or `apt-get install \
                     iproute2`, which provides `ip` and `bridge`)"
                )
            })
    }

    /// Runs `ip ARGS` (bounded by 10 s) and returns stdout; a failure quotes ip's stderr.
    fn run(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args);
        let out = run_bounded(cmd, IP_TIMEOUT)?;
        if !out.status.success() {
            bail!(
                "`ip {}` failed ({}){}",
                args.join(" "),
                out.status,
                quote_output(&out.stderr, &out.stdout)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Names from `ip netns list`.
    fn netns_list(&self) -> Result<Vec<String>> {
        Ok(parse_netns_list(&self.run(&["netns", "list"])?))
    }

    /// Deletes a namespace; one that is already gone counts as deleted.
    fn delete_netns(&self, ns: &str) -> Result<()> {
        match self.run(&["netns", "delete", ns]) {
            Ok(_) => Ok(()),
            Err(e) => {
                if self.netns_list().is_ok_and(|l| !l.iter().any(|n| n == ns)) {
                    Ok(())
                } else {
                    Err(e.context(format!("cannot delete network namespace {ns}")))
                }
            }
        }
    }
}

/// `ip netns list` prints `name` or `name (id: N)` per line.
fn parse_netns_list(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// `(ifname, operstate)` pairs from `ip -j link show`.
fn parse_operstates(json: &str) -> Result<Vec<(String, String)>> {
    let links: Vec<serde_json::Value> = serde_json::from_str(json)?;
    Ok(links
        .iter()
        .filter_map(|l| {
            let name = l.get("ifname")?.as_str()?;
            let state = l.get("operstate")?.as_str()?;
            Some((name.to_owned(), state.to_owned()))
        })
        .collect())
}

/// Serializes `ip netns add`: the first one after boot turns /run/netns into a shared mount,
/// and several doing that at once (parallel test processes) stack bind mounts. A process-wide
/// mutex plus an `flock` on `/run/lock/ferry-lab-netns.lock` (bounded at 10 s) covers threads
/// and processes.
struct NetnsAddLock {
    _thread: std::sync::MutexGuard<'static, ()>,
    _file: File,
}

static NETNS_ADD: Mutex<()> = Mutex::new(());

impl NetnsAddLock {
    fn acquire() -> Result<NetnsAddLock> {
        let guard = NETNS_ADD
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let dir = if Path::new("/run/lock").is_dir() {
            "/run/lock"
        } else {
            "/run"
        };
        let path = Path::new(dir).join("ferry-lab-netns.lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot open lock file {}", path.display()))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // SAFETY: flock on a file descriptor we own; no memory is passed.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                // The lock is released when `file` is closed.
                return Ok(NetnsAddLock {
                    _thread: guard,
                    _file: file,
                });
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::WouldBlock {
                return Err(err).with_context(|| format!("cannot lock {}", path.display()));
            }
            if Instant::now() >= deadline {
                bail!(
                    "another process held {} for over 10 s: is an `ip netns add` stuck?",
                    path.display()
                );
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// Fails, naming the package and the fix, if `program` (a bare name looked up in PATH and the
/// sbin directories, or a path) is not installed. A missing tool must fail a test loudly: it must
/// never look like the command's own failure (which a test may expect).
pub fn require_program(program: &str) -> Result<()> {
    let found = if program.contains('/') {
        Path::new(program).is_file()
    } else {
        std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
            .any(|d| d.join(program).is_file())
    };
    if found {
        return Ok(());
    }
    let package = crate::dev::TOOLS
        .iter()
        .find(|t| t.program == program)
        .map_or_else(
            || "not listed in xtask's TOOLS: add it there".to_string(),
            |t| format!("package {}", t.package),
        );
    bail!("`{program}` is not installed ({package}): run `cargo xtask deps` as root")
}

/// The exit status and output of a finished command.
struct Finished {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

/// Runs `cmd` (stdin null, output captured) in its own process group; kills the group if it
/// outlives `timeout`. Output a lingering grandchild keeps open is read for at most 2 s more.
fn run_bounded(mut cmd: Command, timeout: Duration) -> Result<Finished> {
    let desc = describe(&cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{desc}`"))?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => {
                thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            Ok(None) => {
                kill_group_and_reap(&mut child);
                bail!("`{desc}` did not finish within {timeout:?}; it was killed");
            }
            Err(e) => {
                kill_group_and_reap(&mut child);
                return Err(e).with_context(|| format!("cannot wait for `{desc}`"));
            }
        }
    };
    let collect = |rx: mpsc::Receiver<Vec<u8>>| rx.recv_timeout(KILL_TIMEOUT).unwrap_or_default();
    Ok(Finished {
        status,
        stdout: collect(stdout),
        stderr: collect(stderr),
    })
}

/// Reads a pipe to its end on a thread.
fn drain(pipe: Option<impl Read + Send + 'static>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut pipe) = pipe {
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            let _ = tx.send(buf);
        });
    } else {
        let _ = tx.send(Vec::new());
    }
    rx
}

/// SIGKILLs the process group led by `child` (spawned with `process_group(0)`), then reaps it
/// with a bound.
fn kill_group_and_reap(child: &mut Child) {
    if let Ok(pgid) = i32::try_from(child.id()) {
        if pgid > 0 {
            // SAFETY: kill(2) with a negative pid signals the process group we created for this
            // child; no memory is involved.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
    }
    let deadline = Instant::now() + KILL_TIMEOUT;
    while Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Sends `sig` to process `pid` (never to a group: `pid` must be positive).
fn signal(pid: u32, sig: libc::c_int) -> io::Result<()> {
    let pid = i32::try_from(pid)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a process id"))?;
    // SAFETY: kill(2) on a single positive pid; no memory is involved.
    if unsafe { libc::kill(pid, sig) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Stops processes by pid, all at once: SIGTERM to each, up to 5 s for all to exit, SIGKILL to
/// the rest, up to 2 s more. `gone(i)` says whether process `i` has exited (reaping it where the
/// caller can). One result per pid.
fn stop_processes(pids: &[u32], mut gone: impl FnMut(usize) -> bool) -> Vec<Result<()>> {
    let mut results: Vec<Option<Result<()>>> = pids.iter().map(|_| None).collect();
    let phases = [
        (libc::SIGTERM, "SIGTERM", AGENT_STOP_TIMEOUT),
        (libc::SIGKILL, "SIGKILL", KILL_TIMEOUT),
    ];
    for (sig, sig_name, timeout) in phases {
        for (i, &pid) in pids.iter().enumerate() {
            if results[i].is_some() {
                continue;
            }
            if gone(i) {
                results[i] = Some(Ok(()));
            } else if let Err(e) = signal(pid, sig).or_else(ignore_esrch) {
                results[i] = Some(Err(
                    anyhow!(e).context(format!("cannot send {sig_name} to pid {pid}"))
                ));
            }
        }
        let deadline = Instant::now() + timeout;
        loop {
            for (i, result) in results.iter_mut().enumerate() {
                if result.is_none() && gone(i) {
                    *result = Some(Ok(()));
                }
            }
            if results.iter().all(Option::is_some) || Instant::now() >= deadline {
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
    results
        .into_iter()
        .zip(pids)
        .map(|(result, pid)| {
            result.unwrap_or_else(|| {
                Err(anyhow!(
                    "pid {pid} did not exit within {KILL_TIMEOUT:?} of SIGKILL (stuck in the kernel?)"
                ))
            })
        })
        .collect()
}

/// Stops children of this process (reaping them). Their pids cannot have been recycled: they
/// are not reaped until they are seen gone.
fn stop_children(children: &mut [Child]) -> Vec<Result<()>> {
    let pids: Vec<u32> = children.iter().map(Child::id).collect();
    stop_processes(&pids, |i| !matches!(children[i].try_wait(), Ok(None)))
}

fn ignore_esrch(e: io::Error) -> io::Result<()> {
    if e.raw_os_error() == Some(libc::ESRCH) {
        Ok(())
    } else {
        Err(e)
    }
}

/// Whether `pid` is alive (not a zombie) and is the recorded agent: same start time if one was
/// recorded, else a command line that mentions `config`.
fn same_process_alive(pid: u32, start_time: Option<u64>, config: &Path) -> bool {
    process_alive(pid, start_time)
        && (start_time.is_some()
            || fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
                let config = config.as_os_str().as_encoded_bytes();
                cmdline.split(|b| *b == 0).any(|arg| arg == config)
            }))
}

/// Whether `pid` is alive (not a zombie) and, if `start_time` is given, started then.
fn process_alive(pid: u32, start_time: Option<u64>) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some(fields) = parse_stat(&stat) else {
        return false;
    };
    fields.state != 'Z' && fields.state != 'X' && start_time.is_none_or(|t| t == fields.start_time)
}

/// A process found inside one of a lab's namespaces.
#[derive(Debug, Clone, PartialEq, Eq)]
struct StrayProcess {
    pid: u32,
    start_time: Option<u64>,
    netns: String,
}

/// Processes other than this one whose network namespace is one of `namespaces` (compared by
/// the nsfs device and inode of `/run/netns/NAME` and `/proc/PID/ns/net`).
fn processes_in(namespaces: &[String]) -> Vec<StrayProcess> {
    let ids: Vec<((u64, u64), &String)> = namespaces
        .iter()
        .filter_map(|ns| {
            let meta = fs::metadata(Path::new("/run/netns").join(ns)).ok()?;
            Some(((meta.dev(), meta.ino()), ns))
        })
        .collect();
    if ids.is_empty() {
        return Vec::new();
    }
    let me = std::process::id();
    let Ok(proc_dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    proc_dir
        .filter_map(|entry| {
            let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            if pid == me {
                return None;
            }
            let meta = fs::metadata(format!("/proc/{pid}/ns/net")).ok()?;
            let (_, ns) = ids.iter().find(|(id, _)| *id == (meta.dev(), meta.ino()))?;
            Some(StrayProcess {
                pid,
                start_time: proc_start_time(pid),
                netns: (*ns).clone(),
            })
        })
        .collect()
}

/// Stops every process still running inside `namespaces` (things tests started with
/// [`Lab::exec`] that daemonized, agents without a record), so that deleting the namespaces
/// really frees them. Returns the processes stopped.
fn stop_processes_in(namespaces: &[String]) -> Result<Vec<StrayProcess>> {
    let strays = processes_in(namespaces);
    let pids: Vec<u32> = strays.iter().map(|p| p.pid).collect();
    let results = stop_processes(&pids, |i| !process_alive(pids[i], strays[i].start_time));
    let mut errors = Vec::new();
    for (p, result) in strays.iter().zip(results) {
        if let Err(e) = result {
            errors.push(e.context(format!(
                "cannot stop pid {} in namespace {}",
                p.pid, p.netns
            )));
        }
    }
    combine_errors(errors).map(|()| strays)
}

struct StatFields {
    state: char,
    start_time: u64,
}

/// State and start time from `/proc/PID/stat` (the command name may hold spaces and parens,
/// so fields are counted after the last `)`).
fn parse_stat(stat: &str) -> Option<StatFields> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is fields[0]; field 22 (starttime) is fields[19].
    Some(StatFields {
        state: fields.first()?.chars().next()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

fn proc_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat).map(|f| f.start_time)
}

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the lab needs root (it creates network namespaces and starts agents in them): run \
             as root, e.g. `sudo -E cargo xtask lab up`"
        );
    }
    Ok(())
}

/// Whether `dir` exists and has entries; a missing directory has none.
fn dir_has_entries(dir: &Path) -> Result<bool> {
    match fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_some()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("cannot read directory {}", dir.display())),
    }
}

/// The last `LOG_TAIL_LINES` lines of a log, formatted to append to an error message.
fn log_tail_note(log: &Path) -> String {
    match log_tail(log, LOG_TAIL_LINES) {
        Ok(tail) if tail.trim().is_empty() => format!("; its log {} is empty", log.display()),
        Ok(tail) => format!(
            "\n--- last {LOG_TAIL_LINES} lines of {} ---\n{tail}",
            log.display()
        ),
        Err(e) => format!("; cannot read its log {}: {e}", log.display()),
    }
}

/// The last `lines` lines of a file (reading at most its last 64 KiB).
fn log_tail(path: &Path, lines: usize) -> io::Result<String> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)))?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf)?;
    Ok(last_lines(&String::from_utf8_lossy(&buf), lines))
}

fn last_lines(text: &str, n: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(n)..].join("\n")
}

/// ": stderr" (or stdout if stderr is empty) for an error message.
fn quote_output(stderr: &[u8], stdout: &[u8]) -> String {
    let text = if stderr.iter().all(u8::is_ascii_whitespace) {
        stdout
    } else {
        stderr
    };
    let text = String::from_utf8_lossy(text);
    let text = text.trim();
    if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    }
}

fn join_names<'a>(names: impl Iterator<Item = &'a str>) -> String {
    names.collect::<Vec<_>>().join(", ")
}

fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `Ok` if no errors; else one error listing all of them.
fn combine_errors(mut errors: Vec<anyhow::Error>) -> Result<()> {
    match errors.len() {
        0 => Ok(()),
        1 => Err(errors.remove(0)),
        n => {
            let all: Vec<String> = errors.iter().map(|e| format!("{e:#}")).collect();
            Err(anyhow!(
                "{n} cleanup steps failed:\n  - {}",
                all.join("\n  - ")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_names_are_short_unique_and_valid() {
        let a = test_lab_name("migrate::tests::idle_guest", 4_194_303, 0);
        let b = test_lab_name("migrate::tests::idle_guest", 4_194_303, 1);
        assert_eq!(a, "idle-2hwcf-0");
        assert_ne!(a, b);
        for name in [&a, &b] {
            assert!(name.len() <= 15, "{name}");
            validate_name(name).unwrap();
        }
        // Worst case: longest prefix, pid_max and the largest counter.
        let long = test_lab_name("Some::Very_Long_Test_Name", 4_194_304, u32::MAX);
        assert!(long.len() <= 15, "{long}");
        validate_name(&long).unwrap();
        assert!(long.starts_with("very-"));
        // Nothing usable in the test name still gives a valid name.
        let odd = test_lab_name("::__::", 1, 2);
        assert_eq!(odd, "t-1-2");
        validate_name(&odd).unwrap();
    }

    #[test]
    fn for_test_gives_distinct_options() {
        let a = LabOptions::for_test("x");
        let b = LabOptions::for_test("x");
        assert_ne!(a.name, b.name);
        assert_ne!(a.root, b.root);
        assert!(a.root.starts_with(std::env::temp_dir()));
        a.validate().unwrap();
        assert_eq!(a.ferry_bin, None);
        assert_eq!(
            a.clone().with_ferry_bin("/x/ferry").ferry_bin,
            Some(PathBuf::from("/x/ferry"))
        );
    }

    #[test]
    fn base36_digits() {
        assert_eq!(base36(0), "0");
        assert_eq!(base36(35), "z");
        assert_eq!(base36(36), "10");
        assert_eq!(base36(46_655), "zzz");
    }

    #[test]
    fn name_validation() {
        for ok in ["lab", "a", "lab-2", "0", &"x".repeat(32)] {
            validate_name(ok).unwrap();
        }
        for bad in [
            "",
            "-lab",
            "lab-",
            "Lab",
            "la b",
            "la/b",
            "läb",
            &"x".repeat(33),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn option_validation() {
        let mut o = LabOptions {
            name: DEFAULT_NAME.to_owned(),
            root: PathBuf::from(DEFAULT_ROOT),
            ferry_bin: None,
        };
        o.validate().unwrap();
        o.root = PathBuf::from("relative/root");
        assert!(o.validate().is_err());
        o.root = PathBuf::from("/");
        assert!(o.validate().is_err());
        o.root = PathBuf::from("/").join("r".repeat(100));
        let err = o.validate().unwrap_err().to_string();
        assert!(err.contains("shorter --root"), "{err}");
    }

    #[test]
    fn namespaces_and_membership() {
        assert_eq!(
            namespace_names("lab"),
            ["ferry-lab-a", "ferry-lab-b", "ferry-lab-cl", "ferry-lab-sw"]
        );
        assert!(belongs_to_lab("ferry-lab-cl", "lab"));
        assert_eq!(vm_addr(10).unwrap(), Ipv4Addr::new(198, 18, 2, 10));
        assert!(vm_addr(0).is_err());
        assert!(vm_addr(200).unwrap_err().to_string().contains("1..=199"));
        assert!(belongs_to_lab("ferry-lab-a", "lab"));
        assert!(belongs_to_lab("ferry-lab-sw", "lab"));
        assert!(belongs_to_lab("ferry-lab-c2", "lab"));
        assert!(
            !belongs_to_lab("ferry-lab-x-a", "lab"),
            "belongs to lab `lab-x`"
        );
        assert!(!belongs_to_lab("ferry-lab-", "lab"));
        assert!(!belongs_to_lab("ferry-labs-a", "lab"));
        assert!(!belongs_to_lab("other-lab-a", "lab"));
        assert!(belongs_to_lab("ferry-lab-x-a", "lab-x"));
    }

    fn host_a(root: &Path) -> LabHost {
        LabHost::planned("t", root, &HOSTS[0])
    }

    #[test]
    fn agent_config_matches_the_documented_format() {
        let root = Path::new("/run/ferry/lab");
        let a = host_a(root);
        let text = render_agent_config(
            &a,
            &root.join("datastores/shared"),
            &local_datastore(root, "a"),
            &[("b", Ipv4Addr::new(198, 18, 0, 2))],
        )
        .unwrap();
        let expected = r#"[agent]
name = "a"
socket = "/run/ferry/lab/a/agent.sock"
state_dir = "/run/ferry/lab/a/state"

[management]
address = "198.18.0.1"

[migration]
interface = "mig0"
address = "198.18.1.1"
link_speed = "40gbit"

[datastores]
shared = "/run/ferry/lab/datastores/shared"
local = "/run/ferry/lab/datastores/local-a"

[port_groups]
vm-net = "vmbr0"

[peers]
b = "198.18.0.2"
"#;
        assert_eq!(text, expected);
    }

    #[test]
    fn agent_config_of_b_mirrors_a() {
        let root = Path::new("/r");
        let b = LabHost::planned("t", root, &HOSTS[1]);
        let text = render_agent_config(
            &b,
            &root.join("datastores/shared"),
            &local_datastore(root, "b"),
            &[("a", HOSTS[0].mgmt)],
        )
        .unwrap();
        assert!(text.contains("name = \"b\"\n"));
        assert!(text.contains("[management]\naddress = \"198.18.0.2\"\n"));
        assert!(text.contains("address = \"198.18.1.2\"\n"));
        assert!(text.contains("local = \"/r/datastores/local-b\"\n"));
        assert!(text.ends_with("[peers]\na = \"198.18.0.1\"\n"));
    }

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_string(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(toml_string("x\ny\u{1}"), "\"x\\ny\\u0001\"");
        assert!(toml_key("vm-net").is_ok());
        assert!(toml_key("a b").is_err());
        assert!(toml_key("").is_err());
    }

    #[test]
    fn profile_dir_of_binaries_and_tests() {
        assert_eq!(
            profile_dir(Path::new("/t/debug/xtask")),
            Some(PathBuf::from("/t/debug"))
        );
        assert_eq!(
            profile_dir(Path::new("/t/release/deps/lab-0123abcd")),
            Some(PathBuf::from("/t/release"))
        );
        assert_eq!(
            profile_dir(Path::new("/t/debug/examples/x")),
            Some(PathBuf::from("/t/debug"))
        );
    }

    #[test]
    fn netns_list_parsing() {
        let out = "ferry-lab-sw (id: 2)\nferry-lab-b (id: 1)\nplain\n\n";
        assert_eq!(
            parse_netns_list(out),
            ["ferry-lab-sw", "ferry-lab-b", "plain"]
        );
    }

    #[test]
    fn operstate_parsing() {
        let json = r#"[{"ifindex":1,"ifname":"lo","operstate":"UNKNOWN"},
                      {"ifindex":2,"ifname":"mgmt0","operstate":"UP","link_netnsid":0}]"#;
        assert_eq!(
            parse_operstates(json).unwrap(),
            [
                ("lo".to_owned(), "UNKNOWN".to_owned()),
                ("mgmt0".to_owned(), "UP".to_owned())
            ]
        );
        assert!(parse_operstates("not json").is_err());
    }

    #[test]
    fn stat_parsing_survives_odd_command_names() {
        let stat = "4242 (we ird) (name)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    987654 1000 100 18446744073709551615";
        let f = parse_stat(stat).unwrap();
        assert_eq!(f.state, 'S');
        assert_eq!(f.start_time, 987_654);
        assert!(parse_stat("garbage").is_none());
        let me = proc_start_time(std::process::id()).unwrap();
        assert!(me > 0);
    }

    #[test]
    fn log_tails() {
        assert_eq!(last_lines("1\n2\n3\n", 2), "2\n3");
        assert_eq!(last_lines("1\n", 5), "1");
        assert_eq!(last_lines("", 5), "");
    }

    #[test]
    fn state_roundtrips_through_json() {
        let state = LabState::expected("lab", Path::new("/run/ferry/lab"));
        let json = serde_json::to_string(&state).unwrap();
        let back: LabState = serde_json::from_str(&json).unwrap();
        assert_eq!(state, back);
        assert_eq!(back.namespaces, namespace_names("lab"));
        assert_eq!(back.hosts[1].mgmt_addr, Ipv4Addr::new(198, 18, 0, 2));
    }

    #[test]
    fn bounded_runner_kills_what_overruns() {
        let mut sleep = Command::new("sleep");
        sleep.arg("5");
        let start = Instant::now();
        let err = run_bounded(sleep, Duration::from_millis(100))
            .err()
            .unwrap();
        assert!(err.to_string().contains("did not finish"), "{err}");
        assert!(start.elapsed() < Duration::from_secs(3));

        let mut echo = Command::new("sh");
        echo.args(["-c", "echo out; echo err >&2; exit 3"]);
        let out = run_bounded(echo, Duration::from_secs(5)).unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
    }

    #[test]
    fn lab_can_be_shared_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Lab>();
        send_sync::<LabState>();
    }

    #[test]
    fn no_processes_in_namespaces_that_do_not_exist() {
        assert!(processes_in(&["ferry-no-such-lab-a".to_owned()]).is_empty());
        assert!(process_alive(std::process::id(), None));
        assert!(!process_alive(std::process::id(), Some(0)));
    }

    #[test]
    fn signal_refuses_group_pids() {
        assert!(signal(0, 0).is_err());
        assert!(signal(u32::MAX, 0).is_err());
    }
}
