//! TLS to the upstream and the token endpoint, with certificates generated at
//! test time: a private CA is trusted through `ca_file`, an unknown CA is
//! refused with a clear error, mutual TLS presents the configured client
//! certificate, and `server_name` overrides the name that is verified.

use crate::support;

use std::net::SocketAddr;
use std::sync::Arc;

use http::StatusCode;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use support::{start_sidecar_env, TestClient, CLIENT_SECRET};
use tokenproxy::config::MapEnv;
use tokenproxy_mock::{MockApi, MockProvider, ProviderConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

pub(crate) struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    pub(crate) fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("self-signed");
        Ca { cert, key }
    }

    pub(crate) fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A leaf certificate for `names` (DNS names or IPs): (cert PEM, key PEM).
    pub(crate) fn issue(&self, names: &[&str], client: bool) -> (String, String) {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("params");
        params.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = KeyPair::generate().expect("key");
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("signed");
        (cert.pem(), key.serialize_pem())
    }
}

/// Terminates TLS on a loopback port and relays the bytes to `backend`.
async fn tls_front(
    backend: SocketAddr,
    cert_pem: &str,
    key_pem: &str,
    client_ca: Option<&str>,
) -> SocketAddr {
    tls_front_alpn(backend, cert_pem, key_pem, client_ca, &[b"http/1.1"]).await
}

/// A TLS server setup with `cert_pem`/`key_pem`, asking for a client
/// certificate from `client_ca` when given, offering `alpn`.
pub(crate) fn tls_acceptor(
    cert_pem: &str,
    key_pem: &str,
    client_ca: Option<&str>,
    alpn: &[&[u8]],
) -> TlsAcceptor {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("cert");
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key");
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions");
    let builder = match client_ca {
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                roots.add(c.expect("ca")).expect("add");
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .expect("verifier");
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).expect("server config");
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsAcceptor::from(Arc::new(config))
}

