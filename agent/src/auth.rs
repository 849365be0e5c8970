//! The cluster key and what is made from it: loading the key file, the HMAC-SHA256 proofs the
//! session handshake exchanges (see `migrate::session` for the exchange), keys derived for a
//! purpose (the data-stream key of `transport::seal`) and the nonces proofs are bound to. It
//! sits at the bottom of the crate with `util`: `migrate` and `transport` both use it, it uses
//! neither. Keys are never logged (`Debug` prints `<secret>`).

use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::util::{random_u64, UtilError};

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
pub fn nonce() -> Result<String, UtilError> {
    let mut s = String::with_capacity(64);
    for _ in 0..4 {
        s.push_str(&format!("{:016x}", random_u64()?));
    }
    Ok(s)
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
