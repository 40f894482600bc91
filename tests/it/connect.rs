//! Connect sessions: a merchant connects their account through a one-time
//! link, without a CLI.
//!
//! The tests act as browsers with plain HTTP requests (a cookie jar of one
//! cookie): open the link, follow the redirect to the mock provider's sign-in
//! page, submit its form as a user, and follow the redirect back to
//! `/callback`. The mock provider's tokens belong to the user who signed in,
//! and the mock API refuses `/merchants/ID/...` with another account's token:
//! a request for a subject carries that subject's token or fails.

use crate::support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::{Method, StatusCode};
use support::{
    hidden_inputs, metric, start_sidecar_env, PosConfig, Reply, TestClient, CLIENT_SECRET,
};
use tokenproxy::config::MapEnv;
use tokenproxy::Running;
use tokenproxy_mock::{MockApi, MockProvider, ProviderConfig};

const ADMIN_KEY: &str = "connect-admin-key-51b0e7";
/// The merchants the mock provider knows, with their passwords.
const USERS: [(&str, &str); 2] = [("m-1", "m-1-password"), ("m-2", "m-2-password")];

struct Market {
    provider: MockProvider,
    api: MockApi,
    http: TestClient,
    running: Running,
    proxy: SocketAddr,
    admin: SocketAddr,
    connect: SocketAddr,
    /// The allowed return_to prefix (a page of the mock API, so a real browser lands somewhere).
    return_to: String,
    /// The config as the sidecar runs it, and the admin key file, for the CLI.
    config_text: String,
    key_file: PathBuf,
}

async fn market(session_ttl: &str) -> Market {
    market_with(session_ttl, "").await
}

/// A market whose configuration ends with `extra` (more tables of the client).
async fn market_with(session_ttl: &str, extra: &str) -> Market {
    let provider = MockProvider::start(ProviderConfig {
        lifetime: Duration::from_secs(300),
        refresh_tokens: true,
        rotate_refresh_tokens: true,
        users: USERS
            .iter()
            .map(|(u, p)| ((*u).to_owned(), (*p).to_owned()))
            .collect(),
        ..ProviderConfig::default()
    })
    .await
    .expect("provider");
    let api = MockApi::start(provider.validator()).await.expect("api");
    let dir = support::temp_dir("connect");
    let key_file = dir.join("admin-key");
    support::write_secret(&key_file, format!("{ADMIN_KEY}\n"));
    let return_to = format!("{}/connected/", api.url());
    let tail = format!(
        r#"
[clients.pos.authorize]
url = "{authorize_url}"
scope = "payments"
params = {{ prompt = "consent" }}

[connect]
listen = "{{connect}}"
public_url = "http://{{connect}}"
return_to = ["{return_to}", "http://localhost:1/other/"]
session_ttl = "{session_ttl}"

{extra}
"#,
        authorize_url = provider.authorize_url(),
    );
    let template = PosConfig {
        upstream: &api.url(),
        token_url: &provider.token_url(),
        admin_auth: &format!("api_key_file = \"{}\"", key_file.display()),
        grant: "grant = \"refresh_token\"",
        client: "",
        subjects: "",
        tail: &tail,
    }
    .text();
    let env = MapEnv::new().var("CLIENT_SECRET", CLIENT_SECRET).file(
        key_file.to_str().expect("utf-8 path"),
        format!("{ADMIN_KEY}\n"),
    );
    let (running, proxy, admin) = start_sidecar_env(&template, env).await;
    let connect = running.connect_addr().expect("the connect listener runs");
    let config_text = template
        .replace("{admin}", &admin.to_string())
        .replace("{listen}", &proxy.to_string())
        .replace("{connect}", &connect.to_string())
        .replace("${CLIENT_SECRET}", CLIENT_SECRET);
    Market {
        provider,
        api,
        http: TestClient::new(),
        running,
        proxy,
        admin,
        connect,
        return_to,
        config_text,
        key_file,
    }
}

