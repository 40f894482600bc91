//! Stored records that must not be used, spent over or replaced: a record
//! copied into another client's slot does not open there (file and Redis); a
//! record sealed with a key the sidecar does not hold stops the client,
//! clearly, without spending the bootstrap refresh token or overwriting the
//! record, and comes back once the key is given (as the key or as a previous
//! key); a record that does not parse is one that does not open, never the
//! store being down.

use crate::support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use http::StatusCode;
use support::{free_addr, start_sidecar, TestClient};
use tokenproxy::Running;
use tokenproxy_mock::{MockApi, MockProvider, ProviderConfig};

const KEY_A: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const KEY_B: &str = "HxwdHhscGhkYFxYVFBMSERAPDg0MCwoJCAcGBQQDAgE=";

use crate::support::temp_dir;

fn rotating() -> ProviderConfig {
    ProviderConfig {
        lifetime: Duration::from_secs(300),
        refresh_tokens: true,
        rotate_refresh_tokens: true,
        ..ProviderConfig::default()
    }
}

/// The Redis cases here start `redis-server`; without it they are skipped, and say so.
fn redis_installed() -> bool {
    support::redis_on_path(
        "the Redis cases of tests/it/store_integrity.rs",
        &["redis-server"],
    )
}

/// A `redis-server` child on a free loopback port, without persistence;
/// killed when dropped.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    fn start(dir: &Path) -> Redis {
        let port = free_addr().port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--dir", &dir.display().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (apt-get install redis-server)");
        // Up to 10 s (500 x 20 ms) for the server to accept connections.
        let up = (0..500).any(|_| {
            let ok = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
            if !ok {
                std::thread::sleep(Duration::from_millis(20));
            }
            ok
        });
        assert!(up, "redis-server did not come up");
        Redis { child, port }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("redis answers")
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `[store]` plus two clients, `a` and `b`, of the same OAuth client: the
/// same client id, token URL and grant, so the same credential identity.
fn two_clients(store: &str, provider: &MockProvider, api: &MockApi) -> String {
    let client = |name: &str, listen: &str| {
        format!(
            r#"
[clients.{name}]
listen = "{{{listen}}}"
upstream = "{upstream}"
token_wait_timeout = "3s"

[clients.{name}.token]
url = "{token_url}"
client_id = "{client_id}"
client_secret = "${{CLIENT_SECRET}}"
"#,
            upstream = api.url(),
            token_url = provider.token_url(),
            client_id = support::CLIENT_ID,
        )
    };
    format!(
        "[admin]\nlisten = \"{{admin}}\"\n\n{store}\n{}{}",
        client("a", "listen"),
        client("b", "listen2")
    )
}

/// The proxy URLs of clients a and b.
fn proxies(running: &Running) -> (String, String) {
    let url = |client: &str| {
        let addr = running.client_addr(client).expect("client listens");
        format!("http://{addr}/api/v1/payments")
    };
    (url("a"), url("b"))
}

/// The serial of the token the API saw last, after a request that succeeded.
fn last_serial(api: &MockApi) -> u64 {
    api.recorded()
        .last()
        .and_then(|r| r.token_serial)
        .expect("the API saw a token the provider issued")
}

