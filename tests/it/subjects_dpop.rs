//! DPoP with subjects: every subject's tokens are bound to a key of its own,
//! made with its first token request and sealed in its record, so that one
//! subject's token is useless with another's proof, and a restarted sidecar
//! signs each subject's requests with the key its tokens are bound to.

use crate::support;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{Method, Request, StatusCode};
use http_body_util::Full;
use support::{start_sidecar_env, temp_dir, PosConfig, TestClient, CLIENT_SECRET};
use tokenproxy::config::MapEnv;
use tokenproxy::jose::{access_token_hash, ProofClaims, ProofKey, SigningKey};
use tokenproxy::store::{Store, SubjectLoad};
use tokenproxy_mock::{MockApi, MockProvider, ProviderConfig, RecordedRequest};

const ADMIN_KEY: &str = "subjects-dpop-admin-key-51c0";
const KEY_FILE: &str = "/run/secrets/tokenproxy-admin";
const STORE_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

struct Sidecar {
    running: tokenproxy::Running,
    proxy: SocketAddr,
    admin: SocketAddr,
    /// The configuration as started, addresses filled in.
    text: String,
}

fn template(api: &MockApi, provider: &MockProvider, store: &std::path::Path) -> String {
    let tail = format!(
        "[clients.pos.dpop]\n\n[store]\nkind = \"file\"\npath = \"{}\"\nkey = \"{STORE_KEY}\"\n",
        store.display()
    );
    PosConfig {
        upstream: &api.url(),
        token_url: &provider.token_url(),
        admin_auth: &format!("api_key_file = \"{KEY_FILE}\""),
        grant: "grant = \"refresh_token\"",
        client: "",
        subjects: "",
        tail: &tail,
    }
    .text()
}

fn env() -> MapEnv {
    MapEnv::new()
        .var("CLIENT_SECRET", CLIENT_SECRET)
        .file(KEY_FILE, format!("{ADMIN_KEY}\n"))
}

async fn start(template: &str) -> Sidecar {
    let (running, proxy, admin) = start_sidecar_env(template, env()).await;
    let text = template
        .replace("{listen}", &proxy.to_string())
        .replace("{admin}", &admin.to_string());
    Sidecar {
        running,
        proxy,
        admin,
        text,
    }
}

async fn import(http: &TestClient, s: &Sidecar, provider: &MockProvider, merchant: &str) {
    let rt = provider.issue_refresh_token_for(merchant);
    let bearer = format!("Bearer {ADMIN_KEY}");
    let r = support::import_subject(http, s.admin, &bearer, merchant, &rt).await;
    assert_eq!(r.status, StatusCode::CREATED, "import: {}", r.text());
}

async fn pay(http: &TestClient, s: &Sidecar, merchant: &str) -> support::Reply {
    let url = format!("http://{}/merchants/{merchant}/payments", s.proxy);
    http.request(
        Method::GET,
        &url,
        &[("x-tokenproxy-subject", merchant)],
        b"",
    )
    .await
}

fn header<'a>(request: &'a RecordedRequest, name: &str) -> &'a str {
    request
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

/// The access token of a request the API saw (`Authorization: DPoP <token>`).
fn token_of(request: &RecordedRequest) -> String {
    let value = header(request, "authorization");
    assert!(value.starts_with("DPoP "), "the DPoP scheme: {value:?}");
    value["DPoP ".len()..].to_owned()
}

/// The last request the API saw for `merchant`.
fn last_for(api: &MockApi, merchant: &str) -> RecordedRequest {
    api.recorded()
        .into_iter()
        .rev()
        .find(|r| r.path == format!("/merchants/{merchant}/payments"))
        .expect("a request of the merchant reached the API")
}

/// The DPoP key the store holds for `subject`, read as another process would.
async fn stored_key(text: &str, subject: &str) -> ProofKey {
    let config = tokenproxy::config::from_str(text, None, &env()).expect("config");
    let store = Store::open(&config.store).expect("store opens");
    let record = match store.subjects(&config.clients[0]).get(subject).await {
        Ok(SubjectLoad::Found(r)) => *r,
        other => panic!("{subject} should be stored, got {other:?}"),
    };
    let key = record.dpop_key.expect("the record holds the subject's key");
    let signing = SigningKey::from_pkcs8_base64(&key.pkcs8, None).expect("a PKCS#8 key");
    ProofKey::new(signing).expect("an asymmetric key")
}

