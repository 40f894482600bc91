//! The `client_assertion` of one token request (RFC 7523 §2.2, RFC 7521 §4.2).
//!
//! A signed assertion is made anew for every request, retries and refreshes
//! included: providers accept a `jti` once, and FAPI 2.0 wants short-lived
//! assertions. Its claims are `iss` = `sub` = client_id, `aud` (the URL the
//! request goes to, or `assertion_audience`), a random `jti`, `iat` and `exp`
//! [`ASSERTION_LIFETIME`] later; its header carries `kid` and `x5t#S256` when
//! configured. An assertion made elsewhere is read from its file for every
//! request, so a rotated one (a projected service-account token) is used at once.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use crate::config::{AssertionSigner, ClientAssertion, TokenConfig, ASSERTION_LIFETIME};
use crate::jose;
use crate::secret::Secret;

/// The two body parameters of a client assertion.
pub(crate) struct Assertion<'a> {
    /// `client_assertion_type`.
    pub(crate) assertion_type: &'a str,
    /// `client_assertion`.
    pub(crate) value: Secret,
}

/// The assertion for a request to `url` at wall time `now`, when `config`
/// authenticates with one; `Err` says why none could be made (never a secret).
pub(crate) async fn for_request<'a>(
    config: &'a TokenConfig,
    url: &http::Uri,
    now: SystemTime,
) -> Result<Option<Assertion<'a>>, String> {
    let (assertion_type, value) = match &config.assertion {
        None => return Ok(None),
        Some(ClientAssertion::Signed(signer)) => {
            let client_id = config.client_id.as_deref().unwrap_or_default();
            let jws = sign(signer, client_id, url, now)?;
            (crate::config::JWT_BEARER_ASSERTION, Secret::new(jws))
        }
        Some(ClientAssertion::File {
            path,
            assertion_type,
        }) => {
            let owned = path.clone();
            let read = tokio::task::spawn_blocking(move || read_bounded(&owned));
            let text = match read.await {
                Ok(Ok(text)) => text,
                Ok(Err(e)) => {
                    return Err(format!(
                        "cannot read client_assertion_file {}: {e}",
                        path.display()
                    ))
                }
                Err(e) => return Err(format!("reading client_assertion_file failed: {e}")),
            };
            let jwt = text.trim();
            if jwt.is_empty() {
                return Err(format!("client_assertion_file {} is empty", path.display()));
            }
            (assertion_type.as_str(), Secret::new(jwt))
        }
    };
    Ok(Some(Assertion {
        assertion_type,
        value,
    }))
}

/// The most read of a `client_assertion_file`: a projected service-account
/// token is a few KiB, so a bigger file is not one.
const MAX_ASSERTION_FILE_BYTES: usize = 64 * 1024;

/// The file's text, when it holds at most [`MAX_ASSERTION_FILE_BYTES`].
fn read_bounded(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::Read as _;
    let mut text = String::new();
    let limit = MAX_ASSERTION_FILE_BYTES as u64 + 1;
    std::fs::File::open(path)?
        .take(limit)
        .read_to_string(&mut text)?;
    if text.len() > MAX_ASSERTION_FILE_BYTES {
        return Err(std::io::Error::other(format!(
            "it is larger than {MAX_ASSERTION_FILE_BYTES} bytes: not a JWT"
        )));
    }
    Ok(text)
}

