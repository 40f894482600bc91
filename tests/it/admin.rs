//! The admin endpoints: readiness follows token state, `/status` describes each
//! client without secrets, `/metrics` has every family with children for
//! configured clients from the start.

use crate::support;

use std::time::Duration;

use http::StatusCode;
use support::{harness, wait_ready, Options};
use tokenproxy_mock::Fault;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_describes_the_client_and_readyz_follows_the_token() {
    let h = harness(Options::default().lifetime(Duration::from_secs(3))).await;
    wait_ready(&h).await;
    // The refresher stores the token before it publishes the status, so /readyz
    // may say ready a moment before /status does.
    let mut s = serde_json::Value::Null;
    for _ in 0..100 {
        let status = h.http.get(&format!("http://{}/status", h.admin)).await;
        assert_eq!(status.status, StatusCode::OK);
        s = status.json();
        if s["clients"]["payments"]["state"] == "valid" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let c = &s["clients"]["payments"];
    assert_eq!(c["state"], "valid", "{s}");
    assert_eq!(c["ready"], true);
    assert_eq!(c["generation"], 1);
    assert_eq!(c["last_refresh"]["trigger"], "startup");
    assert_eq!(c["last_refresh"]["outcome"], "success");
    assert_eq!(c["last_refresh"]["grant"], "client_credentials");
    assert!(
        c["access_token_expires_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{c}"
    );
    assert!(c["next_refresh_at"].is_string());
    assert_eq!(c["refreshes_succeeded"], 1);

    // The token is rejected and the provider now refuses: the refused token serves
    // out its life (a 401 may be about one resource), then the client is not ready.
    h.provider.set_fault(Fault::Status {
        status: 400,
        body: r#"{"error":"invalid_client"}"#.into(),
        content_type: "application/json",
        retry_after: None,
    });
    h.provider.revoke_all();
    let r = h
        .http
        .get(&format!("http://{}/api/v1/payments", h.proxy))
        .await;
    assert_eq!(r.error_code(), Some("token_unavailable"));
    let readyz = format!("http://{}/readyz", h.admin);
    let mut ready = h.http.get(&readyz).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while ready.status == StatusCode::OK && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        ready = h.http.get(&readyz).await;
    }
    assert_eq!(
        ready.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "not ready once the token expired"
    );
    let body = ready.json();
    assert_eq!(body["clients"][0]["client"], "payments");
    assert_eq!(body["clients"][0]["state"], "unavailable");
    assert!(
        body["clients"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("invalid_client")),
        "readyz says why: {body}"
    );
    let s = h
        .http
        .get(&format!("http://{}/status", h.admin))
        .await
        .json();
    assert_eq!(
        s["clients"]["payments"]["last_refresh"]["outcome"],
        "rejected"
    );
    assert!(
        s["clients"]["payments"]["refreshes_failed"]
            .as_u64()
            .is_some_and(|n| n >= 1),
        "{s}"
    );
    assert_eq!(
        h.http
            .get(&format!("http://{}/healthz", h.admin))
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_expose_every_contract_family_for_configured_clients_from_the_start() {
    let h = harness(Options::default()).await;
    wait_ready(&h).await;
    let r = h.http.get(&format!("http://{}/metrics", h.admin)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers["content-type"]
        .to_str()
        .is_ok_and(|v| v.starts_with("text/plain")));
    let text = r.text();
    for family in [
        "tokenproxy_token_refreshes_total",
        "tokenproxy_token_request_duration_seconds",
        "tokenproxy_token_expiry_timestamp_seconds",
        "tokenproxy_request_duration_seconds",
        "tokenproxy_token_wait_seconds",
        "tokenproxy_unauthorized_retries_total",
        "tokenproxy_inflight_requests",
        "process_resident_memory_bytes",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family}")),
            "{family} is exported"
        );
    }
    let expiry = support::metric(
        &text,
        "tokenproxy_token_expiry_timestamp_seconds",
        &[("client", "payments")],
    )
    .expect("expiry gauge");
    assert!(expiry > 1.7e9, "the expiry gauge is a Unix time: {expiry}");
    assert_eq!(
        support::metric(
            &text,
            "tokenproxy_unauthorized_retries_total",
            &[("client", "payments"), ("outcome", "recovered")]
        ),
        Some(0.0),
        "children exist before anything happened"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_keeps_the_last_failure_after_a_rejected_refresh_falls_back_to_the_password_grant() {
    let mut options = Options::default()
        .token("grant = \"password\"\nusername = \"alice\"\npassword = \"alice-password\"");
    options.provider.refresh_tokens = true;
    options.provider.rotate_refresh_tokens = true;
    let h = harness(options).await;
    wait_ready(&h).await;

    // The held refresh token is refused once, with a description that repeats every
    // credential the request carried, as some providers do; the password grant works.
    h.provider
        .set_fault_once(Fault::EchoCredentials(tokenproxy_mock::Echo::Raw));
    h.provider.revoke_all();
    let r = h
        .http
        .get(&format!("http://{}/api/v1/payments", h.proxy))
        .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "the rejected refresh falls back to the password grant and the request is replayed: {}",
        r.text()
    );
    let refused = h
        .provider
        .last_faulted_request()
        .expect("the provider refused one token request");
    assert_eq!(refused.param("grant_type"), Some("refresh_token"));
    let refresh_token = refused
        .param("refresh_token")
        .expect("the refused request carried the refresh token")
        .to_owned();

    let s = h
        .http
        .get(&format!("http://{}/status", h.admin))
        .await
        .json();
    let c = &s["clients"]["payments"];
    assert_eq!(c["state"], "valid", "{s}");
    assert_eq!(
        c["last_refresh"]["outcome"], "success",
        "the last call is the password grant that worked: {c}"
    );
    assert_eq!(c["last_refresh"]["grant"], "password", "{c}");
    let failure = &c["last_failure"];
    assert_eq!(
        failure["outcome"], "rejected",
        "the rejected refresh is still shown after the later success: {c}"
    );
    assert_eq!(failure["error"], "invalid_grant", "{c}");
    assert_eq!(failure["grant"], "refresh_token", "{c}");
    assert_eq!(failure["trigger"], "unauthorized", "{c}");
    assert!(
        failure["at"].as_str().is_some_and(|t| t.ends_with('Z')),
        "the failure says when: {c}"
    );
    assert!(
        failure["description"]
            .as_str()
            .is_some_and(|d| d.starts_with("Invalid credentials")),
        "the provider's description is kept, credentials scrubbed: {c}"
    );
    let text = s.to_string();
    for secret in [
        refresh_token.as_str(),
        "alice-password",
        support::CLIENT_SECRET,
    ] {
        assert!(
            !text.contains(secret),
            "/status must not show a credential the provider echoed: {text}"
        );
    }
}
