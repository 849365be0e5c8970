//! The agent ⇄ VMM protocol: typed requests and replies in length-prefixed frames over the
//! VMM's unix stream socket (`DIR/vmm/NAME.sock`), file descriptors alongside (SCM_RIGHTS).
//!
//! ```text
//!  agent (client)                                   ferry vmm (server)
//!  connect ──────────────────────────────────────▶ accept (any time: re-adoption)
//!  Hello{protocol, agent version} ───────────────▶ compatible?
//!       ◀────────── Hello{protocol, binary version, name, instance id, pid, start, spec, ...}
//!       ◀────────── or Error{Version, "VMM speaks 2 (ferry 0.2.0), the agent 1 (...)"}
//!  MemoryFds ────────────────────────────────────▶
//!       ◀────────── MemoryFds{regions} + one memfd per region (SCM_RIGHTS)
//!  Pause / Resume / DirtyLog / FetchDirty / CaptureState / RestoreState / ... ▶
//!       ◀────────── one reply per request, in order (Error{kind, message} on failure)
//!  Stop ─────────────────────────────────────────▶ replies Ok, stops the guest, exits
//! ```
//!
//! ## Frames
//!
//! ```text
//! offset  size  field
//! 0       4     magic "FVMM"
//! 4       4     body length N, little-endian, at most MAX_FRAME
//! 8       N     body: a Request (agent → VMM) or a Reply (VMM → agent), postcard (serde)
//! ```
//!
//! File descriptors ride as SCM_RIGHTS ancillary data on the frame's bytes; a frame carries at
//! most [`MAX_FDS`]. A frame with a wrong magic or an oversized length cannot be resynchronised:
//! the receiver answers with an error (where it can) and closes. A body that does not decode is
//! answered with `Error{Protocol}` and the connection stays usable (the framing is intact).
//!
//! ## Versions
//!
//! [`PROTOCOL_VERSION`] changes whenever a message changes shape. The `Hello` request and reply
//! (variant 0 of both enums) begin with the same two fields in every version — protocol version,
//! then binary version — and `Error` is variant 1 of [`Reply`] in every version, so two builds
//! that speak different versions still understand each other enough to say so: the VMM refuses
//! a `Hello` outside [`PROTOCOL_MIN_VERSION`]`..=`[`PROTOCOL_VERSION`] with `Error{Version}`
//! naming both, and the client reports a `Hello` reply of another version the same way.

use std::io::{self, IoSlice, IoSliceMut, Read};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use serde::{Deserialize, Serialize};

use crate::vm::cpuid::CpuidEntry;
use crate::vm::devices::ExitStats;
use crate::vm::memory::RegionLayout;
use crate::vm::virtio::blk::BlkStats;
use crate::vm::virtio::net::NetStats;
use crate::vm::virtio::Quiesced;
use crate::vm::workload::Heartbeat;
use crate::vm::{VmSpec, VmStatus};

/// Protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// Oldest protocol version this build accepts.
pub const PROTOCOL_MIN_VERSION: u32 = 1;
/// Frame magic.
pub const MAGIC: [u8; 4] = *b"FVMM";
/// Bytes of a frame header.
pub const HEADER: usize = 8;
/// Largest frame body (a 1 TiB guest's dirty bitmap is 32 MiB).
pub const MAX_FRAME: usize = 64 << 20;
/// Most file descriptors one frame carries.
pub const MAX_FDS: usize = 32;
/// Most frames one `DeliverFrames` request carries.
pub const MAX_DELIVER_FRAMES: usize = 4096;

/// Errors of the framing and codec.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("VMM socket: {0}")]
    Io(#[from] io::Error),
    #[error("the peer closed the connection")]
    Closed,
    #[error("the peer closed the connection in the middle of a frame")]
    Truncated,
    #[error("not a Ferry VMM frame (magic {0:02x?}); is this a VMM socket?")]
    Magic([u8; 4]),
    #[error("frame of {0} bytes is over the limit of {MAX_FRAME} bytes")]
    TooLarge(usize),
    #[error("frame body does not decode as {what}: {source}")]
    Decode {
        what: &'static str,
        #[source]
        source: postcard::Error,
    },
    #[error("cannot encode {what}: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: postcard::Error,
    },
    #[error("a frame came with more file descriptors than {MAX_FDS} (they were discarded)")]
    TooManyFds,
    #[error("the frame brought {got} file descriptors where {want} were expected")]
    FdCount { want: usize, got: usize },
}

