//! Proxy listeners served by worker threads (`[runtime] workers`), as `tokenproxy
//! run` does: every worker accepts from every listener, and a listener's limits
//! hold across all of them.

use crate::support;

use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::{TestClient, CLIENT_ID};
use tokenproxy_mock::{MockApi, MockProvider};

const TEMPLATE: &str = r#"
[admin]
listen = "{admin}"
[limits]
max_connections = {max}
[clients.payments]
listen = "{listen}"
upstream = "{upstream}"
[clients.payments.token]
url = "{token_url}"
client_id = "{client_id}"
client_secret = "${CLIENT_SECRET}"
"#;

fn template(provider: &MockProvider, api: &MockApi, max_connections: usize) -> String {
    TEMPLATE
        .replace("{max}", &max_connections.to_string())
        .replace("{upstream}", &api.url())
        .replace("{token_url}", &provider.token_url())
        .replace("{client_id}", CLIENT_ID)
}

/// Sends one GET on `conn` and reads the answer's first bytes; None when the
/// sidecar closed the connection without answering.
async fn one_request(conn: &mut TcpStream) -> Option<Vec<u8>> {
    conn.write_all(b"GET /api/v1/payments HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .ok()?;
    let mut buf = vec![0u8; 4096];
    match tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => Some(buf[..n].to_vec()),
        Ok(_) => None,
        Err(_) => panic!("no answer and no close within 5 s"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_connections_on_four_workers_are_all_served_with_a_token() {
    let (provider, api) = support::backends().await;
    let (running, proxy, _admin) =
        support::start_sidecar_on_workers(&template(&provider, &api, 10_000), 4).await;
    let http = TestClient::new();
    let url = format!("http://{proxy}/api/v1/payments");
    let loops: Vec<_> = (0..32)
        .map(|_| {
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                for _ in 0..25 {
                    statuses.push(http.get(&url).await.status);
                }
                statuses
            })
        })
        .collect();
    let mut served = 0;
    for l in loops {
        let statuses = l.await.expect("request loop");
        assert!(
            statuses.iter().all(|s| *s == StatusCode::OK),
            "{statuses:?}"
        );
        served += statuses.len();
    }
    assert_eq!(served, 800);
    assert_eq!(api.requests(), 800, "every request reached the API");
    assert_eq!(
        provider.token_requests(),
        1,
        "the workers share one token: one token request"
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_holds_across_all_workers() {
    let (provider, api) = support::backends().await;
    let (_running, proxy, _admin) =
        support::start_sidecar_on_workers(&template(&provider, &api, 2), 2).await;
    // Two connections are served and kept open: the cap is reached.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut conn = TcpStream::connect(proxy).await.expect("connect");
        let answer = one_request(&mut conn).await.expect("served");
        assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
        held.push(conn);
    }
    // Each further connection is refused, whichever worker accepts it (with a cap
    // per worker instead of per listener, the idle worker would serve them).
    for attempt in 0..12 {
        let mut conn = TcpStream::connect(proxy).await.expect("connect");
        assert_eq!(
            one_request(&mut conn).await,
            None,
            "connection {attempt} over the cap was served"
        );
    }
    drop(held);
    let freed = support::eventually(Duration::from_secs(5), || {
        use std::io::{Read, Write};
        let served = |addr: SocketAddr| -> std::io::Result<bool> {
            let mut c = std::net::TcpStream::connect(addr)?;
            c.set_read_timeout(Some(Duration::from_secs(1)))?;
            c.write_all(
                b"GET /api/v1/payments HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            )?;
            let mut b = [0u8; 12];
            c.read_exact(&mut b)?;
            Ok(&b == b"HTTP/1.1 200")
        };
        served(proxy).unwrap_or(false)
    })
    .await;
    assert!(freed, "closed connections give their slots back");
}
