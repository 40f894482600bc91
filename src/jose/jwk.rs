//! The public half of a key as a JWK (RFC 7517, RFC 7518 §6), its thumbprint
//! (RFC 7638), and keys made here rather than read from a file (DPoP keys).
//!
//! The JWK is written with exactly the members RFC 7638 §3.2 hashes, in
//! lexicographic order and without whitespace: the same text is the `jwk` of
//! a DPoP proof's header and the input of its thumbprint, which providers bind
//! tokens to (`cnf.jkt`, RFC 9449 §6).

use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair};

use super::{base64url, from_pkcs8, sha256, Alg, Key, KeyError, KeyKind, SigningKey};
use crate::secret::Secret;

impl SigningKey {
    /// A new key for `alg` (ES256 or EdDSA), made with the system's random
    /// source; with it, its PKCS#8 document in standard base64, to be stored.
    pub fn generate(alg: Alg) -> Result<(SigningKey, Secret), KeyError> {
        let rng = SystemRandom::new();
        let generated = match alg {
            Alg::Es256 => {
                EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                    .map(|d| d.as_ref().to_vec())
                    .map_err(|_| ())
            }
            Alg::EdDsa => aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(
                &aws_lc_rs::rand::SystemRandom::new(),
            )
            .map(|d| d.as_ref().to_vec())
            .map_err(|_| ()),
            other => {
                return Err(KeyError::Unsupported(match other.key_kind() {
                    KeyKind::Rsa => "an RSA key, which tokenproxy cannot generate",
                    _ => "a shared secret, which is not generated",
                }))
            }
        };
        let document = generated.map_err(|_| KeyError::Rejected {
            kind: alg.key_kind(),
            reason: "the system random source failed".to_owned(),
        })?;
        let der = document.as_ref();
        let key = SigningKey::from_pkcs8_der(der, Some(alg))?;
        let encoded = base64::engine::general_purpose::STANDARD.encode(der);
        Ok((key, Secret::new(encoded)))
    }

    /// A key from a PKCS#8 document in standard base64 (as [`SigningKey::generate`]
    /// returns it), signing with `alg` (default: as for [`SigningKey::from_pem`]).
    pub fn from_pkcs8_base64(encoded: &Secret, alg: Option<Alg>) -> Result<SigningKey, KeyError> {
        let der = base64::engine::general_purpose::STANDARD
            .decode(encoded.expose().trim())
            .map_err(|_| KeyError::NoKey)?;
        SigningKey::from_pkcs8_der(&der, alg)
    }

    /// A key from a PKCS#8 DER document.
    pub(crate) fn from_pkcs8_der(der: &[u8], alg: Option<Alg>) -> Result<SigningKey, KeyError> {
        let (kind, key, material) = from_pkcs8(der)?;
        SigningKey::assemble(kind, key, material, alg)
    }

    /// The public key as a JWK holding the members RFC 7638 hashes, in its
    /// order (`{"crv":"P-256","kty":"EC","x":…,"y":…}`); `None` for a shared secret.
    pub fn public_jwk(&self) -> Option<String> {
        match &*self.key {
            Key::Ecdsa(_) => {
                // The uncompressed point: 0x04 || x || y, 32 bytes each.
                let point = self.public_key()?;
                let (x, y) = point.get(1..)?.split_at_checked(32)?;
                Some(format!(
                    r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
                    base64url(x),
                    base64url(y)
                ))
            }
            Key::Ed25519(_) => Some(format!(
                r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
                base64url(self.public_key()?)
            )),
            Key::Rsa(_) => {
                let (n, e) = rsa_public_parts(self.public_key()?)?;
                Some(format!(
                    r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#,
                    base64url(e),
                    base64url(n)
                ))
            }
            Key::Hmac(_) => None,
        }
    }

    /// The JWK SHA-256 thumbprint of the public key (RFC 7638), base64url: the
    /// `jkt` a DPoP-bound token names; `None` for a shared secret.
    pub fn jwk_thumbprint(&self) -> Option<String> {
        self.public_jwk()
            .map(|jwk| base64url(&sha256(jwk.as_bytes())))
    }
}

/// The modulus and exponent of a PKCS#1 `RSAPublicKey` (a SEQUENCE of two
/// INTEGERs, as ring gives it), without the INTEGERs' sign bytes.
fn rsa_public_parts(der: &[u8]) -> Option<(&[u8], &[u8])> {
    let (tag, body, _) = der_item(der)?;
    if tag != 0x30 {
        return None;
    }
    let (tag_n, n, rest) = der_item(body)?;
    let (tag_e, e, _) = der_item(rest)?;
    if tag_n != 0x02 || tag_e != 0x02 {
        return None;
    }
    Some((unsigned(n), unsigned(e)))
}

/// A DER INTEGER's content without its leading zero (sign) bytes.
fn unsigned(i: &[u8]) -> &[u8] {
    let skip = i.iter().take_while(|b| **b == 0).count();
    &i[skip.min(i.len().saturating_sub(1))..]
}

