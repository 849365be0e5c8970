//! Forwarding after the switchover: frames that reach the source's taps once the guest's NIC
//! state was captured belong to the destination's copy. The network still sends frames for the
//! guest to the source until the switch's FDB learns the move (the destination's RARP, or the
//! guest's first frame there), so without forwarding they would be lost.
//!
//! ```text
//!  source                                              destination
//!  pause ─ capture (NIC queues cut here) ─ … ─ Commit ─▶ restore, Commit, resume
//!  frames after the cut stay queued (not delivered)     │
//!  ◀──────────────────────────────────────── Resumed ───┘
//!  take each NIC's tap + its backlog (RX thread stops)
//!  ══ data 0: NetFrames (backlog, then what the taps read) ══▶ guest RX queue, behind the
//!  … until WINDOW after Resumed, or QUIET with nothing       frames that came in the state
//!  ══ data 0: ForwardEnd ══▶
//!  taps closed (leave the bridge), copy destroyed
//! ```
//!
//! Only frames addressed to the guest's own MAC are forwarded: broadcast and multicast frames
//! were flooded to the destination's tap too. Nothing is forwarded before `Resumed`: if the
//! migration fails, the source resumes with those frames still in its own queue.
//!
//! The channel is data stream 0 (migration network), authenticated like the pages (its token
//! came over the authenticated control session; with `--encrypt` every `NetFrames` payload is
//! sealed with the migration's data key, lane 0, its frame number in the nonce), so a peer
//! without the key cannot inject frames. A `NetFrames` payload is `count` records of
//! `nic: u16 LE, len: u32 LE, len bytes`; the destination checks every record (NIC index,
//! length, addressed to that NIC's MAC) before delivering any of the frame's records.

use std::io::BufReader;
use std::net::TcpStream;
use std::sync::OnceLock;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::guest::{IncomingGuest, SourceGuest};
use super::protocol::{self, Command, ForwardEnd, FrameReader, FrameWriter, Framer, ProtocolError};
use super::MigrateError;
use crate::transport::seal::{Sealer, TAG_LEN};
use crate::vm::virtio::net::{addressed_to, Forwarding, MAX_FRAME};

/// How long after `Resumed` the source forwards at most.
pub const WINDOW: Duration = Duration::from_secs(2);
/// Forwarding ends early once no frame for the guest arrived for this long (the network has
/// learned the move).
pub const QUIET: Duration = Duration::from_millis(500);
/// Frames forwarded per migration at most (beyond: dropped and counted).
pub const MAX_FRAMES: u64 = 4096;
/// A `NetFrames` payload is sent once it holds this much.
const BATCH_BYTES: usize = 256 << 10;
/// Frames read from one tap per wakeup.
const READ_BATCH: usize = 64;
/// A write to the destination that takes longer ends forwarding.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// The destination waits this long after resuming for `ForwardEnd`.
const DEST_GRACE: Duration = Duration::from_secs(5);
/// The destination stops waiting for forwarded frames this long after its last stream ended,
/// whatever happened (a bound on the receiver thread).
const DEST_MAX: Duration = Duration::from_secs(180);
/// Bytes of a record header.
const RECORD: usize = 6;

/// What forwarding did, for the migration summary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardStats {
    /// Frames for the guest sent to (source) or delivered on (destination) the destination.
    pub frames: u64,
    /// Frames for the guest not forwarded (over [`MAX_FRAMES`], or the link failed).
    pub dropped: u64,
    /// Frames the source's taps read that were not addressed to the guest (not forwarded).
    pub not_for_guest: u64,
    /// How long the source forwarded, in ms.
    pub window_ms: u64,
}

/// The source's end of the forwarding channel: data stream 0 after its `StreamEnd`.
pub struct Lane {
    pub sock: TcpStream,
    /// The stream's framer: forwarding carries on its numbering and its negotiated version.
    pub framer: Framer,
    pub seal: Option<Sealer>,
}

/// Append one record to a `NetFrames` payload.
pub fn put_record(payload: &mut Vec<u8>, nic: u16, frame: &[u8]) {
    payload.extend_from_slice(&nic.to_le_bytes());
    payload.extend_from_slice(&(frame.len() as u32).to_le_bytes());
    payload.extend_from_slice(frame);
}

