//! Compact JWS (RFC 7515) on ring (Ed25519 on aws-lc-rs): the keys tokenproxy signs with, and the one
//! function that turns a header and claims into `header.payload.signature`.
//!
//! Client assertions (RFC 7523) are signed here, and DPoP proofs (RFC 9449)
//! can be: a key is loaded once from PEM (PKCS#8, PKCS#1 RSA or SEC1 EC) or
//! made from a client secret (HMAC), exposes its public half for verification
//! or a `jwk`, and is never printed (`Debug` shows its algorithm only).
//! `jwk.rs` adds the public JWK and its RFC 7638 thumbprint, and keys made
//! here; `dpop.rs` signs DPoP proofs with a precomputed header.
//! Algorithms are those FAPI 2.0 and RFC 7523 providers use: RS256, PS256,
//! ES256 (the fixed-length `r || s` signature of RFC 7518 §3.4), EdDSA
//! (Ed25519), HS256 and HS512.

use std::fmt;
use std::sync::Arc;

use base64::Engine as _;
use ring::rand::{SecureRandom, SystemRandom};
// Ed25519 from aws-lc-rs: it signs in 9.2 µs where ring takes 24.0 µs, and a
// DPoP client signs on every request. ring stays for the rest: its P-256
// signing costs less inside the request path (measured with bench/dpop.sh).
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair as _};
use ring::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair};
use ring::{digest, hmac};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;
use serde_json::{Map, Value};

mod dpop;
mod jwk;

#[cfg(test)]
pub(crate) use dpop::tests::verify_with_header_jwk;
pub use dpop::{access_token_hash, ProofClaims, ProofKey, PROOF_TYPE};

/// A JWS `alg` tokenproxy signs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alg {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    Rs256,
    /// RSASSA-PSS with SHA-256 (MGF1 SHA-256, 32-byte salt).
    Ps256,
    /// ECDSA on P-256 with SHA-256.
    Es256,
    /// Ed25519.
    EdDsa,
    /// HMAC with SHA-256.
    Hs256,
    /// HMAC with SHA-512.
    Hs512,
}

impl Alg {
    /// The `alg` header value, also the config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Alg::Rs256 => "RS256",
            Alg::Ps256 => "PS256",
            Alg::Es256 => "ES256",
            Alg::EdDsa => "EdDSA",
            Alg::Hs256 => "HS256",
            Alg::Hs512 => "HS512",
        }
    }

    /// The kind of key this algorithm signs with.
    pub fn key_kind(self) -> KeyKind {
        match self {
            Alg::Rs256 | Alg::Ps256 => KeyKind::Rsa,
            Alg::Es256 => KeyKind::EcP256,
            Alg::EdDsa => KeyKind::Ed25519,
            Alg::Hs256 | Alg::Hs512 => KeyKind::Hmac,
        }
    }
}

impl fmt::Display for Alg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What kind of key a [`SigningKey`] holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// RSA, 2048 to 8192 bits.
    Rsa,
    /// ECDSA on P-256.
    EcP256,
    /// Ed25519.
    Ed25519,
    /// A shared secret.
    Hmac,
}

impl KeyKind {
    /// For messages: "an RSA key", ...
    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::Rsa => "an RSA key",
            KeyKind::EcP256 => "an EC P-256 key",
            KeyKind::Ed25519 => "an Ed25519 key",
            KeyKind::Hmac => "a shared secret",
        }
    }

    /// The algorithms this kind of key signs with; the first is the default.
    pub fn algs(self) -> &'static [Alg] {
        match self {
            KeyKind::Rsa => &[Alg::Rs256, Alg::Ps256],
            KeyKind::EcP256 => &[Alg::Es256],
            KeyKind::Ed25519 => &[Alg::EdDsa],
            KeyKind::Hmac => &[Alg::Hs256, Alg::Hs512],
        }
    }
}

