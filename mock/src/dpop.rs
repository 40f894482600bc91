//! DPoP proofs (RFC 9449) as the mocks check them: the provider before it binds
//! a token to the proof's key, the API before it accepts a bound token.
//!
//! The checks and their order are those of a resource server (RFC 9449 §4.3,
//! §7.1), as the oidc-provider peer's API makes them: the JWS (`typ`
//! `dpop+jwt`, an asymmetric `alg`, a public `jwk` its signature verifies
//! with), `iat` within [`IAT_WINDOW`], a `jti` never seen before (a proof whose
//! signature verifies uses its `jti` up even when a later check refuses it),
//! `htm`, `htu` (without query or fragment), `ath`, then the nonce. The caller
//! compares the key's thumbprint with the token's binding.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use ring::signature;
use serde_json::{Map, Value};

/// The header a proof travels in.
pub(crate) const HEADER: &str = "dpop";
/// The header a server hands out its nonce in.
pub(crate) const NONCE_HEADER: &str = "dpop-nonce";

/// How far a proof's `iat` may be from the mock's clock, in seconds.
pub const IAT_WINDOW: u64 = 60;

/// What a proof must say.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Expected<'a> {
    /// The request method.
    pub(crate) htm: &'a str,
    /// The request URL without query: scheme, host and path.
    pub(crate) htu: &'a str,
    /// base64url(SHA-256(access token)) at the API; `None` at the token endpoint.
    pub(crate) ath: Option<&'a str>,
    /// The nonces accepted, when the server demands one.
    pub(crate) nonces: Option<&'a [String]>,
}

/// Why a proof was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Steps 1, 2 and 4 to 6: the proof is not one for this request.
    Invalid(String),
    /// Step 3: its `jti` was seen before.
    Replayed,
    /// Step 7: no nonce, or not one of the accepted ones.
    NeedsNonce,
}

impl Refused {
    /// The `error_description` of a refusal.
    pub(crate) fn description(&self) -> String {
        match self {
            Refused::Invalid(why) => why.clone(),
            Refused::Replayed => "DPoP proof replayed (jti seen before)".to_owned(),
            Refused::NeedsNonce => "nonce is required in the DPoP proof".to_owned(),
        }
    }
}

/// The `jti`s of proofs whose signature verified, each kept for as long as
/// its proof could pass the `iat` check.
#[derive(Default)]
pub(crate) struct SeenJtis(HashMap<String, u64>);

/// A proof that passed: its key's RFC 7638 thumbprint.
#[derive(Clone, Debug)]
pub(crate) struct Passed {
    pub(crate) jkt: String,
}

fn now_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn b64(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .ok()
}

/// base64url(SHA-256(`bytes`)).
pub(crate) fn sha256_b64(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref())
}