impl Market {
    async fn admin_call(&self, method: Method, path: &str, body: &str) -> Reply {
        let bearer = format!("Bearer {ADMIN_KEY}");
        self.http
            .request(
                method,
                &format!("http://{}{path}", self.admin),
                &[
                    ("authorization", bearer.as_str()),
                    ("content-type", "application/json"),
                ],
                body.as_bytes(),
            )
            .await
    }

    /// A connect link for `subject` (201 expected).
    async fn link(&self, subject: &str, return_to: Option<&str>) -> String {
        let body = return_to
            .map(|r| serde_json::json!({ "return_to": r }).to_string())
            .unwrap_or_default();
        let r = self
            .admin_call(
                Method::POST,
                &format!("/clients/pos/subjects/{subject}/connect"),
                &body,
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "connect link: {}", r.text());
        r.json()["url"].as_str().expect("url").to_owned()
    }

    /// The admin API's view of `subject`: its status code (404 when unknown).
    async fn subject_status(&self, subject: &str) -> StatusCode {
        self.admin_call(Method::GET, &format!("/clients/pos/subjects/{subject}"), "")
            .await
            .status
    }

    async fn pay(&self, merchant: &str, subject: &str) -> Reply {
        let url = format!("http://{}/merchants/{merchant}/payments", self.proxy);
        self.http
            .request(Method::GET, &url, &[("x-tokenproxy-subject", subject)], b"")
            .await
    }

    async fn connects(&self, outcome: &str) -> f64 {
        let text = self
            .http
            .get(&format!("http://{}/metrics", self.admin))
            .await
            .text();
        metric(
            &text,
            "tokenproxy_connects_total",
            &[("client", "pos"), ("outcome", outcome)],
        )
        .unwrap_or(0.0)
    }
}

/// A browser: one HTTP client and the connect cookie it was given.
struct Browser {
    http: TestClient,
    cookie: Option<String>,
}

impl Browser {
    fn new() -> Browser {
        Browser {
            http: TestClient::new(),
            cookie: None,
        }
    }

    /// GET `url` with the cookie; keeps a cookie it is given.
    async fn get(&mut self, url: &str) -> Reply {
        let headers: Vec<(&str, &str)> = self
            .cookie
            .as_deref()
            .map(|c| vec![("cookie", c)])
            .unwrap_or_default();
        let r = self.http.request(Method::GET, url, &headers, b"").await;
        if let Some(set) = r.headers.get("set-cookie") {
            let set = set.to_str().expect("cookie text");
            self.cookie = Some(set.split(';').next().expect("name=value").to_owned());
        }
        r
    }

    /// Opens a connect link: the 302 to the provider's sign-in page.
    async fn open(&mut self, link: &str) -> String {
        let r = self.get(link).await;
        assert_eq!(
            r.status,
            StatusCode::FOUND,
            "opening the link: {}",
            r.text()
        );
        location(&r)
    }

    /// Signs in at the provider's page `url` as `user` and presses `decision`;
    /// returns where the provider sends the browser (the callback).
    async fn sign_in(&mut self, url: &str, user: &str, decision: &str) -> String {
        let page = self.get(url).await;
        assert_eq!(page.status, StatusCode::OK, "sign-in page: {}", page.text());
        let password = USERS
            .iter()
            .find(|(u, _)| *u == user)
            .map_or("wrong", |(_, p)| p);
        let mut form = form_urlencoded::Serializer::new(String::new());
        for (k, v) in hidden_inputs(&page.text()) {
            form.append_pair(&k, &v);
        }
        form.append_pair("username", user);
        form.append_pair("password", password);
        form.append_pair("decision", decision);
        let action = url.split('?').next().expect("url");
        let r = self
            .http
            .request(
                Method::POST,
                action,
                &[("content-type", "application/x-www-form-urlencoded")],
                form.finish().as_bytes(),
            )
            .await;
        assert_eq!(r.status, StatusCode::FOUND, "sign-in: {}", r.text());
        location(&r)
    }
}

