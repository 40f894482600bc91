//! Subjects: one token pair per merchant, chosen per request by a header.
//!
//! The mock provider issues refresh tokens for named accounts, and the mock
//! API answers 403 to `/merchants/ID/...` when the token belongs to another
//! account: these tests check that a request for one subject never carries
//! another's token.

use crate::support;

use std::net::SocketAddr;
use std::time::Duration;

use http::{Method, StatusCode};
use support::{eventually, metric, start_sidecar_env, PosConfig, TestClient, CLIENT_SECRET};
use tokenproxy::config::MapEnv;
use tokenproxy::Running;
use tokenproxy_mock::{Fault, MockApi, MockProvider, ProviderConfig, ResponseShape};

const ADMIN_KEY: &str = "subjects-admin-key-7c41d2";
const KEY_FILE: &str = "/run/secrets/tokenproxy-admin";

struct Market {
    provider: MockProvider,
    api: MockApi,
    http: TestClient,
    running: Running,
    proxy: SocketAddr,
    admin: SocketAddr,
    /// The configuration as started, with its addresses filled in.
    text: String,
}

async fn market(subjects_extra: &str, client_extra: &str) -> Market {
    market_with(Duration::from_secs(300), subjects_extra, client_extra).await
}

async fn market_with_lifetime(lifetime: Duration, subjects_extra: &str) -> Market {
    market_with(lifetime, subjects_extra, "").await
}

async fn market_with(lifetime: Duration, subjects_extra: &str, client_extra: &str) -> Market {
    let provider = ProviderConfig {
        lifetime,
        refresh_tokens: true,
        rotate_refresh_tokens: true,
        ..ProviderConfig::default()
    };
    market_from(provider, subjects_extra, client_extra, "").await
}

/// A market whose provider is `provider`, with `tail` after the subjects
/// table (e.g. a `[clients.pos.token.response]` table).
async fn market_from(
    provider: ProviderConfig,
    subjects_extra: &str,
    client_extra: &str,
    tail: &str,
) -> Market {
    let provider = MockProvider::start(provider).await.expect("provider");
    let api = MockApi::start(provider.validator()).await.expect("api");
    let text = PosConfig {
        upstream: &api.url(),
        token_url: &provider.token_url(),
        admin_auth: &format!("api_key_file = \"{KEY_FILE}\""),
        grant: "grant = \"refresh_token\"",
        client: client_extra,
        subjects: subjects_extra,
        tail,
    }
    .text();
    let env = MapEnv::new()
        .var("CLIENT_SECRET", CLIENT_SECRET)
        .file(KEY_FILE, format!("{ADMIN_KEY}\n"));
    let (running, proxy, admin) = start_sidecar_env(&text, env).await;
    let text = text
        .replace("{listen}", &proxy.to_string())
        .replace("{admin}", &admin.to_string());
    Market {
        provider,
        api,
        http: TestClient::new(),
        running,
        proxy,
        admin,
        text,
    }
}

impl Market {
    /// Imports a refresh token of `merchant` through the admin API.
    async fn connect(&self, merchant: &str) {
        let rt = self.provider.issue_refresh_token_for(merchant);
        let r = self
            .admin_call(
                Method::PUT,
                &format!("/clients/pos/subjects/{merchant}"),
                serde_json::json!({ "refresh_token": rt })
                    .to_string()
                    .as_bytes(),
            )
            .await;
        assert_eq!(
            r.status,
            StatusCode::CREATED,
            "import of {merchant}: {}",
            r.text()
        );
    }

    async fn admin_call(&self, method: Method, path: &str, body: &[u8]) -> support::Reply {
        let bearer = format!("Bearer {ADMIN_KEY}");
        self.http
            .request(
                method,
                &format!("http://{}{path}", self.admin),
                &[
                    ("authorization", bearer.as_str()),
                    ("content-type", "application/json"),
                ],
                body,
            )
            .await
    }

    /// A payment of `merchant`, naming `subject` in the header (when given).
    async fn pay(&self, merchant: &str, subject: Option<&str>) -> support::Reply {
        let url = format!("http://{}/merchants/{merchant}/payments", self.proxy);
        let headers: Vec<(&str, &str)> = subject
            .map(|s| vec![("x-tokenproxy-subject", s)])
            .unwrap_or_default();
        self.http.request(Method::GET, &url, &headers, b"").await
    }

    async fn metrics(&self) -> String {
        self.http
            .get(&format!("http://{}/metrics", self.admin))
            .await
            .text()
    }
}

