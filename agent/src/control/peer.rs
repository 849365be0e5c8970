//! The peer control listener on the management address. Nothing a peer says before it has
//! authenticated may cost this host more than a bounded amount of memory, threads, time or log
//! space (DESIGN.md), so:
//!
//! - the handshake (Hello → HelloAck → Auth, see `migrate::session`) runs on the async runtime:
//!   an unauthenticated connection costs one fd and a small task, never a thread;
//! - at most [`MAX_PENDING`] handshakes are open at once, at most [`MAX_PENDING_PER_SOURCE`]
//!   from one source address; a new connection over either cap evicts the oldest pending one
//!   (of that source, or overall), so that idle or drip-fed connections cannot lock out a real
//!   peer: its handshake takes a round trip, theirs never ends;
//! - one deadline, [`HANDSHAKE_DEADLINE`], covers the whole handshake (not each read);
//! - a Hello or Auth larger than [`MAX_HANDSHAKE_FRAME`] is refused before it is read;
//! - nothing the peer said is logged above debug level, and the warnings an unauthenticated
//!   peer can cause are rate-limited (one per [`WARN_EVERY`], with a count of the rest).
//!
//! Only an authenticated session gets a thread (`mig-in`), at most [`MAX_SESSIONS`] at once.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::BufReader;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use crate::migrate::dest::Host;
use crate::migrate::protocol::{
    self, Abort, AbortCode, Command, Frame, FrameHeader, FrameReader, FrameWriter, Hello,
    HEADER_LEN,
};
use crate::migrate::session::{self, Auth, Identity};
use crate::migrate::untrusted::peer_text;
use crate::ratelimit::RateLimit;
use crate::warn_limited;

/// Unauthenticated connections held at once, from all sources.
pub const MAX_PENDING: usize = 256;
/// Unauthenticated connections held at once from one source address.
pub const MAX_PENDING_PER_SOURCE: usize = 32;
/// The whole handshake, from accept to a checked `Auth`.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// Largest `Hello` or `Auth` payload (a real one is about 200 bytes).
pub const MAX_HANDSHAKE_FRAME: u32 = 4096;
/// Authenticated control sessions served at once (each has a thread).
pub const MAX_SESSIONS: usize = 64;
/// At most one warning per this interval for what unauthenticated peers cause.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// Errors of the peer listener.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("timed out after {} s waiting for the peer to finish the handshake", HANDSHAKE_DEADLINE.as_secs())]
    Deadline,
    #[error("the handshake connection: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Protocol(#[from] protocol::ProtocolError),
    #[error(
        "a {what} of {len} bytes is larger than any agent sends (at most {MAX_HANDSHAKE_FRAME})"
    )]
    TooLarge { what: &'static str, len: u32 },
    #[error(transparent)]
    Migrate(#[from] crate::migrate::MigrateError),
    #[error("evicted: more unauthenticated connections than the cap")]
    Evicted,
}

impl PeerError {
    /// A few words that say what went wrong without repeating anything the peer sent (for
    /// logs above debug level).
    fn kind(&self) -> &'static str {
        match self {
            PeerError::Deadline => "handshake deadline passed",
            PeerError::Io(_) => "connection error",
            PeerError::Protocol(_) => "not a valid handshake",
            PeerError::TooLarge { .. } => "oversized handshake frame",
            PeerError::Migrate(crate::migrate::MigrateError::Auth(_)) => "authentication failed",
            PeerError::Migrate(crate::migrate::MigrateError::Refused { .. }) => {
                "no common protocol version"
            }
            PeerError::Migrate(_) => "handshake failed",
            PeerError::Evicted => "evicted over the cap",
        }
    }
}

/// The open handshakes: who, in arrival order, and how to end each.
#[derive(Default)]
struct Pending {
    next: u64,
    /// id → (source, signal that ends it).
    open: BTreeMap<u64, (IpAddr, oneshot::Sender<()>)>,
    /// source → its ids, oldest first.
    by_source: HashMap<IpAddr, VecDeque<u64>>,
}

impl Pending {
    /// Register a handshake from `ip`, first evicting what the caps require. Returns its id,
    /// its end signal, and how many were evicted.
    fn admit(&mut self, ip: IpAddr) -> (u64, oneshot::Receiver<()>, usize) {
        let mut evicted = 0;
        while self.by_source.get(&ip).map_or(0, VecDeque::len) >= MAX_PENDING_PER_SOURCE {
            let Some(old) = self.by_source.get_mut(&ip).and_then(VecDeque::pop_front) else {
                break;
            };
            self.open.remove(&old);
            evicted += 1;
        }
        while self.open.len() >= MAX_PENDING {
            let Some((old, (oip, _))) = self.open.pop_first() else {
                break;
            };
            if let Some(q) = self.by_source.get_mut(&oip) {
                q.retain(|x| *x != old);
                if q.is_empty() {
                    self.by_source.remove(&oip);
                }
            }
            evicted += 1;
        }
        let id = self.next;
        self.next += 1;
        let (tx, rx) = oneshot::channel();
        self.open.insert(id, (ip, tx));
        self.by_source.entry(ip).or_default().push_back(id);
        (id, rx, evicted)
    }