/// A request to the API with `token` and a proof signed by `key`, as anyone
/// holding both could send it.
async fn call_with(
    http: &TestClient,
    api: &MockApi,
    merchant: &str,
    token: &str,
    key: &ProofKey,
) -> StatusCode {
    let path = format!("/merchants/{merchant}/payments");
    let iat = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    let ath = access_token_hash(token);
    let origin = api.url();
    let proof = key
        .proof(&ProofClaims {
            htm: "GET",
            origin: &origin,
            path: &path,
            iat,
            ath: Some(&ath),
            nonce: None,
        })
        .expect("proof");
    let request = Request::get(format!("{origin}{path}"))
        .header("authorization", format!("DPoP {token}"))
        .header("dpop", proof)
        .body(Full::new(bytes::Bytes::new()))
        .expect("request builds");
    http.send(request).await.status
}

/// Two subjects: two keys, each subject's tokens bound to its own (the
/// provider records the thumbprint of the proof of each token request), each
/// subject's requests signed with it; a proof of one subject's key does not
/// carry the other's token; a restart signs with the same keys, for stored
/// and for refreshed tokens alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_subject_has_its_own_key_kept_across_restarts() {
    let provider = MockProvider::start(ProviderConfig {
        lifetime: Duration::from_secs(300),
        refresh_tokens: true,
        rotate_refresh_tokens: true,
        ..ProviderConfig::default()
    })
    .await
    .expect("provider");
    let api = MockApi::start(provider.validator()).await.expect("api");
    let path = temp_dir("subjects-dpop").join("tokens.json");
    let template = template(&api, &provider, &path);
    let http = TestClient::new();

    let first = start(&template).await;
    for merchant in ["m-1", "m-2"] {
        import(&http, &first, &provider, merchant).await;
        let r = pay(&http, &first, merchant).await;
        assert_eq!(r.status, StatusCode::OK, "{merchant}: {}", r.text());
    }
    let (one, two) = (last_for(&api, "m-1"), last_for(&api, "m-2"));
    let jkt_1 = one.dpop_jkt.clone().expect("m-1's proof passed");
    let jkt_2 = two.dpop_jkt.clone().expect("m-2's proof passed");
    assert_ne!(jkt_1, jkt_2, "each subject signs with a key of its own");
    let (token_1, token_2) = (token_of(&one), token_of(&two));
    let validator = provider.validator();
    assert_eq!(
        validator.binding(&token_1).as_deref(),
        Some(jkt_1.as_str()),
        "m-1's token is bound to m-1's key"
    );
    assert_eq!(
        validator.binding(&token_2).as_deref(),
        Some(jkt_2.as_str()),
        "m-2's token is bound to m-2's key"
    );

    // The keys as sealed in the store: each one's proof carries its own
    // subject's token, never the other's.
    let key_1 = stored_key(&first.text, "m-1").await;
    let key_2 = stored_key(&first.text, "m-2").await;
    assert_eq!(key_1.thumbprint(), jkt_1);
    assert_eq!(key_2.thumbprint(), jkt_2);
    assert_eq!(
        call_with(&http, &api, "m-1", &token_1, &key_1).await,
        StatusCode::OK
    );
    assert_eq!(
        call_with(&http, &api, "m-1", &token_1, &key_2).await,
        StatusCode::UNAUTHORIZED,
        "m-1's token with m-2's key is refused"
    );
    assert_eq!(
        call_with(&http, &api, "m-2", &token_2, &key_1).await,
        StatusCode::UNAUTHORIZED,
        "m-2's token with m-1's key is refused"
    );
    first.running.shutdown().await;

    // A restart: the stored tokens are sent with the stored keys.
    let second = start(&template).await;
    for (merchant, jkt) in [("m-1", &jkt_1), ("m-2", &jkt_2)] {
        let r = pay(&http, &second, merchant).await;
        assert_eq!(r.status, StatusCode::OK, "{merchant}: {}", r.text());
        assert_eq!(
            last_for(&api, merchant).dpop_jkt.as_ref(),
            Some(jkt),
            "{merchant} signs with its key after a restart"
        );
    }
    // Tokens refreshed after the restart are bound to the same keys.
    let token_requests = provider.grant_requests("refresh_token");
    provider.revoke_all();
    for (merchant, jkt) in [("m-1", &jkt_1), ("m-2", &jkt_2)] {
        let r = pay(&http, &second, merchant).await;
        assert_eq!(r.status, StatusCode::OK, "{merchant}: {}", r.text());
        let last = last_for(&api, merchant);
        assert_eq!(last.dpop_jkt.as_ref(), Some(jkt), "{merchant}'s key again");
        assert_eq!(
            validator.binding(&token_of(&last)).as_ref(),
            Some(jkt),
            "{merchant}'s refreshed token is bound to its key"
        );
    }
    assert_eq!(
        provider.grant_requests("refresh_token"),
        token_requests + 2,
        "one refresh per subject"
    );
    second.running.shutdown().await;
}

