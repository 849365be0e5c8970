//! What a migration needs, checked before any memory moves: CPU compatibility, shared
//! datastores, port groups, the migration link and room on the destination.
//!
//! Each agent describes itself as [`HostFacts`] (the peer answers a `Query` on the control
//! connection with its facts). [`evaluate`] is a pure function of the VM's requirements, both
//! hosts' facts and the link probe; `ferry check VM --to PEER` prints its table and
//! `ferry migrate` refuses on any failure (`--force` skips warnings, never failures).
//!
//! Layering: this module sits below [`crate::migrate`] (a peer's `Query` is answered with
//! [`HostFacts`], and the destination's `Host` reports them) and above [`crate::vm`] (the CPUID
//! model, disk paths), [`crate::util`] and [`crate::netpin`]. It uses neither `control` nor
//! `migrate`: the agent in `control` gathers the facts, runs [`evaluate`] and decides.

pub mod cpu;
pub mod datastore;
pub mod disklock;
pub mod ping;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::vm::cpuid::{self, CpuidEntry};

/// What a host tells a peer about itself.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HostFacts {
    pub name: String,
    /// The CPUID this host offers guests.
    pub cpuid: Vec<CpuidEntry>,
    /// Datastore name → identity.
    pub datastores: BTreeMap<String, String>,
    /// Disk path → size in bytes here (None: missing), for the disks asked about.
    pub disks: BTreeMap<String, Option<u64>>,
    /// Port groups configured here whose interface exists.
    pub port_groups: Vec<String>,
    pub migration_enabled: bool,
    pub migration_address: Option<String>,
    pub migration_interface: Option<String>,
    /// Memory this host can still give a guest, MiB.
    pub room_mib: u64,
    /// Every VM here, incoming ones included.
    pub vms: Vec<String>,
    /// The VMs whose vCPUs run here.
    #[serde(default)]
    pub running: Vec<String>,
}

/// What the VM needs from a destination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Requirements {
    pub vm: String,
    pub memory_mib: u64,
    pub cpuid: Vec<CpuidEntry>,
    /// Disk path → size in bytes on the source.
    pub disks: BTreeMap<String, u64>,
    pub port_groups: Vec<String>,
}

/// How one check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    Warning,
    Failure,
}

/// One row of `ferry check`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckItem {
    pub requirement: String,
    pub result: Outcome,
    pub detail: String,
    /// How to fix it (failures and warnings).
    pub fix: Option<String>,
}

/// The whole check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckReport {
    pub vm: String,
    pub peer: String,
    pub items: Vec<CheckItem>,
    /// No failures.
    pub passed: bool,
    pub warnings: usize,
}

impl CheckReport {
    pub fn new(vm: &str, peer: &str, items: Vec<CheckItem>) -> CheckReport {
        CheckReport {
            vm: vm.into(),
            peer: peer.into(),
            passed: !items.iter().any(|i| i.result == Outcome::Failure),
            warnings: items
                .iter()
                .filter(|i| i.result == Outcome::Warning)
                .count(),
            items,
        }
    }

    /// The failures (and, unless `force`, the warnings) as one message.
    pub fn refusal(&self, force: bool) -> Option<String> {
        let bad: Vec<String> = self
            .items
            .iter()
            .filter(|i| i.result == Outcome::Failure || (!force && i.result == Outcome::Warning))
            .map(|i| {
                format!(
                    "{}: {}{}",
                    i.requirement,
                    i.detail,
                    i.fix
                        .as_ref()
                        .map(|f| format!(" (fix: {f})"))
                        .unwrap_or_default()
                )
            })
            .collect();
        (!bad.is_empty()).then(|| bad.join("; "))
    }
}

/// The migration link probe as the check sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkProbe {
    pub sent: u32,
    pub received: u32,
    pub detail: String,
}

fn item(requirement: &str, result: Outcome, detail: String, fix: Option<&str>) -> CheckItem {
    CheckItem {
        requirement: requirement.into(),
        result,
        detail,
        fix: fix.map(str::to_string),
    }
}

/// One row per disk: its lock must be free or held by the guest itself.
pub fn disk_lock_items(vm: &str, locks: &[disklock::DiskLockInfo]) -> Vec<CheckItem> {
    locks
        .iter()
        .map(|l| match (&l.holder, &l.error) {
            (_, Some(e)) => item(
                "disk lock",
                Outcome::Failure,
                format!("{}: {e}", l.disk),
                Some("make the datastore readable on this host"),
            ),
            (Some(h), None) if h.vm != vm => item(
                "disk lock",
                Outcome::Failure,
                format!(
                    "{} is locked by guest {} on host {}{}",
                    l.disk,
                    h.vm,
                    h.host,
                    if h.stale {
                        " (stale: that host stopped renewing its lease)"
                    } else {
                        ""
                    }
                ),
                Some(if h.stale {
                    "if that host is really down, `ferry disk unlock DISK` releases the lock"
                } else {
                    "stop or destroy the other guest first"
                }),
            ),
            (Some(h), None) => item(
                "disk lock",
                Outcome::Ok,
                format!("{} is held by {vm} on {}", l.disk, h.host),
                None,
            ),
            (None, None) => item(
                "disk lock",
                Outcome::Ok,
                format!("{} is not locked", l.disk),
                None,
            ),
        })
        .collect()
}

