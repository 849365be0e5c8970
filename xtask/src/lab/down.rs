//! Removing a lab from another process: [`down_recorded`].

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use serde::Serialize;

use super::names::belongs_to_lab;
use super::process::stop_processes;
use super::procfs::{same_process_alive, stop_processes_in};
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