impl ProtocolError {
    /// Whether the stream can still be used after this error (the framing is intact).
    pub fn recoverable(&self) -> bool {
        matches!(
            self,
            ProtocolError::Decode { .. } | ProtocolError::FdCount { .. }
        )
    }
}

/// How the VMM was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A new guest from its spec (`--create`).
    Create,
    /// An empty guest waiting for an incoming migration (`--incoming`).
    Incoming,
}

/// The first request of every connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloRequest {
    /// Frozen: first field in every version.
    pub protocol_version: u32,
    /// Frozen: second field in every version (the agent's binary version).
    pub binary_version: String,
}

/// The VMM's answer to `Hello`: who it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloReply {
    /// Frozen: first field in every version.
    pub protocol_version: u32,
    /// Frozen: second field in every version (the VMM's binary version).
    pub binary_version: String,
    pub name: String,
    /// Random, chosen when the VMM started: tells a VMM from a later one of the same name.
    pub instance_id: u64,
    /// The process that runs the guest (the jailed one).
    pub pid: u32,
    /// The monitor process that reports its exit (see docs/vmm.md).
    pub monitor_pid: u32,
    pub started_unix_ms: u64,
    pub mode: Mode,
    pub spec: VmSpec,
    pub regions: Vec<RegionLayout>,
    pub state: VmStatus,
    /// Whether the VMM was started with `--test-requests`.
    pub test_requests: bool,
}

/// What the prefix of a `Hello` (request or reply) of any version decodes as.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct VersionPrefix {
    pub protocol_version: u32,
    pub binary_version: String,
}

#[derive(Deserialize)]
enum HelloPrefix {
    Hello(VersionPrefix),
}

#[derive(Deserialize)]
enum ReplyPrefix {
    Hello(VersionPrefix),
    Error(RemoteError),
}

/// A request of the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Variant 0 in every version.
    Hello(HelloRequest),
    /// State, counters and timings (what `inspect` shows).
    Status,
    /// The guest memory's memfds (one per region, in region order) and their layout.
    MemoryFds,
    /// Workload heartbeats (None for other kinds).
    Heartbeats,
    /// Console output from absolute offset `offset`, at most `max` bytes.
    Console { offset: u64, max: u32 },
    /// The CPUID the guest sees.
    Cpuid,
    /// Run a created (or restored) or paused guest.
    Resume,
    /// Pause every vCPU and quiesce the devices.
    Pause,
    /// KVM dirty logging on or off for every region (on: a fresh log).
    DirtyLog { on: bool },
    /// Fetch and clear the dirty pages: KVM's log OR the devices' own writes.
    FetchDirty,
    /// Put pages back into the dirty set (a send that failed).
    MarkDirty { regions: Vec<Vec<u8>> },
    /// Auto-converge: hold the vCPUs back `pct` % of the time.
    Throttle { pct: u8 },
    /// The full state apart from memory ([`crate::vm::state::VmState`] encoding).
    CaptureState,
    /// Load a captured state into a created or paused guest.
    RestoreState { state: Vec<u8> },
    /// After a migration away: each NIC's tap (SCM_RIGHTS) and the frames queued since the
    /// capture; the VMM stops reading its taps.
    TakeForwarding,
    /// Frames forwarded by a migration's source, for NIC `nic`.
    DeliverFrames { nic: u32, frames: Vec<Vec<u8>> },
    /// Stop the guest and exit.
    Stop,
    /// Only with `--test-requests`: make a system call the seccomp filter forbids.
    TestForbiddenSyscall,
}

