//! Upgrade passthrough: a WebSocket (or another protocol the client lists in
//! `upgrades`) is forwarded with the token injected, the upstream's 101 is
//! answered to the app, and the bytes are copied both ways until either side
//! closes, the tunnel idles out, or a shutdown's grace runs out.
//!
//! The WebSocket client and server are tokio-tungstenite's; the upstream checks
//! the token with the mock provider's validator.

use crate::support::{self, CLIENT_SECRET};
use crate::upstream_tls::Ca;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::SinkExt;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokenproxy::config::MapEnv;
use tokenproxy::Running;
use tokenproxy_mock::{MockApi, MockProvider, ProviderConfig, TokenValidator};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request as WsRequest};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

/// What the app puts in `Authorization`; the sidecar must replace it.
const APP_CREDENTIAL: &str = "Bearer app-chosen-credential";

/// What the WebSocket upstream saw of one handshake.
#[derive(Clone, Debug)]
struct Handshake {
    path: String,
    authorization: Option<String>,
    /// The provider's serial of the bearer token, when it carried a live one.
    token_serial: Option<u64>,
}

/// A WebSocket echo server that wants a live token from the provider: a
/// missing or dead one gets the RFC 6750 401, `/refuse` gets 426 with a body.
struct WsUpstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Handshake>>>,
}

impl WsUpstream {
    // The handshake callback's error type is tungstenite's.
    #[allow(clippy::result_large_err)]
    async fn start(validator: TokenValidator) -> WsUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let recorded = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (validator, recorded) = (validator.clone(), Arc::clone(&recorded));
                tokio::spawn(async move {
                    let check = |req: &WsRequest, mut response: tokio_tungstenite::tungstenite::handshake::server::Response| {
                        let authorization = req
                            .headers()
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned);
                        let token_serial = authorization
                            .as_deref()
                            .and_then(|a| a.strip_prefix("Bearer "))
                            .and_then(|t| validator.check(t));
                        recorded.lock().expect("lock").push(Handshake {
                            path: req.uri().path().to_owned(),
                            authorization,
                            token_serial,
                        });
                        if token_serial.is_none() {
                            return Err(refusal(
                                StatusCode::UNAUTHORIZED,
                                &[(
                                    "www-authenticate",
                                    "Bearer error=\"invalid_token\"",
                                )],
                                "no live token",
                            ));
                        }
                        if req.uri().path() == "/refuse" {
                            return Err(refusal(
                                StatusCode::UPGRADE_REQUIRED,
                                &[("upgrade", "websocket"), ("x-api-version", "2")],
                                "this endpoint moved to /v2/stream",
                            ));
                        }
                        if let Some(offered) = req.headers().get("sec-websocket-protocol") {
                            let first = offered
                                .to_str()
                                .ok()
                                .and_then(|v| v.split(',').next())
                                .map(str::trim)
                                .unwrap_or("");
                            if let Ok(v) = HeaderValue::from_str(first) {
                                response.headers_mut().insert("sec-websocket-protocol", v);
                            }
                        }
                        Ok(response)
                    };
                    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, check).await
                    else {
                        return;
                    };
                    while let Some(Ok(message)) = ws.next().await {
                        if message.is_close() {
                            return;
                        }
                        let data = message.is_text() || message.is_binary();
                        if data && ws.send(message).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        WsUpstream { addr, seen }
    }

    fn seen(&self) -> Vec<Handshake> {
        self.seen.lock().expect("lock").clone()
    }
}

fn refusal(status: StatusCode, headers: &[(&str, &str)], body: &str) -> ErrorResponse {
    let mut builder = Response::builder()
        .status(status)
        .header("content-length", body.len().to_string());
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    builder.body(Some(body.to_owned())).expect("response")
}

