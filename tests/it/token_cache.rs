//! The token is fetched once for many concurrent callers and renewed in the
//! background before it expires, so requests never wait on the token endpoint.

use crate::support;

use std::time::Duration;

use http::StatusCode;
use support::{harness, metric, wait_ready, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_first_requests_cause_one_token_request() {
    let h = harness(Options::default()).await;
    let url = format!("http://{}/api/v1/payments", h.proxy);
    let mut tasks = Vec::new();
    for _ in 0..500 {
        let http = h.http.clone();
        let url = url.clone();
        tasks.push(tokio::spawn(async move { http.get(&url).await.status }));
    }
    let mut ok = 0;
    for t in tasks {
        if t.await.expect("task") == StatusCode::OK {
            ok += 1;
        }
    }
    assert_eq!(ok, 500, "every request must succeed");
    assert_eq!(
        h.provider.token_requests(),
        1,
        "exactly one token request for 500 callers"
    );
    assert_eq!(h.api.requests(), 500);
    assert!(
        h.api.recorded().iter().all(|r| r.token_serial == Some(1)),
        "every request carried the one token"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_second_token_is_renewed_ahead_of_expiry_and_no_request_waits() {
    let h = harness(Options::default().lifetime(Duration::from_secs(3))).await;
    wait_ready(&h).await;
    let url = format!("http://{}/api/v1/payments", h.proxy);
    let started = tokio::time::Instant::now();
    let mut sent = 0u64;
    while started.elapsed() < Duration::from_secs(10) {
        let r = h.http.get(&url).await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "request {sent} failed: {}",
            r.text()
        );
        sent += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A 3 s token is refreshed 1 s before expiry: at 0, 2, 4, 6, 8 (and maybe 10) s.
    let token_requests = h.provider.token_requests();
    assert!(
        (5..=6).contains(&token_requests),
        "expected 5-6 token requests in 10 s of 3 s tokens, saw {token_requests}"
    );
    let text = h
        .http
        .get(&format!("http://{}/metrics", h.admin))
        .await
        .text();
    let labels = [("client", "payments")];
    assert_eq!(
        metric(&text, "tokenproxy_token_wait_seconds_sum", &labels),
        Some(0.0),
        "no request may wait for a token in steady state"
    );
    assert_eq!(
        metric(&text, "tokenproxy_token_wait_seconds_count", &labels),
        Some(sent as f64),
        "every request records its (zero) wait"
    );
    let proactive = metric(
        &text,
        "tokenproxy_token_refreshes_total",
        &[
            ("client", "payments"),
            ("trigger", "proactive"),
            ("outcome", "success"),
        ],
    )
    .unwrap_or(0.0);
    assert!(
        proactive >= 4.0,
        "refreshes must be proactive, saw {proactive}"
    );
}
