//! Disk locks: a disk image belongs to one running guest in the whole cluster, as VMFS's on-disk
//! locks make it on ESX.
//!
//! A lock is a file next to the datastore's disks, created exactly once with `link(2)` (atomic on
//! local filesystems and NFS alike, like the ownership records):
//!
//! ```text
//! DATASTORE/.ferry-locks/dk%2Fdk.img.lock   {"disk":"[shared] dk/dk.img","vm":"dk2","host":"a",...}
//! DATASTORE/.ferry-locks/hosts/a            heartbeat: its mtime is renewed every lease/3
//! ```
//!
//! The lock names the **guest** that holds the disk. Which host runs that guest is the guest's
//! ownership record when `[cluster] ownership_datastore` is configured — so the lock moves with the
//! guest at the migration's commit point, inside the very `link(2)` that moves the ownership
//! record, and a failed migration leaves it with the source. The lock's own `host` field is then
//! informational (the destination rewrites it right after the commit); without ownership records
//! it is the only word, rewritten by the destination right after the commit.
//!
//! | when | what |
//! |---|---|
//! | a guest starts (created running, started, restored, arriving by migration) | lock taken for the guest; refused if another guest holds it |
//! | the guest stops, is destroyed, or has migrated away | released by the host that runs it (a migrated-away copy releases nothing: the lock is the destination's) |
//! | the holder's host stops renewing its heartbeat for a lease (default 30 s) | the lock is reported **stale**; it is taken over only by `ferry disk unlock DISK` (which refuses a live holder), never silently |

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::datastore::{DatastoreError, Datastores};

/// Directory of the locks inside a datastore.
pub const LOCK_DIR: &str = ".ferry-locks";
/// Default lease: a host whose heartbeat is older than this is presumed dead.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// Errors of disk locks.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(transparent)]
    Datastore(#[from] DatastoreError),
    #[error("disk lock {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk {disk:?} is in use by guest {vm:?} on host {host}{}", if *.stale { " (that host has stopped renewing its lease: if it is really down, `ferry disk unlock` releases the lock)" } else { "; stop or destroy that guest first" })]
    Locked {
        disk: String,
        vm: String,
        host: String,
        stale: bool,
    },
    #[error("disk {disk:?} is locked by guest {vm:?} on host {host}, which is alive (heartbeat {age_s} s ago): stop or destroy the guest there instead")]
    NotStale {
        disk: String,
        vm: String,
        host: String,
        age_s: u64,
    },
    #[error("disk {0:?} is not locked")]
    NotLocked(String),
}

/// What a lock file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRecord {
    pub disk: String,
    pub vm: String,
    /// The host that took (or, after a migration, took over) the lock.
    pub host: String,
    pub taken_unix: u64,
}

/// A lock as seen now: who holds it and whether its host is alive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockHolder {
    pub vm: String,
    /// The host that runs the holder (its ownership record's owner where there is one).
    pub host: String,
    /// The holder's host has not renewed its heartbeat within the lease.
    pub stale: bool,
    /// Seconds since that host's last heartbeat (None: it never wrote one here).
    pub heartbeat_age_s: Option<u64>,
}

/// A disk of a guest and who holds its lock (`ferry vm inspect`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskLockInfo {
    pub disk: String,
    /// None: nobody (the guest is not running, or the lock could not be read: see `error`).
    pub holder: Option<LockHolder>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The host's disk locks over its datastores.
#[derive(Debug, Clone)]
pub struct DiskLocks {
    host: String,
    lease: Duration,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LockError {
    let path = path.to_path_buf();
    move |source| LockError::Io { path, source }
}

/// The lock file's name for a disk's path inside its datastore: `/` and `%` escaped.
fn lock_name(rel: &str) -> String {
    let mut s = String::with_capacity(rel.len() + 5);
    for c in rel.chars() {
        match c {
            '%' => s.push_str("%25"),
            '/' => s.push_str("%2F"),
            c => s.push(c),
        }
    }
    s.push_str(".lock");
    s
}

impl DiskLocks {
    pub fn new(host: &str, lease: Duration) -> DiskLocks {
        DiskLocks {
            host: host.to_string(),
            lease,
        }
    }

    fn lock_path(&self, ds: &Datastores, disk: &str) -> Result<PathBuf, LockError> {
        let (dir, rel) = ds.locate(disk)?;
        Ok(dir.join(LOCK_DIR).join(lock_name(rel)))
    }

