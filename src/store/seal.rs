//! Authenticated encryption of stored token state (ChaCha20-Poly1305, from ring,
//! which the TLS stack already uses).
//!
//! A record is sealed with the current store key; the previous keys
//! (`store.previous_key_files`) only open records, so a key can be rotated
//! without losing the stored chains: a record opened with a previous key is
//! sealed with the current one at its next write.

use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

use crate::config::StoreKey;

/// The authentication tag's length.
const TAG_LEN: usize = 16;

/// Why sealed data did not open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NotOpened {
    /// Not sealed data at all (not base64, or too short to hold a nonce and
    /// a tag): nothing any key could open.
    Malformed,
    /// Sealed data that none of the keys opens for this associated data:
    /// another key, another record's name or generation, or damaged.
    Sealed,
}

/// What opened, and with which key.
#[derive(Debug)]
pub(crate) struct Opened {
    pub(crate) plain: Vec<u8>,
    /// Opened with one of the previous keys, not the current one.
    pub(crate) with_previous_key: bool,
}

/// Seals records under the current key and opens them under any configured key.
pub(crate) struct Sealer {
    /// The current key first, then the previous ones.
    keys: Vec<LessSafeKey>,
    rng: SystemRandom,
}

fn cipher_key(key: &StoreKey) -> LessSafeKey {
    // A 32-byte key is exactly what ChaCha20-Poly1305 takes, so this cannot fail.
    let unbound = UnboundKey::new(&CHACHA20_POLY1305, key.expose())
        .expect("ChaCha20-Poly1305 takes a 32-byte key");
    LessSafeKey::new(unbound)
}

impl Sealer {
    pub(crate) fn new(key: &StoreKey, previous: &[StoreKey]) -> Sealer {
        Sealer {
            keys: std::iter::once(key)
                .chain(previous)
                .map(cipher_key)
                .collect(),
            rng: SystemRandom::new(),
        }
    }

    /// base64(nonce ‖ ciphertext ‖ tag) under the current key, with `aad` authenticated.
    pub(crate) fn seal(&self, aad: &[u8], plain: &[u8]) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        // The system RNG does not fail on the platforms tokenproxy runs on; if it
        // ever did, a zero nonce would be reused, so stop rather than go on.
        self.rng
            .fill(&mut nonce)
            .expect("the system random number generator failed");
        let mut out = Vec::with_capacity(NONCE_LEN + plain.len() + TAG_LEN);
        out.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        // Sealing fails only for inputs over 256 GiB.
        self.keys[0]
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut body,
            )
            .expect("token state is far below the cipher's size limit");
        out.extend_from_slice(&body);
        base64::engine::general_purpose::STANDARD.encode(out)
    }

    /// The plaintext of `data` sealed for `aad` by one of the keys.
    pub(crate) fn open(&self, aad: &[u8], data: &str) -> Result<Opened, NotOpened> {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(data)
            .map_err(|_| NotOpened::Malformed)?;
        if raw.len() < NONCE_LEN + TAG_LEN {
            return Err(NotOpened::Malformed);
        }
        let (nonce, sealed) = raw.split_at(NONCE_LEN);
        for (i, key) in self.keys.iter().enumerate() {
            let nonce =
                Nonce::try_assume_unique_for_key(nonce).map_err(|_| NotOpened::Malformed)?;
            let mut body = sealed.to_vec();
            if let Ok(plain) = key.open_in_place(nonce, Aad::from(aad), &mut body) {
                return Ok(Opened {
                    plain: plain.to_vec(),
                    with_previous_key: i > 0,
                });
            }
        }
        Err(NotOpened::Sealed)
    }
}

/// The associated data of records written before the record's name was bound
/// (format 1): the identity hash and the generation only, so a record copied
/// to another client's slot with the same identity hash opened there too.
pub(crate) fn associated_data_v1(binding: &str, generation: u64) -> Vec<u8> {
    format!("tokenproxy-state-v1\0{binding}\0{generation}").into_bytes()
}