impl Request {
    /// A short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Hello(_) => "Hello",
            Request::Status => "Status",
            Request::MemoryFds => "MemoryFds",
            Request::Heartbeats => "Heartbeats",
            Request::Console { .. } => "Console",
            Request::Cpuid => "Cpuid",
            Request::Resume => "Resume",
            Request::Pause => "Pause",
            Request::DirtyLog { .. } => "DirtyLog",
            Request::FetchDirty => "FetchDirty",
            Request::MarkDirty { .. } => "MarkDirty",
            Request::Throttle { .. } => "Throttle",
            Request::CaptureState => "CaptureState",
            Request::RestoreState { .. } => "RestoreState",
            Request::TakeForwarding => "TakeForwarding",
            Request::DeliverFrames { .. } => "DeliverFrames",
            Request::Stop => "Stop",
            Request::TestForbiddenSyscall => "TestForbiddenSyscall",
        }
    }
}

/// What kind of failure an `Error` reply reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorKind {
    /// The frame or request was malformed, or came out of order (no Hello first).
    Protocol,
    /// Incompatible protocol versions.
    Version,
    /// The guest is in the wrong state for the request (an API 409).
    State,
    /// The request is wrong in itself (an API 400).
    Invalid,
    /// The guest runtime failed.
    Vm,
    /// Not allowed (a test request without `--test-requests`).
    Refused,
    /// Too many clients are connected.
    Busy,
}

/// A failed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct RemoteError {
    pub kind: ErrorKind,
    pub message: String,
}

/// The VMM's state, counters and timings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmStatus {
    pub state: VmStatus,
    /// Why the guest crashed ("vCPU 0: triple fault"), if it did.
    pub fault: Option<String>,
    /// Whether the guest has ever run in this VMM.
    pub ever_resumed: bool,
    pub last_pause_us: u64,
    pub last_resume_us: u64,
    pub tsc_khz: u32,
    pub throttle_pct: u8,
    pub dirty_logging: bool,
    pub exits: ExitStats,
    pub nics: Vec<NetStats>,
    pub disks: Vec<BlkStats>,
    /// Connected clients that said Hello.
    pub clients: u32,
}

/// One NIC handed over for forwarding (its tap travels as a file descriptor).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardNic {
    pub index: u32,
    pub mac: [u8; 6],
    pub tap: String,
    pub bridge: String,
    /// Frames queued after the state capture, oldest first.
    pub backlog: Vec<Vec<u8>>,
}

/// A reply of the VMM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// Variant 0 in every version.
    Hello(Box<HelloReply>),
    /// Variant 1 in every version.
    Error(RemoteError),
    Ok,
    Status(Box<VmmStatus>),
    /// One memfd per region rides with this frame.
    MemoryFds {
        regions: Vec<RegionLayout>,
    },
    Heartbeats(Option<Vec<Heartbeat>>),
    Console {
        offset: u64,
        data: Vec<u8>,
    },
    Cpuid(Vec<CpuidEntry>),
    Paused {
        took_us: u64,
        quiesced: Quiesced,
    },
    /// Per region, the dirty bitmap as little-endian 64-bit words (bit n = page n).
    Dirty {
        regions: Vec<Vec<u8>>,
    },
    State(Vec<u8>),
    /// One tap per NIC rides with this frame, in the same order.
    Forwarding {
        nics: Vec<ForwardNic>,
    },
}

impl Reply {
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Reply {
        Reply::Error(RemoteError {
            kind,
            message: message.into(),
        })
    }
}

/// Bitmap words as the bytes of a `Dirty` reply.
pub fn words_to_bytes(words: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(words.len() * 8);
    for w in words {
        out.extend_from_slice(&w.to_le_bytes());
    }
    out
}

/// The bytes of a `Dirty` reply as bitmap words; None if the length is not `words * 8`.
pub fn bytes_to_words(bytes: &[u8], words: usize) -> Option<Vec<u64>> {
    if bytes.len() != words.checked_mul(8)? {
        return None;
    }
    Some(
        bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect(),
    )
}