    fn read(path: &Path) -> Result<Option<LockRecord>, LockError> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| LockError::Io {
                    path: path.to_path_buf(),
                    source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(path)(e)),
        }
    }

    /// Write `rec` to a temporary file in the lock directory; returns its path.
    fn write_temp(dir: &Path, rec: &LockRecord) -> Result<PathBuf, LockError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let nonce = crate::util::random_u64().map_err(|e| LockError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let tmp = dir.join(format!(".tmp-{}-{nonce:016x}", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io(&tmp))?;
        let text = serde_json::to_vec(rec).unwrap_or_default();
        f.write_all(&text).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        Ok(tmp)
    }

    /// The holder's host and liveness. `owner_of(vm)` gives the guest's ownership record's owner
    /// where ownership records are kept.
    fn holder_of(
        &self,
        ds: &Datastores,
        disk: &str,
        rec: &LockRecord,
        owner_of: &dyn Fn(&str) -> Option<String>,
    ) -> LockHolder {
        let host = owner_of(&rec.vm).unwrap_or_else(|| rec.host.clone());
        let age = self.heartbeat_age(ds, disk, &host);
        LockHolder {
            vm: rec.vm.clone(),
            stale: host != self.host && age.is_none_or(|a| a > self.lease),
            heartbeat_age_s: age.map(|a| a.as_secs()),
            host,
        }
    }

    fn heartbeat_age(&self, ds: &Datastores, disk: &str, host: &str) -> Option<Duration> {
        let dir = self.lock_path(ds, disk).ok()?.parent()?.to_path_buf();
        let m = std::fs::metadata(dir.join("hosts").join(host)).ok()?;
        let t = m.modified().ok()?;
        Some(SystemTime::now().duration_since(t).unwrap_or_default())
    }

    /// Who holds `disk`, if anyone.
    pub fn holder(
        &self,
        ds: &Datastores,
        disk: &str,
        owner_of: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<LockHolder>, LockError> {
        let path = self.lock_path(ds, disk)?;
        Ok(Self::read(&path)?.map(|r| self.holder_of(ds, disk, &r, owner_of)))
    }

    /// Take `disk` for guest `vm` (recorded as held on `host`, normally this one). Holding it
    /// already is fine; another guest holding it, on any host, is refused with its name and
    /// host. Of several hosts racing for a free disk exactly one wins (`link(2)`).
    pub fn acquire(
        &self,
        ds: &Datastores,
        disk: &str,
        vm: &str,
        host: &str,
        owner_of: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(), LockError> {
        let path = self.lock_path(ds, disk)?;
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let rec = LockRecord {
            disk: disk.to_string(),
            vm: vm.to_string(),
            host: host.to_string(),
            taken_unix: now_unix(),
        };
        for _ in 0..10 {
            let tmp = Self::write_temp(&dir, &rec)?;
            let linked = std::fs::hard_link(&tmp, &path);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Ok(()) => {
                    tracing::info!(disk, vm, "disk lock taken");
                    return Ok(());
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io(&path)(e)),
            }
            match Self::read(&path)? {
                Some(cur) if cur.vm == vm => return Ok(()),
                Some(cur) => {
                    let h = self.holder_of(ds, disk, &cur, owner_of);
                    return Err(LockError::Locked {
                        disk: disk.to_string(),
                        vm: h.vm,
                        host: h.host,
                        stale: h.stale,
                    });
                }
                // Released between our link and our read: try again.
                None => continue,
            }
        }
        Err(LockError::Io {
            path,
            source: std::io::Error::other("the lock kept changing under us; try again"),
        })
    }

    /// Release `disk` if guest `vm` holds it and runs here (`owner_of` says where it runs). A
    /// copy that migrated away, or a destination whose migration failed, releases nothing.
    pub fn release(
        &self,
        ds: &Datastores,
        disk: &str,
        vm: &str,
        owner_of: &dyn Fn(&str) -> Option<String>,
    ) -> Result<bool, LockError> {
        let path = self.lock_path(ds, disk)?;
        let Some(cur) = Self::read(&path)? else {
            return Ok(false);
        };
        let host = owner_of(&cur.vm).unwrap_or_else(|| cur.host.clone());
        if cur.vm != vm || host != self.host {
            return Ok(false);
        }
        std::fs::remove_file(&path).map_err(io(&path))?;
        tracing::info!(disk, vm, "disk lock released");
        Ok(true)
    }

    /// After the commit of an incoming migration: record this host in the lock of guest `vm`
    /// (atomic `rename(2)`; where ownership records exist they already decided, this only keeps
    /// the file informative).
    pub fn hand_over(&self, ds: &Datastores, disk: &str, vm: &str) -> Result<(), LockError> {
        let path = self.lock_path(ds, disk)?;
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        match Self::read(&path)? {
            Some(cur) if cur.vm == vm && cur.host != self.host => {
                let rec = LockRecord {
                    host: self.host.clone(),
                    taken_unix: now_unix(),
                    ..cur
                };
                let tmp = Self::write_temp(&dir, &rec)?;
                std::fs::rename(&tmp, &path).map_err(io(&path))
            }
            _ => Ok(()),
        }
    }

    /// `ferry disk unlock`: remove a lock whose holder's host is presumed dead. Refuses a live
    /// holder. The removed lock is kept as `NAME.broken-UNIX` for the record.
    pub fn break_stale(
        &self,
        ds: &Datastores,
        disk: &str,
        owner_of: &dyn Fn(&str) -> Option<String>,
    ) -> Result<LockHolder, LockError> {
        let path = self.lock_path(ds, disk)?;
        let cur = Self::read(&path)?.ok_or_else(|| LockError::NotLocked(disk.to_string()))?;
        let h = self.holder_of(ds, disk, &cur, owner_of);
        if !h.stale {
            return Err(LockError::NotStale {
                disk: disk.to_string(),
                vm: h.vm,
                host: h.host,
                age_s: h.heartbeat_age_s.unwrap_or(0),
            });
        }
        let mut kept = path.clone().into_os_string();
        kept.push(format!(".broken-{}", now_unix()));
        std::fs::rename(&path, &kept).map_err(io(&path))?;
        tracing::warn!(disk, vm = %h.vm, host = %h.host, "stale disk lock broken by the operator");
        Ok(h)
    }

    /// Release every lock guest `vm` holds on this host, in every datastore (a guest lost when
    /// the agent stopped: its spec is gone, its locks are not). Returns the disks released.
    pub fn release_all_of(
        &self,
        dirs: &BTreeMap<String, PathBuf>,
        vm: &str,
        owner_of: &dyn Fn(&str) -> Option<String>,
    ) -> Vec<String> {
        let mut released = Vec::new();
        for dir in dirs.values() {
            let Ok(entries) = std::fs::read_dir(dir.join(LOCK_DIR)) else {
                continue;
            };
            for e in entries.flatten() {
                let path = e.path();
                if path.extension().is_none_or(|x| x != "lock") {
                    continue;
                }
                let Ok(Some(cur)) = Self::read(&path) else {
                    continue;
                };
                let host = owner_of(&cur.vm).unwrap_or_else(|| cur.host.clone());
                if cur.vm == vm && host == self.host && std::fs::remove_file(&path).is_ok() {
                    tracing::info!(disk = %cur.disk, vm, "disk lock of a lost guest released");
                    released.push(cur.disk);
                }
            }
        }
        released
    }

    /// Renew this host's heartbeat in every datastore (call every lease/3).
    pub fn heartbeat(&self, dirs: &BTreeMap<String, PathBuf>) {
        for dir in dirs.values() {
            let hosts = dir.join(LOCK_DIR).join("hosts");
            let file = hosts.join(&self.host);
            let res = std::fs::create_dir_all(&hosts).and_then(|()| {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&file)?;
                f.set_modified(SystemTime::now())
            });
            if let Err(e) = res {
                tracing::debug!(path = %file.display(), error = %e, "could not renew the disk-lock heartbeat");
            }
        }
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(tag: &str) -> (PathBuf, BTreeMap<String, PathBuf>, Datastores) {
        let dir = std::env::temp_dir().join(format!("ferry-lock-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut cfg = BTreeMap::new();
        cfg.insert("shared".to_string(), dir.join("shared"));
        let ds = Datastores::open(&cfg).unwrap();
        (dir, cfg, ds)
    }

    const DISK: &str = "[shared] dk/dk.img";

    #[test]
    fn one_guest_holds_a_disk_and_others_are_told_who() {
        let (dir, cfg, ds) = setup("one");
        let nobody = |_: &str| None;
        let a = DiskLocks::new("a", DEFAULT_LEASE);
        let b = DiskLocks::new("b", DEFAULT_LEASE);
        a.heartbeat(&cfg);
        b.heartbeat(&cfg);
        a.acquire(&ds, DISK, "dk2", "a", &nobody).unwrap();
        a.acquire(&ds, DISK, "dk2", "a", &nobody).unwrap();
        let e = a.acquire(&ds, DISK, "dk4", "a", &nobody).unwrap_err();
        assert!(e.to_string().contains("guest \"dk2\" on host a"), "{e}");
        let e = b.acquire(&ds, DISK, "dk3", "b", &nobody).unwrap_err();
        assert!(matches!(e, LockError::Locked { stale: false, .. }), "{e}");
        // b does not run dk2: it cannot release a's lock; a can.
        assert!(!b.release(&ds, DISK, "dk2", &nobody).unwrap());
        assert!(a.release(&ds, DISK, "dk2", &nobody).unwrap());
        b.acquire(&ds, DISK, "dk3", "b", &nobody).unwrap();
        let h = a.holder(&ds, DISK, &nobody).unwrap().unwrap();
        assert_eq!(
            (h.vm.as_str(), h.host.as_str(), h.stale),
            ("dk3", "b", false)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_holder_follows_the_ownership_record() {
        let (dir, _cfg, ds) = setup("own");
        let a = DiskLocks::new("a", DEFAULT_LEASE);
        let b = DiskLocks::new("b", DEFAULT_LEASE);
        let on_a = |_: &str| Some("a".to_string());
        let on_b = |_: &str| Some("b".to_string());
        a.acquire(&ds, DISK, "vm", "a", &on_a).unwrap();
        // The destination of a migration takes the lock of the same guest: no conflict.
        b.acquire(&ds, DISK, "vm", "a", &on_a).unwrap();
        // Before the commit the record says a: b releases nothing (a failed migration).
        assert!(!b.release(&ds, DISK, "vm", &on_a).unwrap());
        // After it the record says b: a's copy releases nothing, b holds it.
        assert!(!a.release(&ds, DISK, "vm", &on_b).unwrap());
        assert_eq!(a.holder(&ds, DISK, &on_b).unwrap().unwrap().host, "b");
        b.hand_over(&ds, DISK, "vm").unwrap();
        let nobody = |_: &str| None;
        assert_eq!(a.holder(&ds, DISK, &nobody).unwrap().unwrap().host, "b");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_dead_hosts_lock_is_stale_and_only_broken_on_purpose() {
        let (dir, cfg, ds) = setup("stale");
        let nobody = |_: &str| None;
        let a = DiskLocks::new("a", Duration::from_secs(1));
        let b = DiskLocks::new("b", Duration::from_secs(1));
        a.heartbeat(&cfg);
        a.acquire(&ds, DISK, "dk2", "a", &nobody).unwrap();
        let e = b.break_stale(&ds, DISK, &nobody).unwrap_err();
        assert!(matches!(e, LockError::NotStale { .. }), "{e}");
        std::thread::sleep(Duration::from_millis(2100));
        let e = b.acquire(&ds, DISK, "dk3", "b", &nobody).unwrap_err();
        assert!(matches!(e, LockError::Locked { stale: true, .. }), "{e}");
        assert!(e.to_string().contains("ferry disk unlock"), "{e}");
        let h = b.break_stale(&ds, DISK, &nobody).unwrap();
        assert_eq!(h.vm, "dk2");
        b.acquire(&ds, DISK, "dk3", "b", &nobody).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn racing_hosts_exactly_one_wins() {
        let (dir, _cfg, ds) = setup("race");
        for round in 0..20 {
            let disk = format!("[shared] race/{round}.img");
            let wins: usize = std::thread::scope(|s| {
                let hs: Vec<_> = (0..4)
                    .map(|i| {
                        let (ds, disk) = (&ds, &disk);
                        s.spawn(move || {
                            let l = DiskLocks::new(&format!("h{i}"), DEFAULT_LEASE);
                            l.acquire(ds, disk, &format!("vm{i}"), &format!("h{i}"), &|_| None)
                                .is_ok() as usize
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).sum()
            });
            assert_eq!(wins, 1, "round {round}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn lock_names_are_unambiguous() {
        assert_eq!(lock_name("dk/dk.img"), "dk%2Fdk.img.lock");
        assert_ne!(lock_name("a/b"), lock_name("a%2Fb"));
    }
}
