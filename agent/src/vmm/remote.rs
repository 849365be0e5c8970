//! The agent's handle on a guest that runs in a `ferry vmm` process of its own: a
//! [`RemoteGuest`] implements the migration engine's [`SourceGuest`] and [`IncomingGuest`] by
//! requests to the VMM, while the guest's memory is the VMM's memfds mapped here (pages are
//! read and written through the mapping; only the dirty log, pause, throttle and state cross
//! the socket).
//!
//! Two connections per VMM: `ctl` for operations that change the guest (they may take a pause's
//! 2 s), `query` for what `list`, `inspect` and `console` show, so a read never waits behind a
//! migration's request. A connection that fails (the VMM died) marks the guest ended; the
//! reason comes from the monitor's exit record (`DIR/vmm/N.exit`).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::client::{ClientError, VmmClient};
use super::protocol::{ErrorKind, HelloReply, Mode, VmmStatus};
use super::{CreateLaunch, ExitRecord, IncomingLaunch};
use crate::migrate::guest::{IncomingGuest, SourceGuest};
use crate::vm::cpuid::CpuidEntry;
use crate::vm::memory::{DirtyBitmap, GuestMemory};
use crate::vm::state::VmState;
use crate::vm::virtio::net::Forwarding;
use crate::vm::virtio::Quiesced;
use crate::vm::workload::{self, Heartbeat};
use crate::vm::{GuestKind, VmError, VmSpec, VmStatus};

/// How long a freshly spawned VMM may take to set its guest up and answer Hello.
pub const SPAWN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a stop waits for the VMM's exit record.
const STOP_WAIT: Duration = Duration::from_secs(5);
/// How long an adopting agent waits for an existing VMM's Hello.
pub const ADOPT_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of starting or reaching a VMM.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("cannot write the launch file {}: {source}", path.display())]
    Launch {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start `ferry vmm` for {name}: {source}")]
    Spawn {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the VMM of {name} did not come up: {why}")]
    NotUp { name: String, why: String },
    #[error("the VMM at {} is {got:?}, not {want:?}", path.display())]
    Identity {
        path: PathBuf,
        want: String,
        got: String,
    },
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// A guest in its own VMM process.
pub struct RemoteGuest {
    spec: VmSpec,
    state_dir: PathBuf,
    hello: HelloReply,
    ctl: Mutex<Option<VmmClient>>,
    query: Mutex<Option<VmmClient>>,
    memory: Arc<GuestMemory>,
    /// Why the VMM ended, once it has (and whether cleanly).
    ended: Mutex<Option<(bool, String)>>,
    last_status: Mutex<Option<VmmStatus>>,
    quiesced: Mutex<Quiesced>,
}

impl std::fmt::Debug for RemoteGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteGuest")
            .field("name", &self.spec.name)
            .field("pid", &self.hello.pid)
            .field("instance_id", &self.hello.instance_id)
            .finish()
    }
}

