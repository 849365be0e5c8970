//! Live migration: the source engine, the destination, the codec, the wire protocol and the
//! convergence policy.
//!
//! ```text
//! source agent                                     destination agent
//!   source/: rounds over the dirty log      ══▶    dest/: creates an empty VM, applies
//!     per-stream workers: codec.rs (encode)          pages per stream (codec.rs decode),
//!     converge.rs decides after each round           state, verify, resume on Commit
//!   protocol.rs frames on control + N data connections (crate::transport: TCP, io_uring)
//! ```
//!
//! Invariants kept here (DESIGN.md): a page always travels on the same data stream
//! (`(gpa >> 21) % streams`), so its versions arrive in order; a delta is only made against the
//! cache's copy, which is exactly what the destination holds; dirty logging stays on from the
//! first round to the switchover and the bitmap of a round is never dropped; before the commit,
//! every failure resumes the guest on the source.

pub mod blast;
pub mod codec;
pub mod converge;
pub mod dest;
pub mod forward;
pub mod guest;
pub mod ownership;
pub mod protocol;
pub mod query;
pub mod resolve;
pub mod session;
pub mod source;
pub mod tune;
pub mod untrusted;

#[cfg(test)]
mod engine_tests;
#[cfg(test)]
pub(crate) mod testing;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Instant, SystemTime};

use serde::{Deserialize, Serialize};

pub use converge::{Policy, RoundStats};
use protocol::{Abort, AbortCode, Encoding, ProtocolError};

/// A migration's options (or a throughput probe's) that make no sense: refused before anything
/// moves.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OptionError {
    #[error("{0} streams is too many (at most 64)")]
    TooManyStreams(u32),
    #[error("cache size {0} % must be between 0 and 100")]
    CachePercent(f64),
    #[error("downtime target {0} ms must be above 0 and at most 60000")]
    DowntimeTarget(f64),
    #[error("max time {0} s must be positive")]
    MaxTime(f64),
    #[error("throttle percentages must satisfy initial <= max <= 99")]
    Throttle,
    #[error("{0} streams: use 1 to 64")]
    ProbeStreams(u32),
    #[error("{0} s: give 0 < seconds <= 600")]
    ProbeSecs(f64),
    #[error("unknown codec {0:?}: choose auto (the default), none, lz4 or zstd")]
    UnknownCodec(String),
    #[error("--codec zstd needs protocol version 2 and the destination speaks {0}: upgrade it, or choose --codec lz4 or auto")]
    ZstdNeedsVersion2(u16),
    #[error(transparent)]
    SendMode(#[from] crate::transport::uring::UnknownSendMode),
}

