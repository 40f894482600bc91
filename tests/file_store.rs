//! `[store] kind = "file"`: token state survives a restart, encrypted at rest;
//! state from another key or damaged on disk is never used or overwritten
//! (the client waits for the right key, saying why), state of another client
//! id is never seen, and neither is sent to the provider.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use http::StatusCode;
use support::{eventually, start_sidecar, LogCapture, TestClient, CLIENT_SECRET};
use tokenproxy::Running;
use tokenproxy_mock::{MockApi, MockProvider, ProviderConfig};

const KEY_A: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const KEY_B: &str = "HxwdHhscGhkYFxYVFBMSERAPDg0MCwoJCAcGBQQDAgE=";

use support::temp_dir;

struct Setup {
    provider: MockProvider,
    api: MockApi,
    path: PathBuf,
}

impl Setup {
    async fn new(name: &str, provider: ProviderConfig) -> Setup {
        let provider = MockProvider::start(provider).await.expect("provider");
        let api = MockApi::start(provider.validator()).await.expect("api");
        Setup {
            provider,
            api,
            path: temp_dir(name).join("tokens.json"),
        }
    }

    fn config(&self, key: &str, client_id: &str, token_extra: &str) -> String {
        format!(
            r#"
[admin]
listen = "{{admin}}"

[store]
kind = "file"
path = "{path}"
key = "{key}"

[clients.payments]
listen = "{{listen}}"
upstream = "{upstream}"
token_wait_timeout = "5s"

[clients.payments.token]
url = "{token_url}"
client_id = "{client_id}"
client_secret = "${{CLIENT_SECRET}}"
{token_extra}
"#,
            path = self.path.display(),
            upstream = self.api.url(),
            token_url = self.provider.token_url(),
        )
    }

    async fn start(&self, config: &str) -> (Running, String) {
        let (running, proxy, _admin) = start_sidecar(config).await;
        (running, format!("http://{proxy}/api/v1/payments"))
    }
}

async fn get_ok(http: &TestClient, url: &str) {
    let r = http.get(url).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

fn file_text(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).expect("state file exists")).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_uses_the_stored_token_without_a_token_request() {
    let s = Setup::new(
        "restart",
        ProviderConfig {
            lifetime: Duration::from_secs(300),
            ..ProviderConfig::default()
        },
    )
    .await;
    let config = s.config(KEY_A, support::CLIENT_ID, "");
    let http = TestClient::new();

    let (first, url) = s.start(&config).await;
    get_ok(&http, &url).await;
    assert_eq!(s.provider.token_requests(), 1);
    first.shutdown().await;

    // At rest: mode 0600, and neither the access token nor the secret in clear.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&s.path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "state file mode");
    }
    let seen = s.api.recorded();
    let header = seen[0].headers["authorization"]
        .to_str()
        .unwrap()
        .to_owned();
    let access_token = header.trim_start_matches("Bearer ");
    let text = file_text(&s.path);
    assert!(!text.contains(access_token), "access token stored in clear");
    assert!(!text.contains(CLIENT_SECRET));

    let (second, url) = s.start(&config).await;
    for _ in 0..5 {
        get_ok(&http, &url).await;
    }
    assert_eq!(
        s.provider.token_requests(),
        1,
        "the restarted sidecar asked the provider although the stored token was valid"
    );
    let serials: Vec<_> = s.api.recorded().iter().map(|r| r.token_serial).collect();
    assert!(
        serials.iter().all(|s| *s == serials[0]),
        "both runs sent the same token: {serials:?}"
    );
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_after_rotation_continues_with_the_rotated_refresh_token() {
    let s = Setup::new(
        "rotation",
        ProviderConfig {
            lifetime: Duration::from_secs(2),
            refresh_tokens: true,
            rotate_refresh_tokens: true,
            ..ProviderConfig::default()
        },
    )
    .await;
    // The bootstrap refresh token a person obtained once.
    let bootstrap = s.provider.issue_refresh_token();
    let config = s.config(
        KEY_A,
        support::CLIENT_ID,
        &format!("grant = \"refresh_token\"\nrefresh_token = \"{bootstrap}\""),
    );
    let http = TestClient::new();

    let (first, url) = s.start(&config).await;
    get_ok(&http, &url).await;
    // Let at least one proactive refresh rotate the refresh token.
    let rotated = eventually(Duration::from_secs(6), || {
        s.provider.grant_requests("refresh_token") >= 2
    })
    .await;
    assert!(rotated, "no rotation happened");
    get_ok(&http, &url).await;
    first.shutdown().await;
    let before = s.provider.grant_requests("refresh_token");

    // Same config, still naming the bootstrap token, which is dead by now.
    let (second, url) = s.start(&config).await;
    let refreshed = eventually(Duration::from_secs(6), || {
        s.provider.grant_requests("refresh_token") >= before + 2
    })
    .await;
    assert!(refreshed, "the restarted sidecar did not keep refreshing");
    get_ok(&http, &url).await;
    assert_eq!(
        s.provider.refresh_token_reuse(),
        0,
        "a spent refresh token was sent again (the bootstrap one, or a rotated one lost on restart)"
    );
    // With 2 s tokens a refresh is under way for part of every second, so wait
    // for a moment between refreshes instead of sampling once.
    let token = second.token("payments").unwrap();
    let valid = eventually(Duration::from_secs(3), || {
        token.status().state().as_str() == "valid"
    })
    .await;
    assert!(valid, "{}", token.status().describe());
    second.shutdown().await;
}