/// Deleting a subject deletes its key: connected again, it gets a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_subject_s_key_goes_with_it() {
    let provider = MockProvider::start(ProviderConfig {
        refresh_tokens: true,
        ..ProviderConfig::default()
    })
    .await
    .expect("provider");
    let api = MockApi::start(provider.validator()).await.expect("api");
    let path = temp_dir("subjects-dpop-delete").join("tokens.json");
    let s = start(&template(&api, &provider, &path)).await;
    let http = TestClient::new();
    import(&http, &s, &provider, "m-1").await;
    assert_eq!(pay(&http, &s, "m-1").await.status, StatusCode::OK);
    let before = last_for(&api, "m-1").dpop_jkt.expect("passed");
    let bearer = format!("Bearer {ADMIN_KEY}");
    let r = http
        .request(
            Method::DELETE,
            &format!("http://{}/clients/pos/subjects/m-1", s.admin),
            &[("authorization", bearer.as_str())],
            b"",
        )
        .await;
    assert!(r.status.is_success(), "delete: {}", r.text());
    import(&http, &s, &provider, "m-1").await;
    assert_eq!(pay(&http, &s, "m-1").await.status, StatusCode::OK);
    let after = last_for(&api, "m-1").dpop_jkt.expect("passed");
    assert_ne!(before, after, "a new key for the subject connected anew");
    s.running.shutdown().await;
}

/// A subject stored before `[dpop]` was configured has tokens bound to no
/// key: its first request refreshes them, once however many requests ask at
/// once, with a key made then and stored with the new tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_stored_without_a_key_gets_one_with_its_first_refresh() {
    let provider = MockProvider::start(ProviderConfig {
        lifetime: Duration::from_secs(300),
        refresh_tokens: true,
        rotate_refresh_tokens: true,
        ..ProviderConfig::default()
    })
    .await
    .expect("provider");
    let api = MockApi::start(provider.validator()).await.expect("api");
    let path = temp_dir("subjects-dpop-later").join("tokens.json");
    let with_dpop = template(&api, &provider, &path);
    let without = with_dpop.replace("[clients.pos.dpop]\n", "");
    let http = TestClient::new();

    let before = start(&without).await;
    import(&http, &before, &provider, "m-1").await;
    let r = pay(&http, &before, "m-1").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(last_for(&api, "m-1").dpop_jkt.is_none(), "a Bearer token");
    before.running.shutdown().await;

    let after = start(&with_dpop).await;
    let refreshes = provider.grant_requests("refresh_token");
    let replies =
        crate::subjects::futures_join_all((0..8).map(|_| pay(&http, &after, "m-1")).collect())
            .await;
    for r in &replies {
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    assert_eq!(
        provider.grant_requests("refresh_token"),
        refreshes + 1,
        "one refresh for the eight requests"
    );
    let seen = api.recorded();
    let jkts: std::collections::BTreeSet<_> = seen
        .iter()
        .rev()
        .take(8)
        .map(|r| r.dpop_jkt.clone().expect("every proof passed"))
        .collect();
    assert_eq!(jkts.len(), 1, "one key: {jkts:?}");
    let stored = stored_key(&after.text, "m-1").await;
    assert_eq!(
        jkts.first().map(String::as_str),
        Some(stored.thumbprint()),
        "the stored key is the one the tokens are bound to"
    );
    after.running.shutdown().await;
}

/// A provider that answers a subject's DPoP-signed refresh with a Bearer
/// token did not bind it: it is never sent, but the rotated refresh token
/// it came with is kept, so the subject recovers once the provider binds
/// tokens again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unbound_token_of_a_subject_is_never_sent_and_its_refresh_token_is_kept() {
    let provider = MockProvider::start(ProviderConfig {
        lifetime: Duration::from_secs(300),
        refresh_tokens: true,
        rotate_refresh_tokens: true,
        ..ProviderConfig::default()
    })
    .await
    .expect("provider");
    let api = MockApi::start(provider.validator()).await.expect("api");
    let path = temp_dir("subjects-dpop-unbound").join("tokens.json");
    let s = start(&template(&api, &provider, &path)).await;
    let http = TestClient::new();
    import(&http, &s, &provider, "m-1").await;
    provider.ignore_dpop(true);
    let r = pay(&http, &s, "m-1").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    assert!(r.text().contains("not DPoP"), "the reason: {}", r.text());
    assert_eq!(api.requests(), 0, "the unbound token was not sent");
    provider.ignore_dpop(false);
    let mut recovered = false;
    for _ in 0..50 {
        if pay(&http, &s, "m-1").await.status == StatusCode::OK {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(recovered, "the subject recovers after its backoff");
    assert_eq!(
        provider.refresh_token_reuse(),
        0,
        "the rotated refresh token was kept and used"
    );
    assert!(last_for(&api, "m-1").dpop_jkt.is_some());
    s.running.shutdown().await;
}
