//! Datastores: named directories (`[datastores]`), each with an identity created on first use, so
//! two hosts can tell whether a datastore of the same name is really the same storage (a shared
//! LUN) or a local one that only shares the name.
//!
//! The identity is `DIR/.ferry-datastore.json` (`{"id": "...", "name": "...", "created_unix":
//! ...}`), created with `O_EXCL` by the first agent that opens the datastore; every other agent
//! that sees the same directory reads the same id.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::vm::DiskSpec;

pub const IDENTITY_FILE: &str = ".ferry-datastore.json";

/// Errors of datastores and disks.
#[derive(Debug, thiserror::Error)]
pub enum DatastoreError {
    #[error("datastore {name}: {path}: {source}")]
    Io {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("datastore {name}: identity file {path} is unreadable ({why}); remove it only if this directory is not shared with another host")]
    Identity {
        name: String,
        path: PathBuf,
        why: String,
    },
    #[error("disk {0:?}: the path {1}")]
    BadPath(String, &'static str),
    #[error(
        "disk {path:?}: datastore {name:?} is not configured on this host (add it to [datastores])"
    )]
    Unknown { path: String, name: String },
    #[error("disk {path:?} exists with {found} bytes, not the {want} asked for")]
    Size { path: String, found: u64, want: u64 },
}

/// What the identity file holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Identity {
    pub id: String,
    pub name: String,
    pub created_unix: u64,
}

/// The host's datastores.
#[derive(Debug, Clone, Default)]
pub struct Datastores {
    stores: BTreeMap<String, (PathBuf, String)>,
}

fn io(name: &str, path: &Path) -> impl FnOnce(std::io::Error) -> DatastoreError {
    let (name, path) = (name.to_string(), path.to_path_buf());
    move |source| DatastoreError::Io { name, path, source }
}