/// Why a key cannot be used. Never holds key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// No (unencrypted) private key block in the PEM text.
    #[error("holds no unencrypted PEM private key")]
    NoKey,
    /// A key of a type or curve tokenproxy does not sign with.
    #[error("holds {0}, which tokenproxy cannot sign with")]
    Unsupported(&'static str),
    /// A key of a known type that ring refused (too small, malformed, ...).
    #[error("holds {} that cannot be used: {reason}", kind.as_str())]
    Rejected {
        /// The kind of key it claims to be.
        kind: KeyKind,
        /// ring's reason.
        reason: String,
    },
    /// The algorithm asked for does not sign with this kind of key.
    #[error("holds {}, but {alg} needs {}", kind.as_str(), alg.key_kind().as_str())]
    AlgMismatch {
        /// The algorithm asked for.
        alg: Alg,
        /// The key's kind.
        kind: KeyKind,
    },
}

/// A JWS could not be made (the random source or the signer failed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot sign a JWS: {0}")]
pub struct SignError(&'static str);

enum Key {
    Rsa(RsaKeyPair),
    Ecdsa(EcdsaKeyPair),
    Ed25519(Ed25519KeyPair),
    Hmac(hmac::Key),
}

/// A private key (or shared secret) and the algorithm it signs with.
///
/// Cheap to clone. Two keys are equal when they hold the same key material and
/// algorithm (compared through a SHA-256 digest kept for that), so a reload
/// can tell whether a key changed.
#[derive(Clone)]
pub struct SigningKey {
    alg: Alg,
    key: Arc<Key>,
    digest: [u8; 32],
}

impl PartialEq for SigningKey {
    fn eq(&self, other: &Self) -> bool {
        self.alg == other.alg && self.digest == other.digest
    }
}

impl Eq for SigningKey {}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({}, [redacted])", self.alg)
    }
}

// DER object identifiers, with their tag and length, as they appear in a
// PKCS#8 AlgorithmIdentifier or a SEC1 `parameters` field.
const OID_RSA_ENCRYPTION: &[u8] = &[
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
];
const OID_EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_ED25519: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];
/// The AlgorithmIdentifier of a PKCS#8 document ends within its first bytes.
const ALG_ID_WINDOW: usize = 40;

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn rejected<E: fmt::Display>(kind: KeyKind) -> impl Fn(E) -> KeyError {
    move |e| KeyError::Rejected {
        kind,
        reason: e.to_string(),
    }
}

