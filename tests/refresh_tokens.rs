//! Refresh tokens: a rotated one is stored before anything else can use the
//! client and is never sent twice (not by racing triggers, not after a timeout);
//! a non-rotating one is kept until its own expiry; a dead one with no other
//! credential puts the client in `needs_authorization` until an operator
//! provides a new one, without a restart.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use http::{Method, StatusCode};
use support::{eventually, harness, metric, wait_ready, Options, TestClient};
use tokenproxy_mock::{Fault, ProviderConfig};

fn rotating_password_provider(lifetime: Duration) -> ProviderConfig {
    ProviderConfig {
        lifetime,
        refresh_tokens: true,
        rotate_refresh_tokens: true,
        ..ProviderConfig::default()
    }
}

const ADMIN_KEY: &str = "admin-key-3f9c2a7d51e84b06";

/// The harness's one-client template with an admin key, so the operator can
/// hand the running sidecar a refresh token.
const ONE_CLIENT_WITH_ADMIN_KEY: &str = r#"
[admin]
listen = "{admin}"
api_key = "admin-key-3f9c2a7d51e84b06"

[clients.payments]
listen = "{listen}"
upstream = "{upstream}"
{client_extra}

[clients.payments.token]
url = "{token_url}"
client_id = "{client_id}"
client_secret = "${CLIENT_SECRET}"
{token_extra}
"#;