/// A sidecar (client `payments`) in front of `upstream`; `limits` and `client`
/// are extra lines of `[limits]` and `[clients.payments]`.
async fn sidecar(
    provider: &MockProvider,
    upstream: &str,
    limits: &str,
    client: &str,
    env: MapEnv,
) -> (Running, SocketAddr, SocketAddr) {
    let text = format!(
        "[admin]\nlisten = \"{{admin}}\"\n[limits]\n{limits}\n[clients.payments]\nlisten = \"{{listen}}\"\n\
         upstream = \"{upstream}\"\n{client}\n[clients.payments.token]\nurl = \"{}\"\nclient_id = \"demo-client\"\n\
         client_secret = \"${{CLIENT_SECRET}}\"\n",
        provider.token_url()
    );
    support::start_sidecar_env(&text, env.var("CLIENT_SECRET", CLIENT_SECRET)).await
}

struct Setup {
    provider: MockProvider,
    upstream: WsUpstream,
    running: Running,
    proxy: SocketAddr,
    admin: SocketAddr,
}

async fn setup(limits: &str, client: &str) -> Setup {
    let provider = MockProvider::start(ProviderConfig::default())
        .await
        .expect("provider");
    let upstream = WsUpstream::start(provider.validator()).await;
    let url = format!("http://{}", upstream.addr);
    let (running, proxy, admin) = sidecar(&provider, &url, limits, client, MapEnv::new()).await;
    Setup {
        provider,
        upstream,
        running,
        proxy,
        admin,
    }
}

type Ws = WebSocketStream<TcpStream>;

/// Opens a WebSocket to `path` through the sidecar at `proxy`, sending the
/// app's own `Authorization` and offering the `chat` subprotocol.
async fn open(
    proxy: SocketAddr,
    path: &str,
) -> Result<
    (
        Ws,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    WsError,
> {
    let mut req = format!("ws://{proxy}{path}")
        .into_client_request()
        .expect("request");
    req.headers_mut()
        .insert("authorization", HeaderValue::from_static(APP_CREDENTIAL));
    req.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_static("chat, superchat"),
    );
    let stream = TcpStream::connect(proxy).await.expect("connect");
    tokio_tungstenite::client_async(req, stream).await
}

async fn echo(ws: &mut Ws, message: Message) {
    ws.send(message.clone()).await.expect("send");
    let back = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("the echo should arrive within 5 s")
        .expect("the tunnel should still be open")
        .expect("the echo should be a message");
    assert_eq!(
        back, message,
        "the upstream's echo should come back unchanged"
    );
}

/// Waits up to `within` for the tunnel to close (end of stream or a broken
/// connection); false if it stayed open. A message meanwhile is a failure.
async fn closes_within(ws: &mut Ws, within: Duration) -> bool {
    match tokio::time::timeout(within, ws.next()).await {
        Err(_elapsed) => false,
        Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => true,
        Ok(Some(Ok(other))) => panic!("no message was expected, got {other:?}"),
    }
}

async fn metrics(admin: SocketAddr) -> String {
    support::TestClient::new()
        .get(&format!("http://{admin}/metrics"))
        .await
        .text()
}

fn upgrades(text: &str, protocol: &str, outcome: &str) -> f64 {
    support::metric(
        text,
        "tokenproxy_upgrades_total",
        &[
            ("client", "payments"),
            ("protocol", protocol),
            ("outcome", outcome),
        ],
    )
    .unwrap_or_else(|| {
        panic!(
            "tokenproxy_upgrades_total{{protocol={protocol},outcome={outcome}}} should be exported"
        )
    })
}

