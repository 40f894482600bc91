//! When the token endpoint is down, slow, failing or talking nonsense, requests
//! get a clear `token_unavailable` within `token_wait_timeout`, the failure is
//! counted with the right outcome, and other clients keep serving.

use crate::support;

use std::time::Duration;

use http::StatusCode;
use support::{harness, metric, start_sidecar, Options, TestClient};
use tokenproxy_mock::{Fault, MockApi, MockProvider, ProviderConfig};

const TWO_CLIENTS: &str = r#"
[admin]
listen = "{admin}"

[clients.broken]
listen = "{listen}"
path_prefix = "/broken"
upstream = "{upstream}"
token_wait_timeout = "1s"

[clients.broken.token]
url = "{broken_token_url}"
client_id = "demo-client"
client_secret = "${CLIENT_SECRET}"
timeout = "500ms"

[clients.healthy]
listen = "{listen}"
path_prefix = "/healthy"
upstream = "{upstream}"

[clients.healthy.token]
url = "{token_url}"
client_id = "demo-client"
client_secret = "${CLIENT_SECRET}"
"#;

/// Runs one fault against the `broken` client and checks the answer, its timing,
/// the metric outcome, and that the `healthy` client is unaffected.
async fn check_fault(fault: Option<Fault>, expected_outcome: &str) -> serde_json::Value {
    let broken = MockProvider::start(ProviderConfig::default())
        .await
        .expect("provider");
    let healthy = MockProvider::start(ProviderConfig::default())
        .await
        .expect("provider");
    let api = MockApi::start(healthy.validator()).await.expect("api");
    let broken_url = match &fault {
        // Nothing listens on a port we bound and released.
        None => {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = l.local_addr().expect("addr");
            drop(l);
            format!("http://{addr}/oauth2/token")
        }
        Some(f) => {
            broken.set_fault(f.clone());
            broken.token_url()
        }
    };
    let template = TWO_CLIENTS
        .replace("{upstream}", &api.url())
        .replace("{broken_token_url}", &broken_url)
        .replace("{token_url}", &healthy.token_url());
    let (running, proxy, admin) = start_sidecar(&template).await;
    let http = TestClient::new();

    let started = tokio::time::Instant::now();
    let r = http
        .get(&format!("http://{proxy}/broken/api/v1/payments"))
        .await;
    let elapsed = started.elapsed();
    assert_eq!(
        r.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "fault {fault:?}: {}",
        r.text()
    );
    assert_eq!(r.error_code(), Some("token_unavailable"));
    assert_eq!(r.json()["client"], "broken");
    assert!(
        r.headers.get("retry-after").is_some(),
        "token_unavailable carries Retry-After"
    );
    assert!(
        elapsed < Duration::from_millis(1500),
        "token_unavailable must come within token_wait_timeout (1 s), took {elapsed:?}"
    );

    let ok = http
        .get(&format!("http://{proxy}/healthy/api/v1/payments"))
        .await;
    assert_eq!(
        ok.status,
        StatusCode::OK,
        "the healthy client keeps serving"
    );

    let text = http.get(&format!("http://{admin}/metrics")).await.text();
    let failures = metric(
        &text,
        "tokenproxy_token_refreshes_total",
        &[
            ("client", "broken"),
            ("trigger", "startup"),
            ("outcome", expected_outcome),
        ],
    );
    assert_eq!(
        failures,
        Some(1.0),
        "fault {fault:?} is counted as {expected_outcome}"
    );
    assert_eq!(
        metric(
            &text,
            "tokenproxy_errors_total",
            &[("client", "broken"), ("error", "token_unavailable")]
        ),
        Some(1.0),
        "the sidecar's own 503 is counted apart from the API's errors"
    );

    let ready = http.get(&format!("http://{admin}/readyz")).await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    let not_ready = ready.json();
    assert_eq!(
        not_ready["clients"][0]["client"], "broken",
        "readyz names the client: {not_ready}"
    );
    let status = http.get(&format!("http://{admin}/status")).await.json();
    drop(running);
    status["clients"]["broken"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_down_gives_token_unavailable() {
    check_fault(None, "error").await;
}

fn status_fault(status: u16, body: String, retry_after: Option<u64>) -> Option<Fault> {
    Some(Fault::Status {
        status,
        body,
        content_type: "application/json",
        retry_after,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_429_with_retry_after_is_honoured_before_the_next_attempt() {
    let status = check_fault(status_fault(429, "{}".into(), Some(30)), "error").await;
    let next = status["next_refresh_at"].as_str().expect("a planned retry");
    let next = humantime::parse_rfc3339(next).expect("RFC 3339");
    let wait = next
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    assert!(
        wait >= std::time::Duration::from_secs(25),
        "Retry-After: 30 is a floor, next try in {wait:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_503_without_retry_after_backs_off_with_the_default_schedule() {
    let status = check_fault(status_fault(503, "busy".into(), None), "error").await;
    assert!(
        status["last_refresh"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("503")),
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_mebibyte_token_response_is_not_read_whole() {
    let status = check_fault(
        status_fault(200, "x".repeat(10 * 1024 * 1024), None),
        "error",
    )
    .await;
    let error = status["last_refresh"]["error"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(
        error.contains("reading the response body"),
        "bounded read: {error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_from_the_token_endpoint_is_not_followed() {
    let status = check_fault(status_fault(302, String::new(), None), "error").await;
    let error = status["last_refresh"]["error"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(error.contains("redirects are not followed"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_500_html_page_gives_token_unavailable() {
    check_fault(
        Some(Fault::Status {
            status: 500,
            body: "<html><body>Internal Server Error</body></html>".into(),
            content_type: "text/html",
            retry_after: None,
        }),
        "error",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_garbage_json_gives_token_unavailable() {
    check_fault(Some(Fault::Garbage), "error").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_slower_than_token_timeout_gives_token_unavailable() {
    check_fault(Some(Fault::Hang), "error").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_rejecting_the_client_counts_as_rejected() {
    check_fault(
        Some(Fault::Status {
            status: 401,
            body: r#"{"error":"invalid_client"}"#.into(),
            content_type: "application/json",
            retry_after: None,
        }),
        "rejected",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_back_off_instead_of_hammering_and_recover_when_the_provider_returns() {
    let h = harness(Options::default().client(r#"token_wait_timeout = "300ms""#)).await;
    support::wait_ready(&h).await;
    h.provider.set_fault(Fault::Status {
        status: 503,
        body: "unavailable".into(),
        content_type: "text/plain",
        retry_after: None,
    });
    // Revoking the held token makes the next request's 401 force a refresh.
    h.provider.revoke_all();
    let url = format!("http://{}/api/v1/payments", h.proxy);
    let first = h.http.get(&url).await;
    assert_eq!(
        first.error_code(),
        Some("token_unavailable"),
        "the replay finds no token"
    );
    let before = h.provider.token_requests();
    for _ in 0..50 {
        let r = h.http.get(&url).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.error_code(), Some("token_unavailable"));
    }
    let during = h.provider.token_requests() - before;
    assert!(
        during <= 2,
        "50 requests during an outage must not each hit the provider (saw {during})"
    );
    h.provider.set_fault(Fault::None);
    // The revoked token keeps its place until a new one is installed (a 401 may be
    // about one resource only), so recovery is a newer generation, not readiness.
    let recovered = support::eventually(Duration::from_secs(5), || {
        h.running
            .token("payments")
            .is_some_and(|t| t.status().generation > 1)
    })
    .await;
    assert!(
        recovered,
        "the client recovers within a backoff step once the provider returns"
    );
    assert_eq!(h.http.get(&url).await.status, StatusCode::OK);
}