/// Spawn `ferry vmm` (this very binary) for `name` with a launch file and wait for its Hello.
fn spawn(
    state_dir: &Path,
    name: &str,
    flag: &str,
    launch: &[u8],
) -> Result<Arc<RemoteGuest>, RemoteError> {
    let dir = super::vmm_dir(state_dir);
    std::fs::create_dir_all(&dir).map_err(|source| RemoteError::Launch {
        path: dir.clone(),
        source,
    })?;
    let file = dir.join(format!("{name}.launch.json"));
    std::fs::write(&file, launch).map_err(|source| RemoteError::Launch {
        path: file.clone(),
        source,
    })?;
    let log_path = dir.join(format!("{name}.log"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|source| RemoteError::Launch {
            path: log_path.clone(),
            source,
        })?;
    let log2 = log.try_clone().map_err(|source| RemoteError::Launch {
        path: log_path.clone(),
        source,
    })?;
    let exe = std::env::current_exe().map_err(|source| RemoteError::Spawn {
        name: name.to_string(),
        source,
    })?;
    // Whatever was left of an earlier VMM of this name (its exit record) is not this one's.
    let _ = std::fs::remove_file(super::exit_path(state_dir, name));
    // The program is `/proc/self/exe`, the agent's own binary even after it was replaced on disk
    // (an upgrade that has not restarted the agent yet: `current_exe` then names a deleted
    // file), so a VMM always speaks its agent's protocol. argv[0] is the path it was run as.
    let arg0 = exe
        .to_str()
        .and_then(|s| s.strip_suffix(" (deleted)"))
        .map(PathBuf::from)
        .unwrap_or(exe);
    let mut child = Command::new("/proc/self/exe")
        .arg0(&arg0)
        .arg("vmm")
        .arg("--name")
        .arg(name)
        .arg("--state-dir")
        .arg(state_dir)
        .arg(flag)
        .arg(&file)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .map_err(|source| RemoteError::Spawn {
            name: name.to_string(),
            source,
        })?;
    let pid = child.id();
    tracing::info!(vm = name, monitor = pid, mode = flag, "VMM spawned");
    let sock = super::socket_path(state_dir, name);
    // Wait for its socket, or for the monitor to end (a setup failure).
    let deadline = std::time::Instant::now() + SPAWN_TIMEOUT;
    let client = loop {
        match VmmClient::connect(&sock, SPAWN_TIMEOUT) {
            Ok(c) if c.hello().monitor_pid == pid => break c,
            Ok(_) | Err(_) => {}
        }
        if let Ok(Some(st)) = child.try_wait() {
            let why = super::read_exit_record(state_dir, name)
                .map(|r| r.reason)
                .unwrap_or_else(|| format!("`ferry vmm` ended ({st}); see {}", log_path.display()));
            return Err(RemoteError::NotUp {
                name: name.to_string(),
                why,
            });
        }
        if std::time::Instant::now() > deadline {
            return Err(RemoteError::NotUp {
                name: name.to_string(),
                why: format!("no answer within {SPAWN_TIMEOUT:?}"),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // The monitor is our child until we die: reap it when it ends.
    let _ = std::thread::Builder::new()
        .name(format!("reap-{name}"))
        .spawn(move || {
            let _ = child.wait();
        });
    RemoteGuest::from_client(state_dir, client)
}

impl RemoteGuest {
    /// Start a new guest in a VMM of its own; it stays `created` until [`RemoteGuest::start`].
    pub fn create(
        state_dir: &Path,
        launch: &CreateLaunch,
    ) -> Result<Arc<RemoteGuest>, RemoteError> {
        let bytes = serde_json::to_vec_pretty(launch).map_err(|e| RemoteError::Launch {
            path: super::vmm_dir(state_dir),
            source: std::io::Error::other(e),
        })?;
        spawn(state_dir, &launch.spec.name, "--create", &bytes)
    }

    /// An empty guest waiting for an incoming migration, in a VMM of its own.
    pub fn incoming(
        state_dir: &Path,
        launch: &IncomingLaunch,
    ) -> Result<Arc<RemoteGuest>, RemoteError> {
        let bytes = serde_json::to_vec_pretty(launch).map_err(|e| RemoteError::Launch {
            path: super::vmm_dir(state_dir),
            source: std::io::Error::other(e),
        })?;
        spawn(state_dir, &launch.spec.name, "--incoming", &bytes)
    }

    /// Adopt a running VMM (after an agent restart): connect to its socket, check it is `name`.
    pub fn adopt(state_dir: &Path, name: &str) -> Result<Arc<RemoteGuest>, RemoteError> {
        let sock = super::socket_path(state_dir, name);
        let client = VmmClient::connect(&sock, ADOPT_TIMEOUT)?;
        if client.hello().name != name {
            return Err(RemoteError::Identity {
                path: sock,
                want: name.to_string(),
                got: client.hello().name.clone(),
            });
        }
        Self::from_client(state_dir, client)
    }

    fn from_client(state_dir: &Path, mut ctl: VmmClient) -> Result<Arc<RemoteGuest>, RemoteError> {
        let hello = ctl.hello().clone();
        let memory = ctl.memory()?;
        let sock = super::socket_path(state_dir, &hello.name);
        let query = VmmClient::connect(&sock, ADOPT_TIMEOUT)?;
        Ok(Arc::new(RemoteGuest {
            spec: hello.spec.clone(),
            state_dir: state_dir.to_path_buf(),
            hello,
            ctl: Mutex::new(Some(ctl)),
            query: Mutex::new(Some(query)),
            memory,
            ended: Mutex::new(None),
            last_status: Mutex::new(None),
            quiesced: Mutex::new(Quiesced::default()),
        }))
    }

    pub fn spec(&self) -> &VmSpec {
        &self.spec
    }

    /// Who the VMM said it is.
    pub fn hello(&self) -> &HelloReply {
        &self.hello
    }

    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    /// Whether the VMM came up for an incoming migration.
    pub fn is_incoming(&self) -> bool {
        self.hello.mode == Mode::Incoming
    }

    /// Why the VMM ended, if it has: (clean, reason).
    pub fn ended(&self) -> Option<(bool, String)> {
        self.ended.lock().ok().and_then(|e| e.clone())
    }

    /// The VMM's connection failed: it is gone (or going). Record why, from its exit record
    /// (the monitor writes it right after the VMM's end).
    fn lost(&self, err: &ClientError) {
        if let Ok(mut e) = self.ended.lock() {
            if e.is_some() {
                return;
            }
            let mut rec: Option<ExitRecord> = None;
            for _ in 0..50 {
                rec = super::read_exit_record(&self.state_dir, &self.spec.name)
                    .filter(|r| r.instance_id == self.hello.instance_id);
                if rec.is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let (clean, reason) = match rec {
                Some(r) => (r.clean, r.reason),
                None => (
                    false,
                    format!("the VMM (pid {}) is gone: {err}", self.hello.pid),
                ),
            };
            if clean {
                tracing::info!(vm = %self.spec.name, reason = %reason, "VMM ended");
            } else {
                tracing::error!(vm = %self.spec.name, reason = %reason, "VMM died: its guest is crashed");
            }
            *e = Some((clean, reason));
        }
        for c in [&self.ctl, &self.query] {
            if let Ok(mut g) = c.lock() {
                *g = None;
            }
        }
    }

    fn call<T>(
        &self,
        which: &Mutex<Option<VmmClient>>,
        f: impl FnOnce(&mut VmmClient) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        let res = {
            let mut g = match which.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            let Some(c) = g.as_mut() else {
                return Err(ClientError::Remote {
                    request: "a request",
                    error: super::protocol::RemoteError {
                        kind: ErrorKind::State,
                        message: format!(
                            "the VMM of {} has ended: {}",
                            self.spec.name,
                            self.ended().map(|e| e.1).unwrap_or_default()
                        ),
                    },
                });
            };
            f(c)
        };
        if let Err(e) = &res {
            if e.remote_kind().is_none() && !matches!(e, ClientError::Timeout { .. }) {
                self.lost(e);
            }
        }
        res
    }

    fn ctl<T>(
        &self,
        f: impl FnOnce(&mut VmmClient) -> Result<T, ClientError>,
    ) -> Result<T, VmError> {
        self.call(&self.ctl, f).map_err(|e| self.vm_error(e))
    }

    fn vm_error(&self, e: ClientError) -> VmError {
        match e.remote_kind() {
            Some(ErrorKind::State) => {
                VmError::State(self.status(), "the VMM refused it in this state")
            }
            Some(ErrorKind::Invalid) => VmError::Spec(e.to_string()),
            _ => VmError::Device(format!("VMM of {}: {e}", self.spec.name)),
        }
    }

    /// The VMM's status (one request on the query connection); None once it has ended.
    pub fn vmm_status(&self) -> Option<VmmStatus> {
        let s = self.call(&self.query, |c| c.status()).ok();
        if let (Some(s), Ok(mut l)) = (&s, self.last_status.lock()) {
            *l = Some(s.clone());
        }
        s
    }

    /// Ask the VMM whether it is alive (the daemon's sampler): a dead one is noticed here.
    pub fn poll(&self) {
        let _ = self.vmm_status();
    }

    pub fn status(&self) -> VmStatus {
        if let Some((clean, _)) = self.ended() {
            return if clean {
                VmStatus::Stopped
            } else {
                VmStatus::Crashed
            };
        }
        match self.vmm_status() {
            Some(s) => s.state,
            None => self.status_after_end(),
        }
    }

    fn status_after_end(&self) -> VmStatus {
        match self.ended() {
            Some((true, _)) => VmStatus::Stopped,
            _ => VmStatus::Crashed,
        }
    }

    /// Why the guest stopped on its own: its vCPU fault, or the VMM's death.
    pub fn fault(&self, status: Option<&VmmStatus>) -> Option<String> {
        match self.ended() {
            Some((false, reason)) => Some(format!("VMM {reason}")),
            Some((true, _)) => None,
            None => status.and_then(|s| s.fault.clone()),
        }
    }

    /// Workload heartbeats, read through the shared mapping (no request).
    pub fn heartbeats(&self) -> Option<Vec<Heartbeat>> {
        match self.spec.kind {
            GuestKind::Workload(_) => workload::heartbeats(&self.memory, self.spec.vcpus).ok(),
            _ => None,
        }
    }

    pub fn console(&self, offset: u64, max: u32) -> Result<(u64, Vec<u8>), VmError> {
        self.call(&self.query, |c| c.console(offset, max))
            .map_err(|e| self.vm_error(e))
    }

    pub fn cpuid(&self) -> Vec<CpuidEntry> {
        self.call(&self.query, |c| c.cpuid()).unwrap_or_default()
    }

    /// Run a created, restored or paused guest.
    pub fn start(&self) -> Result<(), VmError> {
        self.ctl(|c| c.resume())
    }

    pub fn pause(&self) -> Result<Duration, VmError> {
        let (took, q) = self.ctl(|c| c.pause())?;
        if let Ok(mut g) = self.quiesced.lock() {
            *g = q;
        }
        Ok(took)
    }

    /// Stop the guest; its VMM exits. Nothing happens to a VMM already gone.
    pub fn stop(&self) {
        if self.ended().is_some() {
            return;
        }
        match self.call(&self.ctl, |c| c.stop()) {
            Ok(()) => {
                if let Ok(mut e) = self.ended.lock() {
                    *e = Some((true, "stopped by request".into()));
                }
                for c in [&self.ctl, &self.query] {
                    if let Ok(mut g) = c.lock() {
                        *g = None;
                    }
                }
                // It exits right after replying: wait for its monitor's record, so that a new
                // VMM of the same name (a start right after) finds the socket free.
                let deadline = std::time::Instant::now() + STOP_WAIT;
                while std::time::Instant::now() < deadline
                    && super::read_exit_record(&self.state_dir, &self.spec.name)
                        .is_none_or(|r| r.instance_id != self.hello.instance_id)
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            Err(e) => tracing::warn!(vm = %self.spec.name, error = %e, "could not stop the VMM"),
        }
    }
}

impl SourceGuest for RemoteGuest {
    fn spec(&self) -> &VmSpec {
        &self.spec
    }
    fn memory(&self) -> Arc<GuestMemory> {
        self.memory.clone()
    }
    fn set_dirty_logging(&self, on: bool) -> Result<(), VmError> {
        self.ctl(|c| c.set_dirty_logging(on))
    }
    fn take_dirty(&self) -> Result<DirtyBitmap, VmError> {
        self.ctl(|c| c.fetch_dirty())
    }
    fn populated(&self) -> DirtyBitmap {
        self.memory.populated()
    }
    fn set_throttle(&self, pct: u8) {
        if let Err(e) = self.ctl(|c| c.throttle(pct)) {
            tracing::warn!(vm = %self.spec.name, error = %e, "could not throttle the guest");
        }
    }
    fn pause(&self) -> Result<(), VmError> {
        RemoteGuest::pause(self).map(|_| ())
    }
    fn resume(&self) -> Result<(), VmError> {
        self.ctl(|c| c.resume())
    }
    fn status(&self) -> VmStatus {
        RemoteGuest::status(self)
    }
    fn last_quiesced(&self) -> Quiesced {
        self.quiesced.lock().map(|q| *q).unwrap_or_default()
    }
    fn capture_state(&self) -> Result<VmState, VmError> {
        let bytes = self.ctl(|c| c.capture_state())?;
        VmState::decode(&bytes).map_err(|e| VmError::Device(format!("VMM state: {e}")))
    }
    fn take_for_forwarding(&self) -> Vec<(usize, Forwarding)> {
        self.ctl(|c| c.take_forwarding()).unwrap_or_else(|e| {
            tracing::warn!(vm = %self.spec.name, error = %e, "could not take the NICs for forwarding");
            Vec::new()
        })
    }
}

impl IncomingGuest for RemoteGuest {
    fn spec(&self) -> &VmSpec {
        &self.spec
    }
    fn memory(&self) -> Arc<GuestMemory> {
        self.memory.clone()
    }
    fn nic_macs(&self) -> Vec<[u8; 6]> {
        self.spec
            .nics
            .iter()
            .filter_map(|n| crate::vm::parse_mac(&n.mac))
            .collect()
    }
    fn deliver_forwarded(&self, nic: usize, frames: Vec<Vec<u8>>) {
        for chunk in frames.chunks(4096) {
            if let Err(e) = self.ctl(|c| c.deliver_frames(nic as u32, chunk.to_vec())) {
                tracing::warn!(vm = %self.spec.name, error = %e, "could not deliver forwarded frames");
                return;
            }
        }
    }
    fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        let bytes = state
            .encode()
            .map_err(|e| VmError::Device(format!("VMM state: {e}")))?;
        self.ctl(|c| c.restore_state(&bytes))
    }
    fn resume(&self) -> Result<(), VmError> {
        self.ctl(|c| c.resume())
    }
    fn heartbeats(&self) -> Option<Vec<Heartbeat>> {
        RemoteGuest::heartbeats(self)
    }
    fn tsc_khz(&self) -> u32 {
        self.last_status
            .lock()
            .ok()
            .and_then(|s| s.as_ref().map(|s| s.tsc_khz))
            .filter(|k| *k != 0)
            .or_else(|| self.vmm_status().map(|s| s.tsc_khz))
            .unwrap_or(0)
    }
    fn destroy(&self) {
        self.stop();
    }
}
