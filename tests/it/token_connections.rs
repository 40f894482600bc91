//! Every token request goes on a connection of its own. A provider closes an
//! idle keep-alive connection when it likes (Node's servers after 5 s, gunicorn
//! after 2 s); a token request written on one it has just closed fails with a
//! reset, and for a rotating refresh token such a failure cannot be retried
//! safely: the provider may have spent it. Token requests are few (one per
//! token lifetime), so a new connection for each costs nothing that matters.

use crate::support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http::StatusCode;
use tokio::net::{TcpListener, TcpStream};

/// A TCP relay in front of `target` that counts the connections made to it.
async fn counting_relay(target: std::net::SocketAddr) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect(target).await {
                    let _ended = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn every_token_request_opens_a_connection_of_its_own() {
    let (provider, api) = support::backends().await;
    let (relay, connections) = counting_relay(provider.addr()).await;
    let text = support::ONE_CLIENT
        .replace("{client_extra}", "")
        .replace("{token_extra}", "")
        .replace("{upstream}", &api.url())
        .replace(
            "{token_url}",
            &provider
                .token_url()
                .replace(&provider.addr().to_string(), &relay.to_string()),
        )
        .replace("{client_id}", support::CLIENT_ID);
    let (_running, proxy, _admin) = support::start_sidecar(&text).await;
    let http = support::TestClient::new();
    let url = format!("http://{proxy}/v1/balance");

    assert_eq!(http.get(&url).await.status, StatusCode::OK);
    // The API refuses the first token once more: the sidecar fetches a new
    // one and replays.
    api.reject_next(1);
    let replayed = http.get(&url).await;
    assert_eq!(replayed.status, StatusCode::OK, "{}", replayed.text());

    assert_eq!(
        provider.token_requests(),
        2,
        "the first token and one after the 401"
    );
    assert_eq!(
        connections.load(Ordering::SeqCst),
        2,
        "each token request on a new connection, none on one kept idle"
    );
}
