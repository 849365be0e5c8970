//! Opening a control session between two agents: version negotiation and mutual authentication
//! with the cluster key, before anything else is accepted.
//!
//! ```text
//! client                                              server
//!   │── Hello {versions, agent, nonce_c} ────────────────▶│
//!   │◀── HelloAck {version, agent, nonce_s, proof_s} ─────│  proof_s = HMAC(key, "ferry-server" | nonce_c | nonce_s | server)
//!   │   (client checks proof_s: the server holds the key)   │
//!   │── Auth {proof_c} ──────────────────────────────────▶│  proof_c = HMAC(key, "ferry-client" | nonce_s | nonce_c | client)
//!   │   (server checks proof_c; only then reads the request) │
//!   │── Setup | Query | Blast … ─────────────────────────▶│
//! ```
//!
//! HMAC-SHA256 over fresh 32-byte nonces from both sides: a recorded session replayed later
//! fails, because the server's nonce is new. A server without a key says so (`proof_s` absent);
//! a client with a key refuses such a server, and a server with a key refuses a client that
//! cannot prove it. Data connections are then bound to the session by a random 128-bit token
//! the server hands out only after authentication. Keys are never logged. The key, its proofs
//! and the nonces are [`crate::auth`]'s; this module is the exchange.

use std::io::BufReader;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::protocol::{self, Abort, AbortCode, Command, FrameReader, FrameWriter, Hello, HelloAck};
use super::MigrateError;
use crate::auth::{nonce, ClusterKey};
use crate::transport::tcp as transport;

/// Body of `Auth`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Auth {
    pub proof: String,
}

/// Who this agent is, for opening sessions.
#[derive(Debug, Clone)]
pub struct Identity {
    pub agent: String,
    pub key: Option<Arc<ClusterKey>>,
}

/// An open, authenticated control session.
pub struct Session {
    pub w: FrameWriter<TcpStream>,
    pub r: FrameReader<BufReader<TcpStream>>,
    pub conn: TcpStream,
    pub peer_agent: String,
    pub version: u16,
}

/// Connect to the agent at `peer` and open a session.
pub fn connect(
    peer: SocketAddr,
    me: &Identity,
    timeout: Duration,
) -> Result<Session, MigrateError> {
    let conn =
        transport::connect_from(None, peer, Duration::from_secs(5), false).map_err(|source| {
            MigrateError::Connect {
                what: "the peer agent at",
                addr: peer.to_string(),
                source,
            }
        })?;
    let _ = conn.set_nodelay(true);
    let _ = conn.set_read_timeout(Some(timeout));
    let mut w = FrameWriter::new(conn.try_clone().map_err(protocol::ProtocolError::from)?);
    let mut r = FrameReader::new(BufReader::new(
        conn.try_clone().map_err(protocol::ProtocolError::from)?,
    ));
    r.set_timeout(Some(timeout), "the peer agent's answer");
    let nc = nonce()?;
    w.set_version(protocol::MIN_VERSION);
    w.send_msg(
        Command::Hello,
        &Hello {
            min_version: protocol::MIN_VERSION,
            max_version: protocol::VERSION,
            agent: me.agent.clone(),
            nonce: nc.clone(),
        },
    )?;
    let ack: HelloAck = match r.read_frame()?.msg(Command::HelloAck) {
        Err(e @ protocol::ProtocolError::Aborted { .. }) => {
            return Err(MigrateError::from_abort(e, None))
        }
        a => a?,
    };
    if !(protocol::MIN_VERSION..=protocol::VERSION).contains(&ack.version) {
        return Err(MigrateError::Refused {
            code: AbortCode::Version,
            reason: format!(
                "{peer} chose protocol version {}, outside what this agent speaks ({}..={})",
                ack.version,
                protocol::MIN_VERSION,
                protocol::VERSION
            ),
        });
    }
    w.set_version(ack.version);
    match (&me.key, &ack.proof) {
        (Some(k), Some(p)) => {
            if !k.verify("ferry-server", &nc, &ack.nonce, &ack.agent, p) {
                return Err(MigrateError::Auth(format!(
                    "{} ({peer}) did not prove it holds the cluster key: a different key or an impostor",
                    super::untrusted::peer_str(&ack.agent)
                )));
            }
            let proof = k.proof("ferry-client", &ack.nonce, &nc, &me.agent);
            w.send_msg(Command::Auth, &Auth { proof })?;
        }
        (Some(_), None) => {
            return Err(MigrateError::Auth(format!(
                "{} ({peer}) has no cluster key configured; refusing an unauthenticated peer",
                ack.agent
            )))
        }
        (None, Some(_)) => {
            return Err(MigrateError::Auth(format!(
                "{} ({peer}) requires the cluster key: set [cluster] key_file on this host",
                ack.agent
            )))
        }
        (None, None) => {}
    }
    Ok(Session {
        w,
        r,
        conn,
        peer_agent: super::untrusted::peer_str(&ack.agent),
        version: ack.version,
    })
}