impl SigningKey {
    /// The first private key in `pem`, signing with `alg` (default: RS256 for
    /// RSA, ES256 for P-256, EdDSA for Ed25519).
    pub fn from_pem(pem: &str, alg: Option<Alg>) -> Result<SigningKey, KeyError> {
        let der = PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|_| KeyError::NoKey)?;
        let (kind, key, material) = match &der {
            PrivateKeyDer::Pkcs8(k) => from_pkcs8(k.secret_pkcs8_der())?,
            PrivateKeyDer::Pkcs1(k) => {
                let der = k.secret_pkcs1_der();
                let pair = RsaKeyPair::from_der(der).map_err(rejected(KeyKind::Rsa))?;
                (KeyKind::Rsa, Key::Rsa(pair), der)
            }
            PrivateKeyDer::Sec1(k) => {
                let der = k.secret_sec1_der();
                let pkcs8 = sec1_to_pkcs8(der);
                let rng = SystemRandom::new();
                let pair = EcdsaKeyPair::from_pkcs8(
                    &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                    &pkcs8,
                    &rng,
                )
                .map_err(|e| {
                    if contains(der, OID_P256) {
                        rejected(KeyKind::EcP256)(e)
                    } else {
                        KeyError::Unsupported("an EC key on a curve other than P-256")
                    }
                })?;
                (KeyKind::EcP256, Key::Ecdsa(pair), der)
            }
            _ => return Err(KeyError::Unsupported("a key of an unknown format")),
        };
        SigningKey::assemble(kind, key, material, alg)
    }

    /// The key `key` of `kind` (its `material` digested for comparison), signing
    /// with `alg`, or the first algorithm of its kind.
    fn assemble(
        kind: KeyKind,
        key: Key,
        material: &[u8],
        alg: Option<Alg>,
    ) -> Result<SigningKey, KeyError> {
        let alg = match alg {
            None => kind.algs()[0],
            Some(alg) if kind.algs().contains(&alg) => alg,
            Some(alg) => return Err(KeyError::AlgMismatch { alg, kind }),
        };
        Ok(SigningKey {
            alg,
            key: Arc::new(key),
            digest: sha256(material),
        })
    }

    /// A key for `alg` (HS256 or HS512) from a shared secret (`client_secret_jwt`).
    pub fn hmac(alg: Alg, secret: &[u8]) -> Result<SigningKey, KeyError> {
        let algorithm = match alg {
            Alg::Hs256 => hmac::HMAC_SHA256,
            Alg::Hs512 => hmac::HMAC_SHA512,
            other => {
                return Err(KeyError::AlgMismatch {
                    alg: other,
                    kind: KeyKind::Hmac,
                })
            }
        };
        Ok(SigningKey {
            alg,
            key: Arc::new(Key::Hmac(hmac::Key::new(algorithm, secret))),
            digest: sha256(secret),
        })
    }

    /// The algorithm this key signs with.
    pub fn alg(&self) -> Alg {
        self.alg
    }

    /// The kind of key.
    pub fn kind(&self) -> KeyKind {
        self.alg.key_kind()
    }

    /// The public key as ring's verifiers take it (RSA: PKCS#1 DER; P-256: the
    /// uncompressed point; Ed25519: 32 bytes); `None` for a shared secret.
    pub fn public_key(&self) -> Option<&[u8]> {
        match &*self.key {
            Key::Rsa(k) => Some(k.public_key().as_ref()),
            Key::Ecdsa(k) => Some(k.public_key().as_ref()),
            Key::Ed25519(k) => Some(k.public_key().as_ref()),
            Key::Hmac(_) => None,
        }
    }

    /// A compact JWS of `claims` with `header` (its `alg` set here).
    pub fn sign(
        &self,
        mut header: Map<String, Value>,
        claims: &Value,
    ) -> Result<String, SignError> {
        header.insert("alg".to_owned(), Value::from(self.alg.as_str()));
        let header = serde_json::to_vec(&header).map_err(|_| SignError("header"))?;
        let claims = serde_json::to_vec(claims).map_err(|_| SignError("claims"))?;
        let input = format!("{}.{}", base64url(&header), base64url(&claims));
        let signature = self.sign_bytes(input.as_bytes())?;
        Ok(format!("{input}.{}", base64url(&signature)))
    }

    /// Signs `input` (a JWS signing input, `header.claims`) and appends `.`
    /// and the base64url signature to it; ECDSA and Ed25519 signatures are
    /// encoded from the stack, without an allocation of their own.
    fn sign_into(&self, mut input: String) -> Result<String, SignError> {
        let engine = &base64::engine::general_purpose::URL_SAFE_NO_PAD;
        match &*self.key {
            Key::Ecdsa(k) => {
                let signature = k
                    .sign(&SystemRandom::new(), input.as_bytes())
                    .map_err(|_| SignError("ECDSA signing failed"))?;
                input.push('.');
                engine.encode_string(signature.as_ref(), &mut input);
            }
            Key::Ed25519(k) => {
                let signature = k.sign(input.as_bytes());
                input.push('.');
                engine.encode_string(signature.as_ref(), &mut input);
            }
            Key::Rsa(_) | Key::Hmac(_) => {
                let signature = self.sign_bytes(input.as_bytes())?;
                input.push('.');
                engine.encode_string(&signature, &mut input);
            }
        }
        Ok(input)
    }

    fn sign_bytes(&self, message: &[u8]) -> Result<Vec<u8>, SignError> {
        let rng = SystemRandom::new();
        match &*self.key {
            Key::Rsa(k) => {
                let padding: &'static dyn signature::RsaEncoding = match self.alg {
                    Alg::Ps256 => &signature::RSA_PSS_SHA256,
                    _ => &signature::RSA_PKCS1_SHA256,
                };
                let mut out = vec![0; k.public().modulus_len()];
                k.sign(padding, &rng, message, &mut out)
                    .map_err(|_| SignError("RSA signing failed"))?;
                Ok(out)
            }
            Key::Ecdsa(k) => k
                .sign(&rng, message)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| SignError("ECDSA signing failed")),
            Key::Ed25519(k) => Ok(k.sign(message).as_ref().to_vec()),
            Key::Hmac(k) => Ok(hmac::sign(k, message).as_ref().to_vec()),
        }
    }
}

