//! What `/proc` says about processes: whether a pid is still the process it was (start time),
//! and which processes live inside a lab's namespaces.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::Result;

use super::process::stop_processes;
use super::util::combine_errors;

/// Whether `pid` is alive (not a zombie) and is the recorded agent: same start time if one was
/// recorded, else a command line that mentions `config`.
pub(super) fn same_process_alive(pid: u32, start_time: Option<u64>, config: &Path) -> bool {
    process_alive(pid, start_time)
        && (start_time.is_some()
            || fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
                let config = config.as_os_str().as_encoded_bytes();
                cmdline.split(|b| *b == 0).any(|arg| arg == config)
            }))
}

/// Whether `pid` is alive (not a zombie) and, if `start_time` is given, started then.
fn process_alive(pid: u32, start_time: Option<u64>) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some(fields) = parse_stat(&stat) else {
        return false;
    };
    fields.state != 'Z' && fields.state != 'X' && start_time.is_none_or(|t| t == fields.start_time)
}

/// A process found inside one of a lab's namespaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct StrayProcess {
    pub(super) pid: u32,
    start_time: Option<u64>,
    pub(super) netns: String,
}

/// Processes other than this one whose network namespace is one of `namespaces` (compared by
/// the nsfs device and inode of `/run/netns/NAME` and `/proc/PID/ns/net`).
fn processes_in(namespaces: &[String]) -> Vec<StrayProcess> {
    let ids: Vec<((u64, u64), &String)> = namespaces
        .iter()
        .filter_map(|ns| {
            let meta = fs::metadata(Path::new("/run/netns").join(ns)).ok()?;
            Some(((meta.dev(), meta.ino()), ns))
        })
        .collect();
    if ids.is_empty() {
        return Vec::new();
    }
    let me = std::process::id();
    let Ok(proc_dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    proc_dir
        .filter_map(|entry| {
            let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            if pid == me {
                return None;
            }
            let meta = fs::metadata(format!("/proc/{pid}/ns/net")).ok()?;
            let (_, ns) = ids.iter().find(|(id, _)| *id == (meta.dev(), meta.ino()))?;
            Some(StrayProcess {
                pid,
                start_time: proc_start_time(pid),
                netns: (*ns).clone(),
            })
        })
        .collect()
}

/// Stops every process still running inside `namespaces` (things tests started with
/// [`Lab::exec`](super::Lab::exec) that daemonized, agents without a record), so that deleting the namespaces
/// really frees them. Returns the processes stopped.
pub(super) fn stop_processes_in(namespaces: &[String]) -> Result<Vec<StrayProcess>> {
    let strays = processes_in(namespaces);
    let pids: Vec<u32> = strays.iter().map(|p| p.pid).collect();
    let results = stop_processes(&pids, |i| !process_alive(pids[i], strays[i].start_time));
    let mut errors = Vec::new();
    for (p, result) in strays.iter().zip(results) {
        if let Err(e) = result {
            errors.push(e.context(format!(
                "cannot stop pid {} in namespace {}",
                p.pid, p.netns
            )));
        }
    }
    combine_errors(errors).map(|()| strays)
}

struct StatFields {
    state: char,
    start_time: u64,
}

/// State and start time from `/proc/PID/stat` (the command name may hold spaces and parens,
/// so fields are counted after the last `)`).
fn parse_stat(stat: &str) -> Option<StatFields> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is fields[0]; field 22 (starttime) is fields[19].
    Some(StatFields {
        state: fields.first()?.chars().next()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

pub(super) fn proc_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat).map(|f| f.start_time)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing_survives_odd_command_names() {
        let stat = "4242 (we ird) (name)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    987654 1000 100 18446744073709551615";
        let f = parse_stat(stat).unwrap();
        assert_eq!(f.state, 'S');
        assert_eq!(f.start_time, 987_654);
        assert!(parse_stat("garbage").is_none());
        let me = proc_start_time(std::process::id()).unwrap();
        assert!(me > 0);
    }

    #[test]
    fn no_processes_in_namespaces_that_do_not_exist() {
        assert!(processes_in(&["ferry-no-such-lab-a".to_owned()]).is_empty());
        assert!(process_alive(std::process::id(), None));
        assert!(!process_alive(std::process::id(), Some(0)));
    }
}
