//! No credential ever leaves the sidecar except towards the provider and the API:
//! a full flow (password grant, a refresh_token-grant client with a bootstrap
//! token, rotating refresh tokens, a 401 and replay, a reload, a provider
//! failure) at TRACE, then logs, `/status`, `/metrics`, error bodies, `check`
//! and `token` output are searched for every secret value.

mod support;

use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine as _;
use http::StatusCode;
use support::{start_sidecar_env, LogCapture, TestClient};
use tokenproxy::config::MapEnv;
use tokenproxy_mock::{Echo, Fault, MockApi, MockProvider, ProviderConfig};

const CLIENT_SECRET: &str = "cs-Qx7Lk2-client-secret";
const PASSWORD: &str = "pw-Zr5Nb8-user-password";
/// The token store key (32 bytes, base64).
const STORE_KEY: &str = "c2VjcmV0LXN0b3JlLWtleS1Ia3A5LTMyLWJ5dGVzISE=";

/// The TRACE capture every test of this binary shares (one global subscriber).
fn logs() -> &'static LogCapture {
    static LOGS: OnceLock<LogCapture> = OnceLock::new();
    LOGS.get_or_init(|| LogCapture::install(tracing::Level::TRACE))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_appears_in_logs_status_metrics_errors_or_check_output() {
    let logs = logs();

    let provider = MockProvider::start(ProviderConfig {
        client_id: "secret-test".into(),
        client_secret: CLIENT_SECRET.into(),
        lifetime: Duration::from_secs(60),
        refresh_tokens: true,
        rotate_refresh_tokens: true,
        users: vec![("alice".into(), PASSWORD.into())],
        ..ProviderConfig::default()
    })
    .await
    .expect("provider");
    let api = MockApi::start(provider.validator()).await.expect("api");
    // A person's login gives the wallet client its bootstrap refresh token.
    let login = TestClient::new()
        .request(
            http::Method::POST,
            &provider.token_url(),
            &[("content-type", "application/x-www-form-urlencoded")],
            format!("grant_type=password&username=alice&password={PASSWORD}&client_id=secret-test&client_secret={CLIENT_SECRET}").as_bytes(),
        )
        .await;
    let bootstrap_refresh_token = login.json()["refresh_token"]
        .as_str()
        .expect("a refresh token")
        .to_owned();
    let state_dir =
        std::env::temp_dir().join(format!("tokenproxy-secrets-state-{}", std::process::id()));
    std::fs::create_dir_all(&state_dir).expect("state dir");
    let state_file = state_dir.join("tokens.json");
    let template = format!(
        r#"
[admin]
listen = "{{admin}}"
[store]
kind = "file"
path = "{state}"
key = "${{TP_STORE_KEY}}"
[clients.payments]
listen = "{{listen}}"
upstream = "{api}"
token_wait_timeout = "500ms"
[clients.payments.token]
url = "{token}"
grant = "password"
client_id = "secret-test"
client_secret = "${{TP_CLIENT_SECRET}}"
username = "alice"
password = "${{TP_PASSWORD}}"
[clients.wallet]
listen = "{{listen2}}"
upstream = "{api}"
[clients.wallet.token]
url = "{token}"
grant = "refresh_token"
client_id = "secret-test"
client_secret = "${{TP_CLIENT_SECRET}}"
client_auth = "body"
refresh_token = "${{TP_BOOTSTRAP_RT}}"
"#,
        api = api.url(),
        token = provider.token_url(),
        state = state_file.display()
    );
    let env = || {
        MapEnv::new()
            .var("TP_CLIENT_SECRET", CLIENT_SECRET)
            .var("TP_PASSWORD", PASSWORD)
            .var("TP_BOOTSTRAP_RT", &bootstrap_refresh_token)
            .var("TP_STORE_KEY", STORE_KEY)
    };
    let (mut running, proxy, admin) = start_sidecar_env(&template, env()).await;
    let http = TestClient::new();
    let h_url = format!("http://{proxy}/api/v1/payments");

    // Password grant, then a 401 that makes the sidecar use (and rotate) the refresh token.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !["payments", "wallet"]
        .iter()
        .all(|c| running.token(c).is_some_and(|t| t.is_ready()))
    {
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(http.get(&h_url).await.status, StatusCode::OK);
    provider.revoke_all();
    assert_eq!(
        http.get(&h_url).await.status,
        StatusCode::OK,
        "recovered by refresh + replay"
    );
    let spent_refresh_token = provider
        .last_request()
        .and_then(|r| r.param("refresh_token").map(str::to_owned))
        .expect("the sidecar used its refresh token");
    assert_eq!(
        provider.grant_requests("refresh_token"),
        2,
        "the wallet's bootstrap and the payments refresh"
    );

    // A reload that changes the payments client (a new token) and keeps the wallet.
    let listen2 = running.client_addr("wallet").expect("wallet listener");
    let reloaded = template
        .replace("{listen}", &proxy.to_string())
        .replace("{listen2}", &listen2.to_string())
        .replace("{admin}", &admin.to_string())
        .replace(
            "username = \"alice\"",
            "username = \"alice\"\nscope = \"payments\"",
        );
    let new_config = tokenproxy::config::from_str(&reloaded, None, &env()).expect("valid");
    let summary = running.reload(new_config).await.expect("reload");
    assert_eq!(summary.changed, vec!["payments".to_owned()]);
    assert_eq!(
        http.get(&h_url).await.status,
        StatusCode::OK,
        "served after the reload"
    );

    // A provider failure, to exercise the error paths.
    provider.set_fault(Fault::Status {
        status: 400,
        body: format!(r#"{{"error":"invalid_grant","error_description":"bad","echo":"{spent_refresh_token}"}}"#),
        content_type: "application/json",
        retry_after: None,
    });
    provider.revoke_all();
    let failed = http.get(&h_url).await;
    assert_eq!(failed.status, StatusCode::SERVICE_UNAVAILABLE);
    provider.set_fault(Fault::None);

    let access_tokens: Vec<String> = api
        .recorded()
        .iter()
        .filter_map(|r| r.headers.get("authorization"))
        .filter_map(|v| v.to_str().ok())
        .map(|v| v.trim_start_matches("Bearer ").to_owned())
        .collect();
    assert!(access_tokens.len() >= 2);

    let status = http.get(&format!("http://{admin}/status")).await.text();
    let metrics = http.get(&format!("http://{admin}/metrics")).await.text();
    let ready = http.get(&format!("http://{admin}/readyz")).await.text();
    drop(running);

    // `check` on the same config, in a child process with the secrets in its environment.
    let dir = std::env::temp_dir().join(format!("tokenproxy-secrets-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("tokenproxy.toml");
    std::fs::write(
        &file,
        template
            .replace("{listen}", "127.0.0.1:18080")
            .replace("{listen2}", "127.0.0.1:18081")
            .replace("{admin}", "127.0.0.1:19090"),
    )
    .expect("write config");
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_tokenproxy"))
        .args(["check", "--config"])
        .arg(&file)
        .env("TP_CLIENT_SECRET", CLIENT_SECRET)
        .env("TP_PASSWORD", PASSWORD)
        .env("TP_BOOTSTRAP_RT", &bootstrap_refresh_token)
        .env("TP_STORE_KEY", STORE_KEY)
        .output()
        .expect("run check");
    assert!(
        check.status.success(),
        "check passes: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let check_out = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let token_cli = std::process::Command::new(env!("CARGO_BIN_EXE_tokenproxy"))
        .args(["token", "payments", "--config"])
        .arg(&file)
        .env("TP_CLIENT_SECRET", CLIENT_SECRET)
        .env("TP_PASSWORD", PASSWORD)
        .env("TP_BOOTSTRAP_RT", &bootstrap_refresh_token)
        .env("TP_STORE_KEY", STORE_KEY)
        .output()
        .expect("run token");
    let token_out = format!(
        "{}{}",
        String::from_utf8_lossy(&token_cli.stdout),
        String::from_utf8_lossy(&token_cli.stderr)
    );
    assert!(token_cli.status.success(), "token succeeds: {token_out}");
    let _ = std::fs::remove_dir_all(&dir);
    let state_text =
        String::from_utf8_lossy(&std::fs::read(&state_file).expect("state file written"))
            .into_owned();
    let _ = std::fs::remove_dir_all(&state_dir);

    let log_text = logs.text();
    assert!(
        log_text.contains("token obtained"),
        "the capture saw the sidecar's logs"
    );
    let places = [
        ("logs", &log_text),
        ("/status", &status),
        ("/metrics", &metrics),
        ("/readyz", &ready),
        ("error body", &failed.text()),
        ("check output", &check_out),
        ("token output", &token_out),
        ("the encrypted state file", &state_text),
    ];
    let mut secrets = vec![
        ("client secret", CLIENT_SECRET.to_owned()),
        ("password", PASSWORD.to_owned()),
        ("refresh token", spent_refresh_token),
        ("bootstrap refresh token", bootstrap_refresh_token.clone()),
        ("store key", STORE_KEY.to_owned()),
    ];
    for (i, t) in access_tokens.iter().enumerate() {
        secrets.push((
            if i == 0 {
                "first access token"
            } else {
                "access token"
            },
            t.clone(),
        ));
    }
    for (what, value) in &secrets {
        assert!(value.len() >= 8, "{what} is long enough to search for");
        for (place, text) in &places {
            assert!(
                !text.contains(value.as_str()),
                "the {what} leaked into {place}"
            );
        }
    }
}

/// A client secret with characters that every encoding changes.
const ECHO_CLIENT_SECRET: &str = r#"cs-Echo 7/k+q&z=%"x\\y"#;
/// A password with characters that every encoding changes.
const ECHO_PASSWORD: &str = "pw-Echo 9:p+w/d é";

/// Every way `value` may be written by a provider or by us: raw, form-urlencoded
/// (`+` and `%20` for spaces) and JSON-escaped (as `/status` would show it).
fn written_forms(value: &str) -> Vec<String> {
    let form: String = form_urlencoded::byte_serialize(value.as_bytes()).collect();
    let percent = form.replace('+', "%20");
    let mut forms = vec![value.to_owned(), form, percent];
    let json: Vec<String> = forms
        .iter()
        .map(|f| {
            let quoted = serde_json::to_string(f).expect("a string serializes");
            quoted[1..quoted.len() - 1].to_owned()
        })
        .collect();
    forms.extend(json);
    forms.sort();
    forms.dedup();
    forms
}

/// Security review finding 4: a provider that repeats every credential it received in
/// its `error_description` (raw, form-urlencoded, percent-encoded, or the HTTP Basic
/// header and the urlencoded `id:secret` inside it) must not put any of them into the
/// app's error body, `/readyz`, `/status`, the metrics or the logs; and the app's error
/// body carries the RFC 6749 code with a fixed description, never the provider's text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_a_provider_echoes_in_its_error_text_never_leave_the_sidecar() {
    let logs = logs();
    let http = TestClient::new();
    let mut secrets: Vec<(String, String)> = Vec::new();
    let mut places: Vec<(String, String)> = Vec::new();
    for form in [
        Echo::Raw,
        Echo::FormEncoded,
        Echo::PercentEncoded,
        Echo::Basic,
    ] {
        let provider = MockProvider::start(ProviderConfig {
            client_id: "echo-test".into(),
            client_secret: ECHO_CLIENT_SECRET.into(),
            lifetime: Duration::from_secs(60),
            refresh_tokens: true,
            rotate_refresh_tokens: true,
            users: vec![("alice".into(), ECHO_PASSWORD.into())],
            ..ProviderConfig::default()
        })
        .await
        .expect("provider");
        let refresh_token = provider.issue_refresh_token();
        provider.set_fault(Fault::EchoCredentials(form));
        let api = MockApi::start(provider.validator()).await.expect("api");
        let template = format!(
            r#"
[admin]
listen = "{{admin}}"
[clients.payments]
listen = "{{listen}}"
upstream = "{api}"
token_wait_timeout = "300ms"
[clients.payments.token]
url = "{token}"
grant = "password"
client_id = "echo-test"
client_secret = "${{TP_CLIENT_SECRET}}"
client_auth = "basic"
username = "alice"
password = "${{TP_PASSWORD}}"
[clients.wallet]
listen = "{{listen2}}"
upstream = "{api}"
token_wait_timeout = "300ms"
[clients.wallet.token]
url = "{token}"
grant = "refresh_token"
client_id = "echo-test"
client_secret = "${{TP_CLIENT_SECRET}}"
client_auth = "body"
body = "json"
refresh_token = "${{TP_REFRESH_TOKEN}}"
"#,
            api = api.url(),
            token = provider.token_url(),
        );
        let env = MapEnv::new()
            .var("TP_CLIENT_SECRET", ECHO_CLIENT_SECRET)
            .var("TP_PASSWORD", ECHO_PASSWORD)
            .var("TP_REFRESH_TOKEN", &refresh_token);
        let (running, proxy, admin) = start_sidecar_env(&template, env).await;
        let failed_once = |c: &str| {
            running
                .token(c)
                .is_some_and(|t| t.status().refreshes_failed >= 1)
        };
        assert!(
            support::eventually(Duration::from_secs(5), || failed_once("payments")
                && failed_once("wallet"))
            .await,
            "both clients should have had their token request refused ({form:?})"
        );
        let wallet_addr = running.client_addr("wallet").expect("wallet listener");
        let payments_reply = http.get(&format!("http://{proxy}/v1/payments")).await;
        let wallet_reply = http.get(&format!("http://{wallet_addr}/v1/wallet")).await;
        for (name, reply) in [("payments", &payments_reply), ("wallet", &wallet_reply)] {
            assert_eq!(
                reply.status,
                StatusCode::SERVICE_UNAVAILABLE,
                "{name} has no token, so the app gets 503 ({form:?})"
            );
            assert_eq!(reply.error_code(), Some("token_unavailable"));
            let body = reply.text();
            assert!(
                body.contains("invalid_grant"),
                "the app's error names the RFC 6749 code ({form:?}): {body}"
            );
            assert!(
                !body.contains("Invalid credentials"),
                "the app's error carries a fixed description, not the provider's text ({form:?}): {body}"
            );
        }
        let status = http.get(&format!("http://{admin}/status")).await.text();
        assert!(
            status.contains("Invalid credentials") && status.contains("[redacted]"),
            "/status keeps the provider's description with the credentials redacted ({form:?}): {status}"
        );
        places.push((format!("{form:?} /status"), status));
        places.push((
            format!("{form:?} /readyz"),
            http.get(&format!("http://{admin}/readyz")).await.text(),
        ));
        places.push((
            format!("{form:?} /metrics"),
            http.get(&format!("http://{admin}/metrics")).await.text(),
        ));
        places.push((
            format!("{form:?} payments error body"),
            payments_reply.text(),
        ));
        places.push((format!("{form:?} wallet error body"), wallet_reply.text()));
        secrets.push(("refresh token".into(), refresh_token));
        drop(running);
    }

    let urlencoded_id_secret = format!(
        "echo-test:{}",
        form_urlencoded::byte_serialize(ECHO_CLIENT_SECRET.as_bytes()).collect::<String>()
    );
    let basic = base64::engine::general_purpose::STANDARD.encode(&urlencoded_id_secret);
    secrets.push(("client secret".into(), ECHO_CLIENT_SECRET.into()));
    secrets.push(("password".into(), ECHO_PASSWORD.into()));
    secrets.push(("urlencoded id:secret".into(), urlencoded_id_secret));
    secrets.push((
        "Basic credentials".into(),
        basic.trim_end_matches('=').to_owned(),
    ));
    places.push(("logs".into(), logs.text()));
    for (what, value) in &secrets {
        for written in written_forms(value) {
            for (place, text) in &places {
                assert!(
                    !text.contains(&written),
                    "the {what} (as {written:?}) leaked into {place}"
                );
            }
        }
    }
}

/// Subjects: imported and rotated refresh tokens, access tokens of every
/// subject, the admin key and the store key appear nowhere but towards the
/// provider and the API: not in logs (TRACE), `/status`, `/metrics`, the
/// subjects API's answers, error bodies or the subject database on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_subject_token_appears_in_logs_status_metrics_the_admin_api_or_the_database() {
    const ADMIN_KEY: &str = "ak-Vd3Hs9-admin-api-key";
    let logs = logs();
    let provider = MockProvider::start(ProviderConfig {
        client_id: "secret-test".into(),
        client_secret: CLIENT_SECRET.into(),
        lifetime: Duration::from_secs(60),
        refresh_tokens: true,
        rotate_refresh_tokens: true,
        ..ProviderConfig::default()
    })
    .await
    .expect("provider");
    let api = MockApi::start(provider.validator()).await.expect("api");
    let dir = support::temp_dir("secrets-subjects");
    let text = format!(
        r#"
[admin]
listen = "{{admin}}"
api_key = "${{TP_ADMIN_KEY}}"

[store]
kind = "file"
path = "{state}"
key = "${{TP_STORE_KEY}}"

[clients.pos]
listen = "{{listen}}"
upstream = "{upstream}"

[clients.pos.token]
url = "{token_url}"
grant = "refresh_token"
client_id = "secret-test"
client_secret = "${{TP_CLIENT_SECRET}}"

[clients.pos.subjects]
revoke_url = "{token_url}/revoke"
"#,
        state = dir.join("state.json").display(),
        upstream = api.url(),
        token_url = provider.token_url(),
    );
    let env = MapEnv::new()
        .var("TP_ADMIN_KEY", ADMIN_KEY)
        .var("TP_STORE_KEY", STORE_KEY)
        .var("TP_CLIENT_SECRET", CLIENT_SECRET);
    let (running, proxy, admin) = start_sidecar_env(&text, env).await;
    let http = TestClient::new();
    let bearer = format!("Bearer {ADMIN_KEY}");
    let auth = [("authorization", bearer.as_str())];
    let mut imported = Vec::new();
    let mut answers = String::new();
    for merchant in ["m-1", "m-2", "m-dead"] {
        let rt = if merchant == "m-dead" {
            "rt-Kw2Pp7-never-issued-refresh-token".to_owned()
        } else {
            provider.issue_refresh_token_for(merchant)
        };
        let r = http
            .request(
                http::Method::PUT,
                &format!("http://{admin}/clients/pos/subjects/{merchant}"),
                &auth,
                serde_json::json!({ "refresh_token": rt })
                    .to_string()
                    .as_bytes(),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED);
        answers.push_str(&r.text());
        imported.push(rt);
    }
    for merchant in ["m-1", "m-2", "m-dead", "m-1"] {
        let r = http
            .request(
                http::Method::GET,
                &format!("http://{proxy}/merchants/{merchant}/payments"),
                &[("x-tokenproxy-subject", merchant)],
                b"",
            )
            .await;
        answers.push_str(&r.text());
    }
    // A 401 rotates m-1's refresh token once more.
    api.reject_next(1);
    let r = http
        .request(
            http::Method::GET,
            &format!("http://{proxy}/merchants/m-1/payments"),
            &[("x-tokenproxy-subject", "m-1")],
            b"",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    for path in [
        "/clients/pos/subjects",
        "/clients/pos/subjects/m-1",
        "/clients/pos/subjects/m-dead",
    ] {
        answers.push_str(
            &http
                .request(
                    http::Method::GET,
                    &format!("http://{admin}{path}"),
                    &auth,
                    b"",
                )
                .await
                .text(),
        );
    }
    answers.push_str(
        &http
            .request(
                http::Method::DELETE,
                &format!("http://{admin}/clients/pos/subjects/m-2"),
                &auth,
                b"",
            )
            .await
            .text(),
    );
    let status = http.get(&format!("http://{admin}/status")).await.text();
    let metrics = http.get(&format!("http://{admin}/metrics")).await.text();
    running.shutdown().await;
    let access_tokens: Vec<String> = api
        .recorded()
        .iter()
        .filter_map(|r| r.headers.get("authorization"))
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.strip_prefix("Bearer ").map(str::to_owned))
        .collect();
    assert!(access_tokens.len() >= 4, "the API saw the subjects' tokens");
    let database = String::from_utf8_lossy(
        &std::fs::read(dir.join("state.json.subjects.db")).expect("the subject database"),
    )
    .into_owned();
    let log_text = logs.text();
    assert!(
        log_text.contains("subject token obtained"),
        "the capture saw the subjects' logs"
    );
    let places = [
        ("logs", &log_text),
        ("/status", &status),
        ("/metrics", &metrics),
        ("the subjects API and error bodies", &answers),
        ("the subject database", &database),
    ];
    let mut secrets = vec![
        ("admin key", ADMIN_KEY.to_owned()),
        ("store key", STORE_KEY.to_owned()),
        ("client secret", CLIENT_SECRET.to_owned()),
    ];
    secrets.extend(imported.into_iter().map(|t| ("imported refresh token", t)));
    secrets.extend(
        access_tokens
            .into_iter()
            .map(|t| ("subject access token", t)),
    );
    for (what, value) in &secrets {
        for (place, text) in &places {
            assert!(
                !text.contains(value.as_str()),
                "the {what} leaked into {place}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The test-only RSA key the private_key_jwt client signs with.
const SIGNING_KEY_PEM: &str = include_str!("fixtures/rsa2048-test-only.pem");
/// What the client_assertion client's file holds (a projected token, say).
const ASSERTION_FILE_JWT: &str =
    "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2EifQ.c2lnLXByb2plY3RlZC1Ycjk3LXRva2Vu";

/// Client assertions: the signing key, the assertions signed with it or with the
/// client secret, and an assertion read from a file never leave the sidecar
/// except towards the provider, even when a provider echoes them in its errors:
/// not in logs (TRACE), `/status`, `/readyz`, `/metrics`, error bodies or `check`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_signing_key_or_client_assertion_appears_in_logs_status_metrics_errors_or_check() {
    let logs = logs();
    let http = TestClient::new();
    let provider_config = ProviderConfig {
        client_id: "secret-test".into(),
        client_secret: CLIENT_SECRET.into(),
        lifetime: Duration::from_secs(60),
        ..ProviderConfig::default()
    };
    // client_secret_jwt against a provider that accepts it; the other two against
    // providers that echo every credential they receive in an invalid_grant.
    let provider = MockProvider::start(provider_config.clone())
        .await
        .expect("provider");
    let echo_keyed = MockProvider::start(provider_config.clone())
        .await
        .expect("provider");
    let echo_file = MockProvider::start(provider_config)
        .await
        .expect("provider");
    echo_keyed.set_fault(Fault::EchoCredentials(Echo::Raw));
    echo_file.set_fault(Fault::EchoCredentials(Echo::FormEncoded));
    let api = MockApi::start(provider.validator()).await.expect("api");
    let dir = support::temp_dir("secrets-assertions");
    let key_file = dir.join("signing.pem");
    let assertion_file = dir.join("assertion.jwt");
    support::write_secret(&key_file, SIGNING_KEY_PEM);
    support::write_secret(&assertion_file, ASSERTION_FILE_JWT);
    let template = format!(
        r#"
[admin]
listen = "{{admin}}"
[clients.hmac]
listen = "{{listen}}"
upstream = "{api}"
[clients.hmac.token]
url = "{token}"
client_id = "secret-test"
client_secret = "${{TP_CLIENT_SECRET}}"
client_auth = "client_secret_jwt"
[clients.keyed]
listen = "{{listen2}}"
path_prefix = "/keyed"
upstream = "{api}"
token_wait_timeout = "300ms"
[clients.keyed.token]
url = "{echo_keyed}"
client_id = "secret-test"
client_auth = "private_key_jwt"
signing_key_file = "{key}"
key_id = "k1"
[clients.file]
listen = "{{listen2}}"
path_prefix = "/file"
upstream = "{api}"
token_wait_timeout = "300ms"
[clients.file.token]
url = "{echo_file}"
client_auth = "client_assertion"
client_assertion_file = "{assertion}"
"#,
        api = api.url(),
        token = provider.token_url(),
        echo_keyed = echo_keyed.token_url(),
        echo_file = echo_file.token_url(),
        key = key_file.display(),
        assertion = assertion_file.display(),
    );
    // Config loading reads through the injected env; the assertion file is read
    // from disk again for every token request.
    let env = || {
        MapEnv::new()
            .var("TP_CLIENT_SECRET", CLIENT_SECRET)
            .file(&key_file, SIGNING_KEY_PEM)
            .file(&assertion_file, ASSERTION_FILE_JWT)
    };
    let (running, proxy, admin) = start_sidecar_env(&template, env()).await;
    let failed_once = |c: &str| {
        running
            .token(c)
            .is_some_and(|t| t.status().refreshes_failed >= 1)
    };
    assert!(
        support::eventually(Duration::from_secs(5), || running
            .token("hmac")
            .is_some_and(|t| t.is_ready())
            && failed_once("keyed")
            && failed_once("file"))
        .await,
        "the hmac client gets a token; the echoing providers refuse the others"
    );
    let listen2 = running.client_addr("keyed").expect("keyed listener");
    let ok = http.get(&format!("http://{proxy}/v1/payments")).await;
    assert_eq!(ok.status, StatusCode::OK, "client_secret_jwt authenticates");
    let keyed_reply = http
        .get(&format!("http://{listen2}/keyed/v1/payments"))
        .await;
    let file_reply = http
        .get(&format!("http://{listen2}/file/v1/payments"))
        .await;
    assert_eq!(keyed_reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(file_reply.status, StatusCode::SERVICE_UNAVAILABLE);
    let status = http.get(&format!("http://{admin}/status")).await.text();
    assert!(
        status.contains("Invalid credentials") && status.contains("[redacted]"),
        "/status keeps the provider's description with the assertion redacted: {status}"
    );
    let metrics = http.get(&format!("http://{admin}/metrics")).await.text();
    let ready = http.get(&format!("http://{admin}/readyz")).await.text();

    let assertion_of = |p: &MockProvider| {
        p.last_request()
            .and_then(|r| r.param("client_assertion").map(str::to_owned))
            .expect("an assertion was sent")
    };
    let hmac_assertion = assertion_of(&provider);
    let keyed_assertion = assertion_of(&echo_keyed);
    assert_eq!(assertion_of(&echo_file), ASSERTION_FILE_JWT);
    let access_token = api
        .recorded()
        .iter()
        .filter_map(|r| r.headers.get("authorization"))
        .filter_map(|v| v.to_str().ok())
        .map(|v| v.trim_start_matches("Bearer ").to_owned())
        .next()
        .expect("the API saw the hmac client's token");
    drop(running);

    let config_file = dir.join("tokenproxy.toml");
    std::fs::write(
        &config_file,
        template
            .replace("{listen}", "127.0.0.1:18180")
            .replace("{listen2}", "127.0.0.1:18181")
            .replace("{admin}", "127.0.0.1:19190"),
    )
    .expect("write config");
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_tokenproxy"))
        .args(["check", "--config"])
        .arg(&config_file)
        .env("TP_CLIENT_SECRET", CLIENT_SECRET)
        .output()
        .expect("run check");
    let check_out = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(check.status.success(), "check passes: {check_out}");
    assert!(
        check_out.contains("private_key_jwt") && check_out.contains("[key redacted]"),
        "check names the method and redacts the key: {check_out}"
    );
    let _ = std::fs::remove_dir_all(&dir);

    // Two lines from the middle of the PEM body: any printout of the key shows them.
    let key_lines: Vec<&str> = SIGNING_KEY_PEM
        .lines()
        .filter(|l| l.len() == 64 && !l.contains(' '))
        .collect();
    let secrets = [
        ("client secret", CLIENT_SECRET.to_owned()),
        ("signing key", key_lines[3].to_owned()),
        ("signing key", key_lines[key_lines.len() / 2].to_owned()),
        ("client_secret_jwt assertion", hmac_assertion),
        ("private_key_jwt assertion", keyed_assertion),
        ("assertion file", ASSERTION_FILE_JWT.to_owned()),
        ("access token", access_token),
    ];
    let log_text = logs.text();
    let places = [
        ("logs", &log_text),
        ("/status", &status),
        ("/metrics", &metrics),
        ("/readyz", &ready),
        ("keyed error body", &keyed_reply.text()),
        ("file error body", &file_reply.text()),
        ("check output", &check_out),
    ];
    for (what, value) in &secrets {
        for written in written_forms(value) {
            for (place, text) in &places {
                assert!(
                    !text.contains(&written),
                    "the {what} (as {written:?}) leaked into {place}"
                );
            }
        }
    }
}

/// A request hyper refuses before the sidecar sees it (a raw `"`, `<` or `>`
/// in the query, a header line without a colon) gets hyper's bare 400 and one
/// debug line for its connection, with the kind of error, and never with the
/// target, whose query may carry a secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_head_is_logged_at_debug_without_its_query() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let logs = logs();
    let h = support::harness(support::Options::default()).await;
    let secret = "sk-live-Refused-Head-9QzX";
    let requests = [
        format!("GET /v1/charges?api_key={secret}&q=\"x\" HTTP/1.1\r\nHost: localhost\r\n\r\n"),
        format!("GET /v1/charges?api_key={secret}&q=<b> HTTP/1.1\r\nHost: localhost\r\n\r\n"),
        format!("GET /v1/charges?api_key={secret}&q=a>b HTTP/1.1\r\nHost: localhost\r\n\r\n"),
        format!(
            "GET /v1/charges?api_key={secret} HTTP/1.1\r\nHost: localhost\r\nX-No-Colon\r\n\r\n"
        ),
    ];
    let mut peers = Vec::new();
    for request in &requests {
        let mut app = tokio::net::TcpStream::connect(h.proxy)
            .await
            .expect("connect");
        peers.push(app.local_addr().expect("local addr"));
        app.write_all(request.as_bytes()).await.expect("write");
        let mut answer = Vec::new();
        // hyper answers and closes.
        app.read_to_end(&mut answer).await.expect("read");
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with("HTTP/1.1 400 "),
            "{request:?} is refused: {answer}"
        );
    }
    let logged = |peer: &std::net::SocketAddr| {
        logs.text().lines().any(|l| {
            l.contains(&format!("peer={peer}"))
                && l.contains("DEBUG")
                && l.contains("connection ended with an error")
                && l.contains("kind=\"parse\"")
        })
    };
    // The line follows the close the app has seen: wait for it, for a while.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !peers.iter().all(logged) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for peer in &peers {
        assert!(logged(peer), "a debug line for {peer}");
    }
    assert!(!logs.text().contains(secret), "the query is never logged");
}
