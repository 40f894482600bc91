//! Admin writes (`POST /clients/NAME/refresh-token`): they need the admin key
//! (every container of a pod shares loopback), only `grant = "refresh_token"`
//! clients take a refresh token from an operator, and a new refresh token
//! replaces the previous one only once the provider has accepted it.

use crate::support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::{Method, StatusCode};
use support::{eventually, start_sidecar_env, TestClient, CLIENT_SECRET};
use tokenproxy::config::MapEnv;
use tokenproxy::Running;
use tokenproxy_mock::{MockApi, MockProvider, ProviderConfig};

const ADMIN_KEY: &str = "admin-key-3f9c2a7d51e84b06";
const KEY_FILE: &str = "/run/secrets/tokenproxy-admin";
const STORE_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

struct Setup {
    provider: MockProvider,
    api: MockApi,
    http: TestClient,
}

struct Sidecar {
    running: Running,
    wallet: String,
    admin: SocketAddr,
}

impl Setup {
    async fn new() -> Setup {
        let provider = MockProvider::start(ProviderConfig {
            lifetime: Duration::from_secs(60),
            refresh_tokens: true,
            rotate_refresh_tokens: true,
            ..ProviderConfig::default()
        })
        .await
        .expect("provider");
        let api = MockApi::start(provider.validator()).await.expect("api");
        Setup {
            provider,
            api,
            http: TestClient::new(),
        }
    }

    /// A sidecar with `wallet` (grant = "refresh_token", bootstrap `refresh_token`)
    /// and `payments` (client_credentials); `admin` and `top` are extra config lines.
    async fn start(&self, admin: &str, top: &str, refresh_token: &str) -> Sidecar {
        let text = format!(
            r#"
{top}
[admin]
listen = "{{admin}}"
{admin}

[clients.wallet]
listen = "{{listen}}"
upstream = "{upstream}"

[clients.wallet.token]
url = "{token_url}"
grant = "refresh_token"
client_id = "demo-client"
client_secret = "${{CLIENT_SECRET}}"
refresh_token = "{refresh_token}"

[clients.payments]
listen = "{{listen2}}"
upstream = "{upstream}"

[clients.payments.token]
url = "{token_url}"
client_id = "demo-client"
client_secret = "${{CLIENT_SECRET}}"
"#,
            upstream = self.api.url(),
            token_url = self.provider.token_url(),
        );
        let env = MapEnv::new()
            .var("CLIENT_SECRET", CLIENT_SECRET)
            .file(KEY_FILE, format!("{ADMIN_KEY}\n"));
        let (running, proxy, admin) = start_sidecar_env(&text, env).await;
        let ready = eventually(Duration::from_secs(5), || {
            ["wallet", "payments"]
                .iter()
                .all(|c| running.token(c).is_some_and(|t| t.is_ready()))
        })
        .await;
        assert!(ready, "both clients obtain a token at start");
        Sidecar {
            running,
            wallet: format!("http://{proxy}/api/v1/payments"),
            admin,
        }
    }

    async fn post_refresh_token(
        &self,
        sidecar: &Sidecar,
        client: &str,
        authorization: Option<&str>,
        token: &str,
    ) -> support::Reply {
        let url = format!("http://{}/clients/{client}/refresh-token", sidecar.admin);
        let mut headers = vec![("content-type", "text/plain")];
        if let Some(a) = authorization {
            headers.push(("authorization", a));
        }
        self.http
            .request(Method::POST, &url, &headers, token.as_bytes())
            .await
    }
}

fn bearer() -> String {
    format!("Bearer {ADMIN_KEY}")
}

fn key_file_line() -> String {
    format!("api_key_file = \"{KEY_FILE}\"")
}

/// Security review finding 7: without a configured admin key, nobody (not even
/// a loopback peer) may replace a client's refresh token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_writes_are_refused_when_no_admin_key_is_configured() {
    let s = Setup::new().await;
    let sidecar = s.start("", "", &s.provider.issue_refresh_token()).await;
    let attacker_rt = s.provider.issue_refresh_token();
    let r = s
        .post_refresh_token(&sidecar, "wallet", None, &attacker_rt)
        .await;
    assert_eq!(
        r.status,
        StatusCode::FORBIDDEN,
        "an admin write without a configured key is refused: {}",
        r.text()
    );
    assert_eq!(r.json()["error"], "forbidden");
    assert!(
        r.text().contains("admin.api_key_file"),
        "the refusal names the key to set: {}",
        r.text()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        s.provider.grant_requests("refresh_token"),
        1,
        "the offered refresh token was never used"
    );
}

/// Security review finding 7: with `admin.api_key_file`, a write needs
/// `Authorization: Bearer <key>`; a missing or wrong key gets 401 without the
/// key echoed, and the right key is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_writes_need_the_admin_key() {
    let s = Setup::new().await;
    let sidecar = s
        .start(&key_file_line(), "", &s.provider.issue_refresh_token())
        .await;
    let new_rt = s.provider.issue_refresh_token();
    let wrong = "Bearer admin-key-guessed-0000000";
    for authorization in [None, Some(wrong), Some("Basic YWRtaW46YWRtaW4=")] {
        let r = s
            .post_refresh_token(&sidecar, "wallet", authorization, &new_rt)
            .await;
        assert_eq!(
            r.status,
            StatusCode::UNAUTHORIZED,
            "{authorization:?} is refused: {}",
            r.text()
        );
        assert_eq!(r.json()["error"], "unauthorized");
        assert_eq!(r.error_code(), Some("unauthorized"));
        assert!(
            !r.text().contains("guessed") && !r.text().contains(&new_rt),
            "the refusal echoes nothing it was sent: {}",
            r.text()
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        s.provider.grant_requests("refresh_token"),
        1,
        "no refused refresh token was used"
    );

    let r = s
        .post_refresh_token(&sidecar, "wallet", Some(&bearer()), &new_rt)
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    let used = eventually(Duration::from_secs(5), || {
        s.provider.grant_requests("refresh_token") == 2
            && sidecar
                .running
                .token("wallet")
                .is_some_and(|t| t.status().generation == 2)
    })
    .await;
    assert!(
        used,
        "the accepted refresh token produced a new access token"
    );
    assert_eq!(s.http.get(&sidecar.wallet).await.status, StatusCode::OK);
}

