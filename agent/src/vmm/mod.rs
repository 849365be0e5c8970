//! `ferry vmm`: one guest in a process of its own, jailed, that the agent drives over a unix
//! socket (see docs/vmm.md).
//!
//! ```text
//!  agent ── spawn `ferry vmm --name N --state-dir DIR --create F | --incoming F`
//!    │
//!    │   monitor (setsid; unjailed, does nothing but wait)     DIR/vmm/N.sock  (0600)
//!    │     └─ fork ─ VMM: own mount namespace, /dev/kvm, VM,   DIR/vmm/N.exit  (written by
//!    │                 memfd memory, taps, disks, then jail      the monitor when the VMM
//!    │                 (uid, no capabilities, seccomp) and       ends: code or signal and
//!    │                 serve the socket                          the reason)
//!    └── client.rs ═══ protocol.rs frames (+ SCM_RIGHTS: memfds, taps) ═══ server.rs
//! ```
//!
//! - [`protocol`]: the typed, versioned requests and replies and their framing.
//! - [`server`]: the VMM's side; [`client`]: the agent's (blocking, with timeouts).
//! - [`jail`]: mount namespace, privileges dropped, seccomp filter.
//!
//! The VMM is started by the agent (`ferry vmm` is a hidden subcommand of the same binary), runs
//! in its own session so that signals to the agent do not reach it, and outlives the agent: a
//! new agent connects to the same socket and adopts it. An `--incoming` VMM whose agent leaves
//! before the guest ever ran exits (the migration failed).

pub mod client;
pub mod jail;
pub mod protocol;
pub mod remote;
pub mod server;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::vm::cpuid::FeatureBit;
use crate::vm::memory::RegionLayout;
use crate::vm::{DeviceEnv, Hypervisor, Vm, VmError, VmSpec};
use protocol::{HelloReply, Mode};

/// The unprivileged user a VMM becomes by default (`nobody`).
pub const DEFAULT_UID: u32 = 65534;
/// The unprivileged group a VMM becomes by default (`nogroup`).
pub const DEFAULT_GID: u32 = 65534;
/// Most bytes of last words a VMM hands its monitor.
const MAX_LAST_WORDS: usize = 4096;

/// Errors of `ferry vmm`.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(
        "VM name {0:?} is not valid: use 1-64 of [A-Za-z0-9._-], not starting with '.' or '-'"
    )]
    Name(String),
    #[error("the state directory must be an absolute path, not {0:?}")]
    StateDir(PathBuf),
    #[error("cannot read the launch file {path}: {source}")]
    ReadLaunch {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the launch file {path} is not valid: {source}")]
    ParseLaunch {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("the launch file describes guest {spec:?} but --name is {name:?}")]
    NameMismatch { spec: String, name: String },
    #[error("a VMM for {name} is already serving {}; stop it first", socket.display())]
    AlreadyRunning { name: String, socket: PathBuf },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Sys {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Jail(#[from] jail::JailError),
    #[error("{0}")]
    Usage(&'static str),
    #[error("ferry vmm must fork before any thread starts, but this process has {0} threads")]
    Threads(u64),
    #[error("the VMM ended: {0}")]
    Ended(String),
}

/// `ferry vmm` (internal: the agent starts it). The command line is the CLI's
/// (`ferry_cli::args::VmmCmd`); this is what it parsed.
#[derive(Debug, Clone)]
pub struct VmmArgs {
    /// The guest's name (also the socket's: DIR/vmm/NAME.sock).
    pub name: String,
    /// The agent's state directory.
    pub state_dir: PathBuf,
    /// Start a new guest from this launch file (JSON: spec, devices, host).
    pub create: Option<PathBuf>,
    /// Wait for an incoming migration: an empty guest of this launch file's layout.
    pub incoming: Option<PathBuf>,
    /// The user the VMM becomes once set up (not 0).
    pub uid: u32,
    /// The group the VMM becomes once set up (not 0).
    pub gid: u32,
    /// Accept test-only requests (a forbidden system call); never used by the agent.
    pub test_requests: bool,
    /// What the seccomp filter does with a forbidden call.
    pub seccomp: jail::SeccompMode,
}

/// Host settings the agent applies to its own hypervisor, which the VMM's must match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HostSettings {
    /// Transparent huge pages for guest memory (`[limits] huge_pages`).
    pub huge_pages: bool,
    /// CPU features this host hides from guests (`[cpu] mask`).
    pub cpu_mask: BTreeSet<FeatureBit>,
}

impl Default for HostSettings {
    fn default() -> Self {
        HostSettings {
            huge_pages: true,
            cpu_mask: BTreeSet::new(),
        }
    }
}

/// The `--create` launch file: what [`Vm::create_in`] takes, and the host's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateLaunch {
    pub spec: VmSpec,
    #[serde(default)]
    pub devices: DeviceEnv,
    #[serde(default)]
    pub host: HostSettings,
}

/// The `--incoming` launch file: what [`Vm::create_empty_in`] takes, and the host's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncomingLaunch {
    pub spec: VmSpec,
    pub regions: Vec<RegionLayout>,
    #[serde(default)]
    pub devices: DeviceEnv,
    #[serde(default)]
    pub host: HostSettings,
}

