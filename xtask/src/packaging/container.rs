//! The Debian root booted with systemd-nspawn: finding its PID 1, waiting for systemd, commands
//! inside it through nsenter, diagnostics, and powering it off (or killing it, by PID).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use super::command::{bounded_status, Output};
use super::{DEBS_IN, PATH_IN};

fn kill_pid(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        if pid > 1 {
            // SAFETY: kill(2) on a pid this module started; no memory is shared.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// A booted systemd-nspawn container: nspawn (our child) and the container's PID 1.
pub(super) struct Container {
    nspawn: Child,
    init: u32,
    log: PathBuf,
}

impl Container {
    pub(super) fn boot(root: &Path, debs: &Path, log: &Path) -> Result<Self> {
        let logf = std::fs::File::create(log)?;
        let machine = format!("ferry-pkg-{}", std::process::id());
        let nspawn = Command::new("systemd-nspawn")
            .arg("-D")
            .arg(root)
            .args([
                "-b",
                "--bind=/dev/kvm",
                "--private-network",
                "--register=no",
                "--keep-unit",
                "--console=pipe",
            ])
            .arg(format!("--machine={machine}"))
            .arg(format!("--bind-ro={}:{DEBS_IN}", debs.display()))
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            // In our process group, so a Ctrl-C of the test reaches nspawn too (it then ends
            // the container).
            .spawn()
            .context("cannot start systemd-nspawn (Debian package systemd-container)")?;
        let mut c = Self {
            nspawn,
            init: 0,
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = c.nspawn.try_wait()? {
                bail!(
                    "systemd-nspawn exited ({st}) before the container booted:\n{}",
                    c.log_text()
                );
            }
            if let Some(pid) = container_init(c.nspawn.id()) {
                c.init = pid;
                return Ok(c);
            }
            if Instant::now() > deadline {
                bail!(
                    "no container PID 1 under systemd-nspawn within 30 s:\n{}",
                    c.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Wait (at most 120 s) until systemd reports the system running (or degraded, with the
    /// failed units printed).
    pub(super) fn wait_booted(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now()).as_secs();
            let o = self.sh("systemctl is-system-running --wait", remaining.max(1))?;
            match o.stdout.trim() {
                "running" => return Ok(()),
                "degraded" => {
                    let failed = self.sh("systemctl --failed --no-legend", 10)?;
                    println!(
                        "packaging: container degraded (not ferry's units):\n{}",
                        failed.stdout
                    );
                    return Ok(());
                }
                _ => {}
            }
            if Instant::now() > deadline {
                bail!(
                    "the container's systemd did not finish booting in 120 s: {}{}\n{}",
                    o.stdout,
                    o.stderr,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// `sh -c script` inside the container, with a clean environment, at most `secs`.
    pub(super) fn sh(&self, script: &str, secs: u64) -> Result<Output> {
        bounded_status(
            Command::new("nsenter")
                .arg("-t")
                .arg(self.init.to_string())
                .args(["-a", "env", "-i"])
                .arg(format!("PATH={PATH_IN}"))
                .args([
                    "LANG=C.UTF-8",
                    "HOME=/root",
                    "TERM=dumb",
                    "DEBIAN_FRONTEND=noninteractive",
                    "SYSTEMD_PAGER=",
                    "sh",
                    "-c",
                    script,
                ]),
            secs,
            script,
        )
    }

    /// As [`Container::sh`]; a non-zero exit is an error. Returns stdout and stderr together.
    pub(super) fn ok(&self, script: &str, secs: u64) -> Result<String> {
        let o = self.sh(script, secs)?;
        ensure!(
            o.status.success(),
            "in the container, `{script}` failed ({}):\n{}{}",
            o.status,
            o.stdout,
            o.stderr
        );
        Ok(if o.stderr.is_empty() {
            o.stdout
        } else if o.stdout.is_empty() {
            o.stderr
        } else {
            o.stdout + &o.stderr
        })
    }

    /// The agent's status and journal and nspawn's log, for a failure report.
    pub(super) fn diagnostics(&self) -> String {
        let mut s = String::new();
        for cmd in [
            "systemctl status ferry-agent --no-pager -l",
            "journalctl -u ferry-agent --no-pager -n 50 -o cat",
            "systemctl --failed --no-legend",
        ] {
            if let Ok(o) = self.sh(cmd, 15) {
                s += &format!("--- {cmd}\n{}{}", o.stdout, o.stderr);
            }
        }
        s + "--- systemd-nspawn\n" + &self.log_text()
    }

    fn log_text(&self) -> String {
        let t = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// `systemctl poweroff` inside, then wait (at most 60 s) for nspawn to exit.
    pub(super) fn poweroff(&mut self) -> Result<()> {
        if self.nspawn.try_wait()?.is_some() {
            return Ok(());
        }
        // The command may lose its connection as systemd goes down; the exit below decides.
        let _ = self.sh("systemctl poweroff", 20);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.nspawn.try_wait()?.is_some() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the container did not power off within 60 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if matches!(self.nspawn.try_wait(), Ok(Some(_))) {
            return;
        }
        if let Err(e) = self.poweroff() {
            eprintln!(
                "packaging: {e}; killing the container (PID 1 {})",
                self.init
            );
            // Killing a PID namespace's init kills everything in it.
            kill_pid(self.init);
            kill_pid(self.nspawn.id());
            let _ = self.nspawn.wait();
        }
    }
}

/// The container's PID 1 as this namespace sees it: a descendant of `nspawn` whose innermost
/// PID (the last `NSpid` entry) is 1.
fn container_init(nspawn: u32) -> Option<u32> {
    let ppid_of = |pid: u32| -> Option<u32> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // After the last ')' (the command name may hold spaces): state, ppid, ...
        s.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let inner_one = status
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .is_some_and(|v| {
                let ids: Vec<&str> = v.split_whitespace().collect();
                ids.len() >= 2 && ids.last() == Some(&"1")
            });
        if !inner_one {
            continue;
        }
        // Walk up at most a few generations to nspawn.
        let mut p = pid;
        for _ in 0..4 {
            match ppid_of(p) {
                Some(pp) if pp == nspawn => return Some(pid),
                Some(pp) if pp > 1 => p = pp,
                _ => break,
            }
        }
    }
    None
}
