//! The app's protocols beyond HTTP/1.1: HTTP/2 with prior knowledge on the same
//! port, and gRPC (unary, server streaming, bidirectional) with its trailers,
//! to an h2c upstream and to an https upstream that negotiates h2, with the
//! sidecar's own failures answered as gRPC statuses.
//!
//! The gRPC client and server are tonic's, with a codec that passes raw bytes
//! (no code generation needed).

use crate::support;
use crate::upstream_tls::{tls_front_alpn, Ca};

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::{harness, start_sidecar, start_sidecar_env, wait_ready, Options, CLIENT_SECRET};
use tokenproxy::config::MapEnv;
use tokenproxy_mock::{Fault, MockProvider, ProviderConfig, TokenValidator};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::{Stream, StreamExt};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};

/// A codec that sends and receives messages as raw bytes.
#[derive(Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n)))
    }
}

/// What the gRPC upstream saw of one call.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    version: Version,
    /// The provider's serial of the bearer token, when it carried a valid one.
    token_serial: Option<u64>,
}

type Calls = Arc<Mutex<Vec<Seen>>>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type MessageStream = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send>>;

/// `/test.Echo/Unary`: answers `echo:` and the message.
struct Unary;
impl tonic::server::UnaryService<Bytes> for Unary {
    type Response = Bytes;
    type Future = BoxFuture<Result<tonic::Response<Bytes>, Status>>;
    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        let mut answer = b"echo:".to_vec();
        answer.extend_from_slice(request.get_ref());
        Box::pin(async move { Ok(tonic::Response::new(Bytes::from(answer))) })
    }
}

/// `/test.Echo/Count`: three messages, then a status with trailing metadata
/// (ABORTED "counted" and `x-sum: 6`), all of which travel as trailers.
struct Count;
impl tonic::server::ServerStreamingService<Bytes> for Count {
    type Response = Bytes;
    type ResponseStream = MessageStream;
    type Future = BoxFuture<Result<tonic::Response<MessageStream>, Status>>;
    fn call(&mut self, _request: tonic::Request<Bytes>) -> Self::Future {
        Box::pin(async move {
            let mut end = tonic::metadata::MetadataMap::new();
            end.insert("x-sum", "6".parse().expect("ascii"));
            let items: Vec<Result<Bytes, Status>> = vec![
                Ok(Bytes::from_static(b"1")),
                Ok(Bytes::from_static(b"2")),
                Ok(Bytes::from_static(b"3")),
                Err(Status::with_metadata(Code::Aborted, "counted", end)),
            ];
            let stream: MessageStream = Box::pin(tokio_stream::iter(items));
            Ok(tonic::Response::new(stream))
        })
    }
}

/// `/test.Echo/Chat`: answers each message as it comes.
struct Chat;
impl tonic::server::StreamingService<Bytes> for Chat {
    type Response = Bytes;
    type ResponseStream = MessageStream;
    type Future = BoxFuture<Result<tonic::Response<MessageStream>, Status>>;
    fn call(&mut self, request: tonic::Request<tonic::Streaming<Bytes>>) -> Self::Future {
        Box::pin(async move {
            let incoming = request.into_inner();
            let stream: MessageStream = Box::pin(incoming.map(|m| {
                m.map(|b| {
                    let mut answer = b"re:".to_vec();
                    answer.extend_from_slice(&b);
                    Bytes::from(answer)
                })
            }));
            Ok(tonic::Response::new(stream))
        })
    }
}

/// A gRPC server on an h2c port that records every call.
async fn grpc_upstream(validator: TokenValidator) -> (SocketAddr, Calls) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let calls: Calls = Arc::default();
    let recorded = Arc::clone(&calls);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (calls, validator) = (Arc::clone(&recorded), validator.clone());
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let token = req
                    .headers()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .map(str::to_owned);
                let seen = Seen {
                    path: req.uri().path().to_owned(),
                    version: req.version(),
                    token_serial: token.and_then(|t| validator.check(&t)),
                };
                let first_token = seen.token_serial == Some(1);
                calls.lock().expect("lock").push(seen);
                async move {
                    let mut grpc = tonic::server::Grpc::new(Raw);
                    let response = match req.uri().path() {
                        "/test.Echo/Unary" => grpc.unary(Unary, req).await,
                        "/test.Echo/Count" => grpc.server_streaming(Count, req).await,
                        "/test.Echo/Chat" => grpc.streaming(Chat, req).await,
                        // Refuses the provider's first token as a gRPC API would.
                        "/test.Echo/Guarded" if first_token => {
                            let mut meta = tonic::metadata::MetadataMap::new();
                            meta.insert(
                                "www-authenticate",
                                "Bearer error=\"invalid_token\"".parse().expect("ascii"),
                            );
                            Status::with_metadata(Code::Unauthenticated, "token revoked", meta)
                                .into_http()
                        }
                        "/test.Echo/Guarded" => grpc.unary(Unary, req).await,
                        _ => Status::unimplemented("no such method").into_http(),
                    };
                    Ok::<_, Infallible>(response)
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, calls)
}

