//! Token responses that real providers send and the sidecar must handle by
//! configuration alone: a non-Bearer token type (refused unless inject.format
//! says how to send it), an absolute expiry already past on our clock (clock
//! skew: a fallback lifetime, not a refresh loop), camelCase fields.

use crate::support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use support::{eventually, start_sidecar, TestClient};
use tokenproxy_mock::{MockApi, MockProvider, ProviderConfig};
use tokio::net::TcpListener;

/// A token endpoint that always answers `body`; returns its URL and a request counter.
async fn fixed_token_endpoint(body: &'static str) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("addr");
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let service = service_fn(move |_req| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    async move {
                        let mut r =
                            http::Response::new(Full::new(Bytes::from_static(body.as_bytes())));
                        r.headers_mut().insert(
                            "content-type",
                            http::HeaderValue::from_static("application/json"),
                        );
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (format!("http://{addr}/token"), calls)
}

fn template(token_url: &str, upstream: &str, extra: &str) -> String {
    format!(
        "[admin]\nlisten = \"{{admin}}\"\n[clients.payments]\nlisten = \"{{listen}}\"\nupstream = \"{upstream}\"\n\
         token_wait_timeout = \"1s\"\n[clients.payments.token]\nurl = \"{token_url}\"\nclient_id = \"id\"\n\
         client_secret = \"${{CLIENT_SECRET}}\"\n{extra}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_bearer_token_type_is_refused_unless_inject_format_says_how_to_send_it() {
    let (url, _) = fixed_token_endpoint(
        r#"{"accessToken":"mac-token-1","tokenType":"MAC","expiresIn":"600"}"#,
    )
    .await;
    let provider = MockProvider::start(ProviderConfig::default())
        .await
        .expect("provider");
    let api = MockApi::start(provider.validator()).await.expect("api");

    let (running, proxy, admin) = start_sidecar(&template(&url, &api.url(), "")).await;
    let http = TestClient::new();
    let r = http.get(&format!("http://{proxy}/api/v1/payments")).await;
    assert_eq!(r.error_code(), Some("token_unavailable"));
    let status = http.get(&format!("http://{admin}/status")).await.json();
    let error = status["clients"]["payments"]["last_refresh"]["error"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(
        error.contains("not Bearer") && error.contains("inject.format"),
        "{error}"
    );
    drop(running);

    let with_format = template(
        &url,
        &api.url(),
        "[clients.payments.inject]\nformat = \"MAC {token}\"",
    );
    let (_running, proxy, _) = start_sidecar(&with_format).await;
    let _ = http.get(&format!("http://{proxy}/api/v1/payments")).await;
    let seen = api.recorded();
    let last = seen.last().expect("the request reached the API");
    assert_eq!(
        last.headers["authorization"], "MAC mac-token-1",
        "camelCase fields read, format applied"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expires_at_already_past_on_our_clock_uses_a_fallback_lifetime_instead_of_looping() {
    let (url, calls) = fixed_token_endpoint(
        r#"{"access_token":"pos-token","token_type":"bearer","expires_at":"2006-01-02T15:04:05Z","merchant_id":"M1"}"#,
    )
    .await;
    let (running, _proxy, admin) = start_sidecar(&template(
        &url,
        "http://127.0.0.1:9",
        "default_lifetime = \"5m\"",
    ))
    .await;
    let ready = eventually(Duration::from_secs(5), || {
        running.token("payments").is_some_and(|t| t.is_ready())
    })
    .await;
    assert!(ready, "the token is used despite the skewed expiry");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "no loop of token requests");
    let status = TestClient::new()
        .get(&format!("http://{admin}/status"))
        .await
        .json();
    let expires = status["clients"]["payments"]["access_token_expires_at"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    let expires = humantime::parse_rfc3339(&expires).expect("an RFC 3339 expiry");
    let in_secs = expires
        .duration_since(std::time::SystemTime::now())
        .map(|d| d.as_secs())
        .unwrap_or(0);
    assert!(
        (280..=300).contains(&in_secs),
        "default_lifetime (5m) applies: expires in {in_secs}s"
    );
    assert_eq!(status["clients"]["payments"]["state"], "valid");
}

/// Security review (low): a lifetime too far away to format (here `default_lifetime`
/// of 10,000 years, set past config validation) used to panic the refresher while
/// `/status` said valid; it is clamped, `/status` shows a time, and the refresher
/// keeps working (a rejected token is replaced).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_far_future_lifetime_neither_kills_the_refresher_nor_breaks_status() {
    let (token_url, calls) =
        fixed_token_endpoint(r#"{"access_token":"at-forever","token_type":"Bearer"}"#).await;
    let proxy = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
    let admin_addr = admin.local_addr().expect("addr");
    let text = template(&token_url, "http://127.0.0.1:1", "")
        .replace("{listen}", &proxy.local_addr().expect("addr").to_string())
        .replace("{admin}", &admin_addr.to_string());
    let env = tokenproxy::config::MapEnv::new().var("CLIENT_SECRET", "s");
    let mut config = tokenproxy::config::from_str(&text, None, &env).expect("valid config");
    config.clients[0].token.default_lifetime =
        Some(Duration::from_secs(10_000 * 365 * 24 * 60 * 60));
    let listeners = tokenproxy::Listeners {
        admin,
        proxies: [(proxy.local_addr().expect("addr"), proxy)].into(),
        connect: None,
    };
    let running = tokenproxy::start(config, listeners, Arc::new(tokenproxy::clock::SystemClock))
        .expect("sidecar starts");
    let handle = running.token("payments").expect("client").clone();
    assert!(
        eventually(Duration::from_secs(5), || handle.is_ready()).await,
        "the first token should be installed"
    );
    let status = TestClient::new()
        .get(&format!("http://{admin_addr}/status"))
        .await
        .json();
    let client = &status["clients"]["payments"];
    assert_eq!(client["state"], "valid", "{status}");
    assert!(
        client["access_token_expires_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "/status shows the (clamped) expiry: {status}"
    );
    let token = handle.current().expect("a token");
    assert!(
        matches!(
            handle.on_unauthorized(&token, true),
            tokenproxy::token::Unauthorized::Refreshing
        ),
        "an invalid_token 401 asks for a new token"
    );
    assert!(
        eventually(Duration::from_secs(5), || calls.load(Ordering::SeqCst) == 2
            && handle.is_ready())
        .await,
        "the refresher should still be alive and fetch a new token ({} calls, state {})",
        calls.load(Ordering::SeqCst),
        handle.status().describe()
    );
}
