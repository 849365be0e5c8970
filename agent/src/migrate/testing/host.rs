//! A fake destination agent: a [`Host`] that keeps fake guests in a table and its ownership
//! records in a temporary directory, served on loopback in this process ([`DestServer`]) or in
//! a child process of the test binary ([`ChildDest`], for faults that kill the agent).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::fake::FakeGuest;
use crate::auth::ClusterKey;
use crate::checks::HostFacts;
use crate::migrate::dest::{Host, HostError};
use crate::migrate::guest::{IncomingGuest, SourceGuest};
use crate::migrate::ownership::{Ownership, Staged};
use crate::migrate::session::Identity;
use crate::migrate::{MigrationHandle, MigrationRecord};
use crate::vm::memory::RegionLayout;
use crate::vm::{VmSpec, VmStatus};

pub const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A directory under the system's temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(what: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "ferry-engine-{what}-{}-{:08x}",
            std::process::id(),
            crate::util::random_u64().expect("random") as u32
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The destination agent's side of the engine, in memory.
pub struct FakeHost {
    pub name: String,
    pub key: Option<Arc<ClusterKey>>,
    pub requires_encryption: bool,
    pub ownership: Option<Ownership>,
    guests: Mutex<BTreeMap<String, Arc<FakeGuest>>>,
    migrations: Mutex<Vec<Arc<MigrationHandle>>>,
    /// Every incoming guest it created, in order (tests inspect them after a failure).
    created: Mutex<Vec<Arc<FakeGuest>>>,
}

impl FakeHost {
    pub fn new(name: &str, key: Option<Arc<ClusterKey>>, ownership: Option<&Path>) -> FakeHost {
        FakeHost {
            name: name.into(),
            key,
            requires_encryption: false,
            ownership: ownership.map(|d| Ownership::new(d.to_path_buf())),
            guests: Mutex::new(BTreeMap::new()),
            migrations: Mutex::new(Vec::new()),
            created: Mutex::new(Vec::new()),
        }
    }

    /// The guest of that name it holds (incoming or running).
    pub fn guest(&self, name: &str) -> Option<Arc<FakeGuest>> {
        self.guests.lock().unwrap().get(name).cloned()
    }

    /// The last incoming guest it created, whatever became of it.
    pub fn last_created(&self) -> Option<Arc<FakeGuest>> {
        self.created.lock().unwrap().last().cloned()
    }

