//! What a connect session keeps in the store, and the random values that name
//! and guard it.
//!
//! A session lives in two one-time entries of its client's store: the link
//! (`<client>.<random>`, made by the admin API, taken when the link is
//! opened) and the sign-in it starts (`state:<client>.<random>`, taken by the
//! callback). The client name in front lets any replica find the right store;
//! the random part (32 bytes) is what makes a link unguessable. The sign-in
//! entry holds the PKCE verifier and the SHA-256 of a nonce kept in an
//! HttpOnly cookie of the browser that opened the link: a callback from any
//! other browser binds nothing.

use base64::Engine as _;
use ring::rand::SecureRandom as _;
use serde::{Deserialize, Serialize};

/// Bytes of randomness in a link id, a state, a verifier and a cookie nonce.
const RANDOM_BYTES: usize = 32;
/// Their base64url length.
const RANDOM_LEN: usize = 43;
/// Prefix of the sign-in entries.
const STATE_PREFIX: &str = "state:";

/// A connect link waiting to be opened.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Link {
    pub(super) client: String,
    pub(super) subject: String,
    pub(super) return_to: String,
    pub(super) created_at_ms: u64,
}

/// A sign-in under way at the provider, waiting for its callback.
#[derive(Serialize, Deserialize)]
pub(super) struct SignIn {
    pub(super) client: String,
    pub(super) subject: String,
    /// The PKCE verifier (sealed in the store with the rest of the entry).
    pub(super) verifier: String,
    pub(super) return_to: String,
    /// base64url SHA-256 of the browser's cookie nonce.
    pub(super) browser: String,
}

/// `RANDOM_BYTES` from the system RNG, base64url; `None` if the RNG fails (a
/// guessable link is worse than none).
pub(super) fn random() -> Option<String> {
    let mut buf = [0u8; RANDOM_BYTES];
    ring::rand::SystemRandom::new().fill(&mut buf).ok()?;
    Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf))
}

/// Whether `s` looks like a value of [`random`].
pub(super) fn is_random(s: &str) -> bool {
    s.len() == RANDOM_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A fresh id (of a link or a state) of `client`.
pub(super) fn new_id(client: &str) -> Option<String> {
    Some(format!("{client}.{}", random()?))
}

/// The client an id (of a link or a state) belongs to, if it is well formed.
pub(super) fn client_of(id: &str) -> Option<&str> {
    let (client, random) = id.split_once('.')?;
    let name_ok = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'-';
    (!client.is_empty() && client.bytes().all(name_ok) && is_random(random)).then_some(client)
}

/// The store key of a sign-in's entry.
pub(super) fn state_key(state: &str) -> String {
    format!("{STATE_PREFIX}{state}")
}

/// base64url SHA-256 of a cookie nonce, as kept in [`SignIn::browser`].
pub(super) fn browser_digest(nonce: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, nonce.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref())
}

/// Whether `nonce` is the one whose digest `expected` is, in constant time.
pub(super) fn same_browser(nonce: &str, expected: &str) -> bool {
    let got = browser_digest(nonce);
    got.len() == expected.len()
        && got
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_name_their_client_and_carry_32_random_bytes() {
        let id = new_id("pos").expect("rng");
        assert_eq!(client_of(&id), Some("pos"));
        assert_ne!(new_id("pos"), Some(id.clone()), "ids differ");
        assert_eq!(client_of("pos.short"), None);
        assert_eq!(client_of(&id.replace("pos.", "p/s.")), None);
        assert_eq!(client_of(&id.replace("pos.", ".")), None);
        assert_eq!(client_of("pos"), None);
    }

    #[test]
    fn only_the_same_nonce_matches_its_digest() {
        let nonce = random().expect("rng");
        let digest = browser_digest(&nonce);
        assert!(same_browser(&nonce, &digest));
        assert!(!same_browser(&random().expect("rng"), &digest));
        assert!(!same_browser("", &digest));
        assert!(!same_browser(&nonce, ""));
    }
}