/// Parse a `NetFrames` payload of `count` records into (NIC index, frame).
pub fn parse_records(payload: &[u8], count: u32) -> Result<Vec<(u16, &[u8])>, ProtocolError> {
    let bad = |why: String| ProtocolError::Malformed {
        what: "NetFrames",
        why,
    };
    let mut out = Vec::with_capacity((count as usize).min(4096));
    let mut rest = payload;
    for i in 0..count {
        if rest.len() < RECORD {
            return Err(bad(format!("record {i} of {count}: header truncated")));
        }
        let nic = u16::from_le_bytes([rest[0], rest[1]]);
        let len = u32::from_le_bytes([rest[2], rest[3], rest[4], rest[5]]) as usize;
        if len == 0 || len > MAX_FRAME {
            return Err(bad(format!(
                "record {i}: a frame of {len} bytes (1 to {MAX_FRAME} allowed)"
            )));
        }
        let Some(frame) = rest.get(RECORD..RECORD + len) else {
            return Err(bad(format!("record {i}: frame truncated")));
        };
        out.push((nic, frame));
        rest = &rest[RECORD + len..];
    }
    if !rest.is_empty() {
        return Err(bad(format!("{} bytes after the last record", rest.len())));
    }
    Ok(out)
}

/// Sort parsed records by NIC (index into `macs`), refusing the whole payload if any record
/// names a NIC the guest does not have or is not addressed to that NIC's MAC.
pub fn by_nic(
    records: &[(u16, &[u8])],
    macs: &[[u8; 6]],
) -> Result<Vec<Vec<Vec<u8>>>, ProtocolError> {
    let mut out: Vec<Vec<Vec<u8>>> = vec![Vec::new(); macs.len()];
    for (k, (nic, frame)) in records.iter().enumerate() {
        let Some(mac) = macs.get(usize::from(*nic)) else {
            return Err(ProtocolError::Malformed {
                what: "NetFrames",
                why: format!("record {k} names NIC {nic}; the guest has {}", macs.len()),
            });
        };
        if !addressed_to(frame, mac) {
            return Err(ProtocolError::Malformed {
                what: "NetFrames",
                why: format!("record {k} is not addressed to NIC {nic}'s MAC"),
            });
        }
        out[usize::from(*nic)].push(frame.to_vec());
    }
    Ok(out)
}

/// The source's forwarder thread.
pub struct Forwarder {
    join: JoinHandle<ForwardStats>,
}

impl Forwarder {
    /// Wait for the window to end (at most [`WINDOW`] after the start, plus a write timeout).
    pub fn finish(self) -> ForwardStats {
        self.join.join().unwrap_or_default()
    }
}

/// After `Resumed`: take the source VM's taps and post-capture frames and forward them on
/// `lane` in a thread. None (and nothing taken) when the VM has no tap.
pub fn start(vm: &dyn SourceGuest, lane: Lane) -> Option<Forwarder> {
    let nics = vm.take_for_forwarding();
    if nics.is_empty() {
        return None;
    }
    let name = vm.spec().name.clone();
    let join = std::thread::Builder::new()
        .name("net-forward".into())
        .spawn(move || forward(&name, lane, nics))
        .map_err(|e| tracing::warn!(error = %e, "cannot start the forwarder; frames reaching this host for the guest are dropped"))
        .ok()?;
    Some(Forwarder { join })
}

struct Out {
    w: FrameWriter<TcpStream>,
    seal: Option<Sealer>,
    payload: Vec<u8>,
    count: u32,
    stats: ForwardStats,
    /// The link failed: the rest is dropped.
    broken: bool,
}

impl Out {
    fn push(&mut self, vm: &str, nic: usize, mac: &[u8; 6], frame: &[u8]) {
        if !addressed_to(frame, mac) {
            self.stats.not_for_guest += 1;
            return;
        }
        if self.broken || self.stats.frames + u64::from(self.count) >= MAX_FRAMES {
            self.stats.dropped += 1;
            return;
        }
        put_record(&mut self.payload, nic as u16, frame);
        self.count += 1;
        if self.payload.len() >= BATCH_BYTES {
            self.flush(vm);
        }
    }

    fn flush(&mut self, vm: &str) {
        if self.count == 0 {
            return;
        }
        let count = std::mem::take(&mut self.count);
        let mut payload = std::mem::take(&mut self.payload);
        let sent = (|| -> Result<(), MigrateError> {
            if let Some(s) = &self.seal {
                let len = payload.len();
                payload.resize(len + TAG_LEN, 0);
                s.seal(self.w.next_seq(), &mut payload, len)?;
            }
            self.w.send(Command::NetFrames, count, &payload)?;
            self.w.flush()?;
            Ok(())
        })();
        match sent {
            Ok(()) => self.stats.frames += u64::from(count),
            Err(e) => {
                tracing::warn!(vm, error = %crate::util::error_chain(&e), frames = count, "forwarding to the destination failed; frames for the guest reaching this host are dropped");
                self.stats.dropped += u64::from(count);
                self.broken = true;
            }
        }
    }
}