/// Runs a child process off the runtime's threads (the sidecar keeps serving it).
async fn run(mut cmd: std::process::Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("join")
        .expect("the command runs")
}

fn location(r: &Reply) -> String {
    r.headers
        .get("location")
        .expect("a Location")
        .to_str()
        .expect("text")
        .to_owned()
}

fn query_param(url: &str, name: &str) -> Option<String> {
    let query = url.split_once('?')?.1;
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn assert_security_headers(r: &Reply, what: &str) {
    for (name, value) in [
        ("cache-control", "no-store"),
        ("referrer-policy", "no-referrer"),
        ("x-frame-options", "DENY"),
        ("content-security-policy", "default-src 'none'"),
    ] {
        assert_eq!(
            r.headers.get(name).and_then(|v| v.to_str().ok()),
            Some(value),
            "{what} must carry {name}: {value}"
        );
    }
}

/// The whole flow: the admin API makes a link, the merchant opens it, signs
/// in and approves; the subject is stored and requests naming it carry its
/// token; the browser ends on return_to with the outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_link_onboards_its_subject_and_requests_for_it_carry_its_token() {
    let m = market("15m").await;
    let return_to = format!("{}done?tab=merchants", m.return_to);
    let r = m
        .admin_call(
            Method::POST,
            "/clients/pos/subjects/m-1/connect",
            &serde_json::json!({ "return_to": return_to }).to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let body = r.json();
    let link = body["url"].as_str().expect("url").to_owned();
    let prefix = format!("http://{}/connect/pos.", m.connect);
    assert!(link.starts_with(&prefix), "link {link} is under public_url");
    let expires_at = body["expires_at"].as_str().expect("expires_at");
    let expires = humantime::parse_rfc3339(expires_at).expect("RFC 3339 expiry");
    let left = expires
        .duration_since(std::time::SystemTime::now())
        .expect("expires in the future");
    assert!(
        left > Duration::from_secs(14 * 60) && left <= Duration::from_secs(15 * 60),
        "the link lives session_ttl: {left:?}"
    );
    assert_eq!(m.subject_status("m-1").await, StatusCode::NOT_FOUND);

    let mut browser = Browser::new();
    let opened = browser.get(&link).await;
    assert_eq!(opened.status, StatusCode::FOUND, "{}", opened.text());
    assert_security_headers(&opened, "the redirect to the provider");
    let set_cookie = opened.headers["set-cookie"].to_str().expect("cookie");
    assert!(
        set_cookie.starts_with("tokenproxy_connect=")
            && set_cookie.contains("HttpOnly")
            && set_cookie.contains("SameSite=Lax"),
        "the browser is bound by an HttpOnly, SameSite=Lax cookie: {set_cookie}"
    );
    let authorize = location(&opened);
    assert!(
        authorize.starts_with(&m.provider.authorize_url()),
        "{authorize}"
    );
    for (name, value) in [
        ("response_type", "code"),
        ("client_id", "demo-client"),
        ("scope", "payments"),
        ("code_challenge_method", "S256"),
        ("prompt", "consent"),
    ] {
        assert_eq!(
            query_param(&authorize, name).as_deref(),
            Some(value),
            "{name} in {authorize}"
        );
    }
    assert_eq!(
        query_param(&authorize, "redirect_uri"),
        Some(format!("http://{}/callback", m.connect)),
        "redirect_uri is public_url + /callback"
    );
    assert!(query_param(&authorize, "code_challenge").is_some());

    let callback = browser.sign_in(&authorize, "m-1", "approve").await;
    assert!(
        callback.starts_with(&format!("http://{}/callback?", m.connect)),
        "{callback}"
    );
    let back = browser.get(&callback).await;
    assert_eq!(back.status, StatusCode::FOUND, "{}", back.text());
    assert_security_headers(&back, "the redirect to return_to");
    assert_eq!(
        location(&back),
        format!("{return_to}&subject=m-1&status=connected"),
        "the browser ends on return_to with the subject and the outcome"
    );
    assert_eq!(m.provider.grant_requests("authorization_code"), 1);
    assert_eq!(m.subject_status("m-1").await, StatusCode::OK);

    // The stored access token is used: no token request of its own.
    let r = m.pay("m-1", "m-1").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let recorded = m.api.recorded();
    let last = recorded.last().expect("the API saw the request");
    assert_eq!(
        last.token_account.as_deref(),
        Some("m-1"),
        "a request for m-1 carries the token m-1 signed in for"
    );
    assert_eq!(m.provider.token_requests(), 1, "only the code exchange");
    // And the other merchant's path refuses it: the token is m-1's only.
    let r = m.pay("m-2", "m-1").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);

    assert_eq!(m.connects("created").await, 1.0);
    assert_eq!(m.connects("opened").await, 1.0);
    assert_eq!(m.connects("connected").await, 1.0);
    assert_eq!(m.connects("error").await, 0.0);
    m.running.shutdown().await;
}

