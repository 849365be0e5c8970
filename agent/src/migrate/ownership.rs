//! Who owns a guest: records on a datastore every host of the cluster shares
//! (`[cluster] ownership_datastore`), one file per generation, each generation created exactly
//! once with `link(2)` — the commit point of a migration is the destination creating the next
//! generation.
//!
//! ```text
//! DATASTORE/.ferry-owners/VM/00000000000000000007.json  {"vm":"vm1","owner":"b","generation":7,...}
//! ```
//!
//! The current record is the highest generation. A change reads generation N, checks its owner,
//! writes N+1 to a temporary file and hard-links it to its final name: the link fails if N+1
//! exists, so of two hosts racing for the same generation exactly one wins (on local
//! filesystems and NFS alike), and a reader sees whole records only.
//!
//! | when | writer | change |
//! |---|---|---|
//! | a guest is created (or one owned by nobody is started) | its host | owner = that host |
//! | commit of a migration | the destination, on `Commit {generation: N}`, before its vCPUs run | N (source) → N+1 (destination) |
//! | the source heard nothing after `Commit` | the source | N (source) → N+1 (source): fences the destination out, then resumes |
//! | the destination is reachable and has no such guest | the source | destination → source, then resumes |
//! | the destination could not start the guest after claiming it | the destination | destination → source |
//! | the guest is destroyed | its owner | owner = none |
//!
//! An agent never resumes a guest whose current record names another host. See
//! `docs/fault-tolerance.md` for what each side does when the other is silent.

use std::io::Write;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Generations older than the newest by more than this are removed.
const KEEP: u64 = 8;

/// Errors of ownership records.
#[derive(Debug, thiserror::Error)]
pub enum OwnershipError {
    #[error("ownership record {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The record is not what the caller expected (someone else owns it, or it moved on).
    #[error("{vm} is owned by {} (generation {}), not {expected} at generation {expected_generation}", .found.owner_name(), .found.generation)]
    Changed {
        vm: String,
        found: Box<Record>,
        expected: String,
        expected_generation: u64,
    },
    #[error("ownership record {0} is corrupt")]
    Corrupt(PathBuf),
    /// A destination may take a guest only from the host its record names.
    #[error("the record of {vm} names {} (generation {}), not {from}", .found.owner_name(), .found.generation)]
    NotFrom {
        vm: String,
        found: Box<Record>,
        from: String,
    },
}

/// One generation of a guest's ownership.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub vm: String,
    /// The host that may run the guest; None once destroyed.
    pub owner: Option<String>,
    pub generation: u64,
    /// The migration that made this change, if one did.
    pub migration: Option<String>,
    /// Why: "created", "migrated", "fenced", "reclaimed", "returned", "destroyed".
    pub reason: String,
    pub updated_unix: u64,
}

impl Record {
    pub fn owner_name(&self) -> &str {
        self.owner.as_deref().unwrap_or("nobody")
    }
    pub fn owned_by(&self, host: &str) -> bool {
        self.owner.as_deref() == Some(host)
    }
}

/// A record written ahead by [`Ownership::stage`]; [`Ownership::publish`] makes it current.
/// Dropped unpublished, it removes its temporary file.
#[derive(Debug)]
pub struct Staged {
    tmp: PathBuf,
    record: Record,
    expect: Option<String>,
}