fn forward(vm: &str, lane: Lane, nics: Vec<(usize, Forwarding)>) -> ForwardStats {
    let started = Instant::now();
    let _ = lane.sock.set_write_timeout(Some(WRITE_TIMEOUT));
    let mut out = Out {
        w: FrameWriter::with_framer(lane.sock, lane.framer),
        seal: lane.seal,
        payload: Vec::new(),
        count: 0,
        stats: ForwardStats::default(),
        broken: false,
    };
    // The frames that queued up since the capture go first, in their order.
    for (i, f) in &nics {
        for frame in &f.backlog {
            out.push(vm, *i, &f.mac, frame);
        }
    }
    out.flush(vm);
    let backlog = out.stats.frames;
    let deadline = started + WINDOW;
    let mut last = started;
    let mut buf = vec![0u8; MAX_FRAME];
    loop {
        let now = Instant::now();
        let quiet_end = last + QUIET;
        if now >= deadline || now >= quiet_end || out.broken {
            break;
        }
        let wait = deadline.min(quiet_end) - now;
        let mut fds: Vec<libc::pollfd> = nics
            .iter()
            .map(|(_, f)| libc::pollfd {
                fd: f.tap.raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: poll(2) on pollfds we own, for descriptors the taps (owned by `nics`) keep
        // open, with a bounded timeout.
        let rc = unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                wait.as_millis().max(1) as i32,
            )
        };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::warn!(vm, error = %e, "polling the taps failed; forwarding ends");
            break;
        }
        let before = out.stats.frames + u64::from(out.count) + out.stats.dropped;
        for ((i, f), p) in nics.iter().zip(&fds) {
            if p.revents & libc::POLLIN == 0 {
                continue;
            }
            for _ in 0..READ_BATCH {
                match f.tap.read_frame(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => out.push(vm, *i, &f.mac, &buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    // WouldBlock: drained; anything else: the tap is gone, the window ends.
                    Err(_) => break,
                }
            }
        }
        out.flush(vm);
        if out.stats.frames + out.stats.dropped > before {
            last = Instant::now();
        }
    }
    if !out.broken {
        let end = ForwardEnd {
            frames: out.stats.frames,
            dropped: out.stats.dropped,
        };
        if let Err(e) = out.w.send_msg(Command::ForwardEnd, &end) {
            tracing::debug!(vm, error = %e, "could not send ForwardEnd");
        }
    }
    out.stats.window_ms = started.elapsed().as_millis() as u64;
    tracing::info!(
        vm,
        frames = out.stats.frames,
        backlog,
        dropped = out.stats.dropped,
        not_for_guest = out.stats.not_for_guest,
        window_ms = out.stats.window_ms,
        "forwarding after the switchover done"
    );
    // The taps close here: they leave the bridge.
    drop(nics);
    out.stats
}