fn open_tunnels(text: &str) -> f64 {
    support::metric(
        text,
        "tokenproxy_upgraded_connections",
        &[("client", "payments")],
    )
    .expect("tokenproxy_upgraded_connections{client=payments} should be exported")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_echoes_through_the_sidecar_with_the_injected_token() {
    let s = setup("", "").await;
    let (mut ws, response) = open(s.proxy, "/stream?account=7")
        .await
        .expect("the WebSocket handshake should succeed through the sidecar");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(
        response
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.as_bytes()),
        Some(&b"chat"[..]),
        "the upstream's chosen subprotocol should reach the app"
    );
    echo(&mut ws, Message::text("hello through the sidecar")).await;
    echo(&mut ws, Message::binary(vec![0u8, 1, 2, 254, 255])).await;
    let big = "x".repeat(200 * 1024);
    echo(&mut ws, Message::text(big)).await;

    let seen = s.upstream.seen();
    assert_eq!(
        seen.len(),
        1,
        "one handshake should reach the upstream: {seen:?}"
    );
    assert_eq!(seen[0].path, "/stream");
    assert!(
        seen[0].token_serial.is_some(),
        "the upstream should see the provider's token, saw {:?}",
        seen[0].authorization
    );
    assert_ne!(
        seen[0].authorization.as_deref(),
        Some(APP_CREDENTIAL),
        "the app's own Authorization must never reach the upstream"
    );

    let text = metrics(s.admin).await;
    assert_eq!(upgrades(&text, "websocket", "upgraded"), 1.0);
    assert_eq!(
        open_tunnels(&text),
        1.0,
        "the open tunnel should be counted"
    );
    assert_eq!(
        support::metric(
            &text,
            "tokenproxy_requests_total",
            &[("client", "payments"), ("code", "101")]
        ),
        Some(1.0),
        "the upgrade request should be counted with its 101"
    );

    ws.close(None).await.expect("close");
    assert!(
        closes_within(&mut ws, Duration::from_secs(5)).await,
        "the close handshake should complete through the tunnel"
    );
    // The upstream closed its end after the close handshake; the app closes its own.
    drop(ws);
    let admin = s.admin;
    let mut gone = false;
    for _ in 0..100 {
        if open_tunnels(&metrics(admin).await) == 0.0 {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gone, "a closed tunnel should no longer be counted as open");
    s.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_the_upstream_refuses_is_answered_as_the_upstream_answered() {
    let s = setup("", "").await;
    match open(s.proxy, "/refuse").await {
        Err(WsError::Http(response)) => {
            assert_eq!(response.status(), StatusCode::UPGRADE_REQUIRED);
            assert_eq!(
                response
                    .headers()
                    .get("x-api-version")
                    .map(|v| v.as_bytes()),
                Some(&b"2"[..]),
                "the upstream's headers should reach the app"
            );
            assert_eq!(
                response.body().as_deref(),
                Some(&b"this endpoint moved to /v2/stream"[..]),
                "the upstream's body should reach the app"
            );
            assert!(
                response.headers().get("x-tokenproxy-error").is_none(),
                "the refusal is the upstream's, not the sidecar's"
            );
        }
        other => panic!("the upstream's 426 should reach the app, got {other:?}"),
    }
    let text = metrics(s.admin).await;
    assert_eq!(upgrades(&text, "websocket", "refused"), 1.0);
    assert_eq!(upgrades(&text, "websocket", "upgraded"), 0.0);
    assert_eq!(open_tunnels(&text), 0.0);
}

/// A 401 to an upgrade is not replayed (the handshake is not buffered): the
/// app gets it, it counts as not_replayable, and it retires the token, so the
/// app's next attempt meets a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_to_an_upgrade_goes_to_the_app_and_retires_the_token() {
    let s = setup("", "").await;
    let (mut ws, _) = open(s.proxy, "/stream").await.expect("first handshake");
    echo(&mut ws, Message::text("before")).await;
    drop(ws);
    assert_eq!(s.provider.token_requests(), 1);
    s.provider.revoke_all();
    match open(s.proxy, "/stream").await {
        Err(WsError::Http(response)) => {
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
            assert!(
                response
                    .headers()
                    .get("www-authenticate")
                    .is_some_and(|v| v.as_bytes().starts_with(b"Bearer")),
                "the API's challenge should reach the app"
            );
        }
        other => panic!("the upstream's 401 should reach the app, got {other:?}"),
    }
    let provider = &s.provider;
    assert!(
        support::eventually(Duration::from_secs(5), || provider.token_requests() == 2).await,
        "the 401 should make the sidecar fetch a new token (token requests: {})",
        provider.token_requests()
    );
    let text = metrics(s.admin).await;
    assert_eq!(
        support::metric(
            &text,
            "tokenproxy_unauthorized_retries_total",
            &[("client", "payments"), ("outcome", "not_replayable")]
        ),
        Some(1.0),
        "the 401 to an upgrade should count as not_replayable"
    );
    let (mut ws, _) = open(s.proxy, "/stream")
        .await
        .expect("the next handshake should carry the new token");
    echo(&mut ws, Message::text("after")).await;
    let seen = s.upstream.seen();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen[2].token_serial.is_some(), "{seen:?}");
}