/// Each request carries its own subject's token, the subject header never
/// reaches the API, and each subject costs one token request however many
/// requests run at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_carries_its_own_subjects_token_and_the_header_is_stripped() {
    let m = market("", "").await;
    let merchants = ["m-1", "m-2", "m-3", "shop:4@eu"];
    for merchant in merchants {
        m.connect(merchant).await;
    }
    let mut requests = Vec::new();
    for round in 0..10 {
        for merchant in merchants {
            let m = &m;
            requests.push(async move {
                let r = m.pay(merchant, Some(merchant)).await;
                (round, merchant, r)
            });
        }
    }
    for (round, merchant, r) in futures_join_all(requests).await {
        assert_eq!(
            r.status,
            StatusCode::OK,
            "round {round} of {merchant}: {}",
            r.text()
        );
    }
    let recorded = m.api.recorded();
    assert_eq!(recorded.len(), 40);
    for req in &recorded {
        let named = req.path.split('/').nth(2).expect("merchant in path");
        assert_eq!(
            req.token_account.as_deref(),
            Some(named),
            "a request for {named} carried another subject's token"
        );
        assert!(
            !req.headers.contains_key("x-tokenproxy-subject"),
            "the subject header must be stripped before forwarding"
        );
    }
    assert_eq!(
        m.provider.grant_requests("refresh_token"),
        merchants.len(),
        "one token request per subject, not one per request"
    );
    assert_eq!(m.provider.refresh_token_reuse(), 0);
    // Every subject holds its token now: the next request of each is a hit.
    for merchant in merchants {
        assert_eq!(m.pay(merchant, Some(merchant)).await.status, StatusCode::OK);
    }
    let text = m.metrics().await;
    let hits = metric(
        &text,
        "tokenproxy_subject_cache_total",
        &[("client", "pos"), ("result", "hit")],
    );
    assert!(
        hits.unwrap_or(0.0) >= merchants.len() as f64,
        "cache hits are counted: {hits:?}"
    );
}

/// A subject header that is missing, malformed, repeated or unknown gets the
/// contract's error codes, and the process keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_malformed_and_unknown_subjects_get_their_error_codes() {
    let m = market("", "").await;
    m.connect("m-1").await;

    let r = m.pay("m-1", None).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.error_code(), Some("subject_required"));

    let long = "x".repeat(129);
    for bad in ["m 1", "m/1", "", long.as_str(), "m\u{e9}"] {
        let url = format!("http://{}/merchants/m-1/payments", m.proxy);
        let req = http::Request::get(&url)
            .header(
                "x-tokenproxy-subject",
                http::HeaderValue::from_bytes(bad.as_bytes()).unwrap(),
            )
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let r = m.http.send(req).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "subject {bad:?}");
        assert_eq!(r.error_code(), Some("bad_subject"), "subject {bad:?}");
    }
    let url = format!("http://{}/merchants/m-1/payments", m.proxy);
    let r = m
        .http
        .request(
            Method::GET,
            &url,
            &[
                ("x-tokenproxy-subject", "m-1"),
                ("x-tokenproxy-subject", "m-2"),
            ],
            b"",
        )
        .await;
    assert_eq!(
        r.error_code(),
        Some("bad_subject"),
        "two subject headers are ambiguous"
    );

    let r = m.pay("m-9", Some("m-9")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.error_code(), Some("subject_unknown"));

    let r = m.pay("m-1", Some("m-1")).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "the process keeps serving: {}",
        r.text()
    );
    assert_eq!(m.api.requests(), 1, "no refused request reached the API");
}

/// A subject whose refresh token the provider refuses needs authorization
/// (403, and so on for later requests without asking the provider again);
/// other subjects go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_refresh_token_puts_only_its_subject_in_needs_authorization() {
    let m = market("", "").await;
    m.connect("m-1").await;
    // A refresh token the provider never issued.
    let r = m
        .admin_call(
            Method::PUT,
            "/clients/pos/subjects/m-dead",
            br#"{"refresh_token": "never-issued-refresh-token"}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);

    let r = m.pay("m-dead", Some("m-dead")).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());
    assert_eq!(r.error_code(), Some("needs_authorization"));
    assert!(
        r.text().contains("connect"),
        "the detail says how to reconnect: {}",
        r.text()
    );
    let asked = m.provider.token_requests();
    let r = m.pay("m-dead", Some("m-dead")).await;
    assert_eq!(r.error_code(), Some("needs_authorization"));
    assert_eq!(
        m.provider.token_requests(),
        asked,
        "a dead subject does not ask the provider again"
    );

    let r = m
        .admin_call(Method::GET, "/clients/pos/subjects/m-dead", b"")
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["state"], "needs_authorization");
    assert!(
        !r.text().contains("never-issued"),
        "the API never shows a token: {}",
        r.text()
    );

    let r = m.pay("m-1", Some("m-1")).await;
    assert_eq!(r.status, StatusCode::OK, "other subjects go on");
}

