//! A stored record belongs to one credential identity (client id, token and
//! refresh URLs, user, grant, scope, params such as `audience`, and the
//! bootstrap refresh token it started from), not just to a client name: two
//! deployments sharing one `[store]` under the same client name never serve
//! each other's token, and a state file written by an earlier version is taken
//! over once.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use http::StatusCode;
use support::{start_sidecar, LogCapture, TestClient};
use tokenproxy::Running;
use tokenproxy_mock::{MockApi, MockProvider, ProviderConfig};

const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

use support::temp_dir;

struct Setup {
    provider: MockProvider,
    api: MockApi,
    path: PathBuf,
}

impl Setup {
    async fn new(name: &str) -> Setup {
        let provider = MockProvider::start(ProviderConfig {
            lifetime: Duration::from_secs(300),
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
            path: temp_dir(name).join("tokens.json"),
        }
    }

    /// One deployment of client `payments`; `token_extra` sets what differs.
    fn config(&self, token_extra: &str) -> String {
        format!(
            r#"
[admin]
listen = "{{admin}}"

[store]
kind = "file"
path = "{path}"
key = "{KEY}"

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
            client_id = support::CLIENT_ID,
        )
    }

    /// Starts `config`, makes one proxied request, stops; returns the serial
    /// of the token the API saw.
    async fn one_request(&self, config: &str) -> u64 {
        let (running, proxy, _admin) = start_sidecar(config).await;
        let http = TestClient::new();
        let r = http.get(&format!("http://{proxy}/api/v1/payments")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        stop(running).await;
        self.api
            .recorded()
            .last()
            .and_then(|r| r.token_serial)
            .expect("the API saw a token it issued")
    }
}

async fn stop(running: Running) {
    running.shutdown().await;
}

/// Security review finding 10: two deployments of client `payments` that
/// differ only in `params.audience` share one state file; each gets its own
/// token and neither serves the other's, nor overwrites it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_differing_in_audience_never_serve_each_others_token() {
    let s = Setup::new("audience").await;
    let staging = s.config(r#"params = { audience = "payments-staging" }"#);
    let prod = s.config(r#"params = { audience = "payments-prod" }"#);

    let staging_serial = s.one_request(&staging).await;
    assert_eq!(s.provider.token_requests(), 1);

    let prod_serial = s.one_request(&prod).await;
    assert_eq!(
        s.provider.token_requests(),
        2,
        "the prod deployment should have asked for its own token, not taken the staging one from the store"
    );
    assert_ne!(
        prod_serial, staging_serial,
        "the prod deployment served the staging deployment's token"
    );

    // Each record survives the other's writes: a restart of either adopts its own.
    assert_eq!(s.one_request(&staging).await, staging_serial);
    assert_eq!(s.one_request(&prod).await, prod_serial);
    assert_eq!(
        s.provider.token_requests(),
        2,
        "a restart should have adopted its own stored token (one deployment overwrote the other's record)"
    );
}

/// Security review finding 10: two deployments bootstrapped with different
/// refresh tokens (two accounts of one OAuth client) share one state file; the
/// second uses its own bootstrap refresh token instead of the first one's
/// stored chain, and a warning names the client whose configured token is not
/// the origin of the stored chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_different_bootstrap_refresh_token_starts_its_own_chain_with_a_warning() {
    // The only test here that installs the global subscriber.
    let logs = LogCapture::install(tracing::Level::INFO);
    let s = Setup::new("bootstrap").await;
    let rt_a = s.provider.issue_refresh_token();
    let rt_b = s.provider.issue_refresh_token();
    let account_a = s.config(&format!(
        "grant = \"refresh_token\"\nrefresh_token = \"{rt_a}\""
    ));
    let account_b = s.config(&format!(
        "grant = \"refresh_token\"\nrefresh_token = \"{rt_b}\""
    ));

    let serial_a = s.one_request(&account_a).await;
    assert_eq!(s.provider.grant_requests("refresh_token"), 1);

    let serial_b = s.one_request(&account_b).await;
    assert_eq!(
        s.provider.grant_requests("refresh_token"),
        2,
        "the second deployment should have used its own bootstrap refresh token"
    );
    assert_ne!(serial_b, serial_a, "account B was served account A's token");
    let text = logs.text();
    assert!(
        text.contains("configured bootstrap refresh token is not the origin of the stored chain")
            && text.contains("client=payments"),
        "a warning should name the client whose bootstrap token differs from the stored chain's origin:\n{text}"
    );
    assert!(
        !text.contains(&rt_a) && !text.contains(&rt_b),
        "a refresh token was logged"
    );

    // Account A's rotated chain is intact: a restart adopts it without a request.
    assert_eq!(s.one_request(&account_a).await, serial_a);
    assert_eq!(s.provider.grant_requests("refresh_token"), 2);
    assert_eq!(
        s.provider.refresh_token_reuse(),
        0,
        "a spent refresh token was sent again"
    );
}
