//! Reloading the configuration in place: unchanged clients keep their token and
//! connections, changed ones get a new token, clients and listeners come and go.

mod support;

use std::time::Duration;

use http::StatusCode;
use support::{eventually, free_addr, start_sidecar, TestClient, CLIENT_SECRET};
use tokenproxy::config::{self, MapEnv};
use tokenproxy::mock::{MockApi, MockProvider, ProviderConfig};

fn client_toml(name: &str, listen: &str, upstream: &str, token_url: &str, scope: &str) -> String {
    format!(
        "[clients.{name}]\nlisten = \"{listen}\"\nupstream = \"{upstream}\"\n\
         [clients.{name}.token]\nurl = \"{token_url}\"\nclient_id = \"demo-client\"\n\
         client_secret = \"${{CLIENT_SECRET}}\"\nscope = \"{scope}\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_unchanged_clients_renews_changed_ones_and_moves_listeners() {
    let provider = MockProvider::start(ProviderConfig::default())
        .await
        .expect("provider");
    let api = MockApi::start(provider.validator()).await.expect("api");
    let (upstream, token_url) = (api.url(), provider.token_url());
    let admin_section = "[admin]\nlisten = \"{admin}\"\n";
    let a = client_toml("a", "{listen}", &upstream, &token_url, "payments");
    let (mut running, proxy_a, admin) = start_sidecar(&format!("{admin_section}{a}")).await;
    let http = TestClient::new();
    let url_a = format!("http://{proxy_a}/api/v1/payments");
    assert_eq!(http.get(&url_a).await.status, StatusCode::OK);
    assert_eq!(provider.token_requests(), 1);

    // Add client b on a new listener; a is unchanged.
    let listen_b = free_addr();
    let b = client_toml(
        "b",
        &listen_b.to_string(),
        &upstream,
        &token_url,
        "payments",
    );
    let admin_line = format!("[admin]\nlisten = \"{admin}\"\n");
    let a_now = a.replace("{listen}", &proxy_a.to_string());
    let env = MapEnv::new().var("CLIENT_SECRET", CLIENT_SECRET);
    let second = config::from_str(&format!("{admin_line}{a_now}{b}"), None, &env).expect("valid");
    let summary = running.reload(second).await.expect("reload");
    assert_eq!(summary.added, vec!["b".to_owned()]);
    assert_eq!(summary.unchanged, vec!["a".to_owned()]);
    assert!(summary.needs_restart.is_empty(), "{summary:?}");
    assert_eq!(
        http.get(&url_a).await.status,
        StatusCode::OK,
        "a keeps serving on its open connection"
    );
    assert_eq!(
        api.recorded().last().and_then(|r| r.token_serial),
        Some(1),
        "a kept its token"
    );
    let url_b = format!("http://{listen_b}/api/v1/payments");
    assert_eq!(
        http.get(&url_b).await.status,
        StatusCode::OK,
        "b serves on its new listener"
    );
    assert_eq!(provider.token_requests(), 2, "only b needed a token");

    // Change a (scope) and remove b.
    let a_changed = client_toml(
        "a",
        &proxy_a.to_string(),
        &upstream,
        &token_url,
        "payments read",
    );
    let third = config::from_str(&format!("{admin_line}{a_changed}"), None, &env).expect("valid");
    let summary = running.reload(third).await.expect("reload");
    assert_eq!(summary.changed, vec!["a".to_owned()]);
    assert_eq!(summary.removed, vec!["b".to_owned()]);
    assert_eq!(http.get(&url_a).await.status, StatusCode::OK);
    assert_eq!(
        provider.token_requests(),
        3,
        "the changed client got a new token"
    );
    assert_eq!(
        provider
            .last_request()
            .and_then(|r| r.param("scope").map(str::to_owned))
            .as_deref(),
        Some("payments read")
    );
    let gone = eventually(Duration::from_secs(5), || {
        std::net::TcpStream::connect(listen_b).is_err()
    })
    .await;
    assert!(gone, "b's listener closes");
    let status = http.get(&format!("http://{admin}/status")).await.json();
    assert!(
        status["clients"].get("b").is_none(),
        "b is gone from /status: {status}"
    );
}