impl Staged {
    /// The record it would make current.
    pub fn record(&self) -> &Record {
        &self.record
    }
    /// The owner the current record must name for it to apply.
    pub fn expects(&self) -> Option<&str> {
        self.expect.as_deref()
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// The ownership records of a cluster.
#[derive(Debug, Clone)]
pub struct Ownership {
    dir: PathBuf,
}

impl Ownership {
    /// Records under `datastore_dir/.ferry-owners`.
    pub fn new(datastore_dir: PathBuf) -> Ownership {
        Ownership {
            dir: datastore_dir.join(".ferry-owners"),
        }
    }

    fn vm_dir(&self, vm: &str) -> PathBuf {
        self.dir.join(vm)
    }

    fn gen_path(&self, vm: &str, generation: u64) -> PathBuf {
        self.vm_dir(vm).join(format!("{generation:020}.json"))
    }

    fn io(path: PathBuf) -> impl FnOnce(std::io::Error) -> OwnershipError {
        move |source| OwnershipError::Io { path, source }
    }

    fn generations(&self, vm: &str) -> Result<Vec<u64>, OwnershipError> {
        let dir = self.vm_dir(vm);
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Self::io(dir)(e)),
        };
        let mut gens: Vec<u64> = rd
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_suffix(".json")?.parse().ok()
            })
            .collect();
        gens.sort_unstable();
        Ok(gens)
    }

    /// The current record of `vm` (None: it never had one).
    pub fn current(&self, vm: &str) -> Result<Option<Record>, OwnershipError> {
        let Some(&g) = self.generations(vm)?.last() else {
            return Ok(None);
        };
        let path = self.gen_path(vm, g);
        let bytes = std::fs::read(&path).map_err(Self::io(path.clone()))?;
        let r: Record =
            serde_json::from_slice(&bytes).map_err(|_| OwnershipError::Corrupt(path.clone()))?;
        if r.generation != g || r.vm != vm {
            return Err(OwnershipError::Corrupt(path));
        }
        Ok(Some(r))
    }

    /// Every guest with a record, and its current record.
    pub fn all(&self) -> Vec<Record> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        rd.flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !n.starts_with('.'))
            .filter_map(|n| self.current(&n).ok().flatten())
            .collect()
    }

    /// Create generation `expect_generation + 1` owned by `to`, if the current record is
    /// generation `expect_generation` owned by `expect` (generation 0: no record yet). Exactly one
    /// of several hosts racing for the same generation succeeds. Durable when it returns.
    pub fn claim(
        &self,
        vm: &str,
        expect: Option<&str>,
        expect_generation: u64,
        to: Option<&str>,
        migration: Option<&str>,
        reason: &str,
    ) -> Result<Record, OwnershipError> {
        let staged = self.stage(vm, expect, expect_generation, to, migration, reason)?;
        let r = self.publish(&staged)?;
        self.sync(vm);
        Ok(r)
    }

    /// The first half of [`Ownership::claim`], which can run ahead of the moment that matters:
    /// check the current record and write generation `expect_generation + 1` to a temporary file,
    /// flushed to storage. Nothing changes for readers until [`Ownership::publish`].
    pub fn stage(
        &self,
        vm: &str,
        expect: Option<&str>,
        expect_generation: u64,
        to: Option<&str>,
        migration: Option<&str>,
        reason: &str,
    ) -> Result<Staged, OwnershipError> {
        let changed = |found: Record| OwnershipError::Changed {
            vm: vm.into(),
            found: Box::new(found),
            expected: expect.unwrap_or("nobody").into(),
            expected_generation: expect_generation,
        };
        let cur = self.current(vm)?;
        match &cur {
            Some(c) if c.generation != expect_generation || c.owner.as_deref() != expect => {
                return Err(changed(c.clone()))
            }
            None if expect_generation != 0 => {
                return Err(changed(Record {
                    vm: vm.into(),
                    owner: None,
                    generation: 0,
                    migration: None,
                    reason: "no record".into(),
                    updated_unix: 0,
                }))
            }
            _ => {}
        }
        let r = Record {
            vm: vm.into(),
            owner: to.map(str::to_string),
            generation: expect_generation + 1,
            migration: migration.map(str::to_string),
            reason: reason.into(),
            updated_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let dir = self.vm_dir(vm);
        std::fs::create_dir_all(&dir).map_err(Self::io(dir.clone()))?;
        let tmp = dir.join(format!(
            ".{:016x}.tmp",
            crate::util::random_u64().map_err(|e| OwnershipError::Io {
                path: dir.clone(),
                source: std::io::Error::other(e.to_string()),
            })?
        ));
        let body = serde_json::to_vec_pretty(&r).unwrap_or_default();
        let written = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&body)?;
            f.sync_all()
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(Self::io(tmp)(e));
        }
        Ok(Staged {
            tmp,
            record: r,
            expect: expect.map(str::to_string),
        })
    }

    /// The second half of [`Ownership::claim`]: create the staged generation with one `link(2)`.
    /// Every reader sees it from then on. NFS makes a link stable before it answers; on a local
    /// filesystem it survives a power loss of the storage once [`Ownership::sync`] or the
    /// filesystem's own next commit has run (a migration's commit flushes nothing: see
    /// `docs/fault-tolerance.md`).
    pub fn publish(&self, staged: &Staged) -> Result<Record, OwnershipError> {
        let vm = staged.record.vm.clone();
        let dest = self.gen_path(&vm, staged.record.generation);
        let linked = std::fs::hard_link(&staged.tmp, &dest);
        match linked {
            Ok(()) => Ok(staged.record.clone()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                // Lost the race for this generation.
                let now = self.current(&vm)?.unwrap_or_else(|| staged.record.clone());
                Err(OwnershipError::Changed {
                    vm,
                    found: Box::new(now),
                    expected: staged.expect.clone().unwrap_or_else(|| "nobody".into()),
                    expected_generation: staged.record.generation - 1,
                })
            }
            Err(e) => Err(Self::io(dest)(e)),
        }
        // The temporary file goes when the caller drops `staged` (after the moment that matters).
    }

    /// The commit point on a destination: make `me` the owner of `vm`, taking it from `from`
    /// at `generation` (None: the source keeps no records; its generation is read here), with
    /// the record `prepared` ahead of the pause if it fits (one `link(2)` then). Returns the
    /// spent staging and the record now current.
    pub fn take_over(
        &self,
        vm: &str,
        from: &str,
        generation: Option<u64>,
        me: &str,
        migration: &str,
        prepared: Option<Staged>,
    ) -> Result<(Staged, Record), OwnershipError> {
        let g = match generation {
            Some(g) => g,
            None => match self.current(vm)? {
                Some(r) if r.owned_by(from) => r.generation,
                Some(r) => {
                    return Err(OwnershipError::NotFrom {
                        vm: vm.to_string(),
                        found: Box::new(r),
                        from: from.to_string(),
                    })
                }
                None => 0,
            },
        };
        let expect = if generation.is_none() && g == 0 {
            None
        } else {
            Some(from)
        };
        let staged = match prepared {
            Some(s) if s.record().generation == g + 1 && s.expects() == expect => s,
            _ => self.stage(vm, expect, g, Some(me), Some(migration), "migrated")?,
        };
        let r = self.publish(&staged)?;
        Ok((staged, r))
    }

    /// Flush `vm`'s record directory (the links [`Ownership::publish`] made) and drop old
    /// generations.
    pub fn sync(&self, vm: &str) {
        if let Ok(d) = std::fs::File::open(self.vm_dir(vm)) {
            let _ = d.sync_all();
        }
        self.prune(vm);
    }

    /// Drop old generations: they are history; a few stay for the curious.
    pub fn prune(&self, vm: &str) {
        if let Ok(gens) = self.generations(vm) {
            if let Some(&newest) = gens.last() {
                for g in gens.into_iter().filter(|g| g + KEEP < newest) {
                    let _ = std::fs::remove_file(self.gen_path(vm, g));
                }
            }
        }
        // Records staged by an agent that died before it could publish or drop them.
        let stale = std::time::Duration::from_secs(3600);
        for e in std::fs::read_dir(self.vm_dir(vm))
            .into_iter()
            .flatten()
            .flatten()
        {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > stale));
            if old && e.file_name().to_string_lossy().ends_with(".tmp") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Make `host` the owner of `vm` if nobody owns it (no record, or destroyed); Ok if it
    /// already does; an error naming the owner otherwise.
    pub fn adopt(&self, vm: &str, host: &str) -> Result<Record, OwnershipError> {
        match self.current(vm)? {
            Some(r) if r.owned_by(host) => Ok(r),
            Some(r) if r.owner.is_some() => Err(OwnershipError::Changed {
                vm: vm.into(),
                found: Box::new(r),
                expected: host.into(),
                expected_generation: 0,
            }),
            cur => {
                let g = cur.as_ref().map_or(0, |c| c.generation);
                self.claim(vm, None, g, Some(host), None, "created")
            }
        }
    }

    /// Mark `vm` owned by nobody if `host` owns it now.
    pub fn release(&self, vm: &str, host: &str) -> Result<(), OwnershipError> {
        match self.current(vm)? {
            Some(r) if r.owned_by(host) => self
                .claim(vm, Some(host), r.generation, None, None, "destroyed")
                .map(|_| ()),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ferry-own-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// A claim staged ahead applies only if nobody took the generation meanwhile, and leaves
    /// no temporary file either way.
    #[test]
    fn a_staged_claim_is_a_compare_and_swap_too() {
        let dir = tmp("staged");
        let o = Ownership::new(dir.clone());
        o.adopt("v", "a").unwrap();
        let staged = o
            .stage("v", Some("a"), 1, Some("b"), Some("m-1"), "migrated")
            .unwrap();
        assert_eq!(staged.record().generation, 2);
        assert_eq!(staged.expects(), Some("a"));
        assert_eq!(
            o.current("v").unwrap().unwrap().owner_name(),
            "a",
            "staging changes nothing"
        );
        let r = o.publish(&staged).unwrap();
        drop(staged);
        assert_eq!((r.owner_name(), r.generation), ("b", 2));
        // Staged by b, but a fences first: publishing loses.
        let staged = o
            .stage("v", Some("b"), 2, Some("a"), Some("m-2"), "migrated")
            .unwrap();
        o.claim("v", Some("b"), 2, Some("b"), None, "fenced")
            .unwrap();
        let e = o.publish(&staged).unwrap_err();
        drop(staged);
        assert!(matches!(e, OwnershipError::Changed { .. }), "{e}");
        assert_eq!(o.current("v").unwrap().unwrap().reason, "fenced");
        let leftovers: Vec<_> = std::fs::read_dir(o.vm_dir("v"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn claims_check_owner_and_generation() {
        let dir = tmp("claims");
        let o = Ownership::new(dir.clone());
        assert_eq!(o.current("v").unwrap(), None);
        let r = o.adopt("v", "a").unwrap();
        assert_eq!((r.owner_name(), r.generation), ("a", 1));
        assert_eq!(
            o.adopt("v", "a").unwrap().generation,
            1,
            "adopting one's own is a no-op"
        );
        assert!(o.adopt("v", "b").is_err(), "b cannot adopt a's guest");
        let r = o
            .claim("v", Some("a"), 1, Some("b"), Some("m-1"), "migrated")
            .unwrap();
        assert_eq!((r.owner_name(), r.generation), ("b", 2));
        // The source, fencing at the generation it committed, loses: b already claimed it.
        let e = o
            .claim("v", Some("a"), 1, Some("a"), None, "fenced")
            .unwrap_err();
        match e {
            OwnershipError::Changed { found, .. } => assert_eq!(found.owner_name(), "b"),
            other => panic!("{other}"),
        }
        o.release("v", "a").unwrap();
        assert_eq!(
            o.current("v").unwrap().unwrap().owner_name(),
            "b",
            "only the owner releases"
        );
        o.release("v", "b").unwrap();
        let r = o.current("v").unwrap().unwrap();
        assert_eq!((r.owner.clone(), r.generation), (None, 3));
        assert_eq!(o.adopt("v", "c").unwrap().generation, 4);
        assert_eq!(o.all().len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn exactly_one_of_racing_claims_wins() {
        let dir = tmp("race");
        let o = Ownership::new(dir.clone());
        o.adopt("v", "a").unwrap();
        let wins: usize = std::thread::scope(|s| {
            let hs: Vec<_> = ["a", "b", "c", "d"]
                .iter()
                .map(|h| {
                    let o = o.clone();
                    s.spawn(move || o.claim("v", Some("a"), 1, Some(h), None, "race").is_ok())
                })
                .collect();
            hs.into_iter().map(|h| usize::from(h.join().unwrap())).sum()
        });
        assert_eq!(wins, 1);
        assert_eq!(o.current("v").unwrap().unwrap().generation, 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn old_generations_are_pruned() {
        let dir = tmp("prune");
        let o = Ownership::new(dir.clone());
        o.adopt("v", "a").unwrap();
        for g in 1..30 {
            let (from, to) = if g % 2 == 1 { ("a", "b") } else { ("b", "a") };
            o.claim("v", Some(from), g, Some(to), None, "migrated")
                .unwrap();
        }
        assert!(o.generations("v").unwrap().len() as u64 <= KEEP + 1);
        assert_eq!(o.current("v").unwrap().unwrap().generation, 30);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
