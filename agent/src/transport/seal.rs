//! Optional encryption of the page frames on data streams (`[migration] encrypt = true` or
//! `ferry migrate --encrypt`): AES-256-GCM, the payload encrypted in place and its 16-byte tag
//! appended, so the frame checksum covers ciphertext and the tag authenticates the pages.
//!
//! The key is per migration: HMAC-SHA256 of the cluster key over the migration id and the
//! destination's random data-stream token, so both agents derive it and nobody without the
//! cluster key can. The nonce is (stream index, frame sequence number, direction): unique for
//! every frame of a migration, and a frame replayed or moved to another stream or position
//! fails to open.
//!
//! The cipher is `ring`'s AES-256-GCM (BoringSSL's assembly: AES-NI, VAES and VPCLMULQDQ where
//! the CPU has them, several GB/s per core here), not the portable `aes-gcm` crate used before
//! (about 1 GB/s per core). The format is unchanged — same key, nonce and tag placement — so
//! frames sealed by the old implementation open with this one (tested) and the protocol version
//! stays the same. `ring` builds from a fresh clone with the C compiler Debian ships.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

use crate::auth::ClusterKey;

/// The lane (stream index in the nonce) of frames sealed on the control connection.
pub const CONTROL_LANE: u32 = u32::MAX;

/// Bytes a sealed payload grows by.
pub const TAG_LEN: usize = 16;

/// Errors of sealing and opening frames.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("an encrypted page frame did not authenticate (wrong key, or changed on the way): frame {seq} on stream {stream}")]
    Open { stream: u32, seq: u32 },
    #[error("an encrypted page frame of {0} bytes is shorter than its tag")]
    Short(usize),
    #[error("encryption failed: {0}")]
    Seal(String),
}

/// Seals (source) or opens (destination) the page frames of one data stream.
pub struct Sealer {
    key: [u8; 32],
    cipher: LessSafeKey,
    stream: u32,
}

impl Clone for Sealer {
    fn clone(&self) -> Self {
        Sealer::new(&self.key, self.stream)
    }
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Sealer")
            .field("stream", &self.stream)
            .finish()
    }
}

/// The data key of one migration (see the module docs).
pub fn data_key(cluster: &ClusterKey, migration_id: &str, token: &str) -> [u8; 32] {
    cluster.derive("ferry data-stream key v1", migration_id, token)
}

impl Sealer {
    pub fn new(key: &[u8; 32], stream: u32) -> Sealer {
        let unbound = UnboundKey::new(&AES_256_GCM, key)
            .unwrap_or_else(|_| unreachable!("AES-256-GCM takes a 32-byte key"));
        Sealer {
            key: *key,
            cipher: LessSafeKey::new(unbound),
            stream,
        }
    }

    fn nonce_bytes(&self, seq: u32) -> [u8; 12] {
        let mut n = [0u8; 12];
        n[..4].copy_from_slice(&self.stream.to_le_bytes());
        n[4..8].copy_from_slice(&seq.to_le_bytes());
        n[8..].copy_from_slice(b"s->d");
        n
    }

    fn nonce(&self, seq: u32) -> Nonce {
        Nonce::assume_unique_for_key(self.nonce_bytes(seq))
    }

    /// Encrypt `buf[..len]` in place and write the tag at `buf[len..len + TAG_LEN]`.
    pub fn seal(&self, seq: u32, buf: &mut [u8], len: usize) -> Result<usize, SealError> {
        if buf.len() < len + TAG_LEN {
            return Err(SealError::Seal(format!(
                "no room for the tag: {} of {} bytes",
                buf.len(),
                len + TAG_LEN
            )));
        }
        let tag = self
            .cipher
            .seal_in_place_separate_tag(self.nonce(seq), Aad::empty(), &mut buf[..len])
            .map_err(|e| SealError::Seal(e.to_string()))?;
        buf[len..len + TAG_LEN].copy_from_slice(tag.as_ref());
        Ok(len + TAG_LEN)
    }