/// A plain HTTP upstream that answers an `Upgrade: x-echo` with 101 and then
/// sends back every byte upper-cased; anything else gets a 200 saying whether
/// it still carried Upgrade or Connection headers.
async fn raw_upstream() -> (SocketAddr, Arc<Mutex<Vec<http::HeaderMap>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorded = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let recorded = Arc::clone(&recorded);
            let service = service_fn(move |mut req: Request<hyper::body::Incoming>| {
                recorded.lock().expect("lock").push(req.headers().clone());
                let wants = req
                    .headers()
                    .get("upgrade")
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"x-echo"));
                let on_upgrade = wants.then(|| hyper::upgrade::on(&mut req));
                async move {
                    let Some(on_upgrade) = on_upgrade else {
                        return Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                            b"plain",
                        ))));
                    };
                    tokio::spawn(async move {
                        let Ok(upgraded) = on_upgrade.await else {
                            return;
                        };
                        let mut io = TokioIo::new(upgraded);
                        let mut buf = [0u8; 1024];
                        loop {
                            match io.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    let up = buf[..n].to_ascii_uppercase();
                                    if io.write_all(&up).await.is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                    });
                    let response = Response::builder()
                        .status(StatusCode::SWITCHING_PROTOCOLS)
                        .header("upgrade", "x-echo")
                        .header("connection", "upgrade")
                        .body(Full::new(Bytes::new()))
                        .expect("response");
                    Ok(response)
                }
            });
            tokio::spawn(async move {
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades();
                let _ = conn.await;
            });
        }
    });
    (addr, seen)
}

