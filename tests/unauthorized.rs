//! An upstream 401 retires the token (once, however many requests saw it),
//! refreshes, and replays the request once with the same body.

mod support;

use http::{Method, StatusCode};
use support::{harness, metric, wait_ready, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_on_a_post_is_replayed_once_with_the_same_body_and_a_new_token() {
    let h = harness(Options::default()).await;
    wait_ready(&h).await;
    h.api.reject_next(1);
    let body = br#"{"amount":100,"currency":"EUR"}"#;
    let r = h
        .http
        .request(
            Method::POST,
            &format!("http://{}/api/v1/payments", h.proxy),
            &[("content-type", "application/json")],
            body,
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "the replay must succeed: {}",
        r.text()
    );
    let seen = h.api.recorded();
    assert_eq!(seen.len(), 2, "one send and one replay");
    assert_eq!(seen[0].status, 401);
    assert_eq!(&seen[0].body[..], body);
    assert_eq!(&seen[1].body[..], body, "the replay carries the same body");
    assert_eq!(seen[0].token_serial, Some(1));
    assert_eq!(
        seen[1].token_serial,
        Some(2),
        "the replay carries the new token"
    );
    assert_eq!(h.provider.token_requests(), 2, "one refresh after the 401");
    let text = h
        .http
        .get(&format!("http://{}/metrics", h.admin))
        .await
        .text();
    assert_eq!(
        metric(
            &text,
            "tokenproxy_unauthorized_retries_total",
            &[("client", "payments"), ("outcome", "recovered")]
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_requests_hitting_a_revoked_token_cause_one_refresh() {
    let h = harness(Options::default()).await;
    wait_ready(&h).await;
    assert_eq!(h.provider.token_requests(), 1);
    h.provider.revoke_all();
    let url = format!("http://{}/api/v1/payments", h.proxy);
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let http = h.http.clone();
        let url = url.clone();
        tasks.push(tokio::spawn(async move { http.get(&url).await.status }));
    }
    for t in tasks {
        assert_eq!(
            t.await.expect("task"),
            StatusCode::OK,
            "each request recovers by replay"
        );
    }
    assert_eq!(
        h.provider.token_requests(),
        2,
        "50 requests that saw the same 401 cause exactly one refresh"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_401_goes_back_to_the_app_as_it_came() {
    let h = harness(Options::default()).await;
    wait_ready(&h).await;
    h.api.reject_next(2);
    let r = h
        .http
        .get(&format!("http://{}/api/v1/payments", h.proxy))
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.error_code(),
        None,
        "the API's own 401 is not a sidecar error"
    );
    assert!(
        r.headers.get("www-authenticate").is_some(),
        "the API's WWW-Authenticate passes through"
    );
    assert_eq!(r.json()["error"], "invalid_token");
    assert_eq!(h.api.requests(), 2, "replayed exactly once");
    let text = h
        .http
        .get(&format!("http://{}/metrics", h.admin))
        .await
        .text();
    assert_eq!(
        metric(
            &text,
            "tokenproxy_unauthorized_retries_total",
            &[("client", "payments"), ("outcome", "failed")]
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_too_large_to_buffer_is_not_replayed() {
    let h = harness(Options::default().client(r#"retry_body_limit = "1KiB""#)).await;
    wait_ready(&h).await;
    h.api.reject_next(1);
    let body = vec![b'x'; 4096];
    let r = h
        .http
        .request(
            Method::POST,
            &format!("http://{}/api/v1/payments", h.proxy),
            &[],
            &body,
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::UNAUTHORIZED,
        "the 401 goes back to the app"
    );
    assert_eq!(h.api.requests(), 1, "a large body is never sent twice");
    assert_eq!(
        h.api.recorded()[0].body.len(),
        4096,
        "the streamed body arrived whole"
    );
    let text = h
        .http
        .get(&format!("http://{}/metrics", h.admin))
        .await
        .text();
    assert_eq!(
        metric(
            &text,
            "tokenproxy_unauthorized_retries_total",
            &[("client", "payments"), ("outcome", "not_replayable")]
        ),
        Some(1.0)
    );
    // The token was still retired, so the next request uses a new one.
    let next = h
        .http
        .get(&format!("http://{}/api/v1/payments", h.proxy))
        .await;
    assert_eq!(next.status, StatusCode::OK);
    assert_eq!(h.api.recorded()[1].token_serial, Some(2));
}
