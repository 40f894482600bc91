//! Hostile client input over raw TCP: request-smuggling vectors, oversized or
//! malformed heads, slow heads and connection floods. Each is answered (or the
//! connection dropped) as listed, nothing reaches the upstream, and the process
//! keeps serving the next request.
//!
//! `Host` is not trusted for routing: requests are routed by listener and path
//! prefix only and `Host` is rewritten to the upstream's, so a mismatching `Host`
//! is forwarded like any other request.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;
use support::{start_sidecar, TestClient};
use tokenproxy::mock::{MockApi, MockProvider, ProviderConfig};
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
