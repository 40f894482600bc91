//! `Expect: 100-continue` on uploads over `retry_body_limit`, over raw sockets
//! on both sides: the upstream decides whether the body is sent. It refuses
//! from the head and the app gets that answer without a `100` and without its
//! body being read; it says `100` and the body follows; it ignores `Expect`
//! and the body follows after the sidecar's one-second wait. A small body is
//! read by the sidecar, which answers `100` itself and drops `Expect`.

use crate::app_protocols::sidecar_for_tls_upstream;
use crate::support;
use crate::upstream_tls::{tls_acceptor, Ca};

use std::net::SocketAddr;
use std::time::Duration;

use support::{read_raw_head, read_raw_message, RawMessage};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// What the upstream does with a request that says `Expect: 100-continue`.
#[derive(Clone, Copy, Debug)]
enum Upstream {
    /// Answers 413 from the head, then reads whatever comes until the
    /// connection ends.
    Refuses,
    /// Answers `100 Continue`, reads the body, answers 201.
    Continues,
    /// Reads the body as if no `Expect` had been sent, answers 201.
    Ignores,
}

/// What the upstream saw of one request.
#[derive(Debug)]
struct Seen {
    head: String,
    /// Bytes that had arrived with the head, before any word from the upstream.
    with_head: usize,
    /// The body bytes read (after the head).
    body: Vec<u8>,
}

const REFUSAL: &str = r#"{"error":"payload_too_large"}"#;

/// A raw upstream doing `what` with each request (over TLS with `tls`), and
/// the channel on which it reports what it saw.
async fn upstream(
    what: Upstream,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> (SocketAddr, mpsc::UnboundedReceiver<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (tx, tls) = (tx.clone(), tls.clone());
            tokio::spawn(async move {
                let seen = match tls {
                    Some(acceptor) => match acceptor.accept(stream).await {
                        Ok(stream) => serve(stream, what).await,
                        Err(_) => None,
                    },
                    None => serve(stream, what).await,
                };
                if let Some(seen) = seen {
                    let _ = tx.send(seen);
                }
            });
        }
    });
    (addr, rx)
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, what: Upstream) -> Option<Seen> {
    let mut pending = Vec::new();
    let head = read_raw_head(&mut stream, &mut pending).await?;
    let mut seen = Seen {
        with_head: pending.len(),
        head,
        body: Vec::new(),
    };
    let length: usize = RawMessage {
        head: seen.head.clone(),
        body: Vec::new(),
    }
    .header("content-length")
    .and_then(|v| v.parse().ok())
    .unwrap_or(0);
    match what {
        Upstream::Refuses => {
            let answer = format!(
                "HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\n\r\n{REFUSAL}",
                REFUSAL.len()
            );
            stream.write_all(answer.as_bytes()).await.ok()?;
            // Whatever comes now is the body the app should never have sent.
            seen.body = pending;
            let mut chunk = [0u8; 16 * 1024];
            while let Ok(n) = stream.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                seen.body.extend_from_slice(&chunk[..n]);
            }
            return Some(seen);
        }
        Upstream::Continues => {
            stream
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .ok()?;
        }
        Upstream::Ignores => {}
    }
    seen.body = pending;
    let mut chunk = [0u8; 64 * 1024];
    while seen.body.len() < length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        seen.body.extend_from_slice(&chunk[..n]);
    }
    stream
        .write_all(b"HTTP/1.1 201 Created\r\nContent-Length: 7\r\n\r\ncreated")
        .await
        .ok()?;
    Some(seen)
}

/// A body of `size` bytes that is not all one byte.
fn payload(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i % 251) as u8).collect()
}

/// What the app saw: the answers in the order they came, and how long after
/// its head the first one came.
struct AppSaw {
    answers: Vec<RawMessage>,
    first_after: Duration,
}

