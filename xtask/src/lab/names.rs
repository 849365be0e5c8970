//! What lab to build ([`LabOptions`]) and the names of a lab's namespaces.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Result};

use super::{HOSTS, MAX_NAME_LEN, MAX_SOCKET_PATH};

/// What lab to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabOptions {
    /// Lab name: lowercase letters, digits and `-`, at most 32 characters. Namespaces are
    /// `ferry-NAME-a`, `ferry-NAME-b` and `ferry-NAME-sw`.
    pub name: String,
    /// Absolute directory for datastores, configs, sockets and logs. It must not exist yet or
    /// be empty; [`Lab::down`](super::Lab::down) removes it.
    pub root: PathBuf,
    /// The `ferry` binary to start one agent per host with; `None` builds the network only.
    pub ferry_bin: Option<PathBuf>,
}

static TEST_LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

impl LabOptions {
    /// A unique name and root (under [`std::env::temp_dir`]) for a test's lab, without agents.
    ///
    /// The name is up to four letters of the last `::` segment of `test`, the process id and a
    /// per-process counter (both base 36), e.g. `idle-k3f-0`: at most 15 characters for any
    /// Linux pid, so it also fits where interface names would. Names whose namespaces or root
    /// are still present (leftovers of a killed test run with a recycled pid) are skipped.
    /// Add a binary with [`LabOptions::with_ferry_bin`].
    pub fn for_test(test: &str) -> LabOptions {
        let pid = std::process::id();
        let mut candidate = None;
        // Bounded: the counter only grows, so a free name turns up unless the machine is
        // littered with a thousand leaked labs of this pid, in which case `up` reports it.
        for _ in 0..1000 {
            let n = TEST_LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
            let name = test_lab_name(test, pid, n);
            let root = std::env::temp_dir().join(format!("ferry-lab-{name}"));
            let taken = root.exists()
                || namespace_names(&name)
                    .iter()
                    .any(|ns| Path::new("/run/netns").join(ns).exists());
            let opts = LabOptions {
                name,
                root,
                ferry_bin: None,
            };
            if !taken {
                return opts;
            }
            candidate = Some(opts);
        }
        candidate.unwrap_or_else(|| LabOptions {
            name: test_lab_name(test, pid, 0),
            root: std::env::temp_dir().join("ferry-lab-unnamed"),
            ferry_bin: None,
        })
    }

    /// The same options with agents started from `bin`.
    pub fn with_ferry_bin(mut self, bin: impl Into<PathBuf>) -> LabOptions {
        self.ferry_bin = Some(bin.into());
        self
    }

    /// Checks the name and the root without touching the system.
    pub fn validate(&self) -> Result<()> {
        validate_name(&self.name)?;
        if !self.root.is_absolute() {
            bail!(
                "lab root {} is not an absolute path: pass an absolute --root",
                self.root.display()
            );
        }
        if self.root.parent().is_none() {
            bail!("lab root must not be `/`: pass a dedicated directory as --root");
        }
        for host in HOSTS {
            let socket = self.root.join(host.name).join("agent.sock");
            let len = socket.as_os_str().len();
            if len > MAX_SOCKET_PATH {
                bail!(
                    "agent socket path {} is {len} bytes, more than a unix socket address holds \
                     ({MAX_SOCKET_PATH}): choose a shorter --root",
                    socket.display()
                );
            }
        }
        Ok(())
    }
}

/// The test lab name: `PREFIX-PID-N`, prefix from `test`, pid and counter in base 36.
fn test_lab_name(test: &str, pid: u32, counter: u32) -> String {
    let last = test.rsplit("::").find(|s| !s.is_empty()).unwrap_or(test);
    let mut prefix: String = last
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .take(4)
        .collect();
    if prefix.is_empty() {
        prefix.push('t');
    }
    // Three base-36 digits keep the name within 15 characters; wrapping after 46,656 labs in
    // one process is harmless because `for_test` skips names still in use.
    let counter = counter % 36u32.pow(3);
    format!(
        "{prefix}-{}-{}",
        base36(u64::from(pid)),
        base36(u64::from(counter))
    )
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        // The index is < 36, so the cast cannot truncate.
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    out.into_iter().map(char::from).collect()
}

/// Checks a lab name: 1..=32 of `[a-z0-9-]`, starting and ending with a letter or digit.
pub(super) fn validate_name(name: &str) -> Result<()> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let ok_ends = name
        .bytes()
        .next()
        .zip(name.bytes().last())
        .is_some_and(|(f, l)| f != b'-' && l != b'-');
    if name.is_empty() || name.len() > MAX_NAME_LEN || !ok_chars || !ok_ends {
        bail!(
            "invalid lab name {name:?}: use 1 to {MAX_NAME_LEN} lowercase letters, digits and \
             `-`, starting and ending with a letter or digit"
        );
    }
    Ok(())
}

pub(super) fn host_netns(lab: &str, host: &str) -> String {
    format!("ferry-{lab}-{host}")
}

