//! `[clients.NAME.tls]` and `[clients.NAME.token.tls]`: how to trust and
//! authenticate to an upstream or token endpoint over TLS.
//!
//! PEM files are read (through the injected lookup) and checked when the
//! config is loaded, so `check` catches a bad bundle and a reload picks up a
//! rotated certificate.

use std::path::PathBuf;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

use super::{ConfigError, Table};
use crate::secret::Secret;

/// The raw `tls` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) ca_file: Option<String>,
    pub(super) system_roots: Option<bool>,
    pub(super) client_cert_file: Option<String>,
    pub(super) client_key_file: Option<String>,
    pub(super) server_name: Option<String>,
    pub(super) min_version: Option<String>,
}

/// Lowest TLS version accepted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsVersion {
    /// TLS 1.2 (and 1.3).
    #[default]
    V1_2,
    /// TLS 1.3 only.
    V1_3,
}

/// Validated TLS settings; the default trusts the system's and Mozilla's roots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsConfig {
    /// Extra trusted CA certificates (PEM), from `ca_file`.
    pub ca_pem: Option<String>,
    /// Where `ca_pem` came from, for display.
    pub ca_file: Option<PathBuf>,
    /// Whether the system's and Mozilla's roots are trusted too (default true).
    pub system_roots: bool,
    /// Client certificate chain (PEM) for mutual TLS, from `client_cert_file`.
    pub client_cert_pem: Option<String>,
    /// Its private key (PEM), from `client_key_file`.
    pub client_key_pem: Option<Secret>,
    /// Name to send in SNI and to verify the server certificate against, instead of the URL's host.
    pub server_name: Option<String>,
    /// Lowest TLS version accepted (default 1.2).
    pub min_version: TlsVersion,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            ca_pem: None,
            ca_file: None,
            system_roots: true,
            client_cert_pem: None,
            client_key_pem: None,
            server_name: None,
            min_version: TlsVersion::V1_2,
        }
    }
}

impl TlsConfig {
    /// Whether anything differs from the default.
    pub fn is_default(&self) -> bool {
        *self == TlsConfig::default()
    }

    /// One line for `check`; never the key.
    pub fn summary(&self) -> String {
        if self.is_default() {
            return "system + bundled roots".to_owned();
        }
        let mut parts = Vec::new();
        if let Some(f) = &self.ca_file {
            parts.push(format!("ca_file {}", f.display()));
        }
        if !self.system_roots {
            parts.push("no system roots".to_owned());
        }
        if self.client_cert_pem.is_some() {
            parts.push("client certificate [key redacted]".to_owned());
        }
        if let Some(n) = &self.server_name {
            parts.push(format!("server_name {n}"));
        }
        if self.min_version == TlsVersion::V1_3 {
            parts.push("min TLS 1.3".to_owned());
        }
        parts.join(", ")
    }
}

/// Parses `cert` as a trust anchor, as the TLS client does with `ca_file`.
fn webpki_anchor(cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
    rustls::RootCertStore::empty().add(cert.clone())
}

/// Reads the PEM file at key `k`, which must hold at least one certificate:
/// its resolved path and content.
pub(super) fn read_certificates(
    t: &Table<'_>,
    k: &str,
    raw_path: &str,
    hint: &str,
) -> Result<(PathBuf, String), ConfigError> {
    let (path, pem) = t.x.read(&t.key(k), raw_path)?;
    let mut count = 0;
    for (i, cert) in CertificateDer::pem_slice_iter(pem.as_bytes()).enumerate() {
        // Parsed as the client will parse it, so that a file `check` accepts
        // cannot fail later (at a reload, say) while the client is rebuilt.
        let parsed = cert
            .map_err(|e| e.to_string())
            .and_then(|c| webpki_anchor(&c).map_err(|e| e.to_string()));
        if let Err(e) = parsed {
            return Err(t
                .err(
                    k,
                    format!(
                        "certificate {} in {} is not a valid X.509 certificate: {e}",
                        i + 1,
                        path.display()
                    ),
                )
                .with_hint(hint));
        }
        count += 1;
    }
    if count == 0 {
        return Err(t
            .err(k, format!("{} holds no PEM certificate", path.display()))
            .with_hint(hint));
    }
    Ok((path, pem))
}

