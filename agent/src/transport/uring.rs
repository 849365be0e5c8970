//! io_uring data streams.
//!
//! **Sending** ([`FrameSink`]): frames are built in a pool of buffers registered with the ring
//! (fixed buffers) and sent with one operation at a time per socket, so frames never reorder:
//!
//! - [`SendMode::ZeroCopyFixed`] (default): `SEND_ZC` from the registered buffer
//!   (`IORING_RECVSEND_FIXED_BUF`), asking the kernel to report whether it really avoided the copy
//!   (`IORING_SEND_ZC_REPORT_USAGE`). A buffer goes back to the pool only when its notification
//!   CQE (`IORING_CQE_F_NOTIF`) arrives, never when the send completes. When a notification says
//!   the kernel copied anyway (veth and loopback always do), the stream switches to plain `SEND`,
//!   which is cheaper than a copying `SEND_ZC`.
//! - [`SendMode::ZeroCopy`]: the same without fixed buffers.
//! - [`SendMode::Uring`]: plain io_uring `SEND`; the buffer is free when the send completes.
//! - [`SendMode::Std`]: blocking `write(2)`, the fallback where io_uring is unavailable.
//!
//! Pages reach the pool by one copy out of guest memory, which is also the snapshot the encoder
//! checks, compresses and checksums; sending live guest memory instead would make the frame
//! checksum racy (the guest may write the page while the kernel reads it).
//!
//! Backpressure: when every buffer is in flight, the sender blocks in `io_uring_enter` waiting
//! for completions; there is no busy waiting.
//!
//! **Receiving** is plain `read(2)` on the receiver's own thread, through a 1 MiB `BufReader`
//! (an io_uring `RECV` per read, waited for at once, was measured no faster and was removed;
//! see docs/transport.md).

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, types, IoUring};
use serde::{Deserialize, Serialize};

/// `IORING_SEND_ZC_REPORT_USAGE` (zc flags, in the SQE's ioprio field).
const SEND_ZC_REPORT_USAGE: u16 = 8;
/// `IORING_NOTIF_USAGE_ZC_COPIED` (in a notification CQE's result).
const NOTIF_USAGE_ZC_COPIED: u32 = 1 << 31;
/// Pattern written over a released buffer when poisoning is on (tests).
pub const POISON: u8 = 0xA5;

/// How a data stream sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SendMode {
    /// Blocking write(2).
    Std,
    /// io_uring SEND.
    Uring,
    /// io_uring SEND_ZC, falling back to SEND when the kernel copies.
    ZeroCopy,
    /// io_uring SEND_ZC from registered buffers, falling back to SEND when the kernel copies.
    #[default]
    ZeroCopyFixed,
}

/// A send mode's name that is none of them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown send mode {0:?}: use std, uring, zero-copy or zero-copy-fixed")]
pub struct UnknownSendMode(pub String);

impl std::str::FromStr for SendMode {
    type Err = UnknownSendMode;
    fn from_str(s: &str) -> Result<Self, UnknownSendMode> {
        match s {
            "std" => Ok(SendMode::Std),
            "uring" => Ok(SendMode::Uring),
            "zc" | "zero-copy" => Ok(SendMode::ZeroCopy),
            "zc-fixed" | "zero-copy-fixed" => Ok(SendMode::ZeroCopyFixed),
            o => Err(UnknownSendMode(o.to_string())),
        }
    }
}

/// Bytes sent by each path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendStats {
    /// SEND_ZC whose notification said the data went without a copy.
    pub zero_copy_bytes: u64,
    /// SEND_ZC whose notification said the kernel copied after all.
    pub zc_copied_bytes: u64,
    /// Plain io_uring SEND.
    pub uring_bytes: u64,
    /// Blocking write(2).
    pub std_bytes: u64,
    /// Whether the stream left zero-copy because the kernel copied.
    pub fell_back: bool,
}

impl SendStats {
    pub fn merge(&mut self, o: &SendStats) {
        self.zero_copy_bytes += o.zero_copy_bytes;
        self.zc_copied_bytes += o.zc_copied_bytes;
        self.uring_bytes += o.uring_bytes;
        self.std_bytes += o.std_bytes;
        self.fell_back |= o.fell_back;
    }
    pub fn total(&self) -> u64 {
        self.zero_copy_bytes + self.zc_copied_bytes + self.uring_bytes + self.std_bytes
    }
}