    /// A handshake ended (done, failed or evicted).
    fn remove(&mut self, id: u64, ip: IpAddr) {
        self.open.remove(&id);
        if let Some(q) = self.by_source.get_mut(&ip) {
            q.retain(|x| *x != id);
            if q.is_empty() {
                self.by_source.remove(&ip);
            }
        }
    }

    fn len(&self) -> usize {
        self.open.len()
    }
}

struct Listener {
    host: Arc<dyn Host>,
    pending: Mutex<Pending>,
    sessions: Arc<AtomicUsize>,
    warn_failed: RateLimit,
    warn_evicted: RateLimit,
    warn_busy: RateLimit,
}

impl Listener {
    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        match self.pending.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

/// Accept peer agents on `listener` until the runtime stops.
pub async fn serve(listener: TcpListener, host: Arc<dyn Host>) {
    let l = Arc::new(Listener {
        host,
        pending: Mutex::new(Pending::default()),
        sessions: Arc::new(AtomicUsize::new(0)),
        warn_failed: RateLimit::new(WARN_EVERY),
        warn_evicted: RateLimit::new(WARN_EVERY),
        warn_busy: RateLimit::new(WARN_EVERY),
    });
    let accept_errors = RateLimit::new(WARN_EVERY);
    loop {
        let (conn, addr) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of fds, most likely: wait a little rather than spin.
                warn_limited!(accept_errors, error = %e, "accepting a peer connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (id, ended, evicted, held) = {
            let mut p = l.pending();
            let (id, ended, evicted) = p.admit(addr.ip());
            (id, ended, evicted, p.len())
        };
        if evicted > 0 {
            warn_limited!(
                l.warn_evicted,
                peer = %addr.ip(),
                evicted,
                held,
                cap = MAX_PENDING,
                per_source = MAX_PENDING_PER_SOURCE,
                "too many unauthenticated peer connections: closed the oldest"
            );
        }
        let l2 = l.clone();
        tokio::spawn(async move {
            let me = l2.host.identity();
            let outcome = tokio::select! {
                r = tokio::time::timeout(HANDSHAKE_DEADLINE, handshake(conn, &me)) => {
                    r.unwrap_or(Err(PeerError::Deadline))
                }
                _ = ended => Err(PeerError::Evicted),
            };
            l2.pending().remove(id, addr.ip());
            match outcome {
                Ok(authenticated) => l2.start_session(authenticated, addr),
                Err(PeerError::Evicted) => {}
                Err(e) => {
                    warn_limited!(l2.warn_failed, peer = %addr, reason = e.kind(), "a peer failed the handshake");
                    tracing::debug!(peer = %addr, error = %peer_text(&crate::util::error_chain(&e), 512), "peer handshake failed");
                }
            }
        });
    }
}

/// A connection whose peer authenticated (or, without a cluster key, said Hello).
struct Authenticated {
    conn: std::net::TcpStream,
    hello: Hello,
    version: u16,
    /// Frames read and written so far (the blocking session continues the numbering).
    read: u32,
    written: u32,
}

impl Listener {
    /// Give an authenticated session its thread, within [`MAX_SESSIONS`].
    fn start_session(&self, a: Authenticated, addr: SocketAddr) {
        let Authenticated {
            conn,
            hello,
            version,
            read,
            written,
        } = a;
        let mut w = match conn.try_clone() {
            Ok(c) => FrameWriter::with_seq(c, written),
            Err(_) => return,
        };
        w.set_version(version);
        if self.sessions.fetch_add(1, Ordering::SeqCst) >= MAX_SESSIONS {
            self.sessions.fetch_sub(1, Ordering::SeqCst);
            let _ = w.send_msg(
                Command::Abort,
                &Abort::new(
                    AbortCode::Refused,
                    format!(
                        "this agent serves {MAX_SESSIONS} peer sessions already; try again shortly"
                    ),
                ),
            );
            warn_limited!(self.warn_busy, peer = %addr, cap = MAX_SESSIONS, "refused a peer session: too many at once");
            return;
        }
        let r = match conn.try_clone() {
            Ok(c) => FrameReader::with_seq(BufReader::new(c), read),
            Err(_) => {
                self.sessions.fetch_sub(1, Ordering::SeqCst);
                return;
            }
        };
        let host = self.host.clone();
        let count = self.sessions.clone();
        let spawned = std::thread::Builder::new()
            .name("mig-in".into())
            .spawn(move || {
                crate::migrate::dest::serve_session(conn, w, r, &hello.agent, host);
                count.fetch_sub(1, Ordering::SeqCst);
                // Its receive buffers are free now: hand them back to the system.
                super::memory::give_back();
            });
        if let Err(e) = spawned {
            self.sessions.fetch_sub(1, Ordering::SeqCst);
            tracing::error!(error = %e, "cannot start a thread for a peer session");
        }
    }
}

/// Read one handshake frame: `seq` must match, its payload at most [`MAX_HANDSHAKE_FRAME`].
async fn read_frame(
    conn: &mut TcpStream,
    seq: u32,
    any_version_hello: bool,
) -> Result<Frame, PeerError> {
    let mut hb = [0u8; HEADER_LEN];
    conn.read_exact(&mut hb).await?;
    let (h, command) = match FrameHeader::parse_any_version(&hb)? {
        (h, Command::Hello) if any_version_hello => (h, Command::Hello),
        _ => FrameHeader::parse(&hb)?,
    };
    if h.seq.get() != seq {
        return Err(protocol::ProtocolError::Sequence {
            expected: seq,
            got: h.seq.get(),
        }
        .into());
    }
    let len = h.payload_len.get();
    if len > MAX_HANDSHAKE_FRAME {
        return Err(PeerError::TooLarge {
            what: if seq == 0 { "Hello" } else { "handshake frame" },
            len,
        });
    }
    let mut payload = vec![0u8; len as usize];
    conn.read_exact(&mut payload).await?;
    if crc32c::crc32c(&payload) != h.payload_crc.get() {
        return Err(protocol::ProtocolError::PayloadCrc(command).into());
    }
    Ok(Frame {
        command,
        count: h.count.get(),
        payload,
    })
}

/// Frames to send, numbered from `seq`, as bytes.
fn frame_bytes<T: serde::Serialize>(
    seq: u32,
    version: u16,
    cmd: Command,
    msg: &T,
) -> Result<Vec<u8>, PeerError> {
    let mut w = FrameWriter::with_seq(Vec::new(), seq);
    w.set_version(version);
    w.send_msg(cmd, msg)?;
    Ok(w.get_ref().clone())
}

/// The server side of `migrate::session` on the async runtime.
async fn handshake(mut conn: TcpStream, me: &Identity) -> Result<Authenticated, PeerError> {
    let _ = conn.set_nodelay(true);
    let hello: Hello = read_frame(&mut conn, 0, true).await?.msg(Command::Hello)?;
    let server = match session::answer_hello(&hello, me) {
        Ok(s) => s,
        Err(e @ crate::migrate::MigrateError::Refused { .. }) => {
            let b = frame_bytes(0, protocol::MIN_VERSION, Command::Abort, &e.to_abort())?;
            let _ = conn.write_all(&b).await;
            return Err(e.into());
        }
        Err(e) => return Err(e.into()),
    };
    let b = frame_bytes(0, server.version, Command::HelloAck, &server.ack)?;
    conn.write_all(&b).await?;
    let mut read = 1;
    let written = 1;
    if me.key.is_some() {
        let auth: Auth = read_frame(&mut conn, 1, false).await?.msg(Command::Auth)?;
        read = 2;
        if let Err(e) = session::check_auth(me, &server, &hello, &auth) {
            let b = frame_bytes(
                written,
                server.version,
                Command::Abort,
                &Abort::new(AbortCode::Auth, "authentication failed"),
            )?;
            let _ = conn.write_all(&b).await;
            return Err(e.into());
        }
    }
    let conn = conn.into_std()?;
    conn.set_nonblocking(false)?;
    Ok(Authenticated {
        conn,
        hello,
        version: server.version,
        read,
        written,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_evict_the_oldest_of_a_source_then_overall() {
        let mut p = Pending::default();
        let a: IpAddr = "198.18.0.1".parse().unwrap();
        let mut rx = Vec::new();
        for _ in 0..MAX_PENDING_PER_SOURCE {
            let (_, r, ev) = p.admit(a);
            assert_eq!(ev, 0);
            rx.push(r);
        }
        let (_, _r, ev) = p.admit(a);
        assert_eq!(ev, 1, "the oldest of that source goes");
        assert_eq!(p.len(), MAX_PENDING_PER_SOURCE);
        // Its end signal fired (the sender was dropped).
        assert!(rx[0].try_recv().is_err());
        assert!(matches!(
            rx[1].try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ));
        // Many sources: the total cap holds.
        for i in 0..(MAX_PENDING * 2) {
            let ip: IpAddr = format!("198.19.{}.{}", i / 250, i % 250 + 1)
                .parse()
                .unwrap();
            p.admit(ip);
            assert!(p.len() <= MAX_PENDING);
        }
        assert_eq!(p.len(), MAX_PENDING);
        let (id, _r, _) = p.admit(a);
        p.remove(id, a);
        assert_eq!(p.len(), MAX_PENDING - 1);
        assert!(p.by_source.values().all(|q| !q.is_empty()));
    }
}