/// Parses a PKCS#8 document after reading its algorithm identifier, so a key
/// of another type or curve is named rather than reported as malformed.
fn from_pkcs8(der: &[u8]) -> Result<(KeyKind, Key, &[u8]), KeyError> {
    let head = &der[..der.len().min(ALG_ID_WINDOW)];
    if contains(head, OID_RSA_ENCRYPTION) {
        let pair = RsaKeyPair::from_pkcs8(der).map_err(rejected(KeyKind::Rsa))?;
        return Ok((KeyKind::Rsa, Key::Rsa(pair), der));
    }
    if contains(head, OID_EC_PUBLIC_KEY) {
        if !contains(head, OID_P256) {
            return Err(KeyError::Unsupported(
                "an EC key on a curve other than P-256",
            ));
        }
        let rng = SystemRandom::new();
        let pair = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng)
            .map_err(rejected(KeyKind::EcP256))?;
        return Ok((KeyKind::EcP256, Key::Ecdsa(pair), der));
    }
    if contains(head, OID_ED25519) {
        // OpenSSL writes PKCS#8 v1, without the public key; ring derives it.
        let pair =
            Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).map_err(rejected(KeyKind::Ed25519))?;
        return Ok((KeyKind::Ed25519, Key::Ed25519(pair), der));
    }
    Err(KeyError::Unsupported(
        "a key that is not RSA, EC P-256 or Ed25519",
    ))
}

/// Wraps a SEC1 `ECPrivateKey` (`BEGIN EC PRIVATE KEY`) into the PKCS#8 v1
/// document ring reads, with the P-256 algorithm identifier; ring checks that
/// the key's own `parameters`, when present, name the same curve.
fn sec1_to_pkcs8(sec1: &[u8]) -> Vec<u8> {
    let mut body = vec![0x02, 0x01, 0x00];
    body.push(0x30);
    push_der_len(&mut body, OID_EC_PUBLIC_KEY.len() + OID_P256.len());
    body.extend_from_slice(OID_EC_PUBLIC_KEY);
    body.extend_from_slice(OID_P256);
    body.push(0x04);
    push_der_len(&mut body, sec1.len());
    body.extend_from_slice(sec1);
    let mut out = vec![0x30];
    push_der_len(&mut out, body.len());
    out.extend_from_slice(&body);
    out
}

fn push_der_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
        return;
    }
    let bytes = len.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    out.push(0x80 | (bytes.len() - skip) as u8);
    out.extend_from_slice(&bytes[skip..]);
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, bytes).as_ref());
    out
}

/// base64url without padding (RFC 7515 §2).
pub fn base64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The `x5t#S256` of a DER certificate: base64url(SHA-256(DER)) (RFC 7515 §4.1.8).
pub fn x5t_s256(certificate_der: &[u8]) -> String {
    base64url(&sha256(certificate_der))
}