/// A new signed assertion for `client_id` to `url`.
fn sign(
    signer: &AssertionSigner,
    client_id: &str,
    url: &http::Uri,
    now: SystemTime,
) -> Result<String, String> {
    let iat = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let audience = match &signer.audience {
        Some(aud) => aud.clone(),
        // The endpoint's URL as providers compare it: without a query.
        None => crate::secret::display_url(url),
    };
    let jti = jose::random_id().map_err(|e| e.to_string())?;
    let claims = json!({
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "jti": jti,
        "iat": iat,
        "exp": iat + ASSERTION_LIFETIME.as_secs(),
    });
    let mut header = Map::new();
    if let Some(kid) = &signer.key_id {
        header.insert("kid".to_owned(), Value::from(kid.as_str()));
    }
    if let Some(x5t) = &signer.x5t_s256 {
        header.insert("x5t#S256".to_owned(), Value::from(x5t.as_str()));
    }
    signer.key.sign(header, &claims).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::time::Duration;

    use super::*;
    use crate::config::{self, MapEnv};
    use crate::jose::tests::{generated_pem, verify, RSA_PEM};
    use crate::jose::Alg;

    const TOKEN_URL: &str = "https://as.bank.example/oauth2/token";
    const CSJWT_SECRET: &str = "csjwt-secret-Lp4Rw8-for-hmac";

    struct Keys {
        env: MapEnv,
        ec_cert_der: Vec<u8>,
    }

    fn keys() -> Keys {
        let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let cert = rcgen::CertificateParams::new(vec!["sidecar".into()])
            .expect("params")
            .self_signed(&ec)
            .expect("certificate");
        let env = MapEnv::new()
            .file("/k/rsa.pem", RSA_PEM)
            .file("/k/ec.pem", ec.serialize_pem())
            .file("/k/ec.crt", cert.pem())
            .file("/k/ed.pem", generated_pem(&rcgen::PKCS_ED25519));
        Keys {
            env,
            ec_cert_der: cert.der().to_vec(),
        }
    }

    fn token_config(env: &MapEnv, extra: &str) -> TokenConfig {
        let text = format!(
            "[clients.bank]\nlisten = \"127.0.0.1:8080\"\nupstream = \"https://api.bank.example\"\n\
             [clients.bank.token]\nurl = \"{TOKEN_URL}?tenant=a\"\nclient_id = \"sidecar-pkjwt\"\n{extra}\n"
        );
        match config::from_str(&text, None, env) {
            Ok(mut c) => c.clients.remove(0).token,
            Err(e) => panic!("valid config expected: {e}"),
        }
    }

    fn at(seconds: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(seconds)
    }

    /// One assertion for the token URL at `now`, verified; its header and claims.
    async fn made(config: &TokenConfig, now: SystemTime, secret: Option<&[u8]>) -> (Value, Value) {
        let url: http::Uri = config.url.clone();
        let a = for_request(config, &url, now)
            .await
            .expect("an assertion is made")
            .expect("this client authenticates with one");
        assert_eq!(a.assertion_type, config::JWT_BEARER_ASSERTION);
        let Some(ClientAssertion::Signed(signer)) = &config.assertion else {
            panic!("a signed assertion is configured");
        };
        verify(a.value.expose(), &signer.key, secret)
    }

    #[tokio::test]
    async fn claims_name_the_client_the_token_url_and_a_60_second_window() {
        let k = keys();
        let c = token_config(
            &k.env,
            "client_auth = \"private_key_jwt\"\nsigning_key_file = \"/k/ec.pem\"",
        );
        let (header, claims) = made(&c, at(1_700_000_000), None).await;
        assert_eq!(claims["iss"], "sidecar-pkjwt", "iss is the client_id");
        assert_eq!(claims["sub"], "sidecar-pkjwt", "sub is the client_id");
        assert_eq!(
            claims["aud"], TOKEN_URL,
            "aud defaults to the token URL, without its query"
        );
        assert_eq!(claims["iat"], 1_700_000_000u64, "iat is the wall clock now");
        assert_eq!(claims["exp"], 1_700_000_060u64, "exp is 60 s after iat");
        assert_eq!(header["alg"], "ES256");
        assert!(
            header.get("kid").is_none() && header.get("x5t#S256").is_none(),
            "no kid or x5t#S256 unless configured: {header}"
        );
    }

    #[tokio::test]
    async fn every_assertion_has_a_new_jti() {
        let k = keys();
        let c = token_config(
            &k.env,
            "client_auth = \"private_key_jwt\"\nsigning_key_file = \"/k/rsa.pem\"",
        );
        let mut jtis = HashSet::new();
        for _ in 0..20 {
            let (_, claims) = made(&c, at(1_700_000_000), None).await;
            let jti = claims["jti"].as_str().expect("a jti string").to_owned();
            assert!(jti.len() >= 22, "128 random bits: {jti}");
            assert!(
                jtis.insert(jti),
                "a jti must never repeat, even within one second"
            );
        }
    }

    #[tokio::test]
    async fn the_audience_the_kid_and_the_certificate_thumbprint_are_configurable() {
        let k = keys();
        let c = token_config(
            &k.env,
            "client_auth = \"private_key_jwt\"\nsigning_key_file = \"/k/ec.pem\"\nkey_id = \"es256\"\n\
             certificate_file = \"/k/ec.crt\"\nassertion_audience = \"https://as.bank.example\"",
        );
        let (header, claims) = made(&c, at(1_700_000_000), None).await;
        assert_eq!(
            claims["aud"], "https://as.bank.example",
            "FAPI 2.0: the issuer"
        );
        assert_eq!(header["kid"], "es256");
        assert_eq!(
            header["x5t#S256"],
            jose::x5t_s256(&k.ec_cert_der),
            "x5t#S256 is the certificate's SHA-256 thumbprint"
        );
    }

    #[tokio::test]
    async fn every_private_key_algorithm_and_client_secret_jwt_verify() {
        let k = keys();
        for (extra, alg) in [
            ("signing_key_file = \"/k/rsa.pem\"", Alg::Rs256),
            (
                "signing_key_file = \"/k/rsa.pem\"\nsigning_alg = \"PS256\"",
                Alg::Ps256,
            ),
            ("signing_key_file = \"/k/ec.pem\"", Alg::Es256),
            ("signing_key_file = \"/k/ed.pem\"", Alg::EdDsa),
        ] {
            let c = token_config(
                &k.env,
                &format!("client_auth = \"private_key_jwt\"\n{extra}"),
            );
            let (header, _) = made(&c, at(1), None).await;
            assert_eq!(header["alg"], alg.as_str());
        }
        for alg in [Alg::Hs256, Alg::Hs512] {
            let c = token_config(
                &k.env,
                &format!(
                    "client_auth = \"client_secret_jwt\"\nclient_secret = \"{CSJWT_SECRET}\"\nsigning_alg = \"{alg}\""
                ),
            );
            let (header, claims) = made(&c, at(1), Some(CSJWT_SECRET.as_bytes())).await;
            assert_eq!(header["alg"], alg.as_str());
            assert_eq!(claims["iss"], "sidecar-pkjwt");
        }
    }

    #[tokio::test]
    async fn an_assertion_file_is_read_again_for_every_request() {
        let dir = std::env::temp_dir().join(format!("tokenproxy-assertion-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("token");
        std::fs::write(&path, "a.b.c\n").expect("write");
        let env = MapEnv::new().file(&path, "a.b.c");
        let c = token_config(
            &env,
            &format!(
                "client_auth = \"client_assertion\"\nclient_assertion_file = \"{}\"",
                path.display()
            ),
        );
        let url: http::Uri = c.url.clone();
        let first = for_request(&c, &url, at(1))
            .await
            .expect("read")
            .expect("some");
        assert_eq!(first.value.expose(), "a.b.c", "the file's JWT, trimmed");
        assert_eq!(first.assertion_type, config::JWT_BEARER_ASSERTION);
        std::fs::write(&path, "d.e.f").expect("rotate");
        let second = for_request(&c, &url, at(2))
            .await
            .expect("read")
            .expect("some");
        assert_eq!(
            second.value.expose(),
            "d.e.f",
            "a rotated file is used at once"
        );
        std::fs::remove_file(&path).expect("remove");
        let err = match for_request(&c, &url, at(3)).await {
            Err(e) => e,
            Ok(_) => panic!("a missing file is an error"),
        };
        assert!(
            err.contains("cannot read client_assertion_file")
                && err.contains(&path.display().to_string()),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A projected token is a few KiB; a file that is not one (a log, a
    /// device) is refused without being read whole.
    #[tokio::test]
    async fn an_assertion_file_larger_than_a_jwt_can_be_is_refused_unread() {
        let dir =
            std::env::temp_dir().join(format!("tokenproxy-assertion-big-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("token");
        std::fs::write(&path, "a.b.c").expect("write");
        let env = MapEnv::new().file(&path, "a.b.c");
        let c = token_config(
            &env,
            &format!(
                "client_auth = \"client_assertion\"\nclient_assertion_file = \"{}\"",
                path.display()
            ),
        );
        std::fs::write(&path, vec![b'x'; MAX_ASSERTION_FILE_BYTES + 1]).expect("grow");
        let url: http::Uri = c.url.clone();
        let err = match for_request(&c, &url, at(1)).await {
            Err(e) => e,
            Ok(_) => panic!("an oversized file is an error"),
        };
        assert!(err.contains("larger than"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn clients_without_assertions_get_none() {
        let c = token_config(&MapEnv::new(), "client_secret = \"s\"");
        let url: http::Uri = c.url.clone();
        assert!(for_request(&c, &url, at(1)).await.expect("ok").is_none());
    }
}
