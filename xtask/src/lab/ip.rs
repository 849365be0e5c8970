//! iproute2: the `ip` tool every change to a lab's network goes through, parsers for its
//! output, and the lock around `ip netns add`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::process::run_bounded;
use super::util::quote_output;
use super::IP_TIMEOUT;

/// The `ip` tool: every lab change goes through [`Ip::run`].
#[derive(Debug, Clone)]
pub(super) struct Ip {
    pub(super) bin: PathBuf,
}

impl Ip {
    /// Finds `ip` on `PATH` or in the usual sbin directories (which `sudo` may drop from PATH).
    pub(super) fn find() -> Result<Ip> {
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
    pub(super) fn run(&self, args: &[&str]) -> Result<String> {
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
    pub(super) fn netns_list(&self) -> Result<Vec<String>> {
        Ok(parse_netns_list(&self.run(&["netns", "list"])?))
    }

    /// Deletes a namespace; one that is already gone counts as deleted.
    pub(super) fn delete_netns(&self, ns: &str) -> Result<()> {
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
pub(super) fn parse_operstates(json: &str) -> Result<Vec<(String, String)>> {
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
pub(super) struct NetnsAddLock {
    _thread: std::sync::MutexGuard<'static, ()>,
    _file: File,
}

static NETNS_ADD: Mutex<()> = Mutex::new(());

impl NetnsAddLock {
    pub(super) fn acquire() -> Result<NetnsAddLock> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