/// A new random identifier (128 bits, base64url) for a `jti`.
pub fn random_id() -> Result<String, SignError> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| SignError("no randomness"))?;
    Ok(base64url(&bytes))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// The committed test-only RSA key (ring cannot generate RSA keys).
    pub(crate) const RSA_PEM: &str = include_str!("../../tests/fixtures/rsa2048-test-only.pem");

    /// A new P-256 or Ed25519 key in PKCS#8 PEM.
    pub(crate) fn generated_pem(alg: &'static rcgen::SignatureAlgorithm) -> String {
        rcgen::KeyPair::generate_for(alg)
            .expect("key generation")
            .serialize_pem()
    }

    /// The DER of the one PEM block in `pem`.
    fn pem_der(pem: &str) -> Vec<u8> {
        let b64: String = pem
            .lines()
            .skip_while(|l| !l.starts_with("-----BEGIN"))
            .skip(1)
            .take_while(|l| !l.starts_with("-----END"))
            .collect();
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .expect("PEM base64")
    }

    fn to_pem(label: &str, der: &[u8]) -> String {
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).expect("ascii"))
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            lines.join("\n")
        )
    }

    /// The private key inside a PKCS#8 document: its last element, an OCTET STRING
    /// holding a PKCS#1 `RSAPrivateKey` or a SEC1 `ECPrivateKey`.
    fn pkcs8_inner(pkcs8: &[u8]) -> Vec<u8> {
        fn read_len(b: &[u8], at: &mut usize) -> usize {
            let first = b[*at] as usize;
            *at += 1;
            if first < 0x80 {
                return first;
            }
            let n = first & 0x7f;
            let mut len = 0;
            for _ in 0..n {
                len = (len << 8) | b[*at] as usize;
                *at += 1;
            }
            len
        }
        let mut at = 1;
        read_len(pkcs8, &mut at); // outer SEQUENCE
        loop {
            let tag = pkcs8[at];
            at += 1;
            let len = read_len(pkcs8, &mut at);
            if tag == 0x04 {
                return pkcs8[at..at + len].to_vec();
            }
            at += len;
        }
    }

    /// Splits a compact JWS and checks its signature with ring's verifiers; the
    /// decoded header and claims.
    pub(crate) fn verify(jws: &str, key: &SigningKey, secret: Option<&[u8]>) -> (Value, Value) {
        let parts: Vec<&str> = jws.split('.').collect();
        assert_eq!(parts.len(), 3, "a compact JWS has three parts: {jws}");
        let input = format!("{}.{}", parts[0], parts[1]);
        let decode = |s: &str| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(s)
                .expect("base64url without padding")
        };
        let sig = decode(parts[2]);
        let header: Value = serde_json::from_slice(&decode(parts[0])).expect("header JSON");
        let claims: Value = serde_json::from_slice(&decode(parts[1])).expect("claims JSON");
        assert_eq!(header["alg"], key.alg().as_str(), "alg names the algorithm");
        let verified = match key.alg() {
            Alg::Hs256 | Alg::Hs512 => {
                let algorithm = if key.alg() == Alg::Hs256 {
                    hmac::HMAC_SHA256
                } else {
                    hmac::HMAC_SHA512
                };
                let k = hmac::Key::new(algorithm, secret.expect("the shared secret"));
                hmac::verify(&k, input.as_bytes(), &sig).is_ok()
            }
            alg => {
                let verifier: &dyn signature::VerificationAlgorithm = match alg {
                    Alg::Rs256 => &signature::RSA_PKCS1_2048_8192_SHA256,
                    Alg::Ps256 => &signature::RSA_PSS_2048_8192_SHA256,
                    Alg::Es256 => &signature::ECDSA_P256_SHA256_FIXED,
                    _ => &signature::ED25519,
                };
                let public = key
                    .public_key()
                    .expect("an asymmetric key has a public key");
                signature::UnparsedPublicKey::new(verifier, public)
                    .verify(input.as_bytes(), &sig)
                    .is_ok()
            }
        };
        assert!(verified, "the {} signature verifies", key.alg());
        (header, claims)
    }

    #[test]
    fn every_algorithm_signs_a_jws_that_ring_verifies() {
        let ec = generated_pem(&rcgen::PKCS_ECDSA_P256_SHA256);
        let ed = generated_pem(&rcgen::PKCS_ED25519);
        let cases = [
            (RSA_PEM, Some(Alg::Rs256), Alg::Rs256),
            (RSA_PEM, Some(Alg::Ps256), Alg::Ps256),
            (RSA_PEM, None, Alg::Rs256),
            (ec.as_str(), None, Alg::Es256),
            (ed.as_str(), None, Alg::EdDsa),
        ];
        for (pem, asked, expected) in cases {
            let key = SigningKey::from_pem(pem, asked).expect("a usable key");
            assert_eq!(key.alg(), expected, "{asked:?} gives {expected}");
            let jws = key.sign(Map::new(), &json!({"sub": "x"})).expect("signed");
            let (_, claims) = verify(&jws, &key, None);
            assert_eq!(claims["sub"], "x");
        }
        for alg in [Alg::Hs256, Alg::Hs512] {
            let key = SigningKey::hmac(alg, b"a shared secret").expect("an HMAC key");
            let jws = key.sign(Map::new(), &json!({})).expect("signed");
            verify(&jws, &key, Some(b"a shared secret"));
        }
    }

    #[test]
    fn es256_signatures_are_the_fixed_64_byte_form() {
        let key = SigningKey::from_pem(&generated_pem(&rcgen::PKCS_ECDSA_P256_SHA256), None)
            .expect("key");
        let jws = key.sign(Map::new(), &json!({})).expect("signed");
        let sig = jws.rsplit('.').next().expect("signature part");
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(sig)
            .expect("base64url");
        assert_eq!(bytes.len(), 64, "JWS ES256 is r || s, not DER");
    }

    #[test]
    fn pkcs1_rsa_and_sec1_ec_keys_load_like_their_pkcs8_forms() {
        let rsa_pkcs1 = to_pem("RSA PRIVATE KEY", &pkcs8_inner(&pem_der(RSA_PEM)));
        let pkcs8 = SigningKey::from_pem(RSA_PEM, None).expect("PKCS#8");
        let pkcs1 = SigningKey::from_pem(&rsa_pkcs1, None).expect("PKCS#1");
        assert_eq!(pkcs1.public_key(), pkcs8.public_key(), "the same RSA key");
        let jws = pkcs1.sign(Map::new(), &json!({})).expect("signed");
        verify(&jws, &pkcs1, None);

        let ec_pem = generated_pem(&rcgen::PKCS_ECDSA_P256_SHA256);
        let sec1_pem = to_pem("EC PRIVATE KEY", &pkcs8_inner(&pem_der(&ec_pem)));
        let sec1 = SigningKey::from_pem(&sec1_pem, None).expect("SEC1");
        let ec = SigningKey::from_pem(&ec_pem, None).expect("PKCS#8");
        assert_eq!(sec1.alg(), Alg::Es256);
        assert_eq!(sec1.public_key(), ec.public_key(), "the same EC key");
        let jws = sec1.sign(Map::new(), &json!({})).expect("signed");
        verify(&jws, &sec1, None);
    }

    #[test]
    fn unusable_keys_and_mismatched_algorithms_are_named() {
        assert_eq!(
            SigningKey::from_pem("not a pem", None),
            Err(KeyError::NoKey)
        );
        let cert = rcgen::generate_simple_self_signed(vec!["a.example".into()]).expect("cert");
        assert_eq!(
            SigningKey::from_pem(&cert.cert.pem(), None),
            Err(KeyError::NoKey),
            "a certificate is no private key"
        );
        let p384 = generated_pem(&rcgen::PKCS_ECDSA_P384_SHA384);
        assert_eq!(
            SigningKey::from_pem(&p384, None),
            Err(KeyError::Unsupported(
                "an EC key on a curve other than P-256"
            ))
        );
        let broken = to_pem("PRIVATE KEY", &pem_der(RSA_PEM)[..200]);
        assert!(
            matches!(
                SigningKey::from_pem(&broken, None),
                Err(KeyError::Rejected {
                    kind: KeyKind::Rsa,
                    ..
                })
            ),
            "a truncated RSA key is refused as RSA"
        );
        let ec = generated_pem(&rcgen::PKCS_ECDSA_P256_SHA256);
        let err = SigningKey::from_pem(&ec, Some(Alg::Rs256)).expect_err("mismatch");
        assert_eq!(
            err.to_string(),
            "holds an EC P-256 key, but RS256 needs an RSA key"
        );
        assert_eq!(
            SigningKey::from_pem(RSA_PEM, Some(Alg::EdDsa)),
            Err(KeyError::AlgMismatch {
                alg: Alg::EdDsa,
                kind: KeyKind::Rsa
            })
        );
        assert!(SigningKey::hmac(Alg::Es256, b"s").is_err());
    }

    #[test]
    fn keys_compare_by_material_and_never_print_it() {
        let a = SigningKey::from_pem(RSA_PEM, None).expect("key");
        let b = SigningKey::from_pem(RSA_PEM, None).expect("key");
        let pss = SigningKey::from_pem(RSA_PEM, Some(Alg::Ps256)).expect("key");
        let other = SigningKey::from_pem(&generated_pem(&rcgen::PKCS_ED25519), None).expect("key");
        assert_eq!(a, b, "the same key file twice is the same key");
        assert_ne!(a, pss, "another algorithm is another signer");
        assert_ne!(a, other);
        assert_eq!(format!("{a:?}"), "SigningKey(RS256, [redacted])");
    }

    #[test]
    fn ids_are_random_and_thumbprints_are_base64url_sha256() {
        let ids: std::collections::HashSet<String> =
            (0..100).map(|_| random_id().expect("id")).collect();
        assert_eq!(ids.len(), 100, "no identifier repeats");
        assert!(ids.iter().all(|i| i.len() == 22), "128 bits in base64url");
        // SHA-256("abc"), RFC 4634's first test vector.
        assert_eq!(
            x5t_s256(b"abc"),
            "ungWv48Bz-pBQUDeXa4iI7ADYaOWF3qctBD_YfIAFa0"
        );
    }
}