/// A provider outage answers `token_unavailable` with Retry-After, and the
/// subject backs off instead of asking once per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_outage_is_token_unavailable_with_backoff() {
    let m = market("", "").await;
    m.connect("m-1").await;
    m.provider.set_fault(Fault::Status {
        status: 503,
        body: "down".into(),
        content_type: "text/plain",
        retry_after: None,
    });
    let r = m.pay("m-1", Some("m-1")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.error_code(), Some("token_unavailable"));
    assert!(r.headers.contains_key("retry-after"));
    let asked = m.provider.token_requests();
    for _ in 0..5 {
        let r = m.pay("m-1", Some("m-1")).await;
        assert_eq!(r.error_code(), Some("token_unavailable"));
    }
    assert_eq!(
        m.provider.token_requests(),
        asked,
        "requests during the backoff do not ask again"
    );
}

/// A 401 with `invalid_token` refreshes the subject's token once and replays
/// the request with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_refreshes_that_subject_once_and_replays() {
    let m = market("", "").await;
    m.connect("m-1").await;
    m.connect("m-2").await;
    assert_eq!(m.pay("m-1", Some("m-1")).await.status, StatusCode::OK);
    assert_eq!(m.pay("m-2", Some("m-2")).await.status, StatusCode::OK);
    m.api.reject_next(1);
    let r = m.pay("m-1", Some("m-1")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        r.headers.get("x-tokenproxy-replayed").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    assert_eq!(
        m.provider.grant_requests("refresh_token"),
        3,
        "one more token request, for m-1 only"
    );
    let last = m.api.recorded().last().cloned().expect("recorded");
    assert_eq!(last.token_account.as_deref(), Some("m-1"));
    assert_eq!(m.provider.refresh_token_reuse(), 0);
}

/// With more subjects than `max_cached`, tokens are evicted from memory and
/// read back from the store, and each request still carries its own
/// subject's token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_keeps_memory_bounded_and_never_mixes_subjects() {
    let m = market("max_cached = 3", "").await;
    let merchants: Vec<String> = (0..8).map(|i| format!("m-{i}")).collect();
    for merchant in &merchants {
        m.connect(merchant).await;
    }
    for _round in 0..3 {
        for merchant in &merchants {
            let r = m.pay(merchant, Some(merchant)).await;
            assert_eq!(r.status, StatusCode::OK, "{merchant}: {}", r.text());
        }
    }
    for req in m.api.recorded() {
        let named = req.path.split('/').nth(2).expect("merchant in path");
        assert_eq!(req.token_account.as_deref(), Some(named));
    }
    let status = m
        .http
        .get(&format!("http://{}/status", m.admin))
        .await
        .json();
    let cached = status["clients"]["pos"]["subjects"]["cached"]
        .as_u64()
        .unwrap_or(99);
    assert!(
        cached <= 3,
        "at most max_cached tokens in memory, found {cached}"
    );
    assert_eq!(
        m.provider.grant_requests("refresh_token"),
        merchants.len(),
        "an evicted subject's token comes back from the store, not from the provider"
    );
    let text = m.metrics().await;
    let from_store = metric(
        &text,
        "tokenproxy_subject_cache_total",
        &[("client", "pos"), ("result", "store")],
    );
    assert!(
        from_store.unwrap_or(0.0) > 0.0,
        "store reads are counted: {from_store:?}"
    );
}

/// The admin API lists, shows and deletes subjects; it needs the admin key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_lists_shows_and_deletes_subjects_with_the_key() {
    let m = market("", "").await;
    for merchant in ["a", "b", "c"] {
        m.connect(merchant).await;
    }
    let url = format!("http://{}/clients/pos/subjects", m.admin);
    let r = m.http.get(&url).await;
    assert_eq!(
        r.status,
        StatusCode::UNAUTHORIZED,
        "the key is needed once configured"
    );

    let r = m
        .admin_call(Method::GET, "/clients/pos/subjects?limit=2", b"")
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let page = r.json();
    let ids: Vec<&str> = page["subjects"]
        .as_array()
        .expect("subjects")
        .iter()
        .filter_map(|s| s["subject"].as_str())
        .collect();
    assert_eq!(ids, ["a", "b"]);
    assert_eq!(page["next"], "b");
    let r = m
        .admin_call(Method::GET, "/clients/pos/subjects?limit=2&after=b", b"")
        .await;
    assert_eq!(r.json()["subjects"][0]["subject"], "c");
    assert!(r.json()["next"].is_null());

    let r = m
        .admin_call(Method::DELETE, "/clients/pos/subjects/b", b"")
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = m
        .admin_call(Method::GET, "/clients/pos/subjects/b", b"")
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.error_code(), Some("subject_unknown"));
    let r = m.pay("b", Some("b")).await;
    assert_eq!(
        r.error_code(),
        Some("subject_unknown"),
        "a deleted subject gets no token"
    );

    let r = m
        .admin_call(Method::GET, "/clients/pos/subjects/a", b"")
        .await;
    assert_eq!(r.json()["state"], "valid");
    assert!(r.json()["connected_at"].is_string());
}