/// Opening a link uses it: a second open, in the same or another browser,
/// gets 410 and binds nothing (a HEAD does not use it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_works_once() {
    let m = market("15m").await;
    let link = m.link("m-1", None).await;
    // A link checker's HEAD does not use the link up.
    let head = m.http.request(Method::HEAD, &link, &[], b"").await;
    assert_eq!(head.status, StatusCode::OK);
    assert_security_headers(&head, "a HEAD of a link");
    let mut first = Browser::new();
    let authorize = first.open(&link).await;
    let mut other = Browser::new();
    for (who, browser) in [
        ("the same browser", &mut first),
        ("another browser", &mut other),
    ] {
        let again = browser.get(&link).await;
        assert_eq!(again.status, StatusCode::GONE, "{who}: {}", again.text());
        assert!(
            again.text().contains("already used or has expired"),
            "{who}: {}",
            again.text()
        );
        assert_security_headers(&again, "the used-link page");
        assert!(again.headers.get("set-cookie").is_none(), "{who}");
    }
    // A made-up link is no better.
    let (base, _) = link.rsplit_once('.').expect("id");
    let forged = format!("{base}.{}", "A".repeat(43));
    assert_eq!(Browser::new().get(&forged).await.status, StatusCode::GONE);
    assert_eq!(m.connects("opened").await, 1.0, "one open only");
    // The first open's sign-in is the only one, and it completes.
    let callback = first.sign_in(&authorize, "m-1", "approve").await;
    let back = first.get(&callback).await;
    assert_eq!(back.status, StatusCode::FOUND, "{}", back.text());
    assert_eq!(m.subject_status("m-1").await, StatusCode::OK);
    assert_eq!(m.provider.grant_requests("authorization_code"), 1);
}

/// A link opened after `session_ttl`, and a sign-in called back after it,
/// bind nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_links_and_sign_ins_bind_nothing() {
    let m = market("300ms").await;
    let late_link = m.link("m-1", None).await;
    let early_link = m.link("m-2", None).await;
    let mut browser = Browser::new();
    let authorize = browser.open(&early_link).await;
    let callback = browser.sign_in(&authorize, "m-2", "approve").await;
    // The store's expiry is wall-clock time, which paused tokio time does not move.
    tokio::time::sleep(Duration::from_millis(400)).await;

    let late = Browser::new().get(&late_link).await;
    assert_eq!(late.status, StatusCode::GONE, "{}", late.text());
    let back = browser.get(&callback).await;
    assert_eq!(back.status, StatusCode::BAD_REQUEST, "{}", back.text());
    assert!(
        back.text().contains("nothing was connected"),
        "{}",
        back.text()
    );
    assert_eq!(m.subject_status("m-1").await, StatusCode::NOT_FOUND);
    assert_eq!(m.subject_status("m-2").await, StatusCode::NOT_FOUND);
    assert_eq!(m.provider.grant_requests("authorization_code"), 0);
}

