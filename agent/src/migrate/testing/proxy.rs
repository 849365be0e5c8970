//! A frame-aware TCP proxy between a source and a destination agent on loopback. It passes
//! frames through, rewriting the destination's data address in `Ready` so that the data
//! connections come through it as well, and can tamper with one frame going from the source to
//! the destination: flip a byte, cut it short, put garbage before it, or stall the connection
//! (a link that goes down). It can also count how often a byte pattern crosses the data
//! connections in the clear.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::host::LOCALHOST;
use crate::migrate::protocol::{self, Command, FrameHeader, Ready, StreamHello, HEADER_LEN};

/// Which connection of a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    /// The control connection, source → destination.
    Control,
    /// The control connection, destination → source (only [`Action::Stall`] applies).
    ControlBack,
    /// Data stream `i`, source → destination.
    Data(u32),
}

/// What to do to the frame.
#[derive(Debug, Clone)]
pub enum Action {
    /// Flip one byte of its payload (its checksum no longer holds).
    FlipPayload,
    /// Flip one byte of its header's checksummed part.
    FlipHeader,
    /// Flip one byte of its payload and give it a matching checksum (only a seal can tell).
    Forge,
    /// Send its header and half its payload, then end the stream to the destination and reset
    /// the source's connection.
    Truncate,
    /// Send these bytes before it.
    Inject(Vec<u8>),
    /// From this frame on, nothing passes either way on this connection (it is then closed),
    /// and new control connections are refused, for this long.
    Stall(Duration),
}

/// The `nth` (from 0) frame of `command` on `lane`.
#[derive(Debug, Clone)]
pub struct Tamper {
    pub lane: Lane,
    pub command: Command,
    pub nth: usize,
    pub action: Action,
}

#[derive(Default)]
struct Shared {
    upstream: Option<SocketAddr>,
    tamper: Mutex<Option<Tamper>>,
    seen: Mutex<HashMap<(Lane, u16), usize>>,
    applied: AtomicBool,
    /// New control connections are refused until then.
    down_until: Mutex<Option<Instant>>,
    /// Counted in `Pages` payloads on the data connections.
    marker: Option<Vec<u8>>,
    marker_hits: AtomicU64,
    /// The data connections together carry at most this many bytes per second.
    rate: Option<u64>,
    /// Bytes the data connections carried since the first.
    carried: Mutex<Option<(Instant, u64)>>,
    stop: AtomicBool,
}

/// What a proxy does besides passing frames.
#[derive(Debug, Clone, Default)]
pub struct ProxyOptions {
    pub tamper: Option<Tamper>,
    /// A byte pattern to count in page frames.
    pub marker: Option<Vec<u8>>,
    /// A link this slow (bytes per second, all data connections together).
    pub rate: Option<u64>,
}

/// The proxy: point the source at [`Proxy::addr`].
pub struct Proxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Proxy to the destination agent at `upstream`, tampering as `tamper` says (once), and
    /// counting `marker` in page frames.
    pub fn start(upstream: SocketAddr, tamper: Option<Tamper>, marker: Option<Vec<u8>>) -> Proxy {
        Self::with(
            upstream,
            ProxyOptions {
                tamper,
                marker,
                rate: None,
            },
        )
    }

    /// A link of `bytes_per_s` to the destination agent at `upstream`.
    pub fn slow(upstream: SocketAddr, bytes_per_s: u64) -> Proxy {
        Self::with(
            upstream,
            ProxyOptions {
                rate: Some(bytes_per_s),
                ..ProxyOptions::default()
            },
        )
    }

    pub fn with(upstream: SocketAddr, o: ProxyOptions) -> Proxy {
        let shared = Arc::new(Shared {
            upstream: Some(upstream),
            tamper: Mutex::new(o.tamper),
            marker: o.marker,
            rate: o.rate,
            ..Shared::default()
        });
        let l = TcpListener::bind(SocketAddr::new(LOCALHOST, 0)).expect("bind the proxy");
        let addr = l.local_addr().expect("proxy addr");
        let s = shared.clone();
        std::thread::spawn(move || accept_loop(l, s, None));
        Proxy { addr, shared }
    }

    /// Whether the tampering happened.
    pub fn applied(&self) -> bool {
        self.shared.applied.load(Ordering::SeqCst)
    }

    /// How many times the marker crossed in the clear.
    pub fn marker_hits(&self) -> u64 {
        self.shared.marker_hits.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
    }
}

