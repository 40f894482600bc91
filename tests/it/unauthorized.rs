//! An upstream 401 that is plausibly about the token asks for a new one (once,
//! however many requests saw it) and replays the request once with the same
//! body when repeating it is safe. A 401 that is not about the token (a young
//! token without `invalid_token`, or one a fresh token got too) goes back to the
//! app and costs no token request; the old token serves until a new one is in.

use crate::support;

use std::time::Duration;

use http::{Method, StatusCode};
use support::{harness, metric, wait_ready, Options};
use tokenproxy_mock::Fault;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_on_a_post_with_an_idempotency_key_is_replayed_once_with_the_same_body_and_a_new_token(
) {
    let h = harness(Options::default()).await;
    wait_ready(&h).await;
    h.api.reject_next(1);
    let body = br#"{"amount":100,"currency":"EUR"}"#;
    let r = h
        .http
        .request(
            Method::POST,
            &format!("http://{}/api/v1/payments", h.proxy),
            &[
                ("content-type", "application/json"),
                ("idempotency-key", "order-42"),
            ],
            body,
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "the replay must succeed: {}",
        r.text()
    );
    assert_eq!(
        r.headers.get("x-tokenproxy-replayed").map(|v| v.as_bytes()),
        Some(&b"1"[..]),
        "the app is told the request was sent twice"
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
    // A new token was still asked for, so the next requests do not meet the same 401.
    // Counted once installed (the provider counts the request before its answer
    // reaches the sidecar, so its count alone can come a moment too early).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        let refreshed = metric(
            &metrics_text(&h).await,
            "tokenproxy_token_refreshes_total",
            &[
                ("client", "payments"),
                ("trigger", "unauthorized"),
                ("outcome", "success"),
            ],
        );
        if refreshed == Some(1.0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the invalid_token 401 asked for a new token and installed it"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(h.provider.token_requests(), 2);
    let next = h
        .http
        .get(&format!("http://{}/api/v1/payments", h.proxy))
        .await;
    assert_eq!(next.status, StatusCode::OK);
    assert_eq!(h.api.recorded()[1].token_serial, Some(2));
}

async fn metrics_text(h: &support::Harness) -> String {
    h.http
        .get(&format!("http://{}/metrics", h.admin))
        .await
        .text()
}

fn provider_rate_limited() -> Fault {
    Fault::Status {
        status: 429,
        body: r#"{"error":"slow_down"}"#.into(),
        content_type: "application/json",
        retry_after: Some(300),
    }
}

/// Security review finding 2: ten 401s from a resource the token may not reach
/// (a permissions problem: no `invalid_token`, a young token), with a provider
/// that rate-limits its token endpoint, used to retire the token and leave every
/// request of the client with 503 for five minutes. They now go back to the app
/// as the API sent them, cost no token request, and the client keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permission_401s_cost_no_token_request_and_never_lock_the_client_out() {
    let h = harness(Options::default()).await;
    wait_ready(&h).await;
    h.provider.set_fault(provider_rate_limited());
    for _ in 0..10 {
        let r = h.http.get(&format!("http://{}/status/401", h.proxy)).await;
        assert_eq!(
            r.status,
            StatusCode::UNAUTHORIZED,
            "the API's 401 goes back"
        );
        assert_eq!(
            r.error_code(),
            None,
            "it is the API's answer, not the sidecar's"
        );
    }
    assert_eq!(
        h.provider.token_requests(),
        1,
        "no token request for a permissions 401"
    );
    let ok = h
        .http
        .get(&format!("http://{}/api/v1/payments", h.proxy))
        .await;
    assert_eq!(
        ok.status,
        StatusCode::OK,
        "the client keeps serving: {}",
        ok.text()
    );
    let ready = h.http.get(&format!("http://{}/readyz", h.admin)).await;
    assert_eq!(ready.status, StatusCode::OK, "the client stays ready");
}

/// Security review finding 2: 200 requests the API answers 401 `invalid_token`
/// whatever the token (a wrong audience, say) used to cost one token request
/// each. The first refresh and replay prove the 401 is not about the token; the
/// rest go back to the app without another token request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_that_a_fresh_token_gets_too_stops_retiring_tokens() {
    let h = harness(Options::default()).await;
    wait_ready(&h).await;
    h.api.reject_next(10_000);
    let url = format!("http://{}/api/v1/payments", h.proxy);
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let http = h.http.clone();
        let url = url.clone();
        tasks.push(tokio::spawn(async move { http.get(&url).await.status }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("task"), StatusCode::UNAUTHORIZED);
    }
    assert!(
        h.provider.token_requests() <= 2,
        "200 401s cost at most one token request (saw {})",
        h.provider.token_requests() - 1
    );
    // Later 401s, one at a time, cost nothing either.
    for _ in 0..20 {
        assert_eq!(h.http.get(&url).await.status, StatusCode::UNAUTHORIZED);
    }
    assert!(h.provider.token_requests() <= 2, "nor do later ones");
}

