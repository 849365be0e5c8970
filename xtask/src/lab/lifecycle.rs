//! A [`Lab`]'s life: [`Lab::up`], the accessors, [`Lab::exec`], [`Lab::down`], [`Lab::detach`]
//! and the teardown its `Drop` runs.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::binary::resolve_ferry_bin;
use super::names::{belongs_to_lab, client_netns_name, namespace_names, switch_netns_name};
use super::process::{require_program, run_bounded};
use super::procfs::stop_processes_in;
use super::state::{HostRecord, LabState};
use super::util::{combine_errors, dir_has_entries, join_names, quote_output, require_root};
use super::{Ip, Lab, LabHost, LabOptions, AGENT_READY_TIMEOUT, EXEC_TIMEOUT, HOSTS};

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

    /// The switch namespace, holding bridge [`SWITCH_BRIDGE`](super::SWITCH_BRIDGE) with ports `a-up` and `b-up`.
    pub fn switch_netns(&self) -> &str {
        &self.switch_netns
    }

    /// The client namespace: interface [`CLIENT_IFACE`](super::CLIENT_IFACE) with [`CLIENT_ADDR`](super::CLIENT_ADDR) on the VM network,
    /// attached to the switch's bridge (port [`CLIENT_SWITCH_PORT`](super::CLIENT_SWITCH_PORT)).
    pub fn client_netns(&self) -> &str {
        &self.client_netns
    }

    /// The datastore directory both hosts share.
    pub fn shared_datastore(&self) -> PathBuf {
        shared_datastore(&self.root)
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

    /// Stops the agents (and any other process still inside the lab's namespaces, such as a
    /// daemon started through [`Lab::exec`]), deletes the namespaces and removes the root
    /// directory, reporting every step that failed (it carries on past failures).
    pub fn down(mut self) -> Result<()> {
        self.teardown()
    }

    /// Leaves the lab running (agents keep running in their own sessions) and returns what
    /// [`down_recorded`](super::down_recorded) needs to remove it later. Agents that exit are reaped by init, not by
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

    pub(super) fn index_of(&self, host: &str) -> Result<usize> {
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

    pub(super) fn save_state(&self) -> Result<()> {
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
        // VMMs outlive their agents (`[vmm] mode = "process"`): those of this lab's hosts.
        let state_dirs: Vec<_> = self.hosts.iter().map(|h| h.state_dir.clone()).collect();
        if let Err(e) = super::down::stop_lab_vmms(&state_dirs) {
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

pub(super) fn shared_datastore(root: &Path) -> PathBuf {
    root.join("datastores").join("shared")
}

pub(super) fn local_datastore(root: &Path, host: &str) -> PathBuf {
    root.join("datastores").join(format!("local-{host}"))
}