/// With `fallback = "client"`, a request without the header uses the
/// client's own token; one with it uses the subject's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_client_uses_the_clients_own_token_without_the_header() {
    let provider = MockProvider::start(ProviderConfig {
        refresh_tokens: true,
        ..ProviderConfig::default()
    })
    .await
    .expect("provider");
    let api = MockApi::start(provider.validator()).await.expect("api");
    let text = PosConfig {
        upstream: &api.url(),
        token_url: &provider.token_url(),
        admin_auth: &format!("api_key_file = \"{KEY_FILE}\""),
        grant: "",
        client: "",
        subjects: "fallback = \"client\"",
        tail: "",
    }
    .text();
    let env = MapEnv::new()
        .var("CLIENT_SECRET", CLIENT_SECRET)
        .file(KEY_FILE, format!("{ADMIN_KEY}\n"));
    let (running, proxy, _admin) = start_sidecar_env(&text, env).await;
    assert!(
        eventually(Duration::from_secs(5), || running
            .token("pos")
            .is_some_and(|t| t.is_ready()))
        .await,
        "the client's own token is obtained"
    );
    let http = TestClient::new();
    let r = http.get(&format!("http://{proxy}/api/v1/payments")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        api.recorded()[0].token_account,
        None,
        "the client's own token"
    );
}

pub(crate) async fn futures_join_all<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut set = Vec::with_capacity(futures.len());
    for f in futures {
        set.push(Box::pin(f));
    }
    let mut out = Vec::with_capacity(set.len());
    // Polled together: each future runs while the others wait on I/O.
    let joined = futures_util_join(set).await;
    out.extend(joined);
    out
}