/// Checks `proof` against `expected`, in the order of RFC 9449 §4.3.
pub(crate) fn check(
    proof: &str,
    expected: &Expected<'_>,
    seen: &mut SeenJtis,
) -> Result<Passed, Refused> {
    let invalid = |why: &str| Refused::Invalid(why.to_owned());
    // 1. A JWS of type dpop+jwt, signed with the public key in its header.
    let mut parts = proof.split('.');
    let (Some(h), Some(p), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid("DPoP proof is not a compact JWS"));
    };
    let json = |s: &str| b64(s).and_then(|b| serde_json::from_slice::<Value>(&b).ok());
    let header = json(h).ok_or_else(|| invalid("DPoP proof header is not base64url JSON"))?;
    let claims = json(p).ok_or_else(|| invalid("DPoP proof claims are not base64url JSON"))?;
    if header["typ"] != "dpop+jwt" {
        return Err(invalid("DPoP proof typ must be dpop+jwt"));
    }
    let jwk = header["jwk"]
        .as_object()
        .ok_or_else(|| invalid("DPoP proof has no jwk"))?;
    if jwk.contains_key("d") {
        return Err(invalid("DPoP proof jwk must be a public key"));
    }
    let (verifier, public, canonical) = public_key(header["alg"].as_str(), jwk)
        .ok_or_else(|| invalid("DPoP proof alg or jwk is not supported"))?;
    let signature = b64(sig).ok_or_else(|| invalid("DPoP proof signature is not base64url"))?;
    signature::UnparsedPublicKey::new(verifier, public)
        .verify(format!("{h}.{p}").as_bytes(), &signature)
        .map_err(|_| invalid("DPoP proof signature does not verify"))?;
    // 2. iat.
    let now = now_seconds();
    let iat = claims["iat"]
        .as_u64()
        .ok_or_else(|| invalid("DPoP proof has no iat"))?;
    if iat.abs_diff(now) > IAT_WINDOW {
        return Err(invalid("DPoP proof iat is not recent enough"));
    }
    // 3. jti, used up from here on whatever follows.
    let jti = claims["jti"]
        .as_str()
        .filter(|j| !j.is_empty())
        .ok_or_else(|| invalid("DPoP proof has no jti"))?;
    seen.0.retain(|_, until| *until >= now);
    if seen.0.contains_key(jti) {
        return Err(Refused::Replayed);
    }
    seen.0.insert(jti.to_owned(), iat + IAT_WINDOW);
    // 4. htm.
    if claims["htm"] != expected.htm {
        return Err(invalid("DPoP proof htm mismatch"));
    }
    // 5. htu, which carries no query or fragment.
    let htu = claims["htu"].as_str().unwrap_or_default();
    if htu.contains(['?', '#']) {
        return Err(invalid("DPoP proof htu must not carry a query or fragment"));
    }
    if htu != expected.htu {
        return Err(invalid("DPoP proof htu mismatch"));
    }
    // 6. ath.
    match expected.ath {
        Some(ath) if claims["ath"] != ath => {
            return Err(invalid("DPoP proof ath mismatch"));
        }
        _ => {}
    }
    // 7. nonce.
    if let Some(nonces) = expected.nonces {
        let nonce = claims["nonce"].as_str().unwrap_or_default();
        if !nonces.iter().any(|n| n == nonce) {
            return Err(Refused::NeedsNonce);
        }
    }
    Ok(Passed {
        jkt: sha256_b64(canonical.as_bytes()),
    })
}

