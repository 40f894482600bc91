//! Pooled HTTP clients for upstream APIs and token endpoints: hyper-util's
//! legacy client over a hyper-rustls connector (HTTP/1.1, and HTTP/2 when the
//! server offers it through ALPN), keep-alive with an idle timeout. One client
//! per distinct TLS setting, shared by every client that uses it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::proxy::matcher::Matcher;

use hyper_rustls::{FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::body::{Body, BoxError};
pub use super::plain::{Plain, Refusals};
use crate::config::{EgressProxy, TlsConfig, TlsVersion};

/// The shared, pooled client type.
pub type HttpClient = Client<HttpsConnector<Egress>, Body>;

/// Connects directly, or through a CONNECT tunnel when the egress proxy
/// applies to the destination (TLS to the destination then runs inside it).
#[derive(Clone)]
pub struct Egress {
    direct: HttpConnector,
    proxy: Option<Arc<Matcher>>,
    refusals: Refusals,
}

impl tower_service::Service<Uri> for Egress {
    type Response = Plain;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // HttpConnector is always ready; tunnels are created per call.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let intercept = self.proxy.as_ref().and_then(|m| m.intercept(&dst));
        let mut direct = self.direct.clone();
        let refusals = self.refusals;
        match intercept {
            Some(proxy) => {
                let mut tunnel = Tunnel::new(proxy.uri().clone(), direct);
                if let Some(auth) = proxy.basic_auth() {
                    tunnel = tunnel.with_auth(auth.clone());
                }
                Box::pin(async move {
                    tower_service::Service::call(&mut tunnel, dst)
                        .await
                        .map(|io| Plain::new(io, refusals))
                        .map_err(|e| BoxError::from(format!("through the egress proxy: {e}")))
                })
            }
            None => Box::pin(async move {
                tower_service::Service::call(&mut direct, dst)
                    .await
                    .map(|io| Plain::new(io, refusals))
                    .map_err(BoxError::from)
            }),
        }
    }
}

/// Pooled connections idle for longer than this are closed. hyper retries a
/// request whose pooled connection was found closed before it was written.
pub(crate) const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No root certificate could be loaded.
    #[error("no TLS root certificates could be loaded")]
    NoRoots,
    /// A certificate or key could not be used.
    #[error("tls: {0}")]
    Pem(String),
    /// rustls refused the configuration.
    #[error("tls configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// Builds the client for a token endpoint, with the given TLS and egress
/// proxy settings. It keeps no idle connection: every token request goes on a
/// new one. A provider closes idle keep-alive connections when it likes (Node
/// after 5 s, gunicorn after 2 s), and a token request written on one it has
/// just closed fails with a reset, which for a rotating refresh token cannot be
/// retried safely (the provider may have spent it). Token requests are few, one
/// per token lifetime, so the connection each makes costs nothing that matters.
pub fn build_token_client(
    tls: &TlsConfig,
    proxy: &EgressProxy,
) -> Result<HttpClient, UpstreamError> {
    let connector = connector(tls, proxy, Alpn::Any, Refusals::Drop)?;
    Ok(Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .timer(TokioTimer::new())
        .build(connector))
}

/// Builds a pooled client; with `http2_only`, every connection speaks HTTP/2
/// (prior knowledge on `http://`, ALPN `h2` only on `https://`).
fn build(
    tls: &TlsConfig,
    proxy: &EgressProxy,
    http2_only: bool,
    preserve_header_case: bool,
) -> Result<HttpClient, UpstreamError> {
    let alpn = if http2_only { Alpn::Http2 } else { Alpn::Any };
    let connector = connector(tls, proxy, alpn, Refusals::Drop)?;
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        // HTTP/1 responses keep their header names as the upstream spelled them.
        .http1_preserve_header_case(preserve_header_case)
        .http2_only(http2_only);
    if http2_only {
        // A dead upstream connection is found by a ping rather than by the next call.
        builder
            .http2_keep_alive_interval(Duration::from_secs(30))
            .http2_keep_alive_timeout(Duration::from_secs(20));
    }
    Ok(builder.build(connector))
}

/// Connects to an upstream for one `Upgrade` request: TCP (through the egress
/// proxy when it applies), then TLS for `https://` offering only `http/1.1`,
/// since an HTTP/2 connection cannot carry an Upgrade. Its connections are
/// never pooled: an upgraded one belongs to its tunnel.
pub type UpgradeConnector = HttpsConnector<Egress>;

/// Builds the [`UpgradeConnector`] for `tls` and `proxy`. A write the upstream
/// refuses fails the tunnel ([`Refusals::Fail`]).
pub fn upgrade_connector(
    tls: &TlsConfig,
    proxy: &EgressProxy,
) -> Result<UpgradeConnector, UpstreamError> {
    connector(tls, proxy, Alpn::Http1, Refusals::Fail)
}

/// The protocols offered through ALPN.
#[derive(Clone, Copy)]
enum Alpn {
    /// `h2` and `http/1.1`: the server picks.
    Any,
    /// `h2` only.
    Http2,
    /// `http/1.1` only.
    Http1,
}