async fn futures_util_join<F: std::future::Future + Unpin>(mut futures: Vec<F>) -> Vec<F::Output> {
    use std::task::Poll;
    let mut results: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in futures.iter_mut().enumerate() {
            if results[i].is_none() {
                match std::pin::Pin::new(f).poll(cx) {
                    Poll::Ready(v) => results[i] = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    results.into_iter().flatten().collect()
}

/// A subject in use is renewed ahead of expiry in the background: its
/// requests never wait for a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_active_subject_is_renewed_before_expiry_and_its_requests_never_wait() {
    let m = market_with_lifetime(Duration::from_secs(2), "").await;
    m.connect("m-1").await;
    assert_eq!(m.pay("m-1", Some("m-1")).await.status, StatusCode::OK);
    let until = tokio::time::Instant::now() + Duration::from_millis(3500);
    let mut served = 0;
    while tokio::time::Instant::now() < until {
        let r = m.pay("m-1", Some("m-1")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        served += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served > 20);
    let text = m.metrics().await;
    let proactive = metric(
        &text,
        "tokenproxy_token_refreshes_total",
        &[
            ("client", "pos"),
            ("trigger", "proactive"),
            ("outcome", "success"),
        ],
    )
    .unwrap_or(0.0);
    assert!(
        proactive >= 1.0,
        "renewed in the background at least once: {proactive}"
    );
    let expired = metric(
        &text,
        "tokenproxy_token_refreshes_total",
        &[
            ("client", "pos"),
            ("trigger", "expired"),
            ("outcome", "success"),
        ],
    )
    .unwrap_or(0.0);
    assert_eq!(expired, 1.0, "only the first request waited for a token");
    assert_eq!(m.provider.refresh_token_reuse(), 0);
}

/// Idle subjects are renewed by the sweeper before `refresh_every` passes,
/// each once, counted with trigger `sweep`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweeper_renews_idle_subjects_within_refresh_every() {
    let m = market(
        "refresh_every = \"2s\"\nmax_concurrent_token_requests = 2",
        "",
    )
    .await;
    let merchants: Vec<String> = (0..12).map(|i| format!("idle-{i}")).collect();
    for merchant in &merchants {
        m.connect(merchant).await;
    }
    let renewed = eventually(Duration::from_secs(6), || {
        m.provider.grant_requests("refresh_token") >= merchants.len()
    })
    .await;
    assert!(
        renewed,
        "every idle subject is renewed: {} of {}",
        m.provider.grant_requests("refresh_token"),
        merchants.len()
    );
    let text = m.metrics().await;
    let swept = metric(
        &text,
        "tokenproxy_token_refreshes_total",
        &[
            ("client", "pos"),
            ("trigger", "sweep"),
            ("outcome", "success"),
        ],
    )
    .unwrap_or(0.0);
    assert!(
        swept >= merchants.len() as f64,
        "counted as sweeps: {swept}"
    );
    assert_eq!(m.provider.refresh_token_reuse(), 0);
    for merchant in &merchants {
        let r = m.pay(merchant, Some(merchant)).await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "a swept subject still works: {}",
            r.text()
        );
    }
}

/// With a file store, a subject's rotated refresh token and access token
/// outlive the process: a restarted sidecar serves the stored access token
/// without a token request, and later refreshes never reuse a spent refresh
/// token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_every_subjects_rotated_tokens() {
    let dir = support::temp_dir("subjects-restart");
    let store = format!(
        "[store]\nkind = \"file\"\npath = \"{}\"\nkey = \"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\"\n",
        dir.join("state.json").display()
    );
    let provider = MockProvider::start(ProviderConfig {
        lifetime: Duration::from_secs(300),
        refresh_tokens: true,
        rotate_refresh_tokens: true,
        ..ProviderConfig::default()
    })
    .await
    .expect("provider");
    let api = MockApi::start(provider.validator()).await.expect("api");
    let text = PosConfig {
        upstream: &api.url(),
        token_url: &provider.token_url(),
        admin_auth: &format!("api_key_file = \"{KEY_FILE}\""),
        grant: "grant = \"refresh_token\"",
        client: "",
        subjects: "",
        tail: &store,
    }
    .text();
    let env = || {
        MapEnv::new()
            .var("CLIENT_SECRET", CLIENT_SECRET)
            .file(KEY_FILE, format!("{ADMIN_KEY}\n"))
    };
    let http = TestClient::new();
    let (first, proxy, admin) = start_sidecar_env(&text, env()).await;
    for merchant in ["m-1", "m-2"] {
        let rt = provider.issue_refresh_token_for(merchant);
        let bearer = format!("Bearer {ADMIN_KEY}");
        let r = support::import_subject(&http, admin, &bearer, merchant, &rt).await;
        assert_eq!(r.status, StatusCode::CREATED);
        let url = format!("http://{proxy}/merchants/{merchant}/payments");
        let r = http
            .request(
                Method::GET,
                &url,
                &[("x-tokenproxy-subject", merchant)],
                b"",
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    assert_eq!(provider.grant_requests("refresh_token"), 2);
    first.shutdown().await;

    let (second, proxy, admin) = start_sidecar_env(&text, env()).await;
    // Counted from the store at start (nothing is loaded): both are idle.
    let mut idle = None;
    for _ in 0..50 {
        let text = http.get(&format!("http://{admin}/metrics")).await.text();
        idle = metric(
            &text,
            "tokenproxy_subjects",
            &[("client", "pos"), ("state", "idle")],
        );
        if idle == Some(2.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(idle, Some(2.0), "the stored subjects are counted as idle");
    let status = http.get(&format!("http://{admin}/status")).await.json();
    assert_eq!(
        status["clients"]["pos"]["subjects"]["by_state"]["idle"], 2,
        "{status}"
    );
    for merchant in ["m-1", "m-2"] {
        let url = format!("http://{proxy}/merchants/{merchant}/payments");
        let r = http
            .request(
                Method::GET,
                &url,
                &[("x-tokenproxy-subject", merchant)],
                b"",
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "after the restart: {}", r.text());
    }
    assert_eq!(
        provider.grant_requests("refresh_token"),
        2,
        "the restarted sidecar serves the stored access tokens"
    );
    provider.revoke_all();
    for merchant in ["m-1", "m-2"] {
        let url = format!("http://{proxy}/merchants/{merchant}/payments");
        let r = http
            .request(
                Method::GET,
                &url,
                &[("x-tokenproxy-subject", merchant)],
                b"",
            )
            .await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "refreshed with the stored rotated token: {}",
            r.text()
        );
    }
    assert_eq!(provider.grant_requests("refresh_token"), 4);
    assert_eq!(
        provider.refresh_token_reuse(),
        0,
        "no spent refresh token was sent again"
    );
    second.shutdown().await;
}

/// A subject deleted while its token is being requested stays deleted: the
/// answer that comes back is neither stored nor served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_deleted_during_its_refresh_stays_deleted() {
    let m = market("", "").await;
    m.connect("m-1").await;
    m.provider
        .set_fault(Fault::Delay(Duration::from_millis(800)));
    let request = m.pay("m-1", Some("m-1"));
    let delete = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        m.admin_call(Method::DELETE, "/clients/pos/subjects/m-1", b"")
            .await
    };
    let (paid, deleted) = tokio::join!(request, delete);
    assert_eq!(deleted.status, StatusCode::OK, "{}", deleted.text());
    assert_eq!(
        paid.error_code(),
        Some("subject_unknown"),
        "{}",
        paid.text()
    );
    m.provider.set_fault(Fault::None);
    let r = m
        .admin_call(Method::GET, "/clients/pos/subjects/m-1", b"")
        .await;
    assert_eq!(
        r.status,
        StatusCode::NOT_FOUND,
        "the refresh under way did not bring it back"
    );
    let r = m.pay("m-1", Some("m-1")).await;
    assert_eq!(r.error_code(), Some("subject_unknown"));
    assert_eq!(
        m.api.requests(),
        0,
        "no request was sent with the deleted subject's token"
    );
}

/// Imports `account`'s refresh token as `subject` through the admin API.
async fn import_as(m: &Market, subject: &str, account: &str) -> support::Reply {
    let rt = m.provider.issue_refresh_token_for(account);
    m.admin_call(
        Method::PUT,
        &format!("/clients/pos/subjects/{subject}"),
        serde_json::json!({ "refresh_token": rt })
            .to_string()
            .as_bytes(),
    )
    .await
}

/// Reloads `m` with `max_cached = 5` (its text has `max_cached = 4`): the
/// client gets a new subjects cache while the old one's token requests
/// run on, as another replica's would.
async fn reload_cache_size(m: &mut Market) {
    let env = MapEnv::new()
        .var("CLIENT_SECRET", CLIENT_SECRET)
        .file(KEY_FILE, format!("{ADMIN_KEY}\n"));
    let text = m.text.replace("max_cached = 4", "max_cached = 5");
    let config = tokenproxy::config::from_str(&text, None, &env).expect("valid");
    m.running.reload(config).await.expect("reload");
}

/// A subject deleted and connected again (here: another account under the
/// same id) while a refresh of the deleted one is under way elsewhere (a
/// replica, or the cache a reload replaced): the answer of that refresh
/// never replaces the new record, and the subject's requests carry the new
/// account's token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_deleted_and_imported_again_during_a_refresh_keeps_the_new_tokens() {
    let mut m = market("max_cached = 4", "").await;
    m.connect("m-1").await;
    m.provider
        .set_fault(Fault::Delay(Duration::from_millis(700)));
    let first = {
        let http = m.http.clone();
        let url = format!("http://{}/merchants/m-1/payments", m.proxy);
        tokio::spawn(async move {
            http.request(Method::GET, &url, &[("x-tokenproxy-subject", "m-1")], b"")
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    reload_cache_size(&mut m).await;
    let r = m
        .admin_call(Method::DELETE, "/clients/pos/subjects/m-1", b"")
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let r = import_as(&m, "m-1", "m-9").await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let _first = first.await.expect("first request");
    m.provider.set_fault(Fault::None);
    let r = m.pay("m-9", Some("m-1")).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "subject m-1 carries the token of the account imported last: {}",
        r.text()
    );
}

/// As above, with the deleted subject's refresh waiting for a place in the
/// budget when the subject is deleted and imported again: the record it
/// then finds has the generation of the one it read, but it is another
/// record, whose tokens are the ones the subject's requests carry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_that_waited_never_spends_a_deleted_subjects_refresh_token() {
    let mut m = market("max_cached = 4\nmax_concurrent_token_requests = 1", "").await;
    m.connect("m-1").await;
    m.connect("m-2").await;
    m.provider
        .set_fault(Fault::Delay(Duration::from_millis(700)));
    let spawn_pay = |merchant: &'static str| {
        let http = m.http.clone();
        let url = format!("http://{}/merchants/{merchant}/payments", m.proxy);
        tokio::spawn(async move {
            http.request(
                Method::GET,
                &url,
                &[("x-tokenproxy-subject", merchant)],
                b"",
            )
            .await
        })
    };
    let holds_the_budget = spawn_pay("m-2");
    tokio::time::sleep(Duration::from_millis(150)).await;
    let waits = spawn_pay("m-1");
    tokio::time::sleep(Duration::from_millis(150)).await;
    reload_cache_size(&mut m).await;
    let r = m
        .admin_call(Method::DELETE, "/clients/pos/subjects/m-1", b"")
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let r = import_as(&m, "m-1", "m-9").await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let _ = holds_the_budget.await.expect("m-2 request");
    let _ = waits.await.expect("m-1 request");
    m.provider.set_fault(Fault::None);
    let r = m.pay("m-9", Some("m-1")).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "subject m-1 carries the token of the account imported last: {}",
        r.text()
    );
}

