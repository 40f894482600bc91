//! Provider quirks handled by configuration alone: a version header on every
//! token request, a response that names its expiries differently and states
//! them in epoch seconds, and a gateway that answers every token failure with
//! a 500 whose body says what went wrong.

use crate::support;

use std::time::Duration;

use support::{harness, wait_ready, Options};

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