fn connector(
    tls: &TlsConfig,
    proxy: &EgressProxy,
    alpn: Alpn,
    refusals: Refusals,
) -> Result<HttpsConnector<Egress>, UpstreamError> {
    let mut roots = rustls::RootCertStore::empty();
    if tls.system_roots {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            tracing::debug!(error = %e, "skipping a system root certificate source");
        }
        let (_added, _ignored) = roots.add_parsable_certificates(native.certs);
    }
    if let Some(pem) = &tls.ca_pem {
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert.map_err(|e| UpstreamError::Pem(format!("ca_file: {e}")))?;
            roots.add(cert)?;
        }
    }
    if roots.is_empty() {
        return Err(UpstreamError::NoRoots);
    }
    let versions: &[&'static rustls::SupportedProtocolVersion] = match tls.min_version {
        TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::V1_3 => &[&rustls::version::TLS13],
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .with_root_certificates(roots);
    let config = match (&tls.client_cert_pem, &tls.client_key_pem) {
        (Some(cert_pem), Some(key_pem)) => {
            let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| UpstreamError::Pem(format!("client_cert_file: {e}")))?;
            let key = PrivateKeyDer::from_pem_slice(key_pem.expose().as_bytes())
                .map_err(|_| UpstreamError::Pem("client_key_file: no usable private key".into()))?;
            builder.with_client_auth_cert(chain, key)?
        }
        _ => builder.with_no_client_auth(),
    };

    let schemes = HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http();
    let schemes = match &tls.server_name {
        Some(name) => {
            let name = rustls::pki_types::ServerName::try_from(name.clone())
                .map_err(|e| UpstreamError::Pem(format!("server_name: {e}")))?;
            schemes.with_server_name_resolver(FixedServerNameResolver::new(name))
        }
        None => schemes,
    };
    let egress = Egress {
        refusals,
        ..egress(proxy)
    };
    Ok(match alpn {
        Alpn::Any => schemes.enable_all_versions().wrap_connector(egress),
        Alpn::Http2 => schemes.enable_http2().wrap_connector(egress),
        Alpn::Http1 => schemes.enable_http1().wrap_connector(egress),
    })
}

/// The TCP connector every client uses: direct, or through the egress proxy.
pub fn egress(proxy: &EgressProxy) -> Egress {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    http.set_keepalive(Some(Duration::from_secs(60)));

    let matcher = (!proxy.is_direct()).then(|| {
        let url = |s: &Option<crate::secret::Secret>| {
            s.as_ref()
                .map(|u| u.expose().to_owned())
                .unwrap_or_default()
        };
        Arc::new(
            Matcher::builder()
                .http(url(&proxy.http))
                .https(url(&proxy.https))
                .no(proxy.no_proxy.clone())
                .build(),
        )
    });
    Egress {
        direct: http,
        proxy: matcher,
        refusals: Refusals::Drop,
    }
}

/// Builds each distinct (TLS, proxy) setting's client once.
#[derive(Default)]
pub struct Clients {
    /// `limits.preserve_header_case`, for every client built here.
    preserve_header_case: bool,
    built: Vec<(ClientKey, HttpClient)>,
    tokens: Vec<((TlsConfig, EgressProxy), HttpClient)>,
    upgrades: Vec<((TlsConfig, EgressProxy), UpgradeConnector)>,
}

/// What makes two clients different: TLS, egress proxy, HTTP/2 only.
type ClientKey = (TlsConfig, EgressProxy, bool);

impl Clients {
    /// No client yet; those built keep the upstream's header-name case when
    /// `preserve_header_case` says so.
    pub fn new(preserve_header_case: bool) -> Self {
        Clients {
            preserve_header_case,
            ..Clients::default()
        }
    }

    /// The client for `tls` and `proxy` (HTTP/2 only with `http2_only`), built on
    /// first use.
    pub fn get(
        &mut self,
        tls: &TlsConfig,
        proxy: &EgressProxy,
        http2_only: bool,
    ) -> Result<HttpClient, UpstreamError> {
        let preserve_header_case = self.preserve_header_case;
        cached(
            &mut self.built,
            |(t, p, h)| t == tls && p == proxy && *h == http2_only,
            || (tls.clone(), proxy.clone(), http2_only),
            || build(tls, proxy, http2_only, preserve_header_case),
        )
    }

    /// The token-endpoint client for `tls` and `proxy` (see
    /// [`build_token_client`]), built on first use.
    pub fn token(
        &mut self,
        tls: &TlsConfig,
        proxy: &EgressProxy,
    ) -> Result<HttpClient, UpstreamError> {
        cached(
            &mut self.tokens,
            |(t, p)| t == tls && p == proxy,
            || (tls.clone(), proxy.clone()),
            || build_token_client(tls, proxy),
        )
    }

    /// The [`UpgradeConnector`] for `tls` and `proxy`, built on first use.
    pub fn upgrade_connector(
        &mut self,
        tls: &TlsConfig,
        proxy: &EgressProxy,
    ) -> Result<UpgradeConnector, UpstreamError> {
        cached(
            &mut self.upgrades,
            |(t, p)| t == tls && p == proxy,
            || (tls.clone(), proxy.clone()),
            || upgrade_connector(tls, proxy),
        )
    }

    /// Keeps only the clients for which `keep` holds (after a reload), and the
    /// upgrade connectors for which `keep_upgrade` does.
    pub fn retain(
        &mut self,
        keep: impl Fn(&TlsConfig, &EgressProxy, bool) -> bool,
        keep_upgrade: impl Fn(&TlsConfig, &EgressProxy) -> bool,
    ) {
        self.built
            .retain(|((tls, proxy, http2_only), _)| keep(tls, proxy, *http2_only));
        self.upgrades
            .retain(|((tls, proxy), _)| keep_upgrade(tls, proxy));
    }
}

/// The value `cache` holds under the key `is_key` matches, or else the one
/// `build` makes, kept under `key()` for the next call.
fn cached<K, V: Clone, E>(
    cache: &mut Vec<(K, V)>,
    is_key: impl Fn(&K) -> bool,
    key: impl FnOnce() -> K,
    build: impl FnOnce() -> Result<V, E>,
) -> Result<V, E> {
    if let Some((_, value)) = cache.iter().find(|(k, _)| is_key(k)) {
        return Ok(value.clone());
    }
    let value = build()?;
    cache.push((key(), value.clone()));
    Ok(value)
}