/// Reloads while requests for many subjects run: every request carries its
/// own subject's token (the API refuses any other), and none fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_never_mix_subjects() {
    let mut m = market("max_cached = 4", "").await;
    let merchants: Vec<String> = (0..8).map(|i| format!("m-{i}")).collect();
    for merchant in &merchants {
        m.connect(merchant).await;
    }
    let until = tokio::time::Instant::now() + Duration::from_millis(1500);
    let mut loops = Vec::new();
    for w in 0..6 {
        let http = m.http.clone();
        let proxy = m.proxy;
        let merchants = merchants.clone();
        loops.push(tokio::spawn(async move {
            let (mut ok, mut bad) = (0usize, Vec::new());
            let mut i = w;
            while tokio::time::Instant::now() < until {
                let merchant = &merchants[i % merchants.len()];
                i += 1;
                let url = format!("http://{proxy}/merchants/{merchant}/payments");
                let r = http
                    .request(
                        Method::GET,
                        &url,
                        &[("x-tokenproxy-subject", merchant)],
                        b"",
                    )
                    .await;
                if r.status == StatusCode::OK {
                    ok += 1;
                } else {
                    bad.push(format!("{merchant}: {} {}", r.status, r.text()));
                }
            }
            (ok, bad)
        }));
    }
    let env = MapEnv::new()
        .var("CLIENT_SECRET", CLIENT_SECRET)
        .file(KEY_FILE, format!("{ADMIN_KEY}\n"));
    for cached in [5, 3, 6] {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let text = m
            .text
            .replace("max_cached = 4", &format!("max_cached = {cached}"));
        let config = tokenproxy::config::from_str(&text, None, &env).expect("valid");
        let summary = m.running.reload(config).await.expect("reload");
        assert_eq!(summary.changed, vec!["pos".to_owned()]);
    }
    let mut total = 0;
    for l in loops {
        let (ok, bad) = l.await.expect("load loop");
        assert!(
            bad.is_empty(),
            "requests failed or carried another subject's token: {bad:?}"
        );
        total += ok;
    }
    assert!(total > 50, "load ran: {total}");
    for req in m.api.recorded() {
        let named = req.path.split('/').nth(2).expect("merchant in path");
        assert_eq!(req.token_account.as_deref(), Some(named));
    }
    assert_eq!(m.provider.refresh_token_reuse(), 0);
}

