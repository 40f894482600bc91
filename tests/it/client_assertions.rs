//! Client authentication by signed JWT against the mock provider, which accepts
//! `client_secret_jwt` and, as real providers do, each assertion's `jti` once:
//! the sidecar signs a new assertion for every token request, a retry after a
//! provider failure and a refresh after a 401 included, and never sends the
//! secret itself.

use crate::support;

use std::time::Duration;

use base64::Engine as _;
use http::StatusCode;
use support::{eventually, harness, wait_ready, Options, CLIENT_ID};
use tokenproxy_mock::{Fault, TokenRequest};

const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// The claims of the assertion a token request carried.
fn claims(request: &TokenRequest) -> serde_json::Value {
    let jwt = request
        .param("client_assertion")
        .expect("the request carries a client_assertion");
    let payload = jwt.split('.').nth(1).expect("a compact JWS");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url claims");
    serde_json::from_slice(&bytes).expect("JSON claims")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_secret_jwt_signs_a_new_assertion_for_every_attempt() {
    let h = harness(
        Options::default().token("client_auth = \"client_secret_jwt\"\nsigning_alg = \"HS512\""),
    )
    .await;
    wait_ready(&h).await;
    let url = format!("http://{}/api/v1/payments", h.proxy);
    assert_eq!(h.http.get(&url).await.status, StatusCode::OK);
    assert_eq!(h.provider.assertions_accepted(), 1, "the first token");

    let first = h.provider.last_request().expect("a token request");
    assert_eq!(first.param("client_assertion_type"), Some(JWT_BEARER));
    assert_eq!(first.param("client_id"), Some(CLIENT_ID));
    assert!(
        first.basic_auth.is_none() && first.param("client_secret").is_none(),
        "the secret only keys the signature; it is never sent"
    );
    let first = claims(&first);
    assert_eq!(first["iss"], CLIENT_ID);
    assert_eq!(first["sub"], CLIENT_ID);
    assert_eq!(first["aud"], h.provider.token_url());
    let window = first["exp"].as_u64().zip(first["iat"].as_u64());
    assert_eq!(
        window.map(|(exp, iat)| exp - iat),
        Some(60),
        "a 60 s assertion"
    );

    // The provider fails once; the sidecar retries after its backoff, and the
    // API's 401 to the old token makes it refresh through that retry.
    h.provider.set_fault_once(Fault::Status {
        status: 503,
        body: "{\"error\":\"temporarily_unavailable\"}".into(),
        content_type: "application/json",
        retry_after: None,
    });
    h.provider.revoke_all();
    let _ = h.http.get(&url).await;
    assert!(
        eventually(Duration::from_secs(5), || h.provider.assertions_accepted() == 2).await,
        "the retry after the failure is accepted: its assertion is a new one ({} accepted, {} reused)",
        h.provider.assertions_accepted(),
        h.provider.assertion_reuse()
    );
    assert_eq!(h.http.get(&url).await.status, StatusCode::OK);
    let failed = claims(
        &h.provider
            .last_faulted_request()
            .expect("the failed attempt"),
    );
    let retried = claims(&h.provider.last_request().expect("the retry"));
    let jtis = [&first["jti"], &failed["jti"], &retried["jti"]];
    assert!(
        jtis[0] != jtis[1] && jtis[1] != jtis[2] && jtis[0] != jtis[2],
        "every attempt has its own jti: {jtis:?}"
    );
    assert_eq!(h.provider.assertion_reuse(), 0, "no jti was sent twice");
    assert_eq!(h.provider.token_requests(), 3);
}
