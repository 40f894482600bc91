//! Provider quirks handled by configuration alone: a version header on every
//! token request, a response that names its expiries differently and states
//! them in epoch seconds, and a gateway that answers every token failure with
//! a 500 whose body says what went wrong.

use crate::support;

use std::time::{Duration, SystemTime};

use http::StatusCode;
use support::{harness, metric, wait_ready, Options};
use tokenproxy_mock::ResponseShape;

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
