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
//!
//! The module, one file per concern:
//!
//! - `names`: [`LabOptions`], lab and namespace names.
//! - `lifecycle`: [`Lab`]: `up`, `down`, `detach`, `exec`, accessors.
//! - `network`: the namespaces, veths and bridges of a lab.
//! - `agents`: starting, waiting for and stopping a lab's agents.
//! - `config`: each agent's `agent.toml` (the agent's own `Config`, written with `toml`) and the
//!   cluster key.
//! - `binary`: finding the `ferry` binary ([`ferry_bin`]).
//! - `state`: the record of a detached lab in `ROOT/lab.json` ([`LabState`]).
//! - `down`: removing a lab from its record ([`down_recorded`]).
//! - `status`: inspecting a lab ([`status()`]).
//! - `ip`: the `ip` tool (iproute2) and the lock around `ip netns add`.
//! - `process`: the bounded command runner and stopping processes by pid.
//! - `procfs`: `/proc` parsing: start times, liveness, processes inside a namespace.
//! - `util`: small helpers (errors, log tails, directories).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use anyhow::{bail, Result};

mod agents;
mod binary;
mod config;
mod down;
mod ip;
mod lifecycle;
mod names;
mod network;
mod process;
mod procfs;
mod state;
mod status;
mod util;

pub use binary::ferry_bin;
pub use config::lab_vmm_mode;
pub use down::{down_recorded, DownReport};
pub use names::{client_netns_name, LabOptions};
pub use process::require_program;
pub use state::{HostRecord, LabState};
pub use status::{status, HostStatus, LabStatus, NetnsStatus};

use ip::Ip;
use names::host_netns;

/// Name of the lab `cargo xtask lab` manages unless told otherwise.
pub const DEFAULT_NAME: &str = "lab";
/// Root directory of the lab `cargo xtask lab` manages unless told otherwise.
pub const DEFAULT_ROOT: &str = "/run/ferry/lab";
/// File under the lab root that records a running lab (see [`LabState`]).
pub const STATE_FILE: &str = "lab.json";
/// The speed the lab's agents assume for the veth migration link (veth reports none): about
/// what two streams of a raw TCP blast reach on the lab machines (~34 Gbit/s).
pub const LAB_LINK_SPEED: &str = "40gbit";
/// Management interface in each host namespace.
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
/// The client's interface (in its namespace).
pub const CLIENT_IFACE: &str = "eth0";
/// The client's port on the switch's bridge.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_addresses() {
        assert_eq!(vm_addr(10).unwrap(), Ipv4Addr::new(198, 18, 2, 10));
        assert!(vm_addr(0).is_err());
        assert!(vm_addr(200).unwrap_err().to_string().contains("1..=199"));
    }

    #[test]
    fn lab_can_be_shared_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Lab>();
        send_sync::<LabState>();
    }
}