impl Datastores {
    /// Open (creating directories and identities as needed) every configured datastore.
    pub fn open(config: &BTreeMap<String, PathBuf>) -> Result<Datastores, DatastoreError> {
        let mut stores = BTreeMap::new();
        for (name, dir) in config {
            std::fs::create_dir_all(dir).map_err(io(name, dir))?;
            let idf = dir.join(IDENTITY_FILE);
            let id = match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&idf)
            {
                Ok(mut f) => {
                    let ident = Identity {
                        id: {
                            let r = || {
                                crate::util::random_u64().map_err(|e| {
                                    io(name, &idf)(std::io::Error::other(e.to_string()))
                                })
                            };
                            format!("{:016x}{:016x}", r()?, r()?)
                        },
                        name: name.clone(),
                        created_unix: std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_secs()),
                    };
                    let text = serde_json::to_vec_pretty(&ident).unwrap_or_default();
                    f.write_all(&text).map_err(io(name, &idf))?;
                    f.sync_all().map_err(io(name, &idf))?;
                    tracing::info!(datastore = %name, dir = %dir.display(), id = %ident.id, "datastore identity created");
                    ident.id
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    // Another agent may be writing it this instant: retry briefly.
                    let mut last = String::new();
                    let mut found = None;
                    for _ in 0..50 {
                        match std::fs::read(&idf)
                            .map_err(|e| e.to_string())
                            .and_then(|b| {
                                serde_json::from_slice::<Identity>(&b).map_err(|e| e.to_string())
                            }) {
                            Ok(i) => {
                                found = Some(i.id);
                                break;
                            }
                            Err(e) => last = e,
                        }
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                    found.ok_or(DatastoreError::Identity {
                        name: name.clone(),
                        path: idf.clone(),
                        why: last,
                    })?
                }
                Err(e) => return Err(io(name, &idf)(e)),
            };
            stores.insert(name.clone(), (dir.clone(), id));
        }
        Ok(Datastores { stores })
    }

    /// Name → identity.
    pub fn identities(&self) -> BTreeMap<String, String> {
        self.stores
            .iter()
            .map(|(n, (_, id))| (n.clone(), id.clone()))
            .collect()
    }

    /// Where a disk path lives on this host.
    pub fn resolve(&self, path: &str) -> Result<PathBuf, DatastoreError> {
        if let Some(why) = DiskSpec::path_problem(path) {
            return Err(DatastoreError::BadPath(path.to_string(), why));
        }
        let (store, rel) = DiskSpec::parse_path(path).ok_or_else(|| {
            DatastoreError::BadPath(
                path.to_string(),
                "must look like \"[datastore] dir/file.img\"",
            )
        })?;
        let (dir, _) = self
            .stores
            .get(store)
            .ok_or_else(|| DatastoreError::Unknown {
                path: path.to_string(),
                name: store.to_string(),
            })?;
        Ok(dir.join(rel))
    }

    /// The directory of the datastore a disk path names, and the path inside it.
    pub fn locate<'a>(&self, path: &'a str) -> Result<(PathBuf, &'a str), DatastoreError> {
        self.resolve(path)?;
        let (store, rel) = DiskSpec::parse_path(path).ok_or_else(|| {
            DatastoreError::BadPath(
                path.to_string(),
                "must look like \"[datastore] dir/file.img\"",
            )
        })?;
        let dir = self
            .stores
            .get(store)
            .map(|(d, _)| d.clone())
            .unwrap_or_default();
        Ok((dir, rel))
    }

    /// Size of a disk file here, or None if it is missing or its datastore unknown.
    pub fn disk_size(&self, path: &str) -> Option<u64> {
        let p = self.resolve(path).ok()?;
        std::fs::metadata(p).ok().map(|m| m.len())
    }

    /// Make sure a disk exists with its size: create it (sparse) if missing.
    pub fn ensure_disk(&self, d: &DiskSpec) -> Result<PathBuf, DatastoreError> {
        let p = self.resolve(&d.path)?;
        let want = d.size_mib << 20;
        let store = DiskSpec::parse_path(&d.path)
            .map_or("?", |x| x.0)
            .to_string();
        match std::fs::metadata(&p) {
            Ok(m) if m.len() == want => Ok(p),
            Ok(m) => Err(DatastoreError::Size {
                path: d.path.clone(),
                found: m.len(),
                want,
            }),
            Err(_) => {
                // Made whole under a temporary name, then `link(2)`ed into place: two hosts
                // creating the same disk at once both end with one complete file of the right
                // size (the loser finds it and checks its size), never half of one.
                let parent = p.parent().map(Path::to_path_buf).unwrap_or_default();
                std::fs::create_dir_all(&parent).map_err(io(&store, &parent))?;
                let nonce = crate::util::random_u64().map_err(|e| DatastoreError::Io {
                    name: store.clone(),
                    path: parent.clone(),
                    source: std::io::Error::other(e.to_string()),
                })?;
                let tmp = parent.join(format!(".ferry-new-{}-{nonce:016x}", std::process::id()));
                let made = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&tmp)
                    .and_then(|f| f.set_len(want))
                    .and_then(|()| std::fs::hard_link(&tmp, &p));
                let _ = std::fs::remove_file(&tmp);
                match made {
                    Ok(()) => Ok(p),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        let found = std::fs::metadata(&p).map_err(io(&store, &p))?.len();
                        if found == want {
                            Ok(p)
                        } else {
                            Err(DatastoreError::Size {
                                path: d.path.clone(),
                                found,
                                want,
                            })
                        }
                    }
                    Err(e) => Err(io(&store, &p)(e)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_are_created_once_and_shared() {
        let dir = std::env::temp_dir().join(format!("ferry-ds-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut cfg = BTreeMap::new();
        cfg.insert("shared".to_string(), dir.join("shared"));
        let a = Datastores::open(&cfg).unwrap();
        let b = Datastores::open(&cfg).unwrap();
        assert_eq!(a.identities(), b.identities());
        let mut other = BTreeMap::new();
        other.insert("shared".to_string(), dir.join("elsewhere"));
        let c = Datastores::open(&other).unwrap();
        assert_ne!(a.identities()["shared"], c.identities()["shared"]);

        let d = DiskSpec {
            path: "[shared] vm1/disk0.img".into(),
            size_mib: 2,
        };
        let p = a.ensure_disk(&d).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 2 << 20);
        assert_eq!(b.disk_size(&d.path), Some(2 << 20));
        assert!(a
            .ensure_disk(&DiskSpec {
                path: d.path.clone(),
                size_mib: 4
            })
            .is_err());
        assert!(a.resolve("[nowhere] x.img").is_err());
        assert!(a.resolve("[shared] ../escape.img").is_err());
        assert!(a.resolve("no brackets").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