    /// Its record of migration `id` (once it finished, if `wait` allows).
    pub fn migration(&self, id: &str, wait: Duration) -> Option<MigrationRecord> {
        let until = Instant::now() + wait;
        loop {
            let r = self
                .migrations
                .lock()
                .unwrap()
                .iter()
                .find(|h| h.id == id)
                .map(|h| h.record());
            if r.as_ref().is_some_and(|r| r.phase.finished()) || Instant::now() >= until {
                return r;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Host for FakeHost {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn identity(&self) -> Identity {
        Identity {
            agent: self.name.clone(),
            key: self.key.clone(),
        }
    }
    fn requires_encryption(&self) -> bool {
        self.requires_encryption
    }
    fn migration_addr(&self) -> Result<IpAddr, HostError> {
        Ok(LOCALHOST)
    }
    fn create_incoming(
        &self,
        spec: &VmSpec,
        regions: &[RegionLayout],
        handle: &Arc<MigrationHandle>,
    ) -> Result<Arc<dyn IncomingGuest>, HostError> {
        if self.guests.lock().unwrap().contains_key(&spec.name) {
            return Err(HostError::NameTaken(format!(
                "{} already has a VM named {}",
                self.name, spec.name
            )));
        }
        if crate::faults::hit_in("dest:create", &handle.id).as_deref() == Some("fail") {
            return Err(HostError::NoRoom(format!(
                "cannot allocate {} MiB of guest memory: out of memory (injected fault)",
                spec.memory_mib
            )));
        }
        let g = FakeGuest::incoming(spec, regions);
        self.guests
            .lock()
            .unwrap()
            .insert(spec.name.clone(), g.clone());
        self.created.lock().unwrap().push(g.clone());
        Ok(g)
    }
    fn incoming_done(&self, name: &str, ok: bool) {
        if !ok {
            if let Some(g) = self.guests.lock().unwrap().remove(name) {
                g.destroy();
            }
        }
    }
    fn register(&self, handle: Arc<MigrationHandle>) {
        self.migrations.lock().unwrap().push(handle);
    }
    fn facts(&self, _disks: &[String]) -> HostFacts {
        let guests = self.guests.lock().unwrap();
        HostFacts {
            name: self.name.clone(),
            migration_enabled: true,
            migration_address: Some(LOCALHOST.to_string()),
            vms: guests.keys().cloned().collect(),
            running: guests
                .iter()
                .filter(|(_, g)| g.status() == VmStatus::Running)
                .map(|(n, _)| n.clone())
                .collect(),
            ..HostFacts::default()
        }
    }
    fn announce(&self, _spec: &VmSpec) -> Vec<crate::announce::Announcement> {
        Vec::new()
    }
    // The ownership steps below are the agent's (`control/agent.rs`), without disk locks.
    fn prepare_claim(&self, vm: &str, from: &str, migration: &str) -> Option<Staged> {
        let o = self.ownership.as_ref()?;
        let (expect, g) = match o.current(vm).ok()? {
            Some(r) if r.owned_by(from) => (Some(from), r.generation),
            None => (None, 0),
            Some(_) => return None,
        };
        o.stage(vm, expect, g, Some(&self.name), Some(migration), "migrated")
            .ok()
    }
    fn claim(
        &self,
        vm: &str,
        from: &str,
        generation: Option<u64>,
        migration: &str,
        prepared: Option<Staged>,
    ) -> Result<Option<Staged>, HostError> {
        let Some(o) = &self.ownership else {
            return Ok(None);
        };
        let (staged, _) = o
            .take_over(vm, from, generation, &self.name, migration, prepared)
            .map_err(|e| HostError::Ownership(e.to_string()))?;
        Ok(Some(staged))
    }
    fn claimed(&self, vm: &str) {
        if let Some(o) = &self.ownership {
            o.prune(vm);
        }
    }
    fn give_back(&self, vm: &str, to: &str, migration: &str) {
        let Some(o) = &self.ownership else { return };
        if let Ok(Some(r)) = o.current(vm) {
            if r.owned_by(&self.name) {
                let _ = o.claim(
                    vm,
                    Some(&self.name),
                    r.generation,
                    Some(to),
                    Some(migration),
                    "returned",
                );
            }
        }
    }
}

/// A destination agent's control port on loopback, served by threads of this process.
pub struct DestServer {
    pub addr: SocketAddr,
    pub host: Arc<FakeHost>,
    stop: Arc<AtomicBool>,
    join: Option<JoinHandle<()>>,
}

impl DestServer {
    /// Serve `host` on a fresh port.
    pub fn start(host: Arc<FakeHost>) -> DestServer {
        Self::start_on(host, SocketAddr::new(LOCALHOST, 0))
    }

    /// Serve `host` on `addr` (a port another server had: an agent that restarted).
    pub fn start_on(host: Arc<FakeHost>, addr: SocketAddr) -> DestServer {
        let listener = TcpListener::bind(addr).expect("bind the control port");
        let addr = listener.local_addr().expect("local addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let (h, s) = (host.clone(), stop.clone());
        let join = std::thread::Builder::new()
            .name("fake-dest".into())
            .spawn(move || {
                while !s.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            let _ = conn.set_nonblocking(false);
                            let h: Arc<dyn Host> = h.clone();
                            let _ = std::thread::Builder::new()
                                .name("fake-dest-session".into())
                                .spawn(move || crate::migrate::dest::serve(conn, h));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            })
            .expect("spawn the server");
        DestServer {
            addr,
            host,
            stop,
            join: Some(join),
        }
    }
}

impl Drop for DestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

/// The environment variable that makes the test binary's `child_destination_agent` serve.
pub const CHILD_ENV: &str = "FERRY_ENGINE_TEST_CHILD";
/// The line a child prints once it listens.
const CHILD_LINE: &str = "FERRY-CHILD-ADDR ";

/// What a child destination agent is given (in [`CHILD_ENV`], as JSON).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ChildConfig {
    pub name: String,
    pub ownership: Option<PathBuf>,
    /// Faults armed in the child for any migration, as (point, action).
    pub faults: Vec<(String, String)>,
}

/// Run as the child: serve until the parent closes our stdin (or a fault kills us).
pub fn child_main() {
    let Ok(cfg) = std::env::var(CHILD_ENV) else {
        return;
    };
    let cfg: ChildConfig = serde_json::from_str(&cfg).expect("child config");
    for (point, action) in cfg.faults {
        crate::faults::arm(crate::faults::Fault { point, action }).expect("arm");
    }
    let host = Arc::new(FakeHost::new(&cfg.name, None, cfg.ownership.as_deref()));
    let server = DestServer::start(host);
    println!("{CHILD_LINE}{}", server.addr);
    use std::io::{Read, Write};
    let _ = std::io::stdout().flush();
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(server);
}

/// A destination agent in a child process of the test binary: a fault's `kill` kills it
/// (SIGKILL), as it kills a real agent, without taking the tests with it.
pub struct ChildDest {
    child: Child,
    pub addr: SocketAddr,
}

impl ChildDest {
    pub fn spawn(cfg: &ChildConfig) -> ChildDest {
        let exe = std::env::current_exe().expect("the test binary");
        let mut child = Command::new(exe)
            .args([
                "--exact",
                "migrate::engine_tests::child_destination_agent",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, serde_json::to_string(cfg).expect("config"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the child agent");
        let out = child.stdout.take().expect("child stdout");
        let mut lines = BufReader::new(out).lines();
        let addr = loop {
            match lines.next() {
                Some(Ok(l)) => {
                    // libtest may have put "test … " before it on the same line.
                    if let Some(i) = l.find(CHILD_LINE) {
                        break l[i + CHILD_LINE.len()..]
                            .trim()
                            .parse()
                            .expect("child address");
                    }
                }
                _ => panic!("the child agent ended before it listened"),
            }
        };
        // Keep its stdout drained.
        std::thread::spawn(move || lines.for_each(drop));
        ChildDest { child, addr }
    }

    /// Wait up to `secs` for the child to die at its armed fault.
    pub fn died_within(&mut self, wait: Duration) -> bool {
        let until = Instant::now() + wait;
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }
}

impl Drop for ChildDest {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