/// Security review finding 5 (issue 25): two clients of one OAuth client
/// share a file store; client a's record copied into client b's slot (which
/// needs no key) does not open for b, and b never serves a's token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_copied_into_another_clients_slot_does_not_open_in_the_file_store() {
    let provider = MockProvider::start(rotating()).await.expect("provider");
    let api = MockApi::start(provider.validator()).await.expect("api");
    let path = temp_dir("copy-file").join("tokens.json");
    let store = format!(
        "[store]\nkind = \"file\"\npath = \"{}\"\nkey = \"{KEY_A}\"\n",
        path.display()
    );
    let config = two_clients(&store, &provider, &api);
    let http = TestClient::new();

    let (running, _, _) = start_sidecar(&config).await;
    let (url_a, url_b) = proxies(&running);
    assert_eq!(http.get(&url_a).await.status, StatusCode::OK);
    let serial_a = last_serial(&api);
    assert_eq!(http.get(&url_b).await.status, StatusCode::OK);
    let serial_b = last_serial(&api);
    assert_ne!(serial_a, serial_b, "each client has its own token");
    running.shutdown().await;

    // Copy a's record over b's: same identity hash, so only the name differs.
    let mut doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("state file")).expect("json");
    let clients = doc["clients"].as_object().expect("clients").clone();
    let name_a = clients
        .keys()
        .find(|k| k.starts_with("a:"))
        .expect("a's record")
        .clone();
    let name_b = format!("b:{}", name_a.trim_start_matches("a:"));
    assert!(
        clients.contains_key(&name_b),
        "b's record has a's identity hash: {clients:?}"
    );
    doc["clients"][&name_b] = clients[&name_a].clone();
    std::fs::write(&path, doc.to_string()).expect("write");

    let requests = provider.token_requests();
    let (running, _, _) = start_sidecar(&config).await;
    let (url_a, url_b) = proxies(&running);
    assert_eq!(http.get(&url_a).await.status, StatusCode::OK);
    assert_eq!(last_serial(&api), serial_a, "a adopts its own record");
    let seen = api.recorded().len();
    let r = http.get(&url_b).await;
    let served_a = api.recorded()[seen..]
        .iter()
        .any(|r| r.token_serial == Some(serial_a));
    assert!(
        !served_a,
        "client b was served client a's token from the copied record ({} {})",
        r.status,
        r.text()
    );
    assert_eq!(
        provider.refresh_token_reuse(),
        0,
        "a spent refresh token was sent again"
    );
    assert_eq!(
        provider.token_requests(),
        requests,
        "nothing should have been spent over the copied record"
    );
    running.shutdown().await;
}

/// Security review finding 5 (issue 25), Redis: the same copy between the
/// two clients' hashes in a real redis-server does not open for b, and b
/// never serves a's token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_copied_into_another_clients_slot_does_not_open_in_redis() {
    if !redis_installed() {
        return;
    }
    let provider = MockProvider::start(rotating()).await.expect("provider");
    let api = MockApi::start(provider.validator()).await.expect("api");
    let dir = temp_dir("copy-redis");
    let redis = Redis::start(&dir);
    let store = format!(
        "[store]\nkind = \"redis\"\nurl = \"{}\"\nkey_prefix = \"test\"\nkey = \"{KEY_A}\"\n",
        redis.url()
    );
    let config = two_clients(&store, &provider, &api);
    let http = TestClient::new();

    let (running, _, _) = start_sidecar(&config).await;
    let (url_a, url_b) = proxies(&running);
    assert_eq!(http.get(&url_a).await.status, StatusCode::OK);
    let serial_a = last_serial(&api);
    assert_eq!(http.get(&url_b).await.status, StatusCode::OK);
    running.shutdown().await;

    let mut conn = redis.connection().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("test:{a:*}:token")
        .query_async(&mut conn)
        .await
        .expect("KEYS");
    let key_a = keys.first().expect("a's record").clone();
    let key_b = key_a.replacen("test:{a:", "test:{b:", 1);
    let fields: Vec<(String, String)> = redis::cmd("HGETALL")
        .arg(&key_a)
        .query_async(&mut conn)
        .await
        .expect("HGETALL");
    let _: () = redis::cmd("DEL")
        .arg(&key_b)
        .query_async(&mut conn)
        .await
        .expect("DEL");
    for (field, value) in &fields {
        let _: () = redis::cmd("HSET")
            .arg(&key_b)
            .arg(field)
            .arg(value)
            .query_async(&mut conn)
            .await
            .expect("HSET");
    }

    let requests = provider.token_requests();
    let (running, _, _) = start_sidecar(&config).await;
    let (url_a, url_b) = proxies(&running);
    assert_eq!(http.get(&url_a).await.status, StatusCode::OK);
    assert_eq!(last_serial(&api), serial_a, "a adopts its own record");
    let seen = api.recorded().len();
    let r = http.get(&url_b).await;
    let served_a = api.recorded()[seen..]
        .iter()
        .any(|r| r.token_serial == Some(serial_a));
    assert!(
        !served_a,
        "client b was served client a's token from the copied record ({} {})",
        r.status,
        r.text()
    );
    assert_eq!(
        provider.refresh_token_reuse(),
        0,
        "a spent refresh token was sent again"
    );
    assert_eq!(
        provider.token_requests(),
        requests,
        "nothing should have been spent over the copied record"
    );
    running.shutdown().await;
    drop(redis);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `/status` once `done` holds for it (within 5 s; else a failure naming it).
