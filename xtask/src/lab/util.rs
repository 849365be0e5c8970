//! Small helpers of the lab: root check, directories, log tails, error messages.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};

use super::LOG_TAIL_LINES;

pub(super) fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the lab needs root (it creates network namespaces and starts agents in them): run \
             as root, e.g. `sudo -E cargo xtask lab up`"
        );
    }
    Ok(())
}

/// Whether `dir` exists and has entries; a missing directory has none.
pub(super) fn dir_has_entries(dir: &Path) -> Result<bool> {
    match fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_some()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("cannot read directory {}", dir.display())),
    }
}

/// The last `LOG_TAIL_LINES` lines of a log, formatted to append to an error message.
pub(super) fn log_tail_note(log: &Path) -> String {
    match log_tail(log, LOG_TAIL_LINES) {
        Ok(tail) if tail.trim().is_empty() => format!("; its log {} is empty", log.display()),
        Ok(tail) => format!(
            "\n--- last {LOG_TAIL_LINES} lines of {} ---\n{tail}",
            log.display()
        ),
        Err(e) => format!("; cannot read its log {}: {e}", log.display()),
    }
}

/// The last `lines` lines of a file (reading at most its last 64 KiB).
fn log_tail(path: &Path, lines: usize) -> io::Result<String> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)))?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf)?;
    Ok(last_lines(&String::from_utf8_lossy(&buf), lines))
}

fn last_lines(text: &str, n: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(n)..].join("\n")
}

/// ": stderr" (or stdout if stderr is empty) for an error message.
pub(super) fn quote_output(stderr: &[u8], stdout: &[u8]) -> String {
    let text = if stderr.iter().all(u8::is_ascii_whitespace) {
        stdout
    } else {
        stderr
    };
    let text = String::from_utf8_lossy(text);
    let text = text.trim();
    if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    }
}

pub(super) fn join_names<'a>(names: impl Iterator<Item = &'a str>) -> String {
    names.collect::<Vec<_>>().join(", ")
}

pub(super) fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `Ok` if no errors; else one error listing all of them.
pub(super) fn combine_errors(mut errors: Vec<anyhow::Error>) -> Result<()> {
    match errors.len() {
        0 => Ok(()),
        1 => Err(errors.remove(0)),
        n => {
            let all: Vec<String> = errors.iter().map(|e| format!("{e:#}")).collect();
            Err(anyhow!(
                "{n} cleanup steps failed:\n  - {}",
                all.join("\n  - ")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_tails() {
        assert_eq!(last_lines("1\n2\n3\n", 2), "2\n3");
        assert_eq!(last_lines("1\n", 5), "1");
        assert_eq!(last_lines("", 5), "");
    }
}
