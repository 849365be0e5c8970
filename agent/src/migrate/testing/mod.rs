//! Test support for the migration engine (compiled for tests only): a fake guest
//! ([`fake::FakeGuest`], both sides of [`crate::migrate::guest`]), a fake destination agent
//! ([`host::FakeHost`], served on loopback in this process or in a child process), a
//! frame-aware proxy that tampers with the streams ([`proxy::Proxy`]), and [`Pair`], which
//! puts a source and a destination together. The tests are in `engine_tests.rs`; see
//! docs/migration.md ("Engine tests").

pub mod fake;
pub mod host;
pub mod proxy;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fake::FakeGuest;
use host::{DestServer, FakeHost, TempDir, LOCALHOST};

use crate::auth::ClusterKey;
use crate::migrate::guest::SourceGuest;
use crate::migrate::ownership::Ownership;
use crate::migrate::session::Identity;
use crate::migrate::source::{self, Failure, SourceJob};
use crate::migrate::{MigrateOptions, MigrationHandle, Summary};
use crate::vm::VmStatus;

/// The source's agent name; the destination's is [`DEST`].
pub const SOURCE: &str = "a";
pub const DEST: &str = "b";

/// A source host and a destination host (served in this process) sharing an ownership
/// datastore, optionally with a cluster key.
pub struct Pair {
    pub dir: TempDir,
    pub key: Option<Arc<ClusterKey>>,
    pub dest: DestServer,
}

impl Pair {
    pub fn new(with_key: bool) -> Pair {
        Self::with_host(with_key, |_| {})
    }

    /// A pair whose destination host is adjusted by `f` before it serves.
    pub fn with_host(with_key: bool, f: impl FnOnce(&mut FakeHost)) -> Pair {
        let dir = TempDir::new("pair");
        let key = with_key.then(|| Arc::new(ClusterKey::from_bytes(&[0x42; 32])));
        let mut host = FakeHost::new(DEST, key.clone(), Some(dir.path()));
        f(&mut host);
        let dest = DestServer::start(Arc::new(host));
        Pair { dir, key, dest }
    }

    pub fn host(&self) -> &FakeHost {
        &self.dest.host
    }

    pub fn ownership(&self) -> Ownership {
        Ownership::new(self.dir.path().to_path_buf())
    }

    /// A job moving `guest` to the destination at `peer` (the server, or a proxy before it).
    pub fn job(
        &self,
        guest: &Arc<FakeGuest>,
        peer: SocketAddr,
        options: MigrateOptions,
    ) -> SourceJob {
        job(
            guest,
            peer,
            options,
            self.key.clone(),
            Some(self.ownership()),
        )
    }
}

/// A job moving `guest` from host [`SOURCE`] to the agent at `peer`.
pub fn job(
    guest: &Arc<FakeGuest>,
    peer: SocketAddr,
    options: MigrateOptions,
    key: Option<Arc<ClusterKey>>,
    ownership: Option<Ownership>,
) -> SourceJob {
    let id = crate::migrate::new_id().expect("id");
    let vm: Arc<dyn SourceGuest> = guest.clone();
    SourceJob {
        handle: Arc::new(MigrationHandle::new(
            id,
            &SourceGuest::spec(guest.as_ref()).name,
            "out",
            DEST,
        )),
        vm,
        peer,
        local_migration: LOCALHOST,
        identity: Identity {
            agent: SOURCE.into(),
            key,
        },
        options,
        link: None,
        ownership,
    }
}

/// Options for a test migration: two streams, verified, the rest as by default.
pub fn options() -> MigrateOptions {
    MigrateOptions {
        streams: 2,
        verify: true,
        ..MigrateOptions::default()
    }
}

/// Arm `action` at `point` for this job's migration only.
pub fn arm(job: &SourceJob, point: &str, action: &str) {
    crate::faults::arm_for(
        crate::faults::Fault {
            point: point.into(),
            action: action.into(),
        },
        &job.handle.id,
    )
    .expect("arm");
}

/// Run the job (on this thread).
pub fn run(job: &SourceJob) -> Result<Summary, Box<Failure>> {
    source::run(job)
}

/// Run the job on a thread of its own.
pub fn spawn(
    job: SourceJob,
) -> std::thread::JoinHandle<(SourceJob, Result<Summary, Box<Failure>>)> {
    std::thread::spawn(move || {
        let r = source::run(&job);
        (job, r)
    })
}

/// Wait until `f` holds (panics after `secs`).
pub fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The guest runs on the source as before the migration: resumed, unthrottled, dirty
/// logging off.
pub fn assert_on_source(g: &FakeGuest) {
    assert_eq!(g.status(), VmStatus::Running, "the source copy runs");
    assert!(!g.mem().dirty_logging(0), "dirty logging is off again");
    assert_eq!(g.throttle(), 0, "no throttle left");
}

/// The destination holds nothing of the guest: any incoming copy was destroyed. (Its side
/// ends on its own once it reads the source's `Abort`: this waits for that.)
pub fn assert_discarded(host: &FakeHost, name: &str) {
    let until = Instant::now() + Duration::from_secs(10);
    while host.guest(name).is_some() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        host.guest(name).is_none(),
        "the destination still holds {name}"
    );
    if let Some(g) = host.last_created() {
        assert!(g.destroyed(), "the incoming copy was destroyed");
    }
}

/// The guest moved: it runs on the destination with the source's memory and state, and the
/// source copy stays paused (the agent destroys it).
pub fn assert_moved(src: &FakeGuest, host: &FakeHost) -> Arc<FakeGuest> {
    let name = &SourceGuest::spec(src).name;
    let dst = host.guest(name).expect("the destination holds the guest");
    assert_eq!(
        dst.status(),
        VmStatus::Running,
        "it runs on the destination"
    );
    assert_eq!(
        src.status(),
        VmStatus::Paused,
        "the source copy stays paused"
    );
    assert_eq!(
        fake::first_difference(src.mem(), dst.mem()),
        None,
        "memory differs"
    );
    assert_eq!(dst.state_bytes(), src.state_bytes(), "the state arrived");
    dst
}
