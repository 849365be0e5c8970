//! The VMM's socket server: one thread accepts, one thread per connection answers requests in
//! order. Any number of agents may connect over the VMM's life (one after another when an agent
//! restarts; at most [`MAX_CONNECTIONS`] at once). Operations that change the guest are
//! serialized by one lock; reads (status, console, heartbeats) are not.
//!
//! The main thread waits in [`Server::serve`] until the VMM should end: a `Stop` request, or —
//! for an incoming VMM whose guest never ran here — the last agent that said `Hello`
//! disconnecting (the migration failed; there is nothing to keep).

use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::protocol::{
    self, ErrorKind, ForwardNic, HelloReply, Mode, ProtocolError, Reply, Request, VmmStatus,
};
use crate::vm::memory::{DirtyBitmap, RegionBitmap};
use crate::vm::state::VmState;
use crate::vm::{Vm, VmError};

/// Most connections served at once (more are answered `Busy` and closed).
pub const MAX_CONNECTIONS: u32 = 8;
/// A frame that has begun must arrive whole within this.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// A reply the client does not read within this ends the connection.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most console bytes one reply carries.
pub const MAX_CONSOLE_CHUNK: u32 = 1 << 20;

/// Why the VMM ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// A `Stop` request.
    Stopped,
    /// An incoming VMM's agent went away before the guest ever ran here.
    Abandoned,
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ExitReason::Stopped => "stopped by request",
            ExitReason::Abandoned => {
                "incoming migration abandoned: the agent disconnected before the guest ever ran here"
            }
        })
    }
}

/// The VMM's guest and what it tells agents.
pub struct Server {
    vm: Arc<Vm>,
    /// Identity fields of the `Hello` reply (`state` is filled in per reply).
    identity: HelloReply,
    mode: Mode,
    test_requests: bool,
    /// Serializes operations that change the guest.
    op: Mutex<()>,
    ever_resumed: AtomicBool,
    /// Connections that said Hello and are still open.
    clients: AtomicU32,
    /// Open connections.
    connections: AtomicU32,
    exit: Mutex<Option<ExitReason>>,
    exit_cv: Condvar,
}

impl Server {
    pub fn new(vm: Arc<Vm>, identity: HelloReply, test_requests: bool) -> Arc<Server> {
        Arc::new(Server {
            vm,
            mode: identity.mode,
            identity,
            test_requests,
            op: Mutex::new(()),
            ever_resumed: AtomicBool::new(false),
            clients: AtomicU32::new(0),
            connections: AtomicU32::new(0),
            exit: Mutex::new(None),
            exit_cv: Condvar::new(),
        })
    }

