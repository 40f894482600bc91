//! In-process mock OAuth2 provider and mock payments API.
//!
//! Owns the two loopback HTTP/1.1 servers that `tokenproxy demo` runs so a newcomer sees the
//! sidecar work without credentials, and that the integration tests drive to assert exact
//! request counts:
//!
//! - [`MockProvider`] (`provider.rs`): a token endpoint speaking RFC 6749 (client_credentials,
//!   password and refresh_token grants, Basic, body or `client_secret_jwt` client auth, form
//!   or JSON bodies, optional rotating refresh tokens) with injectable [`Fault`]s and per-grant counters;
//! - [`MockApi`] (`api.rs`): a protected "payments API" that checks bearer tokens through the
//!   provider's [`TokenValidator`], records every request and offers slow, streaming and
//!   fixed-status routes.
//!
//! This file holds what both share: the accept loop (one task per connection, keep-alive, no
//! header-read timer so a paused test clock cannot close idle connections) and the response
//! body type with its helpers. Both servers stop accepting, and close their connections, when
//! the mock is dropped. All timing is `tokio::time`, so tests may pause the clock.

mod api;
mod assertion;
mod dpop;
mod provider;

pub use api::{DpopCounts, MockApi, RecordedRequest, CONNECTED_PATH};
pub use provider::{
    Echo, ErrorStyle, Fault, MockProvider, ProviderConfig, ResponseShape, TokenRequest,
    TokenValidator, AUTHORIZE_PATH,
};

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

/// Response body of both mocks: a fixed buffer or a generated stream.
pub(crate) type MockBody = BoxBody<Bytes, Infallible>;

/// A whole-buffer response body.
pub(crate) fn full(bytes: impl Into<Bytes>) -> MockBody {
    Full::new(bytes.into()).boxed()
}

/// A response with a JSON body and the given status.
pub(crate) fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<MockBody> {
    let mut response = Response::new(full(value.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Error a handler returns to make hyper close the connection without answering
/// (a hung request whose mock has been dropped).
#[derive(Debug)]
pub(crate) struct Closed;

impl std::fmt::Display for Closed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("mock stopped before answering")
    }
}

impl std::error::Error for Closed {}

/// Resolves once the owning mock has been dropped.
#[derive(Clone)]
pub(crate) struct Shutdown(watch::Receiver<()>);

impl Shutdown {
    /// Waits until the mock is dropped.
    pub(crate) async fn wait(mut self) {
        // `changed` fails only once the sender (held by the mock) is gone; nothing is ever sent.
        while self.0.changed().await.is_ok() {}
    }
}

/// A running loopback server: stops accepting and closes its connections when dropped.
pub(crate) struct Server {
    addr: SocketAddr,
    accept: JoinHandle<()>,
    _shutdown: watch::Sender<()>,
}

impl Server {
    /// Serves `listener` with `handler`, one spawned task per connection.
    pub(crate) fn start<H, F>(
        listener: TcpListener,
        name: &'static str,
        handler: H,
    ) -> std::io::Result<Server>
    where
        H: Fn(Request<Incoming>, Shutdown) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Result<Response<MockBody>, Closed>> + Send + 'static,
    {
        let addr = listener.local_addr()?;
        let (tx, rx) = watch::channel(());
        let accept = AcceptLoop {
            listener,
            name,
            handler,
            shutdown: Shutdown(rx),
        };
        let span = tracing::debug_span!("mock", mock = name, addr = %addr);
        let accept = tokio::spawn(accept.run().instrument(span));
        tracing::debug!(mock = name, addr = %addr, "mock listening");
        Ok(Server {
            addr,
            accept,
            _shutdown: tx,
        })
    }

    /// The bound address.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Dropping `_shutdown` right after this tells every connection task to close.
        self.accept.abort();
    }
}

/// The accept loop of one mock.
struct AcceptLoop<H> {
    listener: TcpListener,
    name: &'static str,
    handler: H,
    shutdown: Shutdown,
}

