//! Hostile client input over raw TCP: request-smuggling vectors, oversized or
//! malformed heads, slow heads and connection floods. Each is answered (or the
//! connection dropped) as listed, nothing reaches the upstream, and the process
//! keeps serving the next request.
//!
//! `Host` is not trusted for routing: requests are routed by listener and path
//! prefix only and `Host` is rewritten to the upstream's. A `Host` that is not the
//! listener's (DNS rebinding) is refused before routing (tests/it/origin.rs), so the
//! raw requests here say `Host: localhost`.

use crate::support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use support::{start_sidecar, TestClient};
use tokenproxy_mock::{MockApi, MockProvider, ProviderConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What came back on a raw connection: the bytes, and whether the server closed it.
struct Raw {
    text: String,
    closed: bool,
}

/// Writes `request`, then reads until the server closes or goes quiet for `quiet`.
async fn raw(addr: SocketAddr, request: &[u8], quiet: Duration) -> Raw {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    // The server may answer and close before everything is written; that is fine.
    let _ = s.write_all(request).await;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let closed = loop {
        match tokio::time::timeout(quiet, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => break false,
        }
    };
    Raw {
        text: String::from_utf8_lossy(&buf).into_owned(),
        closed,
    }
}

struct Setup {
    _provider: MockProvider,
    api: MockApi,
    _running: tokenproxy::Running,
    proxy: SocketAddr,
}

async fn setup(limits: &str) -> Setup {
    let provider = MockProvider::start(ProviderConfig::default())
        .await
        .expect("provider");
    let api = MockApi::start(provider.validator()).await.expect("api");
    let text = format!(
        "[admin]\nlisten = \"{{admin}}\"\n[limits]\n{limits}\n[clients.payments]\nlisten = \"{{listen}}\"\n\
         upstream = \"{}\"\n[clients.payments.token]\nurl = \"{}\"\nclient_id = \"demo-client\"\n\
         client_secret = \"${{CLIENT_SECRET}}\"\n",
        api.url(),
        provider.token_url()
    );
    let (running, proxy, _) = start_sidecar(&text).await;
    let ok = TestClient::new()
        .get(&format!("http://{proxy}/api/v1/payments"))
        .await;
    assert_eq!(
        ok.status,
        StatusCode::OK,
        "the sidecar serves before the attack"
    );
    Setup {
        _provider: provider,
        api,
        _running: running,
        proxy,
    }
}

async fn still_serves(s: &Setup, what: &str) {
    let ok = TestClient::new()
        .get(&format!("http://{}/api/v1/payments", s.proxy))
        .await;
    assert_eq!(
        ok.status,
        StatusCode::OK,
        "after {what} the next request is served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_and_malformed_requests_get_400_and_a_closed_connection() {
    let s = setup("").await;
    let cases: &[(&str, &[u8], &str)] = &[
        (
            "conflicting Content-Length",
            b"POST /api/v1/payments HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            "HTTP/1.1 400",
        ),
        (
            "obs-fold",
            b"GET /api/v1/payments HTTP/1.1\r\nHost: localhost\r\nX-Folded: a\r\n b\r\n\r\n",
            "HTTP/1.1 400",
        ),
        (
            "bad chunk size",
            b"POST /api/v1/payments HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
            "HTTP/1.1 400",
        ),
        (
            "invalid header byte",
            b"GET /api/v1/payments HTTP/1.1\r\nHost: localhost\r\nX-Bad: a\x01b\r\n\r\n",
            "HTTP/1.1 400",
        ),
        (
            "space before colon",
            b"GET /api/v1/payments HTTP/1.1\r\nHost: localhost\r\nX-Bad : a\r\n\r\n",
            "HTTP/1.1 400",
        ),
        (
            "not HTTP at all",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage-that-looks-like-tls\r\n\r\n",
            "HTTP/1.1 400",
        ),
        (
            "absolute-form URI naming another host",
            b"GET http://evil.example/steal HTTP/1.1\r\nHost: localhost\r\n\r\n",
            "HTTP/1.1 400",
        ),
        (
            "CONNECT",
            b"CONNECT evil.example:443 HTTP/1.1\r\nHost: localhost\r\n\r\n",
            "HTTP/1.1 400",
        ),
    ];
    for (what, request, status) in cases {
        let before = s.api.requests();
        let r = raw(s.proxy, request, Duration::from_secs(2)).await;
        assert!(
            r.text.starts_with(status),
            "{what}: expected {status}, got {:?}",
            r.text
        );
        assert_eq!(
            s.api.requests(),
            before,
            "{what}: nothing reached the upstream"
        );
        let framing = !matches!(*what, "absolute-form URI naming another host" | "CONNECT");
        if framing {
            assert!(
                r.closed,
                "{what}: the connection is closed after a framing error"
            );
            assert_eq!(
                r.text.matches("HTTP/1.1").count(),
                1,
                "{what}: nothing smuggled behind it"
            );
        }
        still_serves(&s, what).await;
    }
}

/// RFC 9112 §6.3 lets a server either reject a request with both Content-Length
/// and Transfer-Encoding, or frame it by Transfer-Encoding and close the
/// connection after the response. hyper does the latter (it drops the
/// Content-Length before the handler sees it), and the sidecar re-frames the body
/// towards the upstream, so nothing can be smuggled behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_transfer_encoding_is_framed_by_the_latter_and_the_connection_closed() {
    let s = setup("").await;
    let r = raw(
        s.proxy,
        b"POST /api/v1/payments HTTP/1.1\r\nHost: localhost\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: localhost\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(
        r.text.matches("HTTP/1.1 ").count(),
        1,
        "one response only: {:?}",
        r.text
    );
    assert!(r.closed, "the connection is closed after it");
    let seen = s.api.recorded();
    assert!(
        seen.iter().all(|q| q.path != "/smuggled"),
        "the smuggled request never reached the upstream"
    );
    let post = seen
        .iter()
        .find(|q| q.method == http::Method::POST)
        .expect("the POST was forwarded");
    assert_eq!(&post.body[..], b"hello", "the body is the chunked one");
    still_serves(&s, "Content-Length with Transfer-Encoding").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_heads_get_431() {
    let s = setup("max_header_bytes = \"8KiB\"\nmax_headers = 20").await;
    let big = format!(
        "GET /api/v1/payments HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n",
        "a".repeat(16 * 1024)
    );
    let r = raw(s.proxy, big.as_bytes(), Duration::from_secs(2)).await;
    assert!(
        r.text.starts_with("HTTP/1.1 431"),
        "a 16 KiB head: {:?}",
        r.text
    );
    still_serves(&s, "an oversized head").await;

    let mut many = String::from("GET /api/v1/payments HTTP/1.1\r\nHost: localhost\r\n");
    for i in 0..40 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let r = raw(s.proxy, many.as_bytes(), Duration::from_secs(2)).await;
    assert!(
        r.text.starts_with("HTTP/1.1 431"),
        "40 headers over a limit of 20: {:?}",
        r.text
    );
    still_serves(&s, "too many headers").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_head_is_cut_off_after_header_read_timeout() {
    let s = setup("header_read_timeout = \"1s\"").await;
    let started = tokio::time::Instant::now();
    let mut conn = TcpStream::connect(s.proxy).await.expect("connect");
    conn.write_all(b"GET /api/v1/payments HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .expect("write");
    // Never finish the head: the server must give up on its own.
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return 0,
                Ok(n) if buf[..n].starts_with(b"HTTP/1.1 408") => return n,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the server closes a slow head within its timeout");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(3),
        "cut after ~1 s: {elapsed:?} ({n} bytes)"
    );
    still_serves(&s, "a slow head").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_connections_are_refused() {
    let s = setup("max_connections = 2").await;
    // Open keep-alive connections one by one, each proving it holds a slot by being
    // served. The setup's own pooled connection may still hold a slot for a moment,
    // so one or two are served; the next one is refused without an answer.
    let mut held = Vec::new();
    let refused = loop {
        let mut conn = TcpStream::connect(s.proxy).await.expect("connect");
        let _ = conn
            .write_all(b"GET /api/v1/payments HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await;
        let mut buf = [0u8; 4096];
        match tokio::time::timeout(Duration::from_secs(2), conn.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 && buf.starts_with(b"HTTP/1.1 200") => held.push(conn),
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            other => panic!("unexpected answer: {other:?}"),
        }
        assert!(
            held.len() <= 2,
            "more connections were served than max_connections allows"
        );
    };
    assert!(
        refused && !held.is_empty(),
        "a connection over the limit is closed at once"
    );
    drop(held);
    let freed = support::eventually(Duration::from_secs(5), || {
        std::net::TcpStream::connect(s.proxy)
            .and_then(|mut c| {
                use std::io::{Read, Write};
                c.set_read_timeout(Some(Duration::from_secs(1)))?;
                c.write_all(
                    b"GET /api/v1/payments HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
                )?;
                let mut b = [0u8; 12];
                c.read_exact(&mut b)?;
                Ok(&b == b"HTTP/1.1 200")
            })
            .unwrap_or(false)
    })
    .await;
    assert!(freed, "slots free up again when connections close");
}

/// An upstream that resolves paths as a normalizing API gateway does (decodes
/// `%XX` once, reads `\` as `/`, collapses `//`, removes dot segments) and
/// records every path it resolved, with the credential it came with.
async fn normalizing_upstream() -> (SocketAddr, Arc<Mutex<Vec<(String, bool)>>>) {
    use http_body_util::Full;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let record = Arc::clone(&record);
            tokio::spawn(async move {
                let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let record = Arc::clone(&record);
                    async move {
                        let decoded: Vec<u8> = percent_decode_once(req.uri().path().as_bytes());
                        let text = String::from_utf8_lossy(&decoded).replace('\\', "/");
                        let mut out: Vec<&str> = Vec::new();
                        for segment in text.split('/').filter(|s| !s.is_empty()) {
                            match segment.split(';').next().unwrap_or_default() {
                                "." => {}
                                ".." => {
                                    out.pop();
                                }
                                s => out.push(s),
                            }
                        }
                        let resolved = format!("/{}", out.join("/"));
                        let token = req.headers().contains_key("authorization");
                        record
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push((resolved, token));
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            bytes::Bytes::from_static(b"ok"),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

fn percent_decode_once(input: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::new();
    let mut i = 0;
    while i < input.len() {
        if input[i] == b'%' && i + 2 < input.len() {
            if let (Some(h), Some(l)) = (hex(input[i + 1]), hex(input[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(input[i]);
        i += 1;
    }
    out
}

/// Security review finding 1: a path that a normalizing hop resolves outside
/// the client's base path (or into another client's prefix) is refused with
/// 400 `bad_request` and never reaches the upstream with the token; ordinary
/// paths still do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_that_escapes_the_base_path_never_reaches_the_upstream() {
    let (upstream, seen) = normalizing_upstream().await;
    let provider = MockProvider::start(ProviderConfig::default())
        .await
        .expect("provider");
    let text = format!(
        "[admin]\nlisten = \"{{admin}}\"\n\
         [clients.pay]\nlisten = \"{{listen}}\"\npath_prefix = \"/pay\"\nupstream = \"http://{upstream}/v2/payments\"\n\
         [clients.pay.token]\nurl = \"{url}\"\nclient_id = \"demo-client\"\nclient_secret = \"${{CLIENT_SECRET}}\"\n\
         [clients.wallet]\nlisten = \"{{listen}}\"\npath_prefix = \"/wallet\"\nupstream = \"http://{upstream}/v2/wallet\"\n\
         [clients.wallet.token]\nurl = \"{url}\"\nclient_id = \"demo-client\"\nclient_secret = \"${{CLIENT_SECRET}}\"\n",
        url = provider.token_url()
    );
    let (_running, proxy, _) = start_sidecar(&text).await;
    let attacks: &[&str] = &[
        "/pay/../wallet/x",
        "/pay/../../internal/keys",
        "/pay/%2e%2e/%2e%2e/internal/keys",
        "/pay/%2E%2E/wallet/x",
        "/pay/.%2e/wallet/x",
        "/pay/..%2Fwallet%2Fx",
        "/pay/..%2f..%2finternal%2fkeys",
        "/pay/%252e%252e/wallet/x",
        "/pay/..;/wallet/x",
        "/pay//internal/keys",
        "/pay/./x",
        "/pay/..%5cwallet%5cx",
        "/pay/..\\wallet\\x",
    ];
    for attack in attacks {
        let request =
            format!("GET {attack} HTTP/1.1\r\nHost: {proxy}\r\nConnection: close\r\n\r\n");
        let reply = raw(proxy, request.as_bytes(), Duration::from_secs(2)).await;
        assert!(
            reply.text.starts_with("HTTP/1.1 400"),
            "{attack} must be refused with 400, got: {}",
            reply.text.lines().next().unwrap_or("")
        );
        if reply.text.contains("x-tokenproxy-error") {
            assert!(
                reply.text.contains("bad_request"),
                "{attack}: {}",
                reply.text
            );
        }
    }
    let ok = TestClient::new()
        .get(&format!("http://{proxy}/pay/charges/ch_1"))
        .await;
    assert_eq!(ok.status, StatusCode::OK, "an ordinary path is forwarded");
    let seen = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert_eq!(
        seen,
        vec![("/v2/payments/charges/ch_1".to_owned(), true)],
        "only the ordinary request reached the upstream"
    );
}

/// Security review finding 5: TRACE would make an echoing upstream send the
/// injected credential back to the app; it is answered 405 by the sidecar.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_is_answered_405_and_never_forwarded() {
    let s = setup("").await;
    let before = s.api.requests();
    let reply = raw(
        s.proxy,
        b"TRACE /api/v1/payments HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(
        reply.text.starts_with("HTTP/1.1 405"),
        "TRACE gets 405: {}",
        reply.text
    );
    assert!(reply
        .text
        .contains("x-tokenproxy-error: method_not_allowed"));
    assert!(!reply.text.to_ascii_lowercase().contains("bearer"));
    assert_eq!(s.api.requests(), before, "TRACE never reaches the upstream");
    still_serves(&s, "TRACE").await;
}

/// Sends `head` and then `body` one byte every `every`, while reading the
/// answer; returns the status line (or "" when none came within `within`) and
/// how long it took.
async fn trickle(
    addr: SocketAddr,
    head: String,
    body_len: usize,
    every: Duration,
    within: Duration,
) -> (String, Duration) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut read, mut write) = stream.into_split();
    let started = tokio::time::Instant::now();
    let writer = tokio::spawn(async move {
        if write.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        for _ in 0..body_len {
            tokio::time::sleep(every).await;
            if write.write_all(b"x").await.is_err() {
                return;
            }
        }
        // Keep the write half open: a half-closed connection is closed by the server.
        std::future::pending::<()>().await;
        drop(write);
    });
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let _ = tokio::time::timeout(within, async {
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match read.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    writer.abort();
    let text = String::from_utf8_lossy(&buf).into_owned();
    (text, started.elapsed())
}

/// Security review finding 8: a request body trickling in (one byte per
/// 200 ms, far under `body_min_rate`) used to hold its connection forever. It
/// is cut off after about `body_timeout` with 408 `body_timeout`, whether it
/// was being buffered for a replay or streamed to the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_body_is_cut_off_with_408() {
    let s = setup("body_timeout = \"1s\"").await;
    let head = |len: usize| {
        format!(
            "POST /api/v1/payments HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len}\r\nContent-Type: application/json\r\n\r\n"
        )
    };
    let before = s.api.requests();
    // Buffered (under retry_body_limit): nothing reaches the upstream.
    let (text, took) = trickle(
        s.proxy,
        head(100),
        100,
        Duration::from_millis(200),
        Duration::from_secs(5),
    )
    .await;
    assert!(
        text.starts_with("HTTP/1.1 408"),
        "a trickling body gets 408 (after {took:?}): {text:?}"
    );
    assert!(text.contains("x-tokenproxy-error: body_timeout"), "{text}");
    assert!(
        took < Duration::from_secs(3),
        "cut off after about body_timeout, not later ({took:?})"
    );
    assert_eq!(
        s.api.requests(),
        before,
        "the incomplete body was never forwarded"
    );
    // Streamed (over retry_body_limit, default 1MiB): the upstream's read fails too.
    let (text, took) = trickle(
        s.proxy,
        head(2 * 1024 * 1024),
        2 * 1024 * 1024,
        Duration::from_millis(200),
        Duration::from_secs(5),
    )
    .await;
    assert!(
        text.starts_with("HTTP/1.1 408"),
        "a trickling streamed body gets 408 (after {took:?}): {text:?}"
    );
    still_serves(&s, "trickling bodies").await;
}

/// Security review finding 8: a body that arrives steadily, if slowly, above
/// `body_min_rate`, is not cut off although it takes longer than `body_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_but_steady_body_is_not_cut_off() {
    let s = setup("body_timeout = \"1s\"\nbody_min_rate = \"10\"").await;
    // 30 bytes, one per 60 ms (16 B/s > 10 B/s): 1.8 s in all.
    let (text, took) = trickle(
        s.proxy,
        "POST /api/v1/payments HTTP/1.1\r\nHost: localhost\r\nContent-Length: 30\r\n\r\n".into(),
        30,
        Duration::from_millis(60),
        Duration::from_secs(5),
    )
    .await;
    assert!(
        text.starts_with("HTTP/1.1 201"),
        "a steady body is forwarded (after {took:?}): {text:?}"
    );
}