enum Launch {
    Create(CreateLaunch),
    Incoming(IncomingLaunch),
}

impl Launch {
    fn spec(&self) -> &VmSpec {
        match self {
            Launch::Create(c) => &c.spec,
            Launch::Incoming(i) => &i.spec,
        }
    }
    fn host(&self) -> &HostSettings {
        match self {
            Launch::Create(c) => &c.host,
            Launch::Incoming(i) => &i.host,
        }
    }
    fn mode(&self) -> Mode {
        match self {
            Launch::Create(_) => Mode::Create,
            Launch::Incoming(_) => Mode::Incoming,
        }
    }
}

/// Where VMM sockets and exit records live.
pub fn vmm_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("vmm")
}

/// The socket of VM `name`'s VMM.
pub fn socket_path(state_dir: &Path, name: &str) -> PathBuf {
    vmm_dir(state_dir).join(format!("{name}.sock"))
}

/// The exit record of VM `name`'s last VMM.
pub fn exit_path(state_dir: &Path, name: &str) -> PathBuf {
    vmm_dir(state_dir).join(format!("{name}.exit"))
}

/// What a VMM's monitor writes when the VMM ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    pub name: String,
    pub instance_id: u64,
    pub pid: u32,
    pub exited_unix_ms: u64,
    /// Exit code, when it exited.
    pub code: Option<i32>,
    /// The signal that killed it, when one did.
    pub signal: Option<i32>,
    /// "stopped by request", "killed by SIGSYS: ...", "exited with code 2: setup failed: ...".
    pub reason: String,
    /// Whether the VMM ended as asked (a Stop, or an abandoned incoming migration).
    pub clean: bool,
}