/// Sends a request head on a new connection and reads the response head.
async fn raw_request(proxy: SocketAddr, upgrade: &str) -> (TcpStream, String) {
    let mut stream = TcpStream::connect(proxy).await.expect("connect");
    let head = format!(
        "GET /raw HTTP/1.1\r\nHost: {proxy}\r\nConnection: Upgrade\r\nUpgrade: {upgrade}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte))
            .await
            .expect("a response head within 5 s")
            .expect("read");
        assert!(
            n == 1,
            "the connection closed before a response head: {got:?}"
        );
        got.push(byte[0]);
    }
    (stream, String::from_utf8_lossy(&got).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protocol_the_client_lists_is_tunnelled_as_raw_bytes_both_ways() {
    let provider = MockProvider::start(ProviderConfig::default())
        .await
        .expect("provider");
    let (upstream, seen) = raw_upstream().await;
    let (_running, proxy, admin) = sidecar(
        &provider,
        &format!("http://{upstream}"),
        "",
        "upgrades = [\"websocket\", \"X-Echo\"]",
        MapEnv::new(),
    )
    .await;
    let (mut stream, head) = raw_request(proxy, "x-echo").await;
    assert!(
        head.starts_with("HTTP/1.1 101"),
        "the upstream's 101 should reach the app: {head}"
    );
    assert!(
        head.to_ascii_lowercase().contains("upgrade: x-echo"),
        "the 101 should name the protocol: {head}"
    );
    for word in ["ping", "and more bytes"] {
        stream.write_all(word.as_bytes()).await.expect("write");
        let mut back = vec![0u8; word.len()];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut back))
            .await
            .expect("the upstream's answer within 5 s")
            .expect("read");
        assert_eq!(back, word.to_ascii_uppercase().as_bytes());
    }
    // The app's end of stream reaches the upstream, which then closes its side.
    stream.shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
    assert!(
        matches!(read, Ok(Ok(0))),
        "the upstream's close should reach the app: {read:?}"
    );
    let headers = seen.lock().expect("lock").clone();
    assert_eq!(headers.len(), 1);
    assert!(
        headers[0]
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .and_then(|t| provider.validator().check(t))
            .is_some(),
        "the upstream should get the injected token: {:?}",
        headers[0]
    );
    let text = metrics(admin).await;
    assert_eq!(upgrades(&text, "x-echo", "upgraded"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_the_client_does_not_list_reaches_the_upstream_as_a_plain_request() {
    let provider = MockProvider::start(ProviderConfig::default())
        .await
        .expect("provider");
    let (upstream, seen) = raw_upstream().await;
    // x-echo is not listed (the default list is websocket alone).
    let (_running, proxy, admin) = sidecar(
        &provider,
        &format!("http://{upstream}"),
        "",
        "",
        MapEnv::new(),
    )
    .await;
    let (_stream, head) = raw_request(proxy, "x-echo").await;
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "an unlisted upgrade should be served as a plain request: {head}"
    );
    let headers = seen.lock().expect("lock").clone();
    assert_eq!(headers.len(), 1);
    assert!(
        headers[0].get("upgrade").is_none()
            && !headers[0].get_all("connection").iter().any(|v| v
                .as_bytes()
                .to_ascii_lowercase()
                .windows(7)
                .any(|w| w == b"upgrade")),
        "the upstream must not be asked to upgrade: {:?}",
        headers[0]
    );
    let text = metrics(admin).await;
    assert_eq!(upgrades(&text, "other", "not_allowed"), 1.0);
    assert_eq!(upgrades(&text, "websocket", "upgraded"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_an_empty_upgrade_list_forwards_no_websocket() {
    let provider = MockProvider::start(ProviderConfig::default())
        .await
        .expect("provider");
    let api = MockApi::start(provider.validator()).await.expect("api");
    let (_running, proxy, admin) =
        sidecar(&provider, &api.url(), "", "upgrades = []", MapEnv::new()).await;
    match open(proxy, "/stream").await {
        Err(WsError::Http(response)) => assert_eq!(
            response.status(),
            StatusCode::OK,
            "the mock API answers the plain request"
        ),
        other => panic!("no WebSocket should be opened, got {other:?}"),
    }
    let recorded = api.recorded();
    assert_eq!(recorded.len(), 1);
    assert!(
        recorded[0].headers.get("upgrade").is_none(),
        "{:?}",
        recorded[0].headers
    );
    assert!(
        recorded[0].headers.get("sec-websocket-key").is_some(),
        "end-to-end headers stay: {:?}",
        recorded[0].headers
    );
    let text = metrics(admin).await;
    assert_eq!(upgrades(&text, "other", "not_allowed"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_with_no_bytes_for_upgrade_idle_timeout_is_closed() {
    let s = setup("upgrade_idle_timeout = \"300ms\"", "").await;
    let (mut ws, _) = open(s.proxy, "/stream").await.expect("handshake");
    // Traffic every 100 ms keeps it open well past the timeout.
    for i in 0..6 {
        echo(&mut ws, Message::text(format!("keep-alive {i}"))).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let quiet_from = Instant::now();
    echo(&mut ws, Message::text("last words")).await;
    assert!(
        closes_within(&mut ws, Duration::from_secs(5)).await,
        "an idle tunnel should be closed"
    );
    let idle = quiet_from.elapsed();
    assert!(
        idle >= Duration::from_millis(300),
        "the tunnel was closed after {idle:?} without traffic, before upgrade_idle_timeout"
    );
    let admin = s.admin;
    let mut gone = false;
    for _ in 0..100 {
        if open_tunnels(&metrics(admin).await) == 0.0 {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gone, "a closed tunnel should no longer be counted");
}

/// A shutdown lets an open tunnel go on during the drain and closes it when
/// `shutdown_grace` runs out; the process is not kept beyond it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_an_open_tunnel_when_the_grace_runs_out() {
    let s = setup("shutdown_grace = \"600ms\"", "").await;
    let (mut ws, _) = open(s.proxy, "/stream").await.expect("handshake");
    echo(&mut ws, Message::text("before")).await;
    let started = Instant::now();
    let shutdown = tokio::spawn(s.running.shutdown());
    tokio::time::sleep(Duration::from_millis(100)).await;
    echo(&mut ws, Message::text("while draining")).await;
    assert!(
        closes_within(&mut ws, Duration::from_secs(5)).await,
        "the tunnel should be closed once the grace has passed"
    );
    let closed_after = started.elapsed();
    assert!(
        closed_after >= Duration::from_millis(500),
        "the tunnel was closed after {closed_after:?}, before the grace ran out"
    );
    tokio::time::timeout(Duration::from_secs(5), shutdown)
        .await
        .expect("shutdown should finish soon after the grace")
        .expect("shutdown task");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "shutdown took {:?} with a 600ms grace",
        started.elapsed()
    );
}

/// An open tunnel holds its listener connection slot, like any connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_tunnel_counts_against_max_connections() {
    let s = setup("max_connections = 1", "").await;
    let (mut ws, _) = open(s.proxy, "/stream").await.expect("handshake");
    echo(&mut ws, Message::text("holding the only slot")).await;
    let mut other = TcpStream::connect(s.proxy).await.expect("connect");
    let head = format!("GET /x HTTP/1.1\r\nHost: {}\r\n\r\n", s.proxy);
    let _ = other.write_all(head.as_bytes()).await;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), other.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "a second connection should be refused while the tunnel holds the slot: {read:?}"
    );
    echo(&mut ws, Message::text("still open")).await;
}

/// Terminates TLS offering `h2` before `http/1.1` and relays the bytes of an
/// HTTP/1.1 connection to `backend`; a client that takes `h2` is let go, as
/// that server would then speak HTTP/2.
async fn tls_front_preferring_h2(backend: SocketAddr, cert_pem: &str, key_pem: &str) -> SocketAddr {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("cert");
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key");
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .expect("server config");
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                    return;
                }
                let Ok(mut plain) = TcpStream::connect(backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    addr
}

/// An https upstream that would pick h2 through ALPN is asked for HTTP/1.1 on
/// the upgrade's connection (an HTTP/2 connection cannot carry an Upgrade).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_reaches_an_https_upstream_that_prefers_h2() {
    let provider = MockProvider::start(ProviderConfig::default())
        .await
        .expect("provider");
    let upstream = WsUpstream::start(provider.validator()).await;
    let ca = Ca::new("tokenproxy test CA");
    let (cert, key) = ca.issue(&["localhost"], false);
    let front = tls_front_preferring_h2(upstream.addr, &cert, &key).await;
    let ca_file = "/etc/tokenproxy/upstream-ca.pem";
    let (_running, proxy, _admin) = sidecar(
        &provider,
        &format!("https://localhost:{}", front.port()),
        "",
        &format!("tls = {{ ca_file = {ca_file:?} }}"),
        MapEnv::new().file(ca_file, ca.pem()),
    )
    .await;
    let (mut ws, _) = open(proxy, "/stream")
        .await
        .expect("the handshake should reach the https upstream over HTTP/1.1");
    echo(&mut ws, Message::text("over tls")).await;
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1);
    assert!(seen[0].token_serial.is_some(), "{seen:?}");
}
