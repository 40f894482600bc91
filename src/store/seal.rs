//! Authenticated encryption of stored token state (ChaCha20-Poly1305, from ring,
//! which the TLS stack already uses).

use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

use crate::config::StoreKey;

/// Seals and opens records under one key.
pub(crate) struct Sealer {
    key: LessSafeKey,
    rng: SystemRandom,
}

impl Sealer {
    pub(crate) fn new(key: &StoreKey) -> Sealer {
        // A 32-byte key is exactly what ChaCha20-Poly1305 takes, so this cannot fail.
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, key.expose())
            .expect("ChaCha20-Poly1305 takes a 32-byte key");
        Sealer {
            key: LessSafeKey::new(unbound),
            rng: SystemRandom::new(),
        }
    }

    /// base64(nonce ‖ ciphertext ‖ tag), with `binding` and `generation` authenticated.
    pub(crate) fn seal(&self, binding: &str, generation: u64, plain: &[u8]) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        // The system RNG does not fail on the platforms tokenproxy runs on; if it
        // ever did, a zero nonce would be reused, so stop rather than go on.
        self.rng
            .fill(&mut nonce)
            .expect("the system random number generator failed");
        let mut out = Vec::with_capacity(NONCE_LEN + plain.len() + 16);
        out.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        let aad = associated_data(binding, generation);
        // Sealing fails only for inputs over 256 GiB.
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad.as_bytes()),
                &mut body,
            )
            .expect("token state is far below the cipher's size limit");
        out.extend_from_slice(&body);
        base64::engine::general_purpose::STANDARD.encode(out)
    }

    /// The plaintext, or `None` when `data` was not sealed by this key for this
    /// binding and generation, or is damaged.
    pub(crate) fn open(&self, binding: &str, generation: u64, data: &str) -> Option<Vec<u8>> {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(data)
            .ok()?;
        if raw.len() < NONCE_LEN {
            return None;
        }
        let (nonce, sealed) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = sealed.to_vec();
        let aad = associated_data(binding, generation);
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(aad.as_bytes()), &mut body)
            .ok()?;
        Some(plain.to_vec())
    }
}

fn associated_data(binding: &str, generation: u64) -> String {
    format!("tokenproxy-state-v1\0{binding}\0{generation}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> StoreKey {
        let text = base64::engine::general_purpose::STANDARD.encode([byte; 32]);
        StoreKey::from_base64(&text).unwrap()
    }

    #[test]
    fn a_sealed_record_opens_only_with_its_key_binding_and_generation() {
        let s = Sealer::new(&key(1));
        let data = s.seal("b1", 7, b"state");
        assert_eq!(s.open("b1", 7, &data).as_deref(), Some(&b"state"[..]));
        assert_eq!(s.open("b2", 7, &data), None, "other binding");
        assert_eq!(s.open("b1", 8, &data), None, "generation edited");
        assert_eq!(Sealer::new(&key(2)).open("b1", 7, &data), None, "other key");
        assert!(!data.contains("state"));
    }

    #[test]
    fn damaged_data_does_not_open() {
        let s = Sealer::new(&key(1));
        let data = s.seal("b", 1, b"state");
        let mut raw = base64::engine::general_purpose::STANDARD
            .decode(&data)
            .unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        let flipped = base64::engine::general_purpose::STANDARD.encode(raw);
        assert_eq!(s.open("b", 1, &flipped), None);
        assert_eq!(s.open("b", 1, "!!!"), None);
        assert_eq!(s.open("b", 1, "AAAA"), None);
    }

    #[test]
    fn two_seals_of_the_same_state_differ() {
        let s = Sealer::new(&key(1));
        assert_ne!(s.seal("b", 1, b"x"), s.seal("b", 1, b"x"));
    }
}