/// Sends a POST of `body` with `Expect: 100-continue` to `proxy`, sending the
/// body only after a `100`, and reads every answer until a final one.
async fn upload_expecting_100(proxy: SocketAddr, body: &[u8]) -> AppSaw {
    let mut app = TcpStream::connect(proxy).await.expect("connect");
    let head = format!(
        "POST /v1/files HTTP/1.1\r\nHost: {proxy}\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );
    app.write_all(head.as_bytes()).await.expect("write head");
    let sent = Instant::now();
    let mut saw = AppSaw {
        answers: Vec::new(),
        first_after: Duration::ZERO,
    };
    let mut pending = Vec::new();
    loop {
        let answer = tokio::time::timeout(
            Duration::from_secs(20),
            read_raw_message(&mut app, &mut pending),
        )
        .await
        .expect("an answer within 20 s")
        .expect("a whole answer");
        if saw.answers.is_empty() {
            saw.first_after = sent.elapsed();
        }
        let status = answer.status();
        saw.answers.push(answer);
        if status != 100 {
            return saw;
        }
        app.write_all(body).await.expect("write body");
    }
}

fn statuses(saw: &AppSaw) -> Vec<u16> {
    saw.answers.iter().map(RawMessage::status).collect()
}

/// The sidecar in front of `addr`: plain `http://`, or `https://` trusting `ca`.
async fn sidecar(
    addr: SocketAddr,
    ca: Option<&Ca>,
) -> (
    tokenproxy_mock::MockProvider,
    tokenproxy::Running,
    SocketAddr,
) {
    match ca {
        Some(ca) => sidecar_for_tls_upstream(&format!("localhost:{}", addr.port()), ca).await,
        None => support::sidecar_for_upstream(addr).await,
    }
}

/// (a) An upstream that refuses the upload from its head: the app gets the
/// 413 as its first and only answer (no `100`), and the upstream gets no byte
/// of the body, whose connection the sidecar then closes; over plain TCP and
/// through TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_refuses_from_the_head_never_gets_the_body() {
    let ca = Ca::new("tokenproxy test CA");
    let (cert, key) = ca.issue(&["localhost"], false);
    for tls in [false, true] {
        let acceptor = tls.then(|| tls_acceptor(&cert, &key, None, &[b"http/1.1"]));
        let (addr, mut seen) = upstream(Upstream::Refuses, acceptor).await;
        let (_provider, _running, proxy) = sidecar(addr, tls.then_some(&ca)).await;
        let saw = upload_expecting_100(proxy, &payload(2 * 1024 * 1024)).await;
        assert_eq!(statuses(&saw), vec![413], "tls: {tls}");
        assert_eq!(saw.answers[0].body, REFUSAL.as_bytes(), "tls: {tls}");
        let seen = tokio::time::timeout(Duration::from_secs(10), seen.recv())
            .await
            .expect("the sidecar closes the refused upload's connection")
            .expect("the upstream saw the request");
        assert_eq!(
            seen.head_header("expect"),
            Some("100-continue"),
            "tls: {tls}: {}",
            seen.head
        );
        assert_eq!(seen.body.len(), 0, "tls: {tls}: no byte of the body");
    }
}

/// (b) An upstream that answers `100`: the app gets `100 Continue`, sends its
/// body, which reaches the upstream whole (none of it before the `100`), and
/// gets the final answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_says_100_gets_the_body_after_it() {
    let ca = Ca::new("tokenproxy test CA");
    let (cert, key) = ca.issue(&["localhost"], false);
    for tls in [false, true] {
        let acceptor = tls.then(|| tls_acceptor(&cert, &key, None, &[b"http/1.1"]));
        let (addr, mut seen) = upstream(Upstream::Continues, acceptor).await;
        let (_provider, _running, proxy) = sidecar(addr, tls.then_some(&ca)).await;
        let body = payload(2 * 1024 * 1024);
        let saw = upload_expecting_100(proxy, &body).await;
        assert_eq!(statuses(&saw), vec![100, 201], "tls: {tls}");
        assert_eq!(saw.answers[1].body, b"created");
        let seen = seen.recv().await.expect("the upstream saw the request");
        assert_eq!(seen.head_header("expect"), Some("100-continue"));
        assert_eq!(
            seen.with_head, 0,
            "tls: {tls}: nothing of the body before the 100"
        );
        assert!(seen.body == body, "tls: {tls}: the body arrived intact");
    }
}

/// (c) An upstream that ignores `Expect`: after the sidecar's one-second wait
/// the app gets `100 Continue`, and the upload succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_ignores_expect_gets_the_body_after_the_wait() {
    let (addr, mut seen) = upstream(Upstream::Ignores, None).await;
    let (_provider, _running, proxy) = support::sidecar_for_upstream(addr).await;
    let body = payload(2 * 1024 * 1024);
    let saw = upload_expecting_100(proxy, &body).await;
    assert_eq!(statuses(&saw), vec![100, 201]);
    assert!(
        saw.first_after >= Duration::from_secs(1),
        "the 100 came after the wait, not before: {:?}",
        saw.first_after
    );
    let seen = seen.recv().await.expect("the upstream saw the request");
    assert_eq!(seen.head_header("expect"), Some("100-continue"));
    assert!(seen.body == body, "the body arrived intact");
}

/// A body the sidecar buffers (up to `retry_body_limit`): the sidecar answers
/// `100` itself at once, reads it, and sends it without `Expect`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_upload_is_answered_100_by_the_sidecar_and_sent_without_expect() {
    let (addr, mut seen) = upstream(Upstream::Ignores, None).await;
    let (_provider, _running, proxy) = support::sidecar_for_upstream(addr).await;
    let body = payload(64 * 1024);
    let saw = upload_expecting_100(proxy, &body).await;
    assert_eq!(statuses(&saw), vec![100, 201]);
    let seen = seen.recv().await.expect("the upstream saw the request");
    assert_eq!(seen.head_header("expect"), None, "{}", seen.head);
    assert!(seen.body == body);
}

impl Seen {
    fn head_header(&self, name: &str) -> Option<&str> {
        self.head.split("\r\n").skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}