/// One DER item: its tag, its content and what follows it.
fn der_item(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (len_bytes, rest) = rest.split_at(n);
        let len = len_bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, rest)
    };
    let (content, after) = rest.split_at_checked(len)?;
    Some((tag, content, after))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jose::tests::{generated_pem, RSA_PEM};
    use serde_json::Value;

    fn jwk(key: &SigningKey) -> Value {
        serde_json::from_str(&key.public_jwk().expect("an asymmetric key")).expect("JSON")
    }

    #[test]
    fn the_rfc_7638_example_key_has_the_rfc_7638_thumbprint() {
        // RFC 7638 §3.1: the example RSA key's thumbprint. Its public key is
        // rebuilt as the PKCS#1 DER ring hands out, then read back.
        let n = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode("0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw")
            .expect("n");
        let e = [0x01, 0x00, 0x01];
        let mut body = vec![0x02, 0x82, 0x01, 0x01, 0x00];
        body.extend_from_slice(&n);
        body.extend_from_slice(&[0x02, 0x03]);
        body.extend_from_slice(&e);
        let mut der = vec![0x30, 0x82];
        der.extend_from_slice(&u16::try_from(body.len()).expect("short").to_be_bytes());
        der.extend_from_slice(&body);
        let (n_read, e_read) = rsa_public_parts(&der).expect("parsed");
        assert_eq!(n_read, &n[..], "the sign byte is dropped");
        assert_eq!(e_read, &e[..]);
        let jwk = format!(
            r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#,
            base64url(e_read),
            base64url(n_read)
        );
        assert_eq!(
            base64url(&sha256(jwk.as_bytes())),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
    }

    #[test]
    fn every_asymmetric_key_has_a_public_jwk_without_private_members() {
        let rsa = SigningKey::from_pem(RSA_PEM, None).expect("rsa");
        let ec =
            SigningKey::from_pem(&generated_pem(&rcgen::PKCS_ECDSA_P256_SHA256), None).expect("ec");
        let ed = SigningKey::from_pem(&generated_pem(&rcgen::PKCS_ED25519), None).expect("ed");
        for (key, kty, members) in [
            (&rsa, "RSA", &["e", "kty", "n"][..]),
            (&ec, "EC", &["crv", "kty", "x", "y"][..]),
            (&ed, "OKP", &["crv", "kty", "x"][..]),
        ] {
            let jwk = jwk(key);
            assert_eq!(jwk["kty"], kty);
            let names: Vec<&str> = jwk
                .as_object()
                .expect("an object")
                .keys()
                .map(String::as_str)
                .collect();
            assert_eq!(names, members, "exactly the RFC 7638 members, in order");
            let thumbprint = key.jwk_thumbprint().expect("a thumbprint");
            assert_eq!(thumbprint.len(), 43, "base64url of 32 bytes");
        }
        let ec_jwk = jwk(&ec);
        let decode = |v: &Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(v.as_str().expect("a string"))
                .expect("base64url")
        };
        let mut point = vec![4u8];
        point.extend(decode(&ec_jwk["x"]));
        point.extend(decode(&ec_jwk["y"]));
        assert_eq!(Some(&point[..]), ec.public_key(), "x and y are the point");
        assert_eq!(
            Some(decode(&jwk(&ed)["x"]).as_slice()),
            ed.public_key(),
            "x is the Ed25519 public key"
        );
        let hmac = SigningKey::hmac(Alg::Hs256, b"secret").expect("hmac");
        assert!(hmac.public_jwk().is_none() && hmac.jwk_thumbprint().is_none());
    }

    #[test]
    fn generated_keys_sign_and_come_back_from_their_pkcs8() {
        for alg in [Alg::Es256, Alg::EdDsa] {
            let (key, pkcs8) = SigningKey::generate(alg).expect("generated");
            assert_eq!(key.alg(), alg);
            let again = SigningKey::from_pkcs8_base64(&pkcs8, Some(alg)).expect("read back");
            assert_eq!(again, key, "the stored form is the same key");
            assert_eq!(again.jwk_thumbprint(), key.jwk_thumbprint());
            let (other, _) = SigningKey::generate(alg).expect("generated");
            assert_ne!(
                other.jwk_thumbprint(),
                key.jwk_thumbprint(),
                "a new key each time"
            );
            let jws = key
                .sign(serde_json::Map::new(), &serde_json::json!({}))
                .expect("signed");
            crate::jose::tests::verify(&jws, &key, None);
        }
        assert!(SigningKey::generate(Alg::Rs256).is_err());
        assert!(SigningKey::generate(Alg::Hs256).is_err());
        assert_eq!(
            SigningKey::from_pkcs8_base64(&Secret::new("not base64!"), None),
            Err(KeyError::NoKey)
        );
    }
}
