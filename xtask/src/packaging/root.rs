//! The container's root: the cached debootstrap base, the run's own copy of it (removed when
//! the run ends, or by a later run if this one was killed), and snapshots of its paths.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use super::command::bounded;
use super::mirror::mirror;
use super::{INCLUDE, SUITE};

/// The cached Debian root: made once with debootstrap (into a temporary directory, renamed
/// when complete, so an interrupted run leaves no half-made cache).
pub(super) fn base_root(work: &Path) -> Result<PathBuf> {
    let base = work.join(format!("base-{SUITE}"));
    let stamp = work.join(format!("base-{SUITE}.done"));
    let recipe = format!("debootstrap --variant=minbase --include={INCLUDE} {SUITE}");
    if base.is_dir() && std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == recipe) {
        println!("packaging: reusing {} ({recipe})", base.display());
        return Ok(base);
    }
    let mirror = mirror()?;
    let tmp = work.join(format!("base-{SUITE}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    println!(
        "packaging: {recipe} {} {mirror} (once; cached)",
        tmp.display()
    );
    let out = bounded(
        Command::new("debootstrap")
            .args(["--variant=minbase", &format!("--include={INCLUDE}"), SUITE])
            .arg(&tmp)
            .arg(&mirror),
        1200,
        "debootstrap",
    );
    if let Err(e) = out {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!(
            "debootstrap of {SUITE} from {mirror} failed: is Debian's archive reachable? \
             (set FERRY_PACKAGING_MIRROR to use another mirror)"
        )));
    }
    let _ = std::fs::remove_dir_all(&base);
    std::fs::rename(&tmp, &base)?;
    std::fs::write(&stamp, format!("{recipe}\n"))?;
    Ok(base)
}

/// `cp -a --reflink=auto` (the root holds device nodes, owners and modes to keep).
pub(super) fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    bounded(
        Command::new("cp")
            .args(["-a", "--reflink=auto", "--"])
            .arg(from)
            .arg(to),
        300,
        "copying the base root",
    )?;
    Ok(())
}

/// Every path in the root, except the ones that change by themselves while a system runs
/// (logs, caches, dpkg's and apt's databases, systemd's own state files).
pub(super) fn snapshot(root: &Path) -> Result<BTreeSet<String>> {
    const SKIP: &[&str] = &[
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "mnt",
        "var/tmp",
        "var/log",
        "var/cache",
        "var/lib/dpkg",
        "var/lib/apt",
        "var/lib/systemd/timers",
        "var/lib/systemd/coredump",
        "var/lib/systemd/random-seed",
    ];
    fn walk(root: &Path, rel: &Path, out: &mut BTreeSet<String>, skip: &[&str]) -> Result<()> {
        let dir = root.join(rel);
        for e in
            std::fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))?
        {
            let e = e?;
            let r = rel.join(e.file_name());
            let s = r.to_string_lossy().into_owned();
            if skip.contains(&s.as_str()) {
                continue;
            }
            let ft = e.file_type()?;
            out.insert(s);
            if ft.is_dir() {
                walk(root, &r, out, skip)?;
            }
        }
        Ok(())
    }
    let mut out = BTreeSet::new();
    walk(root, Path::new(""), &mut out, SKIP)?;
    Ok(out)
}

/// Remove `run-PID` directories of earlier runs that were killed before they could clean up:
/// their process is gone and no systemd-nspawn still uses the directory.
pub(super) fn remove_stale_runs(work: &Path) {
    let Ok(rd) = std::fs::read_dir(work) else {
        return;
    };
    let in_use = |dir: &Path| {
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return true;
        };
        let needle = dir.to_string_lossy().into_owned();
        procs.flatten().any(|p| {
            std::fs::read(p.path().join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
        })
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("run-")
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let dir = e.path();
        if pid != std::process::id()
            && !Path::new(&format!("/proc/{pid}")).exists()
            && !in_use(&dir)
        {
            println!(
                "packaging: removing {} (left by an interrupted run)",
                dir.display()
            );
            if let Err(err) = std::fs::remove_dir_all(&dir) {
                eprintln!("packaging: cannot remove {}: {err}", dir.display());
            }
        }
    }
}

/// The run's directory (the container's root, nspawn's log), removed when dropped.
pub(super) struct RunDir {
    pub(super) path: PathBuf,
}

impl RunDir {
    pub(super) fn new(path: PathBuf) -> Result<Self> {
        if path.exists() {
            std::fs::remove_dir_all(&path)?;
        }
        std::fs::create_dir_all(&path)?;
        Ok(Self { path })
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("packaging: cannot remove {}: {e}", self.path.display());
        }
    }
}
