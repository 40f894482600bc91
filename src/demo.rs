//! `tokenproxy demo`: the sidecar in front of the built-in mock provider and API,
//! on loopback, with no credentials and no network. It sends a request through
//! the sidecar every few seconds and prints which token the API saw, so a
//! refresh shows up as a new token number.
//!
//! Two more clients show what needs a person: `wallet` (one token, after
//! someone runs `tokenproxy authorize`) and `market`, a marketplace with one
//! token per merchant (`[subjects]`): the demo makes a one-time connect link
//! for two merchants and prints them; whoever opens one signs in at the mock
//! provider as that merchant, and requests naming the merchant carry its token
//! (the mock API refuses `/merchants/ID/...` with another merchant's).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;

use crate::clock::SystemClock;
use crate::config::{self, MapEnv};
use crate::secret::Secret;
use crate::{start, Listeners, StartError};
use tokenproxy_mock::{MockApi, MockProvider, ProviderConfig};

/// Options of `tokenproxy demo`.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Sidecar listen address (falls back to a free port when taken).
    pub listen: SocketAddr,
    /// Admin listen address (falls back to a free port when taken).
    pub admin: SocketAddr,
    /// Mock access token lifetime.
    pub token_lifetime: Duration,
    /// Interval between demo requests.
    pub interval: Duration,
    /// Stop after this long.
    pub exit_after: Option<Duration>,
    /// Where the wallet client (which needs a person to log in once) listens.
    pub wallet_listen: SocketAddr,
    /// The loopback port `tokenproxy authorize` receives the redirect on.
    pub redirect_port: u16,
    /// Where the marketplace client (one token per merchant) listens.
    pub market_listen: SocketAddr,
    /// Where the connect listener (merchants' browsers) listens.
    pub connect_listen: SocketAddr,
}

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A mock or listener could not bind.
    #[error("cannot bind: {0}")]
    Io(#[from] std::io::Error),
    /// The generated configuration was refused (a bug).
    #[error("demo configuration: {0}")]
    Config(#[from] config::ConfigError),
    /// The sidecar did not start.
    #[error(transparent)]
    Start(#[from] StartError),
    /// The running demo sidecar refused to make a connect link (a bug).
    #[error("cannot make the demo's connect links: {0}")]
    Link(#[from] crate::operator::OperatorError),
}

const DEMO_CLIENT_ID: &str = "demo-client";
const DEMO_CLIENT_SECRET: &str = "demo-secret";
/// The merchants of the marketplace client; each signs in as itself with
/// password `NAME-password` (the mock's tokens belong to whoever signed in).
const MERCHANTS: [&str; 2] = ["merchant-a", "merchant-b"];

/// Runs the demo until Ctrl-C / SIGTERM or `exit_after`.
pub async fn run(options: DemoOptions) -> Result<(), DemoError> {
    let provider = MockProvider::start(ProviderConfig {
        client_id: DEMO_CLIENT_ID.into(),
        client_secret: DEMO_CLIENT_SECRET.into(),
        lifetime: options.token_lifetime,
        users: std::iter::once("alice")
            .chain(MERCHANTS)
            .map(|user| (user.to_owned(), format!("{user}-password")))
            .collect(),
        ..ProviderConfig::default()
    })
    .await?;
    let api = MockApi::start(provider.validator()).await?;

    let proxy_listener = bind_or_any("the sidecar", options.listen).await?;
    let admin_listener = bind_or_any("the admin listener", options.admin).await?;
    let wallet_listener = bind_or_any("the wallet client", options.wallet_listen).await?;
    let market_listener = bind_or_any("the market client", options.market_listen).await?;
    let connect_listener = bind_or_any("the connect listener", options.connect_listen).await?;
    let listen = proxy_listener.local_addr()?;
    let admin = admin_listener.local_addr()?;
    let wallet = wallet_listener.local_addr()?;
    let market = market_listener.local_addr()?;
    let connect = connect_listener.local_addr()?;
    // Made up for this run: admin writes (connect links, imports) need it.
    let admin_key = Secret::new(crate::authorize::random_b64(24));
    let redirect_port = {
        // Probe the port `authorize` will listen on; the mock accepts any redirect URI.
        let wanted = SocketAddr::from(([127, 0, 0, 1], options.redirect_port));
        let probe = bind_or_any("the authorize redirect", wanted).await?;
        probe.local_addr()?.port()
    };
    let dir = private_dir()?;
    let config_path = dir.join("demo.toml");
    let store_key =
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, demo_store_key());
    let text = format!(
        r#"
# Written by `tokenproxy demo` for `tokenproxy authorize wallet --config THIS_FILE`
# and `tokenproxy subjects list|connect|import|delete market --config THIS_FILE`.
[admin]
listen = "{admin}"
api_key = "{admin_key}"

[store]
kind = "file"
path = "{state}"
key = "{store_key}"

[clients.wallet]
listen = "{wallet}"
upstream = "{upstream}"
allow_insecure = {wallet_waiver}

[clients.wallet.token]
url = "{token_url}"
grant = "refresh_token"
client_id = "{DEMO_CLIENT_ID}"
client_secret = "{DEMO_CLIENT_SECRET}"

[clients.wallet.authorize]
url = "{authorize_url}"
redirect_port = {redirect_port}
scope = "wallet"

[clients.payments]
listen = "{listen}"
upstream = "{upstream}"
allow_insecure = {listen_waiver}
timeout = "10s"

[clients.payments.token]
url = "{token_url}"
grant = "client_credentials"
client_id = "{DEMO_CLIENT_ID}"
client_secret = "{DEMO_CLIENT_SECRET}"
scope = "payments"

# A marketplace: one token per merchant, named by the x-tokenproxy-subject header.
[clients.market]
listen = "{market}"
upstream = "{upstream}"
allow_insecure = {market_waiver}

[clients.market.token]
url = "{token_url}"
grant = "refresh_token"
client_id = "{DEMO_CLIENT_ID}"
client_secret = "{DEMO_CLIENT_SECRET}"

[clients.market.authorize]
url = "{authorize_url}"
scope = "payments"

[clients.market.subjects]

[connect]
listen = "{connect}"
public_url = "http://{connect}"
return_to = ["{upstream}{connected}"]
"#,
        admin_key = admin_key.expose(),
        listen_waiver = public_listen_waiver(listen),
        wallet_waiver = public_listen_waiver(wallet),
        market_waiver = public_listen_waiver(market),
        connected = tokenproxy_mock::CONNECTED_PATH,
        upstream = api.url(),
        token_url = provider.token_url(),
        authorize_url = provider.authorize_url(),
        state = dir.join("tokens.json").display(),
    );
    // It holds the client secret, the store key and the admin key: readable by this user only.
    write_private(&config_path, &text)?;
    let env = MapEnv::new().var("DEMO_CLIENT_SECRET", DEMO_CLIENT_SECRET);
    let config = config::from_str(&text, Some(&config_path), &env)?;
    let mut proxies = std::collections::BTreeMap::new();
    proxies.insert(listen, proxy_listener);
    proxies.insert(wallet, wallet_listener);
    proxies.insert(market, market_listener);
    let running = start(
        config,
        Listeners {
            admin: admin_listener,
            proxies,
            connect: Some(connect_listener),
        },
        Arc::new(SystemClock),
    )?;
    let mut links = Vec::new();
    for merchant in MERCHANTS {
        let link = crate::operator::connect_link(admin, Some(&admin_key), "market", merchant, None)
            .await?;
        links.push((merchant, link));
    }

    println!(
        "tokenproxy demo is running.\n\
         \n  mock token endpoint  {token_url}  (client {DEMO_CLIENT_ID}; tokens live {life})\
         \n  mock payments API    {api}  (401 without a valid token)\
         \n  tokenproxy           http://{listen}  ->  {api}\
         \n  admin                http://{admin}\
         \n\nTry, in another terminal:\
         \n  curl -i http://{listen}/api/v1/payments             # 200: tokenproxy injected a token\
         \n  curl -i {api}/api/v1/payments   # 401: the API wants a token\
         \n  curl -i -X POST -d '{{\"amount\":100}}' http://{listen}/api/v1/payments\
         \n  curl -s http://{admin}/status\
         \n  curl -s http://{admin}/metrics | grep ^tokenproxy_token\
         \n\nEvery {every} the demo sends GET /api/v1/payments through tokenproxy; watch the token number\
         \nchange when the token is refreshed ahead of its expiry. Ctrl-C stops.\
         \n\nA second client, wallet (http://{wallet}), is like a provider that needs a person to log in\
         \nonce: it waits in needs_authorization until someone does.\
         \n  curl -s http://{admin}/readyz\
         \n  tokenproxy authorize wallet --config {config}\
         \nOpen the printed URL, sign in as alice / alice-password and approve; the wallet client\
         \nbecomes ready within 2 s, without a restart:\
         \n  curl -i http://{wallet}/api/v1/wallet\n\
         \nA third client, market (http://{market}), is a marketplace holding one token per merchant;\
         \nthe app names the merchant in the x-tokenproxy-subject header. Connect a merchant: open its\
         \none-time link in a browser and sign in as that merchant (password: NAME-password):\
         {links}\
         \nThen requests naming a merchant carry that merchant's own token:\
         \n  curl -i -H 'x-tokenproxy-subject: merchant-a' http://{market}/merchants/merchant-a/payments   # 200\
         \n  curl -i -H 'x-tokenproxy-subject: merchant-b' http://{market}/merchants/merchant-a/payments   # 403: not merchant-a's token\
         \n  curl -i http://{market}/merchants/merchant-a/payments   # 400 subject_required\
         \nA link works once and expires in 15 minutes; make another, and list the merchants:\
         \n  tokenproxy subjects connect market merchant-a --config {config}\
         \n  curl -s -X POST -H 'authorization: Bearer {key}' http://{admin}/clients/market/subjects/merchant-a/connect\
         \n  tokenproxy subjects list market --config {config}\n",
        links = links
            .iter()
            .map(|(merchant, link)| format!("\n  {merchant}  {}", link.url))
            .collect::<String>(),
        key = admin_key.expose(),
        token_url = provider.token_url(),
        life = humantime::format_duration(options.token_lifetime),
        api = api.url(),
        every = humantime::format_duration(options.interval),
        config = config_path.display(),
    );

    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let url = format!("http://{listen}/api/v1/payments");
    let ticker = async {
        let mut tick = tokio::time::interval(options.interval);
        loop {
            tick.tick().await;
            println!("{}", demo_request(&client, &url, &provider).await);
        }
    };
    let until = async {
        match options.exit_after {
            Some(d) => tokio::time::sleep(d).await,
            None => {
                if let Err(e) = crate::signal::shutdown().await {
                    tracing::error!(error = %e, "cannot listen for signals");
                    std::future::pending::<()>().await;
                }
            }
        }
    };
    tokio::select! {
        () = ticker => {}
        () = until => {}
    }
    running.shutdown().await;
    let _best_effort = std::fs::remove_dir_all(&dir);
    println!(
        "demo stopped: the mock provider saw {} token request(s), the API {} request(s)",
        provider.token_requests(),
        api.requests()
    );
    Ok(())
}

/// A new directory under the temp dir that only this user can enter (0700), with
/// an unpredictable name, so nobody can read the demo's files or plant their own.
fn private_dir() -> std::io::Result<std::path::PathBuf> {
    let mut builder = std::fs::DirBuilder::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        builder.mode(0o700);
    }
    let mut attempt = 0;
    loop {
        let dir = std::env::temp_dir().join(format!(
            "tokenproxy-demo-{}-{:016x}",
            std::process::id(),
            fastrand::u64(..)
        ));
        match builder.create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 8 => {
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Creates `path` (it must not exist) readable and writable by this user only (0600).
fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    options.open(path)?.write_all(text.as_bytes())
}

/// A store key for the demo's throw-away state file (fixed: the demo's tokens
/// are the mock's and live only as long as the demo).
fn demo_store_key() -> [u8; 32] {
    *b"tokenproxy-demo-store-key-32-b!!"
}

async fn demo_request(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    url: &str,
    provider: &MockProvider,
) -> String {
    let Ok(uri) = url.parse::<http::Uri>() else {
        return format!("bad demo URL {url}");
    };
    let started = tokio::time::Instant::now();
    match client.get(uri).await {
        Ok(response) => {
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let serial = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("token_serial").and_then(|s| s.as_u64()));
            format!(
                "GET /api/v1/payments via tokenproxy -> {} in {:.1} ms, API saw token #{} (token requests so far: {})",
                status.as_u16(),
                started.elapsed().as_secs_f64() * 1000.0,
                serial.map_or("-".to_owned(), |s| s.to_string()),
                provider.token_requests()
            )
        }
        Err(e) => format!("GET /api/v1/payments via tokenproxy failed: {e}"),
    }
}

/// `allow_insecure` for a demo client on `addr`: a listener beyond loopback (the
/// demo in a container, `--listen 0.0.0.0:8080`) is refused for real clients,
/// but the demo's credentials are the mock provider's, worth nothing elsewhere.
fn public_listen_waiver(addr: SocketAddr) -> &'static str {
    if addr.ip().is_loopback() {
        "[]"
    } else {
        r#"["public_listen"]   # the mock's credential only"#
    }
}

/// Binds `addr`, or a free port on its IP when `addr` is taken, and says which:
/// the banner then prints the address bound, never the one asked for.
async fn bind_or_any(what: &str, addr: SocketAddr) -> std::io::Result<TcpListener> {
    match TcpListener::bind(addr).await {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let listener = TcpListener::bind(SocketAddr::new(addr.ip(), 0)).await?;
            eprintln!(
                "{what}: {addr} is in use; using {} instead",
                listener.local_addr()?
            );
            Ok(listener)
        }
        Err(e) => Err(e),
    }
}