/// Callbacks that are not the one the browser's own session expects bind
/// nothing: an unknown state, the right state without the browser's cookie,
/// and another session's state in a victim's browser (login CSRF: the
/// attacker's sign-in must not complete in the victim's browser).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_callbacks_bind_nothing() {
    let m = market("15m").await;
    let callback = format!("http://{}/callback", m.connect);

    // No state, a malformed one, and a well-formed one nobody issued.
    let mut stranger = Browser::new();
    for query in [
        "?code=attacker-code".to_owned(),
        "?code=attacker-code&state=forged".to_owned(),
        format!("?code=attacker-code&state=pos.{}", "B".repeat(43)),
        format!("?error=access_denied&state=pos.{}", "C".repeat(43)),
    ] {
        let r = stranger.get(&format!("{callback}{query}")).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{query}: {}", r.text());
        assert_security_headers(&r, "a refused callback");
    }

    // The right state without the cookie of the browser that opened the link.
    let link = m.link("m-1", None).await;
    let mut owner = Browser::new();
    let authorize = owner.open(&link).await;
    let code_url = owner.sign_in(&authorize, "m-1", "approve").await;
    let r = Browser::new().get(&code_url).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "no cookie: {}", r.text());
    // The sign-in is spent: its owner cannot complete it afterwards either.
    let r = owner.get(&code_url).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());

    // An attacker opens a link of their own subject and sends its sign-in to
    // a victim, who is in the middle of connecting their own subject.
    let victim_link = m.link("m-2", None).await;
    let mut victim = Browser::new();
    let _victim_authorize = victim.open(&victim_link).await;
    let attacker_link = m.link("m-1", None).await;
    let mut attacker = Browser::new();
    let attacker_authorize = attacker.open(&attacker_link).await;
    // The victim signs in on the attacker's sign-in page (its state).
    let code_url = victim.sign_in(&attacker_authorize, "m-2", "approve").await;
    let r = victim.get(&code_url).await;
    assert_eq!(
        r.status,
        StatusCode::BAD_REQUEST,
        "another session's state: {}",
        r.text()
    );
    assert!(r.text().contains("another browser"), "{}", r.text());

    assert_eq!(m.subject_status("m-1").await, StatusCode::NOT_FOUND);
    assert_eq!(m.subject_status("m-2").await, StatusCode::NOT_FOUND);
    assert_eq!(
        m.provider.grant_requests("authorization_code"),
        0,
        "no code of a forged callback was exchanged"
    );
    assert_eq!(m.connects("connected").await, 0.0);
    assert_eq!(m.connects("error").await, 2.0, "the two refused sessions");
}

/// The provider's refusal ends on return_to with status=error and its code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_sign_in_ends_on_return_to_with_the_error() {
    let m = market("15m").await;
    let link = m.link("m-1", Some("http://localhost:1/other/page")).await;
    let mut browser = Browser::new();
    let authorize = browser.open(&link).await;
    let code_url = browser.sign_in(&authorize, "m-1", "deny").await;
    let back = browser.get(&code_url).await;
    assert_eq!(back.status, StatusCode::FOUND, "{}", back.text());
    assert_eq!(
        location(&back),
        "http://localhost:1/other/page?subject=m-1&status=error&error=access_denied"
    );
    assert_eq!(m.subject_status("m-1").await, StatusCode::NOT_FOUND);
    assert_eq!(m.connects("error").await, 1.0);
}