/// The destination's side, on data stream 0's thread after its `StreamEnd`: deliver forwarded
/// frames into `vm`'s NICs once `resumed` is set (the guest runs here), until `ForwardEnd`, the
/// source closing, or [`DEST_GRACE`] after the resume. A frame before the resume, or one that
/// is not for the NIC it names, is an error (nothing of it is delivered).
pub fn receive(
    vm: &dyn IncomingGuest,
    r: &FrameReader<BufReader<TcpStream>>,
    seal: Option<Sealer>,
    resumed: &OnceLock<Instant>,
) -> Result<ForwardStats, MigrateError> {
    if !r.get_ref().buffer().is_empty() {
        return Err(ProtocolError::Malformed {
            what: "data stream 0",
            why: "bytes after StreamEnd before the guest resumed".into(),
        }
        .into());
    }
    // A reader of its own on the same socket, with a read timeout.
    let sock = r
        .get_ref()
        .get_ref()
        .try_clone()
        .map_err(ProtocolError::from)?;
    // Waiting between frames polls in short steps (so the bounds below are checked); a frame
    // that has begun must arrive whole within the read timeout.
    let _ = sock.set_read_timeout(Some(DEST_GRACE));
    let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
    let mut fr = FrameReader::with_seq(BufReader::new(sock), r.last_seq().wrapping_add(1));
    fr.set_timeout(Some(DEST_GRACE), "the rest of a forwarded frame");
    let macs = vm.nic_macs();
    let mut stats = ForwardStats::default();
    let begun = Instant::now();
    let mut payload = Vec::new();
    loop {
        if begun.elapsed() > DEST_MAX || resumed.get().is_some_and(|t| t.elapsed() > DEST_GRACE) {
            tracing::debug!(vm = %vm.spec().name, frames = stats.frames, "stopped waiting for forwarded frames");
            return Ok(stats);
        }
        if fr.get_ref().buffer().is_empty() && !readable(fd, Duration::from_millis(250)) {
            continue;
        }
        let (cmd, count) = match fr.next_into(&mut payload) {
            Ok(v) => v,
            // The source closed the stream (it may have had nothing to forward) or the
            // migration failed and the stream was cut.
            Err(ProtocolError::Io(_)) => return Ok(stats),
            Err(e) => return Err(e.into()),
        };
        match cmd {
            Command::NetFrames => {
                if resumed.get().is_none() {
                    return Err(ProtocolError::Malformed {
                        what: "NetFrames",
                        why: "forwarded frames before the guest resumed here".into(),
                    }
                    .into());
                }
                if let Some(s) = &seal {
                    s.open(fr.last_seq(), &mut payload)?;
                }
                let per_nic = by_nic(&parse_records(&payload, count)?, &macs)?;
                for (nic, frames) in per_nic.into_iter().enumerate() {
                    if !frames.is_empty() {
                        vm.deliver_forwarded(nic, frames);
                    }
                }
                stats.frames += u64::from(count);
            }
            Command::ForwardEnd => {
                let end: ForwardEnd = protocol::json(&payload, "ForwardEnd")?;
                stats.dropped = end.dropped;
                if end.frames != stats.frames {
                    tracing::warn!(vm = %vm.spec().name, sent = end.frames, got = stats.frames, "forwarded frame counts differ");
                }
                return Ok(stats);
            }
            other => {
                return Err(ProtocolError::Unexpected {
                    expected: Command::NetFrames,
                    got: other,
                }
                .into())
            }
        }
    }
}

/// Whether `fd` has something to read (or is closed) within `wait`.
fn readable(fd: i32, wait: Duration) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll(2) on one pollfd we own, for a socket the caller keeps open, bounded.
    let rc = unsafe { libc::poll(&mut p, 1, wait.as_millis() as i32) };
    rc > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_bad_ones_are_refused() {
        let mut p = Vec::new();
        put_record(&mut p, 0, &[1u8; 60]);
        put_record(&mut p, 3, &[2u8; 1514]);
        let r = parse_records(&p, 2).unwrap();
        assert_eq!(r, vec![(0, &[1u8; 60][..]), (3, &[2u8; 1514][..])]);
        // Wrong count either way, truncation, trailing bytes, impossible lengths.
        assert!(parse_records(&p, 3).is_err());
        assert!(parse_records(&p, 1).is_err());
        assert!(parse_records(&p[..p.len() - 1], 2).is_err());
        let mut long = p.clone();
        long.push(0);
        assert!(parse_records(&long, 2).is_err());
        let mut zero = Vec::new();
        put_record(&mut zero, 0, &[]);
        assert!(parse_records(&zero, 1).is_err());
        let mut huge = vec![0u8, 0];
        huge.extend_from_slice(&((MAX_FRAME as u32) + 1).to_le_bytes());
        let e = parse_records(&huge, 1).unwrap_err().to_string();
        assert!(e.contains("65537 bytes"), "{e}");
        assert!(parse_records(&[], 0).unwrap().is_empty());
    }

    #[test]
    fn only_frames_for_the_named_nic_are_taken() {
        let macs = [[0x52, 0x54, 0, 0, 0, 1], [0x52, 0x54, 0, 0, 0, 2]];
        let frame = |mac: &[u8; 6], b: u8| {
            let mut f = vec![b; 64];
            f[..6].copy_from_slice(mac);
            f
        };
        let (a1, b1, a2) = (frame(&macs[0], 1), frame(&macs[1], 2), frame(&macs[0], 3));
        let sorted = by_nic(&[(0, &a1), (1, &b1), (0, &a2)], &macs).unwrap();
        assert_eq!(sorted, vec![vec![a1.clone(), a2.clone()], vec![b1.clone()]]);
        // To the other NIC's MAC, a broadcast, a NIC the guest lacks: the payload is refused.
        let e = by_nic(&[(0, &a1), (1, &a2)], &macs)
            .unwrap_err()
            .to_string();
        assert!(e.contains("record 1 is not addressed to NIC 1"), "{e}");
        assert!(by_nic(&[(0, &[0xff; 64])], &macs).is_err());
        let e = by_nic(&[(2, &a1)], &macs).unwrap_err().to_string();
        assert!(e.contains("names NIC 2; the guest has 2"), "{e}");
    }
}