/// A reload while a subject's token request is under way: the reloaded
/// client's requests for that subject wait for the answer (the subject's
/// lease outlives the reload) instead of sending the same rotating refresh
/// token a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_during_a_subjects_refresh_never_sends_its_refresh_token_twice() {
    let mut m = market("max_cached = 4", "").await;
    m.connect("m-1").await;
    m.provider
        .set_fault(Fault::Delay(Duration::from_millis(700)));
    let first = {
        let http = m.http.clone();
        let url = format!("http://{}/merchants/m-1/payments", m.proxy);
        tokio::spawn(async move {
            http.request(Method::GET, &url, &[("x-tokenproxy-subject", "m-1")], b"")
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let env = MapEnv::new()
        .var("CLIENT_SECRET", CLIENT_SECRET)
        .file(KEY_FILE, format!("{ADMIN_KEY}\n"));
    let text = m.text.replace("max_cached = 4", "max_cached = 5");
    let config = tokenproxy::config::from_str(&text, None, &env).expect("valid");
    m.running.reload(config).await.expect("reload");
    let second = m.pay("m-1", Some("m-1")).await;
    let first = first.await.expect("first request");
    assert_eq!(first.status, StatusCode::OK, "{}", first.text());
    assert_eq!(second.status, StatusCode::OK, "{}", second.text());
    assert_eq!(
        m.provider.refresh_token_reuse(),
        0,
        "the reloaded client sent the refresh token the old one was spending"
    );
    assert_eq!(m.provider.grant_requests("refresh_token"), 1);
}

/// A subject whose sweep fails (here: its stored record was edited and no
/// longer opens) does not hold up the sweep of the others, though it comes
/// due first every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_that_cannot_be_swept_does_not_hold_up_the_others() {
    let dir = support::temp_dir("subjects-sweep-stuck");
    let state = dir.join("state.json");
    let store = format!(
        "[store]\nkind = \"file\"\npath = \"{}\"\nkey = \"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\"\n",
        state.display()
    );
    let provider = MockProvider::start(ProviderConfig {
        lifetime: Duration::from_secs(300),
        refresh_tokens: true,
        ..ProviderConfig::default()
    })
    .await
    .expect("provider");
    let api = MockApi::start(provider.validator()).await.expect("api");
    let text = PosConfig {
        upstream: &api.url(),
        token_url: &provider.token_url(),
        admin_auth: &format!("api_key_file = \"{KEY_FILE}\""),
        grant: "grant = \"refresh_token\"",
        client: "",
        subjects: "refresh_every = \"2s\"\nmax_concurrent_token_requests = 1",
        tail: &store,
    }
    .text();
    let env = MapEnv::new()
        .var("CLIENT_SECRET", CLIENT_SECRET)
        .file(KEY_FILE, format!("{ADMIN_KEY}\n"));
    let (_running, _proxy, admin) = start_sidecar_env(&text, env).await;
    let http = TestClient::new();
    let bearer = format!("Bearer {ADMIN_KEY}");
    for merchant in ["a-edited", "b", "c", "d"] {
        let rt = provider.issue_refresh_token_for(merchant);
        let r = support::import_subject(&http, admin, &bearer, merchant, &rt).await;
        assert_eq!(r.status, StatusCode::CREATED);
    }
    let db = rusqlite::Connection::open(dir.join("state.json.subjects.db")).expect("database");
    let edited = db
        .execute(
            "UPDATE subjects SET data = 's1.AAAA' || data WHERE subject = 'a-edited'",
            [],
        )
        .expect("edit");
    assert_eq!(edited, 1);
    let swept = eventually(Duration::from_secs(8), || {
        provider.grant_requests("refresh_token") >= 3
    })
    .await;
    assert!(
        swept,
        "the other three subjects are swept: {} token requests",
        provider.grant_requests("refresh_token")
    );
}

/// A provider that states expiries in epoch seconds (rotating its refresh
/// tokens), read with `rt_unit` for the refresh token's: with
/// `expires_at_unit = "epoch_millis"` every access token seems to have expired
/// in 1970.
async fn epoch_market(access_unit: &str, rt_unit: &str, subjects_extra: &str) -> Market {
    let provider = ProviderConfig {
        lifetime: Duration::from_secs(300),
        refresh_tokens: true,
        rotate_refresh_tokens: true,
        response_shape: ResponseShape::EpochExpirations,
        ..ProviderConfig::default()
    };
    let tail = format!(
        "[clients.pos.token.response]\nexpires_at = \"access_token_expiration\"\nexpires_at_unit = \"{access_unit}\"\nrefresh_token_expires_at = \"refresh_token_expiration\"\nrefresh_token_expires_at_unit = \"{rt_unit}\"\n"
    );
    market_from(provider, subjects_extra, "", &tail).await
}

/// An access token expiry already past on our clock (here a provider that
/// sends epoch seconds read as milliseconds) is clock skew, as for the
/// client's own token: the subject's token is used for the fallback lifetime,
/// not refreshed again at every request, each spending a refresh token; and
/// the rotated refresh token is the one sent next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subjects_access_expiry_in_the_past_is_skew_not_a_refresh_per_request() {
    let m = epoch_market("epoch_millis", "epoch_seconds", "").await;
    m.connect("m-1").await;
    for i in 0..5 {
        let r = m.pay("m-1", Some("m-1")).await;
        assert_eq!(r.status, StatusCode::OK, "request {i}: {}", r.text());
    }
    assert_eq!(
        m.provider.grant_requests("refresh_token"),
        1,
        "five requests for one subject cost one refresh"
    );
    // The next refresh sends the rotated refresh token, which the store kept.
    m.provider.revoke_all();
    let r = m.pay("m-1", Some("m-1")).await;
    assert_eq!(r.status, StatusCode::OK, "after a 401: {}", r.text());
    assert_eq!(m.provider.grant_requests("refresh_token"), 2);
    assert_eq!(m.provider.refresh_token_reuse(), 0);
}