pub(super) fn switch_netns_name(lab: &str) -> String {
    format!("ferry-{lab}-sw")
}

/// The namespace of the lab's client of the guests.
pub fn client_netns_name(lab: &str) -> String {
    format!("ferry-{lab}-cl")
}

/// All namespaces of a lab, hosts first, then the client, switch last.
pub(super) fn namespace_names(lab: &str) -> Vec<String> {
    HOSTS
        .iter()
        .map(|h| host_netns(lab, h.name))
        .chain([client_netns_name(lab), switch_netns_name(lab)])
        .collect()
}

/// Whether `netns` is one of lab `lab`'s namespaces: `ferry-LAB-X` where `X` is one segment
/// without `-`. So lab `lab` never claims `ferry-lab-x-a`, which belongs to lab `lab-x`.
pub(super) fn belongs_to_lab(netns: &str, lab: &str) -> bool {
    netns
        .strip_prefix("ferry-")
        .and_then(|rest| rest.strip_prefix(lab))
        .and_then(|rest| rest.strip_prefix('-'))
        .is_some_and(|seg| {
            !seg.is_empty()
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
}

/// The switch port (in the switch namespace) of a host's uplink.
pub(super) fn switch_port(host: &str) -> String {
    format!("{host}-up")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::{DEFAULT_NAME, DEFAULT_ROOT};

    #[test]
    fn test_names_are_short_unique_and_valid() {
        let a = test_lab_name("migrate::tests::idle_guest", 4_194_303, 0);
        let b = test_lab_name("migrate::tests::idle_guest", 4_194_303, 1);
        assert_eq!(a, "idle-2hwcf-0");
        assert_ne!(a, b);
        for name in [&a, &b] {
            assert!(name.len() <= 15, "{name}");
            validate_name(name).unwrap();
        }
        // Worst case: longest prefix, pid_max and the largest counter.
        let long = test_lab_name("Some::Very_Long_Test_Name", 4_194_304, u32::MAX);
        assert!(long.len() <= 15, "{long}");
        validate_name(&long).unwrap();
        assert!(long.starts_with("very-"));
        // Nothing usable in the test name still gives a valid name.
        let odd = test_lab_name("::__::", 1, 2);
        assert_eq!(odd, "t-1-2");
        validate_name(&odd).unwrap();
    }

    #[test]
    fn for_test_gives_distinct_options() {
        let a = LabOptions::for_test("x");
        let b = LabOptions::for_test("x");
        assert_ne!(a.name, b.name);
        assert_ne!(a.root, b.root);
        assert!(a.root.starts_with(std::env::temp_dir()));
        a.validate().unwrap();
        assert_eq!(a.ferry_bin, None);
        assert_eq!(
            a.clone().with_ferry_bin("/x/ferry").ferry_bin,
            Some(PathBuf::from("/x/ferry"))
        );
    }

    #[test]
    fn base36_digits() {
        assert_eq!(base36(0), "0");
        assert_eq!(base36(35), "z");
        assert_eq!(base36(36), "10");
        assert_eq!(base36(46_655), "zzz");
    }

    #[test]
    fn name_validation() {
        for ok in ["lab", "a", "lab-2", "0", &"x".repeat(32)] {
            validate_name(ok).unwrap();
        }
        for bad in [
            "",
            "-lab",
            "lab-",
            "Lab",
            "la b",
            "la/b",
            "läb",
            &"x".repeat(33),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn option_validation() {
        let mut o = LabOptions {
            name: DEFAULT_NAME.to_owned(),
            root: PathBuf::from(DEFAULT_ROOT),
            ferry_bin: None,
        };
        o.validate().unwrap();
        o.root = PathBuf::from("relative/root");
        assert!(o.validate().is_err());
        o.root = PathBuf::from("/");
        assert!(o.validate().is_err());
        o.root = PathBuf::from("/").join("r".repeat(100));
        let err = o.validate().unwrap_err().to_string();
        assert!(err.contains("shorter --root"), "{err}");
    }

    #[test]
    fn namespaces_and_membership() {
        assert_eq!(
            namespace_names("lab"),
            ["ferry-lab-a", "ferry-lab-b", "ferry-lab-cl", "ferry-lab-sw"]
        );
        assert!(belongs_to_lab("ferry-lab-cl", "lab"));
        assert!(belongs_to_lab("ferry-lab-a", "lab"));
        assert!(belongs_to_lab("ferry-lab-sw", "lab"));
        assert!(belongs_to_lab("ferry-lab-c2", "lab"));
        assert!(
            !belongs_to_lab("ferry-lab-x-a", "lab"),
            "belongs to lab `lab-x`"
        );
        assert!(!belongs_to_lab("ferry-lab-", "lab"));
        assert!(!belongs_to_lab("ferry-labs-a", "lab"));
        assert!(!belongs_to_lab("other-lab-a", "lab"));
        assert!(belongs_to_lab("ferry-lab-x-a", "lab-x"));
    }
}