/// Errors of the io_uring data path.
#[derive(Debug, thiserror::Error)]
pub enum UringError {
    #[error("io_uring is not available here: {0}")]
    Unavailable(io::Error),
    #[error("sending on the data stream failed: {0}")]
    Send(io::Error),
    #[error("waiting for io_uring completions failed: {0}")]
    Wait(io::Error),
    #[error("the frame does not fit a {0}-byte buffer")]
    TooLarge(usize),
    #[error("timed out after {0:?} waiting for the kernel to release send buffers")]
    Stuck(Duration),
}

/// Which pool buffers may be reused: the bookkeeping of [`FrameSink`], kept apart so that its
/// rule (a zero-copy buffer is free only after its notification) is unit-tested without a ring.
#[derive(Debug, Default)]
pub struct Ledger {
    free: Vec<u16>,
    /// Buffer -> (send completed, notifications still expected).
    busy: HashMap<u16, (bool, u32)>,
}

impl Ledger {
    pub fn new(buffers: u16) -> Ledger {
        Ledger {
            free: (0..buffers).rev().collect(),
            busy: HashMap::new(),
        }
    }
    /// Take a free buffer.
    pub fn take(&mut self) -> Option<u16> {
        let b = self.free.pop()?;
        self.busy.insert(b, (false, 0));
        Some(b)
    }
    /// Give back a buffer that was taken but never sent.
    pub fn untake(&mut self, b: u16) {
        if self.busy.remove(&b).is_some() {
            self.free.push(b);
        }
    }
    /// The send's CQE arrived; `notif_follows` when it carries IORING_CQE_F_MORE.
    /// Returns true when the buffer became free.
    pub fn sent(&mut self, b: u16, notif_follows: bool) -> bool {
        let Some(e) = self.busy.get_mut(&b) else {
            return false;
        };
        e.0 = true;
        if notif_follows {
            e.1 += 1;
        }
        self.release_if_done(b)
    }
    /// A notification CQE arrived. Returns true when the buffer became free.
    pub fn notified(&mut self, b: u16) -> bool {
        let Some(e) = self.busy.get_mut(&b) else {
            return false;
        };
        e.1 = e.1.saturating_sub(1);
        self.release_if_done(b)
    }
    /// A send that will be retried for its remainder keeps the buffer: record only the
    /// notification this partial send owes.
    pub fn partial(&mut self, b: u16, notif_follows: bool) {
        if let Some(e) = self.busy.get_mut(&b) {
            if notif_follows {
                e.1 += 1;
            }
        }
    }
    fn release_if_done(&mut self, b: u16) -> bool {
        match self.busy.get(&b) {
            Some((true, 0)) => {
                self.busy.remove(&b);
                self.free.push(b);
                true
            }
            _ => false,
        }
    }
    pub fn free_count(&self) -> usize {
        self.free.len()
    }
    pub fn in_flight(&self) -> usize {
        self.busy.len()
    }
}

/// The send in progress on the socket (one at a time keeps frames in order).
struct Current {
    buf: u16,
    len: usize,
    done: usize,
    zc: bool,
}

/// Sends frames on one TCP connection through io_uring (or write(2) in [`SendMode::Std`]).
pub struct FrameSink {
    sock: TcpStream,
    ring: Option<IoUring>,
    mode: SendMode,
    /// Zero-copy is still being used (not fallen back).
    zc: bool,
    fixed: bool,
    bufs: Vec<Box<[u8]>>,
    ledger: Ledger,
    current: Option<Current>,
    /// The buffer being filled.
    open: Option<(u16, usize)>,
    poison: bool,
    /// SEND_ZC bytes per buffer whose notification (which says how they went) is pending.
    zc_pending: HashMap<u16, u64>,
    pub stats: SendStats,
    /// Nanoseconds spent blocked waiting for the kernel to complete sends (the stream was
    /// link-bound then): read by the codec tuner.
    pub waited_ns: u64,
}

const TAG_SEND: u64 = 1 << 32;