/// Security review finding 2: when the refresh after an `invalid_token` 401 is
/// answered 429 with `Retry-After: 300`, the token the client holds keeps
/// serving (the API may have refused it for one resource only): the client is
/// not blanked for five minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_never_blanks_a_client_that_holds_an_unexpired_token() {
    let h = harness(Options::default()).await;
    wait_ready(&h).await;
    h.provider.set_fault(provider_rate_limited());
    h.api.reject_next(1);
    let url = format!("http://{}/api/v1/payments", h.proxy);
    let first = h.http.get(&url).await;
    assert_ne!(
        first.status,
        StatusCode::OK,
        "the refused request is not faked"
    );
    for _ in 0..5 {
        let r = h.http.get(&url).await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "the unexpired token keeps serving: {}",
            r.text()
        );
    }
    let ready = h.http.get(&format!("http://{}/readyz", h.admin)).await;
    assert_eq!(ready.status, StatusCode::OK, "the client stays ready");
}

/// Security review finding 3: a 401 to a POST without an idempotency key is
/// not replayed (a second charge is worse than a 401 the app can retry); it
/// goes back as it came and counts as `not_replayable`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_without_an_idempotency_key_is_never_replayed() {
    let h = harness(Options::default()).await;
    wait_ready(&h).await;
    h.api.reject_next(1);
    let r = h
        .http
        .request(
            Method::POST,
            &format!("http://{}/api/v1/payments", h.proxy),
            &[("content-type", "application/json")],
            br#"{"amount":100}"#,
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::UNAUTHORIZED,
        "the 401 goes back to the app"
    );
    assert_eq!(h.api.requests(), 1, "the payment was sent once");
    assert!(r.headers.get("x-tokenproxy-replayed").is_none());
    assert_eq!(
        metric(
            &metrics_text(&h).await,
            "tokenproxy_unauthorized_retries_total",
            &[("client", "payments"), ("outcome", "not_replayable")]
        ),
        Some(1.0)
    );
}

/// Security review finding 3: idempotent methods, configured idempotency key
/// headers and a client's explicit opt-in make a request replayable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_follow_the_method_the_idempotency_headers_and_the_opt_in() {
    type Case = (Method, &'static [(&'static str, &'static str)], bool);
    let cases: &[Case] = &[
        (Method::PUT, &[], true),
        (Method::DELETE, &[], true),
        (Method::POST, &[("x-request-nonce", "n-1")], true),
        (Method::POST, &[("idempotency-key", "k-1")], false),
        (Method::PATCH, &[], false),
    ];
    for (method, headers, replayed) in cases {
        // A sidecar each: 401-triggered refreshes are rate-limited per client.
        let h = harness(Options::default().client(r#"idempotency_headers = ["X-Request-Nonce"]"#))
            .await;
        wait_ready(&h).await;
        h.api.reject_next(1);
        let url = format!("http://{}/api/v1/payments", h.proxy);
        let r = h.http.request(method.clone(), &url, headers, b"{}").await;
        assert_eq!(
            (
                h.api.requests(),
                r.headers.contains_key("x-tokenproxy-replayed")
            ),
            if *replayed { (2, true) } else { (1, false) },
            "{method} with {headers:?}"
        );
    }

    let opted_in = harness(Options::default().client("replay_non_idempotent = true")).await;
    wait_ready(&opted_in).await;
    opted_in.api.reject_next(1);
    let r = opted_in
        .http
        .request(
            Method::POST,
            &format!("http://{}/api/v1/payments", opted_in.proxy),
            &[],
            b"{}",
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "an opted-in client replays a POST"
    );
    assert_eq!(opted_in.api.requests(), 2);
}

/// Security review finding 8: replay buffers are bounded process-wide
/// (`limits.max_buffered_bytes`); a body that finds no room streams once and
/// is not replayable, instead of growing memory without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_beyond_the_process_buffer_budget_streams_and_is_not_replayed() {
    let template = support::ONE_CLIENT.replace(
        "[clients.payments]\n",
        "[limits]\nmax_buffered_bytes = \"100\"\n[clients.payments]\n",
    );
    let template: &'static str = Box::leak(template.into_boxed_str());
    let h = harness(Options {
        template,
        ..Options::default()
    })
    .await;
    wait_ready(&h).await;
    let url = format!("http://{}/api/v1/payments", h.proxy);
    let key = [("idempotency-key", "k-1")];
    h.api.reject_next(1);
    let small = h.http.request(Method::POST, &url, &key, &[b'x'; 50]).await;
    assert_eq!(
        small.status,
        StatusCode::CREATED,
        "a body within the budget is replayed"
    );
    h.api.reject_next(1);
    let before = h.api.requests();
    let large = h.http.request(Method::POST, &url, &key, &[b'x'; 500]).await;
    assert_eq!(
        large.status,
        StatusCode::UNAUTHORIZED,
        "beyond the budget: not replayed"
    );
    assert_eq!(h.api.requests() - before, 1, "sent once");
    assert_eq!(
        h.api.recorded()[before].body.len(),
        500,
        "the streamed body arrived whole"
    );
}