/// A refresh token expiry already past on our clock is skew too: it does not
/// make the subject due at once, so the sweeper does not renew it (spending a
/// refresh token) at every round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subjects_refresh_token_expiry_in_the_past_does_not_make_it_due_every_sweep() {
    // refresh_every 8 s: the sweeper looks every 2 s.
    let m = epoch_market("epoch_seconds", "epoch_millis", "refresh_every = \"8s\"").await;
    m.connect("m-1").await;
    let r = m.pay("m-1", Some("m-1")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(m.provider.grant_requests("refresh_token"), 1);
    let r = m
        .admin_call(Method::GET, "/clients/pos/subjects/m-1", b"")
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let view: serde_json::Value = serde_json::from_str(&r.text()).expect("a JSON subject");
    let next = view["next_renewal_at"]
        .as_str()
        .unwrap_or_else(|| panic!("a renewal is planned: {view}"));
    let next = humantime::parse_rfc3339(next).expect("an RFC 3339 time");
    assert!(
        next > std::time::SystemTime::now() + Duration::from_secs(5),
        "renewed by refresh_every, not at once: {view}"
    );
    // Two sweeps later the subject was not renewed again.
    let renewed = eventually(Duration::from_secs(5), || {
        m.provider.grant_requests("refresh_token") > 1
    })
    .await;
    assert!(
        !renewed,
        "the sweeper renewed the subject again: {} refreshes",
        m.provider.grant_requests("refresh_token")
    );
}

/// A subject's access token that lives less than a second is never used: the
/// refresh backs off instead of running again at every request, and the
/// refresh token it rotated is stored and sent next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subjects_token_under_a_second_backs_off_and_keeps_the_rotated_refresh_token() {
    let m = market_with_lifetime(Duration::ZERO, "").await;
    m.connect("m-1").await;
    for i in 0..5 {
        let r = m.pay("m-1", Some("m-1")).await;
        assert_eq!(
            r.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "request {i}: {}",
            r.text()
        );
        assert_eq!(r.error_code(), Some("token_unavailable"), "request {i}");
    }
    assert_eq!(
        m.provider.grant_requests("refresh_token"),
        1,
        "the failed refresh backs off"
    );
    // After the backoff the next request's refresh sends the rotated refresh token.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while m.provider.grant_requests("refresh_token") < 2 && tokio::time::Instant::now() < deadline {
        let _unusable_again = m.pay("m-1", Some("m-1")).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let retried = m.provider.grant_requests("refresh_token") >= 2;
    assert!(retried, "the refresh is tried again after its backoff");
    assert_eq!(
        m.provider.refresh_token_reuse(),
        0,
        "the rotated refresh token was kept"
    );
}