/// The associated data of format 2: the store's namespace (`scope`: the Redis
/// key prefix, or `file`), the record's own name (`CLIENT:IDENTITY`) and its
/// generation, each length-prefixed, so a record opens only in its own slot.
pub(crate) fn associated_data(scope: &str, name: &str, generation: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + scope.len() + name.len());
    for part in [
        "tokenproxy-state-v2".as_bytes(),
        scope.as_bytes(),
        name.as_bytes(),
    ] {
        out.extend_from_slice(&(part.len() as u64).to_be_bytes());
        out.extend_from_slice(part);
    }
    out.extend_from_slice(&generation.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> StoreKey {
        let text = base64::engine::general_purpose::STANDARD.encode([byte; 32]);
        StoreKey::from_base64(&text).unwrap()
    }

    fn opened(s: &Sealer, aad: &[u8], data: &str) -> Option<Vec<u8>> {
        s.open(aad, data).ok().map(|o| o.plain)
    }

    #[test]
    fn a_sealed_record_opens_only_with_its_key_name_and_generation() {
        let s = Sealer::new(&key(1), &[]);
        let data = s.seal(&associated_data("p", "a:h", 7), b"state");
        let aad = associated_data("p", "a:h", 7);
        assert_eq!(opened(&s, &aad, &data).as_deref(), Some(&b"state"[..]));
        for (what, other) in [
            ("other client name", associated_data("p", "b:h", 7)),
            ("other prefix", associated_data("q", "a:h", 7)),
            ("generation edited", associated_data("p", "a:h", 8)),
            ("fields shifted", associated_data("p:a", ":h", 7)),
        ] {
            assert_eq!(
                s.open(&other, &data).err(),
                Some(NotOpened::Sealed),
                "{what}"
            );
        }
        assert_eq!(
            Sealer::new(&key(2), &[]).open(&aad, &data).err(),
            Some(NotOpened::Sealed),
            "other key"
        );
        assert!(!data.contains("state"));
    }

    /// Key rotation: a previous key opens what it sealed, and says so; new
    /// records are sealed with the current key only.
    #[test]
    fn previous_keys_open_old_records_and_never_seal() {
        let aad = associated_data("file", "a:h", 1);
        let old = Sealer::new(&key(1), &[]).seal(&aad, b"old");
        let rotated = Sealer::new(&key(2), &[key(3), key(1)]);
        let o = rotated.open(&aad, &old).expect("a previous key opens it");
        assert_eq!(o.plain, b"old");
        assert!(o.with_previous_key);
        let new = rotated.seal(&aad, b"new");
        assert!(!rotated.open(&aad, &new).unwrap().with_previous_key);
        assert_eq!(
            Sealer::new(&key(1), &[]).open(&aad, &new).err(),
            Some(NotOpened::Sealed),
            "sealed with the current key, not a previous one"
        );
    }

    #[test]
    fn damaged_data_does_not_open() {
        let s = Sealer::new(&key(1), &[]);
        let aad = associated_data("file", "b", 1);
        let data = s.seal(&aad, b"state");
        let mut raw = base64::engine::general_purpose::STANDARD
            .decode(&data)
            .unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        let flipped = base64::engine::general_purpose::STANDARD.encode(raw);
        assert_eq!(s.open(&aad, &flipped).err(), Some(NotOpened::Sealed));
        assert_eq!(s.open(&aad, "!!!").err(), Some(NotOpened::Malformed));
        assert_eq!(s.open(&aad, "AAAA").err(), Some(NotOpened::Malformed));
    }

    #[test]
    fn two_seals_of_the_same_state_differ() {
        let s = Sealer::new(&key(1), &[]);
        let aad = associated_data("file", "b", 1);
        assert_ne!(s.seal(&aad, b"x"), s.seal(&aad, b"x"));
    }
}
