//! Connection floods: the admin listener has its own small cap and a cap per
//! peer IP, so one neighbour holding idle connections cannot starve probes
//! from elsewhere; refused connections are logged at most once per interval.
//!
//! Linux routes all of 127.0.0.0/8 to the loopback interface, so clients bound
//! to 127.0.0.2 and 127.0.0.3 stand for different pods.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use support::{harness, wait_ready, LogCapture, Options};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const SMALL_PROXY_CAP: &str = r#"
[admin]
listen = "{admin}"

[limits]
max_connections = 16

[clients.payments]
listen = "{listen}"
upstream = "{upstream}"

[clients.payments.token]
url = "{token_url}"
client_id = "{client_id}"
client_secret = "${CLIENT_SECRET}"
"#;

async fn connect_from(source: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    let ip: IpAddr = source.parse().map_err(std::io::Error::other)?;
    socket.bind(SocketAddr::new(ip, 0))?;
    socket.connect(to).await
}

/// Opens `n` connections from `source` and keeps them open without a request.
async fn hold_idle(source: &str, to: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        match connect_from(source, to).await {
            Ok(c) => held.push(c),
            Err(e) => panic!("connect from {source} to {to}: {e}"),
        }
    }
    held
}

/// `GET path` from `source` on a fresh connection: the status line, or why none came.
async fn get_from(source: &str, to: SocketAddr, path: &str) -> String {
    let exchange = async {
        let mut c = connect_from(source, to).await?;
        c.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut answer = Vec::new();
        c.read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(
            String::from_utf8_lossy(&answer)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned(),
        )
    };
    match tokio::time::timeout(Duration::from_secs(5), exchange).await {
        Ok(Ok(line)) => line,
        Ok(Err(e)) => format!("error: {e}"),
        Err(_) => "no answer within 5 s".to_owned(),
    }
}

/// Security review finding 9: 200 idle connections from one peer take only that
/// peer's share of the admin slots; kubelet-style probes from other addresses
/// are still answered, and the refusals make a bounded number of WARN lines.
/// The proxy listeners' refusals are rate-limited the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_flood_cannot_starve_admin_probes_or_fill_the_log() {
    let logs = LogCapture::install(tracing::Level::WARN);
    let h = harness(Options {
        template: SMALL_PROXY_CAP,
        ..Options::default()
    })
    .await;
    wait_ready(&h).await;

    let flood = hold_idle("127.0.0.2", h.admin, 200).await;
    for source in ["127.0.0.1", "127.0.0.3"] {
        let line = get_from(source, h.admin, "/healthz").await;
        assert!(
            line.starts_with("HTTP/1.1 200"),
            "a probe from {source} is answered during the flood: {line:?}"
        );
    }
    let proxy_flood = hold_idle("127.0.0.4", h.proxy, 100).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused_lines = logs
        .text()
        .lines()
        .filter(|l| l.contains("connections refused"))
        .count();
    assert!(
        (1..=2).contains(&refused_lines),
        "about 280 refused connections make one WARN line per listener, not one each ({refused_lines} lines)"
    );
    drop(flood);
    drop(proxy_flood);
}
