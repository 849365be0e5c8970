//! Helpers shared by Ferry's privileged end-to-end tests.
//!
//! Every test that needs root, /dev/kvm or network namespaces first asks [`require`]. Where the
//! capability is missing the test prints why and passes as skipped, except under CI (`CI=true`),
//! where a missing capability fails the run.

use std::path::Path;
use std::sync::Arc;

use ferry::vm::Hypervisor;

/// A capability a test needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Root,
    Kvm,
    Netns,
}

fn missing(need: Need) -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    match need {
        Need::Root if !root => Some("not running as root".into()),
        Need::Kvm => {
            if std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_err()
            {
                Some("/dev/kvm cannot be opened read-write".into())
            } else {
                None
            }
        }
        Need::Netns if !root => Some("network namespaces need root".into()),
        Need::Netns
            if !Path::new("/usr/sbin/ip").exists()
                && !Path::new("/sbin/ip").exists()
                && !Path::new("/usr/bin/ip").exists() =>
        {
            Some("iproute2 (`ip`) is not installed; `cargo xtask deps` installs it".into())
        }
        _ => None,
    }
}

/// Whether the test may run. Under `CI=true` a missing capability panics instead of skipping.
pub fn require(test: &str, needs: &[Need]) -> bool {
    for &n in needs {
        if let Some(why) = missing(n) {
            if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
                panic!("{test}: cannot run under CI: {why}");
            }
            eprintln!("SKIPPED {test}: {why}");
            return false;
        }
    }
    true
}

/// Open KVM for a test, or None (skipped) where the test cannot run.
pub fn hypervisor(test: &str) -> Option<Arc<Hypervisor>> {
    if !require(test, &[Need::Kvm]) {
        return None;
    }
    Some(Hypervisor::open().expect("open /dev/kvm"))
}

/// Poll `f` every 10 ms until it returns Some, or panic after `secs` seconds saying `what`.
pub fn wait_for<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if std::time::Instant::now() > deadline {
            panic!("timed out after {secs}s waiting for {what}");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
