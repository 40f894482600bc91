//! `tokenproxy authorize`: a person logs in once through the mock provider's
//! authorization page; the refresh token lands in the store, and a running
//! sidecar in `needs_authorization` becomes ready without a restart. A state
//! mismatch, a denial and a timeout each fail cleanly and store nothing.

use crate::support;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::time::Duration;

use http::{Method, StatusCode};
use support::{free_addr, hidden_inputs, start_sidecar, TestClient};
use tokenproxy_mock::{MockApi, MockProvider, ProviderConfig};

const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

struct Setup {
    provider: MockProvider,
    api: MockApi,
    dir: PathBuf,
    redirect_port: u16,
}

impl Setup {
    async fn new(name: &str) -> Setup {
        let provider = MockProvider::start(ProviderConfig {
            lifetime: Duration::from_secs(60),
            refresh_tokens: true,
            rotate_refresh_tokens: true,
            ..ProviderConfig::default()
        })
        .await
        .expect("provider");
        let api = MockApi::start(provider.validator()).await.expect("api");
        let dir = std::env::temp_dir().join(format!(
            "tokenproxy-authorize-{name}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).expect("dir");
        Setup {
            provider,
            api,
            dir,
            redirect_port: free_addr().port(),
        }
    }

    fn state_file(&self) -> PathBuf {
        self.dir.join("tokens.json")
    }

    /// The config template ({listen}/{admin} filled by start_sidecar).
    fn template(&self) -> String {
        format!(
            r#"
[admin]
listen = "{{admin}}"

[store]
kind = "file"
path = "{state}"
key = "{KEY}"

[clients.payments]
listen = "{{listen}}"
upstream = "{upstream}"

[clients.payments.token]
url = "{token_url}"
grant = "refresh_token"
client_id = "{client_id}"
client_secret = "${{CLIENT_SECRET}}"

[clients.payments.authorize]
url = "{authorize_url}"
redirect_port = {port}
scope = "payments"
params = {{ prompt = "consent" }}
"#,
            state = self.state_file().display(),
            upstream = self.api.url(),
            token_url = self.provider.token_url(),
            client_id = support::CLIENT_ID,
            authorize_url = self.provider.authorize_url(),
            port = self.redirect_port,
        )
    }

    /// Writes a config file for the command (addresses filled with placeholders
    /// the command does not use).
    fn config_file(&self) -> PathBuf {
        let path = self.dir.join("tokenproxy.toml");
        let text = self
            .template()
            .replace("{listen}", &free_addr().to_string())
            .replace("{admin}", &free_addr().to_string())
            .replace("${CLIENT_SECRET}", support::CLIENT_SECRET);
        std::fs::write(&path, text).expect("config");
        path
    }
}

/// The `authorize` child and the URL it printed.
struct Authorize {
    child: Child,
    stderr: BufReader<ChildStderr>,
    printed: String,
    url: String,
}

impl Authorize {
    fn start(config: &Path, args: &[&str]) -> Authorize {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tokenproxy"))
            .arg("authorize")
            .arg("payments")
            .arg("--config")
            .arg(config)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tokenproxy authorize starts");
        let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
        let mut printed = String::new();
        let url = loop {
            let mut line = String::new();
            let n = stderr.read_line(&mut line).expect("read stderr");
            assert!(n > 0, "authorize printed no URL:\n{printed}");
            printed.push_str(&line);
            if let Some(u) = line.trim().strip_prefix("http") {
                break format!("http{u}");
            }
        };
        Authorize {
            child,
            stderr,
            printed,
            url,
        }
    }

    /// Pastes `text` (with --no-listen).
    fn paste(&mut self, text: &str) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{text}").expect("paste");
    }

    /// Waits for the exit; (success, stdout, everything printed to stderr).
    fn finish(mut self) -> (bool, String, String) {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut self.stderr, &mut rest);
        self.printed.push_str(&rest);
        let out = self.child.wait_with_output().expect("wait");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            self.printed,
        )
    }
}

