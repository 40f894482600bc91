//! Client authentication by signed JWT (RFC 7523) and by TLS client
//! certificate (RFC 8705): the signing key and its algorithm, `kid`,
//! `x5t#S256`, the audience, an assertion file made by someone else, and the
//! rules that tie each key to the `client_auth` values that read it.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use super::*;
use crate::jose::{self, Alg, KeyError};

/// The keys of `[clients.NAME.token]` that only JWT client authentication reads.
#[derive(Default)]
pub(super) struct RawAssertion {
    pub(super) signing_key_file: Option<String>,
    pub(super) signing_alg: Option<String>,
    pub(super) key_id: Option<String>,
    pub(super) certificate_file: Option<String>,
    pub(super) assertion_audience: Option<String>,
    pub(super) client_assertion_file: Option<String>,
    pub(super) client_assertion_type: Option<String>,
}

const PRIVATE_KEY: &[ClientAuth] = &[ClientAuth::PrivateKeyJwt];
const SIGNED: &[ClientAuth] = &[ClientAuth::PrivateKeyJwt, ClientAuth::ClientSecretJwt];
const FROM_FILE: &[ClientAuth] = &[ClientAuth::ClientAssertion];
const KEY_ALGS: &[Alg] = &[Alg::Rs256, Alg::Ps256, Alg::Es256, Alg::EdDsa];
const SECRET_ALGS: &[Alg] = &[Alg::Hs256, Alg::Hs512];
const KEY_HINT: &str = "use the unencrypted PEM private key whose public key the provider registered: PKCS#8 (BEGIN PRIVATE KEY), PKCS#1 (BEGIN RSA PRIVATE KEY) or SEC1 (BEGIN EC PRIVATE KEY); openssl pkcs8 -topk8 -nocrypt converts other forms";

fn quoted(auths: &[ClientAuth]) -> String {
    let names: Vec<String> = auths
        .iter()
        .map(|a| format!("\"{}\"", a.as_str()))
        .collect();
    names.join(" or ")
}

fn alg_names(algs: &[Alg]) -> String {
    let names: Vec<&str> = algs.iter().map(|a| a.as_str()).collect();
    names.join(", ")
}

/// The assertion `client_auth` needs (`None` for the methods without one),
/// after refusing every assertion key that `client_auth` would not read.
pub(super) fn build_assertion(
    t: &Table<'_>,
    raw: RawAssertion,
    auth: ClientAuth,
    client_secret: Option<&Secret>,
) -> Result<Option<ClientAssertion>, ConfigError> {
    let keys = [
        (
            "signing_key_file",
            raw.signing_key_file.is_some(),
            PRIVATE_KEY,
        ),
        ("signing_alg", raw.signing_alg.is_some(), SIGNED),
        ("key_id", raw.key_id.is_some(), SIGNED),
        (
            "certificate_file",
            raw.certificate_file.is_some(),
            PRIVATE_KEY,
        ),
        (
            "assertion_audience",
            raw.assertion_audience.is_some(),
            SIGNED,
        ),
        (
            "client_assertion_file",
            raw.client_assertion_file.is_some(),
            FROM_FILE,
        ),
        (
            "client_assertion_type",
            raw.client_assertion_type.is_some(),
            FROM_FILE,
        ),
    ];
    for (k, set, used_by) in keys {
        if set && !used_by.contains(&auth) {
            let problem = format!(
                "is only used with client_auth = {}, not \"{}\"",
                quoted(used_by),
                auth.as_str()
            );
            let hint = format!("remove it, or set client_auth = {}", quoted(used_by));
            return Err(t.err(k, problem).with_hint(hint));
        }
    }
    let assertion = match auth {
        ClientAuth::PrivateKeyJwt => ClientAssertion::Signed(signed_by_key(t, raw)?),
        ClientAuth::ClientSecretJwt => {
            ClientAssertion::Signed(signed_by_secret(t, raw, client_secret)?)
        }
        ClientAuth::ClientAssertion => from_file(t, raw)?,
        _ => return Ok(None),
    };
    Ok(Some(assertion))
}

/// `signing_alg` among `algs`; `None` when unset.
fn signing_alg(
    t: &Table<'_>,
    raw: Option<String>,
    algs: &[Alg],
) -> Result<Option<Alg>, ConfigError> {
    let options: Vec<(&str, Option<Alg>)> = algs.iter().map(|a| (a.as_str(), Some(*a))).collect();
    t.choice("signing_alg", raw, Some(None), &options)
}

fn required(
    t: &Table<'_>,
    k: &str,
    raw: Option<String>,
    auth: ClientAuth,
    hint: &str,
) -> Result<String, ConfigError> {
    raw.ok_or_else(|| {
        t.err(
            k,
            format!("is required when client_auth = \"{}\"", auth.as_str()),
        )
        .with_hint(hint)
    })
}

