//! What of a lab is there: [`status`], for `cargo xtask lab status`.

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::Serialize;

use super::names::{belongs_to_lab, client_netns_name};
use super::procfs::same_process_alive;
use super::state::{resolve_state, Resolved};
use super::util::dir_has_entries;
use super::{
    Ip, CLIENT_ADDR, CLIENT_IFACE, MGMT_IFACE, MIGRATION_IFACE, PORT_GROUP, SWITCH_BRIDGE,
    VM_NET_PREFIX_LEN,
};

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