/// Security review finding 7: a client whose grant does not use a refresh token
/// (here client_credentials) refuses one from an operator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_token_is_refused_for_a_client_whose_grant_does_not_use_one() {
    let s = Setup::new().await;
    let sidecar = s
        .start(&key_file_line(), "", &s.provider.issue_refresh_token())
        .await;
    let r = s
        .post_refresh_token(
            &sidecar,
            "payments",
            Some(&bearer()),
            &s.provider.issue_refresh_token(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.text());
    assert_eq!(r.json()["error"], "grant_mismatch");
    assert!(
        r.text().contains("client_credentials"),
        "the refusal says why: {}",
        r.text()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        s.provider.grant_requests("refresh_token"),
        1,
        "only the wallet's own start-up refresh ran"
    );
}

/// Security review finding 7: a refresh token the provider rejects does not
/// replace the previous one, in memory or in the store: the client keeps
/// serving, refreshes with the previous chain, and a restart still has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_operator_refresh_token_keeps_the_previous_one() {
    let s = Setup::new().await;
    let dir = std::env::temp_dir().join(format!(
        "tokenproxy-admin-writes-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path: PathBuf = dir.join("tokens.json");
    let store = format!(
        "[store]\nkind = \"file\"\npath = \"{}\"\nkey = \"{STORE_KEY}\"",
        path.display()
    );
    let bootstrap = s.provider.issue_refresh_token();
    let sidecar = s.start(&key_file_line(), &store, &bootstrap).await;
    let r = s
        .post_refresh_token(
            &sidecar,
            "wallet",
            Some(&bearer()),
            "rt-that-the-provider-never-issued",
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    let tried = eventually(Duration::from_secs(5), || {
        s.provider.grant_requests("refresh_token") == 2
    })
    .await;
    assert!(tried, "the new refresh token was tried");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let status = sidecar.running.token("wallet").expect("wallet").status();
    assert_eq!(
        status.state().as_str(),
        "valid",
        "the client keeps its valid token: {status:?}"
    );
    assert!(
        status.has_refresh_token,
        "the previous refresh token is held again"
    );

    // The access token dies: the previous refresh token gets a new one.
    s.provider.revoke_all();
    assert_eq!(
        s.http.get(&sidecar.wallet).await.status,
        StatusCode::OK,
        "the previous refresh chain still works"
    );
    assert_eq!(s.provider.refresh_token_reuse(), 0);

    // A restart from the store (whose configured bootstrap token was spent long
    // ago) still finds a working refresh token there, not the rejected one.
    drop(sidecar);
    s.provider.revoke_all();
    let again = s.start(&key_file_line(), &store, &bootstrap).await;
    assert_eq!(s.http.get(&again.wallet).await.status, StatusCode::OK);
    assert_eq!(s.provider.refresh_token_reuse(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Security review (low): an admin listener on `[::]` sees a loopback peer
/// that connected to 127.0.0.1 as `::ffff:127.0.0.1`; that is loopback too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_listener_on_all_ipv6_addresses_knows_ipv4_loopback_peers() {
    let s = Setup::new().await;
    let Ok(admin) = tokio::net::TcpListener::bind("[::]:0").await else {
        eprintln!("skipped: no IPv6 on this host");
        return;
    };
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind proxy");
    let proxy_addr = proxy.local_addr().expect("addr");
    let admin_port = admin.local_addr().expect("addr").port();
    let text = format!(
        "[admin]\nlisten = \"[::]:{admin_port}\"\n{}\n\
         [clients.wallet]\nlisten = \"{proxy_addr}\"\nupstream = \"{}\"\n\
         [clients.wallet.token]\nurl = \"{}\"\ngrant = \"refresh_token\"\nclient_id = \"demo-client\"\n\
         client_secret = \"{CLIENT_SECRET}\"\nrefresh_token = \"{}\"\n",
        key_file_line(),
        s.api.url(),
        s.provider.token_url(),
        s.provider.issue_refresh_token(),
    );
    let env = MapEnv::new().file(KEY_FILE, ADMIN_KEY);
    let config = tokenproxy::config::from_str(&text, None, &env).expect("valid config");
    let listeners = tokenproxy::Listeners {
        admin,
        proxies: [(proxy_addr, proxy)].into_iter().collect(),
        connect: None,
    };
    let running = tokenproxy::start(
        config,
        listeners,
        std::sync::Arc::new(tokenproxy::clock::SystemClock),
    )
    .expect("starts");
    let sidecar = Sidecar {
        running,
        wallet: format!("http://{proxy_addr}/api/v1/payments"),
        admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
    };
    let r = s
        .post_refresh_token(
            &sidecar,
            "wallet",
            Some(&bearer()),
            &s.provider.issue_refresh_token(),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::ACCEPTED,
        "a peer on 127.0.0.1 is loopback on a [::] listener: {}",
        r.text()
    );
}