fn signed_by_key(t: &Table<'_>, raw: RawAssertion) -> Result<AssertionSigner, ConfigError> {
    let alg = signing_alg(t, raw.signing_alg, KEY_ALGS)?;
    let raw_path = required(
        t,
        "signing_key_file",
        raw.signing_key_file,
        ClientAuth::PrivateKeyJwt,
        "point it at the PEM private key whose public key the provider has registered",
    )?;
    let (path, pem) = t.x.read_secret(&t.key("signing_key_file"), &raw_path)?;
    let key = SigningKey::from_pem(&pem, alg).map_err(|e| match e {
        KeyError::AlgMismatch { kind, .. } => {
            let hint = format!(
                "with this key use {}, or remove signing_alg to use {}",
                alg_names(kind.algs()),
                kind.algs()[0]
            );
            t.err("signing_alg", format!("{} {e}", path.display()))
                .with_hint(hint)
        }
        e => t
            .err("signing_key_file", format!("{} {e}", path.display()))
            .with_hint(KEY_HINT),
    })?;
    let (certificate_file, x5t_s256) = match raw.certificate_file {
        None => (None, None),
        Some(raw_path) => {
            let (path, thumbprint) = certificate_thumbprint(t, &raw_path, &key)?;
            (Some(path), Some(thumbprint))
        }
    };
    Ok(AssertionSigner {
        key,
        key_file: Some(path),
        key_id: t.non_empty("key_id", raw.key_id)?,
        certificate_file,
        x5t_s256,
        audience: t.non_empty("assertion_audience", raw.assertion_audience)?,
    })
}

/// The `x5t#S256` of the first certificate in the file, which must carry
/// `key`'s public key: a provider that finds keys by thumbprint would
/// otherwise check the signature against another key.
fn certificate_thumbprint(
    t: &Table<'_>,
    raw_path: &str,
    key: &SigningKey,
) -> Result<(PathBuf, String), ConfigError> {
    const K: &str = "certificate_file";
    let hint =
        "use the PEM certificate issued for the signing key, as registered with the provider";
    let (path, pem) = tls::read_certificates(t, K, raw_path, hint)?;
    let first: CertificateDer<'_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| {
            t.err(K, format!("{} holds no PEM certificate", path.display()))
                .with_hint(hint)
        })?;
    // The public key is a BIT STRING inside the certificate's DER, byte for byte.
    let matches = key
        .public_key()
        .is_some_and(|public| first.as_ref().windows(public.len()).any(|w| w == public));
    if !matches {
        let problem = format!(
            "the first certificate in {} is not for the key in signing_key_file",
            path.display()
        );
        return Err(t.err(K, problem).with_hint(
            "use the certificate issued for that key; its public key must be the key's",
        ));
    }
    Ok((path, jose::x5t_s256(first.as_ref())))
}

fn signed_by_secret(
    t: &Table<'_>,
    raw: RawAssertion,
    client_secret: Option<&Secret>,
) -> Result<AssertionSigner, ConfigError> {
    let alg = signing_alg(t, raw.signing_alg, SECRET_ALGS)?.unwrap_or(Alg::Hs256);
    let secret = client_secret.ok_or_else(|| {
        t.err("client_secret", "is required when client_auth = \"client_secret_jwt\"")
            .with_hint("set client_secret or client_secret_file: the assertions are signed (HS256 or HS512) with it")
    })?;
    let key = SigningKey::hmac(alg, secret.expose().as_bytes()).map_err(|e| {
        t.err("signing_alg", e.to_string())
            .with_hint(format!("use {}", alg_names(SECRET_ALGS)))
    })?;
    Ok(AssertionSigner {
        key,
        key_file: None,
        key_id: t.non_empty("key_id", raw.key_id)?,
        certificate_file: None,
        x5t_s256: None,
        audience: t.non_empty("assertion_audience", raw.assertion_audience)?,
    })
}

/// `client_assertion_file` is read now, so `check` finds a missing or wrong
/// file, and again for every token request, so a rotated one is used.
fn from_file(t: &Table<'_>, raw: RawAssertion) -> Result<ClientAssertion, ConfigError> {
    const K: &str = "client_assertion_file";
    let raw_path = required(
        t,
        K,
        raw.client_assertion_file,
        ClientAuth::ClientAssertion,
        "point it at the file the assertion is written to, such as a projected service-account token",
    )?;
    let (path, content) = t.x.read_secret(&t.key(K), &raw_path)?;
    let jwt = content.trim();
    let parts = jwt.split('.').count();
    if jwt.is_empty() || !(parts == 3 || parts == 5) || jwt.contains(char::is_whitespace) {
        let problem = if jwt.is_empty() {
            format!("{} is empty", path.display())
        } else {
            format!("{} does not hold a JWT", path.display())
        };
        return Err(t
            .err(K, problem)
            .with_hint("the file must hold one compact JWT (header.payload.signature)"));
    }
    let assertion_type = t
        .non_empty("client_assertion_type", raw.client_assertion_type)?
        .unwrap_or_else(|| JWT_BEARER_ASSERTION.to_owned());
    Ok(ClientAssertion::File {
        path,
        assertion_type,
    })
}

/// `tls_client_auth` presents the certificate of `[clients.NAME.token.tls]`:
/// it must be configured, and every token URL must be https.
pub(super) fn check_tls_client_auth(t: &Table<'_>, token: &TokenConfig) -> Result<(), ConfigError> {
    if token.client_auth != ClientAuth::TlsClientAuth {
        return Ok(());
    }
    if token.tls.client_cert_pem.is_none() {
        let problem = "is required when client_auth = \"tls_client_auth\"";
        let hint = format!(
            "set client_cert_file and client_key_file in [{}] to the certificate the provider registered for this client",
            t.key("tls")
        );
        return Err(t.err("tls.client_cert_file", problem).with_hint(hint));
    }
    let urls = [
        ("url", Some(&token.url)),
        ("refresh_url", token.refresh_url.as_ref()),
    ];
    for (k, url) in urls {
        if url.is_some_and(|u| u.scheme() != Some(&Scheme::HTTPS)) {
            let problem = "is not https, and client_auth = \"tls_client_auth\" presents its certificate only over TLS";
            let hint = "use the provider's https token endpoint (metadata may list it as mtls_endpoint_aliases.token_endpoint)";
            return Err(t.err(k, problem).with_hint(hint));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
