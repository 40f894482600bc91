//! DPoP (RFC 9449) against the mock provider and API, which check every proof
//! as a resource server does (signature with the header's `jwk`, `iat`, a
//! `jti` accepted once, `htm`, `htu`, `ath`, nonce) and bind tokens to the
//! proof's key: every token request and every upstream request carries a new
//! proof of the one key, the token travels as `Authorization: DPoP`, and a
//! server's demand for a nonce costs one more attempt, then none while the
//! nonce holds.

use crate::support;

use std::time::Duration;

use http::{Method, Request, StatusCode};
use http_body_util::Full;
use support::{eventually, harness, metric, start_sidecar, temp_dir, wait_ready, Harness, Options};
use tokenproxy_mock::{MockApi, MockProvider, ProviderConfig, RecordedRequest};

const DPOP: &str = "\n[clients.payments.dpop]\n";

async fn dpop_harness(provider: ProviderConfig) -> Harness {
    let h = harness(
        Options {
            provider,
            ..Options::default()
        }
        .token(DPOP),
    )
    .await;
    wait_ready(&h).await;
    h
}

fn header<'a>(request: &'a RecordedRequest, name: &str) -> &'a str {
    request
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

/// The claims of a proof (checked by the mocks; read here to compare).
fn claims(proof: &str) -> serde_json::Value {
    use base64::Engine as _;
    let payload = proof.split('.').nth(1).expect("a compact JWS");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url");
    serde_json::from_slice(&bytes).expect("JSON claims")
}

async fn metrics(h: &Harness) -> String {
    h.http
        .get(&format!("http://{}/metrics", h.admin))
        .await
        .text()
}