/// Errors of a migration.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("cannot connect to {what} {addr}: {source}")]
    Connect {
        what: &'static str,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Option(#[from] OptionError),
    #[error(transparent)]
    Vm(#[from] crate::vm::VmError),
    #[error(transparent)]
    Memory(#[from] crate::vm::memory::MemoryError),
    #[error(transparent)]
    State(#[from] crate::vm::state::StateError),
    #[error(transparent)]
    Codec(#[from] codec::CodecError),
    #[error("data stream {stream}: {error}")]
    Stream {
        stream: u32,
        error: Box<MigrateError>,
    },
    /// The io_uring data path failed (sending frames, or receiving them).
    #[error(transparent)]
    Uring(#[from] crate::transport::uring::UringError),
    #[error("cancelled by the user")]
    Cancelled,
    #[error("lost the destination {peer} (it stopped, or the network to it failed): {cause}")]
    Lost { peer: String, cause: String },
    #[error("{0}")]
    Policy(String),
    /// The destination refused (or, on the destination, refuses: the reason goes to the
    /// source with `code`), or the peer aborted with `code`.
    #[error("the destination refused: {reason}")]
    Refused { code: AbortCode, reason: String },
    #[error(
        "memory differs after the transfer: source {source_digest}, destination {dest_digest}"
    )]
    DigestMismatch {
        source_digest: String,
        dest_digest: String,
    },
    #[error("timed out after {secs} s waiting for {what}")]
    Timeout { what: &'static str, secs: u64 },
    #[error("authentication: {0}")]
    Auth(String),
    #[error(transparent)]
    Ownership(#[from] ownership::OwnershipError),
    #[error(transparent)]
    Seal(#[from] crate::transport::seal::SealError),
    #[error(transparent)]
    Random(#[from] crate::util::UtilError),
    #[error("{0}")]
    Other(String),
}

impl MigrateError {
    /// A refusal with the code [`AbortCode::Refused`].
    pub fn refused(reason: impl Into<String>) -> MigrateError {
        MigrateError::Refused {
            code: AbortCode::Refused,
            reason: reason.into(),
        }
    }

    /// What a peer's `Abort` means here: a digest mismatch stays one (with the source's
    /// digest, `ours`, where this side has it); anything else is a refusal with its code.
    pub fn from_abort(e: ProtocolError, ours: Option<&str>) -> MigrateError {
        match e {
            ProtocolError::Aborted {
                code: AbortCode::DigestMismatch,
                digest: Some(theirs),
                ..
            } => MigrateError::DigestMismatch {
                source_digest: ours.unwrap_or_default().to_string(),
                dest_digest: theirs,
            },
            ProtocolError::Aborted { code, reason, .. } => MigrateError::Refused { code, reason },
            e => e.into(),
        }
    }

    /// The code an `Abort` for this error carries on the wire.
    pub fn abort_code(&self) -> AbortCode {
        match self {
            MigrateError::Cancelled => AbortCode::Cancelled,
            MigrateError::Refused { code, .. } => *code,
            MigrateError::DigestMismatch { .. } => AbortCode::DigestMismatch,
            MigrateError::Timeout { .. } => AbortCode::Timeout,
            MigrateError::Auth(_) => AbortCode::Auth,
            MigrateError::Policy(_) => AbortCode::Policy,
            MigrateError::Protocol(ProtocolError::TimedOut { .. })
            | MigrateError::Protocol(ProtocolError::TimedOutUnknown(_)) => AbortCode::Timeout,
            MigrateError::Protocol(ProtocolError::Io(_)) => AbortCode::Transport,
            MigrateError::Protocol(ProtocolError::Aborted { code, .. }) => *code,
            MigrateError::Protocol(_) => AbortCode::Protocol,
            MigrateError::Stream { error, .. } => error.abort_code(),
            MigrateError::Uring(_) | MigrateError::Connect { .. } | MigrateError::Lost { .. } => {
                AbortCode::Transport
            }
            _ => AbortCode::Internal,
        }
    }

    /// The `Abort` that tells the peer why this side stops: the code, and the reason in words
    /// (the refusal's own words; otherwise the cause chain).
    pub fn to_abort(&self) -> Abort {
        match self {
            MigrateError::Refused { code, reason } => Abort::new(*code, reason.clone()),
            // The digest also in the reason's words, as sources from before the codes read it.
            MigrateError::DigestMismatch { dest_digest, .. } => Abort {
                code: AbortCode::DigestMismatch,
                reason: format!("{}{dest_digest}", protocol::LEGACY_DIGEST_MISMATCH),
                digest: Some(dest_digest.clone()),
            },
            e => Abort::new(e.abort_code(), crate::util::error_chain(e)),
        }
    }
}

/// The cipher of encrypted migrations, as the summary names it.
pub const CIPHER: &str = "AES-256-GCM (ring)";

/// Options of one migration, as the user gives them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MigrateOptions {
    /// Parallel data streams (0 = one per host core, at most 4).
    pub streams: u32,
    /// Compare a digest of all guest memory at the pause with the destination's before it resumes.
    pub verify: bool,
    /// Delta cache size as a percentage of guest memory.
    pub cache_percent: f64,
    pub policy: Policy,
    /// How data streams send (default: io_uring SEND_ZC from registered buffers, falling back
    /// to plain io_uring send where the kernel copies).
    pub send_mode: crate::transport::uring::SendMode,
    /// Overwrite send buffers when they are released (tests: proves none is reused early).
    pub poison_buffers: bool,
    /// Encrypt the page frames on the data streams and the state (AES-256-GCM; needs the
    /// cluster key). As the user gives it: force it on; as the engine gets it: the decision.
    pub encrypt: bool,
    /// Do not encrypt this migration (refused by a destination that requires encryption).
    pub no_encrypt: bool,
    /// Compress pages (LZ4, XOR deltas); off: zero pages are still skipped, the rest go raw.
    /// Off overrides `codec`.
    pub compress: bool,
    /// The page codec: auto (chosen per stream from measured rates; see `tune`), none, lz4,
    /// zstd. Left out of the JSON when auto, so that agents from before `--codec` accept it.
    #[serde(skip_serializing_if = "tune::CodecChoice::is_auto")]
    pub codec: tune::CodecChoice,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        MigrateOptions {
            streams: 0,
            verify: false,
            cache_percent: 5.0,
            policy: Policy::default(),
            send_mode: Default::default(),
            poison_buffers: false,
            encrypt: false,
            no_encrypt: false,
            compress: true,
            codec: tune::CodecChoice::Auto,
        }
    }
}

impl MigrateOptions {
    /// The number of streams to open.
    pub fn stream_count(&self) -> u32 {
        if self.streams > 0 {
            return self.streams.min(64);
        }
        std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(2)
            .clamp(1, 4)
    }

    pub fn validate(&self) -> Result<(), OptionError> {
        if self.streams > 64 {
            return Err(OptionError::TooManyStreams(self.streams));
        }
        if !(0.0..=100.0).contains(&self.cache_percent) {
            return Err(OptionError::CachePercent(self.cache_percent));
        }
        self.policy.validate()
    }
}

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Setup,
    Precopy,
    Switchover,
    Committed,
    Completed,
    Failed,
    Cancelled,
}

impl Phase {
    pub fn finished(self) -> bool {
        matches!(self, Phase::Completed | Phase::Failed | Phase::Cancelled)
    }
}

/// Pages and bytes per encoding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncodingCount {
    pub pages: u64,
    /// Payload bytes (record headers not included).
    pub bytes: u64,
}

/// Totals per encoding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncodingStats {
    pub zero: EncodingCount,
    pub raw: EncodingCount,
    pub lz4: EncodingCount,
    pub delta: EncodingCount,
    #[serde(default)]
    pub zstd: EncodingCount,
}

impl EncodingStats {
    pub fn add(&mut self, e: Encoding, bytes: usize) {
        let c = match e {
            Encoding::Zero => &mut self.zero,
            Encoding::Raw => &mut self.raw,
            Encoding::Lz4 => &mut self.lz4,
            Encoding::Delta => &mut self.delta,
            Encoding::Zstd => &mut self.zstd,
        };
        c.pages += 1;
        c.bytes += bytes as u64;
    }
    pub fn merge(&mut self, o: &EncodingStats) {
        for (a, b) in [
            (&mut self.zero, o.zero),
            (&mut self.raw, o.raw),
            (&mut self.lz4, o.lz4),
            (&mut self.delta, o.delta),
            (&mut self.zstd, o.zstd),
        ] {
            a.pages += b.pages;
            a.bytes += b.bytes;
        }
    }
    pub fn pages(&self) -> u64 {
        self.zero.pages + self.raw.pages + self.lz4.pages + self.delta.pages + self.zstd.pages
    }
}

/// The switchover's parts, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Downtime {
    /// Source pause to destination running (measured on the source; includes one network hop).
    pub total_ms: f64,
    /// Sending the last dirty pages.
    pub final_pages_ms: f64,
    /// Capturing and sending vCPU and device state.
    pub state_ms: f64,
    /// Destination: waiting for the streams, applying state (and the digest with --verify),
    /// until it reports prepared.
    pub prepare_ms: f64,
    /// Commit to the destination's vCPUs running.
    pub resume_ms: f64,
    /// Memory digests on both sides (only with --verify; included in the parts above).
    pub verify_ms: f64,
}

/// The result of a finished migration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub total_s: f64,
    /// The page frames and the state travelled encrypted.
    #[serde(default)]
    pub encrypted: bool,
    /// With what ([`CIPHER`]), when encrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cipher: Option<String>,
    pub downtime: Downtime,
    /// Largest gap between two guest heartbeats around the switchover (workload guests).
    pub guest_pause_ms: Option<f64>,
    pub rounds: Vec<RoundStats>,
    /// Pages handled (all rounds, zero pages included) times 4 KiB.
    pub guest_bytes: u64,
    /// Everything sent on the data streams (frames, headers, payloads).
    pub wire_bytes: u64,
    /// Pages of round 0 skipped because they were never touched or are zero.
    pub skipped_pages: u64,
    pub encodings: EncodingStats,
    pub streams: u32,
    pub max_throttle: u8,
    pub verified: bool,
    /// Digest of guest memory at the pause (with --verify).
    pub digest: Option<String>,
    /// The send mode asked for.
    pub send_mode: crate::transport::uring::SendMode,
    /// Bytes by send path (zero-copy, copied by the kernel, plain io_uring, write(2)).
    pub transport: crate::transport::uring::SendStats,
    /// Migration NIC utilization while memory was copied (eBPF counters; None without them).
    pub link: Option<crate::netpin::LinkUtilization>,
    /// MAC announcements made by the destination after the guest resumed there.
    pub announcements: Vec<crate::announce::Announcement>,
    /// virtio devices at the switchover (source side; forwarding counts on both sides).
    #[serde(default)]
    pub devices: DeviceSummary,
    /// Per data stream: the page codec in force and why (the rates it measured).
    #[serde(default)]
    pub tuning: Vec<tune::StreamTuning>,
}

