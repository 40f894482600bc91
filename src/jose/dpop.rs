//! DPoP proofs (RFC 9449 §4): a compact JWS of type `dpop+jwt` whose header
//! carries the public key, signed anew for every request.
//!
//! The header is the same for every proof of one key, so it is encoded once.
//! A proof is then its claims, written into a per-thread scratch buffer, and
//! one signature: the request path pays for the signature and the proof
//! string, nothing else.

use std::cell::RefCell;
use std::fmt::Write as _;

use base64::Engine as _;
use ring::rand::{SecureRandom, SystemRandom};

use super::{base64url, sha256, KeyError, KeyKind, SignError, SigningKey};

/// The `typ` of a DPoP proof (RFC 9449 §4.2).
pub const PROOF_TYPE: &str = "dpop+jwt";

/// A key that signs DPoP proofs, with its proof header encoded once.
#[derive(Debug)]
pub struct ProofKey {
    key: SigningKey,
    /// base64url of `{"typ":"dpop+jwt","alg":…,"jwk":…}`.
    header: String,
    thumbprint: String,
}

/// What one proof says about its request.
#[derive(Clone, Copy, Debug)]
pub struct ProofClaims<'a> {
    /// `htm`: the request method.
    pub htm: &'a str,
    /// The target's `scheme://host[:port]`, as the server sees it.
    pub origin: &'a str,
    /// The target's path; a query or fragment after it is left out of `htu`
    /// (RFC 9449 §4.2).
    pub path: &'a str,
    /// `iat`: seconds since the Unix epoch.
    pub iat: u64,
    /// `ath`: the hash of the access token sent with it ([`access_token_hash`]);
    /// none at the token endpoint.
    pub ath: Option<&'a str>,
    /// `nonce`: the server's latest `DPoP-Nonce`, once it sent one.
    pub nonce: Option<&'a str>,
}

thread_local! {
    /// The claims of the proof being made on this thread (reused: its
    /// capacity stays, so a proof allocates only its own string).
    static CLAIMS: RefCell<String> = RefCell::new(String::with_capacity(256));
}

impl ProofKey {
    /// Proofs signed by `key`, which must be asymmetric.
    pub fn new(key: SigningKey) -> Result<ProofKey, KeyError> {
        let (Some(jwk), Some(thumbprint)) = (key.public_jwk(), key.jwk_thumbprint()) else {
            return Err(KeyError::Unsupported(KeyKind::Hmac.as_str()));
        };
        let header = format!(
            r#"{{"typ":"{PROOF_TYPE}","alg":"{}","jwk":{jwk}}}"#,
            key.alg().as_str()
        );
        Ok(ProofKey {
            header: base64url(header.as_bytes()),
            key,
            thumbprint,
        })
    }

    /// The key's JWK SHA-256 thumbprint: the `cnf.jkt` of the tokens bound to it.
    pub fn thumbprint(&self) -> &str {
        &self.thumbprint
    }

    /// The signing key.
    pub fn key(&self) -> &SigningKey {
        &self.key
    }

    /// A new proof for `claims`, with a random `jti` of 128 bits.
    pub fn proof(&self, claims: &ProofClaims<'_>) -> Result<String, SignError> {
        let mut jti = [0u8; 16];
        SystemRandom::new()
            .fill(&mut jti)
            .map_err(|_| SignError("no randomness"))?;
        CLAIMS.with(|scratch| {
            // A re-entrant call cannot happen (signing does not call back), but
            // a fresh buffer is correct anyway.
            let mut fallback = String::new();
            let mut borrowed = scratch.try_borrow_mut();
            let json = match &mut borrowed {
                Ok(buffer) => &mut **buffer,
                Err(_) => &mut fallback,
            };
            json.clear();
            write_claims(json, &jti, claims);
            let engine = &base64::engine::general_purpose::URL_SAFE_NO_PAD;
            // header . claims . signature (86 characters for 64 bytes).
            let claims_len = (json.len() * 4).div_ceil(3);
            let mut out = String::with_capacity(self.header.len() + claims_len + 2 + 344);
            out.push_str(&self.header);
            out.push('.');
            engine.encode_string(json.as_bytes(), &mut out);
            self.key.sign_into(out)
        })
    }
}

/// `base64url(SHA-256(token))`: the `ath` of the proofs sent with `token`.
pub fn access_token_hash(token: &str) -> String {
    base64url(&sha256(token.as_bytes()))
}

