//! Accepting a migration's data connections on the destination's data port: only the
//! source's migration address, each with a `StreamHello` naming the migration, its token and a
//! free stream index, read without blocking and bounded in time and number; everything else is
//! closed and ignored without holding up the real streams.

use std::net::{IpAddr, TcpStream};
use std::time::{Duration, Instant};

use super::STREAMS_TIMEOUT;
use crate::migrate::protocol::{self, Command, StreamHello};
use crate::migrate::MigrateError;
use crate::transport::tcp as transport;

/// How long a data connection may take to present its `StreamHello`.
const UNVERIFIED_TIMEOUT: Duration = Duration::from_secs(2);
/// Unverified data connections held at once (more: the oldest is closed).
const MAX_UNVERIFIED: usize = 32;
/// Largest `StreamHello` payload (a real one is about 100 bytes).
const MAX_STREAM_HELLO: u32 = 1024;

/// Stray connections to data ports: one warning per interval.
static STRAY_WARN: crate::ratelimit::RateLimit =
    crate::ratelimit::RateLimit::new(Duration::from_secs(10));

/// A data connection that has not shown its token yet: its `StreamHello` read so far.
struct Unverified {
    s: TcpStream,
    from: std::net::SocketAddr,
    since: Instant,
    /// The frame as far as it is known: the header first, then header and payload.
    buf: Vec<u8>,
    /// Bytes of `buf` read so far.
    got: usize,
}

impl Unverified {
    /// Take `k` more bytes into account: None while more are needed, else whether the frame
    /// is a well-formed `StreamHello` (its content is checked by the caller).
    fn advance(&mut self, k: usize) -> Option<Result<(), &'static str>> {
        self.got += k;
        if self.got < self.buf.len() {
            return None;
        }
        if self.buf.len() == protocol::HEADER_LEN {
            let h = match protocol::FrameHeader::parse(&self.buf) {
                Ok((h, Command::StreamHello)) if h.seq.get() == 0 => h,
                _ => return Some(Err("not a stream hello")),
            };
            let len = h.payload_len.get();
            if len == 0 || len > MAX_STREAM_HELLO {
                return Some(Err("a hello of an impossible size"));
            }
            self.buf.resize(protocol::HEADER_LEN + len as usize, 0);
            return None;
        }
        let h = match protocol::FrameHeader::parse(&self.buf[..protocol::HEADER_LEN]) {
            Ok((h, _)) => h,
            Err(_) => return Some(Err("not a stream hello")),
        };
        if crc32c::crc32c(&self.buf[protocol::HEADER_LEN..]) != h.payload_crc.get() {
            return Some(Err("a hello with a bad checksum"));
        }
        Some(Ok(()))
    }
}

/// Why a data connection was turned away (our words only: nothing the connection said).
fn stray(from: std::net::SocketAddr, why: &'static str) {
    tracing::debug!(%from, why, "closed a data connection that is not one of the migration's streams");
    crate::warn_limited!(STRAY_WARN, %from, why, "ignored a stray connection to the data port");
}

/// Accept the `n` data streams of a migration on `listener` until `deadline`: only connections
/// from `expect` (the source's migration address, when it said) are considered, each must
/// present `StreamHello` with this migration's id and `token` and a free index within
/// [`UNVERIFIED_TIMEOUT`]; all others are closed and ignored, without holding up the rest (the
/// hellos are read without blocking, at most [`MAX_UNVERIFIED`] at once). The hello is read
/// exactly, so no page bytes behind it leave the socket. Returns the streams by index.
pub(in crate::migrate) fn accept_streams(
    listener: &std::net::TcpListener,
    expect: Option<IpAddr>,
    migration_id: &str,
    token: &str,
    n: u32,
    deadline: Instant,
) -> Result<Vec<TcpStream>, MigrateError> {
    use std::io::Read;
    listener
        .set_nonblocking(true)
        .map_err(protocol::ProtocolError::from)?;
    let mut slots: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    let mut pending: Vec<Unverified> = Vec::new();
    let mut filled = 0;
    while filled < n as usize {
        let now = Instant::now();
        if now >= deadline {
            return Err(MigrateError::Other(format!(
                "timed out after {} s waiting for the data connections: {filled} of {n} arrived",
                STREAMS_TIMEOUT.as_secs()
            )));
        }
        let mut progress = false;
        loop {
            match listener.accept() {
                Ok((s, from)) => {
                    progress = true;
                    if expect.is_some_and(|ip| ip != from.ip()) {
                        stray(from, "not from the source's migration address");
                        continue;
                    }
                    if s.set_nonblocking(true).is_err() {
                        continue;
                    }
                    if pending.len() >= MAX_UNVERIFIED {
                        let old = pending.remove(0);
                        stray(
                            old.from,
                            "crowded out by newer connections before its hello",
                        );
                    }
                    pending.push(Unverified {
                        s,
                        from,
                        since: now,
                        buf: vec![0; protocol::HEADER_LEN],
                        got: 0,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // Out of fds and the like: try again on the next turn.
                Err(_) => break,
            }
        }
        let mut i = 0;
        while i < pending.len() {
            let u = &mut pending[i];
            let got = u.s.read(&mut u.buf[u.got..]);
            let verdict: Option<Result<(), &'static str>> = match got {
                Ok(0) => Some(Err("closed before its hello")),
                Ok(k) => {
                    progress = true;
                    u.advance(k)
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if now.duration_since(u.since) > UNVERIFIED_TIMEOUT {
                        Some(Err("no hello in time"))
                    } else {
                        None
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => None,
                Err(_) => Some(Err("connection error before its hello")),
            };
            let Some(verdict) = verdict else {
                i += 1;
                continue;
            };
            let u = pending.swap_remove(i);
            let hello = verdict.and_then(|()| {
                protocol::json::<StreamHello>(&u.buf[protocol::HEADER_LEN..], "StreamHello")
                    .map_err(|_| "an unreadable hello")
            });
            let taken = hello.and_then(|h| {
                // Compared in full either way: no early exit that times the token.
                let id_ok = h.migration_id == migration_id;
                let token_ok = constant_time_eq(h.token.as_bytes(), token.as_bytes());
                if !(id_ok && token_ok) {
                    return Err("the wrong migration or token");
                }
                match slots.get(h.index as usize) {
                    None => Err("a stream index out of range"),
                    Some(Some(_)) => Err("a stream index already taken"),
                    Some(None) => Ok(h.index as usize),
                }
            });
            match taken {
                Ok(idx) => {
                    let s = u.s;
                    s.set_nonblocking(false)
                        .map_err(protocol::ProtocolError::from)?;
                    let _ = s.set_nodelay(true);
                    let _ = transport::keepalive(&s);
                    use std::os::fd::AsRawFd;
                    transport::mark_migration(s.as_raw_fd())
                        .map_err(protocol::ProtocolError::from)?;
                    slots[idx] = Some(s);
                    filled += 1;
                }
                Err(why) => stray(u.from, why),
            }
        }
        if !progress {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    Ok(slots.into_iter().flatten().collect())
}

/// Equality of two byte strings in time that depends only on their lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