/// The exit record of VM `name`'s last VMM, if there is one.
pub fn read_exit_record(state_dir: &Path, name: &str) -> Option<ExitRecord> {
    let bytes = std::fs::read(exit_path(state_dir, name)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn read_launch(args: &VmmArgs) -> Result<Launch, VmmError> {
    let (path, incoming) = match (&args.create, &args.incoming) {
        (Some(p), None) => (p, false),
        (None, Some(p)) => (p, true),
        _ => {
            return Err(VmmError::Usage(
                "ferry vmm needs exactly one of --create and --incoming",
            ))
        }
    };
    let bytes = std::fs::read(path).map_err(|source| VmmError::ReadLaunch {
        path: path.clone(),
        source,
    })?;
    let parse_err = |source| VmmError::ParseLaunch {
        path: path.clone(),
        source,
    };
    let launch = if incoming {
        Launch::Incoming(serde_json::from_slice(&bytes).map_err(parse_err)?)
    } else {
        Launch::Create(serde_json::from_slice(&bytes).map_err(parse_err)?)
    };
    if launch.spec().name != args.name {
        return Err(VmmError::NameMismatch {
            spec: launch.spec().name.clone(),
            name: args.name.clone(),
        });
    }
    launch.spec().validate()?;
    Ok(launch)
}

/// Run `ferry vmm`: returns when the VMM has ended (this is the monitor's return; the VMM
/// itself never returns from here).
pub fn run(args: &VmmArgs) -> Result<(), VmmError> {
    if !crate::control::config::valid_name(&args.name) {
        return Err(VmmError::Name(args.name.clone()));
    }
    if !args.state_dir.is_absolute() {
        return Err(VmmError::StateDir(args.state_dir.clone()));
    }
    let launch = read_launch(args)?;
    let dir = vmm_dir(&args.state_dir);
    std::fs::create_dir_all(&dir).map_err(|source| VmmError::Io {
        what: "cannot create",
        path: dir.clone(),
        source,
    })?;
    let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
    // A session of our own: signals to the agent's process group or session do not reach us.
    // SAFETY: setsid has no preconditions; it fails only if we already lead a process group.
    if unsafe { libc::setsid() } < 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "setsid: already a process group leader");
    }
    let socket = socket_path(&args.state_dir, &args.name);
    if UnixStream::connect(&socket).is_ok() {
        return Err(VmmError::AlreadyRunning {
            name: args.name.clone(),
            socket,
        });
    }
    let _ = std::fs::remove_file(&socket);
    let exit_file = exit_path(&args.state_dir, &args.name);
    let _ = std::fs::remove_file(&exit_file);
    // Bind with mode 0600 from the start (no window where others could connect).
    // SAFETY: umask only changes this process's file creation mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(&socket);
    // SAFETY: as above, restoring it.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(|source| VmmError::Io {
        what: "cannot listen on",
        path: socket.clone(),
        source,
    })?;
    let socket_ino = std::fs::metadata(&socket).map(|m| (m.dev(), m.ino())).ok();
    let mut id = [0u8; 8];
    getrandom::getrandom(&mut id).map_err(|e| VmmError::Sys {
        what: "random instance id",
        source: std::io::Error::other(e.to_string()),
    })?;
    let instance_id = u64::from_le_bytes(id);
    // The VMM tells its monitor its last words through this pipe.
    let mut p = [0; 2];
    // SAFETY: pipe2 into a two-element array; the descriptors are owned right below.
    if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(VmmError::Sys {
            what: "pipe2",
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: fresh descriptors from pipe2, owned once each.
    let (words_r, words_w) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
    let threads = thread_count();
    if threads != 1 {
        return Err(VmmError::Threads(threads));
    }
    // SAFETY: fork in a process with a single thread (checked just above), so the child may run
    // arbitrary code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(VmmError::Sys {
            what: "fork",
            source: std::io::Error::last_os_error(),
        });
    }
    if pid == 0 {
        drop(words_r);
        let code = vmm_main(args, launch, listener, instance_id, words_w);
        std::process::exit(code);
    }
    drop(words_w);
    drop(listener);
    monitor(
        args,
        pid,
        instance_id,
        words_r,
        &socket,
        socket_ino,
        &exit_file,
    )
}

/// Threads of this process (/proc/self/stat field 20); 0 if it cannot be read.
fn thread_count() -> u64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let after = s.get(s.rfind(')')? + 2..)?;
            after.split_whitespace().nth(17)?.parse().ok()
        })
        .unwrap_or(0)
}

/// The monitor: wait for the VMM, then write its exit record and remove its socket.
fn monitor(
    args: &VmmArgs,
    pid: libc::pid_t,
    instance_id: u64,
    words: OwnedFd,
    socket: &Path,
    socket_ino: Option<(u64, u64)>,
    exit_file: &Path,
) -> Result<(), VmmError> {
    tracing::info!(vm = %args.name, pid, "VMM started");
    // Last words end at EOF, which comes when the VMM is gone (every copy of the write end).
    let mut last = Vec::new();
    let _ = std::fs::File::from(words)
        .take(MAX_LAST_WORDS as u64)
        .read_to_end(&mut last);
    let mut status = 0;
    loop {
        // SAFETY: waitpid on our own child with a valid out-pointer.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        if rc == pid {
            break;
        }
        if rc < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return Err(VmmError::Sys {
                what: "waitpid",
                source: std::io::Error::last_os_error(),
            });
        }
    }
    let last = String::from_utf8_lossy(&last).trim().to_string();
    let (code, signal) = if libc::WIFEXITED(status) {
        (Some(libc::WEXITSTATUS(status)), None)
    } else if libc::WIFSIGNALED(status) {
        (None, Some(libc::WTERMSIG(status)))
    } else {
        (None, None)
    };
    let clean = code == Some(0);
    let reason = match (code, signal) {
        (Some(0), _) if !last.is_empty() => last.clone(),
        (Some(0), _) => "exited".to_string(),
        (Some(c), _) if !last.is_empty() => format!("exited with code {c}: {last}"),
        (Some(c), _) => format!("exited with code {c}"),
        (None, Some(s)) => describe_signal(s),
        _ => "ended (unknown status)".to_string(),
    };
    let record = ExitRecord {
        name: args.name.clone(),
        instance_id,
        pid: pid as u32,
        exited_unix_ms: unix_ms(),
        code,
        signal,
        reason: reason.clone(),
        clean,
    };
    if clean {
        tracing::info!(vm = %args.name, pid, reason = %reason, "VMM ended");
    } else {
        tracing::warn!(vm = %args.name, pid, reason = %reason, "VMM ended");
    }
    // Remove the socket only if it is still the one this VMM bound.
    if std::fs::metadata(socket)
        .map(|m| (m.dev(), m.ino()))
        .ok()
        .is_some_and(|i| Some(i) == socket_ino)
    {
        let _ = std::fs::remove_file(socket);
    }
    let tmp = exit_file.with_extension("exit.tmp");
    let written = serde_json::to_vec_pretty(&record)
        .map_err(std::io::Error::other)
        .and_then(|b| std::fs::write(&tmp, b))
        .and_then(|()| std::fs::rename(&tmp, exit_file));
    if let Err(source) = written {
        return Err(VmmError::Io {
            what: "cannot write the exit record",
            path: exit_file.to_path_buf(),
            source,
        });
    }
    if clean {
        Ok(())
    } else {
        Err(VmmError::Ended(reason))
    }
}