/// Why the link probe over the migration network could not run.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("migration is not configured here")]
    NotConfigured,
    #[error("migration is not enabled on both hosts")]
    NotEnabled,
    #[error("the migration address is not IPv4")]
    NotIpv4,
    #[error("{0} has no IPv4 migration address")]
    PeerNotIpv4(String),
    #[error(transparent)]
    Ping(#[from] ping::PingError),
}

/// Evaluate every check. `local` is this host, `peer` the destination, `link` the probe over
/// the migration network (None when it could not run; the reason is in the link row).
pub fn evaluate(
    req: &Requirements,
    local: &HostFacts,
    peer: &HostFacts,
    link: Result<&LinkProbe, &ProbeError>,
) -> Vec<CheckItem> {
    let mut items = Vec::new();

    // CPU.
    let missing = cpu::missing(&cpuid::features(&req.cpuid), &cpuid::features(&peer.cpuid));
    items.push(if missing.is_empty() {
        item(
            "CPU",
            Outcome::Ok,
            format!("{} offers every CPU feature the guest sees", peer.name),
            None,
        )
    } else {
        let names: Vec<String> = missing.iter().map(|f| f.to_string()).collect();
        item(
            "CPU",
            Outcome::Failure,
            format!(
                "{} does not offer {} that the guest uses: {}",
                peer.name,
                if names.len() == 1 { "a feature" } else { "features" },
                names.join(", ")
            ),
            Some("hide them from the guest (vm create --cpu-mask …, or a baseline from `ferry cpu baseline`) and restart it"),
        )
    });

    // Datastores and disks.
    if req.disks.is_empty() {
        items.push(item(
            "Datastores",
            Outcome::Ok,
            "the VM has no disks".into(),
            None,
        ));
    }
    for (path, size) in &req.disks {
        let store = crate::vm::DiskSpec::parse_path(path).map_or("?", |p| p.0);
        let here = local.datastores.get(store);
        let there = peer.datastores.get(store);
        let row = match (here, there) {
            (_, None) => item(
                "Datastore",
                Outcome::Failure,
                format!("{path}: {} has no datastore named {store}", peer.name),
                Some("configure the same shared datastore on both hosts ([datastores])"),
            ),
            (Some(a), Some(b)) if a != b => item(
                "Datastore",
                Outcome::Failure,
                format!(
                    "{path}: datastore {store} on {} is different storage (identity {b}, here {a}); the disk is not shared",
                    peer.name
                ),
                Some("put the VM's disks on a datastore both hosts share"),
            ),
            _ => match peer.disks.get(path).copied().flatten() {
                None => item(
                    "Datastore",
                    Outcome::Failure,
                    format!("{path}: missing on {}", peer.name),
                    Some("the datastore is shared but the file is not there: check the mount"),
                ),
                Some(s) if s != *size => item(
                    "Datastore",
                    Outcome::Failure,
                    format!("{path}: {s} bytes on {}, {size} here", peer.name),
                    Some("the hosts see different files: check the shared datastore"),
                ),
                Some(_) => item(
                    "Datastore",
                    Outcome::Ok,
                    format!("{path}: same datastore ({store}) and size on both hosts"),
                    None,
                ),
            },
        };
        items.push(row);
    }

    // Port groups.
    if req.port_groups.is_empty() {
        items.push(item(
            "Port groups",
            Outcome::Ok,
            "the VM has no NICs".into(),
            None,
        ));
    }
    for pg in &req.port_groups {
        items.push(if peer.port_groups.contains(pg) {
            item(
                "Port group",
                Outcome::Ok,
                format!("{pg} exists on {}", peer.name),
                None,
            )
        } else {
            item(
                "Port group",
                Outcome::Failure,
                format!("port group {pg} does not exist on {}", peer.name),
                Some("add it to [port_groups] on the destination, named the same"),
            )
        });
    }

    // Migration link.
    items.push(if !local.migration_enabled || !peer.migration_enabled {
        let who = if !local.migration_enabled {
            &local.name
        } else {
            &peer.name
        };
        item(
            "Migration link",
            Outcome::Failure,
            format!("migration is not enabled on {who}"),
            Some("give both hosts a [migration] section with interface and address, enabled = true"),
        )
    } else {
        match link {
            Err(why) => item(
                "Migration link",
                Outcome::Failure,
                why.to_string(),
                Some("check the migration NIC and addresses; `ferry ping PEER` shows the path"),
            ),
            Ok(p) if p.received == 0 => item(
                "Migration link",
                Outcome::Failure,
                format!("no reply to {} probes: {}", p.sent, p.detail),
                Some("the migration NICs cannot reach each other: check link state, cabling, VLANs; `ferry ping PEER`"),
            ),
            Ok(p) if p.received < p.sent => item(
                "Migration link",
                Outcome::Warning,
                format!("{} of {} probes answered: {}", p.received, p.sent, p.detail),
                Some("packet loss on the migration network slows migrations down"),
            ),
            Ok(p) => item("Migration link", Outcome::Ok, p.detail.clone(), None),
        }
    });

    // Room.
    items.push(if peer.vms.iter().any(|v| v == &req.vm) {
        item(
            "Room",
            Outcome::Failure,
            format!("{} already has a VM named {}", peer.name, req.vm),
            Some("rename or remove it there"),
        )
    } else if req.memory_mib > peer.room_mib {
        item(
            "Room",
            Outcome::Failure,
            format!(
                "the VM needs {} MiB but {} can give {} MiB",
                req.memory_mib, peer.name, peer.room_mib
            ),
            Some("free memory on the destination or choose another host"),
        )
    } else {
        item(
            "Room",
            Outcome::Ok,
            format!(
                "{} can give {} MiB for {} MiB",
                peer.name, peer.room_mib, req.memory_mib
            ),
            None,
        )
    });
    items
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(name: &str) -> HostFacts {
        HostFacts {
            name: name.into(),
            cpuid: vec![CpuidEntry {
                function: 7,
                index: 0,
                eax: 0,
                ebx: 1 << 16 | 1 << 5,
                ecx: 0,
                edx: 0,
            }],
            datastores: [("shared".to_string(), "id1".to_string())].into(),
            disks: [("[shared] v/d.img".to_string(), Some(1024))].into(),
            port_groups: vec!["vm-net".into()],
            running: Vec::new(),
            migration_enabled: true,
            migration_address: Some("198.18.1.2".into()),
            migration_interface: Some("mig0".into()),
            room_mib: 4096,
            vms: vec![],
        }
    }

    fn req() -> Requirements {
        Requirements {
            vm: "v".into(),
            memory_mib: 1024,
            cpuid: facts("x").cpuid,
            disks: [("[shared] v/d.img".to_string(), 1024)].into(),
            port_groups: vec!["vm-net".into()],
        }
    }

    fn ok_link() -> LinkProbe {
        LinkProbe {
            sent: 3,
            received: 3,
            detail: "3/3".into(),
        }
    }

    fn outcome(items: &[CheckItem], what: &str) -> Outcome {
        items
            .iter()
            .find(|i| i.requirement.starts_with(what))
            .unwrap()
            .result
    }

    #[test]
    fn all_good_passes() {
        let items = evaluate(&req(), &facts("a"), &facts("b"), Ok(&ok_link()));
        let r = CheckReport::new("v", "b", items);
        assert!(r.passed, "{r:?}");
        assert_eq!(r.refusal(false), None);
    }

    #[test]
    fn each_failure_is_named() {
        let mut b = facts("b");
        b.cpuid[0].ebx = 1 << 5;
        let i = evaluate(&req(), &facts("a"), &b, Ok(&ok_link()));
        assert_eq!(outcome(&i, "CPU"), Outcome::Failure);
        assert!(i[0].detail.contains("avx512f"), "{:?}", i[0]);

        let mut b = facts("b");
        b.datastores.insert("shared".into(), "other".into());
        assert_eq!(
            outcome(
                &evaluate(&req(), &facts("a"), &b, Ok(&ok_link())),
                "Datastore"
            ),
            Outcome::Failure
        );

        let mut b = facts("b");
        b.vms.push("v".into());
        let i = evaluate(&req(), &facts("a"), &b, Ok(&ok_link()));
        assert!(
            i.iter()
                .any(|x| x.result == Outcome::Failure
                    && x.detail.contains("already has a VM named v"))
        );

        let mut b = facts("b");
        b.port_groups.clear();
        let i = evaluate(&req(), &facts("a"), &b, Ok(&ok_link()));
        assert!(i
            .iter()
            .any(|x| x.result == Outcome::Failure && x.detail.contains("vm-net")));

        let lost = LinkProbe {
            sent: 3,
            received: 0,
            detail: "".into(),
        };
        assert_eq!(
            outcome(
                &evaluate(&req(), &facts("a"), &facts("b"), Ok(&lost)),
                "Migration"
            ),
            Outcome::Failure
        );
        let some = LinkProbe {
            sent: 3,
            received: 2,
            detail: "".into(),
        };
        let i = evaluate(&req(), &facts("a"), &facts("b"), Ok(&some));
        assert_eq!(outcome(&i, "Migration"), Outcome::Warning);
        let r = CheckReport::new("v", "b", i);
        assert!(r.passed && r.refusal(false).is_some() && r.refusal(true).is_none());

        let mut b = facts("b");
        b.room_mib = 10;
        assert_eq!(
            outcome(&evaluate(&req(), &facts("a"), &b, Ok(&ok_link())), "Room"),
            Outcome::Failure
        );
        let mut b = facts("b");
        b.vms.push("v".into());
        assert_eq!(
            outcome(&evaluate(&req(), &facts("a"), &b, Ok(&ok_link())), "Room"),
            Outcome::Failure
        );
    }
}
