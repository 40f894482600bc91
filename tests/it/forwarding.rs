//! What reaches the upstream and what comes back: the injected token replaces the
//! app's credentials, hop-by-hop headers are stripped, Host is the upstream's,
//! paths and queries are kept, bodies stream, and failures are the sidecar's own
//! JSON errors.

use crate::support;

use std::time::Duration;

use http::{Method, StatusCode};
use support::{harness, start_sidecar, wait_ready, Options, TestClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_credentials_are_replaced_hop_by_hop_stripped_and_host_rewritten() {
    let h = harness(Options::default()).await;
    wait_ready(&h).await;
    let r = h
        .http
        .request(
            Method::GET,
            &format!("http://{}/api/v1/payments?limit=2&cursor=a%20b", h.proxy),
            &[
                ("authorization", "Bearer app-chosen-token"),
                ("connection", "x-hop-secret"),
                ("x-hop-secret", "must-not-pass"),
                ("proxy-authorization", "Basic Zm9vOmJhcg=="),
                ("x-end-to-end", "kept"),
            ],
            b"",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let seen = &h.api.recorded()[0];
    let auth = seen.headers["authorization"].to_str().expect("ascii");
    assert!(auth.starts_with("Bearer "), "a bearer token is injected");
    assert_ne!(
        auth, "Bearer app-chosen-token",
        "the app's Authorization is overwritten"
    );
    assert_eq!(
        seen.token_serial,
        Some(1),
        "the injected token is the provider's"
    );
    assert_eq!(seen.headers.get_all("authorization").iter().count(), 1);
    assert!(
        seen.headers.get("x-hop-secret").is_none(),
        "Connection-named headers are stripped"
    );
    assert!(seen.headers.get("proxy-authorization").is_none());
    assert_eq!(seen.headers["x-end-to-end"], "kept");
    assert_eq!(
        seen.headers["host"],
        h.api.addr().to_string(),
        "Host is the upstream's"
    );
    assert!(
        seen.headers.get("x-request-id").is_some(),
        "a request id is added"
    );
    assert_eq!(seen.path, "/api/v1/payments");
    assert_eq!(seen.query.as_deref(), Some("limit=2&cursor=a%20b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_pass_through_untouched() {
    let h = harness(Options::default()).await;
    wait_ready(&h).await;
    for status in [400u16, 404, 422, 500, 503] {
        let r = h
            .http
            .get(&format!("http://{}/status/{status}", h.proxy))
            .await;
        assert_eq!(r.status.as_u16(), status);
        assert_eq!(
            r.error_code(),
            None,
            "the API's {status} is not the sidecar's error"
        );
        assert_eq!(r.json()["status"], status);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_mebibyte_response_streams_through() {
    let h = harness(Options::default()).await;
    wait_ready(&h).await;
    let r = h
        .http
        .get(&format!(
            "http://{}/big?bytes={}",
            h.proxy,
            10 * 1024 * 1024
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body.len(), 10 * 1024 * 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_is_502_upstream_unreachable() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let provider = tokenproxy_mock::MockProvider::start(Default::default())
        .await
        .expect("provider");
    let template = support::ONE_CLIENT
        .replace("{upstream}", &format!("http://{dead}"))
        .replace("{token_url}", &provider.token_url())
        .replace("{client_id}", support::CLIENT_ID)
        .replace("{client_extra}", "")
        .replace("{token_extra}", "");
    let (_running, proxy, _admin) = start_sidecar(&template).await;
    let r = TestClient::new()
        .get(&format!("http://{proxy}/api/v1/payments"))
        .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.error_code(), Some("upstream_unreachable"));
    assert_eq!(r.json()["error"], "upstream_unreachable");
    assert_eq!(r.json()["client"], "payments");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_slower_than_timeout_is_504_upstream_timeout() {
    let h = harness(Options::default().client(r#"timeout = "300ms""#)).await;
    wait_ready(&h).await;
    let started = tokio::time::Instant::now();
    let r = h
        .http
        .get(&format!("http://{}/slow?ms=3000", h.proxy))
        .await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(r.error_code(), Some("upstream_timeout"));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the timeout bounds the wait"
    );
}

/// Sends raw bytes and returns the status line.
async fn raw(addr: std::net::SocketAddr, request: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("answer in time")
        .expect("read");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_and_foreign_absolute_uris_are_refused() {
    let h = harness(Options::default()).await;
    wait_ready(&h).await;
    let connect = raw(
        h.proxy,
        "CONNECT evil.example:443 HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    .await;
    assert!(
        connect.starts_with("HTTP/1.1 400"),
        "CONNECT refused: {connect}"
    );
    assert!(connect.contains("x-tokenproxy-error: bad_request"));
    let foreign = raw(
        h.proxy,
        "GET http://evil.example/steal HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    .await;
    assert!(
        foreign.starts_with("HTTP/1.1 400"),
        "foreign absolute-form refused: {foreign}"
    );
    let own = raw(
        h.proxy,
        &format!(
            "GET http://{}/api/v1/payments HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            h.proxy, h.proxy
        ),
    )
    .await;
    assert!(
        own.starts_with("HTTP/1.1 200"),
        "absolute-form naming the sidecar itself is fine: {own}"
    );
    assert_eq!(h.api.requests(), 1, "nothing refused reached the upstream");
    // The process keeps serving.
    assert_eq!(
        h.http
            .get(&format!("http://{}/api/v1/payments", h.proxy))
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_prefixes_route_clients_sharing_a_listener_and_are_stripped() {
    let provider = tokenproxy_mock::MockProvider::start(Default::default())
        .await
        .expect("provider");
    let api = tokenproxy_mock::MockApi::start(provider.validator())
        .await
        .expect("api");
    let template = format!(
        r#"
[admin]
listen = "{{admin}}"
[clients.a]
listen = "{{listen}}"
path_prefix = "/a"
upstream = "{api}/base-a"
[clients.a.token]
url = "{token}"
client_id = "demo-client"
client_secret = "${{CLIENT_SECRET}}"
[clients.b]
listen = "{{listen}}"
path_prefix = "/b"
upstream = "{api}"
[clients.b.token]
url = "{token}"
client_id = "demo-client"
client_secret = "${{CLIENT_SECRET}}"
"#,
        api = api.url(),
        token = provider.token_url()
    );
    let (_running, proxy, _admin) = start_sidecar(&template).await;
    let http = TestClient::new();
    assert_eq!(
        http.get(&format!("http://{proxy}/a/x?q=1")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        http.get(&format!("http://{proxy}/b/y")).await.status,
        StatusCode::OK
    );
    let none = http.get(&format!("http://{proxy}/c/z")).await;
    assert_eq!(none.status, StatusCode::NOT_FOUND);
    assert_eq!(none.error_code(), Some("no_route"));
    let none = http.get(&format!("http://{proxy}/ab/z")).await;
    assert_eq!(
        none.error_code(),
        Some("no_route"),
        "prefixes match whole path segments"
    );
    let paths: Vec<_> = api
        .recorded()
        .iter()
        .map(|r| (r.path.clone(), r.query.clone()))
        .collect();
    assert_eq!(
        paths,
        vec![
            ("/base-a/x".to_owned(), Some("q=1".to_owned())),
            ("/y".to_owned(), None)
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_inject_header_and_format_carry_the_token() {
    let h = harness(Options::default().token(
        "[clients.payments.inject]\nheader = \"X-Api-Token\"\nformat = \"Token {token}; v=1\"",
    ))
    .await;
    wait_ready(&h).await;
    // The mock API only reads Authorization, so it refuses; what matters is what it saw.
    let _ = h
        .http
        .request(
            Method::GET,
            &format!("http://{}/api/v1/payments", h.proxy),
            &[
                ("x-api-token", "app-chosen"),
                ("authorization", "Bearer app"),
            ],
            b"",
        )
        .await;
    let seen = &h.api.recorded()[0];
    let value = seen.headers["x-api-token"].to_str().expect("ascii");
    assert!(
        value.starts_with("Token ") && value.ends_with("; v=1"),
        "{value}"
    );
    assert_ne!(value, "app-chosen");
    assert!(
        seen.headers.get("authorization").is_none(),
        "the app's Authorization is dropped too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waiting_in_the_backlog_at_start_is_routed_not_refused() {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use tokenproxy::config::{self, MapEnv};
    use tokenproxy_mock::{MockApi, MockProvider};

    let provider = MockProvider::start(Default::default())
        .await
        .expect("provider");
    let api = MockApi::start(provider.validator()).await.expect("api");
    for round in 0..20 {
        let proxy = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = proxy.local_addr().expect("addr");
        let text = support::ONE_CLIENT
            .replace("{listen}", &addr.to_string())
            .replace("{admin}", &admin.local_addr().expect("addr").to_string())
            .replace("{upstream}", &api.url())
            .replace("{token_url}", &provider.token_url())
            .replace("{client_id}", support::CLIENT_ID)
            .replace("{client_extra}", "")
            .replace("{token_extra}", "");
        let env = MapEnv::new().var("CLIENT_SECRET", support::CLIENT_SECRET);
        let config = config::from_str(&text, None, &env).expect("valid");
        // The request is written before the sidecar starts: it waits in the backlog.
        let queued = tokio::spawn(raw(
            addr,
            "GET /api/v1/payments HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        ));
        tokio::time::sleep(Duration::from_millis(5)).await;
        let mut proxies = BTreeMap::new();
        proxies.insert(addr, proxy);
        let running = tokenproxy::start(
            config,
            tokenproxy::Listeners {
                admin,
                proxies,
                connect: None,
            },
            Arc::new(tokenproxy::clock::SystemClock),
        )
        .expect("start");
        let answer = queued.await.expect("join");
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "round {round}: {answer:?}"
        );
        drop(running);
    }
}