impl FrameSink {
    /// A sink with `buffers` pool buffers of `buf_size` bytes. Falls back to [`SendMode::Std`]
    /// (with a warning) where io_uring cannot be set up.
    pub fn new(
        sock: TcpStream,
        mode: SendMode,
        buffers: u16,
        buf_size: usize,
        poison: bool,
    ) -> FrameSink {
        let bufs: Vec<Box<[u8]>> = (0..buffers)
            .map(|_| vec![0u8; buf_size].into_boxed_slice())
            .collect();
        let mut ring = None;
        let mut mode = mode;
        let mut fixed = false;
        if mode != SendMode::Std {
            match IoUring::new(64) {
                Ok(r) => {
                    if mode == SendMode::ZeroCopyFixed {
                        let iov: Vec<libc::iovec> = bufs
                            .iter()
                            .map(|b| libc::iovec {
                                iov_base: b.as_ptr() as *mut libc::c_void,
                                iov_len: b.len(),
                            })
                            .collect();
                        // SAFETY: the buffers are heap allocations owned by this sink; they are
                        // never moved or freed while the ring lives (the ring is dropped first,
                        // see Drop, which also waits for every in-flight operation).
                        match unsafe { r.submitter().register_buffers(&iov) } {
                            Ok(()) => fixed = true,
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot register send buffers; zero-copy without fixed buffers");
                                mode = SendMode::ZeroCopy;
                            }
                        }
                    }
                    ring = Some(r);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "io_uring is unavailable; data streams use write(2)");
                    mode = SendMode::Std;
                }
            }
        }
        FrameSink {
            sock,
            ring,
            zc: matches!(mode, SendMode::ZeroCopy | SendMode::ZeroCopyFixed),
            mode,
            fixed,
            bufs,
            ledger: Ledger::new(buffers),
            current: None,
            open: None,
            poison,
            zc_pending: HashMap::new(),
            stats: SendStats::default(),
            waited_ns: 0,
        }
    }

    /// The mode in force (after any fallback at setup).
    pub fn mode(&self) -> SendMode {
        self.mode
    }

    pub fn buffer_size(&self) -> usize {
        self.bufs.first().map_or(0, |b| b.len())
    }

    /// A buffer to build the next frame in (waits for the kernel when all are in flight).
    pub fn buffer(&mut self) -> Result<&mut [u8], UringError> {
        if self.open.is_none() {
            let b = loop {
                if let Some(b) = self.ledger.take() {
                    break b;
                }
                self.reap(true)?;
            };
            self.open = Some((b, 0));
        }
        let (b, _) = self.open.unwrap_or((0, 0));
        Ok(&mut self.bufs[b as usize][..])
    }

    /// Send the first `len` bytes of the buffer from [`FrameSink::buffer`].
    pub fn send_buffer(&mut self, len: usize) -> Result<(), UringError> {
        let Some((b, _)) = self.open.take() else {
            return Ok(());
        };
        if len > self.bufs[b as usize].len() {
            self.ledger.untake(b);
            return Err(UringError::TooLarge(self.bufs[b as usize].len()));
        }
        if self.mode == SendMode::Std || self.ring.is_none() {
            // Blocking: the copy and any wait for the link count as waiting.
            let t = Instant::now();
            let r = self.sock.write_all(&self.bufs[b as usize][..len]);
            self.waited_ns += t.elapsed().as_nanos() as u64;
            self.ledger.sent(b, false);
            self.release(b);
            r.map_err(UringError::Send)?;
            self.stats.std_bytes += len as u64;
            return Ok(());
        }
        // One send at a time on the socket: wait for the previous one.
        while self.current.is_some() {
            if let Err(e) = self.reap(true) {
                // This buffer was never submitted: it goes back to the pool.
                self.ledger.untake(b);
                return Err(e);
            }
        }
        self.current = Some(Current {
            buf: b,
            len,
            done: 0,
            zc: self.zc,
        });
        self.submit_current()
    }

    /// Copy `bytes` into a buffer and send it (control frames).
    pub fn send_bytes(&mut self, bytes: &[u8]) -> Result<(), UringError> {
        let size = self.buffer()?.len();
        if bytes.len() > size {
            if let Some((b, _)) = self.open.take() {
                self.ledger.untake(b);
            }
            return Err(UringError::TooLarge(size));
        }
        self.buffer()?[..bytes.len()].copy_from_slice(bytes);
        self.send_buffer(bytes.len())
    }

    fn submit_current(&mut self) -> Result<(), UringError> {
        let Some(c) = &self.current else {
            return Ok(());
        };
        let Some(ring) = self.ring.as_mut() else {
            return Ok(());
        };
        let fd = types::Fd(self.sock.as_raw_fd());
        let ptr = self.bufs[c.buf as usize][c.done..].as_ptr();
        let len = (c.len - c.done) as u32;
        let ud = TAG_SEND | u64::from(c.buf);
        let entry = if c.zc {
            let mut op = opcode::SendZc::new(fd, ptr, len)
                .flags(libc::MSG_WAITALL)
                .zc_flags(SEND_ZC_REPORT_USAGE);
            if self.fixed {
                op = op.buf_index(Some(c.buf));
            }
            op.build()
        } else {
            opcode::Send::new(fd, ptr, len)
                .flags(libc::MSG_WAITALL)
                .build()
        }
        .user_data(ud);
        // SAFETY: the SQE points into a pool buffer that stays allocated and untouched until
        // the ledger frees it, which happens only after the send's CQE (and, for SEND_ZC, its
        // notification CQE).
        let pushed = unsafe { ring.submission().push(&entry) };
        if pushed.is_err() {
            ring.submit().map_err(UringError::Send)?;
            // SAFETY: as above; the queue has room after the submit.
            unsafe { ring.submission().push(&entry) }
                .map_err(|_| UringError::Send(io::Error::other("submission queue full")))?;
        }
        ring.submit().map_err(UringError::Send)?;
        Ok(())
    }

    fn release(&mut self, b: u16) {
        if self.poison {
            self.bufs[b as usize].fill(POISON);
        }
    }

    /// Handle completions; with `wait`, block for at least one.
    fn reap(&mut self, wait: bool) -> Result<(), UringError> {
        let Some(ring) = self.ring.as_mut() else {
            return Ok(());
        };
        if wait {
            // Bounded, so callers can give up on a stream whose operations never complete.
            let ts = types::Timespec::from(Duration::from_millis(200));
            let args = types::SubmitArgs::new().timespec(&ts);
            let t = Instant::now();
            let r = ring.submitter().submit_with_args(1, &args);
            self.waited_ns += t.elapsed().as_nanos() as u64;
            match r {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::ETIME)) => {}
                Err(e) => return Err(UringError::Wait(e)),
            }
        }
        let cqes: Vec<(u64, i32, u32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result(), c.flags()))
            .collect();
        for (ud, res, flags) in cqes {
            if ud & TAG_SEND == 0 {
                continue;
            }
            let b = (ud & 0xffff) as u16;
            if cqueue::notif(flags) {
                let copied = (res as u32) & NOTIF_USAGE_ZC_COPIED != 0;
                if copied && self.zc {
                    self.zc = false;
                    self.stats.fell_back = true;
                    tracing::debug!(
                        "the kernel copies SEND_ZC data on this path; switching the stream to plain io_uring send"
                    );
                }
                if let Some(n) = self.zc_pending.remove(&b) {
                    if copied {
                        self.stats.zc_copied_bytes += n;
                    } else {
                        self.stats.zero_copy_bytes += n;
                    }
                }
                if self.ledger.notified(b) {
                    self.release(b);
                }
                continue;
            }
            let more = cqueue::more(flags);
            let Some(c) = self.current.as_mut() else {
                continue;
            };
            if c.buf != b {
                continue;
            }
            if res < 0 {
                let err = io::Error::from_raw_os_error(-res);
                // A kernel without SEND_ZC, or one that cannot pin the buffer (an agent
                // without CAP_IPC_LOCK over its locked-memory limit): fall back and resend
                // the rest of this frame. A notification the failed send still owes keeps
                // the buffer until it comes.
                let unavailable = res == -libc::EINVAL || res == -libc::EOPNOTSUPP;
                let unpinnable = res == -libc::ENOMEM || res == -libc::ENOBUFS;
                if c.zc && (unavailable || unpinnable) {
                    self.zc = false;
                    self.stats.fell_back = true;
                    c.zc = false;
                    self.ledger.partial(b, more);
                    if unavailable {
                        tracing::info!(error = %err, "SEND_ZC unavailable; using plain io_uring send");
                    } else {
                        tracing::warn!(error = %err, "SEND_ZC cannot pin the send buffers (the locked-memory limit of an agent without CAP_IPC_LOCK); using plain io_uring send");
                    }
                    self.submit_current()?;
                    continue;
                }
                self.current = None;
                // The buffer still owes its notification if the CQE says one follows.
                if self.ledger.sent(b, more) {
                    self.release(b);
                }
                return Err(UringError::Send(err));
            }
            let n = res as usize;
            let zc = c.zc;
            c.done += n;
            let finished = c.done >= c.len;
            if zc {
                // How these bytes went is known from the notification.
                *self.zc_pending.entry(b).or_insert(0) += n as u64;
            } else {
                self.stats.uring_bytes += n as u64;
            }
            if finished {
                self.current = None;
                if self.ledger.sent(b, more) {
                    self.release(b);
                }
            } else if n == 0 {
                self.current = None;
                if self.ledger.sent(b, more) {
                    self.release(b);
                }
                return Err(UringError::Send(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the peer stopped receiving",
                )));
            } else {
                self.ledger.partial(b, more);
                self.submit_current()?;
            }
        }
        Ok(())
    }

    /// Wait until every send has completed and every buffer is back (bounded).
    pub fn flush(&mut self, timeout: Duration) -> Result<(), UringError> {
        let deadline = Instant::now() + timeout;
        while self.current.is_some() || self.ledger.in_flight() > usize::from(self.open.is_some()) {
            if Instant::now() > deadline {
                return Err(UringError::Stuck(timeout));
            }
            self.reap(true)?;
        }
        Ok(())
    }

    /// The socket (to read acknowledgements, or to shut it down).
    pub fn socket(&self) -> &TcpStream {
        &self.sock
    }
}