async fn status_until(
    http: &TestClient,
    url: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let status = http.get(url).await.json();
        if done(&status) {
            return status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/status never reached the expected state: {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One client `payments` with `grant = "refresh_token"` bootstrapped with
/// `bootstrap`, over a file store at `path` with `keys` (the `key` line and
/// any `previous_keys`).
fn wallet(
    path: &Path,
    keys: &str,
    bootstrap: &str,
    provider: &MockProvider,
    api: &MockApi,
) -> String {
    format!(
        r#"
[admin]
listen = "{{admin}}"

[store]
kind = "file"
path = "{path}"
{keys}

[clients.payments]
listen = "{{listen}}"
upstream = "{upstream}"
token_wait_timeout = "3s"

[clients.payments.token]
url = "{token_url}"
grant = "refresh_token"
client_id = "{client_id}"
client_secret = "${{CLIENT_SECRET}}"
refresh_token = "{bootstrap}"
"#,
        path = path.display(),
        upstream = api.url(),
        token_url = provider.token_url(),
        client_id = support::CLIENT_ID,
    )
}

/// Security review finding 4 (issue 25): after the store key changes (a
/// wrong or rotated `key_file`), the rotated chain's record does not open.
/// The client must neither send the bootstrap refresh token (spent by the
/// first rotation: reuse, grant revoked) nor overwrite the record; it says
/// what is wrong in `/status` and `/readyz` and spends nothing. Given the old
/// key as a previous key, it carries on with the stored chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_under_another_key_stops_the_client_without_spending_or_overwriting() {
    let provider = MockProvider::start(rotating()).await.expect("provider");
    let api = MockApi::start(provider.validator()).await.expect("api");
    let path = temp_dir("other-key").join("tokens.json");
    let bootstrap = provider.issue_refresh_token();
    let http = TestClient::new();

    let key_a = format!("key = \"{KEY_A}\"");
    let (running, proxy, _) =
        start_sidecar(&wallet(&path, &key_a, &bootstrap, &provider, &api)).await;
    let url = format!("http://{proxy}/api/v1/payments");
    assert_eq!(http.get(&url).await.status, StatusCode::OK);
    running.shutdown().await;
    assert_eq!(
        provider.grant_requests("refresh_token"),
        1,
        "the bootstrap token was spent once"
    );
    let before = std::fs::read(&path).expect("state file");

    // The key changed: the record does not open.
    let key_b = format!("key = \"{KEY_B}\"");
    let (running, proxy, admin) =
        start_sidecar(&wallet(&path, &key_b, &bootstrap, &provider, &api)).await;
    let url = format!("http://{proxy}/api/v1/payments");
    let status_url = format!("http://{admin}/status");
    let status = status_until(&http, &status_url, |s| {
        s["clients"]["payments"]["store"]["role"] == "locked"
    })
    .await;
    let client = &status["clients"]["payments"];
    assert_eq!(client["state"], "unavailable", "{status}");
    let problem = client["store"]["problem"].as_str().unwrap_or_default();
    assert!(
        problem.contains("does not open") && problem.contains("previous_key_files"),
        "/status should say what is wrong and what to do: {status}"
    );
    let ready = http.get(&format!("http://{admin}/readyz")).await;
    assert_eq!(
        ready.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        ready.text()
    );
    let r = http.get(&url).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    assert_eq!(r.error_code(), Some("token_unavailable"));
    running.shutdown().await;
    assert_eq!(
        provider.refresh_token_reuse(),
        0,
        "the spent bootstrap refresh token was sent over the record that does not open"
    );
    assert_eq!(
        provider.grant_requests("refresh_token"),
        1,
        "nothing was to be spent"
    );
    assert_eq!(
        std::fs::read(&path).expect("state file"),
        before,
        "the record that does not open must be left as it was"
    );

    // Key rotation: the old key as a previous key opens the record.
    let rotated = format!("key = \"{KEY_B}\"\nprevious_keys = [\"{KEY_A}\"]");
    let (running, proxy, _) =
        start_sidecar(&wallet(&path, &rotated, &bootstrap, &provider, &api)).await;
    let url = format!("http://{proxy}/api/v1/payments");
    let r = http.get(&url).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    running.shutdown().await;
    assert_eq!(
        provider.refresh_token_reuse(),
        0,
        "a spent refresh token was sent again"
    );
    assert_eq!(
        provider.grant_requests("refresh_token"),
        1,
        "the stored access token was still fresh: no token request"
    );
}

/// Security review finding 6 (issue 25), file store: one client's entry that
/// does not parse (a generation that is not a number) made the whole state
/// file unusable, so it was moved aside and every client started over. Now
/// only that client's record is ignored (and replaced by its next token);
/// the other client adopts its own stored token without a token request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_that_does_not_parse_affects_only_its_client_in_the_file_store() {
    let provider = MockProvider::start(rotating()).await.expect("provider");
    let api = MockApi::start(provider.validator()).await.expect("api");
    let dir = temp_dir("garbage-entry");
    let path = dir.join("tokens.json");
    let store = format!(
        "[store]\nkind = \"file\"\npath = \"{}\"\nkey = \"{KEY_A}\"\n",
        path.display()
    );
    let config = two_clients(&store, &provider, &api);
    let http = TestClient::new();
    let (running, _, _) = start_sidecar(&config).await;
    let (url_a, url_b) = proxies(&running);
    assert_eq!(http.get(&url_a).await.status, StatusCode::OK);
    assert_eq!(http.get(&url_b).await.status, StatusCode::OK);
    let serial_b = last_serial(&api);
    running.shutdown().await;

    let mut doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("state file")).expect("json");
    let name_a = doc["clients"]
        .as_object()
        .and_then(|c| c.keys().find(|k| k.starts_with("a:")).cloned())
        .expect("a's record");
    doc["clients"][&name_a]["generation"] = serde_json::json!("garbage");
    std::fs::write(&path, doc.to_string()).expect("write");

    let requests = provider.token_requests();
    let (running, _, _) = start_sidecar(&config).await;
    let (url_a, url_b) = proxies(&running);
    assert_eq!(http.get(&url_b).await.status, StatusCode::OK);
    assert_eq!(last_serial(&api), serial_b, "b adopts its own stored token");
    let r = http.get(&url_a).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    running.shutdown().await;
    assert_eq!(
        provider.token_requests(),
        requests + 1,
        "only client a, whose entry does not parse, should have asked for a token"
    );
    let moved_aside = std::fs::read_dir(&dir)
        .expect("dir")
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().contains(".corrupt-"));
    assert!(
        !moved_aside,
        "the state file was moved aside for one bad entry"
    );
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("state file")).expect("json");
    assert!(
        doc["clients"][&name_a]["generation"].is_u64(),
        "a's entry should have been replaced by its new token: {doc}"
    );
    assert_eq!(provider.refresh_token_reuse(), 0);
}