/// The server's side of a Hello it accepted: the version chosen, the `HelloAck` to send, and
/// the server's nonce the client's proof must cover.
pub struct ServerHello {
    pub version: u16,
    pub ack: HelloAck,
    pub nonce: String,
}

/// Answer a client's Hello (no I/O: the async peer listener and [`accept`] both use it).
/// `Err(Refused(reason))`: no common version; send `Abort { reason }` stamped with
/// [`protocol::MIN_VERSION`] and close.
pub fn answer_hello(hello: &Hello, me: &Identity) -> Result<ServerHello, MigrateError> {
    let Some(version) = protocol::negotiate(
        (hello.min_version, hello.max_version),
        (protocol::MIN_VERSION, protocol::VERSION),
    ) else {
        return Err(MigrateError::Refused {
            code: AbortCode::Version,
            reason: format!(
                "no common protocol version: the peer speaks {}..={}, this agent {}..={}",
                hello.min_version,
                hello.max_version,
                protocol::MIN_VERSION,
                protocol::VERSION
            ),
        });
    };
    let ns = nonce()?;
    let proof = me
        .key
        .as_ref()
        .map(|k| k.proof("ferry-server", &hello.nonce, &ns, &me.agent));
    Ok(ServerHello {
        version,
        ack: HelloAck {
            version,
            agent: me.agent.clone(),
            nonce: ns.clone(),
            proof,
        },
        nonce: ns,
    })
}

/// Check the client's `Auth` against the Hello and the server's nonce. The error names the
/// client only through [`super::untrusted::peer_str`]: it has not proven anything yet.
pub fn check_auth(
    me: &Identity,
    server: &ServerHello,
    hello: &Hello,
    auth: &Auth,
) -> Result<(), MigrateError> {
    let Some(k) = &me.key else { return Ok(()) };
    if k.verify(
        "ferry-client",
        &server.nonce,
        &hello.nonce,
        &hello.agent,
        &auth.proof,
    ) {
        Ok(())
    } else {
        Err(MigrateError::Auth(format!(
            "{} failed to prove it holds the cluster key",
            super::untrusted::peer_str(&hello.agent)
        )))
    }
}

/// Accept a session on the server side over blocking I/O: negotiate, authenticate. Returns the
/// client's Hello. (The agent's listener does the same on its async runtime, see
/// `control::peer`.)
pub fn accept(
    w: &mut FrameWriter<TcpStream>,
    r: &mut FrameReader<BufReader<TcpStream>>,
    me: &Identity,
) -> Result<(Hello, u16), MigrateError> {
    // A peer stamps its Hello with the oldest version it speaks, which may be newer than ours:
    // read it anyway, to answer with both ranges.
    r.accept_any_hello_version(true);
    let hello = r.read_frame();
    r.accept_any_hello_version(false);
    let hello: Hello = hello?.msg(Command::Hello)?;
    let server = match answer_hello(&hello, me) {
        Ok(s) => s,
        Err(e @ MigrateError::Refused { .. }) => {
            w.set_version(protocol::MIN_VERSION);
            let _ = w.send_msg(Command::Abort, &e.to_abort());
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    w.set_version(server.version);
    w.send_msg(Command::HelloAck, &server.ack)?;
    if me.key.is_some() {
        let auth: Auth = r.read_frame()?.msg(Command::Auth)?;
        if let Err(e) = check_auth(me, &server, &hello, &auth) {
            let _ = w.send_msg(
                Command::Abort,
                &Abort::new(AbortCode::Auth, "authentication failed"),
            );
            return Err(e);
        }
    }
    Ok((hello, server.version))
}