/// Encode a message as a frame (header + body).
pub fn encode<T: Serialize>(msg: &T, what: &'static str) -> Result<Vec<u8>, ProtocolError> {
    let mut out = postcard::to_extend(msg, vec![0u8; HEADER])
        .map_err(|source| ProtocolError::Encode { what, source })?;
    let len = out.len() - HEADER;
    if len > MAX_FRAME {
        return Err(ProtocolError::TooLarge(len));
    }
    out[..4].copy_from_slice(&MAGIC);
    out[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(out)
}

/// Parse a frame header: the body length.
pub fn parse_header(h: &[u8; HEADER]) -> Result<usize, ProtocolError> {
    let magic = [h[0], h[1], h[2], h[3]];
    if magic != MAGIC {
        return Err(ProtocolError::Magic(magic));
    }
    let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
    if len > MAX_FRAME {
        return Err(ProtocolError::TooLarge(len));
    }
    Ok(len)
}

/// Decode a request body. A body that is not a request of this version but begins like a
/// `Hello` of another is reported as that `Hello` (so the version error can name it).
pub fn decode_request(body: &[u8]) -> Result<Request, (ProtocolError, Option<VersionPrefix>)> {
    match postcard::from_bytes::<Request>(body) {
        Ok(r) => Ok(r),
        Err(source) => {
            let prefix = postcard::take_from_bytes::<HelloPrefix>(body)
                .ok()
                .map(|(HelloPrefix::Hello(p), _)| p);
            Err((
                ProtocolError::Decode {
                    what: "a request",
                    source,
                },
                prefix,
            ))
        }
    }
}

/// What a reply body of any version says, as far as this build can tell.
#[derive(Debug)]
pub enum DecodedReply {
    Reply(Reply),
    /// A `Hello` reply this build cannot decode whole: another protocol version.
    OtherHello(VersionPrefix),
}

/// Decode a reply body.
pub fn decode_reply(body: &[u8]) -> Result<DecodedReply, ProtocolError> {
    match postcard::from_bytes::<Reply>(body) {
        Ok(r) => Ok(DecodedReply::Reply(r)),
        Err(source) => match postcard::take_from_bytes::<ReplyPrefix>(body) {
            Ok((ReplyPrefix::Hello(p), _)) => Ok(DecodedReply::OtherHello(p)),
            Ok((ReplyPrefix::Error(e), _)) => Ok(DecodedReply::Reply(Reply::Error(e))),
            Err(_) => Err(ProtocolError::Decode {
                what: "a reply",
                source,
            }),
        },
    }
}

/// Whether a peer's protocol version is one this build speaks.
pub fn compatible(version: u32) -> bool {
    (PROTOCOL_MIN_VERSION..=PROTOCOL_VERSION).contains(&version)
}

/// The message for incompatible versions, naming both sides.
pub fn version_message(vmm: (u32, &str), agent: (u32, &str)) -> String {
    format!(
        "incompatible VMM protocol: the VMM speaks protocol {} (ferry {}), the agent protocol {} (ferry {}); \
         this agent cannot manage that guest: migrate it with the agent version that started it, or stop it",
        vmm.0, vmm.1, agent.0, agent.1
    )
}

/// Write one frame and its file descriptors.
pub fn write_frame(
    sock: &UnixStream,
    frame: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), ProtocolError> {
    if fds.len() > MAX_FDS {
        return Err(ProtocolError::TooManyFds);
    }
    let mut sent = 0;
    if !fds.is_empty() {
        sent = send_with_fds(sock, frame, fds)?;
    }
    let mut w = sock;
    while sent < frame.len() {
        match io::Write::write(&mut w, &frame[sent..]) {
            Ok(0) => return Err(ProtocolError::Closed),
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// One received frame: its body and the file descriptors that came with it.
#[derive(Debug)]
pub struct Frame {
    pub body: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// Read one frame. `Closed` when the peer closed between frames. `on_header` runs once the
/// header is in (the server tightens its read timeout there: a frame that has begun must come
/// whole).
pub fn read_frame(sock: &UnixStream, mut on_header: impl FnMut()) -> Result<Frame, ProtocolError> {
    let mut fds = Vec::new();
    let mut header = [0u8; HEADER];
    let mut got = 0;
    while got < HEADER {
        let n = recv_with_fds(sock, &mut header[got..], &mut fds)?;
        if n == 0 {
            return Err(if got == 0 {
                ProtocolError::Closed
            } else {
                ProtocolError::Truncated
            });
        }
        got += n;
    }
    on_header();
    let len = parse_header(&header)?;
    let mut body = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = recv_with_fds(sock, &mut body[got..], &mut fds)?;
        if n == 0 {
            return Err(ProtocolError::Truncated);
        }
        got += n;
    }
    if fds.len() > MAX_FDS {
        return Err(ProtocolError::TooManyFds);
    }
    Ok(Frame { body, fds })
}

/// Discard a frame's body of `len` bytes (after a header the receiver refuses but can skip).
pub fn skip(sock: &UnixStream, len: usize) -> Result<(), ProtocolError> {
    let mut left = len;
    let mut buf = [0u8; 8192];
    let mut r = sock;
    while left > 0 {
        let n = r.read(&mut buf[..left.min(8192)])?;
        if n == 0 {
            return Err(ProtocolError::Truncated);
        }
        left -= n;
    }
    Ok(())
}

/// Space for MAX_FDS descriptors of ancillary data, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct CmsgBuf([u8; 256]);

fn cmsg_space(n: usize) -> usize {
    // SAFETY: CMSG_SPACE only computes a size.
    unsafe { libc::CMSG_SPACE((n * std::mem::size_of::<RawFd>()) as u32) as usize }
}

fn send_with_fds(
    sock: &UnixStream,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<usize, ProtocolError> {
    let mut cbuf = CmsgBuf([0; 256]);
    let space = cmsg_space(fds.len());
    if space > cbuf.0.len() {
        return Err(ProtocolError::TooManyFds);
    }
    let iov = [IoSlice::new(data)];
    // SAFETY: msghdr is plain old data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.0.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `msg_control` points to `space` bytes of aligned buffer, enough for one cmsghdr
    // with `fds.len()` descriptors (checked above); CMSG_FIRSTHDR/CMSG_DATA stay inside it.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN((fds.len() * std::mem::size_of::<RawFd>()) as u32) as _;
        let p = libc::CMSG_DATA(c).cast::<RawFd>();
        for (i, fd) in fds.iter().enumerate() {
            p.add(i).write_unaligned(fd.as_raw_fd());
        }
    }
    loop {
        // SAFETY: `msg` points to a live iovec over `data` and the control buffer above; the
        // kernel only reads them. The descriptors stay open (borrowed) for the call.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e.into());
        }
    }
}

fn recv_with_fds(
    sock: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> Result<usize, ProtocolError> {
    let mut cbuf = CmsgBuf([0; 256]);
    let mut iov = [IoSliceMut::new(buf)];
    // SAFETY: msghdr is plain old data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr().cast();
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.0.as_mut_ptr().cast();
    msg.msg_controllen = cbuf.0.len() as _;
    let n = loop {
        // SAFETY: `msg` points to a live, writable iovec and control buffer of the lengths it
        // states; MSG_CMSG_CLOEXEC marks received descriptors close-on-exec.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e.into());
        }
    };
    let mut too_many = msg.msg_flags & libc::MSG_CTRUNC != 0;
    // SAFETY: the kernel filled `msg_controllen` bytes of the control buffer with well-formed
    // cmsghdrs; CMSG_FIRSTHDR/CMSG_NXTHDR walk only within it. Each SCM_RIGHTS descriptor is a
    // fresh one the kernel installed for us, so taking ownership is right (and closes it if we
    // refuse the frame).
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                let bytes = (*c).cmsg_len as usize - (data as usize - c as usize);
                for i in 0..bytes / std::mem::size_of::<RawFd>() {
                    let fd = OwnedFd::from_raw_fd(data.add(i).read_unaligned());
                    if fds.len() < MAX_FDS {
                        fds.push(fd);
                    } else {
                        too_many = true;
                    }
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if too_many {
        return Err(ProtocolError::TooManyFds);
    }
    Ok(n)
}

#[cfg(test)]
mod tests;