    /// Check and decrypt a sealed payload in place; it loses its tag.
    pub fn open(&self, seq: u32, payload: &mut Vec<u8>) -> Result<(), SealError> {
        let Some(len) = payload.len().checked_sub(TAG_LEN) else {
            return Err(SealError::Short(payload.len()));
        };
        self.cipher
            .open_in_place(self.nonce(seq), Aad::empty(), &mut payload[..])
            .map_err(|_| SealError::Open {
                stream: self.stream,
                seq,
            })?;
        payload.truncate(len);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> [u8; 32] {
        data_key(&ClusterKey::from_bytes(&[b; 32]), "m-1", "token")
    }

    #[test]
    fn sealed_frames_open_only_where_they_belong() {
        let s = Sealer::new(&key(1), 0);
        let mut buf = vec![0u8; 64];
        buf[..40].copy_from_slice(&[7u8; 40]);
        let n = s.seal(5, &mut buf, 40).unwrap();
        assert_eq!(n, 40 + TAG_LEN);
        assert_ne!(&buf[..40], &[7u8; 40][..], "encrypted");
        let sealed = buf[..n].to_vec();

        let mut p = sealed.clone();
        s.open(5, &mut p).unwrap();
        assert_eq!(p, vec![7u8; 40]);

        // Another position, another stream, another key, one flipped bit: all refused.
        let mut p = sealed.clone();
        assert!(s.open(6, &mut p).is_err());
        let mut p = sealed.clone();
        assert!(Sealer::new(&key(1), 1).open(5, &mut p).is_err());
        let mut p = sealed.clone();
        assert!(Sealer::new(&key(2), 0).open(5, &mut p).is_err());
        let mut p = sealed.clone();
        p[3] ^= 1;
        assert!(s.open(5, &mut p).is_err());
        let mut p = vec![1u8; 3];
        assert!(matches!(s.open(5, &mut p), Err(SealError::Short(3))));
    }

    /// Frames sealed by the previous implementation (the portable `aes-gcm` crate) open with
    /// ring, and the other way round: the wire format did not change.
    #[test]
    fn frames_of_the_previous_implementation_still_open() {
        use aes_gcm::aead::AeadInPlace;
        use aes_gcm::{Aes256Gcm, KeyInit, Tag};
        let k = key(3);
        let old = Aes256Gcm::new((&k).into());
        let s = Sealer::new(&k, 2);
        let plain: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();

        let mut sealed = plain.clone();
        let tag = old
            .encrypt_in_place_detached(&s.nonce_bytes(9).into(), &[], &mut sealed)
            .unwrap();
        sealed.extend_from_slice(&tag);
        let mut p = sealed.clone();
        s.open(9, &mut p).unwrap();
        assert_eq!(p, plain);

        let mut buf = plain.clone();
        buf.resize(plain.len() + TAG_LEN, 0);
        let n = s.seal(10, &mut buf, plain.len()).unwrap();
        assert_eq!(&buf[..n], {
            let mut c = plain.clone();
            let t = old
                .encrypt_in_place_detached(&s.nonce_bytes(10).into(), &[], &mut c)
                .unwrap();
            c.extend_from_slice(&t);
            c
        });
        let (ct, t) = buf[..n].split_at_mut(plain.len());
        old.decrypt_in_place_detached(&s.nonce_bytes(10).into(), &[], ct, Tag::from_slice(t))
            .unwrap();
        assert_eq!(ct, &plain[..]);
    }

    #[test]
    fn keys_differ_per_migration() {
        let c = ClusterKey::from_bytes(&[9; 32]);
        assert_ne!(data_key(&c, "m-1", "t"), data_key(&c, "m-2", "t"));
        assert_ne!(data_key(&c, "m-1", "t"), data_key(&c, "m-1", "u"));
    }
}
