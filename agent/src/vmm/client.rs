//! The agent's side of the VMM protocol: a blocking client, one typed method per request,
//! every call bounded by a timeout.
//!
//! ```no_run
//! # use std::time::Duration;
//! # fn main() -> Result<(), ferry::vmm::client::ClientError> {
//! use ferry::vmm::client::VmmClient;
//! let mut c = VmmClient::connect_wait("/var/lib/ferry/vmm/vm1.sock".as_ref(), Duration::from_secs(10))?;
//! let memory = c.memory()?;           // the guest's memory, mapped here (memfds)
//! c.set_dirty_logging(true)?;
//! let dirty = c.fetch_dirty()?;       // KVM's log OR the devices' writes
//! let (pause, quiesced) = c.pause()?;
//! let state = c.capture_state()?;     // VmState encoding
//! # Ok(()) }
//! ```

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::protocol::{
    self, DecodedReply, ErrorKind, HelloReply, HelloRequest, ProtocolError, RemoteError, Reply,
    Request, VmmStatus,
};
use crate::vm::cpuid::CpuidEntry;
use crate::vm::memory::{DirtyBitmap, GuestMemory, MemoryError, RegionBitmap};
use crate::vm::state::{StateError, VmState};
use crate::vm::virtio::net::Forwarding;
use crate::vm::virtio::tap::Tap;
use crate::vm::virtio::Quiesced;
use crate::vm::workload::Heartbeat;

