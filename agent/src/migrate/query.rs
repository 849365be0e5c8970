//! Asking a peer agent about itself (for `ferry check` and `ferry cpu baseline`): the protocol's
//! handshake, then `Query` instead of `Setup`; the peer answers `Facts`.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::protocol::Command;
use super::session::{self, Identity};
use super::MigrateError;
use crate::checks::HostFacts;

/// Body of `Query`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Query {
    /// Disk paths whose presence and size the peer should report.
    pub disks: Vec<String>,
}

/// Ask the agent at `peer` for its [`HostFacts`].
pub fn facts(peer: SocketAddr, me: &Identity, q: &Query) -> Result<HostFacts, MigrateError> {
    let mut s = session::connect(peer, me, Duration::from_secs(10))?;
    s.w.send_msg(Command::Query, q)?;
    Ok(s.r.read_frame()?.msg(Command::Facts)?)
}
