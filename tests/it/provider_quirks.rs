//! Provider quirks handled by configuration alone: a version header on every
//! token request, a response that names its expiries differently and states
//! them in epoch seconds, and a gateway that answers every token failure with
//! a 500 whose body says what went wrong.

use crate::support;

use std::time::{Duration, SystemTime};

use http::StatusCode;
use support::{eventually, harness, metric, wait_ready, Harness, Options};
use tokenproxy_mock::{ErrorStyle, Fault, ResponseShape};

/// A provider that returns a refresh token and keeps it across refreshes.
fn refreshing(lifetime: Duration) -> Options {
    let mut options = Options::default().lifetime(lifetime);
    options.provider.refresh_tokens = true;
    options.provider.rotate_refresh_tokens = false;
    options
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_version_header_goes_on_the_grant_and_on_every_refresh() {
    let h = harness(
        refreshing(Duration::from_secs(2))
            .token(r#"headers = { "Square-Version" = "2026-01-22" }"#),
    )
    .await;
    wait_ready(&h).await;
    let version = |what: &str| {
        let request = h
            .provider
            .last_request()
            .unwrap_or_else(|| panic!("the provider saw the {what}"));
        let grant = request.param("grant_type").map(str::to_owned);
        let header = request
            .headers
            .get("square-version")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        (grant, header)
    };
    assert_eq!(
        version("grant"),
        (
            Some("client_credentials".to_owned()),
            Some("2026-01-22".to_owned())
        ),
        "the first token request carries the configured version header"
    );
    let refreshed = support::eventually(Duration::from_secs(5), || {
        h.provider.grant_requests("refresh_token") >= 1
    })
    .await;
    assert!(refreshed, "a 2 s token is refreshed ahead of expiry");
    assert_eq!(
        version("refresh"),
        (
            Some("refresh_token".to_owned()),
            Some("2026-01-22".to_owned())
        ),
        "the refresh carries the configured version header too"
    );
}

/// The commerce API's names and unit, as `[clients.NAME.token.response]`.
const EPOCH_MAPPING: &str = r#"
[clients.payments.token.response]
expires_at = "access_token_expiration"
expires_at_unit = "epoch_seconds"
refresh_token_expires_at = "refresh_token_expiration"
refresh_token_expires_at_unit = "epoch_seconds"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expirations_in_epoch_seconds_under_other_names_drive_the_proactive_refresh() {
    let mut options = refreshing(Duration::from_secs(3)).token(EPOCH_MAPPING);
    options.provider.response_shape = ResponseShape::EpochExpirations;
    let h = harness(options).await;
    wait_ready(&h).await;

    let status = h
        .running
        .token("payments")
        .expect("the client has a token handle")
        .status();
    let at = |what: &str, value: Option<&String>| {
        let value = value.unwrap_or_else(|| panic!("/status states when the {what} expires"));
        humantime::parse_rfc3339(value).unwrap_or_else(|e| panic!("{what}: {value}: {e}"))
    };
    let now = SystemTime::now();
    let access = at("access token", status.access_token_expires_at.as_ref());
    assert!(
        access > now && access <= now + Duration::from_secs(3),
        "the access token expires when access_token_expiration says, within 3 s: {status:?}"
    );
    let refresh = at("refresh token", status.refresh_token_expires_at.as_ref());
    let day = now + Duration::from_secs(86_400);
    assert!(
        refresh > day - Duration::from_secs(5) && refresh <= day,
        "the refresh token expires a day on, as refresh_token_expiration says: {status:?}"
    );

    // Requests keep flowing past several expiries; none meets an expired token.
    let url = format!("http://{}/api/v1/payments", h.proxy);
    let started = tokio::time::Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        let r = h.http.get(&url).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = h
        .http
        .get(&format!("http://{}/metrics", h.admin))
        .await
        .text();
    let refreshes = |trigger: &str| {
        metric(
            &text,
            "tokenproxy_token_refreshes_total",
            &[
                ("client", "payments"),
                ("trigger", trigger),
                ("outcome", "success"),
            ],
        )
        .unwrap_or(0.0)
    };
    assert!(
        refreshes("proactive") >= 2.0,
        "3 s tokens are renewed ahead of their epoch-second expiry, saw {} in 5 s",
        refreshes("proactive")
    );
    assert_eq!(
        (refreshes("unauthorized"), refreshes("expired")),
        (0.0, 0.0),
        "no token was renewed only after the API refused it or it expired"
    );
    assert_eq!(
        h.provider.grant_requests("client_credentials"),
        1,
        "the refresh token is used for every renewal"
    );
}

/// A payment gateway that answers every refusal with a 500 naming the error.
fn gateway(mut options: Options) -> Options {
    options.provider.error_style = ErrorStyle::Gateway500;
    options
}

/// The client's entry in `/status`.
async fn client_status(h: &Harness) -> serde_json::Value {
    let status = h
        .http
        .get(&format!("http://{}/status", h.admin))
        .await
        .json();
    status["clients"]["payments"].clone()
}

/// `tokenproxy_token_refreshes_total` for the client's start-up grant ending in `outcome`.
async fn startup_outcomes(h: &Harness, outcome: &str) -> f64 {
    let text = h
        .http
        .get(&format!("http://{}/metrics", h.admin))
        .await
        .text();
    metric(
        &text,
        "tokenproxy_token_refreshes_total",
        &[
            ("client", "payments"),
            ("trigger", "startup"),
            ("outcome", outcome),
        ],
    )
    .unwrap_or(0.0)
}

/// Starts a sidecar whose client secret the provider refuses, waits for the
/// refusal, and returns the client's `/status` entry and the token requests
/// made up to 300 ms after it.
async fn refused_client(options: Options) -> (serde_json::Value, usize) {
    let mut options = options;
    options.provider.client_secret = "a-secret-rotated-at-the-provider".into();
    let h = harness(options).await;
    let failed = eventually(Duration::from_secs(5), || {
        h.running
            .token("payments")
            .is_some_and(|t| t.status().last_failure.is_some())
    })
    .await;
    assert!(failed, "the start-up grant fails");
    // The first backoff is at least half a second: nothing more is asked meanwhile.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let asked = h.provider.token_requests();
    let status = client_status(&h).await;
    assert_eq!(
        startup_outcomes(
            &h,
            status["last_failure"]["outcome"].as_str().unwrap_or("?")
        )
        .await,
        1.0,
        "the metric counts the failure as /status names it: {status}"
    );
    let ready = h.http.get(&format!("http://{}/readyz", h.admin)).await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ready.json()["clients"][0]["client"], "payments");
    (status, asked)
}

const GATEWAY_REJECTED: &str = r#"
[[clients.payments.token.errors]]
status = 500
body_contains = "INVALID_CREDENTIALS"
means = "rejected"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateways_500_that_a_rule_calls_rejected_is_a_rejected_client_as_a_401_invalid_client_is()
{
    let (rfc, rfc_asked) = refused_client(Options::default()).await;
    assert_eq!(rfc["last_failure"]["error"], "invalid_client", "{rfc}");
    assert_eq!(rfc["last_failure"]["outcome"], "rejected", "{rfc}");

    let (gw, gw_asked) = refused_client(gateway(Options::default().token(GATEWAY_REJECTED))).await;
    assert_eq!(
        gw["last_failure"]["error"], "INVALID_CREDENTIALS",
        "the gateway's own code is kept: {gw}"
    );
    assert_eq!(
        gw["last_failure"]["outcome"], "rejected",
        "the rule makes the 500 a rejection, not a failure to retry: {gw}"
    );
    assert!(
        gw["last_failure"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("500") && m.contains("rejected by token.errors")),
        "the message says which rule decided: {gw}"
    );
    for key in ["state", "has_refresh_token"] {
        assert_eq!(gw[key], rfc[key], "{key} as for a 401 invalid_client");
    }
    assert!(
        gw["next_refresh_at"].is_string(),
        "a retry is planned after a backoff: {gw}"
    );
    assert_eq!(
        (gw_asked, rfc_asked),
        (1, 1),
        "both back off: one request only"
    );

    // Without the rule the same 500 is a provider failure.
    let (plain, _) = refused_client(gateway(Options::default())).await;
    assert_eq!(plain["last_failure"]["outcome"], "error", "{plain}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_refused_by_a_needs_authorization_rule_does_not_try_the_full_grant() {
    let mut options = gateway(Options::default()).token(
        r#"refresh_token = "rt-the-gateway-never-issued"

[[clients.payments.token.errors]]
status = 500
body_contains = "INVALID_CREDENTIALS"
means = "needs_authorization"
"#,
    );
    options.provider.refresh_tokens = true;
    let h = harness(options).await;
    let stuck = eventually(Duration::from_secs(5), || {
        h.running
            .token("payments")
            .is_some_and(|t| t.status().state().as_str() == "needs_authorization")
    })
    .await;
    assert!(stuck, "the client enters needs_authorization");

    let r = h
        .http
        .get(&format!("http://{}/api/v1/payments", h.proxy))
        .await;
    assert_eq!(r.error_code(), Some("token_unavailable"));
    let ready = h.http.get(&format!("http://{}/readyz", h.admin)).await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    let body = ready.json();
    assert_eq!(body["clients"][0]["state"], "needs_authorization", "{body}");
    assert!(
        body["clients"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("needs_authorization by token.errors")
                && r.contains("--refresh-token-from-stdin")),
        "readyz names the rule's verdict and what to do: {body}"
    );
    let status = client_status(&h).await;
    assert_eq!(status["state"], "needs_authorization", "{status}");
    assert_eq!(status["has_refresh_token"], false, "{status}");
    assert_eq!(status["last_failure"]["outcome"], "rejected", "{status}");

    // Nothing more is asked: the full grant would not bring a refresh token back.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(h.provider.grant_requests("refresh_token"), 1);
    assert_eq!(
        h.provider.grant_requests("client_credentials"),
        0,
        "the full grant is not tried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_that_a_rule_calls_transient_is_retried_after_a_backoff_with_the_same_refresh_token()
{
    let mut options = Options::default().token(
        r#"[[clients.payments.token.errors]]
status = 400
error = "invalid_grant"
body_contains = "try again"
means = "transient"
"#,
    );
    options.provider.refresh_tokens = true;
    options.provider.rotate_refresh_tokens = false;
    let h = harness(options).await;
    wait_ready(&h).await;
    h.provider.set_fault(Fault::Status {
        status: 400,
        body: r#"{"error":"invalid_grant","error_description":"Database busy, try again"}"#.into(),
        content_type: "application/json",
        retry_after: None,
    });
    // The API's 401 to a revoked token forces a refresh.
    h.provider.revoke_all();
    let url = format!("http://{}/api/v1/payments", h.proxy);
    let r = h.http.get(&url).await;
    assert_eq!(r.error_code(), Some("token_unavailable"), "{}", r.text());
    let first = tokio::time::Instant::now();
    let refresh_token = h
        .provider
        .last_faulted_request()
        .and_then(|r| r.param("refresh_token").map(str::to_owned))
        .expect("the last refused request is the refresh, not a full grant");

    let status = client_status(&h).await;
    assert_eq!(status["last_failure"]["outcome"], "error", "{status}");
    assert_eq!(status["has_refresh_token"], true, "kept: {status}");

    let retried = eventually(Duration::from_secs(3), || {
        h.provider.grant_requests("refresh_token") >= 2
    })
    .await;
    assert!(retried, "the refresh is tried again");
    assert!(
        first.elapsed() >= Duration::from_millis(250),
        "after a backoff, not at once: {:?}",
        first.elapsed()
    );
    h.provider.set_fault(Fault::None);
    let recovered = eventually(Duration::from_secs(5), || {
        h.running
            .token("payments")
            .is_some_and(|t| t.status().generation > 1)
    })
    .await;
    assert!(recovered, "a refresh succeeds once the provider is well");
    assert_eq!(h.http.get(&url).await.status, StatusCode::OK);
    let last = h.provider.last_request().expect("a token request");
    assert_eq!(
        (last.param("grant_type"), last.param("refresh_token")),
        (Some("refresh_token"), Some(refresh_token.as_str())),
        "the same refresh token got the new token"
    );
    assert_eq!(
        h.provider.grant_requests("client_credentials"),
        1,
        "the refresh token was never dropped for the full grant"
    );
}