/// Accept connections: control ones (`data_upstream` None) or a session's data ones.
fn accept_loop(l: TcpListener, s: Arc<Shared>, data_upstream: Option<SocketAddr>) {
    let _ = l.set_nonblocking(true);
    while !s.stop.load(Ordering::SeqCst) {
        let Ok((down, _)) = l.accept() else {
            std::thread::sleep(Duration::from_millis(2));
            continue;
        };
        let _ = down.set_nonblocking(false);
        if data_upstream.is_none() {
            let refused = s
                .down_until
                .lock()
                .unwrap()
                .is_some_and(|t| Instant::now() < t);
            if refused {
                // The link is down: nothing answers.
                let _ = down.shutdown(Shutdown::Both);
                continue;
            }
        }
        let Some(to) = data_upstream.or(s.upstream) else {
            continue;
        };
        let Ok(up) = TcpStream::connect(to) else {
            let _ = down.shutdown(Shutdown::Both);
            continue;
        };
        let _ = (up.set_nodelay(true), down.set_nodelay(true));
        let stalled = Arc::new(AtomicBool::new(false));
        let (s1, s2) = (s.clone(), s.clone());
        let (d1, u1) = (down.try_clone().unwrap(), up.try_clone().unwrap());
        let st1 = stalled.clone();
        let lane = data_upstream.is_none().then_some(Lane::Control);
        std::thread::spawn(move || pump_up(&s1, d1, u1, lane, &st1));
        std::thread::spawn(move || pump_down(&s2, up, down, lane.is_some(), &stalled));
    }
}

/// A frame as read: its header bytes, the parsed header, its command and payload.
type RawFrame = ([u8; HEADER_LEN], FrameHeader, Command, Vec<u8>);

/// Read one frame. None at the end; Err(the bytes) when they are not a frame header (the rest
/// is then copied as it is).
fn read_frame(from: &mut TcpStream) -> Option<Result<RawFrame, [u8; HEADER_LEN]>> {
    let mut hb = [0u8; HEADER_LEN];
    from.read_exact(&mut hb).ok()?;
    let Ok((h, cmd)) = FrameHeader::parse_any_version(&hb) else {
        return Some(Err(hb));
    };
    let mut payload = vec![0u8; h.payload_len.get() as usize];
    from.read_exact(&mut payload).ok()?;
    Some(Ok((hb, h, cmd, payload)))
}

fn close(a: &TcpStream, b: &TcpStream) {
    let _ = a.shutdown(Shutdown::Both);
    let _ = b.shutdown(Shutdown::Both);
}

/// Count the frame; the action armed for it, if any (taken: it applies once).
fn take_action(s: &Shared, lane: Lane, cmd: Command) -> Option<Action> {
    let mut seen = s.seen.lock().unwrap();
    let k = seen.entry((lane, cmd as u16)).or_insert(0);
    let nth = *k;
    *k += 1;
    let mut t = s.tamper.lock().unwrap();
    let hit = t
        .as_ref()
        .is_some_and(|t| t.lane == lane && t.command == cmd && t.nth == nth);
    if hit {
        s.applied.store(true, Ordering::SeqCst);
        t.take().map(|t| t.action)
    } else {
        None
    }
}

/// Stop passing anything on this connection, refuse new control connections for `d`, then
/// close it.
fn stall(s: &Shared, stalled: &AtomicBool, d: Duration, a: &TcpStream, b: &TcpStream) {
    stalled.store(true, Ordering::SeqCst);
    *s.down_until.lock().unwrap() = Some(Instant::now() + d);
    let (a, b) = (a.try_clone(), b.try_clone());
    std::thread::spawn(move || {
        std::thread::sleep(d);
        if let (Ok(a), Ok(b)) = (a, b) {
            close(&a, &b);
        }
    });
}

/// Account `bytes` more on the data connections and wait until the link would have carried
/// them at `rate`.
fn pace(s: &Shared, rate: u64, bytes: u64) {
    let due = {
        let mut c = s.carried.lock().unwrap();
        let (start, total) = c.get_or_insert((Instant::now(), 0));
        *total += bytes;
        *start + Duration::from_secs_f64(*total as f64 / rate as f64)
    };
    if let Some(wait) = due.checked_duration_since(Instant::now()) {
        std::thread::sleep(wait);
    }
}

