//! An egress proxy between the sidecar and the outside: a client's `proxy` key
//! (with credentials) or the `https_proxy`/`http_proxy`/`no_proxy` environment
//! sends the upstream and token endpoint connections through a CONNECT tunnel;
//! `proxy = "none"` connects directly.

use crate::support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http::StatusCode;
use support::{start_sidecar_env, TestClient, CLIENT_SECRET};
use tokenproxy::config::MapEnv;
use tokenproxy_mock::{MockApi, MockProvider, ProviderConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A CONNECT proxy on loopback that records each request head.
async fn connect_proxy() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&heads);
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut byte = [0u8; 1];
                while !buf.ends_with(b"\r\n\r\n") && buf.len() < 8192 {
                    match client.read(&mut byte).await {
                        Ok(1) => buf.push(byte[0]),
                        _ => return,
                    }
                }
                let head = String::from_utf8_lossy(&buf).into_owned();
                seen.lock().expect("lock").push(head.clone());
                let Some(target) = head
                    .strip_prefix("CONNECT ")
                    .and_then(|r| r.split_whitespace().next())
                else {
                    let _ = client
                        .write_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
                        .await;
                    return;
                };
                let Ok(mut upstream) = TcpStream::connect(target).await else {
                    let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                    return;
                };
                if client
                    .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                    .await
                    .is_ok()
                {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
            });
        }
    });
    (addr, heads)
}

fn template(token_url: &str, upstream: &str, proxy_line: &str) -> String {
    format!(
        "[admin]\nlisten = \"{{admin}}\"\n[clients.payments]\nlisten = \"{{listen}}\"\nupstream = \"{upstream}\"\n{proxy_line}\n\
         [clients.payments.token]\nurl = \"{token_url}\"\nclient_id = \"demo-client\"\nclient_secret = \"${{CLIENT_SECRET}}\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_proxy_with_credentials_carries_upstream_and_token_traffic() {
    let provider = MockProvider::start(ProviderConfig::default())
        .await
        .expect("provider");
    let api = MockApi::start(provider.validator()).await.expect("api");
    let (proxy, heads) = connect_proxy().await;
    let text = template(
        &provider.token_url(),
        &api.url(),
        &format!("proxy = \"http://corp-user:${{PROXY_PASSWORD}}@{proxy}\""),
    );
    let env = MapEnv::new()
        .var("CLIENT_SECRET", CLIENT_SECRET)
        .var("PROXY_PASSWORD", "pr0xy-pass");
    let (_running, listen, _) = start_sidecar_env(&text, env).await;
    let r = TestClient::new()
        .get(&format!("http://{listen}/api/v1/payments"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let heads = heads.lock().expect("lock").clone();
    let connects: Vec<&str> = heads.iter().filter_map(|h| h.lines().next()).collect();
    assert!(
        connects
            .iter()
            .any(|l| l.contains(&provider.addr().to_string())),
        "the token request was tunnelled: {connects:?}"
    );
    assert!(
        connects.iter().any(|l| l.contains(&api.addr().to_string())),
        "the API request was tunnelled: {connects:?}"
    );
    // base64("corp-user:pr0xy-pass")
    assert!(
        heads
            .iter()
            .all(|h| h.contains("Basic Y29ycC11c2VyOnByMHh5LXBhc3M=")),
        "the proxy credentials are sent: {heads:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_environment_proxy_honours_no_proxy_and_none_disables_it() {
    let provider = MockProvider::start(ProviderConfig::default())
        .await
        .expect("provider");
    let api = MockApi::start(provider.validator()).await.expect("api");
    let (proxy, heads) = connect_proxy().await;
    // The token endpoint is named "localhost" and listed in no_proxy; the API is not.
    let token_url = format!("http://localhost:{}/oauth2/token", provider.addr().port());
    let env = || {
        MapEnv::new()
            .var("CLIENT_SECRET", CLIENT_SECRET)
            .var("http_proxy", format!("http://{proxy}"))
            .var("no_proxy", "localhost")
    };
    let (_running, listen, _) =
        start_sidecar_env(&template(&token_url, &api.url(), ""), env()).await;
    let r = TestClient::new()
        .get(&format!("http://{listen}/api/v1/payments"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    {
        let heads = heads.lock().expect("lock");
        assert_eq!(
            heads.len(),
            1,
            "only the API connection used the proxy: {heads:?}"
        );
        assert!(heads[0].starts_with(&format!("CONNECT {}", api.addr())));
    }

    let (_running2, listen2, _) =
        start_sidecar_env(&template(&token_url, &api.url(), "proxy = \"none\""), env()).await;
    let r = TestClient::new()
        .get(&format!("http://{listen2}/api/v1/payments"))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        heads.lock().expect("lock").len(),
        1,
        "proxy = \"none\" connects directly"
    );
}
