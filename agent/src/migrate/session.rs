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
//! the server hands out only after authentication. Keys are never logged.

use std::io::BufReader;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::protocol::{self, Abort, Command, FrameReader, FrameWriter, Hello, HelloAck};
use super::MigrateError;
use crate::transport::tcp as transport;

/// The shared secret of a cluster of agents.
#[derive(Clone)]
pub struct ClusterKey(Vec<u8>);

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(<secret>)")
    }
}

/// Errors loading a key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the cluster key {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the cluster key in {0} is too short: use at least 32 bytes (e.g. `head -c 32 /dev/urandom | xxd -p -c 64 > FILE`)")]
    Short(String),
    #[error("the cluster key file {0} is readable by other users: chmod 600 it")]
    Permissions(String),
}

impl ClusterKey {
    /// Read a key file: its trimmed contents are the key (hex is fine: it is used as bytes).
    pub fn load(path: &Path) -> Result<ClusterKey, KeyError> {
        let p = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|source| KeyError::Read {
            path: p.clone(),
            source,
        })?;
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(KeyError::Permissions(p));
        }
        let bytes = std::fs::read(path).map_err(|source| KeyError::Read {
            path: p.clone(),
            source,
        })?;
        let key: Vec<u8> = bytes.trim_ascii().to_vec();
        if key.len() < 32 {
            return Err(KeyError::Short(p));
        }
        Ok(ClusterKey(key))
    }

    pub fn from_bytes(b: &[u8]) -> ClusterKey {
        ClusterKey(b.to_vec())
    }

    fn mac(&self, role: &str, a: &str, b: &str, name: &str) -> Hmac<Sha256> {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| <Hmac<Sha256> as Mac>::new_from_slice(b"\0").expect("hmac key"));
        for part in [role, a, b, name] {
            m.update(&(part.len() as u32).to_le_bytes());
            m.update(part.as_bytes());
        }
        m
    }

    /// A 32-byte key for `purpose`, bound to `a` and `b` (e.g. the data-stream key).
    pub fn derive(&self, purpose: &str, a: &str, b: &str) -> [u8; 32] {
        self.mac(purpose, a, b, "").finalize().into_bytes().into()
    }

    /// Proof for `role` over the two nonces and the sender's name (hex).
    pub fn proof(&self, role: &str, a: &str, b: &str, name: &str) -> String {
        hex(&self.mac(role, a, b, name).finalize().into_bytes())
    }

    /// Check a proof in constant time.
    pub fn verify(&self, role: &str, a: &str, b: &str, name: &str, proof: &str) -> bool {
        let Some(bytes) = unhex(proof) else {
            return false;
        };
        self.mac(role, a, b, name).verify_slice(&bytes).is_ok()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A fresh 32-byte nonce, hex (an error if the kernel's random source fails: no fallback).
pub fn nonce() -> Result<String, MigrateError> {
    let mut s = String::with_capacity(64);
    for _ in 0..4 {
        s.push_str(&format!("{:016x}", super::random_u64()?));
    }
    Ok(s)
}

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
        Err(protocol::ProtocolError::Aborted(why)) => return Err(MigrateError::Refused(why)),
        a => a?,
    };
    if !(protocol::MIN_VERSION..=protocol::VERSION).contains(&ack.version) {
        return Err(MigrateError::Refused(format!(
            "{peer} chose protocol version {}, outside what this agent speaks ({}..={})",
            ack.version,
            protocol::MIN_VERSION,
            protocol::VERSION
        )));
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
        return Err(MigrateError::Refused(format!(
            "no common protocol version: the peer speaks {}..={}, this agent {}..={}",
            hello.min_version,
            hello.max_version,
            protocol::MIN_VERSION,
            protocol::VERSION
        )));
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
        Err(MigrateError::Refused(reason)) => {
            w.set_version(protocol::MIN_VERSION);
            let _ = w.send_msg(
                Command::Abort,
                &Abort {
                    reason: reason.clone(),
                },
            );
            return Err(MigrateError::Refused(reason));
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
                &Abort {
                    reason: "authentication failed".into(),
                },
            );
            return Err(e);
        }
    }
    Ok((hello, server.version))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_key_role_nonces_and_name() {
        let k = ClusterKey::from_bytes(&[7u8; 32]);
        let other = ClusterKey::from_bytes(&[8u8; 32]);
        let (a, b) = (nonce().unwrap(), nonce().unwrap());
        assert_ne!(a, b);
        let p = k.proof("ferry-client", &a, &b, "x");
        assert!(k.verify("ferry-client", &a, &b, "x", &p));
        assert!(!other.verify("ferry-client", &a, &b, "x", &p));
        assert!(!k.verify("ferry-server", &a, &b, "x", &p));
        assert!(!k.verify("ferry-client", &b, &a, "x", &p));
        assert!(
            !k.verify("ferry-client", &a, &nonce().unwrap(), "x", &p),
            "a new nonce defeats replay"
        );
        assert!(!k.verify("ferry-client", &a, &b, "y", &p));
        assert!(!k.verify("ferry-client", &a, &b, "x", "zz"));
        assert!(!format!("{k:?}").contains('7'));
    }
}