/// Links are made only with the admin key, for a return_to in the
/// allow-list, for a valid subject of a connectable client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_need_the_key_an_allowed_return_to_and_a_valid_subject() {
    let m = market("15m").await;
    let path = "/clients/pos/subjects/m-1/connect";
    for return_to in [
        "https://evil.example/",
        "http://localhost:1/otherwise",
        &format!("{}#fragment", m.return_to),
        &m.return_to.replace("/connected/", "/connected"),
    ] {
        let r = m
            .admin_call(
                Method::POST,
                path,
                &serde_json::json!({ "return_to": return_to }).to_string(),
            )
            .await;
        assert_eq!(
            r.status,
            StatusCode::BAD_REQUEST,
            "{return_to}: {}",
            r.text()
        );
    }
    let r = m.admin_call(Method::POST, path, "{\"return\": 1}").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    let r = m
        .admin_call(Method::POST, "/clients/pos/subjects/bad%20id/connect", "")
        .await;
    assert_eq!(r.error_code(), Some("bad_subject"));
    let r = m.admin_call(Method::GET, path, "").await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    let r = m
        .http
        .request(Method::POST, &format!("http://{}{path}", m.admin), &[], b"")
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    assert_eq!(m.connects("created").await, 0.0, "nothing was created");
    // Without a body the first allowed prefix is the return_to.
    let link = m.link("m-1", None).await;
    let mut browser = Browser::new();
    let authorize = browser.open(&link).await;
    let code_url = browser.sign_in(&authorize, "m-1", "approve").await;
    let back = browser.get(&code_url).await;
    assert_eq!(
        location(&back),
        format!("{}?subject=m-1&status=connected", m.return_to)
    );
}

/// `tokenproxy subjects connect CLIENT SUBJECT` prints a link made by the
/// running sidecar.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_prints_a_connect_link() {
    let m = market("15m").await;
    let config = m.key_file.with_file_name("tokenproxy.toml");
    std::fs::write(&config, &m.config_text).expect("config");
    let return_to = format!("{}x", m.return_to);
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tokenproxy"));
    cmd.args([
        "subjects",
        "connect",
        "pos",
        "m-1",
        "--return-to",
        &return_to,
    ])
    .arg("--config")
    .arg(&config)
    .env_remove("TOKENPROXY_CONFIG");
    let out = run(cmd).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    let link = stdout.trim();
    assert!(
        link.starts_with(&format!("http://{}/connect/pos.", m.connect)),
        "stdout is the link: {stdout}"
    );
    assert!(stderr.contains("expires at"), "{stderr}");
    let mut browser = Browser::new();
    let authorize = browser.open(link).await;
    let code_url = browser.sign_in(&authorize, "m-1", "approve").await;
    let back = browser.get(&code_url).await;
    assert_eq!(
        location(&back),
        format!("{return_to}?subject=m-1&status=connected")
    );
    assert_eq!(m.pay("m-1", "m-1").await.status, StatusCode::OK);
}

/// A real browser (Chromium driven by playwright-core) opens a link, signs in
/// on the mock provider's page and lands on return_to with status=connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs node, playwright-core (tests/browser) and /usr/bin/chromium; .ci/run runs it"]
async fn a_real_browser_connects_a_merchant() {
    let m = market("15m").await;
    let link = m.link("m-2", None).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser/connect.mjs");
    let mut cmd = std::process::Command::new("node");
    cmd.arg(script)
        .arg(&link)
        .arg(&m.return_to)
        .args(["m-2", "m-2-password"]);
    let out = run(cmd).await;
    assert!(
        out.status.success(),
        "the browser did not connect:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let r = m.pay("m-2", "m-2").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        m.api
            .recorded()
            .last()
            .and_then(|r| r.token_account.clone())
            .as_deref(),
        Some("m-2")
    );
}