fn nonce_retries(text: &str, place: &str) -> Option<f64> {
    metric(
        text,
        "tokenproxy_dpop_nonce_retries_total",
        &[("client", "payments"), ("where", place)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_bound_and_every_request_carries_a_fresh_proof_the_api_accepts() {
    let h = dpop_harness(ProviderConfig::default()).await;
    assert_eq!(h.provider.dpop_bound(), 1, "the first token is DPoP-bound");
    let token_request = h.provider.last_request().expect("a token request");
    let token_proof = claims(header_of(&token_request.headers, "dpop"));
    assert_eq!(token_proof["htm"], "POST");
    assert_eq!(token_proof["htu"], h.provider.token_url());

    let base = format!("http://{}/api/v1/payments", h.proxy);
    for url in [base.clone(), format!("{base}?page=2#frag"), base.clone()] {
        let r = h.http.get(&url).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    let posted = h
        .http
        .request(
            Method::POST,
            &base,
            &[("content-type", "application/json")],
            b"{}",
        )
        .await;
    assert_eq!(posted.status, StatusCode::CREATED, "{}", posted.text());

    let seen = h.api.recorded();
    assert_eq!(seen.len(), 4);
    let jkt = seen[0]
        .dpop_jkt
        .clone()
        .expect("the API accepted the proof");
    let mut jtis = std::collections::HashSet::new();
    for request in &seen {
        assert!(
            header(request, "authorization").starts_with("DPoP "),
            "the DPoP scheme"
        );
        assert_eq!(
            request.dpop_jkt.as_ref(),
            Some(&jkt),
            "one key for every request"
        );
        let proof = claims(header(request, "dpop"));
        assert_eq!(
            proof["htu"],
            format!("{}/api/v1/payments", h.api.url()),
            "no query"
        );
        assert_eq!(proof["htm"], request.method.as_str());
        assert!(
            jtis.insert(proof["jti"].to_string()),
            "a new jti for every request"
        );
    }
    let counts = h.api.dpop_counts();
    assert_eq!((counts.ok, counts.rejected), (4, 0));

    // The same proof again, sent by someone who copied it: the API refuses it.
    let copied = &seen[0];
    let replay = Request::get(format!("{}/api/v1/payments", h.api.url()))
        .header("authorization", header(copied, "authorization"))
        .header("dpop", header(copied, "dpop"))
        .body(Full::new(bytes::Bytes::new()))
        .expect("request builds");
    let r = h.http.send(replay).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        h.api.dpop_counts().replayed,
        1,
        "refused as a replayed proof"
    );
    // And the token without a proof, as a Bearer token, is useless.
    let stolen = h
        .http
        .request(
            Method::GET,
            &format!("{}/api/v1/payments", h.api.url()),
            &[(
                "authorization",
                &header(copied, "authorization").replacen("DPoP", "Bearer", 1),
            )],
            b"",
        )
        .await;
    assert_eq!(stolen.status, StatusCode::UNAUTHORIZED);
    assert_eq!(h.api.dpop_counts().bound_as_bearer, 1);
    let text = metrics(&h).await;
    assert_eq!(nonce_retries(&text, "token"), Some(0.0));
    assert_eq!(nonce_retries(&text, "upstream"), Some(0.0));
}

fn header_of<'a>(headers: &'a http::HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshed_tokens_are_bound_to_the_same_key() {
    let h = dpop_harness(ProviderConfig {
        refresh_tokens: true,
        ..ProviderConfig::default()
    })
    .await;
    let url = format!("http://{}/api/v1/payments", h.proxy);
    assert_eq!(h.http.get(&url).await.status, StatusCode::OK);
    // The API's 401 to a revoked token makes the sidecar refresh, and replay.
    h.provider.revoke_all();
    let r = h.http.get(&url).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(h.provider.grant_requests("refresh_token"), 1);
    let refresh = h.provider.last_request().expect("the refresh");
    assert_eq!(refresh.param("grant_type"), Some("refresh_token"));
    assert_eq!(claims(header_of(&refresh.headers, "dpop"))["htm"], "POST");
    assert_eq!(
        h.provider.dpop_bound(),
        2,
        "the refreshed token is bound too"
    );
    let seen = h.api.recorded();
    let last = seen.last().expect("the replay");
    assert_eq!(last.dpop_jkt, seen[0].dpop_jkt, "to the same key");
    assert_eq!(last.token_serial, Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nonce_demanded_at_the_token_endpoint_costs_one_more_attempt_then_none() {
    // Short-lived tokens: the sidecar refreshes every second or two.
    let h = dpop_harness(ProviderConfig {
        lifetime: Duration::from_secs(3),
        ..ProviderConfig::default()
    })
    .await;
    h.provider.set_dpop_nonce(Some("token-nonce-1"));
    assert!(
        eventually(Duration::from_secs(10), || h.provider.dpop_bound() >= 2).await,
        "the next refresh gets a bound token"
    );
    assert_eq!(h.provider.dpop_nonce_challenges(), 1);
    let retried = h.provider.last_request().expect("the retry");
    assert_eq!(
        claims(header_of(&retried.headers, "dpop"))["nonce"],
        "token-nonce-1"
    );
    assert_eq!(nonce_retries(&metrics(&h).await, "token"), Some(1.0));

    // The nonce is kept: the refresh after carries it at once.
    assert!(
        eventually(Duration::from_secs(10), || h.provider.dpop_bound() >= 3).await,
        "one more refresh"
    );
    assert_eq!(h.provider.dpop_nonce_challenges(), 1, "no second challenge");
    let url = format!("http://{}/api/v1/payments", h.proxy);
    let r = h.http.get(&url).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(nonce_retries(&metrics(&h).await, "token"), Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nonce_demanded_by_the_api_is_answered_by_one_replay_when_replay_is_safe() {
    let h = dpop_harness(ProviderConfig::default()).await;
    h.api.set_dpop_nonce(Some("api-nonce-1"));
    let url = format!("http://{}/api/v1/payments", h.proxy);
    let r = h.http.get(&url).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.headers["x-tokenproxy-replayed"], "1");
    assert_eq!(h.api.dpop_counts().nonce_challenges, 1);
    assert_eq!(
        h.provider.token_requests(),
        1,
        "the token was not the problem"
    );
    let seen = h.api.recorded();
    assert_eq!(claims(header(&seen[1], "dpop"))["nonce"], "api-nonce-1");
    assert_eq!(nonce_retries(&metrics(&h).await, "upstream"), Some(1.0));

    // Kept from every answer: no more challenges while the nonce holds.
    assert_eq!(h.http.get(&url).await.status, StatusCode::OK);
    assert_eq!(h.api.dpop_counts().nonce_challenges, 1);

    // A new nonce, and a POST that may not be sent twice: the 401 goes back to
    // the app, and the app's next attempt carries the nonce.
    h.api.set_dpop_nonce(Some("api-nonce-2"));
    let post = || {
        h.http.request(
            Method::POST,
            &url,
            &[("content-type", "application/json")],
            b"{}",
        )
    };
    let r = post().await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(h.api.dpop_counts().nonce_challenges, 2);
    let r = post().await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(h.api.dpop_counts().nonce_challenges, 2);
    assert_eq!(
        h.provider.token_requests(),
        1,
        "never a new token for a nonce"
    );
    assert_eq!(nonce_retries(&metrics(&h).await, "upstream"), Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_the_provider_did_not_bind_is_never_sent() {
    let h = dpop_harness(ProviderConfig::default()).await;
    h.provider.ignore_dpop(true);
    h.provider.revoke_all();
    let url = format!("http://{}/api/v1/payments", h.proxy);
    let r = h.http.get(&url).await;
    assert_ne!(r.status, StatusCode::OK, "{}", r.text());
    assert!(
        eventually(Duration::from_secs(5), || h.provider.token_requests() >= 2).await,
        "the sidecar asked for a new token"
    );
    let _ = h.http.get(&url).await;
    for request in h.api.recorded() {
        assert!(
            header(&request, "authorization").starts_with("DPoP "),
            "a Bearer token is never sent"
        );
    }
    let status = h
        .http
        .get(&format!("http://{}/status", h.admin))
        .await
        .text();
    assert!(status.contains("not DPoP"), "the reason is shown: {status}");
}

/// Two sidecars on one state file: one DPoP key, made by whichever came first
/// and sealed in the file, so tokens either one obtains are bound to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_on_one_file_store_sign_with_one_key() {
    let provider = MockProvider::start(ProviderConfig::default())
        .await
        .expect("provider");
    let api = MockApi::start(provider.validator()).await.expect("api");
    let path = temp_dir("dpop-file").join("tokens.json");
    let config = || {
        format!(
            r#"
[admin]
listen = "{{admin}}"

[store]
kind = "file"
path = "{path}"
key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="

[clients.payments]
listen = "{{listen}}"
upstream = "{upstream}"
token_wait_timeout = "5s"

[clients.payments.token]
url = "{token_url}"
client_id = "demo-client"
client_secret = "${{CLIENT_SECRET}}"

[clients.payments.dpop]
"#,
            path = path.display(),
            upstream = api.url(),
            token_url = provider.token_url(),
        )
    };
    let http = support::TestClient::new();
    let (first, proxy1, _) = start_sidecar(&config()).await;
    let r = http.get(&format!("http://{proxy1}/api/v1/payments")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let (second, proxy2, _) = start_sidecar(&config()).await;
    let r = http.get(&format!("http://{proxy2}/api/v1/payments")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    first.shutdown().await;
    second.shutdown().await;
    // A restart signs with the key too, even after its token is gone.
    provider.revoke_all();
    let (third, proxy3, _) = start_sidecar(&config()).await;
    let r = http.get(&format!("http://{proxy3}/api/v1/payments")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    third.shutdown().await;

    // Every request passed the DPoP checks (the one 401 is the revoked token's).
    let seen = api.recorded();
    let passed = seen.iter().filter(|r| r.status == 200).count();
    let jkts: Vec<_> = seen.iter().filter_map(|r| r.dpop_jkt.clone()).collect();
    assert_eq!((jkts.len(), passed), (3, 3), "{seen:?}");
    assert_eq!(api.dpop_counts().rejected, 0);
    assert!(jkts.windows(2).all(|w| w[0] == w[1]), "one key: {jkts:?}");
    let file = std::fs::read_to_string(&path).expect("the state file");
    assert!(file.contains("dpop-es256"), "the key record is in the file");
    assert!(!file.contains("PRIVATE"), "sealed, not a PEM");
}

/// A proof is a credential: a provider that repeats it in its error text does
/// not get it into `/status`, `/readyz` or the app's error body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proof_the_provider_echoes_never_leaves_the_sidecar() {
    let h = dpop_harness(ProviderConfig::default()).await;
    h.provider
        .set_fault(tokenproxy_mock::Fault::EchoCredentials(
            tokenproxy_mock::Echo::Raw,
        ));
    h.provider.revoke_all();
    let reply = h
        .http
        .get(&format!("http://{}/api/v1/payments", h.proxy))
        .await;
    assert!(
        eventually(Duration::from_secs(5), || h
            .running
            .token("payments")
            .is_some_and(|t| t.status().refreshes_failed >= 1))
        .await,
        "the refresh was refused"
    );
    let echoed = h
        .provider
        .last_faulted_request()
        .expect("the refused request");
    let proof = header_of(&echoed.headers, "dpop").to_owned();
    assert!(proof.len() > 100, "the request carried a proof");
    // Error text is cut short: any 40 characters of the proof are too many.
    let start = proof[..40].to_owned();
    let status = h
        .http
        .get(&format!("http://{}/status", h.admin))
        .await
        .text();
    let ready = h
        .http
        .get(&format!("http://{}/readyz", h.admin))
        .await
        .text();
    assert!(
        status.contains("invalid_grant"),
        "the error is shown: {status}"
    );
    for (place, text) in [
        ("status", &status),
        ("readyz", &ready),
        ("reply", &reply.text()),
    ] {
        assert!(!text.contains(&start), "the proof is in {place}: {text}");
    }
}

/// A token endpoint that refuses the proof (`use_dpop_nonce` again after the
/// one retry, a nonce it rotated meanwhile, or `invalid_dpop_proof`) has not
/// looked at the grant: the refresh token is kept, the client backs off and
/// recovers when the proof passes, instead of dropping the refresh token and
/// needing a person to authorize it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_proof_at_the_token_endpoint_never_costs_the_refresh_token() {
    let provider = MockProvider::start(ProviderConfig {
        refresh_tokens: true,
        rotate_refresh_tokens: true,
        ..ProviderConfig::default()
    })
    .await
    .expect("provider");
    let api = MockApi::start(provider.validator()).await.expect("api");
    let config = format!(
        "[admin]\nlisten = \"{{admin}}\"\n[clients.wallet]\nlisten = \"{{listen}}\"\n\
         upstream = \"{}\"\ntoken_wait_timeout = \"3s\"\n[clients.wallet.token]\nurl = \"{}\"\n\
         grant = \"refresh_token\"\nclient_id = \"demo-client\"\nclient_secret = \"${{CLIENT_SECRET}}\"\n\
         refresh_token = \"{}\"\n[clients.wallet.dpop]\n",
        api.url(),
        provider.token_url(),
        provider.issue_refresh_token()
    );
    let (running, proxy, _) = start_sidecar(&config).await;
    let http = support::TestClient::new();
    let url = format!("http://{proxy}/api/v1/payments");
    assert_eq!(http.get(&url).await.status, StatusCode::OK);
    let state = || {
        running
            .token("wallet")
            .map(|t| t.status().state().as_str().to_owned())
            .unwrap_or_default()
    };
    for code in ["use_dpop_nonce", "invalid_dpop_proof"] {
        provider.set_fault(tokenproxy_mock::Fault::Status {
            status: 400,
            body: format!(r#"{{"error":"{code}","error_description":"proof refused"}}"#),
            content_type: "application/json",
            retry_after: None,
        });
        let refused_before = provider.grant_requests("refresh_token");
        let failed = || {
            running
                .token("wallet")
                .map_or(0, |t| t.status().refreshes_failed)
        };
        let failed_before = failed();
        provider.revoke_all();
        // The API's 401s make the sidecar refresh (once a recent refresh
        // allows another), and the provider refuses the proof.
        let mut tried = false;
        for _ in 0..100 {
            let r = http.get(&url).await;
            assert_ne!(r.status, StatusCode::OK, "{}", r.text());
            assert_ne!(
                r.error_code(),
                Some("needs_authorization"),
                "{code}: {}",
                r.text()
            );
            if provider.grant_requests("refresh_token") > refused_before {
                tried = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(tried, "{code}: the refresh was tried");
        assert!(
            eventually(Duration::from_secs(5), || failed() > failed_before).await,
            "{code}: the refusal was seen"
        );
        assert_ne!(state(), "needs_authorization", "{code}");
        provider.set_fault(tokenproxy_mock::Fault::None);
        let mut last = None;
        for _ in 0..60 {
            let r = http.get(&url).await;
            if r.status == StatusCode::OK {
                last = None;
                break;
            }
            last = Some(r.text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            last, None,
            "{code}: the client recovers with its refresh token"
        );
    }
    assert_eq!(provider.refresh_token_reuse(), 0);
}

/// An API that demands a nonce no proof may carry (RFC 9449 §8.1: one or more
/// of `%x21 / %x23-5B / %x5D-7E`; here a space, or 2000 characters) is not
/// sent the request again: the replay would carry no nonce and double every
/// request, charges with an idempotency key included. Nor is the token
/// refreshed: the 401 is about the proof.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nonce_no_proof_can_carry_costs_no_replay_and_no_new_token() {
    let h = dpop_harness(ProviderConfig::default()).await;
    let url = format!("http://{}/api/v1/payments", h.proxy);
    let long = "n".repeat(2000);
    for nonce in ["has space", long.as_str()] {
        h.api.set_dpop_nonce(Some(nonce));
        let before = h.api.recorded().len();
        let get = h.http.get(&url).await;
        let post = h
            .http
            .request(
                Method::POST,
                &url,
                &[
                    ("content-type", "application/json"),
                    ("idempotency-key", "charge-7"),
                ],
                b"{}",
            )
            .await;
        for r in [&get, &post] {
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
            assert!(!r.headers.contains_key("x-tokenproxy-replayed"));
        }
        assert_eq!(h.api.recorded().len(), before + 2, "each request sent once");
    }
    assert_eq!(h.provider.token_requests(), 1, "the token was kept");
    assert_eq!(nonce_retries(&metrics(&h).await, "upstream"), Some(0.0));
}

/// An API that accepts either scheme offers both challenges in one
/// `WWW-Authenticate` (`Bearer realm="payments", DPoP error="use_dpop_nonce"`,
/// RFC 9110 §11.6.1): its demand for a nonce is still one, answered by one
/// replay with the nonce, not taken for a refused token (a 401 to the app, or
/// a new token for every new nonce).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nonce_demanded_beside_a_bearer_challenge_is_still_a_nonce_demand() {
    let h = dpop_harness(ProviderConfig::default()).await;
    h.api.set_bearer_challenge_first(true);
    let url = format!("http://{}/api/v1/payments", h.proxy);
    for nonce in ["api-nonce-1", "api-nonce-2"] {
        h.api.set_dpop_nonce(Some(nonce));
        let r = h.http.get(&url).await;
        assert_eq!(r.status, StatusCode::OK, "{nonce}: {}", r.text());
        assert_eq!(r.headers["x-tokenproxy-replayed"], "1");
    }
    assert_eq!(h.api.dpop_counts().nonce_challenges, 2);
    assert_eq!(h.provider.token_requests(), 1, "the token was kept");
    assert_eq!(nonce_retries(&metrics(&h).await, "upstream"), Some(2.0));
}
