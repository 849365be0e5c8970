//! Processes: the one bounded runner every external command goes through, and stopping
//! processes by pid (never by name or group of strangers).

use std::io::{self, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::{AGENT_STOP_TIMEOUT, KILL_TIMEOUT};

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
pub(super) struct Finished {
    pub(super) status: ExitStatus,
    pub(super) stdout: Vec<u8>,
    pub(super) stderr: Vec<u8>,
}

/// Runs `cmd` (stdin null, output captured) in its own process group; kills the group if it
/// outlives `timeout`. Output a lingering grandchild keeps open is read for at most 2 s more.
pub(super) fn run_bounded(mut cmd: Command, timeout: Duration) -> Result<Finished> {
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
pub(super) fn stop_processes(pids: &[u32], mut gone: impl FnMut(usize) -> bool) -> Vec<Result<()>> {
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
pub(super) fn stop_children(children: &mut [Child]) -> Vec<Result<()>> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn signal_refuses_group_pids() {
        assert!(signal(0, 0).is_err());
        assert!(signal(u32::MAX, 0).is_err());
    }
}
