//! The destination side: accepts a migration on the control connection, builds an empty guest
//! of the same shape, applies pages per data stream, then state; resumes only on `Commit`.
//!
//! - this file: the [`Host`] the destination needs from its agent, and the control session
//!   ([`serve`], [`serve_session`]): a `Query`, a throughput probe or a migration.
//! - `receiver.rs`: one incoming migration as a state machine (`SetUp → Receiving → Final →
//!   Prepared → Running`; an error in any state is `Aborted`, which destroys the incoming
//!   guest and tells the source why).
//! - `streams.rs`: the per-stream receiver threads; `accept.rs`: accepting the data
//!   connections.

mod accept;
mod receiver;
mod streams;

use std::io::BufReader;
use std::net::{IpAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use super::guest::IncomingGuest;
use super::ownership::Staged;
use super::protocol::{self, Command, FrameReader, FrameWriter, Setup};
use super::{MigrateError, MigrationHandle};
use crate::vm::memory::RegionLayout;
use crate::vm::VmSpec;

pub(super) use accept::accept_streams;

/// How long the source may stay silent during the handshake and the switchover.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for the data connections after `Ready`.
const STREAMS_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the destination's agent will not (or cannot) do what the receiver asks of it. Each
/// says why in words for the source's user; [`HostError::abort_code`] is what the wire says.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// Migration is not enabled, or not configured, on this host.
    #[error("{0}")]
    Disabled(String),
    /// A guest of that name is here already (or its disks are held by another).
    #[error("{0}")]
    NameTaken(String),
    /// Not enough room here (memory, a reservation, an allocation).
    #[error("{0}")]
    NoRoom(String),
    /// The guest's ownership record does not allow this host to take it.
    #[error("{0}")]
    Ownership(String),
    /// Anything else the host failed to do (a device, the VM itself, an I/O error).
    #[error("{0}")]
    Failed(String),
}

impl HostError {
    /// The code of the `Abort` this error becomes: every host error is a refusal (the source
    /// resumes its guest and may try elsewhere), except a failure of the host's own.
    pub fn abort_code(&self) -> protocol::AbortCode {
        match self {
            HostError::Failed(_) => protocol::AbortCode::Internal,
            _ => protocol::AbortCode::Refused,
        }
    }

    /// This error as the destination's refusal, with `context` before its words.
    pub fn refusal(self, context: &str) -> MigrateError {
        MigrateError::Refused {
            code: self.abort_code(),
            reason: format!("{context}{self}"),
        }
    }
}

/// What the destination needs from its agent.
pub trait Host: Send + Sync {
    /// This agent's name.
    fn name(&self) -> String;
    /// This agent's name and cluster key, for sessions.
    fn identity(&self) -> super::session::Identity;
    /// Whether this host accepts only encrypted incoming migrations.
    fn requires_encryption(&self) -> bool {
        false
    }
    /// This host's migration address, if migration is enabled here.
    fn migration_addr(&self) -> Result<IpAddr, HostError>;
    /// Create and register an empty VM for an incoming migration (refusing a taken name or a
    /// lack of room with a message for the source).
    fn create_incoming(
        &self,
        spec: &VmSpec,
        regions: &[RegionLayout],
        handle: &Arc<MigrationHandle>,
    ) -> Result<Arc<dyn IncomingGuest>, HostError>;
    /// The incoming VM is running here now (`ok`), or the migration failed and it must go
    /// (the host forgets it and stops it; [`IncomingGuest::destroy`] follows).
    fn incoming_done(&self, name: &str, ok: bool);
    /// Remember a migration for `ferry migrations`.
    fn register(&self, handle: Arc<MigrationHandle>);
    /// This host's facts for a peer's checks (with the sizes of the given disks).
    fn facts(&self, disks: &[String]) -> crate::checks::HostFacts;
    /// Announce a guest's MACs on their port groups (it now runs here).
    fn announce(&self, spec: &VmSpec) -> Vec<crate::announce::Announcement>;
    /// Ahead of the commit (when the migration starts): write the ownership record
    /// [`Host::claim`] will make current, so that the claim itself is one `link(2)` inside the
    /// guest's pause. None when there is nothing to prepare or it failed (the claim then does
    /// it all).
    fn prepare_claim(&self, vm: &str, from: &str, migration: &str) -> Option<Staged>;
    /// The commit point: make this host the owner of `vm`, taking it from `from` at
    /// `generation` (None: the source keeps no records), with the record `prepared` ahead if it
    /// fits. An error means this host must not run the guest. Returns the spent staging (its
    /// temporary file goes when it drops): drop it once the guest runs.
    fn claim(
        &self,
        vm: &str,
        from: &str,
        generation: Option<u64>,
        migration: &str,
        prepared: Option<Staged>,
    ) -> Result<Option<Staged>, HostError>;
    /// After the guest runs here and the source knows: tidy the ownership records (old
    /// generations).
    fn claimed(&self, vm: &str);
    /// The guest could not start after [`Host::claim`]: hand ownership back to `to`.
    fn give_back(&self, vm: &str, to: &str, migration: &str);
}