/// State under another key or damaged is never used, never sent to the
/// provider and (issue 25, finding 4) never overwritten: the client spends
/// nothing and says why until the right key is back; state of another
/// client id is never seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_under_another_key_for_another_client_or_damaged_is_never_used_or_overwritten() {
    // The only test here that installs the global subscriber.
    let logs = LogCapture::install(tracing::Level::INFO);
    let s = Setup::new(
        "foreign",
        ProviderConfig {
            lifetime: Duration::from_secs(300),
            ..ProviderConfig::default()
        },
    )
    .await;
    let http = TestClient::new();
    let (first, url) = s.start(&s.config(KEY_A, support::CLIENT_ID, "")).await;
    get_ok(&http, &url).await;
    first.shutdown().await;
    assert_eq!(s.provider.token_requests(), 1);
    let written = file_text(&s.path);

    // Another key: the record does not open; nothing is requested or written.
    let (second, url) = s.start(&s.config(KEY_B, support::CLIENT_ID, "")).await;
    let r = http.get(&url).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    second.shutdown().await;
    assert_eq!(
        s.provider.token_requests(),
        1,
        "a token was requested over the record"
    );
    assert_eq!(file_text(&s.path), written, "the record was overwritten");
    assert!(
        logs.text()
            .contains("does not open with the configured store key"),
        "{}",
        logs.text()
    );

    // Another client id, same key: the record is stored under the first
    // client's identity, so the other one neither sees nor replaces it.
    let before: serde_json::Value = serde_json::from_str(&file_text(&s.path)).unwrap();
    let stored = before["clients"].as_object().expect("clients").clone();
    assert_eq!(stored.len(), 1, "one record: {stored:?}");
    let (record_name, record) = stored.iter().next().unwrap();
    assert!(record_name.starts_with("payments:"), "{record_name}");
    let (third, url) = s.start(&s.config(KEY_B, "another-client", "")).await;
    // The mock provider knows only one client; what matters is that the
    // stored token was not used for the other client.
    let r = http.get(&url).await;
    assert_ne!(
        r.status,
        StatusCode::OK,
        "the other client was served a token"
    );
    third.shutdown().await;
    let after: serde_json::Value = serde_json::from_str(&file_text(&s.path)).unwrap();
    assert_eq!(
        &after["clients"][record_name], record,
        "the first client's record should be left as it was"
    );

    // Damaged ciphertext, right key: not used, not overwritten either.
    let requests = s.provider.token_requests();
    let intact = file_text(&s.path);
    let mut doc: serde_json::Value = serde_json::from_str(&intact).unwrap();
    let data = doc["clients"][record_name]["data"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut bytes: Vec<u8> = data.into_bytes();
    let mid = bytes.len() / 2;
    bytes[mid] = if bytes[mid] == b'A' { b'B' } else { b'A' };
    doc["clients"][record_name]["data"] =
        serde_json::Value::String(String::from_utf8(bytes).unwrap());
    std::fs::write(&s.path, doc.to_string()).unwrap();
    let damaged = file_text(&s.path);
    let (fourth, url) = s.start(&s.config(KEY_A, support::CLIENT_ID, "")).await;
    let r = http.get(&url).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    fourth.shutdown().await;
    assert_eq!(s.provider.token_requests(), requests);
    assert_eq!(
        file_text(&s.path),
        damaged,
        "the damaged record was overwritten"
    );

    // Restored: the stored token serves again, without a token request.
    std::fs::write(&s.path, &intact).unwrap();
    let (fifth, url) = s.start(&s.config(KEY_A, support::CLIENT_ID, "")).await;
    get_ok(&http, &url).await;
    fifth.shutdown().await;
    assert_eq!(s.provider.token_requests(), requests);
}

/// Security review (low): a record with generation 2^64-1 (edited, so it no
/// longer opens) used to wrap the generation counter and stop all
/// persistence. Its generation is not trusted: the next state replaces it,
/// and a restart adopts that state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_with_the_largest_generation_does_not_stop_persistence() {
    let s = Setup::new(
        "max-generation",
        ProviderConfig {
            lifetime: Duration::from_secs(300),
            ..ProviderConfig::default()
        },
    )
    .await;
    let config = s.config(KEY_A, support::CLIENT_ID, "");
    let http = TestClient::new();
    let (first, url) = s.start(&config).await;
    get_ok(&http, &url).await;
    first.shutdown().await;

    let mut doc: serde_json::Value = serde_json::from_str(&file_text(&s.path)).unwrap();
    let name = doc["clients"]
        .as_object()
        .and_then(|c| c.keys().next().cloned())
        .expect("one record");
    doc["clients"][&name]["generation"] = serde_json::json!(u64::MAX);
    std::fs::write(&s.path, doc.to_string()).unwrap();

    let (second, url) = s.start(&config).await;
    get_ok(&http, &url).await;
    second.shutdown().await;
    assert_eq!(
        s.provider.token_requests(),
        2,
        "the edited record is not used"
    );
    let doc: serde_json::Value = serde_json::from_str(&file_text(&s.path)).unwrap();
    assert_ne!(
        doc["clients"][&name]["generation"].as_u64(),
        Some(u64::MAX),
        "the new state should have replaced the record that did not open"
    );

    let (third, url) = s.start(&config).await;
    get_ok(&http, &url).await;
    third.shutdown().await;
    assert_eq!(
        s.provider.token_requests(),
        2,
        "a restart should adopt the state written after the edited record"
    );
}