/// A reload that changes `[connect]` keeps the running listener and says it
/// needs a restart; shutdown closes the connect listener with the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connect_listener_survives_a_reload_and_closes_on_shutdown() {
    let mut m = market("15m").await;
    let changed = m
        .config_text
        .replace("session_ttl = \"15m\"", "session_ttl = \"5m\"");
    let env = MapEnv::new().file(
        m.key_file.to_str().expect("utf-8 path"),
        format!("{ADMIN_KEY}\n"),
    );
    let new = tokenproxy::config::from_str(&changed, None, &env).expect("valid config");
    let summary = m.running.reload(new).await.expect("reload");
    assert!(
        summary.needs_restart.contains(&"connect"),
        "a changed [connect] needs a restart: {summary:?}"
    );
    assert_eq!(m.running.connect_addr(), Some(m.connect));
    // Links still work, with the settings the listener started with.
    let r = m
        .admin_call(Method::POST, "/clients/pos/subjects/m-1/connect", "")
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let expires = humantime::parse_rfc3339(r.json()["expires_at"].as_str().expect("expiry"))
        .expect("RFC 3339");
    assert!(
        expires > std::time::SystemTime::now() + Duration::from_secs(10 * 60),
        "session_ttl stays 15m until a restart"
    );
    let link = r.json()["url"].as_str().expect("url").to_owned();
    Browser::new().open(&link).await;

    let connect = m.connect;
    m.running.shutdown().await;
    assert!(
        tokio::net::TcpStream::connect(connect).await.is_err(),
        "the connect listener is closed after shutdown"
    );
}

/// Connects `merchant` through a browser: link, sign-in, callback.
async fn connect_in_browser(m: &Market, merchant: &str) {
    let link = m.link(merchant, None).await;
    let mut browser = Browser::new();
    let authorize = browser.open(&link).await;
    let callback = browser.sign_in(&authorize, merchant, "approve").await;
    let back = browser.get(&callback).await;
    assert_eq!(back.status, StatusCode::FOUND, "{}", back.text());
    assert!(
        location(&back).ends_with(&format!("subject={merchant}&status=connected")),
        "{}",
        location(&back)
    );
}

/// With [dpop], the code exchange of a connect is signed with a key of the
/// subject's own, the tokens it obtains are bound to that key and sent with
/// its proofs, and a second connect of the subject keeps the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_dpop_a_connect_binds_the_subject_s_tokens_to_a_key_of_its_own() {
    let m = market_with("15m", "[clients.pos.dpop]\n").await;
    let mut jkts = Vec::new();
    for merchant in ["m-1", "m-2"] {
        connect_in_browser(&m, merchant).await;
        let exchange = m.provider.last_request().expect("the code exchange");
        assert_eq!(exchange.param("grant_type"), Some("authorization_code"));
        assert!(
            exchange.headers.contains_key("dpop"),
            "the code exchange carries a proof"
        );
        let r = m.pay(merchant, merchant).await;
        assert_eq!(r.status, StatusCode::OK, "{merchant}: {}", r.text());
        let seen = m.api.recorded();
        let last = seen.last().expect("the API saw the request");
        let jkt = last.dpop_jkt.clone().expect("the API accepted the proof");
        let token = last.headers["authorization"]
            .to_str()
            .expect("text")
            .strip_prefix("DPoP ")
            .expect("the DPoP scheme")
            .to_owned();
        assert_eq!(
            m.provider.validator().binding(&token),
            Some(jkt.clone()),
            "the token the code exchange obtained is bound to the key of the request's proof"
        );
        jkts.push(jkt);
    }
    assert_eq!(m.provider.dpop_bound(), 2);
    assert_eq!(m.provider.token_requests(), 2, "only the code exchanges");
    assert_ne!(jkts[0], jkts[1], "a key per subject");
    // Connected again: the subject's key is kept.
    connect_in_browser(&m, "m-1").await;
    let r = m.pay("m-1", "m-1").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let again = m.api.recorded().last().and_then(|r| r.dpop_jkt.clone());
    assert_eq!(
        again.as_ref(),
        Some(&jkts[0]),
        "the same key after a reconnect"
    );
    m.running.shutdown().await;
}
