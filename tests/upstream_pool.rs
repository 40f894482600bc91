//! Connection reuse to an `http://` upstream: sequential requests share one pooled
//! connection, also when each response body is too large to arrive with its head.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use support::TestClient;
use tokio::net::TcpListener;

/// An upstream answering 200 with `body_len` bytes; counts the connections it accepts.
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
                let service = service_fn(move |_req| {
                    let body = body.clone();
                    async move { Ok::<_, Infallible>(http::Response::new(Full::new(body))) }
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