impl Drop for FrameSink {
    fn drop(&mut self) {
        if self.ring.is_some() && (self.current.is_some() || self.ledger.in_flight() > 0) {
            // Reset the connection: what is queued is dropped, so the sends fail and most
            // zero-copy notifications arrive at once.
            crate::transport::tcp::abort(&self.sock);
            if self.drain(Duration::from_millis(500)) {
                return;
            }
            // A notification can lag until the socket is closed: let a thread wait for it,
            // so that teardown does not; it must not hold the connection open (a placeholder
            // socket stands in; nothing is sent on it).
            let placeholder =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None);
            let Ok(sock) = placeholder.map(TcpStream::from) else {
                self.leak();
                return;
            };
            let mut rest = FrameSink {
                sock,
                ring: self.ring.take(),
                mode: self.mode,
                zc: self.zc,
                fixed: self.fixed,
                bufs: std::mem::take(&mut self.bufs),
                ledger: std::mem::take(&mut self.ledger),
                current: self.current.take(),
                open: self.open.take(),
                poison: false,
                zc_pending: std::mem::take(&mut self.zc_pending),
                stats: self.stats,
                waited_ns: 0,
            };
            let spawned = std::thread::Builder::new()
                .name("zc-reaper".into())
                .spawn(move || {
                    let t = Instant::now();
                    if rest.drain(Duration::from_secs(60)) {
                        tracing::debug!(after = ?t.elapsed(), "late zero-copy notifications arrived");
                    } else {
                        rest.leak();
                    }
                    // Drained or leaked: nothing left for Drop to wait for.
                    drop(rest.ring.take());
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a thread to wait for zero-copy notifications");
            }
        }
    }
}