/// What the switchover did with the guest's virtio devices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSummary {
    /// Bytes of virtio device state in the VM state (queues, negotiated features, queued frames).
    pub state_bytes: u64,
    /// Block requests in flight at the pause, completed to the image before the capture.
    pub io_drained: u64,
    /// Frames queued for the guest at the pause, carried to the destination.
    pub rx_frames_carried: u64,
    /// Frames for the guest that reached the source's taps after the capture and were
    /// forwarded to the destination (source: sent; destination: delivered). See `forward.rs`.
    #[serde(default)]
    pub rx_frames_forwarded: u64,
    /// Frames for the guest after the capture that could not be forwarded (over the bound, or
    /// the link failed).
    #[serde(default)]
    pub rx_frames_forward_dropped: u64,
    /// How long the source forwarded after `Resumed`, in ms.
    #[serde(default)]
    pub forward_window_ms: u64,
}

/// Where the guest runs once a migration has ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestOn {
    Source,
    Destination,
    /// Contact was lost after the commit and could not be resolved yet: the source copy stays
    /// paused (see docs/fault-tolerance.md).
    Unresolved,
}

/// What `ferry migrations` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationRecord {
    pub id: String,
    pub vm: String,
    /// "out" on the source, "in" on the destination.
    pub direction: String,
    /// The other agent (name or address).
    pub peer: String,
    pub phase: Phase,
    pub started_unix: u64,
    pub elapsed_s: f64,
    pub round: u32,
    /// Pages of the current round not sent yet.
    pub pages_left: u64,
    /// Guest memory moved per second over the last round, MiB/s.
    pub rate_mib_s: f64,
    /// Estimated seconds to the end of the current round.
    pub eta_s: Option<f64>,
    pub throttle: u8,
    /// Migration NIC utilization now, in percent of its speed (eBPF; None when unknown).
    pub link_percent: Option<f64>,
    pub summary: Option<Summary>,
    /// Why it failed or was cancelled.
    pub error: Option<String>,
    /// Where the guest runs now that the migration has ended.
    #[serde(default)]
    pub guest_on: Option<GuestOn>,
    /// How an ending after the commit point was resolved.
    #[serde(default)]
    pub note: Option<String>,
}