/// Security review finding 6 (issue 25), Redis: one write without the store
/// key (a `generation` that is not a number, or one beyond 2^53 where Lua
/// loses precision) made every read fail as "store unavailable". Now such a
/// record is one that does not open: the store stays available, the refresher
/// replaces it under the lease with the chain's newest refresh token, and a
/// process holding only the spent bootstrap refresh token spends nothing over
/// it. No refresh token is ever sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_record_that_does_not_parse_is_replaced_under_the_lease_not_an_outage() {
    if !redis_installed() {
        return;
    }
    let provider = MockProvider::start(ProviderConfig {
        lifetime: Duration::from_secs(2),
        ..rotating()
    })
    .await
    .expect("provider");
    let api = MockApi::start(provider.validator()).await.expect("api");
    let dir = temp_dir("garbage-redis");
    let redis = Redis::start(&dir);
    let bootstrap = provider.issue_refresh_token();
    let config = format!(
        r#"
[admin]
listen = "{{admin}}"

[store]
kind = "redis"
url = "{redis}"
key_prefix = "test"
key = "{KEY_A}"

[clients.payments]
listen = "{{listen}}"
upstream = "{upstream}"
token_wait_timeout = "3s"

[clients.payments.token]
url = "{token_url}"
grant = "refresh_token"
client_id = "{client_id}"
client_secret = "${{CLIENT_SECRET}}"
refresh_token = "{bootstrap}"
"#,
        redis = redis.url(),
        upstream = api.url(),
        token_url = provider.token_url(),
        client_id = support::CLIENT_ID,
    );
    let http = TestClient::new();
    let mut conn = redis.connection().await;
    let (running, proxy, admin) = start_sidecar(&config).await;
    let url = format!("http://{proxy}/api/v1/payments");
    let status_url = format!("http://{admin}/status");
    assert_eq!(http.get(&url).await.status, StatusCode::OK);
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("test:{payments:*}:token")
        .query_async(&mut conn)
        .await
        .expect("KEYS");
    let key = keys.first().expect("the record").clone();

    for garbage in ["garbage", "1152921504606846976"] {
        let _: () = redis::cmd("HSET")
            .arg(&key)
            .arg("generation")
            .arg(garbage)
            .query_async(&mut conn)
            .await
            .expect("HSET");
        let refreshes = provider.grant_requests("refresh_token");
        // Tokens last 2 s: the next refresh comes within about 2 s.
        let status = status_until(&http, &status_url, |_| {
            provider.grant_requests("refresh_token") > refreshes
        })
        .await;
        assert_eq!(
            status["clients"]["payments"]["store"]["available"], true,
            "a record that does not parse is not the store being down ({garbage}): {status}"
        );
        let r = http.get(&url).await;
        assert_eq!(r.status, StatusCode::OK, "{garbage}: {}", r.text());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let stored: String = redis::cmd("HGET")
                .arg(&key)
                .arg("generation")
                .query_async(&mut conn)
                .await
                .expect("HGET");
            if stored.parse::<u64>().is_ok_and(|g| g < 1 << 53) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{garbage}: the record should have been replaced, its generation is still {stored}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    running.shutdown().await;

    // A new process holds only the spent bootstrap refresh token: over a
    // record that does not parse it spends nothing, and says so.
    let _: () = redis::cmd("HSET")
        .arg(&key)
        .arg("generation")
        .arg("garbage")
        .query_async(&mut conn)
        .await
        .expect("HSET");
    let (running, _, admin) = start_sidecar(&config).await;
    let status_url = format!("http://{admin}/status");
    let status = status_until(&http, &status_url, |s| {
        s["clients"]["payments"]["store"]["role"] == "locked"
    })
    .await;
    assert_eq!(
        status["clients"]["payments"]["store"]["available"], true,
        "{status}"
    );
    running.shutdown().await;
    assert_eq!(
        provider.refresh_token_reuse(),
        0,
        "a spent refresh token was sent again"
    );
    drop(redis);
    let _ = std::fs::remove_dir_all(&dir);
}