impl FrameSink {
    /// Reap completions until no send is in flight, or `timeout`; true when none is.
    fn drain(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.current.is_some() || self.ledger.in_flight() > usize::from(self.open.is_some()) {
            if Instant::now() > deadline {
                return false;
            }
            // Errors are expected here (the connection is gone); completions still count.
            if self.reap(true).is_err() && self.current.is_some() {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        true
    }

    /// The kernel may still read these buffers: leak them rather than free them.
    fn leak(&mut self) {
        tracing::error!(
            in_flight = self.ledger.in_flight(),
            busy = ?self.ledger.busy,
            "send buffers still in flight at teardown; leaking them"
        );
        std::mem::forget(std::mem::take(&mut self.bufs));
    }
}

/// CPU time this thread has used.
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe {
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts);
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_copy_buffer_is_free_only_after_its_notification() {
        let mut l = Ledger::new(2);
        let a = l.take().unwrap();
        let b = l.take().unwrap();
        assert!(l.take().is_none());
        // SEND_ZC completes with F_MORE: the data may still be read by the NIC.
        assert!(!l.sent(a, true));
        assert_eq!(l.free_count(), 0);
        assert!(l.notified(a));
        assert_eq!(l.free_count(), 1);
        // A plain send frees at completion.
        assert!(l.sent(b, false));
        assert_eq!(l.free_count(), 2);
        // A notification arriving before the send's own CQE is not enough either.
        let c = l.take().unwrap();
        l.partial(c, true);
        assert!(!l.notified(c));
        assert!(!l.sent(c, true));
        assert!(l.notified(c));
        assert_eq!(l.in_flight(), 0);
        // Unknown buffers are ignored.
        assert!(!l.sent(99, false));
        assert!(!l.notified(99));
    }

    #[test]
    fn modes_parse() {
        assert_eq!("zc-fixed".parse::<SendMode>(), Ok(SendMode::ZeroCopyFixed));
        assert_eq!("uring".parse::<SendMode>(), Ok(SendMode::Uring));
        assert!("carrier-pigeon".parse::<SendMode>().is_err());
    }
}