/// Serve one incoming control connection to its end, handshake included, over blocking I/O.
/// (The agent authenticates peers on its async runtime instead, then calls [`serve_session`].)
pub fn serve(conn: TcpStream, host: Arc<dyn Host>) {
    let peer = conn
        .peer_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    let _ = conn.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let opened = (|| -> Result<_, MigrateError> {
        let mut cw = FrameWriter::new(conn.try_clone().map_err(protocol::ProtocolError::from)?);
        let mut cr = FrameReader::new(BufReader::new(
            conn.try_clone().map_err(protocol::ProtocolError::from)?,
        ));
        let (hello, _version) = super::session::accept(&mut cw, &mut cr, &host.identity())?;
        Ok((cw, cr, hello))
    })();
    match opened {
        Ok((cw, cr, hello)) => serve_session(conn, cw, cr, &hello.agent, host),
        Err(e) => {
            // Unauthenticated: nothing it said above debug level.
            tracing::debug!(peer = %peer, error = %crate::migrate::untrusted::peer_text(&crate::util::error_chain(&e), 512), "peer handshake failed");
        }
    }
}

/// Serve an authenticated control session to its end: `cw`/`cr` continue the handshake's
/// frame numbering; `agent` is the name the peer proved.
pub fn serve_session(
    conn: TcpStream,
    mut cw: FrameWriter<TcpStream>,
    mut cr: FrameReader<BufReader<TcpStream>>,
    agent: &str,
    host: Arc<dyn Host>,
) {
    let peer = conn
        .peer_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    if let Err(e) = handle(conn, &mut cw, &mut cr, host.as_ref(), &peer, agent) {
        let agent = super::untrusted::peer_str(agent);
        tracing::warn!(peer = %peer, agent = %agent, error = %crate::util::error_chain(&e), "incoming migration failed");
    }
}

fn handle(
    conn: TcpStream,
    cw: &mut FrameWriter<TcpStream>,
    cr: &mut FrameReader<BufReader<TcpStream>>,
    host: &dyn Host,
    peer: &str,
    agent: &str,
) -> Result<(), MigrateError> {
    let _ = conn.set_nodelay(true);
    let _ = crate::transport::tcp::keepalive(&conn);
    let _ = conn.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    cr.set_timeout(Some(HANDSHAKE_TIMEOUT), "the peer's request");
    let first = cr.read_frame()?;
    if first.command == Command::Query {
        let q: super::query::Query = first.msg(Command::Query)?;
        cw.send_msg(Command::Facts, &host.facts(&q.disks))?;
        return Ok(());
    }
    if first.command == Command::Blast {
        let req: super::blast::BlastRequest = first.msg(Command::Blast)?;
        return super::blast::serve(cw, req, host.migration_addr());
    }
    let setup: Setup = first.msg(Command::Setup)?;
    let handle = Arc::new(MigrationHandle::new(
        super::untrusted::peer_str(&setup.migration_id),
        &super::untrusted::peer_str(&setup.spec.name),
        "in",
        &format!("{} ({peer})", super::untrusted::peer_str(agent)),
    ));
    host.register(handle.clone());
    let result = receiver::receive(&conn, cw, cr, host, &setup, &handle, agent);
    match &result {
        Ok(summary) => handle.complete(summary.clone()),
        Err(e) => {
            // A refusal goes back in its own words; anything else with its cause chain. An
            // `Abort` from the source is not answered: echoed, the source would take its own
            // reason for the destination's.
            if !matches!(
                e,
                MigrateError::Protocol(protocol::ProtocolError::Aborted { .. })
            ) {
                let _ = cw.send_msg(Command::Abort, &e.to_abort());
            }
            handle.fail(e);
        }
    }
    result.map(|_| ())
}

fn refuse(reason: String) -> MigrateError {
    MigrateError::refused(reason)
}
