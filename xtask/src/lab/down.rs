//! Removing a lab from another process: [`down_recorded`].

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use serde::Serialize;

use super::names::belongs_to_lab;
use super::process::stop_processes;
use super::procfs::{proc_start_time, same_process_alive, stop_processes_in};
use super::state::{resolve_state, HostRecord, Resolved};
use super::util::{combine_errors, require_root};
use super::{Ip, STATE_FILE};

/// What [`down_recorded`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DownReport {
    pub name: String,
    pub root: PathBuf,
    /// `(host, pid)` of each agent stopped.
    pub stopped_agents: Vec<(String, u32)>,
    /// `(namespace, pid)` of other processes that were still running inside the lab; `("vmm",
    /// pid)` for a VMM (and its monitor) of one of the lab's hosts.
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
/// [`DEFAULT_NAME`](super::DEFAULT_NAME)): stops its agents by recorded pid (checking the pid's start time first),
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

    // VMMs outlive their agents (process mode): stopped by pid, before their state dirs go.
    let state_dirs: Vec<PathBuf> = state.hosts.iter().map(|h| h.state_dir.clone()).collect();
    match stop_lab_vmms(&state_dirs) {
        Ok(pids) => report
            .stopped_processes
            .extend(pids.into_iter().map(|p| ("vmm".to_string(), p))),
        Err(e) => errors.push(e),
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

/// The VMM processes (`ferry vmm`, `[vmm] mode = "process"`) of the hosts whose state
/// directories are `state_dirs`, which outlive their agents by design: the pid each VMM's Hello
/// gives (`DIR/vmm/N.sock`), and every process whose command line is `... vmm ... --state-dir
/// DIR` (the monitors, and VMMs whose socket is gone). A pid counts only if its command line
/// names one of these state directories, so nothing outside the lab is touched.
pub(super) fn lab_vmm_pids(state_dirs: &[PathBuf]) -> Vec<u32> {
    let dirs: Vec<Vec<u8>> = state_dirs
        .iter()
        .map(|d| d.as_os_str().as_encoded_bytes().to_vec())
        .collect();
    let is_lab_vmm = |pid: u32| {
        fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
            let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
            args.contains(&&b"vmm"[..])
                && args
                    .windows(2)
                    .any(|w| w[0] == b"--state-dir" && dirs.iter().any(|d| d == w[1]))
        })
    };
    let mut pids = BTreeSet::new();
    for dir in state_dirs {
        let Ok(rd) = fs::read_dir(ferry::vmm::vmm_dir(dir)) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "sock") {
                if let Ok(c) =
                    ferry::vmm::client::VmmClient::connect(&p, std::time::Duration::from_secs(1))
                {
                    pids.insert(c.hello().pid);
                }
            }
        }
    }
    if let Ok(rd) = fs::read_dir("/proc") {
        pids.extend(
            rd.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok()),
        );
    }
    let me = std::process::id();
    pids.into_iter()
        .filter(|&pid| pid != me && is_lab_vmm(pid))
        .collect()
}

/// Stops the VMMs of `state_dirs` ([`lab_vmm_pids`]); returns the pids stopped.
pub(super) fn stop_lab_vmms(state_dirs: &[PathBuf]) -> Result<Vec<u32>> {
    let pids = lab_vmm_pids(state_dirs);
    let starts: Vec<Option<u64>> = pids.iter().map(|&p| proc_start_time(p)).collect();
    let results = stop_processes(&pids, |i| {
        starts[i].is_none() || proc_start_time(pids[i]) != starts[i]
    });
    let mut errors = Vec::new();
    for (pid, r) in pids.iter().zip(results) {
        if let Err(e) = r {
            errors.push(e.context(format!("cannot stop the lab's VMM pid {pid}")));
        }
    }
    combine_errors(errors).map(|()| pids)
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