/// [`tls_front`] offering `alpn` (e.g. `h2` in front of an HTTP/2 backend).
pub(crate) async fn tls_front_alpn(
    backend: SocketAddr,
    cert_pem: &str,
    key_pem: &str,
    client_ca: Option<&str>,
    alpn: &[&[u8]],
) -> SocketAddr {
    let acceptor = tls_acceptor(cert_pem, key_pem, client_ca, alpn);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                let Ok(mut plain) = TcpStream::connect(backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    addr
}

struct Setup {
    provider: MockProvider,
    api: MockApi,
    ca: Ca,
}

async fn setup() -> Setup {
    let provider = MockProvider::start(ProviderConfig::default())
        .await
        .expect("provider");
    let api = MockApi::start(provider.validator()).await.expect("api");
    Setup {
        provider,
        api,
        ca: Ca::new("tokenproxy test CA"),
    }
}

fn config(upstream: &str, token_url: &str, tls: &str, token_tls: &str) -> String {
    format!(
        "[admin]\nlisten = \"{{admin}}\"\n[clients.payments]\nlisten = \"{{listen}}\"\nupstream = \"{upstream}\"\n\
         token_wait_timeout = \"5s\"\n{tls}\n[clients.payments.token]\nurl = \"{token_url}\"\nclient_id = \"demo-client\"\n\
         client_secret = \"${{CLIENT_SECRET}}\"\n{token_tls}\n"
    )
}

fn env(files: &[(&str, &str)]) -> MapEnv {
    let mut env = MapEnv::new().var("CLIENT_SECRET", CLIENT_SECRET);
    for (path, content) in files {
        env = env.file(*path, *content);
    }
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_ca_in_ca_file_is_trusted_and_an_unknown_one_is_refused_clearly() {
    let s = setup().await;
    let (cert, key) = s.ca.issue(&["localhost"], false);
    let front = tls_front(s.api.addr(), &cert, &key, None).await;
    let upstream = format!("https://localhost:{}", front.port());

    let trusted = config(
        &upstream,
        &s.provider.token_url(),
        "[clients.payments.tls]\nca_file = \"/pki/ca.pem\"",
        "",
    );
    let (_running, proxy, _) =
        start_sidecar_env(&trusted, env(&[("/pki/ca.pem", &s.ca.pem())])).await;
    let r = TestClient::new()
        .get(&format!("http://{proxy}/api/v1/payments"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        s.api.recorded()[0].token_serial,
        Some(1),
        "the token crossed TLS"
    );

    let untrusted = config(&upstream, &s.provider.token_url(), "", "");
    let (_running2, proxy2, _) = start_sidecar_env(&untrusted, env(&[])).await;
    let r = TestClient::new()
        .get(&format!("http://{proxy2}/api/v1/payments"))
        .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.error_code(), Some("upstream_unreachable"));
    let detail = r.json()["detail"].as_str().unwrap_or("").to_owned();
    assert!(
        detail.contains("certificate") && detail.contains("UnknownIssuer"),
        "the error says why: {detail}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_presents_the_configured_client_certificate() {
    let s = setup().await;
    let (cert, key) = s.ca.issue(&["localhost"], false);
    let client_ca = Ca::new("client CA");
    let (client_cert, client_key) = client_ca.issue(&["tokenproxy"], true);
    let front = tls_front(s.api.addr(), &cert, &key, Some(&client_ca.pem())).await;
    let upstream = format!("https://localhost:{}", front.port());
    let files = [
        ("/pki/ca.pem", s.ca.pem()),
        ("/pki/client.pem", client_cert),
        ("/pki/client.key", client_key),
    ];
    let files: Vec<(&str, &str)> = files.iter().map(|(p, c)| (*p, c.as_str())).collect();

    let without = config(
        &upstream,
        &s.provider.token_url(),
        "[clients.payments.tls]\nca_file = \"/pki/ca.pem\"",
        "",
    );
    let (_r1, proxy1, _) = start_sidecar_env(&without, env(&files)).await;
    let refused = TestClient::new()
        .get(&format!("http://{proxy1}/api/v1/payments"))
        .await;
    assert_eq!(
        refused.status,
        StatusCode::BAD_GATEWAY,
        "the server requires a client certificate"
    );

    let with = config(
        &upstream,
        &s.provider.token_url(),
        "[clients.payments.tls]\nca_file = \"/pki/ca.pem\"\nclient_cert_file = \"/pki/client.pem\"\nclient_key_file = \"/pki/client.key\"",
        "",
    );
    let (_r2, proxy2, _) = start_sidecar_env(&with, env(&files)).await;
    let ok = TestClient::new()
        .get(&format!("http://{proxy2}/api/v1/payments"))
        .await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_name_overrides_the_verified_name_and_the_token_endpoint_gets_its_own_tls() {
    let s = setup().await;
    let (cert, key) = s.ca.issue(&["api.internal.test"], false);
    let api_front = tls_front(s.api.addr(), &cert, &key, None).await;
    let (auth_cert, auth_key) = s.ca.issue(&["auth.internal.test"], false);
    let auth_front = tls_front(s.provider.addr(), &auth_cert, &auth_key, None).await;
    let text = config(
        &format!("https://127.0.0.1:{}", api_front.port()),
        &format!("https://127.0.0.1:{}/oauth2/token", auth_front.port()),
        "[clients.payments.tls]\nca_file = \"/pki/ca.pem\"\nsystem_roots = false\nserver_name = \"api.internal.test\"\nmin_version = \"1.3\"",
        "[clients.payments.token.tls]\nca_file = \"/pki/ca.pem\"\nserver_name = \"auth.internal.test\"",
    );
    let (_running, proxy, _) = start_sidecar_env(&text, env(&[("/pki/ca.pem", &s.ca.pem())])).await;
    let r = TestClient::new()
        .get(&format!("http://{proxy}/api/v1/payments"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(s.provider.token_requests(), 1, "the token came over TLS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_is_used_when_the_upstream_offers_it_through_alpn() {
    use hyper::server::conn::http2;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let s = setup().await;
    let (cert, key) = s.ca.issue(&["localhost"], false);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<_, _>>()
        .expect("cert");
    let mut server_config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            chain,
            PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key"),
        )
        .expect("config");
    server_config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(server_config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let body = format!("{:?}", req.version());
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from(body)),
                        ))
                    },
                );
                let _ = http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    let text = config(
        &format!("https://localhost:{port}"),
        &s.provider.token_url(),
        "[clients.payments.tls]\nca_file = \"/pki/ca.pem\"",
        "",
    );
    let (_running, proxy, _) = start_sidecar_env(&text, env(&[("/pki/ca.pem", &s.ca.pem())])).await;
    let r = TestClient::new()
        .get(&format!("http://{proxy}/anything"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.text(), "HTTP/2.0", "the upstream saw HTTP/2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_failure_at_the_token_endpoint_is_token_unavailable_with_the_cause_in_status() {
    let s = setup().await;
    let (cert, key) = s.ca.issue(&["localhost"], false);
    let auth_front = tls_front(s.provider.addr(), &cert, &key, None).await;
    // The token endpoint's CA is not trusted: every handshake fails.
    let text = config(
        &s.api.url(),
        &format!("https://localhost:{}/oauth2/token", auth_front.port()),
        "",
        "",
    );
    let (_running, proxy, admin) = start_sidecar_env(&text, env(&[])).await;
    let http = TestClient::new();
    let r = http.get(&format!("http://{proxy}/api/v1/payments")).await;
    assert_eq!(r.error_code(), Some("token_unavailable"));
    let status = http.get(&format!("http://{admin}/status")).await.json();
    let last = &status["clients"]["payments"]["last_refresh"];
    assert_eq!(last["outcome"], "error");
    let error = last["error"].as_str().unwrap_or("");
    assert!(error.contains("certificate"), "the cause is named: {error}");
    assert_eq!(
        s.provider.token_requests(),
        0,
        "nothing was sent without a trusted handshake"
    );
}