/// The verifier, the public key bytes and the RFC 7638 canonical JWK of an
/// ES256 or EdDSA proof's `jwk`.
fn public_key(
    alg: Option<&str>,
    jwk: &Map<String, Value>,
) -> Option<(
    &'static dyn signature::VerificationAlgorithm,
    Vec<u8>,
    String,
)> {
    let text = |name: &str| jwk.get(name).and_then(Value::as_str);
    match (alg?, text("kty")?, text("crv")?) {
        ("ES256", "EC", "P-256") => {
            let (x, y) = (text("x")?, text("y")?);
            let mut point = vec![4u8];
            point.extend(b64(x)?);
            point.extend(b64(y)?);
            let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
            Some((&signature::ECDSA_P256_SHA256_FIXED, point, canonical))
        }
        ("EdDSA" | "Ed25519", "OKP", "Ed25519") => {
            let x = text("x")?;
            let canonical = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#);
            Some((&signature::ED25519, b64(x)?, canonical))
        }
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod test_key {
    //! A P-256 key that signs proofs, for the mocks' unit tests.

    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, KeyPair};

    fn b64e(bytes: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    /// A new P-256 key.
    pub(crate) struct TestKey {
        key: EcdsaKeyPair,
        jwk: Value,
    }

    impl TestKey {
        pub(crate) fn new() -> TestKey {
            let rng = SystemRandom::new();
            let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("key");
            let key = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).expect("key");
            let point = key.public_key().as_ref();
            let jwk = serde_json::json!({"kty": "EC", "crv": "P-256",
                "x": b64e(&point[1..33]), "y": b64e(&point[33..])});
            TestKey { key, jwk }
        }

        /// Its RFC 7638 thumbprint.
        pub(crate) fn jkt(&self) -> String {
            let canonical = format!(
                r#"{{"crv":"P-256","kty":"EC","x":{},"y":{}}}"#,
                self.jwk["x"], self.jwk["y"]
            );
            sha256_b64(canonical.as_bytes())
        }

        /// A proof with a new `jti` and `iat` now for `htm` `htu`, the `ath`
        /// of `token` if any, and `nonce` if any.
        pub(crate) fn proof(
            &self,
            htm: &str,
            htu: &str,
            token: Option<&str>,
            nonce: Option<&str>,
        ) -> String {
            self.sign(
                |c| {
                    c["htm"] = Value::from(htm);
                    c["htu"] = Value::from(htu);
                    match token {
                        Some(t) => c["ath"] = Value::from(sha256_b64(t.as_bytes())),
                        None => drop(c.as_object_mut().map(|o| o.remove("ath"))),
                    }
                    if let Some(n) = nonce {
                        c["nonce"] = Value::from(n);
                    }
                },
                false,
            )
        }

        /// A proof of `GET http://api.example/x` with `ath` "h", after `edit`
        /// changes its claims; with a private `jwk` member if `private_jwk`.
        pub(crate) fn sign(&self, edit: impl FnOnce(&mut Value), private_jwk: bool) -> String {
            let mut jwk = self.jwk.clone();
            if private_jwk {
                jwk["d"] = Value::from("private");
            }
            let header = serde_json::json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk});
            let mut claims = serde_json::json!({"jti": format!("j{}", fastrand::u64(..)),
                "htm": "GET", "htu": "http://api.example/x", "iat": now_seconds(), "ath": "h"});
            edit(&mut claims);
            let input = format!(
                "{}.{}",
                b64e(header.to_string().as_bytes()),
                b64e(claims.to_string().as_bytes())
            );
            let sig = self
                .key
                .sign(&SystemRandom::new(), input.as_bytes())
                .expect("signed");
            format!("{input}.{}", b64e(sig.as_ref()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_key::TestKey;
    use super::*;

    /// A proof signed with a new P-256 key; `edit` changes the claims first.
    fn proof(edit: impl FnOnce(&mut Value), private_jwk: bool) -> String {
        TestKey::new().sign(edit, private_jwk)
    }

    const EXPECTED: Expected<'static> = Expected {
        htm: "GET",
        htu: "http://api.example/x",
        ath: Some("h"),
        nonces: None,
    };

    #[test]
    fn a_proof_for_this_request_passes_once() {
        let mut seen = SeenJtis::default();
        let good = proof(|_| {}, false);
        let passed = check(&good, &EXPECTED, &mut seen).expect("passes");
        assert_eq!(passed.jkt.len(), 43);
        let key = TestKey::new();
        let mine = key.sign(|_| {}, false);
        let passed = check(&mine, &EXPECTED, &mut seen).expect("passes");
        assert_eq!(passed.jkt, key.jkt(), "the thumbprint of the signing key");
        assert_eq!(
            check(&good, &EXPECTED, &mut seen).err(),
            Some(Refused::Replayed)
        );
    }

    #[test]
    fn every_check_refuses_its_own_fault() {
        let cases: Vec<(&str, String)> = vec![
            ("private jwk", proof(|_| {}, true)),
            (
                "old iat",
                proof(|c| c["iat"] = Value::from(now_seconds() - 120), false),
            ),
            ("htm", proof(|c| c["htm"] = Value::from("POST"), false)),
            (
                "htu",
                proof(|c| c["htu"] = Value::from("http://api.example/y"), false),
            ),
            (
                "query",
                proof(
                    |c| c["htu"] = Value::from("http://api.example/x?a=1"),
                    false,
                ),
            ),
            ("ath", proof(|c| c["ath"] = Value::from("other"), false)),
        ];
        for (what, p) in cases {
            let refused = check(&p, &EXPECTED, &mut SeenJtis::default());
            assert!(
                matches!(refused, Err(Refused::Invalid(_))),
                "{what}: {refused:?}"
            );
        }
        let mut tampered = proof(|_| {}, false);
        tampered.replace_range(tampered.len() - 3.., "AAA");
        assert!(check(&tampered, &EXPECTED, &mut SeenJtis::default()).is_err());
        let nonces = ["n1".to_owned()];
        let with_nonce = Expected {
            nonces: Some(&nonces),
            ..EXPECTED
        };
        assert_eq!(
            check(&proof(|_| {}, false), &with_nonce, &mut SeenJtis::default()).err(),
            Some(Refused::NeedsNonce)
        );
        let p = proof(|c| c["nonce"] = Value::from("n1"), false);
        assert!(check(&p, &with_nonce, &mut SeenJtis::default()).is_ok());
    }
}