fn write_claims(json: &mut String, jti: &[u8; 16], c: &ProofClaims<'_>) {
    json.push_str(r#"{"jti":""#);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_string(jti, json);
    json.push_str(r#"","htm":"#);
    push_json_str(json, c.htm);
    json.push_str(r#","htu":""#);
    let path = c.path.split(['?', '#']).next().unwrap_or_default();
    push_json_chars(json, c.origin);
    push_json_chars(json, path);
    json.push('"');
    // Writing to a String cannot fail.
    let _infallible = write!(json, r#","iat":{}"#, c.iat);
    if let Some(ath) = c.ath {
        json.push_str(r#","ath":"#);
        push_json_str(json, ath);
    }
    if let Some(nonce) = c.nonce {
        json.push_str(r#","nonce":"#);
        push_json_str(json, nonce);
    }
    json.push('}');
}

/// `s` as a JSON string.
fn push_json_str(json: &mut String, s: &str) {
    json.push('"');
    push_json_chars(json, s);
    json.push('"');
}

/// The characters of `s` as they go inside a JSON string (RFC 8259 §7).
fn push_json_chars(json: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '"' => json.push_str("\\\""),
            '\\' => json.push_str("\\\\"),
            c if c < ' ' => {
                let _infallible = write!(json, "\\u{:04x}", u32::from(c));
            }
            c => json.push(c),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashSet;

    use ring::signature;
    use serde_json::Value;

    use super::*;
    use crate::jose::Alg;

    /// Splits a proof, checks its signature with the public key its own header
    /// carries (as a server does), and returns the header and claims.
    pub(crate) fn verify_with_header_jwk(proof: &str) -> (Value, Value) {
        let decode = |s: &str| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(s)
                .expect("base64url without padding")
        };
        let parts: Vec<&str> = proof.split('.').collect();
        assert_eq!(parts.len(), 3, "a compact JWS: {proof}");
        let header: Value = serde_json::from_slice(&decode(parts[0])).expect("header JSON");
        let claims: Value = serde_json::from_slice(&decode(parts[1])).expect("claims JSON");
        let jwk = &header["jwk"];
        let (verifier, public): (&dyn signature::VerificationAlgorithm, Vec<u8>) =
            match header["alg"].as_str() {
                Some("ES256") => {
                    let mut point = vec![4u8];
                    point.extend(decode(jwk["x"].as_str().expect("x")));
                    point.extend(decode(jwk["y"].as_str().expect("y")));
                    (&signature::ECDSA_P256_SHA256_FIXED, point)
                }
                Some("EdDSA") => (&signature::ED25519, decode(jwk["x"].as_str().expect("x"))),
                other => panic!("unexpected alg {other:?}"),
            };
        let input = format!("{}.{}", parts[0], parts[1]);
        signature::UnparsedPublicKey::new(verifier, public)
            .verify(input.as_bytes(), &decode(parts[2]))
            .expect("the signature verifies with the header's jwk");
        (header, claims)
    }

    fn key(alg: Alg) -> ProofKey {
        ProofKey::new(SigningKey::generate(alg).expect("generated").0).expect("asymmetric")
    }

    fn claims<'a>(ath: Option<&'a str>, nonce: Option<&'a str>) -> ProofClaims<'a> {
        ProofClaims {
            htm: "POST",
            origin: "https://api.bank.example",
            path: "/v1/payments",
            iat: 1_700_000_000,
            ath,
            nonce,
        }
    }

    #[test]
    fn the_header_is_typed_names_the_alg_and_carries_only_the_public_jwk() {
        for alg in [Alg::Es256, Alg::EdDsa] {
            let k = key(alg);
            let proof = k.proof(&claims(None, None)).expect("signed");
            let (header, _) = verify_with_header_jwk(&proof);
            assert_eq!(header["typ"], "dpop+jwt", "RFC 9449 §4.2 typ");
            assert_eq!(header["alg"], alg.as_str());
            let jwk = header["jwk"].as_object().expect("a jwk object");
            for private in ["d", "p", "q", "dp", "dq", "qi", "k"] {
                assert!(!jwk.contains_key(private), "no private member {private}");
            }
            let canonical = serde_json::to_string(&header["jwk"]).expect("json");
            assert_eq!(
                base64url(&sha256(canonical.as_bytes())),
                k.thumbprint(),
                "the thumbprint is over the header's jwk"
            );
        }
    }

    #[test]
    fn claims_name_the_method_the_target_without_query_the_time_and_the_token() {
        let k = key(Alg::Es256);
        let ath = access_token_hash("at-123");
        let mut c = claims(Some(&ath), Some("n-1"));
        c.htm = "GET";
        c.path = "/v1/payments?page=2#top";
        let (_, claims) = verify_with_header_jwk(&k.proof(&c).expect("signed"));
        assert_eq!(claims["htm"], "GET");
        assert_eq!(
            claims["htu"], "https://api.bank.example/v1/payments",
            "htu leaves out query and fragment"
        );
        assert_eq!(claims["iat"], 1_700_000_000u64);
        assert_eq!(claims["ath"], ath);
        assert_eq!(
            ath,
            base64url(&sha256(b"at-123")),
            "ath is base64url(SHA-256(token))"
        );
        assert_eq!(claims["nonce"], "n-1");

        let (_, bare) = verify_with_header_jwk(&k.proof(&claims_none()).expect("signed"));
        assert!(
            bare.get("ath").is_none() && bare.get("nonce").is_none(),
            "no ath or nonce unless given: {bare}"
        );
    }

    fn claims_none() -> ProofClaims<'static> {
        claims(None, None)
    }

    #[test]
    fn every_proof_has_a_new_jti_even_for_the_same_request() {
        let k = key(Alg::EdDsa);
        let mut seen = HashSet::new();
        for _ in 0..50 {
            let (_, c) = verify_with_header_jwk(&k.proof(&claims_none()).expect("signed"));
            let jti = c["jti"].as_str().expect("a jti").to_owned();
            assert_eq!(jti.len(), 22, "128 random bits");
            assert!(seen.insert(jti), "a jti never repeats");
        }
    }

    #[test]
    fn odd_characters_in_the_path_and_nonce_stay_valid_json() {
        let k = key(Alg::Es256);
        let mut c = claims(None, Some("a\"b\\c"));
        c.path = "/x\"y\\z";
        let (_, claims) = verify_with_header_jwk(&k.proof(&c).expect("signed"));
        assert_eq!(claims["htu"], "https://api.bank.example/x\"y\\z");
        assert_eq!(claims["nonce"], "a\"b\\c");
    }

    #[test]
    fn a_shared_secret_cannot_sign_proofs() {
        let hmac = SigningKey::hmac(Alg::Hs256, b"s").expect("hmac");
        assert!(ProofKey::new(hmac).is_err());
    }
}