    /// Serve `listener` until the VMM should end; the guest is stopped on return.
    pub fn serve(self: &Arc<Self>, listener: UnixListener) -> ExitReason {
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("vmm-accept".into())
            .spawn(move || me.accept_loop(listener));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the accept thread; stopping");
            self.vm.stop();
            return ExitReason::Stopped;
        }
        let reason = {
            let mut g = match self.exit.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            loop {
                if let Some(r) = g.clone() {
                    break r;
                }
                g = match self.exit_cv.wait(g) {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                };
            }
        };
        // No request runs while the guest stops.
        let _op = self.op.lock();
        self.vm.stop();
        tracing::info!(vm = %self.identity.name, reason = %reason, "VMM ending");
        reason
    }

    fn request_exit(&self, reason: ExitReason) {
        let mut g = match self.exit.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if g.is_none() {
            *g = Some(reason);
        }
        self.exit_cv.notify_all();
    }

    fn accept_loop(self: Arc<Self>, listener: UnixListener) {
        loop {
            let sock = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of descriptors or memory: wait and try again (bounded cost per try).
                    tracing::warn!(error = %e, "accept on the VMM socket failed");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            let _ = sock.set_write_timeout(Some(WRITE_TIMEOUT));
            if self.connections.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                self.connections.fetch_sub(1, Ordering::SeqCst);
                let _ = send(
                    &sock,
                    &Reply::error(
                        ErrorKind::Busy,
                        format!("the VMM already serves {MAX_CONNECTIONS} connections"),
                    ),
                    &[],
                );
                continue;
            }
            let me = self.clone();
            let spawned = std::thread::Builder::new()
                .name("vmm-conn".into())
                .spawn(move || {
                    me.connection(&sock);
                    me.connections.fetch_sub(1, Ordering::SeqCst);
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start a connection thread");
                self.connections.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    fn connection(&self, sock: &UnixStream) {
        let mut said_hello = false;
        loop {
            let _ = sock.set_read_timeout(None);
            let frame = protocol::read_frame(sock, || {
                let _ = sock.set_read_timeout(Some(FRAME_TIMEOUT));
            });
            let frame = match frame {
                Ok(f) => f,
                Err(ProtocolError::Closed) => break,
                Err(e) => {
                    tracing::debug!(vm = %self.identity.name, error = %e, "bad frame from a client");
                    let _ = send(sock, &Reply::error(ErrorKind::Protocol, e.to_string()), &[]);
                    if e.recoverable() {
                        continue;
                    }
                    break;
                }
            };
            if !frame.fds.is_empty() {
                let _ = send(
                    sock,
                    &Reply::error(
                        ErrorKind::Protocol,
                        "no request carries file descriptors; they were closed",
                    ),
                    &[],
                );
                continue;
            }
            let req = match protocol::decode_request(&frame.body) {
                Ok(r) => r,
                Err((e, prefix)) => {
                    let reply = match prefix {
                        Some(p) if !protocol::compatible(p.protocol_version) => Reply::error(
                            ErrorKind::Version,
                            protocol::version_message(
                                (protocol::PROTOCOL_VERSION, env!("CARGO_PKG_VERSION")),
                                (p.protocol_version, &p.binary_version),
                            ),
                        ),
                        _ => Reply::error(ErrorKind::Protocol, e.to_string()),
                    };
                    let _ = send(sock, &reply, &[]);
                    continue;
                }
            };
            if let Request::Hello(h) = &req {
                if !protocol::compatible(h.protocol_version) {
                    let _ = send(
                        sock,
                        &Reply::error(
                            ErrorKind::Version,
                            protocol::version_message(
                                (protocol::PROTOCOL_VERSION, env!("CARGO_PKG_VERSION")),
                                (h.protocol_version, &h.binary_version),
                            ),
                        ),
                        &[],
                    );
                    break;
                }
                if !said_hello {
                    said_hello = true;
                    self.clients.fetch_add(1, Ordering::SeqCst);
                    tracing::info!(vm = %self.identity.name, agent_version = %h.binary_version, "agent connected");
                }
            } else if !said_hello {
                let _ = send(
                    sock,
                    &Reply::error(
                        ErrorKind::Protocol,
                        format!("{} before Hello; say Hello first", req.name()),
                    ),
                    &[],
                );
                continue;
            }
            let stop = matches!(req, Request::Stop);
            let name = req.name();
            let sent = self.answer(sock, req);
            if let Err(e) = sent {
                tracing::debug!(vm = %self.identity.name, request = name, error = %e, "reply not sent");
                break;
            }
            if stop {
                self.request_exit(ExitReason::Stopped);
                break;
            }
        }
        if said_hello {
            let left = self.clients.fetch_sub(1, Ordering::SeqCst) - 1;
            tracing::info!(vm = %self.identity.name, clients = left, "agent disconnected");
            if left == 0 && self.mode == Mode::Incoming && !self.ever_resumed.load(Ordering::SeqCst)
            {
                self.request_exit(ExitReason::Abandoned);
            }
        }
    }

    /// Answer one request (after Hello).
    fn answer(&self, sock: &UnixStream, req: Request) -> Result<(), ProtocolError> {
        let vm = &self.vm;
        match req {
            Request::MemoryFds => {
                let Some(fds) = vm.memory().memfds() else {
                    return send(
                        sock,
                        &Reply::error(ErrorKind::Vm, "this guest's memory is not memfd-backed"),
                        &[],
                    );
                };
                let reply = Reply::MemoryFds {
                    regions: vm.memory().layout(),
                };
                send(sock, &reply, &fds)
            }
            Request::TakeForwarding => {
                let _op = self.op.lock();
                let nics = vm.devices().virtio.take_for_forwarding();
                let taps: Vec<BorrowedFd<'_>> = nics.iter().map(|(_, f)| f.tap.as_fd()).collect();
                let reply = Reply::Forwarding {
                    nics: nics
                        .iter()
                        .map(|(i, f)| ForwardNic {
                            index: *i as u32,
                            mac: f.mac,
                            tap: f.tap.name.clone(),
                            bridge: f.tap.bridge.clone(),
                            backlog: f.backlog.clone(),
                        })
                        .collect(),
                };
                // The taps close here once sent: the agent's copies keep them on the bridge.
                send(sock, &reply, &taps)
            }
            Request::TestForbiddenSyscall if self.test_requests => {
                tracing::warn!(vm = %self.identity.name, "test request: making a forbidden system call");
                super::jail::forbidden_syscall();
                send(
                    sock,
                    &Reply::error(
                        ErrorKind::Vm,
                        "the forbidden system call returned: no seccomp filter is installed",
                    ),
                    &[],
                )
            }
            other => {
                let reply = self.reply(other);
                send(sock, &reply, &[])
            }
        }
    }

    fn reply(&self, req: Request) -> Reply {
        let vm = &self.vm;
        let mem = vm.memory();
        let result: Result<Reply, Reply> = match req {
            Request::Hello(_) => {
                let mut h = self.identity.clone();
                h.state = vm.status();
                Ok(Reply::Hello(Box::new(h)))
            }
            Request::Status => Ok(Reply::Status(Box::new(self.status()))),
            Request::Heartbeats => Ok(Reply::Heartbeats(vm.heartbeats())),
            Request::Console { offset, max } => match vm.devices().console.lock() {
                Ok(c) => {
                    let (offset, data) =
                        c.read_from(offset, max.clamp(1, MAX_CONSOLE_CHUNK) as usize);
                    Ok(Reply::Console { offset, data })
                }
                Err(_) => Err(Reply::error(ErrorKind::Vm, "console lock poisoned")),
            },
            Request::Cpuid => Ok(Reply::Cpuid(vm.cpuid())),
            Request::Resume => {
                let _op = self.op.lock();
                vm.start().map_err(vm_error).map(|()| {
                    self.ever_resumed.store(true, Ordering::SeqCst);
                    tracing::info!(vm = %self.identity.name, "guest running");
                    Reply::Ok
                })
            }
            Request::Pause => {
                let _op = self.op.lock();
                vm.pause().map_err(vm_error).map(|took| Reply::Paused {
                    took_us: took.as_micros() as u64,
                    quiesced: vm.last_quiesced(),
                })
            }
            Request::DirtyLog { on } => {
                let _op = self.op.lock();
                mem.set_dirty_logging_all(on)
                    .map(|()| Reply::Ok)
                    .map_err(|e| vm_error(e.into()))
            }
            Request::FetchDirty => mem
                .take_dirty()
                .map(|d| Reply::Dirty {
                    regions: d
                        .regions
                        .iter()
                        .map(|r| protocol::words_to_bytes(&r.bits))
                        .collect(),
                })
                .map_err(|e| vm_error(e.into())),
            Request::MarkDirty { regions } => {
                let layout = mem.layout();
                let bitmap = (regions.len() == layout.len())
                    .then(|| {
                        layout
                            .iter()
                            .zip(&regions)
                            .map(|(l, b)| {
                                let words = RegionBitmap::empty(*l).bits.len();
                                protocol::bytes_to_words(b, words)
                                    .map(|bits| RegionBitmap { layout: *l, bits })
                            })
                            .collect::<Option<Vec<_>>>()
                    })
                    .flatten();
                match bitmap {
                    Some(regions) => {
                        mem.mark_dirty(&DirtyBitmap { regions });
                        Ok(Reply::Ok)
                    }
                    None => Err(Reply::error(
                        ErrorKind::Invalid,
                        format!(
                            "MarkDirty needs one bitmap per region ({} regions) of the region's size",
                            layout.len()
                        ),
                    )),
                }
            }
            Request::Throttle { pct } => {
                vm.set_throttle(pct);
                Ok(Reply::Ok)
            }
            Request::CaptureState => {
                let _op = self.op.lock();
                vm.capture_state()
                    .map_err(vm_error)
                    .and_then(|s| {
                        s.encode()
                            .map_err(|e| Reply::error(ErrorKind::Vm, format!("encode state: {e}")))
                    })
                    .map(Reply::State)
            }
            Request::RestoreState { state } => {
                let _op = self.op.lock();
                VmState::decode(&state)
                    .map_err(|e| Reply::error(ErrorKind::Invalid, e.to_string()))
                    .and_then(|s| {
                        if s.spec.name != self.identity.name {
                            return Err(Reply::error(
                                ErrorKind::Invalid,
                                format!(
                                    "the state is guest {:?}'s, this VMM runs {:?}",
                                    s.spec.name, self.identity.name
                                ),
                            ));
                        }
                        vm.restore_state(&s).map_err(vm_error)
                    })
                    .map(|()| Reply::Ok)
            }
            Request::DeliverFrames { nic, frames } => {
                let nets = &vm.devices().virtio.net;
                match nets.get(nic as usize) {
                    None => Err(Reply::error(
                        ErrorKind::Invalid,
                        format!("the guest has {} NICs; there is no NIC {nic}", nets.len()),
                    )),
                    Some(_) if frames.len() > protocol::MAX_DELIVER_FRAMES => Err(Reply::error(
                        ErrorKind::Invalid,
                        format!(
                            "{} frames in one request; at most {}",
                            frames.len(),
                            protocol::MAX_DELIVER_FRAMES
                        ),
                    )),
                    Some(_)
                        if frames
                            .iter()
                            .any(|f| f.len() > crate::vm::virtio::net::MAX_FRAME) =>
                    {
                        Err(Reply::error(
                            ErrorKind::Invalid,
                            "a frame longer than a NIC takes",
                        ))
                    }
                    Some(n) => {
                        n.receive_forwarded(frames);
                        Ok(Reply::Ok)
                    }
                }
            }
            Request::Stop => Ok(Reply::Ok),
            Request::TestForbiddenSyscall => Err(Reply::error(
                ErrorKind::Refused,
                "test requests are off (the VMM was not started with --test-requests)",
            )),
            // Answered in `answer` (they carry descriptors).
            Request::MemoryFds | Request::TakeForwarding => Err(Reply::error(
                ErrorKind::Protocol,
                "internal: misrouted request",
            )),
        };
        result.unwrap_or_else(|e| e)
    }

    fn status(&self) -> VmmStatus {
        let vm = &self.vm;
        let virtio = &vm.devices().virtio;
        VmmStatus {
            state: vm.status(),
            fault: vm.fault().map(|f| format!("vCPU {}: {}", f.vcpu, f.reason)),
            ever_resumed: self.ever_resumed.load(Ordering::SeqCst),
            last_pause_us: vm.last_pause().as_micros() as u64,
            last_resume_us: vm.last_resume().as_micros() as u64,
            tsc_khz: vm.tsc_khz(),
            throttle_pct: vm.throttle(),
            dirty_logging: (0..vm.memory().layout().len()).any(|i| vm.memory().dirty_logging(i)),
            exits: vm.devices().counters.stats(),
            nics: virtio.net.iter().map(|n| n.stats()).collect(),
            disks: virtio.blk.iter().map(|b| b.stats()).collect(),
            clients: self.clients.load(Ordering::SeqCst),
        }
    }
}

fn vm_error(e: VmError) -> Reply {
    let kind = match &e {
        VmError::State(..) => ErrorKind::State,
        VmError::Vcpus(_)
        | VmError::MemorySize(_)
        | VmError::MemoryTooLarge(_)
        | VmError::Mismatch(_)
        | VmError::Spec(_) => ErrorKind::Invalid,
        _ => ErrorKind::Vm,
    };
    Reply::error(kind, e.to_string())
}

fn send(sock: &UnixStream, reply: &Reply, fds: &[BorrowedFd<'_>]) -> Result<(), ProtocolError> {
    let frame = match protocol::encode(reply, "a reply") {
        Ok(f) => f,
        Err(e) => {
            // Too large (a huge console ask is clamped; a state over 64 MiB is not expected):
            // say so instead.
            let f = protocol::encode(&Reply::error(ErrorKind::Vm, e.to_string()), "a reply")?;
            return protocol::write_frame(sock, &f, &[]);
        }
    };
    protocol::write_frame(sock, &frame, fds)
}