const PASSWORD_GRANT: &str = r#"grant = "password"
username = "alice"
password = "alice-password""#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_proactive_refreshes_and_401s_never_reuse_a_rotated_refresh_token() {
    let h = harness(
        Options {
            provider: rotating_password_provider(Duration::from_secs(2)),
            ..Options::default()
        }
        .token(PASSWORD_GRANT),
    )
    .await;
    wait_ready(&h).await;
    let url = format!("http://{}/api/v1/payments", h.proxy);
    let started = tokio::time::Instant::now();
    let mut workers = Vec::new();
    for _ in 0..8 {
        let http = h.http.clone();
        let url = url.clone();
        workers.push(tokio::spawn(async move {
            let mut failed = 0;
            let mut sent = 0;
            while started.elapsed() < Duration::from_secs(5) {
                let key = format!("pay-{sent}");
                let r = http
                    .request(
                        Method::POST,
                        &url,
                        &[
                            ("content-type", "application/json"),
                            ("idempotency-key", key.as_str()),
                        ],
                        b"{\"amount\":1}",
                    )
                    .await;
                sent += 1;
                if r.status != StatusCode::CREATED {
                    failed += 1;
                }
            }
            (sent, failed)
        }));
    }
    // Revoke the live token now and then, so 401-triggered refreshes race the
    // proactive ones (no faster than 401-triggered refreshes are allowed).
    while started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(
            tokenproxy::token::UNAUTHORIZED_REFRESH_INTERVAL + Duration::from_millis(200),
        )
        .await;
        h.provider.revoke_all();
    }
    let (mut sent, mut failed) = (0, 0);
    for w in workers {
        let (s, f) = w.await.expect("worker");
        sent += s;
        failed += f;
    }
    assert!(sent > 100, "load was applied ({sent} requests)");
    assert_eq!(failed, 0, "no request failed out of {sent}");
    assert_eq!(
        h.provider.refresh_token_reuse(),
        0,
        "a rotated refresh token was sent again"
    );
    assert!(
        h.provider.grant_requests("refresh_token") >= 3,
        "refreshes used the refresh grant"
    );
    assert_eq!(
        h.provider.grant_requests("password"),
        1,
        "the password grant was needed only once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_that_times_out_is_never_retried_with_the_same_refresh_token() {
    let h = harness(
        Options {
            provider: rotating_password_provider(Duration::from_secs(60)),
            ..Options::default()
        }
        .client(r#"token_wait_timeout = "300ms""#)
        .token(&format!("{PASSWORD_GRANT}\ntimeout = \"300ms\"")),
    )
    .await;
    wait_ready(&h).await;
    // The provider rotates at once but answers late: the sidecar cannot know it rotated.
    h.provider.set_fault(Fault::Delay(Duration::from_secs(2)));
    h.provider.revoke_all();
    let r = h
        .http
        .get(&format!("http://{}/api/v1/payments", h.proxy))
        .await;
    assert_eq!(r.error_code(), Some("token_unavailable"));
    h.provider.set_fault(Fault::None);
    // The refused token keeps its place until a new one is installed, so recovery
    // is a newer generation, not readiness.
    let recovered = eventually(Duration::from_secs(5), || {
        h.running
            .token("payments")
            .is_some_and(|t| t.status().generation > 1)
    })
    .await;
    assert!(recovered, "the client recovers with the full grant");
    assert_eq!(
        h.provider.grant_requests("refresh_token"),
        1,
        "the refresh token was sent once"
    );
    assert_eq!(
        h.provider.grant_requests("password"),
        2,
        "the retry used the password grant"
    );
    assert_eq!(h.provider.refresh_token_reuse(), 0);
    assert_eq!(
        h.http
            .get(&format!("http://{}/api/v1/payments", h.proxy))
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_rotating_refresh_token_is_kept_until_its_configured_lifetime_then_the_full_grant_runs(
) {
    let mut options = Options {
        provider: ProviderConfig {
            lifetime: Duration::from_secs(2),
            refresh_tokens: true,
            rotate_refresh_tokens: false,
            ..ProviderConfig::default()
        },
        ..Options::default()
    };
    options.token_extra = format!(
        "{PASSWORD_GRANT}\nrefresh_url = \"{{token_url}}\"\nrefresh_token_lifetime = \"3500ms\""
    );
    let h = harness(options).await;
    wait_ready(&h).await;
    let url = format!("http://{}/api/v1/payments", h.proxy);
    let started = tokio::time::Instant::now();
    while started.elapsed() < Duration::from_millis(5500) {
        assert_eq!(h.http.get(&url).await.status, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // t=0 password (RT lives 3.5 s) → t≈1, 2, 3 refresh with the same RT → t≈4 the RT is
    // past its lifetime → password again → t≈5 refresh.
    let refreshes = h.provider.grant_requests("refresh_token");
    let passwords = h.provider.grant_requests("password");
    assert!(
        (3..=5).contains(&refreshes),
        "the kept refresh token was used ({refreshes}×)"
    );
    assert_eq!(
        passwords, 2,
        "the full grant ran again once the refresh token expired"
    );
    let status = h
        .http
        .get(&format!("http://{}/status", h.admin))
        .await
        .json();
    assert_eq!(status["clients"]["payments"]["has_refresh_token"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_bootstrap_refresh_token_means_needs_authorization_until_an_operator_provides_one() {
    let logs = support::LogCapture::install(tracing::Level::INFO);

    let mut options = Options {
        provider: rotating_password_provider(Duration::from_secs(60)),
        template: ONE_CLIENT_WITH_ADMIN_KEY,
        ..Options::default()
    };
    options.token_extra =
        "grant = \"refresh_token\"\nrefresh_token = \"rt-that-the-provider-never-issued\"".into();
    let h = harness(options).await;
    let admin = h.admin;
    let url = format!("http://{}/api/v1/payments", h.proxy);

    let stuck = eventually(Duration::from_secs(5), || {
        h.running
            .token("payments")
            .is_some_and(|t| t.status().state().as_str() == "needs_authorization")
    })
    .await;
    assert!(stuck, "the client enters needs_authorization");
    for _ in 0..20 {
        let started = tokio::time::Instant::now();
        let r = h.http.get(&url).await;
        assert_eq!(r.error_code(), Some("token_unavailable"));
        assert!(
            started.elapsed() < Duration::from_millis(200),
            "answered at once, not after a wait"
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(h.provider.token_requests(), 1, "no loop of token requests");
    let ready = h.http.get(&format!("http://{admin}/readyz")).await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    let body = ready.json();
    assert_eq!(body["clients"][0]["state"], "needs_authorization");
    assert!(
        body["clients"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("--refresh-token-from-stdin")),
        "readyz says what to do: {body}"
    );
    let metrics = h.http.get(&format!("http://{admin}/metrics")).await.text();
    assert_eq!(
        metric(
            &metrics,
            "tokenproxy_client_state",
            &[("client", "payments"), ("state", "needs_authorization")]
        ),
        Some(1.0)
    );
    let log_text = logs.text();
    assert_eq!(
        log_text.matches("client needs authorization").count(),
        1,
        "one error line, not one per request"
    );

    // A person authorizes again; here a password grant stands in for that login.
    let login = TestClient::new()
        .request(
            Method::POST,
            &h.provider.token_url(),
            &[
                ("content-type", "application/x-www-form-urlencoded"),
                ("authorization", "Basic ZGVtby1jbGllbnQ6ZGVtby1zZWNyZXQ="),
            ],
            b"grant_type=password&username=alice&password=alice-password",
        )
        .await;
    assert_eq!(login.status, StatusCode::OK);
    let new_rt = login.json()["refresh_token"]
        .as_str()
        .expect("refresh token")
        .to_owned();

    let dir = std::env::temp_dir().join(format!("tokenproxy-rt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("tokenproxy.toml");
    std::fs::write(
        &file,
        format!(
            "[admin]\nlisten = \"{admin}\"\napi_key = \"{ADMIN_KEY}\"\n[clients.payments]\nlisten = \"127.0.0.1:1\"\nupstream = \"http://127.0.0.1:1\"\n\
             [clients.payments.token]\nurl = \"http://127.0.0.1:1/token\"\ngrant = \"refresh_token\"\nclient_id = \"demo-client\"\nclient_secret = \"demo-secret\"\n\
             refresh_token = \"unused\"\n"
        ),
    )
    .expect("write config");
    let output = tokio::task::spawn_blocking(move || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tokenproxy"))
            .args([
                "token",
                "payments",
                "--refresh-token-from-stdin",
                "--config",
            ])
            .arg(&file)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(format!("{new_rt}\n").as_bytes())
            .expect("write stdin");
        child.wait_with_output().expect("wait")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the CLI succeeds: {stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("state valid"), "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);

    assert_eq!(
        h.http.get(&format!("http://{admin}/readyz")).await.status,
        StatusCode::OK,
        "ready again, no restart"
    );
    assert_eq!(h.http.get(&url).await.status, StatusCode::OK);
    assert_eq!(h.provider.refresh_token_reuse(), 0);
}