impl<H, F> AcceptLoop<H>
where
    H: Fn(Request<Incoming>, Shutdown) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<MockBody>, Closed>> + Send + 'static,
{
    async fn run(self) {
        loop {
            match self.listener.accept().await {
                Ok((stream, peer)) => {
                    let conn = Connection {
                        stream,
                        handler: self.handler.clone(),
                        shutdown: self.shutdown.clone(),
                    };
                    let span = tracing::debug_span!("conn", mock = self.name, peer = %peer);
                    tokio::spawn(conn.run().instrument(span));
                }
                Err(error) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(mock = self.name, error = %error, "mock accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// One accepted connection.
struct Connection<H> {
    stream: TcpStream,
    handler: H,
    shutdown: Shutdown,
}

impl<H, F> Connection<H>
where
    H: Fn(Request<Incoming>, Shutdown) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<MockBody>, Closed>> + Send + 'static,
{
    async fn run(self) {
        let Connection {
            stream,
            handler,
            shutdown,
        } = self;
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(error = %error, "set_nodelay failed");
        }
        let per_request = shutdown.clone();
        let service = hyper::service::service_fn(move |req| handler(req, per_request.clone()));
        let mut builder = hyper::server::conn::http1::Builder::new();
        // No timer on purpose: a header-read timer would fire on idle keep-alive connections
        // as soon as a test pauses the clock and the runtime auto-advances it.
        builder.keep_alive(true).header_read_timeout(None);
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        tokio::select! {
            result = conn => {
                if let Err(error) = result {
                    tracing::debug!(error = %error, "mock connection ended with error");
                }
            }
            () = shutdown.wait() => {}
        }
    }
}

/// Locks `mutex`, ignoring poisoning: the mocks' state stays consistent between statements.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Decodes one `application/x-www-form-urlencoded` component (`+` is a space, `%XX` a byte),
/// leaving malformed escapes as they are.
pub(crate) fn form_decode(input: &str) -> String {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                if let Some(byte) = hex {
                    out.push(byte);
                    i += 2;
                } else {
                    out.push(b'%');
                }
            }
            other => out.push(other),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The value of `name` in a URL query string, if present.
pub(crate) fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    let query = query?;
    form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

#[cfg(test)]
pub(crate) mod test_support {
    //! An HTTP client for the mocks' unit tests.

    use bytes::Bytes;
    use http::{HeaderMap, Request, StatusCode};
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::{connect::HttpConnector, Client};
    use hyper_util::rt::TokioExecutor;

    /// A plain HTTP/1.1 legacy client.
    pub(crate) fn client() -> Client<HttpConnector, Full<Bytes>> {
        Client::builder(TokioExecutor::new()).build_http()
    }

    /// A collected response.
    pub(crate) struct Reply {
        pub(crate) status: StatusCode,
        pub(crate) headers: HeaderMap,
        pub(crate) body: Bytes,
    }

    impl Reply {
        /// The body as JSON.
        pub(crate) fn json(&self) -> serde_json::Value {
            serde_json::from_slice(&self.body).unwrap_or_else(|e| {
                panic!(
                    "body should be JSON ({e}): {}",
                    String::from_utf8_lossy(&self.body)
                )
            })
        }
    }

    /// Sends `req` and collects the whole response.
    pub(crate) async fn send(
        client: &Client<HttpConnector, Full<Bytes>>,
        req: Request<Full<Bytes>>,
    ) -> Reply {
        let response = client.request(req).await.expect("request should succeed");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("body should arrive").to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_decode_handles_plus_and_percent_escapes() {
        assert_eq!(form_decode("a+b%3Ac%25"), "a b:c%");
        assert_eq!(form_decode("bad%zzescape%4"), "bad%zzescape%4");
        assert_eq!(form_decode("%C3%A9t%C3%A9"), "été");
    }

    #[test]
    fn query_param_finds_decoded_value() {
        assert_eq!(
            query_param(Some("a=1&ms=250"), "ms").as_deref(),
            Some("250")
        );
        assert_eq!(query_param(Some("a=1"), "ms"), None);
        assert_eq!(query_param(None, "ms"), None);
    }
}