/// Told once when a migration ends: its final record and, unless it completed, the error that
/// ended it.
pub type EndObserver = fn(&MigrationRecord, Option<&MigrateError>);

static END_OBSERVER: OnceLock<EndObserver> = OnceLock::new();

/// Have `f` told of every migration of this process that ends, in either direction (the control
/// plane counts them for its metrics). The first observer stays; returns whether `f` is it.
pub fn observe_endings(f: EndObserver) -> bool {
    END_OBSERVER.set(f).is_ok()
}

fn ended(record: &MigrationRecord, failure: Option<&MigrateError>) {
    if let Some(f) = END_OBSERVER.get() {
        f(record, failure);
    }
}

/// A running or finished migration, shared between its engine thread and the API.
pub struct MigrationHandle {
    pub id: String,
    started: Instant,
    record: Mutex<MigrationRecord>,
    cancel: AtomicBool,
}

impl MigrationHandle {
    pub fn new(id: String, vm: &str, direction: &str, peer: &str) -> MigrationHandle {
        MigrationHandle {
            record: Mutex::new(MigrationRecord {
                id: id.clone(),
                vm: vm.into(),
                direction: direction.into(),
                peer: peer.into(),
                phase: Phase::Setup,
                started_unix: SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                elapsed_s: 0.0,
                round: 0,
                pages_left: 0,
                rate_mib_s: 0.0,
                eta_s: None,
                throttle: 0,
                link_percent: None,
                summary: None,
                error: None,
                guest_on: None,
                note: None,
            }),
            id,
            started: Instant::now(),
            cancel: AtomicBool::new(false),
        }
    }