/// Source → destination, frame by frame, tampering where asked.
fn pump_up(
    s: &Shared,
    mut from: TcpStream,
    mut to: TcpStream,
    mut lane: Option<Lane>,
    stalled: &AtomicBool,
) {
    loop {
        let (hb, h, cmd, payload) = match read_frame(&mut from) {
            Some(Ok(f)) => f,
            Some(Err(hb)) => {
                let _ = to.write_all(&hb);
                let _ = std::io::copy(&mut from, &mut to);
                break;
            }
            None => break,
        };
        if lane.is_none() && cmd == Command::StreamHello {
            lane = protocol::json::<StreamHello>(&payload, "StreamHello")
                .ok()
                .map(|h| Lane::Data(h.index));
        }
        if stalled.load(Ordering::SeqCst) {
            continue;
        }
        if cmd == Command::Pages {
            if let Some(m) = &s.marker {
                let hits = payload.windows(m.len()).filter(|w| w == m).count();
                s.marker_hits.fetch_add(hits as u64, Ordering::SeqCst);
            }
        }
        let action = lane.and_then(|l| take_action(s, l, cmd));
        let (mut hb, mut payload) = (hb, payload);
        let ok = match action {
            None => to.write_all(&hb).and_then(|()| to.write_all(&payload)),
            Some(Action::FlipPayload) => {
                if let Some(b) = payload.last_mut() {
                    *b ^= 0x5a;
                }
                to.write_all(&hb).and_then(|()| to.write_all(&payload))
            }
            Some(Action::Forge) => {
                if let Some(b) = payload.get_mut(100) {
                    *b ^= 0x5a;
                }
                let v = protocol::encode_frame_version(
                    cmd,
                    h.count.get(),
                    &payload,
                    h.seq.get(),
                    h.version.get(),
                );
                to.write_all(&v)
            }
            Some(Action::FlipHeader) => {
                hb[12] ^= 0x01;
                to.write_all(&hb).and_then(|()| to.write_all(&payload))
            }
            Some(Action::Truncate) => {
                // The destination sees the stream end in the middle of the frame, the source
                // its connection reset.
                let _ = to
                    .write_all(&hb)
                    .and_then(|()| to.write_all(&payload[..payload.len() / 2]));
                let _ = to.shutdown(Shutdown::Write);
                crate::transport::tcp::abort(&from);
                return;
            }
            Some(Action::Inject(bytes)) => to
                .write_all(&bytes)
                .and_then(|()| to.write_all(&hb))
                .and_then(|()| to.write_all(&payload)),
            Some(Action::Stall(d)) => {
                stall(s, stalled, d, &from, &to);
                continue;
            }
        };
        if ok.is_err() {
            break;
        }
        if let (Some(rate), Some(Lane::Data(_))) = (s.rate, lane) {
            pace(s, rate, (HEADER_LEN + payload.len()) as u64);
        }
    }
    if !stalled.load(Ordering::SeqCst) {
        let _ = to.shutdown(Shutdown::Write);
    }
}

/// Destination → source: control frames (to rewrite `Ready`), or bytes as they come.
fn pump_down(
    s: &Arc<Shared>,
    mut from: TcpStream,
    mut to: TcpStream,
    control: bool,
    stalled: &AtomicBool,
) {
    if !control {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Write);
        return;
    }
    loop {
        let (hb, h, cmd, payload) = match read_frame(&mut from) {
            Some(Ok(f)) => f,
            Some(Err(hb)) => {
                let _ = to.write_all(&hb);
                let _ = std::io::copy(&mut from, &mut to);
                break;
            }
            None => break,
        };
        if stalled.load(Ordering::SeqCst) {
            continue;
        }
        if let Some(Action::Stall(d)) = take_action(s, Lane::ControlBack, cmd) {
            stall(s, stalled, d, &from, &to);
            continue;
        }
        let out = if cmd == Command::Ready {
            let mut ready: Ready = protocol::json(&payload, "Ready").expect("Ready");
            let real: SocketAddr = ready.data_addr.parse().expect("data address");
            let l = TcpListener::bind(SocketAddr::new(LOCALHOST, 0)).expect("bind data proxy");
            ready.data_addr = l.local_addr().expect("addr").to_string();
            let s2 = s.clone();
            std::thread::spawn(move || accept_loop(l, s2, Some(real)));
            let body = serde_json::to_vec(&ready).expect("json");
            protocol::encode_frame_version(cmd, h.count.get(), &body, h.seq.get(), h.version.get())
        } else {
            let mut v = hb.to_vec();
            v.extend_from_slice(&payload);
            v
        };
        if to.write_all(&out).is_err() {
            break;
        }
    }
    if !stalled.load(Ordering::SeqCst) {
        let _ = to.shutdown(Shutdown::Write);
    }
}