fn describe_signal(s: i32) -> String {
    match s {
        libc::SIGSYS => {
            "killed by SIGSYS: it made a system call outside its seccomp filter".to_string()
        }
        libc::SIGKILL => "killed by SIGKILL".to_string(),
        libc::SIGSEGV => "killed by SIGSEGV (a crash in the VMM)".to_string(),
        libc::SIGABRT => "killed by SIGABRT (a panic or abort in the VMM)".to_string(),
        libc::SIGBUS => "killed by SIGBUS (guest memory went away under it)".to_string(),
        libc::SIGTERM => "killed by SIGTERM".to_string(),
        other => format!("killed by signal {other}"),
    }
}

/// The VMM process: set up, jail, serve. Returns its exit code.
fn vmm_main(
    args: &VmmArgs,
    launch: Launch,
    listener: UnixListener,
    instance_id: u64,
    words: OwnedFd,
) -> i32 {
    let mut words = std::fs::File::from(words);
    match vmm_setup_and_serve(args, launch, listener, instance_id) {
        Ok(reason) => {
            let _ = words.write_all(reason.to_string().as_bytes());
            0
        }
        Err(e) => {
            tracing::error!(vm = %args.name, error = %e, "VMM failed");
            let _ = words.write_all(format!("{e}").as_bytes());
            2
        }
    }
}

fn vmm_setup_and_serve(
    args: &VmmArgs,
    launch: Launch,
    listener: UnixListener,
    instance_id: u64,
) -> Result<server::ExitReason, VmmError> {
    let started_unix_ms = unix_ms();
    jail::enter_mount_namespace()?;
    let hv = Hypervisor::open()?;
    hv.memfd_backing
        .store(true, std::sync::atomic::Ordering::Relaxed);
    hv.huge_pages.store(
        launch.host().huge_pages,
        std::sync::atomic::Ordering::Relaxed,
    );
    hv.set_host_mask(launch.host().cpu_mask.clone());
    let mode = launch.mode();
    let vm = match launch {
        Launch::Create(c) => Vm::create_in(&hv, c.spec, &c.devices)?,
        Launch::Incoming(i) => Vm::create_empty_in(&hv, i.spec, &i.regions, &i.devices)?,
    };
    // Nothing below needs /dev/kvm itself: only the VM and vCPU descriptors.
    drop(hv);
    let identity = HelloReply {
        protocol_version: protocol::PROTOCOL_VERSION,
        binary_version: env!("CARGO_PKG_VERSION").to_string(),
        name: args.name.clone(),
        instance_id,
        // SAFETY: getpid and getppid have no preconditions.
        pid: unsafe { libc::getpid() } as u32,
        // SAFETY: as above.
        monitor_pid: unsafe { libc::getppid() } as u32,
        started_unix_ms,
        mode,
        spec: vm.spec.clone(),
        regions: vm.memory().layout(),
        state: vm.status(),
        test_requests: args.test_requests,
    };
    jail::drop_privileges(args.uid, args.gid)?;
    jail::install_seccomp(args.seccomp)?;
    tracing::info!(
        vm = %args.name,
        pid = identity.pid,
        mode = ?mode,
        listener = listener.as_raw_fd(),
        "VMM jailed and serving"
    );
    let server = server::Server::new(Arc::new(vm), identity, args.test_requests);
    Ok(server.serve(listener))
}