/// Acts as the person's browser: opens the URL, signs in, and clicks `decision`.
/// Returns where the provider redirects to.
async fn browser(http: &TestClient, url: &str, decision: &str) -> String {
    let page = http.get(url).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.text());
    let page = page.text();
    let mut form = form_urlencoded::Serializer::new(String::new());
    for (k, v) in hidden_inputs(&page) {
        form.append_pair(&k, &v);
    }
    form.append_pair("username", "alice");
    form.append_pair("password", "alice-password");
    form.append_pair("decision", decision);
    let action = url.split('?').next().expect("url");
    let reply = http
        .request(
            Method::POST,
            action,
            &[("content-type", "application/x-www-form-urlencoded")],
            form.finish().as_bytes(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::FOUND, "{}", reply.text());
    reply.headers["location"]
        .to_str()
        .expect("location")
        .to_owned()
}

fn state_bytes(path: &Path) -> Option<Vec<u8>> {
    std::fs::read(path).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_logs_in_once_and_the_waiting_sidecar_becomes_ready_without_a_restart() {
    let s = Setup::new("e2e").await;
    let (running, proxy, admin) = start_sidecar(&s.template()).await;
    let http = TestClient::new();

    // No refresh token anywhere yet: the sidecar says what to run.
    let mut ready = http.get(&format!("http://{admin}/readyz")).await;
    for _ in 0..100 {
        if ready.text().contains("needs_authorization") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        ready = http.get(&format!("http://{admin}/readyz")).await;
    }
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        ready.text().contains("tokenproxy authorize payments"),
        "{}",
        ready.text()
    );
    let refused = http.get(&format!("http://{proxy}/api/v1/payments")).await;
    assert_eq!(refused.error_code(), Some("token_unavailable"));

    // The person: run the command, open the URL, sign in, approve.
    let config = s.config_file();
    let cmd = Authorize::start(&config, &["--timeout", "30s"]);
    assert!(
        cmd.url.contains("code_challenge_method=S256"),
        "{}",
        cmd.url
    );
    assert!(cmd.url.contains("prompt=consent"), "{}", cmd.url);
    let location = browser(&http, &cmd.url, "approve").await;
    assert!(
        location.starts_with(&format!("http://127.0.0.1:{}/callback?", s.redirect_port)),
        "{location}"
    );
    let landing = http.get(&location).await;
    assert_eq!(landing.status, StatusCode::OK);
    assert!(landing.text().contains("authorization received"));
    let (ok, stdout, stderr) = cmd.finish();
    assert!(ok, "authorize failed:\n{stderr}\n{stdout}");
    assert!(stdout.contains("the file store"), "{stdout}");
    assert!(
        stdout.contains("scope:                   payments"),
        "{stdout}"
    );
    assert_eq!(s.provider.grant_requests("authorization_code"), 1);

    // The sidecar picks it up from the store: ready, and requests pass.
    let mut became_ready = false;
    for _ in 0..300 {
        if http.get(&format!("http://{admin}/readyz")).await.status == StatusCode::OK {
            became_ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        became_ready,
        "the sidecar did not leave needs_authorization"
    );
    let r = http.get(&format!("http://{proxy}/api/v1/payments")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    // It used the stored access token: no token request of its own.
    assert_eq!(s.provider.token_requests(), 1, "only the code exchange");
    let header = s.api.recorded().last().expect("a request").headers["authorization"]
        .to_str()
        .expect("header")
        .trim_start_matches("Bearer ")
        .to_owned();
    assert!(
        !stdout.contains(&header) && !stderr.contains(&header),
        "a token was printed"
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_with_another_state_is_refused_and_stores_nothing() {
    let s = Setup::new("state").await;
    let config = s.config_file();
    let http = TestClient::new();
    let mut cmd = Authorize::start(&config, &["--no-listen", "--timeout", "30s"]);
    let location = browser(&http, &cmd.url, "approve").await;
    let forged = location
        .split('&')
        .map(|p| {
            if p.starts_with("state=") {
                "state=forged".to_owned()
            } else {
                p.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("&");
    assert_ne!(forged, location);
    cmd.paste(&forged);
    let (ok, _stdout, stderr) = cmd.finish();
    assert!(!ok);
    assert!(stderr.contains("state does not match"), "{stderr}");
    assert_eq!(state_bytes(&s.state_file()), None, "nothing stored");
    assert_eq!(
        s.provider.grant_requests("authorization_code"),
        0,
        "no exchange"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_authorization_fails_cleanly_and_keeps_the_stored_state() {
    let s = Setup::new("denied").await;
    let config = s.config_file();
    let http = TestClient::new();
    // A first, successful authorization fills the store.
    let mut first = Authorize::start(&config, &["--no-listen", "--timeout", "30s"]);
    let location = browser(&http, &first.url, "approve").await;
    first.paste(&location);
    let (ok, _, stderr) = first.finish();
    assert!(ok, "{stderr}");
    let before = state_bytes(&s.state_file()).expect("stored");

    let mut cmd = Authorize::start(&config, &["--no-listen", "--timeout", "30s"]);
    let location = browser(&http, &cmd.url, "deny").await;
    assert!(location.contains("error=access_denied"), "{location}");
    cmd.paste(&location);
    let (ok, _stdout, stderr) = cmd.finish();
    assert!(!ok);
    assert!(stderr.contains("access_denied"), "{stderr}");
    assert!(stderr.contains("nothing was stored"), "{stderr}");
    assert_eq!(
        state_bytes(&s.state_file()),
        Some(before),
        "state untouched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_redirect_within_the_timeout_fails_cleanly_and_stores_nothing() {
    let s = Setup::new("timeout").await;
    let config = s.config_file();
    let cmd = Authorize::start(&config, &["--timeout", "1s"]);
    let (ok, _stdout, stderr) = cmd.finish();
    assert!(!ok);
    assert!(stderr.contains("no redirect within 1s"), "{stderr}");
    assert_eq!(state_bytes(&s.state_file()), None);
    // The listener is gone with the command.
    assert!(std::net::TcpStream::connect(("127.0.0.1", s.redirect_port)).is_err());
}

/// Security review (low): a forged request to the redirect listener (another state,
/// no state, or no code) used to end the login with an error; it gets 400 and the
/// command keeps waiting for the real redirect, which then succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_callbacks_get_400_and_the_real_redirect_still_completes_the_login() {
    let s = Setup::new("forged").await;
    let config = s.config_file();
    let http = TestClient::new();
    let cmd = Authorize::start(&config, &["--timeout", "30s"]);
    let state = form_urlencoded::parse(cmd.url.split_once('?').expect("query").1.as_bytes())
        .find(|(k, _)| k == "state")
        .map(|(_, v)| v.into_owned())
        .expect("the authorization URL carries a state");
    let callback = format!("http://127.0.0.1:{}/callback", s.redirect_port);
    let state_param: String = form_urlencoded::byte_serialize(state.as_bytes()).collect();
    for forged in [
        format!("{callback}?code=attacker-code&state=forged"),
        format!("{callback}?code=attacker-code"),
        format!("{callback}?error=access_denied&state=forged"),
        format!("{callback}?state={state_param}"),
        callback.clone(),
    ] {
        let reply = http.get(&forged).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{forged} is not the redirect the login waits for: {}",
            reply.text()
        );
    }
    let location = browser(&http, &cmd.url, "approve").await;
    let landing = http.get(&location).await;
    assert_eq!(landing.status, StatusCode::OK, "{}", landing.text());
    let (ok, stdout, stderr) = cmd.finish();
    assert!(
        ok,
        "the real redirect should complete the login:\n{stderr}\n{stdout}"
    );
    assert_eq!(
        s.provider.grant_requests("authorization_code"),
        1,
        "only the real code is exchanged"
    );
    assert!(
        state_bytes(&s.state_file()).is_some(),
        "the tokens are stored"
    );
}