/// How long a request may take by default (a pause is bounded by 2 s in the VMM; capturing and
/// restoring a large state by a few hundred ms).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the VMM at {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the VMM at {} did not answer within {timeout:?}", path.display())]
    Timeout { path: PathBuf, timeout: Duration },
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("the VMM refused {request}: {error}")]
    Remote {
        request: &'static str,
        #[source]
        error: RemoteError,
    },
    #[error("{0}")]
    Version(String),
    #[error("the VMM answered {request} with {got}")]
    Unexpected { request: &'static str, got: String },
    #[error("the VMM's reply to {request} does not fit this guest: {why}")]
    Mismatch { request: &'static str, why: String },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    State(#[from] StateError),
}

impl ClientError {
    /// The kind of a remote refusal, if this is one.
    pub fn remote_kind(&self) -> Option<ErrorKind> {
        match self {
            ClientError::Remote { error, .. } => Some(error.kind),
            _ => None,
        }
    }
}

/// A connection to one VMM, past `Hello`.
#[derive(Debug)]
pub struct VmmClient {
    sock: UnixStream,
    path: PathBuf,
    hello: HelloReply,
    timeout: Duration,
}

impl VmmClient {
    /// Connect and say Hello; fails at once if nothing listens.
    pub fn connect(path: &Path, timeout: Duration) -> Result<VmmClient, ClientError> {
        let sock = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        Self::handshake(sock, path, timeout)
    }

    /// Connect, retrying while the socket does not exist or refuses (a VMM just spawned), for
    /// at most `timeout`; then Hello within `timeout` (a VMM answers once its guest is set up).
    pub fn connect_wait(path: &Path, timeout: Duration) -> Result<VmmClient, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            match UnixStream::connect(path) {
                Ok(sock) => return Self::handshake(sock, path, timeout),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(source) => {
                    return Err(ClientError::Connect {
                        path: path.to_path_buf(),
                        source,
                    })
                }
            }
        }
    }

    fn handshake(
        sock: UnixStream,
        path: &Path,
        timeout: Duration,
    ) -> Result<VmmClient, ClientError> {
        let bounded = |e: ProtocolError| timed_out(path, timeout, e);
        sock.set_read_timeout(Some(timeout))
            .and_then(|()| sock.set_write_timeout(Some(timeout)))
            .map_err(|e| ClientError::Protocol(e.into()))?;
        let req = Request::Hello(HelloRequest {
            protocol_version: protocol::PROTOCOL_VERSION,
            binary_version: env!("CARGO_PKG_VERSION").to_string(),
        });
        let frame = protocol::encode(&req, "Hello")?;
        protocol::write_frame(&sock, &frame, &[]).map_err(bounded)?;
        let got = protocol::read_frame(&sock, || {}).map_err(bounded)?;
        let hello = match protocol::decode_reply(&got.body)? {
            DecodedReply::OtherHello(p) => {
                return Err(ClientError::Version(protocol::version_message(
                    (p.protocol_version, &p.binary_version),
                    (protocol::PROTOCOL_VERSION, env!("CARGO_PKG_VERSION")),
                )))
            }
            DecodedReply::Reply(Reply::Hello(h)) => *h,
            DecodedReply::Reply(Reply::Error(e)) if e.kind == ErrorKind::Version => {
                return Err(ClientError::Version(e.message))
            }
            DecodedReply::Reply(Reply::Error(error)) => {
                return Err(ClientError::Remote {
                    request: "Hello",
                    error,
                })
            }
            DecodedReply::Reply(other) => return Err(unexpected("Hello", &other)),
        };
        if !protocol::compatible(hello.protocol_version) {
            return Err(ClientError::Version(protocol::version_message(
                (hello.protocol_version, &hello.binary_version),
                (protocol::PROTOCOL_VERSION, env!("CARGO_PKG_VERSION")),
            )));
        }
        Ok(VmmClient {
            sock,
            path: path.to_path_buf(),
            hello,
            timeout,
        })
    }

    /// Who the VMM is (as it said at Hello).
    pub fn hello(&self) -> &HelloReply {
        &self.hello
    }

    /// Bound every later call by `timeout`.
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<(), ClientError> {
        self.timeout = timeout;
        self.sock
            .set_read_timeout(Some(timeout))
            .and_then(|()| self.sock.set_write_timeout(Some(timeout)))
            .map_err(|e| ClientError::Protocol(e.into()))
    }

    fn timed_out(&self, e: ProtocolError) -> ClientError {
        timed_out(&self.path, self.timeout, e)
    }

    /// Send a request; the reply and the descriptors that came with it. Error replies become
    /// [`ClientError::Remote`].
    fn call(&mut self, req: Request) -> Result<(Reply, Vec<OwnedFd>), ClientError> {
        let name = req.name();
        let frame = protocol::encode(&req, "a request")?;
        protocol::write_frame(&self.sock, &frame, &[]).map_err(|e| self.timed_out(e))?;
        let got = protocol::read_frame(&self.sock, || {}).map_err(|e| self.timed_out(e))?;
        match protocol::decode_reply(&got.body)? {
            DecodedReply::Reply(Reply::Error(error)) => Err(ClientError::Remote {
                request: name,
                error,
            }),
            DecodedReply::Reply(r) => Ok((r, got.fds)),
            DecodedReply::OtherHello(_) => Err(ClientError::Unexpected {
                request: name,
                got: "a Hello of another protocol version".into(),
            }),
        }
    }

    fn call_ok(&mut self, req: Request) -> Result<(), ClientError> {
        let name = req.name();
        match self.call(req)?.0 {
            Reply::Ok => Ok(()),
            other => Err(unexpected(name, &other)),
        }
    }

    pub fn status(&mut self) -> Result<VmmStatus, ClientError> {
        match self.call(Request::Status)?.0 {
            Reply::Status(s) => Ok(*s),
            other => Err(unexpected("Status", &other)),
        }
    }

    /// The guest's memory, mapped into this process from the VMM's memfds (no KVM here:
    /// dirty logging goes through [`VmmClient::set_dirty_logging`] and
    /// [`VmmClient::fetch_dirty`]).
    pub fn memory(&mut self) -> Result<Arc<GuestMemory>, ClientError> {
        let (reply, fds) = self.call(Request::MemoryFds)?;
        let Reply::MemoryFds { regions } = reply else {
            return Err(unexpected("MemoryFds", &reply));
        };
        if regions != self.hello.regions {
            return Err(ClientError::Mismatch {
                request: "MemoryFds",
                why: "the regions differ from the Hello's".into(),
            });
        }
        if fds.len() != regions.len() {
            return Err(ProtocolError::FdCount {
                want: regions.len(),
                got: fds.len(),
            }
            .into());
        }
        Ok(Arc::new(GuestMemory::map_shared(&regions, fds)?))
    }

    pub fn heartbeats(&mut self) -> Result<Option<Vec<Heartbeat>>, ClientError> {
        match self.call(Request::Heartbeats)?.0 {
            Reply::Heartbeats(h) => Ok(h),
            other => Err(unexpected("Heartbeats", &other)),
        }
    }

    /// Console bytes from absolute offset `offset` (clamped to what the VMM keeps): the offset
    /// of the first byte returned, and the bytes.
    pub fn console(&mut self, offset: u64, max: u32) -> Result<(u64, Vec<u8>), ClientError> {
        match self.call(Request::Console { offset, max })?.0 {
            Reply::Console { offset, data } => Ok((offset, data)),
            other => Err(unexpected("Console", &other)),
        }
    }

    pub fn cpuid(&mut self) -> Result<Vec<CpuidEntry>, ClientError> {
        match self.call(Request::Cpuid)?.0 {
            Reply::Cpuid(c) => Ok(c),
            other => Err(unexpected("Cpuid", &other)),
        }
    }

    /// Run a created, restored or paused guest.
    pub fn resume(&mut self) -> Result<(), ClientError> {
        self.call_ok(Request::Resume)
    }

    /// Pause: how long it took and what the devices did.
    pub fn pause(&mut self) -> Result<(Duration, Quiesced), ClientError> {
        match self.call(Request::Pause)?.0 {
            Reply::Paused { took_us, quiesced } => Ok((Duration::from_micros(took_us), quiesced)),
            other => Err(unexpected("Pause", &other)),
        }
    }

    pub fn set_dirty_logging(&mut self, on: bool) -> Result<(), ClientError> {
        self.call_ok(Request::DirtyLog { on })
    }

    /// Fetch and clear the dirty pages (KVM's log OR the VMM's own writes).
    pub fn fetch_dirty(&mut self) -> Result<DirtyBitmap, ClientError> {
        let reply = self.call(Request::FetchDirty)?.0;
        let Reply::Dirty { regions } = reply else {
            return Err(unexpected("FetchDirty", &reply));
        };
        if regions.len() != self.hello.regions.len() {
            return Err(ClientError::Mismatch {
                request: "FetchDirty",
                why: format!(
                    "{} bitmaps for {} regions",
                    regions.len(),
                    self.hello.regions.len()
                ),
            });
        }
        let mut out = Vec::with_capacity(regions.len());
        for (l, b) in self.hello.regions.iter().zip(&regions) {
            let words = RegionBitmap::empty(*l).bits.len();
            let bits = protocol::bytes_to_words(b, words).ok_or_else(|| ClientError::Mismatch {
                request: "FetchDirty",
                why: format!("a bitmap of {} bytes for {words} words", b.len()),
            })?;
            out.push(RegionBitmap { layout: *l, bits });
        }
        Ok(DirtyBitmap { regions: out })
    }

    /// Put pages back into the VMM's dirty set (after a send that failed).
    pub fn mark_dirty(&mut self, bitmap: &DirtyBitmap) -> Result<(), ClientError> {
        let regions = bitmap
            .regions
            .iter()
            .map(|r| protocol::words_to_bytes(&r.bits))
            .collect();
        self.call_ok(Request::MarkDirty { regions })
    }

    /// Auto-converge: hold the vCPUs back `pct` % of the time (0: off).
    pub fn throttle(&mut self, pct: u8) -> Result<(), ClientError> {
        self.call_ok(Request::Throttle { pct })
    }

    /// The full state but memory, as [`VmState::encode`] makes it.
    pub fn capture_state(&mut self) -> Result<Vec<u8>, ClientError> {
        match self.call(Request::CaptureState)?.0 {
            Reply::State(s) => Ok(s),
            other => Err(unexpected("CaptureState", &other)),
        }
    }

    /// [`VmmClient::capture_state`], decoded.
    pub fn capture_state_decoded(&mut self) -> Result<VmState, ClientError> {
        Ok(VmState::decode(&self.capture_state()?)?)
    }

    /// Load a state (its [`VmState::encode`] bytes) into a created or paused guest.
    pub fn restore_state(&mut self, state: &[u8]) -> Result<(), ClientError> {
        self.call_ok(Request::RestoreState {
            state: state.to_vec(),
        })
    }

    /// After a migration away: each NIC's tap and backlog, for the forwarder.
    pub fn take_forwarding(&mut self) -> Result<Vec<(usize, Forwarding)>, ClientError> {
        let (reply, fds) = self.call(Request::TakeForwarding)?;
        let Reply::Forwarding { nics } = reply else {
            return Err(unexpected("TakeForwarding", &reply));
        };
        if fds.len() != nics.len() {
            return Err(ProtocolError::FdCount {
                want: nics.len(),
                got: fds.len(),
            }
            .into());
        }
        Ok(nics
            .into_iter()
            .zip(fds)
            .map(|(n, fd)| {
                (
                    n.index as usize,
                    Forwarding {
                        mac: n.mac,
                        tap: Arc::new(Tap::from_fd(n.tap, n.bridge, fd)),
                        backlog: n.backlog,
                    },
                )
            })
            .collect())
    }

    /// Frames a migration's source forwarded, for NIC `nic`.
    pub fn deliver_frames(&mut self, nic: u32, frames: Vec<Vec<u8>>) -> Result<(), ClientError> {
        self.call_ok(Request::DeliverFrames { nic, frames })
    }

    /// Stop the guest; the VMM exits after replying.
    pub fn stop(&mut self) -> Result<(), ClientError> {
        self.call_ok(Request::Stop)
    }

    /// Test only (a VMM started with `--test-requests`): make the VMM call a forbidden system
    /// call. Under its seccomp filter the VMM dies and this fails with the connection closed.
    pub fn test_forbidden_syscall(&mut self) -> Result<(), ClientError> {
        self.call_ok(Request::TestForbiddenSyscall)
    }
}

fn reply_name(r: &Reply) -> String {
    let s = format!("{r:?}");
    s.split(['(', ' ', '{']).next().unwrap_or("?").to_string()
}

fn unexpected(request: &'static str, got: &Reply) -> ClientError {
    ClientError::Unexpected {
        request,
        got: reply_name(got),
    }
}

/// A read or write that hit the socket timeout is a [`ClientError::Timeout`].
fn timed_out(path: &Path, timeout: Duration, e: ProtocolError) -> ClientError {
    match &e {
        ProtocolError::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            ClientError::Timeout {
                path: path.to_path_buf(),
                timeout,
            }
        }
        _ => ClientError::Protocol(e),
    }
}