    pub fn record(&self) -> MigrationRecord {
        let mut r = match self.record.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        };
        if !r.phase.finished() {
            r.elapsed_s = self.started.elapsed().as_secs_f64();
        }
        r
    }

    pub fn update(&self, f: impl FnOnce(&mut MigrationRecord)) {
        let mut g = match self.record.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        f(&mut g);
    }

    pub fn set_phase(&self, phase: Phase) {
        let elapsed = self.started.elapsed().as_secs_f64();
        self.update(|r| {
            r.phase = phase;
            r.elapsed_s = elapsed;
        });
    }

    /// Mark finished with an error (phase Failed or Cancelled).
    pub fn fail(&self, e: &MigrateError) {
        let phase = if matches!(e, MigrateError::Cancelled) {
            Phase::Cancelled
        } else {
            Phase::Failed
        };
        let msg = crate::util::error_chain(e);
        let elapsed = self.started.elapsed().as_secs_f64();
        self.update(|r| {
            r.phase = phase;
            r.error = Some(msg);
            r.guest_on.get_or_insert(GuestOn::Source);
            r.elapsed_s = elapsed;
            r.pages_left = 0;
            r.eta_s = None;
        });
        ended(&self.record(), Some(e));
    }

    pub fn complete(&self, s: Summary) {
        let elapsed = self.started.elapsed().as_secs_f64();
        self.update(|r| {
            r.phase = Phase::Completed;
            r.guest_on = Some(GuestOn::Destination);
            r.elapsed_s = elapsed;
            r.pages_left = 0;
            r.eta_s = None;
            r.summary = Some(s);
        });
        ended(&self.record(), None);
    }

    /// Say how an ending after the commit point was resolved.
    pub fn resolved(&self, on: GuestOn, note: String) {
        self.update(|r| {
            r.guest_on = Some(on);
            r.note = Some(note);
        });
    }

    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    pub fn age(&self) -> std::time::Duration {
        self.started.elapsed()
    }
}

/// A fresh migration id: "m-" and 8 hex digits from the kernel's random source.
pub fn new_id() -> Result<String, MigrateError> {
    Ok(format!("m-{:08x}", crate::util::random_u64()? as u32))
}

/// The data stream a page travels on.
pub fn stream_of(gpa: u64, streams: u32) -> u32 {
    ((gpa >> 21) % u64::from(streams.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (id, phase, the failure's text) of every ending the observer was told of.
    static SEEN: Mutex<Vec<(String, Phase, Option<String>)>> = Mutex::new(Vec::new());

    fn record_ending(r: &MigrationRecord, e: Option<&MigrateError>) {
        if let Ok(mut g) = SEEN.lock() {
            g.push((r.id.clone(), r.phase, e.map(|e| e.to_string())));
        }
    }

    #[test]
    fn the_observer_is_told_of_each_ending_once() {
        // Another test may have set an observer first; this one must be it to see anything.
        assert!(observe_endings(record_ending), "an observer was set before");
        let done = MigrationHandle::new("m-obs-done".into(), "v", "out", "b");
        done.complete(Summary::default());
        let cancelled = MigrationHandle::new("m-obs-cancel".into(), "v", "in", "a");
        cancelled.fail(&MigrateError::Cancelled);
        let seen: Vec<_> = SEEN
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.0.starts_with("m-obs-"))
            .cloned()
            .collect();
        assert_eq!(
            seen,
            vec![
                ("m-obs-done".into(), Phase::Completed, None),
                (
                    "m-obs-cancel".into(),
                    Phase::Cancelled,
                    Some("cancelled by the user".into())
                ),
            ]
        );
    }
}