const GRPC_CLIENT: &str = r#"
[admin]
listen = "{admin}"

[clients.payments]
listen = "{listen}"
upstream = "{upstream}"
http2 = true
token_wait_timeout = "1s"
{client_extra}

[clients.payments.token]
url = "{token_url}"
client_id = "demo-client"
client_secret = "${CLIENT_SECRET}"
"#;

async fn grpc_client(proxy: SocketAddr) -> tonic::client::Grpc<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{proxy}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("a gRPC client connects to the sidecar's HTTP listener");
    tonic::client::Grpc::new(channel)
}

fn path(p: &'static str) -> http::uri::PathAndQuery {
    http::uri::PathAndQuery::from_static(p)
}

async fn unary(
    grpc: &mut tonic::client::Grpc<tonic::transport::Channel>,
    message: &'static [u8],
) -> Result<tonic::Response<Bytes>, Status> {
    grpc.ready().await.expect("channel ready");
    grpc.unary(
        tonic::Request::new(Bytes::from_static(message)),
        path("/test.Echo/Unary"),
        Raw,
    )
    .await
}

/// Unary, server-streaming and bidirectional calls through the sidecar, whose
/// upstream is the one given: each reaches it with the provider's token, over
/// HTTP/2, and the streamed status with its metadata (trailers) comes back.
async fn every_kind_of_call_works(proxy: SocketAddr, calls: &Calls) {
    let mut grpc = grpc_client(proxy).await;

    let answer = unary(&mut grpc, b"hello")
        .await
        .expect("a unary call succeeds");
    assert_eq!(answer.into_inner(), Bytes::from_static(b"echo:hello"));

    grpc.ready().await.expect("ready");
    let mut count = grpc
        .server_streaming(
            tonic::Request::new(Bytes::from_static(b"count")),
            path("/test.Echo/Count"),
            Raw,
        )
        .await
        .expect("a server-streaming call starts")
        .into_inner();
    let mut got = Vec::new();
    let status = loop {
        match count.message().await {
            Ok(Some(m)) => got.push(m),
            Ok(None) => panic!("the stream must end with the server's status, not OK"),
            Err(status) => break status,
        }
    };
    assert_eq!(got, vec![&b"1"[..], b"2", b"3"], "every streamed message");
    assert_eq!(
        (status.code(), status.message()),
        (Code::Aborted, "counted"),
        "grpc-status and grpc-message arrive in the trailers"
    );
    assert_eq!(
        status.metadata().get("x-sum").map(|v| v.to_str().ok()),
        Some(Some("6")),
        "custom trailing metadata arrives too"
    );

    // Each answer is awaited before the next message is written: a sidecar that
    // waited for the end of the request body first would never answer.
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    grpc.ready().await.expect("ready");
    let mut replies = grpc
        .streaming(
            tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
            path("/test.Echo/Chat"),
            Raw,
        )
        .await
        .expect("a bidirectional call starts")
        .into_inner();
    for word in ["one", "two", "three"] {
        tx.send(Bytes::from(word)).await.expect("send");
        let reply = tokio::time::timeout(Duration::from_secs(5), replies.message())
            .await
            .unwrap_or_else(|_| panic!("no answer to {word:?}: the request stream was held back"))
            .expect("a reply")
            .expect("a message");
        assert_eq!(reply, Bytes::from(format!("re:{word}")));
    }
    drop(tx);
    assert!(
        replies.message().await.expect("an OK end").is_none(),
        "the call ends OK once the client closes its side"
    );

    let calls = calls.lock().expect("lock").clone();
    assert_eq!(calls.len(), 3, "{calls:?}");
    for call in &calls {
        assert_eq!(call.version, Version::HTTP_2, "{call:?}");
        assert!(
            call.token_serial.is_some(),
            "{} must carry the provider's token: {call:?}",
            call.path
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_reach_an_h2c_upstream_with_the_token_and_their_trailers() {
    let provider = MockProvider::start(ProviderConfig::default())
        .await
        .expect("provider");
    let (upstream, calls) = grpc_upstream(provider.validator()).await;
    let config = GRPC_CLIENT
        .replace("{upstream}", &format!("http://{upstream}"))
        .replace("{token_url}", &provider.token_url())
        .replace("{client_extra}", "");
    let (_running, proxy, _admin) = start_sidecar(&config).await;
    every_kind_of_call_works(proxy, &calls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_reach_an_https_upstream_that_negotiates_h2() {
    let provider = MockProvider::start(ProviderConfig::default())
        .await
        .expect("provider");
    let (backend, calls) = grpc_upstream(provider.validator()).await;
    let ca = Ca::new("tokenproxy test CA");
    let (cert, key) = ca.issue(&["localhost"], false);
    let front = tls_front_alpn(backend, &cert, &key, None, &[b"h2"]).await;
    let ca_file = "/etc/tokenproxy/upstream-ca.pem";
    let config = GRPC_CLIENT
        .replace("{upstream}", &format!("https://localhost:{}", front.port()))
        .replace("{token_url}", &provider.token_url())
        .replace(
            "{client_extra}",
            &format!("tls = {{ ca_file = {ca_file:?} }}"),
        )
        .replace("http2 = true\n", "");
    let (_running, proxy, _admin) = start_sidecar_env(
        &config,
        MapEnv::new()
            .var("CLIENT_SECRET", CLIENT_SECRET)
            .file(ca_file, ca.pem()),
    )
    .await;
    every_kind_of_call_works(proxy, &calls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_call_without_a_token_gets_unavailable_naming_token_unavailable() {
    let provider = MockProvider::start(ProviderConfig::default())
        .await
        .expect("provider");
    provider.set_fault(Fault::Status {
        status: 503,
        body: "down".into(),
        content_type: "text/plain",
        retry_after: None,
    });
    let (upstream, calls) = grpc_upstream(provider.validator()).await;
    let config = GRPC_CLIENT
        .replace("{upstream}", &format!("http://{upstream}"))
        .replace("{token_url}", &provider.token_url())
        .replace("{client_extra}", "");
    let (_running, proxy, _admin) = start_sidecar(&config).await;
    let mut grpc = grpc_client(proxy).await;
    let status = unary(&mut grpc, b"pay")
        .await
        .expect_err("no token, no call");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().starts_with("token_unavailable: "),
        "the sidecar's code leads the message: {:?}",
        status.message()
    );
    assert_eq!(
        status
            .metadata()
            .get("x-tokenproxy-error")
            .map(|v| v.to_str().ok()),
        Some(Some("token_unavailable")),
        "the app can tell the sidecar's failure from the API's"
    );
    assert!(
        calls.lock().expect("lock").is_empty(),
        "nothing reaches the API"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_prior_knowledge_shares_the_port_and_multiplexes_with_the_token() {
    let h = harness(Options::default()).await;
    wait_ready(&h).await;
    let stream = TcpStream::connect(h.proxy).await.expect("connect");
    let (sender, conn) = hyper::client::conn::http2::handshake::<_, _, Empty<Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .expect("the listener answers the HTTP/2 preface");
    tokio::spawn(conn);
    let streams = (0..50).map(|i| {
        let mut sender = sender.clone();
        let uri = format!("http://{}/api/v1/payments?n={i}", h.proxy);
        async move {
            let req = Request::get(uri).body(Empty::new()).expect("request");
            let response = sender.send_request(req).await.expect("a response");
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes();
            (status, body)
        }
    });
    let mut tasks = tokio::task::JoinSet::new();
    for s in streams {
        tasks.spawn(s);
    }
    while let Some(done) = tasks.join_next().await {
        let (status, body) = done.expect("task");
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    }
    let recorded = h.api.recorded();
    assert_eq!(recorded.len(), 50, "every stream reached the API");
    assert!(
        recorded.iter().all(|r| r.token_serial == Some(1)),
        "each with the provider's one token"
    );
    assert!(
        recorded
            .iter()
            .all(|r| r.headers["host"] == h.api.addr().to_string()),
        "Host is the upstream's"
    );

    // The HTTP/1.1 side of the same port still works.
    let r = h
        .http
        .get(&format!("http://{}/api/v1/payments", h.proxy))
        .await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_request_naming_another_host_is_refused() {
    let h = harness(Options::default()).await;
    wait_ready(&h).await;
    let stream = TcpStream::connect(h.proxy).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http2::handshake::<_, _, Empty<Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .expect("handshake");
    tokio::spawn(conn);
    let req = Request::get(format!(
        "http://rebind.attacker.example:{}/api/v1/payments",
        h.proxy.port()
    ))
    .body(Empty::new())
    .expect("request");
    let response = sender.send_request(req).await.expect("a response");
    assert_eq!(response.status(), StatusCode::MISDIRECTED_REQUEST);
    assert!(h.api.recorded().is_empty(), "nothing reached the API");
}

async fn h2_sender(
    addr: SocketAddr,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    sender
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_request_refused_with_401_is_refreshed_and_replayed_like_http1() {
    let h = harness(Options::default()).await;
    wait_ready(&h).await;
    h.api.reject_next(1);
    let mut sender = h2_sender(h.proxy).await;
    let req = Request::post(format!("http://{}/api/v1/payments", h.proxy))
        .header("content-type", "application/json")
        .header("idempotency-key", "order-h2")
        .body(http_body_util::Full::new(Bytes::from_static(
            br#"{"amount":100}"#,
        )))
        .expect("request");
    let response = sender.send_request(req).await.expect("a response");
    assert_eq!(
        response.status(),
        StatusCode::CREATED,
        "the API's answer to the replay"
    );
    assert_eq!(
        response
            .headers()
            .get("x-tokenproxy-replayed")
            .map(|v| v.as_bytes()),
        Some(&b"1"[..]),
        "one refresh and one replay, as over HTTP/1.1"
    );
    let recorded = h.api.recorded();
    assert_eq!(recorded.len(), 2, "the refused request and its replay");
    assert_eq!(
        recorded[1].body,
        &br#"{"amount":100}"#[..],
        "the same body, sent again"
    );
    assert_eq!(recorded[1].token_serial, Some(2), "with the new token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_header_list_over_max_header_bytes_never_reaches_the_api() {
    let h = harness(Options::default()).await;
    wait_ready(&h).await;
    let mut sender = h2_sender(h.proxy).await;
    // The default limits.max_header_bytes is 32 KiB.
    let req = Request::get(format!("http://{}/api/v1/payments", h.proxy))
        .header("x-big", "a".repeat(40 * 1024))
        .body(http_body_util::Full::new(Bytes::new()))
        .expect("request");
    match sender.send_request(req).await {
        Ok(response) => assert_eq!(
            response.status(),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "an oversized header list is refused"
        ),
        Err(e) => assert!(!e.is_canceled(), "refused by a stream reset: {e}"),
    }
    assert!(h.api.recorded().is_empty(), "nothing reached the API");
    // The connection (or a new one) still serves a normal request.
    let mut sender = h2_sender(h.proxy).await;
    let req = Request::get(format!("http://{}/api/v1/payments", h.proxy))
        .body(http_body_util::Full::new(Bytes::new()))
        .expect("request");
    let response = sender.send_request(req).await.expect("a response");
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_unauthenticated_answer_retires_the_token_for_the_next_call() {
    let provider = MockProvider::start(ProviderConfig::default())
        .await
        .expect("provider");
    let (upstream, calls) = grpc_upstream(provider.validator()).await;
    let config = GRPC_CLIENT
        .replace("{upstream}", &format!("http://{upstream}"))
        .replace("{token_url}", &provider.token_url())
        .replace("{client_extra}", "");
    let (_running, proxy, _admin) = start_sidecar(&config).await;
    let mut grpc = grpc_client(proxy).await;
    let call = |grpc: &mut tonic::client::Grpc<tonic::transport::Channel>| {
        let mut grpc = grpc.clone();
        async move {
            grpc.ready().await.expect("ready");
            grpc.unary(
                tonic::Request::new(Bytes::from_static(b"pay")),
                path("/test.Echo/Guarded"),
                Raw,
            )
            .await
        }
    };
    let refused = call(&mut grpc)
        .await
        .expect_err("the API refuses the first token");
    assert_eq!(
        refused.code(),
        Code::Unauthenticated,
        "the API's answer goes back as it came (a gRPC call is not replayed)"
    );
    assert!(
        refused.metadata().get("x-tokenproxy-error").is_none(),
        "it is the API's answer, not the sidecar's"
    );
    let mut answered = None;
    // The refresh the refusal asked for runs in the background.
    for _ in 0..50 {
        match call(&mut grpc).await {
            Ok(r) => {
                answered = Some(r);
                break;
            }
            Err(s) if s.code() == Code::Unauthenticated => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(s) => panic!("unexpected {s:?}"),
        }
    }
    let answered = answered.expect("a later call carries a new token");
    assert_eq!(answered.into_inner(), Bytes::from_static(b"echo:pay"));
    let serials: Vec<Option<u64>> = calls
        .lock()
        .expect("lock")
        .iter()
        .map(|c| c.token_serial)
        .collect();
    assert_eq!(serials.first(), Some(&Some(1)));
    assert_eq!(serials.last(), Some(&Some(2)), "the new token: {serials:?}");
    assert_eq!(
        provider.token_requests(),
        2,
        "one refresh, not one per call"
    );
}
