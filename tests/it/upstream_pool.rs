//! Connection reuse to an `http://` upstream: sequential requests share one pooled
//! connection, also when each response body is too large to arrive with its head,
//! when there is no body at all, and never after an app left mid-body.

use crate::support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use support::TestClient;
use tokio::net::TcpListener;

/// An upstream answering 200 with `body_len` bytes (`/empty`: 200 with none,
/// `/no-content`: 204, `/stall`: 16 KiB of a body that never ends); counts the
/// connections it accepts.
async fn counting_upstream(body_len: usize) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    let body = Bytes::from(vec![b'x'; body_len]);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let body = body.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let response = match req.uri().path() {
                        "/empty" => http::Response::new(Full::new(Bytes::new()).boxed()),
                        "/no-content" => http::Response::builder()
                            .status(StatusCode::NO_CONTENT)
                            .body(Full::new(Bytes::new()).boxed())
                            .expect("response"),
                        "/stall" => http::Response::new(Stall(false).boxed()),
                        _ => http::Response::new(Full::new(body.clone()).boxed()),
                    };
                    async move { Ok::<_, Infallible>(response) }
                });
                if let Err(e) = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    eprintln!("upstream connection: {e}");
                }
            });
        }
    });
    (addr, accepted)
}

/// 16 KiB, then nothing more, ever: a response body still unfinished when the
/// app goes away.
struct Stall(bool);

impl http_body::Body for Stall {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        if std::mem::replace(&mut self.0, true) {
            return std::task::Poll::Pending;
        }
        let chunk = Bytes::from(vec![b'y'; 16 * 1024]);
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(chunk))))
    }
}

async fn sequential_requests_use_one_connection(body_len: usize) {
    let (upstream, accepted) = counting_upstream(body_len).await;
    let (_provider, _running, proxy) = support::sidecar_for_upstream(upstream).await;
    let http = TestClient::new();
    for i in 0..20 {
        let r = http.get(&format!("http://{proxy}/pay/{i}")).await;
        assert_eq!(r.status, StatusCode::OK, "request {i}: {}", r.text());
        assert_eq!(r.body.len(), body_len, "request {i} got the whole body");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "20 sequential requests should reuse one upstream connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_small_requests_reuse_one_upstream_connection() {
    sequential_requests_use_one_connection(64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_is_reused_once_a_large_response_body_was_read() {
    // 1 MiB: far more than arrives with the head, so the connection is busy when
    // the head is handed back and returns to the pool only after the body.
    sequential_requests_use_one_connection(1 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_without_a_body_and_head_requests_reuse_one_upstream_connection() {
    let (upstream, accepted) = counting_upstream(64).await;
    let (_provider, _running, proxy) = support::sidecar_for_upstream(upstream).await;
    let http = TestClient::new();
    for i in 0..10 {
        let r = http.get(&format!("http://{proxy}/empty")).await;
        assert_eq!((r.status, r.body.len()), (StatusCode::OK, 0), "request {i}");
        let r = http.get(&format!("http://{proxy}/no-content")).await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "request {i}");
        let r = http
            .request(http::Method::HEAD, &format!("http://{proxy}/x"), &[], b"")
            .await;
        assert_eq!((r.status, r.body.len()), (StatusCode::OK, 0), "request {i}");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "30 sequential requests without a response body should reuse one upstream connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_connection_left_mid_body_is_never_reused_and_the_next_request_is_whole() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body_len = 64 * 1024;
    let (upstream, accepted) = counting_upstream(body_len).await;
    let (_provider, _running, proxy) = support::sidecar_for_upstream(upstream).await;
    let http = TestClient::new();
    let r = http.get(&format!("http://{proxy}/first")).await;
    assert_eq!(r.body.len(), body_len);
    assert_eq!(accepted.load(Ordering::SeqCst), 1);

    // An app reads the start of a body that is still coming, and goes away. (A
    // finite body could be forwarded whole into the loopback socket buffers before
    // the app leaves, and the connection then rightly reused.)
    let mut app = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    app.write_all(b"GET /stall HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .expect("write");
    let mut buf = vec![0u8; 16 * 1024];
    let n = app.read(&mut buf).await.expect("read");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "a response started");
    drop(app);

    // The rest of that body must never be read as the next response: the next
    // request is answered whole, on a new upstream connection.
    for i in 0..3 {
        let r = http.get(&format!("http://{proxy}/after/{i}")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(
            r.body.len(),
            body_len,
            "request {i} got exactly its own body"
        );
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "the half-read connection was not reused; one new connection served the rest"
    );
}
