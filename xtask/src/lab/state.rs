//! The record of a lab in `ROOT/lab.json` ([`LabState`]), so that another process can inspect
//! and remove it, and which lab a command acts on when there is no (readable) record.

use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::names::{namespace_names, switch_netns_name, validate_name};
use super::{LabHost, DEFAULT_NAME, HOSTS, STATE_FILE};

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

/// The lab to act on at `root`: its record if there is a readable one, else the expected
/// layout of lab `name` (default [`DEFAULT_NAME`]).
pub(super) struct Resolved {
    /// Whether a valid `lab.json` was found.
    pub(super) recorded: bool,
    pub(super) state: LabState,
    /// Why an existing record was not used.
    pub(super) warning: Option<String>,
}

pub(super) fn resolve_state(name: Option<&str>, root: &Path) -> Result<Resolved> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_roundtrips_through_json() {
        let state = LabState::expected("lab", Path::new("/run/ferry/lab"));
        let json = serde_json::to_string(&state).unwrap();
        let back: LabState = serde_json::from_str(&json).unwrap();
        assert_eq!(state, back);
        assert_eq!(back.namespaces, namespace_names("lab"));
        assert_eq!(back.hosts[1].mgmt_addr, Ipv4Addr::new(198, 18, 0, 2));
    }
}
