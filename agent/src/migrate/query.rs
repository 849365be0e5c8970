//! Asking a peer agent about itself (for `ferry check` and `ferry cpu baseline`): the protocol's
//! handshake, then `Query` instead of `Setup`; the peer answers `Facts`.

use std::io::BufReader;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::protocol::{self, Command, FrameReader, FrameWriter, Hello, HelloAck};
use super::MigrateError;
use crate::checks::HostFacts;
use crate::transport::tcp as transport;

/// Body of `Query`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Query {
    /// Disk paths whose presence and size the peer should report.
    pub disks: Vec<String>,
}

/// Ask the agent at `peer` for its [`HostFacts`].
pub fn facts(peer: SocketAddr, agent: &str, q: &Query) -> Result<HostFacts, MigrateError> {
    let ctl =
        transport::connect_from(None, peer, Duration::from_secs(5), false).map_err(|source| {
            MigrateError::Connect {
                what: "the peer agent at",
                addr: peer.to_string(),
                source,
            }
        })?;
    let _ = ctl.set_read_timeout(Some(Duration::from_secs(10)));
    let mut w = FrameWriter::new(ctl.try_clone().map_err(protocol::ProtocolError::from)?);
    let mut r = FrameReader::new(BufReader::new(ctl));
    w.send_msg(
        Command::Hello,
        &Hello {
            min_version: protocol::MIN_VERSION,
            max_version: protocol::VERSION,
            agent: agent.into(),
        },
    )?;
    let _: HelloAck = r.read_frame()?.msg(Command::HelloAck)?;
    w.send_msg(Command::Query, q)?;
    Ok(r.read_frame()?.msg(Command::Facts)?)
}