pub(super) fn build_tls(raw: Option<RawTls>, t: &Table<'_>) -> Result<TlsConfig, ConfigError> {
    let Some(raw) = raw else {
        return Ok(TlsConfig::default());
    };
    let mut p = super::Problems::default();
    let mut tls = TlsConfig::default();
    let mut ca_unreadable = false;
    if let Some(path) = raw.ca_file {
        match p.take(read_certificates(
            t,
            "ca_file",
            &path,
            "use a PEM bundle with -----BEGIN CERTIFICATE----- blocks",
        )) {
            Some((path, pem)) => {
                tls.ca_pem = Some(pem);
                tls.ca_file = Some(path);
            }
            None => ca_unreadable = true,
        }
    }
    tls.system_roots = raw.system_roots.unwrap_or(true);
    if !tls.system_roots && tls.ca_pem.is_none() && !ca_unreadable {
        p.add(
            t.err(
                "system_roots",
                "is false but no ca_file is set: nothing would be trusted",
            )
            .with_hint("set ca_file, or remove system_roots"),
        );
    }
    if let Some((cert_pem, key_pem)) = p
        .take(client_certificate(
            raw.client_cert_file,
            raw.client_key_file,
            t,
        ))
        .flatten()
    {
        tls.client_cert_pem = Some(cert_pem);
        tls.client_key_pem = Some(key_pem);
    }
    if let Some(name) = raw.server_name {
        tls.server_name = p.take(server_name(&name, t));
    }
    if let Some(min_version) = p.take(t.choice(
        "min_version",
        raw.min_version,
        Some(TlsVersion::V1_2),
        &[("1.2", TlsVersion::V1_2), ("1.3", TlsVersion::V1_3)],
    )) {
        tls.min_version = min_version;
    }
    p.finish()?;
    Ok(tls)
}

/// `client_cert_file` and `client_key_file`, both or neither: the certificate
/// chain and the key for mutual TLS.
fn client_certificate(
    cert: Option<String>,
    key: Option<String>,
    t: &Table<'_>,
) -> Result<Option<(String, Secret)>, ConfigError> {
    match (cert, key) {
        (Some(cert), Some(key)) => {
            let mut p = super::Problems::default();
            let cert = p.take(read_certificates(
                t,
                "client_cert_file",
                &cert,
                "use the client certificate (and its chain) in PEM",
            ));
            let key = p.take(client_key(&key, t));
            match (cert, key) {
                (Some((_, cert_pem)), Some(key_pem)) => Ok(Some((cert_pem, key_pem))),
                _ => Err(p.into_error()),
            }
        }
        (Some(_), None) => Err(t
            .err("client_key_file", "is required with client_cert_file")
            .with_hint("set both for mutual TLS")),
        (None, Some(_)) => Err(t
            .err("client_cert_file", "is required with client_key_file")
            .with_hint("set both for mutual TLS")),
        (None, None) => Ok(None),
    }
}

fn client_key(path: &str, t: &Table<'_>) -> Result<Secret, ConfigError> {
    let (key_path, key_pem) = t.x.read_secret(&t.key("client_key_file"), path)?;
    if PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).is_err() {
        return Err(t
            .err(
                "client_key_file",
                format!("{} holds no PEM private key", key_path.display()),
            )
            .with_hint("use an unencrypted PKCS#8, PKCS#1 or SEC1 key in PEM"));
    }
    Ok(Secret::new(key_pem))
}

fn server_name(raw: &str, t: &Table<'_>) -> Result<String, ConfigError> {
    let name = t.string("server_name", raw)?;
    if rustls::pki_types::ServerName::try_from(name.as_str()).is_err() {
        return Err(t
            .err(
                "server_name",
                format!("{name:?} is not a DNS name or IP address"),
            )
            .with_hint("write it like \"api.pay.example\""));
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use crate::config::{from_str, MapEnv};

    const BASE: &str = "[clients.c]\nlisten = \"127.0.0.1:8080\"\nupstream = \"https://api\"\n\
        [clients.c.token]\nurl = \"https://auth/token\"\nclient_id = \"id\"\nclient_secret = \"s\"\n";

    fn key_of(tls: &str, env: &MapEnv) -> String {
        match from_str(&format!("{BASE}[clients.c.tls]\n{tls}\n"), None, env) {
            Ok(_) => panic!("{tls} should be rejected"),
            Err(e) => {
                assert!(
                    !e.to_string().contains("PRIVATE KEY"),
                    "no key material in errors"
                );
                e.key().to_owned()
            }
        }
    }

    #[test]
    fn tls_errors_name_their_key() {
        let env = MapEnv::new().file("/x/not-pem.txt", "hello").file(
            "/x/key.pem",
            "-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n",
        );
        assert_eq!(
            key_of("ca_file = \"/x/missing.pem\"", &env),
            "clients.c.tls.ca_file"
        );
        assert_eq!(
            key_of("ca_file = \"/x/not-pem.txt\"", &env),
            "clients.c.tls.ca_file"
        );
        assert_eq!(
            key_of("system_roots = false", &env),
            "clients.c.tls.system_roots"
        );
        assert_eq!(
            key_of("client_cert_file = \"/x/not-pem.txt\"", &env),
            "clients.c.tls.client_key_file"
        );
        assert_eq!(
            key_of("server_name = \"not a name\"", &env),
            "clients.c.tls.server_name"
        );
        assert_eq!(
            key_of("min_version = \"1.1\"", &env),
            "clients.c.tls.min_version"
        );
        assert_eq!(key_of("ca_fil = \"x\"", &env), "clients.c.tls.ca_fil");
    }

    #[test]
    fn no_tls_table_means_the_default_trust() {
        let c = from_str(BASE, None, &MapEnv::new()).expect("valid");
        assert!(c.clients[0].tls.is_default() && c.clients[0].token.tls.is_default());
    }
}
