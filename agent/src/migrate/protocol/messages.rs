//! The control messages: JSON payloads of the control frames, and `Abort` with its typed code.

use serde::{Deserialize, Serialize};

use super::ProtocolError;
use crate::vm::memory::RegionLayout;
use crate::vm::VmSpec;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Hello {
    pub min_version: u16,
    pub max_version: u16,
    /// The sending agent's name.
    pub agent: String,
    /// 32 random bytes (hex) for the authentication (see `session.rs`).
    pub nonce: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HelloAck {
    pub version: u16,
    pub agent: String,
    /// The server's nonce (hex).
    pub nonce: String,
    /// The server's proof that it holds the cluster key; None when it has none.
    pub proof: Option<String>,
}

/// Pick the version both sides speak, if any.
pub fn negotiate(a: (u16, u16), b: (u16, u16)) -> Option<u16> {
    let lo = a.0.max(b.0);
    let hi = a.1.min(b.1);
    (lo <= hi).then_some(hi)
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Setup {
    pub migration_id: String,
    pub spec: VmSpec,
    pub regions: Vec<RegionLayout>,
    pub streams: u32,
    /// Page frames on the data streams are sealed (AES-256-GCM, see `transport::seal`).
    #[serde(default)]
    pub encrypt: bool,
    /// The address the source's data streams come from (its migration address): the
    /// destination's data port ignores connections from anywhere else. None from older sources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_addr: Option<std::net::IpAddr>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ready {
    /// Where the data streams connect (the destination's migration address).
    pub data_addr: String,
    /// Proves a data connection belongs to this migration.
    pub token: String,
    /// The destination takes frames forwarded after the switchover on data stream 0
    /// (`NetFrames`, `ForwardEnd`). False from older destinations: nothing is forwarded.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub net_forward: bool,
}

/// The end of forwarding after a switchover.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ForwardEnd {
    /// Frames sent in `NetFrames`.
    pub frames: u64,
    /// Frames for the guest the source could not forward (over the window's frame bound).
    pub dropped: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StreamHello {
    pub migration_id: String,
    pub index: u32,
    pub token: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RoundEnd {
    pub round: u32,
    /// Page records sent on this stream in this round.
    pub pages: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Complete {
    /// Page records sent on each stream over the whole migration.
    pub pages_per_stream: Vec<u64>,
    /// CRC-32C of all guest memory at the source's pause (with --verify).
    pub digest: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Prepared {
    /// Destination time from `Complete` to `Prepared`, in microseconds.
    pub apply_us: u64,
    /// Of which computing the memory digest (with --verify).
    pub verify_us: u64,
    pub verified: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Commit {
    /// The generation of the guest's ownership record that names the source now (None: no
    /// ownership records in this cluster). The destination claims the next one.
    #[serde(default)]
    pub generation: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Resumed {
    /// Destination time from Commit to running vCPUs, in microseconds.
    pub resume_us: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Observed {
    /// The largest gap between two heartbeats of the guest around the switchover, in
    /// microseconds (None when the guest has no heartbeat).
    pub guest_pause_us: Option<u64>,
    /// The MAC announcements the destination made.
    #[serde(default)]
    pub announcements: Vec<crate::announce::Announcement>,
}

/// Why a migration stops, as a number on the wire (the `code` of [`Abort`]).
///
/// The numbers are the protocol: never renumber one, only add. A code this build does not
/// know (from a newer peer) reads as [`AbortCode::Unspecified`]; the reason text still says
/// what happened. See docs/migration.md, "Abort codes".
#[repr(u16)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(from = "u16", into = "u16")]
pub enum AbortCode {
    /// No code: an agent from before the codes (its `Abort` has only a reason), or a code
    /// this build does not know.
    #[default]
    Unspecified = 0,
    /// The user cancelled the migration.
    Cancelled = 1,
    /// The destination will not take this guest: a taken name, no room, migration disabled
    /// or unconfigured there, encryption required, the ownership record names someone else,
    /// an injected fault.
    Refused = 2,
    /// The peers share no protocol version.
    Version = 3,
    /// Authentication with the cluster key failed.
    Auth = 4,
    /// `--verify`: the destination's memory digest differs from the source's (the digest
    /// travels in [`Abort::digest`]).
    DigestMismatch = 5,
    /// A peer or a data stream went silent past its deadline.
    Timeout = 6,
    /// A frame was damaged, out of order, of the wrong kind or malformed.
    Protocol = 7,
    /// A data connection failed (reset, closed, an I/O error).
    Transport = 8,
    /// Anything else that failed on the sender's side (guest memory, state, a local error).
    Internal = 9,
    /// A source-side policy stopped it (did not converge, over its deadline).
    Policy = 10,
}

impl From<u16> for AbortCode {
    fn from(v: u16) -> Self {
        use AbortCode::*;
        match v {
            1 => Cancelled,
            2 => Refused,
            3 => Version,
            4 => Auth,
            5 => DigestMismatch,
            6 => Timeout,
            7 => Protocol,
            8 => Transport,
            9 => Internal,
            10 => Policy,
            _ => Unspecified,
        }
    }
}

impl From<AbortCode> for u16 {
    fn from(c: AbortCode) -> u16 {
        c as u16
    }
}

/// Either side stops the migration (before the commit). JSON: `{"code": 5, "reason": "...",
/// "digest": "..."}`; agents from before the codes send only `reason`, and ignore `code` and
/// `digest` (no version change: see docs/migration.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Abort {
    /// What kind of failure (for programs: metrics, retries, tests).
    #[serde(default)]
    pub code: AbortCode,
    /// What happened, for people.
    pub reason: String,
    /// With [`AbortCode::DigestMismatch`]: the destination's memory digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// What destinations before the codes put before their digest in a mismatch's reason (and
/// what this build still writes there, so that those sources recognise it).
pub const LEGACY_DIGEST_MISMATCH: &str = "digest mismatch: ";

impl Abort {
    pub fn new(code: AbortCode, reason: impl Into<String>) -> Abort {
        Abort {
            code,
            reason: reason.into(),
            digest: None,
        }
    }

    /// Decode a received `Abort` payload; never fails (an unreadable one is `Unspecified`).
    /// The reason and digest are escaped and bounded (they come from the peer).
    pub fn decode(payload: &[u8]) -> Abort {
        let mut a: Abort = serde_json::from_slice(payload)
            .unwrap_or_else(|_| Abort::new(AbortCode::Unspecified, "(unreadable reason)"));
        // A destination from before the codes says a digest mismatch only in words.
        if a.code == AbortCode::Unspecified {
            if let Some(d) = a.reason.strip_prefix(LEGACY_DIGEST_MISMATCH) {
                a.digest = Some(d.to_string());
                a.code = AbortCode::DigestMismatch;
            }
        }
        a.reason = crate::migrate::untrusted::peer_text(
            &a.reason,
            crate::migrate::untrusted::PEER_REASON_MAX,
        );
        a.digest = a
            .digest
            .map(|d| crate::migrate::untrusted::peer_text(&d, 128));
        a
    }

    /// The error a received `Abort` is.
    pub fn into_error(self) -> ProtocolError {
        ProtocolError::Aborted {
            code: self.code,
            reason: self.reason,
            digest: self.digest,
        }
    }
}
