//! A lab's agents: started in their host's namespace in a session of their own, waited for
//! until their socket accepts connections, stopped by pid.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::process::stop_children;
use super::procfs::proc_start_time;
use super::util::{combine_errors, log_tail_note, unix_time};
use super::{Agent, Lab, AGENT_READY_POLL, AGENT_READY_TIMEOUT};

impl Lab {
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

    /// Starts host `idx`'s agent in its own session; does not wait for it.
    pub(super) fn spawn_agent(&mut self, idx: usize) -> Result<()> {
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
    pub(super) fn wait_agent_ready(&mut self, idx: usize, deadline: Instant) -> Result<()> {
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

    /// Stops the agents of hosts `indices` together (see [`stop_processes`](super::process::stop_processes)).
    pub(super) fn stop_agents(&mut self, indices: &[usize]) -> Result<()> {
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
}
